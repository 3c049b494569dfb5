"""Check that each database kind gives a fresh, usable, removable database to peewee."""
from __future__ import annotations

import pathlib

import peewee
import pytest
from playhouse.db_url import connect

from cartd_testkit.databases import KINDS, drop_database, fresh_database, peewee4_url, server_available

KIND_PARAMS = [
    pytest.param('sqlite'),
    pytest.param('postgres', marks=[pytest.mark.postgres, pytest.mark.integration]),
    pytest.param('mysql', marks=[pytest.mark.mysql, pytest.mark.integration]),
]


def _connect_url(url: str) -> str:
    """Return the URL that this peewee's db_url understands."""
    return peewee4_url(url) if int(peewee.__version__.split('.', maxsplit=1)[0]) >= 4 else url


@pytest.mark.parametrize('kind', KIND_PARAMS)
def test_fresh_database_roundtrip(kind: str, tmp_path: pathlib.Path) -> None:
    """Create a table, write and read a row, then drop the database."""
    assert kind in KINDS
    if not server_available(kind):
        pytest.fail(f'the {kind} server is not answering on 127.0.0.1')
    url = fresh_database(kind, tmp_path)
    try:
        database = connect(_connect_url(url))

        class Item(peewee.Model):
            """A one-column table."""

            name = peewee.CharField()

        Item.bind(database)
        with database:
            database.create_tables([Item])
            Item.create(name='ünïcode ✓')
            assert [item.name for item in Item.select()] == ['ünïcode ✓']
    finally:
        drop_database(kind, url)
    if kind != 'sqlite':
        with pytest.raises(peewee.OperationalError):
            connect(_connect_url(url)).connect()


def test_fresh_names_differ(tmp_path: pathlib.Path) -> None:
    """Two fresh sqlite databases never share a file."""
    assert fresh_database('sqlite', tmp_path) != fresh_database('sqlite', tmp_path)
