"""The CherryPy application: the API mounted at '/' over the process's service, with the cpconfig file applied."""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Optional

import cherrypy

from .config import Settings
from .logcontext import use_format
from .metrics import ServerMetrics
from .rest import CartRoot, HeadFastLane, MetricsLane, OpsLane, QuietRequest, app_config, error_page
from .volume import CartVolume
from .wiring import server_service
from .workers import WorkerPresence

LOGGER = logging.getLogger(__name__)
LOG_LINE = '%(asctime)s %(levelname)s %(name)s: %(message)s'  # the server's own lines, plain


def start_logging(level: int = logging.INFO) -> None:
    """Log this package's lines (and anything else's) to standard error, before the settings are read."""
    logging.basicConfig(level=level, format=LOG_LINE)


def log_in_format(log_format: str) -> None:
    """Write every log line, this package's and CherryPy's own (engine and access), in `log_format`
    (see logcontext), CherryPy's once only (not again through the root logger). Call after `mount`,
    which makes CherryPy's handlers from the cpconfig file."""
    cherrypy.log.error_log.propagate = False
    cherrypy.log.access_log.propagate = False
    use_format(log_format, [*logging.getLogger().handlers, *cherrypy.log.error_log.handlers,
                            *cherrypy.log.access_log.handlers])


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
    metrics = (ServerMetrics(CartVolume(settings.volume_path), metrics_dir, WorkerPresence(settings.worker_heartbeat))
               if settings.metrics_enabled else None)
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
