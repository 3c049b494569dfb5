"""Crashes and outages while a cart stages, with real processes: the cart still ends ready and right.

Each test disturbs one peer in the middle of staging -- a worker killed with SIGKILL during a
large download, the broker stopped and started again (a private RabbitMQ node, never the shared
one), the REST server restarted, the PostgreSQL database refusing connections for a while --
and then checks the same things: the cart ends `ready`, every byte of the tar is what was put
in the archive, no temporary file (`*.part`) is left on the volume, and a file that was already
staged and verified before the disturbance was not downloaded again (its inode is unchanged
and the archive's access log shows one GET for it). Each test runs with share_staged_files
off and on (files staged into the staged-file cache and linked into the cart, a download
claimed with a lease that a killed worker leaves to run out).
"""
from __future__ import annotations

import hashlib
import json
import http.server
import os
import pathlib
import re
import shutil
import struct
import threading
import tarfile
import time
import uuid
from collections import Counter
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import pytest
import requests

from cartd_testkit.archive import ArchiveServer
from cartd_testkit.databases import _admin_execute, drop_database, fresh_database, server_available
from cartd_testkit.procs import ManagedProcess
from cartd_testkit.rabbit import PrivateRabbit, rabbitmq_server_script
from cartd_testkit.stack import CACHE_MODES, CartStack, cache_id

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MiB = 1 << 20
RECONCILE = {'stall_timeout': '5', 'reconcile_interval': '1'}
# gunicorn's access line (CherryPy inside the archive logs each request too, without the zone)
GET_LINE = re.compile(r':\d\d:\d\d [+-]\d{4}\] "GET /([^ ?"]+)[^"]*" (\d{3}) ')


# ---- peers and helpers ----------------------------------------------------------------


@pytest.fixture(scope='module')
def logged_archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ArchiveServer]:
    """The real archive interface with gunicorn's access log on, so each GET of a file can be counted."""
    with ArchiveServer(tmp_path_factory.mktemp('logged-archive'), workers=4,
                       extra_args=['--access-logfile', '-']) as server:
        yield server


@pytest.fixture(params=CACHE_MODES, ids=cache_id)
def share(request: pytest.FixtureRequest) -> bool:
    """share_staged_files off, then on: every disturbance is survived both ways."""
    return bool(request.param)


def archive_gets(archive: ArchiveServer) -> Counter:
    """How many GETs of each archive id the archive has answered (any status)."""
    text = archive.log_path.read_text(encoding='utf-8', errors='replace')
    return Counter(requests.utils.unquote(match.group(1)) for match in GET_LINE.finditer(text))


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, stack: Optional[CartStack] = None,
               interval: float = 0.05, uid: Optional[str] = None) -> None:
    """Poll predicate until true; fail (with the stack's logs) after timeout seconds or when cart `uid` fails."""
    deadline = time.monotonic() + timeout
    next_look = 0.0
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f'timed out after {timeout} s waiting for {what}\n{stack.logs() if stack else ""}')
        if stack is not None and uid is not None and time.monotonic() >= next_look:
            next_look = time.monotonic() + 0.5
            state = head_state(stack, uid)
            assert state[1] != 'error', f'cart {uid} failed while waiting for {what}: {state}\n{stack.logs()}'
        time.sleep(interval)


def head_state(stack: CartStack, uid: str) -> Tuple[Optional[int], str, str]:
    """(HTTP status, X-Pacifica-Status, X-Pacifica-Message), or (None, '', error) when the server does not answer."""
    try:
        answer = requests.head(f'{stack.url}/{uid}', timeout=10)
    except requests.RequestException as exc:
        return None, '', f'{type(exc).__name__}: {exc}'
    return (answer.status_code, answer.headers.get('X-Pacifica-Status', ''),
            answer.headers.get('X-Pacifica-Message', ''))


def wait_ready(stack: CartStack, uid: str, deadline_s: float) -> List[Tuple[Optional[int], str, str]]:
    """Poll HEAD until the cart is ready; fail when it errors or time runs out. Returns the answers seen."""
    seen: List[Tuple[Optional[int], str, str]] = []
    deadline = time.monotonic() + deadline_s
    while True:
        state = head_state(stack, uid)
        if not seen or seen[-1] != state:
            seen.append(state)
        if state[1] == 'ready':
            return seen
        assert state[1] != 'error', f'cart {uid} failed: {state}\n{stack.logs()}'
        if time.monotonic() > deadline:
            raise AssertionError(f'cart {uid} not ready after {deadline_s} s; answers {seen[-8:]}\n{stack.logs()}')
        time.sleep(0.2)


def part_files(stack: CartStack) -> List[pathlib.Path]:
    """Temporary download files anywhere under the stack's volume."""
    return sorted(stack.volume.rglob('*.part')) if stack.volume.exists() else []


def staged_inodes(stack: CartStack, uid: str) -> Dict[str, int]:
    """Relative path -> inode of each file staged for this uid (volume/<cart id>/<uid>/...)."""
    found: Dict[str, int] = {}
    for top in stack.volume.glob(f'*/{uid}'):
        if top.parent.name == 'cartuids':
            continue
        for path in top.rglob('*'):
            if path.is_file():
                found[path.relative_to(top).as_posix()] = path.stat().st_ino
    return found


class _Counting:
    """A file object that counts the bytes read through it."""

    def __init__(self, raw: object) -> None:
        self.raw = raw
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)  # type: ignore[attr-defined]
        self.count += len(data)
        return data


def downloaded_digests(stack: CartStack, uid: str) -> Dict[str, str]:
    """GET the cart's tar as a stream; return member path (top dir removed) -> sha256 of its bytes."""
    digests: Dict[str, str] = {}
    with requests.get(f'{stack.url}/{uid}', params={'filename': 'top.tar'}, stream=True, timeout=120) as answer:
        assert answer.status_code == 200, f'GET {uid}: {answer.status_code} {answer.text[:300]}'
        counting = _Counting(answer.raw)
        with tarfile.open(fileobj=counting, mode='r|') as archive:  # type: ignore[call-overload]
            for member in archive:
                if not member.isfile():
                    continue
                assert member.name.startswith('top/'), member.name
                digest = hashlib.sha256()
                source = archive.extractfile(member)
                assert source is not None
                while True:
                    piece = source.read(4 * MiB)
                    if not piece:
                        break
                    digest.update(piece)
                digests[member.name[len('top/'):]] = digest.hexdigest()
        while counting.read(1 << 16):  # the end-of-archive blocks
            pass
        assert counting.count == int(answer.headers['Content-Length'])
    return digests


def small_files(archive: ArchiveServer, prefix: str, count: int, size: int = 4096
                ) -> Tuple[List[Dict[str, str]], Dict[str, str]]:
    """Put `count` random files in the archive; return the POST's fileids and path -> sha256."""
    fileids: List[Dict[str, str]] = []
    expected: Dict[str, str] = {}
    for index in range(count):
        data = os.urandom(size)
        archive_id = f'{prefix}-{index}'
        digest = archive.put(archive_id, data)['sha256']
        path = f'd{index % 8}/f{index:04d}.bin'
        fileids.append({'id': archive_id, 'path': path, 'hashtype': 'sha256', 'hashsum': str(digest)})
        expected[path] = str(digest)
    return fileids, expected


def assert_cart_whole(stack: CartStack, uid: str, expected: Mapping[str, str]) -> None:
    """Ready, every member's bytes as put in the archive, nothing else in the tar, no temp file left."""
    status, wire, message = head_state(stack, uid)
    assert (status, wire, message) == (204, 'ready', ''), stack.logs()
    assert downloaded_digests(stack, uid) == dict(expected)
    # a duplicate download still in flight may hold a temp file for a moment; a leftover never goes
    try:
        wait_until(lambda: not part_files(stack), 10, 'the temp files to go')
    except AssertionError:
        raise AssertionError(f'temp files left on the volume: {part_files(stack)}\n{stack.logs()}') from None


def assert_not_fetched_again(archive: ArchiveServer, before: Mapping[str, int], after: Mapping[str, int],
                             archive_ids: Mapping[str, str]) -> None:
    """Files staged (renamed into place) before the disturbance kept their inode and were GET once."""
    assert before, 'nothing was staged before the disturbance: the test did not test anything'
    replaced = sorted(path for path, inode in before.items() if after.get(path) != inode)
    assert not replaced, f'staged files written again after the disturbance: {replaced[:10]}'
    gets = archive_gets(archive)
    twice = {path: gets[archive_ids[path]] for path in before if gets[archive_ids[path]] != 1}
    assert not twice, f'verified files downloaded again (path: GETs): {dict(list(twice.items())[:10])}'


# ---- 1. a worker killed in the middle of a large download ------------------------------------


def _write_big_file(path: pathlib.Path, seed: int, size: int, block: bytes) -> str:
    """Write `size` bytes (a random block stamped with file and block number) and return their sha256."""
    digest = hashlib.sha256()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'wb') as out:
        for index in range(size // len(block)):
            piece = struct.pack('>QQ', seed, index) + block[16:]
            digest.update(piece)
            out.write(piece)
    return digest.hexdigest()


def _pids_with_open(path: pathlib.Path) -> List[int]:
    """Processes that hold `path` open."""
    target = os.path.realpath(path)
    holders: List[int] = []
    for entry in pathlib.Path('/proc').iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for descriptor in (entry / 'fd').iterdir():
                if os.readlink(descriptor) == target:
                    holders.append(int(entry.name))
                    break
        except OSError:
            continue
    return holders


def _worker_holding(stack: CartStack, path: pathlib.Path) -> Optional[ManagedProcess]:
    """The stack's worker whose process group has `path` open."""
    for pid in _pids_with_open(path):
        try:
            group = os.getpgid(pid)
        except ProcessLookupError:
            continue
        for worker in stack.workers:
            if worker.running() and worker.pid == group:
                return worker
    return None


def _big_files(archive: ArchiveServer, uid: str, size: int
               ) -> Tuple[List[Dict[str, str]], Dict[str, str], Dict[str, str]]:
    """Three files of `size` bytes in the archive: (fileids, path -> sha256, path -> archive id)."""
    block = os.urandom(8 * MiB)
    fileids: List[Dict[str, str]] = []
    expected: Dict[str, str] = {}
    archive_ids: Dict[str, str] = {}
    for index in range(3):
        archive_id = f'{uid}-big{index}'
        digest = _write_big_file(archive.path_for(archive_id), index, size, block)
        path = f'big/file{index}.bin'
        fileids.append({'id': archive_id, 'path': path, 'hashtype': 'sha256', 'hashsum': digest})
        expected[path] = digest
        archive_ids[path] = archive_id
    return fileids, expected, archive_ids


def _two_worker_stack(archive: ArchiveServer, tmp_path: pathlib.Path, url: str, share: bool) -> CartStack:
    """Two workers staging one file at a time each, in small reads, with a quick reconciler."""
    return CartStack(tmp_path / 'stack', archive, url, workers=2, concurrency=1, share_staged_files=share,
                     overrides={'cartd': {'stage_batch_size': '1', 'stage_concurrency': '1',
                                          'transfer_size': '256 Kb', **RECONCILE}})


def test_worker_killed_mid_download_is_redriven(logged_archive: ArchiveServer, tmp_path: pathlib.Path,
                                                share: bool) -> None:
    """SIGKILL the worker (its whole process group) that is writing a 200 MiB file: the cart still ends ready.

    The killed task was never acknowledged, so the broker hands it to the other worker (and
    the reconciler would re-queue it after stall_timeout); the killed download's temp file is
    removed; files verified before the kill are not downloaded again.
    """
    uid = f'kill9-{uuid.uuid4().hex[:8]}'
    size = 200 * MiB
    fileids, expected, archive_ids = _big_files(logged_archive, uid, size)
    url = fresh_database('sqlite', tmp_path)
    stack = _two_worker_stack(logged_archive, tmp_path, url, share)
    try:
        stack.start()
        assert stack.post(uid, fileids).status_code == 201

        growing: Dict[str, object] = {}

        def part_growing() -> bool:
            parts = part_files(stack)
            if not parts:
                return False
            try:
                first = parts[0].stat().st_size
                time.sleep(0.05)
                second = parts[0].stat().st_size
            except FileNotFoundError:
                return False
            if 0 < first < second < size * 0.8:  # well before its end: the kill lands mid-download
                growing['part'] = parts[0]
                return True
            return False

        # kill once one file is verified and staged, so the test also sees that it is not fetched again
        wait_until(lambda: bool(staged_inodes(stack, uid)) and part_growing(), 90,
                   'a staged file and a temp file that grows', stack, interval=0.01, uid=uid)
        part = growing['part']
        assert isinstance(part, pathlib.Path)
        victim = _worker_holding(stack, part)
        assert victim is not None, f'no worker of the stack holds {part} open'
        before = staged_inodes(stack, uid)
        victim.kill9()
        killed_at = part.stat().st_size if part.exists() else -1
        assert killed_at > 0, 'the temp file of the killed download was gone at once: the kill came too late'
        survivors = [worker for worker in stack.workers if worker is not victim]
        assert all(worker.running() for worker in survivors)
        seen = wait_ready(stack, uid, 150)

        assert_cart_whole(stack, uid, expected)
        assert not part.exists(), f'the killed download left {part} ({killed_at} bytes) behind'
        after = staged_inodes(stack, uid)
        assert sorted(after) == sorted(expected)
        gets = archive_gets(logged_archive)
        assert sum(gets[archive_id] for archive_id in archive_ids.values()) > len(archive_ids), (
            f'no file was downloaded again after the kill: {gets}')
        assert_not_fetched_again(logged_archive, before, after, archive_ids)
        assert all(state[0] == 204 for state in seen), seen
    finally:
        stack.stop()
        drop_database('sqlite', url)
        for archive_id in archive_ids.values():  # 600 MiB in the archive and as much on the volume
            logged_archive.path_for(archive_id).unlink(missing_ok=True)
        shutil.rmtree(stack.volume, ignore_errors=True)


def test_worker_killed_while_writing_into_the_bundle_tar(logged_archive: ArchiveServer, tmp_path: pathlib.Path,
                                                         share: bool) -> None:
    """Bundle mode: SIGKILL a worker writing a large file straight into the cart's tar.

    The file's region of the tar is locked by the killed process (the kernel drops the lock
    with it); the redelivered task writes the file again at the same offset. The cart ends
    ready, the tar on disk holds every byte right, and nothing but the tar is left.
    """
    uid = f'kill9tar-{uuid.uuid4().hex[:8]}'
    size = 96 * MiB
    fileids, expected, archive_ids = _big_files(logged_archive, uid, size)
    url = fresh_database('sqlite', tmp_path)
    stack = _two_worker_stack(logged_archive, tmp_path, url, share)
    try:
        stack.start()
        assert stack.post(uid, fileids, bundle=True).status_code == 201

        def staging_tar_filling() -> bool:
            tars = list(stack.volume.glob('*/.bundle.tar'))
            if not tars:
                return False
            try:
                written = tars[0].stat().st_blocks * 512  # sparse: what has been written so far
            except FileNotFoundError:
                return False
            return 8 * MiB < written < 2 * size and _worker_holding(stack, tars[0]) is not None

        wait_until(staging_tar_filling, 90, 'a worker writing into the staging tar', stack, interval=0.01, uid=uid)
        staging = next(stack.volume.glob('*/.bundle.tar'))
        victim = _worker_holding(stack, staging)
        assert victim is not None
        victim.kill9()
        wait_ready(stack, uid, 150)
        assert_cart_whole(stack, uid, expected)
        cart_dir = staging.parent
        assert sorted(entry.name for entry in cart_dir.iterdir()) == [f'{uid}.tar'], stack.logs()
        with tarfile.open(cart_dir / f'{uid}.tar', mode='r:') as on_disk:
            digests = {}
            for member in on_disk.getmembers():
                if member.isfile():
                    reader = on_disk.extractfile(member)
                    assert reader is not None
                    digests[member.name.split('/', 1)[1]] = hashlib.file_digest(reader, 'sha256').hexdigest()
        assert digests == expected
        gets = archive_gets(logged_archive)
        assert sum(gets[archive_id] for archive_id in archive_ids.values()) > 3, f'no file was fetched again: {gets}'
    finally:
        stack.stop()
        drop_database('sqlite', url)
        for archive_id in archive_ids.values():
            logged_archive.path_for(archive_id).unlink(missing_ok=True)
        shutil.rmtree(stack.volume, ignore_errors=True)


# ---- 2. the broker restarts while a cart stages; a POST while it is down --------------------------


@pytest.fixture(scope='module')
def private_rabbit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRabbit]:
    """A RabbitMQ node of this module's own, so it can be stopped without touching the shared broker.

    Tests may stop and start it; each leaves it running.
    """
    if rabbitmq_server_script() is None:
        pytest.skip('RabbitMQ is not installed here (no rabbitmq-server script): cannot run a private node')
    node = PrivateRabbit(tmp_path_factory.mktemp('rabbit'))
    try:
        node.start()
    except RuntimeError as exc:
        node.stop()
        pytest.skip(f'a private RabbitMQ node could not be started on this machine: {exc}')
    try:
        yield node
    finally:
        node.stop()


def _ensure_running(node: PrivateRabbit) -> None:
    if node.process is None or not node.process.running():
        node.start()


def _broker_stack(archive: ArchiveServer, node: PrivateRabbit, tmp_path: pathlib.Path, url: str,
                  share: bool) -> CartStack:
    return CartStack(tmp_path / 'stack', archive, url, workers=1, concurrency=1, share_staged_files=share,
                     overrides={'cartd': {'stage_batch_size': '1', 'stage_concurrency': '1', **RECONCILE},
                                'celery': {'broker_url': node.url}})


def test_broker_restart_while_staging(logged_archive: ArchiveServer, private_rabbit: PrivateRabbit,
                                      tmp_path: pathlib.Path, share: bool) -> None:
    """Stop RabbitMQ (cleanly) mid-staging and start it again on the same port and data: the cart ends ready.

    The queue is durable and its messages persistent, so the batches still queued survive the
    restart; the one running when the broker went away finishes, and its redelivery is a no-op.
    """
    uid = f'rabbit-{uuid.uuid4().hex[:8]}'
    fileids, expected = small_files(logged_archive, uid, 400)
    archive_ids = {entry['path']: entry['id'] for entry in fileids}
    url = fresh_database('sqlite', tmp_path)
    stack = _broker_stack(logged_archive, private_rabbit, tmp_path, url, share)
    try:
        stack.start()
        assert stack.post(uid, fileids).status_code == 201
        wait_until(lambda: len(staged_inodes(stack, uid)) >= 30, 60, '30 files staged', stack, uid=uid)
        depth = private_rabbit.queue_depth(stack.queue)
        private_rabbit.stop()
        assert private_rabbit.process is not None and not private_rabbit.process.running()
        before = staged_inodes(stack, uid)
        assert len(before) < len(fileids), 'the cart finished before the broker went down: nothing was tested'
        assert depth and depth > 100, f'only {depth} messages were queued when the broker stopped'
        time.sleep(3)  # a while with no broker at all
        assert head_state(stack, uid)[:2] == (204, 'staging')

        private_rabbit.start()
        wait_ready(stack, uid, 150)

        assert_cart_whole(stack, uid, expected)
        assert_not_fetched_again(logged_archive, before, staged_inodes(stack, uid), archive_ids)
    finally:
        stack.stop()
        _ensure_running(private_rabbit)
        drop_database('sqlite', url)


def test_post_while_broker_is_down(logged_archive: ArchiveServer, private_rabbit: PrivateRabbit, tmp_path: pathlib.Path,
                                   share: bool) -> None:
    """A POST while the broker is down is accepted (201), says it waits for the task queue, and ends ready.

    Nothing can be queued at POST time; the rows are committed, and a worker's reconciler
    queues the cart once the broker is back.
    """
    uid = f'rabbit-down-{uuid.uuid4().hex[:8]}'
    fileids, expected = small_files(logged_archive, uid, 20)
    url = fresh_database('sqlite', tmp_path)
    stack = _broker_stack(logged_archive, private_rabbit, tmp_path, url, share)
    try:
        stack.start()
        # the server's connection to the broker is made (and pooled) before the broker goes
        warm_uid = f'warm-{uuid.uuid4().hex[:8]}'
        warm_ids, warm_expected = small_files(logged_archive, warm_uid, 2)
        assert stack.post(warm_uid, warm_ids).status_code == 201
        wait_ready(stack, warm_uid, 60)
        private_rabbit.stop()

        started = time.monotonic()
        try:
            answer = requests.post(f'{stack.url}/{uid}', json={'fileids': fileids}, timeout=12)
        except requests.Timeout:
            raise AssertionError('POST got no answer within 12 s while the broker was down\n'
                                 f'{stack.logs()}') from None
        took = time.monotonic() - started
        assert answer.status_code == 201, answer.text
        messages: List[str] = []

        def says_waiting() -> bool:
            status, wire, message = head_state(stack, uid)
            messages.append(f'{status} {wire} {message}')
            return status == 204 and wire == 'staging' and 'task queue' in message.lower()

        wait_until(says_waiting, 15, 'HEAD to say the cart waits for the task queue', stack, interval=0.2)
        assert stack.download(uid).status_code == 202

        private_rabbit.start()
        wait_ready(stack, uid, 60)
        assert_cart_whole(stack, uid, expected)
        assert_cart_whole(stack, warm_uid, warm_expected)
        assert took < 12
    finally:
        _ensure_running(private_rabbit)  # also lets a POST stuck on the broker finish before the stop
        stack.stop()
        drop_database('sqlite', url)


# ---- 3. the REST server restarts while a cart stages ---------------------------------------------


def test_server_restart_while_staging(logged_archive: ArchiveServer, tmp_path: pathlib.Path, share: bool) -> None:
    """Stop the server (SIGTERM), start another on the same port, later SIGKILL and start again: cart ends ready."""
    uid = f'server-{uuid.uuid4().hex[:8]}'
    fileids, expected = small_files(logged_archive, uid, 250)
    archive_ids = {entry['path']: entry['id'] for entry in fileids}
    url = fresh_database('sqlite', tmp_path)
    stack = CartStack(tmp_path / 'stack', logged_archive, url, workers=1, concurrency=1, share_staged_files=share,
                      overrides={'cartd': {'stage_batch_size': '1', 'stage_concurrency': '1', **RECONCILE}})
    try:
        stack.start()
        port = stack.port
        assert stack.post(uid, fileids).status_code == 201
        wait_until(lambda: len(staged_inodes(stack, uid)) >= 20, 60, '20 files staged', stack, uid=uid)

        first = stack.server
        assert first is not None
        assert first.stop() == 0, first.log_tail()  # a clean stop on SIGTERM
        assert head_state(stack, uid)[0] is None  # nobody answers now
        before = staged_inodes(stack, uid)
        assert len(before) < len(fileids), 'the cart finished before the server went down: nothing was tested'
        stack.start_server()
        assert stack.port == port
        status, wire, _message = head_state(stack, uid)
        assert (status, wire) in ((204, 'staging'), (204, 'ready'))
        if wire == 'staging':
            assert stack.download(uid).status_code == 202

        wait_until(lambda: len(staged_inodes(stack, uid)) >= len(before) + 20, 60, '20 more files staged',
                   stack, uid=uid)
        second = stack.server
        assert second is not None and second is not first
        second.kill9()
        stack.start_server()
        assert stack.port == port

        wait_ready(stack, uid, 120)
        assert_cart_whole(stack, uid, expected)
        assert_not_fetched_again(logged_archive, before, staged_inodes(stack, uid), archive_ids)
    finally:
        stack.stop()
        drop_database('sqlite', url)


# ---- 4. the database refuses connections for a while ---------------------------------------------


def _pg_admin(statement: str) -> None:
    _admin_execute('postgres', statement)


def test_database_unavailable_while_staging(logged_archive: ArchiveServer, tmp_path: pathlib.Path, share: bool) -> None:
    """PostgreSQL refuses the cart's database for ~10 s (connections cut too): the reconciler re-drives it.

    Tasks that meet the outage fail and are acknowledged (a failure is not a crash), so it
    is the reconciler that queues the cart's unfinished files again; pooled connections the
    server killed must be replaced, not reused.
    """
    if not server_available('postgres'):
        pytest.skip('PostgreSQL is not answering on 127.0.0.1:5432')
    uid = f'pg-{uuid.uuid4().hex[:8]}'
    fileids, expected = small_files(logged_archive, uid, 300)
    archive_ids = {entry['path']: entry['id'] for entry in fileids}
    url = fresh_database('postgres', tmp_path)
    name = url.rsplit('/', 1)[1]
    assert re.fullmatch(r'cartd_t_[0-9a-z_]+', name)
    stack = CartStack(tmp_path / 'stack', logged_archive, url, workers=2, concurrency=1, share_staged_files=share,
                      overrides={'cartd': {'stage_batch_size': '1', 'stage_concurrency': '1', **RECONCILE}})
    blocked = False
    try:
        stack.start()
        assert stack.post(uid, fileids).status_code == 201
        wait_until(lambda: len(staged_inodes(stack, uid)) >= 30, 60, '30 files staged', stack, uid=uid)

        # Only files the database recorded as staged are verified; a file renamed into place
        # whose record had not been committed when the database went away may be fetched again.
        dumped = stack.run_cmd('dump', '--json')
        assert dumped.returncode == 0, dumped.stderr
        recorded = {entry['path'] for cart in json.loads(dumped.stdout) if cart['uid'] == uid
                    for entry in cart['files'] if entry['status'] == 'staged'}
        _pg_admin(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
        blocked = True
        _pg_admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
        before = {path: inode for path, inode in staged_inodes(stack, uid).items() if path in recorded}
        assert len(before) < len(fileids), 'the cart finished before the outage: nothing was tested'
        outage_end = time.monotonic() + 10
        during: List[Tuple[Optional[int], str, str]] = []
        while time.monotonic() < outage_end:
            # connections that slipped in between the two statements are cut again
            _pg_admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
            during.append(head_state(stack, uid))
            time.sleep(1)
        _pg_admin(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
        blocked = False
        assert any(state[0] == 500 for state in during), f'the server answered normally during the outage: {during}'
        assert all(state[0] in (204, 500) for state in during), during

        # right after the outage the server answers again (dead pooled connections are not reused)
        wait_until(lambda: head_state(stack, uid)[0] == 204, 10, 'HEAD to answer 204 after the outage', stack)
        seen = wait_ready(stack, uid, 120)
        assert all(state[0] == 204 for state in seen), f'errors after the database came back: {seen}'

        assert_cart_whole(stack, uid, expected)
        assert_not_fetched_again(logged_archive, before, staged_inodes(stack, uid), archive_ids)
        logs = ''.join(worker.log_path.read_text(errors='replace') for worker in stack.workers)
        assert 'Re-queued' in logs, 'the cart was not re-driven by a reconciler'
    finally:
        if blocked:
            _pg_admin(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
        stack.stop()
        drop_database('postgres', url)


# ---- 5. a long download is progress, not a stall -------------------------------------------------


class SlowArchive:
    """A proxy to the real archive that sends GET bodies at a fixed rate, so one download lasts a while."""

    def __init__(self, upstream: str, bytes_per_second: int) -> None:
        """Forward to `upstream` (ending in '/'); nothing listens until start()."""
        self.upstream = upstream
        self.rate = bytes_per_second
        self.server: Optional[http.server.ThreadingHTTPServer] = None
        self.thread: Optional[threading.Thread] = None
        self.stopping = threading.Event()

    @property
    def url(self) -> str:
        """The proxy's base URL, for the cart's archive url."""
        assert self.server is not None
        return f'http://127.0.0.1:{self.server.server_address[1]}/'

    def start(self) -> 'SlowArchive':
        """Listen on 127.0.0.1 and a free port, in a daemon thread."""
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = 30

            def log_message(self, format: str, *args: object) -> None:  # pylint: disable=redefined-builtin
                del format, args

            def _forward(self, method: str) -> None:
                upstream = requests.request(method, proxy.upstream + self.path.lstrip('/'), stream=True,
                                            timeout=30)
                with upstream:
                    self.send_response(upstream.status_code)
                    for key, value in upstream.headers.items():
                        if key.lower() not in ('connection', 'keep-alive', 'transfer-encoding', 'server', 'date'):
                            self.send_header(key, value)
                    self.end_headers()
                    if method != 'GET':
                        return
                    block = max(proxy.rate // 10, 1)
                    try:
                        for piece in upstream.iter_content(block):
                            if proxy.stopping.is_set():
                                return
                            self.wfile.write(piece)
                            time.sleep(len(piece) / proxy.rate)
                    except (BrokenPipeError, ConnectionResetError):
                        return  # the downloading worker went away (stopped at the end of the test)

            def do_HEAD(self) -> None:  # pylint: disable=invalid-name
                self._forward('HEAD')

            def do_GET(self) -> None:  # pylint: disable=invalid-name
                self._forward('GET')

            def do_POST(self) -> None:  # pylint: disable=invalid-name
                self._forward('POST')

        self.server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name='slow-archive', daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop serving (bodies in flight are cut)."""
        self.stopping.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def test_long_download_is_not_redriven(logged_archive: ArchiveServer, tmp_path: pathlib.Path, share: bool) -> None:
    """A file that takes ~8 s to arrive, with stall_timeout 2 s: the cart is not re-queued, the file is fetched once."""
    uid = f'slow-{uuid.uuid4().hex[:8]}'
    size = 24 * MiB
    archive_id = f'{uid}-big'
    digest = _write_big_file(logged_archive.path_for(archive_id), 7, size, os.urandom(MiB))
    fileids = [{'id': archive_id, 'path': 'slow.bin', 'hashtype': 'sha256', 'hashsum': digest}]
    slow = SlowArchive(logged_archive.url, 3 * MiB).start()
    url = fresh_database('sqlite', tmp_path)
    stack = CartStack(tmp_path / 'stack', logged_archive, url, workers=2, concurrency=1, share_staged_files=share,
                      overrides={'cartd': {'stage_batch_size': '1', 'stage_concurrency': '1',
                                           'stall_timeout': '2', 'reconcile_interval': '0.5'},
                                 'archiveinterface': {'url': slow.url, 'timeout': '30'}})
    try:
        stack.start()
        assert stack.post(uid, fileids).status_code == 201
        wait_ready(stack, uid, 90)
        assert_cart_whole(stack, uid, {'slow.bin': digest})
        logs = ''.join(worker.log_path.read_text(errors='replace') for worker in stack.workers)
        requeued = [line for line in logs.splitlines() if 'Re-queued' in line]
        assert archive_gets(logged_archive)[archive_id] == 1 and not requeued, (
            f'GETs: {archive_gets(logged_archive)[archive_id]}; re-queued while downloading: {requeued[:3]}')
    finally:
        stack.stop()
        slow.stop()
        drop_database('sqlite', url)
        logged_archive.path_for(archive_id).unlink(missing_ok=True)
