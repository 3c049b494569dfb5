"""Run the real pacifica-archiveinterface 0.4.2 (POSIX backend, gunicorn) as a test peer."""
from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import tempfile
from types import TracebackType
from typing import Dict, List, Optional, Type, Union

from .procs import ManagedProcess, free_port
from .venvs import archive_venv

# The WSGI module hands ARCHIVEINTERFACE_CPCONFIG (default ~/.pacifica-archiveinterface/cpconfig.ini)
# to cherrypy.Application, which fails to boot when that file is missing; the HTTP verbs are only
# routed when the MethodDispatcher is configured there.
CHERRYPY_CONFIG = """[/]
request.dispatch: cherrypy.dispatch.MethodDispatcher()
"""

# The posix backend reads ARCHIVEINTERFACE_CONFIG (missing file = defaults); pin the default so a
# config in the home directory cannot switch on id2filename.
ARCHIVE_CONFIG = """[posix]
use_id2filename = false
"""


class ArchiveServer:
    """The real archive interface serving files from a directory, on 127.0.0.1 and a free port."""

    def __init__(
        self,
        base_dir: Optional[Union[str, 'os.PathLike[str]']] = None,
        workers: int = 4,
        start_timeout: float = 60.0,
        extra_args: Optional[List[str]] = None,
    ) -> None:
        """Lay out archive-root/ (the prefix) and archive-state/ (configs, log) under base_dir or a new temp dir."""
        self._own_base = base_dir is None
        self.base_dir = pathlib.Path(tempfile.mkdtemp(prefix='cartd-archive-') if base_dir is None else base_dir)
        self.workers = workers
        self.start_timeout = start_timeout
        self.extra_args = list(extra_args or [])
        self.port = 0
        self.process: Optional[ManagedProcess] = None

    @property
    def root(self) -> pathlib.Path:
        """Return the archive prefix directory: file id `a.txt` is served from root/a.txt."""
        return self.base_dir / 'archive-root'

    @property
    def state_dir(self) -> pathlib.Path:
        """Return the directory holding the generated config files and the server log."""
        return self.base_dir / 'archive-state'

    @property
    def log_path(self) -> pathlib.Path:
        """Return the server's log file."""
        return self.state_dir / 'archiveinterface.log'

    @property
    def url(self) -> str:
        """Return the base URL (ending in '/') that file ids are appended to."""
        if not self.port:
            raise RuntimeError('the archive interface was not started')
        return f'http://127.0.0.1:{self.port}/'

    def path_for(self, archive_id: str) -> pathlib.Path:
        """Return the file that the posix backend serves for `archive_id`."""
        return self.root / archive_id.lstrip('/')

    def put(self, archive_id: str, data: bytes, mtime: Optional[float] = None) -> Dict[str, Union[str, int]]:
        """Write `data` straight into the archive directory and return its md5/sha1/sha256 and size."""
        path = self.path_for(archive_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if mtime is not None:
            os.utime(path, (mtime, mtime))
        return {
            'md5': hashlib.md5(data).hexdigest(),
            'sha1': hashlib.sha1(data).hexdigest(),
            'sha256': hashlib.sha256(data).hexdigest(),
            'size': len(data),
        }

    def start(self) -> 'ArchiveServer':
        """Start (or restart, on the same port) gunicorn with sync workers; wait until GET / answers 200."""
        if self.process is not None and self.process.running():
            raise RuntimeError('the archive interface is already running')
        bin_dir = archive_venv()
        self.root.mkdir(parents=True, exist_ok=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        cp_config = self.state_dir / 'cpconfig.ini'
        cp_config.write_text(CHERRYPY_CONFIG, encoding='utf-8')
        ai_config = self.state_dir / 'config.ini'
        ai_config.write_text(ARCHIVE_CONFIG, encoding='utf-8')
        env = {key: value for key, value in os.environ.items() if key not in ('PYTHONPATH', 'PYTHONHOME')}
        env.update({
            'PAI_BACKEND_TYPE': 'posix',
            'PAI_PREFIX': str(self.root),
            'ARCHIVEINTERFACE_CONFIG': str(ai_config),
            'ARCHIVEINTERFACE_CPCONFIG': str(cp_config),
        })
        # a restart keeps the URL that the cart under test was configured with
        restart = bool(self.port)
        for attempt in range(3):
            if not restart:
                self.port = free_port()
            cmd = [
                str(bin_dir / 'gunicorn'), '--workers', str(self.workers), '--worker-class', 'sync',
                '--bind', f'127.0.0.1:{self.port}', *self.extra_args,
                'pacifica.archiveinterface.wsgi:application',
            ]
            self.process = ManagedProcess(cmd, self.log_path, env=env, cwd=self.state_dir, name='archiveinterface')
            self.process.start()
            try:
                answer = self.process.wait_http(self.url, self.start_timeout)
            except RuntimeError:
                self.process.stop()
                # another process may have taken the port between free_port() and gunicorn's bind
                if not restart and attempt < 2 and 'Address already in use' in self.process.log_tail(200):
                    continue
                raise
            except BaseException:
                self.process.stop()
                raise
            if answer.status_code != 200:
                self.process.stop()
                raise RuntimeError(
                    f'archive interface answered GET / with {answer.status_code}:\n{self.process.log_tail()}'
                )
            break
        return self

    def stop(self) -> None:
        """Stop the server (its log stays in state/); start() may be called again afterwards."""
        if self.process is not None:
            self.process.stop()

    def kill9(self) -> None:
        """SIGKILL the gunicorn master and its workers at once, as a crash would."""
        if self.process is not None:
            self.process.kill9()

    def log_tail(self, lines: int = 40) -> str:
        """Return the last lines of the server log."""
        return self.process.log_tail(lines) if self.process is not None else ''

    def __enter__(self) -> 'ArchiveServer':
        """Start the server."""
        return self.start()

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        """Stop the server and remove the temp dir if this object made it."""
        self.stop()
        if self._own_base:
            shutil.rmtree(self.base_dir, ignore_errors=True)


class NamedFiles:
    """A test's archive files that several carts ask for by name: `size` random bytes each, written into
    the archive under the id '<tag>-<name>' the first time the name is used."""

    def __init__(self, archive: ArchiveServer, tag: str, size: int) -> None:
        """Files of `size` bytes in `archive`, their ids made unique to the test by `tag`."""
        self.archive = archive
        self.tag = tag
        self.size = size
        self.data: Dict[str, bytes] = {}  # archive id -> the bytes put in the archive

    def archive_id(self, name: str) -> str:
        """The archive id of the file `name`, put in the archive the first time it is named."""
        archive_id = f'{self.tag}-{name}'
        if archive_id not in self.data:
            self.data[archive_id] = os.urandom(self.size)
            self.archive.put(archive_id, self.data[archive_id])
        return archive_id

    def name(self, archive_id: str) -> str:
        """The name the archive id of one of these files was made from."""
        return archive_id[len(self.tag) + 1:]
