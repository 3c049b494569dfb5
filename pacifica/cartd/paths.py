"""Checks on the names clients give: cart uids, file paths inside a cart, and download file names."""
from __future__ import annotations

import re
import unicodedata
from typing import Iterable, Optional

from .errors import BadRequest

MAX_UID_BYTES = 255
MAX_PATH_CHARS = 255  # the published schema stores paths in VARCHAR(255)
MAX_SEGMENT_BYTES = 255  # NAME_MAX on the filesystems the volume lives on
_CONTROL = re.compile('[\x00-\x1f\x7f]')
_NOT_PLAIN_SEGMENTS = frozenset(('', '.', '..'))

MISSING_FILES_NAME = 'MISSING_FILES.txt'  # at the top of the tar of a cart that skipped files: those left out


def has_control(text: str) -> bool:
    """Whether the text holds NUL, another C0 control character or DEL."""
    return _CONTROL.search(text) is not None


def _utf8_length(text: str, what: str) -> int:
    try:
        return len(text.encode('utf-8'))
    except UnicodeEncodeError as exc:
        raise BadRequest(f'{what} is not valid UTF-8 text') from exc


def check_cart_uid(cart_uid: str) -> str:
    """Return the uid unchanged if it is safe as one path segment, else raise BadRequest.

    A uid names a directory in the volume and a link in cartuids/, so it may not be
    empty, hold '/', NUL or control characters, start with '.', or be longer than 255 bytes.
    """
    if not cart_uid:
        raise BadRequest('the cart uid is empty')
    if _utf8_length(cart_uid, 'the cart uid') > MAX_UID_BYTES:
        raise BadRequest(f'the cart uid is longer than {MAX_UID_BYTES} bytes')
    if '/' in cart_uid or '\\' in cart_uid or has_control(cart_uid):
        raise BadRequest('the cart uid may not contain "/", "\\", NUL or control characters')
    if cart_uid.startswith('.'):
        raise BadRequest('the cart uid may not start with "."')
    return cart_uid


def cart_relative_path(path: str) -> str:
    """Return a client's file path as a canonical path relative to the cart, or raise BadRequest.

    One leading '/' is dropped, as the published service does (pacifica-downloader sends
    '/name' for files without a sub-directory). Anything else that is not already canonical
    ('a//b', 'a/./b', '..', a trailing '/', NUL or control characters) is refused rather
    than rewritten, so the path a client asks for is exactly the path in the tar.
    """
    if not isinstance(path, str) or not path:
        raise BadRequest('a file path is empty')
    relative = path[1:] if path.startswith('/') else path
    if not relative:
        raise BadRequest(f'file path {path!r} names no file')
    if len(relative) > MAX_PATH_CHARS:
        raise BadRequest(f'file path {relative[:40]!r}... is longer than {MAX_PATH_CHARS} characters')
    if has_control(relative):
        raise BadRequest(f'file path {relative!r} contains NUL or control characters')
    segments = relative.split('/')
    if relative.isascii() and _NOT_PLAIN_SEGMENTS.isdisjoint(segments) \
            and max(map(len, segments)) <= MAX_SEGMENT_BYTES:
        return relative  # the common case, in one pass; anything else is told apart in order below
    for segment in segments:
        if segment in ('', '.', '..'):
            raise BadRequest(f'file path {path!r} is not a plain relative path '
                             '(empty, "." or ".." segment, or absolute)')
        if _utf8_length(segment, f'file path {relative!r}') > MAX_SEGMENT_BYTES:
            raise BadRequest(f'file path {relative!r} has a name longer than {MAX_SEGMENT_BYTES} bytes')
    return relative


def path_conflicts(paths: Iterable[str]) -> Optional[str]:
    """Return a path that repeats another or is also used as a directory, or None.

    Compared after Unicode NFC normalisation so two spellings of one name cannot both land.
    """
    files = set()
    directories = set()
    for path in paths:
        key = path if path.isascii() else unicodedata.normalize('NFC', path)
        if key in files or key in directories:
            return path
        files.add(key)
        parts = key.split('/')
        for depth in range(1, len(parts)):
            directories.add('/'.join(parts[:depth]))
    clash = files & directories
    return next(iter(clash)) if clash else None


def tar_top_name(filename: str) -> str:
    """The tar's top directory: the requested file name without '.tar', as 0.7.0 names it.

    The name becomes the first component of every member, so it must be one safe segment.
    """
    top = filename.replace('.tar', '')
    if not top or top in ('.', '..') or '/' in top or '\\' in top or has_control(top):
        raise BadRequest(f'filename {filename!r} is not a plain file name')
    return top
