"""Build and cache the separate virtual environments that hold the real peer services for tests."""
from __future__ import annotations

import fcntl
import os
import pathlib
import shutil
import subprocess
import sys
import time

# testkit/cartd_testkit/venvs.py: the checkout is two levels up. The testkit is installed
# editable (pip install -e ./testkit), so __file__ stays in the checkout.
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

ARCHIVE_REQUIREMENTS: list[str] = [
    'pacifica-archiveinterface==0.4.2',
    'peewee<4',
    'setuptools<81',
    'gunicorn',
]

REFERENCE_CART_REQUIREMENTS: list[str] = [
    'pacifica-cartd==0.7.0',
    'peewee<4',
    'setuptools<81',
    'PyMySQL',
    'psycopg2-binary',
]

MARKER_NAME = '.cartd-test-requirements'
PIP_TIMEOUT_S = 1500
LOCK_TIMEOUT_S = 1800
LOG_TAIL_LINES = 40


def cache_dir() -> pathlib.Path:
    """Return (and create) the directory that holds the cached test venvs."""
    configured = os.environ.get('CARTD_TEST_CACHE')
    if not configured and not (REPO_ROOT / 'testkit' / 'pyproject.toml').is_file():
        raise RuntimeError(f'cartd_testkit is not inside a checkout ({__file__}): install it with '
                           f'`pip install -e ./testkit`, or set CARTD_TEST_CACHE')
    path = pathlib.Path(configured) if configured else REPO_ROOT / '.cache' / 'test-venvs'
    path.mkdir(parents=True, exist_ok=True)
    return path


def _marker_text(requirements: list[str]) -> str:
    """Return the marker file content that stands for this requirement list."""
    return '\n'.join(requirements) + '\n'


def _is_ready(venv_dir: pathlib.Path, requirements: list[str]) -> bool:
    """Tell whether the venv was fully built for exactly these requirements."""
    marker = venv_dir / MARKER_NAME
    if not marker.is_file() or not (venv_dir / 'bin' / 'python').exists():
        return False
    return marker.read_text(encoding='utf-8') == _marker_text(requirements)


def _log_tail(log_path: pathlib.Path, lines: int = LOG_TAIL_LINES) -> str:
    """Return the last lines of a log file (empty if it does not exist)."""
    try:
        text = log_path.read_text(encoding='utf-8', errors='replace')
    except FileNotFoundError:
        return ''
    return '\n'.join(text.splitlines()[-lines:])


def _run_logged(cmd: list[str], log_path: pathlib.Path, what: str) -> None:
    """Run a command with its output appended to log_path; raise RuntimeError with the log tail on failure."""
    with open(log_path, 'ab') as log:
        log.write(('\n$ ' + ' '.join(cmd) + '\n').encode())
        log.flush()
        try:
            result = subprocess.run(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                timeout=PIP_TIMEOUT_S, check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(
                f'{what} timed out after {PIP_TIMEOUT_S} s; log {log_path}:\n{_log_tail(log_path)}'
            ) from exc
    if result.returncode != 0:
        raise RuntimeError(
            f'{what} failed with exit code {result.returncode}; log {log_path}:\n{_log_tail(log_path)}'
        )


def _acquire_lock(lock_file: pathlib.Path) -> int:
    """Take an exclusive flock on lock_file, waiting at most LOCK_TIMEOUT_S; return the open descriptor."""
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + LOCK_TIMEOUT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise RuntimeError(f'timed out after {LOCK_TIMEOUT_S} s waiting for {lock_file}') from None
            time.sleep(0.5)


def _build(venv_dir: pathlib.Path, requirements: list[str], log_path: pathlib.Path) -> None:
    """Create the venv from scratch and install the requirements into it."""
    if venv_dir.exists():
        shutil.rmtree(venv_dir)
    log_path.write_text(f'building {venv_dir} for {requirements}\n', encoding='utf-8')
    _run_logged([sys.executable, '-m', 'venv', str(venv_dir)], log_path, f'creating venv {venv_dir}')
    python = str(venv_dir / 'bin' / 'python')
    _run_logged(
        [python, '-m', 'pip', 'install', '--disable-pip-version-check', *requirements],
        log_path, f'pip install into {venv_dir}',
    )
    marker = venv_dir / MARKER_NAME
    partial = marker.with_suffix('.partial')
    partial.write_text(_marker_text(requirements), encoding='utf-8')
    os.replace(partial, marker)


def ensure_venv(name: str, requirements: list[str]) -> pathlib.Path:
    """Return the bin directory of the cached venv `name`, building it once for `requirements`."""
    root = cache_dir()
    venv_dir = root / name
    bin_dir = venv_dir / 'bin'
    if _is_ready(venv_dir, requirements):
        return bin_dir
    fd = _acquire_lock(root / f'{name}.lock')
    try:
        if not _is_ready(venv_dir, requirements):
            _build(venv_dir, requirements, root / f'{name}.log')
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    return bin_dir


def archive_venv() -> pathlib.Path:
    """Return the bin directory of the venv holding pacifica-archiveinterface 0.4.2 and gunicorn."""
    return ensure_venv('archiveinterface-0.4.2', ARCHIVE_REQUIREMENTS)


def reference_cart_venv() -> pathlib.Path:
    """Return the bin directory of the venv holding the published pacifica-cartd 0.7.0."""
    return ensure_venv('cartd-0.7.0', REFERENCE_CART_REQUIREMENTS)
