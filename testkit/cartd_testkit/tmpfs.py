"""A size-limited tmpfs for a test: a real filesystem that fills up (or is remounted read-only) on cue."""
from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
from typing import Iterator, Mapping, Optional

import pytest

from .archive import ArchiveServer
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
