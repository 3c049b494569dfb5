"""The services under test: our cart (cartd_testkit's CartStack), the published 0.7.0, and nginx for the limits."""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import time
import uuid
from typing import Dict, List, Mapping, Optional, Tuple

from cartd_testkit.archive import ArchiveServer
from cartd_testkit.broker import BROKER_URL
from cartd_testkit.procs import ManagedProcess, free_port
from cartd_testkit.stack import CartStack, write_config

from .tools import apt_binary

# The same CherryPy settings for both carts (the project's server.conf without its address and port;
# each server gets -p/-a on its command line).
CPCONFIG = """[global]
log.screen: True
server.thread_pool: {threads}

[/]
request.dispatch: cherrypy.dispatch.MethodDispatcher()
tools.response_headers.on: True
tools.response_headers.headers: [('Content-Type', 'application/json')]
"""

# Our cart with its documented defaults, not the short timeouts the tests use.
PRODUCTION_SETTINGS: Dict[str, Dict[str, str]] = {
    'cartd': {'transfer_size': '4 Mb', 'stage_concurrency': '8', 'stage_batch_size': '32'},
    'archiveinterface': {'timeout': '60', 'retries': '4', 'retry_wait': '1', 'tape_wait': '5',
                         'tape_wait_max': '300'},
}


def write_cpconfig(path: pathlib.Path, threads: int, extra: Optional[Mapping[str, str]] = None) -> pathlib.Path:
    """Write the CherryPy file both servers use, with `extra` [global] settings (raw values) added."""
    text = CPCONFIG.format(threads=threads)
    if extra:
        lines = ''.join(f'{key}: {value}\n' for key, value in extra.items())
        text = text.replace('\n\n[/]', f'\n{lines}\n[/]', 1)
    path.write_text(text, encoding='utf-8')
    return path


class OurStack(CartStack):
    """The project's cart: cartd_testkit's CartStack with production settings and a real cpconfig."""

    label = 'ours'

    def __init__(self, base_dir: pathlib.Path, archive: ArchiveServer, peewee_url: str, workers: int,
                 concurrency: int, server_threads: int, overrides: Mapping[str, Mapping[str, str]],
                 cpconfig: Optional[Mapping[str, str]] = None) -> None:
        """Lay out the stack; nothing runs until start()."""
        sections: Dict[str, Dict[str, str]] = {name: dict(values) for name, values in PRODUCTION_SETTINGS.items()}
        for name, values in overrides.items():
            sections.setdefault(name, {}).update(values)
        super().__init__(base_dir, archive, peewee_url, workers=workers, concurrency=concurrency,
                         overrides=sections)
        self.cpconfig = write_cpconfig(base_dir / 'cpconfig.ini', server_threads, cpconfig)

    @property
    def env(self) -> Dict[str, str]:
        """CartStack's environment, with our cpconfig."""
        env = CartStack.env.fget(self)  # type: ignore[attr-defined]
        env['CARTD_CPCONFIG'] = str(self.cpconfig)
        return env

    def pids(self) -> Dict[str, int]:
        """label -> pid of the server and each worker's main process."""
        assert self.server is not None
        found = {'server': self.server.pid}
        for index, worker in enumerate(self.workers, 1):
            found[f'worker{index}'] = worker.pid
        return found

    def after_workload(self, uids: List[str]) -> None:
        """Free the volume: DELETE the carts."""
        import requests  # pylint: disable=import-outside-toplevel
        import sys  # pylint: disable=import-outside-toplevel
        started = time.monotonic()
        for uid in uids:
            try:
                answer = requests.delete(f'{self.url}/{uid}', timeout=300)
                if answer.status_code != 200:
                    print(f'# ours: DELETE {uid} answered {answer.status_code}', file=sys.stderr, flush=True)
            except requests.RequestException as exc:
                print(f'# ours: DELETE {uid} failed: {exc}', file=sys.stderr, flush=True)
        self.last_delete_s = time.monotonic() - started
        print(f'# ours: DELETE of {len(uids)} cart(s) took {self.last_delete_s:.2f} s', file=sys.stderr, flush=True)

    def staged_count(self, uid: str) -> Optional[int]:
        """Files of the cart staged so far (not needed: ours has no deadline)."""
        del uid
        return None


def rabbitmqctl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run rabbitmqctl (used to give 0.7.0 a vhost of its own)."""
    return subprocess.run(['rabbitmqctl', *args], capture_output=True, text=True, timeout=timeout, check=False)


class ReferenceStack:
    """The published pacifica-cartd 0.7.0 from its own venv, on MariaDB and a RabbitMQ vhost of its own.

    0.7.0 always uses the queue 'celery'; in its own vhost no other consumer can take its tasks.
    """

    label = '0.7.0'

    def __init__(self, base_dir: pathlib.Path, archive: ArchiveServer, bin_dir: pathlib.Path, peewee_url: str,
                 workers: int, concurrency: int, server_threads: int) -> None:
        """Lay out the stack; nothing runs until start()."""
        self.base_dir = base_dir
        self.bin_dir = bin_dir
        self.volume = base_dir / 'volume'
        self.peewee_url = peewee_url
        self.worker_count = workers
        self.concurrency = concurrency
        self.vhost = f'cartd-bench-{os.getpid()}-{uuid.uuid4().hex[:6]}'
        self.broker_url = BROKER_URL.rstrip('/') + '/' + self.vhost
        self.port = 0
        base_dir.mkdir(parents=True, exist_ok=True)
        self.volume.mkdir(parents=True, exist_ok=True)
        self.config = write_config(base_dir / 'config.cfg', {
            'cartd': {'volume_path': str(self.volume) + '/', 'transfer_size': '4 Mb'},
            'archiveinterface': {'url': archive.url},
            'celery': {'broker_url': self.broker_url, 'backend_url': 'rpc://'},
            'database': {'peewee_url': peewee_url, 'connect_attempts': '3', 'connect_wait': '1'},
        })
        self.cpconfig = write_cpconfig(base_dir / 'cpconfig.ini', server_threads)
        self.workers: List[ManagedProcess] = []
        self.server: Optional[ManagedProcess] = None
        self._vhost_made = False
        self._serial = 0

    @property
    def env(self) -> Dict[str, str]:
        """Only the config files; nothing inherited that 0.7.0 would read instead."""
        env = {key: value for key, value in os.environ.items()
               if key not in ('PYTHONPATH', 'VOLUME_PATH', 'PEEWEE_URL', 'BROKER_URL', 'BACKEND_URL',
                              'TRANSFER_SIZE', 'ARCHIVE_INTERFACE_URL')}
        env['CARTD_CONFIG'] = str(self.config)
        env['CARTD_CPCONFIG'] = str(self.cpconfig)
        return env

    @property
    def url(self) -> str:
        """The server's base URL."""
        return f'http://127.0.0.1:{self.port}'

    def _make_vhost(self) -> None:
        made = rabbitmqctl('add_vhost', self.vhost)
        if made.returncode != 0:
            raise RuntimeError(f'rabbitmqctl add_vhost failed: {made.stdout}{made.stderr}')
        self._vhost_made = True
        allowed = rabbitmqctl('set_permissions', '-p', self.vhost, 'guest', '.*', '.*', '.*')
        if allowed.returncode != 0:
            raise RuntimeError(f'rabbitmqctl set_permissions failed: {allowed.stdout}{allowed.stderr}')

    def start(self) -> 'ReferenceStack':
        """vhost, dbsync, workers, server."""
        self._make_vhost()
        synced = subprocess.run([str(self.bin_dir / 'pacifica-cartd-cmd'), 'dbsync'], env=self.env,
                                cwd=self.base_dir, capture_output=True, text=True, timeout=120, check=False)
        if synced.returncode != 0:
            raise RuntimeError(f'0.7.0 dbsync failed: {synced.stdout}{synced.stderr}')
        self._start_workers()
        self.port = free_port()
        self.server = ManagedProcess(
            [str(self.bin_dir / 'pacifica-cartd'), '-p', str(self.port), '-a', '127.0.0.1',
             '--cpconfig', str(self.cpconfig)],
            self.base_dir / 'server.log', env=self.env, cwd=self.base_dir, name='cartd-0.7.0').start()
        self.server.wait_http(self.url + '/', 60)
        self._wait_workers()
        return self

    def _start_workers(self) -> None:
        for _ in range(self.worker_count):
            self._serial += 1
            self.workers.append(ManagedProcess(
                [str(self.bin_dir / 'celery'), '-A', 'pacifica.cartd.tasks', 'worker', '--loglevel', 'WARNING',
                 '--concurrency', str(self.concurrency), '--without-gossip', '--without-mingle',
                 '--without-heartbeat', '-n', f'ref{self._serial}-{self.vhost}@%h'],
                self.base_dir / f'worker{self._serial}.log', env=self.env, cwd=self.base_dir,
                name=f'ref-worker{self._serial}').start())

    def _wait_workers(self, deadline_s: float = 60) -> None:
        """Wait until the workers consume from the vhost's queue."""
        from kombu import Connection  # pylint: disable=import-outside-toplevel
        deadline = time.monotonic() + deadline_s
        with Connection(self.broker_url, connect_timeout=5) as conn:
            channel = conn.channel()
            while True:
                for worker in self.workers:
                    if not worker.running():
                        raise RuntimeError(f'{worker.name} died:\n{worker.log_tail()}')
                try:
                    _, _, consumers = channel.queue_declare('celery', passive=True)
                except Exception:  # pylint: disable=broad-except  (not declared yet)
                    channel = conn.channel()
                    consumers = 0
                if consumers >= len(self.workers):
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f'0.7.0 workers not consuming after {deadline_s} s')
                time.sleep(0.3)

    def pids(self) -> Dict[str, int]:
        """label -> pid of the server and each worker's main process."""
        assert self.server is not None
        found = {'server': self.server.pid}
        for index, worker in enumerate(self.workers, 1):
            found[f'worker{index}'] = worker.pid
        return found

    def staged_count(self, uid: str) -> Optional[int]:
        """How many files of the newest cart with this uid 0.7.0 has staged (from its database)."""
        from urllib.parse import urlparse  # pylint: disable=import-outside-toplevel

        import pymysql  # pylint: disable=import-outside-toplevel
        where = urlparse(self.peewee_url)
        conn = pymysql.connect(host=where.hostname, port=where.port or 3306, user=where.username or 'root',
                               password=where.password or '', database=where.path.lstrip('/'), connect_timeout=10)
        try:
            with conn.cursor() as cursor:
                cursor.execute("SELECT COUNT(*) FROM file f JOIN cart c ON f.cart_id = c.id "
                               "WHERE c.cart_uid = %s AND f.status = 'staged'", (uid,))
                row = cursor.fetchone()
                return int(row[0]) if row else 0
        finally:
            conn.close()

    def reset(self) -> None:
        """Drop all queued work: stop the workers, purge the queue, start them again."""
        for worker in self.workers:
            worker.stop()
        self.workers = []
        from kombu import Connection  # pylint: disable=import-outside-toplevel
        with Connection(self.broker_url, connect_timeout=5) as conn:
            conn.channel().queue_purge('celery')
        self._start_workers()
        self._wait_workers()

    def after_workload(self, uids: List[str]) -> None:
        """Free the volume: remove the carts' directories (a DELETE of 0.7.0 revokes every task one by one)."""
        del uids
        for entry in self.volume.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    def stop(self) -> None:
        """Stop every process and remove the vhost."""
        if self.server is not None:
            self.server.stop()
        for worker in self.workers:
            worker.stop()
        if self._vhost_made:
            rabbitmqctl('delete_vhost', self.vhost)
            self._vhost_made = False

    def logs(self) -> str:
        """The tails of every log."""
        return '\n'.join(f'--- {proc.name} ---\n{proc.log_tail(30)}' for proc in [self.server, *self.workers] if proc)


NGINX_CONFIG = """{user}worker_processes 2;
daemon off;
master_process on;
pid {state}/nginx.pid;
error_log {state}/error.log warn;
events {{ worker_connections 512; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    default_type application/octet-stream;
    client_body_temp_path {state}/client_body;
    proxy_temp_path {state}/proxy;
    fastcgi_temp_path {state}/fastcgi;
    uwsgi_temp_path {state}/uwsgi;
    scgi_temp_path {state}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ }}
    }}
}}
"""


def find_nginx(install: bool) -> Optional[str]:
    """The nginx binary; with `install`, apt-get install nginx-light when it is missing and we are root."""
    return apt_binary('nginx', 'nginx-light', install)


class Nginx:
    """nginx (sendfile on) serving a directory on 127.0.0.1, in the foreground, stopped by its pid."""

    def __init__(self, binary: str, root: pathlib.Path, state: pathlib.Path) -> None:
        """Describe the server; nothing runs until start()."""
        self.binary = binary
        self.root = root
        self.state = state
        self.port = 0
        self.process: Optional[ManagedProcess] = None

    @property
    def url(self) -> str:
        """Base URL ending in '/'."""
        return f'http://127.0.0.1:{self.port}/'

    @property
    def pid(self) -> int:
        """The master's pid (its workers are its children)."""
        assert self.process is not None
        return self.process.pid

    def start(self) -> 'Nginx':
        """Write the config and start nginx; wait for it to answer."""
        self.state.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        user = 'user root;\n' if os.geteuid() == 0 else ''  # workers must read the private temp dirs
        config = self.state / 'nginx.conf'
        config.write_text(NGINX_CONFIG.format(user=user, state=self.state, port=self.port, root=self.root),
                          encoding='utf-8')
        self.process = ManagedProcess([self.binary, '-c', str(config), '-p', str(self.state), '-e',
                                       str(self.state / 'error.log')],
                                      self.state / 'nginx.out', name='nginx').start()
        self.process.wait_http(self.url, 30)
        return self

    def stop(self) -> None:
        """Stop nginx (its process group)."""
        if self.process is not None:
            self.process.stop()


# Keys of a shipped uwsgi.ini that the benchmark replaces or leaves out: where it listens (the
# benchmark listens on 127.0.0.1 and a free port only), how many processes it runs (the workload
# chooses), and whatever would detach it, redirect its log, change its user or point it at other
# cart configs (the benchmark stops it by its PID and gives it the stack's files).
UWSGI_SOCKET_KEYS = ('http-socket', 'http11-socket', 'http', 'socket', 'https-socket', 'https', 'uwsgi-socket',
                     'shared-socket')
UWSGI_DROPPED_KEYS = UWSGI_SOCKET_KEYS + ('processes', 'workers', 'p', 'daemonize', 'daemonize2', 'pidfile',
                                          'pidfile2', 'logto', 'logto2', 'master-fifo', 'stats', 'uid', 'gid')
UWSGI_THREADS = 8
UWSGI_MASTER_STARTED = 'cartd-bench: uwsgi master loop started'


def _ini_key(line: str) -> str:
    """The option name of an ini line ('' for comments, section headers and blank lines)."""
    text = line.strip()
    if not text or text[0] in ';#[' or '=' not in text:
        return ''
    return text.split('=', 1)[0].strip()


def uwsgi_command(uwsgi: str, port: int, processes: int, state_dir: pathlib.Path,
                  repo: pathlib.Path) -> Tuple[List[str], str]:
    """The one uWSGI command line of the benchmarks, and a sentence saying which form was used.

    When the repository ships `uwsgi.ini` (its production settings), that file is used with only
    the socket and process count set here: a copy without the keys in UWSGI_DROPPED_KEYS (uWSGI
    adds every socket option it is given rather than replacing one, so the file's own socket
    would also be bound), then the file's own kind of socket on 127.0.0.1:port and --processes.
    Otherwise the line the brief and the docs give. Either way a master-start hook prints a line
    once the master's signal handlers are in place (a SIGTERM sent before that is lost).
    """
    hook = ['--hook-master-start', f'print:{UWSGI_MASTER_STARTED}']
    shipped = repo / 'uwsgi.ini'
    if shipped.is_file():
        kept: List[str] = []
        dropped: List[str] = []
        socket_key = 'http-socket'
        for line in shipped.read_text(encoding='utf-8').splitlines():
            key = _ini_key(line)
            if key in UWSGI_SOCKET_KEYS and socket_key == 'http-socket':
                socket_key = key
            if key in UWSGI_DROPPED_KEYS or (key == 'env' and 'CARTD_' in line):
                dropped.append(key)
                continue
            kept.append(line)
        copy = state_dir / 'uwsgi.ini'
        copy.write_text('\n'.join(kept) + '\n', encoding='utf-8')
        cmd = [uwsgi, '--ini', str(copy), f'--{socket_key}', f'127.0.0.1:{port}', '--processes', str(processes),
               *hook]
        how = (f'uwsgi --ini {shipped.name} (the repository\'s, without {", ".join(sorted(set(dropped))) or "nothing"})'
               f' --{socket_key} 127.0.0.1:PORT --processes {processes}')
        return cmd, how
    cmd = [uwsgi, '--http-socket', f'127.0.0.1:{port}', '--master', '--module', 'pacifica.cartd.wsgi', '--need-app',
           '--die-on-term', '--processes', str(processes), '--threads', str(UWSGI_THREADS),
           '--worker-reload-mercy', '5', '--reload-mercy', '5', *hook]
    how = (f'no uwsgi.ini in the repository: uwsgi --http-socket 127.0.0.1:PORT --master --module '
           f'pacifica.cartd.wsgi --need-app --die-on-term --processes {processes} --threads {UWSGI_THREADS} '
           f'--worker-reload-mercy 5 --reload-mercy 5')
    return cmd, how


class UwsgiServer:
    """Our cart's API under uWSGI, beside a running OurStack (same config, database and volume)."""

    def __init__(self, stack: OurStack, processes: int, repo: pathlib.Path, name: str = '') -> None:
        """Describe the server; nothing runs until start()."""
        self.stack = stack
        self.processes = processes
        self.repo = repo
        self.name = name or f'uwsgi-{processes}p'
        self.state = stack.base_dir / self.name
        self.port = 0
        self.process: Optional[ManagedProcess] = None
        self.how = ''

    @property
    def url(self) -> str:
        """The server's base URL (no trailing slash)."""
        return f'http://127.0.0.1:{self.port}'

    @property
    def pid(self) -> int:
        """The master's pid (its workers are its children)."""
        assert self.process is not None
        return self.process.pid

    def start(self, deadline_s: float = 60) -> 'UwsgiServer':
        """Start uWSGI; wait until GET / answers and the master loop runs."""
        self.state.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        cmd, self.how = uwsgi_command(str(pathlib.Path(sys.executable).parent / 'uwsgi'), self.port,
                                      self.processes, self.state, self.repo)
        self.process = ManagedProcess(cmd, self.state / 'uwsgi.log', env=self.stack.env, cwd=self.state,
                                      name=self.name).start()
        try:
            self.process.wait_http(self.url + '/', deadline_s)
            deadline = time.monotonic() + 30
            while UWSGI_MASTER_STARTED not in self.process.log_path.read_text(
                    encoding='utf-8', errors='replace').replace(f'print:{UWSGI_MASTER_STARTED}', ''):
                if not self.process.running() or time.monotonic() > deadline:
                    raise RuntimeError(f'uwsgi master loop did not start:\n{self.process.log_tail()}')
                time.sleep(0.05)
        except BaseException:
            self.process.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop uWSGI (its process group)."""
        if self.process is not None:
            self.process.stop()

    def __enter__(self) -> 'UwsgiServer':
        """Start it."""
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        """Stop it."""
        self.stop()
