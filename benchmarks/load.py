#!/usr/bin/env python3
"""Load test of pacifica-cartd: many clients at once for a bounded time on the real stack, every byte checked.

Each client thread loops: create a cart of a few small files, poll HEAD until it is ready,
download it (whole, or in Range pieces) and check every member against the archive's files,
DELETE it and check HEAD now answers 404; some clients delete their carts while they stage.
At the end it checks that no cart was lost or left staging (HEAD of every uid not deleted, and
the database) and that deleted carts left nothing on the volume, and prints one block of
figures. Exit status 1 when any request failed or any cart was lost, stuck or left files.

    .venv/bin/python benchmarks/load.py --clients 100 --duration 180
    .venv/bin/python benchmarks/load.py --smoke          # 4 clients for 10 s

See benchmarks/README.md for every figure and option.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import json
import os
import pathlib
import random
import re
import sys
import threading
import time
from typing import Any, Counter, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import requests

from cartbench.client import check_tar
from cartbench.data import KiB, ArchiveFile, DataWriter, expected, fileids
from cartbench.harness import (add_stack_options, bounded_run, cart_version, check_stack_options,
                               cpconfig_overrides, load_average, log, start_archive, start_ours)
from cartbench.limits import percentile
from cartbench.rss import CpuWatch, RssSampler, TreePeaks, cpu_delta, cpu_snapshot
from cartbench.stacks import OurStack

KINDS = ('POST', 'HEAD', 'GET', 'GET range', 'DELETE', 'HEAD deleted')
ROLES = ('whole', 'range', 'delete-staging')
MAX_POLLS = 5000            # HEAD polls of one cart, whatever the deadline
MAX_RANGE_PIECES = 8        # Range requests of one download
POLL_MIN_S, POLL_MAX_S = 0.05, 0.5
EXAMPLES = 8                # failed requests quoted in the figures


def role_of(index: int) -> str:
    """Client 1, 8, 15, ... download with Range; 2, 9, 16, ... delete while staging; the rest download whole."""
    return {1: 'range', 2: 'delete-staging'}.get(index % 7, 'whole')


@dataclasses.dataclass
class Tally:
    """What all clients did: requests by kind, their latencies, failures, and what became of each cart."""

    latency: Dict[str, List[float]] = dataclasses.field(default_factory=lambda: {kind: [] for kind in KINDS})
    requests: Counter[str] = dataclasses.field(default_factory=collections.Counter)
    failed: Counter[str] = dataclasses.field(default_factory=collections.Counter)
    examples: List[str] = dataclasses.field(default_factory=list)
    carts: Counter[str] = dataclasses.field(default_factory=collections.Counter)
    live: Set[str] = dataclasses.field(default_factory=set)        # created and not (successfully) deleted
    lost: List[str] = dataclasses.field(default_factory=list)      # never final within the deadline
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def answered(self, kind: str, seconds: float) -> None:
        """One request answered as expected."""
        with self.lock:
            self.requests[kind] += 1
            self.latency[kind].append(seconds)

    def fail(self, kind: str, text: str) -> None:
        """One request failed: no answer, an unexpected status, or bytes that do not match."""
        with self.lock:
            self.requests[kind] += 1
            self.failed[kind] += 1
            if len(self.examples) < EXAMPLES:
                self.examples.append(f'{datetime.datetime.now():%H:%M:%S} {text}')
        log(f'FAILED {text}')

    def mismatch(self, kind: str, text: str) -> None:
        """A download answered but its bytes were wrong: the request counts as failed."""
        with self.lock:
            self.failed[kind] += 1
            if len(self.examples) < EXAMPLES:
                self.examples.append(f'{datetime.datetime.now():%H:%M:%S} {text}')
        log(f'FAILED {text}')

    def count(self, what: str, uid: str = '') -> None:
        """A cart event: created, ready, completed, deleted, ..."""
        with self.lock:
            self.carts[what] += 1
            if what == 'created':
                self.live.add(uid)
            elif what == 'deleted':
                self.live.discard(uid)
            elif what == 'lost':
                self.lost.append(uid)


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    """How each client behaves."""

    url: str
    pool: Sequence[ArchiveFile]
    hashtype: str
    max_files: int
    bundle_share: float
    cart_deadline: float
    request_timeout: float
    max_loops: int
    stop_at: float              # monotonic time after which no client starts another cart


class Client:
    """One client thread: a keep-alive session, its own random numbers, carts one after another."""

    def __init__(self, index: int, options: LoadOptions, tally: Tally, seed: int) -> None:
        """Nothing is sent until run()."""
        self.index = index
        self.role = role_of(index)
        self.options = options
        self.tally = tally
        self.rng = random.Random(seed * 1000003 + index)
        self.session = requests.Session()
        self.loops = 0

    def call(self, kind: str, method: str, uid: str, expect: int, **kwargs: Any) -> Optional[requests.Response]:
        """Send one request; None (and counted as failed) on no answer or a status other than `expect`."""
        began = time.perf_counter()
        try:
            answer = self.session.request(method, f'{self.options.url}/{uid}', timeout=self.options.request_timeout,
                                          **kwargs)
        except requests.RequestException as exc:
            self.tally.fail(kind, f'{method} {uid}: {type(exc).__name__}: {exc}')
            return None
        elapsed = time.perf_counter() - began
        if answer.status_code != expect:
            detail = answer.headers.get('X-Pacifica-Message', '') or answer.text
            self.tally.fail(kind, f'{method} {uid} answered {answer.status_code} '
                                  f'{answer.headers.get("X-Pacifica-Status", "")} {detail[:200]}'.rstrip())
            return None
        self.tally.answered(kind, elapsed)
        return answer

    def run(self) -> None:
        """Carts one after another until the end time or the loop bound."""
        with self.session:
            while time.monotonic() < self.options.stop_at and self.loops < self.options.max_loops:
                self.loops += 1
                if not self.one_cart():
                    time.sleep(0.2)  # after a failure, do not hammer

    def new_cart(self) -> Tuple[str, List[ArchiveFile], Dict[str, Any]]:
        """A random uid and 1..max_files distinct pool files under paths of their own."""
        uid = f'load-{self.index:03d}-{self.loops:05d}-{self.rng.getrandbits(32):08x}'
        chosen = self.rng.sample(list(self.options.pool), self.rng.randint(1, self.options.max_files))
        files = [dataclasses.replace(item, path=f'd{number % 3}/{item.path}') for number, item in enumerate(chosen)]
        body = {'fileids': fileids(files, self.options.hashtype),
                'bundle': self.rng.random() < self.options.bundle_share}
        return uid, files, body

    def one_cart(self) -> bool:
        """One loop of this client's role; False when something failed."""
        uid, files, body = self.new_cart()
        if self.call('POST', 'POST', uid, 201, data=json.dumps(body),
                     headers={'Content-Type': 'application/json'}) is None:
            return False
        self.tally.count('created', uid)
        if self.role == 'delete-staging':
            return self.delete_early(uid)
        state = self.wait_final(uid)
        if state != 'ready':
            return state == 'lost'
        self.tally.count('ready')
        checked = self.download(uid, files) if self.role == 'whole' else self.download_ranges(uid, files)
        if not checked or not self.delete(uid):
            return False
        self.tally.count('completed')
        return True

    def delete_early(self, uid: str) -> bool:
        """Look once (after up to 50 ms), then DELETE, most often while the cart stages."""
        time.sleep(self.rng.uniform(0, 0.05))
        answer = self.call('HEAD', 'HEAD', uid, 204)
        if answer is None:
            return False
        if answer.headers.get('X-Pacifica-Status') == 'staging':
            self.tally.count('seen staging before DELETE')
        if not self.delete(uid):
            return False
        self.tally.count('deleted early')
        return True

    def wait_final(self, uid: str) -> str:
        """Poll HEAD until ready ('ready'), a failure ('failed') or the deadline ('lost')."""
        began = time.monotonic()
        for _ in range(MAX_POLLS):
            answer = self.call('HEAD', 'HEAD', uid, 204)
            if answer is None:
                return 'failed'
            status = answer.headers.get('X-Pacifica-Status')
            if status == 'ready':
                return 'ready'
            if status != 'staging':
                self.tally.fail('HEAD', f'HEAD {uid}: 204 with X-Pacifica-Status {status!r}')
                return 'failed'
            waited = time.monotonic() - began
            if waited > self.options.cart_deadline:
                break
            time.sleep(min(POLL_MAX_S, max(POLL_MIN_S, waited / 20)))
        self.tally.count('lost', uid)
        log(f'LOST {uid}: still staging after {time.monotonic() - began:.0f} s')
        return 'lost'

    def checked(self, kind: str, uid: str, data: bytes, files: Sequence[ArchiveFile]) -> bool:
        """Compare a downloaded tar with the archive's files; a mismatch counts as a failed request."""
        result = check_tar(data, expected(files), self.options.hashtype)
        if result.ok and result.tar_bytes == len(data):
            return True
        problems = '; '.join(result.problems[:3]) or f'{len(data) - result.tar_bytes} bytes after the tar'
        self.tally.mismatch(kind, f'{kind} {uid}: bytes differ: {problems}')
        return False

    def download(self, uid: str, files: Sequence[ArchiveFile]) -> bool:
        """GET the whole tar; check its length and every member."""
        answer = self.call('GET', 'GET', uid, 200, params={'filename': 'load.tar'})
        if answer is None:
            return False
        declared = answer.headers.get('Content-Length')
        if declared != str(len(answer.content)):
            self.tally.fail('GET', f'GET {uid}: Content-Length {declared} but {len(answer.content)} bytes came')
            return False
        return self.checked('GET', uid, answer.content, files)

    def download_ranges(self, uid: str, files: Sequence[ArchiveFile]) -> bool:
        """GET the tar in 2..MAX_RANGE_PIECES Range pieces (If-Range on its ETag), put it together, check it."""
        total: Optional[int] = None
        etag = ''
        pieces: List[bytes] = []
        position = 0
        for number in range(MAX_RANGE_PIECES):
            if total is None:
                end = self.rng.randint(1, 4096)
            elif number == MAX_RANGE_PIECES - 1 or self.rng.random() < 0.3:
                end = total
            else:
                end = self.rng.randint(position + 1, total)
            wanted = f'bytes={position}-' if end == total else f'bytes={position}-{end - 1}'
            headers = {'Range': wanted, **({'If-Range': etag} if etag else {})}
            answer = self.call('GET range', 'GET', uid, 206, params={'filename': 'load.tar'}, headers=headers)
            if answer is None:
                return False
            content_range = answer.headers.get('Content-Range', '')
            size = content_range.rpartition('/')[2]
            if not size.isdigit() or (total is not None and int(size) != total):
                self.tally.fail('GET range', f'GET {uid} {wanted}: Content-Range {content_range!r}')
                return False
            total = int(size)
            end = min(end, total)
            if content_range != f'bytes {position}-{end - 1}/{total}' or len(answer.content) != end - position:
                self.tally.fail('GET range', f'GET {uid} {wanted}: Content-Range {content_range!r}, '
                                             f'{len(answer.content)} bytes')
                return False
            etag = etag or answer.headers.get('ETag', '')
            pieces.append(answer.content)
            position = end
            if position >= total:
                return self.checked('GET range', uid, b''.join(pieces), files)
        self.tally.fail('GET range', f'GET {uid}: {position} of {total} bytes after {MAX_RANGE_PIECES} pieces')
        return False

    def delete(self, uid: str) -> bool:
        """DELETE the cart, then HEAD must answer 404."""
        if self.call('DELETE', 'DELETE', uid, 200) is None:
            return False
        self.tally.count('deleted', uid)
        return self.call('HEAD deleted', 'HEAD', uid, 404) is not None


@dataclasses.dataclass
class Aftermath:
    """What the checks after the load found."""

    final_heads: Counter[str] = dataclasses.field(default_factory=collections.Counter)
    stuck_uids: List[str] = dataclasses.field(default_factory=list)
    db_status: Counter[str] = dataclasses.field(default_factory=collections.Counter)
    db_error: str = ''
    left_dirs: int = 0
    left_files: int = 0
    left_links: int = 0
    left_examples: List[str] = dataclasses.field(default_factory=list)
    settle_s: float = 0.0
    cache_hits: str = 'unknown'  # cartd_staged_file_cache_hits_total at the end, as /-/metrics gave it

    @property
    def stuck(self) -> int:
        """Carts not deleted whose HEAD is not a final answer (ready or error), and carts the database has
        in neither state."""
        by_head = sum(count for status, count in self.final_heads.items() if status not in ('204 ready', '500 error'))
        return by_head + sum(count for status, count in self.db_status.items() if status not in ('ready', 'error'))


def final_head(url: str, uids: Sequence[str], wait_s: float) -> Tuple[Counter[str], List[str]]:
    """HEAD every uid not deleted; those still staging get up to wait_s in all. Returns status counts, stuck uids."""
    seen: Counter[str] = collections.Counter()
    pending = list(uids)
    deadline = time.monotonic() + wait_s
    with requests.Session() as session:
        for _ in range(1000):
            staging = []
            for uid in pending:
                try:
                    answer = session.head(f'{url}/{uid}', timeout=60)
                except requests.RequestException as exc:
                    seen[type(exc).__name__] += 1
                    continue
                if answer.headers.get('X-Pacifica-Status') == 'staging':
                    staging.append(uid)
                else:
                    seen[f'{answer.status_code} {answer.headers.get("X-Pacifica-Status", "")}'] += 1
            pending = staging
            if not pending or time.monotonic() > deadline:
                break
            time.sleep(1)
    seen.update({'204 staging': len(pending)} if pending else {})
    return seen, pending


def volume_leftovers(volume: pathlib.Path, live_ids: Set[int],
                     live_uids: Set[str]) -> Tuple[int, int, int, List[str]]:
    """(cart directories, files in them, cartuids links, a few of their paths) on the volume that belong to no
    live cart."""
    dirs = files = 0
    examples: List[str] = []
    for entry in sorted(volume.iterdir()):
        if entry.name.isdigit() and int(entry.name) not in live_ids:
            dirs += 1
            found = sorted(str(item.relative_to(volume)) for item in entry.rglob('*') if not item.is_dir())
            files += len(found)
            examples.extend(found or [entry.name + '/'])
    links_dir = volume / 'cartuids'
    links = [link for link in links_dir.iterdir() if link.name not in live_uids] if links_dir.is_dir() else []
    examples.extend(str(link.relative_to(volume)) for link in links)
    return dirs, files, len(links), examples[:5]


def cache_hits(url: str) -> str:
    """Files linked into carts from the staged-file cache so far (cartd_staged_file_cache_hits_total of the
    server's /-/metrics), or why that is unknown."""
    try:
        answer = requests.get(f'{url}/-/metrics', timeout=60)
    except requests.RequestException as exc:
        return f'unknown ({type(exc).__name__})'
    found = re.search(r'^cartd_staged_file_cache_hits_total ([0-9.e+]+)$', answer.text, re.MULTILINE)
    if answer.status_code != 200 or found is None:
        return f'unknown (/-/metrics answered {answer.status_code} without the counter)'
    return number(float(found.group(1)))


def aftermath(stack: OurStack, tally: Tally, settle_s: float) -> Aftermath:
    """Final HEAD of every cart not deleted, the database's view, and what deleted carts left on the volume.

    Workers may still be finishing tasks of carts deleted a moment ago: the volume is looked at
    until nothing of a deleted cart is left, at most settle_s.
    """
    found = Aftermath()
    found.final_heads, found.stuck_uids = final_head(stack.url, sorted(tally.live), settle_s)
    found.cache_hits = cache_hits(stack.url)
    began = time.monotonic()
    while True:
        dumped = stack.run_cmd('dump', '--json', timeout=600)
        if dumped.returncode != 0:
            found.db_error = (dumped.stdout + dumped.stderr).strip()[-300:]
            carts: List[Mapping[str, Any]] = []
        else:
            carts = json.loads(dumped.stdout)
        found.db_status = collections.Counter(str(cart['status']) for cart in carts)
        found.left_dirs, found.left_files, found.left_links, found.left_examples = volume_leftovers(
            stack.volume, {int(cart['id']) for cart in carts}, {str(cart['uid']) for cart in carts})
        found.settle_s = time.monotonic() - began
        clean = not (found.left_dirs or found.left_files or found.left_links or found.stuck)
        if clean or found.db_error or found.settle_s > settle_s:
            return found
        time.sleep(2)


# ---- the figures -------------------------------------------------------------------------

def number(value: float) -> str:
    """1,234."""
    return f'{value:,.0f}'


def ms(seconds: float) -> str:
    """A latency in ms."""
    return f'{seconds * 1000:,.0f}' if seconds >= 0.01 else f'{seconds * 1000:.1f}'


def rss_text(label: str, peaks: TreePeaks, samples: int) -> str:
    """'server 61 / 60 / 78 / 77 MB' (first / min / max / last)."""
    def mb(value: int) -> str:
        return f'{value / 1e6:,.0f}'
    what = label if peaks.processes <= 1 else f'{label} ({peaks.processes} processes, summed)'
    quarters = '/'.join(mb(peaks.sums[len(peaks.sums) * share // 4]) for share in (1, 2, 3)) if peaks.sums else '-'
    return (f'{what} {mb(peaks.first_sum)} / {mb(peaks.min_sum)} / {mb(peaks.peak_sum)} / {mb(peaks.last_sum)} MB'
            f' (at 1/4, 1/2, 3/4 of the run {quarters})' + ('' if samples else ' (no samples)'))


def figures(args: argparse.Namespace, tally: Tally, after: Aftermath, sampler: RssSampler, wall: float,
            cpu: Mapping[str, float], other_share: float, load_before: str) -> Tuple[List[str], bool]:
    """The block of figures, and whether the run passed."""
    roles = collections.Counter(role_of(index) for index in range(args.clients))
    from pacifica.cartd.__main__ import LISTEN_BACKLOG  # pylint: disable=import-outside-toplevel
    backlog = cpconfig_overrides(args.cpconfig_set).get('server.socket_queue_size', f'{LISTEN_BACKLOG} (default)')
    sets = ''.join(f', {item}' for item in args.set + args.cpconfig_set)
    total = sum(tally.requests.values())
    failed = sum(tally.failed.values())
    carts = tally.carts
    lines = [
        f'pacifica-cartd load test {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, '
        f'pacifica-cartd {cart_version()}: {args.clients} clients ({roles["whole"]} whole, {roles["range"]} Range, '
        f'{roles["delete-staging"]} delete-while-staging) for {args.duration:g} s; {args.database}, '
        f'{args.workers} worker(s) x {args.concurrency}, {args.server_threads} server threads, listen backlog '
        f'{backlog}{sets}; {os.cpu_count()} CPUs, load average {load_before} before, {load_average()} after',
        f'requests  {number(total)} in {wall:.0f} s ({total / wall if wall else 0:,.0f}/s): '
        + ', '.join(f'{kind} {number(tally.requests[kind])}' for kind in KINDS),
        f'failed    {number(failed)}'
        + (' (' + ', '.join(f'{kind} {tally.failed[kind]}' for kind in KINDS if tally.failed[kind]) + ')'
           if failed else ''),
    ]
    lines.extend(f'          e.g. {text}' for text in tally.examples)
    lines.append(
        f'carts     {number(carts["created"])} created, {number(carts["completed"])} completed (ready, every byte '
        f'checked, deleted, then 404), {number(carts["deleted early"])} deleted early '
        f'({number(carts["seen staging before DELETE"])} seen staging just before), '
        f'{number(len(tally.lost))} lost (not final within {args.cart_deadline:g} s), {number(after.stuck)} stuck')
    heads = ', '.join(f'{status} {count}' for status, count in sorted(after.final_heads.items())) or 'none'
    db = after.db_error or (', '.join(f'{status} {count}' for status, count in sorted(after.db_status.items()))
                            or 'no carts')
    lines.append(f'after     HEAD of the {number(sum(after.final_heads.values()))} uids not deleted: {heads}; '
                 f'database (carts not deleted): {db}')
    lines.append(f'volume    {after.left_files} files in {after.left_dirs} directories of deleted carts, '
                 f'{after.left_links} cartuids links to them (looked at for {after.settle_s:.0f} s after the load)'
                 + (f', e.g. {", ".join(after.left_examples)}' if after.left_examples else ''))
    lines.append(f'cache     {after.cache_hits} files linked from the staged-file cache (share_staged_files)')
    lines.append('latency   ms     count     p50     p95     p99     max')
    for kind in KINDS:
        values = sorted(tally.latency[kind])
        if values:
            lines.append(f'  {kind:<14}{len(values):>9,} {ms(percentile(values, 0.5)):>7} '
                         f'{ms(percentile(values, 0.95)):>7} {ms(percentile(values, 0.99)):>7} {ms(values[-1]):>7}')
    lines.append(f'rss       first / min / max / last, every {args.rss_interval:g} s ({sampler.samples} samples): '
                 + '; '.join(rss_text(label, peaks, sampler.samples) for label, peaks in sampler.peaks.items()))
    lines.append('cpu       ' + ', '.join(f'{label} {cpu.get(label, 0.0):,.0f} s' for label in
                                         ('server', 'worker', 'archive', 'client'))
                 + f' during the load; other processes used {other_share:.0f}% of the machine')
    passed = (failed == 0 and not tally.lost and after.stuck == 0 and not after.db_error
              and not (after.left_dirs or after.left_files or after.left_links) and carts['completed'] > 0)
    lines.append(f'result    {"PASS" if passed else "FAIL"}')
    return lines, passed


# ---- the run -------------------------------------------------------------------------------

def run_load(args: argparse.Namespace, base: pathlib.Path, cleanup: contextlib.ExitStack) -> int:
    """Start the stack, write the files, run the clients, check what is left, print the figures."""
    load_before = load_average()
    archive = start_archive(base, args.archive_workers, cleanup)
    rng = random.Random(args.seed)
    pool = DataWriter(archive.root, args.hashtype).random_files('load', args.pool_files, args.max_size, rng)
    stack = start_ours(args, base / 'ours', archive, cleanup)
    tally = Tally()
    options = LoadOptions(url=stack.url, pool=pool, hashtype=args.hashtype, max_files=args.max_files,
                          bundle_share=args.bundle_share, cart_deadline=args.cart_deadline,
                          request_timeout=args.request_timeout, max_loops=args.max_loops,
                          stop_at=time.monotonic() + args.duration)
    clients = [Client(index, options, tally, args.seed) for index in range(args.clients)]
    threads = [threading.Thread(target=client.run, name=f'client{client.index}', daemon=True) for client in clients]
    assert archive.process is not None
    roots = {'archive': archive.process.pid, **stack.pids()}
    log(f'{args.clients} clients for {args.duration:g} s against {stack.url}')
    watch = CpuWatch()
    cpu_before = cpu_snapshot(roots)
    started = time.monotonic()
    with RssSampler(stack.pids(), interval=args.rss_interval) as sampler:
        for thread in threads:
            thread.start()
        # Each client ends its current cart after stop_at; every request and poll is bounded.
        join_by = options.stop_at + args.cart_deadline + 6 * args.request_timeout + 60
        next_note = started + 30
        while any(thread.is_alive() for thread in threads) and time.monotonic() < join_by:
            time.sleep(0.5)
            if time.monotonic() >= next_note:
                next_note += 30
                log(f'{sum(tally.requests.values()):,} requests, {sum(tally.failed.values())} failed, '
                    f'{tally.carts["completed"]:,} carts completed, load {load_average()}')
        wall = time.monotonic() - started
    hung = [thread.name for thread in threads if thread.is_alive()]
    if hung:
        log(f'{len(hung)} clients still busy after the bound: {", ".join(hung[:5])}')
        tally.fail('client', f'{len(hung)} client threads did not finish in time')
    cpu = cpu_delta(cpu_before, cpu_snapshot(roots))
    other = watch.since()
    other_share = other[2] / other[0] / (os.cpu_count() or 1) * 100 if other[0] else 0.0
    log(f'load done in {wall:.0f} s; checking what is left')
    after = aftermath(stack, tally, args.settle)
    lines, passed = figures(args, tally, after, sampler, wall, cpu, other_share, load_before)
    print('\n'.join(lines), flush=True)
    if not passed:
        log(stack.logs())
    return 0 if passed else 1


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--clients', type=int, default=100, help='client threads')
    parser.add_argument('--duration', type=float, default=180, help='seconds during which clients start carts')
    parser.add_argument('--smoke', action='store_true', help='a quick check: --clients 4 --duration 10')
    parser.add_argument('--max-files', type=int, default=5, help='files per cart: 1 to this many')
    parser.add_argument('--max-size', type=int, default=64 * KiB, help='bytes per file: 1 to this many')
    parser.add_argument('--pool-files', type=int, default=400, help='files written into the archive to pick from')
    parser.add_argument('--bundle-share', type=float, default=0.25, help='share of carts created with bundle true')
    parser.add_argument('--cart-deadline', type=float, default=60,
                        help='seconds a cart may stage before it counts as lost')
    parser.add_argument('--request-timeout', type=float, default=60, help='seconds one request may take')
    parser.add_argument('--max-loops', type=int, default=100000, help='carts per client at most')
    parser.add_argument('--rss-interval', type=float, default=5, help='seconds between RSS samples')
    parser.add_argument('--settle', type=float, default=30,
                        help='seconds the checks after the load wait for staging carts and deleted carts\' files')
    parser.add_argument('--hashtype', default='sha1', help='hash type in the carts (and to check downloads)')
    parser.add_argument('--seed', type=int, default=1, help='seed of the file sizes and the clients\' choices')
    add_stack_options(parser, max_minutes=0)
    args = parser.parse_args(argv)
    check_stack_options(parser, args)
    if args.smoke:
        args.clients, args.duration = 4, 10
    if args.clients < 1 or args.duration <= 0 or args.max_files < 1 or args.max_size < 1:
        parser.error('--clients, --duration, --max-files and --max-size must be positive')
    if args.pool_files < args.max_files:
        parser.error('--pool-files must be at least --max-files')
    if not args.max_minutes:
        args.max_minutes = (args.duration + args.cart_deadline + 6 * args.request_timeout) / 60 + 15
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the load test; everything started is stopped and removed on the way out."""
    args = parse_args(argv)
    return bounded_run(args, 'cartd-load-', lambda base, cleanup: run_load(args, base, cleanup))


if __name__ == '__main__':
    sys.exit(main())
