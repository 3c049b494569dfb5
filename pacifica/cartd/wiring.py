"""The composition root: settings, database, task queue and service, wired once per process for every entry point.

pacifica-cartd and uWSGI (through app.py), the celery worker (through tasks.py) and
pacifica-cartd-cmd each come here for what they run on, so the order of the steps
(volume, broker folders, database, schema check) is written once.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Callable, Optional

from . import database, schema
from .celeryapp import CeleryTaskQueue, app as celery_app, check_broker, configure
from .config import Settings, check_volume, load_settings
from .metrics import WorkerMetrics
from .service import CartService


class _Process:
    """The settings and service of this process, made on first use (the service again after a fork)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.settings: Optional[Settings] = None
        self.service: Optional[CartService] = None
        self.service_pid: Optional[int] = None


_PROCESS = _Process()


def use_settings(settings: Settings) -> None:
    """Make `settings` this process's settings (an entry point that parsed its own config file)."""
    with _PROCESS.lock:
        _PROCESS.settings = settings


def process_settings() -> Settings:
    """This process's settings: those handed over, else read once from CARTD_CONFIG and the environment."""
    with _PROCESS.lock:
        if _PROCESS.settings is None:
            _PROCESS.settings = load_settings()
        return _PROCESS.settings


@celery_app.on_configure.connect
def _configure_celery(sender: Any, **_kwargs: Any) -> None:
    """Configure Celery from this process's settings the first time it needs them, never at import."""
    configure(sender, process_settings())


def open_database(settings: Settings, need_schema: bool = True) -> None:
    """Bind the models to the configured database, wait until it answers, and refuse an unusable schema."""
    database.bind(settings)
    database.wait_for_database(settings)
    if need_schema:
        with database.connection():
            schema.require_usable()


def prepare_server(settings: Settings) -> None:
    """Everything a server process checks before it takes requests: volume, broker folders, database, schema."""
    check_volume(settings)
    check_broker(settings)
    use_settings(settings)
    open_database(settings)
    database.close_idle()  # uWSGI forks its workers after this: none may share the master's connection


class ServiceHolder:
    """Builds the server's service once, on the first request, in the process that serves it."""

    def __init__(self, settings: Settings) -> None:
        """Keep the settings until the service is first needed."""
        self.settings = settings
        self._service: Optional[CartService] = None
        self._lock = threading.Lock()

    def __call__(self) -> CartService:
        """Return the process's service."""
        with self._lock:
            if self._service is None:
                self._service = CartService(self.settings, CeleryTaskQueue(celery_app))
            return self._service


def server_service(settings: Settings) -> Callable[[], CartService]:
    """What the REST layer asks for its service: built on the first request (after uWSGI forks)."""
    return ServiceHolder(settings)


def worker_service() -> CartService:
    """The worker process's service, built on first use in each process (after the fork)."""
    settings = process_settings()
    with _PROCESS.lock:
        pid = os.getpid()
        if _PROCESS.service is None or _PROCESS.service_pid != pid:
            check_volume(settings)
            database.bind(settings)
            metrics = WorkerMetrics() if settings.metrics_worker_port else None  # tasks.py serves them
            _PROCESS.service = CartService(settings, CeleryTaskQueue(celery_app), worker_metrics=metrics)
            _PROCESS.service_pid = pid
        return _PROCESS.service


def forget_worker_service() -> None:
    """A forked pool process must not share the parent's connections or threads: build its own."""
    with _PROCESS.lock:
        _PROCESS.service = None
        _PROCESS.service_pid = None


def command_service(settings: Settings) -> CartService:
    """The service of an admin command: no task queue (fixit stages in its own process)."""
    return CartService(settings)
