"""Handing a cart's work to the task queue: the queue's protocol, files sent in batches, the tasks' ids recorded."""
from __future__ import annotations

import logging
from typing import List, Optional, Protocol, Sequence

from . import database
from .errors import QueueUnavailable
from .orm import mark_waiting_for_queue, record_tasks, touch_cart

LOGGER = logging.getLogger(__name__)

# A cart is sent as this many tasks at most (larger ones than stage_batch_size for a big
# cart): 100,000 files in batches of 32 would be 3,125 messages, about 0.7 s of the POST.
MAX_TASKS_PER_CART = 256


class TaskQueue(Protocol):
    """What the service needs of a task queue (Celery in production)."""

    def enqueue_stage(self, cart_id: int, file_ids: Sequence[int], countdown: float = 0,
                      tape_round: int = 0) -> str:
        """Queue staging of these files; return the task id."""

    def enqueue_bundle(self, cart_id: int) -> str:
        """Queue the bundling of a cart whose files are all staged."""

    def revoke(self, task_ids: Sequence[str]) -> None:
        """Best effort: tell workers to drop these queued tasks."""


class CartQueue:
    """Sends a cart's work to the task queue and records every task id, so a DELETE can revoke them."""

    def __init__(self, queue: Optional[TaskQueue], batch_size: int) -> None:
        """Send through `queue` (None: a process that queues nothing, like the admin commands)."""
        self.queue = queue
        self.batch_size = batch_size

    @property
    def available(self) -> bool:
        """Whether this process can queue work at all."""
        return self.queue is not None

    def stage(self, cart_id: int, file_ids: Sequence[int]) -> None:
        """Queue the files in batches; if the broker refuses, leave the cart for the reconciler.

        The cart's rows are committed before this runs, so nothing is lost: a cart that
        could not be queued is marked stale at once and re-queued by the next reconcile.
        """
        if self.queue is None:
            raise QueueUnavailable('no task queue is configured')
        task_ids: List[str] = []
        size = max(self.batch_size, -(-len(file_ids) // MAX_TASKS_PER_CART))
        try:
            for start in range(0, len(file_ids), size):
                task_ids.append(self.queue.enqueue_stage(cart_id, list(file_ids[start:start + size])))
        except Exception as exc:  # any broker failure: the reconciler takes over
            message = f'Waiting for the task queue ({type(exc).__name__}: {exc}); will retry'
            LOGGER.error('cart id %d: %s', cart_id, message)
            mark_waiting_for_queue(cart_id, message)
        self._record(cart_id, task_ids)

    def stage_later(self, cart_id: int, file_ids: Sequence[int], countdown: float, tape_round: int) -> None:
        """Queue another look at files (still on tape) after `countdown` seconds; the cart is alive meanwhile."""
        if not file_ids or self.queue is None:
            return
        task_id = self.queue.enqueue_stage(cart_id, list(file_ids), countdown=countdown, tape_round=tape_round)
        touch_cart(cart_id)
        self._record(cart_id, [task_id])

    def bundle(self, cart_id: int) -> None:
        """Queue the bundling of a cart whose files are all staged."""
        if self.queue is not None:
            self._record(cart_id, [self.queue.enqueue_bundle(cart_id)])

    def revoke(self, cart_uid: str, task_ids: Sequence[str]) -> None:
        """Best effort: the tasks check their cart's status anyway."""
        if self.queue is None or not task_ids:
            return
        try:
            self.queue.revoke(task_ids)
        except Exception as exc:  # a broker failure must not fail the DELETE
            LOGGER.warning('could not revoke tasks of cart %s: %s', cart_uid, exc)

    @staticmethod
    def _record(cart_id: int, task_ids: Sequence[str]) -> None:
        if task_ids:
            with database.atomic():
                record_tasks(cart_id, task_ids)
