"""Wire settings, database, task queue and service into the CherryPy application."""
from __future__ import annotations

import logging
import os
import threading
from typing import Optional

import cherrypy

from . import database, schema
from .config import Settings, check_volume
from .rest import CartRoot, QuietRequest, app_config, error_page
from .service import CartService
from .tasks import CeleryTaskQueue, app as celery_app, check_broker, use_settings

LOGGER = logging.getLogger(__name__)


class ServiceHolder:
    """Builds the service once, on the first request, in the process that serves it."""

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


def prepare(settings: Settings) -> None:
    """Check the volume, bind and reach the database, and refuse a schema this code cannot use."""
    check_volume(settings)
    check_broker(settings)
    use_settings(settings)
    database.bind(settings)
    database.wait_for_database(settings)
    with database.connection():
        schema.require_usable()


def mount(settings: Settings, cpconfig: Optional[str]) -> cherrypy._cptree.Application:
    """Mount the API at '/' with the code's own config, then the cpconfig file's on top."""
    cherrypy.config.update({'error_page.default': error_page, 'request.show_tracebacks': False})
    if cpconfig and os.path.isfile(cpconfig):
        cherrypy.config.update(cpconfig)
    application = cherrypy.tree.mount(CartRoot(ServiceHolder(settings)), '/', app_config())
    application.request_class = QuietRequest
    if cpconfig and os.path.isfile(cpconfig):
        application.merge(cpconfig)
    # The API's own settings win over a cpconfig that predates them.
    application.merge(app_config())
    LOGGER.info('cart API mounted (config %s, cpconfig %s)', settings.config_file, cpconfig)
    return application
