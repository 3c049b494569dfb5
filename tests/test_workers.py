"""Several worker processes on one cart, and an archive that is down, through real processes."""
from __future__ import annotations

import hashlib
import os
import pathlib
import uuid

import pytest

from cartd_testkit.archive import ArchiveServer
from cartd_testkit.databases import drop_database, fresh_database
from cartd_testkit.stack import CartStack, tar_contents

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize('kind', ['sqlite', 'postgres', 'mysql'])
@pytest.mark.parametrize('bundle', [False, True])
def test_many_workers_finish_each_cart_exactly_once(archive: ArchiveServer, tmp_path: pathlib.Path,
                                                    kind: str, bundle: bool) -> None:
    """Three worker processes, one file per task: the last files land together, the cart is finished once.

    With SQLite this is also the "database is locked" case of 0.7.0: the server and
    three workers (six pool processes) write the same database file.
    """
    url = fresh_database(kind, tmp_path)
    stack = CartStack(tmp_path / 'stack', archive, url, workers=3, concurrency=2,
                      overrides={'cartd': {'stage_batch_size': '1', 'stage_concurrency': '2'}})
    uids = [f'many-{uuid.uuid4().hex[:10]}' for _ in range(3)]
    try:
        stack.start()
        expected = {}
        for uid in uids:
            fileids = []
            for index in range(40):
                data = os.urandom(2000 + index)
                archive.put(f'{uid}-{index}', data)
                fileids.append({'id': f'{uid}-{index}', 'path': f'd{index % 4}/f{index}',
                                'hashtype': 'md5', 'hashsum': hashlib.md5(data).hexdigest()})
                expected[(uid, f'd{index % 4}/f{index}')] = data
            assert stack.post(uid, fileids, bundle=bundle).status_code == 201
        for uid in uids:
            final = stack.wait_final(uid, deadline_s=180)
            assert final.headers['X-Pacifica-Status'] == 'ready', stack.logs()
            contents = tar_contents(stack.download(uid, 'x.tar').content)
            assert contents == {f'x/{path}': data for (owner, path), data in expected.items() if owner == uid}
        logs = ''.join(worker.log_path.read_text(errors='replace') for worker in stack.workers)
        for uid in uids:
            assert logs.count(f'cart {uid} (id ') == 1, f'cart {uid} was not finished exactly once'
        assert 'database is locked' not in logs
        assert list(stack.volume.rglob('*.part')) == []
    finally:
        stack.stop()
        drop_database(kind, url)


def test_archive_down_fails_the_cart_with_the_cause(tmp_path: pathlib.Path) -> None:
    """The archive goes away after the cart is posted: bounded retries, then error naming file and cause."""
    dead_archive = ArchiveServer(tmp_path / 'dead-archive', workers=1)
    dead_archive.start()
    data = b'will not arrive'
    dead_archive.put('lonely', data)
    stack = CartStack(tmp_path / 'stack', dead_archive, fresh_database('sqlite', tmp_path), workers=1)
    try:
        stack.start()
        dead_archive.stop()
        uid = f'down-{uuid.uuid4().hex[:8]}'
        fileids = [{'id': 'lonely', 'path': 'lonely.txt', 'hashtype': 'sha1',
                    'hashsum': hashlib.sha1(data).hexdigest()}]
        assert stack.post(uid, fileids).status_code == 201
        final = stack.wait_final(uid, deadline_s=60)
        assert final.status_code == 500 and final.headers['X-Pacifica-Status'] == 'error'
        message = final.headers['X-Pacifica-Message']
        assert 'lonely.txt' in message and 'lonely' in message
        assert 'ConnectionError' in message or 'Connection refused' in message
        assert 'Traceback' not in message
    finally:
        stack.stop()
        dead_archive.stop()
