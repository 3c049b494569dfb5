"""The REST layer in-process: CartRoot as a WSGI app over a stub service, checked against the wire contract.

No server and no socket: each test builds a WSGI environ by hand and calls the CherryPy
application directly. The stub service records every call and answers (or raises) what
the test sets, so each case checks the translation alone: status, headers and body.
"""
from __future__ import annotations

import dataclasses
import email.utils
import functools
import inspect
import io
import json
import logging
import pathlib
import re
import sys
import tarfile
import threading
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import cherrypy
import pytest

from pacifica.cartd import database, rest, transport
from pacifica.cartd.carts import CartDownload, CartState
from pacifica.cartd.config import Settings, check_volume, load_settings
from pacifica.cartd.errors import (BadRequest, CartNotFound, CartNotReady, PayloadTooLarge,
                                   RangeNotSatisfiable)
from pacifica.cartd.rest import UNEXPECTED_MESSAGE, UP_MESSAGE, CartRoot, QuietRequest, app_config, error_page
from pacifica.cartd.tarlayout import TarLayout, TarMember
from pacifica.cartd.transport import SENDFILE_ENVIRON_KEY

ERROR_KEYS = {'status', 'message', 'traceback', 'version'}
CREATED = 1500000000.0
MAX_REQUEST = 200


class StubService:
    """Stands in for CartService: records calls, answers with what the test put in `answers`.

    An answer that is an exception is raised; a callable `download` answer is called with
    the download's arguments (so the tar can be laid out under the `top` it was given).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.calls: List[Tuple[str, Tuple[Any, ...]]] = []
        self.answers: Dict[str, Any] = {}

    def _answer(self, name: str, *args: Any) -> Any:
        self.calls.append((name, args))
        answer = self.answers.get(name)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def create_cart(self, uid: str, body: Any) -> int:
        return self._answer('create_cart', uid, body)

    def status(self, uid: str) -> CartState:
        return self._answer('status', uid)

    def download(self, uid: str, filename: str, top: str) -> CartDownload:
        answer = self._answer('download', uid, filename, top)
        return answer(uid, filename, top) if callable(answer) else answer

    def delete(self, uid: str) -> int:
        return self._answer('delete', uid)


@dataclasses.dataclass
class Answer:
    """One WSGI answer: status line, headers (by lower-case name) and body."""

    status: str
    headers: Dict[str, str]
    header_list: List[Tuple[str, str]]
    body: bytes

    @property
    def code(self) -> int:
        return int(self.status.split()[0])

    def json(self) -> Any:
        return json.loads(self.body.decode('utf-8'))


class Client:
    """Calls the application as a WSGI server would."""

    def __init__(self, application: Callable[..., Any]) -> None:
        self.application = application

    def request(self, method: str, path: str, query: str = '', body: bytes = b'',
                headers: Optional[Dict[str, str]] = None, extra_environ: Optional[Dict[str, Any]] = None,
                sink: Optional[List[bytes]] = None) -> Answer:
        environ: Dict[str, Any] = {
            'REQUEST_METHOD': method, 'SCRIPT_NAME': '', 'PATH_INFO': path, 'QUERY_STRING': query,
            'SERVER_NAME': '127.0.0.1', 'SERVER_PORT': '8081', 'SERVER_PROTOCOL': 'HTTP/1.1',
            'REMOTE_ADDR': '127.0.0.1', 'REMOTE_PORT': '40000', 'HTTP_HOST': '127.0.0.1:8081',
            'wsgi.version': (1, 0), 'wsgi.url_scheme': 'http', 'wsgi.input': io.BytesIO(body),
            'wsgi.errors': sys.stderr, 'wsgi.multithread': False, 'wsgi.multiprocess': False,
            'wsgi.run_once': False,
        }
        for name, value in (headers or {}).items():
            key = name.upper().replace('-', '_')
            if key in ('CONTENT_TYPE', 'CONTENT_LENGTH'):
                environ[key] = value
            else:
                environ[f'HTTP_{key}'] = value
        environ.update(extra_environ or {})
        started: Dict[str, Any] = {}
        out: List[bytes] = [] if sink is None else sink

        def start_response(status: str, response_headers: List[Tuple[str, str]], exc_info: Any = None) -> Any:
            started['status'], started['headers'] = status, response_headers
            return out.append

        result = self.application(environ, start_response)
        try:
            for chunk in result:
                out.append(chunk)
        finally:
            if hasattr(result, 'close'):
                result.close()
        header_list = started['headers']
        return Answer(started['status'], {name.lower(): value for name, value in header_list},
                      header_list, b''.join(out))


@pytest.fixture
def settings(tmp_path: pathlib.Path) -> Settings:
    """Real settings on a temp SQLite file (the handlers open a connection per request)."""
    loaded = load_settings(str(tmp_path / 'none.ini'), environ={
        'VOLUME_PATH': str(tmp_path / 'volume'), 'PEEWEE_URL': f'sqliteext:///{tmp_path}/db.sqlite3'})
    check_volume(loaded)
    database.bind(loaded)
    return dataclasses.replace(loaded, transfer_size=7, max_request_size=MAX_REQUEST)


@pytest.fixture
def global_config() -> Iterator[None]:
    """What app.mount sets in CherryPy's global config, put back as it was afterwards."""
    saved = dict(cherrypy.config)
    cherrypy.config.update({'error_page.default': error_page, 'request.show_tracebacks': False})
    try:
        yield
    finally:
        dict.clear(cherrypy.config)
        dict.update(cherrypy.config, saved)


@pytest.fixture
def stub(settings: Settings) -> StubService:
    return StubService(settings)


@pytest.fixture
def client(stub: StubService, global_config: None) -> Client:
    application = cherrypy.Application(CartRoot(lambda: stub), '', app_config())
    application.request_class = QuietRequest
    return Client(application)


@pytest.fixture
def files(tmp_path: pathlib.Path) -> List[TarMember]:
    """Two small staged files, one in a sub-directory, of sizes that need tar padding."""
    first = tmp_path / 'staged-a'
    first.write_bytes(b'alpha\n' * 101)
    second = tmp_path / 'staged-b'
    second.write_bytes(bytes(range(256)) * 5 + b'tail')
    return [TarMember('a.txt', first.stat().st_size, 1600000000.0, first),
            TarMember('sub/b.bin', second.stat().st_size, 1600000100.0, second)]


def ready_cart(members: List[TarMember]) -> Callable[[str, str, str], CartDownload]:
    """A download answer: the tar of `members` laid out under the top the REST layer asked for."""
    return lambda uid, filename, top: CartDownload(TarLayout(top, members, CREATED), filename, 1)


def whole_tar(members: List[TarMember], top: str) -> bytes:
    return b''.join(TarLayout(top, members, CREATED).iter_bytes())


def assert_error_page(answer: Answer, code: int, message: str) -> None:
    """The API's JSON error page: four keys, the status, the message, no traceback."""
    assert answer.code == code, answer
    assert answer.headers['content-type'] == 'application/json'
    document = answer.json()
    assert set(document) == ERROR_KEYS
    assert document['status'].startswith(f'{code} ')
    assert document['message'] == message
    assert document['traceback'] == ''
    assert document['version'] == cherrypy.__version__


# ---- GET / ----------------------------------------------------------------------------

def test_root_says_the_service_is_up(client: Client, stub: StubService) -> None:
    answer = client.request('GET', '/')
    assert answer.code == 200
    assert answer.body == b'{"message": "Pacifica Cartd Interface Up and Running"}'
    assert answer.json() == {'message': UP_MESSAGE}
    assert answer.headers['content-length'] == '54'
    assert answer.headers['content-type'] == 'application/json'
    assert answer.headers['allow'] == 'DELETE, GET, HEAD, POST'
    assert stub.calls == []


def test_other_methods_are_not_allowed(client: Client, stub: StubService) -> None:
    answer = client.request('PUT', '/u1', body=b'{}', headers={'Content-Type': 'application/json',
                                                              'Content-Length': '2'})
    assert_error_page(answer, 405, 'Specified method is invalid for this resource')
    assert stub.calls == []


# ---- HEAD -----------------------------------------------------------------------------

@pytest.mark.parametrize('status', ['staging', 'ready'])
def test_head_of_a_live_cart_is_204_with_both_headers(client: Client, stub: StubService, status: str) -> None:
    stub.answers['status'] = CartState(status, '')
    answer = client.request('HEAD', '/u1')
    assert answer.code == 204
    assert answer.headers['x-pacifica-status'] == status
    assert answer.headers['x-pacifica-message'] == ''
    assert answer.body == b''
    assert stub.calls == [('status', ('u1',))]


def test_head_of_a_failed_cart_is_500_with_its_message_made_header_safe(client: Client, stub: StubService) -> None:
    stub.answers['status'] = CartState('error', 'Failed to pull file(first line\nsecond line \u2603 caf\xe9)')
    answer = client.request('HEAD', '/u1')
    assert answer.code == 500
    assert answer.headers['x-pacifica-status'] == 'error'
    # one line, Latin-1 kept, anything else escaped
    assert answer.headers['x-pacifica-message'] == 'Failed to pull file(first line second line \\u2603 caf\xe9)'
    assert answer.body == b''
    for name, value in answer.header_list:
        value.encode('latin-1')
        assert '\n' not in value and '\r' not in value, name


def test_head_of_an_unknown_cart_is_404_with_status_error(client: Client, stub: StubService) -> None:
    stub.answers['status'] = CartNotFound('No cart with uid nope found')
    answer = client.request('HEAD', '/nope')
    assert answer.code == 404
    assert answer.headers['x-pacifica-status'] == 'error'
    assert answer.headers['x-pacifica-message'] == 'No cart with uid nope found'
    assert answer.body == b''
    assert stub.calls == [('status', ('nope',))]


def test_head_of_an_unexpected_failure_is_500_with_the_generic_message(client: Client, stub: StubService) -> None:
    stub.answers['status'] = RuntimeError('database said something private')
    answer = client.request('HEAD', '/u1')
    assert answer.code == 500
    assert answer.headers['x-pacifica-status'] == 'error'
    assert answer.headers['x-pacifica-message'] == UNEXPECTED_MESSAGE


# ---- POST -----------------------------------------------------------------------------

def post(client: Client, body: bytes, content_type: str = 'application/json', uid: str = 'u1',
         length: Optional[str] = None) -> Answer:
    headers = {'Content-Type': content_type, 'Content-Length': str(len(body)) if length is None else length}
    return client.request('POST', f'/{uid}', body=body, headers=headers)


CART_BODY = {'fileids': [{'id': 'f1', 'path': 'a/b.txt', 'hashtype': 'md5', 'hashsum': 'x' * 32}],
             'bundle': True}


@pytest.mark.parametrize('content_type', ['application/json', 'application/json; charset=utf-8',
                                          'text/javascript'])
def test_post_hands_the_parsed_body_to_create_cart(client: Client, stub: StubService, content_type: str) -> None:
    stub.answers['create_cart'] = 17
    answer = post(client, json.dumps(CART_BODY).encode('utf-8'), content_type)
    assert answer.code == 201
    assert answer.json() == {'message': 'Cart Processing has begun'}
    assert answer.headers['content-type'] == 'application/json'
    assert stub.calls == [('create_cart', ('u1', CART_BODY))]


def test_post_of_a_body_exactly_at_the_limit_is_taken(client: Client, stub: StubService) -> None:
    text = json.dumps({'fileids': []})
    body = (text + ' ' * (MAX_REQUEST - len(text))).encode('utf-8')
    assert len(body) == MAX_REQUEST
    answer = post(client, body)
    assert answer.code == 201
    assert stub.calls == [('create_cart', ('u1', {'fileids': []}))]


def test_post_with_another_content_type_is_415(client: Client, stub: StubService) -> None:
    answer = post(client, json.dumps(CART_BODY).encode('utf-8'), 'text/plain')
    assert_error_page(answer, 415, 'Expected an entity of content type application/json, text/javascript')
    assert stub.calls == []


@pytest.mark.parametrize('body', [b'{"fileids": [', b'not json at all', b'\xff\xfe{}'])
def test_post_of_invalid_json_is_400(client: Client, stub: StubService, body: bytes) -> None:
    answer = post(client, body)
    assert answer.code == 400
    assert answer.json()['message'].startswith('Invalid JSON document')
    assert answer.json()['traceback'] == ''
    assert stub.calls == []


class CountingInput(io.BytesIO):
    """A request body that counts the bytes the application read from it."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.taken = 0

    def read(self, size: Optional[int] = -1) -> bytes:
        data = super().read(size)
        self.taken += len(data)
        return data

    def readline(self, size: Optional[int] = -1) -> bytes:
        data = super().readline(size)
        self.taken += len(data)
        return data


def test_post_declaring_more_than_max_request_size_is_413_unread(client: Client, stub: StubService) -> None:
    body = json.dumps({'fileids': [], 'pad': 'x' * MAX_REQUEST}).encode('utf-8')
    reader = CountingInput(body)
    answer = client.request('POST', '/u1', headers={'Content-Type': 'application/json',
                                                     'Content-Length': str(len(body))},
                            extra_environ={'wsgi.input': reader})
    assert_error_page(answer, 413, f'the request body is larger than {MAX_REQUEST} bytes')
    assert stub.calls == []
    assert reader.taken == 0


def test_post_with_content_length_minus_one_is_400(client: Client, stub: StubService) -> None:
    answer = post(client, b'{"fileids": []}', length='-1')
    assert_error_page(answer, 400, "the Content-Length header is not a number of bytes: '-1'")
    assert stub.calls == []


def test_post_with_a_superscript_content_length_is_400(client: Client, stub: StubService) -> None:
    answer = post(client, b'{"fileids": []}', length='\xb2')
    assert_error_page(answer, 400, "the Content-Length header is not a number of bytes: '\xb2'")
    assert stub.calls == []


def test_post_of_a_bad_cart_is_the_services_400(client: Client, stub: StubService) -> None:
    stub.answers['create_cart'] = BadRequest('fileids must be a list')
    answer = post(client, b'{"fileids": 3}')
    assert_error_page(answer, 400, 'fileids must be a list')
    assert stub.calls == [('create_cart', ('u1', {'fileids': 3}))]


def test_post_without_a_uid_is_404(client: Client, stub: StubService) -> None:
    answer = client.request('POST', '/', body=b'{}', headers={'Content-Type': 'application/json',
                                                             'Content-Length': '2'})
    assert_error_page(answer, 404, 'Missing parameters: uid')
    assert stub.calls == []


# ---- DELETE ---------------------------------------------------------------------------

def test_delete_is_200_with_its_message(client: Client, stub: StubService) -> None:
    stub.answers['delete'] = 2
    answer = client.request('DELETE', '/u1')
    assert answer.code == 200
    assert answer.json() == {'message': 'Cart Deleted Successfully'}
    assert stub.calls == [('delete', ('u1',))]


# ---- the error translator -------------------------------------------------------------

@pytest.mark.parametrize('error, code', [
    (CartNotFound('Not Found'), 404),
    (BadRequest('the cart uid may not contain /'), 400),
    (PayloadTooLarge('too big'), 413),
    (RangeNotSatisfiable('range starts at 99'), 416),
])
@pytest.mark.parametrize('method', ['GET', 'DELETE'])
def test_cart_errors_carry_their_status_and_message(client: Client, stub: StubService, method: str,
                                                    error: Exception, code: int) -> None:
    stub.answers['download' if method == 'GET' else 'delete'] = error
    answer = client.request(method, '/u1', query='filename=x.tar' if method == 'GET' else '')
    assert_error_page(answer, code, str(error))


@pytest.mark.parametrize('method', ['GET', 'DELETE'])
def test_not_ready_is_202_with_a_plain_sentence(client: Client, stub: StubService, method: str) -> None:
    stub.answers['download' if method == 'GET' else 'delete'] = CartNotReady('The cart is not ready for download.')
    answer = client.request(method, '/u1')
    assert answer.code == 202
    assert answer.body == b'The cart is not ready for download.'


@pytest.mark.parametrize('method', ['GET', 'DELETE'])
def test_an_unexpected_error_is_500_without_details_or_traceback(client: Client, stub: StubService, method: str,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    stub.answers['download' if method == 'GET' else 'delete'] = RuntimeError('secret /srv/private detail')
    with caplog.at_level(logging.ERROR, logger='pacifica.cartd.rest'):
        answer = client.request(method, '/u1')
    assert_error_page(answer, 500, UNEXPECTED_MESSAGE)
    assert b'secret' not in answer.body and b'Traceback' not in answer.body and b'RuntimeError' not in answer.body
    # the detail goes to the log instead
    assert any(record.exc_info and 'secret /srv/private detail' in str(record.exc_info[1])
               for record in caplog.records)


def test_each_request_gives_its_database_connection_back(client: Client, stub: StubService) -> None:
    seen: List[bool] = []

    def delete(uid: str) -> int:
        seen.append(database.DB.is_closed())
        return 1

    stub.delete = delete  # type: ignore[assignment]
    assert database.DB.is_closed()
    assert client.request('DELETE', '/u1').code == 200
    assert seen == [False]  # the handler ran on an open connection
    assert database.DB.is_closed()


# ---- GET a cart's tar -----------------------------------------------------------------

def test_download_is_the_tar_with_its_headers(client: Client, stub: StubService, files: List[TarMember]) -> None:
    stub.answers['download'] = ready_cart(files)
    answer = client.request('GET', '/u1', query='filename=my_bundle.tar')
    layout = TarLayout('my_bundle', files, CREATED)
    assert answer.code == 200
    assert stub.calls == [('download', ('u1', 'my_bundle.tar', 'my_bundle'))]
    assert answer.headers['content-type'] == 'application/octet-stream'
    assert answer.headers['content-length'] == str(layout.size) == str(len(answer.body))
    assert answer.headers['etag'] == layout.etag
    assert answer.headers['accept-ranges'] == 'bytes'
    assert answer.headers['content-disposition'] == 'attachment; filename=my_bundle.tar'
    assert answer.body == whole_tar(files, 'my_bundle')
    with tarfile.open(fileobj=io.BytesIO(answer.body), mode='r:') as tar:
        assert tar.getnames() == ['my_bundle', 'my_bundle/sub', 'my_bundle/a.txt', 'my_bundle/sub/b.bin']
        for member in files:
            extracted = tar.extractfile(f'my_bundle/{member.path}')
            assert extracted is not None
            assert extracted.read() == member.source.read_bytes()


def test_the_stub_download_takes_no_sendfile() -> None:
    """The REST layer writes the body itself (transport.response_body): the use case gets names only."""
    assert list(inspect.signature(StubService.download).parameters) == ['self', 'uid', 'filename', 'top']


def test_without_a_filename_the_tar_is_named_by_the_date(client: Client, stub: StubService,
                                                         files: List[TarMember]) -> None:
    stub.answers['download'] = ready_cart(files)
    answer = client.request('GET', '/u1')
    assert answer.code == 200
    [(name, (uid, filename, top))] = stub.calls
    assert (name, uid) == ('download', 'u1')
    assert re.fullmatch(r'data_\d{4}_\d\d_\d\d_\d\d_\d\d_\d\d\.tar', filename)
    assert top == filename[:-len('.tar')]
    assert answer.headers['content-disposition'] == f'attachment; filename={filename}'
    with tarfile.open(fileobj=io.BytesIO(answer.body), mode='r:') as tar:
        assert tar.getnames()[0] == top


def test_the_filename_decides_the_top_directory(client: Client, stub: StubService, files: List[TarMember]) -> None:
    stub.answers['download'] = ready_cart(files)
    answer = client.request('GET', '/u1', query='filename=data')  # the downloader's default: no .tar
    assert stub.calls == [('download', ('u1', 'data', 'data'))]
    with tarfile.open(fileobj=io.BytesIO(answer.body), mode='r:') as tar:
        assert tar.getnames() == ['data', 'data/sub', 'data/a.txt', 'data/sub/b.bin']


@pytest.mark.parametrize('filename, disposition', [
    ('with space.tar', 'attachment; filename="with space.tar"'),
    ('donn\xe9es.tar', "attachment; filename*=UTF-8''donn%C3%A9es.tar"),
])
def test_content_disposition_quotes_or_encodes_the_name(client: Client, stub: StubService, files: List[TarMember],
                                                        filename: str, disposition: str) -> None:
    stub.answers['download'] = ready_cart(files)
    query = 'filename=' + ''.join(f'%{byte:02X}' for byte in filename.encode('utf-8'))
    answer = client.request('GET', '/u1', query=query)
    assert answer.code == 200
    assert answer.headers['content-disposition'] == disposition
    assert stub.calls == [('download', ('u1', filename, filename[:-len('.tar')]))]


def test_a_range_is_206_with_those_bytes(client: Client, stub: StubService, files: List[TarMember]) -> None:
    stub.answers['download'] = ready_cart(files)
    whole = whole_tar(files, 'x')
    answer = client.request('GET', '/u1', query='filename=x.tar', headers={'Range': 'bytes=10-19'})
    assert answer.code == 206
    assert answer.headers['content-range'] == f'bytes 10-19/{len(whole)}'
    assert answer.headers['content-length'] == '10'
    assert answer.body == whole[10:20]


def test_a_range_inside_a_file_reads_the_file(client: Client, stub: StubService, files: List[TarMember]) -> None:
    stub.answers['download'] = ready_cart(files)
    layout = TarLayout('x', files, CREATED)
    start = layout.file_offsets[1] + 3
    answer = client.request('GET', '/u1', query='filename=x.tar', headers={'Range': f'bytes={start}-{start + 599}'})
    assert answer.code == 206
    assert answer.body == files[1].source.read_bytes()[3:603]


def test_if_range_with_a_stale_etag_sends_the_whole_tar(client: Client, stub: StubService,
                                                        files: List[TarMember]) -> None:
    stub.answers['download'] = ready_cart(files)
    whole = whole_tar(files, 'x')
    answer = client.request('GET', '/u1', query='filename=x.tar',
                            headers={'Range': 'bytes=10-19', 'If-Range': '"stale"'})
    assert answer.code == 200
    assert 'content-range' not in answer.headers
    assert answer.body == whole


def test_if_range_with_the_current_etag_keeps_the_range(client: Client, stub: StubService,
                                                        files: List[TarMember]) -> None:
    stub.answers['download'] = ready_cart(files)
    layout = TarLayout('x', files, CREATED)
    answer = client.request('GET', '/u1', query='filename=x.tar',
                            headers={'Range': 'bytes=10-19', 'If-Range': layout.etag})
    assert answer.code == 206
    assert answer.body == whole_tar(files, 'x')[10:20]


def test_an_unsatisfiable_range_is_416_with_the_size(client: Client, stub: StubService,
                                                     files: List[TarMember]) -> None:
    stub.answers['download'] = ready_cart(files)
    size = TarLayout('x', files, CREATED).size
    answer = client.request('GET', '/u1', query='filename=x.tar', headers={'Range': f'bytes={size}-'})
    assert answer.code == 416
    assert answer.headers['content-range'] == f'bytes */{size}'
    assert answer.json()['traceback'] == ''


def test_a_server_sendfile_gets_the_file_ranges(client: Client, stub: StubService, files: List[TarMember],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the server offers sendfile, only the tar's headers pass through the body iterator.

    (These files are short: with transport.GATHER_BYTES at 0 none is gathered into a write.)
    """
    monkeypatch.setattr(transport, 'GATHER_BYTES', 0)
    stub.answers['download'] = ready_cart(files)
    wire: List[bytes] = []
    sent: List[Tuple[str, int, int]] = []

    def send_file(handle: Any, offset: int, count: int) -> int:
        assert len(sent) < 100, 'sendfile called over and over'
        sent.append((handle.name, offset, count))
        handle.seek(offset)
        data = handle.read(count)
        wire.append(data)
        return len(data)

    answer = client.request('GET', '/u1', query='filename=x.tar', extra_environ={SENDFILE_ENVIRON_KEY: send_file},
                            sink=wire)
    assert answer.code == 200
    assert answer.body == whole_tar(files, 'x')
    assert sent == [(str(member.source), 0, member.size) for member in files]


def test_the_filename_parameter_given_twice_is_400(client: Client, stub: StubService) -> None:
    answer = client.request('GET', '/u1', query='filename=a.tar&filename=b.tar')
    assert_error_page(answer, 400, 'give the filename parameter once')
    assert stub.calls == []


@pytest.mark.parametrize('filename', ['a/b.tar', '..', '.tar'])
def test_a_filename_that_is_not_one_segment_is_400(client: Client, stub: StubService, filename: str) -> None:
    answer = client.request('GET', '/u1', query=f'filename={filename}')
    assert answer.code == 400
    assert stub.calls == []


@pytest.mark.parametrize('method', ['GET', 'HEAD', 'DELETE'])
def test_a_path_that_is_not_utf8_is_400(client: Client, stub: StubService, method: str) -> None:
    # a WSGI server hands `/%FFx` on as one Latin-1 character per byte (PEP 3333)
    answer = client.request(method, '/\xffx')
    assert answer.code == 400
    if method == 'HEAD':
        assert answer.headers['x-pacifica-status'] == 'error'
        assert answer.headers['x-pacifica-message'] == 'the URL is not valid UTF-8 once %-decoded'
    else:
        assert_error_page(answer, 400, 'the URL is not valid UTF-8 once %-decoded')
    assert stub.calls == []


def test_a_query_that_is_not_utf8_is_400(client: Client, stub: StubService) -> None:
    answer = client.request('GET', '/u1', query='filename=%FF.tar')
    assert_error_page(answer, 400, 'the URL is not valid UTF-8 once %-decoded')
    assert stub.calls == []


def test_a_utf8_path_reaches_the_service_decoded(client: Client, stub: StubService) -> None:
    stub.answers['status'] = CartState('staging', '')
    answer = client.request('HEAD', '/\xc3\xbfx')  # `/%C3%BFx`, PEP 3333 style
    assert answer.code == 204
    assert stub.calls == [('status', ('\xffx',))]


@pytest.mark.parametrize('method', ['GET', 'HEAD', 'DELETE'])
def test_query_parameters_named_like_arguments_do_not_collide(client: Client, stub: StubService,
                                                              files: List[TarMember], method: str) -> None:
    stub.answers.update(download=ready_cart(files), status=CartState('ready', ''), delete=1)
    answer = client.request(method, '/u1', query='uid=other&self=x&path=y&params=z&filename=a.tar')
    assert answer.code in (200, 204)
    name = {'GET': 'download', 'HEAD': 'status', 'DELETE': 'delete'}[method]
    expected = ('u1', 'a.tar', 'a') if method == 'GET' else ('u1',)
    assert stub.calls == [(name, expected)]


def test_head_with_extra_path_segments_is_400_with_both_headers(client: Client, stub: StubService) -> None:
    """HEAD answers a path that is not /<uid> with 400 (GET, POST and DELETE say 404)."""
    answer = client.request('HEAD', '/u1/extra')
    assert answer.code == 400
    assert answer.headers['x-pacifica-status'] == 'error'
    assert answer.headers['x-pacifica-message'] == 'HEAD needs a cart uid: /<uid>'
    assert stub.calls == []


@pytest.mark.parametrize('method', ['GET', 'POST', 'DELETE'])
def test_extra_path_segments_are_404(client: Client, stub: StubService, method: str) -> None:
    headers = {'Content-Type': 'application/json', 'Content-Length': '2'} if method == 'POST' else None
    answer = client.request(method, '/u1/extra', body=b'{}', headers=headers)
    assert answer.code == 404
    assert answer.json()['traceback'] == ''
    assert stub.calls == []


def test_large_bodies_are_handled_one_at_a_time(client: Client, stub: StubService,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rest, 'LARGE_BODY', 16)
    inside, release = threading.Event(), threading.Event()
    entered: List[str] = []

    def create_cart(uid: str, body: Any) -> int:
        entered.append(uid)
        if uid == 'big1':
            inside.set()
            assert release.wait(10)
        return 1

    monkeypatch.setattr(stub, 'create_cart', create_cart)
    large = json.dumps(CART_BODY).encode('utf-8')
    first = threading.Thread(target=post, args=(client, large), kwargs={'uid': 'big1'})
    second = threading.Thread(target=post, args=(client, large), kwargs={'uid': 'big2'})
    first.start()
    assert inside.wait(10)
    second.start()
    assert post(client, b'{"fileids": []}', uid='small').code == 201  # a small body does not wait
    second.join(0.3)
    assert entered == ['big1', 'small'] and second.is_alive()
    release.set()
    first.join(10)
    second.join(10)
    assert entered == ['big1', 'small', 'big2']


def _imaged(members: List[TarMember], image: str) -> Callable[[str, str, str], CartDownload]:
    """A download whose tar lies whole in `image` (a bundle cart asked for under its own name)."""
    def answer(uid: str, filename: str, top: str) -> CartDownload:
        layout = TarLayout(top, members, CREATED)
        layout.image = image
        return CartDownload(layout, filename, 1)
    return answer


def test_x_accel_redirect_hands_a_whole_tar_to_nginx(client: Client, stub: StubService, files: List[TarMember],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    tar = stub.settings.volume_path / '12' / 'my cart.tar'
    monkeypatch.setattr(stub, 'settings', dataclasses.replace(stub.settings, x_accel_redirect='/_v/'))
    stub.answers['download'] = _imaged(files, str(tar))
    answer = client.request('GET', '/u1', query='filename=x.tar', headers={'Range': 'bytes=0-9'})
    assert answer.code == 200 and answer.body == b''
    assert answer.headers['x-accel-redirect'] == '/_v/12/my%20cart.tar'
    assert answer.headers['content-disposition'] == 'attachment; filename=x.tar'
    assert 'content-range' not in answer.headers  # nginx answers the Range from the file


@pytest.mark.parametrize('prefix, image', [('', 'inside'), ('/_v/', None), ('/_v/', 'outside')])
def test_without_a_prefix_or_a_whole_tar_inside_the_volume_the_tar_is_sent_here(
        client: Client, stub: StubService, files: List[TarMember], monkeypatch: pytest.MonkeyPatch,
        prefix: str, image: Optional[str]) -> None:
    monkeypatch.setattr(stub, 'settings', dataclasses.replace(stub.settings, x_accel_redirect=prefix))
    if image is None:
        stub.answers['download'] = ready_cart(files)
    else:
        volume = stub.settings.volume_path
        whole = volume / '3' / 'u1.tar' if image == 'inside' else volume.parent / 'elsewhere' / 'u1.tar'
        whole.parent.mkdir(parents=True)
        whole.write_bytes(whole_tar(files, 'x'))
        stub.answers['download'] = _imaged(files, str(whole))
    answer = client.request('GET', '/u1', query='filename=x.tar')
    assert answer.code == 200 and 'x-accel-redirect' not in answer.headers
    assert answer.body == whole_tar(files, 'x')


@pytest.fixture
def fast_client(stub: StubService, global_config: None) -> Client:
    """The application as app.mount builds it: HeadFastLane in its WSGI pipeline."""
    application = cherrypy.Application(CartRoot(lambda: stub), '', app_config())
    application.request_class = QuietRequest
    application.wsgiapp.pipeline.append(('head_fast_lane', functools.partial(rest.HeadFastLane,
                                                                             service_factory=lambda: stub)))
    return Client(application)


def _without_date(answer: Answer) -> List[Tuple[str, str]]:
    return sorted((name.lower(), value) for name, value in answer.header_list if name.lower() != 'date')


@pytest.mark.parametrize('state', [CartState('staging', 'Re-queued 3 files\nat noon: é'), CartState('ready', '')])
def test_the_fast_lane_answers_a_live_cart_exactly_as_cherrypy(client: Client, fast_client: Client,
                                                              stub: StubService, state: CartState) -> None:
    stub.answers['status'] = state
    fast = fast_client.request('HEAD', '/u1', query='x=1')
    assert stub.calls == [('status', ('u1',))]
    slow = client.request('HEAD', '/u1', query='x=1')
    assert fast.code == slow.code == 204 and fast.body == slow.body == b''
    assert _without_date(fast) == _without_date(slow)
    assert email.utils.parsedate_to_datetime(fast.headers['date']) is not None


@pytest.mark.parametrize('path, query, answer', [
    ('/u1/extra', '', None), ('/a%2Fb', '', None), ('/%FFx', '', None), ('/u1', 'filename=%FF', None),
    ('/', '', None), ('/u1', '', CartState('error', 'it failed')), ('/u1', '', CartNotFound('No cart'))])
def test_the_fast_lane_leaves_everything_else_to_cherrypy(fast_client: Client, client: Client, stub: StubService,
                                                          path: str, query: str, answer: Any) -> None:
    stub.answers['status'] = answer if answer is not None else CartState('ready', '')
    fast = fast_client.request('HEAD', path, query=query)
    stub.calls.clear()
    slow = client.request('HEAD', path, query=query)
    assert fast.code == slow.code and _without_date(fast) == _without_date(slow)


def test_the_fast_lane_takes_no_other_method(fast_client: Client, stub: StubService) -> None:
    stub.answers['delete'] = 1
    assert fast_client.request('DELETE', '/u1').code == 200 and stub.calls == [('delete', ('u1',))]
