"""The WSGI entry point: `uwsgi --module pacifica.cartd.wsgi` (or `--ini uwsgi.ini`) serves `application`.

Under uWSGI the API is wrapped in uwsgiadapter.UwsgiAdapter, so it answers as it does
under pacifica-cartd's own server (see that module for what uWSGI does differently), and
is offered a sendfile onto uWSGI's connection, so file ranges go out zero-copy and a slow
download holds no read buffer. Any other WSGI server gets the CherryPy application as it is.
"""
import atexit
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import cherrypy

from .app import log_in_format, mount, start_logging
from .config import default_cpconfig_path, load_settings
from .logcontext import use_format
from .metrics import fresh_multiprocess_dir, mark_process_dead, remove_multiprocess_dir, use_multiprocess_dir
from .transport import SENDFILE_ENVIRON_KEY, socket_sendfile
from .uwsgiadapter import UwsgiAdapter
from .wiring import prepare_server

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict, StartResponse], Iterable[bytes]]
METRICS_DIR_PREFIX = 'pacifica-cartd-metrics-'  # the default multiprocess directory: <tmp>/<prefix><master pid>-...
UWSGI_SOCKET_TIMEOUT_S = 4.0  # uWSGI's own --socket-timeout default: how long its writes wait for a client


def _uwsgi() -> Optional[Any]:
    """uWSGI's own module when running under it (it exists only there), else None."""
    try:
        import uwsgi  # pylint: disable=import-outside-toplevel
    except ImportError:
        return None
    return uwsgi


def offering_sendfile(app: WsgiApp, connection_fd: Callable[[], int], timeout: float) -> WsgiApp:
    """`app` with a sendfile onto uWSGI's connection (zero-copy file ranges; no buffer per slow download)."""
    send_file = socket_sendfile(connection_fd, timeout)

    def offering(environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get('wsgi.url_scheme') != 'https':  # TLS in the worker: bytes must go through it
            environ[SENDFILE_ENVIRON_KEY] = send_file
        return app(environ, start_response)
    return offering


def socket_timeout(options: dict) -> float:
    """uWSGI's --socket-timeout (its writes wait this long for a client), its default when not set."""
    try:
        return float(options.get('socket-timeout', UWSGI_SOCKET_TIMEOUT_S))
    except (TypeError, ValueError):
        return UWSGI_SOCKET_TIMEOUT_S


def multiprocess_metrics(configured: Optional[Path]) -> Path:
    """Under uWSGI (its master imports this module before it forks the workers): the directory where every
    worker process keeps its metrics for a scrape to sum, emptied now (the configured one, or a fresh
    temporary one), and each process's live gauges dropped from it when that process exits."""
    directory = use_multiprocess_dir(configured or fresh_multiprocess_dir(METRICS_DIR_PREFIX))
    master = os.getpid()

    def at_exit() -> None:  # registered before the fork: runs in the master and in each worker
        if os.getpid() != master:
            mark_process_dead(directory, os.getpid())
        elif configured is None:
            remove_multiprocess_dir(directory)
    atexit.register(at_exit)
    return directory


start_logging()  # to standard error, which uWSGI writes to its log
SETTINGS = load_settings()
use_format(SETTINGS.log_format, logging.getLogger().handlers)
prepare_server(SETTINGS)
UWSGI = _uwsgi()
METRICS_DIR = (multiprocess_metrics(SETTINGS.metrics_multiprocess_dir)
               if UWSGI is not None and SETTINGS.metrics_enabled else None)
mount(SETTINGS, default_cpconfig_path(os.environ), METRICS_DIR)
log_in_format(SETTINGS.log_format)
application: WsgiApp = cherrypy.tree
if UWSGI is not None:
    OPTIONS = dict(getattr(UWSGI, 'opt', {}))
    application = UwsgiAdapter(application, SETTINGS.max_request_size, cherrypy.__version__, OPTIONS,
                               getattr(UWSGI, 'chunked_read', None), UWSGI.connection_fd)
    application = offering_sendfile(application, UWSGI.connection_fd, socket_timeout(OPTIONS))
