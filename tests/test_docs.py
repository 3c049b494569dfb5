"""docs/ cannot drift: every shell example runs against a real cart, every snippet parses, every copy matches.

Fenced blocks in docs/*.md, by their info string (the words after the opening fence):

* ```sh whose first line is `# doc-test: <name> [service]`: run with `bash -euo pipefail` in a
  working directory of their page (blocks of one page run in order and share it), with the
  stack's config in CARTD_CONFIG, CART_URL, and two archive files FILE1_ID/FILE1_SHA1 and
  FILE2_ID/FILE2_MD5. EXPECT below says what each must do. `service` blocks are one long-running
  command: it is started, must become ready, and must stop with status 0 on SIGTERM. The port
  8081 in service blocks (and in the copy of server.conf they use) is replaced by a free port.
* ```text output=<name>: the exact output of the doc-test <name> (lines right-stripped, runs of
  spaces collapsed, the CherryPy version left out).
* ```text help=<command>: the exact `<command> --help` at 80 columns.
* ```ini: a service config snippet: every key known, loaded by the real loader.
  ```ini cherrypy: a CherryPy config, parsed as CherryPy parses it.
  With file=<name>: a copy of the repository's file, byte for byte.
* ```json: parses; `json request` is a body the server accepts, `json error` an error page.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import time
import uuid
from typing import Callable, Dict, List, Optional, Tuple

import pytest
import requests

from cartd_testkit.procs import ManagedProcess, free_port
from cartd_testkit.stack import BIN_DIR, CartStack, binary

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = REPO_ROOT / 'docs'
PAGES = sorted(DOCS.glob('*.md'))
LANGUAGES = {'sh', 'ini', 'json', 'text'}
MARKER = re.compile(r'^# doc-test: (?P<name>[a-z0-9-]+)(?P<flags>(?: [a-z]+)*)$')
FENCE = re.compile(r'^(?P<indent>[ ]*)(?P<fence>```+)(?P<info>.*)$')
DOC_PORT = '8081'

FILE1 = b'hello cart\n'
FILE2 = b'second file\n'
RESTORED = b'this file was missing from the archive for a while\n'


# ---- reading the docs --------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced block of a page."""

    page: str
    line: int
    lang: str
    attrs: Dict[str, str]
    flags: Tuple[str, ...]
    text: str

    @property
    def where(self) -> str:
        """page:line, for messages."""
        return f'docs/{self.page}:{self.line}'

    @property
    def marker(self) -> Optional[re.Match]:
        """The doc-test marker on the first line, if any."""
        first = self.text.split('\n', 1)[0]
        return MARKER.match(first) if self.lang == 'sh' else None

    @property
    def name(self) -> str:
        """The doc-test name."""
        assert self.marker is not None, self.where
        return self.marker['name']

    @property
    def is_service(self) -> bool:
        """Whether the doc-test starts a long-running service."""
        return self.marker is not None and 'service' in self.marker['flags'].split()


def read_blocks(path: pathlib.Path) -> List[Block]:
    """Every fenced block of a Markdown page, with its info string split into language, key=value and flags."""
    blocks: List[Block] = []
    lines = path.read_text(encoding='utf-8').split('\n')
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        indent, fence = len(opening['indent']), opening['fence']
        words = opening['info'].split()
        body: List[str] = []
        index += 1
        while index < len(lines) and lines[index].strip() != fence:
            body.append(lines[index][indent:] if lines[index][:indent].strip() == '' else lines[index])
            index += 1
        assert index < len(lines), f'docs/{path.name}:{len(lines)}: unclosed fence'
        attrs = dict(word.split('=', 1) for word in words[1:] if '=' in word)
        flags = tuple(word for word in words[1:] if '=' not in word)
        blocks.append(Block(path.name, index - len(body), words[0] if words else '', attrs, flags,
                            '\n'.join(body) + '\n'))
        index += 1
    return blocks


ALL_BLOCKS = [block for page in PAGES for block in read_blocks(page)]
DOC_TESTS = [block for block in ALL_BLOCKS if block.marker]


def normalise(text: str) -> str:
    """Compare outputs without trailing blanks, CR, padding runs of spaces or the CherryPy version."""
    text = re.sub(r'"version": "[^"]*"', '"version": "*"', text.replace('\r', ''))
    lines = [re.sub(r' {2,}', ' ', line.rstrip()) for line in text.split('\n')]
    return '\n'.join(lines).strip('\n')


def slug(title: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r'[^a-z0-9 _-]', '', title.strip().lower()).replace(' ', '-')


# ---- what each example must do ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Expect:
    """How a doc-test must end: its exit status, text in its output, and any further check."""

    status: int = 0
    contains: Tuple[str, ...] = ()
    pattern: Optional[str] = None
    check: Optional[Callable[[pathlib.Path, str], None]] = None
    timeout: float = 180
    in_repo_copy: bool = False
    ready_http: bool = False
    ready_log: Optional[str] = None


DUMP_CART_KEYS = ['id', 'uid', 'status', 'bundle', 'error', 'files_total', 'files_staged', 'created', 'updated',
                  'files']
DUMP_FILE_KEYS = ['id', 'archive_id', 'path', 'hashtype', 'hashsum', 'status', 'error', 'size', 'staged_file']


def _check_dump(workdir: pathlib.Path, output: str) -> None:
    carts = json.loads((workdir / 'carts.json').read_text(encoding='utf-8'))
    assert int(output.strip()) == len(carts) >= 1
    assert all(list(cart) == DUMP_CART_KEYS for cart in carts), carts[0]
    files = [file for cart in carts for file in cart['files']]
    assert files and all(list(file) == DUMP_FILE_KEYS for file in files), files[0]
    assert 'failedcart' in {cart['uid'] for cart in carts}


def _check_install(workdir: pathlib.Path, output: str) -> None:
    venv_python = workdir / 'venv' / 'bin' / 'python'
    shown = subprocess.run([str(venv_python), '-m', 'pip', 'show', 'pacifica-cartd'], capture_output=True,
                           text=True, timeout=60, check=False)
    assert shown.returncode == 0 and 'Name: pacifica-cartd' in shown.stdout, shown.stdout + shown.stderr
    assert 'venv/bin/pacifica-cartd-cmd' in output


SCHEMA_OK = (r'database schema is \d+\.\d+ \(sqlite /[^)]+\)\n'
             r'database schema (\d+\.\d+), this version needs \1: ok \(sqlite /[^)]+\)')

EXPECT: Dict[str, Expect] = {
    # installation.md
    'install': Expect(check=_check_install, in_repo_copy=True, timeout=900),
    'first-start': Expect(pattern=SCHEMA_OK),
    # configuration.md
    'precedence': Expect(),
    # usage.md
    'create': Expect(),
    'poll': Expect(),
    'status': Expect(),
    'lifetime': Expect(),
    'skip': Expect(),
    'download': Expect(),
    'resume': Expect(),
    'range': Expect(),
    'delete': Expect(),
    'errors': Expect(),
    'failed-cart': Expect(),
    # deployment.md
    'ready': Expect(),
    # monitoring.md
    'metrics': Expect(),
    # admin.md
    'exit-codes': Expect(),
    'no-database': Expect(),
    'status-cmd': Expect(),
    'dbsync': Expect(pattern=SCHEMA_OK),
    'fixit': Expect(),
    'dump': Expect(check=_check_dump),
    'purge': Expect(pattern=r'^0 carts not used since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d deleted$'),
    # deployment.md
    # a SIGTERM while CherryPy's bus is still STARTING ends it with status 70: wait for STARTED
    'cherrypy-server': Expect(ready_http=True, ready_log='ENGINE Bus STARTED'),
    'uwsgi-server': Expect(ready_http=True),
    'worker': Expect(ready_log=' ready.'),
}


# ---- checks that need no running cart ---------------------------------------------------------

def test_docs_exist() -> None:
    names = {page.name for page in PAGES}
    assert {'index.md', 'installation.md', 'configuration.md', 'usage.md', 'admin.md', 'deployment.md',
            'api.md'} <= names
    assert (DOCS / 'openapi.yaml').is_file()


def test_every_block_is_checked() -> None:
    for block in ALL_BLOCKS:
        assert block.lang in LANGUAGES, f'{block.where}: fence language {block.lang!r} is not one the tests check'
        if block.lang == 'sh':
            assert block.marker, f'{block.where}: a shell example without "# doc-test: <name>"'
    names = [block.name for block in DOC_TESTS]
    assert len(names) == len(set(names)), f'doc-test names repeat: {names}'
    assert set(names) == set(EXPECT), f'doc-tests without EXPECT: {set(names) - set(EXPECT)}; ' \
                                      f'EXPECT without doc-test: {set(EXPECT) - set(names)}'
    for block in DOC_TESTS:
        assert block.is_service == (EXPECT[block.name].ready_http or EXPECT[block.name].ready_log is not None), \
            block.where


def test_output_blocks_follow_their_example() -> None:
    for page in PAGES:
        seen: List[str] = []
        for block in read_blocks(page):
            if block.marker:
                seen.append(block.name)
            if 'output' in block.attrs:
                assert block.lang == 'text', block.where
                assert seen and block.attrs['output'] == seen[-1], \
                    f'{block.where}: output of {block.attrs["output"]!r} must follow that example'


def _service_options() -> Dict[Tuple[str, str], object]:
    from pacifica.cartd.config import OPTIONS
    return {(option.section, option.key): option for option in OPTIONS}


def test_ini_snippets_parse_with_the_real_loader(tmp_path: pathlib.Path) -> None:
    import configparser

    from cherrypy.lib import reprconf

    from pacifica.cartd.config import load_settings
    known = _service_options()
    snippets = [block for block in ALL_BLOCKS if block.lang == 'ini']
    assert len(snippets) >= 3
    for number, block in enumerate(snippets):
        path = tmp_path / f'snippet{number}.ini'
        path.write_text(block.text, encoding='utf-8')
        if 'cherrypy' in block.flags:
            parsed = reprconf.Parser()
            parsed.read(str(path))
            sections = parsed.as_dict()
            assert sections and all(name == 'global' or name.startswith('/') for name in sections), block.where
            continue
        parser = configparser.ConfigParser(interpolation=None)
        parser.read_string(block.text)
        keys = [(section, key) for section in parser.sections() for key in parser[section]]
        assert keys, f'{block.where}: an empty snippet'
        unknown = [key for key in keys if key not in known]
        assert not unknown, f'{block.where}: unknown keys {unknown}'
        settings = load_settings(str(path), environ={})
        assert settings.config_file == str(path)


def test_copies_of_the_example_files_are_exact() -> None:
    copies = {block.attrs['file']: block for block in ALL_BLOCKS if 'file' in block.attrs}
    assert set(copies) == {'config.cfg', 'server.conf'}
    for name, block in copies.items():
        real = (REPO_ROOT / name).read_text(encoding='utf-8')
        assert block.text == real if real.endswith('\n') else block.text == real + '\n', \
            f'{block.where} is not a copy of {name}'
    assert 'cherrypy' in copies['server.conf'].flags and 'cherrypy' not in copies['config.cfg'].flags


def test_config_cfg_sets_only_defaults(tmp_path: pathlib.Path) -> None:
    """configuration.md says every key config.cfg sets is at its default."""
    from pacifica.cartd.config import load_settings
    shipped = dataclasses.replace(load_settings(str(REPO_ROOT / 'config.cfg'), environ={}), config_file=None)
    assert shipped == load_settings(str(tmp_path / 'missing.ini'), environ={})


def test_configuration_table_lists_every_key() -> None:
    from pacifica.cartd.config import OPTIONS
    rows = re.findall(r'^\| (\w+) \| (\w+) \| (\w+) \| `([^`]*)` \| [^|]+ \|$',
                      (DOCS / 'configuration.md').read_text(encoding='utf-8'), flags=re.M)
    assert rows == [(option.section, option.key, option.env, option.default) for option in OPTIONS]


def test_help_texts_are_the_real_ones() -> None:
    shown = [block for block in ALL_BLOCKS if 'help' in block.attrs]
    assert {block.attrs['help'] for block in shown} == {'pacifica-cartd', 'pacifica-cartd-cmd'}
    for block in shown:
        env = dict(os.environ, COLUMNS='80')
        real = subprocess.run([binary(block.attrs['help']), '--help'], capture_output=True, text=True, env=env,
                              timeout=60, check=False)
        assert real.returncode == 0, real.stderr
        assert block.text == real.stdout, f'{block.where} is not the output of {block.attrs["help"]} --help'


def test_json_blocks() -> None:
    from pacifica.cartd.cartrequest import parse_cart_request
    blocks = [block for block in ALL_BLOCKS if block.lang == 'json']
    assert {'request', 'error'} <= {flag for block in blocks for flag in block.flags}
    for block in blocks:
        document = json.loads(block.text)
        if 'request' in block.flags:
            assert parse_cart_request(document).files, block.where
        if 'error' in block.flags:
            assert list(document) == ['status', 'message', 'traceback', 'version'], block.where
            assert document['traceback'] == ''


def test_links_between_pages_resolve() -> None:
    anchors: Dict[str, set] = {}
    for page in PAGES:
        text = re.sub(r'^```.*?^```', '', page.read_text(encoding='utf-8'), flags=re.S | re.M)
        anchors[page.name] = {slug(title) for title in re.findall(r'^#+ (.+)$', text, flags=re.M)}
    for page in PAGES:
        for target, anchor in re.findall(r'\]\(([^)#:]*)(?:#([^)]*))?\)', page.read_text(encoding='utf-8')):
            name = target or page.name
            assert (DOCS / name).exists(), f'docs/{page.name} links to missing {name}'
            if anchor:
                assert anchor in anchors.get(name, set()), f'docs/{page.name} links to missing #{anchor} in {name}'


# ---- the examples, against a running cart ----------------------------------------------------

@pytest.fixture(scope='module')
def doc_env(sqlite_stack: CartStack) -> Dict[str, str]:
    """The variables the examples use: the stack's config and URL, and two files in the archive."""
    archive = sqlite_stack.archive
    archive.put('1234', FILE1)
    archive.put('1235', FILE2)
    env = dict(sqlite_stack.env)
    env.update({
        'CART_URL': sqlite_stack.url,
        'FILE1_ID': '1234', 'FILE1_SHA1': hashlib.sha1(FILE1).hexdigest(),
        'FILE2_ID': '1235', 'FILE2_MD5': hashlib.md5(FILE2).hexdigest(),
        'PATH': f'{BIN_DIR}{os.pathsep}{os.environ.get("PATH", "")}',
        'COLUMNS': '80',
    })
    return env


def _setup_admin(stack: CartStack) -> None:
    """admin.md's fixit example needs `failedcart`: failed for a missing file that is back now."""
    archive_id = f'restored-{uuid.uuid4().hex[:8]}'
    entry = {'id': archive_id, 'path': 'restored.dat', 'hashtype': 'sha256',
             'hashsum': hashlib.sha256(RESTORED).hexdigest()}
    assert stack.post('failedcart', [entry]).status_code == 201
    assert stack.wait_final('failedcart').headers['X-Pacifica-Status'] == 'error', stack.logs()
    stack.archive.put(archive_id, RESTORED)


SETUP: Dict[str, Callable[[CartStack], None]] = {'admin.md': _setup_admin}


def _repo_copy(destination: pathlib.Path) -> pathlib.Path:
    """The source tree without build products, to install from without touching the checkout."""
    ignore = shutil.ignore_patterns('.git', '.venv', 'venv', 'build', 'dist', '*.egg-info', '__pycache__', '.cache',
                                    '.hypothesis', '.mypy_cache', '.ruff_cache', '.pytest_cache', 'db.sqlite3*')
    shutil.copytree(REPO_ROOT, destination, ignore=ignore)
    return destination


def _command(block: Block) -> str:
    return '\n'.join(line for line in block.text.split('\n') if not line.startswith('#')).strip()


def _run_example(block: Block, workdir: pathlib.Path, env: Dict[str, str]) -> str:
    expect = EXPECT[block.name]
    cwd = _repo_copy(workdir / 'source') if expect.in_repo_copy else workdir
    try:
        result = subprocess.run(['bash', '-euo', 'pipefail', '-c', block.text], cwd=cwd, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=expect.timeout,
                                check=False)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f'{block.where}: {block.name} still running after {expect.timeout} s\n'
                             f'{exc.output!r}') from exc
    output = result.stdout.decode('utf-8', errors='replace')
    assert result.returncode == expect.status, f'{block.where}: {block.name} exited {result.returncode}:\n{output}'
    for text in expect.contains:
        assert text in output, f'{block.where}: {block.name}: {text!r} not in\n{output}'
    if expect.pattern is not None:
        assert re.search(expect.pattern, output, flags=re.M), \
            f'{block.where}: {block.name}: no match for {expect.pattern!r} in\n{output}'
    if expect.check is not None:
        expect.check(cwd, output)
    return output


def _run_service(block: Block, workdir: pathlib.Path, env: Dict[str, str]) -> None:
    """Start the service, wait until it is ready, then SIGTERM it: it must stop by itself with status 0."""
    expect = EXPECT[block.name]
    command = _command(block)
    assert '\n' not in command.replace('\\\n', ''), f'{block.where}: a service example is one command'
    port = str(free_port())
    conf = (REPO_ROOT / 'server.conf').read_text(encoding='utf-8').replace(DOC_PORT, port)
    (workdir / 'server.conf').write_text(conf, encoding='utf-8')
    (workdir / 'uwsgi.ini').write_text((REPO_ROOT / 'uwsgi.ini').read_text(encoding='utf-8'), encoding='utf-8')
    proc = ManagedProcess(['bash', '-euo', 'pipefail', '-c', 'exec ' + command.replace(DOC_PORT, port)],
                          workdir / f'{block.name}.log', env=env, cwd=workdir, name=block.name).start()
    try:
        deadline = time.monotonic() + 90
        if expect.ready_http:
            up = proc.wait_http(f'http://127.0.0.1:{port}/', 90)
            assert up.status_code == 200 and up.json() == {'message': 'Pacifica Cartd Interface Up and Running'}
            # it serves the configured database: an unknown cart is a 404 with both headers
            answer = requests.head(f'http://127.0.0.1:{port}/no-such-cart-{uuid.uuid4().hex[:6]}', timeout=30)
            assert answer.status_code == 404 and answer.headers['X-Pacifica-Status'] == 'error'
        if expect.ready_log is not None:
            while expect.ready_log not in proc.log_path.read_text(encoding='utf-8', errors='replace'):
                assert proc.running(), f'{block.where}: {block.name} died:\n{proc.log_tail()}'
                assert time.monotonic() < deadline, f'{block.where}: {block.name} not ready:\n{proc.log_tail()}'
                time.sleep(0.2)
        assert proc.proc is not None
        code = None
        for _ in range(10):  # a uWSGI master ignores SIGTERM until its loop runs: say it again
            os.kill(proc.pid, signal.SIGTERM)
            try:
                code = proc.proc.wait(timeout=5)
                break
            except subprocess.TimeoutExpired:
                continue
        assert code == 0, f'{block.where}: {block.name} ended with {code} after SIGTERM:\n{proc.log_tail()}'
    finally:
        proc.stop()


PAGES_WITH_EXAMPLES = sorted({block.page for block in DOC_TESTS})


@pytest.mark.integration
@pytest.mark.parametrize('page', PAGES_WITH_EXAMPLES)
def test_examples_run(page: str, sqlite_stack: CartStack, doc_env: Dict[str, str],
                      tmp_path: pathlib.Path) -> None:
    """Run a page's examples in order, in one working directory; compare each shown output."""
    if page in SETUP:
        SETUP[page](sqlite_stack)
    outputs: Dict[str, str] = {}
    blocks = read_blocks(DOCS / page)
    for block in blocks:
        if block.is_service:
            _run_service(block, tmp_path, doc_env)
        elif block.marker:
            outputs[block.name] = _run_example(block, tmp_path, doc_env)
        elif 'output' in block.attrs:
            name = block.attrs['output']
            assert normalise(outputs[name]) == normalise(block.text), \
                f'{block.where}: the output shown is not what {name} prints:\n{outputs[name]}'
    assert any(block.marker for block in blocks)
