"""A throttled "this cart is in use" mark, called as bytes move, so long transfers keep their cart alive."""
from __future__ import annotations

import time

from . import database
from .orm import touch_cart


class Heartbeat:
    """Called as bytes move; at most every `interval` seconds it marks the cart as touched now.

    Staging marks a long download alive, so the reconciler does not take it for stalled;
    a download to a client marks the cart used, so it is not evicted from under it.
    """

    def __init__(self, cart_id: int, interval: float) -> None:
        """Start the clock now: the first mark is due `interval` seconds from here."""
        self.cart_id = cart_id
        self.interval = interval
        self.last = time.monotonic()

    def __call__(self) -> None:
        """Mark the cart touched if the last mark is `interval` seconds old."""
        moment = time.monotonic()
        if moment - self.last >= self.interval:
            self.last = moment
            with database.connection():
                touch_cart(self.cart_id)
