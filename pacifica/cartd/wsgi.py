"""The WSGI entry point: `uwsgi --module pacifica.cartd.wsgi` serves `application`."""
import os

import cherrypy

from .app import mount
from .config import default_cpconfig_path, load_settings
from .wiring import prepare_server

SETTINGS = load_settings()
prepare_server(SETTINGS)
mount(SETTINGS, default_cpconfig_path(os.environ))
application = cherrypy.tree
