"""A real HTTP receiver of completion events for tests: http.server in a thread on 127.0.0.1, recording every
request's headers and body; it can answer an error status, or be down (not listening) and come up later on
the same port."""
from __future__ import annotations

import http.server
import json
import threading
import time
from typing import Any, Dict, List, Optional

from .fakes import serve_in_thread, stop_serving
from .procs import free_port


Received = Dict[str, Any]  # one request: path, headers (lower-case names) and body (parsed JSON)


class EventReceiver:
    """Records POSTs; `status` is what it answers (200 unless a test sets another)."""

    def __init__(self, port: int = 0) -> None:
        """Listen on `port` once started (0: a port free now, kept across stop and start)."""
        self.port = port or free_port()
        self.status = 200
        self.requests: List[Received] = []
        self.refused: List[Received] = []  # requests answered with an error status
        self._lock = threading.Lock()
        self._server: Optional[http.server.ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        """The receiver's base URL, with a trailing slash."""
        return f'http://127.0.0.1:{self.port}/'

    def start(self) -> 'EventReceiver':
        """Start listening (again) on the same port."""
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802  (http.server's name)
                length = int(self.headers.get('Content-Length') or 0)
                raw = self.rfile.read(length)
                record: Received = dict(path=self.path, headers={k.lower(): v for k, v in self.headers.items()},
                                  body=json.loads(raw.decode('utf-8')))
                status = receiver.status
                with receiver._lock:
                    (receiver.requests if status < 300 else receiver.refused).append(record)
                self.send_response(status)
                self.send_header('Content-Length', '0')
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        deadline = time.monotonic() + 10
        while True:
            try:
                self._server = http.server.ThreadingHTTPServer(('127.0.0.1', self.port), Handler)
                break
            except OSError:  # the port is still in TIME_WAIT or was taken a moment: try a little longer
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self._thread = serve_in_thread(self._server)
        return self

    def stop(self) -> None:
        """Stop listening: connections to the port are refused until start() again."""
        stop_serving(self._server, self._thread)
        self._server = self._thread = None

    def __enter__(self) -> 'EventReceiver':
        return self.start()

    def __exit__(self, *_exc: Any) -> None:
        self.stop()

    def bodies(self, subject: Optional[str] = None) -> List[Dict[str, Any]]:
        """The bodies received with a 2xx answer, of one subject (cart uid) if given."""
        with self._lock:
            bodies = [record['body'] for record in self.requests]
        return [body for body in bodies if subject is None or body.get('subject') == subject]

    def wait_for(self, subject: str, count: int = 1, deadline_s: float = 30) -> List[Dict[str, Any]]:
        """Poll until `count` events of `subject` arrived (with a 2xx answer); return them."""
        deadline = time.monotonic() + deadline_s
        while len(self.bodies(subject)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f'{len(self.bodies(subject))} events of {subject} after {deadline_s} s, '
                                     f'{count} expected; received {self.bodies()}')
            time.sleep(0.05)
        return self.bodies(subject)


def quick_notifications(url: str, **settings: str) -> Dict[str, str]:
    """A [notifications] section sending to `url` with the short waits tests use (interval 0.2 s, retries from
    0.2 s to 1 s, a 2 s timeout) and the source urn:test:cartd; `settings` add or replace keys."""
    return {'url': url, 'source': 'urn:test:cartd', 'interval': '0.2', 'timeout': '2', 'retry_wait': '0.2',
            'retry_wait_max': '1', **settings}
