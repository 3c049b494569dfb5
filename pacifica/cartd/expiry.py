"""Cart lifetimes: how long a ready cart is kept, whether it has expired, and how that is said."""
from __future__ import annotations

import datetime
import email.utils
from typing import Optional

from .config import Settings
from .orm import CartStatus


def effective_lifetime(requested: Optional[int], settings: Settings) -> int:
    """Seconds a cart is kept once ready (0: for ever): the POST's `lifetime`, else `cart_lifetime`,
    never beyond `max_cart_lifetime` when that is set (then 'for ever' is the cap too)."""
    lifetime = settings.cart_lifetime if requested is None else requested
    cap = settings.max_cart_lifetime
    if cap > 0 and (lifetime == 0 or lifetime > cap):
        return cap
    return lifetime


def has_expired(status: str, expires: Optional[datetime.datetime], moment: datetime.datetime) -> bool:
    """Whether a cart in `status` with this expiry time is expired at `moment` (its files may still be there)."""
    if status == CartStatus.EXPIRED.value:
        return True
    return status == CartStatus.READY.value and expires is not None and expires <= moment


def out_of_sight(status: str, expires: Optional[datetime.datetime], moment: datetime.datetime,
                 tombstone_time: float) -> bool:
    """Whether a cart expired longer than tombstone_time ago at `moment`: then it is answered as gone (404)."""
    return has_expired(status, expires, moment) and expires is not None \
        and expires + datetime.timedelta(seconds=tombstone_time) < moment


def rfc3339(moment: Optional[datetime.datetime]) -> Optional[str]:
    """A stored time (naive, the server's local time) as RFC 3339 with its offset, or None."""
    if moment is None:
        return None
    return moment.astimezone().isoformat(timespec='seconds')


def http_date(moment: datetime.datetime) -> str:
    """A stored time as an HTTP date (`Tue, 01 Dec 2026 18:00:00 GMT`), for X-Pacifica-Expires."""
    return email.utils.format_datetime(moment.astimezone(datetime.timezone.utc).replace(microsecond=0), usegmt=True)


def expired_message(expires: Optional[datetime.datetime]) -> str:
    """What HEAD, GET and the status document say of an expired cart."""
    return f'the cart expired at {rfc3339(expires)}; POST it again to stage its files anew'
