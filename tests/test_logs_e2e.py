"""Logs an operator can search, through the real server (pacifica-cartd on three databases, uWSGI) and worker:
with `log_format = json` every line our code or Celery writes is one JSON object, and each line about a cart
or a file carries its uid and path; in the default plain format they end with `[cart=<uid> file=<path>]`."""
from __future__ import annotations

import hashlib
import json
import re
import uuid
from typing import Any, Dict, Iterator, List, Tuple

import pytest

from cartd_testkit.stack import CartStack

pytestmark = [pytest.mark.integration]

STACK_OVERRIDES = {'cartd': {'log_format': 'json'}}
# Plain lines: Celery's "[2026-12-01 19:43:16,610: INFO/MainProcess] ..." and ours "2026-12-01 19:43:16,087 INFO ...".
PLAIN_LOG_LINE = re.compile(r'^(\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+: [A-Z]+/|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ )')


@pytest.fixture(scope='module')
def stack(served_stack: CartStack) -> CartStack:
    """Under pacifica-cartd on each database and under uWSGI (conftest.served_stack), logging JSON."""
    return served_stack


def _two_carts(stack: CartStack) -> Tuple[str, str]:
    """A cart that fails (one file's hash is wrong) and one that becomes ready; their uids."""
    failing, ready = f'logs-bad-{uuid.uuid4().hex[:8]}', f'logs-ok-{uuid.uuid4().hex[:8]}'
    good = b'good bytes ' * 100
    stack.archive.put(f'{failing}-good', good)
    stack.archive.put(f'{failing}-bad', b'other bytes')
    stack.archive.put(f'{ready}-good', good)
    sha1 = hashlib.sha1(good).hexdigest()
    assert stack.post(failing, [{'id': f'{failing}-good', 'path': 'd/good.bin', 'hashtype': 'sha1', 'hashsum': sha1},
                                {'id': f'{failing}-bad', 'path': 'd/bad.bin', 'hashtype': 'sha1',
                                 'hashsum': sha1}]).status_code == 201
    assert stack.post(ready, [{'id': f'{ready}-good', 'path': 'd/good.bin', 'hashtype': 'sha1',
                               'hashsum': sha1}]).status_code == 201
    assert stack.wait_final(failing).headers['X-Pacifica-Status'] == 'error'
    assert stack.wait_final(ready).headers['X-Pacifica-Status'] == 'ready'
    assert stack.download(ready, 'x.tar').status_code == 200
    return failing, ready


def _json_lines(text: str) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith('{')]


def _log(process: Any) -> str:
    return process.log_path.read_text(encoding='utf-8', errors='replace')


@pytest.fixture(scope='module')
def carts(stack: CartStack) -> Iterator[Tuple[str, str]]:
    yield _two_carts(stack)


def test_worker_lines_are_json_and_name_their_cart_and_file(stack: CartStack, carts: Tuple[str, str]) -> None:
    failing, ready = carts
    text = '\n'.join(_log(worker) for worker in stack.workers)
    assert [line for line in text.splitlines() if PLAIN_LOG_LINE.match(line)] == []
    lines = _json_lines(text)
    assert any(line['message'].endswith(' ready.') for line in lines), text[-2000:]  # Celery's own, as JSON
    for line in lines:
        for uid in carts:
            if re.search(rf'\bcart {re.escape(uid)}\b', line['message']):
                assert line.get('cart_uid') == uid and isinstance(line.get('cart_id'), int), line
    mismatch = [line for line in lines if 'hash mismatch' in line['message']]
    assert mismatch and all((line['cart_uid'], line['file_path'], line['archive_id']) == (
        failing, 'd/bad.bin', f'{failing}-bad') for line in mismatch), mismatch
    assert all(line['level'] == 'INFO' and line['logger'] == 'pacifica.cartd.staging' for line in mismatch)
    tasks = [line for line in lines if re.match(r'Task pacifica\.cartd\.tasks\.stage_files\[[-0-9a-f]+\] succeeded',
                                                line['message'])]
    assert {line.get('cart_uid') for line in tasks} >= {failing, ready}, tasks  # Celery's lines carry them too
    assert all(line['message'].startswith(f'Task pacifica.cartd.tasks.stage_files[{line["task_id"]}]')
               for line in tasks), tasks


def test_server_lines_are_json_and_name_their_cart(stack: CartStack, carts: Tuple[str, str]) -> None:
    failing, ready = carts
    assert stack.server is not None
    text = _log(stack.server)
    assert [line for line in text.splitlines() if PLAIN_LOG_LINE.match(line)] == []
    lines = _json_lines(text)
    created = {line['cart_uid']: line for line in lines if re.match(r'cart \S+ \(id \d+\): \d+ files', line['message'])}
    assert set(created) >= {failing, ready}, lines[-20:]
    assert re.match(rf'cart {re.escape(failing)} \(id \d+\): 2 files', created[failing]['message']), created
    assert created[failing]['logger'] == 'pacifica.cartd.carts'
    if stack.server_kind == 'cartd':  # CherryPy's access lines (uWSGI writes its own request lines)
        posts = [line for line in lines if f'"POST /{ready} HTTP/1.1" 201' in line['message']]
        assert len(posts) == 1 and posts[0]['logger'].startswith('cherrypy.access'), lines[-20:]


@pytest.fixture(scope='module')
def plain_carts(sqlite_stack: CartStack) -> Tuple[str, str]:
    return _two_carts(sqlite_stack)


def test_plain_lines_end_with_the_cart_and_file(sqlite_stack: CartStack, plain_carts: Tuple[str, str]) -> None:
    failing, ready = plain_carts
    worker_text = '\n'.join(_log(worker) for worker in sqlite_stack.workers)
    mismatch = [line for line in worker_text.splitlines() if 'hash mismatch' in line]
    assert mismatch and all(line.endswith(f'[cart={failing} file=d/bad.bin]') for line in mismatch), mismatch
    done = [line for line in worker_text.splitlines() if re.search(r'stage_files\[.*\] succeeded', line)]
    assert any(line.endswith(f'[cart={ready}]') for line in done), done
    assert sqlite_stack.server is not None
    created = [line for line in _log(sqlite_stack.server).splitlines() if f'cart {ready} (id ' in line]
    assert created and created[0].endswith(f'[cart={ready}]'), created
