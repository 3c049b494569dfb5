"""A size-limited tmpfs for a test: a real filesystem that fills up (or is remounted read-only) on cue."""
from __future__ import annotations

import contextlib
import pathlib
import subprocess
from typing import Iterator

import pytest


@contextlib.contextmanager
def mounted_tmpfs(mount_point: pathlib.Path, size: str) -> Iterator[pathlib.Path]:
    """Mount a tmpfs of `size` (mount's syntax: '1m', '4400k') at `mount_point` (made here) for the block.

    Skips the test where mounting needs a root this process is not. Unmounted lazily at the end,
    so a file still open does not keep it.
    """
    mount_point.mkdir(parents=True)
    mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(mount_point)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f'cannot mount a size-limited tmpfs here (needs root): {mounted.stderr.strip()}')
    try:
        yield mount_point
    finally:
        subprocess.run(['umount', '-l', str(mount_point)], check=False)
