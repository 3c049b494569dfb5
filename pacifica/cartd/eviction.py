"""Room on the volume: bytes reserved by downloads in flight, and which ready carts may be evicted (LRU)."""
from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Optional, Sequence

from peewee import fn

from .orm import Cart, CartStatus, File, SpaceReservation, now

# A cart whose tar is being sent is marked used at least this often (see CartService.download),
# so a cart used more recently than twice that is never evicted from under a download.
DOWNLOAD_HEARTBEAT_S = 30.0
IN_USE_WINDOW_S = 2 * DOWNLOAD_HEARTBEAT_S + 30.0
BLOCK = 4096
MAX_EXTENTS = 100000  # data extents looked at in one file region at most


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
    rows = (SpaceReservation.select(SpaceReservation.bytes, SpaceReservation.partial, SpaceReservation.tar_offset)
            .join(Cart, on=(SpaceReservation.cart == Cart.id))
            .where((SpaceReservation.file != excluding_file_id)
                   & (Cart.status != CartStatus.DELETED.value)))
    return sum(max(row.bytes - _written(row.partial, row.tar_offset, row.bytes), 0) for row in rows)


def _written(partial: Optional[str], offset: Optional[int], length: int) -> int:
    """Disk bytes a download has already written (they are already out of the free count).

    A temp file's are its allocated blocks. A file written in place into the bundle tar
    (which is sparse until every file is in it) has written the data extents of its region.
    """
    if not partial:
        return 0
    try:
        if offset is None:
            return os.stat(partial).st_blocks * 512
        return allocated_in(partial, offset, length - BLOCK)  # disk_bytes added a block or more to the size
    except OSError:
        return 0


def allocated_in(path: str, start: int, length: int) -> int:
    """Bytes of [start, start + length) of a sparse file that hold data (SEEK_DATA / SEEK_HOLE)."""
    end = start + length
    total = 0
    descriptor = os.open(path, os.O_RDONLY)
    try:
        position = start
        for _ in range(MAX_EXTENTS):
            if position >= end:
                break
            try:
                data = os.lseek(descriptor, position, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole (or the end of the file) after position
                break
            if data >= end:
                break
            hole = os.lseek(descriptor, data, os.SEEK_HOLE)
            total += min(hole, end) - data
            position = hole
    finally:
        os.close(descriptor)
    return total


def track_partial(file_id: int, partial: Path) -> None:
    """Say which temp file a reserved download is writing now (a new one for each attempt)."""
    SpaceReservation.update(partial=str(partial)).where(SpaceReservation.file == file_id).execute()


def reserve(cart_id: int, file_id: int, size: int, partial: Optional[Path], tar_offset: Optional[int] = None) -> None:
    """Record that this file's download may write `size` disk bytes into `partial` (replacing an older record).

    With `tar_offset`, `partial` is the cart's bundle tar and the file's bytes go to its region
    from that offset on. Without `partial` the whole size counts until the file is released.
    """
    SpaceReservation.delete().where(SpaceReservation.file == file_id).execute()
    SpaceReservation.create(file=file_id, cart=cart_id, bytes=size, partial=None if partial is None else str(partial),
                            tar_offset=tar_offset)


def release(file_id: int) -> None:
    """The file is on disk (or failed): its bytes are no longer in flight."""
    SpaceReservation.delete().where(SpaceReservation.file == file_id).execute()


def release_files(file_ids: Sequence[int]) -> None:
    """Several files are on disk: their bytes are no longer in flight."""
    SpaceReservation.delete().where(SpaceReservation.file.in_(list(file_ids))).execute()


def release_cart(cart_id: int) -> None:
    """Forget every reservation of a cart that finished or went away."""
    SpaceReservation.delete().where(SpaceReservation.cart == cart_id).execute()


def evict_one(lru_buffer_time: float) -> Optional[Cart]:
    """Mark the least-recently-used evictable cart deleted and return it, or None if none may go.

    Evictable: ready, and not used (created, finished or downloaded) within lru_buffer_time
    or the in-use window that covers downloads in progress. Claimed by compare-and-set, so
    two processes never evict the same cart twice.
    """
    protect = max(lru_buffer_time, IN_USE_WINDOW_S)
    cutoff = now() - datetime.timedelta(seconds=protect)
    for _ in range(10):
        candidate = (Cart.select(Cart.id, Cart.cart_uid, Cart.updated_date)
                     .where((Cart.status == CartStatus.READY.value) & (Cart.updated_date < cutoff))
                     .order_by(Cart.updated_date, Cart.id).first())
        if candidate is None:
            return None
        claimed = (Cart.update(status=CartStatus.DELETED.value, deleted_date=now(),
                               error='evicted to make room on the volume')
                   .where((Cart.id == candidate.id) & (Cart.status == CartStatus.READY.value)
                          & (Cart.updated_date == candidate.updated_date)).execute())
        if claimed:
            return candidate
    return None


def cart_bytes(cart_id: int) -> int:
    """Bytes a cart's files take on disk (from the sizes the archive reported)."""
    total = File.select(fn.SUM(File.size)).where(File.cart == cart_id).scalar()
    return int(total or 0)
