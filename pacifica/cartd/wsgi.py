"""The WSGI entry point: `uwsgi --module pacifica.cartd.wsgi` (or `--ini uwsgi.ini`) serves `application`.

Under uWSGI the API is wrapped in uwsgiadapter.UwsgiAdapter, so it answers as it does
under pacifica-cartd's own server (see that module for what uWSGI does differently).
Any other WSGI server gets the CherryPy application as it is.
"""
import os
from typing import Any, Callable, Iterable, Optional

import cherrypy

from .app import mount
from .config import default_cpconfig_path, load_settings
from .uwsgiadapter import UwsgiAdapter
from .wiring import prepare_server

WsgiApp = Callable[[dict, Callable[..., Any]], Iterable[bytes]]


def _uwsgi() -> Optional[Any]:
    """uWSGI's own module when running under it (it exists only there), else None."""
    try:
        import uwsgi  # pylint: disable=import-outside-toplevel
    except ImportError:
        return None
    return uwsgi


SETTINGS = load_settings()
prepare_server(SETTINGS)
mount(SETTINGS, default_cpconfig_path(os.environ))
application: WsgiApp = cherrypy.tree
UWSGI = _uwsgi()
if UWSGI is not None:
    application = UwsgiAdapter(application, SETTINGS.max_request_size, cherrypy.__version__,
                               dict(getattr(UWSGI, 'opt', {})), getattr(UWSGI, 'chunked_read', None))
