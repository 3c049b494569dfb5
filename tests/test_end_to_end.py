"""End to end through real processes: POST, poll HEAD, GET, extract and compare every byte."""
from __future__ import annotations

import hashlib
import os
import time
import tarfile
import io
import uuid
from typing import Dict, List, Tuple

import pytest

from cartd_testkit.stack import CartStack, tar_contents

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope='module')
def stack(served_stack: CartStack) -> CartStack:
    """This module runs under pacifica-cartd on each database and under uWSGI (conftest.served_stack)."""
    return served_stack


def _fill(archive, count: int, hashtype: str, prefix: str, size: int = 300,
          path_of=lambda i: f'dir{i % 7}/sub{i % 3}/file{i}.dat', size_of=None) -> Tuple[List[dict], Dict[str, bytes]]:
    fileids, expected = [], {}
    for index in range(count):
        archive_id = f'{prefix}-{index}'
        data = os.urandom(size_of(index) if size_of else size + index % 50)
        sums = archive.put(archive_id, data, mtime=1600000000 + index)
        path = path_of(index)
        fileids.append({'id': archive_id, 'path': path, 'hashtype': hashtype, 'hashsum': sums[hashtype]})
        expected[path] = data
    return fileids, expected


def _uid() -> str:
    return f'cart-{uuid.uuid4().hex[:12]}'


def _check_download(stack: CartStack, uid: str, expected: Dict[str, bytes], filename: str = 'bundle.tar') -> bytes:
    answer = stack.download(uid, filename)
    assert answer.status_code == 200, answer.text[:300]
    assert answer.headers['Content-Disposition'] == f'attachment; filename={filename}'
    assert answer.headers['Content-Type'] == 'application/octet-stream'
    assert int(answer.headers['Content-Length']) == len(answer.content)
    top = filename.replace('.tar', '')
    contents = tar_contents(answer.content)
    assert contents == {f'{top}/{path}': data for path, data in expected.items()}
    return answer.content


@pytest.mark.parametrize('count, hashtype', [(1, 'md5'), (100, 'sha1'), (1000, 'sha256')])
def test_cart_of_n_files(stack: CartStack, count: int, hashtype: str) -> None:
    uid = _uid()
    fileids, expected = _fill(stack.archive, count, hashtype, uid)
    created = stack.post(uid, fileids)
    assert created.status_code == 201 and created.json() == {'message': 'Cart Processing has begun'}
    final = stack.wait_final(uid, deadline_s=240)
    assert (final.status_code, final.headers['X-Pacifica-Status']) == (204, 'ready'), stack.logs()
    assert final.headers['X-Pacifica-Message'] == ''
    _check_download(stack, uid, expected)


@pytest.mark.parametrize('bundle', [False, True])
def test_unicode_nested_paths_in_both_bundle_modes(stack: CartStack, bundle: bool) -> None:
    uid = _uid()
    paths = ['a/b/é/baré.txt', '/top.txt', 'x/y/z/deep/deeper/file', 'name with spaces.bin', 'n' * 120 + '/f']
    # files over 256 KiB are written into a bundle's tar in place, the others copied in at the end
    fileids, expected = _fill(stack.archive, len(paths), 'sha256', uid, path_of=lambda i: paths[i],
                              size_of=lambda i: 300000 + i if i % 2 else 70000 + i)
    expected = {path.lstrip('/'): data for path, data in expected.items()}
    assert stack.post(uid, fileids, bundle=bundle).status_code == 201
    assert stack.wait_final(uid).headers['X-Pacifica-Status'] == 'ready', stack.logs()
    body = _check_download(stack, uid, expected, 'mine.tar')
    with tarfile.open(fileobj=io.BytesIO(body), mode='r:') as archive:
        member = archive.getmember('mine/a/b/é/baré.txt')
        assert member.mtime == 1600000000  # set from the archive's Last-Modified
    link = stack.volume / 'cartuids' / uid
    assert link.is_symlink()
    if bundle:
        assert link.resolve().suffix == '.tar' and link.resolve().is_file()
        with tarfile.open(link.resolve(), mode='r:') as on_disk:
            assert {member.name: on_disk.extractfile(member).read() for member in on_disk.getmembers()
                    if member.isfile()} == {f'{uid}/{path}': data for path, data in expected.items()}
        assert sorted(entry.name for entry in link.resolve().parent.iterdir()) == [f'{uid}.tar']
        worker_logs = ''.join(worker.log_path.read_text(errors='replace') for worker in stack.workers)
        assert f'cart {uid} (id ' in worker_logs and 'bundle tar written anew' not in worker_logs  # written in place
    else:
        assert (link / 'a/b/é/baré.txt').read_bytes() == expected['a/b/é/baré.txt']


def test_default_filename_and_range_resume(stack: CartStack) -> None:
    uid = _uid()
    fileids, expected = _fill(stack.archive, 3, 'md5', uid, size=100000)
    assert stack.post(uid, fileids).status_code == 201
    assert stack.wait_final(uid).headers['X-Pacifica-Status'] == 'ready'
    whole = stack.download(uid)
    disposition = whole.headers['Content-Disposition']
    assert disposition.startswith('attachment; filename=data_') and disposition.endswith('.tar')
    name = disposition.split('=', 1)[1]
    assert all(member.startswith(name[:-4] + '/') for member in tar_contents(whole.content))
    full = stack.download(uid, 'r.tar')
    part = stack.download(uid, 'r.tar', Range='bytes=1000-', **{'If-Range': full.headers['ETag']})
    assert part.status_code == 206
    assert part.headers['Content-Range'] == f'bytes 1000-{len(full.content) - 1}/{len(full.content)}'
    assert full.content[:1000] + part.content == full.content
    past = stack.download(uid, 'r.tar', Range=f'bytes={len(full.content)}-')
    assert past.status_code == 416
    assert past.headers['Content-Range'] == f'bytes */{len(full.content)}'
    assert 'Content-Disposition' not in past.headers  # an error is not a file to save
    assert past.json()['message']


def test_not_ready_and_unknown_carts(stack: CartStack) -> None:
    uid = _uid()
    missing = stack.head(uid)
    assert missing.status_code == 404
    assert missing.headers['X-Pacifica-Status'] == 'error'
    assert missing.headers['X-Pacifica-Message'] == f'No cart with uid {uid} found'
    gone = stack.download(uid)
    assert gone.status_code == 404
    assert gone.json()['message'] == 'The cart does not exist or has already been deleted'
    assert stack.delete(uid).status_code == 404


def test_empty_cart_is_ready_at_once(stack: CartStack) -> None:
    uid = _uid()
    assert stack.post(uid, []).status_code == 201
    answer = stack.head(uid)
    assert (answer.status_code, answer.headers['X-Pacifica-Status']) == (204, 'ready')
    assert tar_contents(stack.download(uid, 'e.tar').content) == {}


def test_hash_mismatch_fails_the_cart_naming_the_file(stack: CartStack) -> None:
    uid = _uid()
    fileids, _ = _fill(stack.archive, 2, 'sha1', uid)
    fileids[1]['hashsum'] = hashlib.sha1(b'something else').hexdigest()
    assert stack.post(uid, fileids).status_code == 201
    final = stack.wait_final(uid)
    assert final.status_code == 500
    assert final.headers['X-Pacifica-Status'] == 'error'
    message = final.headers['X-Pacifica-Message']
    assert fileids[1]['path'] in message and fileids[1]['id'] in message
    assert 'File hash does not match provided hash' in message
    not_ready = stack.download(uid)
    assert (not_ready.status_code, not_ready.text) == (202, 'The cart is not ready for download.')
    leftovers = [path for path in stack.volume.rglob('*.part')]
    assert leftovers == []


def test_file_missing_from_archive(stack: CartStack) -> None:
    uid = _uid()
    fileids, _ = _fill(stack.archive, 1, 'md5', uid)
    fileids.append({'id': f'{uid}-not-there', 'path': 'ghost.dat', 'hashtype': 'md5', 'hashsum': '0' * 32})
    assert stack.post(uid, fileids).status_code == 201
    final = stack.wait_final(uid)
    assert final.headers['X-Pacifica-Status'] == 'error'
    message = final.headers['X-Pacifica-Message']
    assert message == f'file ghost.dat (archive id {uid}-not-there) is not in the archive'
    assert 'Traceback' not in message and len(message) < 1000


def test_delete_while_staging_and_after_ready(stack: CartStack) -> None:
    staging_uid, ready_uid = _uid(), _uid()
    fileids, _ = _fill(stack.archive, 200, 'md5', staging_uid)
    assert stack.post(staging_uid, fileids).status_code == 201
    deleted = stack.delete(staging_uid)
    assert (deleted.status_code, deleted.json()) == (200, {'message': 'Cart Deleted Successfully'})
    assert stack.head(staging_uid).status_code == 404
    ready_ids, expected = _fill(stack.archive, 3, 'md5', ready_uid)
    assert stack.post(ready_uid, ready_ids).status_code == 201
    assert stack.wait_final(ready_uid).headers['X-Pacifica-Status'] == 'ready'
    # the ready cart was queued after the deleted one, so the deleted cart's tasks have run
    _check_download(stack, ready_uid, expected)
    assert stack.delete(ready_uid).status_code == 200
    assert stack.download(ready_uid).status_code == 404
    assert stack.delete(ready_uid).status_code == 404
    assert not (stack.volume / 'cartuids' / ready_uid).exists()

    def left_over() -> list:
        found = []
        for entry in stack.volume.iterdir():
            try:
                if entry.name != 'cartuids' and {staging_uid, ready_uid} & set(os.listdir(entry)):
                    found.append(entry.name)
            except FileNotFoundError:  # removed while we looked
                pass
        return found

    # A task of the deleted cart that started before the DELETE may still be writing (its 200 files
    # are in tasks of 16, run by two processes beside the ready cart's); it cleans up when it ends.
    deadline = time.monotonic() + 30
    while left_over():
        assert time.monotonic() < deadline, (left_over(), stack.logs())
        time.sleep(0.1)


def test_repost_same_uid_uses_newest(stack: CartStack) -> None:
    uid = _uid()
    first_ids, _ = _fill(stack.archive, 2, 'md5', uid + 'a')
    second_ids, second = _fill(stack.archive, 3, 'md5', uid + 'b')
    assert stack.post(uid, first_ids).status_code == 201
    assert stack.wait_final(uid).headers['X-Pacifica-Status'] == 'ready'
    assert stack.post(uid, second_ids).status_code == 201
    assert stack.wait_final(uid).headers['X-Pacifica-Status'] == 'ready'
    _check_download(stack, uid, second)
    assert stack.delete(uid).status_code == 200
    assert stack.head(uid).status_code == 404


def test_root_says_it_is_up(stack: CartStack) -> None:
    """Bad requests (bodies, uids, methods, content types, sizes) are in test_bad_input.py."""
    import requests  # pylint: disable=import-outside-toplevel
    root = requests.get(stack.url + '/', timeout=30)
    assert (root.status_code, root.json()) == (200, {'message': 'Pacifica Cartd Interface Up and Running'})
    assert root.headers['Content-Type'] == 'application/json'


def test_uids_differing_in_case_or_trailing_space_are_different_carts(stack: CartStack) -> None:
    """MySQL's default collation would match them; the cart must not."""
    base = _uid()
    upper, lower, spaced = base.upper(), base, base + ' '
    fileids, expected = _fill(stack.archive, 1, 'md5', base)
    assert stack.post(upper, fileids).status_code == 201
    assert stack.wait_final(upper).headers['X-Pacifica-Status'] == 'ready'
    assert stack.head(lower).status_code == 404
    assert stack.head(spaced).status_code == 404
    assert stack.delete(lower).status_code == 404
    _check_download(stack, upper, expected)
