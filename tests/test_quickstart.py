"""The README's quick start: one command starts a working cart with no broker or database server.

The test runs scripts/quickstart.sh as a new user would (only the virtual environments come
from the test run instead of PyPI, and the ports are free ones), then the README's own curl
commands, then `scripts/quickstart.sh stop`.
"""
from __future__ import annotations

import io
import os
import pathlib
import re
import socket
import subprocess
import sys
import tarfile
import time
from typing import Dict, Iterator, List, Set

import pytest

from pacifica.cartd.config import load_settings
from pacifica.cartd.errors import ConfigError
from pacifica.cartd.celeryapp import celery_settings, check_broker
from cartd_testkit.procs import free_port
from cartd_testkit.venvs import archive_venv

REPO = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = REPO / 'scripts' / 'quickstart.sh'
README_PORT = '8081'
RABBITMQ_PORT = 5672
SERVICES = ('archive', 'worker', 'server')


def readme_commands() -> List[str]:
    """The shell commands of the README's "Quick start" section, a command per item (continued lines joined)."""
    text = (REPO / 'README.md').read_text(encoding='utf-8')
    section = re.search(r'^## Quick start\b.*?$(.*?)^## ', text, flags=re.M | re.S)
    assert section, 'README.md has no "## Quick start" section'
    commands: List[str] = []
    for block in re.findall(r'^```sh\n(.*?)^```', section.group(1), flags=re.M | re.S):
        for line in block.splitlines():
            if commands and (commands[-1].endswith('\\') or commands[-1].count("'") % 2):
                commands[-1] += '\n' + line
            elif line.strip() and not line.lstrip().startswith('#'):
                commands.append(line.strip())
    return commands


def started_at(pid: int) -> str:
    """The process's start time in clock ticks (field 22 of /proc/PID/stat), or '' when it is gone."""
    try:
        stat = pathlib.Path(f'/proc/{pid}/stat').read_text(encoding='utf-8')
    except (FileNotFoundError, ProcessLookupError):
        return ''
    return stat.rsplit(') ', 1)[1].split()[19]


def group_members(pgid: int) -> Set[int]:
    """Every process whose process group is pgid."""
    members = set()
    for entry in pathlib.Path('/proc').iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / 'stat').read_text(encoding='utf-8').rsplit(') ', 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[2]) == pgid:
                members.add(int(entry.name))
    return members


def remote_ports(pids: Set[int]) -> Set[int]:
    """The remote ports of every TCP connection these processes hold (from /proc/net/tcp{,6})."""
    inodes = set()
    for pid in pids:
        try:
            for fd in pathlib.Path(f'/proc/{pid}/fd').iterdir():
                target = os.readlink(fd) if fd.is_symlink() else ''
                if target.startswith('socket:['):
                    inodes.add(target[len('socket:['):-1])
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    ports = set()
    for table in ('/proc/net/tcp', '/proc/net/tcp6'):
        for row in pathlib.Path(table).read_text(encoding='utf-8').splitlines()[1:]:
            fields = row.split()
            if fields[9] in inodes:
                ports.add(int(fields[2].rsplit(':', 1)[1], 16))
    return ports


def run(command: str, cwd: pathlib.Path, env: Dict[str, str], timeout: float = 60) -> str:
    """Run a shell command; fail the test with its output unless it exits 0."""
    result = subprocess.run(['bash', '-euo', 'pipefail', '-c', command], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f'{command} exited {result.returncode}:\n{result.stdout}'
    return result.stdout


class QuickStart:
    """One quick start in a temp directory, on free ports, with the test run's virtual environments."""

    def __init__(self, tmp_path: pathlib.Path) -> None:
        """Choose the directory, the ports and the environment of the script."""
        self.dir = tmp_path / 'quickstart'
        self.workdir = tmp_path / 'user'
        self.workdir.mkdir()
        self.port = str(free_port())
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(('QUICKSTART_', 'CARTD_', 'PYTHON')) and key not in ('BROKER_URL', 'PEEWEE_URL')}
        env.update({
            'QUICKSTART_DIR': str(self.dir),
            'QUICKSTART_PORT': self.port,
            'QUICKSTART_ARCHIVE_PORT': str(free_port()),
            'QUICKSTART_VENV': sys.prefix,
            'QUICKSTART_ARCHIVE_VENV': str(archive_venv().parent),
        })
        self.env = env

    def script(self, *args: str, timeout: float = 120) -> 'subprocess.CompletedProcess[str]':
        """Run scripts/quickstart.sh with this quick start's environment."""
        return subprocess.run(['bash', str(SCRIPT), *args], cwd=self.workdir, env=self.env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout, check=False)

    def pids(self) -> Dict[str, List[str]]:
        """name -> [pid, start time] as the script recorded them."""
        return {name: (self.dir / 'run' / f'{name}.pid').read_text(encoding='utf-8').split() for name in SERVICES}

    def logs(self) -> str:
        """The tails of the three logs, for assertion messages."""
        parts = []
        for name in SERVICES:
            path = self.dir / 'logs' / f'{name}.log'
            tail = path.read_text(encoding='utf-8', errors='replace').splitlines()[-30:] if path.exists() else []
            parts.append(f'--- {name} ---\n' + '\n'.join(tail))
        return '\n'.join(parts)


@pytest.fixture
def quickstart(tmp_path: pathlib.Path) -> Iterator[QuickStart]:
    """A quick start that is stopped (and, if the script failed to, its recorded processes killed) afterwards."""
    started = QuickStart(tmp_path)
    try:
        yield started
    finally:
        started.script('stop', timeout=90)
        for name in SERVICES:
            pid_file = started.dir / 'run' / f'{name}.pid'
            if pid_file.exists():
                pid, ticks = pid_file.read_text(encoding='utf-8').split()
                if started_at(int(pid)) == ticks:
                    os.killpg(int(pid), 9)


@pytest.mark.integration
def test_readme_quick_start(quickstart: QuickStart) -> None:
    """The README's one command starts the cart; its curl commands make, poll, download and delete a cart."""
    commands = readme_commands()
    assert commands[0] == 'bash scripts/quickstart.sh', commands
    assert commands[-1] == 'bash scripts/quickstart.sh stop', commands
    curls = [command.replace(f'127.0.0.1:{README_PORT}', f'127.0.0.1:{quickstart.port}')
             for command in commands[1:-1]]
    post, poll, head, get, listing, delete = curls
    assert post.startswith('curl -X POST') and head.startswith('curl -I') and delete.startswith('curl -X DELETE')
    assert poll.startswith('for poll in $(seq 60); do curl -sI ') and poll.endswith('done'), poll

    started = quickstart.script()
    assert started.returncode == 0, started.stdout + quickstart.logs()
    # what the script prints is what the README shows
    assert post in started.stdout and poll in started.stdout, started.stdout

    config = (quickstart.dir / 'config.cfg').read_text(encoding='utf-8')
    assert f'broker_url = filesystem://{quickstart.dir}/broker' in config and 'amqp' not in config, config
    assert f'peewee_url = sqliteext:///{quickstart.dir}/db.sqlite3' in config, config
    status = quickstart.script('status')
    assert status.returncode == 0 and status.stdout.count(': running') == 3, status.stdout
    pids = quickstart.pids()
    again = quickstart.script()
    assert again.returncode == 1 and 'already running' in again.stdout, again.stdout
    assert quickstart.pids() == pids

    assert '"Cart Processing has begun"' in run(post, quickstart.workdir, quickstart.env)
    run(poll, quickstart.workdir, quickstart.env)  # the README's loop, as pasted: returns once not staging
    answer = run(head, quickstart.workdir, quickstart.env)
    assert 'X-Pacifica-Status: ready' in answer, answer + quickstart.logs()
    run(get, quickstart.workdir, quickstart.env)
    archive = quickstart.dir / 'archive'
    with tarfile.open(fileobj=io.BytesIO((quickstart.workdir / 'demo.tar').read_bytes()), mode='r:') as tar:
        files = {member.name: tar.extractfile(member).read()  # type: ignore[union-attr]
                 for member in tar.getmembers() if member.isfile()}
    assert files == {'demo/hello.txt': (archive / '1').read_bytes(), 'demo/squares.csv': (archive / '2').read_bytes()}
    assert 'demo/hello.txt' in run(listing, quickstart.workdir, quickstart.env)

    # while everything runs: no process of the quick start holds a connection to RabbitMQ's port
    processes = set().union(*(group_members(int(pid)) for pid, _ in pids.values()))
    assert len(processes) >= 4, processes  # archive, worker and its pool, server
    ports = remote_ports(processes)
    assert RABBITMQ_PORT not in ports, ports
    # the task went through the filesystem broker
    assert (quickstart.dir / 'broker' / 'control' / 'celery.exchange').is_file()

    assert '"Cart Deleted Successfully"' in run(delete, quickstart.workdir, quickstart.env)
    assert 'HTTP/1.1 404' in run(head.replace('curl -I', 'curl -sI'), quickstart.workdir, quickstart.env)
    # DELETE revokes the cart's tasks by a broadcast, which the filesystem broker carries too
    worker_log = quickstart.dir / 'logs' / 'worker.log'
    deadline = time.monotonic() + 20
    while 'Tasks flagged as revoked' not in worker_log.read_text(encoding='utf-8', errors='replace'):
        assert time.monotonic() < deadline, f'the worker got no revoke\n{quickstart.logs()}'
        time.sleep(0.2)

    stopped = quickstart.script('stop', timeout=90)
    assert stopped.returncode == 0, stopped.stdout
    assert [line.split()[1] for line in stopped.stdout.splitlines()] == ['server', 'worker', 'archive']
    for name, (pid, ticks) in pids.items():
        assert started_at(int(pid)) != ticks, f'{name} (pid {pid}) still runs'
        assert not group_members(int(pid)), f'processes of {name} are left: {group_members(int(pid))}'
    assert not list((quickstart.dir / 'run').glob('*.pid'))
    assert quickstart.script('status').returncode == 1


@pytest.mark.integration
def test_quick_start_refuses_a_busy_port(quickstart: QuickStart) -> None:
    """A port in use stops the script before it starts anything, naming the variable that moves it."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', int(quickstart.port)))
        sock.listen()
        result = quickstart.script()
    assert result.returncode == 1, result.stdout
    assert f'port {quickstart.port} is in use: set QUICKSTART_PORT' in result.stdout
    assert not (quickstart.dir / 'run').exists() or not list((quickstart.dir / 'run').glob('*.pid'))


# ---- the filesystem broker (no server) ---------------------------------------------------------

def test_filesystem_broker_folders_come_from_the_url(tmp_path: pathlib.Path) -> None:
    """filesystem:///dir gives every process the same folders under dir, made at start."""
    broker = tmp_path / 'broker'
    settings = load_settings(str(tmp_path / 'absent.ini'), environ={'BROKER_URL': f'filesystem://{broker}'})
    conf = celery_settings(settings)
    assert conf['broker_url'] == f'filesystem://localhost{broker}'
    assert conf['broker_transport_options'] == {
        'data_folder_in': str(broker / 'messages'), 'data_folder_out': str(broker / 'messages'),
        'control_folder': str(broker / 'control'), 'polling_interval': 0.1}
    check_broker(settings)
    assert (broker / 'messages').is_dir() and (broker / 'control').is_dir()
    amqp = load_settings(str(tmp_path / 'absent.ini'), environ={})
    assert celery_settings(amqp)['broker_transport_options'] == {}
    assert celery_settings(amqp)['broker_url'] == 'pyamqp://'


@pytest.mark.parametrize('url', ['filesystem://', 'filesystem://relative/dir', 'filesystem:/x'])
def test_filesystem_broker_needs_an_absolute_directory(tmp_path: pathlib.Path, url: str) -> None:
    with pytest.raises(ConfigError, match=r'bad value for \[celery\] broker_url \(env BROKER_URL\): '
                                          r'a filesystem broker names an absolute directory'):
        load_settings(str(tmp_path / 'absent.ini'), environ={'BROKER_URL': url})


def test_filesystem_broker_folder_that_cannot_be_made(tmp_path: pathlib.Path) -> None:
    (tmp_path / 'file').write_text('not a directory')
    settings = load_settings(str(tmp_path / 'absent.ini'), environ={'BROKER_URL': f'filesystem://{tmp_path}/file/b'})
    with pytest.raises(ConfigError, match=r'\[celery\] broker_url .*cannot create .*/file/b/messages'):
        check_broker(settings)
