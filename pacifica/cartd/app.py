"""The CherryPy application: the API mounted at '/' over the process's service, with the cpconfig file applied."""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Optional

import cherrypy

from .config import Settings
from .metrics import ServerMetrics
from .rest import CartRoot, HeadFastLane, MetricsLane, OpsLane, QuietRequest, app_config, error_page
from .volume import CartVolume
from .wiring import server_service

LOGGER = logging.getLogger(__name__)


def mount(settings: Settings, cpconfig: Optional[str],
          metrics_dir: Optional[Path] = None) -> cherrypy._cptree.Application:
    """Mount the API at '/' with the code's own config, then the cpconfig file's on top; with metrics on,
    count its requests (summed through `metrics_dir` when several processes serve) and answer /-/metrics."""
    cherrypy.config.update({'error_page.default': error_page, 'request.show_tracebacks': False})
    if cpconfig and os.path.isfile(cpconfig):
        cherrypy.config.update(cpconfig)
    service = server_service(settings)
    application = cherrypy.tree.mount(CartRoot(service), '/', app_config())
    application.request_class = QuietRequest
    metrics = ServerMetrics(CartVolume(settings.volume_path), metrics_dir) if settings.metrics_enabled else None
    if metrics is not None:  # the pipeline's first entry is the outermost
        application.wsgiapp.pipeline.append(('metrics_lane', functools.partial(MetricsLane, metrics=metrics)))
    application.wsgiapp.pipeline.append(('ops_lane', functools.partial(OpsLane, service_factory=service,
                                                                       metrics=metrics)))
    application.wsgiapp.pipeline.append(('head_fast_lane', functools.partial(HeadFastLane, service_factory=service)))
    if cpconfig and os.path.isfile(cpconfig):
        application.merge(cpconfig)
    # The API's own settings win over a cpconfig that predates them.
    application.merge(app_config())
    LOGGER.info('cart API mounted (config %s, cpconfig %s)', settings.config_file, cpconfig)
    return application
