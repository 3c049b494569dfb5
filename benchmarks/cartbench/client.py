"""The benchmark's HTTP client: create carts, wait for them, and download them checking every byte."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import requests

from .data import ArchiveFile, fileids

READ_SIZE = 1 << 20
POLL_MIN_S = 0.05
POLL_MAX_S = 1.0
POLL_SHARE = 50  # poll every 1/50 of the time waited so far: ~2% resolution, little load on a slow server


class BenchError(RuntimeError):
    """A workload could not be measured (a cart failed, a check failed, a deadline passed)."""


class Deadline(BenchError):
    """A cart was not ready in time."""


def post_cart(base_url: str, uid: str, files: Sequence[ArchiveFile], hashtype: str,
              session: Optional[requests.Session] = None, timeout: float = 120, resets: int = 0) -> int:
    """POST /<uid> with the files; insist on 201.

    A connection the server resets before answering (a full listen queue) is tried again up to
    `resets` times; returns how many times that happened.
    """
    body = json.dumps({'fileids': fileids(files, hashtype)})
    poster = session or requests
    for attempt in range(resets + 1):
        try:
            answer = poster.post(f'{base_url}/{uid}', data=body, headers={'Content-Type': 'application/json'},
                                 timeout=timeout)
        except requests.ConnectionError as exc:
            if attempt < resets and 'reset' in str(exc).lower():
                time.sleep(0.1)
                continue
            raise BenchError(f'POST {uid} failed: {type(exc).__name__}: {exc}') from exc
        except requests.RequestException as exc:
            raise BenchError(f'POST {uid} failed: {type(exc).__name__}: {exc}') from exc
        if answer.status_code != 201:
            raise BenchError(f'POST {uid} answered {answer.status_code}: {answer.text[:300]}')
        return attempt
    raise AssertionError('unreachable')


def cart_state(session: requests.Session, base_url: str, uid: str) -> str:
    """HEAD /<uid>: the X-Pacifica-Status ('staging', 'ready'); raise on an error."""
    try:
        answer = session.head(f'{base_url}/{uid}', timeout=30)
    except requests.RequestException as exc:
        raise BenchError(f'HEAD {uid} failed: {type(exc).__name__}: {exc}') from exc
    status = answer.headers.get('X-Pacifica-Status', '')
    if answer.status_code >= 400 or status == 'error':
        raise BenchError(f'HEAD {uid} answered {answer.status_code} {status}: '
                         f'{answer.headers.get("X-Pacifica-Message", "")[:300]}')
    return status


def wait_ready(base_url: str, uids: Sequence[str], deadline_s: float) -> Dict[str, float]:
    """Poll every cart until ready; return uid -> monotonic time it was first seen ready.

    The pause between polls grows with the time waited (from 50 ms up to 1 s, the
    pacifica-downloader's interval), so the polling costs a slow server as little as a fast one.
    """
    pending = list(uids)
    ready_at: Dict[str, float] = {}
    began = time.monotonic()
    deadline = began + deadline_s
    with requests.Session() as session:
        while pending:
            for uid in list(pending):
                if cart_state(session, base_url, uid) == 'ready':
                    ready_at[uid] = time.monotonic()
                    pending.remove(uid)
            if not pending:
                break
            if time.monotonic() > deadline:
                raise Deadline(f'{len(pending)} of {len(uids)} carts not ready after {deadline_s:g} s')
            time.sleep(min(POLL_MAX_S, max(POLL_MIN_S, (time.monotonic() - began) / POLL_SHARE)))
    return ready_at


@dataclasses.dataclass
class DownloadCheck:
    """What a download delivered and how it compared with the archive."""

    tar_bytes: int = 0
    file_bytes: int = 0
    files: int = 0
    seconds: float = 0.0
    problems: List[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every expected file arrived once, whole, with the right digest, and nothing else."""
        return not self.problems

    @property
    def mb_per_s(self) -> float:
        """Tar bytes per second, in MB (10^6)."""
        return self.tar_bytes / self.seconds / 1e6 if self.seconds else 0.0


class _Counting:
    """A file-like reader over the response body that counts what it hands out."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size if size and size > 0 else READ_SIZE)
        self.count += len(data)
        return data

    def read_exact(self, size: int) -> bytes:
        parts = []
        left = size
        while left > 0:
            data = self.read(left)
            if not data:
                break
            parts.append(data)
            left -= len(data)
        return b''.join(parts)

    def drain(self) -> None:
        while self.read(READ_SIZE):
            pass


def _pax_records(data: bytes) -> Dict[str, str]:
    """Parse a pax extended header body: 'LEN key=value\\n' records."""
    records: Dict[str, str] = {}
    position = 0
    while position < len(data):
        space = data.index(b' ', position)
        length = int(data[position:space])
        key, _, value = data[space + 1:position + length - 1].partition(b'=')
        records[key.decode('utf-8')] = value.decode('utf-8', 'surrogateescape')
        position += length
    return records


def _member_name(name: str) -> str:
    """Strip the tar's top directory (the file name the client asked for)."""
    return name.split('/', 1)[1] if '/' in name else ''


class _Checker:
    """Compares the members of a tar with the files that were put into the archive."""

    def __init__(self, wanted: Mapping[str, ArchiveFile], hashtype: str, result: DownloadCheck) -> None:
        self.wanted = wanted
        self.hashtype = hashtype
        self.result = result
        self.seen: Dict[str, bool] = {}

    def member(self, name: str, size: int, digest: str) -> None:
        path = _member_name(name)
        self.result.files += 1
        self.result.file_bytes += size
        item = self.wanted.get(path)
        if item is None:
            self._problem(f'unexpected member {name!r}')
        elif path in self.seen:
            self._problem(f'member {name!r} twice')
        elif size != item.size or digest != item.digest:
            self._problem(f'member {name!r}: {size} bytes {digest[:12]}, expected {item.size} {item.digest[:12]}')
        self.seen[path] = True

    def finish(self) -> None:
        missing = [path for path in self.wanted if path not in self.seen]
        if missing:
            self._problem(f'{len(missing)} files missing from the tar, e.g. {missing[0]!r}')

    def _problem(self, text: str) -> None:
        if len(self.result.problems) < 10:
            self.result.problems.append(text)


def _check_stream(body: _Counting, checker: _Checker) -> None:
    """Walk a tar stream block by block: headers parsed by tarfile, member data hashed as it arrives."""
    long_name: Optional[str] = None
    pax: Dict[str, str] = {}
    while True:
        header = body.read_exact(tarfile.BLOCKSIZE)
        if len(header) < tarfile.BLOCKSIZE:
            checker._problem('the tar ends without its end-of-archive blocks')
            return
        if header.count(0) == tarfile.BLOCKSIZE:
            body.drain()  # end of archive (the rest is zero padding)
            return
        info = tarfile.TarInfo.frombuf(header, 'utf-8', 'surrogateescape')
        size = int(pax.get('size', info.size))
        padding = (-size) % tarfile.BLOCKSIZE
        if info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.SOLARIS_XHDTYPE):
            data = body.read_exact(size + padding)[:size]
            if info.type == tarfile.GNUTYPE_LONGNAME:
                long_name = data.rstrip(b'\0').decode('utf-8', 'surrogateescape')
            elif info.type != tarfile.XGLTYPE:
                pax = _pax_records(data)
            continue
        name = pax.get('path', long_name or info.name)
        long_name, pax = None, {}
        if info.type in tarfile.REGULAR_TYPES:
            digest = hashlib.new(checker.hashtype)
            left = size
            while left > 0:
                data = body.read(min(left, READ_SIZE))
                if not data:
                    checker._problem(f'the tar ends inside {name!r}')
                    return
                digest.update(data)
                left -= len(data)
            body.read_exact(padding)
            checker.member(name, size, digest.hexdigest())
        elif size:
            body.read_exact(size + padding)


def _check_with_tarfile(body: _Counting, checker: _Checker) -> None:
    """The same check through tarfile's own stream reader (mode 'r|'); slower, for cross-checking."""
    with tarfile.open(fileobj=body, mode='r|') as archive:  # type: ignore[call-overload]
        for member in archive:
            if not member.isfile():
                continue
            extracted = archive.extractfile(member)
            assert extracted is not None
            digest = hashlib.new(checker.hashtype)
            while True:
                data = extracted.read(READ_SIZE)
                if not data:
                    break
                digest.update(data)
            checker.member(member.name, member.size, digest.hexdigest())
    body.drain()


def check_tar(data: bytes, wanted: Mapping[str, ArchiveFile], hashtype: str) -> DownloadCheck:
    """Check a whole tar held in memory (e.g. put together from Range requests) like a streamed download."""
    result = DownloadCheck()
    checker = _Checker(wanted, hashtype, result)
    body = _Counting(io.BytesIO(data))
    try:
        _check_stream(body, checker)
    except (ValueError, tarfile.TarError) as exc:
        checker._problem(f'not a tar: {type(exc).__name__}: {exc}')
    result.tar_bytes = body.count
    checker.finish()
    return result


def download_and_check(base_url: str, uid: str, wanted: Mapping[str, ArchiveFile], hashtype: str,
                       reader: str = 'stream', timeout: float = 120,
                       session: Optional[requests.Session] = None) -> DownloadCheck:
    """GET /<uid>?filename=bench.tar, stream it, hash every member and compare with the archive's files.

    Nothing is kept in memory but the current block. `seconds` runs from the GET to the last byte.
    """
    result = DownloadCheck()
    checker = _Checker(wanted, hashtype, result)
    start = time.monotonic()
    getter = session or requests
    try:
        with getter.get(f'{base_url}/{uid}', params={'filename': 'bench.tar'}, stream=True,
                        timeout=timeout) as answer:
            if answer.status_code != 200:
                raise BenchError(f'GET {uid} answered {answer.status_code}: {answer.content[:200]!r}')
            body = _Counting(answer.raw)
            if reader == 'tarfile':
                _check_with_tarfile(body, checker)
            else:
                _check_stream(body, checker)
            result.tar_bytes = body.count
    except (requests.RequestException, OSError) as exc:
        raise BenchError(f'GET {uid} failed: {type(exc).__name__}: {exc}') from exc
    except Exception as exc:  # urllib3 errors from the raw stream
        if type(exc).__module__.startswith('urllib3'):
            raise BenchError(f'GET {uid} failed: {type(exc).__name__}: {exc}') from exc
        raise
    result.seconds = time.monotonic() - start
    checker.finish()
    declared = answer.headers.get('Content-Length')
    if declared is not None and int(declared) != result.tar_bytes:
        checker._problem(f'Content-Length {declared} but {result.tar_bytes} bytes came')
    return result


def download_unchecked(base_url: str, uid: str, timeout: float = 600) -> float:
    """GET the cart's tar again and throw the bytes away: the server's rate without the client's hashing (MB/s)."""
    start = time.monotonic()
    total = 0
    try:
        with requests.get(f'{base_url}/{uid}', params={'filename': 'bench.tar'}, stream=True,
                          timeout=timeout) as answer:
            if answer.status_code != 200:
                raise BenchError(f'GET {uid} answered {answer.status_code}')
            while True:
                chunk = answer.raw.read(1 << 20)
                if not chunk:
                    break
                total += len(chunk)
    except (requests.RequestException, OSError) as exc:
        raise BenchError(f'GET {uid} failed: {type(exc).__name__}: {exc}') from exc
    seconds = time.monotonic() - start
    return total / seconds / 1e6 if seconds else 0.0


def delete_cart(base_url: str, uid: str) -> None:
    """DELETE /<uid> (best effort: a failure is reported, not raised)."""
    try:
        requests.delete(f'{base_url}/{uid}', timeout=120)
    except requests.RequestException as exc:
        print(f'# DELETE {uid} failed: {exc}')
