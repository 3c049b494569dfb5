"""The operator's commands on carts: dump them, report their status, purge old ones, and fix broken ones here."""
from __future__ import annotations

import dataclasses
import datetime
import logging
import time
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple

from . import database
from .bundling import Bundler
from .cartreport import MAX_LIMIT, FilesWanted, cart_report, live_document
from .cartstate import CartState
from .errors import CartNotFound
from .logcontext import about
from .orm import (Cart, CartStatus, carts_not_deleted, carts_unused_since, delete_cart_rows, file_rows_of, get_cart,
                  mark_waiting, newest_live_cart, restart_cart, staged_files, unstaged_file_ids)
from .recovery import Recovery
from .stagedfiles import Purged
from .staging import Stager, StageOutcome
from .volume import CartVolume
from .workers import WorkerPresence

LOGGER = logging.getLogger(__name__)

FIXIT_MAX_TAPE_ROUNDS = 50
MAX_PAGES = 1000  # of MAX_LIMIT files each: a cart's whole file list for `status UID`


class FixitProgress(Protocol):
    """What `fixit` tells as it goes (the command line draws progress bars from it)."""

    def files(self, total: int) -> None:
        """The cart has `total` files to stage."""

    def file_done(self, outcome: StageOutcome) -> None:
        """One file's attempt ended."""


@dataclasses.dataclass(frozen=True)
class FixitResult:
    """How fixing one cart ended: its state, and how many files were still on tape when fixit gave up."""

    state: CartState
    files_on_tape: int


class Admin:
    """dump, purge and fixit, callable from the command line or a test."""

    def __init__(self, volume: CartVolume, stager: Stager, bundler: Bundler, recovery: Recovery,
                 presence: WorkerPresence, sleep: Callable[[float], None] = time.sleep) -> None:
        """Work on `volume`; fixit stages with `stager` and waits for tape recalls with `sleep`; status
        says, as the server does, when carts wait for a worker (`presence`)."""
        self.volume = volume
        self.presence = presence
        self.stager = stager
        self.bundler = bundler
        self.recovery = recovery
        self.sleep = sleep

    @staticmethod
    def dump() -> List[Dict[str, Any]]:
        """Every cart that is not deleted, with its files, as plain data (oldest first)."""
        carts = carts_not_deleted()
        files: Dict[int, List[Dict[str, Any]]] = {cart.id: [] for cart in carts}
        if carts:
            for row in file_rows_of(list(files)):
                files[row['cart']].append({
                    'id': row['id'], 'archive_id': row['file_name'], 'path': row['bundle_path'],
                    'hashtype': row['hash_type'], 'hashsum': row['hash_value'], 'status': row['status'],
                    'error': row['error'], 'size': row['size'], 'staged_file': row['staged_file_id']})
        return [{'id': cart.id, 'uid': cart.cart_uid, 'status': cart.status, 'bundle': bool(cart.bundle),
                 'error': cart.error, 'files_total': cart.files_total, 'files_staged': cart.files_staged,
                 'created': str(cart.creation_date), 'updated': str(cart.updated_date),
                 'files': files[cart.id]} for cart in carts]

    def status(self, cart_uids: Sequence[str]) -> List[Dict[str, Any]]:
        """Status documents (see cartreport): of every cart that is not deleted, without files, oldest
        first; or, for the uids given, of each (with all its files, page after page), as GET /<uid>/status
        finds it. CartNotFound for a uid that has no cart."""
        absence = self.presence.absence()
        if not cart_uids:
            return [{'id': cart.id, **live_document(cart, FilesWanted('none'), absence=absence)}
                    for cart in carts_not_deleted()]
        tombstone_time = self.recovery.settings.tombstone_time
        documents = []
        for cart_uid in cart_uids:
            document = cart_report(cart_uid, FilesWanted('all', MAX_LIMIT), tombstone_time, absence)
            files = list(document['files'])
            for _ in range(MAX_PAGES):
                following = document['files_page']['next_offset']
                if following is None:
                    break
                document = cart_report(cart_uid, FilesWanted('all', MAX_LIMIT, following), tombstone_time, absence)
                files.extend(document['files'])
            documents.append({**document, 'files': files, 'files_page': {**document['files_page'], 'offset': 0,
                                                                        'limit': len(files), 'next_offset': None}})
        return documents

    def purge(self, unused_since: datetime.datetime) -> List[Tuple[int, str]]:
        """Delete carts (rows and files) not used since the given time; return (id, uid) of each."""
        carts = carts_unused_since(unused_since)
        for cart in carts:
            self.volume.remove_cart_and_link(cart.cart_uid, cart.id)
            with database.atomic():
                delete_cart_rows(cart.id)
            with about(cart_uid=cart.cart_uid, cart_id=cart.id):
                LOGGER.info('purged cart %s (id %d)', cart.cart_uid, cart.id)
        return [(cart.id, cart.cart_uid) for cart in carts]

    def purge_staged_files(self, unused_since: datetime.datetime) -> Optional[Purged]:
        """With share_staged_files, remove cache entries no live cart pins unused since the given time,
        untrusted entries and temp files a crash left (StagedFiles.purge); None when sharing is off."""
        cache = self.stager.cache
        return None if cache is None else cache.purge(unused_since)

    def fixit(self, cart_uid: str, progress: Optional[FixitProgress] = None) -> FixitResult:
        """Re-stage what a cart lost or failed and finish it, here, waiting for tape recalls.

        Raises CartNotFound for an unknown uid. Gives up on files still on tape after
        FIXIT_MAX_TAPE_ROUNDS looks, with waits growing as the workers' do.
        """
        cart_id, todo = self.fixit_prepare(cart_uid)
        if progress is not None:
            progress.files(len(todo))
        on_done = progress.file_done if progress is not None else None
        for tape_round in range(FIXIT_MAX_TAPE_ROUNDS):
            todo = self.stager.stage_files(cart_id, todo, on_done=on_done)
            if not todo:
                break
            self.sleep(self.recovery.tape_wait(tape_round))
        return FixitResult(self.fixit_finish(cart_id), len(todo))

    def fixit_prepare(self, cart_uid: str) -> Tuple[int, List[int]]:
        """Put a cart back to staging, re-marking failed files and staged files missing from disk.

        Returns the cart id and the ids of the files still to stage.
        """
        cart = newest_live_cart(cart_uid)
        if cart is None:
            raise CartNotFound(f'No cart with uid {cart_uid} found')
        tar = self.volume.tar_path(cart.id, cart.cart_uid)
        tar_ok = bool(cart.bundle) and cart.status == CartStatus.READY.value and tar.is_file()
        in_place_ok = self.volume.bundle_staging_path(cart.id).is_file()
        with database.atomic():
            lost: Sequence[int] = [] if tar_ok else [
                file.id for file in staged_files(cart.id)
                if not (file.tar_offset is not None and in_place_ok)
                and not self.volume.file_path(cart.id, cart.cart_uid, file.bundle_path).is_file()]
            mark_waiting(cart.id, lost)
            todo = unstaged_file_ids(cart.id)
            if todo or cart.status != CartStatus.READY.value:
                restart_cart(cart.id)
        return cart.id, todo

    def fixit_finish(self, cart_id: int) -> CartState:
        """Finish a cart whose files fixit staged (or that was stuck before bundling); return its state."""
        self.bundler.finish(cart_id)
        if self._cart(cart_id).status == CartStatus.BUNDLING.value:
            self.bundler.bundle(cart_id)
        return CartState.of(self._cart(cart_id))

    @staticmethod
    def _cart(cart_id: int) -> Cart:
        cart = get_cart(cart_id)
        if cart is None:
            raise CartNotFound(f'cart id {cart_id} was purged meanwhile')
        return cart
