"""Give each test its own SQLite, PostgreSQL or MariaDB database and remove it afterwards."""
from __future__ import annotations

import itertools
import os
import pathlib
import re
import secrets
import socket
import threading
from typing import Dict, Tuple, Union
from urllib.parse import urlparse

KINDS: Tuple[str, ...] = ('sqlite', 'postgres', 'mysql')

PG_HOST, PG_PORT, PG_USER, PG_ADMIN_DB = '127.0.0.1', 5432, 'postgres', 'postgres'
MYSQL_HOST, MYSQL_PORT, MYSQL_USER, MYSQL_PASSWORD = '127.0.0.1', 3306, 'root', ''

SERVER_ADDRESSES: Dict[str, Tuple[str, int]] = {
    'postgres': (PG_HOST, PG_PORT),
    'mysql': (MYSQL_HOST, MYSQL_PORT),
}

_COUNTER = itertools.count(1)
_COUNTER_LOCK = threading.Lock()
_NAME_RE = re.compile(r'^cartd_t_[0-9a-z_]+$')
PathLike = Union[str, 'os.PathLike[str]']


def database_urls(tmp_path: PathLike, dbname: str = 'test') -> Dict[str, str]:
    """Return the peewee URL of each database kind (sqlite file under tmp_path, server db `dbname`)."""
    return {
        'sqlite': f'sqliteext:///{pathlib.Path(tmp_path) / "db.sqlite3"}',
        'postgres': f'postgres://{PG_USER}@{PG_HOST}:{PG_PORT}/{dbname}',
        'mysql': f'mysql://{MYSQL_USER}@{MYSQL_HOST}:{MYSQL_PORT}/{dbname}',
    }


def peewee4_url(url: str) -> str:
    """Map the `sqliteext://` scheme (gone from peewee 4's db_url) to plain `sqlite://`."""
    return 'sqlite://' + url[len('sqliteext://'):] if url.startswith('sqliteext://') else url


def server_available(kind: str, timeout: float = 1.0) -> bool:
    """Tell whether the server for `kind` accepts TCP connections (sqlite is always available)."""
    if kind == 'sqlite':
        return True
    host, port = SERVER_ADDRESSES[kind]
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def unique_database_name() -> str:
    """Return a database name that no other worker, run or test uses."""
    with _COUNTER_LOCK:
        count = next(_COUNTER)
    return f'cartd_t_{os.getpid()}_{count}_{secrets.token_hex(4)}'


def _admin_execute(kind: str, statement: str) -> None:
    """Run one statement outside any transaction on the server for `kind`."""
    if kind == 'postgres':
        import psycopg2  # pylint: disable=import-outside-toplevel

        conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=PG_ADMIN_DB, connect_timeout=10)
        try:
            conn.autocommit = True
            with conn.cursor() as cursor:
                cursor.execute(statement)
        finally:
            conn.close()
    elif kind == 'mysql':
        import pymysql  # pylint: disable=import-outside-toplevel

        conn = pymysql.connect(
            host=MYSQL_HOST, port=MYSQL_PORT, user=MYSQL_USER, password=MYSQL_PASSWORD,
            connect_timeout=10, autocommit=True,
        )
        try:
            with conn.cursor() as cursor:
                cursor.execute(statement)
        finally:
            conn.close()
    else:
        raise ValueError(f'no server for database kind {kind!r}')


def fresh_database(kind: str, tmp_path: PathLike) -> str:
    """Create a brand-new empty database of `kind` and return its peewee URL."""
    if kind == 'sqlite':
        directory = pathlib.Path(tmp_path) / unique_database_name()
        directory.mkdir(parents=True)
        return database_urls(directory)['sqlite']
    name = unique_database_name()
    if kind == 'postgres':
        _admin_execute(kind, f'CREATE DATABASE "{name}"')
    elif kind == 'mysql':
        _admin_execute(kind, f'CREATE DATABASE `{name}` CHARACTER SET utf8mb4')
    else:
        raise ValueError(f'unknown database kind {kind!r}')
    return database_urls(tmp_path, name)[kind]


def drop_database(kind: str, url: str) -> None:
    """Remove a database made by fresh_database (server connections to it are closed first)."""
    if kind == 'sqlite':
        path = pathlib.Path(urlparse(url).path[1:])  # peewee reads the file name after the third slash
        for suffix in ('', '-wal', '-shm', '-journal'):
            pathlib.Path(f'{path}{suffix}').unlink(missing_ok=True)
        return
    name = urlparse(url).path.lstrip('/')
    if not _NAME_RE.match(name):
        raise ValueError(f'refusing to drop {name!r}: not made by fresh_database')
    if kind == 'postgres':
        _admin_execute(kind, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    elif kind == 'mysql':
        _admin_execute(kind, f'DROP DATABASE IF EXISTS `{name}`')
    else:
        raise ValueError(f'unknown database kind {kind!r}')
