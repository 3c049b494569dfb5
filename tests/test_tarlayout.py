"""The tar layout at scale: headers byte for byte as tarfile makes them, offsets without laying out, a bundle
tar's image, completing a tar in place with small files gathered, and directory entries for many paths."""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import List

import pytest
from hypothesis import given, settings, strategies as st

from pacifica.cartd import tarlayout
from pacifica.cartd.tarlayout import FileRange, TarLayout, TarMember

NAME_CHARS = st.sampled_from(list('ab/._- Z9') + ['é', '\u4e2d'])


def tarfile_header(name: str, size: int, mtime: float, is_dir: bool) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = 0 if is_dir else size
    info.mtime = int(mtime)
    info.mode = 0o755 if is_dir else 0o644
    info.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    info.uname = info.gname = ''
    return info.tobuf(format=tarfile.PAX_FORMAT, encoding='utf-8', errors='strict')


@settings(max_examples=500, deadline=None)
@given(name=st.text(NAME_CHARS, min_size=1, max_size=110),
       size=st.one_of(st.integers(0, 8 ** 11 + 5), st.sampled_from([0, 511, 512, 8 ** 11 - 1, 8 ** 11])),
       mtime=st.one_of(st.integers(0, 8 ** 11 + 5), st.floats(0, 2e9)), is_dir=st.booleans())
def test_headers_are_tarfiles_byte_for_byte(name: str, size: int, mtime: float, is_dir: bool) -> None:
    size = 0 if is_dir else size
    assert tarlayout._header(name, size, mtime, is_dir) == tarfile_header(name, size, mtime, is_dir)


@settings(max_examples=200, deadline=None)
@given(top=st.text(NAME_CHARS, min_size=1, max_size=30).filter(lambda text: '/' not in text),
       names=st.lists(st.text(NAME_CHARS, min_size=1, max_size=90), min_size=1, max_size=8),
       size=st.integers(0, 3000))
def test_every_header_the_layout_makes_is_tarfiles(top: str, names: List[str], size: int) -> None:
    members = [TarMember(name, size + index, 1600000000 + index, '/nonexistent') for index, name in enumerate(names)]
    layout = TarLayout(top, members, 1500000000)
    for index, member in enumerate(members):
        header = tarfile_header(f'{top}/{member.path}', member.size, member.mtime, False)
        assert layout._member_header(index) == header
        assert layout.file_offsets[index] - layout._header_starts[index] == len(header)
    assert TarLayout.data_offsets(top, members) == layout.file_offsets


def test_a_layout_with_an_image_is_ranges_of_that_file(tmp_path: Path) -> None:
    source = tmp_path / 'f'
    source.write_bytes(b'abc' * 1000)
    layout = TarLayout('t', [TarMember('f', 3000, 0, source)], 0)
    image = tmp_path / 'image.tar'
    layout.write_to(image)
    layout.image = image
    assert list(layout.pieces(10, 5000)) == [FileRange(image, 10, 4990)]
    assert list(layout.pieces(0)) == [FileRange(image, 0, layout.size)]
    assert list(layout.pieces(layout.size)) == []


def test_completing_in_place_gathers_small_files_and_copies_large_ones(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tarlayout, 'GATHER_BYTES', 4096)
    staged: List[TarMember] = []
    for index in range(40):
        data = os.urandom([0, 1, 511, 512, 513, 3000, 9000][index % 7])
        source = tmp_path / f's{index}'
        source.write_bytes(data)
        staged.append(TarMember(f'd{index % 3}/f{index}', len(data), 1600000000, source))
    target = tmp_path / 'bundle.tar'
    offsets = TarLayout.data_offsets('u', staged)
    placed = {5, 12, 26}  # written into the tar in place, as workers do for large files
    members = [member._replace(source=target, source_offset=offsets[index]) if index in placed else member
               for index, member in enumerate(staged)]
    with open(target, 'wb') as handle:
        for index in placed:
            handle.seek(offsets[index])
            handle.write(staged[index].source.read_bytes())
    layout = TarLayout('u', members, 1500000000)
    layout.complete_in(target)
    assert target.read_bytes() == b''.join(TarLayout('u', staged, 1500000000).iter_bytes())
    with tarfile.open(target) as archive:
        for member in staged:
            extracted = archive.extractfile(f'u/{member.path}')
            assert extracted is not None and extracted.read() == Path(member.source).read_bytes()


def test_a_short_source_file_fails_completing(tmp_path: Path) -> None:
    source = tmp_path / 's'
    source.write_bytes(b'12345')
    with pytest.raises(OSError, match='shorter than the cart recorded'):
        TarLayout('u', [TarMember('s', 10, 0, source)], 0).write_to(tmp_path / 'out.tar')


def test_directory_entries_for_many_nested_paths(tmp_path: Path) -> None:
    paths = [f'a/b{index % 7}/c{index % 3}/f{index}' for index in range(300)] + ['top.txt', 'a/x', 'z/y/w/v']
    source = tmp_path / 'empty'
    source.write_bytes(b'')
    layout = TarLayout('t', [TarMember(path, 0, 0, source) for path in paths], 0)
    with tarfile.open(fileobj=io.BytesIO(b''.join(layout.iter_bytes()))) as archive:
        directories = [member.name for member in archive.getmembers() if member.isdir()]
    expected = {'t'} | {'t/' + '/'.join(path.split('/')[:depth]) for path in paths for depth in range(1, path.count('/') + 1)}
    assert directories == sorted(directories) and set(directories) == expected
