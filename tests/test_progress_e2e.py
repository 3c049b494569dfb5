"""Progress on HEAD through the real processes, under pacifica-cartd (three databases) and uWSGI.

The real archive interface (POSIX backend) keeps every file on disk, so one file is held on
"tape" by cartd_testkit.faultproxy for a number of HEADs. Every HEAD answer of an existing
cart carries the progress headers, whichever path answers it (the fast lane for staging and
ready carts, CherryPy for a failed one); the counters never go down while a cart stages.
"""
from __future__ import annotations

import hashlib
import os
import time
import uuid
from typing import Dict, List, Tuple

import pytest
import requests

from cartd_testkit.faultproxy import FaultProxy
from cartd_testkit.stack import CartStack, tar_contents

pytestmark = [pytest.mark.integration]

FILES_HEADERS = ('X-Pacifica-Files-Total', 'X-Pacifica-Files-Staged', 'X-Pacifica-Files-Failed',
                 'X-Pacifica-Files-On-Tape')
NEVER_DOWN = ('X-Pacifica-Files-Staged', 'X-Pacifica-Files-Failed', 'X-Pacifica-Bytes-Staged')
TAPE_HEADS = 3  # HEADs of the held file the archive answers with "tape" before it is on disk
ARCHIVE_BEHIND_PROXY = True  # conftest.served_stack: the archive through the fault proxy
STACK_OVERRIDES = {'archiveinterface': {'tape_wait': '1', 'tape_wait_max': '1'}}  # a file on tape: looked at after 1 s


@pytest.fixture(scope='module')
def stack(served_stack: CartStack) -> CartStack:
    """Under pacifica-cartd on each database and under uWSGI (conftest.served_stack), behind the proxy."""
    return served_stack


def _files(stack: CartStack, uid: str, sizes: List[int]) -> Tuple[List[dict], Dict[str, bytes]]:
    fileids, expected = [], {}
    for index, size in enumerate(sizes):
        data = os.urandom(size)
        sums = stack.archive.put(f'{uid}-{index}', data)
        fileids.append({'id': f'{uid}-{index}', 'path': f'f{index}.bin', 'hashtype': 'sha1',
                        'hashsum': sums['sha1']})
        expected[f'f{index}.bin'] = data
    return fileids, expected


def _progress(answer: requests.Response) -> Dict[str, int]:
    """The progress headers of an answer, as integers (a missing one fails the test here)."""
    names = list(FILES_HEADERS) + ['X-Pacifica-Bytes-Staged']
    values = {name: int(answer.headers[name]) for name in names}
    if 'X-Pacifica-Bytes-Total' in answer.headers:
        values['X-Pacifica-Bytes-Total'] = int(answer.headers['X-Pacifica-Bytes-Total'])
    return values


def _poll_until_final(stack: CartStack, uid: str, deadline_s: float = 60) -> List[requests.Response]:
    """Every HEAD answer from the first until the cart is no longer staging."""
    answers = []
    deadline = time.monotonic() + deadline_s
    while True:
        answer = stack.head(uid)
        answers.append(answer)
        if answer.headers.get('X-Pacifica-Status') != 'staging':
            return answers
        assert time.monotonic() < deadline, f'{uid} still staging after {deadline_s} s\n{stack.logs()}'
        time.sleep(0.05)


def test_a_cart_with_a_file_on_tape_reports_progress_that_never_goes_down(stack: CartStack,
                                                                         proxy: FaultProxy) -> None:
    uid = f'progress-{uuid.uuid4().hex[:10]}'
    sizes = [3000, 5000, 7000]
    fileids, expected = _files(stack, uid, sizes)
    proxy.rule(f'{uid}-2', 'tape', times=TAPE_HEADS, methods='HEAD')
    assert stack.post(uid, fileids).status_code == 201

    answers = _poll_until_final(stack, uid)
    final = answers[-1]
    assert (final.status_code, final.headers['X-Pacifica-Status']) == (204, 'ready'), stack.logs()
    seen = [_progress(answer) for answer in answers]
    for before, after in zip(seen, seen[1:]):
        for name in NEVER_DOWN:
            assert after[name] >= before[name], (name, before, after)
    assert {values['X-Pacifica-Files-Total'] for values in seen} == {3}
    # while the third file was on tape, the other two were staged and HEAD said so, also in words
    waiting = [(values, answer.headers['X-Pacifica-Message']) for values, answer in zip(seen, answers)
               if values['X-Pacifica-Files-On-Tape'] == 1 and values['X-Pacifica-Files-Staged'] == 2]
    assert waiting, seen
    values, message = waiting[-1]
    assert message == '2 of 3 files staged; 1 waiting on tape'
    # every size is known once the file on tape has been looked at: Bytes-Total is the cart's size
    assert values['X-Pacifica-Bytes-Total'] == sum(sizes) and values['X-Pacifica-Bytes-Staged'] == 3000 + 5000
    assert _progress(final) == {'X-Pacifica-Files-Total': 3, 'X-Pacifica-Files-Staged': 3,
                                'X-Pacifica-Files-Failed': 0, 'X-Pacifica-Files-On-Tape': 0,
                                'X-Pacifica-Bytes-Total': sum(sizes), 'X-Pacifica-Bytes-Staged': sum(sizes)}
    assert final.headers['X-Pacifica-Message'] == ''
    assert proxy.count('HEAD', f'{uid}-2') == TAPE_HEADS + 1
    body = stack.download(uid, 'p.tar').content
    assert tar_contents(body) == {f'p/{path}': data for path, data in expected.items()}


def test_a_failed_cart_reports_its_failed_file(stack: CartStack) -> None:
    uid = f'progress-{uuid.uuid4().hex[:10]}'
    fileids, _ = _files(stack, uid, [1000, 2000])
    fileids[1]['hashsum'] = hashlib.sha1(b'not these bytes').hexdigest()
    assert stack.post(uid, fileids).status_code == 201
    final = _poll_until_final(stack, uid)[-1]
    assert (final.status_code, final.headers['X-Pacifica-Status']) == (500, 'error')
    progress = _progress(final)
    assert (progress['X-Pacifica-Files-Total'], progress['X-Pacifica-Files-Failed'],
            progress['X-Pacifica-Files-On-Tape']) == (2, 1, 0), progress
    assert 'File hash does not match provided hash' in final.headers['X-Pacifica-Message']


def test_an_empty_cart_has_nothing_to_count(stack: CartStack) -> None:
    uid = f'progress-{uuid.uuid4().hex[:10]}'
    assert stack.post(uid, []).status_code == 201
    final = _poll_until_final(stack, uid)[-1]
    assert final.headers['X-Pacifica-Status'] == 'ready'
    assert _progress(final) == {name: 0 for name in FILES_HEADERS + ('X-Pacifica-Bytes-Total',
                                                                     'X-Pacifica-Bytes-Staged')}


def test_an_unknown_cart_has_no_progress_headers(stack: CartStack) -> None:
    answer = stack.head(f'progress-{uuid.uuid4().hex[:10]}')
    assert answer.status_code == 404
    assert not [name for name in answer.headers if name.startswith('X-Pacifica-Files')
                or name.startswith('X-Pacifica-Bytes')]
