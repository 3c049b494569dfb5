"""benchmarks/load.py cannot rot: its smoke mode runs on the real stack, passes, and prints figures that say so."""
from __future__ import annotations

import pathlib
import re
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_load_smoke_mode_completes_carts_without_failures(tmp_path: pathlib.Path) -> None:
    run = subprocess.run([sys.executable, str(REPO_ROOT / 'benchmarks' / 'load.py'), '--smoke', '--settle', '10',
                          '--tmpdir', str(tmp_path)],
                         capture_output=True, text=True, timeout=240, check=False, cwd=REPO_ROOT)
    shown = f'stdout:\n{run.stdout}\nstderr (tail):\n{run.stderr[-4000:]}'
    assert run.returncode == 0, shown
    failed = re.search(r'^failed +([\d,]+)', run.stdout, re.MULTILINE)
    completed = re.search(r'^carts .*?([\d,]+) completed', run.stdout, re.MULTILINE)
    assert failed is not None and completed is not None, shown
    assert int(failed.group(1).replace(',', '')) == 0, shown
    assert int(completed.group(1).replace(',', '')) > 0, shown
    assert re.search(r'^result +PASS$', run.stdout, re.MULTILINE), shown
    assert list(tmp_path.iterdir()) == [], 'load.py left its temp dir behind'
