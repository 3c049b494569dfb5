"""Stage once (share_staged_files on) and room on the volume, through the real processes, on a real
size-limited filesystem: the real archive interface, a real celery worker over RabbitMQ and the real
pacifica-cartd server, on each database, with volume_path on an 8 MiB tmpfs.

Files of 512 KiB. A cart linked from the cache adds no bytes to the volume; when a new file needs room,
eviction removes a cache entry that no live cart pins (its bytes held by nothing else) before any
ready cart, and never an entry a live cart pins. Deleting or evicting anything never takes bytes from
a cart that is still there: each test downloads the other carts whole afterwards and compares bytes.
How old a cart or an entry looks is set in the database (real hours cannot pass in a test).
"""
from __future__ import annotations

import datetime
import hashlib
from typing import Dict, Iterator, List, Optional

import pytest

from pacifica.cartd import database
from pacifica.cartd.orm import Cart, File, StagedFile, now
from cartd_testkit.archive import ArchiveServer
from cartd_testkit.databases import KINDS
from cartd_testkit.stack import CartStack, tar_contents
from cartd_testkit.tmpfs import VolumeTest, running_on_tmpfs

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FILE_SIZE = 512 * 1024
VOLUME_SIZE = '8m'


@pytest.fixture(scope='module', params=KINDS)
def stack(request: pytest.FixtureRequest, archive: ArchiveServer,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[CartStack]:
    """Server and one worker on each database in turn, sharing staged files, on an 8 MiB tmpfs."""
    kind = request.param
    with running_on_tmpfs(kind, tmp_path_factory.mktemp(f'once-room-{kind}'), archive, VOLUME_SIZE, overrides={
            'cartd': {'lru_buffer_time': '0', 'lru_purge': 'on', 'reconcile_interval': '0'}},
            share_staged_files=True) as cart:
        yield cart


class Shared(VolumeTest):
    """One test's archive files (shared between its carts by name) and carts."""

    def __init__(self, stack: CartStack) -> None:
        """The test's files are FILE_SIZE bytes each."""
        super().__init__(stack, FILE_SIZE)
        self.data = self.files.data
        self.archive_id = self.files.archive_id
        self.carts: Dict[str, List[str]] = {}

    def ready(self, cart: str, files: List[str]) -> None:
        """POST a cart of these files and wait until it is ready."""
        ids = [self.archive_id(name) for name in files]
        fileids = [{'id': archive_id, 'path': f'{archive_id}.bin', 'hashtype': 'sha1',
                    'hashsum': hashlib.sha1(self.data[archive_id]).hexdigest()} for archive_id in ids]
        assert self.stack.post(self.uid(cart), fileids).status_code == 201
        self.carts[cart] = ids
        final = self.stack.wait_final(self.uid(cart), deadline_s=90)
        assert final.headers['X-Pacifica-Status'] == 'ready', f'{final.headers}\n{self.stack.logs()}'

    def assert_whole(self, cart: str) -> None:
        """The cart downloads whole: its tar holds exactly the archive's bytes of every file."""
        answer = self.stack.download(self.uid(cart), 'c.tar')
        assert answer.status_code == 200, (cart, answer.status_code, answer.text[:300])
        assert tar_contents(answer.content) == {f'c/{archive_id}.bin': self.data[archive_id]
                                                for archive_id in self.carts[cart]}, f'cart {cart} lost bytes'

    def entry(self, name: str) -> StagedFile:
        """The cache entry of file `name` (the one answering to its key)."""
        with database.connection():
            return StagedFile.get(StagedFile.archive_id == self.archive_id(name))

    def age_cart(self, cart: str, minutes: float) -> None:
        """Make the cart's last use `minutes` old (out of the in-use window)."""
        with database.connection():
            assert Cart.update(updated_date=now() - datetime.timedelta(minutes=minutes)).where(
                (Cart.cart_uid == self.uid(cart)) & (Cart.status == 'ready')).execute() == 1

    def age_entry(self, name: str, minutes: float) -> None:
        """Make the entry's last use `minutes` old."""
        with database.connection():
            assert StagedFile.update(last_used=now() - datetime.timedelta(minutes=minutes)).where(
                StagedFile.archive_id == self.archive_id(name)).execute() == 1

    def pins(self, cart: str) -> Dict[str, Optional[int]]:
        """File name -> the entry id the cart's file row was served from."""
        with database.connection():
            rows = File.select(File.file_name, File.staged_file_id).join(Cart).where(Cart.cart_uid == self.uid(cart))
            return {row.file_name[len(self.tag) + 1:]: row.staged_file_id for row in rows}

    def cleanup(self) -> None:
        """Remove every cart of the test, and all else it left (VolumeTest.remove_all)."""
        self.remove_all(self.carts)


@pytest.fixture
def shared(stack: CartStack) -> Iterator[Shared]:
    """This test's files and carts; everything removed afterwards, so the next test finds an empty volume."""
    made = Shared(stack)
    try:
        yield made
    finally:
        made.cleanup()


def test_a_linked_cart_adds_no_bytes_and_deleting_a_cart_leaves_the_others_whole(shared: Shared) -> None:
    shared.ready('first', ['a', 'b'])
    before = shared.free_bytes()
    shared.ready('second', ['a', 'b'])
    assert before - shared.free_bytes() < FILE_SIZE // 2, 'the linked cart took bytes of its own'
    assert set(shared.pins('second').values()) == {shared.entry('a').id, shared.entry('b').id}
    assert shared.stack.delete(shared.uid('first')).status_code == 200
    shared.assert_whole('second')
    assert shared.entries() == {'a': 'ready', 'b': 'ready'}  # deleting a cart removes its links only


def test_room_is_made_from_an_unpinned_entry_before_a_ready_cart_and_never_from_a_pinned_one(
        shared: Shared) -> None:
    shared.ready('gone', ['pinned', 'unpinned'])
    shared.ready('kept', ['pinned', 'own'])
    assert shared.stack.delete(shared.uid('gone')).status_code == 200  # 'unpinned' is now the cache's alone
    shared.age_cart('kept', 600)  # an old ready cart: eviction could take it, but an unpinned entry goes first
    shared.age_entry('pinned', 6000)  # older than any: still never taken while 'kept' pins it
    shared.leave_free(FILE_SIZE // 2)
    shared.ready('new', ['fresh'])  # needs room: one 512 KiB file's worth
    assert shared.entries() == {'pinned': 'ready', 'own': 'ready', 'fresh': 'ready'}, 'the unpinned entry stayed'
    shared.assert_whole('kept')
    shared.assert_whole('new')
    with database.connection():
        assert Cart.get(Cart.cart_uid == shared.uid('kept')).status == 'ready'


def test_when_entries_are_not_enough_a_ready_cart_goes_and_its_entries_follow(shared: Shared) -> None:
    shared.ready('old', ['x', 'y'])
    shared.ready('young', ['z'])
    shared.age_cart('old', 600)
    shared.leave_free(FILE_SIZE // 2)
    shared.ready('needs-room', ['w'])  # no unpinned entry: the old cart is evicted, then its entry x or y
    with database.connection():
        assert Cart.get(Cart.cart_uid == shared.uid('old')).status == 'deleted'
    left = shared.entries()
    assert left['z'] == 'ready' and left['w'] == 'ready' and len(left) == 3, left
    shared.assert_whole('young')
    shared.assert_whole('needs-room')


def test_purge_removes_unpinned_entries_unused_since_then(shared: Shared) -> None:
    shared.ready('dropped', ['p', 'q'])
    shared.ready('holder', ['p'])
    assert shared.stack.delete(shared.uid('dropped')).status_code == 200
    shared.age_entry('q', 3 * 24 * 60)
    shared.age_entry('p', 3 * 24 * 60)  # as old, but pinned by the live cart
    entry_q = shared.entry('q')
    result = shared.stack.run_cmd('purge', '--time-ago', '1 day ago')
    assert result.returncode == 0, result.stderr
    assert 'staged files removed: 1 unused since then and pinned by no cart, 0 untrusted' in result.stdout, \
        result.stdout
    assert shared.entries() == {'p': 'ready'}
    assert not (shared.stack.volume / 'staged-files' / f'{entry_q.id % 256:02x}' / str(entry_q.id)).exists()
    shared.assert_whole('holder')
