"""The slow-client probe: many connections that send their request a byte a second, many downloads read
slowly, and meanwhile a HEAD on a fresh connection at a fixed pace, timed from connect to the last header.

The slow sides run on one asyncio loop in a thread of their own (raw non-blocking sockets, no buffering
in user space: a download reads at most its share per tick); each HEAD runs in a thread of a bounded
pool so that a slow answer does not delay the next one. Every count, socket and thread is bounded, and
every socket is closed at the end.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
import socket
import threading
import time
from typing import List, Optional, Set, Tuple

from .limits import percentile

TICK_S = 0.25               # a download reads once per tick
MAX_RECONNECTS = 20         # per slow connection that the server closed
PROBE_THREADS = 64          # HEADs in flight at once (5 s timeout / 100 ms pace = 50)


@dataclasses.dataclass
class ProbeOptions:
    """What the probe does."""

    host: str
    port: int
    head_path: str              # '/<uid>' of a ready cart
    download_path: str          # '/<uid>?filename=slow.tar' of a ready cart
    trickles: int = 200         # connections that send a byte a second
    downloads: int = 100        # downloads read at `read_rate`
    read_rate: int = 64 * 1024  # bytes per second per download
    seconds: float = 15.0       # how long HEADs are sent
    interval: float = 0.1       # between HEADs
    timeout: float = 5.0        # of one HEAD, connect included
    ramp: float = 2.0           # seconds between opening the slow connections and the first HEAD
    ready_header: bool = True   # a HEAD counts as answered on 204 with X-Pacifica-Status: ready (else any 2xx)


@dataclasses.dataclass
class SlowSide:
    """Counts of the slow connections of one kind."""

    opened: int = 0             # connections made
    refused: int = 0            # connect refused
    connect_timeouts: int = 0   # connect took over 5 s (a full backlog drops SYNs)
    closed_by_server: int = 0   # the server closed (or reset) the connection
    answered: int = 0           # the server answered before the request was complete (e.g. a timeout page)
    reconnects: int = 0
    errors: int = 0             # other socket errors
    status_200: int = 0         # downloads: answers whose status line was 200
    nbytes: int = 0             # bytes sent (trickles) or received (downloads)
    open_at_end: int = 0        # still open when the probe stopped


@dataclasses.dataclass
class ProbeResult:
    """The HEADs' latencies and failures, and what the slow connections saw."""

    latencies_ms: List[float]   # HEADs answered 204 ready
    sent: int
    failed: int                 # answered otherwise, closed or reset
    timed_out: int
    refused: int
    failures: List[str]
    trickle: SlowSide
    download: SlowSide
    seconds: float              # how long HEADs were sent (count x interval)
    wall: float                 # wall time of the HEAD phase, the last answers (or timeouts) included
    client_cpu_s: float         # this process's CPU time during the HEAD phase
    max_lag_ms: float           # how late a HEAD started against its schedule

    def pct(self, share: float) -> float:
        """A latency percentile in ms (over the answered HEADs)."""
        return percentile(sorted(self.latencies_ms), share)

    @property
    def max_ms(self) -> float:
        """The slowest answered HEAD."""
        return max(self.latencies_ms, default=0.0)

    @property
    def client_cpu_pct(self) -> float:
        """The client's CPU use during the HEAD phase, in % of one core."""
        return self.client_cpu_s / self.wall * 100 if self.wall else 0.0


def _nonblocking_socket(rcvbuf: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    return sock


class _SlowLoop:
    """The trickling connections and the slow downloads, on one asyncio loop."""

    def __init__(self, options: ProbeOptions) -> None:
        self.options = options
        self.trickle = SlowSide()
        self.download = SlowSide()
        self.sockets: Set[socket.socket] = set()
        self.stop: Optional[asyncio.Event] = None
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.started = threading.Event()
        self.error: Optional[BaseException] = None
        # Longer than any run lasts at a byte a second, so the request is never complete.
        pad = 'x' * int(options.seconds + options.ramp + 120)
        self.request = (f'HEAD {options.head_path} HTTP/1.1\r\nHost: {options.host}:{options.port}\r\n'
                        f'X-Slow: {pad}\r\n\r\n').encode('ascii')

    async def _connect(self, side: SlowSide, rcvbuf: int = 0) -> Optional[socket.socket]:
        assert self.loop is not None
        sock = _nonblocking_socket(rcvbuf)
        self.sockets.add(sock)
        try:
            await asyncio.wait_for(self.loop.sock_connect(sock, (self.options.host, self.options.port)), 5.0)
        except ConnectionRefusedError:
            side.refused += 1
        except asyncio.TimeoutError:
            side.connect_timeouts += 1
        except OSError:
            side.errors += 1
        else:
            side.opened += 1
            return sock
        self._close(sock)
        return None

    def _close(self, sock: socket.socket) -> None:
        self.sockets.discard(sock)
        try:
            sock.close()
        except OSError:
            pass

    async def _pause_or_stop(self, seconds: float) -> bool:
        """Sleep; True when the probe is over."""
        assert self.stop is not None
        try:
            await asyncio.wait_for(self.stop.wait(), seconds)
        except asyncio.TimeoutError:
            return False
        return True

    async def _trickle(self) -> None:
        """Send the request a byte a second; when the server closes the connection, open another."""
        assert self.loop is not None and self.stop is not None
        for attempt in range(MAX_RECONNECTS + 1):
            if self.stop.is_set():
                return
            if attempt:
                self.trickle.reconnects += 1
            sock = await self._connect(self.trickle)
            if sock is None:
                if await self._pause_or_stop(1.0):
                    return
                continue
            try:
                for position in range(len(self.request)):
                    await self.loop.sock_sendall(sock, self.request[position:position + 1])
                    self.trickle.nbytes += 1
                    try:
                        data = await asyncio.wait_for(self.loop.sock_recv(sock, 4096), 1.0)
                    except asyncio.TimeoutError:
                        if self.stop.is_set():
                            self.trickle.open_at_end += 1
                            return
                        continue
                    if data:
                        self.trickle.answered += 1
                    else:
                        self.trickle.closed_by_server += 1
                    break
            except (ConnectionResetError, BrokenPipeError):
                self.trickle.closed_by_server += 1
            except OSError:
                self.trickle.errors += 1
            finally:
                self._close(sock)

    async def _download(self) -> None:
        """GET the tar and read it at read_rate (TICK_S apart, a tick's share at most each time)."""
        assert self.loop is not None and self.stop is not None
        share = max(1, int(self.options.read_rate * TICK_S))
        sock = await self._connect(self.download, rcvbuf=share * 2)
        if sock is None:
            return
        try:
            await self.loop.sock_sendall(sock, (f'GET {self.options.download_path} HTTP/1.1\r\n'
                                                f'Host: {self.options.host}:{self.options.port}\r\n\r\n')
                                         .encode('ascii'))
            first = True
            while not self.stop.is_set():
                try:
                    data = await asyncio.wait_for(self.loop.sock_recv(sock, share), TICK_S)
                except asyncio.TimeoutError:
                    continue
                if not data:
                    self.download.closed_by_server += 1
                    return
                if first:
                    first = False
                    if data.startswith((b'HTTP/1.1 200', b'HTTP/1.0 200')):
                        self.download.status_200 += 1
                self.download.nbytes += len(data)
                if await self._pause_or_stop(TICK_S):
                    break
            self.download.open_at_end += 1
        except (ConnectionResetError, BrokenPipeError):
            self.download.closed_by_server += 1
        except OSError:
            self.download.errors += 1
        finally:
            self._close(sock)

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stop = asyncio.Event()
        tasks = [asyncio.ensure_future(self._trickle()) for _ in range(self.options.trickles)]
        tasks += [asyncio.ensure_future(self._download()) for _ in range(self.options.downloads)]
        self.started.set()
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for sock in list(self.sockets):
                self._close(sock)

    def run(self) -> None:
        """The thread's body."""
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # pylint: disable=broad-except  (reported by the caller)
            self.error = exc
        finally:
            self.started.set()

    def finish(self) -> None:
        """Ask every coroutine to stop (they close their sockets)."""
        if self.loop is not None and self.stop is not None:
            try:
                self.loop.call_soon_threadsafe(self.stop.set)
            except RuntimeError:
                pass  # the loop has already ended


def head_once(host: str, port: int, path: str, timeout: float, ready_header: bool = True) -> Tuple[str, float, str]:
    """One HEAD on a fresh connection: ('ok'|'failed'|'timeout'|'refused', seconds to the last header, detail).

    'ok' is a 204 with X-Pacifica-Status: ready, or with `ready_header` False any 2xx.
    """
    began = time.monotonic()
    deadline = began + timeout
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(f'HEAD {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n'.encode('ascii'))
            received = b''
            while b'\r\n\r\n' not in received:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout()
                sock.settimeout(left)
                data = sock.recv(4096)
                if not data:
                    return 'failed', time.monotonic() - began, f'closed after {len(received)} bytes'
                received += data
                if len(received) > 65536:
                    return 'failed', time.monotonic() - began, 'headers over 64 KiB'
    except ConnectionRefusedError:
        return 'refused', time.monotonic() - began, 'connection refused'
    except socket.timeout:
        return 'timeout', time.monotonic() - began, f'no answer within {timeout:g} s'
    except OSError as exc:
        return 'failed', time.monotonic() - began, f'{type(exc).__name__}: {exc}'
    elapsed = time.monotonic() - began
    head = received.split(b'\r\n\r\n', 1)[0].decode('latin-1')
    status_line, _, rest = head.partition('\r\n')
    if not ready_header:
        if status_line[9:10] != '2':
            return 'failed', elapsed, f'{status_line[:60]!r}'
        return 'ok', elapsed, ''
    ready = any(line.lower().replace(' ', '') == 'x-pacifica-status:ready' for line in rest.split('\r\n'))
    if ' 204' not in status_line[:13] or not ready:
        return 'failed', elapsed, f'{status_line[:60]!r}, ready header {ready}'
    return 'ok', elapsed, ''


def probe(options: ProbeOptions) -> ProbeResult:
    """Open the slow connections, wait `ramp`, send a HEAD every `interval` for `seconds`, close everything."""
    slow = _SlowLoop(options)
    thread = threading.Thread(target=slow.run, name='slow-clients', daemon=True)
    thread.start()
    slow.started.wait(10)
    results: List[Tuple[str, float, str]] = []
    lag = 0.0
    try:
        time.sleep(options.ramp)
        count = max(1, int(options.seconds / options.interval))
        cpu_before = os.times()
        began = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(max_workers=PROBE_THREADS) as pool:
            futures = []
            for index in range(count):
                wait = began + index * options.interval - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                lag = max(lag, -wait)
                futures.append(pool.submit(head_once, options.host, options.port, options.head_path,
                                           options.timeout, options.ready_header))
            results = [future.result(options.timeout + 30) for future in futures]
        wall = time.monotonic() - began
        cpu_after = os.times()
    finally:
        slow.finish()
        thread.join(30)
    if slow.error is not None:
        raise RuntimeError(f'the slow clients failed: {type(slow.error).__name__}: {slow.error}')
    cpu = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
    failures = [f'{kind} after {seconds_taken:.1f} s: {detail}' for kind, seconds_taken, detail in results
                if kind != 'ok']
    return ProbeResult(
        latencies_ms=[seconds_taken * 1000 for kind, seconds_taken, _ in results if kind == 'ok'],
        sent=len(results), failed=sum(1 for kind, _, _ in results if kind == 'failed'),
        timed_out=sum(1 for kind, _, _ in results if kind == 'timeout'),
        refused=sum(1 for kind, _, _ in results if kind == 'refused'),
        failures=failures[:5], trickle=slow.trickle, download=slow.download, seconds=count * options.interval,
        wall=wall, client_cpu_s=cpu, max_lag_ms=lag * 1000)
