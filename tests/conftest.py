"""Shared fixtures: test the installed pacifica-cartd (not the source tree), and run the real peers."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pathlib
import sys
from typing import Iterator, List, cast

import pytest


REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def _inside_repo(entry: str) -> bool:
    """Tell whether a sys.path entry is the repository root ('' means the current directory)."""
    return pathlib.Path(entry or os.getcwd()).resolve() == REPO_ROOT


def _installed_elsewhere() -> bool:
    """Tell whether a pacifica-cartd distribution is installed outside the repository."""
    outside = [entry for entry in sys.path if not _inside_repo(entry)]
    return any(True for _ in importlib.metadata.distributions(name='pacifica-cartd', path=outside))


# `python -m pytest` (and every xdist worker) puts the repo root first on sys.path, and the
# `pacifica` namespace then resolves pacifica.cartd to ./pacifica/cartd. When the package is
# installed, drop the repo root so the installed copy (the one the server and worker
# subprocesses run) is the one tested; without an install, the source tree is used.
if _installed_elsewhere():
    sys.path[:] = [entry for entry in sys.path if not _inside_repo(entry)]


def pytest_report_header() -> List[str]:
    """Say which copy of pacifica.cartd the run imports."""
    spec = importlib.util.find_spec('pacifica.cartd')
    where = 'not importable' if spec is None else ', '.join(spec.submodule_search_locations or [str(spec.origin)])
    return [f'pacifica.cartd from: {where}']


# ---- shared peers ---------------------------------------------------------------------

from cartd_testkit.archive import ArchiveServer  # noqa: E402  (after the sys.path fix above; pip install -e ./testkit)
from cartd_testkit.databases import fresh_database  # noqa: E402
from cartd_testkit.faultproxy import FaultProxy, ProxiedArchive  # noqa: E402
from cartd_testkit.receiver import EventReceiver  # noqa: E402
from cartd_testkit.stack import CartStack, running  # noqa: E402

DATABASE_KINDS = ('sqlite', 'postgres', 'mysql')


@pytest.fixture(scope='session')
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ArchiveServer]:
    """The real archive interface (POSIX backend under gunicorn), one per test process."""
    with ArchiveServer(tmp_path_factory.mktemp('archive')) as server:
        yield server


@pytest.fixture(scope='module')
def proxy(archive: ArchiveServer) -> Iterator[FaultProxy]:
    """A fault proxy in front of the real archive (cartd_testkit.faultproxy), one per test module,
    so a test can keep a file on "tape" or make the archive fail."""
    with FaultProxy(archive.url) as server:
        yield server


# Every HTTP behaviour is tested under both servers: pacifica-cartd's own on each database, and
# uWSGI as the docs run it (on SQLite: the database is the same code under either server).
SERVED = [('cartd', kind) for kind in DATABASE_KINDS] + [('uwsgi', 'sqlite')]


@pytest.fixture(scope='module', params=SERVED, ids=lambda served: '-'.join(served))
def served_stack(request: pytest.FixtureRequest, archive: ArchiveServer,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[CartStack]:
    """A running cart (server + one celery worker) under each server and database in turn.

    A module uses it in place of `stack` by defining `stack` as this fixture; STACK_OVERRIDES applies,
    and with ARCHIVE_BEHIND_PROXY = True the cart reaches the archive through the module's `proxy`.
    """
    server, kind = request.param
    base = tmp_path_factory.mktemp(f'stack-{server}-{kind}')
    url = fresh_database(kind, base)
    if getattr(request.module, 'ARCHIVE_BEHIND_PROXY', False):
        archive = cast(ArchiveServer, ProxiedArchive(archive, request.getfixturevalue('proxy')))
    stack_under_test = CartStack(base, archive, url, workers=1, concurrency=2,
                                 overrides=getattr(request.module, 'STACK_OVERRIDES', None), server=server)
    with running(stack_under_test, kind, url) as cart:
        yield cart


@pytest.fixture(scope='module', params=DATABASE_KINDS)
def stack(request: pytest.FixtureRequest, archive: ArchiveServer,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[CartStack]:
    """A running cart (server + one celery worker) on each database in turn, for a test module.

    A module may set STACK_OVERRIDES ({section: {key: value}}) to change the stack's config.
    """
    kind = request.param
    base = tmp_path_factory.mktemp(f'stack-{kind}')
    url = fresh_database(kind, base)
    stack_under_test = CartStack(base, archive, url, workers=1, concurrency=2,
                                 overrides=getattr(request.module, 'STACK_OVERRIDES', None))
    with running(stack_under_test, kind, url) as cart:
        yield cart


@pytest.fixture
def rows(stack: CartStack) -> Iterator[None]:
    """This process bound to the module's stack's database, to read its rows or age them."""
    from pacifica.cartd import database
    from pacifica.cartd.config import load_settings
    db = database.bind(load_settings(str(stack.config), environ={}))
    try:
        yield
    finally:
        if hasattr(db, 'close_all'):
            db.close_all()
        else:
            db.close()


@pytest.fixture(scope='module')
def sqlite_stack(archive: ArchiveServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CartStack]:
    """A running cart on SQLite with one worker, for a test module that needs one database only."""
    base = tmp_path_factory.mktemp('sqlite-stack')
    url = fresh_database('sqlite', base)
    with running(CartStack(base, archive, url, workers=1), 'sqlite', url) as cart:
        yield cart


@pytest.fixture(scope='module')
def receiver(request: pytest.FixtureRequest) -> Iterator[EventReceiver]:
    """A real receiver of completion events on the module's RECEIVER_PORT, where its STACK_OVERRIDES send them."""
    with EventReceiver(request.module.RECEIVER_PORT) as running:
        yield running
