"""Opening the database: URL schemes, SQLite set up for several processes, bounded connect retries."""
from __future__ import annotations

import pathlib
import threading
from typing import List

import pytest

from pacifica.cartd import database
from pacifica.cartd.config import load_settings
from pacifica.cartd.errors import ConfigError, DatabaseUnavailable
from pacifica.cartd.orm import DB
from playhouse.pool import PooledDatabase


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
