"""The staged-file cache (share_staged_files) on a temp SQLite file: its key, the claim and its lease,
the digests on record, and the service staging through it (FakeArchive counts the downloads)."""
from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import hashlib
import json
import os
import pathlib
import threading
from typing import Dict, Iterator, List

import pytest
from peewee import OperationalError

from pacifica.cartd import database, stagedfiles
from pacifica.cartd.eviction import evict_one
from pacifica.cartd.orm import Cart, File, NewEntry, ReadyEntry, StagedFile, staged_files_ready
from pacifica.cartd.service import CartService
from pacifica.cartd.staging import StageOutcome
from pacifica.cartd.stagedfiles import Found, StagedFiles, cache_key
from cartd_testkit.fakes import FakeArchive, FakeQueue, run_queue, sqlite_service

DATA = {f'run/{index}': os.urandom(3000 + index) for index in range(3)}


@pytest.fixture
def cleanup() -> Iterator[contextlib.ExitStack]:
    with contextlib.ExitStack() as stack:
        yield stack


def _service(tmp_path: pathlib.Path, cleanup: contextlib.ExitStack, share: str = 'on') -> CartService:
    return sqlite_service(tmp_path, DATA, cleanup, SHARE_STAGED_FILES=share)


def _archive(service: CartService) -> FakeArchive:
    assert isinstance(service.archive, FakeArchive)
    return service.archive


def _fileids(hashtype: str = 'sha1', wrong: str = '') -> List[Dict[str, str]]:
    return [{'id': archive_id, 'path': f'data/{archive_id.replace("/", "_")}', 'hashtype': hashtype,
             'hashsum': hashlib.new(hashtype, b'other bytes' if archive_id == wrong else data).hexdigest()}
            for archive_id, data in DATA.items()]


def _stage(service: CartService, uid: str, fileids: List[Dict[str, str]]) -> Cart:
    assert isinstance(service.queue, FakeQueue)
    cart_id = service.create_cart(uid, {'fileids': fileids})
    run_queue(service, service.queue)
    return Cart.get_by_id(cart_id)


def _cart_files(service: CartService, cart: Cart) -> Dict[str, bytes]:
    return {archive_id: service.volume.file_path(cart.id, cart.cart_uid, f'data/{archive_id.replace("/", "_")}')
            .read_bytes() for archive_id in DATA}


def test_the_key_tells_size_and_mtime_apart() -> None:
    keys = {cache_key('a', 1, None), cache_key('a', 1, 0.0), cache_key('a', 1, 5.0), cache_key('a', 2, 5.0),
            cache_key('b', 1, 5.0), cache_key('a', 1, 5.5)}
    assert len(keys) == 6 and all(len(key) == 64 for key in keys)
    assert cache_key('a', 1, 5.0) == cache_key('a', 1, 5.0)


def test_off_by_default_nothing_is_shared(tmp_path: pathlib.Path, cleanup: contextlib.ExitStack) -> None:
    service = _service(tmp_path, cleanup, share='off')
    assert service.stager.cache is None
    for uid in ('off-1', 'off-2'):
        assert _stage(service, uid, _fileids()).status == 'ready'
    assert len(_archive(service).downloads) == 2 * len(DATA)
    assert StagedFile.select().count() == 0
    assert not (service.volume.root / 'staged-files').exists()
    assert {file.staged_file_id for file in File.select()} == {None}


def test_a_second_cart_is_linked_from_the_cache(tmp_path: pathlib.Path, cleanup: contextlib.ExitStack) -> None:
    service = _service(tmp_path, cleanup)
    first = _stage(service, 'one', _fileids())
    assert first.status == 'ready'
    assert len(_archive(service).downloads) == len(DATA)
    entries = {entry.archive_id: entry for entry in StagedFile.select()}
    assert set(entries) == set(DATA) and {entry.state for entry in entries.values()} == {'ready'}
    second = _stage(service, 'two', _fileids())
    assert second.status == 'ready'
    assert len(_archive(service).downloads) == len(DATA), 'the second cart downloaded again'
    assert _cart_files(service, first) == DATA == _cart_files(service, second)
    for archive_id, entry in entries.items():
        cached = os.stat(service.volume.staged_file_path(entry.id))
        for cart in (first, second):
            linked = os.stat(service.volume.file_path(cart.id, cart.cart_uid,
                                                      f'data/{archive_id.replace("/", "_")}'))
            assert (linked.st_ino, linked.st_dev) == (cached.st_ino, cached.st_dev)
    assert {file.staged_file_id for file in File.select()} == {entry.id for entry in entries.values()}
    assert {StagedFile.get_by_id(entry.id).hits for entry in entries.values()} == {1}

    # Deleting the first cart removes its links only: the second cart and the cache keep their bytes.
    service.delete('one')
    assert _cart_files(service, second) == DATA
    assert all(service.volume.staged_file_path(entry.id).read_bytes() == DATA[archive_id]
               for archive_id, entry in entries.items())


def test_a_cart_whose_hashes_are_on_record_asks_the_archive_nothing(tmp_path: pathlib.Path,
                                                                     cleanup: contextlib.ExitStack) -> None:
    """Linked by the digests on record, in a batch: not even the archive's status is asked (the archive now
    says every file is on tape: a cart that asked would wait for a recall). A cart whose algorithm is not
    on record asks the status of each file, as every first cart does."""
    service = _service(tmp_path, cleanup)
    archive = _archive(service)
    first = _stage(service, 'first', _fileids())
    assert sorted(archive.status_calls) == sorted(DATA)
    archive.media.update({archive_id: 'tape' for archive_id in DATA})
    second = _stage(service, 'second', _fileids())
    assert second.status == 'ready' and _cart_files(service, second) == DATA == _cart_files(service, first)
    assert sorted(archive.status_calls) == sorted(DATA) and not archive.stage_calls
    assert len(archive.downloads) == len(DATA)
    archive.media.clear()
    assert _stage(service, 'md5', _fileids('md5')).status == 'ready'
    assert sorted(archive.status_calls) == sorted([*DATA, *DATA]) and len(archive.downloads) == len(DATA)


def test_claims_made_at_once_from_many_threads_are_settled_together(tmp_path: pathlib.Path,
                                                                    cleanup: contextlib.ExitStack) -> None:
    """Sixteen threads claim at once: of one key, exactly one gets the lease and the others wait for it;
    of sixteen keys, each gets its own entry."""
    cache = _service(tmp_path, cleanup).stager.cache
    assert cache is not None

    def at_once(keys: List[str]) -> List[Found]:
        barrier = threading.Barrier(len(keys))

        def claim(key: str) -> Found:
            barrier.wait(timeout=10)
            with database.connection():
                return cache.find_or_claim(key, 10, None)
        with concurrent.futures.ThreadPoolExecutor(len(keys)) as pool:
            return list(pool.map(claim, keys))

    same = at_once(['same'] * 16)
    assert sum(1 for found in same if found.lease is not None) == 1
    assert all(found.ready is None for found in same)
    assert StagedFile.select().where(StagedFile.archive_id == 'same').count() == 1
    several = at_once([f'key-{index}' for index in range(16)])
    assert all(found.lease is not None for found in several)
    assert len({found.lease.entry_id for found in several if found.lease is not None}) == 16


def test_a_database_failure_while_claims_are_made_reaches_every_caller(
        tmp_path: pathlib.Path, cleanup: contextlib.ExitStack, monkeypatch: pytest.MonkeyPatch) -> None:
    """The database failing under the thread that makes a batch of claims: every caller in the batch gets
    the error (none waits for ever, none is told to wait for a download nobody makes), and the next claim
    is made. Mocked: a real database cannot be made to fail at exactly that statement."""
    cache = _service(tmp_path, cleanup).stager.cache
    assert cache is not None
    real = stagedfiles.insert_staged_files

    def failing(entries: List[NewEntry], lease_until: datetime.datetime) -> None:
        raise OperationalError('the database went away')

    monkeypatch.setattr(stagedfiles, 'insert_staged_files', failing)
    with pytest.raises(OperationalError):
        cache.find_or_claim('x', 10, None)
    monkeypatch.setattr(stagedfiles, 'insert_staged_files', real)
    assert cache.find_or_claim('x', 10, None).lease is not None


def test_another_algorithm_is_computed_once_and_recorded(tmp_path: pathlib.Path,
                                                          cleanup: contextlib.ExitStack) -> None:
    service = _service(tmp_path, cleanup)
    _stage(service, 'sha', _fileids('sha1'))
    assert _stage(service, 'md5', _fileids('md5')).status == 'ready'
    assert len(_archive(service).downloads) == len(DATA)
    for entry in StagedFile.select():
        assert json.loads(entry.digests) == {'sha1': hashlib.sha1(DATA[entry.archive_id]).hexdigest(),
                                             'md5': hashlib.md5(DATA[entry.archive_id]).hexdigest()}


def test_a_wrong_hash_fails_the_cart_and_the_entry_is_fetched_anew(tmp_path: pathlib.Path,
                                                                   cleanup: contextlib.ExitStack) -> None:
    service = _service(tmp_path, cleanup)
    _stage(service, 'good', _fileids())
    old = StagedFile.get(StagedFile.archive_id == 'run/1')
    downloads = len(_archive(service).downloads)
    bad = _stage(service, 'bad', _fileids(wrong='run/1'))
    assert bad.status == 'error' and 'File hash does not match provided hash' in bad.error
    # the bad cart fell back to today's download (and its second chance) for that file only
    assert _archive(service).downloads[downloads:] == ['run/1', 'run/1']
    assert StagedFile.get_by_id(old.id).state == 'untrusted'
    again = _stage(service, 'again', _fileids())
    assert again.status == 'ready' and _cart_files(service, again) == DATA
    assert _archive(service).downloads[downloads + 2:] == ['run/1']  # fetched again from the archive
    fresh = StagedFile.get((StagedFile.archive_id == 'run/1') & (StagedFile.state == 'ready'))
    assert fresh.id != old.id
    assert File.get((File.cart == again.id) & (File.file_name == 'run/1')).staged_file_id == fresh.id


def test_a_changed_file_in_the_archive_is_fetched_anew(tmp_path: pathlib.Path, cleanup: contextlib.ExitStack) -> None:
    service = _service(tmp_path, cleanup)
    _stage(service, 'before', _fileids())
    changed = os.urandom(5000)
    _archive(service).files['run/0'] = changed
    fileids = _fileids()
    fileids[0]['hashsum'] = hashlib.sha1(changed).hexdigest()
    after = _stage(service, 'after', fileids)
    assert after.status == 'ready'
    assert _archive(service).downloads.count('run/0') == 2
    assert _cart_files(service, after)['run/0'] == changed
    assert StagedFile.select().where(StagedFile.archive_id == 'run/0').count() == 2


def test_a_file_being_fetched_waits_like_a_file_on_tape(tmp_path: pathlib.Path,
                                                         cleanup: contextlib.ExitStack) -> None:
    service = _service(tmp_path, cleanup)
    cache = service.stager.cache
    assert cache is not None
    size = len(DATA['run/2'])
    held = cache.find_or_claim('run/2', size, 1500000000.0)  # FakeArchive's mtime
    assert held.lease is not None
    cart_id = service.create_cart('waits', {'fileids': _fileids()})
    assert isinstance(service.queue, FakeQueue)
    _, file_ids, _, _ = service.queue.staged[0]
    on_tape = service.stage_files(cart_id, file_ids)
    waiting = File.get((File.cart == cart_id) & (File.file_name == 'run/2'))
    assert on_tape == [waiting.id] and waiting.status == 'recalling'
    assert 'run/2' not in _archive(service).downloads
    # the holder's download fails: the entry is given up (never ready), the next look fetches it
    cache.abandon(held.lease)
    assert StagedFile.get_by_id(held.lease.entry_id).state == 'untrusted'
    assert service.stage_files(cart_id, on_tape) == []
    assert Cart.get_by_id(cart_id).status == 'ready'
    assert _archive(service).downloads.count('run/2') == 1


def test_an_expired_lease_is_taken_over_and_the_old_holder_cannot_publish(tmp_path: pathlib.Path,
                                                                         cleanup: contextlib.ExitStack) -> None:
    service = _service(tmp_path, cleanup)
    cache = StagedFiles(service.volume, lease_s=300)
    first = cache.find_or_claim('x', 10, None)
    assert first.lease is not None
    assert cache.find_or_claim('x', 10, None) == type(first)()  # held: wait
    StagedFile.update(lease_until=datetime.datetime.now() - datetime.timedelta(seconds=1)).where(
        StagedFile.id == first.lease.entry_id).execute()
    second = cache.find_or_claim('x', 10, None)
    assert second.lease is not None and second.lease.entry_id == first.lease.entry_id
    assert staged_files_ready([ReadyEntry(first.lease.entry_id, first.lease.owner, '{}')]) == 0
    cache.abandon(first.lease)  # a no-op: the entry is the new holder's
    assert StagedFile.get_by_id(first.lease.entry_id).state == 'fetching'
    source = tmp_path / 'verified'
    source.write_bytes(b'0123456789')
    assert staged_files_ready([cache.publish(second.lease, source, 'SHA1',
                                             hashlib.sha1(b'0123456789').hexdigest().upper())]) == 1
    entry = StagedFile.get_by_id(second.lease.entry_id)
    assert entry.state == 'ready' and json.loads(entry.digests) == {'sha1': hashlib.sha1(b'0123456789').hexdigest()}
    assert cache.find_or_claim('x', 10, None).ready is not None
    assert service.volume.staged_file_path(entry.id).read_bytes() == b'0123456789'
    # an unknown mtime and a known one are different files
    assert cache.find_or_claim('x', 10, 1.0).lease is not None


def test_where_the_volume_cannot_link_the_cart_gets_a_copy(tmp_path: pathlib.Path, cleanup: contextlib.ExitStack,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A mock for a volume whose filesystem refuses hard links (EXDEV, EPERM, ...): this test's tmp
    filesystem links, so the refusal is simulated; the copy, its verification and the rename are real."""
    import errno

    from pacifica.cartd import volume

    def refuse(source: object, target: object) -> None:
        raise OSError(errno.EPERM, 'hard links not permitted here')

    service = _service(tmp_path, cleanup)
    monkeypatch.setattr(volume.os, 'link', refuse)
    first = _stage(service, 'copy-1', _fileids())
    second = _stage(service, 'copy-2', _fileids('md5'))
    assert first.status == second.status == 'ready'
    assert len(_archive(service).downloads) == len(DATA)
    assert _cart_files(service, first) == DATA == _cart_files(service, second)
    entries = {entry.archive_id: entry for entry in StagedFile.select()}
    assert {entry.state for entry in entries.values()} == {'ready'}
    for archive_id, entry in entries.items():
        cached = service.volume.staged_file_path(entry.id)
        assert cached.read_bytes() == DATA[archive_id]
        linked = service.volume.file_path(second.id, second.cart_uid, f'data/{archive_id.replace("/", "_")}')
        assert os.stat(linked).st_ino != os.stat(cached).st_ino
    assert not list((service.volume.root / 'staged-files').rglob('.*.part'))  # no temp file left behind


def test_purging_every_cart_leaves_the_cached_files(tmp_path: pathlib.Path, cleanup: contextlib.ExitStack) -> None:
    """purge (as eviction and expiry) removes carts' directories: their links, never an entry's file."""
    service = _service(tmp_path, cleanup)
    _stage(service, 'purged', _fileids())
    purged = service.purge(datetime.datetime.now() + datetime.timedelta(days=1))
    assert [uid for _, uid in purged] == ['purged']
    entries = list(StagedFile.select())
    assert {entry.archive_id: service.volume.staged_file_path(entry.id).read_bytes() for entry in entries} == DATA
    later = _stage(service, 'later', _fileids())
    assert later.status == 'ready' and _cart_files(service, later) == DATA
    assert len(_archive(service).downloads) == len(DATA)


def test_a_fetch_whose_worker_died_is_taken_over_once_its_lease_ran_out(tmp_path: pathlib.Path,
                                                                        cleanup: contextlib.ExitStack) -> None:
    service = _service(tmp_path, cleanup)
    cache = service.stager.cache
    assert cache is not None
    dead = cache.find_or_claim('run/0', len(DATA['run/0']), 1500000000.0)  # its worker never comes back
    assert dead.lease is not None
    StagedFile.update(lease_until=datetime.datetime.now() - datetime.timedelta(seconds=1)).where(
        StagedFile.id == dead.lease.entry_id).execute()
    cart = _stage(service, 'after-crash', _fileids())
    assert cart.status == 'ready' and _cart_files(service, cart) == DATA
    assert StagedFile.get_by_id(dead.lease.entry_id).state == 'ready'
    assert File.get((File.cart == cart.id) & (File.file_name == 'run/0')).staged_file_id == dead.lease.entry_id


def test_a_failed_first_fetch_leaves_no_entry_fetching_or_ready(tmp_path: pathlib.Path,
                                                                cleanup: contextlib.ExitStack) -> None:
    service = _service(tmp_path, cleanup)
    bad = _stage(service, 'first-bad', _fileids(wrong='run/1'))
    assert bad.status == 'error'
    assert [entry.state for entry in StagedFile.select().where(StagedFile.archive_id == 'run/1')] == ['untrusted']
    _archive(service).fail_downloads = 1  # the archive fails (FakeArchive does not retry)
    broken = _stage(service, 'archive-down', [entry for entry in _fileids() if entry['id'] == 'run/1'])
    assert broken.status == 'error'
    assert [entry.state for entry in StagedFile.select().where(StagedFile.archive_id == 'run/1')] == \
        ['untrusted', 'untrusted']
    good = _stage(service, 'then-good', _fileids())
    assert good.status == 'ready' and _cart_files(service, good) == DATA
    assert [entry.state for entry in StagedFile.select().where(StagedFile.archive_id == 'run/1')
            .order_by(StagedFile.id)] == ['untrusted', 'untrusted', 'ready']


# ---- room, purge, dump, fixit and metrics (the second increment) ------------------------------------------

def _path(archive_id: str) -> str:
    return f'data/{archive_id.replace("/", "_")}'


def _entries() -> Dict[str, StagedFile]:
    return {entry.archive_id: entry for entry in StagedFile.select()}


def _age_entry(entry_id: int, seconds: float) -> None:
    StagedFile.update(last_used=datetime.datetime.now() - datetime.timedelta(seconds=seconds)).where(
        StagedFile.id == entry_id).execute()


def test_eviction_takes_unpinned_entries_least_recently_used_first_never_a_pinned_one(
        tmp_path: pathlib.Path, cleanup: contextlib.ExitStack) -> None:
    service = _service(tmp_path, cleanup)
    _stage(service, 'all', _fileids())
    keeper = _stage(service, 'keeper', [entry for entry in _fileids() if entry['id'] == 'run/0'])
    entries = _entries()
    _age_entry(entries['run/1'].id, 100)
    _age_entry(entries['run/2'].id, 200)
    assert evict_one(0, shared=True) is None  # every entry pinned, both carts used just now
    service.delete('all')
    assert evict_one(0, shared=False) is None  # sharing off: entries are not eviction's to take
    order = []
    for _ in range(3):
        victim = evict_one(0, shared=True)
        if victim is None:
            break
        assert victim.entry is not None and victim.cart is None
        victim.remove(service.volume)
        order.append(victim.entry.archive_id)
    assert order == ['run/2', 'run/1']  # least recently used first; run/0 is pinned by the live cart
    assert set(_entries()) == {'run/0'}
    assert not service.volume.staged_file_path(entries['run/1'].id).exists()
    assert service.volume.staged_file_path(entries['run/0'].id).read_bytes() == DATA['run/0']
    assert service.volume.file_path(keeper.id, keeper.cart_uid, _path('run/0')).read_bytes() == DATA['run/0']


def test_an_expired_cart_goes_before_entries_and_a_failed_cart_pins_nothing(
        tmp_path: pathlib.Path, cleanup: contextlib.ExitStack) -> None:
    service = _service(tmp_path, cleanup)
    failed = _stage(service, 'failed', _fileids())
    expired = _stage(service, 'expired', [entry for entry in _fileids() if entry['id'] == 'run/0'])
    old = datetime.datetime.now() - datetime.timedelta(days=1)
    Cart.update(status='error', error='made to fail').where(Cart.id == failed.id).execute()
    Cart.update(expires_date=old, updated_date=old).where(Cart.id == expired.id).execute()
    first = evict_one(0, shared=True)
    assert first is not None and first.cart is not None and first.cart.id == expired.id
    first.remove(service.volume)
    taken = set()
    for _ in range(3):
        victim = evict_one(0, shared=True)
        assert victim is not None and victim.entry is not None, 'a failed cart pinned its entries'
        victim.remove(service.volume)
        taken.add(victim.entry.archive_id)
    assert taken == set(DATA) and not _entries()
    # the failed cart's own links keep its bytes until its files are evicted in turn
    assert _cart_files(service, failed) == DATA


def _evict_run_1(service: CartService) -> None:
    victim = evict_one(0, shared=True)
    assert victim is not None and victim.entry is not None and victim.entry.archive_id == 'run/1'
    victim.remove(service.volume)


@pytest.mark.parametrize('hashtype', ['sha1', 'md5'])
def test_an_entry_evicted_between_look_up_and_link_makes_the_cart_download(
        tmp_path: pathlib.Path, cleanup: contextlib.ExitStack, monkeypatch: pytest.MonkeyPatch, hashtype: str) -> None:
    """The race "cart B links entry E while E is evicted", made deterministic: the eviction is run right
    after B's look-up found E ready (a wrapper around the look-up; everything else is real). With sha1 (on
    record) the look-up is known_to_match, for the whole batch; with md5 (not on record) find_or_claim."""
    service = _service(tmp_path, cleanup)
    _stage(service, 'first', _fileids())
    service.delete('first')
    cache = service.stager.cache
    assert cache is not None
    find_or_claim, known_to_match = cache.find_or_claim, cache.known_to_match

    def found_then_evicted(archive_id: str, size: int, mtime: object) -> object:
        found = find_or_claim(archive_id, size, mtime)  # type: ignore[arg-type]
        if found.ready is not None and archive_id == 'run/1':
            _evict_run_1(service)
        return found

    def matched_then_evicted(files: List[File]) -> Dict[int, StagedFile]:
        matched = known_to_match(files)
        if any(entry.archive_id == 'run/1' for entry in matched.values()):
            _evict_run_1(service)
        return matched

    _age_entry(_entries()['run/1'].id, 1000)  # the least recently used: the one eviction takes
    downloads = len(_archive(service).downloads)
    monkeypatch.setattr(cache, 'find_or_claim', found_then_evicted)
    monkeypatch.setattr(cache, 'known_to_match', matched_then_evicted)
    second = _stage(service, 'second', _fileids(hashtype))
    assert second.status == 'ready' and _cart_files(service, second) == DATA
    assert _archive(service).downloads[downloads:] == ['run/1']  # only the evicted file was fetched again


def test_removing_an_entry_never_takes_bytes_from_a_cart_that_linked_it(tmp_path: pathlib.Path,
                                                                        cleanup: contextlib.ExitStack) -> None:
    service = _service(tmp_path, cleanup)
    cart = _stage(service, 'linked', _fileids())
    for entry in StagedFile.select():
        service.stager.cache.distrust(entry)  # type: ignore[union-attr]  # untrusted: purged even when pinned
    purged = service.purge_staged_files(datetime.datetime.now() - datetime.timedelta(days=1))
    assert purged is not None and (purged.unused, purged.untrusted) == (0, len(DATA))
    assert not _entries() and not [path for path in (service.volume.root / 'staged-files').rglob('*') if path.is_file()]
    assert _cart_files(service, cart) == DATA


def test_purge_removes_unpinned_unused_entries_and_old_temp_files(tmp_path: pathlib.Path,
                                                                  cleanup: contextlib.ExitStack) -> None:
    service = _service(tmp_path, cleanup)
    _stage(service, 'gone', _fileids())
    keeper = _stage(service, 'kept', [entry for entry in _fileids() if entry['id'] == 'run/0'])
    service.delete('gone')
    entries = _entries()
    _age_entry(entries['run/2'].id, 3600)
    leftover = service.volume.staged_file_path(entries['run/2'].id).parent / f'.{entries["run/2"].id}.abc.part'
    leftover.write_bytes(b'half a file')
    # not used since an hour ago: only run/2; a fresh temp file stays (it may be a publication under way)
    purged = service.purge_staged_files(datetime.datetime.now() - datetime.timedelta(minutes=30))
    assert purged is not None and (purged.unused, purged.untrusted, purged.temporaries) == (1, 0, 0)
    assert set(_entries()) == {'run/0', 'run/1'} and leftover.exists()
    purged = service.purge_staged_files(datetime.datetime.now() + datetime.timedelta(days=1))
    assert purged is not None and purged.unused == 1  # run/1; run/0 is pinned by the live cart
    assert set(_entries()) == {'run/0'}
    assert StagedFiles(service.volume, lease_s=0).purge(datetime.datetime.now()).temporaries == 1
    assert not leftover.exists()
    assert service.volume.file_path(keeper.id, keeper.cart_uid, _path('run/0')).read_bytes() == DATA['run/0']
    off = sqlite_service(tmp_path / 'off', DATA, cleanup, SHARE_STAGED_FILES='off')
    assert off.purge_staged_files(datetime.datetime.now()) is None


def test_a_copy_reserves_its_size_a_link_reserves_nothing(tmp_path: pathlib.Path, cleanup: contextlib.ExitStack,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """os.link refused by a mock (this tmp filesystem links); SpaceKeeper.reserve spied on, not replaced."""
    import errno

    from pacifica.cartd import volume

    service = _service(tmp_path, cleanup)
    _stage(service, 'fetched', _fileids())
    reserved: List[int] = []
    original = service.stager.space.reserve

    def spy(cart: Cart, file: File, size: object, partial: object, tar_offset: object = None) -> bool:
        reserved.append(int(size))  # type: ignore[call-overload]
        return original(cart, file, size, partial, tar_offset)  # type: ignore[arg-type]

    monkeypatch.setattr(service.stager.space, 'reserve', spy)
    assert _stage(service, 'linked', _fileids()).status == 'ready'
    assert reserved == []

    def refuse(source: object, target: object) -> None:
        raise OSError(errno.EXDEV, 'cross-device link')

    monkeypatch.setattr(volume.os, 'link', refuse)
    copied = _stage(service, 'copied', _fileids())
    assert copied.status == 'ready' and _cart_files(service, copied) == DATA
    assert sorted(reserved) == sorted(len(data) for data in DATA.values())
    assert len(_archive(service).downloads) == len(DATA)


def test_dump_fixit_and_the_counters_know_the_cache(tmp_path: pathlib.Path, cleanup: contextlib.ExitStack) -> None:
    from pacifica.cartd.orm import cache_totals, counter_values

    service = _service(tmp_path, cleanup)
    _stage(service, 'first', _fileids())
    second = _stage(service, 'second', _fileids())
    entries = _entries()
    assert cache_totals() == (len(DATA), sum(len(data) for data in DATA.values()))
    assert counter_values()[('staged_file_cache_hits', '')] == len(DATA)
    dumped = {cart['uid']: cart for cart in service.admin.dump()}
    assert {file['archive_id']: file['staged_file'] for file in dumped['second']['files']} == \
        {archive_id: entry.id for archive_id, entry in entries.items()}
    # fixit re-stages a lost file through the cache: linked again, no download
    service.volume.file_path(second.id, second.cart_uid, _path('run/2')).unlink()

    class Progress:
        """What fixit's progress bar is told: each file's outcome."""

        def __init__(self) -> None:
            self.done: List[int] = []

        def files(self, count: int) -> None:
            assert count == 1

        def file_done(self, outcome: StageOutcome) -> None:
            self.done.append(outcome.file_id)

    progress = Progress()
    result = service.fixit('second', progress)
    assert result.state.status == 'ready' and _cart_files(service, second) == DATA
    assert progress.done == [File.get((File.cart == second.id) & (File.file_name == 'run/2')).id]  # the linked one
    assert len(_archive(service).downloads) == len(DATA)
    assert counter_values()[('staged_file_cache_hits', '')] == len(DATA) + 1


def test_an_entry_whose_bytes_a_failed_cart_still_links_is_passed_over_for_the_cart(
        tmp_path: pathlib.Path, cleanup: contextlib.ExitStack) -> None:
    """Removing an entry frees nothing while a cart (here a failed one, which pins nothing) links its bytes:
    the space keeper's eviction passes it over and takes the failed cart's files, then the entries."""
    service = _service(tmp_path, cleanup)
    failed = _stage(service, 'failed', _fileids())
    old = datetime.datetime.now() - datetime.timedelta(days=1)
    Cart.update(status='error', error='made to fail', updated_date=old).where(Cart.id == failed.id).execute()

    def frees(entry: StagedFile) -> bool:
        return service.volume.staged_file_links(entry.id) <= 1

    assert {service.volume.staged_file_links(entry.id) for entry in _entries().values()} == {2}
    first = evict_one(0, shared=True, frees=frees)
    assert first is not None and first.cart is not None and first.cart.id == failed.id, first
    first.remove(service.volume)
    assert {service.volume.staged_file_links(entry.id) for entry in _entries().values()} == {1}
    taken = set()
    for _ in range(len(DATA) + 1):
        victim = evict_one(0, shared=True, frees=frees)
        if victim is None:
            break
        assert victim.entry is not None, victim
        victim.remove(service.volume)
        taken.add(victim.entry.archive_id)
    assert taken == set(DATA) and not _entries()
    assert evict_one(0, shared=True, frees=frees) is None


BIG = 300 * 1024  # over SMALL_FILE: a bundle cart writes it into its tar in place


def _bundle_members(service: CartService, cart: Cart) -> Dict[str, bytes]:
    import tarfile  # pylint: disable=import-outside-toplevel
    with tarfile.open(service.volume.tar_path(cart.id, cart.cart_uid), mode='r:') as archive:
        return {member.name.split('/', 1)[1]: archive.extractfile(member).read()  # type: ignore[union-attr]
                for member in archive.getmembers() if member.isfile()}


def test_a_bundle_carts_large_files_are_staged_once_and_copied_into_its_tar(tmp_path: pathlib.Path,
                                                                           cleanup: contextlib.ExitStack) -> None:
    """In place (a bundle cart's large files): the first cart's download is the entry, its tar gets a copy;
    a later cart's tar is copied from the entry, without asking the archive (digests on record) or after
    its status (another algorithm, computed from the entry once); a wrong hash fails as without the cache.
    A ready bundle cart serves every byte from its tar: it pins nothing."""
    datas = {'big/0': os.urandom(BIG), 'big/1': os.urandom(BIG + 7), 'small': os.urandom(1000)}
    service = sqlite_service(tmp_path, datas, cleanup, SHARE_STAGED_FILES='on')
    archive = _archive(service)

    def cart(uid: str, hashtype: str = 'sha1', wrong: str = '') -> Cart:
        fileids = [{'id': archive_id, 'path': f'data/{archive_id.replace("/", "_")}', 'hashtype': hashtype,
                    'hashsum': hashlib.new(hashtype, b'other bytes' if archive_id == wrong else data).hexdigest()}
                   for archive_id, data in datas.items()]
        assert isinstance(service.queue, FakeQueue)
        cart_id = service.create_cart(uid, {'fileids': fileids, 'bundle': True})
        run_queue(service, service.queue)
        return Cart.get_by_id(cart_id)

    expected = {f'data/{archive_id.replace("/", "_")}': data for archive_id, data in datas.items()}
    first = cart('first')
    assert first.status == 'ready' and _bundle_members(service, first) == expected
    entries = {entry.archive_id: entry for entry in StagedFile.select()}
    assert set(entries) == set(datas) and {entry.state for entry in entries.values()} == {'ready'}
    assert all(service.volume.staged_file_path(entry.id).read_bytes() == datas[archive_id]
               for archive_id, entry in entries.items())
    assert sorted(path.name for path in service.volume.cart_dir(first.id).iterdir()) == ['first.tar']
    assert sorted(archive.downloads) == sorted(datas) and sorted(archive.status_calls) == sorted(datas)

    second = cart('second')
    assert second.status == 'ready' and _bundle_members(service, second) == expected
    assert len(archive.downloads) == len(datas) and len(archive.status_calls) == len(datas)
    assert {file.staged_file_id for file in File.select().where(File.cart == second.id)} == {
        entry.id for entry in entries.values()}
    md5 = cart('md5', 'md5')
    assert md5.status == 'ready' and _bundle_members(service, md5) == expected
    assert len(archive.downloads) == len(datas) and len(archive.status_calls) == 2 * len(datas)
    assert json.loads(StagedFile.get_by_id(entries['big/0'].id).digests) == {
        'sha1': hashlib.sha1(datas['big/0']).hexdigest(), 'md5': hashlib.md5(datas['big/0']).hexdigest()}

    bad = cart('bad', wrong='big/1')
    assert bad.status == 'error' and 'File hash does not match provided hash' in bad.error
    assert archive.downloads[len(datas):] == ['big/1', 'big/1']  # its own download and the second chance
    assert StagedFile.get_by_id(entries['big/1'].id).state == 'untrusted'

    # Every cart here is a ready bundle (or a failed) one: nothing is pinned, each entry may go.
    taken = set()
    for _ in range(len(datas) + 1):
        victim = evict_one(0, shared=True)
        if victim is None or victim.entry is None:
            break
        victim.remove(service.volume)
        taken.add(victim.entry.archive_id)
    assert taken == set(datas)
    assert _bundle_members(service, second) == expected  # its tar has every byte
