"""Command-line entry points: `pacifica-cartd` (the server) and `pacifica-cartd-cmd` (admin)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence

import cherrypy

from . import database, schema
from .app import mount, prepare
from .config import Settings, default_config_path, default_cpconfig_path, load_settings
from .errors import CartError

LOGGER = logging.getLogger('pacifica.cartd')


def _fail(message: str) -> int:
    print(f'pacifica-cartd: error: {message}', file=sys.stderr)
    return 1


def server_parser() -> argparse.ArgumentParser:
    """The `pacifica-cartd` arguments, as the published service has them."""
    parser = argparse.ArgumentParser(prog='pacifica-cartd', description='Run the cart server.')
    parser.add_argument('-c', '--config', metavar='CONFIG', type=str, default=None, dest='config',
                        help='cart config file')
    parser.add_argument('--cpconfig', metavar='CONFIG', type=str, default=None, dest='cpconfig',
                        help='cherrypy config file')
    parser.add_argument('-p', '--port', metavar='PORT', type=int, default=None, dest='port',
                        help='port to listen on')
    parser.add_argument('-a', '--address', metavar='ADDRESS', default=None, dest='address',
                        help='address to listen on')
    return parser


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CherryPy server until SIGTERM or SIGINT."""
    args = server_parser().parse_args(argv)
    _logging()
    config_file = args.config or default_config_path(os.environ)
    cpconfig = args.cpconfig or default_cpconfig_path(os.environ)
    try:
        settings = load_settings(config_file)
        prepare(settings)
    except CartError as exc:
        return _fail(exc.message)
    cherrypy.config.update({'server.socket_host': '127.0.0.1', 'server.socket_port': 8081,
                            'engine.autoreload.on': False})
    # CherryPy prints its own ENGINE and access lines; do not print them twice via the root logger.
    cherrypy.log.error_log.propagate = False
    cherrypy.log.access_log.propagate = False
    mount(settings, cpconfig)
    if args.port is not None:
        cherrypy.config.update({'server.socket_port': args.port})
    if args.address is not None:
        cherrypy.config.update({'server.socket_host': args.address})
    cherrypy.engine.signals.subscribe()
    cherrypy.engine.start()
    cherrypy.engine.block()
    return 0


def cmd_parser() -> argparse.ArgumentParser:
    """The `pacifica-cartd-cmd` arguments and subcommands."""
    parser = argparse.ArgumentParser(prog='pacifica-cartd-cmd', description='Cart admin tool.')
    parser.add_argument('-c', '--config', metavar='CONFIG', type=str, default=None, dest='config',
                        help='cart config file')
    subparsers = parser.add_subparsers(help='sub-command help', dest='command')
    sync = subparsers.add_parser('dbsync', help='create or upgrade the database schema',
                                 description='Update or Create the Database.')
    sync.add_argument('-c', '--config', metavar='CONFIG', type=str, default=argparse.SUPPRESS, dest='config',
                      help='cart config file')
    check = subparsers.add_parser('dbchk', help='check the database schema',
                                  description='Check database against current version.')
    check.add_argument('--equal', action='store_true', default=False,
                       help='succeed only if the schema is exactly this version (default: usable)')
    check.add_argument('-c', '--config', metavar='CONFIG', type=str, default=argparse.SUPPRESS, dest='config',
                       help='cart config file')
    return parser


def _dbsync(_settings: Settings, _args: argparse.Namespace) -> int:
    version = schema.sync()
    print(f'database schema is {version[0]}.{version[1]}')
    return 0


def _dbchk(_settings: Settings, args: argparse.Namespace) -> int:
    version = schema.current_version()
    good = schema.is_equal() if args.equal else schema.is_usable()
    shown = 'missing' if version is None else f'{version[0]}.{version[1]}'
    wanted = '{}.{}'.format(*schema.SCHEMA_VERSION)
    print(f'database schema {shown}, this version needs {wanted}: {"ok" if good else "run dbsync"}')
    return 0 if good else 1


COMMANDS: Dict[str, Callable[[Settings, argparse.Namespace], int]] = {
    'dbsync': _dbsync,
    'dbchk': _dbchk,
}


def cmd(argv: Optional[List[str]] = None) -> int:
    """Run one admin subcommand; print help when none is given."""
    parser = cmd_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    _logging()
    try:
        settings = load_settings(args.config or default_config_path(os.environ))
        database.bind(settings)
        database.wait_for_database(settings)
        with database.connection():
            return COMMANDS[args.command](settings, args)
    except CartError as exc:
        return _fail(exc.message)


if __name__ == '__main__':
    sys.exit(main())
