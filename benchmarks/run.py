#!/usr/bin/env python3
"""Benchmark pacifica-cartd: the real archive interface, RabbitMQ-backed workers and the server, a set of
workloads with every downloaded byte checked, the physical limits measured in the same run, and (with
--compare-0.7.0) the published pacifica-cartd 0.7.0 on the same archive.

Run it with the interpreter of the virtual environment the project is installed in, e.g.

    .venv/bin/python benchmarks/run.py --compare-0.7.0

See benchmarks/README.md for what each figure means.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import os
import pathlib
import shutil
import sys
import threading
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from cartbench import client, limits
from cartbench.harness import (ArchiveRequests, add_stack_options, bounded_run, cart_version, check_stack_options,
                               chosen_workloads, load_average, log, start_archive, start_ours, start_reference,
                               wait_idle)
from cartbench.data import KiB, MiB, ArchiveFile, DataWriter, expected, total_bytes
from cartbench.rss import CpuWatch, RssSampler, cpu_delta, cpu_snapshot, rss_bytes
from cartbench.stacks import Nginx, OurStack, ReferenceStack, find_nginx
from cartd_testkit.archive import ArchiveServer

WORKLOADS = ('small', 'many', 'large', 'concurrent', 'polling', 'memory', 'stageonce')
SHARE_SETTING = 'cartd.share_staged_files=on'  # the stageonce workload's stack of ours
# Issue 14's targets: for 40 files of 4 MiB, a cart whose files are all cached this many times faster than the
# first cart; a cart of 20,000 files already cached ready in under this many seconds.
STAGEONCE_TARGET = (5.0, (40, 4 * MiB))
STAGEONCE_MANY_TARGET_S = (5.0, 20000)


@dataclasses.dataclass(frozen=True)
class Scale:
    """Sizes of every workload."""

    small: Tuple[int, int]            # files, bytes each
    many: Tuple[int, int]
    large: Tuple[int, int]
    big: Tuple[int, int]              # the memory workload's cart
    concurrent: Tuple[int, int, int]  # carts, files per cart, bytes each
    poll_seconds: float
    floor_files: int                  # files for the archive's per-file floor
    stageonce: Tuple[int, int]        # files of each stageonce cart, bytes each


SCALES = {
    'full': Scale(small=(1000, 4 * KiB), many=(20000, KiB), large=(8, 256 * MiB), big=(16, 256 * MiB),
                  concurrent=(20, 50, 64 * KiB), poll_seconds=5, floor_files=2000, stageonce=(40, 4 * MiB)),
    'small': Scale(small=(200, 4 * KiB), many=(2000, KiB), large=(8, 16 * MiB), big=(16, 16 * MiB),
                   concurrent=(20, 10, 64 * KiB), poll_seconds=2, floor_files=500, stageonce=(16, MiB)),
}


def secs(value: float) -> str:
    """A duration for the report."""
    return f'{value:.2f} s' if value < 10 else f'{value:.1f} s'


def mb(value: float) -> str:
    """A byte count in MB (10^6)."""
    return f'{value / 1e6:,.0f} MB'


def size_text(nbytes: int) -> str:
    """1 KiB, 256 MiB, 4.0 GiB."""
    if nbytes >= 1 << 30:
        return f'{nbytes / (1 << 30):.1f} GiB'
    if nbytes >= MiB:
        return f'{nbytes // MiB} MiB'
    return f'{nbytes // KiB} KiB'


def ratio(slow: Optional[float], fast: Optional[float], more: bool = False) -> str:
    """'16.3x' (how many times faster ours is); '>' when the slow side hit its deadline."""
    if not slow or not fast:
        return '-'
    return f'{">" if more else ""}{slow / fast:.1f}x'


class Report:
    """Collects one line per workload (stdout) and the rows of the Markdown table."""

    def __init__(self) -> None:
        """Start empty."""
        self.lines: List[str] = []
        self.cpu: List[str] = []
        self.rows: List[Tuple[str, str, str, str, str, str]] = []
        self.failed = False

    def line(self, name: str, text: str) -> None:
        """Print and keep one workload's line."""
        entry = f'{name:<11} {text}'
        self.lines.append(entry)
        print(entry, flush=True)
        for note in self.cpu:
            print(note, flush=True)
        self.cpu = []

    def row(self, workload: str, figure: str, ours: str, ref: str, times: str, limit: str) -> None:
        """One row of the Markdown table."""
        self.rows.append((workload, figure, ours, ref, times, limit))

    def markdown(self, compare: bool) -> str:
        """The table for the README."""
        head = ['workload', 'figure', 'ours'] + (['0.7.0', 'ours vs 0.7.0'] if compare else []) + \
            ['limit measured in the same run']
        out = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
        for workload, figure, ours, ref, times, limit in self.rows:
            cells = [workload, figure, ours] + ([ref, times] if compare else []) + [limit]
            out.append('| ' + ' | '.join(cells) + ' |')
        return '\n'.join(out)


@dataclasses.dataclass
class Outcome:
    """What one side did in one workload."""

    ready: Optional[float] = None       # seconds from POST to ready (or all ready)
    done: Optional[float] = None        # seconds from POST to the last byte of the download
    mb_per_s: Optional[float] = None    # download rate
    staged: Optional[int] = None        # files staged when the deadline passed
    deadline: Optional[float] = None    # the deadline that passed
    error: str = ''
    check: str = ''                     # '' when every byte matched
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def usable(self) -> bool:
        """Finished and checked."""
        return not self.error and not self.check and self.deadline is None


class Bench:
    """One run: the archive, the data, our stack, optionally 0.7.0's, nginx, and the workloads."""

    def __init__(self, args: argparse.Namespace, base: pathlib.Path, cleanup: contextlib.ExitStack) -> None:
        """Remember the options; start nothing yet."""
        self.args = args
        self.base = base
        self.cleanup = cleanup
        self.scale = SCALES[args.scale]
        self.report = Report()
        self.archive: Optional[ArchiveServer] = None
        self.sides: List[Any] = []
        self.nginx: Optional[Nginx] = None
        self.sets: Dict[str, List[ArchiveFile]] = {}
        self.floor: Optional[Tuple[float, int]] = None
        self.nginx_rate: Optional[Tuple[limits.Rate, limits.Rate]] = None
        self.large_outcomes: Optional[Tuple[Outcome, Optional[Outcome]]] = None
        self.requests: Optional[ArchiveRequests] = None  # the archive's requests, counted for stageonce

    # ---- set-up ----------------------------------------------------------------------

    def check_disk(self, workloads: Sequence[str]) -> None:
        """Refuse to start without room for the archive plus the largest cart (carts are removed after use)."""
        scale = self.scale
        archive = scale.small[0] * max(scale.small[1], 4096) + scale.many[0] * 4096 + \
            scale.concurrent[0] * scale.concurrent[1] * scale.concurrent[2]
        biggest = scale.small[0] * 4096
        if 'large' in workloads or 'memory' in workloads:
            archive += scale.large[0] * scale.large[1]
            biggest = max(biggest, scale.large[0] * scale.large[1])
        if 'memory' in workloads:
            archive += (scale.big[0] - scale.large[0]) * scale.big[1]
            biggest = max(biggest, scale.big[0] * scale.big[1])
        if 'stageonce' in workloads:
            count, size = scale.stageonce
            archive += (count + count - count // 2) * size
            # the cache's bytes stay on the volume after its carts are deleted (a hard link each)
            biggest = max(biggest, (count + count - count // 2) * size + scale.many[0] * 4096)
        need = archive + int(biggest * 1.1) + (1 << 30)
        free = shutil.disk_usage(self.base).free
        log(f'disk: {free / (1 << 30):.1f} GiB free under {self.base}, about {need / (1 << 30):.1f} GiB needed')
        if free < need:
            raise SystemExit(f'not enough disk space under {self.base}: {free / (1 << 30):.1f} GiB free, '
                             f'{need / (1 << 30):.1f} GiB needed (use --scale small or --tmpdir)')

    def start_archive(self, workloads: Sequence[str]) -> ArchiveServer:
        """The real archive interface, gunicorn with 4 sync workers (with an access log for stageonce's counts)."""
        access_log = self.base / 'archive-access.log' if 'stageonce' in workloads else None
        self.archive = start_archive(self.base, self.args.archive_workers, self.cleanup, access_log=access_log)
        if access_log is not None:
            self.requests = ArchiveRequests(access_log)
        return self.archive

    def make_data(self, workloads: Sequence[str]) -> None:
        """Write the files of the chosen workloads into the archive."""
        assert self.archive is not None
        writer = DataWriter(self.archive.root, self.args.hashtype)
        scale = self.scale
        started = time.monotonic()
        if 'small' in workloads:
            self.sets['small'] = writer.small_files('s', *scale.small)
        whole_many = 'many' in workloads or 'stageonce' in workloads  # stageonce asks for the same files again
        if whole_many or not self.args.no_limits:
            count = scale.many[0] if whole_many else scale.floor_files
            self.sets['many'] = writer.small_files('m', count, scale.many[1])
        if 'large' in workloads or 'memory' in workloads:
            self.sets['large'] = writer.large_files('L', *scale.large)
        if 'memory' in workloads:
            more = writer.large_files('L', scale.big[0] - scale.large[0], scale.big[1], start=scale.large[0])
            self.sets['big'] = self.sets['large'] + more
        if 'concurrent' in workloads:
            carts, per_cart, size = scale.concurrent
            files = writer.small_files('c', carts * per_cart, size)
            self.sets['concurrent'] = files
        if 'polling' in workloads:
            self.sets['polling'] = writer.small_files('p', 10, 4 * KiB)
        if 'stageonce' in workloads:
            count, size = scale.stageonce
            self.sets['stageonce'] = writer.small_files('o', count, size)
            self.sets['stageonce-new'] = writer.small_files('n', count - count // 2, size)
        total = sum(total_bytes(files) for name, files in self.sets.items() if name != 'big')
        total += total_bytes(self.sets.get('big', [])[scale.large[0]:])
        log(f'wrote {total / 1e6:,.0f} MB into the archive in {time.monotonic() - started:.1f} s')

    def start_ours(self) -> OurStack:
        """Our cart: CartStack with the chosen database and worker layout."""
        assert self.archive is not None
        return start_ours(self.args, self.base / 'ours', self.archive, self.cleanup)

    def start_reference(self) -> ReferenceStack:
        """The published 0.7.0 from its own venv, on MariaDB and its own vhost."""
        assert self.archive is not None
        return start_reference(self.args, self.base / 'ref', self.archive, self.cleanup)

    def start_nginx(self) -> Optional[Nginx]:
        """nginx over the archive directory, for the download limit."""
        assert self.archive is not None
        binary = find_nginx(install=not self.args.no_install)
        if binary is None:
            log('nginx not found: the download limit is skipped')
            return None
        server = Nginx(binary, self.archive.root, self.base / 'nginx')
        self.cleanup.callback(server.stop)
        server.start()
        self.nginx = server
        return server

    # ---- helpers ---------------------------------------------------------------------

    def uid(self, workload: str, side: Any) -> str:
        """A fresh cart uid."""
        return f'bench-{workload}-{"ours" if side.label == "ours" else "ref"}-{uuid.uuid4().hex[:8]}'

    def cpu_roots(self, side: Any) -> Dict[str, int]:
        """The process trees whose CPU time is split out: archive, server, workers."""
        assert self.archive is not None and self.archive.process is not None
        return {'archive': self.archive.process.pid, **side.pids()}

    def cpu_note(self, side: Any, workload: str, phase: str, used: Dict[str, float], files: int) -> None:
        """Print where the CPU went in one phase (a '#' line under the figures)."""
        order = ('worker', 'server', 'archive', 'client')
        text = ', '.join(f'{label} {used.get(label, 0.0):.1f} s' for label in order)
        per_file = ''
        if files > 1:
            per_file = ' = per file ' + ', '.join(f'{label} {used.get(label, 0.0) / files * 1000:.2f} ms'
                                                   for label in order)
        self.report.cpu.append(f'#   {side.label} {workload} {phase} CPU: {text}{per_file}')

    def settle(self) -> None:
        """Let memory freed by the previous cart go back to its resting state before a write-heavy cart.

        Some virtual machines hand freed memory back to their host within seconds and pay
        dearly to touch it again; without this pause whichever cart runs second would find
        warm memory left by the first.
        """
        if self.args.settle:
            time.sleep(self.args.settle)

    def deadline(self, side: Any) -> float:
        """How long a side's cart may take."""
        return self.args.deadline if side.label == 'ours' else self.args.ref_deadline

    def one_cart(self, workload: str, side: Any, files: Sequence[ArchiveFile],
                 sampler_roots: Optional[Dict[str, int]] = None, settle: bool = False,
                 unchecked_rate: bool = False) -> Outcome:
        """POST one cart, wait for ready, download it checking every byte, free the volume.

        With `unchecked_rate` the tar is downloaded once more without hashing (extra['raw_mb_per_s']).
        """
        outcome = Outcome()
        if settle:
            self.settle()
        uid = self.uid(workload, side)
        sampler = RssSampler(sampler_roots or {}) if sampler_roots else None
        try:
            with sampler or contextlib.nullcontext():
                roots = self.cpu_roots(side)
                cpu_start = cpu_snapshot(roots)
                start = time.monotonic()
                client.post_cart(side.url, uid, files, self.args.hashtype)
                try:
                    ready_at = client.wait_ready(side.url, [uid], self.deadline(side))
                except client.Deadline:
                    outcome.deadline = self.deadline(side)
                    outcome.staged = side.staged_count(uid)
                    log(f'{side.label} {workload}: not ready after {outcome.deadline:g} s '
                        f'({outcome.staged} of {len(files)} files staged)')
                    if isinstance(side, ReferenceStack):
                        side.reset()
                    return outcome
                outcome.ready = ready_at[uid] - start
                cpu_ready = cpu_snapshot(roots)
                checked = client.download_and_check(side.url, uid, expected(files), self.args.hashtype,
                                                    reader=self.args.tar_reader, timeout=600)
                outcome.done = time.monotonic() - start
                self.cpu_note(side, workload, 'staging', cpu_delta(cpu_start, cpu_ready), len(files))
                self.cpu_note(side, workload, 'download', cpu_delta(cpu_ready, cpu_snapshot(roots)), 0)
                outcome.mb_per_s = checked.mb_per_s
                outcome.extra['download_s'] = checked.seconds
                outcome.extra['tar_bytes'] = checked.tar_bytes
                if not checked.ok:
                    outcome.check = '; '.join(checked.problems[:3])
                if unchecked_rate:
                    outcome.extra['raw_mb_per_s'] = client.download_unchecked(side.url, uid)
        except client.BenchError as exc:
            outcome.error = str(exc)
        finally:
            side.after_workload([uid])
        if sampler is not None:
            outcome.extra['rss'] = sampler
        self.note(side, workload, outcome)
        return outcome

    def note(self, side: Any, workload: str, outcome: Outcome) -> None:
        """Log a side's result and remember failures."""
        if outcome.error or outcome.check:
            self.report.failed = True
            log(f'{side.label} {workload} FAILED: {outcome.error or "CHECK " + outcome.check}')
            log(side.logs())
        else:
            log(f'{side.label} {workload}: ready {outcome.ready}, done {outcome.done}')

    def each_side(self, run: Callable[[Any], Outcome]) -> Tuple[Outcome, Optional[Outcome]]:
        """Run a workload on our cart, then on 0.7.0 if compared."""
        ours = run(self.sides[0])
        ref = run(self.sides[1]) if len(self.sides) > 1 else None
        return ours, ref

    @staticmethod
    def describe(outcome: Optional[Outcome], text: Callable[[Outcome], str], total_files: int = 0) -> str:
        """An outcome in words: the figures, or why there are none."""
        if outcome is None:
            return ''
        if outcome.error:
            return f'FAILED ({outcome.error[:120]})'
        if outcome.check:
            return f'CHECK FAILED ({outcome.check[:120]})'
        if outcome.deadline is not None:
            staged = '' if outcome.staged is None else f', {outcome.staged:,} of {total_files:,} files staged'
            return f'not ready after {outcome.deadline:g} s{staged}'
        return text(outcome)

    def emit(self, name: str, ours: Outcome, ref: Optional[Outcome], ours_text: Callable[[Outcome], str],
             times: str, limit: str, total_files: int = 0) -> None:
        """Print the workload's line."""
        parts = ['ours ' + self.describe(ours, ours_text, total_files)]
        if ref is not None:
            parts.append('0.7.0 ' + self.describe(ref, ours_text, total_files))
            parts.append(f'ratio {times}')
        if limit:
            parts.append(limit)
        self.report.line(name, ' | '.join(parts))

    # ---- the workloads ---------------------------------------------------------------

    def floor_fetch(self, files: Sequence[ArchiveFile], threads: int, head: bool = True) -> float:
        """HEAD+GET+hash of these files straight from the archive."""
        assert self.archive is not None
        return limits.fetch_files(self.archive.url, files, threads, self.args.hashtype, head=head)

    def w_small(self) -> None:
        """1,000 files of 4 KiB: POST to ready, and to the last byte."""
        files = self.sets['small']
        floor = None if self.args.no_limits else self.floor_fetch(files, self.args.floor_threads)
        ours, ref = self.each_side(lambda side: self.one_cart('small', side, files))
        both = ref is not None and ours.usable and ref.usable
        times = (f'{ratio(ref.ready, ours.ready)} / {ratio(ref.done, ours.done)}' if both and ref else '-')
        limit = '' if floor is None else \
            f'floor {secs(floor)} (HEAD+GET+{self.args.hashtype} of the files, {self.args.floor_threads} threads)'
        self.emit('small', ours, ref, lambda o: f'{secs(o.ready or 0)} ready / {secs(o.done or 0)} download',
                  times, limit, len(files))
        label = f'{len(files):,} x {size_text(files[0].size)}'
        self.row('small', f'{label}: POST to ready', ours, ref, lambda o: secs(o.ready or 0),
                 'ready', '' if floor is None else f'{secs(floor)} (HEAD+GET+hash)')
        self.row('small', f'{label}: POST to last byte', ours, ref, lambda o: secs(o.done or 0), 'done', '')

    def per_file_floor(self) -> Optional[Tuple[float, int]]:
        """The archive's per-file floor, HEAD+GET with sessions, best of 4 and 8 threads: (s per file, threads)."""
        if self.floor is not None or 'many' not in self.sets:
            return self.floor
        files = self.sets['many'][:self.scale.floor_files]
        best: Optional[Tuple[float, int]] = None
        for threads in (4, 8):
            seconds = self.floor_fetch(files, threads)
            per_file = seconds / len(files)
            log(f'archive per-file floor, {threads} threads: {per_file * 1000:.2f} ms/file')
            if best is None or per_file < best[0]:
                best = (per_file, threads)
        self.floor = best
        return best

    def w_many(self) -> None:
        """20,000 files of 1 KiB."""
        files = self.sets['many']
        floor = None if self.args.no_limits else self.per_file_floor()
        ours, ref = self.each_side(lambda side: self.one_cart('many', side, files))
        more = ref is not None and ref.deadline is not None
        times = '-'
        if ref is not None and ours.usable and ref.usable:
            times = f'{ratio(ref.ready, ours.ready)} / {ratio(ref.done, ours.done)}'
        elif ref is not None and more and ours.usable:
            times = ratio(ref.deadline, ours.ready, more=True)
        limit = '' if floor is None else \
            f'floor {secs(floor[0] * len(files))} ({floor[0] * 1000:.2f} ms/file x {len(files):,}, HEAD+GET)'
        self.emit('many', ours, ref, lambda o: f'{secs(o.ready or 0)} ready / {secs(o.done or 0)} download',
                  times, limit, len(files))
        label = f'{len(files):,} x {size_text(files[0].size)}'
        self.row('many', f'{label}: POST to ready', ours, ref, lambda o: secs(o.ready or 0), 'ready',
                 '' if floor is None else f'{secs(floor[0] * len(files))} (HEAD+GET per file)', len(files))
        self.row('many', f'{label}: POST to last byte', ours, ref, lambda o: secs(o.done or 0), 'done', '',
                 len(files))

    def w_large(self) -> None:
        """8 files of 256 MiB: POST to ready and the download rate; RSS sampled throughout."""
        files = self.sets['large']
        floor = None if self.args.no_limits else self.floor_fetch(files, len(files))
        rate = rate_hashed = None
        if self.nginx is not None and not self.args.no_limits:
            rate = limits.sequential_download(self.nginx.url, files)
            rate_hashed = limits.sequential_download(self.nginx.url, files, self.args.hashtype)
            self.nginx_rate = (rate, rate_hashed)
        write = durable = None
        if not self.args.no_limits:
            self.settle()
            write = limits.page_cache_write(self.base / 'scratch', len(files), files[0].size)
            self.settle()
            durable = limits.page_cache_write(self.base / 'scratch', len(files), files[0].size, durable=True)
        ours, ref = self.each_side(lambda side: self.one_cart('large', side, files, sampler_roots=side.pids(),
                                                              settle=True, unchecked_rate=True))
        self.large_outcomes = (ours, ref)
        times = '-'
        if ref is not None and ours.usable and ref.usable:
            times = f'{ratio(ref.ready, ours.ready)} / {ratio(ours.mb_per_s, ref.mb_per_s)}'
        limit_parts = []
        if floor is not None:
            limit_parts.append(f'floor {secs(floor)} stage ({len(files)} parallel GETs+{self.args.hashtype})')
        if write is not None and durable is not None:
            limit_parts.append(f'writing the bytes to the page cache {secs(write.seconds)} '
                               f'({write.cpu_seconds:.1f} CPU-s), and to the disk (fdatasync) '
                               f'{secs(durable.seconds)}')
        if rate is not None and rate_hashed is not None:
            limit_parts.append(f'nginx sendfile {rate.mb_per_s:,.0f} MB/s ({rate_hashed.mb_per_s:,.0f} MB/s '
                               f'with {self.args.hashtype} on the client)')
        self.emit('large', ours, ref, lambda o: f'{secs(o.ready or 0)} ready, {o.mb_per_s or 0:,.0f} MB/s download '
                  f'({o.extra.get("raw_mb_per_s", 0):,.0f} MB/s not hashing)',
                  times, ', '.join(limit_parts), len(files))
        label = f'{len(files)} x {size_text(files[0].size)}'
        self.row('large', f'{label}: POST to ready', ours, ref, lambda o: secs(o.ready or 0), 'ready',
                 '' if floor is None else f'{secs(floor)} (parallel GETs + hash)'
                 + ('' if write is None or durable is None else
                    f'; writing the bytes {secs(write.seconds)}, {write.cpu_seconds:.1f} CPU-s; '
                    f'with fdatasync {secs(durable.seconds)}'))
        self.row('large', f'{label}: download', ours, ref, lambda o: f'{o.mb_per_s or 0:,.0f} MB/s', 'rate',
                 '' if rate_hashed is None else f'{rate_hashed.mb_per_s:,.0f} MB/s nginx sendfile, same hashing client')
        self.row('large', f'{label}: download, client not hashing', ours, ref,
                 lambda o: f'{o.extra.get("raw_mb_per_s", 0):,.0f} MB/s', 'raw_rate',
                 '' if rate is None else f'{rate.mb_per_s:,.0f} MB/s nginx sendfile, same client')

    def w_concurrent(self) -> None:
        """20 carts of 50 files of 64 KiB posted at once: time until all are ready."""
        files = self.sets['concurrent']
        carts, per_cart, _ = self.scale.concurrent
        groups = [files[index * per_cart:(index + 1) * per_cart] for index in range(carts)]
        floor = None if self.args.no_limits else self.floor_fetch(files, self.args.floor_threads)

        def run(side: Any) -> Outcome:
            outcome = Outcome()
            uids = [self.uid('concurrent', side) for _ in groups]
            barrier = threading.Barrier(carts + 1)

            def post(index: int) -> int:
                barrier.wait()
                return client.post_cart(side.url, uids[index], groups[index], self.args.hashtype, resets=2)

            try:
                roots = self.cpu_roots(side)
                cpu_start = cpu_snapshot(roots)
                with concurrent.futures.ThreadPoolExecutor(max_workers=carts) as pool:
                    futures = [pool.submit(post, index) for index in range(carts)]
                    start = time.monotonic()
                    barrier.wait()
                    outcome.extra['resets'] = sum(future.result() for future in futures)
                try:
                    ready_at = client.wait_ready(side.url, uids, self.deadline(side))
                except client.Deadline:
                    outcome.deadline = self.deadline(side)
                    outcome.staged = sum(side.staged_count(uid) or 0 for uid in uids) \
                        if isinstance(side, ReferenceStack) else None
                    if isinstance(side, ReferenceStack):
                        side.reset()
                    return outcome
                outcome.ready = max(ready_at.values()) - start
                outcome.extra['first'] = min(ready_at.values()) - start
                self.cpu_note(side, 'concurrent', 'staging', cpu_delta(cpu_start, cpu_snapshot(roots)), len(files))
                problems = []
                for uid, group in zip(uids, groups, strict=True):
                    checked = client.download_and_check(side.url, uid, expected(group), self.args.hashtype,
                                                        reader=self.args.tar_reader)
                    problems.extend(checked.problems)
                outcome.check = '; '.join(problems[:3])
            except client.BenchError as exc:
                outcome.error = str(exc)
            finally:
                side.after_workload(uids)
            self.note(side, 'concurrent', outcome)
            return outcome

        ours, ref = self.each_side(run)
        times = ratio(ref.ready, ours.ready) if ref is not None and ours.usable and ref.usable else '-'
        if ref is not None and ref.deadline is not None and ours.usable:
            times = ratio(ref.deadline, ours.ready, more=True)
        limit = '' if floor is None else \
            f'floor {secs(floor)} (HEAD+GET+{self.args.hashtype} of all {len(files):,} files, ' \
            f'{self.args.floor_threads} threads)'
        self.emit('concurrent', ours, ref,
                  lambda o: f'{secs(o.ready or 0)} all {carts} ready (first {secs(o.extra.get("first", 0))}'
                            + (f'; {o.extra["resets"]} POSTs reset by the server and sent again'
                               if o.extra.get('resets') else '') + ')',
                  times, limit, len(files))
        self.row('concurrent', f'{carts} carts x {per_cart} x {size_text(files[0].size)} at once: all ready',
                 ours, ref, lambda o: secs(o.ready or 0), 'ready',
                 '' if floor is None else f'{secs(floor)} (HEAD+GET+hash)', len(files))

    def w_polling(self) -> None:
        """HEAD on a ready cart from 16 threads."""
        files = self.sets['polling']
        threads, seconds = self.args.poll_threads, self.args.poll_seconds or self.scale.poll_seconds
        ceiling = None
        if self.nginx is not None and not self.args.no_limits:
            ceiling = limits.head_rate(self.nginx.url + files[0].archive_id, threads, seconds)

        def run(side: Any) -> Outcome:
            outcome = Outcome()
            uid = self.uid('polling', side)
            try:
                client.post_cart(side.url, uid, files, self.args.hashtype)
                client.wait_ready(side.url, [uid], self.deadline(side))
                roots = self.cpu_roots(side)
                cpu_start = cpu_snapshot(roots)
                measured = limits.head_rate(f'{side.url}/{uid}', threads, seconds, want_status='ready')
                used = cpu_delta(cpu_start, cpu_snapshot(roots))
                self.cpu_note(side, 'polling', 'HEADs', used, 0)
                outcome.extra['server_cpu_per_head_ms'] = used.get('server', 0.0) / max(measured.requests, 1) * 1000
                outcome.extra['rate'] = measured
                if measured.errors:
                    outcome.error = f'{measured.errors} HEAD answers were not 204 ready'
            except client.BenchError as exc:
                outcome.error = str(exc)
            finally:
                side.after_workload([uid])
            self.note(side, 'polling', outcome)
            return outcome

        ours, ref = self.each_side(run)

        def text(outcome: Outcome) -> str:
            rate = outcome.extra['rate']
            return f'{rate.per_s:,.0f} HEAD/s, p50 {rate.p50_ms:.1f} ms, p99 {rate.p99_ms:.1f} ms'

        times = '-'
        if ref is not None and ours.usable and ref.usable:
            times = ratio(ours.extra['rate'].per_s, ref.extra['rate'].per_s)
        limit = '' if ceiling is None else \
            f'client limit {ceiling.per_s:,.0f} HEAD/s, p50 {ceiling.p50_ms:.1f} ms (the same client on nginx)'
        self.emit('polling', ours, ref, text, times, limit)
        self.row('polling', f'HEAD on a ready cart, {threads} threads', ours, ref,
                 lambda o: f'{o.extra["rate"].per_s:,.0f}/s (p50 {o.extra["rate"].p50_ms:.1f} ms)', 'rate',
                 '' if ceiling is None else f'{ceiling.per_s:,.0f}/s (same client, nginx)')

    def w_memory(self) -> None:
        """Peak RSS during `large`, and the server's RSS growth while a 4 GiB cart downloads."""
        files = self.sets['big']
        large = self.large_outcomes

        def run(side: Any) -> Outcome:
            outcome = Outcome()
            uid = self.uid('memory', side)
            self.settle()
            try:
                start = time.monotonic()
                client.post_cart(side.url, uid, files, self.args.hashtype)
                ready_at = client.wait_ready(side.url, [uid], max(self.deadline(side), 600))
                outcome.ready = ready_at[uid] - start
                assert side.server is not None
                before = rss_bytes(side.server.pid) or 0
                roots = self.cpu_roots(side)
                cpu_ready = cpu_snapshot(roots)
                with RssSampler({'server': side.server.pid}) as sampler:
                    checked = client.download_and_check(side.url, uid, expected(files), self.args.hashtype,
                                                        reader=self.args.tar_reader, timeout=600)
                self.cpu_note(side, 'memory', 'download', cpu_delta(cpu_ready, cpu_snapshot(roots)), 0)
                peaks = sampler.peaks['server']
                outcome.mb_per_s = checked.mb_per_s
                outcome.extra.update(before=before, peak=peaks.peak_sum, after=peaks.last_root,
                                     bytes=checked.tar_bytes)
                if not checked.ok:
                    outcome.check = '; '.join(checked.problems[:3])
            except client.BenchError as exc:
                outcome.error = str(exc)
            finally:
                side.after_workload([uid])
            self.note(side, 'memory', outcome)
            return outcome

        ours, ref = self.each_side(run)
        during = {'ours': large[0] if large else None, '0.7.0': large[1] if large else None}

        def text_for(label: str) -> Callable[[Outcome], str]:
            def text(outcome: Outcome) -> str:
                parts = []
                large_outcome = during[label]
                if large_outcome is not None and 'rss' in large_outcome.extra:
                    sampler = large_outcome.extra['rss']
                    workers = tuple(name for name in sampler.peaks if name.startswith('worker'))
                    per_process, total = sampler.summary(workers)
                    parts.append(f'during large: server {mb(sampler.peaks["server"].peak_sum)}, '
                                 f'workers {mb(per_process)} per process / {mb(total)} all')
                growth = outcome.extra['peak'] - outcome.extra['before']
                parts.append(f'{size_text(outcome.extra["bytes"])} cart: ready {secs(outcome.ready or 0)}, '
                             f'{outcome.mb_per_s or 0:,.0f} MB/s, server {mb(outcome.extra["before"])} -> peak '
                             f'{mb(outcome.extra["peak"])} ({growth / 1e6:+,.0f} MB)')
                return '; '.join(parts)
            return text

        line = ['ours ' + self.describe(ours, text_for('ours'))]
        if ref is not None:
            line.append('0.7.0 ' + self.describe(ref, text_for('0.7.0')))
        self.report.line('memory', ' | '.join(line))

        def rss_cell(label: str, which: str) -> Callable[[Outcome], str]:
            def cell(outcome: Outcome) -> str:
                large_outcome = during[label]
                if large_outcome is None or 'rss' not in large_outcome.extra:
                    return '-'
                sampler = large_outcome.extra['rss']
                workers = tuple(name for name in sampler.peaks if name.startswith('worker'))
                per_process, total = sampler.summary(workers)
                if which == 'server':
                    return mb(sampler.peaks['server'].peak_sum)
                return f'{mb(per_process)} per process, {mb(total)} all'
            return cell

        for which, figure in (('server', 'peak RSS of the server during large'),
                              ('workers', 'peak RSS of the workers during large')):
            self.rows_two('memory', figure, ours, ref, rss_cell('ours', which), rss_cell('0.7.0', which))
        self.row('memory', f'{size_text(total_bytes(files))} cart: server RSS growth during the download', ours, ref,
                 lambda o: f'{(o.extra["peak"] - o.extra["before"]) / 1e6:+,.0f} MB '
                           f'({mb(o.extra["before"])} -> {mb(o.extra["peak"])})', '', '')
        self.row('memory', f'{size_text(total_bytes(files))} cart: POST to ready / download', ours, ref,
                 lambda o: f'{secs(o.ready or 0)} / {o.mb_per_s or 0:,.0f} MB/s', '', '')

    def start_sharing(self) -> OurStack:
        """A second stack of ours for stageonce: the same settings plus share_staged_files, a fresh database and
        volume (so its cache starts empty and the other workloads keep measuring the default)."""
        assert self.archive is not None
        args = argparse.Namespace(**vars(self.args))
        args.set = [*self.args.set, SHARE_SETTING]
        return start_ours(args, self.base / 'ours-stageonce', self.archive, self.cleanup)

    def counted_cart(self, workload: str, side: Any, files: Sequence[ArchiveFile]) -> Outcome:
        """one_cart, with the archive's requests during it (POST to DELETE) in extra['archive']."""
        if self.requests is not None:
            self.requests.mark()
        outcome = self.one_cart(workload, side, files)
        if self.requests is not None:
            outcome.extra['archive'] = self.requests.since_mark()
        return outcome

    @staticmethod
    def archive_text(outcome: Outcome) -> str:
        """'archive 40 GET, 40 HEAD': the archive's requests during a cart, when they were counted."""
        counts = outcome.extra.get('archive')
        if counts is None:
            return ''
        order = ['GET', 'HEAD', 'POST'] + sorted(set(counts) - {'GET', 'HEAD', 'POST', 'error'}) + ['error']
        shown = [f'{counts[method]:,} {method}' for method in order if counts.get(method)]
        return f'archive {", ".join(shown) or "no requests"}'

    def stageonce_phase(self, title: str, ours: Outcome, ref: Optional[Outcome], files: int, note: str = '',
                        ref_absent: str = '') -> None:
        """One phase's line (ours, 0.7.0, the ratio, a note) and its table row."""
        def text(outcome: Outcome) -> str:
            counted = self.archive_text(outcome)
            return f'{secs(outcome.ready or 0)} ready / {secs(outcome.done or 0)} download' + \
                (f' ({counted})' if counted else '')

        def cell(outcome: Outcome) -> str:
            counted = self.archive_text(outcome)
            return f'{secs(outcome.ready or 0)} / {secs(outcome.done or 0)}' + (f' ({counted})' if counted else '')

        times = '-'
        if ref is not None and ours.usable and ref.usable:
            times = f'{ratio(ref.ready, ours.ready)} / {ratio(ref.done, ours.done)}'
        elif ref is not None and ref.deadline is not None and ours.usable:
            times = ratio(ref.deadline, ours.ready, more=True)
        parts = [f'{title}: ours ' + self.describe(ours, text, files)]
        if ref is not None:
            parts += ['0.7.0 ' + self.describe(ref, text, files), f'ratio {times}']
        elif ref_absent:
            parts.append(f'0.7.0 {ref_absent}')
        if note:
            parts.append(note)
        self.report.line('stageonce', ' | '.join(parts))
        self.report.row('stageonce', f'{title}: POST to ready / last byte', self.describe(ours, cell, files),
                        self.describe(ref, cell, files) if ref is not None else ref_absent,
                        times if times == '-' else times + ' faster', note)

    def w_stageonce(self) -> None:
        """Stage once (issue 14): a first cart, the same files again, half of them again; and the many files again.

        Ours runs on its own stack with share_staged_files on; 0.7.0 (no cache) stages every cart anew.
        """
        count, size = self.scale.stageonce
        first = self.sets['stageonce']
        new = self.sets['stageonce-new']
        half = first[:count // 2] + new
        many = self.sets['many']
        ref_side = self.sides[1] if len(self.sides) > 1 else None
        label = f'{count} x {size_text(size)}'
        sharing = self.start_sharing()
        try:
            outcomes: Dict[str, Outcome] = {}
            for phase, files, title in (('first', first, f'{label}, first cart'),
                                        ('again', first, f'{label}, the same files again'),
                                        ('half', half, f'{label}, {count // 2} of them again + {len(new)} new')):
                ours = self.counted_cart(f'stageonce-{phase}', sharing, files)
                ref = self.counted_cart(f'stageonce-{phase}', ref_side, files) if ref_side is not None else None
                outcomes[phase] = ours
                note = ''
                if phase == 'again' and ours.usable and outcomes['first'].usable:
                    times, (files_at, size_at) = STAGEONCE_TARGET
                    note = (f'ours vs its first cart {ratio(outcomes["first"].ready, ours.ready)} ready, '
                            f'{ratio(outcomes["first"].done, ours.done)} to the last byte (target {times:g}x '
                            f'ready at {files_at} x {size_text(size_at)}')
                    if (count, size) == (files_at, size_at):
                        held = (outcomes['first'].ready or 0) >= times * (ours.ready or 0)
                        note += ': held' if held else ': not held'
                    note += ')'
                self.stageonce_phase(title, ours, ref, len(files), note)
            many_label = f'{len(many):,} x {size_text(many[0].size)}'
            ours = self.counted_cart('stageonce-many-first', sharing, many)
            self.stageonce_phase(f'{many_label}, first cart (fills the cache)', ours, None, len(many),
                                 ref_absent='not run (without a cache its cart is the next one)'
                                 if ref_side is not None else '')
            ours = self.counted_cart('stageonce-many-again', sharing, many)
            ref = self.counted_cart('stageonce-many-again', ref_side, many) if ref_side is not None else None
            limit_s, files_at = STAGEONCE_MANY_TARGET_S
            note = f'target ready under {limit_s:g} s at {files_at:,} files'
            if ours.usable and len(many) == files_at:
                note += ': held' if (ours.ready or 0) < limit_s else ': not held'
            self.stageonce_phase(f'{many_label}, the same files again', ours, ref, len(many), note)
        finally:
            sharing.stop()

    # ---- the table -------------------------------------------------------------------

    def row(self, workload: str, figure: str, ours: Outcome, ref: Optional[Outcome], cell: Callable[[Outcome], str],
            kind: str, limit: str, total_files: int = 0) -> None:
        """Add a table row; `kind` says how to compare (ready/done: times, rate: rates, '': no ratio)."""
        ours_cell = self.describe(ours, cell, total_files)
        ref_cell = self.describe(ref, cell, total_files) if ref is not None else ''
        times = '-'
        if ref is not None and ours.usable:
            if ref.usable and kind in ('ready', 'done'):
                times = ratio(getattr(ref, kind), getattr(ours, kind)) + ' faster'
            elif ref.usable and kind == 'rate' and 'rate' in ours.extra:
                times = ratio(ours.extra['rate'].per_s, ref.extra['rate'].per_s) + ' more'
            elif ref.usable and kind == 'rate':
                times = ratio(ours.mb_per_s, ref.mb_per_s) + ' faster'
            elif ref.usable and kind == 'raw_rate' and ours.extra.get('raw_mb_per_s') and ref.extra.get('raw_mb_per_s'):
                times = ratio(ours.extra['raw_mb_per_s'], ref.extra['raw_mb_per_s']) + ' faster'
            elif ref.deadline is not None and kind in ('ready', 'done'):
                times = ratio(ref.deadline, getattr(ours, kind), more=True) + ' faster'
        self.report.row(workload, figure, ours_cell, ref_cell, times, limit)

    def rows_two(self, workload: str, figure: str, ours: Outcome, ref: Optional[Outcome],
                 ours_cell: Callable[[Outcome], str], ref_cell: Callable[[Outcome], str]) -> None:
        """A row whose cells come from different functions per side."""
        self.report.row(workload, figure, self.describe(ours, ours_cell),
                        self.describe(ref, ref_cell) if ref is not None else '', '-', '')

    def w_limits(self) -> None:
        """The limits that belong to no single workload."""
        parts = []
        floor = self.per_file_floor()
        if floor is not None:
            parts.append(f'archive per-file floor {floor[0] * 1000:.2f} ms/file (HEAD+GET, sessions, '
                         f'best of 4/8 threads: {floor[1]})')
            self.report.row('limits', 'archive per-file floor (HEAD+GET, keep-alive, 4-8 threads)',
                            f'{floor[0] * 1000:.2f} ms/file', '', '', '')
        nginx = self.nginx_rate
        if nginx is not None:
            parts.append(f'nginx sendfile one stream {nginx[0].mb_per_s:,.0f} MB/s, '
                         f'{nginx[1].mb_per_s:,.0f} MB/s with {self.args.hashtype} on the client')
        if parts:
            self.report.line('limits', ' | '.join(parts))

    # ---- the run ---------------------------------------------------------------------

    def run(self, workloads: Sequence[str]) -> int:
        """Bring everything up, run the workloads one at a time, print the figures."""
        self.check_disk(workloads)
        if self.args.wait_idle:
            wait_idle(self.args.wait_idle)
        self.start_archive(workloads)
        self.make_data(workloads)
        self.sides.append(self.start_ours())
        if self.args.compare:
            self.sides.append(self.start_reference())
        if not self.args.no_limits and ({'large', 'polling'} & set(workloads)):
            self.start_nginx()
        print(self.header(workloads), flush=True)
        foreign: List[str] = []
        for name in WORKLOADS:
            if name in workloads:
                log(f'workload {name}')
                watch = CpuWatch()
                getattr(self, f'w_{name}')()
                wall, own, other = watch.since()
                share = other / wall / (os.cpu_count() or 1) * 100 if wall else 0.0
                foreign.append(f'{name} {share:.0f}%')
                log(f'{name}: {wall:.1f} s; this run used {own:.1f} CPU-s, other processes {other:.1f} CPU-s '
                    f'({share:.0f}% of the machine)')
        print('# CPU used outside this run (other processes, the database and broker servers) per workload: '
              + ', '.join(foreign), flush=True)
        if not self.args.no_limits:
            self.w_limits()
        if self.args.markdown:
            print()
            print(self.report.markdown(self.args.compare))
        return 1 if self.report.failed else 0

    def header(self, workloads: Sequence[str]) -> str:
        """What ran where."""
        settings = ''.join(', ' + item for item in self.args.set + self.args.cpconfig_set)
        sharing = ''
        if 'stageonce' in workloads:
            sharing = (f'; stageonce on a second stack of ours, the same plus {SHARE_SETTING} (the other workloads: '
                       f'{"as set above" if "share_staged_files" in settings else "the default, on"}), and '
                       f'the archive\'s access log on to count its requests')
        return (f'# pacifica-cartd {cart_version()} ({self.args.database}, {self.args.workers} worker(s) x '
                f'concurrency {self.args.concurrency}{settings})'
                f'{" vs 0.7.0 (MariaDB)" if self.args.compare else ""}; archive interface 0.4.2 under gunicorn '
                f'x{self.args.archive_workers}; scale {self.args.scale}; hash {self.args.hashtype}; '
                f'{os.cpu_count()} CPUs, load {load_average()}; workloads {",".join(workloads)}{sharing}')


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--compare-0.7.0', dest='compare', action='store_true',
                        help='also run every workload on the published pacifica-cartd 0.7.0 and print the ratio')
    parser.add_argument('--workloads', default=','.join(WORKLOADS),
                        help=f'comma-separated subset of {",".join(WORKLOADS)} (memory also runs large)')
    parser.add_argument('--scale', choices=sorted(SCALES), default='full', help='sizes: full or a quick small run')
    add_stack_options(parser, max_minutes=60)
    parser.add_argument('--hashtype', default='sha1', help='hash type in the carts (and to check downloads)')
    parser.add_argument('--deadline', type=float, default=600, help='seconds our cart may take to be ready')
    parser.add_argument('--ref-deadline', type=float, default=120, help='seconds 0.7.0 may take to be ready')
    parser.add_argument('--poll-threads', type=int, default=16, help='client threads of the polling workload')
    parser.add_argument('--poll-seconds', type=float, default=0, help='length of the polling workload')
    parser.add_argument('--floor-threads', type=int, default=8, help='threads of the plain-GET floors')
    parser.add_argument('--tar-reader', choices=('stream', 'tarfile'), default='stream',
                        help="how downloads are checked: a block-by-block reader, or tarfile mode 'r|' (slower)")
    parser.add_argument('--no-limits', action='store_true', help='skip the physical limits')
    parser.add_argument('--no-install', action='store_true', help='do not apt-get install nginx when missing')
    parser.add_argument('--markdown', action='store_true', help='also print a Markdown table')
    parser.add_argument('--settle', type=float, default=10, metavar='SECONDS',
                        help='pause before each write-heavy cart (large, memory) so freed memory settles')
    parser.add_argument('--wait-idle', type=float, default=0, metavar='SECONDS',
                        help='first wait up to this long for the 1-minute load average to drop below 0.5')
    args = parser.parse_args(argv)
    args.chosen = chosen_workloads(parser, args.workloads, WORKLOADS,
                                   needs={'memory': 'large'})  # memory's peaks are taken during large
    check_stack_options(parser, args)
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark; everything started is stopped and removed on the way out."""
    args = parse_args(argv)
    return bounded_run(args, 'cartd-bench-', lambda base, cleanup: Bench(args, base, cleanup).run(args.chosen))


if __name__ == '__main__':
    sys.exit(main())
