"""The same API served by a real uWSGI (`--module pacifica.cartd.wsgi`) instead of `pacifica-cartd`."""
from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import signal
import subprocess
import time
import uuid
from typing import Dict, Iterator, List, Sequence, Tuple

import pytest
import requests

from cartd_testkit.databases import drop_database, fresh_database
from cartd_testkit.procs import ManagedProcess, free_port
from cartd_testkit.rawhttp import exchange, parse_answer
from cartd_testkit.stack import CartStack, binary, tar_contents, write_config
from cartd_testkit.uwsgi import BIND_VARIABLE, SHIPPED_INI, shipped_ini_command, start_uwsgi, uwsgi_command

pytestmark = [pytest.mark.integration]

STOP_DEADLINE_S = 15.0
@pytest.fixture(scope='module')
def cart(archive, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CartStack]:
    """A CartStack on SQLite whose HTTP side is uWSGI with the shipped uwsgi.ini: dbsync, one celery worker, uWSGI."""
    base = tmp_path_factory.mktemp('uwsgi-stack')
    url = fresh_database('sqlite', base)
    stack = CartStack(base, archive, url, workers=1, concurrency=2,
                      overrides={'cartd': {'max_request_size': '8 Mb'}})  # its 413 tests send 9 MB
    try:
        stack.dbsync()
        stack.start_worker()
        stack.port = free_port()
        stack.server = start_uwsgi(base, stack.env, stack.port, shipped=True)  # stack.stop() and stack.logs() see it
        stack.wait_workers_ready()
        yield stack
    finally:
        stack.stop()
        drop_database('sqlite', url)


def _uid() -> str:
    return f'uwsgi-{uuid.uuid4().hex[:12]}'


def _fill(stack: CartStack, uid: str, sizes: Sequence[int]) -> Tuple[List[dict], Dict[str, bytes]]:
    fileids, expected = [], {}
    for index, size in enumerate(sizes):
        archive_id = f'{uid}-{index}'
        data = os.urandom(size)
        sums = stack.archive.put(archive_id, data, mtime=1600000000 + index)
        path = f'd{index % 2}/file{index}.bin'
        fileids.append({'id': archive_id, 'path': path, 'hashtype': 'sha1', 'hashsum': sums['sha1']})
        expected[path] = data
    return fileids, expected


@pytest.fixture(scope='module')
def ready_cart(cart: CartStack) -> Tuple[str, Dict[str, bytes]]:
    """A ready cart made through uWSGI: a few small files and one of several transfer_size chunks."""
    uid = _uid()
    fileids, expected = _fill(cart, uid, [10, 70000, 3 * 1024 * 1024 + 17, 0])
    created = cart.post(uid, fileids)
    assert created.status_code == 201, created.text
    assert created.json() == {'message': 'Cart Processing has begun'}
    final = cart.wait_final(uid, deadline_s=60)
    assert (final.status_code, final.headers['X-Pacifica-Status']) == (204, 'ready'), cart.logs()
    return uid, expected


def test_root(cart: CartStack) -> None:
    answer = requests.get(cart.url + '/', timeout=10)
    assert answer.status_code == 200
    assert answer.json() == {'message': 'Pacifica Cartd Interface Up and Running'}
    assert answer.headers['Content-Type'] == 'application/json'
    assert answer.headers['Allow'] == 'DELETE, GET, HEAD, POST'


def test_head_while_staging_and_ready(cart: CartStack, ready_cart: Tuple[str, Dict[str, bytes]]) -> None:
    uid, _ = ready_cart
    answer = cart.head(uid)
    assert answer.status_code == 204
    assert answer.headers['X-Pacifica-Status'] == 'ready'
    assert answer.headers['X-Pacifica-Message'] == ''
    # a fresh cart is staging (or already ready) and always carries both headers
    other = _uid()
    fileids, _ = _fill(cart, other, [100])
    assert cart.post(other, fileids).status_code == 201
    first = cart.head(other)
    assert first.status_code == 204 and first.headers['X-Pacifica-Status'] in ('staging', 'ready')
    assert 'X-Pacifica-Message' in first.headers
    assert cart.wait_final(other, deadline_s=60).headers['X-Pacifica-Status'] == 'ready'


def test_download_whole_tar_every_byte(cart: CartStack, ready_cart: Tuple[str, Dict[str, bytes]]) -> None:
    uid, expected = ready_cart
    answer = cart.download(uid, 'bundle.tar')
    assert answer.status_code == 200, answer.text[:300]
    assert answer.headers['Content-Type'] == 'application/octet-stream'
    assert answer.headers['Content-Disposition'] == 'attachment; filename=bundle.tar'
    assert answer.headers['Accept-Ranges'] == 'bytes'
    assert answer.headers['ETag']
    # the app's exact Content-Length goes through uWSGI; no chunked encoding on top of it
    assert int(answer.headers['Content-Length']) == len(answer.content)
    assert 'Transfer-Encoding' not in answer.headers
    assert tar_contents(answer.content) == {f'bundle/{path}': data for path, data in expected.items()}


def test_streamed_download_in_pieces(cart: CartStack, ready_cart: Tuple[str, Dict[str, bytes]]) -> None:
    uid, expected = ready_cart
    with requests.get(f'{cart.url}/{uid}', params={'filename': 's.tar'}, stream=True, timeout=60) as answer:
        assert answer.status_code == 200
        length = int(answer.headers['Content-Length'])
        pieces = list(answer.iter_content(65536))
    body = b''.join(pieces)
    assert len(body) == length and len(pieces) > 1
    assert tar_contents(body) == {f's/{path}': data for path, data in expected.items()}


def test_range_requests(cart: CartStack, ready_cart: Tuple[str, Dict[str, bytes]]) -> None:
    uid, _ = ready_cart
    full = cart.download(uid, 'r.tar')
    size = len(full.content)
    assert size > 3 * 1024 * 1024
    middle = cart.download(uid, 'r.tar', Range='bytes=1000-2999')
    assert middle.status_code == 206
    assert middle.headers['Content-Range'] == f'bytes 1000-2999/{size}'
    assert int(middle.headers['Content-Length']) == 2000
    assert middle.content == full.content[1000:3000]
    tail = cart.download(uid, 'r.tar', Range='bytes=1048000-', **{'If-Range': full.headers['ETag']})
    assert tail.status_code == 206
    assert tail.headers['Content-Range'] == f'bytes 1048000-{size - 1}/{size}'
    assert full.content[:1048000] + tail.content == full.content
    stale = cart.download(uid, 'r.tar', Range='bytes=10-', **{'If-Range': '"not-the-etag"'})
    assert stale.status_code == 200 and stale.content == full.content
    past = cart.download(uid, 'r.tar', Range=f'bytes={size}-')
    assert past.status_code == 416


def test_parallel_downloads_across_workers(cart: CartStack, ready_cart: Tuple[str, Dict[str, bytes]]) -> None:
    uid, _ = ready_cart
    reference = cart.download(uid, 'p.tar').content
    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        bodies = list(pool.map(lambda _: cart.download(uid, 'p.tar').content, range(6)))
    assert all(body == reference for body in bodies)


def test_unknown_cart(cart: CartStack) -> None:
    uid = _uid()
    answer = cart.head(uid)
    assert answer.status_code == 404
    assert answer.headers['X-Pacifica-Status'] == 'error'
    assert answer.headers['X-Pacifica-Message'] == f'No cart with uid {uid} found'
    gone = cart.download(uid)
    assert gone.status_code == 404
    assert gone.json()['message'] == 'The cart does not exist or has already been deleted'


def test_bad_json_is_a_json_400(cart: CartStack) -> None:
    uid = _uid()
    answer = requests.post(f'{cart.url}/{uid}', data=b'{"fileids": [', timeout=10,
                           headers={'Content-Type': 'application/json'})
    assert answer.status_code == 400
    assert answer.headers['Content-Type'] == 'application/json'
    page = answer.json()
    assert set(page) == {'status', 'message', 'traceback', 'version'}
    assert page['status'] == '400 Bad Request' and page['traceback'] == ''
    assert 'Invalid JSON document' in page['message']
    assert cart.head(uid).status_code == 404


def test_body_over_max_request_size_is_413(cart: CartStack) -> None:
    body = json.dumps({'fileids': [], 'padding': 'x' * (9 * 1024 * 1024)})
    answer = requests.post(f'{cart.url}/{_uid()}', data=body, headers={'Content-Type': 'application/json'},
                           timeout=60)
    assert answer.status_code == 413


def test_hostile_requests_get_json_errors(cart: CartStack) -> None:
    """A few rows of test_bad_input.py under uWSGI, which parses the request itself."""
    huge = (b'POST /%s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 200000000\r\n\r\n'
            % _uid().encode() + b' ' * 4096)
    answer = parse_answer(*exchange(cart.port, huge))
    assert (answer.status, answer.closed) == (413, True)
    assert json.loads(answer.body)['message'] == 'the request body is larger than 8388608 bytes'
    not_utf8 = (b'POST /%FFx HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 14\r\n\r\n'
                b'{"fileids":[]}')
    answer = parse_answer(*exchange(cart.port, not_utf8))
    assert answer.status == 400
    assert json.loads(answer.body)['message'] == 'the URL is not valid UTF-8 once %-decoded'


def test_unparsable_request_line_sends_no_traceback(cart: CartStack) -> None:
    """uWSGI hands CherryPy the protocol `b HTTP/1.1`; CherryPy's bare 500 must not carry its traceback."""
    received, _ = exchange(cart.port, b'GET /a b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
    assert b' 500 ' in received.split(b'\r\n', 1)[0], received[:300]
    assert b'Traceback' not in received and b'File "' not in received, received


def test_delete(cart: CartStack) -> None:
    uid = _uid()
    fileids, _ = _fill(cart, uid, [500, 600])
    assert cart.post(uid, fileids).status_code == 201
    assert cart.wait_final(uid, deadline_s=60).headers['X-Pacifica-Status'] == 'ready'
    deleted = cart.delete(uid)
    assert (deleted.status_code, deleted.json()) == (200, {'message': 'Cart Deleted Successfully'})
    assert cart.head(uid).status_code == 404
    assert cart.delete(uid).status_code == 404


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT], ids=['SIGTERM', 'SIGINT'])
def test_uwsgi_stops_on_signal(cart: CartStack, signum: signal.Signals) -> None:
    """A second uWSGI on the same config: the signal to its master ends master and workers."""
    port = free_port()
    proc = start_uwsgi(cart.base_dir, cart.env, port, name=f'uwsgi-{signum.name}', shipped=True)
    try:
        assert requests.get(f'http://127.0.0.1:{port}/', timeout=10).status_code == 200
        os.kill(proc.pid, signum)
        assert proc.proc is not None
        try:
            code = proc.proc.wait(timeout=STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f'uwsgi still running {STOP_DEADLINE_S} s after {signum.name}:\n{proc.log_tail()}')
        assert code == 0, proc.log_tail()
        assert 'goodbye to uWSGI.' in proc.log_tail(20)
        with pytest.raises(requests.ConnectionError):
            requests.get(f'http://127.0.0.1:{port}/', timeout=5)
    finally:
        proc.stop()


def test_uwsgi_with_a_bad_config_exits(tmp_path: pathlib.Path, cart: CartStack) -> None:
    """With --need-app a config the cart refuses makes uWSGI exit instead of serving errors."""
    config = write_config(tmp_path / 'bad.cfg', {
        'cartd': {'volume_path': str(tmp_path / 'volume'), 'transfer_size': '4 parsecs'},
        'database': {'peewee_url': f'sqliteext:///{tmp_path}/db.sqlite3'},
    })
    env = dict(cart.env, CARTD_CONFIG=str(config))
    port = free_port()
    proc = ManagedProcess(uwsgi_command(port), tmp_path / 'uwsgi-bad.log', env=env, cwd=tmp_path,
                          name='uwsgi-bad').start()
    try:
        assert proc.proc is not None
        try:
            code = proc.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f'uwsgi kept running with a bad config:\n{proc.log_tail()}')
        assert code != 0
        log = proc.log_path.read_text(encoding='utf-8', errors='replace')
        assert '[cartd] transfer_size' in log
    finally:
        proc.stop()


def _keep_alive_conversation(url: str, stack: CartStack, closes: bool) -> None:
    """POST, HEAD until ready, GET and DELETE three times over one requests.Session."""
    fileids, expected = _fill(stack, 'keepalive', [3000])
    uid = _uid()
    with requests.Session() as session:
        for _ in range(3):
            answer = session.post(f'{url}/{uid}', json={'fileids': fileids}, timeout=30)
            assert answer.status_code == 201
            if closes:
                assert answer.headers.get('Connection', '').lower() == 'close'
            deadline = time.monotonic() + 60
            while session.head(f'{url}/{uid}', timeout=30).headers['X-Pacifica-Status'] == 'staging':
                assert time.monotonic() < deadline
                time.sleep(0.1)
            body = session.get(f'{url}/{uid}', params={'filename': 'k.tar'}, timeout=30)
            assert tar_contents(body.content) == {f'k/{path}': data for path, data in expected.items()}
            assert session.delete(f'{url}/{uid}', timeout=30).status_code == 200


def test_a_keep_alive_client_is_never_reset(cart: CartStack) -> None:
    """uWSGI's --http-socket (the seed's line) does not keep connections alive: the answers must say
    `Connection: close`, so a client with a session (pacifica-downloader, requests.Session) opens a new
    one instead of sending into a connection uWSGI has closed."""
    port = free_port()
    proc = start_uwsgi(cart.base_dir, cart.env, port, name='uwsgi-http-socket')
    try:
        _keep_alive_conversation(f'http://127.0.0.1:{port}', cart, closes=True)
    finally:
        proc.stop()


def test_a_keep_alive_client_of_the_shipped_ini_is_never_reset(cart: CartStack) -> None:
    """The shipped ini's --http11-socket keeps connections alive."""
    _keep_alive_conversation(cart.url, cart, closes=False)


# ---- the shipped uwsgi.ini --------------------------------------------------------------

def _get_option(name: str, env: Dict[str, str]) -> str:
    result = subprocess.run(shipped_ini_command('--strict', '--get', name), env=env, capture_output=True,
                            text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip()


def test_the_shipped_ini_binds_where_the_variable_says_and_127_0_0_1_8081_without_it() -> None:
    """Every key of uwsgi.ini is an option uWSGI knows (--strict), and its address comes from CARTD_UWSGI_BIND."""
    env = {key: value for key, value in os.environ.items() if key != BIND_VARIABLE}
    assert _get_option('http11-socket', env) == '127.0.0.1:8081'
    assert _get_option('http11-socket', dict(env, **{BIND_VARIABLE: ':9999'})) == ':9999'
    assert _get_option('module', env) == 'pacifica.cartd.wsgi'


def test_the_stack_runs_the_shipped_ini_on_the_port_it_was_given(cart: CartStack) -> None:
    """What the tests start is the documented `uwsgi --ini uwsgi.ini`, listening on CARTD_UWSGI_BIND."""
    assert cart.server is not None
    assert cart.server.cmd[:3] == [binary('uwsgi'), '--ini', str(SHIPPED_INI)]
    assert cart.server.env is not None and cart.server.env[BIND_VARIABLE] == f'127.0.0.1:{cart.port}'
    assert requests.get(f'http://127.0.0.1:{cart.port}/', timeout=10).status_code == 200


@pytest.mark.parametrize('request_head', [
    b'HEAD /nothing-here HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n',
    b'HEAD /nothing-here HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n',
    b'POST /bad-json HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx',
], ids=['connection-close', 'http-1.0', 'post-connection-close'])
def test_the_shipped_ini_closes_a_connection_the_client_asked_to_close(cart: CartStack, request_head: bytes) -> None:
    """uWSGI's --http11-socket ignores `Connection: close`; the adapter makes it close (as cheroot does)
    at once, not after the 60 s socket-timeout that a client reading to end of stream would wait."""
    started = time.monotonic()
    received, closed = exchange(cart.port, request_head, deadline_s=10)
    assert closed and time.monotonic() - started < 5, received[:300]
    assert b'\r\nConnection: close\r\n' in received, received[:300]


def test_the_shipped_ini_keeps_a_keep_alive_connection_open(cart: CartStack) -> None:
    request_head = b'HEAD /nothing-here HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n'
    received, closed = exchange(cart.port, request_head, deadline_s=2)
    assert not closed and received.startswith(b'HTTP/1.1 404'), received[:300]
