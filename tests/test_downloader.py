"""The published client, pacifica-downloader 0.4.1, against the running cart (all three databases)."""
from __future__ import annotations

import hashlib
import os
import pathlib
import subprocess
import sys
import time
import uuid
from typing import Dict, List, Tuple

import pytest

from pacifica.downloader import Downloader
from pacifica.downloader.cartapi import CartAPI

from cartd_testkit.stack import CartStack

pytestmark = [pytest.mark.integration]

# the client polls once a second and counts iterations, not seconds
WAIT_ITERATIONS = 60


def _files(stack: CartStack, subdirs: List[str], size: int = 2000) -> Tuple[List[dict], Dict[str, bytes]]:
    """Put one file per subdir into the archive; return the downloader's file records and path -> bytes.

    The records are what the downloader's yield_files produce: path '<subdir>/<name>', which
    starts with '/' when subdir is empty.
    """
    tag = uuid.uuid4().hex[:10]
    records, expected = [], {}
    for index, subdir in enumerate(subdirs):
        archive_id = f'dl-{tag}-{index}'
        data = os.urandom(size + 997 * index)
        sums = stack.archive.put(archive_id, data, mtime=1600000000 + index)
        name = f'file{index}.dat'
        records.append({'_id': archive_id, 'subdir': subdir, 'name': name, 'hashtype': 'sha256',
                        'hashsum': sums['sha256']})
        expected[f'{subdir}/{name}'.lstrip('/')] = data
    return records, expected


def _extracted(location: pathlib.Path) -> Dict[str, bytes]:
    """Relative path -> bytes of every regular file under location."""
    return {path.relative_to(location).as_posix(): path.read_bytes()
            for path in sorted(location.rglob('*')) if path.is_file()}


def test_downloader_and_cartd_import_together(tmp_path: pathlib.Path) -> None:
    """One interpreter of the venv (outside the repo, so the installed copies) imports both namespaces."""
    code = ('import pacifica.cartd.rest, pacifica.downloader.cartapi\n'
            'print(pacifica.cartd.__file__); print(pacifica.downloader.__file__)\n')
    script = tmp_path / 'both.py'
    script.write_text(code, encoding='utf-8')
    env = {key: value for key, value in os.environ.items() if key != 'PYTHONPATH'}
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    cartd_file, downloader_file = result.stdout.split()
    assert 'site-packages' in cartd_file and 'site-packages' in downloader_file
    assert pathlib.Path(cartd_file).parent.parent == pathlib.Path(downloader_file).parent.parent
    # and in this process too (the conftest made the installed copy the one imported)
    import pacifica.cartd  # pylint: disable=import-outside-toplevel
    assert 'site-packages' in pacifica.cartd.__file__


def test_cartapi_setup_wait_and_download(stack: CartStack, tmp_path: pathlib.Path) -> None:
    records, expected = _files(stack, ['', '', 'run1', 'run1/deeper/still'])

    def yield_files():
        for record in records:
            yield {'id': record['_id'], 'path': f"{record['subdir']}/{record['name']}",
                   'hashtype': record['hashtype'], 'hashsum': record['hashsum']}

    assert any(item['path'].startswith('/') for item in yield_files())
    api = CartAPI(cart_api_url=stack.url)
    assert api.cart_api_url == stack.url
    cart_url = api.setup_cart(yield_files)
    assert cart_url.startswith(stack.url + '/')
    started = time.monotonic()
    assert api.wait_for_cart(cart_url, timeout=WAIT_ITERATIONS) == cart_url
    assert time.monotonic() - started < WAIT_ITERATIONS
    assert stack.head(cart_url.rsplit('/', 1)[1]).headers['X-Pacifica-Status'] == 'ready'
    # the downloader's own GET + streamed tar extraction, with its default name 'data' (no .tar)
    downloader = Downloader(cart_api_url=stack.url)
    downloader._download_from_url(str(tmp_path), cart_url, 'data')  # pylint: disable=protected-access
    assert _extracted(tmp_path) == {f'data/{path}': data for path, data in expected.items()}


def test_cloudevent_end_to_end(stack: CartStack, tmp_path: pathlib.Path) -> None:
    records, expected = _files(stack, ['', 'a/b', 'a', 'é/ü'], size=150000)
    event = {'data': [dict(record, destinationTable='Files') for record in records] +
             [{'destinationTable': 'Transactions', '_id': 1}]}
    Downloader(cart_api_url=stack.url).cloudevent(str(tmp_path), event, timeout=WAIT_ITERATIONS,
                                                  filename='event.tar')
    extracted = _extracted(tmp_path)
    assert extracted == {f'event/{path}': data for path, data in expected.items()}
    for path, data in expected.items():
        assert hashlib.sha256(extracted[f'event/{path}']).hexdigest() == hashlib.sha256(data).hexdigest()
    # mtimes come from the archive through the tar
    assert os.path.getmtime(tmp_path / 'event' / 'file0.dat') == 1600000000


def test_transactioninfo_end_to_end(stack: CartStack, tmp_path: pathlib.Path) -> None:
    records, expected = _files(stack, ['', 'x/y'])
    transinfo = {'files': {record['_id']: {key: record[key] for key in ('subdir', 'name', 'hashtype', 'hashsum')}
                           for record in records}}
    Downloader(cart_api_url=stack.url).transactioninfo(str(tmp_path), transinfo, timeout=WAIT_ITERATIONS)
    assert _extracted(tmp_path) == {f'data/{path}': data for path, data in expected.items()}


def test_config_through_environment_and_empty_cart(stack: CartStack, monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: pathlib.Path) -> None:
    """The client's CARTD_* variables reach the cart; a cart of zero files is ready and extracts to nothing."""
    monkeypatch.setenv('CARTD_ADDR', '127.0.0.1')
    monkeypatch.setenv('CARTD_PORT', str(stack.port))
    monkeypatch.delenv('CARTD_CART_API_URL', raising=False)
    api = CartAPI()
    assert api.cart_api_url == stack.url
    cart_url = api.wait_for_cart(api.setup_cart(lambda: iter(())), timeout=5)
    Downloader()._download_from_url(str(tmp_path), cart_url, 'empty')  # pylint: disable=protected-access
    assert _extracted(tmp_path) == {}


def test_failed_cart_is_reported_to_the_client(stack: CartStack) -> None:
    """A cart that fails ends the client's wait at once (HEAD 500 with both headers), as an assertion."""
    records, _ = _files(stack, ['', 'bad'])
    records[1]['hashsum'] = hashlib.sha256(b'other bytes').hexdigest()

    def yield_files():
        for record in records:
            yield {'id': record['_id'], 'path': f"{record['subdir']}/{record['name']}",
                   'hashtype': record['hashtype'], 'hashsum': record['hashsum']}

    api = CartAPI(cart_api_url=stack.url)
    cart_url = api.setup_cart(yield_files)
    started = time.monotonic()
    with pytest.raises(AssertionError):  # the client asserts status == 'ready'; a KeyError would mean a missing header
        api.wait_for_cart(cart_url, timeout=WAIT_ITERATIONS)
    assert time.monotonic() - started < WAIT_ITERATIONS / 2
    answer = stack.head(cart_url.rsplit('/', 1)[1])
    assert answer.status_code == 500 and answer.headers['X-Pacifica-Status'] == 'error'
    assert 'bad/file1.dat' in answer.headers['X-Pacifica-Message']
