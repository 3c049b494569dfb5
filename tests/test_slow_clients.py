"""Slow clients do not starve anyone: under pacifica-cartd and under uWSGI (the shipped uwsgi.ini), a HEAD on a
fresh connection is answered while many connections send their request a byte a second and downloads are read slowly.

pacifica-cartd gets fewer worker threads than there are slow connections (16 for 40 trickles and 8 slow
downloads): a trickle that held a thread would leave none for the HEADs. Under uWSGI (--http11-socket)
a request still arriving does hold a thread: the ini's pool is sized for the waiting clients, here
2 x 32 threads for the same 48. Not timed: every HEAD must be answered 204 ready within its (generous)
timeout; benchmarks/slowprobe.py measures the latencies.
"""
from __future__ import annotations

import os
import pathlib
import time
import uuid
from typing import Dict, Iterator, List, Tuple

import pytest

from cartd_testkit.databases import drop_database, fresh_database
from cartd_testkit.procs import ManagedProcess, free_port
from cartd_testkit.slowclients import SlowSide, head_probe
from cartd_testkit.stack import CartStack, binary

pytestmark = [pytest.mark.integration]

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
TRICKLES = 40
READERS = 8
THREADS = 16  # pacifica-cartd's, fewer than the slow connections
UWSGI_THREADS = 32  # per uWSGI process (2), more than the slow connections
READ_RATE = 64 << 10
FILE_BYTES = 4 << 20  # two of them: no reader finishes during the test
HEAD_TIMEOUT_S = 10.0


@pytest.fixture(scope='module')
def ready(archive, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tuple[CartStack, str]]:
    """A CartStack on SQLite with a ready cart of two 4 MiB files; its own server is stopped."""
    base = tmp_path_factory.mktemp('slow-clients')
    url = fresh_database('sqlite', base)
    stack = CartStack(base, archive, url, workers=1, concurrency=2)
    try:
        stack.start()
        uid = f'slow-{uuid.uuid4().hex[:8]}'
        fileids = []
        for index in range(2):
            sums = stack.archive.put(f'{uid}-{index}', os.urandom(FILE_BYTES))
            fileids.append({'id': f'{uid}-{index}', 'path': f'f{index}.bin', 'hashtype': 'sha1',
                            'hashsum': sums['sha1']})
        assert stack.post(uid, fileids).status_code == 201
        assert stack.wait_final(uid, deadline_s=120).headers['X-Pacifica-Status'] == 'ready'
        assert stack.server is not None
        stack.server.stop()
        yield stack, uid
    finally:
        stack.stop()
        drop_database('sqlite', url)


def _with_values(text: str, values: Dict[str, str], separator: str) -> str:
    """The lines of an ini file with these keys' values replaced (each key must be there)."""
    lines: List[str] = []
    found = set()
    for line in text.splitlines():
        key = line.split(separator, 1)[0].strip()
        if key in values and separator in line and not line.lstrip().startswith((';', '#')):
            lines.append(f'{key}{separator} {values[key]}' if separator == ':' else f'{key} = {values[key]}')
            found.add(key)
        else:
            lines.append(line)
    assert found == set(values), f'{set(values) - found} not in the file'
    return '\n'.join(lines) + '\n'


def start(kind: str, stack: CartStack, state: pathlib.Path) -> Tuple[ManagedProcess, int]:
    """The repository's server.conf under pacifica-cartd (THREADS threads), or its uwsgi.ini under uWSGI."""
    port = free_port()
    env = dict(stack.env)
    if kind == 'pacifica-cartd':
        conf = state / 'server.conf'
        conf.write_text(_with_values((REPO_ROOT / 'server.conf').read_text(encoding='utf-8'),
                                     {'server.thread_pool': str(THREADS)}, ':'), encoding='utf-8')
        env['CARTD_CPCONFIG'] = str(conf)
        cmd = [binary('pacifica-cartd'), '--cpconfig', str(conf), '-p', str(port), '-a', '127.0.0.1']
    else:
        ini = state / 'uwsgi.ini'
        ini.write_text(_with_values((REPO_ROOT / 'uwsgi.ini').read_text(encoding='utf-8'),
                                    {'processes': '2', 'threads': str(UWSGI_THREADS)}, '='), encoding='utf-8')
        env['CARTD_UWSGI_BIND'] = f'127.0.0.1:{port}'
        cmd = [binary('uwsgi'), '--ini', str(ini)]
    proc = ManagedProcess(cmd, state / f'{kind}.log', env=env, cwd=state, name=kind).start()
    try:
        proc.wait_http(f'http://127.0.0.1:{port}/', 60)
    except BaseException:
        proc.stop()
        raise
    return proc, port


@pytest.mark.parametrize('kind', ['pacifica-cartd', 'uwsgi'])
def test_a_head_is_answered_while_slow_clients_hold_the_server(ready: Tuple[CartStack, str], kind: str,
                                                                tmp_path: pathlib.Path) -> None:
    stack, uid = ready
    proc, port = start(kind, stack, tmp_path)
    try:
        slow = SlowSide(port, TRICKLES, READERS, READ_RATE, f'/{uid}', f'/{uid}?filename=slow.tar').start()
        try:
            deadline = time.monotonic() + 10
            while slow.connected() != (TRICKLES, READERS) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert slow.connected() == (TRICKLES, READERS)
            time.sleep(1.0)  # every trickle has sent bytes, every download has started
            heads = head_probe(port, f'/{uid}', seconds=2.0, interval=0.1, timeout=HEAD_TIMEOUT_S)
            still_open = slow.connected()
        finally:
            counts = slow.stop()
    finally:
        proc.stop()
    assert heads['failures'] == {} and heads['answered'] == heads['sent'] == 20, (heads, proc.log_tail())
    assert still_open == (TRICKLES, READERS)
    assert counts['reader'].status_200 == READERS  # the downloads were under way
    assert counts['trickle'].answered == counts['trickle'].closed_by_server == 0
    assert counts['trickle'].open_at_end == TRICKLES and counts['reader'].open_at_end == READERS
