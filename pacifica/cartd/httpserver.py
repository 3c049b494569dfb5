"""The CherryPy HTTP server, with a zero-copy channel for download bodies and no draining of unread request bodies.

A download is mostly staged files' bytes. Through WSGI alone every byte would be read into
Python and written back to the socket; here the gateway offers the request a `sendfile`
function (under `SENDFILE_ENVIRON_KEY` in the WSGI environ) that sends a file range from
the page cache straight to the client's socket. It is offered only on plain TCP
connections (TLS has to go through the SSL layer), and only by this server: under uWSGI
or any other WSGI server the key is absent and the bytes are written the ordinary way.

A request body the application did not read (an error answered before reading it, or what
lies past `max_request_size`) is not read by the server either. cheroot would read the rest
into one buffer before sending the answer, to keep the connection open; instead the
connection is closed after the answer, so the Content-Length a client declares decides
neither the memory used nor how long the answer waits.

The errors cheroot answers itself, before the application sees the request (a malformed
request line, header or Content-Length, headers over `server.max_request_header_size`, an
unknown transfer coding), get the API's JSON error page instead of a line of plain text.
"""
from __future__ import annotations

import socket
from typing import Any, BinaryIO, Callable, Dict, cast

import cherrypy
from cheroot import errors as cheroot_errors, server as cheroot_server, wsgi
from cherrypy import _cpwsgi_server

from .errors import error_document

SENDFILE_ENVIRON_KEY = 'pacifica.cartd.sendfile'
SendFile = Callable[[BinaryIO, int, int], int]


class SendfileGateway(wsgi.Gateway_10):
    """WSGI 1.0 gateway that offers `sendfile(handle, offset, count) -> bytes sent` and drains no body."""

    def get_environ(self) -> Dict[str, Any]:  # type: ignore[override]  # cheroot's stub says None
        """The usual environ, plus the sendfile function on a plain TCP connection."""
        environ = cast(Dict[str, Any], super().get_environ())
        if type(self.req.conn.socket) is socket.socket:
            environ[SENDFILE_ENVIRON_KEY] = self.sendfile
        return environ

    def start_response(self, status: str, headers: Any, exc_info: Any = None) -> Callable[[bytes], None]:
        """Start the answer; close the connection after it when the request body was not all read."""
        write: Callable[[bytes], None] = super().start_response(status, headers, exc_info)
        body = self.req.rfile
        if getattr(body, 'remaining', 0) != 0 or (self.req.chunked_read and not getattr(body, 'closed', True)):
            self.req.close_connection = True
        return write

    def sendfile(self, handle: BinaryIO, offset: int, count: int) -> int:
        """Send the response headers if due, flush what was written, then `count` bytes of the file."""
        self.req.ensure_headers_sent()
        self.req.conn.wfile.flush()
        # socket.sendfile waits for the socket with its timeout, as the server's writes do.
        sent: int = self.req.conn.socket.sendfile(handle, offset, count)
        return sent


class JsonErrorRequest(_cpwsgi_server.CPWSGIHTTPRequest):
    """CherryPy's request handler, whose own error answers are the API's JSON error page."""

    def simple_response(self, status: Any, msg: Any = '') -> None:
        """Write an error answer: status line, JSON headers and body; the connection closes after it."""
        status = str(status)
        message = (msg.decode('latin-1') if isinstance(msg, bytes) else str(msg)) or status[4:]
        body = error_document(status, message, cherrypy.__version__).encode('utf-8')
        # cheroot closes the connection after each of these answers: say so
        self.close_connection = True
        head = [f'{self.server.protocol} {status}', 'Content-Type: application/json', f'Content-Length: {len(body)}',
                'Connection: close']
        try:
            self.conn.wfile.write('\r\n'.join([*head, '', '']).encode('latin-1') + body)
        except OSError as exc:
            if exc.args[0] not in cheroot_errors.socket_errors_to_ignore:
                raise


class JsonErrorConnection(cheroot_server.HTTPConnection):
    """A connection whose requests are JsonErrorRequests."""

    RequestHandlerClass = JsonErrorRequest


def use_sendfile_gateway(server: cherrypy._cpserver.Server) -> None:
    """Make `server` (normally cherrypy.server) serve through SendfileGateway and answer errors in JSON.

    Call it after the server's configuration is final and before the engine starts: the
    HTTP server is built here from that configuration.
    """
    httpserver = _cpwsgi_server.CPWSGIServer(server)
    httpserver.gateway = SendfileGateway
    httpserver.ConnectionClass = JsonErrorConnection
    server.instance = httpserver
