"""Cart lifetimes through the real processes, under pacifica-cartd (three databases) and uWSGI.

A cart posted with `"lifetime"` answers HEAD 204 with X-Pacifica-Expires while ready, then
HEAD 410 and GET 410 once expired; the workers' sweep (every reconcile_interval, here half a
second) removes its files unless it is being downloaded, and keeps its row. How long ago a
cart was last used is set in the database where a test needs it to look unused: real minutes
cannot pass in a test.
"""
from __future__ import annotations

import datetime
import email.utils
import os
import time
import uuid
from typing import Dict, List, Tuple

import pytest
import requests

from pacifica.cartd import database
from pacifica.cartd.orm import Cart, now
from cartd_testkit.stack import CartStack, tar_contents

pytestmark = [pytest.mark.integration]

MAX_LIFETIME = 3600
STACK_OVERRIDES = {'cartd': {'reconcile_interval': '0.5', 'max_cart_lifetime': str(MAX_LIFETIME)}}
KIB = 1024


@pytest.fixture(scope='module')
def stack(served_stack: CartStack) -> CartStack:
    """Under pacifica-cartd on each database and under uWSGI (conftest.served_stack)."""
    return served_stack


def _post(stack: CartStack, uid: str, sizes: List[int], **extra: object) -> Dict[str, bytes]:
    fileids, expected = [], {}
    for index, size in enumerate(sizes):
        data = os.urandom(size)
        sums = stack.archive.put(f'{uid}-{index}', data)
        fileids.append({'id': f'{uid}-{index}', 'path': f'f{index}.bin', 'hashtype': 'sha1', 'hashsum': sums['sha1']})
        expected[f'f{index}.bin'] = data
    answer = stack.post(uid, fileids, **extra)
    assert answer.status_code == 201, answer.text
    return expected


def _until(predicate, what: str, stack: CartStack, deadline_s: float = 30) -> None:
    deadline = time.monotonic() + deadline_s
    while not predicate():
        assert time.monotonic() < deadline, f'{what} after {deadline_s} s\n{stack.logs()}'
        time.sleep(0.1)


def _ready(stack: CartStack, uid: str) -> requests.Response:
    _until(lambda: stack.head(uid).headers.get('X-Pacifica-Status') != 'staging', f'{uid} still staging', stack)
    head = stack.head(uid)
    assert (head.status_code, head.headers['X-Pacifica-Status']) == (204, 'ready'), head.headers
    return head


def _document(stack: CartStack, uid: str) -> dict:
    answer = requests.get(f'{stack.url}/{uid}/status', timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _expires(stack: CartStack, uid: str) -> Tuple[datetime.datetime, datetime.datetime]:
    """(ready_at, expires_at) of the status document, as aware datetimes."""
    document = _document(stack, uid)
    return (datetime.datetime.fromisoformat(document['ready_at']),
            datetime.datetime.fromisoformat(document['expires_at']))


def _wait_until_expired(stack: CartStack, uid: str) -> requests.Response:
    _until(lambda: stack.head(uid).status_code == 410, f'{uid} not expired', stack)
    return stack.head(uid)


def _age(uid: str, minutes: float) -> None:
    with database.connection():
        aged = Cart.update(updated_date=now() - datetime.timedelta(minutes=minutes)).where(
            (Cart.cart_uid == uid) & (Cart.status != 'deleted')).execute()
    assert aged == 1


def _row(uid: str) -> Cart:
    with database.connection():
        return Cart.select().where(Cart.cart_uid == uid).order_by(Cart.id.desc()).first()


def test_a_cart_expires_after_its_lifetime_and_its_files_are_removed(stack: CartStack, rows: None) -> None:
    uid = f'life-{uuid.uuid4().hex[:10]}'
    expected = _post(stack, uid, [1000, 2000], lifetime=2)
    head = _ready(stack, uid)
    ready_at, expires_at = _expires(stack, uid)
    assert expires_at - ready_at == datetime.timedelta(seconds=2)
    sent = email.utils.parsedate_to_datetime(head.headers['X-Pacifica-Expires'])
    assert abs((sent - expires_at).total_seconds()) <= 1, (head.headers['X-Pacifica-Expires'], expires_at)
    assert head.headers['X-Pacifica-Message'] == ''

    expired = _wait_until_expired(stack, uid)
    message = expired.headers['X-Pacifica-Message']
    assert expired.headers['X-Pacifica-Status'] == 'error'
    assert message.startswith('the cart expired at ') and message.endswith('; POST it again to stage its files anew')
    assert expired.headers['X-Pacifica-Files-Staged'] == '2' and 'X-Pacifica-Expires' in expired.headers
    download = stack.download(uid)
    assert (download.status_code, download.json()['message']) == (410, message)
    document = _document(stack, uid)
    assert (document['status'], document['phase'], document['message']) == ('error', 'expired', message)
    assert document['progress']['percent'] == 100
    row = _row(uid)
    assert row.status == 'ready'  # just became ready: in use for the in-use window, its files stay for now
    assert (stack.volume / str(row.id)).is_dir()

    _age(uid, 10)  # as if nobody had used it for ten minutes: the next sweep removes its files
    # the sweep marks the cart expired, then removes its files: wait for both
    _until(lambda: _row(uid).status == 'expired' and not (stack.volume / str(row.id)).exists(),
           'the sweep did not remove the expired cart', stack)
    assert not os.path.lexists(stack.volume / 'cartuids' / uid)
    assert stack.head(uid).status_code == 410  # the row stays: still answered as expired
    assert _document(stack, uid)['phase'] == 'expired'

    assert stack.delete(uid).status_code == 200
    assert stack.head(uid).status_code == 404
    assert _document(stack, uid)['phase'] == 'deleted'

    _post(stack, uid, [1000, 2000])  # posted again, without a lifetime: it gets the cap (cart_lifetime is 0)
    head = _ready(stack, uid)
    ready_at, expires_at = _expires(stack, uid)
    assert expires_at - ready_at == datetime.timedelta(seconds=MAX_LIFETIME) and 'X-Pacifica-Expires' in head.headers
    assert set(tar_contents(stack.download(uid, 'again.tar').content)) == {f'again/{path}' for path in expected}
    assert stack.delete(uid).status_code == 200


def test_a_download_in_progress_is_not_cut_off_by_expiry(stack: CartStack, rows: None) -> None:
    """The download started before the cart expired reads every file, though the sweep runs meanwhile."""
    uid = f'life-{uuid.uuid4().hex[:10]}'
    # 32 MiB: more than the socket buffers hold, so most of the tar is read from the volume after the sweeps
    expected = _post(stack, uid, [2048 * KIB] * 16, lifetime=2)
    _ready(stack, uid)
    response = requests.get(f'{stack.url}/{uid}', params={'filename': 'slow.tar'}, stream=True, timeout=60)
    assert response.status_code == 200
    received = bytearray(response.raw.read(16 * KIB))
    _wait_until_expired(stack, uid)
    assert stack.download(uid).status_code == 410  # no new download
    time.sleep(2)  # four sweeps
    for _ in range(int(response.headers['Content-Length']) // (64 * KIB) + 2):
        piece = response.raw.read(64 * KIB)
        if not piece:
            break
        received += piece
    response.close()
    assert tar_contents(bytes(received)) == {f'slow/{path}': data for path, data in expected.items()}
    assert _row(uid).status == 'ready' and (stack.volume / str(_row(uid).id)).is_dir()
    assert stack.delete(uid).status_code == 200


def test_a_lifetime_is_capped_by_max_cart_lifetime(stack: CartStack) -> None:
    uid = f'life-{uuid.uuid4().hex[:10]}'
    _post(stack, uid, [100], lifetime=10 ** 6)
    _ready(stack, uid)
    ready_at, expires_at = _expires(stack, uid)
    assert expires_at - ready_at == datetime.timedelta(seconds=MAX_LIFETIME)
    assert stack.delete(uid).status_code == 200


@pytest.mark.parametrize('lifetime, message', [
    (-1, 'invalid cart request: lifetime: -1 is less than the minimum of 0'),
    (1.5, "invalid cart request: lifetime: 1.5 is not of type 'integer'"),
    ('60', "invalid cart request: lifetime: '60' is not of type 'integer'"),
    (True, "invalid cart request: lifetime: True is not of type 'integer'"),
])
def test_a_bad_lifetime_is_refused(stack: CartStack, lifetime: object, message: str) -> None:
    uid = f'life-{uuid.uuid4().hex[:10]}'
    answer = stack.post(uid, [], lifetime=lifetime)
    assert answer.status_code == 400, answer.text
    assert answer.json()['message'] == message
    assert stack.head(uid).status_code == 404
