"""Progress on HEAD through the real processes, under pacifica-cartd (three databases) and uWSGI.

The real archive interface (POSIX backend) keeps every file on disk, so one file is held on
"tape" by cartd_testkit.faultproxy for a number of HEADs. Every HEAD answer of an existing
cart carries the progress headers, whichever path answers it (the fast lane for staging and
ready carts, CherryPy for a failed one); the counters never go down while a cart stages.
"""
from __future__ import annotations

import datetime
import hashlib
import os
import re
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


# ---- GET /<uid>/status -----------------------------------------------------------------

PHASES = {'waiting', 'recalling', 'transferring', 'bundling', 'ready', 'error'}


def _status(stack: CartStack, uid: str, **params: str) -> requests.Response:
    return requests.get(f'{stack.url}/{uid}/status', params=params, timeout=30)


def _document(stack: CartStack, uid: str, **params: str) -> dict:
    answer = _status(stack, uid, **params)
    assert answer.status_code == 200, answer.text
    assert answer.headers['Content-Type'] == 'application/json'
    return answer.json()


def _moment(text: str) -> datetime.datetime:
    """An RFC 3339 time with its offset (fromisoformat also takes other forms: the offset is checked here)."""
    assert re.fullmatch(r'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d', text), text
    return datetime.datetime.fromisoformat(text)


def test_the_status_document_follows_a_cart_through_its_phases(stack: CartStack, proxy: FaultProxy) -> None:
    """Every file's state and download count, the phase, and a percent that never goes down and is 100 only when ready.

    f0 breaks off once (downloaded twice), f1's download is held for 2 s (seen transferring),
    f2 is on tape for 3 HEADs (seen recalling).
    """
    uid = f'status-{uuid.uuid4().hex[:10]}'
    sizes = [3000, 5000, 7000]
    fileids, expected = _files(stack, uid, sizes)
    proxy.rule(f'{uid}-0', 'cut', times=1, after=1000)
    proxy.rule(f'{uid}-1', 'hang', times=1, seconds=2)
    proxy.rule(f'{uid}-2', 'tape', times=TAPE_HEADS, methods='HEAD')
    assert stack.post(uid, fileids).status_code == 201

    documents = []
    deadline = time.monotonic() + 60
    while True:
        document = _document(stack, uid, files='all')
        documents.append(document)
        if document['status'] != 'staging':
            break
        assert time.monotonic() < deadline, f'{uid} still staging after 60 s\n{stack.logs()}'
        time.sleep(0.05)
    final = documents[-1]
    assert (final['status'], final['phase'], final['message']) == ('ready', 'ready', ''), (final, stack.logs())
    assert {document['phase'] for document in documents} <= PHASES
    percents = [document['progress']['percent'] for document in documents]
    assert percents == sorted(percents), percents  # never down
    assert all(0 <= percent < 100 for percent in percents[:-1]) and percents[-1] == 100, percents
    states = {(document['phase'], file['path'], file['state'], file['attempts'])
              for document in documents for file in document['files']}
    assert ('transferring', 'f1.bin', 'transferring', 1) in states, sorted(states)
    assert any(path == 'f2.bin' and state == 'recalling' for _, path, state, _ in states), sorted(states)
    assert 'recalling' in {document['phase'] for document in documents}
    # a file's state only moves forward: queued, recalling, transferring, staged
    order = ['queued', 'recalling', 'transferring', 'staged']
    for path in expected:
        seen = [order.index(file['state']) for document in documents for file in document['files']
                if file['path'] == path]
        assert seen == sorted(seen), (path, seen)

    assert [(file['path'], file['id'], file['size'], file['state'], file['attempts'], file['error'])
            for file in final['files']] == [
        ('f0.bin', f'{uid}-0', 3000, 'staged', 2, None), ('f1.bin', f'{uid}-1', 5000, 'staged', 1, None),
        ('f2.bin', f'{uid}-2', 7000, 'staged', 1, None)]
    assert final['progress'] == {'files_total': 3, 'files_staged': 3, 'files_on_tape': 0, 'files_failed': 0,
                                 'files_transferring': 0, 'bytes_total': sum(sizes), 'bytes_staged': sum(sizes),
                                 'percent': 100}
    assert final['files_page'] == {'files': 'all', 'offset': 0, 'limit': 1000, 'count': 3, 'next_offset': None}
    assert final['uid'] == uid and final['expires_at'] is None
    created, updated, ready_at = (_moment(final[name]) for name in ('created', 'updated', 'ready_at'))
    assert created <= ready_at <= updated + datetime.timedelta(seconds=1)
    assert all(document['ready_at'] is None for document in documents[:-1])
    head = stack.head(uid)
    assert _progress(head)['X-Pacifica-Bytes-Staged'] == final['progress']['bytes_staged']
    assert tar_contents(stack.download(uid, 's.tar').content) == {f's/{path}': data for path, data in expected.items()}


def test_the_status_document_lists_failed_files_by_default(stack: CartStack) -> None:
    uid = f'status-{uuid.uuid4().hex[:10]}'
    fileids, _ = _files(stack, uid, [1000, 2000])
    fileids[1]['hashsum'] = hashlib.sha1(b'not these bytes').hexdigest()
    assert stack.post(uid, fileids).status_code == 201
    assert _poll_until_final(stack, uid)[-1].status_code == 500
    document = _document(stack, uid)
    assert (document['status'], document['phase']) == ('error', 'error')
    assert 'File hash does not match provided hash' in document['message']
    assert document['message'] == stack.head(uid).headers['X-Pacifica-Message']
    assert [(file['path'], file['state'], file['attempts']) for file in document['files']] == [
        ('f1.bin', 'error', 2)]  # downloaded, then fetched once more after the mismatch
    assert 'File hash does not match provided hash' in document['files'][0]['error']
    assert document['files_page']['count'] == 1 and document['ready_at'] is None
    assert document['progress']['files_failed'] == 1 and document['progress']['percent'] < 100
    assert _document(stack, uid, files='none')['files'] == []
    assert len(_document(stack, uid, files='all')['files']) == 2


def test_the_status_document_pages_through_the_files(stack: CartStack) -> None:
    uid = f'status-{uuid.uuid4().hex[:10]}'
    fileids, _ = _files(stack, uid, [10] * 5)
    assert stack.post(uid, fileids).status_code == 201
    assert _poll_until_final(stack, uid)[-1].status_code == 204
    pages = [_document(stack, uid, files='all', limit='2', offset=str(offset)) for offset in (0, 2, 4, 9)]
    assert [[file['path'] for file in page['files']] for page in pages] == [
        ['f0.bin', 'f1.bin'], ['f2.bin', 'f3.bin'], ['f4.bin'], []]
    assert [page['files_page']['next_offset'] for page in pages] == [2, 4, None, None]
    assert {page['files_page']['count'] for page in pages} == {5}
    assert _document(stack, uid)['files'] == []  # no errors: the default lists none
    head = requests.head(f'{stack.url}/{uid}/status', timeout=30)
    assert (head.status_code, head.content) == (200, b'')
    assert int(head.headers['Content-Length']) == len(_status(stack, uid).content)


@pytest.mark.parametrize('query, message', [
    ({'files': 'bogus'}, "files must be one of errors, all, none, not 'bogus'"),
    ({'limit': '0'}, 'limit must be from 1 to 10000, not 0'),
    ({'limit': '10001'}, 'limit must be from 1 to 10000, not 10001'),
    ({'limit': 'ten'}, "limit must be a whole number, not 'ten'"),
    ({'offset': '-1'}, "offset must be a whole number, not '-1'"),
    ({'files': ['all', 'errors']}, 'give the files parameter once'),
])
def test_the_status_document_refuses_bad_parameters(stack: CartStack, query: dict, message: str) -> None:
    uid = f'status-{uuid.uuid4().hex[:10]}'
    assert stack.post(uid, []).status_code == 201
    answer = _status(stack, uid, **query)
    assert answer.status_code == 400, answer.text
    assert answer.json()['message'] == message


def test_the_status_document_of_an_unknown_cart_is_404_and_of_a_deleted_one_a_tombstone(stack: CartStack) -> None:
    uid = f'status-{uuid.uuid4().hex[:10]}'
    answer = _status(stack, uid)
    assert answer.status_code == 404
    assert answer.json()['status'] == '404 Not Found'
    assert answer.json()['message'] == f'No cart with uid {uid} found'
    assert stack.post(uid, []).status_code == 201
    assert stack.delete(uid).status_code == 200
    tombstone = _document(stack, uid)  # a deleted cart is still reported for tombstone_time (a week)
    assert (tombstone['status'], tombstone['phase']) == ('error', 'deleted')
    assert tombstone['message'].startswith('the cart was deleted at ')


def test_the_status_resource_allows_get_and_head_only(stack: CartStack) -> None:
    uid = f'status-{uuid.uuid4().hex[:10]}'
    assert stack.post(uid, []).status_code == 201
    for method in ('POST', 'DELETE', 'PUT'):
        answer = requests.request(method, f'{stack.url}/{uid}/status', timeout=30)
        assert (answer.status_code, answer.headers['Allow']) == (405, 'GET, HEAD'), (method, answer.text)
        assert answer.json()['message'] == 'Specified method is invalid for this resource'
    assert _status(stack, uid).headers['Allow'] == 'GET, HEAD'
    assert stack.head(uid).headers['Allow'] == 'DELETE, GET, HEAD, POST'  # the cart itself is unchanged
