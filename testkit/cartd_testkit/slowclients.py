"""Slow clients for tests and benchmarks: connections that send a request a byte a second, downloads read
slowly, and a HEAD on a fresh connection timed from connect() to the end of its headers.

Raw non-blocking sockets on one selector loop in a thread of their own; every count and wait is
bounded, all traffic goes to 127.0.0.1, and stop() closes every socket.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import selectors
import socket
import threading
import time
from typing import Dict, List, Optional, Tuple

HOST = '127.0.0.1'
TICK_S = 0.05               # the slow side's clock: trickle bytes and reader reads happen on ticks
CONNECT_TIMEOUT_S = 5.0     # a slow-side connect taking longer (a full backlog drops SYNs) is a failure
MAX_REOPENS = 20            # per slow connection the server closed or answered
HEAD_THREADS = 64           # HEADs in flight at once (timeout / interval = 50)
READER_RCVBUF = 64 << 10


@dataclasses.dataclass
class SlowCounts:
    """What one kind of slow connection saw."""

    opened: int = 0
    refused: int = 0
    connect_timeouts: int = 0
    closed_by_server: int = 0
    answered: int = 0           # the server sent bytes to a trickle (an error page, a timeout answer)
    reopened: int = 0
    errors: int = 0
    nbytes: int = 0             # sent (trickles) or received (readers)
    status_200: int = 0         # readers whose answer began with a 200 status line
    open_at_end: int = 0


class _Slot:
    """One slow connection (a trickle or a reader), reopened when the server closes it."""

    def __init__(self, kind: str, request: bytes, phase: float) -> None:
        self.kind = kind
        self.request = request
        self.phase = phase          # trickles: offset of this slot's byte within each second
        self.sock: Optional[socket.socket] = None
        self.state = 'idle'         # idle -> connecting -> open -> idle (closed)
        self.since = 0.0
        self.sent = 0
        self.next_send = 0.0
        self.allowance = 0.0
        self.head = b''
        self.reopens = 0
        self.reopen_at = 0.0


class SlowSide:
    """Trickles and slow readers on one selector loop in a thread of its own."""

    def __init__(self, port: int, trickles: int, readers: int, read_rate: int, head_path: str,
                 download_path: str) -> None:
        self.addr = (HOST, port)
        self.read_rate = read_rate
        self.selector = selectors.DefaultSelector()
        self.counts = {'trickle': SlowCounts(), 'reader': SlowCounts()}
        # a request that does not end within any probe: a long header, a byte a second
        trickle = (f'GET {head_path} HTTP/1.1\r\nHost: {HOST}\r\nX-Slow: ' + 'x' * 4000).encode('ascii')
        reader = f'GET {download_path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n'.encode('ascii')
        self.slots = [_Slot('trickle', trickle, index / max(trickles, 1)) for index in range(trickles)]
        self.slots += [_Slot('reader', reader, 0.0) for _ in range(readers)]
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.error: Optional[BaseException] = None

    # ---- connections ---------------------------------------------------------------

    def _open(self, slot: _Slot, now: float) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if slot.kind == 'reader':
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, READER_RCVBUF)
        sock.setblocking(False)
        code = sock.connect_ex(self.addr)
        slot.sock, slot.since, slot.sent, slot.head, slot.allowance = sock, now, 0, b'', 0.0
        if code in (0, errno.EINPROGRESS):
            slot.state = 'connecting'
            self.selector.register(sock, selectors.EVENT_WRITE, slot)
            return
        self._close(slot)
        self._failed(slot, code, now)

    def _failed(self, slot: _Slot, code: int, now: float) -> None:
        counts = self.counts[slot.kind]
        if code == errno.ECONNREFUSED:
            counts.refused += 1
        else:
            counts.errors += 1
        self._reopen_later(slot, now)

    def _reopen_later(self, slot: _Slot, now: float) -> None:
        if slot.reopens < MAX_REOPENS and not self._stop.is_set():
            slot.reopens += 1
            slot.reopen_at = now + 1.0
            self.counts[slot.kind].reopened += 1

    def _close(self, slot: _Slot) -> None:
        if slot.sock is not None:
            try:
                self.selector.unregister(slot.sock)
            except (KeyError, ValueError):
                pass
            slot.sock.close()
        slot.sock, slot.state = None, 'idle'

    def _connected(self, slot: _Slot, now: float) -> None:
        assert slot.sock is not None
        code = slot.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._close(slot)
            self._failed(slot, code, now)
            return
        slot.state = 'open'
        self.counts[slot.kind].opened += 1
        if slot.kind == 'reader':
            self.selector.unregister(slot.sock)  # read on ticks only, at the allowed rate
            slot.sock.sendall(slot.request)   # short: fits the empty send buffer
            return
        self.selector.modify(slot.sock, selectors.EVENT_READ, slot)
        slot.next_send = now + slot.phase

    # ---- the loop --------------------------------------------------------------------

    def _trickle_readable(self, slot: _Slot, now: float) -> None:
        assert slot.sock is not None
        try:
            data = slot.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b''
        counts = self.counts['trickle']
        if data:
            counts.answered += 1
        else:
            counts.closed_by_server += 1
        self._close(slot)
        self._reopen_later(slot, now)

    def _tick(self, now: float, dt: float) -> None:
        for slot in self.slots:
            if slot.state == 'idle':
                if slot.reopen_at and now >= slot.reopen_at:
                    slot.reopen_at = 0.0
                    self._open(slot, now)
                continue
            if slot.state == 'connecting':
                if now - slot.since > CONNECT_TIMEOUT_S:
                    self.counts[slot.kind].connect_timeouts += 1
                    self._close(slot)
                    self._reopen_later(slot, now)
                continue
            if slot.kind == 'trickle':
                self._trickle_send(slot, now)
            else:
                self._reader_read(slot, dt, now)

    def _trickle_send(self, slot: _Slot, now: float) -> None:
        if now < slot.next_send or slot.sent >= len(slot.request):
            return
        assert slot.sock is not None
        try:
            slot.sock.send(slot.request[slot.sent:slot.sent + 1])
        except BlockingIOError:
            return
        except OSError:
            self.counts['trickle'].closed_by_server += 1
            self._close(slot)
            self._reopen_later(slot, now)
            return
        slot.sent += 1
        self.counts['trickle'].nbytes += 1
        slot.next_send += 1.0

    def _reader_read(self, slot: _Slot, dt: float, now: float) -> None:
        assert slot.sock is not None
        slot.allowance = min(slot.allowance + self.read_rate * dt, self.read_rate * 0.25)
        want = int(slot.allowance)
        if want <= 0:
            return
        try:
            data = slot.sock.recv(want)
        except BlockingIOError:
            return
        except OSError:
            data = b''
        counts = self.counts['reader']
        if not data:
            counts.closed_by_server += 1
            self._close(slot)
            self._reopen_later(slot, now)
            return
        if len(slot.head) < 16:
            slot.head += data[:16]
            if len(slot.head) >= 12 and slot.head[9:12] == b'200' and slot.head.startswith(b'HTTP/'):
                counts.status_200 += 1
                slot.head += b' ' * 16  # counted once
        slot.allowance -= len(data)
        counts.nbytes += len(data)

    def _loop(self) -> None:
        last = time.monotonic()
        try:
            for slot in self.slots:  # open everything at once, as a crowd of clients would
                self._open(slot, last)
            while not self._stop.is_set():
                for key, _ in self.selector.select(timeout=TICK_S):
                    slot = key.data
                    now = time.monotonic()
                    if slot.state == 'connecting':
                        self._connected(slot, now)
                    elif slot.state == 'open' and slot.kind == 'trickle':
                        self._trickle_readable(slot, now)
                now = time.monotonic()
                if now - last >= TICK_S:
                    self._tick(now, now - last)
                    last = now
        except BaseException as exc:  # pylint: disable=broad-except  # reported by stop()
            self.error = exc

    def start(self) -> 'SlowSide':
        """Open every slow connection and keep them slow in a thread."""
        self._thread = threading.Thread(target=self._loop, name='slow-side', daemon=True)
        self._thread.start()
        return self

    def connected(self) -> Tuple[int, int]:
        """(trickles, readers) open now."""
        return (sum(1 for slot in self.slots if slot.kind == 'trickle' and slot.state == 'open'),
                sum(1 for slot in self.slots if slot.kind == 'reader' and slot.state == 'open'))

    def stop(self) -> Dict[str, SlowCounts]:
        """Stop the loop and close every socket; the counts."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        for slot in self.slots:
            if slot.state == 'open':
                self.counts[slot.kind].open_at_end += 1
            self._close(slot)
        self.selector.close()
        if self.error is not None:
            raise RuntimeError(f'the slow side failed: {self.error!r}') from self.error
        return self.counts


# ---- the HEAD probe -------------------------------------------------------------------

def one_head(port: int, path: str, timeout: float) -> Tuple[str, float]:
    """('ok' | why it failed, seconds from connect() to the end of the headers) of one HEAD."""
    started = time.monotonic()
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.sendall(f'HEAD {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n'.encode('ascii'))
            answer = b''
            while b'\r\n\r\n' not in answer and len(answer) < 65536:
                left = timeout - (time.monotonic() - started)
                if left <= 0:
                    return 'timeout', time.monotonic() - started
                sock.settimeout(left)
                data = sock.recv(65536)
                if not data:
                    return 'closed', time.monotonic() - started
                answer += data
    except ConnectionRefusedError:
        return 'refused', time.monotonic() - started
    except socket.timeout:
        return 'timeout', time.monotonic() - started
    except OSError as exc:
        return f'error:{exc.__class__.__name__}', time.monotonic() - started
    elapsed = time.monotonic() - started
    head = answer.split(b'\r\n\r\n', 1)[0].decode('latin-1').lower()
    if not head.startswith('http/1.1 204') or 'x-pacifica-status: ready' not in head:
        return f'status:{head.split(chr(13), 1)[0][:40]}', elapsed
    return 'ok', elapsed


def percentile(values: List[float], share: float) -> float:
    """The nearest-rank percentile of sorted values (0 for none)."""
    if not values:
        return 0.0
    rank = max(1, min(len(values), int(round(share * len(values) + 0.5))))
    return values[rank - 1]


def head_probe(port: int, path: str, seconds: float, interval: float, timeout: float) -> Dict[str, object]:
    """A HEAD every `interval` s for `seconds` s, each in a thread of a bounded pool."""
    count = int(round(seconds / interval))
    results: List[Tuple[str, float]] = []
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=HEAD_THREADS) as pool:
        futures = []
        for index in range(count):
            delay = start + index * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(one_head, port, path, timeout))
        for future in futures:
            results.append(future.result(timeout=timeout + 30))
    latencies = sorted(seconds_ * 1000 for outcome, seconds_ in results if outcome == 'ok')
    failures: Dict[str, int] = {}
    for outcome, _ in results:
        if outcome != 'ok':
            failures[outcome] = failures.get(outcome, 0) + 1
    return {'sent': count, 'answered': len(latencies), 'failed': count - len(latencies),
            'refused': failures.get('refused', 0), 'failures': failures,
            'p50_ms': round(percentile(latencies, 0.50), 1), 'p99_ms': round(percentile(latencies, 0.99), 1),
            'max_ms': round(latencies[-1], 1) if latencies else 0.0}
