"""End to end: a file the archive does not have fails its cart at once, with a message a scientist can act on.

The cart runs with the shipped retry settings (4 retries, 1 s doubling: 15 s of waiting for a
transient error), so a missing file that were taken for a transient failure would keep the cart
staging for at least 15 s; the real archive interface (0.4.2, POSIX backend) answers the missing
file as it does in production: a 500 whose HEAD has no body.
"""
from __future__ import annotations

import json
import time
import uuid

import pytest

from cartd_testkit.stack import CartStack

pytestmark = [pytest.mark.integration]

# The shipped defaults (config.py), over the testkit's quick ones.
STACK_OVERRIDES = {'archiveinterface': {'retries': '4', 'retry_wait': '1'}}
PROMPT_S = 5.0  # a third of the 15 s the retries would take


def test_missing_file_fails_the_cart_at_once_saying_so(stack: CartStack) -> None:
    uid = f'missing-{uuid.uuid4().hex[:12]}'
    present = stack.archive.put(f'{uid}-here', b'this one is in the archive\n')
    ghost_id = f'{uid}-not-there'
    fileids = [{'id': f'{uid}-here', 'path': 'run1/here.dat', 'hashtype': 'sha1', 'hashsum': present['sha1']},
               {'id': ghost_id, 'path': 'run1/ghost.dat', 'hashtype': 'md5', 'hashsum': '0' * 32}]
    started = time.monotonic()
    assert stack.post(uid, fileids).status_code == 201
    final = stack.wait_final(uid, deadline_s=60)
    elapsed = time.monotonic() - started
    print(f'{uid}: {final.status_code} {final.headers.get("X-Pacifica-Message")!r} after {elapsed:.2f} s')
    expected = f'file run1/ghost.dat (archive id {ghost_id}) is not in the archive'
    assert (final.status_code, final.headers['X-Pacifica-Status'], final.headers['X-Pacifica-Message']) == \
        (500, 'error', expected), stack.logs()
    assert elapsed < PROMPT_S, f'the cart took {elapsed:.1f} s to fail: the missing file was retried'
    assert stack.download(uid).status_code == 202
    dumped = stack.run_cmd('dump', '--json')
    assert dumped.returncode == 0, dumped.stderr
    cart = next(cart for cart in json.loads(dumped.stdout) if cart['uid'] == uid)
    assert cart['error'] == expected
    ghost = next(file for file in cart['files'] if file['archive_id'] == ghost_id)
    assert (ghost['status'], ghost['error']) == ('error', expected)
    assert 'Traceback' not in dumped.stdout and str(stack.archive.root) not in dumped.stdout
