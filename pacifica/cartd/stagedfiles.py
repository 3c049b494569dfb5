"""The staged-file cache (share_staged_files): each archive file staged once on the volume, found by its
archive id, size and mtime, its digests on record, leased to the one download that fetches it."""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from . import database
from .archive import new_hash
from .orm import (File, NewEntry, ReadyEntry, StagedFile, StagedFileState, claim_entry_removal, insert_staged_files,
                  now, oldest_unpinned_entry, ready_entries_of, renew_staged_file_lease, retire_staged_file,
                  set_staged_file_digests, staged_files_by_keys, take_over_staged_file,
                  untrusted_entries)
from .volume import CartVolume

LOGGER = logging.getLogger(__name__)

# How long a fetching entry is the claimer's without a sign of life. Short, so that the files of a worker
# killed mid-download (or of one that lost the database before it could give its claim back) wait for
# its lease no longer than a few tape rounds; a download whose bytes stop for longer is fetched again by
# the next cart that asks (a second download, never a wrong file: only the lease's owner publishes).
LEASE_S = 30.0
RENEW_S = 10.0  # how often a download under way moves its lease on
# The loops below re-read after a lost compare-and-set with no transaction open (a staging thread's own
# connection, in autocommit; purge's rounds are a transaction each), so on MySQL too each re-read is a
# statement of its own that sees the latest row: none needs a locking read. Inside a caller's transaction
# a plain re-read would keep showing its snapshot there (REPEATABLE READ) and every round would lose.
CLAIM_TRIES = 5  # rounds of look-up and claim when other processes keep winning
CLAIM_WAIT_S = 300.0  # a claim made by another thread of the process is answered within this, or it fails
DIGEST_TRIES = 5  # rounds of recording a digest when other processes record theirs at once
HASH_BLOCK = 1024 * 1024
PURGE_MAX = 100_000  # entries one purge removes at most


def cache_key(archive_id: str, size: int, mtime: Optional[float]) -> str:
    """The entry's key: sha256 of the archive id, size and mtime as text (an unknown mtime is null, so it
    never matches a known one)."""
    return hashlib.sha256(json.dumps([archive_id, size, mtime]).encode('utf-8')).hexdigest()


def _retired_key(entry_id: int) -> str:
    """A key no archive file has, for an entry that no longer answers to its own."""
    return hashlib.sha256(f'retired {entry_id} {uuid.uuid4().hex}'.encode('ascii')).hexdigest()


def _lease_from_now(seconds: float) -> datetime.datetime:
    # Whole seconds: MySQL's DATETIME keeps no fraction, and the lease is compared as it was written.
    return (now() + datetime.timedelta(seconds=seconds)).replace(microsecond=0)


def hash_file(path: Path, algorithm: str) -> str:
    """The hex digest of a file's bytes."""
    digest = new_hash(algorithm)
    with open(path, 'rb') as handle:
        for block in iter(lambda: handle.read(HASH_BLOCK), b''):
            digest.update(block)
    return digest.hexdigest()


class Lease:
    """A claim on a 'fetching' entry: whose it is until lease_until, moved on as the download goes."""

    def __init__(self, entry_id: int, owner: str, lease_until: datetime.datetime, lease_s: float) -> None:
        """Hold entry `entry_id` as `owner` (a token of this download's) until `lease_until`."""
        self.entry_id = entry_id
        self.owner = owner
        self.lease_until = lease_until
        self.lease_s = lease_s
        self.last_renewal = time.monotonic()
        self.lost = False

    def __call__(self) -> None:
        """Called as bytes arrive: at most every RENEW_S seconds, the lease is moved on (compare-and-set)."""
        moment = time.monotonic()
        if self.lost or moment - self.last_renewal < min(RENEW_S, self.lease_s / 3):
            return
        self.last_renewal = moment
        new_until = _lease_from_now(self.lease_s)
        with database.connection():
            if renew_staged_file_lease(self.entry_id, self.owner, new_until):
                self.lease_until = new_until
            else:
                self.lost = True
                LOGGER.warning('staged file %d: its lease was taken over during the download', self.entry_id)


@dataclasses.dataclass(frozen=True)
class Purged:
    """What purge removed from the cache: unpinned entries unused since the cutoff, untrusted entries, and
    temp files of publications a crash cut off."""

    unused: int = 0
    untrusted: int = 0
    temporaries: int = 0


@dataclasses.dataclass(frozen=True)
class Found:
    """What looking up an archive file found: a ready entry, a lease on one to fetch, or neither (another
    download fetches it now: look again later)."""

    ready: Optional[StagedFile] = None
    lease: Optional[Lease] = None


@dataclasses.dataclass
class _Claim:
    """One caller's claim on an archive file's key, settled by whichever thread makes the batch it is in."""

    entry: NewEntry
    found: Optional[Found] = None
    error: Optional[Exception] = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)


class StagedFiles:
    """The cache's rules: look up or claim an entry, verify a cart's hash against it, publish a fetched file."""

    def __init__(self, volume: CartVolume, lease_s: float = LEASE_S) -> None:
        """Keep the entries' files on `volume`; a claim holds for `lease_s` seconds without renewal."""
        self.volume = volume
        self.lease_s = lease_s
        self._claims: List[_Claim] = []  # waiting to be made
        self._claiming = False  # a thread is making claims now
        self._claims_lock = threading.Lock()

    def find_or_claim(self, archive_id: str, size: int, mtime: Optional[float]) -> Found:
        """The ready entry of this archive file; else a lease on a new entry (or on one whose fetcher's
        lease ran out) for the caller to fetch; else nothing, while another download holds it.

        Callable from many threads at once: the claims that arrive while one is being made are made
        together, in a few statements for them all (one INSERT for the new keys), by the first thread
        that finds no claim under way; each caller gets its own answer.
        """
        claim = _Claim(NewEntry(cache_key(archive_id, size, mtime), archive_id, size, mtime, uuid.uuid4().hex))
        with self._claims_lock:
            self._claims.append(claim)
            leading = not self._claiming
            self._claiming = True
        if leading:
            self._make_claims()
        if not claim.done.wait(CLAIM_WAIT_S):
            raise RuntimeError(f'no answer to the claim of archive file {archive_id!r} in {CLAIM_WAIT_S:.0f} s')
        if claim.error is not None:
            raise claim.error  # the database failed while the batch was made: as if this thread had made it
        return claim.found if claim.found is not None else Found()  # not settled: looked at again later

    def _make_claims(self) -> None:
        """Make the claims waiting, batch after batch, until none is left (then the next caller leads)."""
        while True:
            with self._claims_lock:
                batch, self._claims = self._claims, []
                if not batch:
                    self._claiming = False
                    return
            try:
                self._claim_batch(batch)
            except Exception as exc:  # pylint: disable=broad-except  # handed to each caller, raised there
                for claim in batch:
                    claim.error = exc
            for claim in batch:
                claim.done.set()

    def _claim_batch(self, batch: Sequence[_Claim]) -> None:
        """Settle each claim: the entry is ready, or ours to fetch, or another download's. No transaction is
        held across the rounds, so every read sees what the others committed (see CLAIM_TRIES)."""
        until = _lease_from_now(self.lease_s)
        with database.connection():
            for _ in range(CLAIM_TRIES):
                open_claims = [claim for claim in batch if claim.found is None]
                if not open_claims:
                    return
                # Each key nobody holds becomes this batch's, the others stay as they are; then one read says
                # whose each one is (two statements, whether the files are new or not).
                insert_staged_files([claim.entry for claim in open_claims], until)
                entries = staged_files_by_keys([claim.entry.cache_key for claim in open_claims])
                for claim in open_claims:
                    claim.found = self._settle(claim, entries.get(claim.entry.cache_key), until)

    def _settle(self, claim: _Claim, entry: Optional[StagedFile], until: datetime.datetime) -> Optional[Found]:
        """What the entry found for a claim's key means for it; None when it is to be looked at again (the
        entry was removed meanwhile, or another process took over its lease first)."""
        if entry is None:
            return None
        if entry.state == StagedFileState.READY.value:
            return Found(ready=entry)
        if entry.lease_owner == claim.entry.owner:
            return Found(lease=Lease(entry.id, claim.entry.owner, until, self.lease_s))
        if entry.lease_until is not None and entry.lease_until > now():
            return Found()
        if take_over_staged_file(entry, claim.entry.owner, until):
            LOGGER.info('staged file %d (%s): the lease of its fetch ran out; fetching it again', entry.id,
                        entry.archive_id)
            return Found(lease=Lease(entry.id, claim.entry.owner, until, self.lease_s))
        return None

    @staticmethod
    def known_to_match(files: Sequence[File]) -> Dict[int, StagedFile]:
        """File id -> the ready entry of the file's archive id whose digest on record is the file's own
        hashsum (for its hashtype), for the files that have one: a few indexed queries for them all.

        Such an entry's bytes are the very bytes the cart asked for, whatever the archive holds now, so
        they are linked without asking the archive anything. Files without one (not cached, cached with
        other bytes, or with no digest on record for their algorithm) go the way of every file: the
        archive's status, then the entry of that archive id, size and mtime.
        """
        entries: Dict[str, List[StagedFile]] = {}
        for entry in ready_entries_of(str(file.file_name) for file in files):
            entries.setdefault(str(entry.archive_id), []).append(entry)
        matched: Dict[int, StagedFile] = {}
        for file in files:
            wanted = (str(file.hash_type).lower(), str(file.hash_value).lower())
            candidates = [entry for entry in entries.get(str(file.file_name), ())
                          if json.loads(entry.digests or '{}').get(wanted[0]) == wanted[1]]
            if candidates:
                matched[file.id] = max(candidates, key=lambda entry: entry.id)  # the newest of the same bytes
        return matched

    def path(self, entry_id: int) -> Path:
        """Where the entry's bytes are."""
        return self.volume.staged_file_path(entry_id)

    def matches(self, entry: StagedFile, hash_type: str, hash_value: str, copy: Path) -> bool:
        """Whether the entry's bytes have the cart's hash: from the digest on record for the algorithm, or
        computed once from `copy` (a link to the entry, or a copy of it) and recorded."""
        algorithm = hash_type.lower()
        digests: Dict[str, str] = json.loads(entry.digests or '{}')
        if algorithm in digests:
            return digests[algorithm] == hash_value.lower()
        digest = hash_file(copy, algorithm)
        self._record_digest(entry, algorithm, digest)
        return digest == hash_value.lower()

    @staticmethod
    def _record_digest(entry: StagedFile, algorithm: str, digest: str) -> None:
        before = str(entry.digests or '{}')
        with database.connection():
            for _ in range(DIGEST_TRIES):
                after = json.dumps({**json.loads(before), algorithm: digest}, sort_keys=True)
                if set_staged_file_digests(entry.id, before, after):
                    return
                current = staged_files_by_keys([str(entry.cache_key)]).get(str(entry.cache_key))
                if current is None or current.id != entry.id:
                    return  # retired meanwhile: nothing to record on
                before = str(current.digests or '{}')

    def publish(self, lease: Lease, source: Path, hash_type: str, hash_value: str) -> ReadyEntry:
        """Make the entry the cart's verified file `source`; return what marks it ready with its digest, which
        the caller records with the file staged (staged_files_ready; one taken over meanwhile stays the new
        holder's, who publishes its own)."""
        self.volume.publish_staged_file(source, lease.entry_id)
        return ReadyEntry(lease.entry_id, lease.owner, json.dumps({hash_type.lower(): hash_value.lower()}))

    @staticmethod
    def abandon(lease: Lease) -> None:
        """The fetch failed: the entry is never used (untrusted, its key given up for a new claim)."""
        with database.connection():
            retire_staged_file(lease.entry_id, _retired_key(lease.entry_id), lease.owner)

    @staticmethod
    def distrust(entry: StagedFile) -> None:
        """A cart's hash did not match the entry: it is not linked again (the next cart fetches anew)."""
        with database.connection():
            if retire_staged_file(entry.id, _retired_key(entry.id)):
                LOGGER.warning('staged file %d (%s) did not match a cart\'s hash: untrusted from now on', entry.id,
                               entry.archive_id)

    def purge(self, unused_since: datetime.datetime) -> Purged:
        """Remove the entries no live cart pins that were not used since `unused_since`, every untrusted
        entry, and temp files in the cache older than a lease (a publication cut off by a crash).

        Each entry's row is claimed (deleted by compare-and-set) before its file is unlinked, in one
        transaction: a cart that found the row links before the unlink (its own link keeps the bytes)
        or finds no file and fetches anew.
        """
        counts = {StagedFileState.READY.value: 0, StagedFileState.UNTRUSTED.value: 0}
        for _ in range(PURGE_MAX):
            with database.atomic():
                entry = oldest_unpinned_entry(unused_since) or next(iter(untrusted_entries(1)), None)
                if entry is None:
                    break
                if claim_entry_removal(entry):
                    self.volume.remove_staged_file(entry.id)
                    counts[str(entry.state)] += 1
                    LOGGER.info('purged staged file %d (%s, archive id %s, last used %s)', entry.id, entry.state,
                                entry.archive_id, entry.last_used)
        return Purged(counts[StagedFileState.READY.value], counts[StagedFileState.UNTRUSTED.value],
                      self._remove_old_temporaries())

    def _remove_old_temporaries(self) -> int:
        # ctime: a link (or a copy) made for publishing sets it, whatever mtime the archive gave the bytes.
        before = time.time() - self.lease_s
        removed: List[str] = []
        for temporary in self.volume.staged_file_temporaries():
            try:
                if temporary.stat().st_ctime < before:
                    temporary.unlink()
                    removed.append(temporary.name)
            except FileNotFoundError:
                continue  # renamed into place or removed meanwhile
        if removed:
            LOGGER.info('purged %d temp files of the staged-file cache: %s', len(removed), ', '.join(removed[:20]))
        return len(removed)
