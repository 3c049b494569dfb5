#!/usr/bin/env python3
"""At the edge, at full scale (issue 11): a 100,000-file POST, staging 20,000 and 100,000 small files in
both bundle modes, HEAD with wrk on pacifica-cartd and uWSGI, the slow-client probe, and a 1 GiB download
with curl; on an idle stack in the configuration an operator would use, printed with the figures, beside
the published 0.7.0 (--compare-0.7.0) where 0.7.0 can run the workload.

Run it with the interpreter of the virtual environment the project is installed in, e.g.

    .venv/bin/python benchmarks/edge.py --compare-0.7.0
    .venv/bin/python benchmarks/edge.py --scale small --workloads post,head

See benchmarks/README.md ("At the edge: edge.py") for what each figure means and what limits it.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import requests

from cartbench import client, limits
from cartbench.client import BenchError
from cartbench.data import KiB, MiB, ArchiveFile, DataWriter, expected, fileids, total_bytes
from cartbench.harness import (REFERENCE_DB_OPTIONS, REPO, add_stack_options, bounded_run, cart_version,
                               check_stack_options, chosen_workloads, load_average, log, start_archive, start_ours,
                               start_reference, wait_idle)
from cartbench.rss import CpuWatch, RssSampler, cpu_delta, cpu_snapshot, rss_bytes, tree_cpu_seconds
from cartbench.slowclients import ProbeOptions, probe
from cartbench.stacks import Nginx, OurStack, ReferenceStack, UwsgiServer, find_nginx
from cartbench.tools import (CurlResult, WrkResult, apt_binary, command_version, curl_download, curl_many, keepalive,
                             wait_listening, wrk_head)
from cartd_testkit.archive import ArchiveServer

WORKLOADS = ('post', 'stage', 'head', 'slow', 'download')
SMALL_FILE = 64
EMPTY_FILE = 'edge-empty'


@dataclasses.dataclass(frozen=True)
class Scale:
    """Sizes of every workload."""

    post_files: int                  # the POST workload's cart
    stage_carts: Tuple[int, ...]     # the staged carts (files of SMALL_FILE bytes)
    ref_stage_files: int             # 0.7.0's one staged cart (under --ref-deadline)
    floor_files: int                 # files for the archive's per-file floor
    head_seconds: int                # each wrk run
    slow_cart: Tuple[int, int]       # files, bytes each: the cart the slow downloads read
    trickles: int                    # connections sending a byte a second
    slow_downloads: int              # downloads read at 64 KiB/s
    probe_seconds: float             # HEADs every 100 ms for this long
    download_cart: Tuple[int, int]   # files, bytes each
    download_repeats: int


SCALES = {
    'full': Scale(post_files=100_000, stage_carts=(20_000, 100_000), ref_stage_files=20_000, floor_files=2000,
                  head_seconds=10, slow_cart=(2, 256 * MiB), trickles=200, slow_downloads=100, probe_seconds=15,
                  download_cart=(4, 256 * MiB), download_repeats=3),
    'small': Scale(post_files=5_000, stage_carts=(1_000, 2_000), ref_stage_files=200, floor_files=500,
                   head_seconds=3, slow_cart=(2, 16 * MiB), trickles=200, slow_downloads=100, probe_seconds=4,
                   download_cart=(4, 32 * MiB), download_repeats=2),
}


def secs(value: float) -> str:
    """A duration for the report."""
    return f'{value:.2f} s' if value < 10 else f'{value:.1f} s'


def mb(value: float) -> str:
    """A byte count in MB (10^6)."""
    return f'{value / 1e6:,.1f} MB' if value < 1e8 else f'{value / 1e6:,.0f} MB'


def size_text(nbytes: int) -> str:
    """64 B, 256 MiB, 1.0 GiB."""
    if nbytes >= 1 << 30:
        return f'{nbytes / (1 << 30):.1f} GiB'
    if nbytes >= MiB:
        return f'{nbytes // MiB} MiB'
    if nbytes >= KiB:
        return f'{nbytes // KiB} KiB'
    return f'{nbytes} B'


def times(value: Optional[float], base: Optional[float]) -> str:
    """'4.2x' or '-'."""
    return f'{value / base:.2f}x' if value and base else '-'


def version_of(package: str) -> str:
    """An installed distribution's version in this interpreter's environment."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return '?'


def ref_version(bin_dir: pathlib.Path, *modules: str) -> str:
    """'cheroot 8.6.0, CherryPy 18.10.0' as 0.7.0's own venv has them."""
    code = ('import importlib.metadata as m\n'
            f'print(", ".join(n + " " + m.version(n) for n in {list(modules)!r}))')
    ran = subprocess.run([str(bin_dir / 'python'), '-c', code], capture_output=True, text=True, timeout=60,
                         check=False)
    return ran.stdout.strip() or '?'


class Report:
    """Lines of figures on stdout; failures make the exit status 1."""

    def __init__(self) -> None:
        """Start empty."""
        self.failed = False

    @staticmethod
    def line(name: str, text: str) -> None:
        """One line of figures."""
        print(f'{name:<9} {text}', flush=True)

    @staticmethod
    def note(text: str) -> None:
        """A '#' line under the figures."""
        print(f'#   {text}', flush=True)

    def failure(self, name: str, text: str) -> None:
        """Something did not work (not a slow figure: a wrong answer, an error, a check that failed)."""
        self.failed = True
        self.line(name, f'FAILED {text}')


@dataclasses.dataclass
class Side:
    """A server to measure: its label, base URL, the stack behind it and the pid of its process (tree)."""

    label: str
    url: str
    stack: Any               # OurStack or ReferenceStack
    pid: int

    @property
    def port(self) -> int:
        """The port it listens on."""
        return int(self.url.rsplit(':', 1)[1])


class Edge:
    """One run: archive, data, our stack (and 0.7.0's), then the workloads one at a time."""

    def __init__(self, args: argparse.Namespace, base: pathlib.Path, cleanup: contextlib.ExitStack) -> None:
        """Remember the options; start nothing yet."""
        self.args = args
        self.base = base
        self.cleanup = cleanup
        self.scale = SCALES[args.scale]
        self.report = Report()
        self.archive: Optional[ArchiveServer] = None
        self.ours: Optional[OurStack] = None
        self.ref: Optional[ReferenceStack] = None
        self.small: List[ArchiveFile] = []
        self.large: List[ArchiveFile] = []
        self.polled: List[ArchiveFile] = []
        self.wrk: Optional[str] = None
        self.nginx: Optional[Nginx] = None
        self.uwsgi_how: Dict[int, str] = {}
        self.floor: Optional[Tuple[float, str]] = None

    # ---- set-up ----------------------------------------------------------------------

    def small_count(self, workloads: Sequence[str]) -> int:
        """How many 64-byte files the chosen workloads need (the POST and the staged carts share them)."""
        count = 0
        if 'post' in workloads:
            count = self.scale.post_files
        if 'stage' in workloads:
            count = max(count, *self.scale.stage_carts, self.scale.floor_files)
            if self.args.compare:
                count = max(count, self.scale.ref_stage_files)
        return count

    def large_count(self, workloads: Sequence[str]) -> Tuple[int, int]:
        """How many large files (and their size) the chosen workloads need (the slow cart is a subset)."""
        count = 0
        if 'download' in workloads:
            count = self.scale.download_cart[0]
        if 'slow' in workloads:
            count = max(count, self.scale.slow_cart[0])
        size = self.scale.download_cart[1] if 'download' in workloads else self.scale.slow_cart[1]
        return count, size

    def check_disk(self, workloads: Sequence[str]) -> None:
        """Refuse to start without room for the archive and the largest cart on both sides."""
        small = self.small_count(workloads)
        large, size = self.large_count(workloads)
        archive = small * 4096 + large * size
        # a bundled cart holds its files until its tar is written (64 B files take a 4 KiB block each)
        biggest = max(large * size, max(self.scale.stage_carts) * (4096 + 1536) if 'stage' in workloads else 0)
        need = archive + int(biggest * 1.1) * (2 if self.args.compare else 1) + (1 << 30)
        free = shutil.disk_usage(self.base).free
        log(f'disk: {free / (1 << 30):.1f} GiB free under {self.base}, about {need / (1 << 30):.1f} GiB needed')
        if free < need:
            raise SystemExit(f'not enough disk space under {self.base}: {free / (1 << 30):.1f} GiB free, '
                             f'{need / (1 << 30):.1f} GiB needed (use --scale small or --tmpdir)')

    def make_data(self, workloads: Sequence[str]) -> None:
        """Write the chosen workloads' files into the archive."""
        assert self.archive is not None
        writer = DataWriter(self.archive.root, self.args.hashtype)
        started = time.monotonic()
        count = self.small_count(workloads)
        if count:
            self.small = writer.small_files('e', count, SMALL_FILE, per_dir=1000)
        large, size = self.large_count(workloads)
        if large:
            self.large = writer.large_files('E', large, size)
        if 'head' in workloads:
            self.polled = writer.small_files('h', 10, 4 * KiB)
        # wrk waits for the body a HEAD answer's Content-Length announces: nginx's HEADs ask for an empty file
        (self.archive.root / EMPTY_FILE).write_bytes(b'')
        total = total_bytes(self.small) + total_bytes(self.large) + total_bytes(self.polled)
        log(f'wrote {len(self.small) + len(self.large) + len(self.polled):,} files, {total / 1e6:,.0f} MB, into the '
            f'archive in {time.monotonic() - started:.1f} s')

    def header(self, workloads: Sequence[str]) -> None:
        """The configuration, printed before any figure."""
        args = self.args
        assert self.ours is not None and self.ours.server is not None and self.archive is not None
        backlog = wait_listening(self.ours.port)
        settings = ''.join(', ' + item for item in args.set + args.cpconfig_set)
        print(f'# edge.py: scale {args.scale}; workloads {",".join(workloads)}; {os.cpu_count()} CPUs; '
              f'load average {load_average()}; hash {args.hashtype}', flush=True)
        print(f'# pacifica-cartd {cart_version()}: {args.database}, {args.workers} worker(s) x concurrency '
              f'{args.concurrency}, its own server (cheroot {version_of("cheroot")}, CherryPy '
              f'{version_of("CherryPy")}) with server.thread_pool {args.server_threads}, listen backlog '
              f'{backlog} (ss){settings}; the documented defaults otherwise', flush=True)
        if {'head', 'slow', 'download'} & set(workloads):
            _, how = self.uwsgi_line(2)
            print(f'# uWSGI {command_version([str(pathlib.Path(sys.executable).parent / "uwsgi"), "--version"])}: '
                  f'{how}; CARTD_CONFIG and CARTD_CPCONFIG are the stack\'s', flush=True)
        if self.ref is not None and self.ref.server is not None:
            print(f'# 0.7.0: MariaDB ({ref_version(self.ref.bin_dir, "PyMySQL", "peewee")}, peewee_url '
                  f'...{REFERENCE_DB_OPTIONS}: no TLS context per connection), {args.workers} worker(s) x concurrency '
                  f'{args.concurrency}, its own server ({ref_version(self.ref.bin_dir, "cheroot", "CherryPy")}) with '
                  f'server.thread_pool '
                  f'{args.server_threads}, listen backlog {wait_listening(self.ref.port)} (ss; CherryPy\'s default, '
                  f'0.7.0 sets none); its own venv and RabbitMQ vhost', flush=True)
        tools = [f'curl {command_version(["curl", "--version"]).split()[1]}']
        if self.wrk:
            tools.append(command_version([self.wrk, '-v']).split(' [')[0])
        print(f'# archive interface 0.4.2 under gunicorn x{args.archive_workers}; clients: '
              f'{", ".join(tools)}, Python {sys.version.split()[0]} (requests {version_of("requests")}); all on '
              f'127.0.0.1', flush=True)

    def uwsgi_line(self, processes: int) -> Tuple[List[str], str]:
        """The uWSGI command line for N processes (the one function in stacks.py builds it)."""
        from cartbench.stacks import uwsgi_command  # pylint: disable=import-outside-toplevel
        scratch = self.base / 'uwsgi-preview'
        scratch.mkdir(exist_ok=True)
        return uwsgi_command('uwsgi', 0, processes, scratch, REPO)

    # ---- helpers ---------------------------------------------------------------------

    def sides(self, uwsgi: Optional[UwsgiServer] = None) -> List[Side]:
        """Our server, uWSGI when given, and 0.7.0 when compared."""
        assert self.ours is not None and self.ours.server is not None
        found = [Side('ours', self.ours.url, self.ours, self.ours.server.pid)]
        if uwsgi is not None:
            found.append(Side(f'uWSGI {uwsgi.processes}p', uwsgi.url, self.ours, uwsgi.pid))
        if self.ref is not None and self.ref.server is not None:
            found.append(Side('0.7.0', self.ref.url, self.ref, self.ref.server.pid))
        return found

    @contextlib.contextmanager
    def uwsgi(self, processes: int) -> Iterator[UwsgiServer]:
        """uWSGI with N processes beside our stack, stopped afterwards."""
        assert self.ours is not None
        server = UwsgiServer(self.ours, processes, REPO, name=f'uwsgi-{processes}p-{uuid.uuid4().hex[:4]}')
        self.cleanup.callback(server.stop)
        log(f'starting uWSGI with {processes} process(es)')
        server.start()
        self.uwsgi_how[processes] = server.how
        try:
            yield server
        finally:
            server.stop()

    def roots(self, stack: Any) -> Dict[str, int]:
        """label -> root pid for CPU accounting: archive, server, each worker."""
        assert self.archive is not None and self.archive.process is not None
        return {'archive': self.archive.process.pid, **stack.pids()}

    def wait_quiet(self, stack: Any, limit_s: float = 180) -> float:
        """Wait until the stack's workers and server use under 5% of a core (bounded); return the wait."""
        pids = list(stack.pids().values())
        started = time.monotonic()
        last = sum(tree_cpu_seconds(pid) for pid in pids)
        while time.monotonic() - started < limit_s:
            time.sleep(1.0)
            now = sum(tree_cpu_seconds(pid) for pid in pids)
            if now - last < 0.05:
                break
            last = now
        return time.monotonic() - started

    def before(self, name: str) -> None:
        """An idle stack, then the load average, before a workload."""
        waited = [f'{stack.label} {self.wait_quiet(stack):.0f} s' for stack in (self.ours, self.ref) if stack]
        print(f'# {name}: load average {load_average()} before (waited for idle workers: {", ".join(waited)})',
              flush=True)

    def uid(self, workload: str, label: str) -> str:
        """A fresh cart uid."""
        return f'edge-{workload}-{label.split()[0].lower()}-{uuid.uuid4().hex[:8]}'

    def post(self, url: str, uid: str, body: bytes, timeout: float = 600) -> float:
        """POST a prepared body; insist on 201; the seconds to the answer as the client sees it."""
        started = time.monotonic()
        try:
            answer = requests.post(f'{url}/{uid}', data=body, headers={'Content-Type': 'application/json'},
                                   timeout=timeout)
        except requests.RequestException as exc:
            raise BenchError(f'POST {uid}: {type(exc).__name__}: {exc}') from exc
        seconds = time.monotonic() - started
        if answer.status_code != 201:
            raise BenchError(f'POST {uid} answered {answer.status_code}: {answer.text[:300]}')
        return seconds

    def body(self, files: Sequence[ArchiveFile], bundle: Optional[bool] = None) -> bytes:
        """A POST body."""
        document: Dict[str, Any] = {'fileids': fileids(files, self.args.hashtype)}
        if bundle is not None:
            document['bundle'] = bundle
        return json.dumps(document).encode('utf-8')

    def ready_cart(self, stack: Any, files: Sequence[ArchiveFile], workload: str, deadline: float) -> str:
        """POST a cart and wait for it to be ready; its uid."""
        uid = self.uid(workload, stack.label)
        self.post(stack.url, uid, self.body(files))
        client.wait_ready(stack.url, [uid], deadline)
        return uid

    def check(self, name: str, url: str, uid: str, files: Sequence[ArchiveFile], curl: Optional[CurlResult],
              label: str) -> str:
        """Download once more through the tar checker (every member's path, size, digest); '' when right."""
        try:
            checked = client.download_and_check(url, uid, expected(files), self.args.hashtype, timeout=600)
        except BenchError as exc:
            self.report.failure(name, f'{label}: {exc}')
            return 'CHECK FAILED'
        problems = list(checked.problems)
        if curl is not None and curl.nbytes != checked.tar_bytes:
            problems.append(f'curl got {curl.nbytes} bytes, the checked download {checked.tar_bytes}')
        if problems:
            self.report.failure(name, f'{label}: the tar is wrong: {"; ".join(problems[:3])}')
            return 'CHECK FAILED'
        return f'checked: {checked.files:,} members right'

    def curl(self, url: str, uid: str) -> CurlResult:
        """curl the cart's tar to /dev/null; insist on 200."""
        result = curl_download(f'{url}/{uid}?filename=edge.tar')
        if result.status != 200:
            raise BenchError(f'curl GET {uid} answered {result.status}')
        return result

    def cpu_note(self, label: str, phase: str, used: Dict[str, float], files: int = 0) -> None:
        """Where the CPU went in one phase."""
        order = ('worker', 'server', 'archive', 'client')
        text = ', '.join(f'{key} {used.get(key, 0.0):.1f} s' for key in order)
        if files > 1:
            text += ' = per file ' + ', '.join(f'{key} {used.get(key, 0.0) / files * 1000:.2f} ms' for key in order)
        self.report.note(f'{label} {phase} CPU: {text}')

    def delete(self, stack: Any, uids: List[str]) -> None:
        """Free the volume (ours: DELETE; 0.7.0: its directories)."""
        stack.after_workload(uids)

    # ---- the workloads ---------------------------------------------------------------

    def w_post(self) -> None:
        """POST of one large cart: seconds to the 201, server RSS before / peak / 5 s after; then DELETE."""
        files = self.small[:self.scale.post_files]
        body = self.body(files)
        log(f'post: body of {len(files):,} files, {len(body) / 1e6:.1f} MB')
        results = {}
        self.before('post')
        for side in self.sides():
            if side.label == '0.7.0':
                self.before('post (0.7.0)')
            uid = self.uid('post', side.label)
            before = rss_bytes(side.pid) or 0
            extra = ''
            try:
                with RssSampler({'server': side.pid}, interval=0.05) as sampler:
                    seconds = self.post(side.url, uid, body)
                    answered = time.monotonic()
                    if isinstance(side.stack, OurStack):
                        started = time.monotonic()
                        answer = requests.delete(f'{side.url}/{uid}', timeout=300)
                        extra = f'; DELETE at once: {answer.status_code} in {secs(time.monotonic() - started)}'
                        if answer.status_code != 200:
                            self.report.failure('post', f'{side.label}: DELETE answered {answer.status_code}')
                    else:
                        side.stack.reset()  # stop its workers, purge its queue
                        extra = '; then its workers were stopped and its queue purged'
                    time.sleep(max(0.0, answered + 5 - time.monotonic()))
            except BenchError as exc:
                self.report.failure('post', f'{side.label}: {exc}')
                if isinstance(side.stack, ReferenceStack):
                    side.stack.reset()
                continue
            finally:
                if isinstance(side.stack, ReferenceStack):
                    side.stack.after_workload([uid])
            peaks = sampler.peaks['server']
            quiet = self.wait_quiet(side.stack)
            results[side.label] = seconds
            self.report.line('post', f'{side.label}: {len(files):,} files ({len(body) / 1e6:.1f} MB body): 201 in '
                                     f'{secs(seconds)}; server RSS {mb(before)} before, peak {mb(peaks.peak_root)} '
                                     f'({(peaks.peak_root - before) / 1e6:+,.0f} MB), {mb(peaks.last_root)} 5 s '
                                     f'after the 201{extra}; workers idle {quiet:.0f} s later')
        if 'ours' in results and '0.7.0' in results:
            self.report.line('post', f'ratio 0.7.0/ours {times(results["0.7.0"], results["ours"])} (seconds to the '
                                     f'201); target under 2 s')

    def per_file_floor(self) -> Tuple[float, str]:
        """The archive's per-file floor on the same files: HEAD+GET with keep-alive connections, best of 4 and 8
        threads, once with requests sessions (as run.py measures it) and once with http.client (what the
        cart's archive client uses); prints both with the archive's and the client's CPU per file.
        Returns the lower one (s per file) and how it was measured."""
        if self.floor is None:
            assert self.archive is not None and self.archive.process is not None
            files = self.small[:self.scale.floor_files]
            found: List[Tuple[float, str]] = []
            parts = []
            for name, fetch in (('requests', limits.fetch_files), ('http.client', limits.fetch_files_http_client)):
                best: Optional[Tuple[float, int, float, float]] = None
                for threads in (4, 8):
                    archive_cpu = tree_cpu_seconds(self.archive.process.pid)
                    client_cpu = os.times()
                    seconds = fetch(self.archive.url, files, threads, self.args.hashtype)
                    after = os.times()
                    archive_cpu = tree_cpu_seconds(self.archive.process.pid) - archive_cpu
                    client_used = (after.user + after.system) - (client_cpu.user + client_cpu.system)
                    per_file = seconds / len(files)
                    log(f'archive per-file floor, {name}, {threads} threads: {per_file * 1000:.2f} ms/file')
                    if best is None or per_file < best[0]:
                        best = (per_file, threads, archive_cpu / len(files), client_used / len(files))
                assert best is not None
                found.append((best[0], f'{name}, {best[1]} threads'))
                parts.append(f'{name} {best[0] * 1000:.2f} ms/file ({best[1]} threads; CPU per file: archive '
                             f'{best[2] * 1000:.2f} ms, client {best[3] * 1000:.2f} ms)')
            self.floor = min(found)
            self.report.line('stage', f'archive per-file floor, HEAD+GET over {len(files):,} of the same files with '
                                      f'keep-alive connections, best of 4/8 threads, measured now: '
                                      f'{"; ".join(parts)}; the floor below is the lower, {self.floor[1]} (on two '
                                      f'cores the archive\'s and the client\'s CPU per file share the machine)')
        return self.floor

    def w_stage(self) -> None:
        """Carts of small files in both bundle modes: POST to ready against the floor, then curl the tar."""
        assert self.ours is not None
        floor, _ = self.per_file_floor()
        for bundle in (False, True):
            for count in self.scale.stage_carts:
                self.before(f'stage {count:,} bundle={str(bundle).lower()}')
                self.stage_one(self.ours, self.small[:count], bundle, floor)
        if self.ref is not None:
            self.before('stage (0.7.0)')
            self.stage_ref(self.small[:self.scale.ref_stage_files], floor)

    def stage_one(self, stack: OurStack, files: Sequence[ArchiveFile], bundle: bool, floor: float) -> None:
        """One of our carts: POST to ready, curl, check."""
        name = f'bundle={str(bundle).lower()} {len(files):,} x {SMALL_FILE} B'
        uid = self.uid('stage', 'ours')
        roots = self.roots(stack)
        try:
            cpu_start = cpu_snapshot(roots)
            started = time.monotonic()
            post_s = self.post(stack.url, uid, self.body(files, bundle))
            ready_s = client.wait_ready(stack.url, [uid], self.args.deadline)[uid] - started
            used = cpu_delta(cpu_start, cpu_snapshot(roots))
            curl = self.curl(stack.url, uid)
            checked = self.check('stage', stack.url, uid, files, curl, f'ours {name}')
        except BenchError as exc:
            self.report.failure('stage', f'ours {name}: {exc}')
            log(stack.logs())
            return
        finally:
            self.delete(stack, [uid])
        per_file = ready_s / len(files)
        self.report.line('stage', f'ours {name}: ready {secs(ready_s)} after the POST (201 in {secs(post_s)}), '
                                  f'{per_file * 1000:.2f} ms/file = {per_file / floor:.2f}x the floor (target 1.2x); '
                                  f'curl: first byte {curl.first_byte_s:.2f} s, {secs(curl.total_s)} in all, '
                                  f'{mb(curl.nbytes)} at {curl.mb_per_s:,.0f} MB/s (targets 0.5 s, 100 MB/s); '
                                  f'{checked}')
        self.cpu_note(f'ours {name}', 'POST to ready', used, len(files))

    def stage_ref(self, files: Sequence[ArchiveFile], floor: float) -> None:
        """0.7.0's one cart, under --ref-deadline; the files it staged by then."""
        assert self.ref is not None
        name = f'{len(files):,} x {SMALL_FILE} B'
        uid = self.uid('stage', '0.7.0')
        roots = self.roots(self.ref)
        try:
            cpu_start = cpu_snapshot(roots)
            started = time.monotonic()
            self.post(self.ref.url, uid, self.body(files))
            try:
                ready_s = client.wait_ready(self.ref.url, [uid], self.args.ref_deadline)[uid] - started
            except client.Deadline:
                staged = self.ref.staged_count(uid) or 0
                used = cpu_delta(cpu_start, cpu_snapshot(roots))
                rate = f', {self.args.ref_deadline / staged * 1000:,.1f} ms/file so far' if staged else ''
                self.report.line('stage', f'0.7.0 {name}: not ready after {self.args.ref_deadline:g} s: {staged:,} of '
                                          f'{len(files):,} files staged{rate} (the floor is {floor * 1000:.2f} '
                                          f'ms/file)')
                self.cpu_note(f'0.7.0 {name}', f'first {self.args.ref_deadline:g} s', used, staged)
                self.ref.reset()
                return
            used = cpu_delta(cpu_start, cpu_snapshot(roots))
            curl = self.curl(self.ref.url, uid)
            checked = self.check('stage', self.ref.url, uid, files, curl, f'0.7.0 {name}')
        except BenchError as exc:
            self.report.failure('stage', f'0.7.0 {name}: {exc}')
            self.ref.reset()
            return
        finally:
            self.delete(self.ref, [uid])
        per_file = ready_s / len(files)
        self.report.line('stage', f'0.7.0 {name}: ready {secs(ready_s)}, {per_file * 1000:.2f} ms/file = '
                                  f'{per_file / floor:.2f}x the floor; curl: first byte {curl.first_byte_s:.2f} s, '
                                  f'{secs(curl.total_s)}, {mb(curl.nbytes)} at {curl.mb_per_s:,.0f} MB/s; {checked}')
        self.cpu_note(f'0.7.0 {name}', 'POST to ready', used, len(files))

    def wrk_run(self, side: Side, uid: str) -> Optional[WrkResult]:
        """wrk HEAD on one server, with its CPU use; one HEAD afterwards must still say ready."""
        assert self.wrk is not None
        cpu_before = tree_cpu_seconds(side.pid)
        watch = CpuWatch()
        try:
            result = wrk_head(self.wrk, f'{side.url}/{uid}', self.base, seconds=self.scale.head_seconds)
        except BenchError as exc:
            self.report.failure('head', f'{side.label}: {exc}')
            return None
        server_cpu = tree_cpu_seconds(side.pid) - cpu_before
        wall, _, other = watch.since()
        answer = requests.head(f'{side.url}/{uid}', timeout=30)
        state = answer.headers.get('X-Pacifica-Status')
        if answer.status_code != 204 or state != 'ready':
            self.report.failure('head', f'{side.label}: after wrk, HEAD answered {answer.status_code} {state}')
        errors = ', '.join(f'{kind} {count}' for kind, count in result.socket_errors.items() if count) or 'none'
        self.report.line('head', f'{side.label}: {result.per_s:,.0f} HEAD/s ({result.requests:,} in '
                                 f'{result.seconds:.1f} s), p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms, '
                                 f'non-2xx {result.non_2xx}, socket errors {errors}; server CPU '
                                 f'{server_cpu / result.seconds * 100:.0f}% of a core, wrk CPU '
                                 f'{result.cpu_s / result.seconds * 100:.0f}%, processes outside this run '
                                 f'{other / wall * 100:.0f}% of a core')
        alive = keepalive('127.0.0.1', side.port, f'/{uid}')
        self.report.note(f'{side.label}: a keep-alive connection is {alive}'
                         + (' (so each of wrk\'s "read" socket errors is a connection the server closed after an '
                            'answer, and wrk opened another)' if result.socket_errors.get('read') else ''))
        if result.non_2xx:
            self.report.failure('head', f'{side.label}: {result.non_2xx} HEAD answers were not 2xx')
        return result

    def w_head(self) -> None:
        """HEAD with wrk (2 threads, 16 connections) on our server, uWSGI 1 and 2 processes, and 0.7.0."""
        assert self.ours is not None
        self.before('head')
        rates: Dict[str, float] = {}
        try:
            ours_uid = self.ready_cart(self.ours, self.polled, 'head', self.args.deadline)
        except BenchError as exc:
            self.report.failure('head', f'ours: {exc}')
            return
        python: Optional[limits.HeadRate] = None
        try:
            found = self.wrk_run(self.sides()[0], ours_uid)
            if found:
                rates['ours'] = found.per_s
            for processes in (1, 2):
                with self.uwsgi(processes) as server:
                    side = Side(f'uWSGI {processes}p', server.url, self.ours, server.pid)
                    self.report.note(f'uWSGI {processes}p listen backlog {wait_listening(server.port)} (ss); '
                                     f'{server.how}')
                    found = self.wrk_run(side, ours_uid)
                    if found:
                        rates[side.label] = found.per_s
            python = limits.head_rate(f'{self.ours.url}/{ours_uid}', 16, max(2, self.scale.head_seconds // 2),
                                      want_status='ready')
        except BenchError as exc:
            self.report.failure('head', f'ours: {exc}')
        finally:
            self.delete(self.ours, [ours_uid])
        if self.ref is not None:
            try:
                ref_uid = self.ready_cart(self.ref, self.polled, 'head', self.args.ref_deadline)
                found = self.wrk_run(Side('0.7.0', self.ref.url, self.ref, self.ref.pids()['server']), ref_uid)
                if found:
                    rates['0.7.0'] = found.per_s
            except BenchError as exc:
                self.report.failure('head', f'0.7.0: {exc}')
            finally:
                self.delete(self.ref, [])
        parts = [f'ours/0.7.0 {times(rates.get("ours"), rates.get("0.7.0"))} (target 4x)',
                 f'uWSGI 2p/1p {times(rates.get("uWSGI 2p"), rates.get("uWSGI 1p"))} (target 1.8x)',
                 'ours target 1,000/s']
        self.report.line('head', 'ratio ' + ', '.join(parts))
        ceiling = ''
        if self.nginx is not None and self.wrk is not None:
            try:
                limit = wrk_head(self.wrk, self.nginx.url + EMPTY_FILE, self.base,
                                 seconds=min(5, self.scale.head_seconds))
                ceiling = f'; wrk on nginx (a static file) {limit.per_s:,.0f} HEAD/s: what this client can send'
            except BenchError as exc:
                ceiling = f'; wrk on nginx failed: {exc}'
        if python is not None:
            self.report.line('head', f'cross-check: a Python client (16 threads, a requests.Session each) on ours: '
                                     f'{python.per_s:,.0f} HEAD/s, p50 {python.p50_ms:.1f} ms, p99 '
                                     f'{python.p99_ms:.1f} ms, {python.errors} not ready; wrk '
                                     f'{rates.get("ours", 0):,.0f}/s{ceiling}')

    def probe_one(self, side: Side, head_path: str, download_path: str, control: bool = False) -> None:
        """The slow-client probe against one server, with its RSS and how soon it answers again.

        `control`: nginx serving the archive's files, to show what the probe's client can measure.
        """
        scale = self.scale
        options = ProbeOptions(host='127.0.0.1', port=side.port, head_path=head_path, download_path=download_path,
                               trickles=scale.trickles, downloads=scale.slow_downloads, seconds=scale.probe_seconds,
                               ready_header=not control)
        log(f'slow: probing {side.label}')
        try:
            with RssSampler({'server': side.pid}, interval=0.1) as sampler:
                cpu_before = tree_cpu_seconds(side.pid)
                result = probe(options)
                server_cpu = tree_cpu_seconds(side.pid) - cpu_before
        except RuntimeError as exc:
            self.report.failure('slow', f'{side.label}: {exc}')
            return
        recovered = self.recovery(side, head_path)
        peaks = sampler.peaks['server']
        trickle, download = result.trickle, result.download
        closed = ''
        if trickle.closed_by_server or trickle.answered:
            closed = f', {trickle.closed_by_server} closed by the server, {trickle.answered} answered early, ' \
                     f'{trickle.reconnects} reopened'
        latency = (f'p50 {result.pct(0.5):.0f} ms, p99 {result.pct(0.99):.0f} ms, max {result.max_ms:.0f} ms over '
                   f'{len(result.latencies_ms)} answered' if result.latencies_ms else 'none answered')
        what = 'HEAD of an empty file' if control else 'HEAD'
        self.report.line('slow', f'{side.label}: {what} on a fresh connection every {options.interval * 1000:.0f} ms '
                                 f'for {result.seconds:.0f} s: {latency}; {result.failed} failed, {result.timed_out} '
                                 f'timed out (5 s), {result.refused} refused, of {result.sent}'
                                 + ('' if control else ' (target p99 200 ms, none failing, none refused)'))
        self.report.note(f'{side.label}: {trickle.opened} byte-a-second connections opened ({trickle.refused} '
                         f'refused, {trickle.connect_timeouts} connect timeouts{closed}, {trickle.open_at_end} open at '
                         f'the end); {download.opened} downloads opened ({download.refused} refused, '
                         f'{download.connect_timeouts} connect timeouts), {download.status_200} got their 200, '
                         f'{mb(download.nbytes)} read, {download.closed_by_server} closed by the server, '
                         f'{download.open_at_end} open at the end')
        self.report.note(f'{side.label}: server RSS {mb(peaks.first_sum)} before, peak {mb(peaks.peak_sum)} '
                         f'({peaks.processes} process(es)), server CPU {server_cpu / result.wall * 100:.0f}% of a '
                         f'core; client CPU {result.client_cpu_pct:.0f}% of a core, HEADs started at most '
                         f'{result.max_lag_ms:.0f} ms late; answers again {recovered} after the sockets closed'
                         + (f'; e.g. {result.failures[0]}' if result.failures else ''))

    def recovery(self, side: Side, path: str, limit_s: float = 60) -> str:
        """How soon after the probe a HEAD is answered again (bounded)."""
        started = time.monotonic()
        while time.monotonic() - started < limit_s:
            try:
                answer = requests.head(f'{side.url}{path}', timeout=2)
                if answer.status_code < 300:
                    return f'within {time.monotonic() - started:.1f} s'
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.report.failure('slow', f'{side.label}: no HEAD answered within {limit_s:g} s after the probe')
        return f'NOT within {limit_s:g} s'

    def w_slow(self) -> None:
        """The slow-client probe on nginx (the control), our server, uWSGI with 2 processes, and 0.7.0."""
        assert self.ours is not None
        files = self.large[:self.scale.slow_cart[0]]
        self.before('slow')
        self.report.note(f'{self.scale.trickles} connections send "HEAD /<uid> ..." a byte a second (reopened when '
                         f'the server closes them, at most 20 times each), {self.scale.slow_downloads} GETs of a '
                         f'{size_text(total_bytes(files))} cart read at 64 KiB/s (SO_RCVBUF 32 KiB); after 2 s, '
                         f'a HEAD on a fresh connection every 100 ms (5 s timeout, connect included)')
        if self.nginx is not None:
            side = Side('nginx (control)', self.nginx.url.rstrip('/'), None, self.nginx.pid)
            self.probe_one(side, f'/{EMPTY_FILE}', f'/{files[0].archive_id}', control=True)
        try:
            uid = self.ready_cart(self.ours, files, 'slow', self.args.deadline)
        except BenchError as exc:
            self.report.failure('slow', f'ours: {exc}')
            return
        try:
            self.probe_one(self.sides()[0], f'/{uid}', f'/{uid}?filename=slow.tar')
            with self.uwsgi(2) as server:
                self.probe_one(Side('uWSGI 2p', server.url, self.ours, server.pid), f'/{uid}',
                               f'/{uid}?filename=slow.tar')
        finally:
            self.delete(self.ours, [uid])
        if self.ref is not None:
            try:
                ref_uid = self.ready_cart(self.ref, files, 'slow', self.args.ref_deadline)
                self.probe_one(Side('0.7.0', self.ref.url, self.ref, self.ref.pids()['server']), f'/{ref_uid}',
                               f'/{ref_uid}?filename=slow.tar')
            except BenchError as exc:
                self.report.failure('slow', f'0.7.0: {exc}')
            finally:
                self.delete(self.ref, [])

    def download_side(self, side: Side, uid: str, files: Sequence[ArchiveFile]) -> Optional[float]:
        """curl the cart `download_repeats` times, then once through the checker; the median MB/s."""
        runs: List[CurlResult] = []
        try:
            for _ in range(self.scale.download_repeats):
                runs.append(self.curl(side.url, uid))
        except BenchError as exc:
            self.report.failure('download', f'{side.label}: {exc}')
            return None
        checked = self.check('download', side.url, uid, files, runs[0], side.label)
        rates = [run.mb_per_s for run in runs]
        median = statistics.median(rates)
        cpu = statistics.median(run.cpu_s / run.total_s * 100 for run in runs if run.total_s)
        each = ' / '.join(f'{rate:,.0f}' for rate in rates)
        self.report.line('download', f'{side.label}: {mb(runs[0].nbytes)} tar, curl {each} MB/s (median '
                                     f'{median:,.0f}), first byte '
                                     f'{" / ".join(f"{run.first_byte_s * 1000:.0f}" for run in runs)} ms; curl CPU '
                                     f'{cpu:.0f}% of a core; {checked}')
        return median

    def w_download(self) -> None:
        """A 1 GiB cart with curl, on our server, uWSGI with 2 processes, and 0.7.0."""
        assert self.ours is not None
        files = self.large[:self.scale.download_cart[0]]
        self.before('download')
        rates: Dict[str, float] = {}
        try:
            uid = self.ready_cart(self.ours, files, 'download', self.args.deadline)
        except BenchError as exc:
            self.report.failure('download', f'ours: {exc}')
            return
        try:
            found = self.download_side(self.sides()[0], uid, files)
            if found:
                rates['ours'] = found
            with self.uwsgi(2) as server:
                found = self.download_side(Side('uWSGI 2p', server.url, self.ours, server.pid), uid, files)
                if found:
                    rates['uWSGI 2p'] = found
        finally:
            self.delete(self.ours, [uid])
        if self.ref is not None:
            try:
                ref_uid = self.ready_cart(self.ref, files, 'download', max(self.args.ref_deadline, 300))
                found = self.download_side(Side('0.7.0', self.ref.url, self.ref, self.ref.pids()['server']),
                                           ref_uid, files)
                if found:
                    rates['0.7.0'] = found
            except BenchError as exc:
                self.report.failure('download', f'0.7.0: {exc}')
            finally:
                self.delete(self.ref, [])
        limit = ''
        if self.nginx is not None:
            try:
                rounds = []
                for _ in range(self.scale.download_repeats):
                    pieces = curl_many([self.nginx.url + item.archive_id for item in files])
                    rounds.append(sum(piece.nbytes for piece in pieces) / sum(piece.total_s for piece in pieces) / 1e6)
                limit = (f'; nginx sendfile, the same files one after another on one connection of one curl: '
                         f'{" / ".join(f"{rate:,.0f}" for rate in rounds)} MB/s (median '
                         f'{statistics.median(rounds):,.0f})')
            except BenchError as exc:
                limit = f'; nginx limit failed: {exc}'
        self.report.line('download', f'ratio uWSGI 2p/ours {times(rates.get("uWSGI 2p"), rates.get("ours"))} '
                                     f'(target 0.9x), ours/0.7.0 {times(rates.get("ours"), rates.get("0.7.0"))}'
                                     f'{limit}')

    # ---- the run ---------------------------------------------------------------------

    def run(self, workloads: Sequence[str]) -> int:
        """Bring everything up, run the workloads one at a time, print the figures."""
        self.check_disk(workloads)
        if self.args.wait_idle:
            wait_idle(self.args.wait_idle)
        if 'head' in workloads:
            self.wrk = apt_binary('wrk', 'wrk', install=not self.args.no_install)
            if self.wrk is None:
                raise SystemExit('the head workload needs wrk (Debian package wrk); install it or leave out head')
        self.archive = start_archive(self.base, self.args.archive_workers, self.cleanup)
        self.make_data(workloads)
        self.ours = start_ours(self.args, self.base / 'ours', self.archive, self.cleanup)
        if self.args.compare:
            self.ref = start_reference(self.args, self.base / 'ref', self.archive, self.cleanup)
        if not self.args.no_limits and {'head', 'slow', 'download'} & set(workloads):
            binary = find_nginx(install=not self.args.no_install)
            if binary is not None:
                self.nginx = Nginx(binary, self.archive.root, self.base / 'nginx')
                self.cleanup.callback(self.nginx.stop)
                self.nginx.start()
        self.header(workloads)
        for name in WORKLOADS:
            if name in workloads:
                log(f'workload {name}')
                watch = CpuWatch()
                getattr(self, f'w_{name}')()
                wall, own, other = watch.since()
                print(f'# {name}: {wall:.0f} s; this run used {own:.0f} CPU-s, processes outside it (other jobs, '
                      f'the database and broker servers) {other:.0f} CPU-s = '
                      f'{other / wall / (os.cpu_count() or 1) * 100 if wall else 0:.0f}% of the machine', flush=True)
        return 1 if self.report.failed else 0


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--compare-0.7.0', dest='compare', action='store_true',
                        help='also run the published pacifica-cartd 0.7.0 (MariaDB, its own venv) where it can')
    parser.add_argument('--workloads', default=','.join(WORKLOADS), help=f'comma-separated subset of '
                                                                         f'{",".join(WORKLOADS)}')
    parser.add_argument('--scale', choices=sorted(SCALES), default='full', help='sizes: full, or small for a quick '
                                                                                'check')
    add_stack_options(parser, max_minutes=45)
    parser.add_argument('--hashtype', default='sha1', help='hash type in the carts (and to check downloads)')
    parser.add_argument('--deadline', type=float, default=900, help='seconds one of our carts may take to be ready')
    parser.add_argument('--ref-deadline', type=float, default=120,
                        help='seconds 0.7.0 may stage its small-file cart before the files it staged are counted')
    parser.add_argument('--no-limits', action='store_true', help='skip the nginx limits (wrk and curl on nginx)')
    parser.add_argument('--no-install', action='store_true', help='do not apt-get install wrk or nginx when missing')
    parser.add_argument('--wait-idle', type=float, default=0, metavar='SECONDS',
                        help='first wait up to this long for the 1-minute load average to drop below 0.5')
    args = parser.parse_args(argv)
    args.chosen = chosen_workloads(parser, args.workloads, WORKLOADS)
    check_stack_options(parser, args)
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark; everything started is stopped and removed on the way out."""
    args = parse_args(argv)
    return bounded_run(args, 'cartd-edge-', lambda base, cleanup: Edge(args, base, cleanup).run(args.chosen))


if __name__ == '__main__':
    sys.exit(main())
