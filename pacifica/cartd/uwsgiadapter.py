"""What uWSGI does differently from pacifica-cartd's own server, put right before the API sees the request.

uWSGI parses HTTP itself, and the API must answer every request as it does under
pacifica-cartd (cheroot). This WSGI middleware, used only by wsgi.py under uWSGI:
- makes PATH_INFO from the request target as sent (REQUEST_URI), percent-decoded as
  cheroot does it: `%2F` stays encoded, "." and ".." segments stay as they are
  (uWSGI decodes `%2F` into a path separator and resolves dot segments, so
  `POST /a/../b` would create cart `b`);
- reads a chunked request body with uWSGI's chunked-input API, up to one byte more than
  max_request_size, and hands it on with its length (uWSGI gives the app no body);
- refuses what cheroot refuses before the application sees it, with the API's JSON
  error page: a Content-Length that is not a number (400) and a transfer coding other
  than chunked (501);
- closes the connection after an answer that left part of the request body unread, and
  after every answer on uWSGI's --http-socket / --https-socket, which close it anyway but
  say nothing (a client with a session would send into a closed connection).
What it cannot put right (uWSGI answers or drops these before Python runs): request
headers larger than uWSGI's buffer-size (the shipped uwsgi.ini sets the largest, 64 KiB)
are dropped without an answer, and a malformed request line gets uWSGI's own answer.
"""
from __future__ import annotations

import io
import re
from typing import Any, Callable, Iterable, List, Optional, Tuple
from urllib.parse import unquote_to_bytes, urlsplit

from .errors import error_document

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict, StartResponse], Iterable[bytes]]
ChunkReader = Callable[[], bytes]
QUOTED_SLASH = re.compile('%2F', re.IGNORECASE)
ONE_ANSWER_SOCKETS = ('http-socket', 'https-socket')  # uWSGI's sockets that close after each answer
READ_CHUNK = 1 << 20


class _CountingInput:
    """The request body, counting what the application reads of it."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.read_bytes = 0

    def read(self, size: int = -1) -> bytes:
        data: bytes = self.stream.read(size) if size is not None and size >= 0 else self.stream.read()
        self.read_bytes += len(data)
        return data

    def readline(self, size: int = -1) -> bytes:
        data: bytes = self.stream.readline(size)
        self.read_bytes += len(data)
        return data

    def __iter__(self) -> Any:
        return iter(self.readline, b'')


def path_as_cheroot_gives_it(request_uri: str, script_name: str = '') -> str:
    """PATH_INFO from the request target, as cheroot makes it (WSGI 1.0: bytes as Latin-1 characters)."""
    target = request_uri.encode('latin-1', 'surrogateescape')
    path = urlsplit(target).path if target[:1] != b'/' else target.split(b'?', 1)[0]
    raw = path.decode('latin-1')
    atoms = [unquote_to_bytes(atom) for atom in QUOTED_SLASH.split(raw)]
    decoded = b'%2F'.join(atoms).decode('latin-1')
    if not decoded.startswith('/'):
        decoded = '/' + decoded
    if script_name and decoded.startswith(script_name):
        decoded = decoded[len(script_name):]
    return decoded


class UwsgiAdapter:
    """The API's WSGI application, answering under uWSGI as under pacifica-cartd's own server."""

    def __init__(self, app: WsgiApp, max_body: int, version: str, options: dict,
                 chunk_reader: Optional[ChunkReader] = None) -> None:
        """Wrap `app`; chunked bodies are read with `chunk_reader` (uwsgi.chunked_read) up to max_body + 1 bytes."""
        self.app = app
        self.max_body = max_body
        self.version = version
        self.close_always = any(socket in options for socket in ONE_ANSWER_SOCKETS)
        self.chunk_reader = chunk_reader

    def _refuse(self, start_response: StartResponse, status: str, message: str) -> List[bytes]:
        body = error_document(status, message, self.version).encode('utf-8')
        start_response(status, [('Content-Type', 'application/json'), ('Content-Length', str(len(body))),
                                ('Connection', 'close')])
        return [body]

    def _read_chunked(self, environ: dict) -> bool:
        """Read a chunked body into the environ as a plain one; tell whether some of it was left unread."""
        assert self.chunk_reader is not None
        pieces: List[bytes] = []
        total = 0
        while total <= self.max_body:
            piece = self.chunk_reader()
            if not piece:
                break
            pieces.append(piece)
            total += len(piece)
        data = b''.join(pieces)
        environ['wsgi.input'] = io.BytesIO(data)
        environ['CONTENT_LENGTH'] = str(len(data))
        del environ['HTTP_TRANSFER_ENCODING']
        return total > self.max_body

    def __call__(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        """Put the request right, refuse what cheroot refuses, then run the API."""
        if 'REQUEST_URI' in environ:
            environ['PATH_INFO'] = path_as_cheroot_gives_it(environ['REQUEST_URI'], environ.get('SCRIPT_NAME', ''))
        coding = environ.get('HTTP_TRANSFER_ENCODING', '').strip().lower()
        left_unread = False
        if coding:
            if coding != 'chunked' or self.chunk_reader is None:
                return self._refuse(start_response, '501 Unimplemented', 'Unimplemented')
            left_unread = self._read_chunked(environ)
        declared = environ.get('CONTENT_LENGTH', '')
        if declared:
            try:
                expected = int(declared)
            except ValueError:
                return self._refuse(start_response, '400 Bad Request', 'Malformed Content-Length Header.')
        else:
            expected = 0
        body = _CountingInput(environ['wsgi.input'])
        environ['wsgi.input'] = body

        def start(status: str, headers: List[Tuple[str, str]], exc_info: Optional[Any] = None) -> Any:
            closing = self.close_always or left_unread or expected < 0 or body.read_bytes < expected
            if closing:
                headers = [(name, value) for name, value in headers if name.lower() != 'connection']
                headers.append(('Connection', 'close'))
            return start_response(status, headers, *([exc_info] if exc_info else []))

        return self.app(environ, start)
