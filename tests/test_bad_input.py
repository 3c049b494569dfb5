"""Hostile and bad requests on each database: a JSON error naming the problem, and nothing changed.

Every row is one request, sent byte for byte over a socket (no client library normalises its
URL or headers). Its answer must have the expected status and, unless it is a HEAD, the API's
JSON error page whose message names the problem; the volume's tree and the cart and file row
counts must be as they were before. Rows that declare a body larger than what they send
also check that the server answers at once and closes the connection, without waiting for
(or buffering) the rest of the body.

All rows run in one test per database, against one stack: as separate test items,
pytest-xdist would spread them over its workers and each worker would start its own stacks.
A failure lists every row that failed, by name.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
import uuid
from typing import Any, Dict, List, Mapping, Optional, Tuple

import pytest
from peewee import SQL, Table, fn
from playhouse.db_url import connect

from cartd_testkit.databases import peewee4_url
from cartd_testkit.rawhttp import exchange, parse_answer
from cartd_testkit.stack import CartStack

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope='module')
def stack(served_stack: CartStack) -> CartStack:
    """This module runs under pacifica-cartd on each database and under uWSGI (conftest.served_stack)."""
    return served_stack

LIMIT = 64 * 1024
STACK_OVERRIDES = {'cartd': {'max_request_size': '64 KiB'}}  # read by the stack fixture (conftest.py)
ERROR_KEYS = {'status', 'message', 'traceback', 'version'}
EMPTY_MD5 = hashlib.md5(b'').hexdigest()
JSON_TYPE = {'Content-Type': 'application/json'}
HUGE = 200_000_000  # declared, never sent: over cheroot's own default limit of 100 MB
SENT_OF_HUGE = 4096
HEADER_LIMIT = 500 * 1024  # CherryPy's server.max_request_header_size
DROP = object()


def entry(**changes: Any) -> Dict[str, Any]:
    """A valid file entry with some keys changed (or dropped with DROP)."""
    item: Dict[str, Any] = {'id': 'bad-input-1', 'path': 'dir/file.dat', 'hashtype': 'md5', 'hashsum': EMPTY_MD5}
    for key, value in changes.items():
        if value is DROP:
            del item[key]
        else:
            item[key] = value
    return item


def cart(*entries: Mapping[str, Any], **extra: Any) -> bytes:
    """A POST body holding these file entries."""
    return json.dumps({'fileids': list(entries), **extra}).encode('utf-8')


def paths(*names: str) -> bytes:
    """A POST body of valid entries with these paths."""
    return cart(*(entry(id=f'bad-input-{index}', path=name) for index, name in enumerate(names)))


GOOD_BODY = cart(entry())
NOT_PLAIN = 'not a plain relative path'
UID_CHARS = 'the cart uid may not contain'
UID_DOT = 'the cart uid may not start with "."'
NOT_UTF8_URL = 'the URL is not valid UTF-8'
NO_METHOD = 'Specified method is invalid for this resource'
WRONG_TYPE = 'Expected an entity of content type application/json'
TOO_LARGE = f'the request body is larger than {LIMIT} bytes'


@dataclasses.dataclass(frozen=True)
class Row:
    """One bad request (named for failure messages) and the answer it must get.

    `target` None means `/<a fresh uid>` (a uid no other row uses, checked with HEAD after).
    `body` is what is sent (None: no body); a Content-Length of its size is added unless
    `headers` has one or a Transfer-Encoding.
    `closes`: the server must end the connection by itself after answering (the request does
    not ask it to), because part of the body was left unread.
    """

    name: str
    status: int
    fragment: str
    body: Optional[bytes] = GOOD_BODY
    headers: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(JSON_TYPE))
    target: Optional[str] = None
    method: str = 'POST'
    closes: bool = False


def body_row(name: str, body: bytes, fragment: str, status: int = 400) -> Row:
    """A POST of `body` to a fresh uid."""
    return Row(name, status, fragment, body=body)


def uid_row(name: str, quoted_uid: str, fragment: str, status: int = 400, method: str = 'POST') -> Row:
    """A request to /<quoted_uid> (sent as given) with a valid body for POST."""
    body = GOOD_BODY if method == 'POST' else None
    return Row(name, status, fragment, body=body, target=f'/{quoted_uid}', method=method)


def huge_row(name: str, status: int, fragment: str, method: str = 'POST', target: Optional[str] = None,
             content_type: str = 'application/json') -> Row:
    """Declare a 200 MB body, send 4 KB of it, and expect an answer and a closed connection at once."""
    headers = {'Content-Type': content_type, 'Content-Length': str(HUGE)}
    return Row(name, status, fragment, body=b' ' * SENT_OF_HUGE, headers=headers, method=method, target=target,
               closes=True)


def chunked(body: bytes, size: int = 4096) -> bytes:
    """`body` in the chunked transfer coding, with its last chunk."""
    pieces = [body[start:start + size] for start in range(0, len(body), size)]
    return b''.join(b'%x\r\n%s\r\n' % (len(piece), piece) for piece in pieces) + b'0\r\n\r\n'


BODY_ROWS = [
    # not JSON, or not a JSON object
    body_row('not-json', b'not json', 'Invalid JSON document'),
    body_row('empty-body', b'', 'Invalid JSON document'),
    body_row('truncated-json', b'{"fileids": [', 'Invalid JSON document'),
    body_row('body-not-utf8', b'{"fileids": [], "x": "\xff"}', 'Invalid JSON document'),
    body_row('nested-too-deep', b'[' * 20_000 + b']' * 20_000, 'Invalid JSON document'),
    body_row('json-list', b'[]', "the body: [] is not of type 'object'"),
    body_row('json-string', b'"fileids"', "the body: 'fileids' is not of type 'object'"),
    body_row('json-number', b'5', "the body: 5 is not of type 'object'"),
    body_row('json-null', b'null', "the body: None is not of type 'object'"),
    body_row('json-true', b'true', "the body: True is not of type 'object'"),
    # fileids
    body_row('fileids-missing', b'{}', "'fileids' is a required property"),
    body_row('fileids-misnamed', b'{"files": []}', "'fileids' is a required property"),
    body_row('fileids-object', b'{"fileids": {}}', "fileids: {} is not of type 'array'"),
    body_row('fileids-string', b'{"fileids": "a"}', "fileids: 'a' is not of type 'array'"),
    body_row('fileids-number', b'{"fileids": 5}', "fileids: 5 is not of type 'array'"),
    body_row('fileids-null', b'{"fileids": null}', "fileids: None is not of type 'array'"),
    body_row('fileids-of-numbers', b'{"fileids": [1]}', "fileids[0]: 1 is not of type 'object'"),
    body_row('fileids-of-strings', b'{"fileids": ["a"]}', "fileids[0]: 'a' is not of type 'object'"),
    body_row('fileids-of-nulls', b'{"fileids": [null]}', "fileids[0]: None is not of type 'object'"),
    body_row('fileids-of-lists', b'{"fileids": [[]]}', "fileids[0]: [] is not of type 'object'"),
    body_row('second-entry-not-object', b'{"fileids": [' + json.dumps(entry()).encode() + b', 7]}',
             "fileids[1]: 7 is not of type 'object'"),
    body_row('bundle-not-boolean', cart(entry(), bundle='yes'), "bundle: 'yes' is not of type 'boolean'"),
    # each key missing, each key of a wrong type
    *[body_row(f'{key}-missing', cart(entry(**{key: DROP})), f"fileids[0]: '{key}' is a required property")
      for key in ('id', 'path', 'hashtype', 'hashsum')],
    *[body_row(f'id-{label}', cart(entry(id=value)), 'fileids[0].id: ')
      for label, value in (('float', 1.5), ('bool', True), ('null', None), ('list', ['a']), ('object', {}))],
    *[body_row(f'{key}-{label}', cart(entry(**{key: value})), f'fileids[0].{key}: ')
      for key in ('path', 'hashtype', 'hashsum')
      for label, value in (('number', 5), ('null', None), ('bool', False), ('list', ['a']), ('object', {}))],
    # archive ids
    body_row('id-empty', cart(entry(id='')), 'fileids[0].id is empty or has control characters'),
    body_row('id-newline', cart(entry(id='a\nb')), 'fileids[0].id is empty or has control characters'),
    body_row('id-nul', cart(entry(id='a\x00b')), 'fileids[0].id is empty or has control characters'),
    body_row('id-too-long', cart(entry(id='i' * 256)), 'fileids[0].id is longer than 255 characters'),
    # hash types and sums
    body_row('hashtype-unknown', cart(entry(hashtype='nosuchhash')), "unsupported hash type 'nosuchhash'"),
    body_row('hashtype-empty', cart(entry(hashtype='')), "unsupported hash type ''"),
    body_row('hashtype-shake', cart(entry(hashtype='shake_128')), "unsupported hash type 'shake_128'"),
    *[body_row(f'hashsum-{label}', cart(entry(hashsum=value)), 'fileids[0].hashsum is not a md5 hex digest')
      for label, value in (('empty', ''), ('blank', ' ' * 32), ('short', EMPTY_MD5[:-1]),
                           ('long', EMPTY_MD5 + '0'), ('sha1-for-md5', hashlib.sha1(b'').hexdigest()),
                           ('not-hex', 'g' * 32), ('0x-prefix', '0x' + EMPTY_MD5[2:]),
                           ('arabic-digits', '\u0660' * 32))],
    # paths: absolute, dot segments, empty segments
    body_row('path-empty', paths(''), 'fileids[0].path: a file path is empty'),
    body_row('path-root', paths('/'), "fileids[0].path: file path '/' names no file"),
    *[body_row(f'path-{label}', paths(value), f'fileids[0].path: file path {value!r} is {NOT_PLAIN}')
      for label, value in (('double-slash-absolute', '//etc/passwd'), ('triple-slash-absolute', '///x'),
                           ('dotdot', '..'), ('dotdot-leading', '../x'), ('dotdot-leading-absolute', '/../x'),
                           ('dotdot-middle', 'a/../b'), ('dotdot-twice', 'a/../../x'),
                           ('dotdot-trailing', 'a/..'), ('dot', '.'), ('dot-leading', './a'),
                           ('dot-middle', 'a/./b'), ('dot-trailing', 'a/.'), ('slash-trailing', 'a/'),
                           ('double-slash-middle', 'a//b'))],
    # paths that are the same after normalisation, or the same path twice
    body_row('paths-a//b-and-a/b', paths('a/b', 'a//b'), f"fileids[1].path: file path 'a//b' is {NOT_PLAIN}"),
    body_row('paths-a/./b-and-a/b', paths('a/./b', 'a/b'), f"fileids[0].path: file path 'a/./b' is {NOT_PLAIN}"),
    body_row('paths-same-twice', paths('a/b', 'a/b'), "path 'a/b' is given twice"),
    body_row('paths-same-but-leading-slash', paths('/a/b', 'a/b'), "path 'a/b' is given twice"),
    body_row('paths-file-then-directory', paths('a', 'a/b'), 'is given twice (or as a file and a directory)'),
    body_row('paths-directory-then-file', paths('a/b', 'a'), 'is given twice (or as a file and a directory)'),
    body_row('paths-same-after-nfc', paths('caf\u00e9', 'cafe\u0301'), 'is given twice'),
    # characters and lengths
    body_row('path-nul', paths('a\x00b'), 'contains NUL or control characters'),
    body_row('path-newline', paths('a\nb'), 'contains NUL or control characters'),
    body_row('path-control', paths('a/\x01b'), 'contains NUL or control characters'),
    body_row('path-del', paths('a\x7fb'), 'contains NUL or control characters'),
    body_row('path-lone-surrogate', paths('a/\ud800'), 'is not valid UTF-8 text'),
    body_row('path-name-over-255-bytes', paths('\u00e9' * 128), 'has a name longer than 255 bytes'),
    body_row('path-over-255-characters', paths('p' * 256), 'is longer than 255 characters'),
    body_row('path-over-4096-bytes', paths('a/' * 2100 + 'b'), 'is longer than 255 characters'),
    body_row('second-entry-bad', paths('ok', '../x'), 'fileids[1].path'),
]

UID_ROWS = [
    uid_row('uid-slash-encoded', 'a%2Fb', UID_CHARS),
    uid_row('uid-slash-encoded-lower', 'a%2fb', UID_CHARS),
    uid_row('uid-backslash', 'a%5Cb', UID_CHARS),
    uid_row('uid-dotdot', '..', UID_DOT),
    uid_row('uid-dotdot-encoded', '%2E%2E', UID_DOT),
    uid_row('uid-dot', '.', UID_DOT),
    uid_row('uid-dot-encoded', '%2e', UID_DOT),
    uid_row('uid-hidden', '.cart', UID_DOT),
    uid_row('uid-newline', 'a%0Ab', UID_CHARS),
    uid_row('uid-carriage-return', 'a%0Db', UID_CHARS),
    uid_row('uid-control', 'a%01b', UID_CHARS),
    uid_row('uid-nul', 'a%00b', UID_CHARS),
    uid_row('uid-del', 'a%7Fb', UID_CHARS),
    uid_row('uid-not-utf8', '%FFx', NOT_UTF8_URL),
    uid_row('uid-truncated-utf8', 'x%C3', NOT_UTF8_URL),
    uid_row('uid-overlong-utf8-slash', '%C0%AFx', NOT_UTF8_URL),
    uid_row('uid-utf8-surrogate', '%ED%A0%80x', NOT_UTF8_URL),
    uid_row('uid-not-utf8-get', '%FFx', NOT_UTF8_URL, method='GET'),
    uid_row('uid-not-utf8-head', '%FFx', NOT_UTF8_URL, method='HEAD'),
    uid_row('uid-not-utf8-delete', '%FFx', NOT_UTF8_URL, method='DELETE'),
    uid_row('filename-not-utf8', 'x?filename=%FF.tar', NOT_UTF8_URL, method='GET'),
    uid_row('uid-over-255-bytes', 'u' * 256, 'the cart uid is longer than 255 bytes'),
    uid_row('uid-over-255-bytes-utf8', '%C3%A9' * 128, 'the cart uid is longer than 255 bytes'),
    uid_row('no-uid', '', 'Missing parameters: uid', status=404),
    uid_row('two-segments', 'a/b', "The path '/a/b' was not found.", status=404),
    uid_row('dotdot-segment', 'a/../b', "The path '/a/../b' was not found.", status=404),
]

REQUEST_ROWS = [
    # Content-Type
    Row('content-type-text', 415, WRONG_TYPE, headers={'Content-Type': 'text/plain'}),
    Row('content-type-missing', 415, WRONG_TYPE, headers={}),
    Row('content-type-form', 415, WRONG_TYPE, headers={'Content-Type': 'application/x-www-form-urlencoded'}),
    Row('content-type-multipart', 415, WRONG_TYPE, headers={'Content-Type': 'multipart/form-data; boundary=x'}),
    # size: the limit itself is allowed (then the body is judged), one byte more is not
    Row('body-at-limit', 400, "fileids: 5 is not of type 'array'", body=b'{"fileids": 5}'.ljust(LIMIT)),
    Row('body-over-limit', 413, TOO_LARGE, body=GOOD_BODY.ljust(LIMIT + 1)),
    Row('body-over-limit-chunked', 413, TOO_LARGE, body=chunked(GOOD_BODY.ljust(LIMIT + 4096)),
        headers={**JSON_TYPE, 'Transfer-Encoding': 'chunked'}, closes=True),
    huge_row('declared-200MB', 413, TOO_LARGE),
    huge_row('declared-200MB-wrong-type', 415, WRONG_TYPE, content_type='text/plain'),
    huge_row('declared-200MB-put', 405, NO_METHOD, method='PUT'),
    huge_row('declared-200MB-no-uid', 404, 'Missing parameters: uid', target='/'),
    Row('content-length-negative', 400, "the Content-Length header is not a number of bytes: '-1'",
        headers={**JSON_TYPE, 'Content-Length': '-1'}, closes=True),
    Row('content-length-signed', 400, f"the Content-Length header is not a number of bytes: '+{len(GOOD_BODY)}'",
        headers={**JSON_TYPE, 'Content-Length': f'+{len(GOOD_BODY)}'}),
    # errors the HTTP server answers before the API sees the request
    Row('content-length-not-a-number', 400, 'Malformed Content-Length Header.',
        headers={**JSON_TYPE, 'Content-Length': 'many'}, closes=True),
    Row('transfer-coding-unknown', 501, 'Unimplemented', headers={**JSON_TYPE, 'Transfer-Encoding': 'gzip'},
        closes=True),
    Row('request-line-malformed', 400, 'Malformed Request-Line', target='/a b', closes=True),
    Row('url-over-header-limit', 414, 'The Request-URI sent with the request exceeds the maximum allowed bytes.',
        target='/' + 'u' * HEADER_LIMIT, closes=True),
    Row('headers-of-32KiB-then-bad-body', 400, 'Invalid JSON document', body=b'not json',
        headers={**JSON_TYPE, 'X-Padding': 'p' * (32 * 1024)}),
    Row('headers-over-limit', 413, 'The headers sent with the request exceed the maximum allowed bytes.',
        headers={**JSON_TYPE, 'X-Padding': 'p' * HEADER_LIMIT}, closes=True),
    # methods the API does not have
    *[Row(f'method-{method.lower()}', 405, NO_METHOD, method=method)
      for method in ('PUT', 'PATCH', 'OPTIONS', 'TRACE', 'PROPFIND', 'FOO')],
    Row('method-put-root', 405, NO_METHOD, method='PUT', target='/'),
]


# ---- sending -----------------------------------------------------------------------------

def request_bytes(request: Row, target: str) -> bytes:
    """The request as it goes on the wire."""
    headers = {'Host': '127.0.0.1', **request.headers}
    if request.body is not None and 'Content-Length' not in headers and 'Transfer-Encoding' not in headers:
        headers['Content-Length'] = str(len(request.body))
    if not request.closes:
        headers['Connection'] = 'close'
    head = f'{request.method} {target} HTTP/1.1\r\n' + ''.join(f'{key}: {value}\r\n' for key, value in headers.items())
    return head.encode('latin-1') + b'\r\n' + (request.body or b'')


# ---- what must not change ------------------------------------------------------------------

def volume_tree(root: str) -> List[Tuple[str, int, int, int]]:
    """(path, file type, size, mtime in ns) of everything under the volume, links not followed."""
    entries = []
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            size = info.st_size if stat.S_ISREG(info.st_mode) else 0
            entries.append((os.path.relpath(path, root), stat.S_IFMT(info.st_mode), size, info.st_mtime_ns))
    return sorted(entries)


def row_counts(peewee_url: str) -> Dict[str, int]:
    """Rows in the cart and file tables, read on a connection of their own."""
    database = connect(peewee4_url(peewee_url))
    try:
        return {name: Table(name).bind(database).select(fn.COUNT(SQL('*'))).scalar() for name in ('cart', 'file')}
    finally:
        database.close()


ROWS = [*BODY_ROWS, *UID_ROWS, *REQUEST_ROWS]


# Rows uWSGI answers (or drops) itself before any Python runs, so no adapter can make it answer as
# cheroot does: request headers or a URL over its buffer-size (64 KiB at most) are dropped without
# an answer; a malformed request line is answered by uWSGI with that line's words as protocol.
UWSGI_ANSWERS_ITSELF = {'url-over-header-limit', 'headers-over-limit', 'request-line-malformed'}


def check_left_to_uwsgi(stack: CartStack, request_row: Row, target: str) -> None:
    """What uWSGI does with a row it handles itself: no cart, nothing changed, the connection closed."""
    tree, counts = volume_tree(str(stack.volume)), row_counts(stack.peewee_url)
    received, closed = exchange(stack.port, request_bytes(request_row, target))
    context = f'{request_row.method} {target[:100]}: {received[:300]!r}'
    assert closed, context
    assert not received.startswith(b'HTTP/1.1 2'), context
    assert volume_tree(str(stack.volume)) == tree, f'{context}: the volume changed'
    assert row_counts(stack.peewee_url) == counts, f'{context}: the database changed'


def check(stack: CartStack, request_row: Row) -> None:
    """Send one row's request and assert everything about its answer and its (absent) effects."""
    uid = f'bad-{uuid.uuid4().hex[:12]}'
    target = f'/{uid}' if request_row.target is None else request_row.target
    if stack.server_kind == 'uwsgi' and request_row.name in UWSGI_ANSWERS_ITSELF:
        check_left_to_uwsgi(stack, request_row, target)
        return
    tree, counts = volume_tree(str(stack.volume)), row_counts(stack.peewee_url)

    answer = parse_answer(*exchange(stack.port, request_bytes(request_row, target)), request_row.method == 'HEAD')

    context = f'{request_row.method} {target[:100]}: {answer.status} {answer.headers} {answer.body[:300]!r}'
    assert answer.status == request_row.status, context
    assert answer.headers.get('content-type') == 'application/json', context
    if request_row.method == 'HEAD':
        assert answer.headers['x-pacifica-status'] == 'error', context
        assert request_row.fragment in answer.headers['x-pacifica-message'], context
    else:
        page = json.loads(answer.body)
        assert set(page) == ERROR_KEYS, context
        assert page['status'] == f'{answer.status} {answer.reason}' and page['traceback'] == '', context
        assert request_row.fragment in page['message'], context
    if request_row.status == 405:
        assert answer.headers['allow'] == 'DELETE, GET, HEAD, POST', context
    if request_row.closes:
        assert answer.closed and answer.headers.get('connection') == 'close', context

    assert volume_tree(str(stack.volume)) == tree, f'{context}: the volume changed'
    assert row_counts(stack.peewee_url) == counts, f'{context}: the database changed'
    if request_row.target is None:
        assert stack.head(uid).status_code == 404, f'{context}: the cart exists'


def test_rows_have_distinct_names() -> None:
    names = [request_row.name for request_row in ROWS]
    assert len(names) == len(set(names)) > 100


def test_bad_requests_are_refused_and_change_nothing(stack: CartStack) -> None:
    """Every row against one stack per database (rows in one test, so pytest-xdist cannot split them)."""
    failures = []
    for request_row in ROWS:
        try:
            check(stack, request_row)
        except (AssertionError, ValueError) as exc:  # ValueError: an answer that is not JSON
            failures.append(f'{request_row.name}: {type(exc).__name__}: {exc}')
    assert not failures, f'{len(failures)} of {len(ROWS)} rows failed:\n' + '\n'.join(failures)
