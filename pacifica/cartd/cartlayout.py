"""A cart's tar as its rows describe it: the members in tar order and where each one's bytes are on the volume."""
from __future__ import annotations

import os
import time
from typing import List, Sequence

from .orm import Cart, TarRow, files_in_tar_order
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


def download_layout(volume: CartVolume, cart: Cart, top: str) -> TarLayout:
    """The ready cart's tar under the top directory `top`, read from the volume.

    A plain cart's members are its staged files. A bundle cart's are their places in its
    tar (laid out under the cart's uid); asked for under its own name, the download is
    that tar file as it lies on the volume, served as ranges of the one file.
    """
    files = files_in_tar_order(cart.id)
    created = tar_created(cart)
    if not cart.bundle:
        sources = volume.file_paths(cart.id, cart.cart_uid, [file.path for file in files])
        return TarLayout(top, [TarMember(file.path, file.size, file.mtime, source)
                               for file, source in zip(files, sources, strict=True)], created)
    tar = str(volume.tar_path(cart.id, cart.cart_uid))
    offsets = TarLayout.data_offsets(cart.cart_uid, files)
    layout = TarLayout(top, [TarMember(file.path, file.size, file.mtime, tar, offset)
                             for file, offset in zip(files, offsets, strict=True)], created)
    if top == cart.cart_uid and cart.bundle_size and _size_of(tar) == layout.size:
        layout.image = tar
    return layout


def _size_of(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1  # gone with a DELETE: the download's reads will say so
