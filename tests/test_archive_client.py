"""pacifica.cartd.archive.ArchiveClient against a small HTTP server that answers as the archive interface does.

The server below (a ThreadingHTTPServer on 127.0.0.1, port 0) speaks the archive interface's
HTTP API as pacifica-archiveinterface 0.4.2 does (see REFERENCE_BEHAVIOUR.md): HEAD 204 with
X-Pacifica-Messsage (sic), X-Content-Length, Last-Modified in epoch seconds and
X-Pacifica-File-Storage-Media; POST 200 with a JSON message; GET 200 streamed in chunks;
a missing file is a 500 JSON error page whose traceback names the cause (a HEAD answer has no
body). A test can queue faults per (method, id): 404, 500 (an HPSS archive that is busy), a
hang, a body cut short or a body that stalls. The server records every request line's path and
counts the connections it accepts. Every wait is bounded.

How a missing file is told from a busy archive is tested against the real archive interface
(the session's `archive`) and cartd_testkit.fakes.BusyArchive (the real one cannot be busy).
"""
from __future__ import annotations

import dataclasses
import hashlib
import http.server
import json
import math
import os
import pathlib
import socket
import threading
import time
from typing import Callable, Dict, Iterator, List, Optional, Set, Tuple
from urllib.parse import unquote, urlsplit

import pytest

from pacifica.cartd.archive import ArchiveClient, ArchiveStatus, Download
from pacifica.cartd.errors import ArchiveError, ArchiveFileMissing, ArchiveShortRead, HashMismatch

from cartd_testkit.archive import ArchiveServer
from cartd_testkit.fakes import GENERIC_500, HPSS_BUSY, BusyArchive, archive_error_page

MTIME = 1500000000.5
HANG_S = 10.0          # the longest any handler waits (teardown releases a hang at once)
CLIENT_TIMEOUT_S = 0.5
HANDLER_TIMEOUT_S = 10  # an idle keep-alive connection is dropped by the server after this
NO_SUCH_FILE = "Can't open posix file with error: [Errno 2] No such file or directory"  # as 0.4.2 says it


@dataclasses.dataclass
class Stub:
    """What the archive holds and how it misbehaves, shared by the handler threads."""

    files: Dict[str, bytes] = dataclasses.field(default_factory=dict)
    media: Dict[str, str] = dataclasses.field(default_factory=dict)
    bare: Set[str] = dataclasses.field(default_factory=set)  # ids whose HEAD carries no headers at all
    get_mtime: bool = True  # the real archive's GET sends no Last-Modified; this one can
    faults: Dict[Tuple[str, str], List[str]] = dataclasses.field(default_factory=dict)
    requests: List[Tuple[str, str]] = dataclasses.field(default_factory=list)
    connections: int = 0
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    release: threading.Event = dataclasses.field(default_factory=threading.Event)

    def fault(self, method: str, archive_id: str, *kinds: str) -> None:
        """Answer the next len(kinds) `method` requests for `archive_id` with these faults, in order."""
        self.faults.setdefault((method, archive_id), []).extend(kinds)

    def take_fault(self, method: str, archive_id: str) -> Optional[str]:
        with self.lock:
            queued = self.faults.get((method, archive_id))
            return queued.pop(0) if queued else None

    def count(self, method: str, path: str) -> int:
        """How many `method` requests for the URL path `path` arrived."""
        return sum(1 for seen in self.requests if seen == (method, path))


class ArchiveHandler(http.server.BaseHTTPRequestHandler):
    """HEAD, POST and GET as the archive interface answers them, or a queued fault."""

    protocol_version = 'HTTP/1.1'
    timeout = HANDLER_TIMEOUT_S
    server: 'ArchiveServerStub'

    def log_message(self, format: str, *args: object) -> None:  # pylint: disable=redefined-builtin
        """Keep the test output quiet."""

    @property
    def stub(self) -> Stub:
        return self.server.stub

    def _archive_id(self) -> str:
        return unquote(urlsplit(self.path).path)[1:]

    def _begin(self, method: str) -> Tuple[str, Optional[str]]:
        archive_id = self._archive_id()
        with self.stub.lock:
            self.stub.requests.append((method, self.path))
        return archive_id, self.stub.take_fault(method, archive_id)

    def _json(self, status: int, document: Dict[str, str], body: bool = True) -> None:
        payload = json.dumps(document).encode()
        self.send_response(status)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def _error_page(self, cause: str, body: bool = True) -> None:
        self._json(500, archive_error_page(cause), body)

    def _missing(self, archive_id: str, body: bool = True) -> None:
        self._error_page(f"{NO_SUCH_FILE}: '/srv/archive/{archive_id}'", body)

    def _common_fault(self, fault: Optional[str], body: bool) -> bool:
        """Answer a fault every verb knows; tell whether one was answered."""
        if fault == '404':
            self._json(404, {'status': '404 Not Found', 'message': 'Not Found', 'traceback': '',
                             'version': '18.10.0'}, body)
        elif fault == '500':
            self._error_page(HPSS_BUSY, body)
        elif fault == 'hang':
            self.stub.release.wait(HANG_S)
            self.close_connection = True
        else:
            return False
        return True

    def do_HEAD(self) -> None:  # pylint: disable=invalid-name
        archive_id, fault = self._begin('HEAD')
        if self._common_fault(fault, body=False):
            return
        if archive_id not in self.stub.files:
            self._missing(archive_id, body=False)
            return
        self.send_response(204)
        if archive_id not in self.stub.bare:
            data = self.stub.files[archive_id]
            self.send_header('X-Pacifica-Messsage', 'File was found')
            self.send_header('X-Pacifica-File', f'/srv/archive/{archive_id}')
            self.send_header('X-Content-Length', str(len(data)))
            self.send_header('Last-Modified', str(MTIME))
            self.send_header('X-Pacifica-Ctime', str(MTIME - 10))
            self.send_header('X-Pacifica-Bytes-Per-Level', f'({len(data)},)')
            self.send_header('X-Pacifica-File-Storage-Media', self.stub.media.get(archive_id, 'disk'))
            self.send_header('Content-Type', 'application/json')
        self.end_headers()

    def do_POST(self) -> None:  # pylint: disable=invalid-name
        archive_id, fault = self._begin('POST')
        length = int(self.headers.get('Content-Length') or 0)
        if length:
            self.rfile.read(length)
        if self._common_fault(fault, body=True):
            return
        if archive_id not in self.stub.files:
            self._missing(archive_id)
            return
        self._json(200, {'message': 'File was staged', 'file': archive_id})

    def do_GET(self) -> None:  # pylint: disable=invalid-name
        archive_id, fault = self._begin('GET')
        if self._common_fault(fault, body=True):
            return
        if archive_id not in self.stub.files:
            self._missing(archive_id)
            return
        data = self.stub.files[archive_id]
        self.send_response(200)
        self.send_header('Content-Type', 'application/octet-stream')
        if self.stub.get_mtime:
            self.send_header('Last-Modified', str(MTIME))
        if fault in ('short', 'stall'):
            # announce every byte, send some, then close (short) or go quiet (stall)
            self.send_header('Content-Length', str(len(data)))
            self.end_headers()
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            if fault == 'stall':
                self.stub.release.wait(HANG_S)
            self.close_connection = True
            return
        # the archive streams its blocks without a Content-Length: chunked, on a keep-alive connection
        self.send_header('Transfer-Encoding', 'chunked')
        self.end_headers()
        for start in range(0, len(data), 4096):
            piece = data[start:start + 4096]
            self.wfile.write(b'%x\r\n%s\r\n' % (len(piece), piece))
        self.wfile.write(b'0\r\n\r\n')


class ArchiveServerStub(http.server.ThreadingHTTPServer):
    """Counts the connections it accepts; daemon handler threads, so a stuck one cannot hold the run."""

    daemon_threads = True

    def __init__(self, stub: Stub) -> None:
        super().__init__(('127.0.0.1', 0), ArchiveHandler)
        self.stub = stub

    def process_request(self, request: socket.socket, client_address: Tuple[str, int]) -> None:  # type: ignore[override]
        with self.stub.lock:
            self.stub.connections += 1
        super().process_request(request, client_address)


@dataclasses.dataclass
class Running:
    """The stub and where it listens."""

    state: Stub
    url: str

    def client(self, timeout: float = 5.0, transfer_size: int = 64 * 1024, retries: int = 0,
               retry_wait: float = 0.0, sleep: Optional[Callable[[float], None]] = None) -> ArchiveClient:
        """An ArchiveClient of this archive; it must not sleep unless a `sleep` is given."""
        return ArchiveClient(self.url, timeout, transfer_size, retries, retry_wait,
                             sleep=sleep or _no_sleep)


def _no_sleep(seconds: float) -> None:
    raise AssertionError(f'the client slept {seconds} s without retries configured')


@pytest.fixture
def stub_archive() -> Iterator[Running]:
    """The stub archive, served from a thread for one test."""
    stub = Stub()
    server = ArchiveServerStub(stub)
    thread = threading.Thread(target=server.serve_forever, kwargs={'poll_interval': 0.05}, daemon=True)
    thread.start()
    try:
        yield Running(stub, f'http://127.0.0.1:{server.server_address[1]}/')
    finally:
        stub.release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A URL of a port that is bound but not listening: every connection is refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(('127.0.0.1', 0))
    try:
        yield f'http://127.0.0.1:{sock.getsockname()[1]}/'
    finally:
        sock.close()


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


# ---- status -----------------------------------------------------------------------------

@pytest.mark.parametrize('media', ['disk', 'tape', 'error'])
def test_status_reads_the_archive_headers(stub_archive: Running, media: str) -> None:
    stub_archive.state.files['f'] = b'x' * 18
    stub_archive.state.media['f'] = media
    status = stub_archive.client().status('f')
    assert status == ArchiveStatus(media=media, size=18, mtime=MTIME, message='File was found')
    assert status.on_disk is (media == 'disk')
    assert stub_archive.state.requests == [('HEAD', '/f')]


def test_status_without_headers_has_unknown_media_and_size(stub_archive: Running) -> None:
    stub_archive.state.files['bare'] = b'no headers'
    stub_archive.state.bare.add('bare')
    status = stub_archive.client().status('bare')
    assert status == ArchiveStatus(media='', size=None, mtime=None, message='')
    assert status.on_disk  # the download decides


# ---- stage ------------------------------------------------------------------------------

def test_stage_posts_to_the_file(stub_archive: Running) -> None:
    stub_archive.state.files['cold'] = b'on tape'
    stub_archive.client().stage('cold')
    assert stub_archive.state.requests == [('POST', '/cold')]


# ---- download ---------------------------------------------------------------------------

def test_download_writes_the_bytes_and_returns_size_and_mtime(stub_archive: Running, tmp_path: pathlib.Path) -> None:
    data = os.urandom(300_000)
    stub_archive.state.files['big'] = data
    target = tmp_path / 'partial'
    target.write_bytes(b'left over from an earlier attempt' * 20_000)  # longer than data: must be emptied
    calls: List[None] = []
    transfer = 64 * 1024
    result = stub_archive.client(transfer_size=transfer).download(
        'big', target, 'sha1', _sha1(data).upper(), len(data), progress=lambda: calls.append(None))
    assert result == Download(size=len(data), mtime=MTIME)
    assert target.read_bytes() == data
    assert len(calls) >= math.ceil(len(data) / transfer)
    assert stub_archive.state.requests == [('GET', '/big')]


def test_download_without_last_modified_or_size(stub_archive: Running, tmp_path: pathlib.Path) -> None:
    data = b'as the real archive sends it'
    stub_archive.state.files['plain'] = data
    stub_archive.state.get_mtime = False
    target = tmp_path / 'partial'
    result = stub_archive.client().download('plain', target, 'md5', hashlib.md5(data).hexdigest(), None)
    assert result == Download(size=28, mtime=None)
    assert target.read_bytes() == data


def test_download_of_other_bytes_is_a_hash_mismatch(stub_archive: Running, tmp_path: pathlib.Path) -> None:
    stub_archive.state.files['f'] = b'actual bytes'
    with pytest.raises(HashMismatch):
        stub_archive.client().download('f', tmp_path / 'partial', 'sha1', _sha1(b'other bytes'), 12)


def test_download_cut_before_its_content_length_is_a_short_read(stub_archive: Running, tmp_path: pathlib.Path) -> None:
    data = os.urandom(50_000)
    stub_archive.state.files['cut'] = data
    stub_archive.state.fault('GET', 'cut', 'short')
    with pytest.raises(ArchiveShortRead):
        stub_archive.client().download('cut', tmp_path / 'partial', 'sha1', _sha1(data), None)


def test_download_shorter_than_announced_by_head_is_a_short_read(stub_archive: Running, tmp_path: pathlib.Path) -> None:
    data = b'only these bytes'
    stub_archive.state.files['small'] = data
    with pytest.raises(ArchiveShortRead, match=f'sent {len(data)} bytes of {len(data) + 10}'):
        stub_archive.client().download('small', tmp_path / 'partial', 'sha1', _sha1(data), len(data) + 10)


def test_download_longer_than_expected_is_stopped(stub_archive: Running, tmp_path: pathlib.Path) -> None:
    data = os.urandom(40_000)
    stub_archive.state.files['long'] = data
    target = tmp_path / 'partial'
    with pytest.raises(ArchiveShortRead):
        stub_archive.client(transfer_size=4096).download('long', target, 'sha1', _sha1(data[:10_000]), 10_000)
    assert target.stat().st_size <= 10_000


BEFORE, ROOM, AFTER = 16, 20, 28


def _region_file(path: pathlib.Path) -> bytes:
    """A file with BEFORE bytes, ROOM bytes of room for a member, AFTER bytes; return its content."""
    original = b'<' * BEFORE + b'.' * ROOM + b'>' * AFTER
    path.write_bytes(original)
    return original


def test_download_at_an_offset_fills_only_its_region(stub_archive: Running, tmp_path: pathlib.Path) -> None:
    data = os.urandom(ROOM)
    stub_archive.state.files['member'] = data
    target = tmp_path / 'bundle.tar'
    original = _region_file(target)
    result = stub_archive.client(transfer_size=8).download('member', target, 'sha1', _sha1(data), ROOM, offset=BEFORE)
    assert result.size == ROOM
    assert target.read_bytes() == original[:BEFORE] + data + original[BEFORE + ROOM:]


def test_download_at_an_offset_never_writes_past_its_region(stub_archive: Running, tmp_path: pathlib.Path) -> None:
    data = os.urandom(ROOM * 2)  # the archive sends twice the room
    stub_archive.state.files['member'] = data
    target = tmp_path / 'bundle.tar'
    original = _region_file(target)
    with pytest.raises(ArchiveShortRead, match='more than'):
        stub_archive.client(transfer_size=8).download('member', target, 'sha1', _sha1(data), ROOM, offset=BEFORE)
    content = target.read_bytes()
    assert len(content) == len(original)
    assert content[:BEFORE] == original[:BEFORE]
    assert content[BEFORE + ROOM:] == original[BEFORE + ROOM:]
    region = content[BEFORE:BEFORE + ROOM]
    written = next(size for size in range(ROOM, -1, -1) if region[:size] == data[:size])
    assert region[written:] == original[BEFORE + written:BEFORE + ROOM]  # the rest of the room is as it was


# ---- errors -----------------------------------------------------------------------------

def _call(client: ArchiveClient, method: str, archive_id: str, tmp_path: pathlib.Path) -> None:
    """The client call that sends `method`: status (HEAD), stage (POST) or download (GET, into tmp_path/partial)."""
    if method == 'HEAD':
        client.status(archive_id)
    elif method == 'POST':
        client.stage(archive_id)
    else:
        client.download(archive_id, tmp_path / 'partial', 'sha1', _sha1(b''), None)


@pytest.mark.parametrize('method', ['HEAD', 'POST', 'GET'])
def test_404_is_a_missing_file(stub_archive: Running, tmp_path: pathlib.Path, method: str) -> None:
    stub_archive.state.files['gone'] = b''
    stub_archive.state.fault(method, 'gone', '404')
    with pytest.raises(ArchiveFileMissing, match=f'archive {method} answered 404'):
        _call(stub_archive.client(), method, 'gone', tmp_path)
    assert not (tmp_path / 'partial').exists()


@pytest.mark.parametrize('method', ['HEAD', 'POST', 'GET'])
def test_500_error_page_gives_its_cause_without_the_traceback(stub_archive: Running, tmp_path: pathlib.Path,
                                                              method: str) -> None:
    stub_archive.state.files['busy'] = b'there'
    stub_archive.state.fault(method, 'busy', '500')
    with pytest.raises(ArchiveError) as raised:
        _call(stub_archive.client(), method, 'busy', tmp_path)
    assert not isinstance(raised.value, ArchiveFileMissing)
    text = str(raised.value)
    # A HEAD answer has no body: the client asks for none of the file's bytes with a GET, to read
    # why; here that GET succeeds (only HEAD was busy), so the reason phrase is all there is.
    shown = 'Internal Server Error' if method == 'HEAD' else HPSS_BUSY
    assert text == f'archive {method} answered 500: {shown}'
    assert 'Traceback' not in text and 'rest_generator.py' not in text and GENERIC_500 not in text
    probes = [seen for seen in stub_archive.state.requests if seen == ('GET', '/busy?byte_range=0-0')]
    assert len(probes) == (1 if method == 'HEAD' else 0), stub_archive.state.requests


@pytest.mark.parametrize('method', ['HEAD', 'POST', 'GET'])
def test_a_file_the_real_archive_does_not_have_is_missing_without_retries(archive: ArchiveServer,
                                                                          tmp_path: pathlib.Path,
                                                                          method: str) -> None:
    """pacifica-archiveinterface 0.4.2 answers 500 for a missing file, the cause only in its page's traceback."""
    waits: List[float] = []
    client = ArchiveClient(archive.url, 10.0, 1024, 3, 0.25, sleep=waits.append)
    with pytest.raises(ArchiveFileMissing) as raised:
        client.with_retries(lambda: _call(client, method, 'never-put-in-the-archive', tmp_path))
    assert str(raised.value) == f'archive {method} answered 500: {NO_SUCH_FILE}'  # the archive's path left out
    assert waits == []
    assert not (tmp_path / 'partial').exists()


def test_a_file_the_real_archive_has_is_not_missing(archive: ArchiveServer, tmp_path: pathlib.Path) -> None:
    archive.put('present-for-the-client', b'here')
    client = ArchiveClient(archive.url, 10.0, 1024, 0, 0.0, sleep=_no_sleep)
    assert client.status('present-for-the-client').size == 4
    client.stage('present-for-the-client')
    client.download('present-for-the-client', tmp_path / 'partial', 'sha1', _sha1(b'here'), 4)


@pytest.mark.parametrize('method', ['HEAD', 'POST', 'GET'])
def test_a_busy_hpss_archive_is_transient_and_retried(tmp_path: pathlib.Path, method: str) -> None:
    """HPSS answers 500 'slow to respond' while its core server is slow: retried, never taken for a missing file.

    The real archive of these tests (POSIX backend) is never busy, so BusyArchive sends 0.4.2's page.
    """
    waits: List[float] = []
    with BusyArchive() as busy:
        client = ArchiveClient(busy.url, 5.0, 1024, 2, 0.1, sleep=waits.append)
        with pytest.raises(ArchiveError) as raised:
            client.with_retries(lambda: _call(client, method, '1234', tmp_path))
        seen = list(busy.requests)
    assert not isinstance(raised.value, ArchiveFileMissing)
    assert str(raised.value) == f'archive {method} answered 500: {HPSS_BUSY}'
    assert waits == [0.1, 0.2]
    expected = [(method, '/1234')] + ([('GET', '/1234?byte_range=0-0')] if method == 'HEAD' else [])
    assert seen == expected * 3


def test_connection_refused_is_an_archive_error(refused_url: str, tmp_path: pathlib.Path) -> None:
    client = ArchiveClient(refused_url, 5.0, 1024, 0, 0.0, sleep=_no_sleep)
    for method in ('HEAD', 'POST', 'GET'):
        started = time.monotonic()
        with pytest.raises(ArchiveError, match=f'archive {method} failed: ConnectionRefusedError'):
            _call(client, method, 'f', tmp_path)
        assert time.monotonic() - started < 5
    assert not (tmp_path / 'partial').exists()


@pytest.mark.parametrize('method', ['HEAD', 'POST', 'GET'])
def test_no_answer_within_the_timeout_is_an_archive_error(stub_archive: Running, tmp_path: pathlib.Path,
                                                          method: str) -> None:
    stub_archive.state.files['slow'] = b'late'
    stub_archive.state.fault(method, 'slow', 'hang')
    started = time.monotonic()
    with pytest.raises(ArchiveError, match=f'archive {method} timed out after {CLIENT_TIMEOUT_S:g} s'):
        _call(stub_archive.client(timeout=CLIENT_TIMEOUT_S), method, 'slow', tmp_path)
    assert time.monotonic() - started < HANG_S / 2


def test_body_that_stalls_is_an_archive_error(stub_archive: Running, tmp_path: pathlib.Path) -> None:
    data = os.urandom(20_000)
    stub_archive.state.files['stall'] = data
    stub_archive.state.fault('GET', 'stall', 'stall')
    started = time.monotonic()
    with pytest.raises(ArchiveShortRead):
        # 1.5 s: time enough for the first half to arrive on a busy machine, and it must then time out
        stub_archive.client(timeout=1.5).download('stall', tmp_path / 'partial', 'sha1', _sha1(data), len(data))
    assert time.monotonic() - started < HANG_S / 2


# ---- retries ----------------------------------------------------------------------------

class Flaky:
    """An action that raises the given errors in turn, then returns 'done'."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return 'done'


def test_with_retries_retries_transient_errors_with_a_doubling_wait() -> None:
    waits: List[float] = []
    client = ArchiveClient('http://127.0.0.1:9/', 1.0, 1024, 3, 0.25, sleep=waits.append)
    action = Flaky(ArchiveError('archive GET answered 503: busy'), ArchiveShortRead('archive GET sent 1 bytes of 2'))
    assert client.with_retries(action) == 'done'
    assert action.calls == 3 and waits == [0.25, 0.5]


def test_with_retries_gives_up_after_the_configured_retries() -> None:
    waits: List[float] = []
    client = ArchiveClient('http://127.0.0.1:9/', 1.0, 1024, 3, 0.25, sleep=waits.append)
    last = ArchiveError('the last one')
    action = Flaky(ArchiveError('1'), ArchiveError('2'), ArchiveError('3'), last, ArchiveError('never raised'))
    with pytest.raises(ArchiveError) as raised:
        client.with_retries(action)
    assert raised.value is last
    assert action.calls == 4 and waits == [0.25, 0.5, 1.0]


@pytest.mark.parametrize('error', [ArchiveFileMissing('archive GET answered 404: Not Found'),
                                   HashMismatch('File hash does not match provided hash')],
                         ids=['missing', 'hash'])
def test_with_retries_does_not_retry_permanent_errors(error: Exception) -> None:
    waits: List[float] = []
    client = ArchiveClient('http://127.0.0.1:9/', 1.0, 1024, 3, 0.25, sleep=waits.append)
    action = Flaky(error)
    with pytest.raises(type(error)):
        client.with_retries(action)
    assert action.calls == 1 and waits == []


def test_with_retries_over_http_rides_out_a_busy_archive(stub_archive: Running) -> None:
    stub_archive.state.files['busy'] = b'eventually'
    stub_archive.state.fault('HEAD', 'busy', '500', '500')
    waits: List[float] = []
    client = stub_archive.client(retries=3, retry_wait=0.1, sleep=waits.append)
    assert client.with_retries(lambda: client.status('busy')).size == 10
    assert stub_archive.state.count('HEAD', '/busy') == 3 and waits == [0.1, 0.2]


def test_with_retries_over_http_stops_at_a_missing_file(stub_archive: Running) -> None:
    stub_archive.state.files['gone'] = b''
    stub_archive.state.fault('HEAD', 'gone', '404', '404')
    waits: List[float] = []
    client = stub_archive.client(retries=3, retry_wait=0.1, sleep=waits.append)
    with pytest.raises(ArchiveFileMissing):
        client.with_retries(lambda: client.status('gone'))
    assert stub_archive.state.count('HEAD', '/gone') == 1 and waits == []


# ---- URLs -------------------------------------------------------------------------------

ENCODED = {
    'with space': '/with%20space',
    'ünïcødé': '/%C3%BCn%C3%AFc%C3%B8d%C3%A9',
    'a?b#c': '/a%3Fb%23c',
    '100%': '/100%25',
    '%41': '/%2541',
}


def test_ids_are_percent_encoded_in_the_url(stub_archive: Running, tmp_path: pathlib.Path) -> None:
    client = stub_archive.client()
    for archive_id, path in ENCODED.items():
        data = archive_id.encode()
        stub_archive.state.files[archive_id] = data
        assert client.status(archive_id).size == len(data)
        client.stage(archive_id)
        client.download(archive_id, tmp_path / 'partial', 'sha1', _sha1(data), len(data))
        assert (tmp_path / 'partial').read_bytes() == data
        assert stub_archive.state.requests[-3:] == [('HEAD', path), ('POST', path), ('GET', path)]


@pytest.mark.parametrize('archive_id', ['a/../b', '..', './x'])
def test_ids_with_dot_segments_reach_the_archive_as_given(stub_archive: Running, archive_id: str) -> None:
    """No dot-segment removal on the way: the archive is asked for the id the cart names, not another file."""
    stub_archive.state.files[archive_id] = b'the file the client named'
    assert stub_archive.client().status(archive_id).size == len(b'the file the client named')
    assert stub_archive.state.requests == [('HEAD', '/' + archive_id)]


# ---- connections ------------------------------------------------------------------------

def _work(client: ArchiveClient, target: pathlib.Path, rounds: int) -> None:
    data = b'kept alive'
    for _ in range(rounds):
        client.status('k')
        client.stage('k')
        client.download('k', target, 'sha1', _sha1(data), len(data))
        with pytest.raises(ArchiveFileMissing):
            client.status('missing')  # an error answer is read to its end: the connection stays usable


def test_one_keep_alive_connection_per_thread(stub_archive: Running, tmp_path: pathlib.Path) -> None:
    stub_archive.state.files['k'] = b'kept alive'
    stub_archive.state.files['missing'] = b''
    stub_archive.state.fault('HEAD', 'missing', *(['404'] * 20))
    client = stub_archive.client()
    _work(client, tmp_path / 'main', 3)
    assert stub_archive.state.connections == 1
    assert len(stub_archive.state.requests) == 12
    errors: List[BaseException] = []

    def in_thread(index: int) -> None:
        try:
            _work(client, tmp_path / f'thread{index}', 2)
        except BaseException as exc:  # pylint: disable=broad-except  (handed to the main thread)
            errors.append(exc)

    threads = [threading.Thread(target=in_thread, args=(index,), daemon=True) for index in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads) and errors == []
    assert stub_archive.state.connections == 4  # the main thread's and one for each of the three threads
    assert len(stub_archive.state.requests) == 12 + 3 * 8
