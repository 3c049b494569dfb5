"""Run the cart's API under a real uWSGI (`--module pacifica.cartd.wsgi`), the way the docs say, as a test peer."""
from __future__ import annotations

import pathlib
import time
from typing import Dict, List

from .procs import ManagedProcess, binary

MASTER_STARTED = 'cartd-test: uwsgi master loop started'
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]  # the checkout the testkit is installed from
SHIPPED_INI = REPO_ROOT / 'uwsgi.ini'  # the production settings the docs give; the stack below runs it
BIND_VARIABLE = 'CARTD_UWSGI_BIND'


def shipped_ini_command(*extra: str) -> List[str]:
    """`uwsgi --ini uwsgi.ini`, as the docs give it; it listens where CARTD_UWSGI_BIND says."""
    return [binary('uwsgi'), '--ini', str(SHIPPED_INI), *extra]


def uwsgi_command(port: int, *extra: str) -> List[str]:
    """The uWSGI command line the README gives, plus what a real deployment needs.

    --need-app: exit when the module fails to import (bad config, schema needs dbsync) instead of
    serving 500 "no python application found" for ever; --die-on-term: SIGTERM stops uWSGI 2.0
    (without it SIGTERM reloads); --threads turns on Python threads in the workers.
    --worker-reload-mercy/--reload-mercy: a worker that gets the master's SIGINT in the moments
    after it was forked (before it installs its own handler) does not die, and the master then
    waits this long (default 60 s) before SIGKILLing it; seen with a bare WSGI app too.
    --buffer-size 65535 (uWSGI's largest): request headers up to 64 KiB are read (4 KiB by default;
    larger ones are dropped without an answer).
    """
    return [binary('uwsgi'), '--http-socket', f'127.0.0.1:{port}', '--master', '--module', 'pacifica.cartd.wsgi',
            '--processes', '2', '--threads', '4', '--die-on-term', '--need-app',
            '--worker-reload-mercy', '5', '--reload-mercy', '5', '--buffer-size', '65535', *extra]


def start_uwsgi(base: pathlib.Path, env: Dict[str, str], port: int, name: str = 'uwsgi',
                shipped: bool = False) -> ManagedProcess:
    """Start uWSGI with the given environment; wait until GET / answers and the master loop runs.

    The uWSGI 2.0 master ignores SIGTERM (and SIGHUP) until its master loop starts, which can be
    after the workers already answer; a SIGTERM sent in that window is lost. The master-start
    hook prints a line once the master's own signal handlers are in place.
    """
    hook = ('--hook-master-start', f'print:{MASTER_STARTED}')
    command = shipped_ini_command(*hook) if shipped else uwsgi_command(port, *hook)
    env = dict(env, **{BIND_VARIABLE: f'127.0.0.1:{port}'}) if shipped else env
    proc = ManagedProcess(command, base / f'{name}.log', env=env, cwd=base, name=name).start()
    try:
        proc.wait_http(f'http://127.0.0.1:{port}/', 60)
        deadline = time.monotonic() + 30
        while MASTER_STARTED not in proc.log_path.read_text(encoding='utf-8', errors='replace').replace(
                f'print:{MASTER_STARTED}', ''):
            if not proc.running() or time.monotonic() > deadline:
                raise RuntimeError(f'uwsgi master loop did not start:\n{proc.log_tail()}')
            time.sleep(0.05)
    except BaseException:
        proc.stop()
        raise
    return proc
