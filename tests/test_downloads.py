"""Downloads from the real server: file bytes go out by sendfile, with ranges and early hang-ups."""
from __future__ import annotations

import hashlib
import os
import pathlib
import uuid
from typing import Dict, Iterator, Tuple

import pytest
import requests

from cartd_testkit.archive import ArchiveServer
from cartd_testkit.databases import fresh_database
from cartd_testkit.stack import CartStack

pytestmark = [pytest.mark.integration]

BIG = 8 << 20
# A tiny read size: were the files' bytes read into Python, an 8 MiB file would take
# thousands of read() calls; sent by sendfile it takes none.
READ_SIZE = '4 Kb'


@pytest.fixture(scope='module')
def cart(archive: ArchiveServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tuple[CartStack, str, bytes]]:
    """A stack with one ready cart: a big file between two small ones; the tar as bytes."""
    base = tmp_path_factory.mktemp('downloads')
    stack = CartStack(base, archive, fresh_database('sqlite', base), workers=1,
                      overrides={'cartd': {'transfer_size': READ_SIZE}})
    stack.start()
    try:
        uid = f'dl-{uuid.uuid4().hex[:10]}'
        contents: Dict[str, bytes] = {'a.txt': b'first\n', 'big.bin': os.urandom(BIG), 'z.txt': b'last\n'}
        fileids = []
        for path, data in contents.items():
            sums = archive.put(f'{uid}-{path}', data)
            fileids.append({'id': f'{uid}-{path}', 'path': path, 'hashtype': 'sha1', 'hashsum': sums['sha1']})
        assert stack.post(uid, fileids).status_code == 201
        assert stack.wait_final(uid).headers['X-Pacifica-Status'] == 'ready', stack.logs()
        whole = stack.download(uid, 'd.tar')
        assert whole.status_code == 200
        assert hashlib.sha1(whole.content[whole.content.index(contents['big.bin'][:4096]):][:BIG]).digest() \
            == hashlib.sha1(contents['big.bin']).digest()
        yield stack, uid, whole.content
    finally:
        stack.stop()


def _read_calls(pid: int) -> int:
    for line in pathlib.Path(f'/proc/{pid}/io').read_text(encoding='ascii').splitlines():
        if line.startswith('syscr:'):
            return int(line.split()[1])
    raise AssertionError(f'no syscr in /proc/{pid}/io')


def test_file_bytes_are_not_read_into_the_server(cart: Tuple[CartStack, str, bytes]) -> None:
    stack, uid, whole = cart
    assert stack.server is not None
    before = _read_calls(stack.server.pid)
    again = stack.download(uid, 'd.tar')
    used = _read_calls(stack.server.pid) - before
    assert again.content == whole
    # 8 MiB read 4 KiB at a time would be over 2,000 read() calls
    assert used < 500, f'the server made {used} read() calls to send {len(whole)} bytes'


@pytest.mark.parametrize('start, end', [(0, 511), (700, 3000), (5000, BIG // 2), (BIG - 10, None), (-100, None)],
                         ids=['first-header', 'header-into-file', 'inside-big-file', 'across-files', 'suffix'])
def test_ranges(cart: Tuple[CartStack, str, bytes], start: int, end: int) -> None:
    stack, uid, whole = cart
    header = f'bytes={start}-' if end is None else f'bytes={start}-{end}'
    if start < 0:
        header = f'bytes={start}'
    answer = stack.download(uid, 'd.tar', Range=header)
    assert answer.status_code == 206
    first = start % len(whole)
    last = len(whole) - 1 if end is None else end
    assert answer.headers['Content-Range'] == f'bytes {first}-{last}/{len(whole)}'
    assert answer.content == whole[first:last + 1]


def test_client_hanging_up_mid_file_does_not_harm_the_server(cart: Tuple[CartStack, str, bytes]) -> None:
    stack, uid, whole = cart
    for _ in range(3):
        with requests.get(f'{stack.url}/{uid}', params={'filename': 'd.tar'}, stream=True, timeout=30) as answer:
            assert answer.status_code == 200
            assert len(answer.raw.read(1 << 20)) == 1 << 20
    assert stack.download(uid, 'd.tar').content == whole
    assert stack.server is not None and stack.server.running()
