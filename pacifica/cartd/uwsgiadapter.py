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
  say nothing (a client with a session would send into a closed connection);
- closes it when the client asked for that (`Connection: close`, or HTTP/1.0 without
  keep-alive), as cheroot does. uWSGI's --http11-socket does not honour `Connection: close`
  either way (its source says so): it would wait for a next request until its
  socket-timeout, holding the thread, and a client reading to end of stream would wait that
  long. So the answer says `Connection: close` and the adapter shuts the connection's read
  side (the answer still goes out): uWSGI's wait for a next request then ends at once, and
  it closes the connection. The same is done for a chunked body left unread, which uWSGI
  would otherwise read as the next request.
What it cannot put right (uWSGI answers or drops these before Python runs): request
headers larger than uWSGI's buffer-size (the shipped uwsgi.ini sets the largest, 64 KiB)
are dropped without an answer, and a malformed request line gets uWSGI's own answer.
"""
from __future__ import annotations

import io
import re
import socket
from typing import Any, Callable, Iterable, List, Optional, Tuple
from urllib.parse import unquote_to_bytes, urlsplit

from .errors import error_document

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict, StartResponse], Iterable[bytes]]
ChunkReader = Callable[[], bytes]
ConnectionFd = Callable[[], int]
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


def client_asks_to_close(environ: dict) -> bool:
    """Whether the request ends its connection: `Connection: close`, or HTTP/1.0 without keep-alive."""
    tokens = {token.strip().lower() for token in environ.get('HTTP_CONNECTION', '').split(',')}
    if environ.get('SERVER_PROTOCOL', 'HTTP/1.1').upper() == 'HTTP/1.0':
        return 'keep-alive' not in tokens
    return 'close' in tokens


def stop_reading(descriptor: int) -> None:
    """Shut the read side of a connection (what is written still goes out); quiet if it is gone."""
    try:
        connection = socket.socket(fileno=descriptor)
    except OSError:
        return
    try:
        connection.shutdown(socket.SHUT_RD)
    except OSError:
        pass  # the client went away already
    finally:
        connection.detach()  # the descriptor stays uWSGI's


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
                 chunk_reader: Optional[ChunkReader] = None, connection_fd: Optional[ConnectionFd] = None) -> None:
        """Wrap `app`; chunked bodies are read with `chunk_reader` (uwsgi.chunked_read) up to max_body + 1 bytes.

        `connection_fd` (uwsgi.connection_fd) gives the request's connection, whose read
        side is shut when the answer closes it on a socket that would keep it open.
        """
        self.app = app
        self.max_body = max_body
        self.version = version
        self.close_always = any(socket in options for socket in ONE_ANSWER_SOCKETS)
        self.chunk_reader = chunk_reader
        self.connection_fd = connection_fd

    def _refuse(self, start_response: StartResponse, status: str, message: str) -> List[bytes]:
        body = error_document(status, message, self.version).encode('utf-8')
        start_response(status, self._closing([('Content-Type', 'application/json'),
                                              ('Content-Length', str(len(body)))]))
        return [body]

    def _closing(self, headers: List[Tuple[str, str]]) -> List[Tuple[str, str]]:
        """`headers` saying `Connection: close`; on a socket that keeps connections, the read side shut too."""
        if not self.close_always and self.connection_fd is not None:
            stop_reading(self.connection_fd())  # the body was read (or is left): no next request
        return [(name, value) for name, value in headers if name.lower() != 'connection'] + [('Connection', 'close')]

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
        asked_to_close = client_asks_to_close(environ)

        def start(status: str, headers: List[Tuple[str, str]], exc_info: Optional[Any] = None) -> Any:
            closing = self.close_always or asked_to_close or left_unread or expected < 0 or body.read_bytes < expected
            if closing:
                headers = self._closing(headers)
            return start_response(status, headers, *([exc_info] if exc_info else []))

        return self.app(environ, start)
