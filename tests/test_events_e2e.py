"""Completion events through the real processes, under pacifica-cartd (three databases) and uWSGI.

A real HTTP receiver (cartd_testkit.receiver, http.server on 127.0.0.1) gets one CloudEvent for each cart
that becomes ready, fails (a wrong hash) or expires; a receiver that is down (connections refused) gets the
event once it is up, with the same id; a worker SIGKILLed while the event waits in the outbox is replaced
and the new worker sends it; a callback URL outside the allowed prefixes is refused with 400. Small waits
are configured (interval 0.2 s, retries from 0.2 s to 1 s) so the tests stay short. When a cart expires and
how long ago it was last used are set in the database, so that it is expired and looks unused (as in
test_lifetimes_e2e.py): real minutes cannot pass in a test.
"""
from __future__ import annotations

import datetime
import hashlib
import os
import time
import uuid
from typing import Callable, Dict, List

import pytest
import requests

from pacifica.cartd import database
from pacifica.cartd.orm import Cart, CartEvent, now
from cartd_testkit.procs import free_port
from cartd_testkit.receiver import EventReceiver, quick_notifications
from cartd_testkit.stack import CartStack

pytestmark = [pytest.mark.integration]

RECEIVER_PORT = free_port()
RECEIVER_URL = f'http://127.0.0.1:{RECEIVER_PORT}/'
STACK_OVERRIDES = {
    'cartd': {'reconcile_interval': '0.5'},
    'notifications': quick_notifications(RECEIVER_URL + 'events', callback_prefixes=RECEIVER_URL + 'cb/'),
}
DEADLINE_S = 60



@pytest.fixture(scope='module')
def stack(served_stack: CartStack, receiver: EventReceiver) -> CartStack:
    """Under pacifica-cartd on each database and under uWSGI (conftest.served_stack)."""
    return served_stack


def _post(stack: CartStack, uid: str, wrong_hash: bool = False, **extra: object) -> requests.Response:
    data = os.urandom(1500)
    sums = stack.archive.put(f'{uid}-0', data)
    hashsum = hashlib.sha1(b'not these bytes').hexdigest() if wrong_hash else sums['sha1']
    return stack.post(uid, [{'id': f'{uid}-0', 'path': 'f.bin', 'hashtype': 'sha1', 'hashsum': hashsum}], **extra)


def _until(predicate: Callable[[], bool], what: str, stack: CartStack, deadline_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + deadline_s
    while not predicate():
        assert time.monotonic() < deadline, f'{what} after {deadline_s} s\n{stack.logs()}'
        time.sleep(0.1)


def _outbox(uid: str) -> List[CartEvent]:
    with database.connection():
        return list(CartEvent.select().where(CartEvent.subject == uid).order_by(CartEvent.id))


def _one_delivered(stack: CartStack, receiver: EventReceiver, uid: str, kind: str) -> Dict[str, object]:
    """Wait for the event of `uid` to be recorded delivered; check it came exactly once, as `kind`."""
    _until(lambda: [event.state for event in _outbox(uid)] == ['delivered'], f'no delivered event of {uid}', stack)
    [body] = receiver.bodies(uid)
    [row] = _outbox(uid)
    assert body['id'] == row.event_id
    assert (body['specversion'], body['type'], body['subject'], body['source']) == (
        '1.0', f'org.pacifica.cartd.cart.{kind}', uid, 'urn:test:cartd')
    assert body['datacontenttype'] == 'application/json'
    data = body['data']
    assert isinstance(data, dict) and data['uid'] == uid and 'files' not in data
    return body


def test_ready_error_and_expired_each_send_one_event(stack: CartStack, receiver: EventReceiver, rows: None) -> None:
    good, bad = (f'ev-{name}-{uuid.uuid4().hex[:8]}' for name in ('good', 'bad'))
    assert _post(stack, good, lifetime=3600).status_code == 201
    assert _post(stack, bad, wrong_hash=True).status_code == 201
    assert stack.wait_final(good).headers['X-Pacifica-Status'] == 'ready'
    assert stack.wait_final(bad).headers['X-Pacifica-Status'] == 'error'

    ready = _one_delivered(stack, receiver, good, 'ready')
    assert ready['data']['status'] == 'ready' and ready['data']['progress']['files_staged'] == 1  # type: ignore[index]
    request = next(record for record in receiver.requests if record['body']['subject'] == good)
    assert request['headers']['content-type'] == 'application/cloudevents+json' and request['path'] == '/events'
    error = _one_delivered(stack, receiver, bad, 'error')
    assert error['data']['status'] == 'error' and 'hash' in error['data']['message'].lower()  # type: ignore[index]

    # Expired: its lifetime is made over, and the cart to look unused (the sweep waits for that).
    with database.connection():
        Cart.update(expires_date=now() - datetime.timedelta(seconds=1),
                    updated_date=now() - datetime.timedelta(minutes=10)).where(Cart.cart_uid == good).execute()
    _until(lambda: len(_outbox(good)) == 2 and _outbox(good)[1].state == 'delivered', f'{good} not expired', stack)
    expired = [body for body in receiver.bodies(good) if body['type'] == 'org.pacifica.cartd.cart.expired']
    assert len(expired) == 1 and len(receiver.bodies(good)) == 2
    assert expired[0]['data']['phase'] == 'expired' and expired[0]['id'] == _outbox(good)[1].event_id
    assert stack.head(good).status_code == 410


def _ready_while_down(stack: CartStack, uid: str, attempts: int) -> CartEvent:
    """Post a cart while the receiver is down; return its event once it is ready and tried `attempts` times."""
    assert _post(stack, uid).status_code == 201
    assert stack.wait_final(uid).headers['X-Pacifica-Status'] == 'ready'
    # An attempt is counted when the event is claimed, before the send; its error is written after it fails.
    _until(lambda: bool(_outbox(uid)) and _outbox(uid)[0].attempts >= attempts and bool(_outbox(uid)[0].last_error),
           f'{uid} not tried', stack)
    [waiting] = _outbox(uid)
    assert waiting.state == 'pending' and 'Connection' in waiting.last_error
    return waiting


def test_a_receiver_that_is_down_gets_the_event_later_with_the_same_id(stack: CartStack, receiver: EventReceiver,
                                                                        rows: None) -> None:
    uid = f'ev-down-{uuid.uuid4().hex[:8]}'
    receiver.stop()  # connections to its port are refused
    try:
        waiting = _ready_while_down(stack, uid, 2)
    finally:
        receiver.start()
    body = _one_delivered(stack, receiver, uid, 'ready')
    assert body['id'] == waiting.event_id


def test_a_worker_killed_before_sending_is_replaced_and_the_event_still_goes(stack: CartStack,
                                                                              receiver: EventReceiver,
                                                                              rows: None) -> None:
    uid = f'ev-kill-{uuid.uuid4().hex[:8]}'
    receiver.stop()  # hold the event in the outbox
    try:
        waiting = _ready_while_down(stack, uid, 1)
        [worker] = [proc for proc in stack.workers if proc.running()]
        worker.kill9()  # the whole process group, as a crash would
        assert not worker.running()
        stack.workers.remove(worker)  # reaped by kill9; wait_workers_ready is for the new one only
        stack.start_worker()
        stack.wait_workers_ready()
    finally:
        receiver.start()
    body = _one_delivered(stack, receiver, uid, 'ready')
    assert body['id'] == waiting.event_id


def test_a_callback_outside_the_allowed_prefixes_is_refused(stack: CartStack, receiver: EventReceiver,
                                                            rows: None) -> None:
    for bad in (f'http://127.0.0.1:{RECEIVER_PORT}.evil.org/cb/x', f'http://127.0.0.1:{RECEIVER_PORT}/cbx',
                f'http://127.0.0.1:{free_port()}/cb/x', 'http://example.org/cb/x'):
        uid = f'ev-refused-{uuid.uuid4().hex[:8]}'
        answer = _post(stack, uid, callback_url=bad)
        assert answer.status_code == 400, (bad, answer.status_code, answer.text)
        assert 'callback_url' in answer.json()['message'], answer.text
        assert stack.head(uid).status_code == 404  # no cart was made

    uid = f'ev-cb-{uuid.uuid4().hex[:8]}'
    assert _post(stack, uid, callback_url=f'{RECEIVER_URL}cb/{uid}').status_code == 201
    assert stack.wait_final(uid).headers['X-Pacifica-Status'] == 'ready'
    _until(lambda: [event.state for event in _outbox(uid)] == ['delivered', 'delivered'], f'{uid} not sent', stack)
    paths = sorted(record['path'] for record in receiver.requests if record['body']['subject'] == uid)
    assert paths == ['/cb/' + uid, '/events']
    assert len({body['id'] for body in receiver.bodies(uid)}) == 1  # the same event, to both
