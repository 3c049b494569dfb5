"""Opening the database: URL schemes, SQLite set up for several processes, bounded connect retries."""
from __future__ import annotations

import pathlib
from typing import List

import pytest

from pacifica.cartd import database
from pacifica.cartd.config import load_settings
from pacifica.cartd.errors import ConfigError, DatabaseUnavailable
from pacifica.cartd.orm import DB


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
