"""GET /-/metrics through the real server, worker, broker and archive, under pacifica-cartd (three databases)
and uWSGI (two processes): the counters move by exactly what was done, the HTTP counts are summed across
uWSGI's processes, the database's counters survive a restart of the server, and metrics can be turned off.

Each stack is fresh per module (conftest.served_stack), and the tests compare scrapes before and after.
"""
from __future__ import annotations

import os
import time
import uuid
from typing import Dict, List, Tuple

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from cartd_testkit.faultproxy import FaultProxy
from cartd_testkit.procs import free_port
from cartd_testkit.stack import CartStack

pytestmark = [pytest.mark.integration]

ARCHIVE_BEHIND_PROXY = True  # conftest.served_stack: the archive through the fault proxy (a file can be on "tape")
STACK_OVERRIDES = {'archiveinterface': {'tape_wait': '1', 'tape_wait_max': '1'}}  # a file on tape: looked at after 1 s
TAPE_HEADS = 2  # HEADs of the held file answered "tape" before it is on disk
Samples = Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]
DB_COUNTERS = ('cartd_files_staged_total', 'cartd_staged_bytes_total', 'cartd_hash_mismatches_total',
               'cartd_evictions_total')


@pytest.fixture(scope='module')
def stack(served_stack: CartStack) -> CartStack:
    """Under pacifica-cartd on each database and under uWSGI (conftest.served_stack)."""
    return served_stack


def scrape(url: str) -> Samples:
    """Every sample of /-/metrics by (name, sorted labels), parsed with prometheus_client's parser."""
    answer = requests.get(f'{url}/-/metrics', timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.headers['Content-Type'].startswith('text/plain')
    return parsed(answer.text)


def parsed(text: str) -> Samples:
    """Every sample of an exposition by (name, sorted labels)."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def settled(url: str, deadline_s: float = 10) -> Samples:
    """A scrape once every request counted has its duration counted too: a duration is counted when the
    request's body is closed, which may come just after its client has the answer."""
    deadline = time.monotonic() + deadline_s
    while True:
        found = scrape(url)
        requests_counted = sum(count for (name, _), count in found.items() if name == 'cartd_http_requests_total')
        if requests_counted == value(found, 'cartd_http_request_duration_seconds_count'):
            return found
        assert time.monotonic() < deadline, f'{requests_counted} requests, durations: {found}'
        time.sleep(0.05)


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value, 0 when it is not there (a label value not seen yet)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _files(stack: CartStack, uid: str, sizes: List[int], wrong_hash: bool = False) -> List[dict]:
    fileids = []
    for index, size in enumerate(sizes):
        sums = stack.archive.put(f'{uid}-{index}', os.urandom(size))
        fileids.append({'id': f'{uid}-{index}', 'path': f'f{index}.bin', 'hashtype': 'sha1',
                        'hashsum': '0' * 40 if wrong_hash else sums['sha1']})
    return fileids


def test_the_counters_move_by_what_was_done(stack: CartStack) -> None:
    before = scrape(stack.url)
    assert value(before, 'cartd_database_up') == 1
    assert value(before, 'cartd_workers') == 1  # the stack's one worker has checked in
    good, bad = f'good-{uuid.uuid4().hex[:8]}', f'bad-{uuid.uuid4().hex[:8]}'
    sizes = [1000, 70_000, 3]
    assert stack.post(good, _files(stack, good, sizes)).status_code == 201
    assert stack.post(bad, _files(stack, bad, [500], wrong_hash=True)).status_code == 201
    assert stack.wait_final(good).status_code == 204
    assert stack.wait_final(bad).headers['X-Pacifica-Status'] == 'error'
    after = scrape(stack.url)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved('cartd_files_staged_total') == len(sizes)
    assert moved('cartd_staged_bytes_total') == sum(sizes)
    assert moved('cartd_hash_mismatches_total') == 2  # the download, and its second chance
    assert moved('cartd_carts_finished_total', status='ready') == 1
    assert moved('cartd_carts_finished_total', status='error') == 1
    assert moved('cartd_carts_finished_total', status='expired') == 0
    assert moved('cartd_evictions_total') == 0
    assert moved('cartd_carts', status='ready') == 1 and moved('cartd_carts', status='error') == 1
    assert value(after, 'cartd_carts', status='staging') == 0
    assert value(after, 'cartd_oldest_staging_cart_age_seconds') == 0
    assert value(after, 'cartd_volume_free_bytes') > 0
    assert value(after, 'cartd_volume_reserved_bytes') == 0
    assert all(value(after, 'cartd_files', state=state) == 0 for state in ('queued', 'on_tape', 'transferring'))

    download = stack.download(good, 'good.tar')
    assert download.status_code == 200
    served = scrape(stack.url)
    assert value(served, 'cartd_served_bytes_total') - value(after, 'cartd_served_bytes_total') == len(
        download.content)
    assert value(served, 'cartd_http_requests_total', method='GET', code='200') - value(
        after, 'cartd_http_requests_total', method='GET', code='200') == 1


def test_requests_are_summed_across_the_processes(stack: CartStack) -> None:
    """N HEADs, each on a new connection (under uWSGI spread over its two processes), count N in all."""
    uid = f'polled-{uuid.uuid4().hex[:8]}'
    assert stack.post(uid, _files(stack, uid, [10])).status_code == 201
    assert stack.wait_final(uid).status_code == 204
    before = settled(stack.url)
    polls = 60
    for _ in range(polls):
        assert stack.head(uid).status_code == 204
    assert requests.get(f'{stack.url}/{uid}/nothing-here', timeout=30).status_code == 404
    after = scrape(stack.url)
    assert value(after, 'cartd_http_requests_total', method='HEAD', code='204') - value(
        before, 'cartd_http_requests_total', method='HEAD', code='204') == polls
    assert value(after, 'cartd_http_requests_total', method='GET', code='404') - value(
        before, 'cartd_http_requests_total', method='GET', code='404') == 1
    after = settled(stack.url)
    assert value(after, 'cartd_http_request_duration_seconds_count') - value(
        before, 'cartd_http_request_duration_seconds_count') == polls + 1


def test_head_of_metrics_and_other_methods(stack: CartStack) -> None:
    head = requests.head(f'{stack.url}/-/metrics', timeout=30)
    assert (head.status_code, head.content) == (200, b'')
    assert int(head.headers['Content-Length']) > 0
    for method in ('POST', 'DELETE', 'PUT'):
        answer = requests.request(method, f'{stack.url}/-/metrics', timeout=30)
        assert (answer.status_code, answer.headers['Allow']) == (405, 'GET, HEAD'), answer.text
        assert answer.json()['status'] == '405 Method Not Allowed'


def test_the_database_counters_survive_a_restart(stack: CartStack) -> None:
    uid = f'restart-{uuid.uuid4().hex[:8]}'
    assert stack.post(uid, _files(stack, uid, [123])).status_code == 201
    assert stack.wait_final(uid).status_code == 204
    before = scrape(stack.url)
    assert value(before, 'cartd_files_staged_total') >= 1
    assert stack.server is not None
    stack.server.stop()
    stack.start_server()
    after = scrape(stack.url)
    for name in DB_COUNTERS:
        assert value(after, name) == value(before, name), name
    for status in ('ready', 'error', 'expired'):
        assert value(after, 'cartd_carts_finished_total', status=status) == value(
            before, 'cartd_carts_finished_total', status=status)
    # The HTTP counts are the new server's: only the wait for it to answer (GET /) so far.
    assert value(after, 'cartd_http_requests_total', method='HEAD', code='204') == 0
    assert value(after, 'cartd_http_requests_total', method='GET', code='200') >= 1


def test_metrics_off_answer_404_as_an_unknown_path(stack: CartStack, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A second server on the same database with [metrics] enabled = off."""
    other = CartStack(tmp_path_factory.mktemp('metrics-off'), stack.archive, stack.peewee_url, workers=0,
                      server=stack.server_kind, overrides={'metrics': {'enabled': 'off'}})
    try:
        other.start_server()
        answer = requests.get(f'{other.url}/-/metrics', timeout=30)
        unknown = requests.get(f'{other.url}/-/nothing', timeout=30)
        assert (answer.status_code, answer.headers['Content-Type']) == (404, 'application/json'), answer.text
        assert set(answer.json()) == set(unknown.json()) and answer.json()['status'] == unknown.json()['status']
        assert requests.get(f'{other.url}/-/ready', timeout=30).status_code == 200
    finally:
        other.stop()


def test_a_worker_serves_its_archive_requests_on_its_port(stack: CartStack, proxy: FaultProxy,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The stack's worker is replaced for this test by one with [metrics] worker_port (env METRICS_WORKER_PORT:
    the config file leaves it out), so every archive request of the cart is this worker's. One file is held
    on tape for TAPE_HEADS looks."""
    port = free_port()
    for worker in list(stack.workers):
        worker.stop()
        stack.workers.remove(worker)
    monkeypatch.setenv('METRICS_WORKER_PORT', str(port))
    stack.start_worker()
    monkeypatch.delenv('METRICS_WORKER_PORT')
    try:
        stack.wait_workers_ready()
        before = scrape_worker(port)
        uid = f'worker-{uuid.uuid4().hex[:8]}'
        fileids = _files(stack, uid, [10, 20, 30])
        proxy.rule(fileids[2]['id'], 'tape', times=TAPE_HEADS, methods='HEAD')
        assert stack.post(uid, fileids).status_code == 201
        assert stack.wait_final(uid).status_code == 204
        missing = f'missing-{uuid.uuid4().hex[:8]}'
        assert stack.post(missing, [{'id': f'{missing}-absent', 'path': 'f.bin', 'hashtype': 'sha1',
                                     'hashsum': '0' * 40}]).status_code == 201
        assert stack.wait_final(missing).headers['X-Pacifica-Status'] == 'error'
        after = scrape_worker(port)
    finally:
        for worker in list(stack.workers):
            worker.stop()
            stack.workers.remove(worker)
        stack.start_worker()
        stack.wait_workers_ready()

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved('cartd_archive_requests_total', method='HEAD', outcome='ok') == 3 + TAPE_HEADS
    assert moved('cartd_archive_requests_total', method='POST', outcome='ok') == TAPE_HEADS  # a recall each time
    assert moved('cartd_archive_requests_total', method='GET', outcome='ok') == 3
    assert moved('cartd_archive_requests_total', method='HEAD', outcome='missing') == 1
    assert moved('cartd_archive_request_duration_seconds_count', method='GET') == 3
    assert moved('cartd_tape_recall_duration_seconds_count') == 1
    assert moved('cartd_tape_recall_duration_seconds_sum') >= TAPE_HEADS - 1  # looked at again after 1 s each time


def scrape_worker(port: int) -> Samples:
    """The worker's metrics (what its pool processes wrote), parsed with prometheus_client's parser."""
    deadline = time.monotonic() + 30
    while True:
        try:
            answer = requests.get(f'http://127.0.0.1:{port}/metrics', timeout=10)
            break
        except requests.ConnectionError:
            assert time.monotonic() < deadline, f'nothing listens on the worker metrics port {port}'
            time.sleep(0.1)
    assert answer.status_code == 200, answer.text
    return parsed(answer.text)
