"""What /-/ready says when something is wrong, with real peers made to be wrong: a database on a
port nothing listens on, a schema left at an older version, a broker and an archive that are down
(closed ports) or up (the machine's RabbitMQ, the real archive interface), a volume mounted
read-only and one nearly full (size-limited tmpfs). Answered through rest.OpsLane, as the servers do."""
from __future__ import annotations

import datetime
import json
import pathlib
import subprocess
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
from celery import Celery

from pacifica.cartd import database, schema
from pacifica.cartd.archive import ArchiveClient
from pacifica.cartd.celeryapp import CeleryTaskQueue
from pacifica.cartd.config import load_settings
from pacifica.cartd.health import CACHE_S, Health
from pacifica.cartd.orm import CartSystem
from pacifica.cartd.rest import OpsLane
from pacifica.cartd.volume import CartVolume
from pacifica.cartd.workers import GONE_AFTER, REMEMBER_S, WorkerPresence
from cartd_testkit.archive import ArchiveServer
from cartd_testkit.procs import free_port
from cartd_testkit.tmpfs import mounted_tmpfs


class _Service:
    """What OpsLane asks of the service: its health."""

    def __init__(self, health: Health) -> None:
        self.health = health


def _ask(health: Health, path: str = '/-/ready', method: str = 'GET') -> Tuple[str, Dict[str, str], Dict[str, Any]]:
    """(status line, headers, JSON body) of OpsLane's answer."""
    answered: List[Any] = []

    def start_response(status: str, headers: List[Tuple[str, str]]) -> None:
        answered.extend([status, dict(headers)])

    def not_reached(environ: dict, start_response: Any) -> List[bytes]:
        raise AssertionError('passed on to CherryPy')

    body = b''.join(OpsLane(not_reached, lambda: _Service(health))(  # type: ignore[arg-type, return-value]
        {'REQUEST_METHOD': method, 'PATH_INFO': path}, start_response))
    return answered[0], answered[1], json.loads(body) if body else {}


def _bind(tmp_path: pathlib.Path, url: Optional[str] = None) -> None:
    database.bind(load_settings(str(tmp_path / 'none.ini'), environ={
        'PEEWEE_URL': url or f'sqliteext:///{tmp_path}/db.sqlite3', 'DATABASE_CONNECT_ATTEMPTS': '1'}))


NOBODY_LOOKS = WorkerPresence(0)  # worker_heartbeat 0: the workers check is left out of these tests


def _health(volume: pathlib.Path, broker: Any = None, archive: Any = lambda: None,
            presence: WorkerPresence = NOBODY_LOOKS) -> Health:
    volume.mkdir(parents=True, exist_ok=True)
    return Health(CartVolume(volume), broker, archive, presence)


def _check(document: Dict[str, Any], name: str) -> Dict[str, Any]:
    return document['checks'][name][0]


def test_a_database_nobody_answers_fails_readiness_but_not_health(tmp_path: pathlib.Path) -> None:
    _bind(tmp_path, f'postgres://postgres@127.0.0.1:{free_port()}/test')
    health = _health(tmp_path / 'volume')
    status, headers, document = _ask(health)
    assert (status, headers['Content-Type'], document['status']) == ('503 Service Unavailable',
                                                                     'application/health+json', 'fail')
    assert _check(document, 'database:connection')['output'].startswith('cannot reach the database: ')
    assert _check(document, 'database:schema')['status'] == 'fail'
    assert _ask(health, '/-/healthy')[:1] == ('200 OK',) and _ask(health, '/-/healthy')[2] == {'status': 'pass'}


def test_a_database_without_the_schema_or_with_an_older_one_fails(tmp_path: pathlib.Path) -> None:
    _bind(tmp_path)
    health = _health(tmp_path / 'volume')
    _, _, document = _ask(health)
    assert _check(document, 'database:schema') == {
        'status': 'fail', 'output': 'the database has no cart schema: run pacifica-cartd-cmd dbsync'}
    with database.connection():
        schema.sync()
    status, _, document = _ask(health)
    assert (status, document['status']) == ('200 OK', 'pass'), document
    with database.connection():
        CartSystem.update(value=1).where(CartSystem.part == 'minor').execute()
    status, _, document = _ask(health)
    assert (status, _check(document, 'database:schema')['output']) == (
        '503 Service Unavailable', f'schema 2.1 is not usable by this version ({".".join(map(str, schema.SCHEMA_VERSION))}): '
        'run pacifica-cartd-cmd dbsync')


def test_a_broker_and_an_archive_that_are_down_warn(tmp_path: pathlib.Path, archive: ArchiveServer) -> None:
    _bind(tmp_path)
    with database.connection():
        schema.sync()
    closed = free_port()
    down = Health(CartVolume(tmp_path), CeleryTaskQueue(Celery(broker=f'pyamqp://guest:guest@127.0.0.1:{closed}//'))
                  .broker_problem, ArchiveClient(f'http://127.0.0.1:{closed}/', 5, 1 << 20, 0, 0).problem, NOBODY_LOOKS)
    status, _, document = _ask(down)
    assert (status, document['status']) == ('200 OK', 'warn')
    assert _check(document, 'broker:connection')['output'].startswith('the broker does not answer: ')
    assert _check(document, 'archive:connection')['output'].startswith(
        f'the archive does not answer at http://127.0.0.1:{closed}/: ')
    up = Health(CartVolume(tmp_path), CeleryTaskQueue(Celery(broker='pyamqp://guest:guest@127.0.0.1:5672//'))
                .broker_problem, ArchiveClient(archive.url, 5, 1 << 20, 0, 0).problem, NOBODY_LOOKS)
    _, _, document = _ask(up)
    assert document['status'] == 'pass', document


def test_the_broker_and_archive_checks_are_remembered_for_a_while(tmp_path: pathlib.Path) -> None:
    _bind(tmp_path)
    asked: List[str] = []
    now = [100.0]
    health = Health(CartVolume(tmp_path), lambda: asked.append('broker') or None,  # type: ignore[func-returns-value]
                    lambda: asked.append('archive') or None, NOBODY_LOOKS,  # type: ignore[func-returns-value]
                    clock=lambda: now[0])  # type: ignore[func-returns-value]
    for _ in range(3):
        health.ready()
    assert asked == ['broker', 'archive']
    now[0] += CACHE_S
    health.ready()
    assert asked == ['broker', 'archive', 'broker', 'archive']


def test_no_worker_checked_in_warns_and_a_worker_that_does_passes(tmp_path: pathlib.Path) -> None:
    _bind(tmp_path)
    with database.connection():
        schema.sync()
    moment = [1000.0]
    presence = WorkerPresence(0.5, clock=lambda: moment[0])
    health = _health(tmp_path / 'volume', presence=presence)
    status, _, document = _ask(health)
    assert (status, document['status']) == ('200 OK', 'warn'), document
    assert _check(document, 'workers:seen') == {
        'status': 'warn', 'observedValue': 0, 'output': 'no worker: none has checked in; carts wait until one starts'}

    presence.check_in('celery@here', 4321, datetime.datetime.now())
    assert _check(_ask(health)[2], 'workers:seen')['status'] == 'warn'  # what it read is remembered a while
    moment[0] += REMEMBER_S
    status, _, document = _ask(health)
    assert (status, document['status'], _check(document, 'workers:seen')) == (
        '200 OK', 'pass', {'status': 'pass', 'observedValue': 1}), document

    time.sleep(GONE_AFTER * 0.5 + 0.1)  # three heartbeats missed: the worker counts as gone
    moment[0] += REMEMBER_S
    check = _check(_ask(health)[2], 'workers:seen')
    assert check['status'] == 'warn' and check['output'].startswith('no worker: none has been seen since 20'), check

    presence.check_in('celery@here', 4321, datetime.datetime.now())
    presence.leave('celery@here', 4321)  # a worker that stops cleanly is gone at once
    moment[0] += REMEMBER_S
    assert _check(_ask(health)[2], 'workers:seen')['output'] == \
        'no worker: none has checked in; carts wait until one starts'


def test_the_workers_check_needs_the_database(tmp_path: pathlib.Path) -> None:
    _bind(tmp_path)  # no schema
    _, _, document = _ask(_health(tmp_path / 'volume', presence=WorkerPresence(10)))
    assert _check(document, 'workers:seen') == {'status': 'warn', 'output': 'not checked: no usable database'}
    _, _, document = _ask(_health(tmp_path / 'volume'))
    assert _check(document, 'workers:seen') == {'status': 'pass', 'output': 'not checked: worker_heartbeat is 0'}


@pytest.fixture
def tmpfs(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    """A 1 MiB tmpfs of the test's own (it is remounted read-only by one test)."""
    with mounted_tmpfs(tmp_path / 'small', '1m') as mount_point:
        yield mount_point


def test_a_volume_nearly_full_or_read_only_warns(tmp_path: pathlib.Path, tmpfs: pathlib.Path) -> None:
    _bind(tmp_path)
    with database.connection():
        schema.sync()
    health = _health(tmpfs)
    _, _, document = _ask(health)
    assert document['status'] == 'pass' and _check(document, 'volume:free')['observedValue'] > 1000 * 1024
    (tmpfs / 'filler').write_bytes(bytes(1000 * 1024))
    _, _, document = _ask(health)
    assert (document['status'], _check(document, 'volume:free')['status']) == ('warn', 'warn')
    assert _check(document, 'volume:free')['output'] == f'less than 5% of {tmpfs} is free'
    subprocess.run(['mount', '-o', 'remount,ro', str(tmpfs)], check=True)
    _, _, document = _ask(health)
    assert _check(document, 'volume:writable') == {
        'status': 'warn', 'output': f'{tmpfs} is mounted read-only: no file can be staged'}
