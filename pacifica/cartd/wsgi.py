"""The WSGI entry point: `uwsgi --module pacifica.cartd.wsgi` (or `--ini uwsgi.ini`) serves `application`.

Under uWSGI the API is wrapped in uwsgiadapter.UwsgiAdapter, so it answers as it does
under pacifica-cartd's own server (see that module for what uWSGI does differently), and
is offered a sendfile onto uWSGI's connection, so file ranges go out zero-copy and a slow
download holds no read buffer. Any other WSGI server gets the CherryPy application as it is.
"""
import logging
import os
from typing import Any, Callable, Iterable, Optional

import cherrypy

from .app import log_in_format, mount, start_logging
from .config import default_cpconfig_path, load_settings
from .logcontext import use_format
from .transport import SENDFILE_ENVIRON_KEY, socket_sendfile
from .uwsgiadapter import UwsgiAdapter
from .wiring import prepare_server

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict, StartResponse], Iterable[bytes]]
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


start_logging()  # to standard error, which uWSGI writes to its log
SETTINGS = load_settings()
use_format(SETTINGS.log_format, logging.getLogger().handlers)
prepare_server(SETTINGS)
mount(SETTINGS, default_cpconfig_path(os.environ))
log_in_format(SETTINGS.log_format)
application: WsgiApp = cherrypy.tree
UWSGI = _uwsgi()
if UWSGI is not None:
    OPTIONS = dict(getattr(UWSGI, 'opt', {}))
    application = UwsgiAdapter(application, SETTINGS.max_request_size, cherrypy.__version__, OPTIONS,
                               getattr(UWSGI, 'chunked_read', None), UWSGI.connection_fd)
    application = offering_sendfile(application, UWSGI.connection_fd, socket_timeout(OPTIONS))
