"""uwsgiadapter in-process: the path as cheroot gives it, chunked bodies, cheroot's refusals, when to close."""
from __future__ import annotations

import io
import socket
import json
from typing import Any, Dict, Iterable, List, Optional, Tuple

import pytest

from pacifica.cartd.uwsgiadapter import UwsgiAdapter, path_as_cheroot_gives_it


@pytest.mark.parametrize('uri, path', [
    ('/a', '/a'), ('/a%2Fb', '/a%2Fb'), ('/a%2fb', '/a%2Fb'), ('/a/../b', '/a/../b'), ('/.', '/.'),
    ('/%2E%2E', '/..'), ('/x?filename=y.tar', '/x'), ('/%C3%A9', '/\u00c3\u00a9'), ('/%FFx', '/\u00ffx'),
    ('http://host:1/a%2Fb?q', '/a%2Fb'), ('/a%20b', '/a b'),
])
def test_the_path_is_the_target_as_cheroot_decodes_it(uri: str, path: str) -> None:
    assert path_as_cheroot_gives_it(uri) == path


def test_a_script_name_is_taken_off() -> None:
    assert path_as_cheroot_gives_it('/cart/u1', '/cart') == '/u1'


class Recorder:
    """The wrapped application: remembers the environ and what it read, answers 200."""

    def __init__(self, read: Optional[int] = None) -> None:
        self.read = read
        self.environ: Dict[str, Any] = {}
        self.body = b''

    def __call__(self, environ: Dict[str, Any], start_response: Any) -> Iterable[bytes]:
        self.environ = environ
        if self.read is not None:
            self.body = environ['wsgi.input'].read(self.read)
        start_response('200 OK', [('Content-Type', 'text/plain'), ('Connection', 'keep-alive')])
        return [b'ok']


def call(adapter: UwsgiAdapter, environ: Dict[str, Any]) -> Tuple[str, Dict[str, str], bytes]:
    answer: Dict[str, Any] = {}

    def start_response(status: str, headers: List[Tuple[str, str]], exc_info: Any = None) -> None:
        answer['status'], answer['headers'] = status, headers

    body = b''.join(adapter(environ, start_response))
    names = [name.lower() for name, _ in answer['headers']]
    assert names.count('connection') <= 1
    return answer['status'], {name.lower(): value for name, value in answer['headers']}, body


def environ(**extra: Any) -> Dict[str, Any]:
    return {'REQUEST_METHOD': 'POST', 'REQUEST_URI': '/u1', 'PATH_INFO': '/u1', 'wsgi.input': io.BytesIO(b''),
            **extra}


def chunks(*pieces: bytes) -> Any:
    queue = list(pieces) + [b'']
    return lambda: queue.pop(0)


def test_a_chunked_body_is_read_and_handed_on_with_its_length() -> None:
    app = Recorder(read=100)
    adapter = UwsgiAdapter(app, 100, '1', {}, chunks(b'{"file', b'ids": []}'))
    status, headers, _ = call(adapter, environ(HTTP_TRANSFER_ENCODING='chunked'))
    assert status == '200 OK' and app.body == b'{"fileids": []}'
    assert app.environ['CONTENT_LENGTH'] == '15' and 'HTTP_TRANSFER_ENCODING' not in app.environ
    assert headers['connection'] == 'keep-alive'  # all of it was read: the connection may stay


def test_a_chunked_body_over_the_limit_is_read_to_one_byte_past_it_and_the_connection_closed() -> None:
    app = Recorder(read=100)
    read: List[int] = []
    pieces = [b'x' * 4] * 10

    def reader() -> bytes:
        read.append(1)
        return pieces.pop(0) if pieces else b''

    status, headers, _ = call(UwsgiAdapter(app, 10, '1', {}, reader), environ(HTTP_TRANSFER_ENCODING='chunked'))
    assert len(app.body) == 12 and len(read) == 3  # 12 bytes: over the limit of 10, and no more read
    assert headers['connection'] == 'close'


@pytest.mark.parametrize('coding', ['gzip', 'chunked, gzip'])
def test_another_transfer_coding_is_501(coding: str) -> None:
    app = Recorder()
    status, headers, body = call(UwsgiAdapter(app, 10, '9.9', {}, chunks()), environ(HTTP_TRANSFER_ENCODING=coding))
    assert status == '501 Unimplemented' and headers['connection'] == 'close' and app.environ == {}
    assert json.loads(body) == {'status': '501 Unimplemented', 'message': 'Unimplemented', 'traceback': '',
                                'version': '9.9'}


def test_a_content_length_that_is_no_number_is_400_as_cheroot_says_it() -> None:
    app = Recorder()
    status, _, body = call(UwsgiAdapter(app, 10, '1', {}), environ(CONTENT_LENGTH='many'))
    assert status == '400 Bad Request' and json.loads(body)['message'] == 'Malformed Content-Length Header.'
    assert app.environ == {}


@pytest.mark.parametrize('length, read, closes', [('5', 5, False), ('5', 2, True), ('5', None, True),
                                                  ('-1', None, True), ('', None, False)])
def test_an_answer_that_left_body_unread_closes_the_connection(length: str, read: Optional[int], closes: bool) -> None:
    app = Recorder(read=read)
    _, headers, _ = call(UwsgiAdapter(app, 10, '1', {}), environ(CONTENT_LENGTH=length,
                                                                 **{'wsgi.input': io.BytesIO(b'12345')}))
    assert (headers['connection'] == 'close') == closes


@pytest.mark.parametrize('options, closes', [({'http-socket': b':1'}, True), ({'https-socket': b':1'}, True),
                                             ({'http11-socket': b':1'}, False), ({}, False)])
def test_sockets_that_close_after_one_answer_say_so(options: Dict[str, Any], closes: bool) -> None:
    _, headers, _ = call(UwsgiAdapter(Recorder(), 10, '1', options), environ())
    assert (headers['connection'] == 'close') == closes


@pytest.mark.parametrize('extra, closes', [({'HTTP_CONNECTION': 'close'}, True), ({'HTTP_CONNECTION': 'Keep-Alive, Close'}, True),
                                           ({'HTTP_CONNECTION': 'keep-alive'}, False), ({}, False),
                                           ({'SERVER_PROTOCOL': 'HTTP/1.0'}, True),
                                           ({'SERVER_PROTOCOL': 'HTTP/1.0', 'HTTP_CONNECTION': 'keep-alive'}, False)])
def test_a_client_that_asks_to_close_is_answered_with_connection_close(extra: Dict[str, Any], closes: bool) -> None:
    _, headers, _ = call(UwsgiAdapter(Recorder(), 10, '1', {'http11-socket': b':1'}), environ(**extra))
    assert (headers['connection'] == 'close') == closes


@pytest.mark.parametrize('extra, shut', [({'HTTP_CONNECTION': 'close'}, True), ({}, False)])
def test_closing_on_a_keep_alive_socket_shuts_the_read_side_and_the_answer_still_goes(extra: Dict[str, Any],
                                                                                      shut: bool) -> None:
    """uWSGI's --http11-socket ignores `Connection: close`: the adapter ends its wait for a next request."""
    server_end, client_end = socket.socketpair()
    with server_end, client_end:
        adapter = UwsgiAdapter(Recorder(), 10, '1', {'http11-socket': b':1'}, connection_fd=server_end.fileno)
        call(adapter, environ(**extra))
        server_end.sendall(b'answer')  # the write side is open either way
        assert client_end.recv(16) == b'answer'
        server_end.setblocking(False)
        if shut:
            assert server_end.recv(16) == b''  # end of stream at once: uWSGI closes the connection
        else:
            with pytest.raises(BlockingIOError):  # still waiting for a next request
                server_end.recv(16)
        assert server_end.fileno() >= 0  # the descriptor is left open for uWSGI to close


def test_a_refusal_on_a_keep_alive_socket_shuts_the_read_side() -> None:
    server_end, client_end = socket.socketpair()
    with server_end, client_end:
        adapter = UwsgiAdapter(Recorder(), 10, '1', {'http11-socket': b':1'}, connection_fd=server_end.fileno)
        status, headers, _ = call(adapter, environ(HTTP_TRANSFER_ENCODING='gzip'))
        server_end.setblocking(False)
        assert status == '501 Unimplemented' and headers['connection'] == 'close' and server_end.recv(16) == b''
