"""The REST API: CherryPy handlers as thin translations to the service, and the one error translator."""
from __future__ import annotations

import contextlib
import datetime
import email.utils
import functools
import json
import logging
import os
import threading
import time
from http import HTTPStatus
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional, Tuple, TypeVar
from urllib.parse import quote, unquote_to_bytes

import cherrypy

from . import database
from .byteranges import parse_range
from .cartreport import FilesWanted
from .carts import CartDownload
from .cartstate import CartState
from .errors import BadRequest, CartError, CartNotReady, PayloadTooLarge, RangeNotSatisfiable, error_document
from .expiry import http_date
from .health import CONTENT_TYPE as HEALTH_CONTENT_TYPE
from .logcontext import about
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, ServerMetrics
from .paths import tar_top_name
from .service import CartService
from .transport import SENDFILE_ENVIRON_KEY, response_body

LOGGER = logging.getLogger(__name__)

JSON_TYPES = ('application/json', 'text/javascript')
STATUS_HEADER = 'X-Pacifica-Status'
MESSAGE_HEADER = 'X-Pacifica-Message'
EXPIRES_HEADER = 'X-Pacifica-Expires'
STATUS_SEGMENT = 'status'  # GET /<uid>/status: a uid is one segment, so no uid is shadowed
STATUS_ALLOWED_METHODS = 'GET, HEAD'
UP_MESSAGE = 'Pacifica Cartd Interface Up and Running'
UNEXPECTED_MESSAGE = 'The server encountered an unexpected condition which prevented it from fulfilling the request.'

# Bodies larger than this (or of unknown length) are read, parsed and recorded one at a time
# in a process: a 100,000-file cart (13 MB) grows the server by about 80 MB while it is handled.
LARGE_BODY = 8 << 20
_LARGE_BODY_SLOT = threading.Lock()

F = TypeVar('F', bound=Callable[..., Any])


def header_safe(text: str) -> str:
    """Make text fit an HTTP header: one line, Latin-1 (others escaped as \\uXXXX)."""
    flat = ' '.join(text.splitlines())
    return flat.encode('latin-1', 'backslashreplace').decode('latin-1')


def state_headers(state: CartState) -> List[Tuple[str, str]]:
    """The progress headers of every HEAD answer for an existing cart, one integer each, and
    X-Pacifica-Expires (an HTTP date) for a ready cart with a lifetime.

    X-Pacifica-Bytes-Total only once every file's size is known (before, it would grow).
    """
    progress = state.progress
    headers = [('X-Pacifica-Files-Total', str(progress.files_total)),
               ('X-Pacifica-Files-Staged', str(progress.files_staged)),
               ('X-Pacifica-Files-Failed', str(progress.files_failed)),
               ('X-Pacifica-Files-On-Tape', str(progress.files_on_tape))]
    if progress.bytes_known:
        headers.append(('X-Pacifica-Bytes-Total', str(progress.bytes_total)))
    headers.append(('X-Pacifica-Bytes-Staged', str(progress.bytes_staged)))
    if state.expires is not None:
        headers.append((EXPIRES_HEADER, http_date(state.expires)))
    return headers


def error_page(status: str, message: str, traceback: str, version: str) -> str:
    """CherryPy's error page, as JSON with the published four keys; tracebacks stay in the log."""
    del traceback
    cherrypy.response.headers['Content-Type'] = 'application/json'
    return error_document(status, message, version)


def _raise_http(status: int, message: str) -> None:
    """Answer with an error page; a HEAD answer also gets the two X-Pacifica headers."""
    if cherrypy.request.method == 'HEAD':
        cherrypy.response.headers[STATUS_HEADER] = 'error'
        cherrypy.response.headers[MESSAGE_HEADER] = header_safe(message)
    raise cherrypy.HTTPError(status, message)


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode('utf-8')
    except UnicodeDecodeError:
        return False
    return True


def refuse_non_utf8_url() -> None:
    """Answer 400 to a URL whose path or query string is not UTF-8 once %-decoded.

    CherryPy would hand such a path on decoded as Latin-1 (`/%FFx` becoming the uid 'ÿx',
    the same uid as `/%C3%BFx`) and answer such a query string with a 404.
    """
    environ = cherrypy.request.wsgi_environ
    try:  # PEP 3333: the bytes the client sent, one Latin-1 character each
        path = environ.get('PATH_INFO', '').encode('latin-1')
        query = unquote_to_bytes(environ.get('QUERY_STRING', '').encode('latin-1'))
    except UnicodeEncodeError:
        return  # a server that decoded them already
    if not _is_utf8(path) or not _is_utf8(query):
        _raise_http(400, 'the URL is not valid UTF-8 once %-decoded')


def status_resource_methods() -> None:
    """`/<uid>/status` answers GET and HEAD only: its Allow header says so, and other methods get 405."""
    parts = cherrypy.request.path_info.split('/')
    if len(parts) == 3 and parts[1] and parts[2] == STATUS_SEGMENT:
        cherrypy.response.headers['Allow'] = STATUS_ALLOWED_METHODS
        if cherrypy.request.method not in ('GET', 'HEAD'):
            cherrypy.request.handler = cherrypy.HTTPError(405, 'Specified method is invalid for this resource')


def on_start_resource() -> None:
    """Checks of every request once it is dispatched, before its handler runs."""
    refuse_non_utf8_url()
    status_resource_methods()


def request_cart_uid() -> Optional[str]:
    """The uid of the cart the request is about: its (decoded) path's first segment, or None for `/`."""
    path = cherrypy.request.path_info
    return (path.split('/', 2)[1] if path.startswith('/') else '') or None


def translate_errors(handler: F) -> F:
    """Run a handler with one database connection and map every failure to status + JSON.

    CartErrors carry their status; anything else is logged with its traceback and
    answered 500 with a generic message. HEAD answers also get the two X-Pacifica headers.
    """
    @functools.wraps(handler)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with database.connection(), about(cart_uid=request_cart_uid()):
                return handler(*args, **kwargs)
        except cherrypy.HTTPError:
            raise
        except CartNotReady as exc:
            # Not an error to the published clients: 202 with a plain sentence.
            cherrypy.response.status = exc.http_status
            cherrypy.response.stream = False
            return exc.message.encode('utf-8')
        except CartError as exc:
            status, message = exc.http_status, exc.message
            if status >= 500:
                LOGGER.error('%s %s: %s', cherrypy.request.method, cherrypy.request.path_info, message)
        except Exception:  # the one place unexpected errors become a 500
            LOGGER.exception('%s %s failed', cherrypy.request.method, cherrypy.request.path_info)
            status, message = 500, UNEXPECTED_MESSAGE
        _raise_http(status, message)
        return None
    return wrapper  # type: ignore[return-value]


def _read_json_body(limit: int) -> Any:
    request = cherrypy.request
    content_type = (request.headers.get('Content-Type') or '').split(';')[0].strip().lower()
    if content_type not in JSON_TYPES:
        raise cherrypy.HTTPError(415, 'Expected an entity of content type application/json, text/javascript')
    declared = request.headers.get('Content-Length')
    if declared is not None and not (declared.isascii() and declared.isdigit()):
        # cheroot takes '-1' for a length, and the body would then be read to the end
        raise BadRequest(f'the Content-Length header is not a number of bytes: {declared!r}')
    if declared is not None and int(declared) > limit:
        raise PayloadTooLarge(f'the request body is larger than {limit} bytes')
    raw = request.body.fp.read(limit + 1) if request.body.fp is not None else b''
    if len(raw) > limit:
        raise PayloadTooLarge(f'the request body is larger than {limit} bytes')
    try:
        return json.loads(raw.decode('utf-8'))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(f'Invalid JSON document: {exc}') from exc
    except RecursionError as exc:
        raise BadRequest('Invalid JSON document: nested too deeply') from exc


def _body_slot() -> ContextManager[Any]:
    """Hold the process's one slot for a large body while it is read, parsed and recorded."""
    declared = cherrypy.request.headers.get('Content-Length')
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) <= LARGE_BODY:
        return contextlib.nullcontext()
    return _LARGE_BODY_SLOT


def _disposition(filename: str) -> str:
    try:
        filename.encode('ascii')
        if '"' not in filename and ';' not in filename and ' ' not in filename:
            return f'attachment; filename={filename}'
        return 'attachment; filename="{}"'.format(filename.replace('"', '_'))
    except UnicodeEncodeError:
        return f"attachment; filename*=UTF-8''{quote(filename, safe='')}"


def _send(download: CartDownload, chunk_size: int) -> Iterator[bytes]:
    """Set the download's headers (Range honoured) and return its body."""
    request, response = cherrypy.request, cherrypy.response
    layout = download.layout
    wanted = request.headers.get('Range')
    if_range = request.headers.get('If-Range')
    if if_range is not None and if_range != layout.etag:
        wanted = None
    try:
        byte_range = parse_range(wanted, layout.size)
    except ValueError as exc:
        response.headers['Content-Range'] = f'bytes */{layout.size}'
        raise RangeNotSatisfiable(str(exc)) from exc
    response.headers['Content-Type'] = 'application/octet-stream'
    response.headers['Content-Disposition'] = _disposition(download.filename)
    response.headers['Accept-Ranges'] = 'bytes'
    response.headers['ETag'] = layout.etag
    start, end = byte_range or (0, layout.size)
    if byte_range is not None:
        response.status = 206
        response.headers['Content-Range'] = f'bytes {start}-{end - 1}/{layout.size}'
    response.headers['Content-Length'] = str(end - start)
    return response_body(download.pieces(start, end), chunk_size, request.wsgi_environ.get(SENDFILE_ENVIRON_KEY))


def _accel_redirect(download: CartDownload, prefix: str, volume: str) -> Optional[bytes]:
    """Hand a bundle tar that lies whole on the volume to nginx in front (X-Accel-Redirect); None if it does not.

    nginx then sends the file itself from an `internal` location that maps `prefix` to
    volume_path, Range requests included, and this server's thread is free at once.
    """
    image = download.layout.image
    if not prefix or image is None:
        return None
    relative = os.path.relpath(os.fspath(image), volume)
    if relative.startswith('..'):
        return None
    response = cherrypy.response
    response.headers['Content-Type'] = 'application/octet-stream'
    response.headers['Content-Disposition'] = _disposition(download.filename)
    response.headers['X-Accel-Redirect'] = prefix + quote(relative)
    response.stream = False
    return b''


def _split(path: Tuple[str, ...]) -> Tuple[Optional[str], Tuple[str, ...]]:
    """The cart uid (first path segment) and any further segments.

    Handlers take the path positionally and query parameters as **params, so a query
    parameter named like an argument (`?uid=`, `?self=`) cannot collide with it.
    """
    return (path[0] if path else None), path[1:]


class CartRoot:
    """`/` and `/<uid>`: create, poll, download and delete carts."""

    exposed = True

    def __init__(self, service_factory: Callable[[], CartService]) -> None:
        """Build handlers over the service the composition root provides."""
        self._service_factory = service_factory

    @property
    def service(self) -> CartService:
        """The service, built on first use."""
        return self._service_factory()

    @translate_errors
    def GET(self, /, *path: str, **params: Any) -> Any:
        """`GET /` says the service is up; `GET /<uid>[?filename=x.tar]` downloads a ready cart;
        `GET /<uid>/status` answers the cart's status document."""
        uid, extra = _split(path)
        if uid is not None and extra == (STATUS_SEGMENT,):
            return self._report(uid, params)
        filename = params.get('filename')
        if filename is not None and not isinstance(filename, str):
            raise BadRequest('give the filename parameter once')
        if extra:
            raise cherrypy.HTTPError(404, 'The path {!r} was not found.'.format(cherrypy.request.path_info))
        if uid is None:
            cherrypy.response.stream = False
            return json.dumps({'message': UP_MESSAGE}).encode('utf-8')
        if filename is None:
            filename = datetime.datetime.now().strftime('data_%Y_%m_%d_%H_%M_%S.tar')
        top = tar_top_name(filename)
        settings = self.service.settings
        download = self.service.download(uid, filename, top)
        handed_over = _accel_redirect(download, settings.x_accel_redirect, str(settings.volume_path))
        if handed_over is not None:
            return handed_over
        return _send(download, settings.transfer_size)
    GET._cp_config = {'response.stream': True}  # type: ignore[attr-defined]

    def _report(self, uid: str, params: Dict[str, Any]) -> bytes:
        cherrypy.response.stream = False
        report = self.service.report(uid, FilesWanted.from_query(params))
        return json.dumps(report).encode('utf-8')

    @translate_errors
    def HEAD(self, /, *path: str, **params: Any) -> Optional[bytes]:
        """`HEAD /<uid>`: 204 with the cart's status and message in X-Pacifica headers;
        `HEAD /<uid>/status`: the headers of the status document."""
        uid, extra = _split(path)
        if uid is not None and extra == (STATUS_SEGMENT,):
            return self._report(uid, params)
        del params
        if uid is None or extra:
            raise BadRequest('HEAD needs a cart uid: /<uid>')
        state = self.service.status(uid)
        headers = cherrypy.response.headers
        headers[STATUS_HEADER] = state.status
        headers[MESSAGE_HEADER] = header_safe(state.message)
        headers.update(state_headers(state))
        if state.expired:
            raise cherrypy.HTTPError(410, state.message)
        if state.status == 'error':
            raise cherrypy.HTTPError(500, state.message)
        cherrypy.response.status = 204
        return None

    @translate_errors
    def POST(self, /, *path: str, **params: Any) -> bytes:
        """`POST /<uid>` with {"fileids": [...]}: 201 once the cart is recorded and queued."""
        del params
        uid, extra = _split(path)
        if uid is None:
            raise cherrypy.HTTPError(404, 'Missing parameters: uid')
        if extra:
            raise cherrypy.HTTPError(404, 'The path {!r} was not found.'.format(cherrypy.request.path_info))
        with _body_slot():
            self.service.create_cart(uid, _read_json_body(self.service.settings.max_request_size))
        cherrypy.response.status = 201
        return json.dumps({'message': 'Cart Processing has begun'}).encode('utf-8')

    @translate_errors
    def DELETE(self, /, *path: str, **params: Any) -> bytes:
        """`DELETE /<uid>`: remove every cart with this uid, staging or not."""
        del params
        uid, extra = _split(path)
        if uid is None or extra:
            raise cherrypy.HTTPError(404, 'Not Found')
        self.service.delete(uid)
        return json.dumps({'message': 'Cart Deleted Successfully'}).encode('utf-8')


ALLOWED_METHODS = 'DELETE, GET, HEAD, POST'


class HeadFastLane:
    """WSGI middleware: the pollers' `HEAD /<uid>` of a cart that is staging or ready, answered without
    CherryPy's request machinery (two thirds of a HEAD's cost under it); everything else goes on to CherryPy.

    It answers only what CartRoot.HEAD would answer with 204 (same headers, same query), and
    hands CherryPy every other request, including a HEAD whose uid has '%', a second segment,
    bytes that are not UTF-8, no cart or a failed cart, so every error keeps its one
    translator. An access-log line like CherryPy's is written for each answer it gives.
    """

    def __init__(self, nextapp: Callable[..., Any], service_factory: Callable[[], CartService]) -> None:
        """Answer in front of `nextapp` (the CherryPy application)."""
        self.nextapp = nextapp
        self.service_factory = service_factory
        self.server = f'CherryPy/{cherrypy.__version__}'

    def _uid(self, environ: Dict[str, Any]) -> Optional[str]:
        path = environ.get('PATH_INFO', '')
        if environ.get('REQUEST_METHOD') != 'HEAD' or not path.startswith('/') or '/' in path[1:] or '%' in path:
            return None
        try:  # PEP 3333: PATH_INFO is the bytes the client sent, as Latin-1 characters
            uid = path[1:].encode('latin-1').decode('utf-8')
        except UnicodeError:
            return None
        try:
            unquote_to_bytes(environ.get('QUERY_STRING', '').encode('latin-1')).decode('utf-8')
        except UnicodeError:
            return None
        return uid or None

    def __call__(self, environ: Dict[str, Any], start_response: Callable[..., Any]) -> Any:
        """Answer a plain HEAD of a live cart, or pass the request on."""
        uid = self._uid(environ)
        if uid is None:
            return self.nextapp(environ, start_response)
        try:
            with database.connection():
                state = self.service_factory().status(uid)
        except Exception:  # no such cart, a database outage, anything: CherryPy's path answers it
            return self.nextapp(environ, start_response)
        if state.status == 'error':
            return self.nextapp(environ, start_response)
        start_response('204 No Content', [
            ('Content-Type', 'application/json'), ('Server', self.server),
            ('Date', email.utils.formatdate(usegmt=True)), ('Allow', ALLOWED_METHODS),
            (STATUS_HEADER, state.status), (MESSAGE_HEADER, header_safe(state.message)),
            *state_headers(state)])
        access_log(environ, 204, None)
        return []


def access_log(environ: Dict[str, Any], status: int, length: Optional[int]) -> None:
    """An access-log line like CherryPy's, for an answer given in front of it."""
    logger = cherrypy.log.access_log
    if not logger.handlers and not logger.propagate:
        return
    line = '{} - - [{}] "{} {} {}" {} {} "{}" "{}"'.format(
        environ.get('REMOTE_ADDR', ''), time.strftime('%d/%b/%Y:%H:%M:%S'), environ.get('REQUEST_METHOD', ''),
        environ.get('REQUEST_URI') or environ.get('PATH_INFO', ''), environ.get('SERVER_PROTOCOL', ''), status,
        '-' if length is None else length, environ.get('HTTP_REFERER', ''), environ.get('HTTP_USER_AGENT', ''))
    logger.log(logging.INFO, line)


OPS_PATHS = ('/-/healthy', '/-/ready')  # two segments: no cart uid is shadowed (a uid is one segment)


METRICS_PATH = '/-/metrics'


class OpsLane:
    """WSGI middleware: `GET /-/healthy` and `GET /-/ready` (and HEAD of them) for load balancers and
    orchestrators, and `GET /-/metrics` for Prometheus (when metrics are on), answered in front of CherryPy
    with no request machinery and, for /-/healthy, without the database; everything else goes on to CherryPy
    (so /-/metrics with metrics off is an unknown path: 404)."""

    def __init__(self, nextapp: Callable[..., Any], service_factory: Callable[[], CartService],
                 metrics: Optional[ServerMetrics] = None) -> None:
        """Answer in front of `nextapp` (the CherryPy application)."""
        self.nextapp = nextapp
        self.service_factory = service_factory
        self.metrics = metrics
        self.server = f'CherryPy/{cherrypy.__version__}'
        self.paths = OPS_PATHS + ((METRICS_PATH,) if metrics is not None else ())

    def __call__(self, environ: Dict[str, Any], start_response: Callable[..., Any]) -> Any:
        """Answer the ops paths, or pass the request on."""
        path = environ.get('PATH_INFO', '')
        if path not in self.paths:
            return self.nextapp(environ, start_response)
        method = environ.get('REQUEST_METHOD', '')
        headers = [('Server', self.server), ('Date', email.utils.formatdate(usegmt=True)),
                   ('Allow', STATUS_ALLOWED_METHODS), ('Cache-Control', 'no-store')]
        if method not in ('GET', 'HEAD'):
            status, body = 405, error_document('405 Method Not Allowed',
                                               'Specified method is invalid for this resource', cherrypy.__version__)
            headers.append(('Content-Type', 'application/json'))
        elif path == METRICS_PATH and self.metrics is not None:
            status, body = 200, self.metrics.exposition().decode('utf-8')
            headers.append(('Content-Type', METRICS_CONTENT_TYPE))
        else:
            health = self.service_factory().health
            status, document = (200, health.healthy()) if path == OPS_PATHS[0] else health.ready()
            body = json.dumps(document)
            headers.append(('Content-Type', HEALTH_CONTENT_TYPE))
        payload = body.encode('utf-8')
        headers.append(('Content-Length', str(len(payload))))
        start_response(f'{status} {HTTPStatus(status).phrase}', headers)
        access_log(environ, status, len(payload))
        return [] if method == 'HEAD' else [payload]


class MetricsLane:
    """WSGI middleware, outermost: counts every request that reaches the application (the pollers' HEAD lane and
    the ops paths included, scrapes of /-/metrics left out so a scrape does not move what it reports), its
    duration to the last byte, and the body bytes sent, those the server sends from files included."""

    def __init__(self, nextapp: Callable[..., Any], metrics: ServerMetrics) -> None:
        """Count in front of `nextapp`."""
        self.nextapp = nextapp
        self.metrics = metrics

    def __call__(self, environ: Dict[str, Any], start_response: Callable[..., Any]) -> Any:
        """Pass the request on, counting what it sends: the request when its answer starts (so a client that
        has its answer finds it counted), its duration once its body is done (closed)."""
        if environ.get('PATH_INFO') == METRICS_PATH:
            return self.nextapp(environ, start_response)
        started = time.perf_counter()
        metrics = self.metrics
        method = environ.get('REQUEST_METHOD', '')
        counted: List[bool] = []
        server_send = environ.get(SENDFILE_ENVIRON_KEY)
        if server_send is not None:
            def counted_send(handle: Any, offset: int, count: int) -> int:
                sent: int = server_send(handle, offset, count)
                metrics.count_served(sent)
                return sent
            environ[SENDFILE_ENVIRON_KEY] = counted_send

        def counted_start(status: str, headers: Any, exc_info: Any = None) -> Callable[[bytes], Any]:
            if not counted:  # a second call (exc_info: an error after the first) answers the same request
                counted.append(True)
                metrics.count_request(method, status[:3])
            write = start_response(status, headers, exc_info)

            def counted_write(data: bytes) -> Any:
                metrics.count_served(len(data))
                return write(data)
            return counted_write

        def done() -> None:
            metrics.observe_duration(time.perf_counter() - started)
        try:
            body = self.nextapp(environ, counted_start)
        except BaseException:
            if not counted:  # the server answers 500 for an application that raises
                metrics.count_request(method, '500')
            done()
            raise
        return _CountedBody(body, metrics, done)


class _CountedBody:
    """A response body whose chunks are counted as they are taken, and whose end (close) counts the request."""

    def __init__(self, body: Any, metrics: ServerMetrics, done: Callable[[], None]) -> None:
        self.body = body
        self.metrics = metrics
        self.done = done

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.body:
            self.metrics.count_served(len(chunk))
            yield chunk

    def close(self) -> None:
        """Close the body (PEP 3333) and count the request."""
        try:
            close = getattr(self.body, 'close', None)
            if close is not None:
                close()
        finally:
            self.done()


class QuietRequest(cherrypy._cprequest.Request):
    """CherryPy's request, sending no traceback even when it fails before the config applies.

    Under uWSGI a request line such as `POST /a b HTTP/1.1` reaches CherryPy with the
    protocol `b HTTP/1.1`, which it cannot parse; its bare 500 answer would carry the traceback.
    """

    show_tracebacks = False


def app_config() -> Dict[str, Dict[str, Any]]:
    """The per-application CherryPy config the API needs, whatever the cpconfig file says."""
    return {
        '/': {
            'request.dispatch': cherrypy.dispatch.MethodDispatcher(),
            'request.show_tracebacks': False,
            'request.process_request_body': False,
            'hooks.on_start_resource': on_start_resource,
            'tools.response_headers.on': True,
            'tools.response_headers.headers': [('Content-Type', 'application/json')],
            'error_page.default': error_page,
        },
    }
