"""The installed command-line entry points: arguments, refusing bad configs, config files, signals, console log."""
from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import time
from typing import Dict, Iterator, Mapping, Optional, Sequence, Tuple

import pytest
import requests

from cartd_testkit.broker import BROKER_URL
from cartd_testkit.databases import drop_database, fresh_database
from cartd_testkit.procs import ManagedProcess, free_port
from cartd_testkit.stack import binary, write_config
from pacifica.cartd.schema import SCHEMA_VERSION

pytestmark = [pytest.mark.integration]

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SERVER_CONF = REPO_ROOT / 'server.conf'
USAGE_LINE = 'usage: pacifica-cartd [-h] [-c CONFIG] [--cpconfig CONFIG] [-p PORT]'
START_DEADLINE_S = 30.0
STOP_DEADLINE_S = 10.0


def _clean_env(home: pathlib.Path, **extra: str) -> Dict[str, str]:
    """The environment without anything that could point the cart at another config, db or volume."""
    env = {key: value for key, value in os.environ.items()
           if key not in ('PYTHONPATH', 'CARTD_CONFIG', 'CARTD_CPCONFIG', 'VOLUME_PATH', 'PEEWEE_URL',
                          'BROKER_URL', 'CELERY_QUEUE', 'TRANSFER_SIZE')}
    env['HOME'] = str(home)  # ~/.pacifica-cartd/* must not exist
    env['COLUMNS'] = '80'  # argparse wraps help at the terminal width
    env.update(extra)
    return env


def _run(args: Sequence[str], env: Mapping[str, str], cwd: pathlib.Path,
         timeout: float = 30) -> Tuple['subprocess.CompletedProcess[str]', float]:
    started = time.monotonic()
    result = subprocess.run(list(args), env=dict(env), cwd=cwd, capture_output=True, text=True,
                            timeout=timeout, check=False)
    return result, time.monotonic() - started


@pytest.fixture(scope='module')
def synced(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, str]:
    """A fresh SQLite database with the schema made by our own `pacifica-cartd-cmd dbsync`."""
    base = tmp_path_factory.mktemp('entry-db')
    url = fresh_database('sqlite', base)
    config = write_config(base / 'sync.cfg', {'database': {'peewee_url': url}})
    result, _ = _run([binary('pacifica-cartd-cmd'), '-c', str(config), 'dbsync'], _clean_env(base), base, 120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'database schema is' in result.stdout
    return {'peewee_url': url}


def _config(directory: pathlib.Path, synced: Mapping[str, str], name: str = 'config.cfg',
            **cartd: str) -> pathlib.Path:
    """A complete service config on the synced database; `cartd` keys override the [cartd] section."""
    directory.mkdir(parents=True, exist_ok=True)
    sections = {
        'cartd': {'volume_path': str(directory / 'volume'), **cartd},
        'archiveinterface': {'url': 'http://127.0.0.1:9/'},
        'celery': {'broker_url': BROKER_URL, 'queue': f'cartd-entry-{os.getpid()}'},
        'database': {'peewee_url': synced['peewee_url'], 'connect_attempts': '2', 'connect_wait': '0.1'},
    }
    return write_config(directory / name, sections)


def _wait_log(proc: ManagedProcess, text: str, deadline_s: float = START_DEADLINE_S) -> None:
    deadline = time.monotonic() + deadline_s
    while text not in proc.log_path.read_text(encoding='utf-8', errors='replace'):
        if not proc.running():
            raise AssertionError(f'{proc.name} exited with {proc.returncode} before logging {text!r}:\n'
                                 f'{proc.log_tail()}')
        if time.monotonic() > deadline:
            raise AssertionError(f'{proc.name} did not log {text!r} within {deadline_s} s:\n{proc.log_tail()}')
        time.sleep(0.05)


@contextlib.contextmanager
def _server(args: Sequence[str], env: Mapping[str, str], directory: pathlib.Path,
            wait_for: Optional[str] = 'ENGINE Bus STARTED') -> Iterator[ManagedProcess]:
    """Run `pacifica-cartd args`; stop it (our own process group only) whatever happens."""
    proc = ManagedProcess([binary('pacifica-cartd'), *args], directory / f'server-{time.monotonic_ns()}.log',
                          env=env, cwd=directory, name='pacifica-cartd')
    proc.start()
    try:
        if wait_for:
            _wait_log(proc, wait_for)
        yield proc
    finally:
        proc.stop(timeout=STOP_DEADLINE_S)


def _log(proc: ManagedProcess) -> str:
    return proc.log_path.read_text(encoding='utf-8', errors='replace')


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # ignore TIME_WAIT leftovers
        try:
            sock.bind(('127.0.0.1', port))
            sock.listen(1)
        except OSError:
            return False
    return True


# ---- arguments ------------------------------------------------------------------------------


def test_server_help_lists_the_published_options(tmp_path: pathlib.Path) -> None:
    result, _ = _run([binary('pacifica-cartd'), '--help'], _clean_env(tmp_path), tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == USAGE_LINE, result.stdout
    for text in ('cart config file', 'cherrypy config file', 'port to listen on', 'address to listen on'):
        assert text in result.stdout
    assert '-a ADDRESS' in result.stdout


def test_cmd_without_subcommand_prints_help_and_fails(tmp_path: pathlib.Path) -> None:
    result, _ = _run([binary('pacifica-cartd-cmd')], _clean_env(tmp_path), tmp_path)
    assert result.returncode != 0
    assert result.stdout.startswith('usage: pacifica-cartd-cmd')
    assert 'dbsync' in result.stdout and 'dbchk' in result.stdout
    assert 'Traceback' not in result.stdout + result.stderr


def test_port_not_a_number_is_a_usage_error(tmp_path: pathlib.Path) -> None:
    result, _ = _run([binary('pacifica-cartd'), '-p', 'notanumber'], _clean_env(tmp_path), tmp_path)
    assert result.returncode == 2
    assert 'Traceback' not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith('pacifica-cartd: error:')]
    assert len(errors) == 1, result.stderr
    assert 'port' in errors[0].lower() and 'notanumber' in errors[0]
    assert result.stderr.splitlines()[-1] == errors[0]


# ---- refusing to start ---------------------------------------------------------------------


def _refusal(result: 'subprocess.CompletedProcess[str]') -> str:
    """The one error line of a refused start, checked to be the whole story (no traceback)."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert 'Traceback' not in result.stderr + result.stdout, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith('pacifica-cartd: error:')]
    assert len(errors) == 1, result.stderr
    assert result.stderr.rstrip('\n').splitlines()[-1] == errors[0], result.stderr
    return errors[0]


def test_bad_transfer_size_names_the_key(tmp_path: pathlib.Path, synced: Dict[str, str]) -> None:
    config = _config(tmp_path, synced, transfer_size='4 parsecs')
    result, elapsed = _run([binary('pacifica-cartd'), '-c', str(config), '-p', str(free_port())],
                           _clean_env(tmp_path), tmp_path)
    line = _refusal(result)
    assert '[cartd] transfer_size' in line and '4 parsecs' in line
    assert elapsed < 15


def test_volume_path_under_a_regular_file_names_the_key(tmp_path: pathlib.Path, synced: Dict[str, str]) -> None:
    blocker = tmp_path / 'a-regular-file'
    blocker.write_text('not a directory', encoding='utf-8')
    config = _config(tmp_path, synced, volume_path=str(blocker / 'volume'))
    result, _ = _run([binary('pacifica-cartd'), '-c', str(config), '-p', str(free_port())],
                     _clean_env(tmp_path), tmp_path)
    line = _refusal(result)
    assert '[cartd] volume_path' in line and str(blocker / 'volume') in line
    assert blocker.read_text(encoding='utf-8') == 'not a directory'


def test_unreachable_database_gives_up_after_its_attempts(tmp_path: pathlib.Path) -> None:
    config = write_config(tmp_path / 'config.cfg', {
        'cartd': {'volume_path': str(tmp_path / 'volume')},
        'database': {'peewee_url': 'postgres://postgres@127.0.0.1:1/x', 'connect_attempts': '2',
                     'connect_wait': '0.1'},
    })
    result, elapsed = _run([binary('pacifica-cartd'), '-c', str(config), '-p', str(free_port())],
                           _clean_env(tmp_path), tmp_path)
    line = _refusal(result)
    assert 'cannot connect to the database' in line and 'after 2 attempts' in line, line
    assert '127.0.0.1' in line
    assert result.stderr.count('attempt 1 of 2') == 1 and result.stderr.count('attempt 2 of 2') == 1
    assert elapsed < 10


def test_refuses_a_database_without_schema(tmp_path: pathlib.Path) -> None:
    url = fresh_database('sqlite', tmp_path)
    config = write_config(tmp_path / 'config.cfg', {
        'cartd': {'volume_path': str(tmp_path / 'volume')}, 'database': {'peewee_url': url}})
    result, _ = _run([binary('pacifica-cartd'), '-c', str(config), '-p', str(free_port())],
                     _clean_env(tmp_path), tmp_path)
    line = _refusal(result)
    assert 'dbsync' in line


# ---- config files ---------------------------------------------------------------------------


def test_config_given_with_dash_c(tmp_path: pathlib.Path, synced: Dict[str, str]) -> None:
    config = _config(tmp_path / 'conf', synced)
    port = free_port()
    with _server(['-c', str(config), '-p', str(port)], _clean_env(tmp_path), tmp_path) as server:
        answer = requests.get(f'http://127.0.0.1:{port}/', timeout=10)
        assert answer.status_code == 200
        assert answer.json() == {'message': 'Pacifica Cartd Interface Up and Running'}
        unknown = requests.head(f'http://127.0.0.1:{port}/no-such-cart', timeout=10)  # reads the database
        assert unknown.status_code == 404
        assert unknown.headers['X-Pacifica-Message'] == 'No cart with uid no-such-cart found'
        assert (tmp_path / 'conf' / 'volume').is_dir()  # volume_path from the -c file was made
        assert f'config {config}' in _log(server)


def test_cpconfig_server_conf_with_port_override(tmp_path: pathlib.Path, synced: Dict[str, str]) -> None:
    config = _config(tmp_path, synced)
    port = free_port()
    args = ['-c', str(config), '--cpconfig', str(SERVER_CONF), '-p', str(port)]
    with _server(args, _clean_env(tmp_path), tmp_path) as server:
        answer = requests.get(f'http://127.0.0.1:{port}/', timeout=10)
        assert answer.status_code == 200 and answer.headers['Content-Type'] == 'application/json'
        assert answer.headers['Allow'] == 'DELETE, GET, HEAD, POST'
        log = _log(server)
        assert f'ENGINE Serving on http://127.0.0.1:{port}' in log
        assert 'Serving on http://127.0.0.1:8081' not in log
        assert f'cpconfig {SERVER_CONF}' in log


def test_cpconfig_from_the_environment(tmp_path: pathlib.Path, synced: Dict[str, str]) -> None:
    config = _config(tmp_path, synced)
    cpconfig = tmp_path / 'cp.ini'
    port = free_port()
    cpconfig.write_text(f"[global]\nserver.socket_host: '127.0.0.1'\nserver.socket_port: {port}\n", encoding='utf-8')
    env = _clean_env(tmp_path, CARTD_CONFIG=str(config), CARTD_CPCONFIG=str(cpconfig))
    with _server([], env, tmp_path) as server:
        assert requests.get(f'http://127.0.0.1:{port}/', timeout=10).status_code == 200
        assert f'ENGINE Serving on http://127.0.0.1:{port}' in _log(server)


# ---- signals and the console log ----------------------------------------------------------------


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT], ids=['SIGTERM', 'SIGINT'])
def test_signal_stops_the_server_cleanly(tmp_path: pathlib.Path, synced: Dict[str, str],
                                         signum: signal.Signals) -> None:
    config = _config(tmp_path, synced)
    port = free_port()
    with _server(['-c', str(config), '-p', str(port)], _clean_env(tmp_path), tmp_path) as server:
        assert requests.get(f'http://127.0.0.1:{port}/', timeout=10).status_code == 200
        assert not _port_is_free(port)
        os.kill(server.pid, signum)
        assert server.proc is not None
        try:
            code = server.proc.wait(timeout=STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f'pacifica-cartd still running {STOP_DEADLINE_S} s after {signum.name}:\n{server.log_tail()}')
        log = _log(server)
        assert code == 0, log
        assert 'ENGINE Bus EXITED' in log
        assert 'Traceback' not in log
        assert _port_is_free(port)
        with pytest.raises(requests.ConnectionError):
            requests.get(f'http://127.0.0.1:{port}/', timeout=5)


def test_sigint_while_starting_does_not_hang(tmp_path: pathlib.Path, synced: Dict[str, str]) -> None:
    """SIGINT as soon as the port answers (the bus may still be STARTING) must end the process."""
    config = _config(tmp_path, synced)
    port = free_port()
    with _server(['-c', str(config), '-p', str(port)], _clean_env(tmp_path), tmp_path, wait_for=None) as server:
        server.wait_http(f'http://127.0.0.1:{port}/', START_DEADLINE_S)
        os.kill(server.pid, signal.SIGINT)
        assert server.proc is not None
        try:
            code = server.proc.wait(timeout=STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f'pacifica-cartd hung after SIGINT during start-up:\n{server.log_tail()}')
        # 0 once started; CherryPy itself exits 70 when told to exit while still starting
        assert code in (0, 70), _log(server)
        assert 'Traceback' not in _log(server)
        assert _port_is_free(port)


@pytest.mark.parametrize('cpconfig', [None, SERVER_CONF], ids=['no-cpconfig', 'server.conf'])
def test_engine_lines_on_the_console_once(tmp_path: pathlib.Path, synced: Dict[str, str],
                                          cpconfig: Optional[pathlib.Path]) -> None:
    config = _config(tmp_path, synced)
    port = free_port()
    args = ['-c', str(config), '-p', str(port)] + (['--cpconfig', str(cpconfig)] if cpconfig else [])
    with _server(args, _clean_env(tmp_path), tmp_path) as server:
        requests.get(f'http://127.0.0.1:{port}/', timeout=10)
        os.kill(server.pid, signal.SIGTERM)
        assert server.proc is not None
        assert server.proc.wait(timeout=STOP_DEADLINE_S) == 0
    lines = _log(server).splitlines()
    serving = [line for line in lines if f'ENGINE Serving on http://127.0.0.1:{port}' in line]
    assert len(serving) == 1, '\n'.join(lines)
    # CherryPy's own format: "[28/Nov/2026:10:12:19] ENGINE Serving on ...", not a logging record
    assert serving[0].startswith('[') and '] ENGINE Serving on' in serving[0]
    for text in ('ENGINE Bus STARTING', 'ENGINE Bus STARTED', 'ENGINE Bus STOPPING', 'ENGINE Bus EXITED'):
        assert sum(text in line for line in lines) == 1, (text, '\n'.join(lines))
    # one access line for the one request, in CherryPy's access format
    access = [line for line in lines if '"GET / HTTP/1.1" 200' in line]
    assert len(access) == 1, '\n'.join(lines)


# ---- pacifica-cartd-cmd says which database it works on ------------------------------------


@pytest.mark.parametrize('command', [['dump'], ['dbchk'], ['purge'], ['fixit', '--cartid', 'c1']])
def test_a_command_without_a_config_opens_no_empty_database(tmp_path: pathlib.Path, command: Sequence[str]) -> None:
    """Before, the default peewee_url made an empty ./db.sqlite3 and the command advised dbsync."""
    result, _ = _run([binary('pacifica-cartd-cmd'), *command], _clean_env(tmp_path), tmp_path)
    assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr
    [line] = result.stderr.splitlines()
    assert line == (f'pacifica-cartd-cmd: error: the database {tmp_path}/db.sqlite3 does not exist (no config file '
                    f'at {tmp_path}/.pacifica-cartd/config.ini, peewee_url sqliteext:///db.sqlite3); give -c with the '
                    "config that names the cart's database (or set PEEWEE_URL), or create it there with "
                    '`pacifica-cartd-cmd dbsync`')
    assert not (tmp_path / 'db.sqlite3').exists()


def test_dbsync_and_dbchk_name_the_database(tmp_path: pathlib.Path, synced: Dict[str, str]) -> None:
    config = write_config(tmp_path / 'named.cfg', {'database': {'peewee_url': synced['peewee_url']}})
    checked, _ = _run([binary('pacifica-cartd-cmd'), '-c', str(config), 'dbchk'], _clean_env(tmp_path), tmp_path)
    path = synced['peewee_url'].split(':///', 1)[1]
    version = '.'.join(map(str, SCHEMA_VERSION))
    assert checked.stdout == f'database schema {version}, this version needs {version}: ok (sqlite {path})\n', \
        checked.stdout
    fresh, _ = _run([binary('pacifica-cartd-cmd'), 'dbsync'], _clean_env(tmp_path), tmp_path)  # no config: made here
    assert fresh.stdout == f'database schema is {version} (sqlite {tmp_path}/db.sqlite3)\n', fresh.stdout + fresh.stderr


def test_fixit_asks_for_uids(tmp_path: pathlib.Path) -> None:
    result, _ = _run([binary('pacifica-cartd-cmd'), 'fixit', '--help'], _clean_env(tmp_path), tmp_path)
    assert '--cartid UID [UID ...]' in result.stdout and 'Cart IDs' not in result.stdout
    assert "the carts' uids" in ' '.join(result.stdout.split())


@pytest.mark.parametrize('kind', [pytest.param('postgres', marks=pytest.mark.postgres),
                                  pytest.param('mysql', marks=pytest.mark.mysql)])
def test_dbsync_and_dbchk_name_a_database_server_but_not_its_password(tmp_path: pathlib.Path, kind: str) -> None:
    url = fresh_database(kind, tmp_path)
    try:
        user = url.split('://', 1)[1].split('@', 1)[0]
        # PostgreSQL trusts local connections, so a password in the URL is sent and ignored: it must not be shown.
        shown_url = url.replace(f'{user}@', f'{user}:s3cret@', 1) if kind == 'postgres' else url
        config = write_config(tmp_path / 'server.cfg', {'database': {'peewee_url': shown_url}})
        version = '.'.join(map(str, SCHEMA_VERSION))
        name = url.rsplit('/', 1)[1]
        where = f'{kind} 127.0.0.1:{5432 if kind == "postgres" else 3306}/{name}'
        synced, _ = _run([binary('pacifica-cartd-cmd'), '-c', str(config), 'dbsync'], _clean_env(tmp_path), tmp_path,
                         120)
        assert synced.stdout == f'database schema is {version} ({where})\n', synced.stdout + synced.stderr
        checked, _ = _run([binary('pacifica-cartd-cmd'), '-c', str(config), 'dbchk'], _clean_env(tmp_path), tmp_path)
        assert checked.stdout == f'database schema {version}, this version needs {version}: ok ({where})\n', \
            checked.stdout + checked.stderr
        assert 's3cret' not in synced.stdout + synced.stderr + checked.stdout + checked.stderr
        status, _ = _run([binary('pacifica-cartd-cmd'), '-c', str(config), 'status'], _clean_env(tmp_path), tmp_path)
        assert (status.returncode, status.stdout.splitlines()[-1]) == (0, '0 carts'), status.stdout + status.stderr
    finally:
        drop_database(kind, url)
