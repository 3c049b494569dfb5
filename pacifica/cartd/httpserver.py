"""pacifica-cartd's HTTP server: CherryPy's cheroot server with zero-copy download bodies, no draining of
unread request bodies, and the API's JSON errors for what cheroot answers itself.

What it builds on, and why it checks first. Three things here need more of cheroot and
CherryPy than their documented configuration gives: a WSGI gateway class (cheroot's
documented `Gateway_10`, extended), the request class of each connection (cheroot's
documented `HTTPConnection.RequestHandlerClass`, set to a subclass of CherryPy's
`CPWSGIHTTPRequest` from the private `cherrypy._cpwsgi_server`), and attributes of
cheroot's request objects (`ensure_headers_sent`, `simple_response`, `rfile`,
`chunked_read`, `conn.socket`, `conn.wfile`). setup.py pins cheroot to the tested 11.x,
and at start `missing_internals()` checks that every class-level name exists (the classes
that build on them are made only then, never at import); if any is
missing (a cheroot or CherryPy this was not tested with), `use_sendfile_gateway` logs
one warning and leaves CherryPy's own server in place: downloads are then written
through plain WSGI writes, cheroot's own errors are plain text, and an unread request
body is read (up to CherryPy's default limit) before the answer. Attributes that only
exist on instances are read with getattr, so a missing one degrades the same way.

A download is mostly staged files' bytes. Through WSGI alone every byte would be read into
Python and written back to the socket; here the gateway offers the request a `sendfile`
function (under transport.SENDFILE_ENVIRON_KEY in the WSGI environ) that sends a file range
from the page cache straight to the client's socket. It is offered only on plain TCP
connections (TLS has to go through the SSL layer), and only by this server.

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

import logging
import socket
from typing import Any, BinaryIO, Callable, Dict, List, Tuple, cast

import cherrypy
from cheroot import errors as cheroot_errors, server as cheroot_server, wsgi
from cherrypy import _cpwsgi_server

from .errors import error_document
from .transport import SENDFILE_ENVIRON_KEY

LOGGER = logging.getLogger(__name__)

# The class-level names this module relies on, beyond cheroot's and CherryPy's configuration,
# as (module, attribute path): looked up at start, never at import.
REQUIRED_INTERNALS = (
    (wsgi, 'Gateway_10.get_environ'),
    (wsgi, 'Gateway_10.start_response'),
    (cheroot_server, 'HTTPConnection.RequestHandlerClass'),
    (cheroot_server, 'HTTPRequest.ensure_headers_sent'),
    (cheroot_server, 'HTTPRequest.simple_response'),
    (cheroot_errors, 'socket_errors_to_ignore'),
    (_cpwsgi_server, 'CPWSGIServer.gateway'),
    (_cpwsgi_server, 'CPWSGIServer.ConnectionClass'),
    (_cpwsgi_server, 'CPWSGIHTTPRequest.simple_response'),
)
# What CherryPy limits a request body to when this server's own handling is not in place.
FALLBACK_MAX_BODY = 100 * 1000 * 1000


def missing_internals() -> List[str]:
    """The names in REQUIRED_INTERNALS that this cheroot and CherryPy do not have."""
    missing = []
    absent = object()
    for module, path in REQUIRED_INTERNALS:
        owner: Any = module
        for name in path.split('.'):
            owner = getattr(owner, name, absent)
            if owner is absent:
                missing.append(f'{module.__name__}.{path}')
                break
    return missing


def _server_classes() -> Tuple[type, type]:
    """The gateway and connection classes, made only once missing_internals() found nothing missing."""

    class SendfileGateway(wsgi.Gateway_10):
        """WSGI 1.0 gateway that offers `sendfile(handle, offset, count) -> bytes sent` and drains no body."""

        def get_environ(self) -> Dict[str, Any]:  # type: ignore[override]  # cheroot's stub says None
            """The usual environ, plus the sendfile function on a plain TCP connection."""
            environ = cast(Dict[str, Any], super().get_environ())
            connection = getattr(self.req, 'conn', None)
            if type(getattr(connection, 'socket', None)) is socket.socket and hasattr(connection, 'wfile'):
                environ[SENDFILE_ENVIRON_KEY] = self.sendfile
            return environ

        def start_response(self, status: str, headers: Any, exc_info: Any = None) -> Callable[[bytes], None]:
            """Start the answer; close the connection after it when the request body was not all read."""
            write: Callable[[bytes], None] = super().start_response(status, headers, exc_info)
            body = getattr(self.req, 'rfile', None)
            unread = getattr(body, 'remaining', 0) != 0
            unread_chunks = getattr(self.req, 'chunked_read', False) and not getattr(body, 'closed', True)
            if unread or unread_chunks:
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
            head = [f'{self.server.protocol} {status}', 'Content-Type: application/json',
                    f'Content-Length: {len(body)}', 'Connection: close']
            try:
                self.conn.wfile.write('\r\n'.join([*head, '', '']).encode('latin-1') + body)
            except OSError as exc:
                if exc.args[0] not in cheroot_errors.socket_errors_to_ignore:
                    raise

    class JsonErrorConnection(cheroot_server.HTTPConnection):
        """A connection whose requests are JsonErrorRequests."""

        RequestHandlerClass = JsonErrorRequest

    return SendfileGateway, JsonErrorConnection


def use_sendfile_gateway(server: cherrypy._cpserver.Server) -> bool:
    """Make `server` (normally cherrypy.server) serve through SendfileGateway and answer errors in JSON.

    Call it after the server's configuration is final and before the engine starts: the
    HTTP server is built here from that configuration. Returns False, after one warning,
    when this cheroot or CherryPy lacks what the gateway needs: CherryPy's own server
    then serves, with its default request body limit.
    """
    missing = missing_internals()
    if missing:
        LOGGER.warning('cheroot %s / CherryPy %s lack %s: serving with CherryPy\'s own HTTP server '
                       '(downloads without sendfile, plain-text errors from cheroot, unread request bodies '
                       'read up to %d bytes)', getattr(cheroot_server, '__version__', '?'), cherrypy.__version__,
                       ', '.join(missing), FALLBACK_MAX_BODY)
        if not server.max_request_body_size:
            server.max_request_body_size = FALLBACK_MAX_BODY
        return False
    gateway, connection = _server_classes()
    httpserver = _cpwsgi_server.CPWSGIServer(server)
    httpserver.gateway = gateway
    httpserver.ConnectionClass = connection
    server.instance = httpserver
    return True
