"""The body of `POST /<uid>`: its JSON schema, and parsing it into a checked, typed cart request."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import jsonschema

from .errors import BadRequest
from .paths import MISSING_FILES_NAME, cart_relative_path, path_conflicts

HASH_TYPES = frozenset(name.lower() for name in hashlib.algorithms_available if not name.lower().startswith('shake'))
MAX_ARCHIVE_ID_CHARS = 255  # the published schema stores archive ids in VARCHAR(255)
MAX_LIFETIME = 100 * 365 * 24 * 3600  # seconds: a century, far beyond any cart's use
ON_FILE_ERROR = ('fail', 'skip')  # a file that cannot be staged fails its cart, or is left out and listed

CART_REQUEST_SCHEMA: Dict[str, Any] = {
    'type': 'object',
    'required': ['fileids'],
    'properties': {
        'fileids': {
            'type': 'array',
            'items': {
                'type': 'object',
                'required': ['id', 'path', 'hashtype', 'hashsum'],
                'properties': {
                    'id': {'type': ['integer', 'string']},
                    'path': {'type': 'string'},
                    'hashtype': {'type': 'string'},
                    'hashsum': {'type': 'string'},
                },
            },
        },
        'bundle': {'type': 'boolean'},
        'lifetime': {'type': 'integer', 'minimum': 0, 'maximum': MAX_LIFETIME},
        'on_file_error': {'type': 'string', 'enum': list(ON_FILE_ERROR)},
        'callback_url': {'type': 'string', 'minLength': 1},
    },
}
_VALIDATOR = jsonschema.Draft7Validator(CART_REQUEST_SCHEMA)
_BAD_ID_CHARS = re.compile('[\x00-\x1f\ud800-\udfff]')
_HEX = re.compile('[0-9a-f]*')
_ENTRY_KEYS = ('path', 'hashtype', 'hashsum')


class FileRequest(NamedTuple):
    """One checked entry of a cart request (a tuple, so a 100,000-file cart is cheap to hold and insert)."""

    archive_id: str
    path: str
    hash_type: str
    hash_value: str


@dataclasses.dataclass(frozen=True)
class CartRequest:
    """A checked cart request."""

    files: Tuple[FileRequest, ...]
    bundle: Optional[bool]
    lifetime: Optional[int] = None  # seconds a ready cart is kept; None: the configured default
    skip_failed_files: bool = False  # "on_file_error": "skip"
    callback_url: Optional[str] = None  # also send the cart's completion events here (if the config allows it)


def _where(error: jsonschema.ValidationError) -> str:
    path = ''.join(f'[{part}]' if isinstance(part, int) else f'.{part}' for part in error.absolute_path)
    return path.lstrip('.') or 'the body'


def _plainly_follows_schema(body: Any) -> bool:
    """Whether the body obviously follows CART_REQUEST_SCHEMA: the common case, checked in one quick pass.

    False does not mean the body is wrong (a float id of 1.0, a subclass of dict...): the
    schema's own validator then decides, and words the error.
    """
    if type(body) is not dict or type(body.get('fileids')) is not list:
        return False
    if 'bundle' in body and type(body['bundle']) is not bool:
        return False
    if 'lifetime' in body and not (type(body['lifetime']) is int and 0 <= body['lifetime'] <= MAX_LIFETIME):
        return False
    if 'on_file_error' in body and body['on_file_error'] not in ON_FILE_ERROR:
        return False
    if 'callback_url' in body and not (type(body['callback_url']) is str and body['callback_url']):
        return False
    for entry in body['fileids']:
        if type(entry) is not dict or type(entry.get('id')) not in (int, str):
            return False
        for key in _ENTRY_KEYS:
            if type(entry.get(key)) is not str:
                return False
    return True


@functools.lru_cache(maxsize=None)
def _hex_digits(hash_type: str) -> int:
    return hashlib.new(hash_type).digest_size * 2


def parse_cart_request(body: Any) -> CartRequest:
    """Check a POST body against the schema and the cart's rules; raise BadRequest saying what is wrong."""
    if not _plainly_follows_schema(body):
        error = next(iter(sorted(_VALIDATOR.iter_errors(body), key=lambda err: list(err.absolute_path))), None)
        if error is not None:
            raise BadRequest(f'invalid cart request: {_where(error)}: {error.message}')
    skipping = body.get('on_file_error') == 'skip'
    files: List[FileRequest] = []
    for index, entry in enumerate(body['fileids']):
        archive_id = str(entry['id'])
        if not archive_id or _BAD_ID_CHARS.search(archive_id):
            raise BadRequest(f'invalid cart request: fileids[{index}].id is empty or has control characters')
        if len(archive_id) > MAX_ARCHIVE_ID_CHARS:
            raise BadRequest(f'invalid cart request: fileids[{index}].id is longer than {MAX_ARCHIVE_ID_CHARS} '
                             'characters')
        hash_type = entry['hashtype'].lower()
        if hash_type not in HASH_TYPES:
            raise BadRequest(f'invalid cart request: fileids[{index}].hashtype: '
                             f'unsupported hash type {entry["hashtype"]!r}')
        hash_value = entry['hashsum'].strip().lower()
        if len(hash_value) != _hex_digits(hash_type) or not _HEX.fullmatch(hash_value):
            raise BadRequest(f'invalid cart request: fileids[{index}].hashsum is not a {hash_type} hex digest')
        try:
            path = cart_relative_path(entry['path'])
        except BadRequest as exc:
            raise BadRequest(f'invalid cart request: fileids[{index}].path: {exc.message}') from exc
        if skipping and (path == MISSING_FILES_NAME or path.startswith(MISSING_FILES_NAME + '/')):
            raise BadRequest(f'invalid cart request: fileids[{index}].path: {path!r} is where a cart with '
                             f'"on_file_error": "skip" lists the files it could not stage')
        files.append(FileRequest(archive_id, path, hash_type, hash_value))
    conflict = path_conflicts(file.path for file in files)
    if conflict is not None:
        raise BadRequest(f'invalid cart request: path {conflict!r} is given twice (or as a file and a directory)')
    lifetime = body.get('lifetime')
    return CartRequest(files=tuple(files), bundle=body.get('bundle'),
                       lifetime=None if lifetime is None else int(lifetime), skip_failed_files=skipping,
                       callback_url=body.get('callback_url'))
