"""HTTP/1.1 byte for byte over a socket, so that no client library normalises the request."""
from __future__ import annotations

import dataclasses
import socket
import time
from typing import Dict, Tuple

ANSWER_DEADLINE_S = 30.0


@dataclasses.dataclass
class Answer:
    """A parsed HTTP answer and whether the server closed the connection after it."""

    status: int
    reason: str
    headers: Dict[str, str]  # names in lower case
    body: bytes
    closed: bool


def exchange(port: int, request: bytes, deadline_s: float = ANSWER_DEADLINE_S) -> Tuple[bytes, bool]:
    """Send `request` to 127.0.0.1:port; return what came back and whether the server closed the connection.

    Reading stops when the server closes, or when nothing arrives for `deadline_s` (a server
    that keeps the connection open, or waits for more of the body), or after `deadline_s` in all.
    """
    received = b''
    with socket.create_connection(('127.0.0.1', port), timeout=deadline_s) as sock:
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before reading all of it; read the answer
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                return received, False
            except ConnectionResetError:  # closed with some of our bytes unread: a close too
                return received, True
            if not chunk:
                return received, True
            received += chunk
    return received, False


def parse_answer(received: bytes, closed: bool, head_request: bool = False) -> Answer:
    """Split one answer into status, headers and body (none for a HEAD)."""
    head, _, rest = received.partition(b'\r\n\r\n')
    lines = head.decode('latin-1').split('\r\n')
    assert lines[0].startswith('HTTP/1.1 '), f'no HTTP answer (closed: {closed}): {received[:300]!r}'
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(':')
        headers[name.strip().lower()] = value.strip()
    body = b'' if head_request else rest[:int(headers.get('content-length', len(rest)))]
    _, code, reason = lines[0].split(' ', 2)
    return Answer(int(code), reason, headers, body, closed)
