"""Open the configured database: build it from peewee_url, wait for it, and scope connections."""
from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any, Callable, Dict, Iterator, Optional, Tuple, Type
from urllib.parse import urlparse

from peewee import Database, DatabaseError, InterfaceError, OperationalError, SqliteDatabase
from playhouse.db_url import parse as parse_db_url
from playhouse.pool import PooledDatabase, PooledMySQLDatabase, PooledPostgresqlDatabase, PooledSqliteDatabase

from .config import Settings
from .errors import ConfigError, DatabaseUnavailable
from .orm import DB

LOGGER = logging.getLogger(__name__)

# Several processes (the server and each worker) write the same SQLite file: WAL lets
# readers go on while one writer commits, BEGIN IMMEDIATE takes the write lock up front
# so two writers queue on the busy timeout instead of deadlocking on a lock upgrade.
SQLITE_PRAGMAS: Tuple[Tuple[str, Any], ...] = (
    ('journal_mode', 'wal'),
    ('synchronous', 'normal'),
    ('busy_timeout', 60000),
)
POOL_WAIT_S = 30  # how long a request waits for a pooled connection when all are in use

_SERVER_DATABASES: Dict[str, Tuple[Type[Database], str]] = {
    'postgres': (PooledPostgresqlDatabase, 'postgres'),
    'postgresql': (PooledPostgresqlDatabase, 'postgres'),
    'postgres+pool': (PooledPostgresqlDatabase, 'postgres'),
    'postgresql+pool': (PooledPostgresqlDatabase, 'postgres'),
    'mysql': (PooledMySQLDatabase, 'mysql'),
    'mysql+pool': (PooledMySQLDatabase, 'mysql'),
}
_SQLITE_SCHEMES = ('sqlite', 'sqliteext', 'sqlite+pool', 'sqliteext+pool')

# What the database driver raises, for entry points that must turn it into one clear line.
DATABASE_ERRORS = (DatabaseError, InterfaceError)


def make_database(peewee_url: str) -> Database:
    """Build (without connecting) the peewee database a peewee_url names.

    `sqliteext://` (the published default, dropped by peewee 4) means plain SQLite here.
    Connections are pooled on every database: a request or task returns its connection
    to the pool when it ends, so the next one need not reconnect (for SQLite, opening a
    connection and setting its pragmas was 40% of a HEAD). A request that finds every
    pooled connection in use waits up to POOL_WAIT_S for one.
    """
    scheme = urlparse(peewee_url).scheme
    params: Dict[str, Any] = parse_db_url(peewee_url)
    if scheme in _SQLITE_SCHEMES:
        if not params.get('database'):
            raise ConfigError(f'bad value for [database] peewee_url (env PEEWEE_URL): no file in {peewee_url!r}')
        # The pool's `timeout` is its wait for a free connection; SQLite's own wait is the busy_timeout pragma.
        return PooledSqliteDatabase(params.pop('database'), pragmas=SQLITE_PRAGMAS, lock_type='IMMEDIATE',
                                    check_same_thread=False, max_connections=None, timeout=POOL_WAIT_S, **params)
    if scheme in _SERVER_DATABASES:
        database_class, kind = _SERVER_DATABASES[scheme]
        if kind == 'mysql' and 'password' in params:
            params['passwd'] = params.pop('password')
        if kind == 'mysql':
            params.setdefault('charset', 'utf8mb4')
        params.setdefault('max_connections', 32)
        params.setdefault('stale_timeout', 300)
        params.setdefault('timeout', POOL_WAIT_S)
        return database_class(params.pop('database'), **params)
    raise ConfigError(f'bad value for [database] peewee_url (env PEEWEE_URL): unknown scheme {scheme!r} '
                      f'(use sqliteext, sqlite, postgres or mysql)')


def sqlite_file(peewee_url: str) -> Optional[str]:
    """The absolute path of the SQLite file a peewee_url names, or None for a database server."""
    if urlparse(peewee_url).scheme not in _SQLITE_SCHEMES:
        return None
    name = parse_db_url(peewee_url).get('database') or ''
    return os.path.abspath(name) if name and name != ':memory:' else None


def describe(peewee_url: str) -> str:
    """Which database a peewee_url names, for messages: `sqlite /abs/path` or `postgres host:port/name`
    (never its password)."""
    path = sqlite_file(peewee_url)
    if path is not None:
        return f'sqlite {path}'
    where = urlparse(peewee_url)
    port = f':{where.port}' if where.port else ''
    return f'{where.scheme} {where.hostname or ""}{port}{where.path}'


def bind(settings: Settings) -> Database:
    """Point the models' proxy at the configured database and return it."""
    database = make_database(settings.peewee_url)
    DB.initialize(database)
    if settings.database_debug_logging:
        peewee_logger = logging.getLogger('peewee')
        peewee_logger.setLevel(logging.DEBUG)
        if not peewee_logger.handlers:
            peewee_logger.addHandler(logging.StreamHandler())
    return database


def wait_for_database(settings: Settings, sleep: Callable[[float], None] = time.sleep) -> None:
    """Connect, retrying connect_attempts times connect_wait seconds apart, then close.

    Raises DatabaseUnavailable naming the URL's host (never its password) and the last error.
    """
    last_error: Optional[Exception] = None
    for attempt in range(1, settings.database_connect_attempts + 1):
        try:
            DB.connect(reuse_if_open=True)
            DB.execute_sql('SELECT 1')
            DB.close()
            return
        except (OperationalError, InterfaceError) as exc:
            last_error = exc
            LOGGER.warning('database not reachable (attempt %d of %d): %s',
                           attempt, settings.database_connect_attempts, exc)
            if not DB.is_closed():
                DB.close()
            if attempt < settings.database_connect_attempts:
                sleep(settings.database_connect_wait)
    where = urlparse(settings.peewee_url)
    # one line: drivers (psycopg2) put newlines and hints into their messages
    reason = ' '.join(str(last_error).split())
    raise DatabaseUnavailable(
        f'cannot connect to the database {where.scheme}://{where.hostname or ""}{where.path} '
        f'after {settings.database_connect_attempts} attempts: {reason}')


def serialize_writers() -> None:
    """Inside a transaction, wait for every other transaction that called this to end.

    SQLite's BEGIN IMMEDIATE already admits one writer at a time; on PostgreSQL and MySQL
    the schema's version row is locked FOR UPDATE for the rest of the transaction.
    """
    if not isinstance(DB.obj, SqliteDatabase):
        DB.execute_sql("SELECT value FROM cartsystem WHERE part = 'major' FOR UPDATE")


def close_idle() -> None:
    """Close the pooled connections nobody holds: before a server forks (uWSGI), so no child inherits one."""
    if isinstance(DB.obj, PooledDatabase):
        DB.obj.close_idle()


def atomic() -> Any:
    """A transaction on the bound database (a savepoint when one is already open)."""
    return DB.atomic()


@contextlib.contextmanager
def connection() -> Iterator[None]:
    """Hold one connection for the length of a request, task or command, and give it back."""
    opened = DB.connect(reuse_if_open=True)
    try:
        yield
    finally:
        if opened and not DB.is_closed():
            DB.close()
