"""The Celery application: its configuration, the broker's folders, and the queue the use cases send to.

The app is configured lazily: `wiring` connects the handler that hands it the process's
settings the first time Celery needs its configuration, never at import.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

from celery import Celery

from .config import Settings, filesystem_broker_dir
from .errors import ConfigError

STAGE_TASK = 'pacifica.cartd.tasks.stage_files'
BUNDLE_TASK = 'pacifica.cartd.tasks.bundle_cart'

app = Celery('pacifica.cartd')

# Publishing gives up after about a second when the broker is down (the cart's rows are
# committed and the reconciler queues it later); ignore_result keeps send_task from
# declaring a result queue, which would retry for ever.
BROKER_CHECK_TIMEOUT_S = 2.0  # readiness: how long a connection to the broker may take
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


def configure(celery_app: Celery, settings: Settings) -> None:
    """Give the app its configuration (called from Celery's on_configure, once per process)."""
    check_broker(settings)
    celery_app.conf.update(celery_settings(settings))


class CeleryTaskQueue:
    """The use cases' TaskQueue, on Celery."""

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

    def broker_problem(self) -> Optional[str]:
        """None when the broker takes a connection now (one try, BROKER_CHECK_TIMEOUT_S at most), else why not."""
        try:
            with self.app.connection_for_write(connect_timeout=BROKER_CHECK_TIMEOUT_S) as connection:
                connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0)
        except Exception as exc:  # any transport error: the broker is what is wrong
            return f'the broker does not answer: {type(exc).__name__}: {" ".join(str(exc).split())}'
        return None
