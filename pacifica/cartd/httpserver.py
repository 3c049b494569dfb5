"""The CherryPy HTTP server, with a zero-copy channel for download bodies.

A download is mostly staged files' bytes. Through WSGI alone every byte would be read into
Python and written back to the socket; here the gateway offers the request a `sendfile`
function (under `SENDFILE_ENVIRON_KEY` in the WSGI environ) that sends a file range from
the page cache straight to the client's socket. It is offered only on plain TCP
connections (TLS has to go through the SSL layer), and only by this server: under uWSGI
or any other WSGI server the key is absent and the bytes are written the ordinary way.
"""
from __future__ import annotations

import socket
from typing import Any, BinaryIO, Callable, Dict, cast

import cherrypy
from cheroot import wsgi
from cherrypy import _cpwsgi_server

SENDFILE_ENVIRON_KEY = 'pacifica.cartd.sendfile'
SendFile = Callable[[BinaryIO, int, int], int]


class SendfileGateway(wsgi.Gateway_10):
    """WSGI 1.0 gateway that also offers `sendfile(handle, offset, count) -> bytes sent`."""

    def get_environ(self) -> Dict[str, Any]:  # type: ignore[override]  # cheroot's stub says None
        """The usual environ, plus the sendfile function on a plain TCP connection."""
        environ = cast(Dict[str, Any], super().get_environ())
        if type(self.req.conn.socket) is socket.socket:
            environ[SENDFILE_ENVIRON_KEY] = self.sendfile
        return environ

    def sendfile(self, handle: BinaryIO, offset: int, count: int) -> int:
        """Send the response headers if due, flush what was written, then `count` bytes of the file."""
        self.req.ensure_headers_sent()
        self.req.conn.wfile.flush()
        # socket.sendfile waits for the socket with its timeout, as the server's writes do.
        sent: int = self.req.conn.socket.sendfile(handle, offset, count)
        return sent


def use_sendfile_gateway(server: cherrypy._cpserver.Server) -> None:
    """Make `server` (normally cherrypy.server) serve through SendfileGateway.

    Call it after the server's configuration is final and before the engine starts: the
    HTTP server is built here from that configuration.
    """
    httpserver = _cpwsgi_server.CPWSGIServer(server)
    httpserver.gateway = SendfileGateway
    server.instance = httpserver
