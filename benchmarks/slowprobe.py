#!/usr/bin/env python3
"""The slow-client probe: does a HEAD on a fresh connection still answer quickly while many clients are slow?

One stack (the real archive interface, SQLite, one celery worker on RabbitMQ) and one ready cart
big enough that no slow reader finishes it. Then, for each server configuration given, in turn:

* `--trickles` connections that send a request a byte a second (a request line and headers that
  do not end within the probe, so none of them ever becomes a request);
* `--downloads` GETs of the cart whose clients read `--read-rate` bytes a second (receive buffer
  set to 64 KiB, so the client's kernel does not soak the tar up);
* meanwhile, every `--interval` seconds for `--seconds`, a HEAD of the cart on a fresh connection,
  timed from connect() to the end of the answer's headers; 204 with `X-Pacifica-Status: ready` is
  an answer, anything else (a refused or reset connection, a timeout, another status) a failure;
* the server's resident memory (its process tree: VmRSS sum and Pss sum) and thread count, before
  the slow clients come and at their peak.

Every loop is bounded in count and time, all traffic goes to 127.0.0.1, every socket is closed at the
end and every process this starts is stopped by its PID. `--curl` also times `curl -o /dev/null` of a
1 GiB cart under each configuration (MB/s, 10^6 bytes).

    .venv/bin/python benchmarks/slowprobe.py --cheroot today --uwsgi readme='--http-socket {bind} --master
        --module pacifica.cartd.wsgi --need-app --die-on-term'

A configuration is LABEL=ARGS. `--cheroot LABEL=key:value,...` runs `pacifica-cartd --cpconfig` on a
copy of the repository's server.conf with those [global] settings changed (LABEL alone: as it is);
`--uwsgi LABEL=ARGS` runs uWSGI with ARGS, where `{bind}` is 127.0.0.1:PORT and `{repo}` the
repository; CARTD_UWSGI_BIND is also set to 127.0.0.1:PORT (what the shipped uwsgi.ini reads).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Dict, List, Optional

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / 'benchmarks'))

from cartbench.rss import RssSampler, tree  # noqa: E402  (the benchmarks' own package, beside this file)
from cartd_testkit.archive import ArchiveServer  # noqa: E402
from cartd_testkit.databases import drop_database, fresh_database  # noqa: E402
from cartd_testkit.procs import ManagedProcess, free_port  # noqa: E402
from cartd_testkit.slowclients import HOST, SlowSide, head_probe  # noqa: E402
from cartd_testkit.stack import CartStack, binary  # noqa: E402

UWSGI_STARTED = 'slowprobe: uwsgi master loop started'
BIND_VARIABLE = 'CARTD_UWSGI_BIND'


# ---- memory ---------------------------------------------------------------------------

def _status_field(pid: int, name: str) -> int:
    try:
        with open(f'/proc/{pid}/status', encoding='ascii', errors='replace') as status:
            for line in status:
                if line.startswith(name + ':'):
                    return int(line.split()[1])
    except OSError:
        return 0
    return 0


def _pss_kib(pid: int) -> int:
    try:
        with open(f'/proc/{pid}/smaps_rollup', encoding='ascii', errors='replace') as rollup:
            for line in rollup:
                if line.startswith('Pss:'):
                    return int(line.split()[1])
    except OSError:
        return 0
    return 0


def memory(root: int) -> Dict[str, float]:
    """The process tree's VmRSS and Pss sums (MiB), its largest VmRSS, its processes and threads."""
    pids = tree(root)
    rss = [_status_field(pid, 'VmRSS') for pid in pids]
    return {'rss_mib': round(sum(rss) / 1024, 1), 'pss_mib': round(sum(_pss_kib(pid) for pid in pids) / 1024, 1),
            'largest_rss_mib': round(max(rss, default=0) / 1024, 1), 'processes': len(pids),
            'threads': sum(_status_field(pid, 'Threads') for pid in pids)}


def load() -> str:
    """The machine's load averages."""
    return ' '.join(f'{value:.2f}' for value in os.getloadavg())


# ---- servers --------------------------------------------------------------------------

SERVER_CONF = [REPO / 'server.conf']  # --server-conf


def cpconfig_with(path: pathlib.Path, settings: Dict[str, str]) -> pathlib.Path:
    """A copy of the repository's server.conf (or --server-conf) with these [global] settings replaced or added."""
    lines = SERVER_CONF[0].read_text(encoding='utf-8').splitlines()
    out: List[str] = []
    section = ''
    pending = dict(settings)
    for line in lines:
        stripped = line.strip()
        if stripped.startswith('['):
            if section == '[global]':
                out.extend(f'{key}: {value}' for key, value in pending.items())
                pending.clear()
            section = stripped
        elif section == '[global]' and ':' in stripped and not stripped.startswith('#'):
            key = stripped.split(':', 1)[0].strip()
            if key in pending:
                out.append(f'{key}: {pending.pop(key)}')
                continue
        out.append(line)
    out.extend(f'{key}: {value}' for key, value in pending.items())
    path.write_text('\n'.join(out) + '\n', encoding='utf-8')
    return path


@dataclasses.dataclass
class ServerSpec:
    """One configuration to probe."""

    label: str
    kind: str                   # 'cheroot' | 'uwsgi'
    args: str

    def describe(self) -> str:
        """How it was started, for the report."""
        if self.kind == 'cheroot':
            return f'pacifica-cartd --cpconfig server.conf{" with " + self.args if self.args else ""}'
        return f'uwsgi {self.args}'


def start_server(spec: ServerSpec, stack: CartStack, state: pathlib.Path) -> ManagedProcess:
    """Start one configuration on a free port beside the stack; wait until it answers and is settled."""
    port = free_port()
    env = dict(stack.env)
    env[BIND_VARIABLE] = f'{HOST}:{port}'
    if spec.kind == 'cheroot':
        settings = dict(item.split(':', 1) for item in spec.args.split(',') if item) if spec.args else {}
        cpconfig = cpconfig_with(state / f'{spec.label}.conf', {k.strip(): v.strip() for k, v in settings.items()})
        env['CARTD_CPCONFIG'] = str(cpconfig)
        cmd = [binary('pacifica-cartd'), '--cpconfig', str(cpconfig), '-p', str(port), '-a', HOST]
    else:
        env['CARTD_CPCONFIG'] = str(SERVER_CONF[0])
        args = spec.args.format(bind=f'{HOST}:{port}', repo=REPO)
        cmd = [binary('uwsgi'), *shlex.split(args), '--hook-master-start', f'print:{UWSGI_STARTED}']
    proc = ManagedProcess(cmd, state / f'{spec.label}.log', env=env, cwd=state, name=spec.label).start()
    try:
        proc.wait_http(f'http://{HOST}:{port}/', 60)
        if spec.kind == 'uwsgi':
            deadline = time.monotonic() + 30
            while (proc.log_path.read_text(encoding='utf-8', errors='replace').count(UWSGI_STARTED) < 2
                   and time.monotonic() < deadline):  # the command line echoed, then the hook's print
                time.sleep(0.1)
    except BaseException:
        proc.stop()
        raise
    proc.port = port  # type: ignore[attr-defined]
    return proc


# ---- the cart ---------------------------------------------------------------------------

def make_cart(stack: CartStack, uid: str, files: int, size: int) -> None:
    """A ready cart of `files` files of `size` bytes (random, written straight into the archive)."""
    fileids = []
    block = os.urandom(1 << 20)
    for index in range(files):
        archive_id = f'{uid}-{index}'
        data = bytearray()
        while len(data) < size:
            data += block[:size - len(data)]
        data[:16] = os.urandom(16)
        sums = stack.archive.put(archive_id, bytes(data))
        fileids.append({'id': archive_id, 'path': f'f{index}.bin', 'hashtype': 'sha1', 'hashsum': sums['sha1']})
    answer = stack.post(uid, fileids)
    if answer.status_code != 201:
        raise RuntimeError(f'POST {uid}: {answer.status_code} {answer.text[:200]}')
    final = stack.wait_final(uid, deadline_s=600)
    if final.headers.get('X-Pacifica-Status') != 'ready':
        raise RuntimeError(f'cart {uid} is {final.headers}\n{stack.logs()}')


def curl_rate(port: int, uid: str, runs: int) -> List[float]:
    """MB/s (10^6 bytes) of `curl -o /dev/null` of the cart, `runs` times."""
    rates = []
    for _ in range(runs):
        out = subprocess.run(['curl', '-s', '-o', '/dev/null', '-w', '%{http_code} %{size_download} %{time_total}',
                              f'http://{HOST}:{port}/{uid}?filename=big.tar'],
                             capture_output=True, text=True, timeout=300, check=True).stdout.split()
        if out[0] != '200':
            raise RuntimeError(f'curl: {out}')
        rates.append(round(int(out[1]) / float(out[2]) / 1e6, 1))
    return rates


# ---- one configuration ----------------------------------------------------------------------

def probe(spec: ServerSpec, stack: CartStack, state: pathlib.Path, args: argparse.Namespace,
          uid: str, big_uid: Optional[str]) -> Dict[str, object]:
    """Start the configuration, measure, stop it."""
    proc = start_server(spec, stack, state)
    port = proc.port  # type: ignore[attr-defined]
    report: Dict[str, object] = {'label': spec.label, 'server': spec.describe(), 'load_before': load()}
    try:
        report['idle'] = memory(proc.pid)
        if big_uid is not None:
            report['curl_mb_s'] = curl_rate(port, big_uid, args.curl_runs)
        if args.curl_only:
            print(f"{spec.label}: curl 1 GiB {report['curl_mb_s']} MB/s; load {load()}", flush=True)
            return report
        slow = SlowSide(port, args.trickles, args.downloads, args.read_rate, f'/{uid}',
                        f'/{uid}?filename=slow.tar').start()
        try:
            deadline = time.monotonic() + args.ramp
            while time.monotonic() < deadline:
                time.sleep(0.1)
            report['open_at_start'] = dict(zip(('trickles', 'readers'), slow.connected(), strict=True))
            with RssSampler({'server': proc.pid}, interval=0.25) as sampler:
                report['heads'] = head_probe(port, f'/{uid}', args.seconds, args.interval, args.timeout)
                report['loaded'] = memory(proc.pid)
            report['peak_rss_mib'] = round(sampler.peaks['server'].peak_sum / (1 << 20), 1)
            report['open_at_end'] = dict(zip(('trickles', 'readers'), slow.connected(), strict=True))
        finally:
            counts = slow.stop()
        report['trickles'] = dataclasses.asdict(counts['trickle'])
        report['readers'] = dataclasses.asdict(counts['reader'])
        report['load_after'] = load()
        report['server_alive'] = proc.running()
    finally:
        proc.stop()
    return report


def summary(report: Dict[str, object]) -> str:
    """One line of figures."""
    heads = report['heads']
    assert isinstance(heads, dict)
    loaded, idle = report['loaded'], report['idle']
    assert isinstance(loaded, dict) and isinstance(idle, dict)
    trickles, readers = report['trickles'], report['readers']
    assert isinstance(trickles, dict) and isinstance(readers, dict)
    line = (f"{report['label']}: HEAD p50 {heads['p50_ms']} ms, p99 {heads['p99_ms']} ms, max {heads['max_ms']} ms, "
            f"{heads['answered']}/{heads['sent']} answered, failed {heads['failed']} {heads['failures'] or ''}, "
            f"refused {heads['refused']}; open at start/end {report['open_at_start']}/{report['open_at_end']}; "
            f"trickles closed {trickles['closed_by_server']} answered {trickles['answered']} refused "
            f"{trickles['refused']}; readers 200 {readers['status_200']} closed {readers['closed_by_server']} "
            f"{readers['nbytes'] / 1e6:.0f} MB; server RSS idle {idle['rss_mib']} MiB -> loaded {loaded['rss_mib']} "
            f"MiB (Pss {idle['pss_mib']} -> {loaded['pss_mib']}, peak RSS {report['peak_rss_mib']}), "
            f"{loaded['processes']} processes, {loaded['threads']} threads; load {report['load_before']} -> "
            f"{report['load_after']}")
    if 'curl_mb_s' in report:
        line += f"; curl 1 GiB {report['curl_mb_s']} MB/s"
    return line


def spec_from(kind: str, text: str) -> ServerSpec:
    """LABEL=ARGS (or LABEL alone) from the command line."""
    label, _, rest = text.partition('=')
    return ServerSpec(label.strip(), kind, ' '.join(rest.split()))


def main(argv: Optional[List[str]] = None) -> int:
    """Set up the stack and the cart once, then probe each configuration in turn."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
    parser.add_argument('--cheroot', action='append', default=[], metavar='LABEL[=key:value,...]')
    parser.add_argument('--uwsgi', action='append', default=[], metavar='LABEL=ARGS')
    parser.add_argument('--trickles', type=int, default=200)
    parser.add_argument('--downloads', type=int, default=100)
    parser.add_argument('--read-rate', type=int, default=64 << 10)
    parser.add_argument('--seconds', type=float, default=15.0)
    parser.add_argument('--interval', type=float, default=0.1)
    parser.add_argument('--timeout', type=float, default=5.0)
    parser.add_argument('--ramp', type=float, default=3.0, help='seconds between opening the slow side and the HEADs')
    parser.add_argument('--cart-files', type=int, default=2)
    parser.add_argument('--cart-mib', type=int, default=64)
    parser.add_argument('--curl', action='store_true', help='also time curl of a 1 GiB cart (4 x 256 MiB)')
    parser.add_argument('--curl-runs', type=int, default=3)
    parser.add_argument('--curl-only', action='store_true', help='only the curl figures (implies --curl)')
    parser.add_argument('--json', metavar='FILE', help='write the reports as JSON')
    parser.add_argument('--server-conf', type=pathlib.Path, default=SERVER_CONF[0],
                        help='the CherryPy file --cheroot configurations start from (default: the repository\'s)')
    parser.add_argument('--tmpdir', default=None)
    args = parser.parse_args(argv)
    if not (0 < args.trickles + args.downloads <= 2000 and 0 < args.seconds <= 120 and args.interval >= 0.01):
        parser.error('keep it bounded: at most 2000 slow connections, 120 s, one HEAD per 10 ms')
    SERVER_CONF[0] = args.server_conf
    specs = [spec_from('cheroot', text) for text in args.cheroot] + [spec_from('uwsgi', text) for text in args.uwsgi]
    if not specs:
        specs = [ServerSpec('cheroot', 'cheroot', '')]
    reports = []
    with tempfile.TemporaryDirectory(prefix='slowprobe-', dir=args.tmpdir) as tmp:
        base = pathlib.Path(tmp)
        with ArchiveServer(base / 'archive') as archive:
            url = fresh_database('sqlite', base)
            stack = CartStack(base / 'stack', archive, url, workers=1, concurrency=2,
                              overrides={'cartd': {'transfer_size': '4 Mb'}})
            try:
                stack.dbsync()
                stack.start_worker()
                stack.start_server()  # only to make the carts
                stack.wait_workers_ready()
                uid = f'slow-{uuid.uuid4().hex[:8]}'
                make_cart(stack, uid, args.cart_files, args.cart_mib << 20)
                big_uid = None
                if args.curl or args.curl_only:
                    big_uid = f'big-{uuid.uuid4().hex[:8]}'
                    make_cart(stack, big_uid, 4, 256 << 20)
                if stack.server is not None:
                    stack.server.stop()
                state = base / 'servers'
                state.mkdir()
                for spec in specs:
                    report = probe(spec, stack, state, args, uid, big_uid)
                    reports.append(report)
                    if not args.curl_only:
                        print(summary(report), flush=True)
            finally:
                stack.stop()
                drop_database('sqlite', url)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(reports, indent=2), encoding='utf-8')
    return 0


if __name__ == '__main__':
    sys.exit(main())
