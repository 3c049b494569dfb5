"""The WSGI entry point: `uwsgi --module pacifica.cartd.wsgi` serves `application`.

uWSGI's `--http-socket` answers HTTP/1.1 requests but closes every connection after one
answer (only `--http11-socket` keeps them alive). The API's answers carry a
Content-Length, so a client with a session would send its next request into the closed
connection and be reset; under a plain `--http-socket` every answer therefore says
`Connection: close`, and the client opens a new connection instead.
"""
import os
from typing import Any, Callable, Iterable, List, Optional, Tuple

import cherrypy

from .app import mount
from .config import default_cpconfig_path, load_settings
from .wiring import prepare_server

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict, StartResponse], Iterable[bytes]]
ONE_ANSWER_SOCKETS = ('http-socket', 'https-socket')  # uWSGI's sockets that close after each answer


def uwsgi_options() -> dict:
    """uWSGI's options when running under it (its `uwsgi` module exists only there), else {}."""
    try:
        import uwsgi  # pylint: disable=import-outside-toplevel
    except ImportError:
        return {}
    return dict(getattr(uwsgi, 'opt', {}))


def closing_connections(app: WsgiApp) -> WsgiApp:
    """`app` with `Connection: close` on every answer."""
    def closing(environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        def start(status: str, headers: List[Tuple[str, str]], exc_info: Optional[Any] = None) -> Any:
            headers = [(name, value) for name, value in headers if name.lower() != 'connection']
            return start_response(status, headers + [('Connection', 'close')], *([exc_info] if exc_info else []))
        return app(environ, start)
    return closing


SETTINGS = load_settings()
prepare_server(SETTINGS)
mount(SETTINGS, default_cpconfig_path(os.environ))
application: WsgiApp = cherrypy.tree
if any(socket in uwsgi_options() for socket in ONE_ANSWER_SOCKETS):
    application = closing_connections(application)
