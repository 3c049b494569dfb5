"""Stage once (share_staged_files on) through the real processes, under pacifica-cartd (three databases)
and uWSGI: the real archive interface behind cartd_testkit.faultproxy, which counts the GETs it is sent.

A cart whose files another cart staged is served from the staged-file cache without a byte asked of
the archive; each cart is still checked against its own hash, and a cart whose hash does not match
the cached copy fails as it would without the cache (the entry is not used again).
"""
from __future__ import annotations

import hashlib
import os
import time
import uuid
from typing import Dict, Iterator, List, Tuple

import pytest

from cartd_testkit.faultproxy import FaultProxy
from cartd_testkit.stack import CartStack, tar_contents

pytestmark = [pytest.mark.integration]

ARCHIVE_BEHIND_PROXY = True  # conftest.served_stack: the archive through the fault proxy, which counts GETs
STACK_OVERRIDES = {'cartd': {'share_staged_files': 'on'},
                   'archiveinterface': {'tape_wait': '0.2', 'tape_wait_max': '0.5'}}  # a waiting file: looked at soon
SIZES = (1000, 300 * 1024, 1024 * 1024 + 7)  # a small file, one over the small-file limit, one of several reads


@pytest.fixture(scope='module')
def stack(served_stack: CartStack) -> CartStack:
    """Under pacifica-cartd on each database and under uWSGI (conftest.served_stack), behind the proxy."""
    return served_stack


def _put(stack: CartStack, prefix: str, sizes: Tuple[int, ...] = SIZES) -> Dict[str, bytes]:
    """Archive ids -> bytes, stored in the real archive."""
    datas = {f'{prefix}-{index}': os.urandom(size) for index, size in enumerate(sizes)}
    for archive_id, data in datas.items():
        stack.archive.put(archive_id, data)
    return datas


def _fileids(datas: Dict[str, bytes], hashtype: str = 'sha1', wrong: str = '') -> List[Dict[str, str]]:
    return [{'id': archive_id, 'path': f'data/{archive_id}.bin', 'hashtype': hashtype,
             'hashsum': hashlib.new(hashtype, b'not these bytes' if archive_id == wrong else data).hexdigest()}
            for archive_id, data in datas.items()]


def _ready(stack: CartStack, uid: str, fileids: List[Dict[str, str]], **extra: object) -> None:
    assert stack.post(uid, fileids, **extra).status_code == 201
    final = stack.wait_final(uid)
    assert final.headers['X-Pacifica-Status'] == 'ready', f'{final.headers}\n{stack.logs()}'


def _tar(stack: CartStack, uid: str, datas: Dict[str, bytes]) -> Dict[str, bytes]:
    answer = stack.download(uid, 't.tar')
    assert answer.status_code == 200, answer.text
    return {name: body for name, body in tar_contents(answer.content).items() if name.startswith('t/data/')}


def _expected(datas: Dict[str, bytes]) -> Dict[str, bytes]:
    return {f't/data/{archive_id}.bin': data for archive_id, data in datas.items()}


def _gets(proxy: FaultProxy, datas: Dict[str, bytes]) -> Dict[str, int]:
    """GETs of the files' bytes the archive was sent (not the error probes of no bytes)."""
    return {archive_id: proxy.count('GET', archive_id) - proxy.count('GET', archive_id, 'byte_range=0-0')
            for archive_id in datas}


@pytest.fixture
def uid() -> Iterator[str]:
    yield f'once-{uuid.uuid4().hex[:10]}'


def _entry_states(archive_id: str) -> List[str]:
    from pacifica.cartd.orm import StagedFile
    return [row.state for row in StagedFile.select(StagedFile.state).where(StagedFile.archive_id == archive_id)
            .order_by(StagedFile.id)]


@pytest.mark.parametrize('bundle', [False, True], ids=['files', 'bundle'])
def test_a_second_cart_of_the_same_files_asks_the_archive_for_no_bytes(stack: CartStack, proxy: FaultProxy,
                                                                       uid: str, bundle: bool) -> None:
    """Files linked from the cache; or with `bundle`, copied from it into each cart's tar (the two larger
    files are written into the tar in place)."""
    datas = _put(stack, uid)
    _ready(stack, f'{uid}-a', _fileids(datas), bundle=bundle)
    assert _gets(proxy, datas) == {archive_id: 1 for archive_id in datas}
    asked = {archive_id: proxy.counts(archive_id) for archive_id in datas}
    _ready(stack, f'{uid}-b', _fileids(datas), bundle=bundle)
    assert _gets(proxy, datas) == {archive_id: 1 for archive_id in datas}, 'the second cart downloaded again'
    # Its hashes are on record: the archive was not even asked for the files' status.
    assert {archive_id: proxy.counts(archive_id) for archive_id in datas} == asked
    first, second = _tar(stack, f'{uid}-a', datas), _tar(stack, f'{uid}-b', datas)
    assert first == second == _expected(datas)

    # Deleting the first cart removes its links only: the second one's download keeps every byte.
    assert stack.delete(f'{uid}-a').status_code == 200
    assert _tar(stack, f'{uid}-b', datas) == _expected(datas)
    _ready(stack, f'{uid}-c', _fileids(datas), bundle=bundle)  # and the cache still serves the next cart
    assert _gets(proxy, datas) == {archive_id: 1 for archive_id in datas}
    assert _tar(stack, f'{uid}-c', datas) == _expected(datas)


def test_each_cart_is_checked_against_its_own_hash(stack: CartStack, proxy: FaultProxy, rows: None,
                                                   uid: str) -> None:
    datas = _put(stack, uid)
    _ready(stack, f'{uid}-sha1', _fileids(datas, 'sha1'))
    _ready(stack, f'{uid}-md5', _fileids(datas, 'md5'))  # its digests computed from the cached copies
    assert _gets(proxy, datas) == {archive_id: 1 for archive_id in datas}
    assert _tar(stack, f'{uid}-md5', datas) == _expected(datas)

    # A cart whose hash the cached copy does not have is not served it: it fails as without the cache
    # (its own download and the second chance), and the cached copy is not trusted again.
    wrong = f'{uid}-1'
    assert stack.post(f'{uid}-bad', _fileids(datas, 'md5', wrong=wrong)).status_code == 201
    final = stack.wait_final(f'{uid}-bad')
    assert final.headers['X-Pacifica-Status'] == 'error', stack.logs()
    assert 'File hash does not match provided hash' in final.headers['X-Pacifica-Message']
    assert _gets(proxy, datas)[wrong] == 3
    assert _entry_states(wrong) == ['untrusted']

    # The next good cart fetches that file from the archive again, and only that one.
    _ready(stack, f'{uid}-good', _fileids(datas, 'sha256'))
    assert _gets(proxy, datas) == {archive_id: 4 if archive_id == wrong else 1 for archive_id in datas}
    assert _entry_states(wrong) == ['untrusted', 'ready']
    assert _tar(stack, f'{uid}-good', datas) == _expected(datas)


def test_a_file_changed_in_the_archive_is_fetched_anew(stack: CartStack, proxy: FaultProxy, uid: str) -> None:
    datas = _put(stack, uid, (5000, 6000))
    _ready(stack, f'{uid}-old', _fileids(datas))
    changed = dict(datas)
    first = f'{uid}-0'
    changed[first] = os.urandom(5000)  # the same size: only the mtime tells
    stack.archive.put(first, changed[first], mtime=time.time() + 3600)
    _ready(stack, f'{uid}-new', _fileids(changed))
    assert _gets(proxy, datas) == {first: 2, f'{uid}-1': 1}
    assert _tar(stack, f'{uid}-new', changed) == _expected(changed)
    assert _tar(stack, f'{uid}-old', datas) == _expected(datas)  # the older cart keeps the bytes it verified


def test_two_carts_posted_at_once_fetch_each_file_once(stack: CartStack, proxy: FaultProxy, uid: str) -> None:
    datas = _put(stack, uid, (2 * 1024 * 1024, 2 * 1024 * 1024 + 1, 4096))
    for archive_id in datas:  # each first GET answers after 1 s, so the other cart finds it being fetched
        proxy.rule(archive_id, 'hang', times=1, methods='GET', seconds=1)
    for cart in ('x', 'y'):
        assert stack.post(f'{uid}-{cart}', _fileids(datas)).status_code == 201
    for cart in ('x', 'y'):
        final = stack.wait_final(f'{uid}-{cart}')
        assert final.headers['X-Pacifica-Status'] == 'ready', stack.logs()
    assert _gets(proxy, datas) == {archive_id: 1 for archive_id in datas}
    # one cart found files being fetched and looked at them again (a HEAD more than one each for two carts)
    assert any(proxy.count('HEAD', archive_id) > 2 for archive_id in datas), \
        {archive_id: proxy.counts(archive_id) for archive_id in datas}
    assert _tar(stack, f'{uid}-x', datas) == _tar(stack, f'{uid}-y', datas) == _expected(datas)
