"""The tar format: a cart's tar laid out from file names and sizes alone, its pieces, and writing it to a file."""
from __future__ import annotations

import bisect
import hashlib
import os
import tarfile
from pathlib import Path
from typing import Any, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

from .fileio import copy_range, write_all_at

TAR_BLOCK = tarfile.BLOCKSIZE
TAR_RECORD = tarfile.RECORDSIZE
GATHER_BYTES = 1 << 20  # files up to this size are copied into a bundle tar in large writes, with their headers


# A file's place on disk, as a Path or (cheaper to make by the hundred thousand) a str.
Source = Union[str, Path]


class TarMember(NamedTuple):
    """One file to put in a tar: its path in the cart, size, mtime and where its bytes are."""

    path: str
    size: int
    mtime: float
    source: Source
    source_offset: int = 0


class FileRange(NamedTuple):
    """`length` bytes of a staged file from `offset`: a piece of a tar that is not in memory."""

    path: Source
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


_NUMBER_LIMIT = 8 ** 11  # what a ustar size or mtime field holds: larger ones need a pax header
_BLOCK_ZEROS = bytes(TAR_BLOCK)
_FILE_MODE, _DIR_MODE = b'0000644\0', b'0000755\0'
_ID = b'0000000\0'  # uid and gid 0
_TAIL = b'\0' * 100 + tarfile.POSIX_MAGIC + b'\0' * (32 + 32 + 8 + 8 + 155 + 12)  # linkname ... padding


_FILE_FIELDS = _FILE_MODE + _ID + _ID
_FILE_REST = tarfile.REGTYPE + _TAIL
_FILE_CHECKSUM_REST = 8 * 32 + sum(_FILE_REST)  # the checksum field counts as spaces


def _ustar(name: bytes, size: int, mtime: int, is_dir: bool) -> bytes:
    """A plain ustar header, byte for byte what tarfile writes in PAX format when no pax record is needed."""
    head = (name + b'\0' * (100 - len(name)) + (_DIR_MODE if is_dir else _FILE_MODE) + _ID + _ID
            + b'%011o\0' % size + b'%011o\0' % mtime)
    kind = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    checksum = sum(head) + 8 * 32 + kind[0] + sum(_TAIL)
    return head + b'%06o\0 ' % checksum + kind + _TAIL


def _plain(name: str, size: int, mtime: int) -> bool:
    """Whether a member's header is one ustar block: an ASCII name of 100 bytes at most, numbers that fit."""
    return len(name) <= 100 and name.isascii() and 0 <= size < _NUMBER_LIMIT and 0 <= mtime < _NUMBER_LIMIT


def _header(name: str, size: int, mtime: float, is_dir: bool) -> bytes:
    if is_dir and not name.endswith('/'):
        name += '/'  # as tarfile names a directory
    if _plain(name, size, int(mtime)):
        return _ustar(name.encode('ascii'), size, int(mtime), is_dir)
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
    found = set()
    for path in paths:
        directory = path.rpartition('/')[0]
        while directory and directory not in found:  # siblings stop at their shared parent
            found.add(directory)
            directory = directory.rpartition('/')[0]
    directories = sorted(found)
    return [_header(f'{top}/{directory}' if directory else f'{top}/', 0, created, True)
            for directory in [''] + directories]


def directories_size(top: str, paths: Sequence[str]) -> int:
    """Bytes a tar of these paths starts with (its directory headers), before the first file."""
    return sum(len(header) for header in _directory_headers(top, paths, 0))


def _header_length(name: str, size: int, mtime: int) -> int:
    return TAR_BLOCK if _plain(name, size, mtime) else len(_header(name, size, mtime, False))


def member_region(top: str, path: str, size: int) -> Tuple[int, int]:
    """(header bytes, whole region) of one file in a tar: header, data and padding.

    The header's length depends on the name and size only, for any mtime a ustar field holds.
    """
    header = _header_length(f'{top}/{path}', size, 0)
    return header, header + size + _padding(size)


def _lay_out(top: str, members: Sequence[Tuple[Any, ...]], offset: int) -> Tuple[List[int], List[int], int]:
    """Each member's header start and length from `offset` on, and where the last member's region ends.

    `members` are anything whose first three items are path, size and mtime (TarMembers,
    a cart's rows). The loop a 100,000-file cart's download waits for: a plain header is
    one block, decided from the name's length and the numbers without making the header.
    """
    starts: List[int] = []
    lengths: List[int] = []
    room = 100 - len(top) - 1  # a plain header holds `top/path` in 100 ASCII bytes
    plain_top = top.isascii()
    for member in members:
        path, size, mtime = member[0], member[1], member[2]
        if len(path) <= room and plain_top and path.isascii() and 0 <= size < _NUMBER_LIMIT \
                and 0 <= mtime < _NUMBER_LIMIT:
            length = TAR_BLOCK
        else:
            length = _header_length(f'{top}/{path}', size, int(mtime))
        starts.append(offset)
        lengths.append(length)
        offset += length + size + (-size) % TAR_BLOCK
    return starts, lengths, offset


class TarLayout:
    """A tar computed from file names and sizes alone: exact length, ETag, and any byte range.

    The bytes are headers made here plus the files' bytes read from where they were
    staged, so a tar never needs a second copy on disk to be served. Laying out costs a
    few microseconds a member: headers are made only when their bytes are asked for, and
    a member's header is one ustar block unless its name or numbers need a pax record.
    """

    def __init__(self, top: str, members: Sequence[TarMember], created: float, image: Optional[Source] = None) -> None:
        """Lay out `top/`, its directories (parents first), then the files in the given order.

        `image`, when given, is a file that holds exactly these bytes (a bundle tar written
        under the same top directory): pieces are then ranges of it, and the members'
        sources are not read.
        """
        self.top = top
        self.members = list(members)
        self.image = image
        self._prefix = f'{top}/'.encode('utf-8', 'surrogateescape')
        self._head = b''.join(_directory_headers(top, [member.path for member in self.members], created))
        self._header_starts, self._header_lengths, offset = _lay_out(top, self.members, len(self._head))
        self._files_end = offset
        trailer = 2 * TAR_BLOCK
        trailer += (-(offset + trailer)) % TAR_RECORD
        self.size = offset + trailer
        digest = hashlib.sha1(self._head)
        digest.update('\0'.join(f'{path}\0{size}\0{int(mtime)}' for path, size, mtime, _, _ in self.members)
                      .encode('utf-8', 'surrogateescape'))
        digest.update(str(self.size).encode('ascii'))
        self.etag = f'"{digest.hexdigest()}"'

    @staticmethod
    def data_offsets(top: str, members: Sequence[Tuple[Any, ...]]) -> List[int]:
        """Where each member's bytes start in a tar of these members under `top` (without laying it all out).

        `members`: anything whose first three items are path, size and mtime.
        """
        starts, lengths, _end = _lay_out(top, members, directories_size(top, [member[0] for member in members]))
        return [start + length for start, length in zip(starts, lengths, strict=True)]

    @property
    def file_offsets(self) -> List[int]:
        """Where each member's bytes start in the tar."""
        return [start + length for start, length in zip(self._header_starts, self._header_lengths, strict=True)]

    def _member_header(self, index: int) -> bytes:
        path, size, mtime, _source, _source_offset = self.members[index]
        if self._header_lengths[index] == TAR_BLOCK:  # plain: made here, as _ustar would, with less work
            head = (self._prefix + path.encode('ascii')).ljust(100, b'\0') + _FILE_FIELDS \
                + b'%011o\0%011o\0' % (size, int(mtime))
            return head + b'%06o\0 ' % (sum(head) + _FILE_CHECKSUM_REST) + _FILE_REST
        return _header(f'{self.top}/{path}', size, mtime, False)

    def pieces(self, start: int = 0, end: Optional[int] = None) -> Iterator[Piece]:
        """The tar's bytes from start up to (not including) end: header bytes, and file ranges to read."""
        stop = self.size if end is None else min(end, self.size)
        position = max(start, 0)
        if position >= stop:
            return
        if self.image is not None:
            yield FileRange(self.image, position, stop - position)
            return
        # Bytes made here (one file's padding, the next one's header) go out together, before the next range.
        head = len(self._head)
        pending = b''
        if position < head:
            pending = self._head[position:min(stop, head)]
            position = min(stop, head)
        index = max(bisect.bisect_right(self._header_starts, position) - 1, 0)
        starts, lengths, members = self._header_starts, self._header_lengths, self.members
        while position < stop and position < self._files_end:
            header_start = starts[index]
            data_start = header_start + lengths[index]
            _path, size, _mtime, source, source_offset = members[index]
            data_end = data_start + size
            if position < data_start:
                cut = min(stop, data_start)
                pending += self._member_header(index)[position - header_start:cut - header_start]
                position = cut
            if position < stop and position < data_end:
                if pending:
                    yield pending
                    pending = b''
                cut = min(stop, data_end)
                yield FileRange(source, source_offset + position - data_start, cut - position)
                position = cut
            region_end = data_end + (-size) % TAR_BLOCK
            if position < stop and position < region_end:
                cut = min(stop, region_end)
                pending += _BLOCK_ZEROS[:cut - position]
                position = cut
            index += 1
        if position < stop:
            pending += bytes(stop - position)  # the trailer: zero blocks
        if pending:
            yield pending

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
        target = os.fspath(path)
        return all(member.source_offset == offset
                   for member, offset in zip(self.members, self.file_offsets, strict=True)
                   if member.size and os.fspath(member.source) == target)

    def complete_in(self, path: Path) -> None:
        """Finish a tar whose files were partly written into `path` in place (see places_in).

        Headers, padding and the trailer are written at their offsets, files staged
        elsewhere are copied in (small ones gathered into large writes, large ones by the
        kernel), and the file is cut to the tar's size.
        """
        if not self.places_in(path):
            raise ValueError(f'{path} holds files away from where this layout puts them')
        target = os.fspath(path)
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            pending = bytearray(self._head)
            pending_at = 0
            for index, (member, data_start) in enumerate(zip(self.members, self.file_offsets, strict=True)):
                if pending_at + len(pending) != self._header_starts[index] or len(pending) >= GATHER_BYTES:
                    write_all_at(descriptor, bytes(pending), pending_at)
                    pending, pending_at = bytearray(), self._header_starts[index]
                pending += self._member_header(index)
                if member.size and os.fspath(member.source) == target:  # already in place: skip its bytes
                    write_all_at(descriptor, bytes(pending), pending_at)
                    pending, pending_at = bytearray(), data_start + member.size
                elif member.size <= GATHER_BYTES:
                    pending += _read_range(member.source, member.source_offset, member.size)
                else:
                    write_all_at(descriptor, bytes(pending), pending_at)
                    with open(member.source, 'rb') as source:
                        os.lseek(descriptor, data_start, os.SEEK_SET)
                        copy_range(source.fileno(), descriptor, member.source_offset, member.size)
                    pending, pending_at = bytearray(), data_start + member.size
                pending += _BLOCK_ZEROS[:_padding(member.size)]
            pending += bytes(self.size - pending_at - len(pending))  # the trailer
            write_all_at(descriptor, bytes(pending), pending_at)
            os.ftruncate(descriptor, self.size)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _read_range(path: Source, offset: int, length: int) -> bytes:
    """`length` bytes of a file from `offset`; OSError if the file is shorter."""
    if not length:
        return b''
    descriptor = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(descriptor, length, offset)
    finally:
        os.close(descriptor)
    if len(data) != length:
        raise OSError(f'{path} is shorter than the cart recorded')
    return data
