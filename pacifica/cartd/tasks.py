"""The celery worker: thin tasks that call the use cases, and the reconciler thread each worker runs.

Run a worker with `celery -A pacifica.cartd.tasks worker`. The app itself, its
configuration and the queue the server sends to are in celeryapp.py; the service each
worker process runs on is made in wiring.py.
"""
from __future__ import annotations

import atexit
import logging
import os
import threading
from pathlib import Path
from typing import Any, List, Optional

from celery import signals

from . import database
from .celeryapp import BUNDLE_TASK, STAGE_TASK, app
from .metrics import (fresh_multiprocess_dir, mark_process_dead, remove_multiprocess_dir, serve_worker_metrics,
                      use_multiprocess_dir)
from .wiring import forget_worker_service, process_settings, worker_service

LOGGER = logging.getLogger(__name__)

__all__ = ['app', 'stage_files', 'bundle_cart']


@signals.worker_process_init.connect
def _reset_after_fork(**_kwargs: Any) -> None:
    """A forked pool process must not share the parent's connections or threads."""
    forget_worker_service()


class WorkerMetricsDir:
    """With [metrics] worker_port set: the directory where this worker's processes keep their metrics."""

    def __init__(self) -> None:
        self.path: Optional[Path] = None

    def start(self) -> None:
        """In the main process, before the pool forks: a fresh directory, and its metrics served on the port."""
        settings = process_settings()
        if not settings.metrics_worker_port or self.path is not None:
            return
        self.path = use_multiprocess_dir(fresh_multiprocess_dir('pacifica-cartd-worker-metrics-'))
        main, path = os.getpid(), self.path
        atexit.register(lambda: remove_multiprocess_dir(path) if os.getpid() == main else None)
        try:
            serve_worker_metrics(settings.metrics_worker_address, settings.metrics_worker_port, self.path)
        except OSError as exc:  # the port is taken: the worker stages all the same
            LOGGER.error('cannot serve the worker metrics on %s:%d: %s', settings.metrics_worker_address,
                         settings.metrics_worker_port, exc)

    def process_ended(self, pid: int) -> None:
        """A pool process exits: its live gauges go (its counts stay in the sum)."""
        if self.path is not None:
            mark_process_dead(self.path, pid)


WORKER_METRICS = WorkerMetricsDir()


@signals.worker_init.connect
def _serve_worker_metrics(**_kwargs: Any) -> None:
    WORKER_METRICS.start()


@signals.worker_process_shutdown.connect
def _pool_process_ended(pid: Optional[int] = None, **_kwargs: Any) -> None:
    WORKER_METRICS.process_ended(pid or os.getpid())


class Reconciler:
    """A thread in each worker's main process that, every reconcile_interval, re-drives stalled carts
    and removes the files of carts past their lifetime."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.thread: Optional[threading.Thread] = None

    def start(self) -> None:
        """Start the loop unless reconcile_interval is 0."""
        settings = process_settings()
        interval = settings.reconcile_interval
        if not interval or self.thread is not None:
            return
        self.thread = threading.Thread(target=self._loop, args=(interval,), name='cartd-reconciler', daemon=True)
        self.thread.start()
        LOGGER.info('reconciler runs every %g s (stall timeout %g s)', interval, settings.stall_timeout)

    def _loop(self, interval: float) -> None:
        while not self.stop.wait(interval):
            try:
                service = worker_service()
                with database.connection():
                    service.reconcile()
                    service.remove_expired()
            except Exception:  # a database or broker outage must not end the loop
                LOGGER.exception('reconcile pass failed; trying again in %g s', interval)


RECONCILER = Reconciler()


@signals.worker_ready.connect
def _start_reconciler(**_kwargs: Any) -> None:
    RECONCILER.start()


@signals.worker_shutdown.connect
def _stop_reconciler(**_kwargs: Any) -> None:
    RECONCILER.stop.set()


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
