"""The deployment files the project ships (deploy/): systemd units, logrotate, and nginx in front of a real cart."""
from __future__ import annotations

import getpass
import hashlib
import pathlib
import shutil
import subprocess
import time
import uuid
from typing import Dict, Iterator, Tuple

import pytest
import requests

from cartd_testkit.procs import BIN_DIR, ManagedProcess, free_port
from cartd_testkit.archive import ArchiveServer
from cartd_testkit.databases import fresh_database
from cartd_testkit.stack import CartStack, running, tar_contents
from cartd_testkit.uwsgi import BIND_VARIABLE, SHIPPED_INI

pytestmark = [pytest.mark.integration]

REPO = pathlib.Path(__file__).resolve().parent.parent
DEPLOY = REPO / 'deploy'
UNIT_BIN = '/opt/pacifica-cartd/bin'  # where the shipped units expect the installed project


def _tool(name: str) -> str:
    found = shutil.which(name) or (f'/usr/sbin/{name}' if pathlib.Path(f'/usr/sbin/{name}').exists() else None)
    if found is None:
        pytest.skip(f'{name} is not installed')
    return found


def test_the_systemd_units_verify(tmp_path: pathlib.Path) -> None:
    """systemd-analyze finds no unknown key, bad value or missing program (with the paths of this install)."""
    analyze = _tool('systemd-analyze')
    units = []
    for unit in sorted((DEPLOY / 'systemd').glob('*.service')):
        text = unit.read_text(encoding='utf-8')
        assert UNIT_BIN in text, unit.name
        name = unit.name.replace('@.service', '@1.service')
        (tmp_path / name).write_text(text.replace(UNIT_BIN, str(BIN_DIR)), encoding='utf-8')
        units.append(str(tmp_path / name))
    assert len(units) == 2
    result = subprocess.run([analyze, 'verify', '--man=no', *units], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0 and result.stderr.strip() == '', result.stderr


def test_the_server_unit_runs_the_shipped_ini_and_sets_the_address_it_reads() -> None:
    """The unit's bind variable is the one uwsgi.ini reads (a unit that set another would listen on 8081 only)."""
    unit = (DEPLOY / 'systemd' / 'pacifica-cartd.service').read_text(encoding='utf-8')
    assert f'Environment={BIND_VARIABLE}=' in unit
    assert f'if-env = {BIND_VARIABLE}' in SHIPPED_INI.read_text(encoding='utf-8')
    assert 'uwsgi --ini ' in unit
    assert BIND_VARIABLE in (DEPLOY / 'nginx' / 'pacifica-cartd.conf').read_text(encoding='utf-8')


def test_the_logrotate_file_parses() -> None:
    result = subprocess.run([_tool('logrotate'), '-d', str(DEPLOY / 'logrotate' / 'pacifica-cartd')],
                            capture_output=True, text=True, timeout=60, check=False)
    output = result.stdout + result.stderr
    # logrotate echoes the file's path, which may hold the word itself (a checkout in .../wt-errors/)
    said = output.replace(str(DEPLOY / 'logrotate' / 'pacifica-cartd'), '<the file>')
    assert result.returncode == 0 and 'error' not in said.lower(), output
    assert 'copytruncate' in (DEPLOY / 'logrotate' / 'pacifica-cartd').read_text(encoding='utf-8')


ACCEL_PREFIX = '/_cart_volume/'


@pytest.fixture(scope='module')
def accel_stack(archive: ArchiveServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CartStack]:
    """A cart on SQLite configured for nginx in front: x_accel_redirect set to the shipped site's location."""
    base = tmp_path_factory.mktemp('accel-stack')
    url = fresh_database('sqlite', base)
    with running(CartStack(base, archive, url, workers=1, overrides={'cartd': {'x_accel_redirect': ACCEL_PREFIX}}),
                 'sqlite', url) as cart:
        yield cart


@pytest.fixture
def nginx_in_front(accel_stack: CartStack, tmp_path: pathlib.Path) -> Iterator[Tuple[str, str]]:
    """The shipped nginx site in front of the stack, TLS with a throw-away certificate, on a free port."""
    nginx = _tool('nginx')
    key, cert = tmp_path / 'key.pem', tmp_path / 'cert.pem'
    subprocess.run(['openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', str(key), '-out',
                    str(cert), '-days', '1', '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1'],
                   capture_output=True, timeout=60, check=True)
    port = free_port()
    site = (DEPLOY / 'nginx' / 'pacifica-cartd.conf').read_text(encoding='utf-8')
    assert f'location {ACCEL_PREFIX} ' in site  # the prefix the cart's x_accel_redirect names
    for shipped, here in (('127.0.0.1:8081', f'127.0.0.1:{accel_stack.port}'),
                          ('listen 443 ssl', f'listen 127.0.0.1:{port} ssl'),
                          ('/etc/ssl/certs/cart.example.org.pem', str(cert)),
                          ('/etc/ssl/private/cart.example.org.key', str(key)),
                          ('/srv/pacifica-cartd/volume/', f'{accel_stack.volume}/')):
        assert shipped in site
        site = site.replace(shipped, here)
    (tmp_path / 'site.conf').write_text(site, encoding='utf-8')
    (tmp_path / 'nginx.conf').write_text(
        # the workers read the test's volume, which only its owner may enter
        f'daemon off;\nuser {getpass.getuser()};\npid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n'
        f'http {{\n  access_log off;\n  client_body_temp_path {tmp_path}/body;\n  proxy_temp_path {tmp_path}/proxy;\n'
        f'  include {tmp_path}/site.conf;\n}}\n', encoding='utf-8')
    checked = subprocess.run([nginx, '-t', '-c', str(tmp_path / 'nginx.conf'), '-p', str(tmp_path)],
                             capture_output=True, text=True, timeout=60, check=False)
    assert checked.returncode == 0, checked.stderr
    process = ManagedProcess([nginx, '-c', str(tmp_path / 'nginx.conf'), '-p', str(tmp_path)],
                             tmp_path / 'nginx.log', name='nginx').start()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(f'https://127.0.0.1:{port}/', verify=str(cert), timeout=5)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline and process.running(), process.log_tail()
                time.sleep(0.1)
        yield f'https://127.0.0.1:{port}', str(cert)
    finally:
        process.stop()


@pytest.mark.parametrize('bundle', [False, True])
def test_a_cart_through_nginx_in_front(accel_stack: CartStack, nginx_in_front: Tuple[str, str], bundle: bool) -> None:
    """A plain cart is proxied; a bundle cart under its own name is sent by nginx from the volume (X-Accel-Redirect)."""
    url, cert = nginx_in_front
    uid = f'nginx-{uuid.uuid4().hex[:10]}'
    data = b'through the proxy\n' * 5000
    sums = accel_stack.archive.put(f'{uid}-f', data)
    expected: Dict[str, bytes] = {f'{uid}/f.dat': data}
    with requests.Session() as session:
        session.verify = cert  # the throw-away certificate (given on each call too: REQUESTS_CA_BUNDLE wins otherwise)
        created = session.post(f'{url}/{uid}', timeout=30, verify=cert,
                               json={'fileids': [{'id': f'{uid}-f', 'path': 'f.dat', 'hashtype': 'sha1',
                                                  'hashsum': sums['sha1']}], 'bundle': bundle})
        assert created.status_code == 201, created.text
        deadline = time.monotonic() + 60
        while (head := session.head(f'{url}/{uid}', timeout=30, verify=cert)).headers['X-Pacifica-Status'] == 'staging':
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert head.status_code == 204 and head.headers['X-Pacifica-Status'] == 'ready'
        body = session.get(f'{url}/{uid}', params={'filename': f'{uid}.tar'}, timeout=60, verify=cert)
        assert body.status_code == 200 and int(body.headers['Content-Length']) == len(body.content)
        assert tar_contents(body.content) == expected
        direct = requests.get(f'{accel_stack.url}/{uid}', params={'filename': f'{uid}.tar'}, timeout=60)
        if bundle:  # the server itself only pointed nginx at the tar file
            assert direct.content == b'' and direct.headers['X-Accel-Redirect'].startswith(ACCEL_PREFIX)
            tar = accel_stack.volume / direct.headers['X-Accel-Redirect'][len(ACCEL_PREFIX):]
            assert tar.read_bytes() == body.content and 'X-Accel-Redirect' not in body.headers
        else:
            assert direct.content == body.content and 'X-Accel-Redirect' not in direct.headers
        part = session.get(f'{url}/{uid}', params={'filename': f'{uid}.tar'},
                           headers={'Range': 'bytes=100-199'}, timeout=60, verify=cert)
        assert part.status_code == 206 and part.content == body.content[100:200]
        too_big = session.post(f'{url}/{uid}2', data=b' ' * (101 << 20), timeout=60, verify=cert,
                               headers={'Content-Type': 'application/json'})
        assert too_big.status_code == 413  # nginx's own answer at client_max_body_size
        assert hashlib.sha1(data).hexdigest() == sums['sha1']
