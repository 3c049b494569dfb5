"""Getting stuck work moving again: files on tape looked at later, carts that stalled re-queued."""
from __future__ import annotations

import datetime
import logging
from typing import Sequence

from .config import Settings
from .logcontext import about
from .orm import Cart, CartStatus, claim_stalled, now, stalled_carts, unfinished_file_ids
from .taskqueue import CartQueue

LOGGER = logging.getLogger(__name__)

RECONCILE_BATCH = 100  # carts re-driven per reconcile pass


class Recovery:
    """Re-checks tape recalls with a growing delay and re-drives carts with no progress for stall_timeout."""

    def __init__(self, settings: Settings, queue: CartQueue) -> None:
        """Re-queue work on `queue`, with the waits and timeouts of `settings`."""
        self.settings = settings
        self.queue = queue

    def tape_wait(self, tape_round: int) -> float:
        """Seconds before re-checking files on tape: doubling from tape_wait up to tape_wait_max."""
        return min(self.settings.archive_tape_wait * (2 ** tape_round), self.settings.archive_tape_wait_max)

    def requeue_tape_files(self, cart_id: int, file_ids: Sequence[int], tape_round: int) -> None:
        """Queue another look at files still on tape, after a growing delay; the cart is alive meanwhile."""
        self.queue.stage_later(cart_id, file_ids, self.tape_wait(tape_round), tape_round + 1)

    def reconcile(self) -> int:
        """Re-queue the unfinished work of carts that made no progress for stall_timeout seconds.

        Each stalled cart is claimed by compare-and-set on its updated_date, so when several
        workers reconcile at once a cart is re-driven by one of them. Returns carts re-driven.
        """
        if not self.queue.available:
            return 0
        threshold = now() - datetime.timedelta(seconds=self.settings.stall_timeout)
        redriven = 0
        for cart in stalled_carts(threshold, RECONCILE_BATCH):
            with about(cart_uid=cart.cart_uid, cart_id=cart.id):
                redriven += self._redrive(cart)
        return redriven

    def _redrive(self, cart: Cart) -> int:
        """Queue a stalled cart's unfinished work again unless another worker claimed it first; 1 if it did."""
        unfinished = unfinished_file_ids(cart.id)
        note = (f'Re-queued {len(unfinished)} unfinished files at {now():%Y-%m-%d %H:%M:%S} '
                f'after no progress for {self.settings.stall_timeout:g} s')
        if not claim_stalled(cart, note):
            return 0
        LOGGER.warning('cart %s (id %d): %s', cart.cart_uid, cart.id, note)
        if cart.status == CartStatus.BUNDLING.value or not unfinished:
            self.queue.bundle(cart.id)
        else:
            self.queue.stage(cart.id, unfinished)
        return 1
