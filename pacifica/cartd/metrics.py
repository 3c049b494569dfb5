"""Prometheus metrics: the server's (`GET /-/metrics`: the database's at each scrape, and its own requests),
and each worker's (archive requests, tape recalls) on a port of its own.

Gauges of the carts and files and the fleet-wide counters are read from the database at
each scrape (four aggregate queries and the counters table), so every server process of
every host answers the same. The HTTP counters are this server's: under uWSGI each process
writes its own to files in a shared directory (prometheus_client's multiprocess mode) and a
scrape sums them. A celery worker's pool processes do the same with a directory of the worker's
own, served by its main process. prometheus_client is imported here only.
"""
from __future__ import annotations

import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Iterable, Iterator, Optional, Tuple

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, start_http_server, values
from prometheus_client import multiprocess
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import database
from .orm import (CACHE_HITS, CARTS_FINISHED, COUNTER_ROWS, EVICTIONS, FILES_STAGED, HASH_MISMATCHES, STAGED_BYTES,
                  counter_values, metrics_snapshot, now)
from .volume import CartVolume
from .workers import WorkerPresence

LOGGER = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # what generate_latest writes (the classic text format)
MULTIPROCESS_ENV = 'PROMETHEUS_MULTIPROC_DIR'  # where prometheus_client's multiprocess mode keeps its files
# The HTTP methods counted under their own name; any other is counted as 'other' (no label per stray word).
METHODS = frozenset(('GET', 'HEAD', 'POST', 'DELETE', 'PUT', 'PATCH', 'OPTIONS'))
# Request durations: a HEAD answers in about a millisecond, a download may stream for hours.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800,
                    float('inf'))
CART_STATUSES = ('waiting', 'staging', 'bundling', 'ready', 'error', 'deleted', 'expired')
FILE_STATES = ('queued', 'on_tape', 'transferring', 'staged', 'failed')

# (counter row, metric name without _total, help)
DATABASE_COUNTERS: Tuple[Tuple[str, str, str], ...] = (
    (FILES_STAGED, 'cartd_files_staged', 'Files staged and verified onto the volume, by every worker'),
    (STAGED_BYTES, 'cartd_staged_bytes', 'Bytes of the files staged onto the volume, by every worker'),
    (HASH_MISMATCHES, 'cartd_hash_mismatches', 'Downloads from the archive whose bytes did not have the given hash'),
    (EVICTIONS, 'cartd_evictions', 'Carts whose files were evicted to make room on the volume'),
    (CACHE_HITS, 'cartd_staged_file_cache_hits', 'Files linked into a cart from the staged-file cache, no download'),
)


class DatabaseCollector(Collector):
    """The metrics read from the database and the volume at each scrape."""

    def __init__(self, volume: CartVolume, presence: Optional[WorkerPresence] = None) -> None:
        """Report on `volume`, the database the process is bound to and, with `presence`, the workers."""
        self.volume = volume
        self.presence = presence

    def collect(self) -> Iterable[Metric]:
        """The gauges and counters; when the database cannot be read, only cartd_database_up 0 and the volume."""
        up = GaugeMetricFamily('cartd_database_up', 'Whether this scrape could read the database (1) or not (0)')
        try:
            with database.connection():
                snapshot, counters = metrics_snapshot(), counter_values()
                seen = self.presence.sighting() if self.presence is not None else None
        except Exception as exc:  # any driver error: say so in the metrics, not with a failed scrape
            LOGGER.warning('metrics: cannot read the database: %s', ' '.join(str(exc).split()) or type(exc).__name__)
            up.add_metric([], 0)
            yield up
            yield from self._volume()
            return
        up.add_metric([], 1)
        yield up
        carts = GaugeMetricFamily('cartd_carts', 'Carts in the database by stored status', labels=['status'])
        for status in sorted(set(CART_STATUSES) | set(snapshot.carts)):
            carts.add_metric([status], snapshot.carts.get(status, 0))
        yield carts
        files = GaugeMetricFamily('cartd_files', 'Files of the carts being worked on (waiting, staging, bundling) '
                                  'by state', labels=['state'])
        for state in FILE_STATES:
            files.add_metric([state], snapshot.files[state])
        yield files
        oldest = GaugeMetricFamily('cartd_oldest_staging_cart_age_seconds',
                                   'Age of the oldest cart being worked on (0 when there is none)')
        oldest.add_metric([], max((now() - snapshot.oldest_active).total_seconds(), 0.0)
                          if snapshot.oldest_active is not None else 0.0)
        yield oldest
        reserved = GaugeMetricFamily('cartd_volume_reserved_bytes',
                                     'Bytes reserved on the volume by downloads in flight')
        reserved.add_metric([], snapshot.reserved_bytes)
        yield reserved
        entries = GaugeMetricFamily('cartd_staged_file_cache_entries',
                                    'Ready entries of the staged-file cache (share_staged_files)')
        entries.add_metric([], snapshot.cache_entries)
        yield entries
        cached = GaugeMetricFamily('cartd_staged_file_cache_bytes',
                                   'Bytes of the ready entries of the staged-file cache (share_staged_files)')
        cached.add_metric([], snapshot.cache_bytes)
        yield cached
        if seen is not None:  # worker_heartbeat 0: the workers do not check in
            workers = GaugeMetricFamily('cartd_workers', 'Workers that checked in within three worker_heartbeats')
            workers.add_metric([], seen.workers)
            yield workers
        yield from self._volume()
        for row, name, documentation in DATABASE_COUNTERS:
            family = CounterMetricFamily(name, documentation)
            family.add_metric([], counters.get((row, ''), 0))
            yield family
        finished = CounterMetricFamily('cartd_carts_finished', 'Carts that became ready, failed or expired',
                                       labels=['status'])
        for name, label in COUNTER_ROWS:
            if name == CARTS_FINISHED:
                finished.add_metric([label], counters.get((name, label), 0))
        yield finished

    def _volume(self) -> Iterator[Metric]:
        try:
            stats = os.statvfs(self.volume.root)
        except OSError:
            return
        free = GaugeMetricFamily('cartd_volume_free_bytes', 'Bytes free on the volume for the cart service')
        free.add_metric([], stats.f_bavail * stats.f_frsize)
        yield free
        size = GaugeMetricFamily('cartd_volume_size_bytes', 'Size of the volume\'s filesystem')
        size.add_metric([], stats.f_blocks * stats.f_frsize)
        yield size


def use_multiprocess_dir(directory: Path) -> Path:
    """Make prometheus_client keep this process's (and its forks') metrics in files under `directory`,
    created if missing and emptied of an earlier run's files. Call it before any metric is made.

    prometheus_client chooses between in-memory and file-backed values when it is imported,
    from PROMETHEUS_MULTIPROC_DIR; the server only knows the directory once its config is
    read, so the choice is made again here.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob('*.db'):
        stale.unlink(missing_ok=True)
    os.environ[MULTIPROCESS_ENV] = str(directory)
    values.ValueClass = values.get_value_class()
    return directory


def fresh_multiprocess_dir(prefix: str) -> Path:
    """A new temporary directory named after this process (`<prefix><pid>-<random>`), after removing this user's
    directories of the same prefix whose makers are gone (a server killed, or stopped before its exit hooks ran)."""
    for stale in Path(tempfile.gettempdir()).glob(f'{prefix}*'):
        maker = stale.name[len(prefix):].split('-', 1)[0]
        try:
            owned = stale.is_dir() and stale.stat().st_uid == os.getuid()
        except OSError:
            continue
        if owned and maker.isdigit() and int(maker) != os.getpid() and not _alive(int(maker)):
            remove_multiprocess_dir(stale)
    return Path(tempfile.mkdtemp(prefix=f'{prefix}{os.getpid()}-'))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_multiprocess_dir(directory: Path) -> None:
    """Remove a temporary multiprocess directory and its files (its maker's exit: no process writes to it then)."""
    for leftover in directory.glob('*.db'):
        leftover.unlink(missing_ok=True)
    try:
        directory.rmdir()
    except OSError as exc:  # something else put a file there: leave it
        LOGGER.warning('metrics: cannot remove %s: %s', directory, exc.strerror)


def mark_process_dead(directory: Path, pid: int) -> None:
    """A process of the server ended: drop its live gauges' files (its counters keep counting in the sum)."""
    multiprocess.mark_process_dead(pid, str(directory))


class ServerMetrics:
    """The metrics of one server: the database's, and the HTTP requests it answered (per process, or summed
    across processes through `multiprocess_dir`)."""

    def __init__(self, volume: CartVolume, multiprocess_dir: Optional[Path] = None,
                 presence: Optional[WorkerPresence] = None) -> None:
        """Report on `volume` (and the workers seen through `presence`); with `multiprocess_dir` (see
        use_multiprocess_dir), the sum of every process's counts."""
        self.multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry(auto_describe=False)
        own = None if multiprocess_dir is not None else self.registry
        self.requests = Counter('cartd_http_requests', 'HTTP requests answered (scrapes of /-/metrics not counted)',
                                ['method', 'code'], registry=own)
        self.durations = Histogram('cartd_http_request_duration_seconds',
                                   'Time from a request reaching the application to its last byte sent',
                                   registry=own, buckets=DURATION_BUCKETS)
        self.served = Counter('cartd_served_bytes', 'Bytes of response bodies sent to clients, downloads included',
                              registry=own)
        self.registry.register(DatabaseCollector(volume, presence))
        if multiprocess_dir is not None:
            multiprocess.MultiProcessCollector(self.registry, path=str(multiprocess_dir))
        self._lock = threading.Lock()

    def count_request(self, method: str, code: str) -> None:
        """Count one request answered with `code` (when its answer starts, before the client can see it)."""
        self.requests.labels(method if method in METHODS else 'other', code).inc()

    def observe_duration(self, seconds: float) -> None:
        """Count a request's time to its last byte (when its body is done)."""
        self.durations.observe(seconds)

    def observe(self, method: str, code: str, seconds: float) -> None:
        """Count one request answered with `code` after `seconds`."""
        self.count_request(method, code)
        self.observe_duration(seconds)

    def count_served(self, sent: int) -> None:
        """Count bytes sent to a client."""
        if sent > 0:
            self.served.inc(sent)

    def exposition(self) -> bytes:
        """The metrics in the text exposition format (see CONTENT_TYPE)."""
        with self._lock:  # one scrape at a time reads the database and the files
            return generate_latest(self.registry)


ARCHIVE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, float('inf'))
# A recall takes from a minute (a mounted tape) to days (a busy library).
RECALL_BUCKETS = (60, 300, 900, 1800, 3600, 2 * 3600, 4 * 3600, 8 * 3600, 16 * 3600, 86400, 2 * 86400, 4 * 86400,
                  7 * 86400, float('inf'))


class WorkerMetrics:
    """A worker process's metrics: its requests to the archive and the tape recalls it saw end (file-backed in the
    worker's multiprocess directory, served by its main process: see serve_worker_metrics)."""

    def __init__(self, registry: Optional[CollectorRegistry] = None) -> None:
        """Make the metrics (registered in `registry`, if given: a test's)."""
        self.archive_requests = Counter('cartd_archive_requests', 'Requests to the archive interface by method '
                                        '(HEAD: status, POST: recall, GET: download) and how they ended',
                                        ['method', 'outcome'], registry=registry)
        self.archive_durations = Histogram('cartd_archive_request_duration_seconds',
                                           'Time of a request to the archive (a download: to its last byte)',
                                           ['method'], registry=registry, buckets=ARCHIVE_BUCKETS)
        self.recalls = Histogram('cartd_tape_recall_duration_seconds',
                                 'Time from a file first found on tape to its being staged',
                                 registry=registry, buckets=RECALL_BUCKETS)

    def archive_request(self, method: str, outcome: str, seconds: float) -> None:
        """Count one request to the archive (archive.Observer)."""
        self.archive_requests.labels(method, outcome).inc()
        self.archive_durations.labels(method).observe(seconds)

    def tape_recall(self, seconds: float) -> None:
        """Count one file staged after a recall."""
        self.recalls.observe(seconds)


def serve_worker_metrics(address: str, port: int, directory: Path) -> None:
    """Serve the metrics every process of this worker writes under `directory` at http://address:port/ (a thread
    of the calling process: the worker's main process, before it forks its pool)."""
    registry = CollectorRegistry(auto_describe=False)
    multiprocess.MultiProcessCollector(registry, path=str(directory))
    start_http_server(port, addr=address, registry=registry)
    LOGGER.info('worker metrics at http://%s:%d/metrics', address, port)
