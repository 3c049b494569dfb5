"""A private RabbitMQ node for tests that stop and restart the broker (never the shared one on 5672).

The node runs from the installed RabbitMQ scripts (`/usr/lib/rabbitmq/bin/rabbitmq-server`, the
script the root-only `/usr/sbin` wrapper would `su` into) with everything of its own: node name,
AMQP and distribution ports, data and log directories, an empty env file (so the system
`rabbitmq-env.conf` cannot rename it to the shared node), an empty plugin list and a HOME holding
its own Erlang cookie. Stopping it and starting it again keeps its data directory, so durable
queues and persistent messages survive the restart, as on a real broker.
"""
from __future__ import annotations

import os
import pathlib
import secrets
import shutil
import socket
import subprocess
import time
from typing import Dict, List, Optional

from .procs import ManagedProcess, free_port

RABBITMQ_SERVER_CANDIDATES = (
    '/usr/lib/rabbitmq/bin/rabbitmq-server',
    '/usr/local/lib/rabbitmq/bin/rabbitmq-server',
)
START_TIMEOUT_S = 90.0


def rabbitmq_server_script() -> Optional[pathlib.Path]:
    """The rabbitmq-server script that runs a node as the calling user, or None when none is installed."""
    for candidate in RABBITMQ_SERVER_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return pathlib.Path(candidate)
    found = shutil.which('rabbitmq-server')
    if found is None:
        return None
    # /usr/sbin/rabbitmq-server is a wrapper that switches to the rabbitmq user (who could not
    # write our temp directories); prefer the script beside rabbitmqctl's real location
    real = pathlib.Path(found).resolve()
    return real if os.access(real, os.X_OK) else None


class PrivateRabbit:
    """One RabbitMQ node on 127.0.0.1 and free ports, owned by the test that made it."""

    def __init__(self, base_dir: pathlib.Path) -> None:
        """Lay out the node's directories and pick its name and ports; nothing runs until start()."""
        self.base_dir = base_dir
        self.node = f'cartd-test-{os.getpid()}-{secrets.token_hex(3)}@localhost'
        self.port = free_port()
        self.dist_port = free_port()
        while self.dist_port == self.port:
            self.dist_port = free_port()
        self.home = base_dir / 'home'
        self.process: Optional[ManagedProcess] = None
        self.starts = 0

    @property
    def url(self) -> str:
        """The broker URL for Celery (guest may log in from localhost)."""
        return f'pyamqp://guest:guest@127.0.0.1:{self.port}//'

    @property
    def log_path(self) -> pathlib.Path:
        """Where the node's console output (its log, RABBITMQ_LOGS=-) goes."""
        return self.base_dir / 'rabbitmq.log'

    def _prepare(self) -> None:
        for name in ('home', 'mnesia', 'log'):
            (self.base_dir / name).mkdir(parents=True, exist_ok=True)
        cookie = self.home / '.erlang.cookie'
        if not cookie.exists():
            cookie.write_text(secrets.token_hex(16).upper(), encoding='ascii')
            cookie.chmod(0o400)
        (self.base_dir / 'rabbitmq-env.conf').write_text('# private test node: nothing from /etc\n',
                                                         encoding='utf-8')
        (self.base_dir / 'enabled_plugins').write_text('[].\n', encoding='utf-8')
        (self.base_dir / 'rabbitmq.conf').write_text(
            f'listeners.tcp.default = 127.0.0.1:{self.port}\n'
            'loopback_users.guest = true\n'
            'disk_free_limit.absolute = 50MB\n', encoding='utf-8')

    def env(self) -> Dict[str, str]:
        """The node's environment: only its own files, names and ports."""
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(('RABBITMQ_', 'ERL_'))}
        env.update({
            'HOME': str(self.home),
            'RABBITMQ_CONF_ENV_FILE': str(self.base_dir / 'rabbitmq-env.conf'),
            'RABBITMQ_NODENAME': self.node,
            'RABBITMQ_NODE_IP_ADDRESS': '127.0.0.1',
            'RABBITMQ_NODE_PORT': str(self.port),
            'RABBITMQ_DIST_PORT': str(self.dist_port),
            'RABBITMQ_MNESIA_BASE': str(self.base_dir / 'mnesia'),
            'RABBITMQ_LOG_BASE': str(self.base_dir / 'log'),
            'RABBITMQ_LOGS': '-',
            'RABBITMQ_CONFIG_FILE': str(self.base_dir / 'rabbitmq.conf'),
            'RABBITMQ_ENABLED_PLUGINS_FILE': str(self.base_dir / 'enabled_plugins'),
            'RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS': '-kernel inet_dist_use_interface {127,0,0,1}',
            'ERL_EPMD_ADDRESS': '127.0.0.1',
        })
        return env

    def start(self, timeout: float = START_TIMEOUT_S) -> 'PrivateRabbit':
        """Start the node (again, on the same ports and data) and wait until it takes AMQP logins."""
        script = rabbitmq_server_script()
        if script is None:
            raise RuntimeError('no rabbitmq-server script is installed')
        if self.process is not None and self.process.running():
            raise RuntimeError('the private RabbitMQ node is already running')
        self._prepare()
        self.starts += 1
        self.process = ManagedProcess([str(script)], self.log_path, env=self.env(), cwd=self.base_dir,
                                      name=f'rabbitmq-{self.starts}').start()
        self.wait_ready(timeout)
        return self

    def answers_amqp(self, timeout: float = 2.0) -> bool:
        """Tell whether the node accepts an AMQP login now."""
        try:
            with socket.create_connection(('127.0.0.1', self.port), timeout=timeout):
                pass
        except OSError:
            return False
        from kombu.connection import Connection  # pylint: disable=import-outside-toplevel
        try:
            with Connection(self.url, connect_timeout=timeout) as conn:
                conn.connect()
                return True
        except Exception:  # pylint: disable=broad-except
            return False

    def wait_ready(self, timeout: float) -> None:
        """Wait until the node takes AMQP logins; raise RuntimeError with its log when it dies or is late."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while not self.answers_amqp():
            if not self.process.running():
                raise RuntimeError(f'rabbitmq-server exited with {self.process.returncode}:\n'
                                   f'{self.process.log_tail(30)}')
            if time.monotonic() > deadline:
                raise RuntimeError(f'rabbitmq-server took no AMQP login within {timeout} s:\n'
                                   f'{self.process.log_tail(30)}')
            time.sleep(0.25)

    def queue_depth(self, queue: str) -> Optional[int]:
        """Messages ready in a queue, or None when the node does not answer."""
        from kombu.connection import Connection  # pylint: disable=import-outside-toplevel
        try:
            with Connection(self.url, connect_timeout=2) as conn:
                channel = conn.channel()
                return int(channel.queue_declare(queue, passive=True).message_count)
        except Exception:  # pylint: disable=broad-except
            return None

    def ctl(self, *args: str, timeout: float = 30) -> 'subprocess.CompletedProcess[str]':
        """Run rabbitmqctl against this node (same cookie, same env)."""
        script = rabbitmq_server_script()
        assert script is not None
        return subprocess.run([str(script.parent / 'rabbitmqctl'), '-n', self.node, *args], env=self.env(),
                              capture_output=True, text=True, timeout=timeout, check=False)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the node (a clean broker shutdown) and wait for it; its data stays for the next start."""
        if self.process is not None:
            self.process.stop(timeout)

    def kill9(self) -> None:
        """SIGKILL the node, as a crash would."""
        if self.process is not None:
            self.process.kill9()

    def logs(self) -> List[str]:
        """Tail of the node's output."""
        return self.process.log_tail(30).splitlines() if self.process else []
