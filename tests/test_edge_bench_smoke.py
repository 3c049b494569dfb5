"""benchmarks/edge.py cannot rot: its quick scale runs post and head on the real stack and prints their lines."""
from __future__ import annotations

import pathlib
import re
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_edge_small_post_and_head_print_their_figures(tmp_path: pathlib.Path) -> None:
    run = subprocess.run([sys.executable, str(REPO_ROOT / 'benchmarks' / 'edge.py'), '--scale', 'small',
                          '--workloads', 'post,head', '--tmpdir', str(tmp_path)],
                         capture_output=True, text=True, timeout=600, check=False, cwd=REPO_ROOT)
    shown = f'stdout:\n{run.stdout}\nstderr (tail):\n{run.stderr[-4000:]}'
    assert run.returncode == 0, shown
    assert re.search(r'^# pacifica-cartd .*listen backlog \d+', run.stdout, re.MULTILINE), shown
    assert re.search(r'^post +ours: [\d,]+ files .*: 201 in [\d.]+ s; server RSS', run.stdout, re.MULTILINE), shown
    for server in ('ours', 'uWSGI 1p', 'uWSGI 2p'):
        assert re.search(rf'^head +{server}: [\d,]+ HEAD/s .*non-2xx 0', run.stdout, re.MULTILINE), shown
    assert 'FAILED' not in run.stdout, shown
    assert list(tmp_path.iterdir()) == [], 'edge.py left its temp dir behind'
