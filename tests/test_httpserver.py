"""httpserver: the check for the cheroot/CherryPy internals it builds on, and what use_sendfile_gateway sets up.

Removing one required name with monkeypatch stands in for a cheroot or CherryPy that lacks
it. The gateway itself is checked by serving a tiny WSGI app with the server it builds,
in-process on 127.0.0.1 (an ephemeral port), with a client socket that has a timeout.
"""
from __future__ import annotations

import http.client
import json
import logging
import pathlib
import socket
import threading
from typing import Any, Callable, Iterator, List, Optional

import cheroot.errors
import cheroot.server
import cheroot.wsgi
import cherrypy
import pytest
from cherrypy import _cpserver, _cpwsgi_server

from pacifica.cartd import httpserver, transport
from pacifica.cartd.tarlayout import FileRange
from pacifica.cartd.transport import SENDFILE_ENVIRON_KEY, response_body
from cartd_testkit.rawhttp import exchange

TIMEOUT_S = 10.0


def test_nothing_is_missing_on_the_installed_cheroot_and_cherrypy() -> None:
    assert httpserver.missing_internals() == []


def test_a_missing_method_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(cheroot.server.HTTPRequest, 'ensure_headers_sent')
    assert httpserver.missing_internals() == ['cheroot.server.HTTPRequest.ensure_headers_sent']


def test_a_missing_module_level_name_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(cheroot.errors, 'socket_errors_to_ignore')
    assert httpserver.missing_internals() == ['cheroot.errors.socket_errors_to_ignore']


def test_a_missing_class_names_each_name_under_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(cheroot.wsgi, 'Gateway_10')
    assert httpserver.missing_internals() == ['cheroot.wsgi.Gateway_10.get_environ',
                                              'cheroot.wsgi.Gateway_10.start_response']


# ---- use_sendfile_gateway -------------------------------------------------------------

def fresh_server(max_body: int = 0) -> _cpserver.Server:
    server = _cpserver.Server()
    server.socket_host = '127.0.0.1'
    server.socket_port = 0
    server.max_request_body_size = max_body
    return server


def test_the_gateway_is_put_in_place(caplog: pytest.LogCaptureFixture) -> None:
    server = fresh_server()
    with caplog.at_level(logging.WARNING, logger='pacifica.cartd.httpserver'):
        assert httpserver.use_sendfile_gateway(server) is True
    assert caplog.records == []
    instance = server.instance
    assert isinstance(instance, _cpwsgi_server.CPWSGIServer)
    assert issubclass(instance.gateway, cheroot.wsgi.Gateway_10)
    assert 'sendfile' in vars(instance.gateway)
    assert issubclass(instance.ConnectionClass, cheroot.server.HTTPConnection)
    assert issubclass(instance.ConnectionClass.RequestHandlerClass, _cpwsgi_server.CPWSGIHTTPRequest)
    assert server.max_request_body_size == 0  # this server's own handling is in place: no limit added


@pytest.mark.parametrize('owner, name, missing', [
    (cheroot.server.HTTPRequest, 'ensure_headers_sent', 'cheroot.server.HTTPRequest.ensure_headers_sent'),
    (cheroot.errors, 'socket_errors_to_ignore', 'cheroot.errors.socket_errors_to_ignore'),
])
def test_without_a_required_name_cherrypys_server_stays(monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture,
                                                         owner: Any, name: str, missing: str) -> None:
    monkeypatch.delattr(owner, name)
    server = fresh_server()
    with caplog.at_level(logging.DEBUG, logger='pacifica.cartd.httpserver'):
        assert httpserver.use_sendfile_gateway(server) is False
    warnings = [record for record in caplog.records if record.name == 'pacifica.cartd.httpserver']
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert missing in warnings[0].getMessage()
    assert server.instance is None
    assert server.max_request_body_size == httpserver.FALLBACK_MAX_BODY


def test_without_a_required_name_a_set_body_limit_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(cheroot.server.HTTPRequest, 'ensure_headers_sent')
    server = fresh_server(max_body=12345)
    assert httpserver.use_sendfile_gateway(server) is False
    assert server.max_request_body_size == 12345
    assert server.instance is None


# ---- the gateway, serving -------------------------------------------------------------

@pytest.fixture
def serve() -> Iterator[Callable[..., int]]:
    """Serve a WSGI app with the server use_sendfile_gateway builds; return its port.

    `threads` and `head_timeout`, when given, set server.thread_pool and server.request_head_timeout.
    """
    started: List[Any] = []

    def start(app: Callable[..., Any], threads: Optional[int] = None, head_timeout: Optional[float] = None) -> int:
        server = fresh_server()
        server.socket_timeout = TIMEOUT_S
        if threads is not None:
            server.thread_pool = threads
        if head_timeout is not None:
            server.request_head_timeout = head_timeout
        assert httpserver.use_sendfile_gateway(server)
        instance = server.instance
        assert instance.head_waiter is not None
        instance.wsgi_app = app
        instance.prepare()
        thread = threading.Thread(target=instance.serve, daemon=True)
        thread.start()
        started.append((instance, thread))
        return instance.bind_addr[1]

    yield start
    for instance, thread in started:
        instance.stop()
        thread.join(TIMEOUT_S)
        assert not thread.is_alive()


@pytest.mark.parametrize('first', ['bytes', 'file'])
def test_the_gateway_offers_sendfile_and_it_sends_the_file(serve: Callable[..., int], tmp_path: pathlib.Path,
                                                           first: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file's bytes arrive in place, also when the body starts with them (a Range inside a file).

    transport.GATHER_BYTES is 0 here, so even this short range is sent rather than gathered.
    """
    monkeypatch.setattr(transport, 'GATHER_BYTES', 0)
    source = tmp_path / 'payload'
    source.write_bytes(bytes(range(256)) * 400)  # 100 KiB
    pieces: List[Any] = [b'HEAD:', FileRange(source, 1000, 100), b':TAIL.']
    if first == 'file':
        pieces = pieces[1:]
    expected = b''.join(piece if isinstance(piece, bytes) else source.read_bytes()[1000:1100] for piece in pieces)
    seen: List[Any] = []
    sent: List[int] = []

    def app(environ: dict, start_response: Callable[..., Any]) -> Any:
        offered = environ.get(SENDFILE_ENVIRON_KEY)
        seen.append(offered)

        def send_file(handle: Any, offset: int, count: int) -> int:
            assert len(sent) < 100, 'sendfile called over and over'
            result = offered(handle, offset, count)
            sent.append(result)
            return result

        start_response('200 OK', [('Content-Type', 'application/octet-stream'),
                                  ('Content-Length', str(len(expected)))])
        return response_body(pieces, 1000, send_file)

    port = serve(app)
    client = http.client.HTTPConnection('127.0.0.1', port, timeout=TIMEOUT_S)
    try:
        client.request('GET', '/x')
        answer = client.getresponse()
        body = answer.read()
    finally:
        client.close()
    assert answer.status == 200
    assert answer.getheader('Content-Type') == 'application/octet-stream'
    assert callable(seen[0])
    assert body == expected
    assert sum(sent) == 100


def test_cheroots_own_errors_are_json(serve: Callable[..., int]) -> None:
    port = serve(lambda environ, start_response: pytest.fail('a malformed request reached the app'))
    answer, closed = exchange(port, b'NONSENSE\r\n\r\n', TIMEOUT_S)
    assert closed and len(answer) < 1 << 20
    head, _, body = answer.partition(b'\r\n\r\n')
    lines = head.decode('latin-1').split('\r\n')
    assert lines[0].startswith('HTTP/1.1 400 ')
    assert 'Content-Type: application/json' in lines
    assert 'Connection: close' in lines
    document = json.loads(body)
    assert set(document) == {'status', 'message', 'traceback', 'version'}
    assert document['status'].startswith('400 ')
    assert document['traceback'] == ''
    assert document['version'] == cherrypy.__version__


# ---- slow senders hold no thread --------------------------------------------------------

def _hello(environ: dict, start_response: Callable[..., Any]) -> List[bytes]:
    body = environ['PATH_INFO'].encode('latin-1')
    start_response('200 OK', [('Content-Type', 'text/plain'), ('Content-Length', str(len(body)))])
    return [body]


def _read_answer(raw: socket.socket) -> bytes:
    answer = b''
    while b'\r\n\r\n' not in answer or len(answer.partition(b'\r\n\r\n')[2]) < int(
            dict(line.split(': ', 1) for line in answer.partition(b'\r\n\r\n')[0].decode('latin-1').split('\r\n')[1:]
                 if ': ' in line).get('Content-Length', '0')):
        data = raw.recv(65536)
        if not data:
            break
        answer += data
        assert len(answer) < 1 << 20
    return answer


def test_connections_still_sending_their_head_hold_no_thread(serve: Callable[..., int]) -> None:
    """Two worker threads, ten connections with half a request each: a new request is still answered."""
    port = serve(_hello, threads=2)
    slow = [socket.create_connection(('127.0.0.1', port), timeout=TIMEOUT_S) for _ in range(10)]
    try:
        for raw in slow:
            raw.sendall(b'GET /slow HTTP/1.1\r\nHost: x\r\n')
        for attempt in range(3):
            with socket.create_connection(('127.0.0.1', port), timeout=TIMEOUT_S) as raw:
                raw.sendall(f'GET /fast{attempt} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'.encode())
                answer = _read_answer(raw)
            assert answer.startswith(b'HTTP/1.1 200 ') and answer.endswith(f'/fast{attempt}'.encode()), answer
        # the held ones are served once their heads are complete, on the same connections
        for index, raw in enumerate(slow):
            raw.sendall(f'X-Index: {index}\r\n\r\n'.encode())
        for raw in slow:
            assert _read_answer(raw).endswith(b'/slow')
    finally:
        for raw in slow:
            raw.close()


def test_a_head_sent_a_few_bytes_at_a_time_is_served_whole(serve: Callable[..., int]) -> None:
    port = serve(_hello, threads=1)
    request = b'\r\nGET /in-pieces HTTP/1.1\r\nHost: x\r\nX-Long: ' + b'y' * 300 + b'\r\n\r\n'
    with socket.create_connection(('127.0.0.1', port), timeout=TIMEOUT_S) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for start in range(0, len(request), 40):
            raw.sendall(request[start:start + 40])
            threading.Event().wait(0.01)
        answer = _read_answer(raw)
        assert answer.startswith(b'HTTP/1.1 200 ') and answer.endswith(b'/in-pieces')
        raw.sendall(b'GET /kept-alive HTTP/1.1\r\nHost: x\r\n\r\n')  # the next request on the same connection
        assert _read_answer(raw).endswith(b'/kept-alive')


def test_a_head_not_in_within_the_timeout_gets_a_json_408(serve: Callable[..., int]) -> None:
    port = serve(lambda environ, start_response: pytest.fail('an incomplete head reached the app'),
                             threads=1, head_timeout=0.3)
    answer, closed = exchange(port, b'GET /never-ends HTTP/1.1\r\nHost: x\r\n', TIMEOUT_S)
    assert closed  # the server closed the connection after its answer
    head, _, body = answer.partition(b'\r\n\r\n')
    lines = head.decode('latin-1').split('\r\n')
    assert lines[0] == 'HTTP/1.1 408 Request Timeout'
    assert 'Content-Type: application/json' in lines and 'Connection: close' in lines
    document = json.loads(body)
    assert document['status'] == '408 Request Timeout'
    assert 'did not arrive within 0.3 s' in document['message']


def test_a_client_that_closes_midway_is_dropped(serve: Callable[..., int]) -> None:
    port = serve(_hello, threads=1)
    with socket.create_connection(('127.0.0.1', port), timeout=TIMEOUT_S) as raw:
        raw.sendall(b'GET /gone HTTP/1.1\r\n')
    with socket.create_connection(('127.0.0.1', port), timeout=TIMEOUT_S) as raw:
        raw.sendall(b'GET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
        assert _read_answer(raw).endswith(b'/after')


def test_no_head_timeout_means_no_waiter() -> None:
    server = fresh_server()
    server.request_head_timeout = 0
    assert httpserver.use_sendfile_gateway(server)
    assert server.instance.head_waiter is None
