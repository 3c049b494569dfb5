"""Client of the Pacifica archive interface: status, stage, and verified download to a temp file."""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import http.client
import json
import logging
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Type, TypeVar
from urllib.parse import quote, urlsplit

from .errors import ArchiveError, ArchiveFileMissing, ArchiveShortRead, ArchiveTimeout, HashMismatch
from .fileio import write_all_at

LOGGER = logging.getLogger(__name__)

MEDIA_DISK = 'disk'
MEDIA_ERROR = 'error'
MEDIA_UNKNOWN = ''
ERROR_PAGE_BYTES = 65536  # of an error answer's body, read for its message; a longer one costs the connection

T = TypeVar('T')
# What a broken or refused connection raises, beside the socket's own timeout.
NETWORK_ERRORS: Tuple[Type[Exception], ...] = (OSError, http.client.HTTPException)
# Hears how each request to the archive ended: (HEAD, POST or GET, outcome, seconds).
Observer = Callable[[str, str, float], None]
# A failed request's outcome by its exception, the most specific first (others: 'error').
OUTCOMES: Tuple[Tuple[Type[Exception], str], ...] = (
    (ArchiveFileMissing, 'missing'), (ArchiveTimeout, 'timeout'), (ArchiveShortRead, 'short_read'),
    (HashMismatch, 'hash_mismatch'))


@dataclasses.dataclass(frozen=True)
class ArchiveStatus:
    """What a HEAD on the archive said about one file."""

    media: str
    size: Optional[int]
    mtime: Optional[float]
    message: str

    @property
    def on_disk(self) -> bool:
        """Only 'disk' (or an archive that does not say) means the bytes can be pulled now."""
        return self.media in (MEDIA_DISK, MEDIA_UNKNOWN)


@dataclasses.dataclass(frozen=True)
class Download:
    """A file that arrived whole and matched its hash."""

    size: int
    mtime: Optional[float]


def _float_header(value: Optional[str]) -> Optional[float]:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _int_header(value: Optional[str]) -> Optional[int]:
    number = _float_header(value)
    return None if number is None else int(number)


# pacifica-archiveinterface answers every failure of its backend with CherryPy's generic 500 page
# ("The server encountered an unexpected condition ..."): the backend's own words are only in the
# last line of the page's traceback, e.g. (0.4.2, POSIX backend, a missing file)
#   pacifica.archiveinterface.exception.ArchiveInterfaceError: Can't open posix file with error:
#   [Errno 2] No such file or directory: '/srv/archive/1234'
# and an HPSS archive that is busy says "The archive core server is slow to respond ..." there.
# It has no error codes of its own, so those words are what tells a missing file from a busy archive.
_CAUSE = re.compile(r'^[A-Za-z_][\w.]*(?:Error|Exception)\w*: (?P<cause>.+)$')
_QUOTED_PATH = re.compile(r":? *'/[^']*'")  # the archive's local paths stay out of the cart's messages
# ENOENT: there is no file under that id. (Other causes, e.g. EISDIR or EACCES, stay transient.)
_NO_SUCH_FILE = f'[Errno {errno.ENOENT}] '
PROBE_QUERY = 'byte_range=0-0'  # a GET of no bytes: the file opened, nothing read


def _error_page(body: bytes) -> Dict[str, Any]:
    """The archive's JSON error page as a dict ({} when the body is empty or not one)."""
    try:
        page = json.loads(body)
    except ValueError:
        return {}
    return page if isinstance(page, dict) else {}


def _archive_cause(page: Dict[str, Any]) -> str:
    """The backend's own message: the last line of the page's traceback when it names an exception."""
    lines = str(page.get('traceback') or '').strip().splitlines()
    found = _CAUSE.match(lines[-1].strip()) if lines else None
    return found.group('cause').strip() if found else ''


def _error_text(page: Dict[str, Any], reason: str) -> str:
    """What the archive said went wrong, without its traceback or its local paths."""
    text = _archive_cause(page) or str(page.get('message') or reason or '')
    return _QUOTED_PATH.sub('', text).strip()[:300]


def _means_no_such_file(page: Dict[str, Any]) -> bool:
    return _NO_SUCH_FILE in _archive_cause(page)


def new_hash(hash_type: str) -> 'hashlib._Hash':
    """Return a fresh hashlib object for a client-given hash name (checked at cart creation)."""
    return hashlib.new(hash_type.lower())


class ArchiveClient:
    """Talks to one archive interface over HTTP/1.1: one keep-alive connection per thread, a timeout on every call.

    Built on the standard library's http.client: the requests library cost about 0.8 ms of
    CPU per HEAD and GET pair, more than the rest of staging a small file. Archive ids go
    into the URL percent-encoded and exactly as given (no dot-segment removal), and no
    proxy from the environment is used: the archive is the cart's neighbour.
    """

    def __init__(self, base_url: str, timeout: float, transfer_size: int, retries: int, retry_wait: float,
                 sleep: Callable[[float], None] = time.sleep, observe: Optional[Observer] = None) -> None:
        """Remember the archive's URL (ending in '/') and how patiently to talk to it; `observe` hears of
        each status, stage and download: (method, outcome, seconds)."""
        self.base_url = base_url
        parts = urlsplit(base_url)
        self._https = parts.scheme == 'https'
        self._host = parts.hostname or '127.0.0.1'
        self._port = parts.port
        self._prefix = parts.path or '/'
        self.timeout = timeout
        self.transfer_size = transfer_size
        self.retries = retries
        self.retry_wait = retry_wait
        self._sleep = sleep
        self._observe = observe
        self._local = threading.local()

    def _connection(self) -> http.client.HTTPConnection:
        connection: Optional[http.client.HTTPConnection] = getattr(self._local, 'connection', None)
        if connection is None:
            kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            connection = kind(self._host, self._port, timeout=self.timeout)
            self._local.connection = connection
        return connection

    def _drop_connection(self) -> None:
        connection = getattr(self._local, 'connection', None)
        if connection is not None:
            connection.close()
            self._local.connection = None

    def url(self, archive_id: str) -> str:
        """The archive URL of one file: base URL plus the id, percent-encoded."""
        return self.base_url + quote(archive_id, safe='/')

    def _send(self, method: str, archive_id: str, query: str = '') -> http.client.HTTPResponse:
        """Send one request on this thread's connection (a fresh one if the kept one went stale) and read the head."""
        target = self._prefix + quote(archive_id, safe='/') + (f'?{query}' if query else '')
        for attempt in (1, 2):
            reused = getattr(self._local, 'connection', None) is not None
            connection = self._connection()
            try:
                connection.request(method, target, headers={'Content-Length': '0'} if method == 'POST' else {})
                return connection.getresponse()
            except socket.timeout as exc:
                self._drop_connection()
                raise ArchiveTimeout(f'archive {method} timed out after {self.timeout:g} s') from exc
            except NETWORK_ERRORS as exc:
                self._drop_connection()
                # A kept-alive connection the archive closed meanwhile: try once on a new one.
                if attempt == 1 and reused and isinstance(exc, (http.client.RemoteDisconnected, ConnectionResetError,
                                                                BrokenPipeError, http.client.BadStatusLine)):
                    continue
                raise ArchiveError(f'archive {method} failed: {type(exc).__name__}: {exc}') from exc
        raise AssertionError('unreachable')

    def _request(self, method: str, archive_id: str) -> http.client.HTTPResponse:
        """Send the request; an error answer raises ArchiveFileMissing (permanent) or ArchiveError (transient)."""
        response = self._send(method, archive_id)
        if response.status < 400:
            return response
        page = self._read_error_page(response)
        if method == 'HEAD' and response.status == 500 and not page:
            # A HEAD answer has no body to say why: a GET of no bytes fails the same way, with its page.
            page = self._probe(archive_id)
        text = _error_text(page, response.reason)
        if response.status in (404, 410) or response.status == 500 and _means_no_such_file(page):
            raise ArchiveFileMissing(f'archive {method} answered {response.status}: {text}')
        raise ArchiveError(f'archive {method} answered {response.status}: {text}')

    def _read_error_page(self, response: http.client.HTTPResponse) -> Dict[str, Any]:
        """Read an error answer's page (up to ERROR_PAGE_BYTES; past that the connection is dropped)."""
        try:
            body = response.read(ERROR_PAGE_BYTES + 1)
        except NETWORK_ERRORS:
            body = b''
        if len(body) > ERROR_PAGE_BYTES or not response.isclosed():
            self._drop_connection()  # the rest of a long error page is not read
        return _error_page(body[:ERROR_PAGE_BYTES])

    def _probe(self, archive_id: str) -> Dict[str, Any]:
        """The error page of a GET of no bytes of the file, or {} when that GET succeeds."""
        response = self._send('GET', archive_id, PROBE_QUERY)
        if response.status < 400:
            # Not read: should something on the way ignore the byte range, this is the whole file.
            self._drop_connection()
            return {}
        return self._read_error_page(response)

    def _finish(self, method: str, response: http.client.HTTPResponse) -> None:
        """Read what is left of a small answer, so the connection can carry the next request."""
        try:
            response.read()
        except socket.timeout as exc:
            self._drop_connection()
            raise ArchiveTimeout(f'archive {method} timed out after {self.timeout:g} s') from exc
        except NETWORK_ERRORS as exc:
            self._drop_connection()
            raise ArchiveError(f'archive {method} failed: {type(exc).__name__}: {exc}') from exc
        if response.will_close:
            self._drop_connection()

    def problem(self, timeout: float = 2.0) -> Optional[str]:
        """None when the archive answers HTTP on its base URL now (any status), else why not.

        A connection of its own, with its own timeout: the threads' keep-alive connections
        are not touched.
        """
        kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        connection = kind(self._host, self._port, timeout=timeout)
        try:
            connection.request('HEAD', self._prefix)
            connection.getresponse().read()
        except (OSError, http.client.HTTPException) as exc:
            return f'the archive does not answer at {self.base_url}: {type(exc).__name__}: {exc}'
        finally:
            connection.close()
        return None

    def with_retries(self, action: Callable[[], T]) -> T:
        """Run action, retrying transient archive errors with a doubling wait, a bounded number of times."""
        for attempt in range(self.retries + 1):
            try:
                return action()
            except ArchiveError as exc:
                if attempt == self.retries:
                    raise
                wait = self.retry_wait * (2 ** attempt)
                LOGGER.info('transient archive error (%s), retry %d of %d in %.1f s',
                            exc, attempt + 1, self.retries, wait)
                self._sleep(wait)
        raise AssertionError('unreachable')

    def _observed(self, method: str, action: Callable[[], T]) -> T:
        """Run one request (its retries are requests of their own), telling the observer how it ended."""
        if self._observe is None:
            return action()
        started = time.monotonic()
        outcome = 'error'
        try:
            result = action()
            outcome = 'ok'
            return result
        except Exception as exc:
            outcome = next((name for kind, name in OUTCOMES if isinstance(exc, kind)), 'error')
            raise
        finally:
            self._observe(method, outcome, time.monotonic() - started)

    def status(self, archive_id: str) -> ArchiveStatus:
        """HEAD the file (see _status)."""
        return self._observed('HEAD', lambda: self._status(archive_id))

    def _status(self, archive_id: str) -> ArchiveStatus:
        """HEAD the file: where it is (disk/tape/error), its size and mtime.

        Quirks handled: the message header is spelt X-Pacifica-Messsage, Last-Modified is
        epoch seconds, and some answers carry none of the X-Pacifica headers at all
        (media is then unknown, and the download decides).
        """
        response = self._request('HEAD', archive_id)
        self._finish('HEAD', response)
        headers = response.headers
        return ArchiveStatus(
            media=(headers.get('X-Pacifica-File-Storage-Media') or MEDIA_UNKNOWN).strip().lower(),
            size=_int_header(headers.get('X-Content-Length')),
            mtime=_float_header(headers.get('Last-Modified')),
            message=headers.get('X-Pacifica-Messsage', headers.get('X-Pacifica-Message', '')),
        )

    def stage(self, archive_id: str) -> None:
        """Ask the archive to bring the file to disk (a tape recall); returns when it has accepted."""
        self._observed('POST', lambda: self._finish('POST', self._request('POST', archive_id)))

    def download(self, archive_id: str, target: Path, hash_type: str, hash_value: str,
                 expected_size: Optional[int], progress: Optional[Callable[[], None]] = None,
                 offset: Optional[int] = None) -> Download:
        """GET the file (see _download)."""
        return self._observed('GET', lambda: self._download(archive_id, target, hash_type, hash_value,
                                                            expected_size, progress, offset))

    def _download(self, archive_id: str, target: Path, hash_type: str, hash_value: str,
                  expected_size: Optional[int], progress: Optional[Callable[[], None]],
                  offset: Optional[int]) -> Download:
        """GET the file into `target`, hashing while writing; raise unless whole and matching.

        Without `offset`, `target` is a temp file, created or emptied, that the caller renames
        into place only after this returns. With `offset`, the bytes go into the existing
        file `target` from that offset (a file's place in a bundle tar): then `expected_size`
        is the room there, and an archive that sends more is stopped before it writes past it.
        `progress` is called after each chunk (the caller throttles it).
        """
        digest = new_hash(hash_type)
        written = 0
        start = 0 if offset is None else offset
        flags = os.O_WRONLY | (os.O_CREAT | os.O_TRUNC if offset is None else 0)
        response = self._request('GET', archive_id)
        whole = False
        try:
            descriptor = os.open(target, flags, 0o644)
            try:
                while True:
                    # http.client allocates what it is asked for: a small file's read is its size (and one
                    # byte more once it is all there, to catch an archive that sends more than it said).
                    want = self.transfer_size if expected_size is None else \
                        max(min(self.transfer_size, expected_size - written), 1)
                    try:  # only reading can fail for the archive's sake; a failed write is the volume's
                        chunk = response.read(want)
                    except NETWORK_ERRORS as exc:
                        raise ArchiveShortRead(
                            f'archive GET broke off before the end of the file: {type(exc).__name__}') from exc
                    if not chunk:
                        break
                    if expected_size is not None and written + len(chunk) > expected_size:
                        raise ArchiveShortRead(f'archive GET sent more than the {expected_size} bytes announced')
                    digest.update(chunk)
                    write_all_at(descriptor, chunk, start + written)
                    written += len(chunk)
                    if progress is not None:
                        progress()
                if response.length:  # the connection ended before the Content-Length it announced
                    raise ArchiveShortRead('archive GET broke off before the end of the file: IncompleteRead')
                whole = True
                os.fdatasync(descriptor)
            finally:
                os.close(descriptor)
        finally:
            if not whole or response.will_close:
                self._drop_connection()
            response.close()
        if expected_size is not None and written != expected_size:
            raise ArchiveShortRead(f'archive GET sent {written} bytes of {expected_size}')
        if digest.hexdigest() != hash_value.lower():
            raise HashMismatch('File hash does not match provided hash')
        return Download(size=written, mtime=_float_header(response.headers.get('Last-Modified')))
