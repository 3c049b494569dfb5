"""Room on the volume: bytes reserved by downloads in flight, making room by evicting failed, then ready carts,
and removing the files of carts past their lifetime."""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

from . import database
from .config import Settings
from .errors import CartGone, NoSpace
from .fileio import allocated_in
from .logcontext import about
from .orm import (Cart, CartStatus, File, SpaceReservation, StagedFile, add_reservation, cart_status,
                  claim_entry_removal, claim_eviction, claim_expiry, drop_cart_reservations, drop_reservations,
                  expired_unused, now, oldest_evictable, oldest_unpinned_entry, reservations_in_flight,
                  set_reservation_partial)
from .volume import CartVolume

LOGGER = logging.getLogger(__name__)

# A cart whose tar is being sent is marked used at least this often (see carts.CartDownload),
# so a cart used more recently than twice that is never evicted from under a download.
DOWNLOAD_HEARTBEAT_S = 30.0
IN_USE_WINDOW_S = 2 * DOWNLOAD_HEARTBEAT_S + 30.0
BLOCK = 4096
SMALL_FILE = 256 * 1024  # files this small are not reserved one by one ...
SMALL_FILE_MARGIN = 256 * 1024 * 1024  # ... while the volume has this much more free
MAX_EVICTIONS_PER_FILE = 1000
CLAIM_ATTEMPTS = 10  # candidates tried when others keep claiming them first
ENTRIES_LOOKED_AT = 100  # unpinned cache entries passed over (a failed cart still links them) before carts go
MEASURE_ATTEMPTS = 5  # rounds of looking at the downloads in flight and the free count together


def disk_bytes(size: int) -> int:
    """What a file of `size` bytes takes on disk, counted generously (whole blocks plus one)."""
    return (size + 2 * BLOCK - 1) // BLOCK * BLOCK


def bytes_in_flight(excluding_file_id: int) -> int:
    """Disk bytes that downloads already started may still write.

    A cart that failed still has its started downloads writing until each ends and releases
    its row, so its rows count too; only a deleted cart's are left out (DELETE drops them).
    The reservation table holds only the files in flight (a few per worker thread), so
    this stays cheap however many files the database holds.
    """
    rows = reservations_in_flight(excluding_file_id)
    return _still_to_write(rows, _written_by(rows))


def room_in_flight(excluding_file_id: int, volume: CartVolume) -> Tuple[int, int]:
    """(bytes downloads in flight may still write, free bytes), the two measured at one moment.

    Downloads in this and other processes go on writing while they are looked at: bytes
    written between reading a download's size on disk and reading the free count would be
    counted twice, as written and as still to write (a file of 512 KiB finishing in that
    gap made a reservation evict one cart too many). So the sizes are read before and after
    the free count until they agree; if downloads keep writing, the earlier sizes count,
    which can only overstate what is in flight.
    """
    rows = reservations_in_flight(excluding_file_id)
    written = _written_by(rows)
    free = volume.free_bytes()
    for _ in range(MEASURE_ATTEMPTS - 1):
        again = _written_by(rows)
        if again == written:
            break
        written = again
        free = volume.free_bytes()
    return _still_to_write(rows, written), free


def _written_by(rows: Sequence[SpaceReservation]) -> List[int]:
    return [_written(row.partial, row.tar_offset, row.bytes) for row in rows]


def _still_to_write(rows: Sequence[SpaceReservation], written: Sequence[int]) -> int:
    return sum(max(row.bytes - done, 0) for row, done in zip(rows, written, strict=True))


def _written(partial: Optional[str], offset: Optional[int], length: int) -> int:
    """Disk bytes a download has already written (they are already out of the free count), or
    all `length` bytes when its file is gone.

    A temp file's are its allocated blocks. A file written in place into the bundle tar
    (which is sparse until every file is in it) has written the data extents of its region.
    The file is made when the reservation is recorded (see hold_partial), so one that is gone
    has ended: renamed into place (its bytes in the free count) or removed (its bytes free
    again). Either way it has nothing more to write.
    """
    if not partial:
        return 0
    try:
        if offset is None:
            return os.stat(partial).st_blocks * 512
        return allocated_in(partial, offset, length - BLOCK)  # disk_bytes added a block or more to the size
    except OSError:
        return length


def hold_partial(partial: Path, tar_offset: Optional[int]) -> None:
    """Make the file a reserved download will write, so that a reservation whose file is gone has ended."""
    partial.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | (os.O_EXCL if tar_offset is None else 0), 0o644))


def track_partial(file_id: int, partial: Path) -> None:
    """Say which temp file a reserved download is writing now (a new one for each attempt, made here)."""
    hold_partial(partial, None)
    set_reservation_partial(file_id, str(partial))


def reserve(cart_id: int, file_id: int, size: int, partial: Optional[Path], tar_offset: Optional[int] = None) -> None:
    """Record that this file's download may write `size` disk bytes into `partial` (replacing an older record).

    With `tar_offset`, `partial` is the cart's bundle tar and the file's bytes go to its region
    from that offset on. Without `partial` the whole size counts until the file is released.
    """
    add_reservation(cart_id, file_id, size, None if partial is None else str(partial), tar_offset)


def release(file_id: int) -> None:
    """The file is on disk (or failed): its bytes are no longer in flight."""
    drop_reservations([file_id])


def release_files(file_ids: Sequence[int]) -> None:
    """Several files are on disk: their bytes are no longer in flight."""
    drop_reservations(file_ids)


def release_cart(cart_id: int) -> None:
    """Forget every reservation of a cart that finished or went away."""
    drop_cart_reservations(cart_id)


@dataclasses.dataclass(frozen=True)
class Victim:
    """What eviction claimed: a cart (its files to remove) or a staged-file cache entry (its file to unlink)."""

    cart: Optional[Cart] = None
    entry: Optional[StagedFile] = None

    def remove(self, volume: CartVolume) -> None:
        """Remove the claimed files (an entry's bytes are freed only when no cart holds a link to them)."""
        if self.cart is not None:
            volume.remove_cart_and_link(self.cart.cart_uid, self.cart.id)
        if self.entry is not None:
            volume.remove_staged_file(self.entry.id)

    def describe(self) -> str:
        """For the log."""
        if self.entry is not None:
            return (f'staged file {self.entry.id} ({self.entry.state}, archive id {self.entry.archive_id}, '
                    f'{self.entry.size} bytes, last used {self.entry.last_used})')
        assert self.cart is not None
        return f'{self.cart.status} cart {self.cart.cart_uid} (id {self.cart.id}, last used {self.cart.updated_date})'


def evict_one(lru_buffer_time: float, shared: bool = False,
              frees: Optional[Callable[[StagedFile], bool]] = None) -> Optional[Victim]:
    """Claim what goes next and return it (its files to remove), or None if nothing may go.

    Evictable: a ready cart past its lifetime; else, with `shared` (share_staged_files), a
    staged-file cache entry no live cart pins, least recently used first; else a failed cart
    with staged files still on the volume (the longest failed first; its row stays, in error
    with its message); else a ready cart (least recently used first, marked deleted). Carts
    only when not used (created, failed, finished or downloaded) within lru_buffer_time or the
    in-use window that covers downloads in progress (the heartbeat of a failed cart's downloads
    still running keeps it inside). An entry serves no download itself (carts read their own
    links), so it needs no such window; and, given `frees`, only an entry whose removal frees bytes
    (no cart, such as a failed one, still holds a link to them: removing it would free nothing).
    Claimed by compare-and-set, so two processes never evict the same cart or entry twice.

    A claim lost means its cart or entry was used, pinned or removed since it was found: it may not go
    now, and the next round passes over it. Not a re-read of it: this runs in the reservation's
    transaction, whose plain reads on MySQL (REPEATABLE READ) keep showing the snapshot it began with,
    so every round found the same one and lost; and a locking read would not do (it locks every row it
    scans, and its EXISTS of the pins still reads the snapshot).
    """
    protect = max(lru_buffer_time, IN_USE_WINDOW_S)
    cutoff = now() - datetime.timedelta(seconds=protect)
    lost = []
    lost_carts: List[int] = []
    lost_entries: List[int] = []
    for _ in range(CLAIM_ATTEMPTS):
        candidate = oldest_evictable(cutoff, skipping=lost_carts)
        expired = candidate is not None and candidate.status == CartStatus.READY.value and (
            candidate.expires_date is not None and candidate.expires_date <= now())
        held: List[int] = list(lost_entries)
        entry = oldest_unpinned_entry(skipping=held) if shared and not expired else None
        while entry is not None and frees is not None and not frees(entry) and len(held) < ENTRIES_LOOKED_AT:
            held.append(entry.id)
            entry = oldest_unpinned_entry(skipping=held)
        if entry is not None and (frees is None or frees(entry)):
            if claim_entry_removal(entry):
                return Victim(entry=entry)
            lost.append(f'staged file {entry.id}')
            lost_entries.append(entry.id)
            continue
        if candidate is None:
            return None
        if claim_eviction(candidate):
            return Victim(cart=candidate)
        lost_carts.append(candidate.id)
        lost.append(f'{candidate.cart_uid} (id {candidate.id}, {candidate.status}, used {candidate.updated_date})')
    LOGGER.warning('nothing evicted: %d claims in a row lost, the last on %s', len(lost), lost[-1])
    return None


EXPIRY_BATCH = 100  # expired carts removed per sweep at most


def remove_expired(volume: CartVolume, on_expired: Optional[Callable[[int], None]] = None) -> int:
    """Remove the files of ready carts past their lifetime that nobody is downloading; return how many.

    Each is claimed by compare-and-set (marked expired, its row kept for HEAD's 410 and the
    status document), then its directory and cartuids link go, as an evicted cart's do. A cart
    used within the in-use window (a download in progress marks it every DOWNLOAD_HEARTBEAT_S)
    waits for a later sweep, so no download is cut off. `on_expired` is called with each cart's id
    in the transaction that marks it (its completion event is written there).
    """
    moment = now()
    removed = 0
    for cart in expired_unused(moment, moment - datetime.timedelta(seconds=IN_USE_WINDOW_S), EXPIRY_BATCH):
        with database.atomic():
            claimed = claim_expiry(cart)
            if claimed:
                drop_cart_reservations(cart.id)
                if on_expired is not None:
                    on_expired(cart.id)
        if not claimed:
            continue
        volume.remove_cart_and_link(cart.cart_uid, cart.id)
        removed += 1
        with about(cart_uid=cart.cart_uid, cart_id=cart.id):
            LOGGER.info('cart %s (id %d) expired at %s: its files were removed', cart.cart_uid, cart.id,
                        cart.expires_date)
    return removed


class SpaceKeeper:
    """Admits downloads onto the volume: reserves their bytes, evicting failed, then ready carts when room is short."""

    def __init__(self, settings: Settings, volume: CartVolume) -> None:
        """Keep room on `volume` as lru_purge and lru_buffer_time say."""
        self.settings = settings
        self.volume = volume

    def reserve(self, cart: Cart, file: File, size: Optional[int], partial: Optional[Path],
                tar_offset: Optional[int] = None) -> bool:
        """Make sure the volume has room for the file and for every download already in flight.

        Reservations are serialised in the database (one at a time across all workers) and
        recorded in the reservation table until the file is staged. When room is short and
        lru_purge is on, failed carts' files go (the longest failed first), then ready carts in
        least-recently-used order, until the file fits;
        otherwise NoSpace fails this file (and so its cart) and no other cart is touched.

        Small files skip the database while the volume has a wide margin: all the small
        downloads that can be in flight at once fit in SMALL_FILE_MARGIN. Returns whether a
        reservation was recorded (and must be released).
        """
        wanted = disk_bytes(size or 0)
        if (size or 0) <= SMALL_FILE and self.volume.free_bytes() >= wanted + SMALL_FILE_MARGIN:
            return False
        evicted = 0
        for _ in range(MAX_EVICTIONS_PER_FILE):
            with database.connection(), database.atomic():
                database.serialize_writers()
                # A cart that failed or went meanwhile needs no more bytes: start no download for it.
                # (A duplicate task of a cart finishing or ready goes on: it finds its file staged.)
                state = cart_status(cart.id)
                if state in (None, CartStatus.ERROR.value, CartStatus.DELETED.value):
                    raise CartGone(f'cart id {cart.id} is {state or "gone"}: its files are not pulled')
                in_flight, free = room_in_flight(file.id, self.volume)
                needed = wanted + in_flight
                if needed <= free:
                    if partial is not None:
                        hold_partial(partial, tar_offset)
                    reserve(cart.id, file.id, wanted, partial, tar_offset)
                    return True
                victim = (evict_one(self.settings.lru_buffer_time, self.settings.share_staged_files,
                                    lambda entry: self.volume.staged_file_links(entry.id) <= 1)
                          if self.settings.lru_purge else None)
                if victim is not None:
                    # Still holding the lock: the next reservation must see the bytes freed.
                    victim.remove(self.volume)
            if victim is None:
                after = f' after evicting {evicted} carts or staged files' if evicted else ''
                raise NoSpace(f'No space left on the volume for {size} bytes: {needed} bytes needed with the '
                              f'downloads in flight, {free} free{after}')
            evicted += 1
            LOGGER.warning('evicted %s to make room for cart %s', victim.describe(), cart.cart_uid)
        raise NoSpace(f'No space left on the volume for {size} bytes after evicting {evicted} carts or staged files')

    @contextlib.contextmanager
    def reservation(self, cart: Cart, file: File, size: Optional[int], partial: Optional[Path],
                    tar_offset: Optional[int] = None) -> Iterator[bool]:
        """Reserve room for the file's download (see reserve) for as long as the block runs.

        Yields whether a reservation was recorded. If the block fails, the reservation is
        released (and the temp file it made removed); on success the block releases it itself
        once every byte is on disk.
        """
        reserved = self.reserve(cart, file, size, partial, tar_offset)
        try:
            yield reserved
        except BaseException:
            if reserved:
                if partial is not None and tar_offset is None:
                    partial.unlink(missing_ok=True)
                self.release(file.id)
            raise

    @staticmethod
    def release(file_id: int) -> None:
        """Release a file's reservation in a connection of its own (a pool thread has none)."""
        with database.connection():
            release(file_id)
