"""Sending one completion event: a POST to its target over the standard library's http.client, with a timeout,
no redirects followed and no proxies, the answer's status the only thing read."""
from __future__ import annotations

import http.client
import urllib.parse

from .errors import NotificationFailed

MAX_ANSWER_BYTES = 64 * 1024  # of a receiver's answer read (and dropped), so its connection can close cleanly


def post_event(url: str, body: bytes, content_type: str, timeout: float) -> int:
    """POST `body` to `url`; return the 2xx status, or raise NotificationFailed saying what happened.

    A redirect is a failure, not followed: the target was checked against the allowed
    prefixes, where it points to was not.
    """
    parts = urllib.parse.urlsplit(url)
    connection_class = http.client.HTTPSConnection if parts.scheme == 'https' else http.client.HTTPConnection
    target = (parts.path or '/') + (f'?{parts.query}' if parts.query else '')
    connection = connection_class(parts.hostname or '', parts.port, timeout=timeout)
    try:
        connection.request('POST', target, body=body, headers={
            'Content-Type': content_type, 'Content-Length': str(len(body)), 'User-Agent': 'pacifica-cartd'})
        answer = connection.getresponse()
        answer.read(MAX_ANSWER_BYTES)
        status = answer.status
    except (OSError, http.client.HTTPException) as exc:
        raise NotificationFailed(f'POST {url}: {type(exc).__name__}: {exc}') from exc
    finally:
        connection.close()
    if not 200 <= status < 300:
        raise NotificationFailed(f'POST {url}: answered {status}')
    return status
