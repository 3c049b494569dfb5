"""An HTTP proxy in front of the real archive interface that injects faults per archive id.

The cart under test is pointed at the proxy's URL; the proxy forwards HEAD, POST and GET to
the real pacifica-archiveinterface and, for the ids a test names, answers wrongly instead:

=============  =====================================================================
fault          what the cart sees
=============  =====================================================================
``status500``  a 500 JSON error page (like the archive's own) instead of the answer
``hang``       nothing for ``seconds`` (longer than the cart's timeout), then the answer
``cut``        a chunked GET body that stops after ``after`` bytes: the socket is closed
``short``      a GET answer announcing Content-Length M, then M-``missing`` bytes, then close
``eof``        a GET body without any length, closed after ``after`` bytes (looks complete)
``flip``       the right number of bytes with one byte changed (hash mismatch)
``nohead``     HEAD 204 without any X-Pacifica headers (nor X-Content-Length, Last-Modified)
``tape``       HEAD says ``X-Pacifica-File-Storage-Media: tape`` (then, when used up, disk)
``media``      HEAD says ``X-Pacifica-File-Storage-Media: <media>`` (e.g. ``error``)
=============  =====================================================================

Each rule applies ``times`` times (``None``: always) to the methods it names; once used up,
requests pass through untouched. The proxy records every request it receives, in order, so
tests can count them per (method, id) and check their order.

Bounded: it listens on 127.0.0.1 only, its threads are daemons, every socket has a timeout,
hangs wait on an event that stop() sets, and stop() shuts the server down.
"""
from __future__ import annotations

import dataclasses
import http.server
import json
import socket
import threading
import time
from types import TracebackType
from typing import Any, Dict, Iterable, List, Optional, Tuple, Type, Union
from urllib.parse import unquote, urlsplit

import requests

UPSTREAM_TIMEOUT = 30.0
SOCKET_TIMEOUT = 30.0
STREAM_BLOCK = 64 * 1024
HOP_BY_HOP = frozenset(('connection', 'keep-alive', 'proxy-authenticate', 'proxy-authorization', 'te',
                        'trailers', 'transfer-encoding', 'upgrade', 'content-length', 'server', 'date'))
HEAD_ONLY = ('nohead', 'tape', 'media')
GET_ONLY = ('cut', 'short', 'eof', 'flip')
FAULTS = ('status500', 'hang') + HEAD_ONLY + GET_ONLY


@dataclasses.dataclass
class Rule:
    """One fault for one archive id: which methods, how many more times, and its parameters."""

    fault: str
    methods: Tuple[str, ...]
    remaining: Optional[int]
    params: Dict[str, Any]
    used: int = 0


@dataclasses.dataclass
class Event:
    """One request the proxy received (recorded on arrival), and what it did with it."""

    seq: int
    method: str
    archive_id: str
    fault: str  # '' when passed through untouched
    at: float  # time.monotonic() on arrival
    query: str = ''  # the URL's query, e.g. 'byte_range=0-0'
    answer: str = 'in progress'  # then e.g. 'HEAD 204 media=disk', 'GET 200 1234 bytes', '500'


class FaultProxy:
    """A threaded HTTP proxy to `upstream` (the archive's base URL) with per-id fault rules."""

    def __init__(self, upstream: str) -> None:
        """Remember the archive URL (ending in '/'); nothing listens until start()."""
        self.upstream = upstream if upstream.endswith('/') else upstream + '/'
        self._lock = threading.Lock()
        self._rules: Dict[str, List[Rule]] = {}
        self._events: List[Event] = []
        self._stopping = threading.Event()
        self._server: Optional[http.server.ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self.errors: List[str] = []  # unexpected exceptions inside the proxy, for assertion messages

    # ---- life cycle -------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port the proxy listens on."""
        if self._server is None:
            raise RuntimeError('the fault proxy was not started')
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The base URL (ending in '/') to configure as the cart's archive."""
        return f'http://127.0.0.1:{self.port}/'

    def start(self) -> 'FaultProxy':
        """Listen on 127.0.0.1 and a free port, serving in a daemon thread."""
        proxy = self

        class Handler(_Handler):
            owner = proxy

        server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        server.daemon_threads = True
        server.block_on_close = False
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={'poll_interval': 0.1},
                                        name='faultproxy', daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Wake every hanging request, stop serving and close the listening socket."""
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> 'FaultProxy':
        """Start the proxy."""
        return self.start()

    def __exit__(self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException],
                 traceback: Optional[TracebackType]) -> None:
        """Stop the proxy."""
        self.stop()

    # ---- rules and records ------------------------------------------------------------

    def rule(self, archive_id: str, fault: str, times: Optional[int] = 1,
             methods: Union[str, Iterable[str], None] = None, **params: Any) -> None:
        """Add a fault for `archive_id`, applied `times` times (None: always) to `methods`.

        Defaults: HEAD for nohead/tape/media, GET for cut/short/eof/flip, GET for status500/hang.
        Parameters: hang `seconds` (default 5); cut/eof `after` bytes (default half the body);
        short `missing` bytes (default half the body); flip `offset` (default the middle);
        media `media` (default 'error') and `message`; status500 `message`.
        """
        if fault not in FAULTS:
            raise ValueError(f'unknown fault {fault!r}; one of {FAULTS}')
        if methods is None:
            methods = ('HEAD',) if fault in HEAD_ONLY else ('GET',)
        elif isinstance(methods, str):
            methods = (methods,)
        methods = tuple(method.upper() for method in methods)
        if fault in HEAD_ONLY and methods != ('HEAD',) or fault in GET_ONLY and methods != ('GET',):
            raise ValueError(f'fault {fault!r} does not apply to {methods}')
        with self._lock:
            self._rules.setdefault(archive_id, []).append(Rule(fault, methods, times, dict(params)))

    def clear(self) -> None:
        """Forget every rule and every recorded request."""
        with self._lock:
            self._rules.clear()
            self._events.clear()

    def _arrived(self, method: str, archive_id: str, query: str = '') -> Tuple[Optional[Rule], Event]:
        """Record a request on arrival and take the first rule for it that is not used up."""
        with self._lock:
            chosen: Optional[Rule] = None
            for rule in self._rules.get(archive_id, []):
                if method in rule.methods and (rule.remaining is None or rule.remaining > 0):
                    if rule.remaining is not None:
                        rule.remaining -= 1
                    rule.used += 1
                    chosen = rule
                    break
            event = Event(len(self._events), method, archive_id, chosen.fault if chosen else '', time.monotonic(),
                          query)
            self._events.append(event)
            return chosen, event

    def _answered(self, event: Event, answer: str) -> None:
        with self._lock:
            event.answer = answer

    def events(self, archive_id: Optional[str] = None) -> List[Event]:
        """Requests received so far (for one id, or all), in order."""
        with self._lock:
            return [dataclasses.replace(event) for event in self._events
                    if archive_id is None or event.archive_id == archive_id]

    def count(self, method: str, archive_id: str, query: Optional[str] = None) -> int:
        """How many `method` requests for `archive_id` (with exactly this query, unless None) the proxy received."""
        return sum(1 for event in self.events(archive_id)
                   if event.method == method.upper() and (query is None or event.query == query))

    def counts(self, archive_id: str) -> Dict[str, int]:
        """Requests received for `archive_id`, per method."""
        totals: Dict[str, int] = {}
        for event in self.events(archive_id):
            totals[event.method] = totals.get(event.method, 0) + 1
        return totals


class _Handler(http.server.BaseHTTPRequestHandler):
    """Forwards one request to the archive, or answers with the fault a rule asks for."""

    owner: FaultProxy
    protocol_version = 'HTTP/1.1'
    timeout = SOCKET_TIMEOUT  # applied to the accepted socket by StreamRequestHandler

    def log_message(self, format: str, *args: Any) -> None:  # pylint: disable=redefined-builtin
        """Quiet: the events list is the record."""

    # ---- the three verbs the cart uses ------------------------------------------------

    def do_HEAD(self) -> None:  # pylint: disable=invalid-name
        """HEAD: status of a file."""
        self._serve('HEAD')

    def do_GET(self) -> None:  # pylint: disable=invalid-name
        """GET: the file's bytes."""
        self._serve('GET')

    def do_POST(self) -> None:  # pylint: disable=invalid-name
        """POST: stage the file."""
        self._serve('POST')

    def _serve(self, method: str) -> None:
        self.close_connection = True  # one request per connection: simple and bounded
        target = urlsplit(self.path)
        archive_id = unquote(target.path.lstrip('/'))
        length = int(self.headers.get('Content-Length') or 0)
        body = self.rfile.read(length) if length else b''
        rule, event = self.owner._arrived(method, archive_id, target.query)  # pylint: disable=protected-access
        try:
            answer = self._answer(method, archive_id, target.query, body, rule)
        except (BrokenPipeError, ConnectionResetError, socket.timeout) as exc:
            answer = f'client went away: {type(exc).__name__}'
        except Exception as exc:  # pylint: disable=broad-except
            self.owner.errors.append(f'{method} {archive_id}: {type(exc).__name__}: {exc}')
            answer = f'proxy error {type(exc).__name__}'
            try:
                self._send_500(f'fault proxy error: {exc}')
            except OSError:
                pass
        self.owner._answered(event, answer)  # pylint: disable=protected-access

    def _answer(self, method: str, archive_id: str, query: str, body: bytes, rule: Optional[Rule]) -> str:
        params = rule.params if rule is not None else {}
        if rule is not None and rule.fault == 'status500':
            self._send_500(params.get('message', 'The archive core server is slow to respond'))
            return '500'
        if rule is not None and rule.fault == 'hang':
            if self.owner._stopping.wait(float(params.get('seconds', 5))):  # pylint: disable=protected-access
                return 'hang, then stopped'
        url = self.owner.upstream + archive_id.lstrip('/') + (f'?{query}' if query else '')
        upstream = requests.request(method, url, data=body or None,
                                    stream=(method == 'GET'), timeout=UPSTREAM_TIMEOUT)
        try:
            if method == 'HEAD':
                return self._head(upstream, rule)
            if method == 'GET' and upstream.status_code == 200 and rule is not None and rule.fault in GET_ONLY:
                return self._faulty_get(upstream, rule)
            return self._pass_through(method, upstream)
        finally:
            upstream.close()

    # ---- answers ------------------------------------------------------------------------

    def _copy_headers(self, upstream: requests.Response, drop: Iterable[str] = ()) -> None:
        dropped = {name.lower() for name in drop}
        for name, value in upstream.headers.items():
            if name.lower() not in HOP_BY_HOP and name.lower() not in dropped:
                self.send_header(name, value)

    def _send_500(self, message: str) -> None:
        page = json.dumps({'status': '500 Internal Server Error', 'message': message,
                           'traceback': 'Traceback (most recent call last):\n  injected by the fault proxy',
                           'version': 'faultproxy'}).encode()
        self.send_response(500)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(page)))
        self.send_header('Connection', 'close')
        self.end_headers()
        if self.command != 'HEAD':
            self.wfile.write(page)
        self.wfile.flush()

    def _head(self, upstream: requests.Response, rule: Optional[Rule]) -> str:
        fault = rule.fault if rule is not None else ''
        self.send_response(upstream.status_code)
        if fault == 'nohead':
            self._copy_headers(upstream, drop=[name for name in upstream.headers
                                               if name.lower().startswith('x-') or name.lower() == 'last-modified'])
        else:
            drop = ['X-Pacifica-File-Storage-Media'] if fault in ('tape', 'media') else []
            if fault == 'media' and rule is not None and 'message' in rule.params:
                drop += ['X-Pacifica-Messsage', 'X-Pacifica-Message']
            self._copy_headers(upstream, drop=drop)
        media = upstream.headers.get('X-Pacifica-File-Storage-Media', '')
        if fault == 'tape':
            media = 'tape'
            self.send_header('X-Pacifica-File-Storage-Media', media)
        elif fault == 'media':
            media = str(rule.params.get('media', 'error')) if rule is not None else media
            self.send_header('X-Pacifica-File-Storage-Media', media)
            if rule is not None and 'message' in rule.params:
                self.send_header('X-Pacifica-Messsage', str(rule.params['message']))
        elif fault == 'nohead':
            media = '(none)'
        self.send_header('Content-Length', '0')
        self.send_header('Connection', 'close')
        self.end_headers()
        self.wfile.flush()
        return f'HEAD {upstream.status_code} media={media}'

    def _pass_through(self, method: str, upstream: requests.Response) -> str:
        """Forward status, headers and (for GET, streamed in chunked encoding) the body."""
        self.send_response(upstream.status_code)
        self._copy_headers(upstream)
        self.send_header('Connection', 'close')
        if method == 'GET':
            self.send_header('Transfer-Encoding', 'chunked')
            self.end_headers()
            sent = 0
            for block in upstream.iter_content(STREAM_BLOCK):
                if block:
                    self._chunk(block)
                    sent += len(block)
            self.wfile.write(b'0\r\n\r\n')
            self.wfile.flush()
            return f'GET {upstream.status_code} {sent} bytes'
        content = upstream.content
        self.send_header('Content-Length', str(len(content)))
        self.end_headers()
        self.wfile.write(content)
        self.wfile.flush()
        return f'{method} {upstream.status_code}'

    def _chunk(self, block: bytes) -> None:
        self.wfile.write(f'{len(block):x}\r\n'.encode() + block + b'\r\n')

    def _drop(self) -> None:
        """Close the connection now, mid-answer."""
        self.wfile.flush()
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _faulty_get(self, upstream: requests.Response, rule: Rule) -> str:
        data = upstream.content  # test files are small; read whole to cut or change them exactly
        size = len(data)
        self.send_response(200)
        self._copy_headers(upstream)
        self.send_header('Connection', 'close')
        if rule.fault == 'cut':
            after = int(rule.params.get('after', size // 2))
            self.send_header('Transfer-Encoding', 'chunked')
            self.end_headers()
            if after:
                self._chunk(data[:after])
            self._drop()
            return f'GET cut after {after} of {size}'
        if rule.fault == 'short':
            missing = int(rule.params.get('missing', size // 2))
            self.send_header('Content-Length', str(size))
            self.end_headers()
            self.wfile.write(data[:size - missing])
            self._drop()
            return f'GET short {size - missing} of {size}'
        if rule.fault == 'eof':
            after = int(rule.params.get('after', size // 2))
            self.end_headers()  # no length: the body ends when the connection closes
            self.wfile.write(data[:after])
            self._drop()
            return f'GET eof after {after} of {size}'
        offset = int(rule.params.get('offset', size // 2))
        changed = data[:offset] + bytes([data[offset] ^ 0xFF]) + data[offset + 1:]
        self.send_header('Content-Length', str(size))
        self.end_headers()
        self.wfile.write(changed)
        self.wfile.flush()
        return f'GET flipped byte {offset} of {size}'


class ProxiedArchive:
    """Looks like an ArchiveServer to CartStack, but its URL is the proxy's; everything else is the archive's."""

    def __init__(self, archive: Any, proxy: FaultProxy) -> None:
        """Wrap the real archive server and the proxy in front of it."""
        self._archive = archive
        self.proxy = proxy

    @property
    def url(self) -> str:
        """The proxy's URL, which the cart is configured with."""
        return self.proxy.url

    def put(self, archive_id: str, data: bytes, mtime: Optional[float] = None) -> Dict[str, Union[str, int]]:
        """Store a file in the real archive; return its hashes and size."""
        return self._archive.put(archive_id, data, mtime=mtime)

    def __getattr__(self, name: str) -> Any:
        """Everything else (root, path_for, log_tail, ...) from the real archive."""
        return getattr(self._archive, name)
