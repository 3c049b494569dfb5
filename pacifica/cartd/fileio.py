"""Low-level file I/O on the volume: whole positional writes, in-kernel copies, region locks, sparse extents."""
from __future__ import annotations

import contextlib
import fcntl
import os
import struct
from pathlib import Path
from typing import Iterator

MAX_EXTENTS = 100000  # data extents looked at in one file region at most


def write_all_at(descriptor: int, data: bytes, position: int) -> None:
    """Write all of `data` into the open file at `position` (pwrite may write less at once)."""
    view = memoryview(data)
    while view:
        done = os.pwrite(descriptor, view, position)
        view = view[done:]
        position += done


def copy_range(source_fd: int, dest_fd: int, offset: int, length: int) -> None:
    """Copy length bytes from source_fd at offset to dest_fd at its current position, in the kernel."""
    remaining = length
    position = offset
    while remaining > 0:
        copied = os.sendfile(dest_fd, source_fd, position, min(remaining, 1 << 30))
        if copied == 0:
            raise OSError('source file is shorter than the cart recorded')
        position += copied
        remaining -= copied


def copy_into_region(source: Path, target: Path, offset: int, length: int) -> None:
    """Copy the first `length` bytes of `source` into the existing file `target` at `offset`, in the kernel,
    and fsync it; OSError when `source` is shorter."""
    source_fd = os.open(source, os.O_RDONLY)
    try:
        target_fd = os.open(target, os.O_WRONLY)
        try:
            os.lseek(target_fd, offset, os.SEEK_SET)
            copy_range(source_fd, target_fd, 0, length)
            os.fsync(target_fd)
        finally:
            os.close(target_fd)
    finally:
        os.close(source_fd)


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


def allocated_in(path: str, start: int, length: int) -> int:
    """Bytes of [start, start + length) of a sparse file that hold data (SEEK_DATA / SEEK_HOLE)."""
    end = start + length
    total = 0
    descriptor = os.open(path, os.O_RDONLY)
    try:
        position = start
        for _ in range(MAX_EXTENTS):
            if position >= end:
                break
            try:
                data = os.lseek(descriptor, position, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole (or the end of the file) after position
                break
            if data >= end:
                break
            hole = os.lseek(descriptor, data, os.SEEK_HOLE)
            total += min(hole, end) - data
            position = hole
    finally:
        os.close(descriptor)
    return total
