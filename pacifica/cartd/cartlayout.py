"""A cart's tar as its rows describe it: the members in tar order and where each one's bytes are on the volume."""
from __future__ import annotations

import contextlib
import gc
import os
import threading
import time
from itertools import repeat
from typing import Iterator, List, Sequence

from .orm import Cart, TarRow, tar_columns
from .tarlayout import Source, TarLayout, TarMember
from .volume import CartVolume


def tar_created(cart: Cart) -> float:
    """The mtime of the tar's directories: when the cart was created."""
    return cart.creation_date.timestamp() if cart.creation_date else time.time()


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
    if not cart.bundle:
        sources = volume.file_paths(cart.id, cart.cart_uid, files.paths)
        return TarLayout(top, list(map(TarMember._make, zip(files.paths, files.sizes, files.mtimes, sources,
                                                              repeat(0)))), created)
    tar = str(volume.tar_path(cart.id, cart.cart_uid))
    offsets = TarLayout.data_offsets(cart.cart_uid, list(zip(files.paths, files.sizes, files.mtimes, strict=True)))
    layout = TarLayout(top, list(map(TarMember._make, zip(files.paths, files.sizes, files.mtimes, repeat(tar),
                                                          offsets))), created)
    if top == cart.cart_uid and cart.bundle_size and _size_of(tar) == layout.size:
        layout.image = tar
    return layout


def _size_of(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1  # gone with a DELETE: the download's reads will say so
