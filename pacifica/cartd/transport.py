"""Turning a download's pieces (bytes, file ranges) into what the HTTP server writes, zero-copy where it offers it.

The use cases hand out a cart's tar as pieces and never learn how they reach the client.
pacifica-cartd's own server (httpserver.py) offers a `sendfile(handle, offset, count)`
function under SENDFILE_ENVIRON_KEY in the WSGI environ; where it is there, file ranges
go from the page cache to the socket without passing through Python. Anywhere else
(uWSGI, another WSGI server, TLS) they are read and yielded as bytes.
"""
from __future__ import annotations

from typing import BinaryIO, Callable, Iterable, Iterator, Optional

from .tarlayout import Piece

SENDFILE_ENVIRON_KEY = 'pacifica.cartd.sendfile'
# A server's zero-copy send: (open file, offset, count) -> bytes sent.
SendFile = Callable[[BinaryIO, int, int], int]


def response_body(pieces: Iterable[Piece], chunk_size: int, send_file: Optional[SendFile] = None) -> Iterator[bytes]:
    """The WSGI body of a download: header bytes yielded, file ranges read or sent with `send_file`.

    With `send_file` only the tar's headers pass through this iterator; each file range is
    sent by the server (headers first, then the range) before the next piece is taken.
    """
    for piece in pieces:
        if isinstance(piece, bytes):
            yield piece
        elif send_file is None:
            yield from piece.read(chunk_size)
        else:
            with open(piece.path, 'rb') as handle:
                position, remaining = piece.offset, piece.length
                while remaining > 0:
                    sent = send_file(handle, position, remaining)
                    if sent <= 0:
                        raise OSError(f'{piece.path} is shorter than the cart recorded')
                    position += sent
                    remaining -= sent
