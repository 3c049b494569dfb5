"""The one clean-up for a cart that went away (deleted, evicted or purged) while work on it went on."""
from __future__ import annotations

import logging

from .orm import CartStatus, cart_status
from .volume import CartVolume

LOGGER = logging.getLogger(__name__)


def cart_went_away(volume: CartVolume, cart_id: int, cart_uid: str, during: str) -> bool:
    """If the cart is deleted or its row gone, remove what is left of it on the volume, log it, and say so.

    Work that raced a DELETE may have written files, made the cart's directory again (a
    sibling's mkdir after the DELETE's rmtree) or linked it in cartuids/ after the DELETE's
    unlink: all of it goes, and nothing of it is recorded as a failure. `during` names the
    work that found out ("staging", "bundling", ...).
    """
    status = cart_status(cart_id)
    if status is not None and status != CartStatus.DELETED.value:
        return False
    volume.remove_cart_and_link(cart_uid, cart_id)
    LOGGER.info('cart %s (id %d) went away while %s', cart_uid, cart_id, during)
    return True
