"""Staging a cart's files: a pool of threads pulling from the archive, each file verified and put in its place."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

from . import database
from .archive import MEDIA_ERROR, ArchiveClient, ArchiveStatus, Download
from .bundling import Bundler
from .cleanup import cart_went_away
from .config import Settings
from .errors import ArchiveFileMissing, ArchiveMediaError, CartGone, FileStageError, HashMismatch, NoSpace
from .events import ERROR
from .eviction import SMALL_FILE, SpaceKeeper, release_files, track_partial
from .fileio import copy_into_region, locked_region
from .heartbeat import Heartbeat
from .logcontext import about, settle
from .orm import (LIVE_STATUSES, SKIP, Cart, CartStatus, File, FileStatus, ReadyEntry, StagedFile, cart_status,
                  count_files_staged, count_hash_mismatches, count_staged, count_staged_of_failed, fail_cart,
                  fail_file, files_to_stage, get_cart, get_file, grow_bundle, mark_recalling, mark_staged,
                  mark_transferring, pin_staged_files, place_file, staged_files_ready, tar_place)
from .stagedfiles import Lease, StagedFiles
from .tarlayout import member_region
from .volume import CartVolume, copy_synced, hard_link, link_whole

LOGGER = logging.getLogger(__name__)

HEARTBEAT_S = 30.0  # how often a long download tells the reconciler it is alive
FLUSH_FILES = 64  # staged files recorded per transaction at most
FLUSH_SECONDS = 0.25  # and at least this often while files arrive
LINKED_AT_ONCE = 512  # files linked from the staged-file cache recorded per transaction at most


@dataclasses.dataclass(frozen=True)
class StageOutcome:
    """How one file's staging attempt ended: staged, still on tape, or failed."""

    file_id: int
    on_tape: bool = False
    error: Optional[str] = None
    download: Optional[Download] = None
    size: Optional[int] = None  # of a file on tape, as the archive said
    attempts: int = 0  # downloads of the file started so far, this task's and earlier ones
    staged_file_id: Optional[int] = None  # the staged-file cache entry it was served from (its pin)
    cache_hit: bool = False  # linked from the cache, no download
    fetched: Optional[ReadyEntry] = None  # the cache entry it was fetched into, to mark ready when recorded
    redo: bool = False  # nothing done: to be staged the usual way (a cached copy that could not be used)


def _cache_hit(file: File, entry: StagedFile, log: AttemptLog) -> StageOutcome:
    """The outcome of a file served from a cache entry without a download: staged with the entry's size and
    mtime (the archive's when it was fetched, its key), pinned on the entry, counted a hit."""
    return StageOutcome(file.id, download=Download(int(entry.size or 0), entry.mtime), attempts=log.attempts(file.id),
                        staged_file_id=entry.id, cache_hit=True)


def _fetched_elsewhere(cart: Cart, file: File, status: ArchiveStatus) -> StageOutcome:
    """The outcome of a file another download is fetching into the cache now: it waits like a file on tape."""
    LOGGER.info('cart %s file %s: another download is fetching it; looked at again later', cart.cart_uid,
                file.bundle_path)
    return StageOutcome(file.id, on_tape=True, size=status.size)


class AttemptLog:
    """Downloads started by one staging task, per file: counted by the threads, recorded by the task's thread.

    Counts start from what the file rows say (downloads started by earlier tasks), so the
    recorded count is the file's total. Only the newest count of each file waits to be
    recorded, so a flush writes one row a file however often it was retried.
    """

    def __init__(self, files: Sequence[File]) -> None:
        """Start from each file's recorded count."""
        self._counts = {file.id: int(file.attempts or 0) for file in files}
        self._unrecorded: Dict[int, int] = {}
        self._lock = threading.Lock()

    def started(self, file_id: int) -> None:
        """A download of the file starts (a first try, a retry or a re-fetch)."""
        with self._lock:
            self._counts[file_id] = self._counts.get(file_id, 0) + 1
            self._unrecorded[file_id] = self._counts[file_id]

    def attempts(self, file_id: int) -> int:
        """Downloads of the file started so far."""
        with self._lock:
            return self._counts.get(file_id, 0)

    def take_unrecorded(self, ended: Set[int]) -> Dict[int, int]:
        """The counts not recorded yet of files still downloading (an ended file's outcome records its own)."""
        with self._lock:
            taken = {file_id: count for file_id, count in self._unrecorded.items() if file_id not in ended}
            self._unrecorded.clear()
        return taken


def _cart_message(file: File, cause: str) -> str:
    return f'Failed to pull file({file.bundle_path} (archive id {file.file_name}): {cause})'


def _missing_message(file: File) -> str:
    """The file's and its cart's error when the archive has no such file: nothing to retry, nothing to wait for."""
    return f'file {file.bundle_path} (archive id {file.file_name}) is not in the archive'


class Stager:
    """Stages files of carts with stage_concurrency threads; whoever records a cart's last file finishes it."""

    def __init__(self, settings: Settings, volume: CartVolume, archive: ArchiveClient, space: SpaceKeeper,
                 bundler: Bundler, on_recalled: Optional[Callable[[float], None]] = None,
                 cache: Optional[StagedFiles] = None) -> None:
        """Pull from `archive` onto `volume`, admitting each download through `space`; `on_recalled` hears,
        for each file staged after a tape recall, the seconds since it was first found on tape; with `cache`
        (share_staged_files), each archive file is staged once and linked into the carts."""
        self.settings = settings
        self.cache = cache
        self.volume = volume
        self.archive = archive
        self.space = space
        self.bundler = bundler
        self.on_recalled = on_recalled
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._pool_lock = threading.Lock()

    def _thread_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=self.settings.stage_concurrency, thread_name_prefix='cartd-stage')
            return self._pool

    def stage_files(self, cart_id: int, file_ids: Sequence[int],
                    on_done: Optional[Callable[[StageOutcome], None]] = None) -> List[int]:
        """Stage the listed files of a cart in parallel; return those still on tape.

        Threads download and verify; this thread records what they staged in one
        transaction per FLUSH_FILES files or FLUSH_SECONDS, so the database work per file is a
        fraction of a statement. Safe to run twice: files already staged are skipped, and a
        cart that is no longer staging (deleted, failed) is left alone. Whoever records the
        last file finishes the cart. `on_done` hears about each file as it ends.
        """
        cart = get_cart(cart_id)
        settle(cart_uid=cart.cart_uid if cart else None, cart_id=cart_id)  # to the task's end (its log lines too)
        if cart is None or cart.status not in LIVE_STATUSES:
            LOGGER.info('cart id %d is %s: nothing to stage', cart_id, cart.status if cart else 'gone')
            return []
        files = files_to_stage(file_ids)
        if not files:
            self.bundler.finish(cart_id)
            return []
        log = AttemptLog(files)
        known: Dict[int, StagedFile] = {}
        if self.cache is not None:
            try:
                files, known = self._link_known(self.cache, cart, files, log, on_done)
            except CartGone:
                return []
            if not files:
                return []
        pool = self._thread_pool()
        finished: 'queue.SimpleQueue[concurrent.futures.Future[StageOutcome]]' = queue.SimpleQueue()
        futures = [pool.submit(self._stage_in_thread, cart, file, log, known.get(file.id)) for file in files]
        for future in futures:
            future.add_done_callback(finished.put)
        on_tape: Dict[int, Optional[int]] = {}
        staged: List[StageOutcome] = []
        ended: Set[int] = set()
        failed = False
        last_flush = time.monotonic()
        try:
            for _ in futures:
                while True:  # until the next file ends; downloads started meanwhile are recorded
                    try:
                        outcome = finished.get(timeout=FLUSH_SECONDS).result()
                        break
                    except queue.Empty:
                        self._record_started(cart, log, ended)
                        if staged:  # staged files are recorded now too, not when the next download ends
                            self._record_staged(cart, staged)
                            staged, last_flush = [], time.monotonic()
                ended.add(outcome.file_id)
                failed = failed or outcome.error is not None
                if outcome.on_tape:
                    on_tape[outcome.file_id] = outcome.size
                if outcome.download is not None:
                    staged.append(outcome)
                if time.monotonic() - last_flush >= FLUSH_SECONDS or len(staged) >= FLUSH_FILES:
                    self._record_started(cart, log, ended)
                    if staged:
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
            cart_went_away(self.volume, cart.id, cart.cart_uid, 'staging')  # what the running downloads wrote
            return []
        # A DELETE while these downloads ran makes them fail (their directory vanished), and a
        # sibling's mkdir may have made the directory again after the DELETE removed it.
        if failed and cart_went_away(self.volume, cart.id, cart.cart_uid, 'staging'):
            return []
        if on_tape:
            with database.atomic():
                mark_recalling(cart.id, on_tape)
        return sorted(on_tape)

    def _link_known(self, cache: StagedFiles, cart: Cart, files: Sequence[File], log: AttemptLog,
                    on_done: Optional[Callable[[StageOutcome], None]] = None
                    ) -> Tuple[List[File], Dict[int, StagedFile]]:
        """Link into the cart, in this thread, the files whose cached bytes are known to have the cart's
        hash (StagedFiles.known_to_match: no request to the archive, no byte read), recorded staged
        LINKED_AT_ONCE at a time; return the files left to the pool, and of those, the entries known to
        match of a bundle cart's large files, which the pool copies into the cart's tar.

        Left to the pool's usual way: files without such an entry, and an entry that is gone from the
        volume, is not of its size, or cannot be linked there.
        """
        matched = cache.known_to_match(files)
        rest: List[File] = []
        to_copy: Dict[int, StagedFile] = {}
        linked: List[StageOutcome] = []
        made: Set[Path] = set()  # directories made in the cart so far
        for file in files:
            entry = matched.get(file.id)
            if entry is None or (cart.bundle and int(entry.size or 0) > SMALL_FILE):
                rest.append(file)
                if entry is not None:
                    to_copy[file.id] = entry
                continue
            final = self.volume.file_path(cart.id, cart.cart_uid, file.bundle_path)
            if final.parent not in made:
                final.parent.mkdir(parents=True, exist_ok=True)
                made.add(final.parent)
            if not link_whole(cache.path(entry.id), final, int(entry.size or 0)):
                rest.append(file)  # gone, another filesystem, or a leftover at its name: the usual way sees to it
                continue
            LOGGER.debug('cart %s file %s: linked from staged file %d', cart.cart_uid, file.bundle_path, entry.id)
            linked.append(_cache_hit(file, entry, log))
            if len(linked) >= LINKED_AT_ONCE:
                self._record_linked(cart, linked, on_done)
                linked = []
        if linked:
            self._record_linked(cart, linked, on_done)
        if len(rest) < len(files):
            LOGGER.info('cart %s: %d of %d files linked from the staged-file cache, their digests on record',
                        cart.cart_uid, len(files) - len(rest), len(files))
        return rest, to_copy

    @staticmethod
    def _record_started(cart: Cart, log: AttemptLog, ended: Set[int]) -> None:
        """Record the files whose downloads started since the last flush as transferring (one transaction)."""
        started = log.take_unrecorded(ended)
        if started:
            with database.atomic():
                mark_transferring(cart.id, started)

    def _record_linked(self, cart: Cart, linked: Sequence[StageOutcome],
                       on_done: Optional[Callable[[StageOutcome], None]]) -> None:
        """Record files linked from the cache staged; `on_done` hears about each once recorded."""
        self._record_staged(cart, linked)
        if on_done is not None:
            for outcome in linked:
                on_done(outcome)

    def _stage_in_thread(self, cart: Cart, file: File, log: AttemptLog,
                         known: Optional[StagedFile] = None) -> StageOutcome:
        """Stage one file in a pool thread (every line logged meanwhile names the cart and the file); `known`:
        a cache entry known to have the cart's bytes of it."""
        with about(cart_uid=cart.cart_uid, cart_id=cart.id, file_path=file.bundle_path, archive_id=file.file_name):
            return self._stage_or_fail(cart, file, log, known)

    def _stage_or_fail(self, cart: Cart, file: File, log: AttemptLog,
                       known: Optional[StagedFile] = None) -> StageOutcome:
        """Stage one file; failures are recorded here, successes by the caller.

        A failure fails the cart, unless the cart skips failed files and the failure is the
        file's own (the archive lacks it, refuses it, or keeps sending other bytes or too few
        after the retries): then the file is left out and the cart goes on. Room on the volume
        and writing to it are the cart service's failures: they fail the cart in either case.
        """
        skippable = mismatch = False
        try:
            return self._stage_one(cart, file, log, known)
        except ArchiveFileMissing as exc:
            message = cart_error = _missing_message(file)
            skippable = True
            LOGGER.warning('cart %s: %s (%s)', cart.cart_uid, message, exc)
        except FileStageError as exc:
            message = exc.message
            cart_error = _cart_message(file, message)
            skippable = not isinstance(exc, NoSpace)
            mismatch = isinstance(exc, HashMismatch)
            LOGGER.warning('cart %s file %s (%s) failed: %s', cart.cart_uid, file.bundle_path, file.file_name, exc)
        except OSError as exc:
            message = f'cannot write to the volume: {exc.strerror or exc}'
            cart_error = _cart_message(file, message)
            with database.connection():
                live = cart_status(cart.id) in LIVE_STATUSES
            if not live:  # a DELETE removed the cart's directory under the download: the caller cleans up
                LOGGER.info('cart %s file %s: the cart went away while it downloaded', cart.cart_uid,
                            file.bundle_path)
                return StageOutcome(file.id, error=message)
            LOGGER.error('cart %s file %s: %s', cart.cart_uid, file.bundle_path, message)
        skip = skippable and cart.on_file_error == SKIP
        with database.connection():
            with database.atomic():
                if mismatch:
                    count_hash_mismatches(1)
                if fail_file(cart.id, file.id, message, log.attempts(file.id)) and not skip:
                    if fail_cart(cart.id, cart_error) and self.bundler.outbox is not None:
                        self.bundler.outbox.record(cart.id, ERROR)
            if skip:
                LOGGER.warning('cart %s: file %s left out (on_file_error skip)', cart.cart_uid, file.bundle_path)
                self.bundler.finish(cart.id)  # it may have been the last file
                return StageOutcome(file.id, attempts=log.attempts(file.id))
        return StageOutcome(file.id, error=message, attempts=log.attempts(file.id))

    def _stage_one(self, cart: Cart, file: File, log: AttemptLog, known: Optional[StagedFile] = None) -> StageOutcome:
        if known is not None and self.cache is not None:
            copied = self._copy_known(self.cache, cart, file, known, log)
            if copied is not None:
                return copied
        status: ArchiveStatus = self.archive.with_retries(lambda: self.archive.status(file.file_name))
        if status.media == MEDIA_ERROR:
            raise ArchiveMediaError(f'the archive reports the media of the file as error: {status.message}')
        if not status.on_disk:
            self.archive.with_retries(lambda: self.archive.stage(file.file_name))
            LOGGER.info('cart %s file %s is on %s: recall requested', cart.cart_uid, file.bundle_path, status.media)
            return StageOutcome(file.id, on_tape=True, size=status.size)
        if cart.bundle and status.size is not None and status.size > SMALL_FILE:
            with database.connection():
                offset = self.place_in_tar(cart, file, status.size)
            if offset is not None:
                fill = (functools.partial(self._fill_shared, self.cache, cart, file, status, offset=offset, log=log)
                        if self.cache is not None else
                        functools.partial(self._fill_downloaded, cart, file, status, offset=offset, log=log))
                return self._stage_in_place(cart, file, status.size, offset, fill)
        if self.cache is not None and status.size is not None:  # share_staged_files: the one place it is decided
            return self._stage_shared(self.cache, cart, file, status, log)
        return self._stage_alone(cart, file, status, log)

    def _copy_known(self, cache: StagedFiles, cart: Cart, file: File, entry: StagedFile,
                    log: AttemptLog) -> Optional[StageOutcome]:
        """Copy a bundle cart's large file into its tar from a cache entry known to have the cart's digest on
        record (no request to the archive); None when that cannot be done (the cart's tar is not laid out
        this way, or the entry went or did not match and was distrusted): the file goes the usual way."""
        size = int(entry.size or 0)
        with database.connection():
            offset = self.place_in_tar(cart, file, size)
        if offset is None:
            return None

        def fill(staging: Path) -> StageOutcome:
            return (self._copy_cached(cache, cart, file, entry, staging, offset, log)
                    or StageOutcome(file.id, redo=True))
        copied = self._stage_in_place(cart, file, size, offset, fill)
        return None if copied.redo else copied

    def _stage_alone(self, cart: Cart, file: File, status: ArchiveStatus, log: AttemptLog,
                     lease: Optional[Callable[[], None]] = None) -> StageOutcome:
        """Download the file into its place in the cart (`lease` is told as bytes arrive)."""
        final = self.volume.file_path(cart.id, cart.cart_uid, file.bundle_path)
        partial = self.volume.partial_path(cart.id, file.id)
        with self.space.reservation(cart, file, status.size, partial) as reserved:
            final.parent.mkdir(parents=True, exist_ok=True)
            download = self._download_verified(cart, file, status, final, partial, reserved, log, lease)
        return StageOutcome(file.id, download=download, attempts=log.attempts(file.id))

    def _stage_shared(self, cache: StagedFiles, cart: Cart, file: File, status: ArchiveStatus,
                      log: AttemptLog) -> StageOutcome:
        """Stage the file through the staged-file cache: linked from the ready entry when its bytes have the
        cart's hash; else fetched as today and published as a new entry; else, while another download
        fetches it, left to wait like a file on tape.

        The first cart's verified file becomes the entry (a hard link renamed into place), so a cart
        always holds the very bytes it verified. An entry that does not match a cart's hash is never
        used again, and that cart downloads its file as today (and fails as today if it is wrong).
        """
        assert status.size is not None
        found = cache.find_or_claim(str(file.file_name), status.size, status.mtime)
        if found.ready is not None:
            linked = self._link_cached(cache, cart, file, found.ready, log)
            return linked if linked is not None else self._stage_alone(cart, file, status, log)
        if found.lease is None:
            return _fetched_elsewhere(cart, file, status)
        return self._fetch_shared(cache, cart, file, status, log, found.lease)

    def _fetch_shared(self, cache: StagedFiles, cart: Cart, file: File, status: ArchiveStatus, log: AttemptLog,
                      lease: Lease) -> StageOutcome:
        """Download the file into its place in the cart under the entry's lease and publish it as the entry."""
        fetched: Optional[ReadyEntry] = None
        try:
            outcome = self._stage_alone(cart, file, status, log, lease)
            final = self.volume.file_path(cart.id, cart.cart_uid, file.bundle_path)
            fetched = cache.publish(lease, final, str(file.hash_type), str(file.hash_value))
        finally:
            if fetched is None:
                cache.abandon(lease)
        # Marked ready with the file recorded staged (a batch, not a statement a file). A worker that dies
        # before leaves the entry fetching until its lease runs out; then another download takes it over.
        return dataclasses.replace(outcome, staged_file_id=lease.entry_id, fetched=fetched)

    def _fill_downloaded(self, cart: Cart, file: File, status: ArchiveStatus, staging: Path, *, offset: int,
                         log: AttemptLog) -> StageOutcome:
        """Download the file straight into its region of the bundle tar (a second chance after a mismatch)."""
        download = self._second_chance(cart, file, lambda: self._download_into(cart, file, status, staging, log,
                                                                                offset))
        return StageOutcome(file.id, download=download, attempts=log.attempts(file.id))

    def _fill_shared(self, cache: StagedFiles, cart: Cart, file: File, status: ArchiveStatus, staging: Path, *,
                     offset: int, log: AttemptLog) -> StageOutcome:
        """Fill the file's region of the bundle tar through the staged-file cache: copied from the ready entry
        when its bytes have the cart's hash; else fetched into the cart's directory, published as the entry
        and copied from there (the tar's region still gets the bytes once; the entry keeps the file); else,
        while another download fetches it, left to wait like a file on tape."""
        assert status.size is not None
        found = cache.find_or_claim(str(file.file_name), status.size, status.mtime)
        if found.ready is not None:
            copied = self._copy_cached(cache, cart, file, found.ready, staging, offset, log)
            return copied if copied is not None else self._fill_downloaded(cart, file, status, staging, offset=offset,
                                                                           log=log)
        if found.lease is None:
            return _fetched_elsewhere(cart, file, status)
        outcome = self._fetch_shared(cache, cart, file, status, log, found.lease)
        own = self.volume.file_path(cart.id, cart.cart_uid, file.bundle_path)
        try:
            # The fetch's reservation replaced (and its end released) the region's: the copy needs its own.
            self.space.reserve(cart, file, status.size, staging, offset)
            copy_into_region(own, staging, offset, status.size)
        finally:
            own.unlink(missing_ok=True)  # the entry keeps the bytes; the tar has them now
        return outcome

    @staticmethod
    def _copy_cached(cache: StagedFiles, cart: Cart, file: File, entry: StagedFile, staging: Path, offset: int,
                     log: AttemptLog) -> Optional[StageOutcome]:
        """Copy a ready entry's bytes into the file's region of the bundle tar if they have the cart's hash;
        None (the entry distrusted) if not, or if the entry's file is gone."""
        source = cache.path(entry.id)
        try:
            if not cache.matches(entry, str(file.hash_type), str(file.hash_value), source):
                LOGGER.info('cart %s file %s: the staged copy does not match the cart\'s hash; downloading it',
                            cart.cart_uid, file.bundle_path)
                cache.distrust(entry)
                return None
            copy_into_region(source, staging, offset, int(entry.size or 0))
        except FileNotFoundError:
            LOGGER.warning('cart %s file %s: staged file %d is gone from the volume; downloading it', cart.cart_uid,
                           file.bundle_path, entry.id)
            cache.distrust(entry)
            return None
        LOGGER.debug('cart %s file %s: copied into the bundle from staged file %d', cart.cart_uid, file.bundle_path,
                     entry.id)
        return _cache_hit(file, entry, log)

    def _link_cached(self, cache: StagedFiles, cart: Cart, file: File, entry: StagedFile,
                     log: AttemptLog) -> Optional[StageOutcome]:
        """Link a ready entry into the cart if its bytes have the cart's hash; None (the entry distrusted) if not."""
        source = cache.path(entry.id)
        final = self.volume.file_path(cart.id, cart.cart_uid, file.bundle_path)
        partial = self.volume.partial_path(cart.id, file.id)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            if not self._link_or_reserve_copy(cart, file, source, partial):
                # Evicted (or purged) since it was found, or lost: this cart fetches the file anew. An entry
                # row still ready (a crash between unlink and commit) is not trusted again.
                LOGGER.warning('cart %s file %s: staged file %d is gone from the volume; downloading it',
                               cart.cart_uid, file.bundle_path, entry.id)
                cache.distrust(entry)
                return None
            if os.stat(partial).st_size != entry.size or not cache.matches(
                    entry, str(file.hash_type), str(file.hash_value), partial):
                LOGGER.info('cart %s file %s: the staged copy does not match the cart\'s hash; downloading it',
                            cart.cart_uid, file.bundle_path)
                cache.distrust(entry)
                return None
            os.replace(partial, final)
        finally:
            partial.unlink(missing_ok=True)
        LOGGER.debug('cart %s file %s: linked from staged file %d', cart.cart_uid, file.bundle_path, entry.id)
        return _cache_hit(file, entry, log)

    def _link_or_reserve_copy(self, cart: Cart, file: File, source: Path, partial: Path) -> bool:
        """Make `partial` the cart's own name for the entry's bytes: a hard link (no room needed: it adds no
        bytes), or where the volume cannot link, a copy with its size reserved as a download's is. False
        when the entry's file is gone (an eviction unlinked it first); a link made before the unlink
        keeps the bytes, and a copy under way reads them to the end from the file it opened."""
        try:
            if hard_link(source, partial):
                return True
            size = os.stat(source).st_size
        except FileNotFoundError:
            return False
        with self.space.reservation(cart, file, size, partial) as reserved:
            try:
                copy_synced(source, partial)
            except FileNotFoundError:
                return False
            finally:
                if reserved:
                    self.space.release(file.id)
        return True

    def place_in_tar(self, cart: Cart, file: File, size: int) -> Optional[int]:
        """Where the file's bytes go in its cart's bundle tar: kept from an earlier attempt, or
        the next free place (the cart's bundle_size grows by the file's header, data and padding).

        None when the cart's tar is not laid out this way (a cart from an older version).
        """
        with database.atomic():
            known = tar_place(file.id)
            if known is not None and known[1] == size:
                return known[0]
            header, region = member_region(cart.cart_uid, str(file.bundle_path), size)
            end = grow_bundle(cart.id, region)
            if end is None:
                return None
            offset = end - region + header
            place_file(cart.id, file.id, offset, size)
        return offset

    def _stage_in_place(self, cart: Cart, file: File, size: int, offset: int,
                        fill: Callable[[Path], StageOutcome]) -> StageOutcome:
        """Write a large file of a bundle cart straight into its place in the bundle tar: `fill` writes the
        region of the staging tar it is given (a download, or a copy from the staged-file cache).

        The region is locked while it is written, and the file is recorded staged before the
        lock is let go, so a duplicated task waits, then finds it staged and writes nothing:
        no bytes land on a region after it was verified. Returns an outcome already recorded,
        or fill's outcome of a file left to wait (another download fetches it).
        """
        staging = self.volume.bundle_staging_path(cart.id)
        outcome = StageOutcome(file.id)
        with self.space.reservation(cart, file, size, staging, offset):
            with locked_region(staging, offset, size):
                with database.connection():
                    current = get_file(file.id)
                    state = cart_status(cart.id)
                if current is not None and current.status != FileStatus.STAGED.value and state in LIVE_STATUSES:
                    filled = fill(staging)
                    if filled.download is None:
                        outcome = filled
                    else:
                        with database.connection():
                            self._record_staged(cart, [filled])
            # A late task opened (and so made) the staging tar of a cart that moved on meanwhile.
            if state in (None, CartStatus.DELETED.value):
                with database.connection():
                    cart_went_away(self.volume, cart.id, cart.cart_uid, 'staging')
            elif state in (CartStatus.READY.value, CartStatus.ERROR.value):
                staging.unlink(missing_ok=True)
        return outcome

    def _download_into(self, cart: Cart, file: File, status: ArchiveStatus, target: Path, log: AttemptLog,
                       offset: Optional[int] = None, lease: Optional[Callable[[], None]] = None) -> Download:
        """One verified download (transient faults retried, each try counted in `log`) into a temp
        file, or at offset into the tar; `lease`, if any, is told as bytes arrive, as the heartbeat is."""
        heartbeat = Heartbeat(cart.id, min(HEARTBEAT_S, self.settings.stall_timeout / 3))

        def with_lease() -> None:
            heartbeat()
            if lease is not None:
                lease()

        get = functools.partial(self.archive.download, file.file_name, target, str(file.hash_type),
                                str(file.hash_value), status.size, heartbeat if lease is None else with_lease,
                                offset=offset)

        def counted() -> Download:
            log.started(file.id)
            return get()

        download = self.archive.with_retries(counted)
        return Download(download.size, status.mtime if status.mtime is not None else download.mtime)

    @staticmethod
    def _second_chance(cart: Cart, file: File, attempt: Callable[[], Download]) -> Download:
        """Run a download attempt; after a hash mismatch, run it once more."""
        try:
            return attempt()
        except HashMismatch:
            LOGGER.info('cart %s file %s: hash mismatch, downloading once more', cart.cart_uid, file.bundle_path)
            with database.connection(), database.atomic():
                count_hash_mismatches(1)
        return attempt()

    def _download_verified(self, cart: Cart, file: File, status: ArchiveStatus, final: Path, partial: Path,
                           reserved: bool, log: AttemptLog, lease: Optional[Callable[[], None]] = None) -> Download:
        """Download into a temp file until whole and matching, then rename it into place."""
        partials = [partial]

        def attempt() -> Download:
            current = partials[-1]
            try:
                download = self._download_into(cart, file, status, current, log, lease=lease)
                if download.mtime is not None:
                    os.utime(current, (download.mtime, download.mtime))
                if reserved:
                    # Every byte is on disk (the free count has them): nothing more is in flight.
                    # Released before the rename, as the reservation names the temp file: after
                    # it, a reservation waiting for the lock would count these bytes twice.
                    self.space.release(file.id)
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

        try:
            return self._second_chance(cart, file, attempt)
        except BaseException:
            partials[-1].unlink(missing_ok=True)  # made for an attempt that did not come
            raise

    def _record_staged(self, cart: Cart, outcomes: Sequence[StageOutcome]) -> None:
        """Mark files staged and count them, in one transaction; finish the cart if they were the last.

        Only files not already staged are counted, so a duplicated task never counts twice.
        Raises CartGone (after cleaning up) when the cart stopped staging meanwhile. A cart that
        failed meanwhile keeps these files recorded: they are on the volume and verified (fixit
        does not pull them again, eviction frees them before any ready cart's).
        """
        fetched = [outcome.fetched for outcome in outcomes if outcome.fetched is not None]
        if fetched:  # first, on its own: the entries are ready for other carts whatever becomes of this one
            with database.atomic():
                staged_files_ready(fetched)
        rows = []
        for outcome in outcomes:
            assert outcome.download is not None
            rows.append((outcome.file_id, outcome.download.size, outcome.download.mtime, outcome.attempts))
        try:
            with database.atomic():
                fresh = mark_staged(rows)
                release_files([outcome.file_id for outcome in outcomes if not outcome.cache_hit])  # a hit reserves none
                pins = [(outcome.file_id, outcome.staged_file_id, outcome.cache_hit) for outcome in outcomes
                        if outcome.staged_file_id is not None]
                if pins:
                    pin_staged_files(pins)
                if not fresh.files:
                    return  # duplicates of work already recorded
                live = count_staged(cart.id, fresh)
                if not live and not count_staged_of_failed(cart.id, fresh):
                    raise CartGone(f'cart id {cart.id} is no longer staging')
                count_files_staged(fresh)
            if not live:
                raise CartGone(f'cart id {cart.id} failed')
        except CartGone:
            cart_went_away(self.volume, cart.id, cart.cart_uid, 'staging')
            raise
        if self.on_recalled is not None:
            for seconds in fresh.recalls:
                self.on_recalled(seconds)
        self.bundler.finish(cart.id)
