"""Opening the database: URL schemes, SQLite set up for several processes, bounded connect retries."""
from __future__ import annotations

import contextlib
import datetime
import pathlib
import threading
from typing import Any, Callable, Iterator, List

import pytest

from pacifica.cartd import database, eviction, orm, schema
from pacifica.cartd.config import load_settings
from pacifica.cartd.errors import ConfigError, DatabaseUnavailable
from pacifica.cartd.orm import DB
from playhouse.pool import PooledDatabase

from cartd_testkit.databases import drop_database, fresh_database


def _settings(tmp_path: pathlib.Path, url: str, attempts: str = '3', wait: str = '0.5'):
    return load_settings(str(tmp_path / 'none.ini'), environ={
        'PEEWEE_URL': url, 'DATABASE_CONNECT_ATTEMPTS': attempts, 'DATABASE_CONNECT_WAIT': wait})


def test_published_sqliteext_url_opens_sqlite_in_wal_mode(tmp_path: pathlib.Path) -> None:
    database.bind(_settings(tmp_path, f'sqliteext:///{tmp_path}/db.sqlite3'))
    with database.connection():
        assert DB.execute_sql('PRAGMA journal_mode').fetchone()[0] == 'wal'
        assert DB.execute_sql('PRAGMA busy_timeout').fetchone()[0] == 60000
    assert DB.is_closed()
    assert (tmp_path / 'db.sqlite3').exists()


def test_unknown_scheme_is_a_config_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError) as caught:
        database.make_database('oracle://x/y')
    assert '[database] peewee_url' in caught.value.message


def test_connect_retries_then_says_why(tmp_path: pathlib.Path) -> None:
    settings = _settings(tmp_path, 'postgres://postgres:secret@127.0.0.1:1/nowhere', attempts='3', wait='7')
    database.bind(settings)
    waits: List[float] = []
    with pytest.raises(DatabaseUnavailable) as caught:
        database.wait_for_database(settings, sleep=waits.append)
    assert waits == [7.0, 7.0]  # three attempts, two waits between them
    message = caught.value.message
    assert 'after 3 attempts' in message and '127.0.0.1' in message and 'secret' not in message


def test_connection_scope_nests_and_closes(tmp_path: pathlib.Path) -> None:
    database.bind(_settings(tmp_path, f'sqlite:///{tmp_path}/db.sqlite3'))
    with database.connection():
        with database.connection():
            assert not DB.is_closed()
        assert not DB.is_closed()  # the inner scope did not open it, so it does not close it
    assert DB.is_closed()


@pytest.mark.parametrize('url', ['sqliteext:///{}/db.sqlite3', 'postgres://postgres@127.0.0.1:5432/test',
                                 'mysql://root@127.0.0.1:3306/test'])
def test_connections_are_reused_not_opened_per_request(tmp_path: pathlib.Path, url: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    database.bind(_settings(tmp_path, url.format(tmp_path)))
    opened: List[int] = []
    mro = type(DB.obj).__mro__
    driver_class = mro[mro.index(PooledDatabase) + 1]  # what opens a real connection under the pool
    real_connect = driver_class._connect

    def counting_connect(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202 - peewee's private hook
        opened.append(1)
        return real_connect(self, *args, **kwargs)

    monkeypatch.setattr(driver_class, '_connect', counting_connect)
    try:
        for _ in range(20):
            with database.connection():
                assert DB.execute_sql('SELECT 1').fetchone()[0] == 1
        assert len(opened) == 1 and DB.is_closed()  # back in the pool, not reconnected for each scope
        barrier = threading.Barrier(3)
        threads = [threading.Thread(target=_hold_a_connection, args=(barrier,)) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert len(opened) == 3  # three held at once: the pooled one and two more
        database.close_idle()  # what a server does before uWSGI forks it
        assert not DB.obj._in_use and not DB.obj._connections
    finally:
        database.close_idle()


def _hold_a_connection(barrier: threading.Barrier) -> None:
    with database.connection():
        DB.execute_sql('SELECT 1')
        barrier.wait(10)


TRICKY_ROWS = [('it\'s 100%s "q"', 'a,b/c"d', 'sha1', 'a' * 40), ('back\\slash', 'é/ü %(x)s', 'md5', 'b' * 32),
               ('', 'x', 'sha1', ''), ('null', 'NULL', 'sha256', 'c' * 64)]


@pytest.mark.parametrize('kind', ['sqlite', 'postgres', 'mysql'])
def test_a_new_carts_rows_keep_every_character(tmp_path: pathlib.Path, kind: str) -> None:
    """The file rows go in as plain parameters (SQLite, MySQL) or by COPY (PostgreSQL): nothing is lost or quoted."""
    url = fresh_database(kind, tmp_path)
    try:
        database.bind(_settings(tmp_path, url))
        with database.connection():
            schema.sync()
            with database.atomic():
                cart_id, file_ids = orm.insert_cart('tricky', True, TRICKY_ROWS * 300, 512)
            rows = [(file.file_name, file.bundle_path, file.hash_type, file.hash_value, file.status, file.error)
                    for file in orm.File.select().where(orm.File.cart == cart_id).order_by(orm.File.id)]
        assert len(file_ids) == len(rows) == 1200 and file_ids == sorted(file_ids)
        assert rows == [(*row, 'waiting', '') for row in TRICKY_ROWS * 300]
    finally:
        database.close_idle()
        drop_database(kind, url)


@contextlib.contextmanager
def _synced(tmp_path: pathlib.Path, kind: str) -> Iterator[None]:
    """A fresh database of `kind`, bound and with the schema, inside one connection; dropped afterwards."""
    url = fresh_database(kind, tmp_path)
    try:
        database.bind(_settings(tmp_path, url))
        with database.connection():
            schema.sync()
            yield
    finally:
        database.close_idle()
        drop_database(kind, url)


@pytest.mark.parametrize('kind', ['sqlite', 'postgres', 'mysql'])
def test_a_file_recorded_transferring_while_it_is_recorded_staged_is_counted_from_where_it_was(
        tmp_path: pathlib.Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bundle file written in place is recorded staged by its own thread while the task's thread records
    downloads started: the counter of files transferring must not keep the staged file. The interleaving
    (a write between mark_staged's read and its update) is made by running the other writer inside
    mark_staged's first update: from another connection on PostgreSQL and MariaDB (whose REPEATABLE READ
    snapshot a plain re-read would not see past), in the same one on SQLite (one writer at a time)."""
    with _synced(tmp_path, kind):
        with database.atomic():
            cart_id, (first, second) = orm.insert_cart('race', True, [('a', 'p/a', 'sha1', 'a' * 40),
                                                                      ('b', 'p/b', 'sha1', 'b' * 40)], 512)
        real, raced = orm._set_staged, []

        def transferring() -> None:
            with database.connection(), database.atomic():
                raced.append(orm.mark_transferring(cart_id, {first: 1}))

        def interleaved(rows: Any, before: str) -> int:
            if not raced:
                if kind == 'sqlite':  # one writer at a time: the other write in this connection
                    raced.append(orm.mark_transferring(cart_id, {first: 1}))
                else:  # committed from another connection, after this transaction's first read
                    other = threading.Thread(target=transferring)
                    other.start()
                    other.join(30)
            return real(rows, before)

        monkeypatch.setattr(orm, '_set_staged', interleaved)
        with database.atomic():
            counted = orm.mark_staged([(first, 10, 1.5, 1), (second, 20, None, 2)])
            orm.count_staged(cart_id, counted)
        cart = orm.Cart.get_by_id(cart_id)
        files = [(file.status, file.size, file.mtime, file.attempts)
                 for file in orm.File.select().where(orm.File.cart == cart_id).order_by(orm.File.id)]
    assert raced == [1]
    assert (counted.files, counted.from_transfer, counted.bytes) == (2, 1, 30)
    assert (cart.files_staged, cart.files_transferring, cart.bytes_staged) == (2, 0, 30)
    assert files == [('staged', 10, 1.5, 1), ('staged', 20, None, 2)]


@pytest.mark.parametrize('kind', ['postgres', 'mysql'])
def test_a_failure_recorded_while_another_connection_records_the_download_started(
        tmp_path: pathlib.Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """fail_file loses its compare-and-set to the task thread's "transferring" committed from another
    connection after its first read; its retry must read the latest row (on MariaDB a plain re-read in the
    same transaction sees the old snapshot, and the failure was lost: the cart stayed staging for ever)."""
    with _synced(tmp_path, kind):
        with database.atomic():
            cart_id, (file_id,) = orm.insert_cart('failing', False, [('a', 'p/a', 'sha1', 'a' * 40)], 0)
        real, raced = orm._file_status, []

        def transferring() -> None:
            with database.connection(), database.atomic():
                raced.append(orm.mark_transferring(cart_id, {file_id: 2}))

        def interleaved(wanted: int, locking: bool = False) -> Any:
            status = real(wanted, locking)
            if not raced:
                other = threading.Thread(target=transferring)
                other.start()
                other.join(30)
            return status

        monkeypatch.setattr(orm, '_file_status', interleaved)
        with database.atomic():
            assert orm.fail_file(cart_id, file_id, 'File hash does not match provided hash', 2) is True
        cart = orm.Cart.get_by_id(cart_id)
        file = orm.File.get_by_id(file_id)
    assert raced == [1]
    assert (file.status, file.attempts) == ('error', 2)
    assert (cart.files_failed, cart.files_transferring) == (1, 0)


def _committed_meanwhile(kind: str, write: Callable[[], Any]) -> None:
    """Make `write` land between a transaction's read and its compare-and-set: committed from another
    connection (another thread's) on PostgreSQL and MariaDB, in this one on SQLite, where the open
    transaction holds the only writer's lock (BEGIN IMMEDIATE) and another connection would wait for it."""
    if kind == 'sqlite':
        write()
        return

    def other() -> None:
        with database.connection(), database.atomic():
            write()

    thread = threading.Thread(target=other)
    thread.start()
    thread.join(30)
    assert not thread.is_alive()


@pytest.mark.parametrize('kind', ['sqlite', 'postgres', 'mysql'])
def test_an_eviction_that_loses_its_cart_to_a_download_claims_the_next_cart(
        tmp_path: pathlib.Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """evict_one runs inside the reservation's transaction. A download marks the least recently used cart
    used between the look-up and the claim, so the claim loses; the next round must claim the next cart.
    On MariaDB a plain re-read in the same transaction sees the old snapshot: every round found the same
    cart, lost on it, and nothing was evicted (the file failed for want of room)."""
    with _synced(tmp_path, kind):
        long_ago = orm.now().replace(microsecond=0) - datetime.timedelta(hours=2)
        with database.atomic():
            oldest, newer = (orm.Cart.create(cart_uid=uid, status='ready', updated_date=long_ago + age).id
                             for uid, age in (('oldest', datetime.timedelta(0)), ('newer', datetime.timedelta(hours=1))))
        real, raced = eviction.claim_eviction, []

        def interleaved(cart: orm.Cart) -> bool:
            if not raced:
                raced.append(cart.id)
                _committed_meanwhile(kind, lambda: orm.touch_cart(cart.id))
            return real(cart)

        monkeypatch.setattr(eviction, 'claim_eviction', interleaved)
        with database.atomic():
            database.serialize_writers()  # as SpaceKeeper.reserve does
            victim = eviction.evict_one(0.0)
        statuses = {cart.id: cart.status for cart in orm.Cart.select()}
    assert raced == [oldest]
    assert victim is not None and victim.cart is not None and victim.cart.id == newer
    assert statuses == {oldest: 'ready', newer: 'deleted'}


@pytest.mark.parametrize('kind', ['sqlite', 'postgres', 'mysql'])
def test_an_eviction_that_loses_its_staged_file_to_a_cart_claims_the_next_entry(
        tmp_path: pathlib.Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """As above for the staged-file cache: a cart pins the least recently used entry between the look-up
    and the claim; the next round must claim the next entry, not lose on the first one again."""
    with _synced(tmp_path, kind):
        long_ago = orm.now().replace(microsecond=0) - datetime.timedelta(hours=2)
        with database.atomic():
            entries = []
            for number in (1, 2):
                owner = f'owner{number}'
                key = f'{number:064d}'
                orm.insert_staged_files([orm.NewEntry(key, f'archive/{number}', 10, None, owner)], orm.now())
                entry = orm.staged_files_by_keys([key])[key]
                orm.staged_files_ready([orm.ReadyEntry(entry.id, owner, '{}')])
                orm.StagedFile.update(last_used=long_ago + datetime.timedelta(hours=number)).where(
                    orm.StagedFile.id == entry.id).execute()
                entries.append(entry.id)
            cart_id, (file_id,) = orm.insert_cart('pinning', False, [('archive/1', 'p/a', 'sha1', 'a' * 40)], 0)
        first, second = entries
        real, raced = eviction.claim_entry_removal, []

        def interleaved(entry: orm.StagedFile) -> bool:
            if not raced:
                raced.append(entry.id)
                _committed_meanwhile(kind, lambda: orm.pin_staged_files([(file_id, entry.id, True)]))
            return real(entry)

        monkeypatch.setattr(eviction, 'claim_entry_removal', interleaved)
        with database.atomic():
            database.serialize_writers()
            victim = eviction.evict_one(0.0, shared=True)
        left = [entry.id for entry in orm.StagedFile.select()]
    assert raced == [first]
    assert victim is not None and victim.entry is not None and victim.entry.id == second
    assert left == [first]
