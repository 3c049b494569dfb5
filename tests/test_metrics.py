"""The metrics on a temp SQLite database: the gauges and fleet-wide counters read at a scrape, counters bumped
in the transaction of the change (and rolled back with it), and the HTTP lane's counts, parsed with
prometheus_client's own parser."""
from __future__ import annotations

import datetime
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import textwrap
from typing import Any, Dict, Iterator, List, Set, Tuple

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pacifica.cartd import database, schema
from pacifica.cartd.archive import ArchiveClient
from pacifica.cartd.config import load_settings
from pacifica.cartd.errors import ArchiveError, ArchiveFileMissing, HashMismatch
from pacifica.cartd.metrics import ServerMetrics, WorkerMetrics, fresh_multiprocess_dir, remove_multiprocess_dir
from pacifica.cartd.orm import (EVICTIONS, Cart, File, StagedCount, add_reservation, bump_counters,
                                claim_eviction, claim_expiry, claim_for_bundling, count_files_staged,
                                count_hash_mismatches, count_staged, counter_values, fail_cart, files_to_stage,
                                insert_cart, mark_ready, mark_recalling, mark_staged, mark_transferring,
                                oldest_evictable)
from pacifica.cartd.rest import METRICS_PATH, MetricsLane, OpsLane
from pacifica.cartd.transport import SENDFILE_ENVIRON_KEY
from pacifica.cartd.volume import CartVolume
from pacifica.cartd.workers import REMEMBER_S, WorkerPresence
from cartd_testkit.archive import ArchiveServer
from cartd_testkit.procs import free_port

Samples = Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """Every sample of an exposition by (name, sorted labels)."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


@pytest.fixture()
def bound(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    """A fresh schema in a temp SQLite file, the models bound to it; the volume directory."""
    database.bind(load_settings(str(tmp_path / 'none.ini'), environ={
        'PEEWEE_URL': f'sqliteext:///{tmp_path}/db.sqlite3', 'DATABASE_CONNECT_ATTEMPTS': '1'}))
    with database.connection():
        schema.sync()
    volume = tmp_path / 'volume'
    volume.mkdir()
    yield volume


def _cart(uid: str, files: int) -> Tuple[int, List[int]]:
    rows = [(f'{uid}-{index}', f'f{index}', 'sha1', '0' * 40) for index in range(files)]
    with database.connection(), database.atomic():
        return insert_cart(uid, False, rows, 0)


def _stage(cart_id: int, file_ids: List[int], size: int) -> StagedCount:
    with database.connection(), database.atomic():
        fresh = mark_staged([(file_id, size, 0.0, 1) for file_id in file_ids])
        count_staged(cart_id, fresh)
        count_files_staged(fresh)  # as staging's batches do
    return fresh


def _scrape(volume: pathlib.Path) -> Samples:
    return samples(ServerMetrics(CartVolume(volume)).exposition().decode('utf-8'))


def test_a_fresh_database_reports_zeros(bound: pathlib.Path) -> None:
    found = _scrape(bound)
    assert found[('cartd_database_up', ())] == 1
    for name in ('cartd_files_staged_total', 'cartd_staged_bytes_total', 'cartd_hash_mismatches_total',
                 'cartd_evictions_total', 'cartd_oldest_staging_cart_age_seconds', 'cartd_volume_reserved_bytes'):
        assert found[(name, ())] == 0, name
    for status in ('ready', 'error', 'expired'):
        assert found[('cartd_carts_finished_total', (('status', status),))] == 0
    assert found[('cartd_volume_free_bytes', ())] > 0
    assert all(found[('cartd_carts', (('status', status),))] == 0 for status in ('staging', 'ready', 'error'))


def test_gauges_and_counters_follow_what_was_done(bound: pathlib.Path) -> None:
    good, good_files = _cart('good', 3)
    bad, bad_files = _cart('bad', 2)
    taped, taped_files = _cart('taped', 4)
    _stage(good, good_files, 100)
    _stage(bad, bad_files[:1], 7)
    _stage(bad, bad_files[:1], 7)  # a duplicate task: not counted twice
    with database.connection():
        with database.atomic():
            mark_recalling(taped, {file_id: None for file_id in taped_files[:3]})
            add_reservation(taped, taped_files[3], 4096, None, None)
        assert claim_for_bundling(good) and mark_ready(good, '/somewhere')
        assert not mark_ready(good, '/somewhere')  # already ready: counted once
        fail_cart(bad, 'a hash mismatch')
        fail_cart(bad, 'again')  # already failed: counted once
        count_hash_mismatches(2)
        Cart.update(creation_date=datetime.datetime.now() - datetime.timedelta(hours=2)).where(
            Cart.id == taped).execute()
    found = _scrape(bound)
    assert found[('cartd_files_staged_total', ())] == 4
    assert found[('cartd_staged_bytes_total', ())] == 307
    assert found[('cartd_hash_mismatches_total', ())] == 2
    assert found[('cartd_carts_finished_total', (('status', 'ready'),))] == 1
    assert found[('cartd_carts_finished_total', (('status', 'error'),))] == 1
    assert found[('cartd_carts', (('status', 'ready'),))] == 1
    assert found[('cartd_carts', (('status', 'error'),))] == 1
    assert found[('cartd_carts', (('status', 'staging'),))] == 1
    # only the cart still being worked on: 3 on tape, 1 queued
    assert found[('cartd_files', (('state', 'on_tape'),))] == 3
    assert found[('cartd_files', (('state', 'queued'),))] == 1
    assert found[('cartd_files', (('state', 'staged'),))] == 0
    assert found[('cartd_volume_reserved_bytes', ())] == 4096
    assert 2 * 3600 - 60 < found[('cartd_oldest_staging_cart_age_seconds', ())] < 2 * 3600 + 600


def test_evictions_and_expiries_are_counted_once(bound: pathlib.Path) -> None:
    cart_id, file_ids = _cart('old', 1)
    _stage(cart_id, file_ids, 10)
    with database.connection():
        assert claim_for_bundling(cart_id) and mark_ready(cart_id, '/x')
        Cart.update(updated_date=datetime.datetime(2001, 1, 1)).where(Cart.id == cart_id).execute()
        victim = oldest_evictable(datetime.datetime.now())
        assert victim is not None
        with database.atomic():
            assert claim_eviction(victim)
        assert not claim_eviction(victim)  # lost the compare-and-set: not counted
        expiring, expiring_files = _cart('expiring', 1)
    _stage(expiring, expiring_files, 10)
    with database.connection():
        assert claim_for_bundling(expiring) and mark_ready(expiring, '/y')
        cart = Cart.get_by_id(expiring)
        assert claim_expiry(cart) and not claim_expiry(cart)
        assert counter_values()[(EVICTIONS, '')] == 1
    found = _scrape(bound)
    assert found[('cartd_evictions_total', ())] == 1
    assert found[('cartd_carts_finished_total', (('status', 'expired'),))] == 1
    assert found[('cartd_carts_finished_total', (('status', 'ready'),))] == 2


def test_a_rolled_back_change_counts_nothing(bound: pathlib.Path) -> None:
    cart_id, file_ids = _cart('rolled', 2)
    with database.connection():
        with pytest.raises(RuntimeError):
            with database.atomic():
                count_files_staged(mark_staged([(file_ids[0], 5, 0.0, 1)]))
                raise RuntimeError('the batch failed')
        assert counter_values()[('files_staged', '')] == 0
        assert [file.id for file in files_to_stage(file_ids)] == file_ids


def test_a_missing_counter_row_is_made(bound: pathlib.Path) -> None:
    with database.connection():
        bump_counters({('files_staged', ''): 3, ('something_new', 'x'): 2, ('evictions', ''): 0})
        values = counter_values()
    assert values[('files_staged', '')] == 3 and values[('something_new', 'x')] == 2 and values[('evictions', '')] == 0


def test_a_database_that_cannot_be_read_says_so(tmp_path: pathlib.Path) -> None:
    database.bind(load_settings(str(tmp_path / 'none.ini'), environ={
        'PEEWEE_URL': f'sqliteext:///{tmp_path}/empty.sqlite3', 'DATABASE_CONNECT_ATTEMPTS': '1'}))
    volume = tmp_path / 'volume'
    volume.mkdir()
    found = _scrape(volume)  # no schema: the queries fail, the scrape does not
    assert found[('cartd_database_up', ())] == 0
    assert found[('cartd_volume_free_bytes', ())] > 0
    assert not any(name == 'cartd_carts' for name, _ in found)


def _call(app: Any, environ: Dict[str, Any]) -> Tuple[str, bytes]:
    answered: List[str] = []
    written: List[bytes] = []

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        answered.append(status)
        return written.append

    body = app(environ, start_response)
    try:
        chunks = b''.join(body)
    finally:
        getattr(body, 'close', lambda: None)()
    return answered[0], b''.join(written) + chunks


def test_the_lane_counts_requests_bytes_and_files_sent_by_the_server(bound: pathlib.Path) -> None:
    metrics = ServerMetrics(CartVolume(bound))
    served_file = bound / 'payload'
    served_file.write_bytes(b'x' * 1000)

    def app(environ: Dict[str, Any], start_response: Any) -> Any:
        if environ['PATH_INFO'] == '/download':
            write = start_response('200 OK', [])
            write(b'hdr')
            with open(served_file, 'rb') as handle:
                assert environ[SENDFILE_ENVIRON_KEY](handle, 0, 1000) == 1000
            return [b'tail']
        start_response('204 No Content' if environ['REQUEST_METHOD'] == 'HEAD' else '404 Not Found', [])
        return [b''] if environ['REQUEST_METHOD'] == 'HEAD' else [b'{"status": "404"}']

    def server_sendfile(handle: Any, offset: int, count: int) -> int:
        return len(handle.read(count))  # what a server's sendfile reports: the bytes it sent

    lane = MetricsLane(OpsLane(app, lambda: None, metrics), metrics)  # type: ignore[arg-type, return-value]
    for _ in range(5):
        assert _call(lane, {'REQUEST_METHOD': 'HEAD', 'PATH_INFO': '/cart'})[0] == '204 No Content'
    assert _call(lane, {'REQUEST_METHOD': 'GET', 'PATH_INFO': '/nope'})[0] == '404 Not Found'
    assert _call(lane, {'REQUEST_METHOD': 'BREW', 'PATH_INFO': '/nope'})[0] == '404 Not Found'
    status, _ = _call(lane, {'REQUEST_METHOD': 'GET', 'PATH_INFO': '/download',
                             SENDFILE_ENVIRON_KEY: server_sendfile})
    assert status == '200 OK'
    status, text = _call(lane, {'REQUEST_METHOD': 'GET', 'PATH_INFO': METRICS_PATH})
    assert status == '200 OK'
    found = samples(text.decode('utf-8'))
    assert found[('cartd_http_requests_total', (('code', '204'), ('method', 'HEAD')))] == 5
    assert found[('cartd_http_requests_total', (('code', '404'), ('method', 'GET')))] == 1
    assert found[('cartd_http_requests_total', (('code', '404'), ('method', 'other')))] == 1
    assert found[('cartd_http_requests_total', (('code', '200'), ('method', 'GET')))] == 1  # the scrape is not counted
    assert found[('cartd_http_request_duration_seconds_count', ())] == 8
    assert found[('cartd_served_bytes_total', ())] == 2 * len(b'{"status": "404"}') + 3 + 1000 + 4
    assert _call(lane, {'REQUEST_METHOD': 'POST', 'PATH_INFO': METRICS_PATH})[0] == '405 Method Not Allowed'


def test_metrics_off_leaves_the_path_to_the_api(bound: pathlib.Path) -> None:
    passed: List[str] = []

    def app(environ: Dict[str, Any], start_response: Any) -> Any:
        passed.append(environ['PATH_INFO'])
        start_response('404 Not Found', [])
        return [b'{}']

    assert _call(OpsLane(app, lambda: None), {'REQUEST_METHOD': 'GET', 'PATH_INFO': METRICS_PATH})[0] == '404 Not Found'
    assert passed == [METRICS_PATH]


def test_processes_sharing_a_directory_are_summed(tmp_path: pathlib.Path) -> None:
    """Two forked processes count into the multiprocess directory; a third reads the sum (a subprocess:
    the choice of multiprocess mode is global to a process)."""
    script = textwrap.dedent(f'''
        import os, pathlib
        from pacifica.cartd.metrics import ServerMetrics, use_multiprocess_dir
        from pacifica.cartd.volume import CartVolume
        directory = pathlib.Path({str(tmp_path / 'mp')!r})
        directory.mkdir()
        (directory / 'counter_999999.db').write_bytes(b'left by an earlier run')
        use_multiprocess_dir(directory)
        assert not (directory / 'counter_999999.db').exists()
        metrics = ServerMetrics(CartVolume(pathlib.Path({str(tmp_path)!r})), directory)
        children = []
        for count in (3, 4):
            pid = os.fork()
            if pid == 0:
                for _ in range(count):
                    metrics.observe('HEAD', '204', 0.001)
                os._exit(0)
            children.append(pid)
        for pid in children:
            os.waitpid(pid, 0)
        print(metrics.exposition().decode())
    ''')
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    found = samples(result.stdout)
    assert found[('cartd_http_requests_total', (('code', '204'), ('method', 'HEAD')))] == 7
    assert found[('cartd_http_request_duration_seconds_count', ())] == 7


DOCS = pathlib.Path(__file__).resolve().parent.parent / 'docs'
METRIC_NAME = re.compile(r'\bcartd_[a-z_]+\b')
WORKER_FAMILIES = {'cartd_archive_requests_total', 'cartd_archive_request_duration_seconds',
                   'cartd_tape_recall_duration_seconds'}


def _exposed_names(volume: pathlib.Path) -> Set[str]:
    """The sample names a server and a worker expose (the server's with workers checking in)."""
    metrics = ServerMetrics(CartVolume(volume), presence=WorkerPresence(10))
    metrics.observe('GET', '200', 0.01)
    metrics.count_served(1)
    registry = CollectorRegistry()
    worker = WorkerMetrics(registry)
    worker.archive_request('GET', 'ok', 0.5)
    worker.tape_recall(60)
    return {name for name, _ in {**samples(metrics.exposition().decode('utf-8')),
                                 **samples(generate_latest(registry).decode('utf-8'))}}


def test_the_dashboard_and_alerts_use_only_exposed_metrics(bound: pathlib.Path) -> None:
    exposed = _exposed_names(bound)
    dashboard = json.loads((DOCS / 'grafana-dashboard.json').read_text(encoding='utf-8'))
    graphed = [target['expr'] for panel in dashboard['panels'] for target in panel['targets']]
    rules = yaml.safe_load((DOCS / 'prometheus-alerts.yml').read_text(encoding='utf-8'))
    alerted = [rule['expr'] for group in rules['groups'] for rule in group['rules']]
    scrape = yaml.safe_load((DOCS / 'prometheus-scrape.yml').read_text(encoding='utf-8'))
    assert scrape['scrape_configs'][0]['metrics_path'] == METRICS_PATH
    assert {rule['alert'] for group in rules['groups'] for rule in group['rules']} >= {
        'CartdCartsStuck', 'CartdHashMismatchesRising', 'CartdVolumeNearlyFull', 'CartdNoWorker'}
    for expression in graphed + alerted:
        used = set(METRIC_NAME.findall(expression))
        assert used and used <= exposed, (expression, used - exposed)
    monitoring = (DOCS / 'monitoring.md').read_text(encoding='utf-8')
    documented = {name for name in re.findall(r'^\| `(cartd_[a-z_]+)', monitoring, flags=re.M)}
    # a histogram's samples named as its family; a counter's _created samples left out
    families = {re.sub(r'_(bucket|count|sum)$', '', name) for name in exposed if not name.endswith('_created')}
    assert documented == families


def test_a_recall_is_timed_from_the_first_sight_on_tape(bound: pathlib.Path) -> None:
    cart_id, file_ids = _cart('taped', 3)
    with database.connection():
        with database.atomic():
            mark_recalling(cart_id, {file_ids[0]: 10, file_ids[1]: 10})
        File.update(recall_date=datetime.datetime.now() - datetime.timedelta(hours=2)).where(
            File.id == file_ids[0]).execute()
        with database.atomic():
            mark_recalling(cart_id, {file_ids[0]: 10})  # looked at again, still on tape: its start is kept
            mark_transferring(cart_id, {file_ids[0]: 1, file_ids[1]: 1})
    fresh = _stage(cart_id, file_ids, 10)
    assert fresh.files == 3 and len(fresh.recalls) == 2  # the third was on disk: no recall
    slow, fast = sorted(fresh.recalls, reverse=True)
    assert 2 * 3600 - 60 < slow < 2 * 3600 + 600 and 0 <= fast < 600
    with database.connection():
        assert {row.recall_date for row in File.select(File.recall_date)} == {None}  # gone once staged


def test_the_archive_client_tells_how_each_request_ended(archive: ArchiveServer, tmp_path: pathlib.Path) -> None:
    """Against the real archive interface, and a port nothing listens on."""
    heard: List[Tuple[str, str]] = []
    client = ArchiveClient(archive.url, 10, 1 << 20, 0, 0, observe=lambda method, outcome, _: heard.append(
        (method, outcome)))
    body = b'metrics' * 100
    sums = archive.put('metrics-observed', body)
    assert client.status('metrics-observed').on_disk
    client.download('metrics-observed', tmp_path / 'a', 'sha1', sums['sha1'], len(body))
    with pytest.raises(HashMismatch):
        client.download('metrics-observed', tmp_path / 'b', 'sha1', '0' * 40, len(body))
    with pytest.raises(ArchiveFileMissing):
        client.status('metrics-not-there')
    nowhere = ArchiveClient(f'http://127.0.0.1:{free_port()}/', 2, 1 << 20, 0, 0,
                            observe=lambda method, outcome, _: heard.append((method, outcome)))
    with pytest.raises(ArchiveError):
        nowhere.stage('anything')
    assert heard == [('HEAD', 'ok'), ('GET', 'ok'), ('GET', 'hash_mismatch'), ('HEAD', 'missing'), ('POST', 'error')]


def test_worker_metrics_are_named_as_documented() -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    metrics.archive_request('GET', 'ok', 0.5)
    metrics.tape_recall(7200)
    found = samples(generate_latest(registry).decode('utf-8'))
    assert found[('cartd_archive_requests_total', (('method', 'GET'), ('outcome', 'ok')))] == 1
    assert found[('cartd_archive_request_duration_seconds_count', (('method', 'GET'),))] == 1
    assert found[('cartd_tape_recall_duration_seconds_bucket', (('le', '3600.0'),))] == 0
    assert found[('cartd_tape_recall_duration_seconds_bucket', (('le', '7200.0'),))] == 1
    monitoring = (DOCS / 'monitoring.md').read_text(encoding='utf-8')
    for name in WORKER_FAMILIES:
        assert f'| `{name}' in monitoring, name


def test_a_fresh_directory_clears_those_of_processes_gone() -> None:
    prefix = f'cartd-test-metrics-{os.getpid()}x'
    ended = subprocess.Popen([sys.executable, '-c', 'pass'])
    ended.wait(timeout=30)
    gone = pathlib.Path(tempfile.mkdtemp(prefix=f'{prefix}{ended.pid}-'))
    (gone / 'counter_1.db').write_bytes(b'')
    alive = pathlib.Path(tempfile.mkdtemp(prefix=f'{prefix}1-'))  # pid 1 is always there
    made = fresh_multiprocess_dir(prefix)
    try:
        assert not gone.exists() and alive.is_dir() and made.is_dir()
        assert made.name.startswith(f'{prefix}{os.getpid()}-')
    finally:
        for directory in (alive, made):
            remove_multiprocess_dir(directory)
    assert not made.exists()


def test_the_workers_that_checked_in_are_a_gauge(bound: pathlib.Path) -> None:
    moment = [0.0]
    presence = WorkerPresence(0.5, clock=lambda: moment[0])
    assert samples(ServerMetrics(CartVolume(bound), presence=presence).exposition().decode('utf-8'))[
        ('cartd_workers', ())] == 0
    presence.check_in('celery@a', 1, datetime.datetime.now())
    presence.check_in('celery@b', 2, datetime.datetime.now())
    moment[0] += REMEMBER_S  # what a server read of the workers is remembered a while
    assert samples(ServerMetrics(CartVolume(bound), presence=presence).exposition().decode('utf-8'))[
        ('cartd_workers', ())] == 2
    assert ('cartd_workers', ()) not in _scrape(bound)  # no presence (worker_heartbeat 0): not reported
