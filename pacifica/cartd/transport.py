"""Turning a download's pieces (bytes, file ranges) into what the HTTP server writes, zero-copy where it offers it.

The use cases hand out a cart's tar as pieces and never learn how they reach the client.
pacifica-cartd's own server (httpserver.py) and, under uWSGI, wsgi.py offer a
`sendfile(handle, offset, count)` function under SENDFILE_ENVIRON_KEY in the WSGI environ;
where it is there, file ranges go from the page cache to the socket without passing through
Python, and a download holds no buffer of its own while its client is slow. Anywhere else
(another WSGI server, TLS) they are read and yielded as bytes.
"""
from __future__ import annotations

import os
import select
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, Optional, Union

from .tarlayout import FileRange, Piece

SENDFILE_ENVIRON_KEY = 'pacifica.cartd.sendfile'
# A server's zero-copy send: (open file, offset, count) -> bytes sent.
SendFile = Callable[[BinaryIO, int, int], int]
GATHER_BYTES = 256 << 10  # header bytes and short file ranges go out together in writes of about this size


class _Files:
    """The file a download reads now, kept open while consecutive pieces come from it (a bundle tar)."""

    def __init__(self) -> None:
        self.path: Optional[Union[str, Path]] = None
        self.handle: Optional[BinaryIO] = None
        self.descriptor = -1

    def open(self, path: Union[str, Path]) -> BinaryIO:
        """The file as a file object (what a server's sendfile takes)."""
        if self.handle is None or path != self.path:
            self.close()
            self.handle = open(path, 'rb', buffering=0)  # kept open across pieces; close() closes it
            self.descriptor = self.handle.fileno()
            self.path = path
        return self.handle

    def read(self, piece: FileRange) -> bytes:
        """The range's bytes; OSError if the file is shorter than that."""
        if self.descriptor < 0 or piece.path != self.path:
            self.close()
            self.descriptor = os.open(piece.path, os.O_RDONLY)  # cheaper than a file object, per small file
            self.path = piece.path
        data = os.pread(self.descriptor, piece.length, piece.offset)
        if len(data) != piece.length:
            raise OSError(f'{piece.path} is shorter than the cart recorded')
        return data

    def close(self) -> None:
        """Close what is open."""
        if self.handle is not None:
            self.handle.close()
        elif self.descriptor >= 0:
            os.close(self.descriptor)
        self.handle, self.descriptor, self.path = None, -1, None


def response_body(pieces: Iterable[Piece], chunk_size: int, send_file: Optional[SendFile] = None) -> Iterator[bytes]:
    """The WSGI body of a download: header bytes and short file ranges gathered into writes of about
    GATHER_BYTES, longer file ranges read in chunks of chunk_size or sent with `send_file`.

    With `send_file` only gathered bytes pass through this iterator; each longer file range
    is sent by the server (what was yielded before it first) before the next piece is taken.
    """
    files = _Files()
    gathered = bytearray()
    gather = GATHER_BYTES
    written = False
    try:
        for piece in pieces:
            if isinstance(piece, bytes):
                gathered += piece
                continue  # bytes made here come before a file range, or last: gathered with it
            if piece.length <= gather:
                gathered += files.read(piece)
            else:
                if gathered or (send_file is not None and not written):
                    # the first time also when empty: the server sends the headers then at the latest (uWSGI does)
                    yield bytes(gathered)
                    gathered.clear()
                    written = True
                if send_file is None:
                    for part in piece.parts(chunk_size):
                        yield files.read(part)
                else:
                    _send(files.open(piece.path), piece, send_file)
            if len(gathered) >= gather:
                yield bytes(gathered)
                gathered.clear()
                written = True
        if gathered:
            yield bytes(gathered)
    finally:
        files.close()


def _send(handle: BinaryIO, piece: FileRange, send_file: SendFile) -> None:
    position, remaining = piece.offset, piece.length
    while remaining > 0:
        sent = send_file(handle, position, remaining)
        if sent <= 0:
            raise OSError(f'{piece.path} is shorter than the cart recorded')
        position += sent
        remaining -= sent


def socket_sendfile(connection_fd: Callable[[], int], timeout: float) -> SendFile:
    """A SendFile onto the current request's non-blocking socket, as `connection_fd()` names it.

    Each call sends what the socket takes (waiting up to `timeout` seconds for it to take
    anything): TimeoutError when it takes nothing that long, as a server's own writes do.
    """
    def send(handle: BinaryIO, offset: int, count: int) -> int:
        fd = connection_fd()
        while True:
            try:
                return os.sendfile(fd, handle.fileno(), offset, count)
            except BlockingIOError:
                waiter = select.poll()
                waiter.register(fd, select.POLLOUT)
                if not waiter.poll(timeout * 1000):
                    raise TimeoutError(f'the client took no bytes for {timeout} s') from None
    return send
