"""The Celery app (configured lazily from the settings) and the thin tasks that call the service.

Run a worker with `celery -A pacifica.cartd.tasks worker`.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Any, List, Optional, Sequence

from celery import Celery, signals

from . import database
from .config import Settings, check_volume, filesystem_broker_dir, load_settings
from .errors import ConfigError
from .service import CartService

LOGGER = logging.getLogger(__name__)

STAGE_TASK = 'pacifica.cartd.tasks.stage_files'
BUNDLE_TASK = 'pacifica.cartd.tasks.bundle_cart'

app = Celery('pacifica.cartd')

# Publishing gives up after about a second when the broker is down (the cart's rows are
# committed and the reconciler queues it later); ignore_result keeps send_task from
# declaring a result queue, which would retry for ever.
PUBLISH_RETRY = {'max_retries': 2, 'interval_start': 0.2, 'interval_step': 0.3, 'interval_max': 0.5}

# How often a worker on the filesystem broker lists its folder for new messages (kombu's default is 1 s).
FILESYSTEM_POLLING_INTERVAL = 0.1


def broker_transport_options(settings: Settings) -> dict:
    """Transport options for the broker: for filesystem:///dir, the folders every process shares under dir.

    Every message is a file in dir/messages (the server writes there, the workers take from
    there) and the exchanges' bindings, which revoke's broadcast needs, live in dir/control.
    """
    root = filesystem_broker_dir(settings.broker_url)
    if root is None:
        return {}
    messages = str(root / 'messages')
    return {'data_folder_in': messages, 'data_folder_out': messages, 'control_folder': str(root / 'control'),
            'polling_interval': FILESYSTEM_POLLING_INTERVAL}


def kombu_broker_url(broker_url: str) -> str:
    """The broker URL as kombu takes it: a filesystem broker names localhost, which kombu warns about otherwise."""
    root = filesystem_broker_dir(broker_url)
    return broker_url if root is None else f'filesystem://localhost{root}'


def check_broker(settings: Settings) -> None:
    """Create a filesystem broker's folders (kombu does not), or fail with a ConfigError naming the key."""
    options = broker_transport_options(settings)
    for key in ('data_folder_in', 'control_folder'):
        if key in options:
            try:
                os.makedirs(options[key], exist_ok=True)
            except OSError as exc:
                raise ConfigError(f'bad value for [celery] broker_url (env BROKER_URL): '
                                  f'cannot create {options[key]}: {exc.strerror}') from exc


def celery_settings(settings: Settings) -> dict:
    """The Celery configuration the service runs with.

    Late acks and reject-on-worker-lost: a task killed mid-file is delivered again, and the
    task is idempotent (staged files are skipped), so nothing is lost and nothing doubled.
    """
    return {
        'broker_url': kombu_broker_url(settings.broker_url),
        'broker_transport_options': broker_transport_options(settings),
        'result_backend': settings.backend_url,
        'task_ignore_result': True,
        'task_default_queue': settings.celery_queue,
        'task_acks_late': True,
        'task_reject_on_worker_lost': True,
        'worker_prefetch_multiplier': 1,
        'task_serializer': 'json',
        'accept_content': ['json'],
        'broker_connection_retry_on_startup': True,
        'worker_hijack_root_logger': False,
    }


@app.on_configure.connect
def _configure(sender: Celery, **_kwargs: Any) -> None:
    """Read the settings the first time Celery needs its configuration, never at import."""
    settings = _settings()
    check_broker(settings)
    sender.conf.update(celery_settings(settings))


class _ProcessState:
    """The settings and service of this process, made on first use (and again after a fork)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.settings: Optional[Settings] = None
        self.service: Optional[CartService] = None
        self.service_pid: Optional[int] = None


_STATE = _ProcessState()


def _settings() -> Settings:
    with _STATE.lock:
        if _STATE.settings is None:
            _STATE.settings = load_settings()
        return _STATE.settings


def use_settings(settings: Settings) -> None:
    """Let a composition root (server, tests) hand over settings it already parsed."""
    with _STATE.lock:
        _STATE.settings = settings


class CeleryTaskQueue:
    """The service's TaskQueue, on Celery."""

    def __init__(self, celery_app: Celery) -> None:
        """Publish through this app."""
        self.app = celery_app

    def enqueue_stage(self, cart_id: int, file_ids: Sequence[int], countdown: float = 0,
                      tape_round: int = 0) -> str:
        """Queue staging of these files, optionally after a delay."""
        result = self.app.send_task(STAGE_TASK, args=(cart_id, list(file_ids), tape_round),
                                    countdown=countdown or None, ignore_result=True, retry_policy=PUBLISH_RETRY)
        return str(result.id)

    def enqueue_bundle(self, cart_id: int) -> str:
        """Queue the bundling of a cart."""
        return str(self.app.send_task(BUNDLE_TASK, args=(cart_id,), ignore_result=True,
                                      retry_policy=PUBLISH_RETRY).id)

    def revoke(self, task_ids: Sequence[str]) -> None:
        """Tell the workers to drop these tasks if they have not run yet."""
        self.app.control.revoke(list(task_ids))


def worker_service() -> CartService:
    """The worker process's service, built on first use in each process (after the fork)."""
    settings = _settings()
    with _STATE.lock:
        pid = os.getpid()
        if _STATE.service is None or _STATE.service_pid != pid:
            check_volume(settings)
            database.bind(settings)
            _STATE.service = CartService(settings, CeleryTaskQueue(app))
            _STATE.service_pid = pid
        return _STATE.service


@signals.worker_process_init.connect
def _reset_after_fork(**_kwargs: Any) -> None:
    """A forked pool process must not share the parent's connections or threads."""
    with _STATE.lock:
        _STATE.service = None
        _STATE.service_pid = None


class Reconciler:
    """A thread in each worker's main process that re-drives stalled carts every reconcile_interval."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.thread: Optional[threading.Thread] = None

    def start(self) -> None:
        """Start the loop unless reconcile_interval is 0."""
        interval = _settings().reconcile_interval
        if not interval or self.thread is not None:
            return
        self.thread = threading.Thread(target=self._loop, args=(interval,), name='cartd-reconciler', daemon=True)
        self.thread.start()
        LOGGER.info('reconciler runs every %g s (stall timeout %g s)', interval, _settings().stall_timeout)

    def _loop(self, interval: float) -> None:
        while not self.stop.wait(interval):
            try:
                service = worker_service()
                with database.connection():
                    service.reconcile()
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
