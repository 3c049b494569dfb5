"""An archive interface that misbehaves: errors, hangs, broken and wrong bodies, tape and bad media.

Why a proxy and not a mock: the cart under test runs as real processes (the `pacifica-cartd`
server and a celery worker, see cartd_testkit.stack), so nothing inside them can be patched; and the
real pacifica-archiveinterface (POSIX backend) cannot be made to show these faults: it always
answers `disk`, never times out, never cuts a body short and never sends wrong bytes. So the
cart talks to cartd_testkit.faultproxy.FaultProxy, a small HTTP server in front of the real archive
that passes requests through and, for the archive ids a test names, injects one fault on the
wire. The cart's own retry, timeout, hash and tape logic is then exercised exactly as in
production, and the proxy counts the requests it saw.

The stack uses a 2 s archive timeout (hangs are quick), 2 retries with 0.2 s doubling waits,
and a tape re-check delay of 0.5 s doubling up to 2 s.
"""
from __future__ import annotations

import hashlib
import os
import time
import uuid
from typing import Any, Iterator, List, Tuple, cast

import pytest
import requests

from cartd_testkit.archive import ArchiveServer
from cartd_testkit.databases import drop_database, fresh_database
from cartd_testkit.faultproxy import FaultProxy, ProxiedArchive
from cartd_testkit.stack import CartStack, tar_contents

pytestmark = [pytest.mark.integration]

TIMEOUT_S = 2  # the cart's archive timeout in this module
RETRIES = 2  # from cartd_testkit.stack.TEST_SETTINGS
ATTEMPTS = RETRIES + 1
HANG_S = 5  # longer than TIMEOUT_S
DEADLINE_S = 30
SIZE = 200_000
MTIME = 1_600_000_000


@pytest.fixture(scope='module')
def faulty(archive: ArchiveServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tuple[CartStack, FaultProxy]]:
    """A cart (sqlite, one worker) whose archive URL is a fault proxy in front of the real archive."""
    base = tmp_path_factory.mktemp('faults')
    url = fresh_database('sqlite', base)
    with FaultProxy(archive.url) as proxy:
        proxied = cast(ArchiveServer, ProxiedArchive(archive, proxy))
        stack = CartStack(base / 'stack', proxied, url, workers=1, concurrency=2,
                          overrides={'archiveinterface': {'timeout': str(TIMEOUT_S)}})
        try:
            stack.start()
            yield stack, proxy
        finally:
            stack.stop()
            drop_database('sqlite', url)


class Case:
    """One cart of one file, whose archive id carries the faults."""

    def __init__(self, stack: CartStack, proxy: FaultProxy, name: str) -> None:
        """Put a fresh random file in the archive under a unique id."""
        self.stack = stack
        self.proxy = proxy
        self.uid = f'fault-{name}-{uuid.uuid4().hex[:8]}'
        self.archive_id = f'{self.uid}-file'
        self.path = f'faults/{name}/data.bin'
        self.data = os.urandom(SIZE)
        sums = stack.archive.put(self.archive_id, self.data, mtime=MTIME)
        self.fileids = [{'id': self.archive_id, 'path': self.path, 'hashtype': 'sha1', 'hashsum': sums['sha1']}]
        self.elapsed = 0.0

    def rule(self, fault: str, **kwargs: Any) -> 'Case':
        """Add a fault for this case's archive id."""
        self.proxy.rule(self.archive_id, fault, **kwargs)
        return self

    def run(self) -> requests.Response:
        """POST the cart and wait (bounded) until it is no longer staging; check no temp file is left."""
        started = time.monotonic()
        created = self.stack.post(self.uid, self.fileids)
        assert created.status_code == 201, created.text
        final = self.stack.wait_final(self.uid, deadline_s=DEADLINE_S)
        self.elapsed = time.monotonic() - started
        leftovers = sorted(str(path) for path in self.stack.volume.rglob('*.part'))
        assert leftovers == [], f'temp files left behind: {leftovers}'
        return final

    def count(self, method: str) -> int:
        """Requests of `method` the proxy received for this file (a GET: downloads, not probes)."""
        return self.proxy.count(method, self.archive_id, query='')

    def probes(self) -> int:
        """GETs of no bytes, which the cart sends to learn why a HEAD answered 500 (a HEAD has no body)."""
        return self.proxy.count('GET', self.archive_id, query='byte_range=0-0')

    def history(self) -> List[str]:
        """What the proxy saw for this file, for assertion messages."""
        return [f'{event.method}{"?" + event.query if event.query else ""} {event.fault or "-"}: {event.answer}'
                for event in self.proxy.events(self.archive_id)]

    def assert_ready(self, final: requests.Response) -> None:
        """The cart is ready and its tar holds exactly the archive's bytes."""
        assert (final.status_code, final.headers.get('X-Pacifica-Status')) == (204, 'ready'), \
            f'{final.headers}\n{self.history()}\n{self.stack.logs()}'
        answer = self.stack.download(self.uid, 'x.tar')
        assert answer.status_code == 200
        contents = tar_contents(answer.content)
        assert list(contents) == [f'x/{self.path}']
        got = contents[f'x/{self.path}']
        assert len(got) == len(self.data) and hashlib.sha256(got).digest() == hashlib.sha256(self.data).digest()
        assert got == self.data

    def assert_error(self, final: requests.Response, *causes: str) -> str:
        """The cart failed, and its message names the file, its archive id and each cause."""
        assert (final.status_code, final.headers.get('X-Pacifica-Status')) == (500, 'error'), \
            f'{final.headers}\n{self.history()}\n{self.stack.logs()}'
        message = final.headers['X-Pacifica-Message']
        print(f'{self.uid}: {message}  [{self.elapsed:.2f} s; {self.history()}]')
        assert self.path in message and self.archive_id in message, message
        for cause in causes:
            assert cause in message, f'{cause!r} not in {message!r}'
        assert 'Traceback' not in message and len(message) < 1000
        not_ready = self.stack.download(self.uid)
        assert not_ready.status_code == 202
        return message


# ---- 500 answers ------------------------------------------------------------------------------


def test_head_500_twice_then_ok_is_ready(faulty: Tuple[CartStack, FaultProxy]) -> None:
    case = Case(*faulty, 'head500x2').rule('status500', times=2, methods='HEAD')
    case.assert_ready(case.run())
    assert case.count('HEAD') == 3 and case.count('GET') == 1 and case.probes() == 2, case.history()


def test_get_500_twice_then_ok_is_ready(faulty: Tuple[CartStack, FaultProxy]) -> None:
    case = Case(*faulty, 'get500x2').rule('status500', times=2, methods='GET')
    case.assert_ready(case.run())
    assert case.count('GET') == 3, case.history()


def test_get_500_always_fails_naming_file_and_cause(faulty: Tuple[CartStack, FaultProxy]) -> None:
    case = Case(*faulty, 'get500').rule('status500', times=None, methods='GET',
                                        message='injected: the archive core server is slow to respond')
    final = case.run()
    case.assert_error(final, 'archive GET answered 500', 'injected: the archive core server is slow to respond')
    assert case.count('GET') == ATTEMPTS, case.history()


def test_head_500_always_fails(faulty: Tuple[CartStack, FaultProxy]) -> None:
    case = Case(*faulty, 'head500').rule('status500', times=None, methods='HEAD')
    case.assert_error(case.run(), 'archive HEAD answered 500')
    assert case.count('HEAD') == ATTEMPTS and case.count('GET') == 0 and case.probes() == ATTEMPTS, case.history()


# ---- hangs ------------------------------------------------------------------------------------


def test_head_hang_once_is_ready(faulty: Tuple[CartStack, FaultProxy]) -> None:
    case = Case(*faulty, 'headhang').rule('hang', times=1, methods='HEAD', seconds=HANG_S)
    case.assert_ready(case.run())
    assert case.count('HEAD') == 2 and case.count('GET') == 1, case.history()
    assert case.elapsed >= TIMEOUT_S, 'the hang did not delay the cart: was the timeout honoured?'


def test_get_hang_always_times_out(faulty: Tuple[CartStack, FaultProxy]) -> None:
    case = Case(*faulty, 'gethang').rule('hang', times=None, methods='GET', seconds=HANG_S)
    case.assert_error(case.run(), f'archive GET timed out after {TIMEOUT_S} s')
    assert case.count('GET') == ATTEMPTS, case.history()
    # three timed-out attempts plus the retry waits, and not much more
    assert ATTEMPTS * TIMEOUT_S <= case.elapsed < ATTEMPTS * TIMEOUT_S + 10


# ---- bodies that break off or are short -------------------------------------------------------


def test_body_cut_mid_stream_once_is_ready(faulty: Tuple[CartStack, FaultProxy]) -> None:
    case = Case(*faulty, 'cut1').rule('cut', times=1, after=SIZE // 3)
    case.assert_ready(case.run())
    assert case.count('GET') == 2, case.history()


def test_body_cut_mid_stream_always_fails(faulty: Tuple[CartStack, FaultProxy]) -> None:
    case = Case(*faulty, 'cut').rule('cut', times=None, after=SIZE // 3)
    case.assert_error(case.run(), 'archive GET broke off before the end of the file', 'IncompleteRead')
    assert case.count('GET') == ATTEMPTS, case.history()


def test_short_body_once_is_ready(faulty: Tuple[CartStack, FaultProxy]) -> None:
    case = Case(*faulty, 'short1').rule('short', times=1, missing=1000)
    case.assert_ready(case.run())
    assert case.count('GET') == 2, case.history()


def test_short_body_always_fails(faulty: Tuple[CartStack, FaultProxy]) -> None:
    """Content-Length says SIZE, fewer bytes come, then the connection closes."""
    case = Case(*faulty, 'short').rule('short', times=None, missing=1000)
    case.assert_error(case.run(), 'archive GET broke off before the end of the file', 'IncompleteRead')
    assert case.count('GET') == ATTEMPTS, case.history()


def test_body_without_length_ending_early_fails_on_the_size(faulty: Tuple[CartStack, FaultProxy]) -> None:
    """No Content-Length: an early close looks like a complete body; only the HEAD's size tells."""
    case = Case(*faulty, 'eof').rule('eof', times=None, after=SIZE - 5000)
    case.assert_error(case.run(), f'archive GET sent {SIZE - 5000} bytes of {SIZE}')
    assert case.count('GET') == ATTEMPTS, case.history()


# ---- wrong bytes --------------------------------------------------------------------------------


def test_flipped_byte_once_is_recovered_by_one_download_more(faulty: Tuple[CartStack, FaultProxy]) -> None:
    case = Case(*faulty, 'flip1').rule('flip', times=1)
    case.assert_ready(case.run())
    assert case.count('GET') == 2, case.history()


def test_flipped_byte_always_fails_after_exactly_two_downloads(faulty: Tuple[CartStack, FaultProxy]) -> None:
    case = Case(*faulty, 'flip').rule('flip', times=None)
    case.assert_error(case.run(), 'File hash does not match provided hash')
    assert case.count('GET') == 2, case.history()


# ---- what HEAD says -----------------------------------------------------------------------------


def test_head_without_pacifica_headers_downloads_anyway(faulty: Tuple[CartStack, FaultProxy]) -> None:
    case = Case(*faulty, 'nohead').rule('nohead', times=None)
    case.assert_ready(case.run())
    assert case.count('HEAD') == 1 and case.count('GET') == 1, case.history()
    assert all(event.fault == 'nohead' for event in case.proxy.events(case.archive_id) if event.method == 'HEAD')


def test_tape_three_times_then_disk(faulty: Tuple[CartStack, FaultProxy]) -> None:
    case = Case(*faulty, 'tape').rule('tape', times=3)
    case.assert_ready(case.run())
    events = case.proxy.events(case.archive_id)
    heads = [event for event in events if event.method == 'HEAD']
    assert [event.fault for event in heads] == ['tape', 'tape', 'tape', ''], case.history()
    first_disk = heads[3].seq
    posts = [event for event in events if event.method == 'POST']
    assert posts, f'no stage POST: {case.history()}'
    assert all(heads[0].seq < event.seq < first_disk for event in posts), case.history()
    gets = [event for event in events if event.method == 'GET']
    assert len(gets) == 1 and gets[0].seq > first_disk, case.history()
    # re-checks wait tape_wait, doubling (0.5 s, 1 s, 2 s): a Celery countdown, not a busy loop
    gaps = [heads[index + 1].at - heads[index].at for index in range(3)]
    assert gaps[0] >= 0.4 and gaps[1] >= 0.9 and gaps[2] >= 1.9, gaps


def test_error_media_fails_naming_the_media(faulty: Tuple[CartStack, FaultProxy]) -> None:
    case = Case(*faulty, 'media').rule('media', times=None, media='error',
                                       message='injected: cartridge unreadable')
    case.assert_error(case.run(), 'the archive reports the media of the file as error: injected: cartridge unreadable')
    assert case.count('GET') == 0 and case.count('POST') == 0, case.history()


def test_proxy_records_nothing_unexpected(faulty: Tuple[CartStack, FaultProxy]) -> None:
    """The proxy itself did not fail on any request (a proxy bug would fake a cart bug)."""
    _, proxy = faulty
    assert proxy.errors == []
