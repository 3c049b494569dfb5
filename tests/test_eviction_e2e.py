"""LRU eviction through the real processes, on a real size-limited filesystem.

test_eviction.py checks the policy at the service level with a fake archive. Here the same
rules are checked end to end: the volume is a tmpfs mounted with a size limit, the files come
from the real archive interface (through cartd_testkit.faultproxy, so one cart can be held on
"tape"), real celery workers stage them over RabbitMQ, and clients talk to the real
pacifica-cartd server. One stack per database, with share_staged_files off and on (the
staged-file cache): each file is then staged into the cache and linked into its cart, and a
cart's eviction frees its bytes only once its entries, pinned by no live cart, go too. The
last test checks what sharing adds: an entry no live cart pins goes before any ready cart,
and no eviction or DELETE takes bytes a remaining cart links.

How old a cart looks is set in the database (its `updated_date`, the time of its last use):
real hours cannot pass in a test. Uses that matter are made for real: a GET marks a cart
used, and a cart that just became ready counts as used. lru_buffer_time is 0 (the default),
so a recent use protects a cart only through the in-use window that covers downloads, except
in the test that restarts the worker with a buffer of 30 minutes.

Sizes: files of 512 KiB. Before the cart that needs room is posted, the rest of the volume
is filled with a file of other data so that exactly 256 KiB stay free; a 512 KiB file then
needs one evicted 512 KiB cart, two such files need two. Each cart's files are its own in the
archive (no two carts share one), except in the test about sharing.
"""
from __future__ import annotations

import datetime
import hashlib
import os
import time
from typing import Callable, Dict, Iterator, Optional, Sequence, cast

import pytest
import requests

from pacifica.cartd import database
from pacifica.cartd.orm import Cart, CartTasks, StagedFile, now
from cartd_testkit.archive import ArchiveServer
from cartd_testkit.faultproxy import FaultProxy, ProxiedArchive
from cartd_testkit.stack import KINDS_AND_CACHE_MODES, CartStack, cache_id, kind_and_cache_id, tar_contents
from cartd_testkit.tmpfs import VolumeTest, running_on_tmpfs

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KIB = 1024
FILE_SIZE = 512 * KIB
LEFT_FREE = FILE_SIZE // 2  # free bytes when the cart that needs room arrives
VOLUME_SIZE = '8m'  # the largest scenario holds about 5 MiB of carts; the rest is filled
BUFFER_MINUTES = 30  # lru_buffer_time of the test that sets one: carts used in the last 30 minutes stay
NO_SPACE = 'No space left on the volume'
EVICTED = 'evicted to make room on the volume'


@pytest.fixture(scope='module', params=KINDS_AND_CACHE_MODES, ids=kind_and_cache_id)
def stack(request: pytest.FixtureRequest, archive: ArchiveServer, proxy: FaultProxy,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[CartStack]:
    """Server and one worker on each database, share_staged_files off and on, volume_path on an 8 MiB tmpfs."""
    kind, share = request.param
    # tape_wait 60: a cart held on tape is looked at again (and marked alive) only after the test
    # is done with it; no reconciler, so nothing but the test and the carts' own work touches a cart.
    proxied = cast(ArchiveServer, ProxiedArchive(archive, proxy))
    with running_on_tmpfs(kind, tmp_path_factory.mktemp(f'evict-{kind}-{cache_id(share)}'), proxied, VOLUME_SIZE,
                          overrides={'cartd': {'lru_buffer_time': '0', 'lru_purge': 'on', 'reconcile_interval': '0'},
                                     'archiveinterface': {'tape_wait': '60', 'tape_wait_max': '60'}},
                          share_staged_files=share) as cart:
        yield cart


def restart_worker(stack: CartStack, lru_buffer_seconds: int) -> None:
    """Set lru_buffer_time in the config file and replace the worker (evictions happen in workers)."""
    text = stack.config.read_text(encoding='utf-8')
    line = next(line for line in text.splitlines() if line.startswith('lru_buffer_time = '))
    stack.config.write_text(text.replace(line, f'lru_buffer_time = {lru_buffer_seconds}'), encoding='utf-8')
    for worker in stack.workers:
        worker.stop()
    stack.workers.clear()
    stack.start_worker()
    stack.wait_workers_ready()


class Carts(VolumeTest):
    """The carts one test makes: archive files, POST, waiting, ageing, and what each should hold."""

    def __init__(self, stack: CartStack) -> None:
        """The test's files carts share by name are FILE_SIZE bytes each."""
        super().__init__(stack, FILE_SIZE)
        self.bundle = False  # POST carts with "bundle": this (their tar written on the volume)
        self.expected: Dict[str, Dict[str, bytes]] = {}

    def post(self, name: str, sizes: Sequence[int] = (), shared: Sequence[str] = ()) -> requests.Response:
        """POST a cart of new archive files of these sizes (the cart's own), and of the test's archive
        files named in `shared` (FILE_SIZE bytes each, put in the archive when first named)."""
        uid = self.uid(name)
        fileids, expected = [], {}
        for index, size in enumerate(sizes):
            data = os.urandom(size)
            sums = self.stack.archive.put(f'{uid}-{index}', data)
            fileids.append({'id': f'{uid}-{index}', 'path': f'part{index}.bin', 'hashtype': 'sha1',
                            'hashsum': sums['sha1']})
            expected[f'part{index}.bin'] = data
        for file in shared:
            archive_id = self.files.archive_id(file)
            fileids.append({'id': archive_id, 'path': f'{file}.bin', 'hashtype': 'sha1',
                            'hashsum': hashlib.sha1(self.files.data[archive_id]).hexdigest()})
            expected[f'{file}.bin'] = self.files.data[archive_id]
        self.expected[name] = expected
        answer = self.stack.post(uid, fileids, bundle=self.bundle)
        assert answer.status_code == 201, answer.text
        return answer

    def entry_states(self, names: Sequence[str]) -> Dict[str, Optional[str]]:
        """Cart name -> the state of the cache entry of its own first file (None when it has none), in order."""
        ids = {f'{self.uid(name)}-0': name for name in names}
        with database.connection():
            rows = StagedFile.select(StagedFile.archive_id, StagedFile.state).where(
                StagedFile.archive_id.in_(list(ids)))
            states = {ids[row.archive_id]: row.state for row in rows}
        return {name: states.get(name) for name in names}

    def wait_final(self, name: str, tick: Callable[[], None] = lambda: None,
                   deadline_s: float = 60) -> requests.Response:
        """Poll HEAD until the cart stops staging, calling tick() between polls."""
        deadline = time.monotonic() + deadline_s
        while True:
            answer = self.stack.head(self.uid(name))
            if answer.headers.get('X-Pacifica-Status') != 'staging':
                return answer
            assert time.monotonic() < deadline, (
                f'{name} still staging after {deadline_s} s, saying {answer.headers.get("X-Pacifica-Message")!r}; '
                f'status document {self._document(name)}\n{self.stack.logs()}')
            tick()
            time.sleep(0.1)

    def _document(self, name: str) -> object:
        """The cart's status document with every file (for a failure's message)."""
        answer = requests.get(f'{self.stack.url}/{self.uid(name)}/status', params={'files': 'all'}, timeout=30)
        return answer.json() if answer.status_code == 200 else answer.status_code

    def ready(self, name: str, sizes: Sequence[int], minutes_ago: float, shared: Sequence[str] = ()) -> None:
        """Make a cart (see post), wait until it is ready, then make its last use `minutes_ago` minutes old."""
        self.post(name, sizes, shared)
        answer = self.wait_final(name)
        assert (answer.status_code, answer.headers['X-Pacifica-Status']) == (204, 'ready'), (
            answer.headers.get('X-Pacifica-Message'), self.stack.logs())
        self.age(name, minutes_ago)

    def age(self, name: str, minutes_ago: float) -> None:
        """Set the cart's last use to `minutes_ago` minutes ago."""
        with database.connection():
            aged = (Cart.update(updated_date=now() - datetime.timedelta(minutes=minutes_ago))
                    .where((Cart.cart_uid == self.uid(name)) & (Cart.status != 'deleted')).execute())
        assert aged == 1

    def row(self, name: str) -> Cart:
        """The cart's row (there is one per uid here)."""
        with database.connection():
            return Cart.get(Cart.cart_uid == self.uid(name))

    def task_count(self, name: str) -> int:
        """Tasks queued for the cart so far (a tape re-check adds one)."""
        with database.connection():
            return CartTasks.select().join(Cart).where(Cart.cart_uid == self.uid(name)).count()

    def cleanup(self) -> None:
        """Remove every cart of the test, and all else it left (VolumeTest.remove_all)."""
        self.remove_all(self.expected)

    # ---- what a client sees ----------------------------------------------------------

    def assert_whole(self, name: str) -> None:
        """The cart is ready and its tar holds exactly the bytes put in the archive."""
        answer = self.stack.download(self.uid(name), f'{name}.tar')
        assert answer.status_code == 200, (name, answer.status_code, answer.text[:300])
        assert tar_contents(answer.content) == {f'{name}/{path}': data
                                                for path, data in self.expected[name].items()}

    def assert_evicted(self, name: str) -> None:
        """The cart was evicted: gone for clients, its files and uid link gone from the volume."""
        uid = self.uid(name)
        head = self.stack.head(uid)
        assert (head.status_code, head.headers['X-Pacifica-Status']) == (404, 'error'), (name, head.headers)
        assert head.headers['X-Pacifica-Message'] == f'No cart with uid {uid} found'
        assert self.stack.download(uid).status_code == 404
        row = self.row(name)
        assert (row.status, row.error) == ('deleted', EVICTED), name
        assert not (self.stack.volume / str(row.id)).exists(), name
        assert not os.path.lexists(self.stack.volume / 'cartuids' / uid), name

    def assert_volume_never_ran_out(self) -> None:
        """No download of this test's carts met a full volume (ENOSPC): reservations kept them apart."""
        lines = [line for log in sorted(self.stack.base_dir.glob('worker*.log'))
                 for line in log.read_text(encoding='utf-8', errors='replace').splitlines()
                 if self.tag in line and 'No space left on device' in line]
        assert lines == [], lines[:3]

    def assert_state(self, name: str, status: int, wire: str) -> requests.Response:
        """HEAD answers this status code and X-Pacifica-Status."""
        head = self.stack.head(self.uid(name))
        assert (head.status_code, head.headers['X-Pacifica-Status']) == (status, wire), (
            name, head.headers.get('X-Pacifica-Message'), self.stack.logs())
        return head


@pytest.fixture
def carts(stack: CartStack) -> Iterator[Carts]:
    """This test's carts on the shared stack; all deleted afterwards, so the next test finds an empty volume."""
    made = Carts(stack)
    try:
        yield made
    finally:
        made.cleanup()


@pytest.mark.parametrize('bundle', [False, True], ids=['files', 'bundle'])
def test_least_recently_used_carts_go_first(carts: Carts, proxy: FaultProxy, bundle: bool) -> None:
    """Eviction follows last use, not creation; a recently downloaded cart and a staging cart stay."""
    carts.bundle = bundle
    # held: its file stays on "tape", so the cart stays staging; it looks the oldest of all.
    held_id = f'{carts.uid("held")}-0'
    proxy.rule(held_id, 'tape', times=None)
    carts.post('held', [FILE_SIZE])
    deadline = time.monotonic() + 30
    while carts.task_count('held') < 2:  # the worker saw "tape", asked for a recall and re-queued
        assert time.monotonic() < deadline, carts.stack.logs()
        time.sleep(0.1)
    carts.age('held', 360)

    # created in the order 1..5; last used in the order 2, 4, 3, 5, 1 (just now)
    carts.ready('c1', [FILE_SIZE], minutes_ago=300)
    carts.ready('c2', [FILE_SIZE], minutes_ago=240)
    carts.ready('c3', [FILE_SIZE], minutes_ago=120)
    carts.ready('c4', [FILE_SIZE], minutes_ago=180)
    carts.ready('c5', [FILE_SIZE], minutes_ago=10)
    carts.assert_whole('c1')  # a download is a use: c1 is now the most recently used

    carts.leave_free(LEFT_FREE)
    carts.post('new', [FILE_SIZE, FILE_SIZE])  # needs two evicted carts' room
    answer = carts.wait_final('new')
    assert (answer.status_code, answer.headers['X-Pacifica-Status']) == (204, 'ready'), (
        answer.headers.get('X-Pacifica-Message'), carts.stack.logs())
    carts.assert_whole('new')

    if bundle and carts.stack.share_staged_files:
        # A ready bundle cart pins no cache entry (its tar holds every byte), so the entries of c1..c5
        # go first, least recently used (staged) first, and every cart stays. Each new file takes room
        # twice, as its entry and in its region of the tar: two entries or more went.
        left = carts.entry_states(['c1', 'c2', 'c3', 'c4', 'c5'])
        gone = [name for name, state in left.items() if state is None]
        assert len(gone) >= 2 and gone == list(left)[:len(gone)], (left, carts.stack.logs())
        for name in ['c1', 'c2', 'c3', 'c4', 'c5']:
            carts.assert_whole(name)
    else:
        carts.assert_evicted('c2')
        carts.assert_evicted('c4')
        # In bundle mode the new cart's files are written in place into its tar: what they have
        # written of their regions is on disk already and not counted again, so c3 stays too.
        for name in ['c1', 'c5', 'c3']:
            carts.assert_whole(name)
    carts.assert_state('held', 204, 'staging')
    assert carts.row('held').status == 'staging'
    assert proxy.count('GET', held_id) == 0
    assert carts.part_files() == []
    carts.assert_volume_never_ran_out()


class SlowClient:
    """A GET of a cart's tar read a few KiB at a time, as a slow client would."""

    def __init__(self, stack: CartStack, uid: str, filename: str) -> None:
        """Send the GET; its headers are in (so the server has counted the use), the body not read."""
        self.response = requests.get(f'{stack.url}/{uid}', params={'filename': filename}, stream=True, timeout=60)
        assert self.response.status_code == 200, self.response.text
        self.size = int(self.response.headers['Content-Length'])
        self.received = bytearray()

    def tick(self) -> None:
        """Read a little more."""
        self.received += self.response.raw.read(4 * KIB)

    def finish(self) -> bytes:
        """Read the rest and return the whole body."""
        for _ in range(self.size // (64 * KIB) + 2):
            piece = self.response.raw.read(64 * KIB)
            if not piece:
                break
            self.received += piece
        self.response.close()
        return bytes(self.received)


def test_cart_being_downloaded_is_not_evicted(carts: Carts) -> None:
    """A slow download of the oldest cart goes on while other carts are evicted, and ends intact."""
    carts.ready('reading', [FILE_SIZE] * 4, minutes_ago=300)
    carts.ready('old1', [FILE_SIZE], minutes_ago=240)
    carts.ready('old2', [FILE_SIZE], minutes_ago=180)
    carts.leave_free(LEFT_FREE)

    client = SlowClient(carts.stack, carts.uid('reading'), 'reading.tar')
    client.tick()
    carts.post('new', [FILE_SIZE, FILE_SIZE])  # room from old1 and old2
    answer = carts.wait_final('new', tick=client.tick)
    assert answer.headers['X-Pacifica-Status'] == 'ready', (answer.headers.get('X-Pacifica-Message'),
                                                             carts.stack.logs())
    # Only 'reading' could make room now ('new' has just been used by finishing): it must not.
    carts.post('more', [FILE_SIZE])
    answer = carts.wait_final('more', tick=client.tick)
    assert (answer.status_code, answer.headers['X-Pacifica-Status']) == (500, 'error'), carts.stack.logs()
    assert NO_SPACE in answer.headers['X-Pacifica-Message']
    assert len(client.received) < client.size, 'the download ended before the evictions: nothing was tested'

    body = client.finish()
    assert len(body) == client.size
    assert tar_contents(body) == {f'reading/{path}': data for path, data in carts.expected['reading'].items()}
    carts.assert_state('reading', 204, 'ready')
    carts.assert_evicted('old1')
    carts.assert_evicted('old2')
    carts.assert_whole('new')
    carts.assert_whole('reading')
    carts.assert_volume_never_ran_out()


@pytest.fixture
def buffered_stack(stack: CartStack) -> Iterator[CartStack]:
    """The stack with lru_buffer_time set to BUFFER_MINUTES for one test, then back to 0."""
    restart_worker(stack, BUFFER_MINUTES * 60)
    try:
        yield stack
    finally:
        restart_worker(stack, 0)


def test_cart_that_cannot_fit_fails_and_protected_carts_stay(buffered_stack: CartStack, carts: Carts) -> None:
    """After the one evictable cart is gone the new cart still does not fit: it fails, saying so."""
    carts.ready('buffered', [FILE_SIZE], minutes_ago=BUFFER_MINUTES / 3)  # inside lru_buffer_time
    carts.ready('used', [FILE_SIZE], minutes_ago=300)
    carts.assert_whole('used')  # used just now
    carts.ready('old', [FILE_SIZE], minutes_ago=200)
    carts.leave_free(LEFT_FREE)

    carts.post('toobig', [FILE_SIZE] * 3)
    answer = carts.wait_final('toobig')
    assert (answer.status_code, answer.headers['X-Pacifica-Status']) == (500, 'error'), buffered_stack.logs()
    message = answer.headers['X-Pacifica-Message']
    assert message.startswith('Failed to pull file(part') and f'{NO_SPACE} for {FILE_SIZE} bytes' in message, message
    assert buffered_stack.download(carts.uid('toobig')).status_code == 202

    carts.assert_evicted('old')  # it was tried, and was not enough
    carts.wait_no_part_files()
    carts.assert_whole('buffered')
    carts.assert_whole('used')
    assert not (buffered_stack.volume / 'cartuids' / carts.uid('toobig')).exists()
    carts.assert_volume_never_ran_out()


def test_a_failed_carts_files_go_before_a_ready_cart(carts: Carts, proxy: FaultProxy) -> None:
    """A failed cart's verified files are the first to go, though a ready cart was used longer ago.

    Its row stays: HEAD answers the same error as before, GET 202; only its directory is gone.
    """
    # failed: part0 stages; part1 arrives with a byte flipped on every GET, so it fails after two downloads.
    # part1's first HEAD waits 2 s, so part0 is staged before the cart fails (else its download may be
    # stopped by the failure, and nothing is left to evict: seen once in CI)
    proxy.rule(f'{carts.uid("failed")}-1', 'hang', times=1, methods='HEAD', seconds=2)
    proxy.rule(f'{carts.uid("failed")}-1', 'flip', times=None)
    carts.post('failed', [FILE_SIZE, FILE_SIZE])
    before = carts.wait_final('failed')
    assert (before.status_code, before.headers['X-Pacifica-Status']) == (500, 'error'), before.headers
    failed = carts.row('failed')
    assert failed.files_staged == 1, 'precondition: the failed cart kept its verified file on the volume'
    assert (carts.stack.volume / str(failed.id) / carts.uid('failed') / 'part0.bin').is_file()
    carts.age('failed', 60)
    carts.ready('old', [FILE_SIZE], minutes_ago=300)

    carts.leave_free(LEFT_FREE)
    carts.post('new', [FILE_SIZE])  # needs one cart's room
    answer = carts.wait_final('new')
    assert (answer.status_code, answer.headers['X-Pacifica-Status']) == (204, 'ready'), (
        answer.headers.get('X-Pacifica-Message'), carts.stack.logs())
    carts.assert_whole('new')
    carts.assert_whole('old')

    after = carts.stack.head(carts.uid('failed'))
    assert (after.status_code, after.headers['X-Pacifica-Status'], after.headers['X-Pacifica-Message']) == \
        (500, 'error', before.headers['X-Pacifica-Message'])
    assert carts.stack.download(carts.uid('failed')).status_code == 202
    row = carts.row('failed')
    assert (row.status, row.files_staged, row.deleted_date is not None) == ('error', 1, True)  # counters never go down
    assert after.headers['X-Pacifica-Files-Staged'] == '1'
    assert not (carts.stack.volume / str(row.id)).exists()
    assert carts.part_files() == []
    carts.assert_volume_never_ran_out()


def test_with_the_cache_an_unpinned_entry_goes_first_and_no_cart_loses_bytes_it_links(carts: Carts) -> None:
    """share_staged_files: an entry no live cart pins goes before a ready cart used much longer ago; a ready
    cart's eviction frees the bytes of its entries no other cart pins, and only those; after the DELETE
    and the evictions every cart left downloads whole."""
    if not carts.stack.share_staged_files:
        pytest.skip('about the staged-file cache: share_staged_files on only')
    carts.ready('dropped', [], minutes_ago=1, shared=['both', 'dropped-only'])
    carts.ready('old', [], minutes_ago=300, shared=['both', 'linked'])
    carts.ready('young', [], minutes_ago=200, shared=['linked', 'own'])
    assert carts.entries() == dict.fromkeys(['both', 'dropped-only', 'linked', 'own'], 'ready')
    assert carts.stack.delete(carts.uid('dropped')).status_code == 200  # 'dropped-only' is pinned by no cart now
    carts.assert_whole('old')  # the DELETE left the bytes of 'both' to the cart that links them
    carts.age('old', 300)
    assert carts.entries() == dict.fromkeys(['both', 'dropped-only', 'linked', 'own'], 'ready')

    carts.leave_free(LEFT_FREE)
    # Room for two files: the unpinned entry (used a minute ago) before any ready cart; then the
    # least recently used cart, 'old', and its entry 'both' that no cart pins any more; never 'linked',
    # which 'young' (as evictable as 'old', but used later) still pins.
    carts.post('new', [FILE_SIZE, FILE_SIZE])
    answer = carts.wait_final('new')
    assert (answer.status_code, answer.headers['X-Pacifica-Status']) == (204, 'ready'), (
        answer.headers.get('X-Pacifica-Message'), carts.stack.logs())
    assert carts.entries() == {'linked': 'ready', 'own': 'ready'}, carts.stack.logs()
    carts.assert_evicted('old')
    carts.assert_state('young', 204, 'ready')
    carts.assert_whole('young')
    carts.assert_whole('new')
    assert carts.part_files() == []
    carts.assert_volume_never_ran_out()
