"""Partial success at the service level: a cart posted with "on_file_error": "skip" leaves out the files it
cannot stage, ends ready saying which, and starts its tar with MISSING_FILES.txt. The archive is
cartd_testkit.fakes' FakeArchive (its media and bytes set per file by the test)."""
from __future__ import annotations

import hashlib
import io
import pathlib
import tarfile
from typing import Dict, Iterator, List, Tuple

import pytest

from pacifica.cartd import database, schema
from pacifica.cartd.cartreport import FilesWanted
from pacifica.cartd.config import check_volume, load_settings
from pacifica.cartd.errors import BadRequest
from pacifica.cartd.service import CartService
from pacifica.cartd.transport import response_body
from cartd_testkit.fakes import FakeArchive, FakeQueue, run_queue

BIG = 600 * 1024  # above SMALL_FILE: a bundle cart writes it in place into its tar


@pytest.fixture
def service(tmp_path: pathlib.Path) -> Iterator[Tuple[CartService, FakeArchive, FakeQueue]]:
    settings = load_settings(str(tmp_path / 'none.ini'), environ={
        'VOLUME_PATH': str(tmp_path / 'volume'), 'PEEWEE_URL': f'sqliteext:///{tmp_path}/db.sqlite3',
        'STAGE_CONCURRENCY': '1'})
    check_volume(settings)
    database.bind(settings)
    with database.connection():
        schema.sync()
        archive, queue = FakeArchive({}), FakeQueue()
        yield CartService(settings, queue, archive), archive, queue  # type: ignore[arg-type]


def _entries(archive: FakeArchive, files: Dict[str, bytes]) -> List[dict]:
    archive.files.update(files)
    return [{'id': name, 'path': f'p/{name}', 'hashtype': 'sha1', 'hashsum': hashlib.sha1(data).hexdigest()}
            for name, data in files.items()]


def _tar(service: CartService, uid: str) -> List[Tuple[str, bytes]]:
    download = service.download(uid, 'x.tar', 'x')
    body = b''.join(response_body(download.pieces(0, download.layout.size), 1 << 20))
    assert len(body) == download.layout.size
    with tarfile.open(fileobj=io.BytesIO(body), mode='r:') as tar:
        return [(member.name, tar.extractfile(member).read() if member.isfile() else b'')  # type: ignore[union-attr]
                for member in tar.getmembers()]


@pytest.mark.parametrize('bundle', [False, True], ids=['files', 'bundle'])
def test_a_skipping_cart_leaves_out_what_it_cannot_stage_and_lists_it(service, bundle: bool) -> None:
    cart_service, archive, queue = service
    good, big = b'good bytes', bytes(range(256)) * (BIG // 256)
    entries = _entries(archive, {'good': good, 'gone': b'x', 'wrong': b'these bytes', 'big': big})
    archive.media['gone'] = 'error'  # the archive refuses it
    entries[2]['hashsum'] = hashlib.sha1(b'other bytes').hexdigest()  # still wrong after the re-fetch
    cart_service.create_cart('skip', {'fileids': entries, 'on_file_error': 'skip', 'bundle': bundle})
    run_queue(cart_service, queue)

    state = cart_service.status('skip')
    assert state.status == 'ready', state.message
    assert (state.progress.files_total, state.progress.files_staged, state.progress.files_failed) == (4, 2, 2)
    assert state.message.startswith('ready without 2 of 4 files (listed in MISSING_FILES.txt): p/gone (archive id '
                                    'gone): the archive reports the media of the file as error')
    assert '; p/wrong (archive id wrong): File hash does not match provided hash' in state.message
    members = _tar(cart_service, 'skip')
    names = [name for name, _ in members]  # the directories, then the list as the first file
    assert names[:3] == ['x', 'x/p', 'x/MISSING_FILES.txt'] and sorted(names[3:]) == ['x/p/big', 'x/p/good']
    listed = dict(members)['x/MISSING_FILES.txt'].decode('utf-8').splitlines()
    assert [line.split('\t')[:2] for line in listed] == [['p/gone', 'gone'], ['p/wrong', 'wrong']]
    assert listed[1].split('\t')[2] == 'File hash does not match provided hash'
    assert dict(members)['x/p/good'] == good and dict(members)['x/p/big'] == big
    document = cart_service.report('skip', FilesWanted())
    assert (document['status'], document['phase'], document['progress']['percent']) == ('ready', 'ready', 100)
    assert [(file['path'], file['state']) for file in document['files']] == [('p/gone', 'error'), ('p/wrong', 'error')]


def test_a_cart_that_skips_and_loses_every_file_is_ready_with_only_the_list(service) -> None:
    cart_service, archive, queue = service
    entries = _entries(archive, {'a': b'a', 'b': b'b'})
    archive.media.update({'a': 'error', 'b': 'error'})
    cart_service.create_cart('none', {'fileids': entries, 'on_file_error': 'skip'})
    run_queue(cart_service, queue)
    assert cart_service.status('none').status == 'ready'
    assert [name for name, _ in _tar(cart_service, 'none')] == ['x', 'x/MISSING_FILES.txt']


def test_without_skip_a_failure_fails_the_cart_as_before(service) -> None:
    cart_service, archive, queue = service
    entries = _entries(archive, {'good': b'good', 'gone': b'x'})
    archive.media['gone'] = 'error'
    cart_service.create_cart('fail', {'fileids': entries, 'on_file_error': 'fail'})
    run_queue(cart_service, queue)
    state = cart_service.status('fail')
    assert state.status == 'error' and state.message.startswith('Failed to pull file(p/gone')


def test_the_name_of_the_list_is_refused_as_a_path_only_when_skipping(service) -> None:
    cart_service, archive, _queue = service
    for path in ('MISSING_FILES.txt', '/MISSING_FILES.txt', 'MISSING_FILES.txt/inside'):
        entries = _entries(archive, {'a': b'a'})
        entries[0]['path'] = path
        with pytest.raises(BadRequest, match='is where a cart with "on_file_error": "skip" lists the files'):
            cart_service.create_cart('clash', {'fileids': entries, 'on_file_error': 'skip'})
        cart_service.create_cart('plain', {'fileids': entries})  # nothing changes for the others
    with pytest.raises(BadRequest, match="on_file_error: 'maybe' is not one of"):
        cart_service.create_cart('bad', {'fileids': [], 'on_file_error': 'maybe'})
