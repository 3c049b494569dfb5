"""Whether any worker is there: each worker checks in every worker_heartbeat seconds, and a server that
has seen none for GONE_AFTER heartbeats says so (a warning on /-/ready, and in a staging cart's message),
so nobody waits on nothing."""
from __future__ import annotations

import dataclasses
import datetime
import threading
import time
from typing import Callable, Optional, Tuple

from . import database
from .expiry import rfc3339
from .orm import forget_worker, now, record_worker_seen, workers_seen_since

GONE_AFTER = 3  # heartbeats a worker may miss before it counts as gone
REMEMBER_S = 5.0  # how long a server process trusts what it read of the workers


@dataclasses.dataclass(frozen=True)
class Sighting:
    """What the database says of the workers: how many checked in lately, and when the last one did."""

    workers: int
    last_seen: Optional[datetime.datetime]

    @property
    def absence(self) -> Optional[str]:
        """None while a worker is here, else how long none has been: words for a cart that waits."""
        if self.workers:
            return None
        if self.last_seen is None:
            return 'none has checked in'
        return f'none has been seen since {rfc3339(self.last_seen)}'


class WorkerPresence:
    """A worker's check-ins, and a server's (remembered) view of them; all off when `heartbeat` is 0."""

    def __init__(self, heartbeat: float, clock: Callable[[], float] = time.monotonic) -> None:
        """Workers check in every `heartbeat` seconds."""
        self.heartbeat = heartbeat
        self.clock = clock
        self._remembered: Optional[Tuple[float, Sighting]] = None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """Whether workers check in (and servers look)."""
        return self.heartbeat > 0

    @staticmethod
    def check_in(name: str, pid: int, started: datetime.datetime) -> None:
        """Record that the worker `name` (main process `pid`, up since `started`) is here now."""
        with database.connection():
            record_worker_seen(name, pid, started)

    @staticmethod
    def leave(name: str, pid: int) -> None:
        """Remove a stopping worker's row, so servers know at once that it is gone."""
        with database.connection():
            forget_worker(name, pid)

    def sighting(self) -> Optional[Sighting]:
        """The workers seen in the last GONE_AFTER heartbeats (read at most every REMEMBER_S), or None when off."""
        if not self.enabled:
            return None
        with self._lock:
            if self._remembered is not None and self.clock() - self._remembered[0] < REMEMBER_S:
                return self._remembered[1]
        with database.connection():
            seen = Sighting(*workers_seen_since(now() - datetime.timedelta(seconds=GONE_AFTER * self.heartbeat)))
        with self._lock:
            self._remembered = (self.clock(), seen)
        return seen

    def absence(self) -> Optional[str]:
        """Words for a cart that waits because no worker is here, or None (a worker is, or nobody looks)."""
        seen = self.sighting()
        return None if seen is None else seen.absence
