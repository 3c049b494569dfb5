"""Fakes of the cart's task queue and archive client, for unit tests of the service on a temp SQLite file;
and BusyArchive, an archive interface over HTTP that is always busy, as an HPSS one can be.

The real archive interface (POSIX backend) always reports `disk` and always sends its
headers, so tape recalls, `error` media and header-less answers cannot be produced by it:
the unit tests stand FakeArchive (bytes from a dict, media and header presence per id) in
for the archive client, and FakeQueue (lists) for the task queue; run_queue then runs what
was queued as a worker would.
"""
from __future__ import annotations

import contextlib
import dataclasses
import http.server
import json
import pathlib
import threading
from types import TracebackType
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple, Type, TypeVar

from pacifica.cartd.archive import ArchiveStatus, Download, new_hash
from pacifica.cartd.errors import ArchiveError, HashMismatch

if TYPE_CHECKING:
    from pacifica.cartd.service import CartService

T = TypeVar('T')


def serve_in_thread(server: http.server.ThreadingHTTPServer) -> threading.Thread:
    """Serve `server` from a daemon thread (its request threads daemons too)."""
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={'poll_interval': 0.05}, daemon=True)
    thread.start()
    return thread


def stop_serving(server: Optional[http.server.ThreadingHTTPServer], thread: Optional[threading.Thread]) -> None:
    """Stop a server started by serve_in_thread and close its socket (connections are refused from now on)."""
    if server is not None:
        server.shutdown()
        server.server_close()
    if thread is not None:
        thread.join(5)


def sqlite_service(tmp_path: pathlib.Path, files: Dict[str, bytes], cleanup: contextlib.ExitStack,
                   **env: str) -> 'CartService':
    """A service on a SQLite file under `tmp_path` over FakeArchive(files) and a FakeQueue, with these
    settings (environment names); its connection is closed by `cleanup`."""
    from pacifica.cartd import database, schema
    from pacifica.cartd.config import check_volume, load_settings
    from pacifica.cartd.service import CartService
    settings = load_settings(str(tmp_path / 'none.ini'), environ={
        'VOLUME_PATH': str(tmp_path / 'volume'), 'PEEWEE_URL': f'sqliteext:///{tmp_path}/db.sqlite3', **env})
    check_volume(settings)
    database.bind(settings)
    cleanup.enter_context(database.connection())
    schema.sync()
    return CartService(settings, FakeQueue(), FakeArchive(dict(files)))  # type: ignore[arg-type]
MAX_TASKS = 50  # run_queue's bound: a cart whose tasks keep requeueing fails the test

# What pacifica-archiveinterface 0.4.2 sends when its backend raises: CherryPy's generic 500 page,
# the backend's words only in the traceback's last line (measured on the POSIX backend).
GENERIC_500 = 'The server encountered an unexpected condition which prevented it from fulfilling the request.'
# The HPSS backend's words when its core server is slow (backends/hpss/extended.py, ping_core).
HPSS_BUSY = 'The archive core server is slow to respond Latency is: 12.5 second(s)'


def archive_error_page(cause: str, status: str = '500 Internal Server Error') -> Dict[str, str]:
    """The archive interface's error page for a backend that raised ArchiveInterfaceError(cause)."""
    traceback = ('Traceback (most recent call last):\n'
                 '  File "/opt/pai/lib/python3.11/site-packages/pacifica/archiveinterface/rest_generator.py",'
                 ' line 130, in HEAD\n    archivefile = self._archive.open(filepath, "r")\n'
                 f'pacifica.archiveinterface.exception.ArchiveInterfaceError: {cause}\n')
    return {'status': status, 'message': GENERIC_500, 'traceback': traceback, 'version': '18.10.0'}


class BusyArchive:
    """An HPSS archive interface whose core server is slow: every HEAD, POST and GET answers 500.

    The real archive in the tests (POSIX backend) cannot be made busy, so this stands in for it:
    the page is 0.4.2's (HPSS_BUSY in the traceback), and HEAD answers carry no body, as CherryPy
    sends them. Listens on 127.0.0.1 and a free port; records each request's method and target.
    """

    def __init__(self) -> None:
        """Nothing listens until start()."""
        self.requests: List[Tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server: Optional[http.server.ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        """The base URL (ending in '/')."""
        assert self._server is not None, 'BusyArchive was not started'
        return f'http://127.0.0.1:{self._server.server_address[1]}/'

    def start(self) -> 'BusyArchive':
        """Serve from a daemon thread."""
        owner = self
        page = json.dumps(archive_error_page(HPSS_BUSY)).encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'
            timeout = 10

            def log_message(self, format: str, *args: object) -> None:  # pylint: disable=redefined-builtin
                """Quiet."""

            def _busy(self) -> None:
                with owner._lock:  # pylint: disable=protected-access
                    owner.requests.append((self.command, self.path))
                length = int(self.headers.get('Content-Length') or 0)
                if length:
                    self.rfile.read(length)
                self.send_response(500)
                self.send_header('Content-Type', 'application/json')
                self.send_header('Content-Length', str(len(page)))
                self.end_headers()
                if self.command != 'HEAD':
                    self.wfile.write(page)

            do_HEAD = do_GET = do_POST = _busy  # noqa: N815

        self._server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self._thread = serve_in_thread(self._server)
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        stop_serving(self._server, self._thread)

    def __enter__(self) -> 'BusyArchive':
        """Start serving."""
        return self.start()

    def __exit__(self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException],
                 traceback: Optional[TracebackType]) -> None:
        """Stop serving."""
        self.stop()


class FakeQueue:
    """Records what the service queues."""

    def __init__(self) -> None:
        self.staged: List[Tuple[int, List[int], float, int]] = []
        self.bundles: List[int] = []
        self.revoked: List[str] = []
        self.broken = False

    def enqueue_stage(self, cart_id: int, file_ids: Sequence[int], countdown: float = 0, tape_round: int = 0) -> str:
        if self.broken:
            raise ConnectionError('broker unreachable')
        self.staged.append((cart_id, list(file_ids), countdown, tape_round))
        return f'task-{len(self.staged)}'

    def enqueue_bundle(self, cart_id: int) -> str:
        self.bundles.append(cart_id)
        return 'bundle'

    def revoke(self, task_ids: Sequence[str]) -> None:
        self.revoked.extend(task_ids)


@dataclasses.dataclass
class FakeArchive:
    """Serves bytes from a dict; media and header presence per id are set by the test."""

    files: Dict[str, bytes]
    media: Dict[str, str] = dataclasses.field(default_factory=dict)
    stage_calls: List[str] = dataclasses.field(default_factory=list)
    status_calls: List[str] = dataclasses.field(default_factory=list)
    downloads: List[str] = dataclasses.field(default_factory=list)
    fail_downloads: int = 0

    def with_retries(self, action: Callable[[], T]) -> T:
        """Mirrors ArchiveClient.with_retries, without retrying."""
        return action()

    def problem(self) -> Optional[str]:
        """Mirrors ArchiveClient.problem: a fake archive always answers."""
        return None

    def status(self, archive_id: str) -> ArchiveStatus:
        self.status_calls.append(archive_id)
        media = self.media.get(archive_id, 'disk')
        if media == 'no-headers':
            return ArchiveStatus('', None, None, '')
        return ArchiveStatus(media, len(self.files[archive_id]), 1500000000.0, 'File was found')

    def stage(self, archive_id: str) -> None:
        self.stage_calls.append(archive_id)

    def download(self, archive_id: str, partial: pathlib.Path, hash_type: str, hash_value: str,
                 expected_size: Optional[int], progress: Optional[Callable[[], None]] = None,
                 offset: Optional[int] = None) -> Download:
        self.downloads.append(archive_id)
        if self.fail_downloads:
            self.fail_downloads -= 1
            raise ArchiveError('archive GET answered 503: busy')
        data = self.files[archive_id]
        if offset is None:
            partial.write_bytes(data)
        else:
            assert expected_size == len(data)
            with open(partial, 'r+b') as target:
                target.seek(offset)
                target.write(data)
        digest = new_hash(hash_type)
        digest.update(data)
        if digest.hexdigest() != hash_value:
            raise HashMismatch('File hash does not match provided hash')
        return Download(len(data), None)


def run_queue(service: 'CartService', queue: FakeQueue) -> None:
    """Run queued stage tasks like a worker would, tape re-checks included."""
    done = 0
    while done < len(queue.staged):
        cart_id, file_ids, _countdown, tape_round = queue.staged[done]
        done += 1
        on_tape = service.stage_files(cart_id, file_ids, tape_round)
        service.requeue_tape_files(cart_id, on_tape, tape_round)
        assert done < MAX_TASKS, 'tasks kept requeueing'
