"""`pacifica-cartd-cmd fixit / dump / purge / status` through the installed entry point, on a running cart
(conftest.stack: SQLite, PostgreSQL and MariaDB)."""
from __future__ import annotations

import hashlib
import json
import os
import uuid

import pytest
import yaml

from cartd_testkit.stack import CartStack, tar_contents

pytestmark = [pytest.mark.integration]


def _uid() -> str:
    return f'adm-{uuid.uuid4().hex[:10]}'


def test_fixit_restages_only_what_is_missing(stack: CartStack) -> None:
    archive = stack.archive
    uid = _uid()
    good, late = os.urandom(5000), os.urandom(7000)
    archive.put(f'{uid}-good', good)
    fileids = [{'id': f'{uid}-good', 'path': 'good.bin', 'hashtype': 'sha1', 'hashsum': hashlib.sha1(good).hexdigest()},
               {'id': f'{uid}-late', 'path': 'sub/late.bin', 'hashtype': 'sha1',
                'hashsum': hashlib.sha1(late).hexdigest()}]
    assert stack.post(uid, fileids).status_code == 201
    failed = stack.wait_final(uid)
    assert (failed.headers['X-Pacifica-Status'], failed.headers['X-Pacifica-Files-Failed']) == ('error', '1')
    good_path = next(stack.volume.glob(f'*/{uid}/good.bin'))
    good_mtime = good_path.stat().st_mtime_ns
    archive.put(f'{uid}-late', late)  # the operator puts the missing file back
    result = stack.run_cmd('fixit', '--cartid', uid)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f'{uid}: ready' in result.stdout + result.stderr
    assert good_path.stat().st_mtime_ns == good_mtime  # the verified file was not fetched again
    answer = stack.head(uid)
    assert (answer.status_code, answer.headers['X-Pacifica-Status']) == (204, 'ready')
    # fixit set the counters anew from the file rows: the failure is gone, both files counted once
    assert {name: answer.headers[f'X-Pacifica-{name}'] for name in (
        'Files-Total', 'Files-Staged', 'Files-Failed', 'Files-On-Tape', 'Bytes-Total', 'Bytes-Staged')} == {
        'Files-Total': '2', 'Files-Staged': '2', 'Files-Failed': '0', 'Files-On-Tape': '0',
        'Bytes-Total': '12000', 'Bytes-Staged': '12000'}
    assert tar_contents(stack.download(uid, 'f.tar').content) == {'f/good.bin': good, 'f/sub/late.bin': late}


def test_fixit_fails_clearly(stack: CartStack) -> None:
    unknown = stack.run_cmd('fixit', '--cartid', 'no-such-cart')
    assert unknown.returncode == 1 and 'No cart with uid no-such-cart found' in unknown.stdout + unknown.stderr
    uid = _uid()
    fileids = [{'id': f'{uid}-never', 'path': 'never.bin', 'hashtype': 'md5', 'hashsum': '0' * 32}]
    assert stack.post(uid, fileids).status_code == 201
    assert stack.wait_final(uid).headers['X-Pacifica-Status'] == 'error'
    still = stack.run_cmd('fixit', '--cartid', uid)
    assert still.returncode == 1
    assert 'never.bin' in still.stdout + still.stderr


def test_dump_yaml_and_json(stack: CartStack) -> None:
    archive = stack.archive
    uid = _uid()
    data = b'dumped'
    archive.put(f'{uid}-d', data)
    assert stack.post(uid, [{'id': f'{uid}-d', 'path': 'd.txt', 'hashtype': 'md5',
                             'hashsum': hashlib.md5(data).hexdigest()}]).status_code == 201
    assert stack.wait_final(uid).headers['X-Pacifica-Status'] == 'ready'
    as_yaml = stack.run_cmd('dump')
    as_json = stack.run_cmd('dump', '--json')
    assert as_yaml.returncode == 0 and as_json.returncode == 0
    for carts in (yaml.safe_load(as_yaml.stdout), json.loads(as_json.stdout)):
        mine = [cart for cart in carts if cart['uid'] == uid]
        assert len(mine) == 1 and mine[0]['status'] == 'ready'
        assert [(f['path'], f['status'], f['size']) for f in mine[0]['files']] == [('d.txt', 'staged', 6)]


def test_purge(stack: CartStack) -> None:
    archive = stack.archive
    uid = _uid()
    archive.put(f'{uid}-p', b'purge me')
    assert stack.post(uid, [{'id': f'{uid}-p', 'path': 'p.txt', 'hashtype': 'md5',
                             'hashsum': hashlib.md5(b'purge me').hexdigest()}]).status_code == 201
    assert stack.wait_final(uid).headers['X-Pacifica-Status'] == 'ready'
    bad = stack.run_cmd('purge', '--time-ago', 'last tuesday')
    assert bad.returncode == 2 and 'is not like "60 days ago"' in bad.stderr
    keep = stack.run_cmd('purge')  # default: 180 days
    assert keep.returncode == 0 and uid not in keep.stdout
    assert stack.head(uid).status_code == 204
    gone = stack.run_cmd('purge', '--time-ago', '0 seconds ago')
    assert gone.returncode == 0 and f'deleted cart {uid}' in gone.stdout
    assert stack.head(uid).status_code == 404
    assert not (stack.volume / 'cartuids' / uid).exists()
    assert list(stack.volume.glob(f'*/{uid}')) == []


def test_commands_need_a_subcommand(stack: CartStack) -> None:
    result = stack.run_cmd()
    assert result.returncode != 0
    for name in ('dbsync', 'dbchk', 'fixit', 'dump', 'purge'):
        assert name in result.stdout


def test_status_lists_carts_and_one_carts_files(stack: CartStack) -> None:
    """`status` for the operator's terminal, `--json` for scripts: the same documents GET /<uid>/status answers."""
    import requests  # pylint: disable=import-outside-toplevel
    archive = stack.archive
    ready_uid, failed_uid = _uid(), _uid()
    data = os.urandom(3000)
    archive.put(f'{ready_uid}-r', data)
    assert stack.post(ready_uid, [{'id': f'{ready_uid}-r', 'path': 'r.bin', 'hashtype': 'md5',
                                   'hashsum': hashlib.md5(data).hexdigest()}]).status_code == 201
    assert stack.post(failed_uid, [{'id': f'{failed_uid}-gone', 'path': 'gone.bin', 'hashtype': 'md5',
                                    'hashsum': '0' * 32}]).status_code == 201
    assert stack.wait_final(ready_uid).headers['X-Pacifica-Status'] == 'ready'
    assert stack.wait_final(failed_uid).headers['X-Pacifica-Status'] == 'error'

    table = stack.run_cmd('status')
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ['UID', 'ID', 'PHASE', 'FILES', 'FAILED', 'ON', 'TAPE', 'BYTES', 'PERCENT', 'UPDATED']
    mine = {line.split()[0]: line.split() for line in lines[1:-1] if line.split()[0] in (ready_uid, failed_uid)}
    assert mine[ready_uid][2:5] == ['ready', '1/1', '0'] and mine[ready_uid][6:8] == ['3.0kB/3.0kB', '100%']
    assert mine[failed_uid][2:5] == ['error', '0/1', '1']
    assert lines[-1].endswith(' carts')

    one = stack.run_cmd('status', failed_uid)
    assert one.returncode == 0, one.stderr
    assert one.stdout.splitlines()[0].startswith(f'{failed_uid}: error, 0 of 1 files staged, 0%: file gone.bin')
    assert one.stdout.splitlines()[1].split() == ['PATH', 'STATE', 'ATTEMPTS', 'SIZE', 'ERROR']
    assert one.stdout.splitlines()[2].split()[:3] == ['gone.bin', 'error', '0']  # never downloaded: not in the archive

    as_json = stack.run_cmd('status', ready_uid, '--json')
    [document] = json.loads(as_json.stdout)
    served = requests.get(f'{stack.url}/{ready_uid}/status', params={'files': 'all'}, timeout=30).json()
    assert {key: value for key, value in document.items() if key != 'files_page'} == \
        {key: value for key, value in served.items() if key != 'files_page'}
    assert (document['files_page']['count'], document['files_page']['next_offset']) == (1, None)  # every file
    unknown = stack.run_cmd('status', 'no-such-cart')
    assert unknown.returncode == 1 and unknown.stderr.strip() == (
        'pacifica-cartd-cmd: error: No cart with uid no-such-cart found')
