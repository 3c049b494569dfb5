"""Completion events: which URLs a cart's events go to, the outbox row written when a cart finishes, and its body
in the configured format (CloudEvents 1.0 structured JSON, or pacifica-notifications' CloudEvents 0.1)."""
from __future__ import annotations

import datetime
import json
import urllib.parse
import uuid
from typing import Any, List, Optional, Tuple

from .cartreport import FilesWanted, live_document
from .config import Settings
from .errors import BadRequest
from .orm import Cart, CartEvent, EventRow, get_cart, insert_events

TYPE_PREFIX = 'org.pacifica.cartd.cart.'
READY, ERROR, EXPIRED = 'ready', 'error', 'expired'
CLOUDEVENTS_TYPE = 'application/cloudevents+json'
JSON_TYPE = 'application/json'
MAX_CALLBACK_CHARS = 2000
_DEFAULT_PORTS = {'http': 80, 'https': 443}
_NO_FILES = FilesWanted('none')


def _origin_and_path(url: str) -> Optional[Tuple[str, str, int, str]]:
    """(scheme, host, port, path) of an http(s) URL without user info, or None for anything else."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:  # a port that is not a number, brackets that do not close
        return None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname or '@' in parts.netloc:
        return None
    return parts.scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[parts.scheme], parts.path or '/'


def _has_dot_segment(path: str) -> bool:
    """Whether a path has a `.` or `..` segment (written plainly or percent-encoded), which a server may resolve."""
    return any(urllib.parse.unquote(segment) in ('.', '..') for segment in path.split('/'))


def under_prefix(url: str, prefix: str) -> bool:
    """Whether `url` is under `prefix`: the same scheme, host and port exactly, and the prefix's path a
    whole-segment prefix of the URL's path (`/hooks` admits `/hooks` and `/hooks/a`, not `/hooksx`)."""
    target, allowed = _origin_and_path(url), _origin_and_path(prefix)
    if target is None or allowed is None or target[:3] != allowed[:3] or _has_dot_segment(target[3]):
        return False
    path, base = target[3], allowed[3]
    return path == base or path.startswith(base if base.endswith('/') else base + '/')


def check_callback(url: Optional[str], settings: Settings) -> Optional[str]:
    """A POST's callback_url if the configuration allows it; BadRequest (400) saying why not otherwise."""
    if url is None:
        return None
    if not settings.notifications_callback_prefixes:
        raise BadRequest('invalid cart request: callback_url: this service accepts no callback URLs '
                         '([notifications] callback_prefixes is empty)')
    if len(url) > MAX_CALLBACK_CHARS or any(char.isspace() or ord(char) < 32 for char in url) or \
            urllib.parse.urlsplit(url).fragment:
        raise BadRequest('invalid cart request: callback_url is too long or has white space, control characters '
                         'or a fragment')
    if not any(under_prefix(url, prefix) for prefix in settings.notifications_callback_prefixes):
        raise BadRequest(f'invalid cart request: callback_url {url!r} is not under a prefix this service allows: '
                         f'{", ".join(settings.notifications_callback_prefixes)}')
    return url


def targets(settings: Settings, cart: Cart) -> List[str]:
    """Where a cart's events go: the configured url and the cart's own callback, each once."""
    found = [url for url in (settings.notifications_url, cart.callback_url) if url]
    return list(dict.fromkeys(found))


class EventOutbox:
    """Writes a cart's completion event to the outbox, in the caller's transaction (the one that finished it)."""

    def __init__(self, settings: Settings) -> None:
        """Send to the targets `settings` names; with [notifications] off, record nothing and read nothing."""
        self.settings = settings

    def record(self, cart_id: int, kind: str) -> None:
        """Write the `kind` (ready, error, expired) event of a cart that just finished, once per target."""
        if not self.settings.notifications_on:
            return
        cart = get_cart(cart_id)
        if cart is None:
            return
        urls = targets(self.settings, cart)
        if not urls:
            return
        moment = datetime.datetime.now(datetime.timezone.utc)
        data = live_document(cart, _NO_FILES)
        for key in ('files', 'files_page'):
            data.pop(key, None)
        insert_events(EventRow(str(uuid.uuid4()), cart.id, TYPE_PREFIX + kind, str(cart.cart_uid),
                               moment.isoformat(timespec='milliseconds').replace('+00:00', 'Z'),
                               json.dumps(data, sort_keys=True)), urls)


def render(event: CartEvent, settings: Settings) -> Tuple[bytes, str]:
    """The body of an outbox row and its Content-Type, in the configured format."""
    data: Any = json.loads(str(event.data))
    if settings.notifications_format == 'pacifica':
        # pacifica-notifications receives CloudEvents 0.1 (its own test events and consumers' JSONPaths use these).
        document = {'cloudEventsVersion': '0.1', 'eventID': event.event_id, 'eventType': event.event_type,
                    'source': settings.notifications_source, 'eventTime': event.event_time,
                    'contentType': JSON_TYPE, 'extensions': {'subject': event.subject}, 'data': data}
        content_type = JSON_TYPE
    else:
        document = {'specversion': '1.0', 'id': event.event_id, 'source': settings.notifications_source,
                    'type': event.event_type, 'subject': event.subject, 'time': event.event_time,
                    'datacontenttype': JSON_TYPE, 'data': data}
        content_type = CLOUDEVENTS_TYPE
    return json.dumps(document).encode('utf-8'), content_type
