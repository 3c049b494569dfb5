"""A cart's tar as its rows describe it: the members in tar order and where each one's bytes are on the volume,
with MISSING_FILES.txt first for a cart that left out files it could not stage."""
from __future__ import annotations

import contextlib
import gc
import os
import threading
import time
from itertools import repeat
from typing import Iterator, List, Sequence, Tuple

from .orm import SKIP, Cart, TarRow, tar_columns
from .paths import MISSING_FILES_NAME
from .tarlayout import Source, TarLayout, TarMember
from .volume import CartVolume

MISSING_LIST_SHOWN = 5  # files named in a ready cart's message; MISSING_FILES.txt lists them all


def tar_created(cart: Cart) -> float:
    """The mtime of the tar's directories: when the cart was created."""
    return cart.creation_date.timestamp() if cart.creation_date else time.time()


def skipped_any(cart: Cart) -> bool:
    """Whether the cart left out files it could not stage (so its tar starts with MISSING_FILES.txt)."""
    return cart.on_file_error == SKIP and bool(cart.files_failed)


def missing_list(failed: Sequence[Tuple[str, str, str]]) -> bytes:
    """MISSING_FILES.txt: a line per file left out, its path, archive id and why, separated by tabs."""
    return ''.join(f'{_one_field(path)}\t{_one_field(archive_id)}\t{_one_field(reason)}\n'
                   for path, archive_id, reason in failed).encode('utf-8')


def _one_field(text: str) -> str:
    return ' '.join(text.split())  # no tab or line break inside a field


def missing_message(failed: Sequence[Tuple[str, str, str]], files_total: int) -> str:
    """The message of a ready cart that left files out: how many, and the first few with their reasons."""
    named = '; '.join(f'{path} (archive id {archive_id}): {reason}'
                      for path, archive_id, reason in failed[:MISSING_LIST_SHOWN])
    more = f'; and {len(failed) - MISSING_LIST_SHOWN} more' if len(failed) > MISSING_LIST_SHOWN else ''
    return f'ready without {len(failed)} of {files_total} files (listed in {MISSING_FILES_NAME}): {named}{more}'


def missing_members(volume: CartVolume, cart: Cart) -> List[TarMember]:
    """[MISSING_FILES.txt] for a cart that left out files, else []: the first member of its tar."""
    if not skipped_any(cart):
        return []
    path = volume.missing_list_path(cart.id)
    try:
        info = os.stat(path)
    except OSError:
        return []  # gone with a DELETE: the download's reads will say so
    return [TarMember(MISSING_FILES_NAME, info.st_size, info.st_mtime, str(path))]


def bundle_members(volume: CartVolume, cart: Cart, files: Sequence[TarRow], staging: Source) -> List[TarMember]:
    """The members of a bundle tar being finished: those written into `staging` in place, the rest staged files."""
    sources = iter(volume.file_paths(cart.id, cart.cart_uid, [file.path for file in files if file.tar_offset is None]))
    return [TarMember(file.path, file.size, file.mtime, staging, file.tar_offset) if file.tar_offset is not None
            else TarMember(file.path, file.size, file.mtime, next(sources)) for file in files]


class _CollectorPause:
    """Python's cyclic garbage collector held off while tars are laid out, in any number of threads at once.

    Laying out a 100,000-file cart makes some 300,000 tuples of strings and numbers, none in a
    cycle; the collector, run every few hundred allocations, walked them again and again: 0.1 s
    of the 0.3 s before a download's first byte (measured). It runs again once the last
    layout in progress is done, if it was on before the first.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.holders = 0
        self.was_enabled = False

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self.lock:
            if self.holders == 0:
                self.was_enabled = gc.isenabled()
                gc.disable()
            self.holders += 1
        try:
            yield
        finally:
            with self.lock:
                self.holders -= 1
                if self.holders == 0 and self.was_enabled:
                    gc.enable()


collector_paused = _CollectorPause()


def download_layout(volume: CartVolume, cart: Cart, top: str) -> TarLayout:
    """The ready cart's tar under the top directory `top`, read from the volume (see _download_layout)."""
    with collector_paused():
        return _download_layout(volume, cart, top)


def _download_layout(volume: CartVolume, cart: Cart, top: str) -> TarLayout:
    """The ready cart's tar under the top directory `top`, read from the volume.

    A plain cart's members are its staged files. A bundle cart's are their places in its
    tar (laid out under the cart's uid); asked for under its own name, the download is
    that tar file as it lies on the volume, served as ranges of the one file.
    """
    files = tar_columns(cart.id)
    created = tar_created(cart)
    missing = missing_members(volume, cart)
    if not cart.bundle:
        sources = volume.file_paths(cart.id, cart.cart_uid, files.paths)
        return TarLayout(top, missing + list(map(TarMember._make, zip(files.paths, files.sizes, files.mtimes,
                                                                        sources, repeat(0)))), created)
    tar = str(volume.tar_path(cart.id, cart.cart_uid))
    paths = [member.path for member in missing] + list(files.paths)
    sizes = [member.size for member in missing] + list(files.sizes)
    mtimes = [member.mtime for member in missing] + list(files.mtimes)
    offsets = TarLayout.data_offsets(cart.cart_uid, list(zip(paths, sizes, mtimes, strict=True)))
    layout = TarLayout(top, list(map(TarMember._make, zip(paths, sizes, mtimes, repeat(tar), offsets))), created)
    if top == cart.cart_uid and cart.bundle_size and _size_of(tar) == layout.size:
        layout.image = tar
    return layout


def _size_of(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1  # gone with a DELETE: the download's reads will say so
