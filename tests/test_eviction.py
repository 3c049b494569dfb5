"""Disk space and LRU eviction on a real size-limited filesystem (a tmpfs mounted for the test).

The archive is cartd_testkit.fakes' FakeArchive (bytes from memory) so that the test controls
exactly how much each cart needs; the filesystem, the database and the service are real.
"""
from __future__ import annotations

import datetime
import hashlib
import io
import os
import pathlib
import tarfile
from typing import Dict, Iterator, List, Tuple

import pytest

from pacifica.cartd import database, schema
from pacifica.cartd.config import check_volume, load_settings
from pacifica.cartd.errors import CartNotFound
from pacifica.cartd.eviction import (MEASURE_ATTEMPTS, SpaceKeeper, bytes_in_flight, disk_bytes, hold_partial, reserve,
                                     room_in_flight, track_partial)
from pacifica.cartd.fileio import allocated_in
from pacifica.cartd.orm import Cart, File
from pacifica.cartd.volume import STAGED_FILES_DIR
from pacifica.cartd.service import CartService
from pacifica.cartd.transport import response_body
from pacifica.cartd.volume import CartVolume
from cartd_testkit.fakes import FakeArchive, FakeQueue, run_queue
from cartd_testkit.tmpfs import fill_until, mounted_tmpfs

MIB = 1024 * 1024
FILE_SIZE = 600 * 1024


@pytest.fixture
def small_volume(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    """A 4400 KiB tmpfs: room for six 600 KiB files and one more in flight, not seven."""
    with mounted_tmpfs(tmp_path / 'volume', '4400k') as mount_point:
        yield mount_point


def _service(tmp_path: pathlib.Path, volume: pathlib.Path, files: Dict[str, bytes],
             **env: str) -> Tuple[CartService, FakeArchive, FakeQueue]:
    settings = load_settings(str(tmp_path / 'none.ini'), environ={
        'VOLUME_PATH': str(volume), 'PEEWEE_URL': f'sqliteext:///{tmp_path}/db.sqlite3', **env})
    check_volume(settings)
    database.bind(settings)
    with database.connection():
        schema.sync()
    archive, queue = FakeArchive(files), FakeQueue()
    return CartService(settings, queue, archive), archive, queue  # type: ignore[arg-type]


def _make_cart(service: CartService, queue: FakeQueue, archive: FakeArchive, uid: str, count: int,
               age_minutes: float = 0, last_fails: bool = False) -> Tuple[int, List[bytes]]:
    """A cart of `count` files, staged; with `last_fails`, the last file's media is 'error'."""
    datas = []
    entries = []
    for index in range(count):
        data = os.urandom(FILE_SIZE)
        archive.files[f'{uid}-{index}'] = data
        datas.append(data)
        entries.append({'id': f'{uid}-{index}', 'path': f'f{index}', 'hashtype': 'md5',
                        'hashsum': hashlib.md5(data).hexdigest()})
    if last_fails:
        archive.media[f'{uid}-{count - 1}'] = 'error'
    cart_id = service.create_cart(uid, {'fileids': entries})
    run_queue(service, queue)
    if age_minutes:
        Cart.update(updated_date=datetime.datetime.now() - datetime.timedelta(minutes=age_minutes)).where(
            Cart.id == cart_id).execute()
    return cart_id, datas


def _cart(service: CartService, queue: FakeQueue, archive: FakeArchive, uid: str, count: int,
          age_minutes: float = 0) -> List[bytes]:
    return _make_cart(service, queue, archive, uid, count, age_minutes)[1]


def test_lru_carts_make_room_and_protected_carts_stay(tmp_path: pathlib.Path, small_volume: pathlib.Path) -> None:
    service, archive, queue = _service(tmp_path, small_volume, {}, LRU_BUFFER_TIME='600')
    with database.connection():
        _cart(service, queue, archive, 'oldest', 2, age_minutes=300)
        _cart(service, queue, archive, 'older', 2, age_minutes=200)
        _cart(service, queue, archive, 'recent', 2, age_minutes=5)  # inside lru_buffer_time
        assert [service.status(uid).status for uid in ('oldest', 'older', 'recent')] == ['ready'] * 3
        assert service.volume.free_bytes() < 2 * FILE_SIZE

        _cart(service, queue, archive, 'new', 2)
        assert service.status('new').status == 'ready'
        # only the least recently used cart went, and only as many as needed
        with pytest.raises(CartNotFound):
            service.status('oldest')
        assert service.status('older').status == 'ready'
        assert service.status('recent').status == 'ready'
        assert not (small_volume / 'cartuids' / 'oldest').exists()

        _cart(service, queue, archive, 'newer', 2)
        assert service.status('newer').status == 'ready', service.status('newer').message
        with pytest.raises(CartNotFound):
            service.status('older')
        # what is left is protected (recent use, or just finished): the next cart cannot fit
        _cart(service, queue, archive, 'toobig', 3)
        state = service.status('toobig')
        assert state.status == 'error'
        assert 'No space left on the volume' in state.message and 'f' in state.message
        for uid in ('recent', 'new', 'newer'):
            assert service.status(uid).status == 'ready'
        assert list(small_volume.rglob('*.part')) == []


def test_no_eviction_when_lru_purge_is_off(tmp_path: pathlib.Path, small_volume: pathlib.Path) -> None:
    service, archive, queue = _service(tmp_path, small_volume, {}, LRU_PURGE='off')
    with database.connection():
        _cart(service, queue, archive, 'a', 3, age_minutes=600)
        _cart(service, queue, archive, 'b', 5, age_minutes=600)
        state = service.status('b')
        assert state.status == 'error' and 'No space left on the volume' in state.message
        assert service.status('a').status == 'ready'


def test_download_in_progress_survives_eviction(tmp_path: pathlib.Path, small_volume: pathlib.Path) -> None:
    service, archive, queue = _service(tmp_path, small_volume, {})
    with database.connection():
        old = _cart(service, queue, archive, 'old', 2, age_minutes=600)
        _cart(service, queue, archive, 'older', 2, age_minutes=700)
        _cart(service, queue, archive, 'other', 2, age_minutes=500)
        download = service.download('old', 'old.tar', 'old')  # a GET marks the cart used
        body = response_body(download.pieces(0, download.layout.size), 64 * 1024)
        received = [next(body)]
        _cart(service, queue, archive, 'incoming', 3)
        assert service.status('incoming').status == 'ready'
        assert service.status('old').status == 'ready'  # in use: not evicted
        received.extend(body)
    with tarfile.open(fileobj=io.BytesIO(b''.join(received)), mode='r:') as tar:
        assert [tar.extractfile(f'old/f{index}').read() for index in range(2)] == old  # type: ignore[union-attr]


def test_a_finished_file_is_not_counted_twice(tmp_path: pathlib.Path, small_volume: pathlib.Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """While a downloaded file is renamed into place, its bytes are on disk and no longer in flight.

    Had the reservation still pointed at the temp name after the rename, another file's
    reservation (waiting for the same lock) would count those bytes twice: once as used
    disk, once as a download still to write. It then evicted one cart too many, or failed.
    """
    service, archive, queue = _service(tmp_path, small_volume, {}, STAGE_CONCURRENCY='1')  # one file at a time
    real_replace = os.replace
    in_flight_after_rename: List[int] = []

    def replace_and_look(source: 'os.PathLike[str]', target: 'os.PathLike[str]') -> None:
        real_replace(source, target)
        if str(source).endswith('.part') and STAGED_FILES_DIR not in pathlib.Path(target).parts:  # a download's
            with database.connection():
                in_flight_after_rename.append(bytes_in_flight(excluding_file_id=0))

    monkeypatch.setattr(os, 'replace', replace_and_look)
    with database.connection():
        _cart(service, queue, archive, 'one', 2)
        assert service.status('one').status == 'ready'
    assert in_flight_after_rename == [0, 0]


def test_a_failed_carts_downloads_still_count_and_no_new_ones_start(tmp_path: pathlib.Path,
                                                                     small_volume: pathlib.Path) -> None:
    """Once a cart fails its remaining files are not pulled, and bytes its started downloads still write count.

    Before, a cart failing with NoSpace for one file dropped out of the bytes in flight while
    its other files went on downloading (and new ones started): the volume filled up under
    the reservations of other carts (ENOSPC seen end to end).
    """
    service, archive, queue = _service(tmp_path, small_volume, {}, STAGE_CONCURRENCY='1')  # files in order
    entries = []
    for index in range(2):
        data = os.urandom(FILE_SIZE)
        archive.files[f'x-{index}'] = data
        entries.append({'id': f'x-{index}', 'path': f'f{index}', 'hashtype': 'md5',
                        'hashsum': hashlib.md5(data).hexdigest()})
    archive.media['x-0'] = 'error'  # the first file fails the cart
    with database.connection():
        cart_id = service.create_cart('x', {'fileids': entries})
        run_queue(service, queue)
        assert service.status('x').status == 'error'
        assert archive.downloads == []  # the second file was not pulled for a failed cart

        second = File.get((File.cart == cart_id) & (File.file_name == 'x-1'))
        reserve(cart_id, second.id, FILE_SIZE, None)  # as if its download had started before the failure
        assert bytes_in_flight(excluding_file_id=0) == FILE_SIZE
        service.delete('x')
        assert bytes_in_flight(excluding_file_id=0) == 0


def test_bytes_written_in_place_into_a_sparse_tar_are_not_counted_again(tmp_path: pathlib.Path) -> None:
    """A file written into its region of the bundle tar has, in flight, only what it has not written yet."""
    tar = tmp_path / '.bundle.tar'
    region_start, size = MIB, 2 * MIB
    with open(tar, 'wb') as out:
        out.truncate(8 * MIB)  # sparse: the regions of the other files are holes
        out.seek(region_start)
        out.write(b'x' * (MIB // 2))  # half a MiB of this file written so far
        out.seek(6 * MIB)
        out.write(b'y' * MIB)  # another file's bytes, outside this region
    assert allocated_in(str(tar), region_start, size) == MIB // 2
    assert allocated_in(str(tar), 0, MIB) == 0
    settings = load_settings(str(tmp_path / 'none.ini'), environ={
        'VOLUME_PATH': str(tmp_path / 'volume'), 'PEEWEE_URL': f'sqliteext:///{tmp_path}/db.sqlite3'})
    database.bind(settings)
    with database.connection():
        schema.sync()
        cart = Cart.create(cart_uid='sparse', status='staging')
        file = File.create(cart=cart, file_name='f', bundle_path='f', hash_type='md5', hash_value='0' * 32)
        reserve(cart.id, file.id, disk_bytes(size), tar, tar_offset=region_start)
        assert bytes_in_flight(excluding_file_id=0) == disk_bytes(size) - MIB // 2


def _one_file_cart(tmp_path: pathlib.Path, volume: pathlib.Path) -> Tuple[CartVolume, Cart, File]:
    settings = load_settings(str(tmp_path / 'none.ini'), environ={
        'VOLUME_PATH': str(volume), 'PEEWEE_URL': f'sqliteext:///{tmp_path}/db.sqlite3'})
    database.bind(settings)
    with database.connection():
        schema.sync()
        cart = Cart.create(cart_uid='c', status='staging')
        file = File.create(cart=cart, file_name='f', bundle_path='f', hash_type='md5', hash_value='0' * 32)
    return CartVolume(volume), cart, file


def test_a_reservation_makes_its_temp_file_and_one_whose_file_is_gone_has_ended(tmp_path: pathlib.Path,
                                                                                small_volume: pathlib.Path) -> None:
    """The temp file exists from the moment its bytes are reserved, so a missing one has ended.

    Before, a reservation whose temp file was not there counted its whole size, though its
    download had been renamed into place (its bytes already out of the free count) after
    this reservation's row was read: counted twice, it evicted one cart too many (seen in CI
    on MariaDB, whose snapshot kept showing the released row).
    """
    volume, cart, file = _one_file_cart(tmp_path, small_volume)
    keeper = SpaceKeeper(load_settings(str(tmp_path / 'none.ini'), environ={}), volume)
    partial = volume.partial_path(cart.id, file.id)
    with database.connection():
        assert keeper.reserve(cart, file, FILE_SIZE, partial) is True  # beyond SMALL_FILE: recorded
        assert partial.is_file() and partial.stat().st_size == 0
        assert bytes_in_flight(excluding_file_id=0) == disk_bytes(FILE_SIZE)  # made, nothing written yet
        partial.write_bytes(bytes(FILE_SIZE // 2))
        assert bytes_in_flight(excluding_file_id=0) == disk_bytes(FILE_SIZE) - FILE_SIZE // 2
        final = volume.file_path(cart.id, 'c', 'f')
        final.parent.mkdir()
        os.replace(partial, final)  # renamed into place, row not yet released
        assert bytes_in_flight(excluding_file_id=0) == 0

        another = volume.partial_path(cart.id, file.id)
        track_partial(file.id, another)  # the re-fetch after a hash mismatch writes a new temp file
        assert another.is_file()
        assert bytes_in_flight(excluding_file_id=0) == disk_bytes(FILE_SIZE)


class _WritingVolume(CartVolume):
    """A volume whose free count is read while a download writes: `chunks[i]` bytes land in
    `partial` just before the i-th look at the free count. (Where a real download's writes fall
    between two system calls cannot be arranged; this stands in for it.)"""

    def __init__(self, root: pathlib.Path, partial: pathlib.Path, chunks: List[int]) -> None:
        super().__init__(root)
        object.__setattr__(self, 'partial', partial)
        object.__setattr__(self, 'chunks', chunks)

    def free_bytes(self) -> int:
        chunks: List[int] = getattr(self, 'chunks')
        if chunks:
            with open(getattr(self, 'partial'), 'ab') as out:
                out.write(bytes(chunks.pop(0)))
                out.flush()
                os.fsync(out.fileno())
        return super().free_bytes()


def test_bytes_written_while_the_free_count_is_read_are_not_counted_twice(tmp_path: pathlib.Path,
                                                                         small_volume: pathlib.Path) -> None:
    """In flight and free are measured at one moment, though a download writes between the two reads."""
    volume, cart, file = _one_file_cart(tmp_path, small_volume)
    partial = volume.partial_path(cart.id, file.id)
    with database.connection():
        hold_partial(partial, None)
        reserve(cart.id, file.id, disk_bytes(FILE_SIZE), partial)
        writing = _WritingVolume(volume.root, partial, [FILE_SIZE // 2])  # half the file lands during the first look
        in_flight, free = room_in_flight(0, writing)
        assert in_flight == disk_bytes(FILE_SIZE) - FILE_SIZE // 2  # as the free count already has that half
        assert free == volume.free_bytes()  # the tmpfs is this test's alone: nothing else wrote since

        # a download that writes on every look: the first sizes read count, which only overstates
        endless = _WritingVolume(volume.root, partial, [4096] * (MEASURE_ATTEMPTS + 1))
        in_flight, _ = room_in_flight(0, endless)
        assert in_flight == disk_bytes(FILE_SIZE) - FILE_SIZE // 2 - 4096 * (MEASURE_ATTEMPTS - 1)


def _failed_cart(service: CartService, queue: FakeQueue, archive: FakeArchive, uid: str, good: int,
                 age_minutes: float = 0) -> int:
    """A cart of `good` files that stage and then one whose media is 'error': it fails with the good ones on the volume.

    Needs STAGE_CONCURRENCY 1 (files in order): a file not started when its cart failed is not pulled.
    """
    return _make_cart(service, queue, archive, uid, good + 1, age_minutes, last_fails=True)[0]


def _staged_on_volume(volume: pathlib.Path, cart_id: int) -> int:
    return sum(1 for path in (volume / str(cart_id)).rglob('f*') if path.is_file())


def test_a_failed_carts_files_go_first_and_it_still_answers_error(tmp_path: pathlib.Path,
                                                                   small_volume: pathlib.Path) -> None:
    service, archive, queue = _service(tmp_path, small_volume, {}, LRU_BUFFER_TIME='600', STAGE_CONCURRENCY='1')
    with database.connection():
        _cart(service, queue, archive, 'ready-oldest', 2, age_minutes=300)
        failed_id = _failed_cart(service, queue, archive, 'failed', 2, age_minutes=100)
        _cart(service, queue, archive, 'ready-older', 2, age_minutes=200)
        failed = service.status('failed')
        assert failed.status == 'error' and 'media of the file as error' in failed.message
        # the two verified files of the failed cart are on the volume and counted
        assert _staged_on_volume(small_volume, failed_id) == 2
        assert Cart.get_by_id(failed_id).files_staged == 2
        assert service.volume.free_bytes() < 2 * FILE_SIZE

        _cart(service, queue, archive, 'new', 2)
        assert service.status('new').status == 'ready', service.status('new').message
        # the failed cart's files went, though both ready carts were used longer ago; its row answers as before
        assert not (small_volume / str(failed_id)).exists()
        assert service.status('failed') == failed
        assert service.status('ready-oldest').status == 'ready'
        assert service.status('ready-older').status == 'ready'
        row = Cart.get_by_id(failed_id)
        # the counters never go down; deleted_date says its files left the volume
        assert (row.status, row.files_staged, row.deleted_date is not None) == ('error', 2, True)
        assert {file.status for file in File.select().where(File.cart == failed_id)} == {'waiting', 'error'}

        _cart(service, queue, archive, 'newer', 2)
        assert service.status('newer').status == 'ready', service.status('newer').message
        # then the least recently used ready cart; the failed one is not taken again
        with pytest.raises(CartNotFound):
            service.status('ready-oldest')
        assert service.status('ready-older').status == 'ready'
        assert service.status('failed') == failed


def test_a_recently_failed_cart_keeps_its_files(tmp_path: pathlib.Path, small_volume: pathlib.Path) -> None:
    """Inside lru_buffer_time (and the in-use window) a failed cart is as protected as a ready one."""
    service, archive, queue = _service(tmp_path, small_volume, {}, LRU_BUFFER_TIME='600', STAGE_CONCURRENCY='1')
    with database.connection():
        failed_id = _failed_cart(service, queue, archive, 'failed-now', 2, age_minutes=5)
        _cart(service, queue, archive, 'ready-old', 2, age_minutes=300)
        _cart(service, queue, archive, 'ready-less-old', 2, age_minutes=200)
        _cart(service, queue, archive, 'new', 2)
        assert service.status('new').status == 'ready', service.status('new').message
        with pytest.raises(CartNotFound):
            service.status('ready-old')
        assert service.status('ready-less-old').status == 'ready'
        assert _staged_on_volume(small_volume, failed_id) == 2
        assert service.status('failed-now').status == 'error'


def test_no_room_on_the_volume_fails_a_cart_that_skips_failed_files(tmp_path: pathlib.Path,
                                                                    small_volume: pathlib.Path) -> None:
    """NoSpace is not the file's fault: skipping it would hand out a cart short of files for want of disk."""
    data = os.urandom(5 * MIB)  # more than the whole volume
    service, _archive, queue = _service(tmp_path, small_volume, {'huge': data})
    with database.connection():
        service.create_cart('room', {'fileids': [{'id': 'huge', 'path': 'h', 'hashtype': 'md5',
                                                  'hashsum': hashlib.md5(data).hexdigest()}],
                                     'on_file_error': 'skip'})
        run_queue(service, queue)
        state = service.status('room')
        assert state.status == 'error' and 'No space left on the volume' in state.message


def test_a_bundle_file_fetched_through_the_cache_reserves_room_for_its_copy_in_the_tar(
        tmp_path: pathlib.Path, small_volume: pathlib.Path) -> None:
    # share_staged_files: a bundle cart's large file is fetched as a cache entry, then copied into its region
    # of the tar: two copies on the volume. The copy is reserved too (here an old cart and then its entries
    # are evicted for it); written unreserved, it met a full volume (ENOSPC), as test_eviction_e2e saw.
    service, archive, queue = _service(tmp_path, small_volume, {}, SHARE_STAGED_FILES='on', STAGE_CONCURRENCY='1')
    with database.connection():
        _cart(service, queue, archive, 'old', 3, age_minutes=300)
        fill_until(small_volume, small_volume / 'other-data.pad', 1500 * 1024)  # room for 2 of the 4 copies
        datas = [os.urandom(FILE_SIZE) for _ in range(2)]
        archive.files.update({f'new-{index}': data for index, data in enumerate(datas)})
        cart_id = service.create_cart('new', {'bundle': True, 'fileids': [
            {'id': f'new-{index}', 'path': f'f{index}', 'hashtype': 'md5', 'hashsum': hashlib.md5(data).hexdigest()}
            for index, data in enumerate(datas)]})
        run_queue(service, queue)
        cart = Cart.get_by_id(cart_id)
        assert (cart.status, cart.error) == ('ready', '')
        assert Cart.get(Cart.cart_uid == 'old').status == 'deleted'
        with tarfile.open(service.volume.tar_path(cart_id, 'new'), mode='r:') as tar:
            members = {member.name: (tar.extractfile(member) or io.BytesIO()).read() for member in tar.getmembers()
                       if member.isfile()}
        assert members == {f'new/f{index}': data for index, data in enumerate(datas)}
