"""The celery worker: thin tasks that call the use cases, and the threads each worker runs (reconcile,
check in, send completion events).

Run a worker with `celery -A pacifica.cartd.tasks worker`. The app itself, its
configuration and the queue the server sends to are in celeryapp.py; the service each
worker process runs on is made in wiring.py.
"""
from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any, List, Optional

from celery import signals

from . import database
from .celeryapp import BUNDLE_TASK, STAGE_TASK, app
from .config import Settings
from .logcontext import forget, settle, use_format
from .metrics import (fresh_multiprocess_dir, mark_process_dead, remove_multiprocess_dir, serve_worker_metrics,
                      use_multiprocess_dir)
from .orm import now
from .wiring import forget_worker_service, process_settings, worker_service

LOGGER = logging.getLogger(__name__)
LEAVE_WAIT_S = 5.0  # how long a stopping worker waits for a check-in under way before removing its record

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


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _log_in_format(logger: logging.Logger, **_kwargs: Any) -> None:
    """Celery's handlers write log_format, each line naming the cart and file it is about (logcontext)."""
    use_format(process_settings().log_format, logger.handlers)


@signals.task_prerun.connect
def _task_starts(task_id: Optional[str] = None, **_kwargs: Any) -> None:
    """Lines logged while a task runs carry its id (and the use cases add the cart and file)."""
    settle(task_id=task_id)


@signals.task_postrun.connect
def _task_ended(**_kwargs: Any) -> None:
    forget()


class WorkerThread:
    """A daemon thread in each worker's main process that does one pass of its job every interval
    (and, when `AT_ONCE`, one before it starts), surviving a failed pass, until `stop` is set."""

    NAME = ''  # the thread's
    JOB = ''  # in words, for the log
    AT_ONCE = False

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.thread: Optional[threading.Thread] = None

    def interval(self, settings: Settings) -> float:
        """Seconds between passes; 0: the thread is not started."""
        raise NotImplementedError

    def start(self) -> None:
        """Start the loop unless its interval is 0 or it runs already."""
        settings = process_settings()
        interval = self.interval(settings)
        if not interval or self.thread is not None:
            return
        if self.AT_ONCE:
            self._pass(interval)
        self.thread = threading.Thread(target=self._loop, args=(interval,), name=self.NAME, daemon=True)
        self.thread.start()
        self.started(settings)

    def started(self, settings: Settings) -> None:
        """Say that the loop runs."""

    def one_pass(self) -> None:
        """The job, done once."""
        raise NotImplementedError

    def _loop(self, interval: float) -> None:
        while not self.stop.wait(interval):
            self._pass(interval)

    def _pass(self, interval: float) -> None:
        try:
            self.one_pass()
        except Exception:  # a database or broker outage must not end the loop
            LOGGER.exception('%s pass failed; trying again in %g s', self.JOB, interval)


class Reconciler(WorkerThread):
    """Every reconcile_interval, re-drive stalled carts and remove the files of carts past their lifetime."""

    NAME = 'cartd-reconciler'
    JOB = 'reconcile'

    def interval(self, settings: Settings) -> float:
        """reconcile_interval."""
        return settings.reconcile_interval

    def started(self, settings: Settings) -> None:
        """Say how often it runs."""
        LOGGER.info('reconciler runs every %g s (stall timeout %g s)', settings.reconcile_interval,
                    settings.stall_timeout)

    def one_pass(self) -> None:
        """One reconcile and one sweep of expired carts."""
        service = worker_service()
        with database.connection():
            service.reconcile()
            service.remove_expired()


class CheckIn(WorkerThread):
    """Every worker_heartbeat, and at once when the worker is ready, record that this worker is here;
    when it stops, remove its record (see workers.py)."""

    NAME = 'cartd-check-in'
    JOB = 'check-in'
    AT_ONCE = True

    def __init__(self) -> None:
        super().__init__()
        self.name = socket.gethostname()
        self.pid = os.getpid()
        self.since = now()

    def interval(self, settings: Settings) -> float:
        """worker_heartbeat."""
        return settings.worker_heartbeat

    def start_as(self, name: Optional[str]) -> None:
        """Start checking in as the worker node `name` (its host name when the worker gives none)."""
        self.name, self.pid, self.since = name or socket.gethostname(), os.getpid(), now()
        self.start()

    def started(self, settings: Settings) -> None:
        """Say how often it checks in."""
        LOGGER.info('worker %s (pid %d) checked in; it checks in every %g s', self.name, self.pid,
                    settings.worker_heartbeat)

    def one_pass(self) -> None:
        """Check in once."""
        worker_service().check_in(self.name, self.pid, self.since)

    def leave(self) -> None:
        """Stop checking in and remove this worker's record, so servers know at once that it is gone."""
        self.stop.set()
        if self.thread is None:
            return
        self.thread.join(LEAVE_WAIT_S)
        try:
            worker_service().leave(self.name, self.pid)
        except Exception:  # the database is away: the record simply grows old
            LOGGER.exception('worker %s could not remove its check-in record', self.name)


class Notifier(WorkerThread):
    """Every [notifications] interval, send the completion events that are due (only when [notifications]
    names a url or callback prefixes: otherwise there can be none)."""

    NAME = 'cartd-notifier'
    JOB = 'event delivery'

    def interval(self, settings: Settings) -> float:
        """[notifications] interval, or 0 when no event can be sent."""
        return settings.notifications_interval if settings.notifications_on else 0.0

    def started(self, settings: Settings) -> None:
        """Say how often it looks for events to send."""
        LOGGER.info('notifier sends the due completion events every %g s', settings.notifications_interval)

    def one_pass(self) -> None:
        """Send the due events (a receiver that fails leaves its event in the outbox for later)."""
        service = worker_service()
        with database.connection():
            service.deliver_events()


RECONCILER = Reconciler()
CHECK_IN = CheckIn()
NOTIFIER = Notifier()


@signals.worker_ready.connect
def _start_reconciler(sender: Any = None, **_kwargs: Any) -> None:
    RECONCILER.start()
    CHECK_IN.start_as(getattr(sender, 'hostname', None))
    NOTIFIER.start()


@signals.worker_shutdown.connect
def _stop_reconciler(**_kwargs: Any) -> None:
    RECONCILER.stop.set()
    NOTIFIER.stop.set()
    CHECK_IN.leave()


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
