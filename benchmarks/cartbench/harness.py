"""What the benchmark scripts share: progress lines, the stack's command-line options, starting the archive
and our cart, and a bounded run that stops and removes everything it started."""
from __future__ import annotations

import argparse
import configparser
import contextlib
import datetime
import importlib.metadata
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from cartd_testkit.archive import ArchiveServer
from cartd_testkit.broker import broker_available
from cartd_testkit.databases import drop_database, fresh_database, server_available
from cartd_testkit.venvs import reference_cart_venv

from .stacks import OurStack, ReferenceStack

REPO = pathlib.Path(__file__).resolve().parent.parent.parent
REFERENCE_DB_OPTIONS = '?ssl_disabled=true'  # see start_reference


def shipped_thread_pool(default: int = 16) -> int:
    """server.thread_pool of the repository's server.conf (what an operator runs), `default` without one."""
    parser = configparser.ConfigParser()
    try:
        parser.read(REPO / 'server.conf', encoding='utf-8')
        return int(parser.get('global', 'server.thread_pool'))
    except (configparser.Error, ValueError):
        return default


def log(text: str) -> None:
    """Progress on stderr; the figures go to stdout."""
    print(f'# {datetime.datetime.now():%H:%M:%S} {text}', file=sys.stderr, flush=True)


def add_stack_options(parser: argparse.ArgumentParser, max_minutes: float) -> None:
    """The options of our cart's stack, the archive, the temp dir and the time bound."""
    parser.add_argument('--database', choices=('sqlite', 'postgres', 'mysql'), default='sqlite',
                        help='database of our cart (a fresh one, dropped afterwards)')
    parser.add_argument('--workers', type=int, default=1, help='celery worker processes')
    parser.add_argument('--concurrency', type=int, default=2, help='celery pool processes per worker')
    parser.add_argument('--server-threads', type=int, default=shipped_thread_pool(),
                        help="CherryPy server.thread_pool of both carts (the repository's server.conf's by default)")
    parser.add_argument('--set', action='append', default=[], metavar='SECTION.KEY=VALUE',
                        help='a setting of our cart, e.g. cartd.stage_concurrency=16 (repeatable)')
    parser.add_argument('--cpconfig-set', action='append', default=[], metavar='KEY=VALUE',
                        help="a CherryPy [global] setting of our server, e.g. server.socket_queue_size=5 "
                             "(repeatable; VALUE as CherryPy reads it)")
    parser.add_argument('--archive-workers', type=int, default=4, help='gunicorn workers of the archive')
    parser.add_argument('--tmpdir', default=tempfile.gettempdir(), help='where the archive and volumes go')
    parser.add_argument('--keep', action='store_true', help='keep the temp dir (logs, configs) afterwards')
    parser.add_argument('--max-minutes', type=float, default=max_minutes, help='stop everything after this long')


def chosen_workloads(parser: argparse.ArgumentParser, text: str, known: Sequence[str],
                     needs: Optional[Dict[str, str]] = None) -> List[str]:
    """The comma-separated workloads of `text` in the order of `known` (an unknown name is a usage error),
    with any workload that a chosen one `needs` run too."""
    chosen = [name.strip() for name in text.split(',') if name.strip()]
    unknown = set(chosen) - set(known)
    if unknown:
        parser.error(f'unknown workloads: {", ".join(sorted(unknown))}')
    chosen += [needed for name, needed in (needs or {}).items() if name in chosen]
    return [name for name in known if name in chosen]


def check_stack_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject --set and --cpconfig-set values that are not KEY=VALUE."""
    for item in args.set:
        if '=' not in item or '.' not in item.partition('=')[0]:
            parser.error(f'--set wants SECTION.KEY=VALUE, got {item!r}')
    for item in args.cpconfig_set:
        if '=' not in item or not item.partition('=')[0].strip():
            parser.error(f'--cpconfig-set wants KEY=VALUE, got {item!r}')


def settings_overrides(items: List[str]) -> Dict[str, Dict[str, str]]:
    """['cartd.stage_concurrency=16'] -> {'cartd': {'stage_concurrency': '16'}}."""
    overrides: Dict[str, Dict[str, str]] = {}
    for item in items:
        key, _, value = item.partition('=')
        section, _, name = key.partition('.')
        overrides.setdefault(section, {})[name] = value
    return overrides


def cpconfig_overrides(items: List[str]) -> Dict[str, str]:
    """['server.socket_queue_size=5'] -> {'server.socket_queue_size': '5'}."""
    return {key.strip(): value.strip() for key, _, value in (item.partition('=') for item in items)}


def start_archive(base: pathlib.Path, workers: int, cleanup: contextlib.ExitStack,
                  access_log: Optional[pathlib.Path] = None) -> ArchiveServer:
    """The real archive interface (POSIX backend) under gunicorn with `workers` sync workers.

    With `access_log`, gunicorn writes one line per request there (`ArchiveRequests` counts them).
    """
    extra = [] if access_log is None else ['--access-logfile', str(access_log),
                                           '--access-logformat', ACCESS_LOG_FORMAT]
    archive = ArchiveServer(base / 'archive', workers=workers, extra_args=extra)
    cleanup.callback(archive.stop)
    log(f'starting the archive interface ({workers} gunicorn workers'
        f'{", access log on" if access_log is not None else ""})')
    archive.start()
    return archive


ACCESS_LOG_FORMAT = '%(m)s %(s)s %(U)s'  # method, status, path: all ArchiveRequests reads


class ArchiveRequests:
    """Counts the archive's requests per method from its gunicorn access log, from a mark on.

    Gunicorn writes a request's line once it has answered it, so read the count after the work
    whose requests it should hold is over (a cart ready and downloaded).
    """

    def __init__(self, path: pathlib.Path) -> None:
        """Count the lines of `path` (it may not exist yet: gunicorn makes it)."""
        self.path = path
        self.offset = 0

    def mark(self) -> None:
        """Count from here on."""
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def since_mark(self) -> Dict[str, int]:
        """Requests per method (and 'error' for answers of 400 and more) since the last mark."""
        counts: Dict[str, int] = {}
        if not self.path.exists():
            return counts
        with open(self.path, 'rb') as log_file:
            log_file.seek(self.offset)
            for line in log_file.read().decode('utf-8', 'replace').splitlines():
                method, _, rest = line.partition(' ')
                if not method:
                    continue
                counts[method] = counts.get(method, 0) + 1
                if rest[:3].isdigit() and int(rest[:3]) >= 400:
                    counts['error'] = counts.get('error', 0) + 1
        return counts


def start_ours(args: argparse.Namespace, base: pathlib.Path, archive: ArchiveServer,
               cleanup: contextlib.ExitStack) -> OurStack:
    """Our cart on a fresh database, with the stack options of `args`."""
    base.mkdir()
    url = fresh_database(args.database, base)
    cleanup.callback(drop_database, args.database, url)
    stack = OurStack(base, archive, url, args.workers, args.concurrency, args.server_threads,
                     settings_overrides(args.set), cpconfig_overrides(args.cpconfig_set))
    cleanup.callback(stack.stop)
    log(f'starting our cart ({args.database}, {args.workers} worker(s) x concurrency {args.concurrency})')
    stack.start()
    return stack


def start_reference(args: argparse.Namespace, base: pathlib.Path, archive: ArchiveServer,
                    cleanup: contextlib.ExitStack) -> ReferenceStack:
    """The published 0.7.0 from its own venv, on a fresh MariaDB database and a RabbitMQ vhost of its own,
    with the worker layout and server threads of `args`."""
    if not shutil.which('rabbitmqctl'):
        raise SystemExit('--compare-0.7.0 needs rabbitmqctl to give 0.7.0 a vhost of its own '
                         '(0.7.0 always uses the queue "celery")')
    if not server_available('mysql'):
        raise SystemExit('--compare-0.7.0 needs MariaDB on 127.0.0.1:3306 (0.7.0 stalls on SQLite)')
    log('preparing the 0.7.0 virtual environment (cached)')
    bin_dir = reference_cart_venv()
    base.mkdir()
    url = fresh_database('mysql', base)
    cleanup.callback(drop_database, 'mysql', url)
    # 0.7.0 opens a database connection per request and per task. The PyMySQL its venv gets (1.2.4) tries
    # TLS by default and builds a fresh TLS context (the system's certificates loaded) for every
    # connection: about 16 ms of CPU each here, though the local MariaDB has TLS disabled and the
    # connection ends up plain. That is not 0.7.0's cost, and its era's PyMySQL did not have it:
    # a HEAD's database work takes 19 ms with it, 1 ms without.
    stack = ReferenceStack(base, archive, bin_dir, url + REFERENCE_DB_OPTIONS, args.workers, args.concurrency,
                           args.server_threads)
    cleanup.callback(stack.stop)
    log(f'starting 0.7.0 (MariaDB, vhost {stack.vhost}, {args.workers} worker(s) x concurrency '
        f'{args.concurrency})')
    stack.start()
    return stack


def cart_version() -> str:
    """The installed pacifica-cartd's version and the checkout's commit, e.g. '0.8.0 (e62593c)'."""
    try:
        version = importlib.metadata.version('pacifica-cartd')
    except importlib.metadata.PackageNotFoundError:
        version = '?'
    try:
        commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO, capture_output=True, text=True,
                                timeout=10, check=False).stdout.strip()
    except OSError:
        commit = ''
    return f'{version} ({commit})' if commit else version


def load_average() -> str:
    """The 1, 5 and 15 minute load averages."""
    return ' '.join(f'{value:.2f}' for value in os.getloadavg())


def wait_idle(limit_s: float, threshold: float = 0.5) -> None:
    """Wait (at most limit_s) until the machine's 1-minute load average is below threshold."""
    deadline = time.monotonic() + limit_s
    while os.getloadavg()[0] >= threshold and time.monotonic() < deadline:
        log(f'waiting for the machine to be idle (load {os.getloadavg()[0]:.2f})')
        time.sleep(15)


class TimeUp(Exception):
    """--max-minutes passed."""


def bounded_run(args: argparse.Namespace, prefix: str,
                body: Callable[[pathlib.Path, contextlib.ExitStack], int]) -> int:
    """Check the servers, then run body(temp dir, cleanup) under --max-minutes; stop and remove all it started.

    Exit status: body's, or 2 when the time ran out.
    """
    if not broker_available():
        raise SystemExit('RabbitMQ is not answering on 127.0.0.1:5672')
    if args.database != 'sqlite' and not server_available(args.database):
        raise SystemExit(f'{args.database} is not answering on 127.0.0.1')

    def interrupted(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f'signal {signum}')

    def time_up(_signum: int, _frame: Any) -> None:
        raise TimeUp(f'--max-minutes {args.max_minutes:g} passed')

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGALRM, time_up)
    signal.alarm(max(1, int(args.max_minutes * 60)))
    pathlib.Path(args.tmpdir).mkdir(parents=True, exist_ok=True)
    base = pathlib.Path(tempfile.mkdtemp(prefix=prefix, dir=args.tmpdir))
    started = time.monotonic()
    code: Optional[int] = None
    with contextlib.ExitStack() as cleanup:
        if args.keep:
            cleanup.callback(log, f'kept {base}')
        else:
            cleanup.callback(shutil.rmtree, base, True)
        cleanup.callback(signal.alarm, 0)
        try:
            code = body(base, cleanup)
        except TimeUp as exc:
            log(str(exc))
            code = 2
        log(f'run took {time.monotonic() - started:.0f} s; stopping everything')
    return 2 if code is None else code
