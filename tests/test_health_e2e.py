"""GET /-/healthy and GET /-/ready through the real server, worker, broker and archive, under
pacifica-cartd (three databases) and uWSGI: what a load balancer polling every second sees."""
from __future__ import annotations

import hashlib
import time
import uuid

import pytest
import requests

from cartd_testkit.stack import CartStack

pytestmark = [pytest.mark.integration]

HEALTH_JSON = 'application/health+json'
READY_CHECKS = {'database:connection', 'database:schema', 'volume:writable', 'volume:free', 'broker:connection',
                'archive:connection'}


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
    assert document['checks']['database:schema'][0]['observedValue'] == '2.7'
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
