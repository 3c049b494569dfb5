"""benchmarks/load.py cannot rot: its smoke mode runs on the real stack, passes, and prints figures that say so.

It runs with share_staged_files off and on: the clients' carts pick their files from one pool, so
with the cache on most files are linked from entries other carts staged, while carts are deleted.
"""
from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

from cartd_testkit.stack import CACHE_MODES, cache_id

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize('share', CACHE_MODES, ids=cache_id)
def test_load_smoke_mode_completes_carts_without_failures(tmp_path: pathlib.Path, share: bool) -> None:
    run = subprocess.run([sys.executable, str(REPO_ROOT / 'benchmarks' / 'load.py'), '--smoke', '--settle', '10',
                          '--tmpdir', str(tmp_path), '--set', f'cartd.share_staged_files={"on" if share else "off"}'],
                         capture_output=True, text=True, timeout=240, check=False, cwd=REPO_ROOT)
    shown = f'stdout:\n{run.stdout}\nstderr (tail):\n{run.stderr[-4000:]}'
    assert run.returncode == 0, shown
    failed = re.search(r'^failed +([\d,]+)', run.stdout, re.MULTILINE)
    completed = re.search(r'^carts .*?([\d,]+) completed', run.stdout, re.MULTILINE)
    assert failed is not None and completed is not None, shown
    assert int(failed.group(1).replace(',', '')) == 0, shown
    assert int(completed.group(1).replace(',', '')) > 0, shown
    hits = re.search(r'^cache +([\d,]+) files linked', run.stdout, re.MULTILINE)
    assert hits is not None, shown
    assert (int(hits.group(1).replace(',', '')) > 0) == share, shown  # carts share the pool's files
    assert re.search(r'^result +PASS$', run.stdout, re.MULTILINE), shown
    assert list(tmp_path.iterdir()) == [], 'load.py left its temp dir behind'
