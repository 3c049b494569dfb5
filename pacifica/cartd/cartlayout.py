"""A cart's tar as its rows describe it: the members in tar order and where each one's bytes are on the volume."""
from __future__ import annotations

import dataclasses
import time
from typing import List, Sequence

from .orm import Cart, File, files_in_tar_order
from .tarlayout import TarLayout, TarMember
from .volume import CartVolume


def tar_created(cart: Cart) -> float:
    """The mtime of the tar's directories: when the cart was created."""
    return cart.creation_date.timestamp() if cart.creation_date else time.time()


def staged_member(volume: CartVolume, cart: Cart, file: File) -> TarMember:
    """The file as a tar member read from where it was staged."""
    return TarMember(file.bundle_path, file.size or 0, file.mtime or 0.0,
                     volume.file_path(cart.id, cart.cart_uid, file.bundle_path))


def served_members(volume: CartVolume, cart: Cart, files: Sequence[File]) -> List[TarMember]:
    """Where each file's bytes are served from: its staged file, or its place in the cart's bundle tar."""
    plain = [staged_member(volume, cart, file) for file in files]
    if not cart.bundle:
        return plain
    tar_path = volume.tar_path(cart.id, cart.cart_uid)
    on_disk = TarLayout(cart.cart_uid, plain, 0)
    return [dataclasses.replace(member, source=tar_path, source_offset=offset)
            for member, offset in zip(plain, on_disk.file_offsets, strict=True)]


def download_layout(volume: CartVolume, cart: Cart, top: str) -> TarLayout:
    """The ready cart's tar under the top directory `top`, read from the volume."""
    return TarLayout(top, served_members(volume, cart, files_in_tar_order(cart.id)), tar_created(cart))
