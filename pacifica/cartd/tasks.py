"""The celery worker: thin tasks that call the use cases, and the reconciler thread each worker runs.

Run a worker with `celery -A pacifica.cartd.tasks worker`. The app itself, its
configuration and the queue the server sends to are in celeryapp.py; the service each
worker process runs on is made in wiring.py.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, List, Optional

from celery import signals

from . import database
from .celeryapp import BUNDLE_TASK, STAGE_TASK, app
from .config import Settings
from .service import CartService
from .wiring import forget_worker_service, process_settings, worker_service

LOGGER = logging.getLogger(__name__)

__all__ = ['app', 'stage_files', 'bundle_cart']


@signals.worker_process_init.connect
def _reset_after_fork(**_kwargs: Any) -> None:
    """A forked pool process must not share the parent's connections or threads."""
    forget_worker_service()


class WorkerLoop:
    """A thread in each worker's main process that calls `run_pass` every `interval` seconds (the first an
    interval after the start), in a connection of its own; a failed pass is logged and the next one comes."""

    name = 'cartd-loop'
    what = 'pass'

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.thread: Optional[threading.Thread] = None

    def interval(self, settings: Settings) -> float:
        """Seconds between passes; 0: this loop does not run."""
        raise NotImplementedError

    def run_pass(self, service: CartService) -> None:
        """One pass of the loop's work."""
        raise NotImplementedError

    def start(self) -> None:
        """Start the loop unless its interval is 0 or it runs already."""
        settings = process_settings()
        interval = self.interval(settings)
        if not interval or self.thread is not None:
            return
        self.thread = threading.Thread(target=self._loop, args=(interval,), name=self.name, daemon=True)
        self.thread.start()
        LOGGER.info('%s runs every %g s', self.what, interval)

    def _loop(self, interval: float) -> None:
        while not self.stop.wait(interval):
            try:
                service = worker_service()
                with database.connection():
                    self.run_pass(service)
            except Exception:  # a database or broker outage must not end the loop
                LOGGER.exception('%s failed; trying again in %g s', self.what, interval)


class Reconciler(WorkerLoop):
    """Every reconcile_interval, re-drives stalled carts and removes the files of carts past their lifetime."""

    name = 'cartd-reconciler'
    what = 'reconcile pass'

    def interval(self, settings: Settings) -> float:
        """reconcile_interval."""
        return settings.reconcile_interval

    def run_pass(self, service: CartService) -> None:
        """Re-drive stalled carts, then remove expired ones."""
        service.reconcile()
        service.remove_expired()


RECONCILER = Reconciler()


class Notifier(WorkerLoop):
    """Every [notifications] interval, sends the completion events that are due (only when [notifications]
    names a url or callback prefixes: otherwise there can be none)."""

    name = 'cartd-notifier'
    what = 'event delivery pass'

    def interval(self, settings: Settings) -> float:
        """[notifications] interval, or 0 when no event can be sent."""
        return settings.notifications_interval if settings.notifications_on else 0.0

    def run_pass(self, service: CartService) -> None:
        """Send the due events (a receiver that fails leaves its event in the outbox for later)."""
        service.deliver_events()


NOTIFIER = Notifier()


@signals.worker_ready.connect
def _start_reconciler(**_kwargs: Any) -> None:
    RECONCILER.start()


@signals.worker_shutdown.connect
def _stop_reconciler(**_kwargs: Any) -> None:
    RECONCILER.stop.set()


@signals.worker_ready.connect
def _start_notifier(**_kwargs: Any) -> None:
    NOTIFIER.start()


@signals.worker_shutdown.connect
def _stop_notifier(**_kwargs: Any) -> None:
    NOTIFIER.stop.set()


@app.task(name=STAGE_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def stage_files(cart_id: int, file_ids: List[int], tape_round: int = 0) -> None:
    """Stage a batch of a cart's files; look again later at those still on tape."""
    service = worker_service()
    with database.connection():
        on_tape = service.stage_files(cart_id, file_ids, tape_round)
        service.requeue_tape_files(cart_id, on_tape, tape_round)


@app.task(name=BUNDLE_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def bundle_cart(cart_id: int) -> None:
    """Finish a cart whose files are all staged (used when bundling is re-driven)."""
    service = worker_service()
    with database.connection():
        service.bundle(cart_id)
