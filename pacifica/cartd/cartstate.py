"""What HEAD says of a cart: its wire status, its message (the progress in words while staging), counters and expiry."""
from __future__ import annotations

import dataclasses
import datetime
from typing import Optional

from .expiry import expired_message, has_expired
from .orm import Cart, CartStatus, Progress, StoredState, now, progress_of


def progress_in_words(progress: Progress) -> str:
    """A staging cart's progress as a sentence, e.g. '12 of 40 files staged; 25 waiting on tape'."""
    words = f'{progress.files_staged} of {progress.files_total} files staged'
    if progress.files_on_tape:
        words += f'; {progress.files_on_tape} waiting on tape'
    if progress.files_failed:
        words += f'; {progress.files_failed} failed'
    return words


@dataclasses.dataclass(frozen=True)
class CartState:
    """What HEAD reports: the wire status and message, the progress counters and, for a cart with a
    lifetime, when it expires (`expired`: it has; HEAD then answers 410)."""

    status: str
    message: str
    progress: Progress = Progress()
    expires: Optional[datetime.datetime] = None
    expired: bool = False

    @classmethod
    def of(cls, cart: Cart, moment: Optional[datetime.datetime] = None, absence: Optional[str] = None) -> 'CartState':
        """The state a cart row shows on the wire (a ready cart has no message)."""
        return cls.from_row(StoredState(cart.status, cart.error, progress_of(cart), cart.expires_date), moment,
                            absence)

    @classmethod
    def from_row(cls, stored: StoredState, moment: Optional[datetime.datetime] = None,
                 absence: Optional[str] = None) -> 'CartState':
        """The state a stored row shows on the wire at `moment` (default now): an expired cart is an
        error saying when it expired; a ready cart has no message; a staging cart with no note of its
        own says how far it is and, given the `absence` of workers (WorkerPresence), that it waits for one."""
        if has_expired(stored.status, stored.expires, moment or now()):
            return cls(CartStatus.ERROR.value, expired_message(stored.expires), stored.progress, stored.expires,
                       expired=True)
        status = CartStatus(stored.status)
        message = stored.error
        if status == CartStatus.READY and not stored.progress.files_failed:
            message = ''  # as 0.7.0; a cart that left out files it could not stage says which
        elif status.wire == CartStatus.STAGING.value and not message:
            message = progress_in_words(stored.progress)
            if absence:
                message += f'; waiting for a worker: {absence}'
        return cls(status.wire, message, stored.progress, stored.expires)
