"""Clients written in C for cross-checking the Python figures: wrk for request rates, curl for downloads;
and what the kernel says about a listening socket (its backlog)."""
from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import resource
import shutil
import subprocess
import time
from typing import Dict, List, Optional

from .client import BenchError

HEAD_SCRIPT = 'wrk.method = "HEAD"\n'


def apt_binary(name: str, package: str, install: bool) -> Optional[str]:
    """The path of `name` (PATH, then /usr/sbin and /usr/bin); with `install`, apt-get install `package`
    first when it is missing and we are root. None when it is not there."""
    def found() -> Optional[str]:
        return shutil.which(name) or next((path for path in (f'/usr/sbin/{name}', f'/usr/bin/{name}')
                                           if os.path.exists(path)), None)
    path = found()
    if path or not install or os.geteuid() != 0 or not shutil.which('apt-get'):
        return path
    print(f'# {name} is missing: apt-get install -y {package}', flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND='noninteractive')
    # a failed `apt-get update` (one unreachable list) need not stop the install
    subprocess.run(['apt-get', 'update'], env=env, capture_output=True, timeout=600, check=False)
    subprocess.run(['apt-get', 'install', '-y', package], env=env, capture_output=True, timeout=600, check=False)
    return found()


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclasses.dataclass
class WrkResult:
    """What wrk printed: requests, rate, latency percentiles, non-2xx answers, socket errors."""

    requests: int
    seconds: float
    per_s: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: Dict[str, int]
    cpu_s: float            # CPU time wrk itself used
    output: str

    @property
    def errors(self) -> int:
        """Socket errors of every kind."""
        return sum(self.socket_errors.values())


_UNITS_MS = {'us': 0.001, 'ms': 1.0, 's': 1000.0, 'm': 60000.0}


def _duration_ms(text: str) -> float:
    match = re.fullmatch(r'([\d.]+)(us|ms|s|m)', text.strip())
    if not match:
        raise ValueError(f'not a wrk duration: {text!r}')
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def parse_wrk(output: str, cpu_s: float = 0.0) -> WrkResult:
    """Read wrk's report (run with --latency)."""
    done = re.search(r'^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)', output, re.MULTILINE)
    rate = re.search(r'^Requests/sec:\s*([\d.]+)', output, re.MULTILINE)
    if not done or not rate:
        raise BenchError(f'wrk printed no figures:\n{output[-1500:]}')
    percentiles: Dict[str, float] = {}
    for share, value in re.findall(r'^\s*(50|99)(?:\.0+)?%\s+(\S+)', output, re.MULTILINE):
        percentiles[share] = _duration_ms(value)
    non_2xx = re.search(r'Non-2xx or 3xx responses:\s*(\d+)', output)
    errors = re.search(r'Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)', output)
    socket_errors = dict(zip(('connect', 'read', 'write', 'timeout'),
                             (int(value) for value in errors.groups()), strict=True)) if errors else {}
    return WrkResult(requests=int(done.group(1)), seconds=_duration_ms(done.group(2) + done.group(3)) / 1000,
                     per_s=float(rate.group(1)), p50_ms=percentiles.get('50', 0.0),
                     p99_ms=percentiles.get('99', 0.0), non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
                     socket_errors=socket_errors, cpu_s=cpu_s, output=output)


def wrk_head(wrk: str, url: str, script_dir: pathlib.Path, threads: int = 2, connections: int = 16,
             seconds: float = 10) -> WrkResult:
    """`wrk -tT -cC -dDs --latency -s head.lua URL` with a script that makes every request a HEAD."""
    script = script_dir / 'head.lua'
    script.write_text(HEAD_SCRIPT, encoding='utf-8')
    cmd = [wrk, f'-t{threads}', f'-c{connections}', f'-d{max(1, round(seconds))}s', '--latency', '-s', str(script),
           url]
    before = _children_cpu()
    try:
        ran = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f'wrk did not finish within {seconds + 60:g} s') from exc
    if ran.returncode != 0:
        raise BenchError(f'wrk exited with {ran.returncode}: {ran.stderr[-500:]}{ran.stdout[-500:]}')
    return parse_wrk(ran.stdout, _children_cpu() - before)


@dataclasses.dataclass
class CurlResult:
    """One curl download to /dev/null."""

    status: int
    first_byte_s: float     # time_starttransfer
    total_s: float          # time_total
    nbytes: int             # size_download
    cpu_s: float            # CPU time curl used

    @property
    def mb_per_s(self) -> float:
        """Bytes over the whole transfer time, in MB (10^6) per second."""
        return self.nbytes / self.total_s / 1e6 if self.total_s else 0.0


def curl_download(url: str, timeout: float = 600) -> CurlResult:
    """`curl -s -o /dev/null -w '%{http_code} %{time_starttransfer} %{time_total} %{size_download}' URL`."""
    cmd = ['curl', '-s', '-o', '/dev/null', '--max-time', str(int(timeout)),
           '-w', '%{http_code} %{time_starttransfer} %{time_total} %{size_download}', url]
    before = _children_cpu()
    try:
        ran = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 30, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f'curl {url} did not finish within {timeout + 30:g} s') from exc
    fields = ran.stdout.split()
    if ran.returncode != 0 or len(fields) != 4:
        raise BenchError(f'curl {url} exited with {ran.returncode}: {ran.stdout!r} {ran.stderr[-300:]!r}')
    return CurlResult(int(fields[0]), float(fields[1]), float(fields[2]), int(float(fields[3])),
                      _children_cpu() - before)


def curl_many(urls: List[str], timeout: float = 600) -> List[CurlResult]:
    """One curl process fetching the URLs one after another on one keep-alive connection, each to /dev/null
    (no process start between them, as one long download has none); one result per URL."""
    cmd = ['curl', '-s', '--max-time', str(int(timeout)),
           '-w', '%{http_code} %{time_starttransfer} %{time_total} %{size_download}\\n']
    for url in urls:
        cmd += ['-o', '/dev/null', url]
    before = _children_cpu()
    try:
        ran = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout * len(urls) + 30, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f'curl of {len(urls)} URLs did not finish in time') from exc
    lines = [line.split() for line in ran.stdout.splitlines() if line.strip()]
    if ran.returncode != 0 or len(lines) != len(urls) or any(len(fields) != 4 for fields in lines):
        raise BenchError(f'curl of {len(urls)} URLs exited with {ran.returncode}: {ran.stdout!r} {ran.stderr[-300:]!r}')
    cpu = (_children_cpu() - before) / len(urls)
    return [CurlResult(int(fields[0]), float(fields[1]), float(fields[2]), int(float(fields[3])), cpu)
            for fields in lines]


def listen_backlog(port: int) -> Optional[int]:
    """The backlog of the socket listening on 127.0.0.1:port, as the kernel has it (`ss -ltn`'s Send-Q)."""
    if not shutil.which('ss'):
        return None
    ran = subprocess.run(['ss', '-Hltn', f'sport = :{port}'], capture_output=True, text=True, timeout=10,
                         check=False)
    for line in ran.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[0] == 'LISTEN' and fields[3].endswith(f':{port}'):
            return int(fields[2])
    return None


def wait_listening(port: int, deadline_s: float = 10) -> Optional[int]:
    """listen_backlog, waiting a little for the socket to appear."""
    deadline = time.monotonic() + deadline_s
    while True:
        found = listen_backlog(port)
        if found is not None or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def command_version(cmd: List[str]) -> str:
    """The first line a `--version` style command prints, or '?'."""
    try:
        ran = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return '?'
    text = (ran.stdout or ran.stderr).strip()
    return text.splitlines()[0] if text else '?'


def keepalive(host: str, port: int, path: str, timeout: float = 10) -> str:
    """Send two HEADs on one HTTP/1.1 connection: does the server keep it alive, and does it say when not?"""
    import socket  # pylint: disable=import-outside-toplevel
    request = f'HEAD {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n'.encode('ascii')
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(request)
            received = b''
            while b'\r\n\r\n' not in received:
                data = sock.recv(4096)
                if not data:
                    return 'closed before answering'
                received += data
            head = received.split(b'\r\n\r\n', 1)[0].decode('latin-1').lower()
            says_close = 'connection: close' in head
            try:
                sock.sendall(request)
                second = sock.recv(4096)
            except OSError:
                second = b''
            if second.startswith(b'HTTP/'):
                return 'kept alive' + (' (though it said Connection: close)' if says_close else '')
            return 'closed after each answer, ' + ('saying Connection: close' if says_close else
                                                   'WITHOUT saying Connection: close')
    except OSError as exc:
        return f'could not be checked: {type(exc).__name__}: {exc}'
