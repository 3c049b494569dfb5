"""The cart's use cases and its state machine; owns every transaction, knows no web or queue framework."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import functools
import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import (Any, BinaryIO, Callable, Dict, Iterable, Iterator, List, Optional, Protocol, Sequence, Tuple,
                    cast)

import jsonschema
from peewee import chunked

from . import database
from .archive import MEDIA_ERROR, ArchiveClient, ArchiveStatus, Download
from .config import Settings
from .eviction import (
    DOWNLOAD_HEARTBEAT_S,
    bytes_in_flight,
    disk_bytes,
    evict_one,
    release,
    release_cart,
    release_files,
    reserve,
    track_partial,
)
from .errors import (
    ArchiveMediaError,
    BadRequest,
    CartGone,
    CartNotFound,
    CartNotReady,
    FileStageError,
    HashMismatch,
    NoSpace,
    QueueUnavailable,
)
from .orm import DB, Cart, CartStatus, CartTasks, File, FileStatus, now
from .volume import (CartVolume, TarLayout, TarMember, cart_relative_path, check_cart_uid, directories_size,
                     locked_region, member_region, path_conflicts)

LOGGER = logging.getLogger(__name__)

LIVE_STATUSES = (CartStatus.WAITING.value, CartStatus.STAGING.value)
HASH_TYPES = frozenset(name.lower() for name in hashlib.algorithms_available if not name.lower().startswith('shake'))
INSERT_CHUNK = 200
MAX_ARCHIVE_ID_CHARS = 255  # the published schema stores archive ids in VARCHAR(255)
HEARTBEAT_S = 30.0
FLUSH_FILES = 64  # staged files recorded per transaction at most
FLUSH_SECONDS = 0.25  # and at least this often while files arrive
SMALL_FILE = 256 * 1024  # files this small are not reserved one by one ...
SMALL_FILE_MARGIN = 256 * 1024 * 1024  # ... while the volume has this much more free
MAX_EVICTIONS_PER_FILE = 1000  # how often a long download tells the reconciler it is alive
RECONCILE_BATCH = 100  # carts re-driven per reconcile pass
STALE_AT_ONCE = datetime.datetime(2000, 1, 1)  # an updated_date the next reconcile treats as stalled
SENDFILE_SLICE = 64 << 20  # bytes handed to a zero-copy send at once, between download heartbeats
# A server's zero-copy send: (open file, offset, count) -> bytes sent.
SendFile = Callable[[BinaryIO, int, int], int]

CART_REQUEST_SCHEMA: Dict[str, Any] = {
    'type': 'object',
    'required': ['fileids'],
    'properties': {
        'fileids': {
            'type': 'array',
            'items': {
                'type': 'object',
                'required': ['id', 'path', 'hashtype', 'hashsum'],
                'properties': {
                    'id': {'type': ['integer', 'string']},
                    'path': {'type': 'string'},
                    'hashtype': {'type': 'string'},
                    'hashsum': {'type': 'string'},
                },
            },
        },
        'bundle': {'type': 'boolean'},
    },
}
_VALIDATOR = jsonschema.Draft7Validator(CART_REQUEST_SCHEMA)


class TaskQueue(Protocol):
    """What the service needs of a task queue (Celery in production)."""

    def enqueue_stage(self, cart_id: int, file_ids: Sequence[int], countdown: float = 0,
                      tape_round: int = 0) -> str:
        """Queue staging of these files; return the task id."""

    def enqueue_bundle(self, cart_id: int) -> str:
        """Queue the bundling of a cart whose files are all staged."""

    def revoke(self, task_ids: Sequence[str]) -> None:
        """Best effort: tell workers to drop these queued tasks."""


@dataclasses.dataclass(frozen=True)
class FileRequest:
    """One checked entry of a cart request."""

    archive_id: str
    path: str
    hash_type: str
    hash_value: str


@dataclasses.dataclass(frozen=True)
class CartRequest:
    """A checked cart request."""

    files: Tuple[FileRequest, ...]
    bundle: Optional[bool]


@dataclasses.dataclass(frozen=True)
class CartState:
    """What HEAD reports: the wire status and message."""

    status: str
    message: str


@dataclasses.dataclass(frozen=True)
class CartDownload:
    """A ready cart's tar, laid out for the requested name."""

    layout: TarLayout
    filename: str
    cart_id: int

    def body(self, start: int, end: int, chunk_size: int,
             send_file: Optional[SendFile] = None) -> Iterator[bytes]:
        """The tar's bytes [start, end); while they flow the cart is marked used, so it is not evicted.

        With `send_file` (a server's zero-copy channel to the client) the files' bytes are
        handed to it and only the tar headers pass through this iterator.
        """
        heartbeat = _Heartbeat(self.cart_id, DOWNLOAD_HEARTBEAT_S)
        for piece in self.layout.pieces(start, end):
            if isinstance(piece, bytes):
                yield piece
            elif send_file is None:
                for chunk in piece.read(chunk_size):
                    yield chunk
                    heartbeat()
            else:
                with open(piece.path, 'rb') as handle:
                    position, remaining = piece.offset, piece.length
                    while remaining > 0:
                        sent = send_file(handle, position, min(remaining, SENDFILE_SLICE))
                        if sent <= 0:
                            raise OSError(f'{piece.path} is shorter than the cart recorded')
                        position += sent
                        remaining -= sent
                        heartbeat()


@dataclasses.dataclass(frozen=True)
class StageOutcome:
    """How one file's staging attempt ended: staged, still on tape, or failed."""

    file_id: int
    on_tape: bool = False
    error: Optional[str] = None
    download: Optional[Download] = None


def _where(error: jsonschema.ValidationError) -> str:
    path = ''.join(f'[{part}]' if isinstance(part, int) else f'.{part}' for part in error.absolute_path)
    return path.lstrip('.') or 'the body'


def parse_cart_request(body: Any) -> CartRequest:
    """Check a POST body against the schema and the cart's rules; raise BadRequest saying what is wrong."""
    error = next(iter(sorted(_VALIDATOR.iter_errors(body), key=lambda err: list(err.absolute_path))), None)
    if error is not None:
        raise BadRequest(f'invalid cart request: {_where(error)}: {error.message}')
    files: List[FileRequest] = []
    for index, entry in enumerate(body['fileids']):
        archive_id = str(entry['id'])
        if not archive_id or any(ord(char) < 0x20 or 0xD800 <= ord(char) <= 0xDFFF for char in archive_id):
            raise BadRequest(f'invalid cart request: fileids[{index}].id is empty or has control characters')
        if len(archive_id) > MAX_ARCHIVE_ID_CHARS:
            raise BadRequest(f'invalid cart request: fileids[{index}].id is longer than {MAX_ARCHIVE_ID_CHARS} '
                             'characters')
        hash_type = entry['hashtype'].lower()
        if hash_type not in HASH_TYPES:
            raise BadRequest(f'invalid cart request: fileids[{index}].hashtype: '
                             f'unsupported hash type {entry["hashtype"]!r}')
        hash_value = entry['hashsum'].strip().lower()
        expected_length = hashlib.new(hash_type).digest_size * 2
        if len(hash_value) != expected_length or any(char not in '0123456789abcdef' for char in hash_value):
            raise BadRequest(f'invalid cart request: fileids[{index}].hashsum is not a {hash_type} hex digest')
        try:
            path = cart_relative_path(entry['path'])
        except BadRequest as exc:
            raise BadRequest(f'invalid cart request: fileids[{index}].path: {exc.message}') from exc
        files.append(FileRequest(archive_id, path, hash_type, hash_value))
    conflict = path_conflicts(file.path for file in files)
    if conflict is not None:
        raise BadRequest(f'invalid cart request: path {conflict!r} is given twice (or as a file and a directory)')
    return CartRequest(files=tuple(files), bundle=body.get('bundle'))


def _cart_message(file: File, cause: str) -> str:
    return f'Failed to pull file({file.bundle_path} (archive id {file.file_name}): {cause})'


def _files_in_tar_order(cart_id: int) -> List[File]:
    """A cart's files in their tar's order: those placed in the bundle tar by place, then the rest by id."""
    files = File.select(File.bundle_path, File.size, File.mtime, File.id, File.tar_offset).where(File.cart == cart_id)
    return sorted(files, key=lambda file: (file.tar_offset is None, file.tar_offset or 0, file.id))


def _tar_created(cart: Cart) -> float:
    """The mtime of the tar's directories: when the cart was created."""
    return cart.creation_date.timestamp() if cart.creation_date else time.time()


class _Heartbeat:
    """Called as bytes move; at most every `interval` seconds it marks the cart as touched now.

    Staging marks a long download alive, so the reconciler does not take it for stalled;
    a download to a client marks the cart used, so it is not evicted from under it.
    """

    def __init__(self, cart_id: int, interval: float) -> None:
        self.cart_id = cart_id
        self.interval = interval
        self.last = time.monotonic()

    def __call__(self) -> None:
        moment = time.monotonic()
        if moment - self.last >= self.interval:
            self.last = moment
            with database.connection():
                Cart.update(updated_date=now()).where(Cart.id == self.cart_id).execute()


class CartService:
    """The cart's use cases, callable from the REST layer, a task or the command line."""

    def __init__(self, settings: Settings, queue: Optional[TaskQueue] = None,
                 archive: Optional[ArchiveClient] = None) -> None:
        """Wire the settings, the volume, and (where needed) the task queue and archive client."""
        self.settings = settings
        self.volume = CartVolume(settings.volume_path)
        self.queue = queue
        self.archive = archive or ArchiveClient(
            settings.archive_url, settings.archive_timeout, settings.transfer_size,
            settings.archive_retries, settings.archive_retry_wait)
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._pool_lock = threading.Lock()

    # ---- requests from clients -------------------------------------------------

    def create_cart(self, cart_uid: str, body: Any) -> int:
        """Record a cart and its files, then queue their staging; return the cart's row id."""
        check_cart_uid(cart_uid)
        request = parse_cart_request(body)
        bundle = self.settings.bundle_task if request.bundle is None else request.bundle
        with DB.atomic():
            # A bundle's tar starts with its directories; files are then placed after them.
            start = directories_size(cart_uid, [item.path for item in request.files]) if bundle else 0
            cart = Cart.create(cart_uid=cart_uid, status=CartStatus.STAGING.value, bundle=bundle,
                               files_total=len(request.files), bundle_size=start)
            rows = [{'cart': cart.id, 'file_name': item.archive_id, 'bundle_path': item.path,
                     'hash_type': item.hash_type, 'hash_value': item.hash_value,
                     'status': FileStatus.WAITING.value} for item in request.files]
            for batch in chunked(rows, INSERT_CHUNK):
                File.insert_many(batch).execute()
            file_ids = [row.id for row in File.select(File.id).where(File.cart == cart.id).order_by(File.id)]
        LOGGER.info('cart %s (id %d): %d files, bundle %s', cart_uid, cart.id, len(file_ids), bundle)
        if not file_ids:
            self._finish(cart.id)
            return cart.id
        self._queue_batches(cart.id, file_ids)
        return cart.id

    def _queue_batches(self, cart_id: int, file_ids: Sequence[int]) -> None:
        """Queue the files in batches; if the broker refuses, leave the cart for the reconciler.

        The cart's rows are committed before this runs, so nothing is lost: a cart that
        could not be queued is marked stale at once and re-queued by the next reconcile.
        """
        if self.queue is None:
            raise QueueUnavailable('no task queue is configured')
        task_ids: List[str] = []
        try:
            for batch in chunked(file_ids, self.settings.stage_batch_size):
                task_ids.append(self.queue.enqueue_stage(cart_id, list(batch)))
        except Exception as exc:  # any broker failure: the reconciler takes over
            message = f'Waiting for the task queue ({type(exc).__name__}: {exc}); will retry'
            LOGGER.error('cart id %d: %s', cart_id, message)
            (Cart.update(error=message[:2000], updated_date=STALE_AT_ONCE)
             .where((Cart.id == cart_id) & (Cart.status.in_(LIVE_STATUSES))).execute())
        self._record_tasks(cart_id, task_ids)

    @staticmethod
    def _record_tasks(cart_id: int, task_ids: Sequence[str]) -> None:
        if not task_ids:
            return
        with DB.atomic():
            for task_batch in chunked(task_ids, INSERT_CHUNK):
                CartTasks.insert_many([{'cart': cart_id, 'celery_task_id': task} for task in task_batch]).execute()

    @staticmethod
    def _live_carts(cart_uid: str, *fields: Any) -> List[Cart]:
        """Live carts with exactly this uid, newest first.

        The indexed lookup may also match other spellings (MySQL's default collation
        ignores case and trailing spaces), so the exact match is checked here too.
        """
        candidates = (Cart.select(*fields, Cart.cart_uid)
                      .where((Cart.cart_uid == cart_uid) & (Cart.status != CartStatus.DELETED.value))
                      .order_by(Cart.creation_date.desc(), Cart.id.desc()))
        return [cart for cart in candidates if cart.cart_uid == cart_uid]

    @classmethod
    def _live_cart(cls, cart_uid: str) -> Optional[Cart]:
        carts = cls._live_carts(cart_uid, *Cart._meta.sorted_fields)
        return carts[0] if carts else None

    def status(self, cart_uid: str) -> CartState:
        """The newest live cart's wire status and message (one indexed query)."""
        cart = self._live_cart(cart_uid)
        if cart is None:
            raise CartNotFound(f'No cart with uid {cart_uid} found')
        status = CartStatus(cart.status)
        return CartState(status.wire, '' if status == CartStatus.READY else cart.error)

    def download(self, cart_uid: str, filename: str, top: str) -> CartDownload:
        """Lay out the ready cart's tar under the top directory `top`; count it as a use."""
        cart = self._live_cart(cart_uid)
        if cart is None:
            raise CartNotFound('The cart does not exist or has already been deleted')
        if cart.status != CartStatus.READY.value:
            raise CartNotReady('The cart is not ready for download.')
        members = self._members(cart, _files_in_tar_order(cart.id))
        Cart.update(updated_date=now()).where(Cart.id == cart.id).execute()
        return CartDownload(TarLayout(top, members, _tar_created(cart)), filename, cart.id)

    def _staged_member(self, cart: Cart, file: File) -> TarMember:
        """The file as a tar member read from where it was staged."""
        return TarMember(file.bundle_path, file.size or 0, file.mtime or 0.0,
                         self.volume.file_path(cart.id, cart.cart_uid, file.bundle_path))

    def _members(self, cart: Cart, files: Sequence[File]) -> List[TarMember]:
        """Where each file's bytes are: its staged file, or its place in the bundle tar."""
        plain = [self._staged_member(cart, file) for file in files]
        if not cart.bundle:
            return plain
        tar_path = self.volume.tar_path(cart.id, cart.cart_uid)
        on_disk = TarLayout(cart.cart_uid, plain, 0)
        return [dataclasses.replace(member, source=tar_path, source_offset=offset)
                for member, offset in zip(plain, on_disk.file_offsets, strict=True)]

    def delete(self, cart_uid: str) -> int:
        """Delete every live cart with this uid: mark, revoke its tasks, remove its files."""
        with DB.atomic():
            carts = self._live_carts(cart_uid, Cart.id)
            if not carts:
                raise CartNotFound('Not Found')
            cart_ids = [cart.id for cart in carts]
            Cart.update(status=CartStatus.DELETED.value, deleted_date=now(), updated_date=now()).where(
                Cart.id.in_(cart_ids)).execute()
            for cart_id in cart_ids:
                release_cart(cart_id)
            task_ids = [task.celery_task_id for task in
                        CartTasks.select(CartTasks.celery_task_id).where(CartTasks.cart.in_(cart_ids))]
        if self.queue is not None and task_ids:
            try:
                self.queue.revoke(task_ids)
            except Exception as exc:  # the tasks check the cart's status anyway
                LOGGER.warning('could not revoke tasks of cart %s: %s', cart_uid, exc)
        for cart_id in cart_ids:
            self.volume.unlink_cart(cart_uid, cart_id)
            self.volume.remove_cart(cart_id)
        LOGGER.info('cart %s deleted (ids %s)', cart_uid, cart_ids)
        return len(cart_ids)

    # ---- work done by the workers ------------------------------------------------

    def _thread_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=self.settings.stage_concurrency, thread_name_prefix='cartd-stage')
            return self._pool

    def stage_files(self, cart_id: int, file_ids: Sequence[int], tape_round: int = 0,
                    on_done: Optional[Callable[[StageOutcome], None]] = None) -> List[int]:
        """Stage the listed files of a cart in parallel; return those still on tape.

        Threads download and verify; this thread records what they staged in one
        transaction per FLUSH_FILES files or FLUSH_SECONDS, so the database work per file is a
        fraction of a statement. Safe to run twice: files already staged are skipped, and a
        cart that is no longer staging (deleted, failed) is left alone. Whoever records the
        last file finishes the cart. `on_done` hears about each file as it ends.
        """
        cart = Cart.get_or_none(Cart.id == cart_id)
        if cart is None or cart.status not in LIVE_STATUSES:
            LOGGER.info('cart id %d is %s: nothing to stage', cart_id, cart.status if cart else 'gone')
            return []
        files = list(File.select().where(File.id.in_(list(file_ids))
                                         & (File.status != FileStatus.STAGED.value)).order_by(File.id))
        if not files:
            self._finish(cart_id)
            return []
        pool = self._thread_pool()
        futures = [pool.submit(self._stage_in_thread, cart, file) for file in files]
        on_tape: List[int] = []
        staged: List[StageOutcome] = []
        failed = False
        last_flush = time.monotonic()
        try:
            for future in concurrent.futures.as_completed(futures):
                outcome = future.result()
                failed = failed or outcome.error is not None
                if outcome.on_tape:
                    on_tape.append(outcome.file_id)
                if outcome.download is not None:
                    staged.append(outcome)
                if staged and (len(staged) >= FLUSH_FILES or time.monotonic() - last_flush >= FLUSH_SECONDS):
                    self._record_staged(cart, staged)
                    staged, last_flush = [], time.monotonic()
                if on_done is not None:
                    on_done(outcome)
            if staged:
                self._record_staged(cart, staged)
        except CartGone:
            for future in futures:
                future.cancel()
            concurrent.futures.wait(futures)
            self._cleanup_if_deleted(cart.id)  # what the running downloads wrote meanwhile
            LOGGER.info('cart %s (id %d) went away while staging', cart.cart_uid, cart.id)
            return []
        # A DELETE while these downloads ran makes them fail (their directory vanished), and a
        # sibling's mkdir may have made the directory again after the DELETE removed it.
        if failed and self._cleanup_if_deleted(cart.id):
            LOGGER.info('cart %s (id %d) went away while staging', cart.cart_uid, cart.id)
            return []
        return sorted(on_tape)

    def _stage_in_thread(self, cart: Cart, file: File) -> StageOutcome:
        """Stage one file in a pool thread; failures are recorded here, successes by the caller."""
        try:
            return self._stage_one(cart, file)
        except FileStageError as exc:
            message = exc.message
            LOGGER.warning('cart %s file %s (%s) failed: %s', cart.cart_uid, file.bundle_path, file.file_name, exc)
        except OSError as exc:
            message = f'cannot write to the volume: {exc.strerror or exc}'
            with database.connection():
                live = Cart.select().where((Cart.id == cart.id) & Cart.status.in_(LIVE_STATUSES)).exists()
            if not live:  # a DELETE removed the cart's directory under the download
                LOGGER.info('cart %s file %s: the cart went away while it downloaded', cart.cart_uid,
                            file.bundle_path)
                return StageOutcome(file.id, error=message)
            LOGGER.error('cart %s file %s: %s', cart.cart_uid, file.bundle_path, message)
        with database.connection():
            self._fail_file(cart.id, file, message)
        return StageOutcome(file.id, error=message)

    def _stage_one(self, cart: Cart, file: File) -> StageOutcome:
        status: ArchiveStatus = self.archive.with_retries(lambda: self.archive.status(file.file_name))
        if status.media == MEDIA_ERROR:
            raise ArchiveMediaError(f'the archive reports the media of the file as error: {status.message}')
        if not status.on_disk:
            self.archive.with_retries(lambda: self.archive.stage(file.file_name))
            LOGGER.info('cart %s file %s is on %s: recall requested', cart.cart_uid, file.bundle_path, status.media)
            return StageOutcome(file.id, on_tape=True)
        if cart.bundle and status.size is not None and status.size > SMALL_FILE:
            with database.connection():
                offset = self._place_in_tar(cart, file, status.size)
            if offset is not None:
                return self._stage_in_place(cart, file, status, offset)
        final = self.volume.file_path(cart.id, cart.cart_uid, file.bundle_path)
        partial = self.volume.partial_path(cart.id, file.id)
        reserved = self._reserve_space(cart, file, status.size, partial)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            download = self._download_verified(cart, file, status, final, partial, reserved)
        except BaseException:
            if reserved:
                with database.connection():
                    release(file.id)
            raise
        return StageOutcome(file.id, download=download)

    def _place_in_tar(self, cart: Cart, file: File, size: int) -> Optional[int]:
        """Where the file's bytes go in its cart's bundle tar: kept from an earlier attempt, or
        the next free place (the cart's bundle_size grows by the file's header, data and padding).

        None when the cart's tar is not laid out this way (a cart from an older version).
        """
        with DB.atomic():
            known = File.select(File.tar_offset, File.size).where(File.id == file.id).first()
            if known is not None and known.tar_offset is not None and known.size == size:
                return int(known.tar_offset)
            header, region = member_region(cart.cart_uid, str(file.bundle_path), size)
            grown = (Cart.update(bundle_size=Cart.bundle_size + region)
                     .where((Cart.id == cart.id) & (Cart.bundle_size > 0)).execute())
            if not grown:
                return None
            end = Cart.select(Cart.bundle_size).where(Cart.id == cart.id).scalar()
            offset = int(end) - region + header
            File.update(tar_offset=offset, size=size).where(File.id == file.id).execute()
        return offset

    def _stage_in_place(self, cart: Cart, file: File, status: ArchiveStatus, offset: int) -> StageOutcome:
        """Download a large file of a bundle cart straight into its place in the bundle tar.

        The region is locked while it is written, and the file is recorded staged before the
        lock is let go, so a duplicated task waits, then finds it staged and writes nothing:
        no bytes land on a region after it was verified. Returns an outcome already recorded.
        """
        size = status.size
        assert size is not None
        staging = self.volume.bundle_staging_path(cart.id)
        reserved = self._reserve_space(cart, file, size, staging, offset)
        try:
            with locked_region(staging, offset, size):
                with database.connection():
                    current = File.get_or_none(File.id == file.id)
                    state = Cart.select(Cart.status).where(Cart.id == cart.id).scalar()
                if current is not None and current.status != FileStatus.STAGED.value and state in LIVE_STATUSES:
                    download = self._second_chance(
                        cart, file, lambda: self._download_into(cart, file, status, staging, offset))
                    with database.connection():
                        self._record_staged(cart, [StageOutcome(file.id, download=download)])
            if state in (None, CartStatus.DELETED.value):  # a late task: what it opened goes
                self.volume.remove_cart(cart.id)
            elif state in (CartStatus.READY.value, CartStatus.ERROR.value):
                staging.unlink(missing_ok=True)
        except BaseException:
            if reserved:
                with database.connection():
                    release(file.id)
            raise
        return StageOutcome(file.id)

    def _download_into(self, cart: Cart, file: File, status: ArchiveStatus, target: Path,
                       offset: Optional[int] = None) -> Download:
        """One verified download (transient faults retried) into a temp file, or at offset into the tar."""
        download = self.archive.with_retries(functools.partial(
            self.archive.download, file.file_name, target, str(file.hash_type), str(file.hash_value),
            status.size, self._staging_heartbeat(cart.id), offset=offset))
        return Download(download.size, status.mtime if status.mtime is not None else download.mtime)

    def _staging_heartbeat(self, cart_id: int) -> _Heartbeat:
        return _Heartbeat(cart_id, min(HEARTBEAT_S, self.settings.stall_timeout / 3))

    @staticmethod
    def _second_chance(cart: Cart, file: File, attempt: Callable[[], Download]) -> Download:
        """Run a download attempt; after a hash mismatch, run it once more."""
        try:
            return attempt()
        except HashMismatch:
            LOGGER.info('cart %s file %s: hash mismatch, downloading once more', cart.cart_uid, file.bundle_path)
        return attempt()

    def _reserve_space(self, cart: Cart, file: File, size: Optional[int], partial: Optional[Path],
                       tar_offset: Optional[int] = None) -> bool:
        """Make sure the volume has room for the file and for every download already in flight.

        Reservations are serialised in the database (one at a time across all workers) and
        recorded in the reservation table until the file is staged. When room is short and
        lru_purge is on, ready carts go in least-recently-used order until the file fits;
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
            with database.connection(), DB.atomic():
                database.serialize_writers()
                # A cart that failed or went meanwhile needs no more bytes: start no download for it.
                # (A duplicate task of a cart finishing or ready goes on: it finds its file staged.)
                state = Cart.select(Cart.status).where(Cart.id == cart.id).scalar()
                if state in (None, CartStatus.ERROR.value, CartStatus.DELETED.value):
                    raise CartGone(f'cart id {cart.id} is {state or "gone"}: its files are not pulled')
                needed = wanted + bytes_in_flight(file.id)
                free = self.volume.free_bytes()
                if needed <= free:
                    reserve(cart.id, file.id, wanted, partial, tar_offset)
                    return True
                victim = evict_one(self.settings.lru_buffer_time) if self.settings.lru_purge else None
                if victim is not None:
                    # Still holding the lock: the next reservation must see the bytes freed.
                    self.volume.unlink_cart(victim.cart_uid, victim.id)
                    self.volume.remove_cart(victim.id)
            if victim is None:
                after = f' after evicting {evicted} carts' if evicted else ''
                raise NoSpace(f'No space left on the volume for {size} bytes: {needed} bytes needed with the '
                              f'downloads in flight, {free} free{after}')
            evicted += 1
            LOGGER.warning('evicted cart %s (id %d, last used %s) to make room for cart %s',
                           victim.cart_uid, victim.id, victim.updated_date, cart.cart_uid)
        raise NoSpace(f'No space left on the volume for {size} bytes after evicting {evicted} carts')

    def _download_verified(self, cart: Cart, file: File, status: ArchiveStatus, final: Path, partial: Path,
                           reserved: bool) -> Download:
        """Download into a temp file until whole and matching, then rename it into place."""
        partials = [partial]

        def attempt() -> Download:
            current = partials[-1]
            try:
                download = self._download_into(cart, file, status, current)
                if download.mtime is not None:
                    os.utime(current, (download.mtime, download.mtime))
                if reserved:
                    # Every byte is on disk (the free count has them): nothing more is in flight.
                    # Released before the rename, as the reservation names the temp file: after
                    # it, a reservation waiting for the lock would count these bytes twice.
                    with database.connection():
                        release(file.id)
                os.replace(current, final)
                return download
            except HashMismatch:
                partials.append(self.volume.partial_path(cart.id, file.id))
                if reserved:
                    with database.connection():
                        track_partial(file.id, partials[-1])
                raise
            finally:
                current.unlink(missing_ok=True)

        return self._second_chance(cart, file, attempt)

    def _record_staged(self, cart: Cart, outcomes: Sequence[StageOutcome]) -> None:
        """Mark files staged and count them, in one transaction; finish the cart if they were the last.

        Only files not already staged are counted, so a duplicated task never counts twice.
        Raises CartGone (after cleaning up) when the cart stopped staging meanwhile.
        """
        by_id = {outcome.file_id: outcome for outcome in outcomes}
        try:
            with DB.atomic():
                fresh = [row.id for row in File.select(File.id).where(
                    File.id.in_(list(by_id)) & (File.status != FileStatus.STAGED.value))]
                rows = []
                for file_id in fresh:
                    download = by_id[file_id].download
                    assert download is not None
                    rows.append(File(id=file_id, status=FileStatus.STAGED.value, size=download.size,
                                     mtime=download.mtime, error=''))
                if rows:
                    File.bulk_update(rows, fields=[File.status, File.size, File.mtime, File.error],
                                     batch_size=INSERT_CHUNK)
                release_files(list(by_id))
                if not fresh:
                    return  # duplicates of work already recorded
                counted = (Cart.update(files_staged=Cart.files_staged + len(fresh), updated_date=now())
                           .where((Cart.id == cart.id) & (Cart.status.in_(LIVE_STATUSES)))
                           .execute())
                if not counted:
                    raise CartGone(f'cart id {cart.id} is no longer staging')
        except CartGone:
            self._cleanup_if_deleted(cart.id)
            raise
        self._finish(cart.id)

    def _cleanup_if_deleted(self, cart_id: int) -> bool:
        """Remove what is on disk of a cart that was deleted (or purged); tell whether it was."""
        cart = Cart.select(Cart.status).where(Cart.id == cart_id).first()
        if cart is None or cart.status == CartStatus.DELETED.value:
            self.volume.remove_cart(cart_id)
            return True
        return False

    def _finish(self, cart_id: int, bundle_now: bool = True) -> None:
        """Move a cart whose files are all staged on, exactly once (compare-and-set on its status)."""
        claimed = (Cart.update(status=CartStatus.BUNDLING.value, updated_date=now())
                   .where((Cart.id == cart_id) & (Cart.status.in_(LIVE_STATUSES))
                          & (Cart.files_staged >= Cart.files_total))
                   .execute())
        if claimed and bundle_now:
            self.bundle(cart_id)

    def bundle(self, cart_id: int) -> None:
        """Make a cart in `bundling` ready: write its tar when it asked for one, link it, mark it ready."""
        self._finish(cart_id, bundle_now=False)
        cart = Cart.get_or_none(Cart.id == cart_id)
        if cart is None or cart.status != CartStatus.BUNDLING.value:
            return
        files_dir = self.volume.files_dir(cart.id, cart.cart_uid)
        target = files_dir
        try:
            files_dir.mkdir(parents=True, exist_ok=True)
            # Downloads killed with their worker leave temp files; every file is staged now.
            self.volume.remove_partials(cart.id)
            release_cart(cart.id)
            if cart.bundle:
                target = self.volume.tar_path(cart.id, cart.cart_uid)
                self._write_bundle(cart, target)
                self.volume.remove_files(cart.id, cart.cart_uid)  # served from the tar from now on
        except OSError:
            # A DELETE removed the cart's files under the bundle being written (and the mkdir
            # above may have made its directory again): what is left goes, nothing failed.
            if self._cleanup_if_deleted(cart.id):
                LOGGER.info('cart %s (id %d) went away while bundling', cart.cart_uid, cart.id)
                return
            raise
        done = (Cart.update(status=CartStatus.READY.value, bundle_path=str(target), updated_date=now(), error='')
                .where((Cart.id == cart.id) & (Cart.status == CartStatus.BUNDLING.value)).execute())
        if not done:
            self._cleanup_if_deleted(cart.id)
            return
        self.volume.link_ready_cart(cart.cart_uid, target)
        # A DELETE (or an eviction) between marking the cart ready and linking it has already
        # run its unlink, which found no link yet: take the link back out for it.
        if Cart.select().where((Cart.id == cart.id) & (Cart.status == CartStatus.READY.value)).exists():
            LOGGER.info('cart %s (id %d) is ready', cart.cart_uid, cart.id)
        else:
            self.volume.unlink_cart(cart.cart_uid, cart.id)

    def _write_bundle(self, cart: Cart, target: Path) -> None:
        """Write the cart's tar to `target`.

        Large files were written into the staging tar in place; what is left (headers, small
        files, the trailer) is written around them and the tar renamed into place. Should
        the placed files not tile the tar exactly (a file that changed size between
        attempts, a cart from an older version), the tar is written anew from all sources.
        """
        files = _files_in_tar_order(cart.id)
        staging = self.volume.bundle_staging_path(cart.id)
        members = [TarMember(file.bundle_path, file.size or 0, file.mtime or 0.0, staging, int(file.tar_offset))
                   if file.tar_offset is not None else self._staged_member(cart, file) for file in files]
        layout = TarLayout(cart.cart_uid, members, _tar_created(cart))
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

    def _fail_file(self, cart_id: int, file: File, cause: str) -> None:
        """Record a file's failure and fail its cart, unless a duplicate task already staged the file."""
        with DB.atomic():
            failed = (File.update(status=FileStatus.ERROR.value, error=cause)
                      .where((File.id == file.id) & (File.status != FileStatus.STAGED.value)).execute())
            if failed:
                self._set_cart_error(cart_id, _cart_message(file, cause))

    @staticmethod
    def _set_cart_error(cart_id: int, message: str) -> None:
        (Cart.update(status=CartStatus.ERROR.value, error=message, updated_date=now())
         .where((Cart.id == cart_id) & (Cart.status.in_(LIVE_STATUSES + (CartStatus.BUNDLING.value,))))
         .execute())

    def tape_wait(self, tape_round: int) -> float:
        """Seconds before re-checking files on tape: doubling from tape_wait up to tape_wait_max."""
        return min(self.settings.archive_tape_wait * (2 ** tape_round), self.settings.archive_tape_wait_max)

    def requeue_tape_files(self, cart_id: int, file_ids: Sequence[int], tape_round: int) -> None:
        """Queue another look at files still on tape, after a growing delay; the cart is alive meanwhile."""
        if not file_ids or self.queue is None:
            return
        task_id = self.queue.enqueue_stage(cart_id, list(file_ids), countdown=self.tape_wait(tape_round),
                                           tape_round=tape_round + 1)
        Cart.update(updated_date=now()).where(Cart.id == cart_id).execute()
        CartTasks.create(cart=cart_id, celery_task_id=task_id)

    def reconcile(self) -> int:
        """Re-queue the unfinished work of carts that made no progress for stall_timeout seconds.

        Each stalled cart is claimed by compare-and-set on its updated_date, so when several
        workers reconcile at once a cart is re-driven by one of them. Returns carts re-driven.
        """
        if self.queue is None:
            return 0
        threshold = now() - datetime.timedelta(seconds=self.settings.stall_timeout)
        active = LIVE_STATUSES + (CartStatus.BUNDLING.value,)
        stalled = list(Cart.select(Cart.id, Cart.status, Cart.updated_date, Cart.cart_uid)
                       .where(Cart.status.in_(active) & (Cart.updated_date < threshold))
                       .order_by(Cart.updated_date).limit(RECONCILE_BATCH))
        redriven = 0
        for cart in stalled:
            unfinished = [row.id for row in File.select(File.id).where(
                (File.cart == cart.id) & File.status.not_in((FileStatus.STAGED.value, FileStatus.ERROR.value)))]
            note = (f'Re-queued {len(unfinished)} unfinished files at {now():%Y-%m-%d %H:%M:%S} '
                    f'after no progress for {self.settings.stall_timeout:g} s')
            claimed = (Cart.update(updated_date=now(), error=note)
                       .where((Cart.id == cart.id) & (Cart.updated_date == cart.updated_date)
                              & Cart.status.in_(active)).execute())
            if not claimed:
                continue
            redriven += 1
            LOGGER.warning('cart %s (id %d): %s', cart.cart_uid, cart.id, note)
            if cart.status == CartStatus.BUNDLING.value or not unfinished:
                self._record_tasks(cart.id, [self.queue.enqueue_bundle(cart.id)])
            else:
                self._queue_batches(cart.id, unfinished)
        return redriven

    # ---- operators ------------------------------------------------------------------

    @staticmethod
    def dump() -> List[Dict[str, Any]]:
        """Every cart that is not deleted, with its files, as plain data (oldest first)."""
        carts = list(Cart.select().where(Cart.status != CartStatus.DELETED.value).order_by(Cart.id))
        files: Dict[int, List[Dict[str, Any]]] = {cart.id: [] for cart in carts}
        if carts:
            rows = File.select().where(File.cart.in_(list(files))).order_by(File.id).dicts()
            for row in cast(Iterable[Dict[str, Any]], rows):
                files[row['cart']].append({
                    'id': row['id'], 'archive_id': row['file_name'], 'path': row['bundle_path'],
                    'hashtype': row['hash_type'], 'hashsum': row['hash_value'], 'status': row['status'],
                    'error': row['error'], 'size': row['size']})
        return [{'id': cart.id, 'uid': cart.cart_uid, 'status': cart.status, 'bundle': bool(cart.bundle),
                 'error': cart.error, 'files_total': cart.files_total, 'files_staged': cart.files_staged,
                 'created': str(cart.creation_date), 'updated': str(cart.updated_date),
                 'files': files[cart.id]} for cart in carts]

    def purge(self, unused_since: datetime.datetime) -> List[Tuple[int, str]]:
        """Delete carts (rows and files) not used since the given time; return (id, uid) of each."""
        carts = list(Cart.select(Cart.id, Cart.cart_uid).where(Cart.updated_date < unused_since).order_by(Cart.id))
        for cart in carts:
            self.volume.unlink_cart(cart.cart_uid, cart.id)
            self.volume.remove_cart(cart.id)
            with DB.atomic():
                release_cart(cart.id)
                CartTasks.delete().where(CartTasks.cart == cart.id).execute()
                File.delete().where(File.cart == cart.id).execute()
                Cart.delete().where(Cart.id == cart.id).execute()
            LOGGER.info('purged cart %s (id %d)', cart.cart_uid, cart.id)
        return [(cart.id, cart.cart_uid) for cart in carts]

    def fixit_prepare(self, cart_uid: str) -> Tuple[int, List[int]]:
        """Put a cart back to staging, re-marking failed files and staged files missing from disk.

        Returns the cart id and the ids of the files still to stage.
        """
        cart = self._live_cart(cart_uid)
        if cart is None:
            raise CartNotFound(f'No cart with uid {cart_uid} found')
        tar = self.volume.tar_path(cart.id, cart.cart_uid)
        tar_ok = bool(cart.bundle) and cart.status == CartStatus.READY.value and tar.is_file()
        in_place_ok = self.volume.bundle_staging_path(cart.id).is_file()
        with DB.atomic():
            lost = [] if tar_ok else [
                file.id for file in File.select(File.id, File.bundle_path, File.tar_offset).where(
                    (File.cart == cart.id) & (File.status == FileStatus.STAGED.value))
                if not (file.tar_offset is not None and in_place_ok)
                and not self.volume.file_path(cart.id, cart.cart_uid, file.bundle_path).is_file()]
            if lost:
                File.update(status=FileStatus.WAITING.value).where(File.id.in_(lost)).execute()
            File.update(status=FileStatus.WAITING.value, error='').where(
                (File.cart == cart.id) & (File.status == FileStatus.ERROR.value)).execute()
            staged = File.select().where((File.cart == cart.id) & (File.status == FileStatus.STAGED.value)).count()
            todo = [row.id for row in File.select(File.id).where(
                (File.cart == cart.id) & (File.status != FileStatus.STAGED.value)).order_by(File.id)]
            if todo or cart.status != CartStatus.READY.value:
                Cart.update(status=CartStatus.STAGING.value, error='', files_staged=staged,
                            updated_date=now()).where(Cart.id == cart.id).execute()
        return cart.id, todo

    def fixit_finish(self, cart_id: int) -> CartState:
        """Finish a cart whose files fixit staged (or that was stuck before bundling); return its state."""
        self._finish(cart_id)
        cart = Cart.get_by_id(cart_id)
        if cart.status == CartStatus.BUNDLING.value:
            self.bundle(cart_id)
            cart = Cart.get_by_id(cart_id)
        status = CartStatus(cart.status)
        return CartState(status.wire, '' if status == CartStatus.READY else cart.error)
