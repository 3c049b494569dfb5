"""A size-limited tmpfs for a test: a real filesystem that fills up (or is remounted read-only) on cue."""
from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
import time
import uuid
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional

import pytest

from .archive import ArchiveServer, NamedFiles
from .databases import fresh_database, server_available
from .stack import CartStack, running


@contextlib.contextmanager
def mounted_tmpfs(mount_point: pathlib.Path, size: str) -> Iterator[pathlib.Path]:
    """Mount a tmpfs of `size` (mount's syntax: '1m', '4400k') at `mount_point` (made here) for the block.

    Skips the test where mounting needs a root this process is not. Unmounted lazily at the end,
    so a file still open does not keep it.
    """
    mount_point.mkdir(parents=True)
    mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(mount_point)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f'cannot mount a size-limited tmpfs here (needs root): {mounted.stderr.strip()}')
    try:
        yield mount_point
    finally:
        subprocess.run(['umount', '-l', str(mount_point)], check=False)


def free_bytes(volume: pathlib.Path) -> int:
    """Free bytes on the filesystem of `volume`, as an unprivileged writer sees them."""
    stats = os.statvfs(volume)
    return stats.f_bavail * stats.f_frsize


def fill_until(volume: pathlib.Path, pad: pathlib.Path, free: int) -> None:
    """Write zeros to `pad` (on `volume`'s filesystem) until `free` bytes, to a page or two, are left."""
    fill = free_bytes(volume) - free
    assert fill >= 0, f'the volume holds more than planned: {free_bytes(volume)} free'
    block = 64 * 1024
    with open(pad, 'wb') as handle:
        for _ in range(fill // block):
            handle.write(bytes(block))
        handle.write(bytes(fill % block))
    assert abs(free_bytes(volume) - free) <= 2 * 4096, free_bytes(volume)


@contextlib.contextmanager
def running_on_tmpfs(kind: str, base: pathlib.Path, archive: ArchiveServer, size: str,
                     overrides: Mapping[str, Mapping[str, str]], share_staged_files: Optional[bool] = None,
                     workers: int = 1, concurrency: int = 2) -> Iterator[CartStack]:
    """A started stack on a fresh `kind` database, its volume_path a tmpfs of `size` mounted at base/volume.

    Skips the test when the database server is not answering or no tmpfs can be mounted here.
    Afterwards the stack is stopped, its database dropped and the tmpfs unmounted.
    """
    if not server_available(kind):
        pytest.skip(f'the {kind} server is not answering on 127.0.0.1')
    with mounted_tmpfs(base / 'volume', size):
        url = fresh_database(kind, base)
        stack = CartStack(base, archive, url, workers=workers, concurrency=concurrency, overrides=overrides,
                          share_staged_files=share_staged_files)
        with running(stack, kind, url):
            yield stack


PAD_NAME = 'other-data.pad'  # not a cart: stands for whatever else fills a shared volume


class VolumeTest:
    """One test's carts and archive files on a stack running_on_tmpfs: its uids, the files its carts share by
    name, the cache entries of those, the volume's free bytes and its filler, and the cleanup that leaves
    the volume empty for the next test. This process is bound to the stack's database (to read rows and
    age them)."""

    def __init__(self, stack: CartStack, file_size: int) -> None:
        """Files shared by name are `file_size` bytes each."""
        from pacifica.cartd import database  # pylint: disable=import-outside-toplevel
        from pacifica.cartd.config import load_settings  # pylint: disable=import-outside-toplevel
        self.stack = stack
        self.tag = uuid.uuid4().hex[:8]
        self.files = NamedFiles(stack.archive, self.tag, file_size)
        self.db: Any = database.bind(load_settings(str(stack.config), environ={}))

    def uid(self, name: str) -> str:
        """The uid of this test's cart `name`."""
        return f'{name}-{self.tag}'

    def entries(self) -> Dict[str, str]:
        """Shared file name -> state of its staged-file cache entry, for those that have one."""
        from pacifica.cartd import database  # pylint: disable=import-outside-toplevel
        from pacifica.cartd.orm import StagedFile  # pylint: disable=import-outside-toplevel
        with database.connection():
            rows = StagedFile.select(StagedFile.archive_id, StagedFile.state).where(
                StagedFile.archive_id.in_(list(self.files.data)))
            return {self.files.name(row.archive_id): row.state for row in rows}

    def free_bytes(self) -> int:
        """Free bytes on the volume, as the cart sees them."""
        return free_bytes(self.stack.volume)

    def part_files(self) -> List[pathlib.Path]:
        """Downloads in progress (or left behind) on the volume."""
        return [path for path in self.stack.volume.rglob('*') if path.name.endswith('.part')]

    def wait_no_part_files(self, deadline_s: float = 30) -> None:
        """Wait until no download is writing to the volume."""
        deadline = time.monotonic() + deadline_s
        while self.part_files():
            assert time.monotonic() < deadline, f'downloads still writing: {self.part_files()}'
            time.sleep(0.1)

    def leave_free(self, free: int) -> None:
        """Fill the volume with other data until `free` bytes (to a page) are left, once no download writes."""
        self.wait_no_part_files()
        fill_until(self.stack.volume, self.stack.volume / PAD_NAME, free)

    def remove_all(self, carts: Iterable[str]) -> None:
        """DELETE these carts of the test, remove the filler, purge, give back the database connections.

        A DELETE removes a cart's own links only: with share_staged_files its files stay in the
        cache, pinned by no cart, and would be the first to go in the next test. The purge removes
        them (and the carts' rows), so each test starts from an empty volume.
        """
        for name in carts:
            self.stack.delete(self.uid(name))
        (self.stack.volume / PAD_NAME).unlink(missing_ok=True)
        purged = self.stack.run_cmd('purge', '--time-ago', '0 seconds')
        assert purged.returncode == 0, purged.stdout + purged.stderr
        if hasattr(self.db, 'close_all'):  # a pool (PostgreSQL, MySQL)
            self.db.close_all()
        else:
            self.db.close()
