"""The client's use cases: create a cart, report its state, lay out its tar for download, delete it."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Dict, Iterator

from . import database
from .bundling import Bundler
from .cartlayout import download_layout
from .cartreport import FilesWanted, cart_report
from .cartrequest import parse_cart_request
from .cartstate import CartState
from .config import Settings
from .errors import CartExpired, CartNotFound, CartNotReady
from .expiry import effective_lifetime, expired_message, has_expired, out_of_sight
from .events import check_callback
from .eviction import DOWNLOAD_HEARTBEAT_S, release_cart
from .heartbeat import Heartbeat
from .orm import Cart, CartStatus, insert_cart, live_carts, mark_deleted, newest_live_cart, newest_live_state, now, \
    task_ids_of, touch_cart
from .paths import check_cart_uid
from .tarlayout import Piece, TarLayout, directories_size
from .taskqueue import CartQueue
from .volume import CartVolume
from .workers import WorkerPresence

LOGGER = logging.getLogger(__name__)

PIECE_BYTES = 4 << 20  # a download's file ranges are handed out this long at most, the cart marked used between


@dataclasses.dataclass(frozen=True)
class CartDownload:
    """A ready cart's tar, laid out for the requested name."""

    layout: TarLayout
    filename: str
    cart_id: int

    def pieces(self, start: int, end: int) -> Iterator[Piece]:
        """The tar's bytes [start, end) as header bytes and file ranges of at most PIECE_BYTES.

        Each time the reader comes back for more the cart may be marked used (every
        DOWNLOAD_HEARTBEAT_S), so a cart is not evicted while its tar is being read.
        """
        heartbeat = Heartbeat(self.cart_id, DOWNLOAD_HEARTBEAT_S)
        for piece in self.layout.pieces(start, end):
            if isinstance(piece, bytes):
                yield piece
            elif piece.length <= PIECE_BYTES:
                yield piece
                heartbeat()
            else:
                for part in piece.parts(PIECE_BYTES):
                    yield part
                    heartbeat()


class Carts:
    """Create, poll, download and delete carts: what clients ask for."""

    def __init__(self, settings: Settings, volume: CartVolume, queue: CartQueue, bundler: Bundler,
                 presence: WorkerPresence) -> None:
        """Record carts in the database, queue their work on `queue`, finish empty ones with `bundler`;
        say through `presence` when a staging cart waits for a worker that is not there."""
        self.settings = settings
        self.volume = volume
        self.queue = queue
        self.bundler = bundler
        self.presence = presence

    def create(self, cart_uid: str, body: Any) -> int:
        """Record a cart and its files, then queue their staging; return the cart's row id."""
        check_cart_uid(cart_uid)
        request = parse_cart_request(body)
        bundle = self.settings.bundle_task if request.bundle is None else request.bundle
        paths = [item.path for item in request.files]
        # A bundle's tar starts with its directories; files are then placed after them.
        start = directories_size(cart_uid, paths) if bundle else 0
        lifetime = effective_lifetime(request.lifetime, self.settings)
        callback_url = check_callback(request.callback_url, self.settings)
        with database.atomic():
            cart_id, file_ids = insert_cart(cart_uid, bundle, request.files, start, lifetime,
                                            request.skip_failed_files, callback_url)
        LOGGER.info('cart %s (id %d): %d files, bundle %s', cart_uid, cart_id, len(file_ids), bundle)
        if not file_ids:
            self.bundler.finish(cart_id)
            return cart_id
        self.queue.stage(cart_id, file_ids)
        return cart_id

    def status(self, cart_uid: str) -> CartState:
        """The newest live cart's wire status and message (one indexed query); an expired cart is
        answered as gone once it expired longer than tombstone_time ago."""
        stored = newest_live_state(cart_uid)
        moment = now()
        if stored is None or out_of_sight(stored.status, stored.expires, moment, self.settings.tombstone_time):
            raise CartNotFound(f'No cart with uid {cart_uid} found')
        waiting = not stored.error and CartStatus(stored.status).wire == CartStatus.STAGING.value
        return CartState.from_row(stored, moment, self.presence.absence() if waiting else None)

    def report(self, cart_uid: str, wanted: FilesWanted) -> Dict[str, Any]:
        """The status document of the cart HEAD answers for, or of a deleted one's tombstone (see cartreport)."""
        return cart_report(cart_uid, wanted, self.settings.tombstone_time, self.presence.absence())

    def download(self, cart_uid: str, filename: str, top: str) -> CartDownload:
        """Lay out the ready cart's tar under the top directory `top`; count it as a use.

        An expired cart is not served (410), but a download that started before is not cut off:
        its reads mark the cart used, and the workers do not remove a cart's files while it is.
        """
        cart = newest_live_cart(cart_uid)
        moment = now()
        if cart is None or out_of_sight(cart.status, cart.expires_date, moment, self.settings.tombstone_time):
            raise CartNotFound('The cart does not exist or has already been deleted')
        if has_expired(cart.status, cart.expires_date, moment):
            raise CartExpired(expired_message(cart.expires_date))
        if cart.status != CartStatus.READY.value:
            raise CartNotReady('The cart is not ready for download.')
        layout = download_layout(self.volume, cart, top)
        touch_cart(cart.id)
        return CartDownload(layout, filename, cart.id)

    def delete(self, cart_uid: str) -> int:
        """Delete every live cart with this uid: mark, revoke its tasks, remove its files."""
        with database.atomic():
            carts = live_carts(cart_uid, Cart.id)
            if not carts:
                raise CartNotFound('Not Found')
            cart_ids = [cart.id for cart in carts]
            mark_deleted(cart_ids)
            for cart_id in cart_ids:
                release_cart(cart_id)
            task_ids = task_ids_of(cart_ids)
        self.queue.revoke(cart_uid, task_ids)
        for cart_id in cart_ids:
            self.volume.remove_cart_and_link(cart_uid, cart_id)
        LOGGER.info('cart %s deleted (ids %s)', cart_uid, cart_ids)
        return len(cart_ids)

