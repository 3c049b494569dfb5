"""Physical limits measured beside the carts: plain GETs from the archive, its per-file floor, nginx, HEAD rate."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
import pathlib
import resource
import statistics
import threading
import time
from typing import List, Sequence
from urllib.parse import quote

import requests

from .client import READ_SIZE, BenchError
from .data import ArchiveFile


def _session_per_thread() -> 'threading.local':
    return threading.local()


def fetch_files(base_url: str, files: Sequence[ArchiveFile], threads: int, hashtype: str,
                head: bool = True) -> float:
    """HEAD (optional) + GET every file with `threads` threads, one keep-alive session each, hashing
    the body as it streams; check each digest; return the seconds taken.

    This is what any cart must at least do per file (status, then the bytes through the hash),
    without the database, the queue or the disk.
    """
    local = _session_per_thread()

    def one(item: ArchiveFile) -> None:
        session = getattr(local, 'session', None)
        if session is None:
            session = local.session = requests.Session()
        url = base_url + quote(item.archive_id)
        if head:
            answer = session.head(url, timeout=60)
            if answer.status_code >= 400:
                raise BenchError(f'archive HEAD {item.archive_id}: {answer.status_code}')
        digest = hashlib.new(hashtype)
        with session.get(url, stream=True, timeout=60) as answer:
            if answer.status_code != 200:
                raise BenchError(f'GET {url}: {answer.status_code}')
            for chunk in answer.iter_content(READ_SIZE):
                digest.update(chunk)
        if digest.hexdigest() != item.digest:
            raise BenchError(f'{item.archive_id}: digest differs')

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
        for future in [pool.submit(one, item) for item in files]:
            future.result()
    return time.monotonic() - start


def fetch_files_http_client(base_url: str, files: Sequence[ArchiveFile], threads: int, hashtype: str) -> float:
    """fetch_files with the standard library's http.client instead of requests (one keep-alive connection per
    thread, HEAD then GET, the body hashed as it streams, each digest checked); return the seconds taken.

    requests costs the client about a millisecond of CPU per request pair, which is more than the archive
    itself spends on a small file: with requests this floor measures the client as much as the archive.
    """
    import http.client  # pylint: disable=import-outside-toplevel
    from urllib.parse import urlsplit  # pylint: disable=import-outside-toplevel
    where = urlsplit(base_url)
    local = _session_per_thread()
    opened: List[http.client.HTTPConnection] = []

    def one(item: ArchiveFile) -> None:
        connection = getattr(local, 'connection', None)
        if connection is None:
            connection = local.connection = http.client.HTTPConnection(where.hostname or '127.0.0.1', where.port,
                                                                       timeout=60)
            opened.append(connection)
        path = where.path + quote(item.archive_id)
        connection.request('HEAD', path)
        answer = connection.getresponse()
        answer.read()
        if answer.status >= 400:
            raise BenchError(f'archive HEAD {item.archive_id}: {answer.status}')
        connection.request('GET', path)
        answer = connection.getresponse()
        if answer.status != 200:
            raise BenchError(f'GET {path}: {answer.status}')
        digest = hashlib.new(hashtype)
        while True:
            chunk = answer.read(READ_SIZE)
            if not chunk:
                break
            digest.update(chunk)
        if digest.hexdigest() != item.digest:
            raise BenchError(f'{item.archive_id}: digest differs')

    start = time.monotonic()
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
            for future in [pool.submit(one, item) for item in files]:
                future.result()
    finally:
        for connection in opened:
            connection.close()
    return time.monotonic() - start


@dataclasses.dataclass
class Rate:
    """A transfer rate measured one way."""

    seconds: float
    nbytes: int

    @property
    def mb_per_s(self) -> float:
        """MB (10^6) per second."""
        return self.nbytes / self.seconds / 1e6 if self.seconds else 0.0


def sequential_download(base_url: str, files: Sequence[ArchiveFile], hashtype: str = '') -> Rate:
    """GET the files one after another on one connection (as one tar would stream), optionally hashing."""
    start = time.monotonic()
    total = 0
    with requests.Session() as session:
        for item in files:
            digest = hashlib.new(hashtype) if hashtype else None
            with session.get(base_url + quote(item.archive_id), stream=True, timeout=60) as answer:
                if answer.status_code != 200:
                    raise BenchError(f'GET {item.archive_id}: {answer.status_code}')
                raw = answer.raw
                while True:
                    chunk = raw.read(READ_SIZE)
                    if not chunk:
                        break
                    total += len(chunk)
                    if digest is not None:
                        digest.update(chunk)
            if digest is not None and digest.hexdigest() != item.digest:
                raise BenchError(f'{item.archive_id}: digest differs')
    return Rate(time.monotonic() - start, total)


@dataclasses.dataclass
class HeadRate:
    """HEAD requests per second and their latency."""

    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int

    @property
    def per_s(self) -> float:
        """Requests per second."""
        return self.requests / self.seconds if self.seconds else 0.0


def head_rate(url: str, threads: int, seconds: float, want_status: str = '') -> HeadRate:
    """HEAD `url` from `threads` threads (a requests.Session each) for `seconds`; count and time them."""
    done = threading.Event()
    latencies: List[List[float]] = [[] for _ in range(threads)]
    errors = [0] * threads
    barrier = threading.Barrier(threads + 1)

    def run(index: int) -> None:
        with requests.Session() as session:
            session.head(url, timeout=30)  # connect before the clock starts
            barrier.wait()
            mine = latencies[index]
            while not done.is_set():
                began = time.perf_counter()
                answer = session.head(url, timeout=30)
                mine.append(time.perf_counter() - began)
                status = answer.headers.get('X-Pacifica-Status')
                if answer.status_code >= 400 or (want_status and status != want_status):
                    errors[index] += 1

    workers = [threading.Thread(target=run, args=(index,), daemon=True) for index in range(threads)]
    for worker in workers:
        worker.start()
    barrier.wait()
    start = time.monotonic()
    done.wait(seconds)
    done.set()
    for worker in workers:
        worker.join(60)
    elapsed = time.monotonic() - start
    everything = sorted(value for mine in latencies for value in mine)
    if not everything:
        raise BenchError(f'no HEAD answered from {url}')
    return HeadRate(len(everything), elapsed, statistics.median(everything) * 1000,
                    percentile(everything, 0.99) * 1000, sum(errors))


def percentile(ordered: Sequence[float], share: float) -> float:
    """The value below which `share` (0..1) of the sorted values lie (nearest rank)."""
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))] if ordered else 0.0


@dataclasses.dataclass
class WriteCost:
    """Writing bytes into the page cache of the volume's filesystem."""

    seconds: float
    cpu_seconds: float
    nbytes: int


def page_cache_write(directory: pathlib.Path, files: int, size: int, durable: bool = False) -> WriteCost:
    """Write `files` files of `size` bytes (1 MiB writes, one thread each) under directory; delete them after.

    On a virtual machine that hands freed memory back to its host, the first touch of that
    memory costs CPU time here just as it does in the cart's workers. With `durable` each
    file is also flushed to the disk (fdatasync) before it counts as written, as the cart's
    workers do before they record a file staged.
    """
    block = os.urandom(1 << 20)
    base = pathlib.Path(directory)
    base.mkdir(parents=True, exist_ok=True)

    def one(index: int) -> None:
        left = size
        with open(base / f'scratch-{index}', 'wb') as out:
            while left > 0:
                left -= out.write(block[:min(left, len(block))])
            if durable:
                out.flush()
                os.fdatasync(out.fileno())

    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=files) as pool:
        for future in [pool.submit(one, index) for index in range(files)]:
            future.result()
    seconds = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    for index in range(files):
        (base / f'scratch-{index}').unlink()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return WriteCost(seconds, cpu, files * size)
