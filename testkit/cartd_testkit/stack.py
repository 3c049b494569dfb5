"""A running cart for end-to-end tests: config file, dbsync, celery workers and the server, as subprocesses."""
from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import subprocess
import tarfile
import time
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import requests

from .archive import ArchiveServer
from .broker import BROKER_URL, delete_queue, unique_queue_name
from .databases import KINDS, drop_database
from .procs import BIN_DIR, ManagedProcess, binary, free_port  # noqa: F401  (BIN_DIR, binary: also imported from here)
from .uwsgi import start_uwsgi

TEST_SETTINGS: Dict[str, Dict[str, str]] = {
    'cartd': {'transfer_size': '1 Mb', 'stage_concurrency': '4', 'stage_batch_size': '16'},
    'archiveinterface': {'timeout': '10', 'retries': '2', 'retry_wait': '0.2', 'tape_wait': '0.5',
                         'tape_wait_max': '2'},
    'database': {'connect_attempts': '3', 'connect_wait': '1'},
}

# share_staged_files off and on: the modes the end-to-end tests of eviction, crashes and load run in.
CACHE_MODES: Tuple[bool, ...] = (False, True)


def cache_id(share_staged_files: bool) -> str:
    """A test id's word for the mode: 'cache' (share_staged_files on) or 'nocache'."""
    return 'cache' if share_staged_files else 'nocache'


# (database kind, share_staged_files) for every database in both modes: params of a stack fixture.
KINDS_AND_CACHE_MODES: Tuple[Tuple[str, bool], ...] = tuple((kind, share) for kind in KINDS for share in CACHE_MODES)


def kind_and_cache_id(param: Tuple[str, bool]) -> str:
    """The test id of a KINDS_AND_CACHE_MODES param: 'sqlite-cache', 'mysql-nocache', ..."""
    kind, share = param
    return f'{kind}-{cache_id(share)}'


def write_config(path: pathlib.Path, sections: Mapping[str, Mapping[str, str]]) -> pathlib.Path:
    """Write an INI file from {section: {key: value}}."""
    lines: List[str] = []
    for section, values in sections.items():
        lines.append(f'[{section}]')
        lines.extend(f'{key} = {value}' for key, value in values.items())
        lines.append('')
    path.write_text('\n'.join(lines), encoding='utf-8')
    return path


class CartStack:
    """The cart under test: its config, database, queue, workers and server."""

    def __init__(self, base_dir: pathlib.Path, archive: ArchiveServer, peewee_url: str, workers: int = 2,
                 concurrency: int = 2, overrides: Optional[Mapping[str, Mapping[str, str]]] = None,
                 server: str = 'cartd', share_staged_files: Optional[bool] = None) -> None:
        """Lay out the stack's directory and config; nothing runs until start().

        `server`: 'cartd' (pacifica-cartd's own server) or 'uwsgi' (uWSGI as the docs run it).
        `share_staged_files`: written into the config file when given (the file wins over the
        environment); None leaves it to SHARE_STAGED_FILES in the environment, or the default.
        """
        if server not in ('cartd', 'uwsgi'):
            raise ValueError(f'unknown server {server!r}')
        self.server_kind = server
        self.share_staged_files = share_staged_files
        self.base_dir = base_dir
        self.archive = archive
        self.peewee_url = peewee_url
        self.volume = base_dir / 'volume'
        self.queue = unique_queue_name()
        self.port = 0
        self.worker_count = workers
        self.concurrency = concurrency
        sections: Dict[str, Dict[str, str]] = {name: dict(values) for name, values in TEST_SETTINGS.items()}
        sections['cartd']['volume_path'] = str(self.volume)
        sections['archiveinterface']['url'] = archive.url
        sections['celery'] = {'broker_url': BROKER_URL, 'backend_url': 'rpc://', 'queue': self.queue}
        sections['database']['peewee_url'] = peewee_url
        if share_staged_files is not None:
            sections['cartd']['share_staged_files'] = 'on' if share_staged_files else 'off'
        for name, values in (overrides or {}).items():
            sections.setdefault(name, {}).update(values)
        base_dir.mkdir(parents=True, exist_ok=True)
        # Workers check in with the database unless worker_heartbeat is 0 (pacifica.cartd.workers).
        self.checks_in = float(sections['cartd'].get('worker_heartbeat', '10')) > 0
        self.config = write_config(base_dir / 'config.cfg', sections)
        self.workers: List[ManagedProcess] = []
        self.server: Optional[ManagedProcess] = None
        self._worker_serial = 0

    @property
    def env(self) -> Dict[str, str]:
        """Environment of every cart process: only the config file, nothing inherited that could leak."""
        env = {key: value for key, value in os.environ.items()
               if key not in ('PYTHONPATH', 'VOLUME_PATH', 'PEEWEE_URL', 'BROKER_URL', 'CELERY_QUEUE')}
        env['CARTD_CONFIG'] = str(self.config)
        env['CARTD_CPCONFIG'] = str(self.base_dir / 'no-cpconfig.ini')
        return env

    @property
    def url(self) -> str:
        """The server's base URL (no trailing slash)."""
        return f'http://127.0.0.1:{self.port}'

    def run_cmd(self, *args: str, timeout: float = 120) -> 'subprocess.CompletedProcess[str]':
        """Run pacifica-cartd-cmd with this stack's config."""
        return subprocess.run([binary('pacifica-cartd-cmd'), *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout, check=False)

    def dbsync(self) -> None:
        """Create the schema through the real entry point."""
        result = self.run_cmd('dbsync')
        if result.returncode != 0:
            raise RuntimeError(f'dbsync failed: {result.stdout}\n{result.stderr}')

    def start_worker(self) -> ManagedProcess:
        """Start one more `celery -A pacifica.cartd.tasks worker` on this stack's queue."""
        self._worker_serial += 1
        name = f'worker{self._worker_serial}'
        worker = ManagedProcess(
            [binary('celery'), '-A', 'pacifica.cartd.tasks', 'worker', '--loglevel', 'INFO',
             '--concurrency', str(self.concurrency), '--without-gossip', '--without-mingle',
             '--without-heartbeat', '-n', f'{name}-{self.queue}@%h'],
            self.base_dir / f'{name}.log', env=self.env, cwd=self.base_dir, name=name).start()
        self.workers.append(worker)
        return worker

    def wait_workers_ready(self, deadline_s: float = 60) -> None:
        """Wait until every worker logs that it is ready (and has checked in, so servers see it)."""
        deadline = time.monotonic() + deadline_s
        for worker in self.workers:
            while not self.worker_ready(worker):
                if not worker.running():
                    raise RuntimeError(f'{worker.name} died:\n{worker.log_tail()}')
                if time.monotonic() > deadline:
                    raise RuntimeError(f'{worker.name} not ready:\n{worker.log_tail()}')
                time.sleep(0.2)

    def worker_ready(self, worker: ManagedProcess) -> bool:
        """Whether `worker` has logged that it is ready and, where workers check in, that it has."""
        tail = worker.log_tail(200)
        return ' ready.' in tail and (not self.checks_in or ') checked in;' in tail)

    def start_server(self) -> ManagedProcess:
        """Start the server (pacifica-cartd or uWSGI) on a free port and wait for GET / to answer."""
        self.port = self.port or free_port()
        if self.server_kind == 'uwsgi':
            self.server = start_uwsgi(self.base_dir, self.env, self.port, shipped=True)  # uwsgi.ini, as documented
            return self.server
        self.server = ManagedProcess([binary('pacifica-cartd'), '-p', str(self.port), '-a', '127.0.0.1'],
                                     self.base_dir / 'server.log', env=self.env, cwd=self.base_dir,
                                     name='pacifica-cartd').start()
        self.server.wait_http(self.url + '/', 60)
        return self.server

    def start(self) -> 'CartStack':
        """dbsync, workers, server."""
        self.dbsync()
        for _ in range(self.worker_count):
            self.start_worker()
        self.start_server()
        self.wait_workers_ready()
        return self

    def stop(self) -> None:
        """Stop every process this stack started and delete its queue."""
        if self.server is not None:
            self.server.stop()
        for worker in self.workers:
            worker.stop()
        try:
            delete_queue(self.queue)
        except Exception:  # pylint: disable=broad-except
            pass

    def logs(self) -> str:
        """The tails of every log, for assertion messages."""
        parts = [f'--- {proc.name} ---\n{proc.log_tail(60)}' for proc in [self.server, *self.workers] if proc]
        return '\n'.join(parts)

    # ---- client side -----------------------------------------------------------------

    def post(self, uid: str, fileids: Sequence[Mapping[str, Any]], **extra: Any) -> requests.Response:
        """POST a cart."""
        body = {'fileids': list(fileids), **extra}
        return requests.post(f'{self.url}/{uid}', data=json.dumps(body),
                             headers={'Content-Type': 'application/json'}, timeout=60)

    def head(self, uid: str) -> requests.Response:
        """HEAD a cart."""
        return requests.head(f'{self.url}/{uid}', timeout=30)

    def wait_final(self, uid: str, deadline_s: float = 120) -> requests.Response:
        """Poll HEAD until the cart is no longer staging; return the last answer."""
        deadline = time.monotonic() + deadline_s
        while True:
            answer = self.head(uid)
            if answer.headers.get('X-Pacifica-Status') != 'staging':
                return answer
            if time.monotonic() > deadline:
                raise AssertionError(f'cart {uid} still staging after {deadline_s} s\n{self.logs()}')
            time.sleep(0.1)

    def download(self, uid: str, filename: Optional[str] = None, **headers: str) -> requests.Response:
        """GET the cart's tar."""
        params = {} if filename is None else {'filename': filename}
        return requests.get(f'{self.url}/{uid}', params=params, headers=headers, timeout=120)

    def delete(self, uid: str) -> requests.Response:
        """DELETE a cart."""
        return requests.delete(f'{self.url}/{uid}', timeout=30)


@contextlib.contextmanager
def running(stack: CartStack, kind: str, url: str) -> Iterator[CartStack]:
    """Start the stack; afterwards stop it and drop its database (made by fresh_database)."""
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
        drop_database(kind, url)


def tar_contents(body: bytes) -> Dict[str, bytes]:
    """Member name -> bytes for the regular files in a tar."""
    contents: Dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(body), mode='r:') as archive:
        for member in archive.getmembers():
            if member.isfile():
                extracted = archive.extractfile(member)
                assert extracted is not None
                contents[member.name] = extracted.read()
    return contents
