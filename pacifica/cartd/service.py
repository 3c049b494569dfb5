"""The cart's use cases behind one object, so the REST layer, the tasks and the command line need hold only one.

Each job lives in a module of its own (see docs/architecture.md): carts.py (what clients
ask for), staging.py, bundling.py, recovery.py, admin.py; this facade builds them over
one settings object, volume, archive client and task queue, and hands calls through.
"""
from __future__ import annotations

import datetime
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .admin import Admin, FixitProgress, FixitResult
from .archive import ArchiveClient
from .bundling import Bundler
from .cartreport import FilesWanted
from .carts import CartDownload, Carts
from .cartstate import CartState
from .config import Settings
from .delivery import EventDelivery
from .events import EXPIRED, EventOutbox
from .eviction import SpaceKeeper, remove_expired
from .health import Health
from .metrics import WorkerMetrics
from .recovery import Recovery
from .stagedfiles import Purged, StagedFiles
from .staging import Stager, StageOutcome
from .taskqueue import CartQueue, TaskQueue
from .volume import CartVolume
from .workers import WorkerPresence


class CartService:
    """Every use case of the cart, callable from the REST layer, a task or the command line."""

    def __init__(self, settings: Settings, queue: Optional[TaskQueue] = None,
                 archive: Optional[ArchiveClient] = None, sleep: Optional[Callable[[float], None]] = None,
                 worker_metrics: Optional[WorkerMetrics] = None) -> None:
        """Wire the settings, the volume, and (where needed) the task queue, archive client and the worker's
        metrics (archive requests and tape recalls counted)."""
        self._queue = queue
        self._archive = archive
        self._sleep = sleep
        self._metrics = worker_metrics
        self._build(settings)

    def _build(self, settings: Settings) -> None:
        self._settings = settings
        self.volume = CartVolume(settings.volume_path)
        self.queue = self._queue
        metrics = self._metrics
        self.archive = self._archive or ArchiveClient(
            settings.archive_url, settings.archive_timeout, settings.transfer_size,
            settings.archive_retries, settings.archive_retry_wait,
            observe=None if metrics is None else metrics.archive_request)
        cart_queue = CartQueue(self._queue, settings.stage_batch_size)
        self.outbox = EventOutbox(settings)
        self.bundler = Bundler(self.volume, self.outbox)
        self.delivery = EventDelivery(settings)
        cache = StagedFiles(self.volume) if settings.share_staged_files else None
        self.stager = Stager(settings, self.volume, self.archive, SpaceKeeper(settings, self.volume), self.bundler,
                             None if metrics is None else metrics.tape_recall, cache)
        self.presence = WorkerPresence(settings.worker_heartbeat)
        self.carts = Carts(settings, self.volume, cart_queue, self.bundler, self.presence)
        self.recovery = Recovery(settings, cart_queue)
        broker = getattr(self._queue, 'broker_problem', None)  # a queue that cannot tell (a test's) has no probe
        self.health = Health(self.volume, broker, self.archive.problem, self.presence)
        self.admin = Admin(self.volume, self.stager, self.bundler, self.recovery, self.presence,
                           **({'sleep': self._sleep} if self._sleep is not None else {}))

    @property
    def settings(self) -> Settings:
        """The settings every use case runs with."""
        return self._settings

    @settings.setter
    def settings(self, settings: Settings) -> None:
        """Run with other settings from now on (the use cases are built again over them)."""
        self._build(settings)

    # ---- what clients ask for
    def create_cart(self, cart_uid: str, body: Any) -> int:
        """See carts.Carts.create."""
        return self.carts.create(cart_uid, body)

    def status(self, cart_uid: str) -> CartState:
        """See carts.Carts.status."""
        return self.carts.status(cart_uid)

    def report(self, cart_uid: str, wanted: FilesWanted) -> Dict[str, Any]:
        """See carts.Carts.report."""
        return self.carts.report(cart_uid, wanted)

    def download(self, cart_uid: str, filename: str, top: str) -> CartDownload:
        """See carts.Carts.download."""
        return self.carts.download(cart_uid, filename, top)

    def delete(self, cart_uid: str) -> int:
        """See carts.Carts.delete."""
        return self.carts.delete(cart_uid)

    # ---- work done by the workers
    def stage_files(self, cart_id: int, file_ids: Sequence[int], tape_round: int = 0,
                    on_done: Optional[Callable[[StageOutcome], None]] = None) -> List[int]:
        """See staging.Stager.stage_files (`tape_round` is the task's; staging does not depend on it)."""
        del tape_round
        return self.stager.stage_files(cart_id, file_ids, on_done=on_done)

    def bundle(self, cart_id: int) -> None:
        """See bundling.Bundler.bundle."""
        self.bundler.bundle(cart_id)

    def tape_wait(self, tape_round: int) -> float:
        """See recovery.Recovery.tape_wait."""
        return self.recovery.tape_wait(tape_round)

    def requeue_tape_files(self, cart_id: int, file_ids: Sequence[int], tape_round: int) -> None:
        """See recovery.Recovery.requeue_tape_files."""
        self.recovery.requeue_tape_files(cart_id, file_ids, tape_round)

    def reconcile(self) -> int:
        """See recovery.Recovery.reconcile."""
        return self.recovery.reconcile()

    def remove_expired(self) -> int:
        """See eviction.remove_expired."""
        return remove_expired(self.volume, lambda cart_id: self.outbox.record(cart_id, EXPIRED))

    def deliver_events(self) -> int:
        """See delivery.EventDelivery.deliver_due."""
        return self.delivery.deliver_due()

    def check_in(self, name: str, pid: int, started: datetime.datetime) -> None:
        """See workers.WorkerPresence.check_in."""
        self.presence.check_in(name, pid, started)

    def leave(self, name: str, pid: int) -> None:
        """See workers.WorkerPresence.leave."""
        self.presence.leave(name, pid)

    # ---- operators
    def dump(self) -> List[Dict[str, Any]]:
        """See admin.Admin.dump."""
        return self.admin.dump()

    def carts_status(self, cart_uids: Sequence[str]) -> List[Dict[str, Any]]:
        """See admin.Admin.status."""
        return self.admin.status(cart_uids)

    def purge(self, unused_since: datetime.datetime) -> List[Tuple[int, str]]:
        """See admin.Admin.purge."""
        return self.admin.purge(unused_since)

    def purge_staged_files(self, unused_since: datetime.datetime) -> Optional[Purged]:
        """See admin.Admin.purge_staged_files."""
        return self.admin.purge_staged_files(unused_since)

    def fixit(self, cart_uid: str, progress: Optional[FixitProgress] = None) -> FixitResult:
        """See admin.Admin.fixit."""
        return self.admin.fixit(cart_uid, progress)
