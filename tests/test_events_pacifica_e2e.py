"""Completion events in pacifica-notifications' format (`[notifications] format = pacifica`), through the real
server (pacifica-cartd on three databases, uWSGI) and worker, to a real HTTP receiver: the CloudEvents 0.1
JSON that pacifica-notifications' /receive takes, one event per finished cart, with a stable id."""
from __future__ import annotations

import hashlib
import os
import time
import uuid
from typing import Any, Dict, List

import pytest

from cartd_testkit.procs import free_port
from cartd_testkit.receiver import EventReceiver, quick_notifications
from cartd_testkit.stack import CartStack

pytestmark = [pytest.mark.integration]

RECEIVER_PORT = free_port()
STACK_OVERRIDES = {
    'notifications': quick_notifications(f'http://127.0.0.1:{RECEIVER_PORT}/receive', format='pacifica'),
}
DEADLINE_S = 60



@pytest.fixture(scope='module')
def stack(served_stack: CartStack, receiver: EventReceiver) -> CartStack:
    """Under pacifica-cartd on each database and under uWSGI (conftest.served_stack)."""
    return served_stack


def _events_of(receiver: EventReceiver, uid: str) -> List[Dict[str, Any]]:
    return [record for record in list(receiver.requests)
            if record['body'].get('extensions', {}).get('subject') == uid]


def _wait(receiver: EventReceiver, uid: str, stack: CartStack) -> Dict[str, Any]:
    deadline = time.monotonic() + DEADLINE_S
    while not _events_of(receiver, uid):
        assert time.monotonic() < deadline, f'no event of {uid} after {DEADLINE_S} s\n{stack.logs()}'
        time.sleep(0.1)
    time.sleep(1)  # a second event (there must be none) would come within a few intervals
    [record] = _events_of(receiver, uid)
    return record


@pytest.mark.parametrize('wrong_hash', [False, True], ids=['ready', 'error'])
def test_a_finished_cart_sends_one_event_in_pacifica_notifications_format(
        stack: CartStack, receiver: EventReceiver, wrong_hash: bool) -> None:
    uid = f'pn-{uuid.uuid4().hex[:8]}'
    data = os.urandom(900)
    sums = stack.archive.put(f'{uid}-0', data)
    hashsum = hashlib.sha1(b'other bytes').hexdigest() if wrong_hash else sums['sha1']
    assert stack.post(uid, [{'id': f'{uid}-0', 'path': 'f.bin', 'hashtype': 'sha1', 'hashsum': hashsum}]) \
        .status_code == 201
    kind = 'error' if wrong_hash else 'ready'
    assert stack.wait_final(uid).headers['X-Pacifica-Status'] == kind
    record = _wait(receiver, uid, stack)
    body = record['body']
    assert record['path'] == '/receive'
    assert record['headers']['content-type'] == 'application/json'
    assert set(body) == {'cloudEventsVersion', 'eventID', 'eventType', 'source', 'eventTime', 'contentType',
                         'extensions', 'data'}, body
    assert (body['cloudEventsVersion'], body['eventType'], body['source'], body['contentType']) == (
        '0.1', f'org.pacifica.cartd.cart.{kind}', 'urn:test:cartd', 'application/json')
    assert len(body['eventID']) == 36 and body['eventTime'].endswith('Z')
    assert body['data']['uid'] == uid and body['data']['status'] == kind and 'files' not in body['data']
