"""The cart volume on disk: safe paths inside a cart, the tar layout and stream, the cartuids links."""
from __future__ import annotations

import bisect
import contextlib
import dataclasses
import fcntl
import hashlib
import os
import shutil
import struct
import tarfile
import unicodedata
import uuid
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from .errors import BadRequest

MAX_UID_BYTES = 255
MAX_PATH_CHARS = 255  # the published schema stores paths in VARCHAR(255)
MAX_SEGMENT_BYTES = 255  # NAME_MAX on the filesystems the volume lives on
TAR_BLOCK = tarfile.BLOCKSIZE
TAR_RECORD = tarfile.RECORDSIZE
PARTIAL_SUFFIX = '.part'
LINKS_DIR = 'cartuids'


def _has_control(text: str) -> bool:
    return any(ord(char) < 0x20 or ord(char) == 0x7f for char in text)


def _utf8_length(text: str, what: str) -> int:
    try:
        return len(text.encode('utf-8'))
    except UnicodeEncodeError as exc:
        raise BadRequest(f'{what} is not valid UTF-8 text') from exc


def check_cart_uid(cart_uid: str) -> str:
    """Return the uid unchanged if it is safe as one path segment, else raise BadRequest.

    A uid names a directory in the volume and a link in cartuids/, so it may not be
    empty, hold '/', NUL or control characters, start with '.', or be longer than 255 bytes.
    """
    if not cart_uid:
        raise BadRequest('the cart uid is empty')
    if _utf8_length(cart_uid, 'the cart uid') > MAX_UID_BYTES:
        raise BadRequest(f'the cart uid is longer than {MAX_UID_BYTES} bytes')
    if '/' in cart_uid or '\\' in cart_uid or _has_control(cart_uid):
        raise BadRequest('the cart uid may not contain "/", "\\", NUL or control characters')
    if cart_uid.startswith('.'):
        raise BadRequest('the cart uid may not start with "."')
    return cart_uid


def cart_relative_path(path: str) -> str:
    """Return a client's file path as a canonical path relative to the cart, or raise BadRequest.

    One leading '/' is dropped, as the published service does (pacifica-downloader sends
    '/name' for files without a sub-directory). Anything else that is not already canonical
    ('a//b', 'a/./b', '..', a trailing '/', NUL or control characters) is refused rather
    than rewritten, so the path a client asks for is exactly the path in the tar.
    """
    if not isinstance(path, str) or not path:
        raise BadRequest('a file path is empty')
    relative = path[1:] if path.startswith('/') else path
    if not relative:
        raise BadRequest(f'file path {path!r} names no file')
    if len(relative) > MAX_PATH_CHARS:
        raise BadRequest(f'file path {relative[:40]!r}... is longer than {MAX_PATH_CHARS} characters')
    if _has_control(relative):
        raise BadRequest(f'file path {relative!r} contains NUL or control characters')
    for segment in relative.split('/'):
        if segment in ('', '.', '..'):
            raise BadRequest(f'file path {path!r} is not a plain relative path '
                             '(empty, "." or ".." segment, or absolute)')
        if _utf8_length(segment, f'file path {relative!r}') > MAX_SEGMENT_BYTES:
            raise BadRequest(f'file path {relative!r} has a name longer than {MAX_SEGMENT_BYTES} bytes')
    return relative


def path_conflicts(paths: Iterable[str]) -> Optional[str]:
    """Return a path that repeats another or is also used as a directory, or None.

    Compared after Unicode NFC normalisation so two spellings of one name cannot both land.
    """
    files = set()
    directories = set()
    for path in paths:
        key = unicodedata.normalize('NFC', path)
        if key in files or key in directories:
            return path
        files.add(key)
        parts = key.split('/')
        for depth in range(1, len(parts)):
            directories.add('/'.join(parts[:depth]))
    clash = files & directories
    return next(iter(clash)) if clash else None


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
        target = self.files_dir(cart_id, cart_uid) / relative
        base = self.files_dir(cart_id, cart_uid)
        if os.path.commonpath([os.path.abspath(target), os.path.abspath(base)]) != os.path.abspath(base):
            raise BadRequest(f'file path {relative!r} leaves the cart')
        return target

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

    def free_bytes(self) -> int:
        """Bytes free on the volume's filesystem for an unprivileged writer."""
        stats = os.statvfs(self.root)
        return stats.f_bavail * stats.f_frsize


@dataclasses.dataclass(frozen=True)
class TarMember:
    """One file to put in a tar: its path in the cart, size, mtime and where its bytes are."""

    path: str
    size: int
    mtime: float
    source: Path
    source_offset: int = 0


@dataclasses.dataclass(frozen=True)
class _Segment:
    offset: int
    length: int
    data: Optional[bytes]  # header or padding bytes, or None for file content
    source: Optional[Path] = None
    source_offset: int = 0


def _header(name: str, size: int, mtime: float, is_dir: bool) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = 0 if is_dir else size
    info.mtime = int(mtime)
    info.mode = 0o755 if is_dir else 0o644
    info.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    info.uname = info.gname = ''
    return info.tobuf(format=tarfile.PAX_FORMAT, encoding='utf-8', errors='strict')


@dataclasses.dataclass(frozen=True)
class FileRange:
    """`length` bytes of a staged file from `offset`: a piece of a tar that is not in memory."""

    path: Path
    offset: int
    length: int

    def read(self, chunk_size: int) -> Iterator[bytes]:
        """The bytes, in chunks of at most chunk_size."""
        with open(self.path, 'rb') as handle:
            handle.seek(self.offset)
            remaining = self.length
            while remaining > 0:
                chunk = handle.read(min(chunk_size, remaining))
                if not chunk:
                    raise OSError(f'{self.path} is shorter than the cart recorded')
                remaining -= len(chunk)
                yield chunk


def _padding(size: int) -> int:
    return (-size) % TAR_BLOCK


def _directory_headers(top: str, paths: Sequence[str], created: float) -> List[bytes]:
    """Headers of `top/` and of every directory above the paths, parents first."""
    directories = sorted({'/'.join(path.split('/')[:depth])
                          for path in paths for depth in range(1, path.count('/') + 1)})
    return [_header(f'{top}/{directory}' if directory else f'{top}/', 0, created, True)
            for directory in [''] + directories]


def directories_size(top: str, paths: Sequence[str]) -> int:
    """Bytes a tar of these paths starts with (its directory headers), before the first file."""
    return sum(len(header) for header in _directory_headers(top, paths, 0))


def member_region(top: str, path: str, size: int) -> Tuple[int, int]:
    """(header bytes, whole region) of one file in a tar: header, data and padding.

    The header's length depends on the name and size only, for any mtime a ustar field holds.
    """
    header = len(_header(f'{top}/{path}', size, 0, False))
    return header, header + size + _padding(size)


class TarLayout:
    """A tar computed from file sizes alone: exact length, ETag, and any byte range.

    The bytes are the headers this object makes plus the files' bytes read from where
    they were staged, so a tar never needs a second copy on disk to be served.
    """

    def __init__(self, top: str, members: Sequence[TarMember], created: float) -> None:
        """Lay out `top/`, its directories (parents first), then the files in the given order."""
        self.top = top
        self.members = list(members)
        self._segments: List[_Segment] = []
        self._starts: List[int] = []
        self.file_offsets: List[int] = []
        offset = 0
        digest = hashlib.sha1(top.encode('utf-8'))
        for header in _directory_headers(top, [member.path for member in members], created):
            offset = self._add(offset, header, digest)
        for member in self.members:
            offset = self._add(offset, _header(f'{top}/{member.path}', member.size, member.mtime, False), digest)
            self.file_offsets.append(offset)
            if member.size:
                self._segments.append(_Segment(offset, member.size, None, member.source, member.source_offset))
                self._starts.append(offset)
                offset += member.size
            if _padding(member.size):
                offset = self._add(offset, bytes(_padding(member.size)), None)
        trailer = 2 * TAR_BLOCK
        trailer += (-(offset + trailer)) % TAR_RECORD
        offset = self._add(offset, bytes(trailer), None)
        self.size = offset
        digest.update(str(self.size).encode('ascii'))
        self.etag = f'"{digest.hexdigest()}"'

    def _add(self, offset: int, data: bytes, digest: Optional['hashlib._Hash']) -> int:
        if digest is not None:
            digest.update(data)
        self._segments.append(_Segment(offset, len(data), data))
        self._starts.append(offset)
        return offset + len(data)

    def pieces(self, start: int = 0, end: Optional[int] = None) -> Iterator[Union[bytes, FileRange]]:
        """The tar's bytes from start up to (not including) end: header bytes, and file ranges to read."""
        stop = self.size if end is None else min(end, self.size)
        position = start
        index = max(bisect.bisect_right(self._starts, position) - 1, 0)
        while position < stop and index < len(self._segments):
            segment = self._segments[index]
            begin = position - segment.offset
            length = min(segment.length - begin, stop - position)
            if segment.data is not None:
                yield segment.data[begin:begin + length]
            else:
                assert segment.source is not None
                yield FileRange(segment.source, segment.source_offset + begin, length)
            position += length
            index += 1

    def iter_bytes(self, start: int = 0, end: Optional[int] = None, chunk_size: int = 4 << 20) -> Iterator[bytes]:
        """Yield the tar's bytes from start up to (not including) end, reading files lazily."""
        for piece in self.pieces(start, end):
            if isinstance(piece, bytes):
                yield piece
            else:
                yield from piece.read(chunk_size)

    def write_to(self, destination: Path) -> None:
        """Write the whole tar to a file: headers from here, file bytes copied in the kernel.

        No file was written into `destination` in place, so completing it writes every byte.
        """
        self.complete_in(destination)

    def places_in(self, path: Path) -> bool:
        """Whether every file already written into `path` sits exactly where this layout puts it."""
        return all(segment.source_offset == segment.offset for segment in self._segments
                   if segment.data is None and segment.source == path)

    def complete_in(self, path: Path) -> None:
        """Finish a tar whose files were partly written into `path` in place (see places_in).

        Headers, padding and the trailer are written at their offsets, files staged
        elsewhere are copied in by the kernel, and the file is cut to the tar's size.
        """
        if not self.places_in(path):
            raise ValueError(f'{path} holds files away from where this layout puts them')
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            for segment in self._segments:
                if segment.data is not None:
                    write_all_at(descriptor, segment.data, segment.offset)
                elif segment.source != path:
                    assert segment.source is not None
                    with open(segment.source, 'rb') as source:
                        os.lseek(descriptor, segment.offset, os.SEEK_SET)
                        _copy_range(source.fileno(), descriptor, segment.source_offset, segment.length)
            os.ftruncate(descriptor, self.size)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


@contextlib.contextmanager
def locked_region(path: Path, offset: int, length: int) -> Iterator[None]:
    """Hold an exclusive lock on bytes [offset, offset+length) of `path` (created if missing).

    An open-file-description lock: it belongs to this open file, not the process, so
    closing another descriptor of the same file (another thread's) does not drop it, and
    the kernel drops it if the process dies. Two workers never write one region at once.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.fcntl(descriptor, fcntl.F_OFD_SETLKW,
                    struct.pack('hhqqi', fcntl.F_WRLCK, os.SEEK_SET, offset, max(length, 1), 0))
        yield
    finally:
        os.close(descriptor)


def write_all_at(descriptor: int, data: bytes, position: int) -> None:
    """Write all of `data` into the open file at `position` (pwrite may write less at once)."""
    view = memoryview(data)
    while view:
        done = os.pwrite(descriptor, view, position)
        view = view[done:]
        position += done


def _copy_range(source_fd: int, dest_fd: int, offset: int, length: int) -> None:
    """Copy length bytes from source_fd at offset to dest_fd at its current position, in the kernel."""
    remaining = length
    position = offset
    while remaining > 0:
        copied = os.sendfile(dest_fd, source_fd, position, min(remaining, 1 << 30))
        if copied == 0:
            raise OSError('source file is shorter than the cart recorded')
        position += copied
        remaining -= copied


def parse_range(header: Optional[str], size: int) -> Optional[Tuple[int, int]]:
    """Parse a single `bytes=` Range into (start, end exclusive); None means the whole body.

    Several ranges, or a header that is not a byte range, are answered with the whole body
    (allowed by RFC 9110). A range that starts past the end raises ValueError (416).
    """
    if not header or not header.startswith('bytes=') or ',' in header:
        return None
    first, _, last = header[len('bytes='):].strip().partition('-')
    try:
        if first == '':
            suffix = int(last)
            if suffix <= 0:
                raise ValueError('empty suffix range')
            return (max(size - suffix, 0), size)
        start = int(first)
        end = int(last) + 1 if last else size
    except ValueError:
        return None
    if start >= size or start < 0:
        raise ValueError(f'range starts at {start}, the tar has {size} bytes')
    if end <= start:
        return None
    return (start, min(end, size))


def tar_top_name(filename: str) -> str:
    """The tar's top directory: the requested file name without '.tar', as 0.7.0 names it.

    The name becomes the first component of every member, so it must be one safe segment.
    """
    top = filename.replace('.tar', '')
    if not top or top in ('.', '..') or '/' in top or '\\' in top or _has_control(top):
        raise BadRequest(f'filename {filename!r} is not a plain file name')
    return top
