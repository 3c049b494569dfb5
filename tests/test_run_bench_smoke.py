"""benchmarks/run.py cannot rot: its quick scale runs the stageonce workload on the real stack and prints its lines."""
from __future__ import annotations

import pathlib
import re
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
FIGURES = r'[\d.]+ s ready / [\d.]+ s download \(archive (?P<requests>[^)]*)\)'


def test_run_small_stageonce_prints_every_cart_and_the_cached_ones_fetch_nothing(tmp_path: pathlib.Path) -> None:
    run = subprocess.run([sys.executable, str(REPO_ROOT / 'benchmarks' / 'run.py'), '--scale', 'small',
                          '--workloads', 'stageonce', '--no-limits', '--tmpdir', str(tmp_path)],
                         capture_output=True, text=True, timeout=600, check=False, cwd=REPO_ROOT)
    shown = f'stdout:\n{run.stdout}\nstderr (tail):\n{run.stderr[-4000:]}'
    assert run.returncode == 0, shown
    assert re.search(r'^# pacifica-cartd .*stageonce on a second stack of ours, the same plus '
                     r'cartd\.share_staged_files=on', run.stdout, re.MULTILINE), shown
    lines = {}
    for title in ('16 x 1 MiB, first cart', '16 x 1 MiB, the same files again', '16 x 1 MiB, 8 of them again + 8 new',
                  '2,000 x 1 KiB, first cart (fills the cache)', '2,000 x 1 KiB, the same files again'):
        found = re.search(rf'^stageonce +{re.escape(title)}: ours {FIGURES}', run.stdout, re.MULTILINE)
        assert found, f'no line for {title!r}\n{shown}'
        lines[title] = found.group('requests')
    assert lines['16 x 1 MiB, first cart'].startswith('16 GET'), shown
    assert lines['16 x 1 MiB, 8 of them again + 8 new'].startswith('8 GET'), shown
    for cached in ('16 x 1 MiB, the same files again', '2,000 x 1 KiB, the same files again'):
        assert 'GET' not in lines[cached], f'a cached cart fetched files from the archive\n{shown}'
    assert 'vs its first cart' in run.stdout and 'FAILED' not in run.stdout, shown
    assert list(tmp_path.iterdir()) == [], 'run.py left its temp dir behind'
