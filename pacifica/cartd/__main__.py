"""Command-line entry points: `pacifica-cartd` (the server) and `pacifica-cartd-cmd` (admin)."""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

import cherrypy
import tqdm
import yaml

from . import database, schema
from .app import log_in_format, mount, start_logging
from .config import Settings, default_config_path, default_cpconfig_path, load_settings
from .errors import CartError
from .httpserver import use_sendfile_gateway
from .logcontext import use_format
from .staging import StageOutcome
from .wiring import command_service, open_database, prepare_server

LOGGER = logging.getLogger('pacifica.cartd')
LISTEN_BACKLOG = 1024  # server.socket_queue_size unless the cpconfig file sets it
THREAD_POOL = 200  # server.thread_pool unless the cpconfig file sets it: downloads at once, plus short requests


def _fail(message: str, prog: str = 'pacifica-cartd') -> int:
    print(f'{prog}: error: {message}', file=sys.stderr)
    return 1


CMD = 'pacifica-cartd-cmd'


def config_parent(default: Optional[str] = None) -> argparse.ArgumentParser:
    """The one `-c/--config` option, as a parent parser for the server, the admin tool and each subcommand.

    A subcommand's parent has the default SUPPRESS, so `-c` given before the subcommand
    is not reset by the subcommand's own (absent) `-c`.
    """
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument('-c', '--config', metavar='CONFIG', type=str, default=default, dest='config',
                        help='cart config file')
    return parent


def server_parser() -> argparse.ArgumentParser:
    """The `pacifica-cartd` arguments, as the published service has them."""
    parser = argparse.ArgumentParser(prog='pacifica-cartd', description='Run the cart server.',
                                     parents=[config_parent()])
    parser.add_argument('--cpconfig', metavar='CONFIG', type=str, default=None, dest='cpconfig',
                        help='cherrypy config file')
    parser.add_argument('-p', '--port', metavar='PORT', type=int, default=None, dest='port',
                        help='port to listen on')
    parser.add_argument('-a', '--address', metavar='ADDRESS', default=None, dest='address',
                        help='address to listen on')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CherryPy server until SIGTERM or SIGINT."""
    args = server_parser().parse_args(argv)
    start_logging()
    config_file = args.config or default_config_path(os.environ)
    cpconfig = args.cpconfig or default_cpconfig_path(os.environ)
    try:
        settings = load_settings(config_file)
        use_format(settings.log_format, logging.getLogger().handlers)
        prepare_server(settings)
    except CartError as exc:
        return _fail(exc.message)
    except database.DATABASE_ERRORS as exc:
        return _fail(f'database error: {type(exc).__name__}: {exc}')
    # The listen backlog: CherryPy's default of 5 drops connections (SYN cookies, resets)
    # as soon as a few dozen clients connect at once (measured with benchmarks/load.py).
    # No body limit in cheroot (100 MB by default, answered in plain text before the API
    # sees the request): the API reads at most max_request_size + 1 bytes and answers a
    # larger body with its own JSON 413; the gateway never reads what the API left.
    # Threads: each download holds one while it streams; CherryPy's default (10) lets ten slow
    # downloads stop every other client (a connection still sending its head holds none).
    cherrypy.config.update({'server.socket_host': '127.0.0.1', 'server.socket_port': 8081,
                            'server.socket_queue_size': LISTEN_BACKLOG, 'server.max_request_body_size': 0,
                            'server.thread_pool': THREAD_POOL,
                            'engine.autoreload.on': False})
    mount(settings, cpconfig)
    log_in_format(settings.log_format)
    if args.port is not None:
        cherrypy.config.update({'server.socket_port': args.port})
    if args.address is not None:
        cherrypy.config.update({'server.socket_host': args.address})
    # SIGINT stops the bus like SIGTERM does, also while it is starting (a KeyboardInterrupt
    # then would leave the non-daemon HTTP server thread running and the process hung).
    cherrypy.engine.signal_handler.handlers['SIGINT'] = cherrypy.engine.exit
    cherrypy.engine.signals.subscribe()
    use_sendfile_gateway(cherrypy.server)  # or, logged, CherryPy's own server
    cherrypy.engine.start()
    cherrypy.engine.block()
    return 0


def cmd_parser() -> argparse.ArgumentParser:
    """The `pacifica-cartd-cmd` arguments and subcommands."""
    parser = argparse.ArgumentParser(prog=CMD, description='Cart admin tool.',
                                     parents=[config_parent()])
    subparsers = parser.add_subparsers(help='sub-command help', dest='command')
    each = [config_parent(argparse.SUPPRESS)]
    subparsers.add_parser('dbsync', help='create or upgrade the database schema',
                          description='Update or Create the Database.', parents=each)
    check = subparsers.add_parser('dbchk', help='check the database schema',
                                  description='Check database against current version.', parents=each)
    check.add_argument('--equal', action='store_true', default=False,
                       help='succeed only if the schema is exactly this version (default: usable)')
    fix = subparsers.add_parser('fixit', help='re-stage and re-bundle carts in this process',
                                description='Stage again what carts lost or failed, and make them ready, in this '
                                            'process (waiting for tape recalls).', parents=each)
    fix.add_argument('--cartid', metavar='UID', nargs='+', required=True, dest='cartids',
                     help="the carts' uids: the uid a client posted, the `uid` dump prints (not its numeric `id`)")
    dump = subparsers.add_parser('dump', help='print every cart and its files',
                                 description='Dump all the carts as yaml', parents=each)
    dump.add_argument('--json', action='store_true', default=False, help='Dump as Json')
    status = subparsers.add_parser('status', help="a table of the carts' progress, or one cart's files",
                                   description='Without UIDs: every cart that is not deleted, a line each, with '
                                               'its phase and progress. With UIDs: each cart and its files.',
                                   parents=each)
    status.add_argument('uids', metavar='UID', nargs='*', help="carts' uids (default: every cart)")
    status.add_argument('--json', action='store_true', default=False,
                        help='print the status documents (as GET /<uid>/status answers them) as JSON')
    purge = subparsers.add_parser('purge', help='delete carts not used for a while',
                                  description='delete all carts before a time; with share_staged_files (the '
                                  'default), then also the staged-file cache entries no cart pins unused since then, '
                                  'untrusted entries and the cache\'s old temp files', parents=each)
    purge.add_argument('--time-ago', type=time_ago, default=time_ago('180 days ago'), dest='time_ago',
                       help='only cart older than X days ago (i.e. --time-ago="7 days ago"); default 180 days')
    return parser


TIME_UNITS = {'second': 'seconds', 'minute': 'minutes', 'hour': 'hours', 'day': 'days', 'week': 'weeks'}


def time_ago(text: str) -> datetime.timedelta:
    """Parse '60 days ago' (or '2 weeks', '12 hours ago', ...) into a timedelta; argparse reports errors."""
    words = text.strip().lower().split()
    if words and words[-1] == 'ago':
        words = words[:-1]
    unit = TIME_UNITS.get(words[1].rstrip('s')) if len(words) == 2 else None
    try:
        amount = float(words[0]) if unit else -1.0
    except ValueError:
        amount = -1.0
    if unit is None or amount < 0:
        raise argparse.ArgumentTypeError(f'{text!r} is not like "60 days ago" (units: {", ".join(TIME_UNITS)})')
    return datetime.timedelta(**{unit: amount})


def _dump(settings: Settings, args: argparse.Namespace) -> int:
    carts = command_service(settings).dump()
    if args.json:
        print(json.dumps(carts, indent=2))
    else:
        print(yaml.safe_dump(carts, sort_keys=False, allow_unicode=True), end='')
    return 0


def _purge(settings: Settings, args: argparse.Namespace) -> int:
    cutoff = datetime.datetime.now() - args.time_ago
    service = command_service(settings)
    purged = service.purge(cutoff)
    for cart_id, cart_uid in purged:
        print(f'deleted cart {cart_uid} (id {cart_id})')
    cache = service.purge_staged_files(cutoff)  # after the carts: the deleted ones pin nothing now
    if cache is not None:
        print(f'staged files removed: {cache.unused} unused since then and pinned by no cart, '
              f'{cache.untrusted} untrusted, {cache.temporaries} temp files left by a crash')
    print(f'{len(purged)} carts not used since {cutoff:%Y-%m-%d %H:%M:%S} deleted')  # the last line, as before
    return 0


def _size(value: Any) -> str:
    """Bytes for a person, one word: 1.5GB, 12.0kB, 3B (powers of 1000), '?' when not known."""
    if value is None:
        return '?'
    amount = float(value)
    for unit in ('B', 'kB', 'MB', 'GB'):
        if amount < 1000:
            return f'{amount:.0f}{unit}' if unit == 'B' else f'{amount:.1f}{unit}'
        amount /= 1000
    return f'{amount:.1f}TB'


def _table(rows: List[List[str]]) -> str:
    """Left-aligned columns, two spaces apart, the first row a header."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return '\n'.join('  '.join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


def _status(settings: Settings, args: argparse.Namespace) -> int:
    documents = command_service(settings).carts_status(args.uids)
    if args.json:
        print(json.dumps(documents, indent=2))
        return 0
    if not args.uids:
        rows = [['UID', 'ID', 'PHASE', 'FILES', 'FAILED', 'ON TAPE', 'BYTES', 'PERCENT', 'UPDATED']]
        for document in documents:
            progress = document['progress']
            rows.append([document['uid'], str(document['id']), document['phase'],
                         f"{progress['files_staged']}/{progress['files_total']}", str(progress['files_failed']),
                         str(progress['files_on_tape']),
                         f"{_size(progress['bytes_staged'])}/{_size(progress['bytes_total'])}",
                         f"{progress['percent']:g}%", document['updated'] or ''])
        print(_table(rows))
        print(f'{len(documents)} carts')
        return 0
    for document in documents:
        progress = document['progress']
        print(f"{document['uid']}: {document['phase']}, {progress['files_staged']} of {progress['files_total']} "
              f"files staged, {progress['percent']:g}%" + (f": {document['message']}" if document['message'] else ''))
        rows = [['PATH', 'STATE', 'ATTEMPTS', 'SIZE', 'ERROR']]
        rows += [[file['path'], file['state'], str(file['attempts']), _size(file['size']), file['error'] or '']
                 for file in document['files']]
        print(_table(rows))
    return 0


class _FilesBar:
    """fixit's progress on one cart, as a tqdm bar of its files under the bar of carts."""

    def __init__(self, cart_uid: str) -> None:
        self.cart_uid = cart_uid
        self.bar: Optional[tqdm.tqdm] = None

    def files(self, total: int) -> None:
        self.bar = tqdm.tqdm(total=total, desc=self.cart_uid, unit='file', position=1, leave=False)

    def file_done(self, outcome: StageOutcome) -> None:
        if self.bar is not None and not outcome.on_tape:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fixit(settings: Settings, args: argparse.Namespace) -> int:
    service = command_service(settings)
    failed = 0
    for cart_uid in tqdm.tqdm(args.cartids, desc='carts', unit='cart', position=0):
        progress = _FilesBar(cart_uid)
        try:
            result = service.fixit(cart_uid, progress)
        except CartError as exc:
            tqdm.tqdm.write(f'{cart_uid}: {exc.message}')
            failed += 1
            continue
        finally:
            progress.close()
        if result.state.status != 'ready':
            detail = result.state.message or f'{result.files_on_tape} files still on tape'
            tqdm.tqdm.write(f'{cart_uid}: {result.state.status}: {detail}')
            failed += 1
        else:
            tqdm.tqdm.write(f'{cart_uid}: ready')
    return 1 if failed else 0


def _dbsync(settings: Settings, _args: argparse.Namespace) -> int:
    version = schema.sync()
    print(f'database schema is {version[0]}.{version[1]} ({database.describe(settings.peewee_url)})')
    return 0


def _dbchk(settings: Settings, args: argparse.Namespace) -> int:
    version = schema.current_version()
    good = schema.is_equal() if args.equal else schema.is_usable()
    shown = 'missing' if version is None else f'{version[0]}.{version[1]}'
    wanted = '{}.{}'.format(*schema.SCHEMA_VERSION)
    print(f'database schema {shown}, this version needs {wanted}: {"ok" if good else "run dbsync"} '
          f'({database.describe(settings.peewee_url)})')
    return 0 if good else 1


def _no_such_database(settings: Settings, config_file: str) -> Optional[str]:
    """Why a command other than dbsync must not open the configured SQLite file, or None when it may.

    Opening a SQLite file that is not there makes an empty one, and the command then advised
    dbsync, as if the cart's database were empty, when it was only not the one configured.
    """
    path = database.sqlite_file(settings.peewee_url)
    if path is None or os.path.exists(path):
        return None
    where = f'config {settings.config_file}' if settings.config_file else f'no config file at {config_file}'
    return (f'the database {path} does not exist ({where}, peewee_url {settings.peewee_url}); give -c with the '
            f'config that names the cart\'s database (or set PEEWEE_URL), or create it there with `{CMD} dbsync`')


COMMANDS: Dict[str, Callable[[Settings, argparse.Namespace], int]] = {
    'dbsync': _dbsync,
    'dbchk': _dbchk,
    'fixit': _fixit,
    'dump': _dump,
    'status': _status,
    'purge': _purge,
}


def cmd(argv: Optional[List[str]] = None) -> int:
    """Run one admin subcommand; print help when none is given."""
    parser = cmd_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    start_logging(logging.WARNING)
    config_file = args.config or default_config_path(os.environ)
    try:
        settings = load_settings(config_file)
        use_format(settings.log_format, logging.getLogger().handlers)
        refusal = None if args.command == 'dbsync' else _no_such_database(settings, config_file)
        if refusal is not None:
            return _fail(refusal, CMD)
        open_database(settings, need_schema=args.command not in ('dbsync', 'dbchk'))
        with database.connection():
            return COMMANDS[args.command](settings, args)
    except CartError as exc:
        return _fail(exc.message, CMD)
    except database.DATABASE_ERRORS as exc:
        LOGGER.debug('database error', exc_info=True)
        return _fail(f'database error: {type(exc).__name__}: {exc}', CMD)


if __name__ == '__main__':
    sys.exit(main())
