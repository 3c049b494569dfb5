"""Upgrade a database written by the published pacifica-cartd 0.7.0 (schema 2.0) to ours (schema.SCHEMA_VERSION).

On SQLite, PostgreSQL and MariaDB: the real 0.7.0 creates its schema and writes carts, files and
tasks; our commands must see that schema as too old, the server must refuse it with one clear
line, `dbsync` must upgrade it in place keeping every row, and 0.7.0 must still be able to write
to the upgraded database (a rolling upgrade).
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import textwrap
from typing import Any, Dict, Iterator, List, Mapping, Sequence, Tuple

import pytest
from playhouse.db_url import connect

from cartd_testkit.databases import drop_database, fresh_database, peewee4_url
from cartd_testkit.procs import free_port
from cartd_testkit.stack import binary, write_config
from cartd_testkit.venvs import reference_cart_venv
from pacifica.cartd.schema import SCHEMA_VERSION

pytestmark = [pytest.mark.integration]

KIND_PARAMS = [
    pytest.param('sqlite'),
    pytest.param('postgres', marks=[pytest.mark.postgres]),
    pytest.param('mysql', marks=[pytest.mark.mysql]),
]

VERSION = '.'.join(map(str, SCHEMA_VERSION))  # what dbsync reaches
VERSION_ROW = dict(zip(('major', 'minor'), SCHEMA_VERSION))
CMD_TIMEOUT_S = 60
SERVER_TIMEOUT_S = 30

# The columns of 0.7.0's schema 2.0, as its own code creates them.
ORIGINAL_COLUMNS: Dict[str, Tuple[str, ...]] = {
    'cartsystem': ('part', 'value'),
    'cart': ('id', 'cart_uid', 'bundle_path', 'bundle', 'creation_date', 'updated_date', 'deleted_date',
             'status', 'error'),
    'file': ('id', 'cart_id', 'file_name', 'bundle_path', 'hash_type', 'hash_value', 'status', 'error'),
    'carttasks': ('id', 'cart_id', 'celery_task_id'),
}
# The columns later schemas add to 0.7.0's tables.
PROGRESS_COLUMNS = ('files_failed', 'files_on_tape', 'files_sized', 'bytes_total', 'bytes_staged')
ADDED_COLUMNS: Dict[str, Tuple[str, ...]] = {
    'cart': ('files_total', 'files_staged', 'bundle_size') + PROGRESS_COLUMNS + ('ready_date',)
    + ('files_transferring', 'percent_staged', 'lifetime', 'expires_date', 'on_file_error', 'callback_url'),
    'file': ('size', 'mtime', 'tar_offset', 'attempts', 'recall_date', 'staged_file_id'),
}
# The tables later schemas add (2.1: spacereservation; 2.7: workersighting; 2.8: cartevent, the completion
# events' outbox; 2.9: cartcounter, the metrics' fleet-wide counters; 2.10: stagedfile, the staged-file cache),
# empty after an upgrade but for the counters.
ADDED_TABLES = ('spacereservation', 'workersighting', 'cartevent', 'cartcounter', 'stagedfile')
EVENT_COLUMNS = sorted(('id', 'event_id', 'cart_id', 'event_type', 'subject', 'event_time', 'data', 'target_url',
                        'state', 'next_attempt', 'attempts', 'last_error', 'created', 'delivered_date'))
STAGED_FILE_COLUMNS = sorted(('id', 'cache_key', 'archive_id', 'archive_key', 'size', 'mtime', 'state', 'digests',
                              'lease_until', 'lease_owner', 'hits', 'last_used', 'created'))  # archive_key: 2.11
# 2.9: the fleet-wide counters of the metrics, one row each, made with the table.
EXPECTED_COUNTERS = {('files_staged', ''): 0, ('staged_bytes', ''): 0, ('hash_mismatches', ''): 0, ('evictions', ''): 0,
                     ('carts_finished', 'ready'): 0, ('carts_finished', 'error'): 0, ('carts_finished', 'expired'): 0}
ORDER_BY = {'stagedfile': 'id', 'workersighting': 'name', 'cartsystem': 'part', 'cart': 'id', 'file': 'id', 'carttasks': 'id'}

# Run by 0.7.0's own interpreter: three carts in the states a live 0.7.0 database holds.
SEED_SCRIPT = textwrap.dedent('''
    import datetime, json
    from pacifica.cartd.orm import DB, Cart, CartTasks, File

    def when(day, minute=0):
        return datetime.datetime(2023, 5, day, 10, minute, 7)

    DB.connect()
    with DB.atomic():
        ready = Cart.create(cart_uid='mig-ready', bundle_path='/srv/carts/ready/', bundle=False,
                            creation_date=when(1), updated_date=when(1, 5), status='ready')
        File.create(cart=ready, file_name='1', bundle_path='/srv/carts/ready/data/a.txt', hash_type='sha1',
                    hash_value='a9993e364706816aba3e25717850c26c9cd0d89d', status='staged')
        File.create(cart=ready, file_name='2', bundle_path='/srv/carts/ready/data/sub/b.bin',
                    hash_type='md5', hash_value='900150983cd24fb0d6963f7d28e17f72', status='staged')
        staging = Cart.create(cart_uid='mig-staging', bundle_path='/srv/carts/staging/', bundle=True,
                              creation_date=when(2), updated_date=when(2, 1), status='staging')
        File.create(cart=staging, file_name='3', bundle_path='/srv/carts/staging/data/c.txt',
                    hash_type='sha1', hash_value='0' * 40, status='staged')
        File.create(cart=staging, file_name='4', bundle_path='/srv/carts/staging/data/d.txt',
                    hash_type='sha1', hash_value='1' * 40, status='waiting')
        File.create(cart=staging, file_name='5', bundle_path='/srv/carts/staging/data/\u00fcn\u00efcode.txt',
                    hash_type=None, hash_value=None, status='waiting')
        CartTasks.create(cart_id=staging, celery_task_id='6f1c2a4e-0d3b-4c55-9d1e-1234567890ab')
        deleted = Cart.create(cart_uid='mig-deleted', bundle_path='/srv/carts/deleted/',
                              creation_date=when(3), updated_date=when(3, 9), deleted_date=when(3, 9),
                              status='deleted', error='')
        File.create(cart=deleted, file_name='6', bundle_path='/srv/carts/deleted/data/e.txt',
                    hash_type='sha1', hash_value='2' * 40, status='error', error='archive said 404')
    print(json.dumps({'ready': ready.id, 'staging': staging.id, 'deleted': deleted.id}))
''')

# Run by 0.7.0 after our upgrade: it inserts with only the columns it knows, then reads back.
ROLLING_SCRIPT = textwrap.dedent('''
    import json
    from pacifica.cartd.orm import DB, Cart, CartTasks, File

    DB.connect()
    with DB.atomic():
        cart = Cart.create(cart_uid='mig-rolling', bundle_path='/srv/carts/rolling/', status='staging')
        one = File.create(cart=cart, file_name='7', bundle_path='/srv/carts/rolling/data/f.txt',
                          hash_type='sha1', hash_value='3' * 40)
        File.update(status='staged').where(File.id == one.id).execute()
        CartTasks.create(cart_id=cart, celery_task_id='task-rolling')
    carts = sorted(c.cart_uid for c in Cart.select())
    files = [f.dict() for f in File.select().where(File.cart == cart)]
    print(json.dumps({'cart': cart.id, 'file': one.id, 'carts': carts, 'files': files}))
''')


class Site:
    """One empty database of a kind, with a config file naming it and helpers to run both versions."""

    def __init__(self, kind: str, url: str, base: pathlib.Path, reference_bin: pathlib.Path) -> None:
        """Write the config file for `url` under `base`."""
        self.kind = kind
        self.url = url
        self.base = base
        self.reference_bin = reference_bin
        self.config = write_config(base / 'config.cfg', {
            'cartd': {'volume_path': str(base / 'volume')},
            'database': {'peewee_url': url, 'connect_attempts': '3', 'connect_wait': '1'},
        })
        env = {key: value for key, value in os.environ.items()
               if key not in ('PYTHONPATH', 'PEEWEE_URL', 'VOLUME_PATH', 'BROKER_URL', 'CELERY_QUEUE')}
        env['CARTD_CONFIG'] = str(self.config)
        env['CARTD_CPCONFIG'] = str(base / 'no-cpconfig.ini')
        self.env = env

    def _run(self, cmd: Sequence[str], timeout: float = CMD_TIMEOUT_S) -> 'subprocess.CompletedProcess[str]':
        return subprocess.run(list(cmd), env=self.env, cwd=self.base, capture_output=True, text=True,
                              timeout=timeout, check=False, stdin=subprocess.DEVNULL)

    def ours(self, *args: str) -> 'subprocess.CompletedProcess[str]':
        """Run our `pacifica-cartd-cmd`."""
        return self._run([binary('pacifica-cartd-cmd'), *args])

    def ours_ok(self, *args: str) -> 'subprocess.CompletedProcess[str]':
        """Run our `pacifica-cartd-cmd` and insist it succeeds."""
        result = self.ours(*args)
        assert result.returncode == 0, f'{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}'
        return result

    def server(self) -> 'subprocess.CompletedProcess[str]':
        """Start our `pacifica-cartd`, expecting it to give up by itself."""
        try:
            return self._run([binary('pacifica-cartd'), '-p', str(free_port()), '-a', '127.0.0.1'],
                             timeout=SERVER_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f'pacifica-cartd started on a database it cannot use (still running after '
                                 f'{SERVER_TIMEOUT_S} s):\n{exc.stderr!r}') from exc

    def reference(self, *args: str) -> 'subprocess.CompletedProcess[str]':
        """Run 0.7.0's `pacifica-cartd-cmd`."""
        return self._run([str(self.reference_bin / 'pacifica-cartd-cmd'), *args])

    def reference_script(self, script: str) -> Any:
        """Run a script with 0.7.0's interpreter and return the JSON it prints last."""
        result = self._run([str(self.reference_bin / 'python'), '-c', script])
        assert result.returncode == 0, f'0.7.0 script failed:\n{result.stdout}\n{result.stderr}'
        return json.loads(result.stdout.strip().splitlines()[-1])

    # ---- direct inspection (peewee of the test process, its own connection each time) ----

    def quote(self, name: str) -> str:
        """The identifier quoted for this kind of database."""
        return f'`{name}`' if self.kind == 'mysql' else f'"{name}"'

    def database(self) -> Any:
        """A new, unconnected peewee database for this URL (peewee runs in autocommit mode)."""
        return connect(peewee4_url(self.url))

    def dump(self, columns: Mapping[str, Sequence[str]]) -> Dict[str, List[Tuple[Any, ...]]]:
        """Every row of each table, only the given columns, in key order."""
        database = self.database()
        try:
            rows: Dict[str, List[Tuple[Any, ...]]] = {}
            for table, names in columns.items():
                select = ', '.join(self.quote(name) for name in names)
                sql = f'SELECT {select} FROM {self.quote(table)} ORDER BY {self.quote(ORDER_BY[table])}'
                rows[table] = [tuple(row) for row in database.execute_sql(sql).fetchall()]
            return rows
        finally:
            database.close()

    def columns(self) -> Dict[str, Dict[str, Any]]:
        """Table -> column name -> peewee's ColumnMetadata, for the four cart tables that exist."""
        database = self.database()
        try:
            tables = set(database.get_tables())
            return {table: {column.name: column for column in database.get_columns(table)}
                    for table in ORIGINAL_COLUMNS if table in tables}
        finally:
            database.close()

    def added_tables(self) -> Dict[str, Dict[str, Tuple[str, bool]]]:
        """Each table a later schema adds that exists: column name -> (type, nullable)."""
        database = self.database()
        try:
            tables = set(database.get_tables())
            return {table: {column.name: (column.data_type.lower(), column.null) for column in database.get_columns(table)}
                    for table in ADDED_TABLES if table in tables}
        finally:
            database.close()

    def indexed_columns(self, table: str) -> List[Tuple[str, ...]]:
        """The column tuples of each index on `table`."""
        database = self.database()
        try:
            return [tuple(index.columns) for index in database.get_indexes(table)]
        finally:
            database.close()

    def counters(self) -> Dict[Tuple[str, str], int]:
        """The cartcounter rows (schema 2.7) by (name, label)."""
        database = self.database()
        try:
            columns = ', '.join(self.quote(column) for column in ('name', 'label', 'value'))
            rows = database.execute_sql(f'SELECT {columns} FROM {self.quote("cartcounter")}').fetchall()
            return {(str(name), str(label)): int(value) for name, label, value in rows}
        finally:
            database.close()

    def version(self) -> Dict[str, int]:
        """The cartsystem rows."""
        return {part: int(value) for part, value in self.dump({'cartsystem': ('part', 'value')})['cartsystem']}


@pytest.fixture(scope='module')
def reference_bin() -> pathlib.Path:
    """The bin directory of the venv holding the published pacifica-cartd 0.7.0."""
    return reference_cart_venv()


@pytest.fixture(params=KIND_PARAMS)
def site(request: pytest.FixtureRequest, tmp_path: pathlib.Path, reference_bin: pathlib.Path) -> Iterator[Site]:
    """A fresh, empty database of each kind in turn, removed afterwards."""
    kind = request.param
    url = fresh_database(kind, tmp_path)
    try:
        yield Site(kind, url, tmp_path, reference_bin)
    finally:
        drop_database(kind, url)


def _assert_server_refuses(site: Site) -> str:
    """Our server must exit non-zero with one line on stderr that names dbsync, and no traceback."""
    result = site.server()
    assert result.returncode != 0, f'pacifica-cartd exited 0:\n{result.stdout}\n{result.stderr}'
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert 'Traceback' not in result.stderr + result.stdout, result.stderr
    assert len(lines) == 1, f'expected one line on stderr, got:\n{result.stderr}'
    assert 'dbsync' in lines[0], lines[0]
    return lines[0]


def _new_column_shape(columns: Mapping[str, Mapping[str, Any]]) -> Dict[Tuple[str, str], Tuple[Any, ...]]:
    """(table, column) -> (type, nullable, has a server default) for the columns later schemas add."""
    shape = {}
    for table, names in ADDED_COLUMNS.items():
        for name in names:
            meta = columns[table][name]
            shape[(table, name)] = (meta.data_type.lower(), meta.null, meta.default is not None)
    return shape


def test_upgrade_published_0_7_0_database(site: Site) -> None:
    """0.7.0 data survives dbsync from 2.0 to the current schema, counters get filled, and 0.7.0 can still write after."""
    # 0.7.0 creates its schema and writes its rows.
    created = site.reference('dbsync')
    assert created.returncode == 0, f'0.7.0 dbsync failed:\n{created.stdout}\n{created.stderr}'
    ids = site.reference_script(SEED_SCRIPT)
    before_columns = site.columns()
    assert {table: set(cols) for table, cols in before_columns.items()} == \
        {table: set(cols) for table, cols in ORIGINAL_COLUMNS.items()}, 'not the 0.7.0 schema this test expects'
    assert site.version() == {'major': 2, 'minor': 0}
    data_tables = {table: cols for table, cols in ORIGINAL_COLUMNS.items() if table != 'cartsystem'}
    before = site.dump(data_tables)
    assert len(before['cart']) == 3 and len(before['file']) == 6 and len(before['carttasks']) == 1, before

    # Our code sees 2.0 as too old, and the server will not start on it.
    for args in (('dbchk',), ('dbchk', '--equal')):
        check = site.ours(*args)
        assert check.returncode != 0, f'{args} accepted schema 2.0:\n{check.stdout}\n{check.stderr}'
    message = _assert_server_refuses(site)
    assert '2.0' in message, message

    # Upgrade in place.
    synced = site.ours_ok('dbsync')
    assert VERSION in synced.stdout, synced.stdout
    site.ours_ok('dbchk')
    site.ours_ok('dbchk', '--equal')
    assert site.version() == VERSION_ROW

    # Every original row, column by column, is unchanged.
    after = site.dump(data_tables)
    assert after == before

    # The new columns exist and have the shape a fresh schema gives them.
    after_columns = site.columns()
    for table, names in ORIGINAL_COLUMNS.items():
        assert set(after_columns[table]) == set(names) | set(ADDED_COLUMNS.get(table, ())), table
    assert any(cols == ('cart_uid',) for cols in site.indexed_columns('cart')), site.indexed_columns('cart')
    assert set(site.added_tables()) == set(ADDED_TABLES), site.added_tables()
    assert site.dump({'workersighting': ('name',)}) == {'workersighting': []}  # no worker seen yet
    shape = _new_column_shape(after_columns)
    for counter in ('files_total', 'files_staged') + PROGRESS_COLUMNS + ('files_transferring', 'percent_staged',
                                                                       'lifetime', 'on_file_error'):
        # NOT NULL with a server-side default, or a 2.0 writer in strict SQL mode cannot insert a cart.
        assert shape[('cart', counter)][1:] == (False, True), (counter, shape)
    assert shape[('file', 'size')][1] is True and shape[('file', 'mtime')][1] is True, shape
    assert shape[('file', 'attempts')][1:] == (False, True), shape
    assert shape[('cart', 'callback_url')][1] is True, shape  # NULL: no callback, as every 0.7.0 cart
    assert sorted(site.added_tables()['cartevent']) == EVENT_COLUMNS
    assert shape[('file', 'recall_date')][1] is True, shape  # nullable: 0.7.0 inserts files without it
    assert sorted(site.added_tables()['stagedfile']) == STAGED_FILE_COLUMNS
    assert shape[('file', 'staged_file_id')][1] is True, shape  # NULL: no pin, as every 0.7.0 file
    assert any(cols == ('staged_file_id',) for cols in site.indexed_columns('file')), site.indexed_columns('file')
    assert {row for row in site.dump({'file': ('staged_file_id',)})['file']} == {(None,)}

    # The counters come from the file rows; the file metadata is unknown (NULL).
    counters = site.dump({'cart': ('id', 'cart_uid', 'files_total', 'files_staged')})['cart']
    assert counters == [
        (ids['ready'], 'mig-ready', 2, 2),
        (ids['staging'], 'mig-staging', 3, 1),
        (ids['deleted'], 'mig-deleted', 1, 0),
    ]
    assert {row for row in site.dump({'file': ('size', 'mtime')})['file']} == {(None, None)}
    # ... and so do the progress counters (no sizes known yet); a ready cart was ready at its last update.
    progress = site.dump({'cart': ('id',) + PROGRESS_COLUMNS})['cart']
    assert progress == [(ids['ready'], 0, 0, 0, 0, 0), (ids['staging'], 0, 0, 0, 0, 0),
                        (ids['deleted'], 1, 0, 0, 0, 0)]
    # No file was transferring in 0.7.0 and no download count or percent is known: all start at 0.
    assert {row[1:] for row in site.dump({'cart': ('id', 'files_transferring', 'percent_staged')})['cart']} == {(0, 0)}
    assert {row for row in site.dump({'file': ('attempts',)})['file']} == {(0,)}
    # 0.7.0's carts never expire, and a file that cannot be staged fails them.
    assert {row[1:] for row in site.dump({'cart': ('id', 'lifetime', 'expires_date', 'on_file_error')})['cart']} \
        == {(0, None, 'fail')}
    ready_dates = site.dump({'cart': ('id', 'ready_date', 'updated_date')})['cart']
    assert [(row[0], row[1] == row[2]) for row in ready_dates if row[1] is not None] == [(ids['ready'], True)]

    # 2.7's counters table, every counter at 0 (what 0.7.0 did before is not counted).
    assert site.counters() == EXPECTED_COUNTERS

    # A second dbsync changes nothing and still succeeds.
    everything = {table: cols + ADDED_COLUMNS.get(table, ()) for table, cols in ORIGINAL_COLUMNS.items()}
    snapshot = site.dump(everything)
    again = site.ours_ok('dbsync')
    assert VERSION in again.stdout, again.stdout
    assert site.dump(everything) == snapshot
    assert site.columns().keys() == after_columns.keys()
    site.ours_ok('dbchk', '--equal')

    # Rolling upgrade: 0.7.0 still accepts the schema and writes with server-side defaults.
    old_check = site.reference('dbchk')
    assert old_check.returncode == 0, f'0.7.0 dbchk refused {VERSION}:\n{old_check.stdout}\n{old_check.stderr}'
    rolled = site.reference_script(ROLLING_SCRIPT)
    assert rolled['carts'] == sorted(['mig-ready', 'mig-staging', 'mig-deleted', 'mig-rolling'])
    assert [f['status'] for f in rolled['files']] == ['staged']
    new_cart = [row for row in site.dump({'cart': ('id', 'status', 'files_total', 'files_staged')})['cart']
                if row[0] == rolled['cart']]
    assert new_cart == [(rolled['cart'], 'staging', 0, 0)]
    new_progress = [row[1:] for row in site.dump({'cart': ('id',) + PROGRESS_COLUMNS})['cart'] if row[0] == rolled['cart']]
    assert new_progress == [(0, 0, 0, 0, 0)]
    assert [row[1:] for row in site.dump({'cart': ('id', 'on_file_error')})['cart'] if row[0] == rolled['cart']] \
        == [('fail',)]
    assert [row[1:] for row in site.dump({'file': ('id', 'attempts')})['file'] if row[0] == rolled['file']] == [(0,)]
    new_file = [row for row in site.dump({'file': ('id', 'cart_id', 'status', 'size', 'mtime')})['file']
                if row[0] == rolled['file']]
    assert new_file == [(rolled['file'], rolled['cart'], 'staged', None, None)]
    assert [row[1:] for row in site.dump({'file': ('id', 'staged_file_id')})['file'] if row[0] == rolled['file']] \
        == [(None,)]  # a 0.7.0 writer pins nothing
    # ... and nothing it did disturbed the upgraded rows.
    assert site.dump(data_tables)['cart'][:3] == before['cart']
    site.ours_ok('dbchk', '--equal')


def test_fresh_database(site: Site) -> None:
    """An empty database is refused, then dbsync creates exactly the current schema (same as an upgraded one)."""
    for args in (('dbchk',), ('dbchk', '--equal')):
        check = site.ours(*args)
        assert check.returncode != 0, f'{args} accepted an empty database:\n{check.stdout}\n{check.stderr}'
    _assert_server_refuses(site)
    assert site.columns() == {}

    synced = site.ours_ok('dbsync')
    assert VERSION in synced.stdout, synced.stdout
    site.ours_ok('dbchk')
    site.ours_ok('dbchk', '--equal')
    assert site.version() == VERSION_ROW
    columns = site.columns()
    assert {table: set(cols) for table, cols in columns.items()} == {
        table: set(cols) | set(ADDED_COLUMNS.get(table, ())) for table, cols in ORIGINAL_COLUMNS.items()}
    assert any(cols == ('cart_uid',) for cols in site.indexed_columns('cart'))
    fresh_shape = _new_column_shape(columns)
    assert fresh_shape[('cart', 'files_total')][1:] == (False, True)
    assert fresh_shape[('file', 'size')][1] is True
    assert sorted(site.added_tables()['cartevent']) == EVENT_COLUMNS
    assert sorted(site.added_tables()['stagedfile']) == STAGED_FILE_COLUMNS
    assert any(cols == ('staged_file_id',) for cols in site.indexed_columns('file'))

    assert site.counters() == EXPECTED_COUNTERS

    # 0.7.0 can write to a database our code created, too.
    rolled = site.reference_script(ROLLING_SCRIPT)
    assert rolled['carts'] == ['mig-rolling']
    assert site.dump({'cart': ('id', 'files_total', 'files_staged')})['cart'] == [(rolled['cart'], 0, 0)]


def test_upgraded_columns_match_fresh_schema(site: Site, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The columns and tables later schemas add have the same type, nullability and default whether upgraded or created."""
    assert site.reference('dbsync').returncode == 0
    site.ours_ok('dbsync')
    upgraded = _new_column_shape(site.columns()), site.added_tables()

    other_base = tmp_path_factory.mktemp(f'fresh-{site.kind}')
    other_url = fresh_database(site.kind, other_base)
    try:
        other = Site(site.kind, other_url, other_base, site.reference_bin)
        other.ours_ok('dbsync')
        fresh = _new_column_shape(other.columns()), other.added_tables()
    finally:
        drop_database(site.kind, other_url)
    assert upgraded == fresh


def test_file_metadata_keeps_its_values(site: Site) -> None:
    """file.size holds sizes over 4 GiB and file.mtime an epoch time to the second (tar headers use both)."""
    site.ours_ok('dbsync')
    rolled = site.reference_script(ROLLING_SCRIPT)
    size, mtime = 5 * 1024 ** 3 + 7, 1700000123.25
    database = site.database()
    try:
        database.execute_sql(
            f'UPDATE {site.quote("file")} SET {site.quote("size")} = {database.param}, '
            f'{site.quote("mtime")} = {database.param} WHERE {site.quote("id")} = {database.param}',
            (size, mtime, rolled['file']))
    finally:
        database.close()
    [(stored_size, stored_mtime)] = site.dump({'file': ('size', 'mtime')})['file']
    assert stored_size == size
    assert abs(stored_mtime - mtime) < 1, f'mtime {mtime} came back as {stored_mtime}'


def test_interrupted_upgrade_can_be_finished(site: Site) -> None:
    """MySQL commits each ALTER at once: a dbsync killed half way leaves columns with version 2.0; a rerun ends it."""
    assert site.reference('dbsync').returncode == 0
    site.reference_script(SEED_SCRIPT)
    database = site.database()
    try:
        database.execute_sql(f'ALTER TABLE {site.quote("cart")} ADD COLUMN {site.quote("files_total")} '
                             'INTEGER NOT NULL DEFAULT 0')
    finally:
        database.close()
    assert site.version() == {'major': 2, 'minor': 0}
    site.ours_ok('dbsync')
    assert site.version() == VERSION_ROW
    assert site.ours('dbchk', '--equal').returncode == 0
    totals = sorted(row[0] for row in site.dump({'cart': ('files_total',)})['cart'])
    assert totals == [1, 2, 3]


def test_the_2_9_step_is_resumable(site: Site) -> None:
    """A 2.8 database gets file.recall_date and the counters table; a step cut off after the column and the
    table were made (rows missing, still 2.8) is finished by a rerun; counters already counting keep their values."""
    site.ours_ok('dbsync')
    database = site.database()
    table, name, value = site.quote('cartcounter'), site.quote('name'), site.quote('value')
    minor = f'UPDATE {site.quote("cartsystem")} SET {value} = 8 WHERE {site.quote("part")} = {database.param}'
    try:
        database.execute_sql(f'DROP TABLE {table}')
        database.execute_sql(f'ALTER TABLE {site.quote("file")} DROP COLUMN {site.quote("recall_date")}')
        database.execute_sql(minor, ('minor',))
    finally:
        database.close()
    assert 'recall_date' not in site.columns()['file']
    assert site.ours('dbchk').returncode != 0
    site.ours_ok('dbsync')
    assert site.version() == VERSION_ROW and site.counters() == EXPECTED_COUNTERS
    assert 'recall_date' in site.columns()['file']
    database = site.database()
    try:
        database.execute_sql(f'UPDATE {table} SET {value} = 41 WHERE {name} = {database.param}', ('files_staged',))
        database.execute_sql(f'DELETE FROM {table} WHERE {name} <> {database.param}', ('files_staged',))
        database.execute_sql(minor, ('minor',))
    finally:
        database.close()
    site.ours_ok('dbsync')
    assert site.counters() == {**EXPECTED_COUNTERS, ('files_staged', ''): 41}
    site.ours_ok('dbchk', '--equal')


def test_the_2_11_step_fills_in_the_archive_keys(site: Site) -> None:
    """A 2.10 database's cache entries (no archive_key column, last_used not indexed) get the column, its
    index and each entry's key, the sha256 of its archive id, by which a later cart finds them, and the
    index on last_used."""
    site.ours_ok('dbsync')
    database = site.database()
    table, q = site.quote('stagedfile'), site.quote
    columns = ('cache_key', 'archive_id', 'size', 'mtime', 'state', 'digests', 'hits', 'last_used', 'created')
    try:
        if site.kind == 'sqlite':  # SQLite drops no indexed column; the others drop its index with it
            database.execute_sql(f'DROP INDEX {q("stagedfile_archive_key")}')
        on_table = f' ON {table}' if site.kind == 'mysql' else ''
        database.execute_sql(f'DROP INDEX {q("stagedfile_last_used")}{on_table}')
        database.execute_sql(f'ALTER TABLE {table} DROP COLUMN {q("archive_key")}')
        for number, archive_id in enumerate(('run/7', 'ünïcode id')):
            database.execute_sql(
                f'INSERT INTO {table} ({", ".join(q(column) for column in columns)}) '
                f'VALUES ({", ".join([database.param] * len(columns))})',
                (f'{number:064d}', archive_id, 10, 1.5, 'ready', '{}', 0, '2026-01-01 00:00:00', '2026-01-01 00:00:00'))
        database.execute_sql(f'UPDATE {q("cartsystem")} SET {q("value")} = 10 WHERE {q("part")} = {database.param}',
                             ('minor',))
    finally:
        database.close()
    assert 'archive_key' not in site.added_tables()['stagedfile'] and site.ours('dbchk').returncode != 0
    site.ours_ok('dbsync')
    assert site.version() == VERSION_ROW
    assert {('archive_key',), ('last_used',)} <= set(site.indexed_columns('stagedfile'))
    assert sorted(site.dump({'stagedfile': ('archive_id', 'archive_key')})['stagedfile']) == sorted(
        (archive_id, hashlib.sha256(archive_id.encode('utf-8')).hexdigest()) for archive_id in ('run/7', 'ünïcode id'))
    site.ours_ok('dbchk', '--equal')


def test_database_errors_are_one_line(site: Site) -> None:
    """A database the commands cannot use gives one clear line, not a traceback."""
    database = site.database()
    try:
        database.execute_sql(f'CREATE TABLE {site.quote("cartsystem")} (part INTEGER)')
    finally:
        database.close()
    result = site.ours('dump')
    assert result.returncode != 0
    assert 'Traceback' not in result.stderr and result.stderr.strip().startswith('pacifica-cartd-cmd: error:')
