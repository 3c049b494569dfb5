"""The tar format: a cart's tar laid out from file names and sizes alone, its pieces, and writing it to a file."""
from __future__ import annotations

import bisect
import dataclasses
import hashlib
import os
import tarfile
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

from .fileio import copy_range, write_all_at

TAR_BLOCK = tarfile.BLOCKSIZE
TAR_RECORD = tarfile.RECORDSIZE


@dataclasses.dataclass(frozen=True)
class TarMember:
    """One file to put in a tar: its path in the cart, size, mtime and where its bytes are."""

    path: str
    size: int
    mtime: float
    source: Path
    source_offset: int = 0


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

    def parts(self, max_length: int) -> Iterator['FileRange']:
        """This range cut into consecutive ranges of at most max_length bytes."""
        for start in range(0, self.length, max_length):
            yield FileRange(self.path, self.offset + start, min(max_length, self.length - start))


# What a tar is made of: bytes made here (headers, padding, trailer) and ranges of staged files.
Piece = Union[bytes, FileRange]


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

    def pieces(self, start: int = 0, end: Optional[int] = None) -> Iterator[Piece]:
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
                        copy_range(source.fileno(), descriptor, segment.source_offset, segment.length)
            os.ftruncate(descriptor, self.size)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
