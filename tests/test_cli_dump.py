"""`pacifica-cartd-cmd dump` and `purge`, called in-process (pacifica.cartd.__main__.cmd) on a temp SQLite database.

The schema is made by the command itself (`dbsync`); the carts are rows written through the
ORM, as the service would leave them, so that every value the dump prints is known.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import pathlib
from typing import Any, Dict, Iterator, List

import pytest
import yaml

from pacifica.cartd import database
from pacifica.cartd.__main__ import cmd
from pacifica.cartd.config import load_settings
from pacifica.cartd.orm import Cart, File
from cartd_testkit.stack import write_config

CREATED = datetime.datetime(2024, 1, 2, 3, 4, 5)
UPDATED = datetime.datetime(2024, 1, 2, 3, 9, 30)
CART_KEYS = {'id', 'uid', 'status', 'bundle', 'error', 'files_total', 'files_staged', 'created', 'updated', 'files'}
FILE_KEYS = {'id', 'archive_id', 'path', 'hashtype', 'hashsum', 'status', 'error', 'size',
             'staged_file'}  # the staged-file cache entry it came from (share_staged_files), or None


@pytest.fixture
def config(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> pathlib.Path:
    """A config file for a temp SQLite database and volume, with the schema made by `dbsync`."""
    path = write_config(tmp_path / 'config.cfg', {
        'cartd': {'volume_path': str(tmp_path / 'volume')},
        'database': {'peewee_url': f'sqliteext:///{tmp_path / "db.sqlite3"}'},
    })
    (tmp_path / 'volume').mkdir()
    assert cmd(['-c', str(path), 'dbsync']) == 0
    assert 'database schema is' in capsys.readouterr().out
    return path


@contextlib.contextmanager
def bound(config: pathlib.Path) -> Iterator[None]:
    """Bind the models to the config's database for the test's own reads and writes, and close it after.

    cmd() binds the same global proxy to a database of its own and closes it again, so the
    test's rows are written (and read back) outside each command.
    """
    database.bind(load_settings(str(config)))
    with database.connection():
        yield


def _run(config: pathlib.Path, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run one subcommand in-process; it must succeed; return what it printed."""
    status = cmd(['-c', str(config), *args])
    captured = capsys.readouterr()
    assert status == 0, captured.out + captured.err
    return captured.out


def _two_carts_and_a_deleted_one() -> List[Dict[str, Any]]:
    """Insert a ready cart, a deleted one and a failed bundle cart; return the dump the two live ones make."""
    ready = Cart.create(cart_uid='ready-cart', status='ready', bundle=False, files_total=2, files_staged=2,
                        creation_date=CREATED, updated_date=UPDATED)
    one = File.create(cart=ready, file_name='1001', bundle_path='data/one.txt', hash_type='sha1',
                      hash_value='a' * 40, status='staged', size=11, mtime=1500000000.0)
    two = File.create(cart=ready, file_name='archive id with spaces', bundle_path='data/sub/two.bin',
                      hash_type='md5', hash_value='b' * 32, status='staged', size=0, mtime=1500000000.0)
    gone = Cart.create(cart_uid='deleted-cart', status='deleted', files_total=1, creation_date=CREATED,
                       updated_date=UPDATED, deleted_date=UPDATED)
    File.create(cart=gone, file_name='1003', bundle_path='gone.txt', hash_type='sha1', hash_value='c' * 40,
                status='staged', size=5)
    failed = Cart.create(cart_uid='failed cärt', status='error', bundle=True, files_total=1, files_staged=0,
                         error='Failed to pull file(archive HEAD answered 500: busy)',
                         creation_date=CREATED, updated_date=CREATED)
    lost = File.create(cart=failed, file_name='1004', bundle_path='ünï/côdé.dat', hash_type='sha256',
                       hash_value='d' * 64, status='error', error='archive HEAD answered 500: busy')
    return [
        {'id': ready.id, 'uid': 'ready-cart', 'status': 'ready', 'bundle': False, 'error': '',
         'files_total': 2, 'files_staged': 2, 'created': '2024-01-02 03:04:05', 'updated': '2024-01-02 03:09:30',
         'files': [
             {'id': one.id, 'archive_id': '1001', 'path': 'data/one.txt', 'hashtype': 'sha1', 'hashsum': 'a' * 40,
              'status': 'staged', 'error': '', 'size': 11, 'staged_file': None},
             {'id': two.id, 'archive_id': 'archive id with spaces', 'path': 'data/sub/two.bin', 'hashtype': 'md5',
              'hashsum': 'b' * 32, 'status': 'staged', 'error': '', 'size': 0, 'staged_file': None},
         ]},
        {'id': failed.id, 'uid': 'failed cärt', 'status': 'error', 'bundle': True,
         'error': 'Failed to pull file(archive HEAD answered 500: busy)',
         'files_total': 1, 'files_staged': 0, 'created': '2024-01-02 03:04:05', 'updated': '2024-01-02 03:04:05',
         'files': [
             {'id': lost.id, 'archive_id': '1004', 'path': 'ünï/côdé.dat', 'hashtype': 'sha256', 'hashsum': 'd' * 64,
              'status': 'error', 'error': 'archive HEAD answered 500: busy', 'size': None, 'staged_file': None},
         ]},
    ]


def _check_shape(carts: List[Dict[str, Any]]) -> None:
    for cart in carts:
        assert set(cart) == CART_KEYS
        for entry in cart['files']:
            assert set(entry) == FILE_KEYS


def test_dump_json_lists_live_carts_and_their_files(config: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    with bound(config):
        expected = _two_carts_and_a_deleted_one()
    carts = json.loads(_run(config, capsys, 'dump', '--json'))
    _check_shape(carts)
    assert carts == expected
    assert 'deleted-cart' not in json.dumps(carts)


def test_dump_yaml_is_the_same_data(config: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    with bound(config):
        expected = _two_carts_and_a_deleted_one()
    text = _run(config, capsys, 'dump')
    carts = yaml.safe_load(text)
    _check_shape(carts)
    assert carts == expected  # the dates stay strings: the YAML quotes them
    assert 'failed cärt' in text  # unicode as it is, not escaped
    assert 'deleted-cart' not in text


def test_dump_of_an_empty_database(config: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(config, capsys, 'dump', '--json') == '[]\n'
    assert _run(config, capsys, 'dump') == '[]\n'


def test_purge_removes_a_cart_not_used_for_a_while(config: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    volume = config.parent / 'volume'
    now = datetime.datetime.now()
    with bound(config):
        hour = datetime.timedelta(hours=1)
        old = Cart.create(cart_uid='old', status='ready', files_total=1, files_staged=1,
                          creation_date=now - 2 * hour, updated_date=now - hour)
        File.create(cart=old, file_name='2001', bundle_path='old.txt', hash_type='sha1', hash_value='e' * 40,
                    status='staged', size=3)
        # used "in the future", so that however slow the run, it is younger than one second at the purge
        recent = Cart.create(cart_uid='recent', status='ready', files_total=1, files_staged=1,
                             creation_date=now, updated_date=now + datetime.timedelta(minutes=10))
        File.create(cart=recent, file_name='2002', bundle_path='recent.txt', hash_type='sha1', hash_value='f' * 40,
                    status='staged', size=3)
        for cart in (old, recent):  # the volume as the service lays it out: <id>/<uid>/<path>, cartuids/<uid>
            (volume / str(cart.id) / cart.cart_uid).mkdir(parents=True)
            (volume / str(cart.id) / cart.cart_uid / f'{cart.cart_uid}.txt').write_bytes(b'abc')
            (volume / 'cartuids').mkdir(exist_ok=True)
            os.symlink(f'../{cart.id}/{cart.cart_uid}', volume / 'cartuids' / cart.cart_uid)

    out = _run(config, capsys, 'purge', '--time-ago', '1 second ago')

    assert f'deleted cart old (id {old.id})' in out
    assert 'recent' not in out
    assert out.splitlines()[-1].startswith('1 carts not used since ')
    with bound(config):
        assert [cart.cart_uid for cart in Cart.select()] == ['recent']
        assert [file.file_name for file in File.select()] == ['2002']
    assert not (volume / str(old.id)).exists()
    assert not os.path.lexists(volume / 'cartuids' / 'old')
    assert (volume / str(recent.id) / 'recent' / 'recent.txt').read_bytes() == b'abc'
    assert os.path.islink(volume / 'cartuids' / 'recent')
