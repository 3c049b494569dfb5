"""The cart volume on disk: each cart's directory (staged files, partial downloads, tar), the cartuids links,
and the staged-file cache's files."""
from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable, List

from .errors import BadRequest

PARTIAL_SUFFIX = '.part'
LINKS_DIR = 'cartuids'
STAGED_FILES_DIR = 'staged-files'  # not a cart id: no cart's removal, eviction or purge reaches it
# Where the volume cannot hard-link, a file is copied instead.
NO_LINK_ERRNOS = frozenset((errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP))


@dataclasses.dataclass(frozen=True)
class CartVolume:
    """Where a cart's files, partial downloads, tar and link live under volume_path."""

    root: Path

    def cart_dir(self, cart_id: int) -> Path:
        """`<volume>/<cart id>`: everything of one cart, removed as one tree."""
        return self.root / str(cart_id)

    def files_dir(self, cart_id: int, cart_uid: str) -> Path:
        """`<volume>/<cart id>/<uid>`: the staged files, laid out as in the tar."""
        return self.cart_dir(cart_id) / cart_uid

    def file_path(self, cart_id: int, cart_uid: str, relative: str) -> Path:
        """Where one staged file lives; the relative path was checked at creation."""
        base = self.files_dir(cart_id, cart_uid)
        target = base / relative
        if relative.startswith('/') or '..' in relative.split('/'):  # never for a path checked at creation
            if os.path.commonpath([os.path.abspath(target), os.path.abspath(base)]) != os.path.abspath(base):
                raise BadRequest(f'file path {relative!r} leaves the cart')
        return target

    def file_paths(self, cart_id: int, cart_uid: str, relatives: Iterable[str]) -> List[str]:
        """Where staged files live, as strings, for many files at once (a 100,000-file cart's download)."""
        prefix = f'{self.files_dir(cart_id, cart_uid)}/'
        return [prefix + relative if not (relative.startswith('/') or '..' in relative.split('/'))
                else str(self.file_path(cart_id, cart_uid, relative)) for relative in relatives]

    def partial_path(self, cart_id: int, file_id: int) -> Path:
        """A temporary name for one download attempt, unique so a duplicated task never shares it.

        It sits in the cart directory beside `<uid>/` (a uid never starts with '.'), on the
        same filesystem, so the rename into place is atomic.
        """
        return self.cart_dir(cart_id) / f'.{file_id}.{uuid.uuid4().hex[:12]}{PARTIAL_SUFFIX}'

    def bundle_staging_path(self, cart_id: int) -> Path:
        """`<volume>/<cart id>/.bundle.tar`: the bundle tar while files are written into it.

        Renamed to tar_path once whole; a uid never starts with '.', so it never clashes.
        """
        return self.cart_dir(cart_id) / '.bundle.tar'

    def tar_path(self, cart_id: int, cart_uid: str) -> Path:
        """`<volume>/<cart id>/<uid>.tar`: the bundle written when bundle_task is on."""
        return self.cart_dir(cart_id) / f'{cart_uid}.tar'

    def missing_list_path(self, cart_id: int) -> Path:
        """`<volume>/<cart id>/.missing-files.txt`: MISSING_FILES.txt of a cart that skipped files.

        Beside `<uid>/`, not in it, so it stays when a bundle cart's staged files go (a uid never
        starts with '.').
        """
        return self.cart_dir(cart_id) / '.missing-files.txt'

    def link_path(self, cart_uid: str) -> Path:
        """`<volume>/cartuids/<uid>`: the link other services follow to a ready cart."""
        return self.root / LINKS_DIR / cart_uid

    def link_ready_cart(self, cart_uid: str, target: Path) -> None:
        """Point cartuids/<uid> at the ready cart's files or tar, replacing an older link."""
        link = self.link_path(cart_uid)
        link.parent.mkdir(parents=True, exist_ok=True)
        temporary = link.parent / f'.{cart_uid}.{os.getpid()}.link'
        if temporary.is_symlink():
            temporary.unlink()
        os.symlink(os.path.relpath(target, link.parent), temporary)
        os.replace(temporary, link)

    def unlink_cart(self, cart_uid: str, cart_id: int) -> None:
        """Remove cartuids/<uid> if it still points into this cart."""
        link = self.link_path(cart_uid)
        try:
            target = os.readlink(link)
        except OSError:
            return
        resolved = os.path.normpath(os.path.join(link.parent, target))
        if Path(resolved).is_relative_to(self.cart_dir(cart_id)):
            link.unlink(missing_ok=True)

    def remove_cart(self, cart_id: int) -> None:
        """Delete everything the cart has on disk (files, partials, tar)."""
        shutil.rmtree(self.cart_dir(cart_id), ignore_errors=True)

    def remove_cart_and_link(self, cart_uid: str, cart_id: int) -> None:
        """Delete everything the cart has on disk and its cartuids link, if the link points into it."""
        self.unlink_cart(cart_uid, cart_id)
        self.remove_cart(cart_id)

    def remove_partials(self, cart_id: int) -> int:
        """Delete temp files of download attempts that never finished; return how many."""
        removed = 0
        for partial in self.cart_dir(cart_id).glob(f'.*{PARTIAL_SUFFIX}'):
            partial.unlink(missing_ok=True)
            removed += 1
        return removed

    def remove_files(self, cart_id: int, cart_uid: str) -> None:
        """Delete a cart's staged files (once its tar holds them)."""
        shutil.rmtree(self.files_dir(cart_id, cart_uid), ignore_errors=True)

    def staged_file_path(self, entry_id: int) -> Path:
        """`<volume>/staged-files/<2 hex>/<entry id>`: the bytes of one staged-file cache entry.

        Written once, whole and verified (a link to a cart's verified file, renamed into place),
        and never changed after: carts hold hard links to it.
        """
        return self.root / STAGED_FILES_DIR / f'{entry_id % 256:02x}' / str(entry_id)

    def publish_staged_file(self, source: Path, entry_id: int) -> None:
        """Put the verified file `source` (a cart's) at the entry's path: linked (or copied) to a temp name
        in the entry's directory, then renamed into place, so the path only ever holds a whole file."""
        target = self.staged_file_path(entry_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.parent / f'.{entry_id}.{uuid.uuid4().hex[:12]}{PARTIAL_SUFFIX}'
        try:
            link_or_copy(source, temporary)
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)

    def staged_file_links(self, entry_id: int) -> int:
        """How many names an entry's bytes have (1: the entry's own only; 0: gone): more means carts hold them."""
        try:
            return self.staged_file_path(entry_id).stat().st_nlink
        except FileNotFoundError:
            return 0

    def remove_staged_file(self, entry_id: int) -> None:
        """Unlink an entry's file (its row already removed): its bytes are freed once no cart holds a link."""
        self.staged_file_path(entry_id).unlink(missing_ok=True)

    def staged_file_temporaries(self) -> List[Path]:
        """The temp names of entries being published (or left by a crash), in every entry directory."""
        return sorted((self.root / STAGED_FILES_DIR).glob(f'*/.*{PARTIAL_SUFFIX}'))

    def free_bytes(self) -> int:
        """Bytes free on the volume's filesystem for an unprivileged writer."""
        stats = os.statvfs(self.root)
        return stats.f_bavail * stats.f_frsize



def hard_link(source: Path, temporary: Path) -> bool:
    """Make `temporary` a hard link to `source`; False where the volume cannot link (another filesystem, no
    hard links, too many links): the caller copies instead (copy_synced)."""
    try:
        os.link(source, temporary)
        return True
    except OSError as exc:
        if exc.errno not in NO_LINK_ERRNOS:
            raise
    return False


def link_whole(source: Path, target: Path, size: int) -> bool:
    """Make `target` a hard link to `source`, a staged-file cache entry of `size` bytes, whole and verified;
    False, leaving nothing, when `source` is gone, `target` exists, the volume cannot link there, or the
    file is not of that size."""
    try:
        os.link(source, target)
    except OSError as exc:
        if exc.errno in NO_LINK_ERRNOS or isinstance(exc, (FileNotFoundError, FileExistsError)):
            return False
        raise
    if os.stat(target).st_size != size:
        target.unlink(missing_ok=True)
        return False
    return True


def copy_synced(source: Path, temporary: Path) -> None:
    """Copy `source` to `temporary` with its times, fsynced (removed again if the copy fails)."""
    try:
        shutil.copyfile(source, temporary)
        shutil.copystat(source, temporary)
        descriptor = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def link_or_copy(source: Path, temporary: Path) -> None:
    """Make `temporary` (a new name on the target's filesystem) the same file as `source`: a hard link or,
    where the volume cannot link, a copy, fsynced."""
    if not hard_link(source, temporary):
        copy_synced(source, temporary)
