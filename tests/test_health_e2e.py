"""GET /-/healthy and GET /-/ready through the real server, worker, broker and archive, under
pacifica-cartd (three databases) and uWSGI: what a load balancer polling every second sees."""
from __future__ import annotations

import datetime
import hashlib
import time
import uuid
from typing import Any, Callable, Dict, TypeVar

import pytest
import requests

from cartd_testkit.stack import CartStack
from pacifica.cartd.schema import SCHEMA_VERSION

pytestmark = [pytest.mark.integration]

HEALTH_JSON = 'application/health+json'
READY_CHECKS = {'database:connection', 'database:schema', 'workers:seen', 'volume:writable', 'volume:free',
                'broker:connection', 'archive:connection'}
# Workers check in every second here, so one that is killed counts as gone after three seconds.
STACK_OVERRIDES = {'cartd': {'worker_heartbeat': '1'}}
WAIT_S = 60
T = TypeVar('T')


@pytest.fixture(scope='module')
def stack(served_stack: CartStack) -> CartStack:
    """Under pacifica-cartd on each database and under uWSGI (conftest.served_stack)."""
    return served_stack


def test_healthy_answers_pass(stack: CartStack) -> None:
    answer = requests.get(f'{stack.url}/-/healthy', timeout=30)
    assert (answer.status_code, answer.headers['Content-Type'], answer.json()) == (200, HEALTH_JSON,
                                                                                    {'status': 'pass'})
    assert answer.headers['Cache-Control'] == 'no-store'
    head = requests.head(f'{stack.url}/-/healthy', timeout=30)
    assert (head.status_code, head.content, head.headers['Content-Length']) == (200, b'', str(len(answer.content)))


def test_ready_passes_with_every_check_on_a_working_stack(stack: CartStack) -> None:
    answer = requests.get(f'{stack.url}/-/ready', timeout=30)
    assert (answer.status_code, answer.headers['Content-Type']) == (200, HEALTH_JSON), answer.text
    document = answer.json()
    assert document['status'] == 'pass', document
    assert set(document['checks']) == READY_CHECKS
    assert all(entry[0]['status'] == 'pass' for entry in document['checks'].values()), document
    assert document['checks']['database:schema'][0]['observedValue'] == '.'.join(map(str, SCHEMA_VERSION))
    assert document['checks']['workers:seen'][0]['observedValue'] == 1  # the stack's one worker
    free = document['checks']['volume:free'][0]
    assert free['observedUnit'] == 'bytes' and free['observedValue'] > 0


def test_ready_is_cheap_enough_to_poll_every_second(stack: CartStack) -> None:
    """Twenty polls in a row each answer well under the poll interval (the broker and archive checks are remembered)."""
    took = []
    for _ in range(20):
        started = time.perf_counter()
        assert requests.get(f'{stack.url}/-/ready', timeout=30).status_code == 200
        took.append(time.perf_counter() - started)
    assert max(took) < 1.0, took  # a loose bound on a shared machine: the point is "not seconds"


def test_no_cart_uid_is_shadowed(stack: CartStack) -> None:
    """A cart may be called '-' (or 'ready'): its own paths still reach it."""
    for uid in ('-', 'ready', 'healthy'):
        body = b'bytes of ' + uid.encode()
        archive_id = f'ops-{uid}-{uuid.uuid4().hex[:6]}'
        stack.archive.put(archive_id, body)
        fileids = [{'id': archive_id, 'path': 'f.bin', 'hashtype': 'sha1', 'hashsum': hashlib.sha1(body).hexdigest()}]
        assert stack.post(uid, fileids).status_code == 201
        for _ in range(300):
            if stack.head(uid).headers.get('X-Pacifica-Status') != 'staging':
                break
            time.sleep(0.1)
        assert stack.head(uid).status_code == 204
        assert stack.download(uid, 'f.tar').status_code == 200
        assert requests.get(f'{stack.url}/{uid}/status', timeout=30).json()['uid'] == uid
        assert stack.delete(uid).status_code == 200


@pytest.mark.parametrize('method', ['POST', 'DELETE', 'PUT'])
def test_other_methods_are_refused(stack: CartStack, method: str) -> None:
    for path in ('/-/healthy', '/-/ready'):
        answer = requests.request(method, f'{stack.url}{path}', timeout=30)
        assert (answer.status_code, answer.headers['Allow']) == (405, 'GET, HEAD'), answer.text
        assert answer.json()['message'] == 'Specified method is invalid for this resource'


def _workers_check(stack: CartStack) -> Dict[str, Any]:
    answer = requests.get(f'{stack.url}/-/ready', timeout=30)
    assert answer.status_code == 200, answer.text  # no worker warns; it does not fail
    return dict(answer.json()['checks']['workers:seen'][0], overall=answer.json()['status'])


def _poll(read: Callable[[], T], accept: Callable[[T], bool], what: str, stack: CartStack) -> T:
    """What `read` gives once `accept` takes it (under uWSGI each process remembers its own reading of the
    workers for a while, so two requests in a row may disagree)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        value = read()
        if accept(value):
            return value
        assert time.monotonic() < deadline, f'{what} not seen within {WAIT_S} s: {value}\n{stack.logs()}'
        time.sleep(0.5)


def _wait_for_check(stack: CartStack, status: str, what: str) -> Dict[str, Any]:
    return _poll(lambda: _workers_check(stack), lambda check: check['status'] == status, what, stack)


def test_no_worker_warns_on_ready_and_a_waiting_cart_says_so(stack: CartStack) -> None:
    """Last in the module: it kills the stack's worker, then starts and stops others."""
    for worker in stack.workers:
        worker.kill9()  # a crash: no goodbye, its record grows old
    check = _wait_for_check(stack, 'warn', '/-/ready warning of no worker')
    assert check['overall'] == 'warn' and check['observedValue'] == 0, check
    assert check['output'].startswith('no worker: none has been seen since 20'), check
    assert check['output'].endswith('; carts wait until one starts'), check

    body = b'waits for a worker'
    archive_id = f'nobody-{uuid.uuid4().hex[:8]}'
    stack.archive.put(archive_id, body)
    uid = f'nobody-{uuid.uuid4().hex[:8]}'
    fileids = [{'id': archive_id, 'path': 'w.bin', 'hashtype': 'sha1', 'hashsum': hashlib.sha1(body).hexdigest()}]
    assert stack.post(uid, fileids).status_code == 201
    head = _poll(lambda: stack.head(uid), lambda head: 'waiting' in head.headers['X-Pacifica-Message'],
                 'a HEAD saying the cart waits for a worker', stack)
    assert head.headers['X-Pacifica-Status'] == 'staging'
    message = head.headers['X-Pacifica-Message']
    assert message.startswith('0 of 1 files staged; waiting for a worker: none has been seen since 20'), message
    document = _poll(lambda: requests.get(f'{stack.url}/{uid}/status', timeout=30).json(),
                     lambda document: 'waiting' in document['message'], 'the status document saying so', stack)
    assert (document['status'], document['message']) == ('staging', message), document

    before_the_new_worker = datetime.datetime.now().astimezone()
    worker = stack.start_worker()
    stack.wait_workers_ready()
    final = stack.wait_final(uid)
    assert (final.headers['X-Pacifica-Status'], final.headers['X-Pacifica-Message']) == ('ready', ''), stack.logs()
    assert _wait_for_check(stack, 'pass', '/-/ready passing again')['observedValue'] == 1

    worker.stop()  # a clean stop removes its record: the last worker seen is the killed one again
    output = _wait_for_check(stack, 'warn', '/-/ready warning once the worker stopped')['output']
    last_seen = datetime.datetime.fromisoformat(output.split(' since ', 1)[1].split(';', 1)[0])
    assert last_seen < before_the_new_worker, (output, before_the_new_worker)
    assert 'checked in; it checks in every 1 s' in worker.log_tail(400)
