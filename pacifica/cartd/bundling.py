"""Finishing a cart whose files are all staged, exactly once: its bundle tar written, its link made, marked ready."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

from . import database
from .cartlayout import bundle_members, missing_list, missing_members, missing_message, skipped_any, tar_created
from .cleanup import cart_went_away
from .eviction import release_cart
from .events import READY, EventOutbox
from .logcontext import settle
from .orm import Cart, CartStatus, claim_for_bundling, failed_files, files_in_tar_order, get_cart, mark_ready
from .tarlayout import TarLayout
from .volume import CartVolume

LOGGER = logging.getLogger(__name__)


class Bundler:
    """Moves carts from their last staged file to ready."""

    def __init__(self, volume: CartVolume, outbox: Optional[EventOutbox] = None) -> None:
        """Write tars and links on `volume`; write the ready event to `outbox` (none: no events)."""
        self.volume = volume
        self.outbox = outbox

    def finish(self, cart_id: int, bundle_now: bool = True) -> None:
        """Move a cart whose files are all staged on, exactly once (compare-and-set on its status)."""
        if claim_for_bundling(cart_id) and bundle_now:
            self.bundle(cart_id)

    def bundle(self, cart_id: int) -> None:
        """Make a cart in `bundling` ready: write its tar when it asked for one, link it, mark it ready."""
        self.finish(cart_id, bundle_now=False)
        cart = get_cart(cart_id)
        if cart is None or cart.status != CartStatus.BUNDLING.value:
            return
        settle(cart_uid=cart.cart_uid, cart_id=cart.id)  # for the rest of the task (or the enclosing `about`)
        files_dir = self.volume.files_dir(cart.id, cart.cart_uid)
        target = files_dir
        message = ''
        try:
            files_dir.mkdir(parents=True, exist_ok=True)
            # Downloads killed with their worker leave temp files; every file is staged now.
            self.volume.remove_partials(cart.id)
            release_cart(cart.id)
            if skipped_any(cart):
                message = self._write_missing_list(cart)
            if cart.bundle:
                target = self.volume.tar_path(cart.id, cart.cart_uid)
                self._write_bundle(cart, target)
                self.volume.remove_files(cart.id, cart.cart_uid)  # served from the tar from now on
        except OSError:
            # A DELETE removed the cart's files under the bundle being written (and the mkdir
            # above may have made its directory again): what is left goes, nothing failed.
            if cart_went_away(self.volume, cart.id, cart.cart_uid, 'bundling'):
                return
            raise
        with database.atomic():  # the event is written with the status change, or not at all
            ready = mark_ready(cart.id, str(target), message)
            if ready and self.outbox is not None:
                self.outbox.record(cart.id, READY)
        if not ready:
            cart_went_away(self.volume, cart.id, cart.cart_uid, 'bundling')
            return
        self.volume.link_ready_cart(cart.cart_uid, target)
        # A DELETE (or an eviction) between marking the cart ready and linking it has already
        # run its unlink, which found no link yet: the link goes again.
        if not cart_went_away(self.volume, cart.id, cart.cart_uid, 'becoming ready'):
            LOGGER.info('cart %s (id %d) is ready', cart.cart_uid, cart.id)

    def _write_missing_list(self, cart: Cart) -> str:
        """Write MISSING_FILES.txt of a cart that left out files (renamed into place whole); return its message."""
        failed = failed_files(cart.id)
        partial = self.volume.partial_path(cart.id, 0)
        partial.write_bytes(missing_list(failed))
        os.replace(partial, self.volume.missing_list_path(cart.id))
        LOGGER.warning('cart %s (id %d) is ready without %d of its %d files', cart.cart_uid, cart.id, len(failed),
                       cart.files_total)
        return missing_message(failed, cart.files_total)

    def _write_bundle(self, cart: Cart, target: Path) -> None:
        """Write the cart's tar to `target`.

        Large files were written into the staging tar in place; what is left (headers, small
        files, the trailer) is written around them and the tar renamed into place. Should
        the placed files not tile the tar exactly (a file that changed size between
        attempts, a cart from an older version), the tar is written anew from all sources.
        """
        files = files_in_tar_order(cart.id)
        staging = self.volume.bundle_staging_path(cart.id)
        layout = TarLayout(cart.cart_uid, missing_members(self.volume, cart) + bundle_members(self.volume, cart, files,
                                                                                           staging), tar_created(cart))
        if staging.is_file() and layout.places_in(staging):
            layout.complete_in(staging)
            os.replace(staging, target)
            return
        partial = self.volume.partial_path(cart.id, 0)
        layout.write_to(partial)
        os.replace(partial, target)
        staging.unlink(missing_ok=True)
        if any(file.tar_offset is not None for file in files):
            LOGGER.info('cart %s (id %d): bundle tar written anew, its files were not all in place',
                        cart.cart_uid, cart.id)
