"""The layers of DESIGN.md hold (each framework in its own module), and the code is lint- and type-clean."""
from __future__ import annotations

import ast
import importlib.util
import pathlib
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
    'kombu': {'tasks'},
    'requests': {'archive'},
    'tarfile': {'volume', 'tarlayout'},
    'peewee': {'orm', 'database', 'schema', 'service', 'eviction'},
    'playhouse': {'database', 'schema'},
    'jsonschema': {'service', 'cartrequest'},
    'shutil': {'volume'},
}
# module -> package modules it must not import (imports point down only)
FORBIDDEN_INTERNAL: Dict[str, Set[str]] = {
    'config': {'orm', 'database', 'schema', 'service', 'rest', 'tasks', 'archive', 'volume'},
    'errors': {'config', 'orm', 'database', 'schema', 'service', 'rest', 'tasks', 'archive', 'volume'},
    'archive': {'orm', 'database', 'schema', 'service', 'rest', 'tasks'},
    'volume': {'orm', 'database', 'schema', 'service', 'rest', 'tasks', 'archive'},
    'orm': {'service', 'rest', 'tasks', 'archive', 'volume'},
    'service': {'rest', 'tasks', 'app', 'wsgi', '__main__'},
    'rest': {'tasks', 'wsgi', '__main__'},
    'tasks': {'rest', 'wsgi', '__main__', 'app'},
    'httpserver': {'orm', 'database', 'schema', 'service', 'rest', 'tasks', 'archive', 'volume', 'app'},
}


def _imports(path: pathlib.Path) -> Set[str]:
    names: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                names.add('.' + (node.module or ''))
            elif node.module:
                names.add(node.module)
    return names


MODULES = sorted(PACKAGE.glob('*.py'))


@pytest.mark.parametrize('path', MODULES, ids=lambda path: path.stem)
def test_frameworks_stay_in_their_modules(path: pathlib.Path) -> None:
    for name in _imports(path):
        top = name.split('.')[0]
        if top in OWNERS:
            assert path.stem in OWNERS[top], f'{path.stem} imports {name}, which belongs to {sorted(OWNERS[top])}'


@pytest.mark.parametrize('path', MODULES, ids=lambda path: path.stem)
def test_imports_point_down(path: pathlib.Path) -> None:
    internal = {name.lstrip('.').split('.')[0] for name in _imports(path) if name.startswith('.')}
    clash = internal & FORBIDDEN_INTERNAL.get(path.stem, set())
    assert not clash, f'{path.stem} imports {sorted(clash)}'


def test_every_module_says_its_job() -> None:
    for path in MODULES:
        docstring = ast.get_docstring(ast.parse(path.read_text(encoding='utf-8')))
        assert docstring, f'{path.name} has no module docstring'


def test_ruff_and_mypy_are_clean() -> None:
    ruff = subprocess.run([sys.executable, '-m', 'ruff', 'check', '--select', 'E,F,W,B', '--line-length', '120',
                           str(REPO / 'pacifica')], capture_output=True, text=True, timeout=120, check=False)
    assert ruff.returncode == 0, ruff.stdout + ruff.stderr
    mypy = subprocess.run([sys.executable, '-m', 'mypy', '--ignore-missing-imports', '--no-incremental',
                           str(REPO / 'pacifica')], capture_output=True, text=True, timeout=300, check=False,
                          cwd=str(REPO))
    assert mypy.returncode == 0, mypy.stdout + mypy.stderr
