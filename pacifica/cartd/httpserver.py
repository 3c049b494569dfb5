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

A connection reaches a worker thread only once its request head (request line and headers)
has arrived. cheroot hands a connection to a worker as soon as it is accepted (or, kept
alive, as soon as a byte of its next request comes) and the worker then reads the head with
`server.socket_timeout` applied to each read, so a client that sends a byte every few
seconds holds a thread for as long as it likes, and a few dozen such clients stop the
server. Here one thread (HeadWaiter) watches such connections with epoll, looking at what
has arrived with MSG_PEEK (nothing is consumed; cheroot reads the head as usual), and hands
each to the pool when its head is complete, the client closed, or HEAD_PEEK_BYTES are
waiting; a head not complete within `server.request_head_timeout` seconds (default
HEAD_TIMEOUT_S) is answered 408 and its connection closed. Only plain TCP connections on
Linux (epoll) are held; others go to the pool at once, as in cheroot.

The errors cheroot answers itself, before the application sees the request (a malformed
request line, header or Content-Length, headers over `server.max_request_header_size`, an
unknown transfer coding), get the API's JSON error page instead of a line of plain text.
"""
from __future__ import annotations

import functools
import logging
import select
import socket
import threading
import time
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Tuple, cast

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
    (cheroot_server, 'HTTPServer.process_conn'),
    (cheroot_server, 'HTTPServer.stop'),
    (cheroot_errors, 'socket_errors_to_ignore'),
    (_cpwsgi_server, 'CPWSGIServer.gateway'),
    (_cpwsgi_server, 'CPWSGIServer.ConnectionClass'),
    (_cpwsgi_server, 'CPWSGIHTTPRequest.simple_response'),
)
# What CherryPy limits a request body to when this server's own handling is not in place.
FALLBACK_MAX_BODY = 100 * 1000 * 1000
HEAD_TIMEOUT_S = 20.0  # server.request_head_timeout: the whole request line and headers, from the first byte
HEAD_PEEK_BYTES = 64 << 10  # a head still not complete with this much waiting goes to a worker as it is
HEAD_END = b'\r\n\r\n'


def head_arrived(sock: socket.socket) -> bool:
    """Tell whether the request head waiting on `sock` is complete (or the client closed, or failed)."""
    timeout = sock.gettimeout()
    sock.settimeout(0.0)  # with a timeout, Python would wait for bytes first, whatever the flags say
    try:
        waiting = sock.recv(HEAD_PEEK_BYTES, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True  # the worker finds out and closes the connection
    finally:
        sock.settimeout(timeout)
    # cheroot skips an empty line before the request line: it does not end a head
    return not waiting or HEAD_END in waiting.lstrip(b'\r\n') or len(waiting) >= HEAD_PEEK_BYTES


class HeadWaiter:
    """Connections whose request head has not all arrived, watched by one thread instead of a worker each."""

    def __init__(self, dispatch: Callable[[Any], None], timeout: float, timed_out: Callable[[Any], None]) -> None:
        """Hand complete connections to `dispatch`; after `timeout` seconds, give them to `timed_out`."""
        self._dispatch = dispatch
        self._timed_out = timed_out
        self.timeout = timeout
        self._lock = threading.Lock()
        self._incoming: List[Any] = []
        self._held: Dict[int, Tuple[Any, float]] = {}  # fd -> (connection, deadline)
        self._poller = select.epoll()
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)
        self._poller.register(self._wake_read.fileno(), select.EPOLLIN)
        self._thread: Optional[threading.Thread] = None
        self._stopping = False

    def hold(self, connection: Any) -> None:
        """Watch `connection` until its head is complete (from any thread)."""
        with self._lock:
            if self._stopping:
                connection.close()
                return
            self._incoming.append(connection)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name='cartd-head-waiter', daemon=True)
                self._thread.start()
        self._wake()

    def held(self) -> int:
        """How many connections wait for their head now."""
        return len(self._held) + len(self._incoming)

    def _wake(self) -> None:
        try:
            self._wake_write.send(b'\0')
        except (BlockingIOError, OSError):
            pass  # a wake-up is pending already, or the waiter is stopped

    def _release(self, fd: int) -> Any:
        connection, _ = self._held.pop(fd)
        self._poller.unregister(fd)
        return connection

    def _take_incoming(self, now: float) -> None:
        with self._lock:
            incoming, self._incoming = self._incoming, []
        for connection in incoming:
            fd = connection.socket.fileno()
            # edge-triggered: only new bytes wake the waiter (what has arrived stays unread in the socket);
            # registering reports bytes already there, so none slip between the check and the register
            self._poller.register(fd, select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)
            self._held[fd] = (connection, now + self.timeout)

    def _run(self) -> None:
        while not self._stopping:
            now = time.monotonic()
            nearest = min((deadline for _, deadline in self._held.values()), default=now + 1.0)
            try:
                events = self._poller.poll(max(0.0, min(1.0, nearest - now)))
            except InterruptedError:
                continue
            except (OSError, ValueError):
                if self._stopping:
                    break
                raise
            now = time.monotonic()
            self._take_incoming(now)
            for fd, mask in events:
                if fd == self._wake_read.fileno():
                    try:
                        while self._wake_read.recv(4096):
                            pass
                    except (BlockingIOError, OSError):
                        pass
                    continue
                held = self._held.get(fd)
                hung_up = mask & (select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR)
                if held is not None and (hung_up or head_arrived(held[0].socket)):
                    self._dispatch(self._release(fd))  # a worker reads what is there (or finds it closed)
            for fd, (_, deadline) in list(self._held.items()):
                if deadline <= now:
                    self._timed_out(self._release(fd))

    def stop(self) -> None:
        """Stop watching: close every connection still waiting, end the thread."""
        with self._lock:
            self._stopping = True
            thread = self._thread
        self._wake()
        if thread is not None:
            thread.join(5)
        with self._lock:
            incoming, self._incoming = self._incoming, []
        for connection in [*incoming, *(held for held, _ in self._held.values())]:
            connection.close()
        self._held.clear()
        self._poller.close()
        self._wake_read.close()
        self._wake_write.close()


def _head_timeout_answer(connection: Any, timeout: float) -> None:
    """Answer 408 (the API's JSON error page) on a connection whose head did not arrive in time; close it."""
    body = error_document('408 Request Timeout', f'the request line and headers did not arrive within {timeout:g} s',
                          cherrypy.__version__).encode('utf-8')
    head = ('HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n'
            f'Content-Length: {len(body)}\r\nConnection: close\r\n\r\n').encode('latin-1')
    try:
        connection.socket.send(head + body, socket.MSG_DONTWAIT)
    except OSError:
        pass
    connection.close()


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


def _server_classes() -> Tuple[type, type, type]:
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

    class HeadFirstServer(_cpwsgi_server.CPWSGIServer):
        """CherryPy's WSGI server, handing a connection to the thread pool only once its request head is in."""

        head_waiter: Optional[HeadWaiter] = None

        def process_conn(self, conn: Any) -> None:
            """Queue the connection for a worker if its head is complete, else hold it until it is."""
            sock = getattr(conn, 'socket', None)
            rfile = getattr(conn, 'rfile', None)
            buffered = getattr(rfile, 'has_data', None)
            if (self.head_waiter is None or type(sock) is not socket.socket or buffered is None or buffered()
                    or head_arrived(sock)):
                self.dispatch(conn)
            else:
                self.head_waiter.hold(conn)

        def dispatch(self, conn: Any) -> None:
            """Queue the connection for a worker, as cheroot does."""
            super().process_conn(conn)

        def stop(self) -> None:
            """Stop holding connections, then stop as cheroot does."""
            if self.head_waiter is not None:
                self.head_waiter.stop()
            super().stop()

    return SendfileGateway, JsonErrorConnection, HeadFirstServer


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
    gateway, connection, server_class = _server_classes()
    httpserver = server_class(server)
    httpserver.gateway = gateway
    httpserver.ConnectionClass = connection
    timeout = float(getattr(server, 'request_head_timeout', HEAD_TIMEOUT_S))
    if timeout > 0 and hasattr(select, 'epoll'):
        answer = functools.partial(_head_timeout_answer, timeout=timeout)
        httpserver.head_waiter = HeadWaiter(httpserver.dispatch, timeout, answer)
    server.instance = httpserver
    return True
