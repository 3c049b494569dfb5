"""The status document of a cart (`GET /<uid>/status`): its state, phase, times, progress and a page of its files."""
from __future__ import annotations

import dataclasses
import datetime
from typing import Any, Dict, List, Mapping, Optional

from .errors import BadRequest, CartNotFound
from .cartstate import CartState
from .expiry import out_of_sight, rfc3339
from .orm import (Cart, CartStatus, FileStatus, Progress, files_page, newest_deleted_cart, newest_live_cart, now,
                  progress_of)

FILE_SELECTIONS = ('errors', 'all', 'none')
DEFAULT_LIMIT = 1000
MAX_LIMIT = 10000

# A file's state in the document, by its stored status.
FILE_STATES = {
    FileStatus.WAITING.value: 'queued',
    FileStatus.STAGING.value: 'queued',  # 0.7.0's rows
    FileStatus.RECALLING.value: 'recalling',
    FileStatus.TRANSFERRING.value: 'transferring',
    FileStatus.STAGED.value: 'staged',
    FileStatus.ERROR.value: 'error',
}


@dataclasses.dataclass(frozen=True)
class FilesWanted:
    """Which of a cart's files the document lists: `errors` (default), `all` or `none`, a page of them."""

    selection: str = 'errors'
    limit: int = DEFAULT_LIMIT
    offset: int = 0

    @classmethod
    def from_query(cls, params: Mapping[str, Any]) -> 'FilesWanted':
        """Read ?files=, ?limit= and ?offset=; BadRequest (400) for a value that is not one of them."""
        selection = _one(params, 'files', 'errors')
        if selection not in FILE_SELECTIONS:
            raise BadRequest(f'files must be one of {", ".join(FILE_SELECTIONS)}, not {selection!r}')
        limit = _whole_number(params, 'limit', DEFAULT_LIMIT)
        if not 1 <= limit <= MAX_LIMIT:
            raise BadRequest(f'limit must be from 1 to {MAX_LIMIT}, not {limit}')
        return cls(selection, limit, _whole_number(params, 'offset', 0))


def _one(params: Mapping[str, Any], name: str, default: str) -> str:
    value = params.get(name, default)
    if not isinstance(value, str):
        raise BadRequest(f'give the {name} parameter once')
    return value


def _whole_number(params: Mapping[str, Any], name: str, default: int) -> int:
    text = _one(params, name, str(default))
    if not (text.isascii() and text.isdigit()) or len(text) > 12:
        raise BadRequest(f'{name} must be a whole number, not {text!r}')
    return int(text)


def phase_of(status: str, progress: Progress) -> str:
    """The finer state of a live cart that has not expired: waiting, recalling, transferring, bundling, ready or error.

    While staging: transferring when a download runs (or some file has arrived and none is on
    tape), recalling when files wait on tape and nothing downloads, waiting before anything
    has happened.
    """
    if status not in (CartStatus.WAITING.value, CartStatus.STAGING.value):
        return status
    if progress.files_transferring > 0:
        return 'transferring'
    if progress.files_on_tape > 0:
        return 'recalling'
    if progress.files_staged > 0 or progress.files_failed > 0:
        return 'transferring'
    return 'waiting'


def percent_shown(cart: Cart) -> float:
    """100 for a cart that became ready (also once expired or deleted); otherwise the highest percent
    recorded (it never goes down)."""
    if cart.ready_date is not None and cart.status != CartStatus.ERROR.value:
        return 100.0
    return float(cart.percent_staged or 0)


def progress_document(cart: Cart, progress: Progress) -> Dict[str, Any]:
    """The `progress` object: the HEAD counters (bytes_total null until every size is known) and percent."""
    return {'files_total': progress.files_total, 'files_staged': progress.files_staged,
            'files_on_tape': progress.files_on_tape, 'files_failed': progress.files_failed,
            'files_transferring': progress.files_transferring,
            'bytes_total': progress.bytes_total if progress.bytes_known else None,
            'bytes_staged': progress.bytes_staged, 'percent': percent_shown(cart)}


def files_document(cart: Cart, progress: Progress, wanted: FilesWanted) -> Dict[str, Any]:
    """`files` (one page of the selected files, by id) and `files_page` (what was selected, how many in all)."""
    page: Dict[str, Any] = {'files': wanted.selection, 'offset': wanted.offset, 'limit': wanted.limit}
    if wanted.selection == 'none':
        return {'files': [], 'files_page': {**page, 'count': 0, 'next_offset': None}}
    errors_only = wanted.selection == 'errors'
    # The counters say how many are selected (a failed file's row stays in error; fixit, which
    # puts failed files back, sets files_failed anew from the rows): no count over the rows.
    count = progress.files_failed if errors_only else progress.files_total
    rows = files_page(cart.id, errors_only, wanted.limit, wanted.offset) if wanted.offset < count else []
    files: List[Dict[str, Any]] = [
        {'path': path, 'id': archive_id, 'size': size, 'state': FILE_STATES.get(status, 'queued'),
         'attempts': int(attempts or 0), 'error': error or None}
        for archive_id, path, size, status, attempts, error in rows]
    following = wanted.offset + len(files)
    return {'files': files, 'files_page': {**page, 'count': count,
                                           'next_offset': following if following < count else None}}


def cart_report(cart_uid: str, wanted: FilesWanted, tombstone_time: float,
                absence: Optional[str] = None) -> Dict[str, Any]:
    """The status document of the cart HEAD answers for (the newest live one with this uid), else of
    the one deleted last if that was less than tombstone_time ago; CartNotFound (404) otherwise.
    A staging cart's message says it waits for a worker, given the workers' `absence` (WorkerPresence).

    An expired cart is reported (phase `expired`) for tombstone_time after it expired, as HEAD answers 410.
    """
    moment = now()
    cart = newest_live_cart(cart_uid)
    if cart is not None and not out_of_sight(cart.status, cart.expires_date, moment, tombstone_time):
        return live_document(cart, wanted, moment, absence)
    deleted = newest_deleted_cart(cart_uid)
    if deleted is None or deleted.deleted_date is None or \
            deleted.deleted_date + datetime.timedelta(seconds=tombstone_time) < moment:
        raise CartNotFound(f'No cart with uid {cart_uid} found')
    why = f' ({deleted.error})' if deleted.error else ''
    return _document(deleted, CartStatus.ERROR.value, CartStatus.DELETED.value,
                     f'the cart was deleted at {rfc3339(deleted.deleted_date)}{why}', wanted)


def live_document(cart: Cart, wanted: FilesWanted, moment: Optional[datetime.datetime] = None,
                  absence: Optional[str] = None) -> Dict[str, Any]:
    """The status document of a cart that is not deleted, as it stands at `moment` (default now)."""
    state = CartState.of(cart, moment or now(), absence)
    phase = 'expired' if state.expired else phase_of(cart.status, state.progress)
    return _document(cart, state.status, phase, state.message, wanted)


def _document(cart: Cart, status: str, phase: str, message: str, wanted: FilesWanted) -> Dict[str, Any]:
    progress = progress_of(cart)
    return {
        'uid': cart.cart_uid,
        'status': status,
        'phase': phase,
        'message': message,
        'created': rfc3339(cart.creation_date),
        'updated': rfc3339(cart.updated_date),
        'ready_at': rfc3339(cart.ready_date),
        'expires_at': rfc3339(cart.expires_date),
        'progress': progress_document(cart, progress),
        **files_document(cart, progress, wanted),
    }
