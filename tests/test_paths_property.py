"""Property: every path and uid the cart accepts stays inside the cart and round-trips through the tar."""
from __future__ import annotations

import io
import os
import pathlib
import tarfile
import tempfile

from hypothesis import HealthCheck, given, settings, strategies as st

from pacifica.cartd.errors import BadRequest
from pacifica.cartd.paths import cart_relative_path, check_cart_uid
from pacifica.cartd.tarlayout import TarLayout, TarMember
from pacifica.cartd.volume import CartVolume

SEGMENT_CHARS = st.characters(blacklist_categories=('Cs',), min_codepoint=0, max_codepoint=0x2FFF)
SEGMENTS = st.one_of(st.sampled_from(['', '.', '..', '...', 'a', ' ', '\\', '~', 'é']),
                     st.text(SEGMENT_CHARS, min_size=1, max_size=12))
PATHS = st.lists(SEGMENTS, min_size=1, max_size=6).map('/'.join) | st.text(SEGMENT_CHARS, max_size=40)
PREFIXES = st.sampled_from(['', '/', '//', './', '../'])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prefix=PREFIXES, path=PATHS, uid=st.text(SEGMENT_CHARS, min_size=1, max_size=20))
def test_accepted_paths_stay_inside_and_round_trip(prefix: str, path: str, uid: str) -> None:
    try:
        relative = cart_relative_path(prefix + path)
        check_cart_uid(uid)
    except BadRequest:
        return
    with tempfile.TemporaryDirectory() as root:
        volume = CartVolume(pathlib.Path(root))
        target = volume.file_path(7, uid, relative)
        cart_dir = os.path.realpath(volume.files_dir(7, uid))
        assert os.path.realpath(target).startswith(cart_dir + os.sep)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b'x')
        assert target.read_bytes() == b'x'
        layout = TarLayout('top', [TarMember(relative, 1, 0, target)], 0)
        with tarfile.open(fileobj=io.BytesIO(b''.join(layout.iter_bytes())), mode='r:') as archive:
            files = [member.name for member in archive.getmembers() if member.isfile()]
            assert files == [f'top/{relative}']
            extracted = archive.extractfile(files[0])
            assert extracted is not None and extracted.read() == b'x'
