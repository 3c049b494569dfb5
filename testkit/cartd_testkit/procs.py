"""Start, watch and stop the external processes (servers, workers) that tests run."""
from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from types import TracebackType
from typing import Mapping, Optional, Sequence, Type, Union

import requests

PathLike = Union[str, 'os.PathLike[str]']
BIN_DIR = pathlib.Path(sys.executable).parent


def binary(name: str) -> str:
    """An entry point of the installed project (beside the interpreter running the tests)."""
    return str(BIN_DIR / name)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(('127.0.0.1', 0))
        return int(sock.getsockname()[1])


def read_tail(path: PathLike, lines: int = 40) -> str:
    """Return the last `lines` lines of a text file, or '' when it does not exist."""
    try:
        text = pathlib.Path(path).read_text(encoding='utf-8', errors='replace')
    except FileNotFoundError:
        return ''
    return '\n'.join(text.splitlines()[-lines:])


class ManagedProcess:
    """One child process in its own session, with its output in a log file."""

    def __init__(
        self,
        cmd: Sequence[str],
        log_path: PathLike,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[PathLike] = None,
        name: Optional[str] = None,
    ) -> None:
        """Describe the process; nothing runs until start()."""
        self.cmd = [str(part) for part in cmd]
        self.log_path = pathlib.Path(log_path)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.name = name or pathlib.Path(self.cmd[0]).name
        self.proc: Optional[subprocess.Popen[bytes]] = None

    @property
    def pid(self) -> int:
        """Return the process id of the started process, which is also its process group id."""
        if self.proc is None:
            raise RuntimeError(f'{self.name} was not started')
        return self.proc.pid

    @property
    def returncode(self) -> Optional[int]:
        """Return the exit code, or None while the process runs or before it started."""
        return None if self.proc is None else self.proc.poll()

    def running(self) -> bool:
        """Tell whether the process was started and has not exited."""
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> 'ManagedProcess':
        """Start the process in a new session with stdout and stderr appended to the log file."""
        if self.proc is not None:
            raise RuntimeError(f'{self.name} was already started')
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, 'ab') as log:
            log.write(('$ ' + ' '.join(self.cmd) + '\n').encode())
            log.flush()
            self.proc = subprocess.Popen(  # pylint: disable=consider-using-with
                self.cmd, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        return self

    def log_tail(self, lines: int = 40) -> str:
        """Return the last lines of the process log."""
        return read_tail(self.log_path, lines)

    def _describe_failure(self, what: str) -> str:
        """Build an error message holding the exit state and log tail."""
        state = 'running' if self.running() else f'exited with {self.returncode}'
        return f'{self.name} (pid {self.proc.pid if self.proc else "-"}, {state}): {what}\n' \
               f'--- last lines of {self.log_path} ---\n{self.log_tail()}'

    def wait_http(self, url: str, deadline_s: float = 60.0) -> requests.Response:
        """Poll `url` until any HTTP answer arrives; raise RuntimeError if the process dies or time runs out."""
        if self.proc is None:
            raise RuntimeError(f'{self.name} was not started')
        deadline = time.monotonic() + deadline_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(self._describe_failure(f'died before answering {url}'))
            try:
                return requests.get(url, timeout=2)
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(self._describe_failure(f'no HTTP answer from {url} within {deadline_s} s'))
            time.sleep(0.1)

    def _signal_group(self, signum: int) -> None:
        """Send signum to the process group led by our child (ignore a group that is already gone)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signum)
        except ProcessLookupError:
            pass

    def _wait_unreaped(self, timeout: float) -> bool:
        """Wait up to `timeout` s for the leader to exit without reaping it, so its pid stays reserved."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            try:
                if os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                    return True
            except ChildProcessError:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    def _finish(self, timeout: float) -> Optional[int]:
        """Kill what is left of the group while the exited leader still holds its pid, then reap the leader."""
        assert self.proc is not None
        if self.proc.returncode is None:
            # the zombie leader keeps the group id from being reused, so this reaches only our own children
            self._signal_group(signal.SIGKILL)
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout: float = 15.0) -> Optional[int]:
        """SIGTERM the process group, SIGKILL it after `timeout` seconds; return the exit code."""
        if self.proc is None:
            return None
        if self.proc.returncode is None and not self._wait_unreaped(0):
            self._signal_group(signal.SIGTERM)
            if not self._wait_unreaped(timeout):
                self._signal_group(signal.SIGKILL)
                self._wait_unreaped(timeout)
        return self._finish(timeout)

    def kill9(self, timeout: float = 15.0) -> Optional[int]:
        """SIGKILL the whole process group at once, as a crash would; return the exit code."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self._signal_group(signal.SIGKILL)
            self._wait_unreaped(timeout)
        return self._finish(timeout)

    def __enter__(self) -> 'ManagedProcess':
        """Start the process if it is not running yet."""
        if self.proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        """Stop the process."""
        self.stop()
