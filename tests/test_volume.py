"""Client paths and uids (paths.py), the cart directory (volume.py), the computed tar (tarlayout.py) and Range (byteranges.py)."""
import io
import os
import tarfile
from pathlib import Path

import pytest

from pacifica.cartd.errors import BadRequest
from pacifica.cartd.byteranges import parse_range
from pacifica.cartd.paths import cart_relative_path, check_cart_uid, path_conflicts, tar_top_name
from pacifica.cartd.tarlayout import TarLayout, TarMember
from pacifica.cartd.volume import CartVolume


@pytest.mark.parametrize('given, expected', [
    ('a.txt', 'a.txt'), ('/a.txt', 'a.txt'), ('a/b/é/baré.txt', 'a/b/é/baré.txt'), ('a b/c', 'a b/c'),
])
def test_accepted_paths(given: str, expected: str) -> None:
    assert cart_relative_path(given) == expected


@pytest.mark.parametrize('given', [
    '', '/', '//etc/passwd', '../x', 'a/../../x', 'a/..', 'a//b', 'a/./b', './a', 'a/', 'a\x00b', 'a\nb',
    'x' * 256, 'a/' + 'b' * 256,
])
def test_refused_paths(given: str) -> None:
    with pytest.raises(BadRequest):
        cart_relative_path(given)


@pytest.mark.parametrize('uid', ['', '.', '..', '.hidden', 'a/b', 'a\\b', 'a\x01', 'é' * 200])
def test_refused_uids(uid: str) -> None:
    with pytest.raises(BadRequest):
        check_cart_uid(uid)


def test_conflicting_paths() -> None:
    assert path_conflicts(['a', 'b/c']) is None
    assert path_conflicts(['a', 'a']) == 'a'
    assert path_conflicts(['a/b', 'a']) == 'a'
    assert path_conflicts(['caf\u00e9', 'cafe\u0301']) == 'cafe\u0301'


def test_file_path_stays_in_cart(tmp_path: Path) -> None:
    volume = CartVolume(tmp_path)
    assert volume.file_path(3, 'u', 'a/b') == tmp_path / '3' / 'u' / 'a' / 'b'
    with pytest.raises(BadRequest):
        volume.file_path(3, 'u', '../../etc/passwd')


def _members(tmp_path: Path) -> list:
    contents = {'a/b/é/baré.txt': b'hello', 'empty': b'', 'big.bin': os.urandom(70000),
                'deep/' + 'n' * 120 + '/f': b'x' * 513}
    members = []
    for name, data in contents.items():
        source = tmp_path / name.replace('/', '_')
        source.write_bytes(data)
        members.append(TarMember(name, len(data), 1700000000.5, source))
    return members


def test_layout_is_a_tar_with_exact_length(tmp_path: Path) -> None:
    members = _members(tmp_path)
    layout = TarLayout('bundle', members, 1700000000)
    body = b''.join(layout.iter_bytes())
    assert len(body) == layout.size and layout.size % 10240 == 0
    with tarfile.open(fileobj=io.BytesIO(body), mode='r:') as archive:
        names = archive.getnames()
        assert names[0] == 'bundle' and 'bundle/a/b/é' in names
        for member in members:
            extracted = archive.extractfile(f'bundle/{member.path}')
            assert extracted is not None and extracted.read() == member.source.read_bytes()
            assert archive.getmember(f'bundle/{member.path}').mtime == 1700000000


def test_ranges_are_slices_of_the_whole(tmp_path: Path) -> None:
    layout = TarLayout('t', _members(tmp_path), 0)
    whole = b''.join(layout.iter_bytes())
    for start, end in [(0, 1), (100, 5000), (511, 513), (layout.size - 7, layout.size), (1500, 71000)]:
        assert b''.join(layout.iter_bytes(start, end, chunk_size=1000)) == whole[start:end]


def test_write_to_matches_stream(tmp_path: Path) -> None:
    layout = TarLayout('t', _members(tmp_path), 0)
    layout.write_to(tmp_path / 'out.tar')
    assert (tmp_path / 'out.tar').read_bytes() == b''.join(layout.iter_bytes())


def test_etag_depends_on_content(tmp_path: Path) -> None:
    members = _members(tmp_path)
    assert TarLayout('t', members, 0).etag == TarLayout('t', members, 0).etag
    assert TarLayout('t', members, 0).etag != TarLayout('u', members, 0).etag


@pytest.mark.parametrize('header, expected', [
    (None, None), ('bytes=0-9', (0, 10)), ('bytes=5-', (5, 100)), ('bytes=-10', (90, 100)),
    ('bytes=90-500', (90, 100)), ('bytes=1-2,5-6', None), ('items=1-2', None), ('bytes=x-y', None),
])
def test_parse_range(header: str, expected: tuple) -> None:
    assert parse_range(header, 100) == expected


def test_range_past_end_is_refused() -> None:
    with pytest.raises(ValueError):
        parse_range('bytes=100-', 100)


@pytest.mark.parametrize('filename, top', [('x.tar', 'x'), ('data', 'data'), ('my_bundle.tar', 'my_bundle')])
def test_tar_top_name(filename: str, top: str) -> None:
    assert tar_top_name(filename) == top


@pytest.mark.parametrize('filename', ['.tar', '../x.tar', 'a/b.tar', '..'])
def test_tar_top_name_refuses_unsafe(filename: str) -> None:
    with pytest.raises(BadRequest):
        tar_top_name(filename)
