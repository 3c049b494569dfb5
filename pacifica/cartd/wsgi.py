"""The WSGI entry point: `uwsgi --module pacifica.cartd.wsgi` serves `application`."""
import os

import cherrypy

from .app import mount, prepare
from .config import default_cpconfig_path, load_settings

SETTINGS = load_settings()
prepare(SETTINGS)
mount(SETTINGS, default_cpconfig_path(os.environ))
application = cherrypy.tree
