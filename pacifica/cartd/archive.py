"""Client of the Pacifica archive interface: status, stage, and verified download to a temp file."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar
from urllib.parse import quote

import requests

from .errors import ArchiveError, ArchiveFileMissing, ArchiveShortRead, HashMismatch
from .fileio import write_all_at

LOGGER = logging.getLogger(__name__)

MEDIA_DISK = 'disk'
MEDIA_ERROR = 'error'
MEDIA_UNKNOWN = ''

T = TypeVar('T')


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


def _error_text(response: requests.Response) -> str:
    """The archive's own message from its JSON error page, without its traceback."""
    try:
        page = json.loads(response.content[:65536])
        message = page.get('message') if isinstance(page, dict) else None
    except ValueError:
        message = None
    return str(message or response.reason or '').strip()[:300]


def new_hash(hash_type: str) -> 'hashlib._Hash':
    """Return a fresh hashlib object for a client-given hash name (checked at cart creation)."""
    return hashlib.new(hash_type.lower())


class ArchiveClient:
    """Talks to one archive interface; one keep-alive session per thread, a timeout on every call."""

    def __init__(self, base_url: str, timeout: float, transfer_size: int, retries: int, retry_wait: float,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        """Remember the archive's URL (ending in '/') and how patiently to talk to it."""
        self.base_url = base_url
        self.timeout = timeout
        self.transfer_size = transfer_size
        self.retries = retries
        self.retry_wait = retry_wait
        self._sleep = sleep
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session = getattr(self._local, 'session', None)
        if session is None:
            session = requests.Session()
            adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=2)
            session.mount('http://', adapter)
            session.mount('https://', adapter)
            self._local.session = session
        return session

    def url(self, archive_id: str) -> str:
        """The archive URL of one file: base URL plus the id, percent-encoded."""
        return self.base_url + quote(archive_id, safe='/')

    def _request(self, method: str, archive_id: str, **kwargs: Any) -> requests.Response:
        try:
            response = self._session().request(method, self.url(archive_id), timeout=self.timeout, **kwargs)
        except requests.Timeout as exc:
            raise ArchiveError(f'archive {method} timed out after {self.timeout:g} s') from exc
        except requests.RequestException as exc:
            raise ArchiveError(f'archive {method} failed: {type(exc).__name__}: {exc}') from exc
        if response.status_code >= 400:
            text = _error_text(response)
            response.close()
            if response.status_code in (404, 410):
                raise ArchiveFileMissing(f'archive {method} answered {response.status_code}: {text}')
            raise ArchiveError(f'archive {method} answered {response.status_code}: {text}')
        return response

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

    def status(self, archive_id: str) -> ArchiveStatus:
        """HEAD the file: where it is (disk/tape/error), its size and mtime.

        Quirks handled: the message header is spelt X-Pacifica-Messsage, Last-Modified is
        epoch seconds, and some answers carry none of the X-Pacifica headers at all
        (media is then unknown, and the download decides).
        """
        response = self._request('HEAD', archive_id)
        headers = response.headers
        response.close()
        return ArchiveStatus(
            media=headers.get('X-Pacifica-File-Storage-Media', MEDIA_UNKNOWN).strip().lower(),
            size=_int_header(headers.get('X-Content-Length')),
            mtime=_float_header(headers.get('Last-Modified')),
            message=headers.get('X-Pacifica-Messsage', headers.get('X-Pacifica-Message', '')),
        )

    def stage(self, archive_id: str) -> None:
        """Ask the archive to bring the file to disk (a tape recall); returns when it has accepted."""
        self._request('POST', archive_id).close()

    def download(self, archive_id: str, target: Path, hash_type: str, hash_value: str,
                 expected_size: Optional[int], progress: Optional[Callable[[], None]] = None,
                 offset: Optional[int] = None) -> Download:
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
        response = self._request('GET', archive_id, stream=True)
        try:
            descriptor = os.open(target, flags, 0o644)
            try:
                try:
                    for chunk in response.iter_content(self.transfer_size):
                        if expected_size is not None and written + len(chunk) > expected_size:
                            raise ArchiveShortRead(f'archive GET sent more than the {expected_size} bytes announced')
                        digest.update(chunk)
                        write_all_at(descriptor, chunk, start + written)
                        written += len(chunk)
                        if progress is not None:
                            progress()
                except requests.RequestException as exc:
                    raise ArchiveShortRead(
                        f'archive GET broke off before the end of the file: {type(exc).__name__}') from exc
                os.fdatasync(descriptor)
            finally:
                os.close(descriptor)
        finally:
            response.close()
        if expected_size is not None and written != expected_size:
            raise ArchiveShortRead(f'archive GET sent {written} bytes of {expected_size}')
        if digest.hexdigest() != hash_value.lower():
            raise HashMismatch('File hash does not match provided hash')
        return Download(size=written, mtime=_float_header(response.headers.get('Last-Modified')))
