"""Check that the testkit's ArchiveServer runs the real archive interface as cartd expects it."""
from __future__ import annotations

import hashlib
import pathlib
from typing import Iterator

import pytest
import requests

from cartd_testkit.archive import ArchiveServer

pytestmark = pytest.mark.integration

FILES = {
    'one.txt': b'first file\n',
    'two.bin': bytes(range(256)) * 300,
    'empty.dat': b'',
}


@pytest.fixture(name='archive')
def archive_fixture(tmp_path: pathlib.Path) -> Iterator[ArchiveServer]:
    """Run an archive interface with two workers for one test."""
    with ArchiveServer(tmp_path, workers=2) as server:
        yield server


def test_root_answers(archive: ArchiveServer) -> None:
    """GET / gives the up-and-running message."""
    assert archive.url.endswith('/')
    answer = requests.get(archive.url, timeout=10)
    assert answer.status_code == 200
    assert answer.json() == {'message': 'Pacifica Archive Interface Up and Running'}


def test_head_get_and_missing(archive: ArchiveServer) -> None:
    """HEAD shows disk media and the size, GET gives the bytes, a missing id answers 500."""
    sums = {name: archive.put(name, data, mtime=1_500_000_000.5) for name, data in FILES.items()}
    for name, data in FILES.items():
        assert (archive.root / name).read_bytes() == data
        head = requests.head(archive.url + name, timeout=10)
        assert head.status_code == 204
        assert head.headers['X-Pacifica-File-Storage-Media'] == 'disk'
        assert int(head.headers['X-Content-Length']) == sums[name]['size'] == len(data)
        assert float(head.headers['Last-Modified']) == pytest.approx(1_500_000_000.5)
        got = requests.get(archive.url + name, timeout=10)
        assert got.status_code == 200
        assert got.content == data
    assert sums['empty.dat'] == {
        'md5': hashlib.md5(b'').hexdigest(), 'sha1': hashlib.sha1(b'').hexdigest(),
        'sha256': hashlib.sha256(b'').hexdigest(), 'size': 0,
    }
    for verb in ('HEAD', 'GET', 'POST'):
        assert requests.request(verb, archive.url + 'no-such-file', timeout=10).status_code == 500


def test_stage_and_restart(archive: ArchiveServer) -> None:
    """POST stages a file, and a stopped server starts again on the same URL."""
    archive.put('staged.txt', b'abc')
    staged = requests.post(archive.url + 'staged.txt', timeout=10)
    assert staged.status_code == 200
    assert staged.json() == {'message': 'File was staged', 'file': 'staged.txt'}
    url = archive.url
    archive.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(url, timeout=2)
    archive.start()
    assert archive.url == url
    assert requests.get(url + 'staged.txt', timeout=10).content == b'abc'
