"""The layers of DESIGN.md and docs/architecture.md hold, each framework stays in its module, and the code is clean."""
from __future__ import annotations

import ast
import importlib.util
import pathlib
import re
import subprocess
import sys
from typing import Dict, Set

import pytest

SPEC = importlib.util.find_spec('pacifica.cartd')
assert SPEC is not None and SPEC.submodule_search_locations
PACKAGE = pathlib.Path(list(SPEC.submodule_search_locations)[0])
REPO = pathlib.Path(__file__).resolve().parent.parent

# third-party or stdlib module -> the only modules allowed to import it
OWNERS: Dict[str, Set[str]] = {
    'cherrypy': {'rest', 'wsgi', '__main__', 'app', 'httpserver'},
    'cheroot': {'httpserver'},
    'celery': {'tasks', 'celeryapp'},
    'kombu': {'tasks', 'celeryapp'},
    'requests': {'archive'},
    'http.client': {'archive', 'webhook'},
    'tarfile': {'tarlayout'},
    'peewee': {'orm', 'database', 'schema'},
    'playhouse': {'database', 'schema'},
    'jsonschema': {'cartrequest'},
    'shutil': {'volume'},
    'fcntl': {'fileio'},
    'tqdm': {'__main__'},
    'yaml': {'__main__'},
    'prometheus_client': {'metrics'},
}

# Each module's place, lowest first: a module imports only modules of a lower rank.
LAYERS: Dict[str, Dict[str, float]] = {
    'leaves': {'errors': 0, 'logcontext': 0, 'config': 1},
    'persistence': {'orm': 2, 'database': 3, 'schema': 3},
    'I/O and formats': {'paths': 4, 'fileio': 4, 'byteranges': 4, 'tarlayout': 5, 'volume': 5, 'archive': 5,
                        'webhook': 5},
    'policy': {'cartrequest': 6, 'heartbeat': 6, 'cleanup': 6, 'taskqueue': 6, 'cartlayout': 6, 'eviction': 6,
               'expiry': 6, 'stagedfiles': 6, 'cartstate': 6.2, 'cartreport': 6.5, 'workers': 6.5, 'events': 6.7},
    'use cases': {'bundling': 7, 'health': 7, 'metrics': 7, 'staging': 8, 'carts': 8, 'recovery': 8, 'delivery': 8,
                  'admin': 9},
    'facade': {'service': 10},
    'adapters': {'transport': 11, 'celeryapp': 11, 'uwsgiadapter': 11, 'rest': 12, 'httpserver': 12},
    'composition root': {'wiring': 13},
    'entry points': {'tasks': 14, 'app': 14, 'wsgi': 15, '__main__': 15, '__init__': 15},
}
RANK = {module: rank for layer in LAYERS.values() for module, rank in layer.items()}
LAYER_OF = {module: name for name, layer in LAYERS.items() for module in layer}
# Where the tables of the database may be queried; everywhere else goes through orm's named queries.
QUERYING = {'orm', 'schema', 'database'}
MODEL_NAMES = {'Cart', 'File', 'CartTasks', 'SpaceReservation', 'CartSystem', 'CartEvent', 'CartCounter',
               'WorkerSighting', 'StagedFile'}
QUERY_METHODS = {'select', 'update', 'delete', 'insert', 'insert_many', 'create', 'get', 'get_or_none',
                 'get_by_id', 'bulk_update', 'bulk_create', 'replace'}


def _tree(path: pathlib.Path) -> ast.Module:
    return ast.parse(path.read_text(encoding='utf-8'))


def _imports(path: pathlib.Path) -> Set[str]:
    names: Set[str] = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.module:
                    names.add('.' + node.module)
                else:  # from . import database
                    names.update('.' + alias.name for alias in node.names)
            elif node.module:
                names.add(node.module)
    return names


MODULES = sorted(PACKAGE.glob('*.py'))


def test_every_module_has_a_layer() -> None:
    assert {path.stem for path in MODULES} == set(RANK), 'place new modules in LAYERS (and docs/architecture.md)'


@pytest.mark.parametrize('path', MODULES, ids=lambda path: path.stem)
def test_frameworks_stay_in_their_modules(path: pathlib.Path) -> None:
    for name in _imports(path):
        for owned in {name.split('.')[0], name}:  # a package (cherrypy) or one module of it (http.client)
            if owned in OWNERS:
                assert path.stem in OWNERS[owned], \
                    f'{path.stem} imports {name}, which belongs to {sorted(OWNERS[owned])}'


@pytest.mark.parametrize('path', MODULES, ids=lambda path: path.stem)
def test_imports_point_down(path: pathlib.Path) -> None:
    internal = {name.lstrip('.').split('.')[0] for name in _imports(path) if name.startswith('.')}
    for imported in sorted(internal):
        assert RANK[imported] < RANK[path.stem], (
            f'{path.stem} ({LAYER_OF[path.stem]}) imports {imported} ({LAYER_OF[imported]}), which is not below it')


@pytest.mark.parametrize('path', [path for path in MODULES if path.stem not in QUERYING], ids=lambda path: path.stem)
def test_queries_are_named_in_orm(path: pathlib.Path) -> None:
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and isinstance(node.func.value, ast.Name) and node.func.value.id in MODEL_NAMES:
            assert node.func.attr not in QUERY_METHODS, \
                f'{path.name}:{node.lineno}: {node.func.value.id}.{node.func.attr}() belongs in a named query in orm.py'


def test_the_sendfile_path_does_not_cross_the_use_cases() -> None:
    for path in MODULES:
        if RANK[path.stem] <= RANK['service']:
            text = path.read_text(encoding='utf-8').lower().replace('os.sendfile', '')
            assert 'sendfile' not in text and 'send_file' not in text, f'{path.name} knows how bytes reach the socket'


def test_every_module_says_its_job() -> None:
    for path in MODULES:
        docstring = ast.get_docstring(_tree(path))
        assert docstring, f'{path.name} has no module docstring'


def test_architecture_page_lists_every_module() -> None:
    page = (REPO / 'docs' / 'architecture.md').read_text(encoding='utf-8')
    listed = set(re.findall(r'^\| `([a-z_]+)\.py` \|', page, flags=re.MULTILINE))
    assert listed == {path.stem for path in MODULES} - {'__init__'}


def test_ruff_and_mypy_are_clean() -> None:
    ruff = subprocess.run([sys.executable, '-m', 'ruff', 'check', '--select', 'E,F,W,B', '--line-length', '120',
                           str(REPO / 'pacifica')], capture_output=True, text=True, timeout=120, check=False)
    assert ruff.returncode == 0, ruff.stdout + ruff.stderr
    mypy = subprocess.run([sys.executable, '-m', 'mypy', '--ignore-missing-imports', '--no-incremental',
                           str(REPO / 'pacifica')], capture_output=True, text=True, timeout=300, check=False,
                          cwd=str(REPO))
    assert mypy.returncode == 0, mypy.stdout + mypy.stderr
