"""Health and readiness of a server process (`GET /-/healthy`, `GET /-/ready`), in the health+json format.

Readiness fails when the database cannot be reached or its schema cannot be used (no cart
can be created, polled or downloaded), and warns when the volume is not writable or nearly
full, the broker does not answer (carts wait), the archive does not answer (files wait) or no
worker has checked in lately (carts wait for one).
The checks that reach another server (broker, archive) are remembered for CACHE_S seconds,
so a load balancer polling every second costs one database query a second and little else.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple

from . import database, schema
from .volume import CartVolume
from .workers import WorkerPresence

PASS, WARN, FAIL = 'pass', 'warn', 'fail'
CACHE_S = 5.0  # how long a broker or archive check is remembered
LOW_FREE_SHARE = 0.05  # a volume with less than this share free warns
CONTENT_TYPE = 'application/health+json'

Probe = Callable[[], Optional[str]]  # None when the peer answers, else why not


@dataclasses.dataclass(frozen=True)
class Check:
    """One check's outcome: pass, warn or fail, with what it saw."""

    status: str
    output: str = ''
    observed_value: Any = None
    observed_unit: str = ''

    def document(self) -> Dict[str, Any]:
        """The check as health+json writes it."""
        found: Dict[str, Any] = {'status': self.status}
        if self.observed_value is not None:
            found['observedValue'] = self.observed_value
        if self.observed_unit:
            found['observedUnit'] = self.observed_unit
        if self.output:
            found['output'] = self.output
        return found


def overall(checks: Dict[str, Check]) -> str:
    """fail if any check fails, else warn if any warns, else pass."""
    statuses = {check.status for check in checks.values()}
    return FAIL if FAIL in statuses else WARN if WARN in statuses else PASS


class Health:
    """The process's answers to /-/healthy and /-/ready."""

    def __init__(self, volume: CartVolume, broker: Optional[Probe], archive: Probe, presence: WorkerPresence,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """Check `volume`, the broker and archive through their probes (no broker probe: none is used),
        and whether workers check in (`presence`)."""
        self.volume = volume
        self.presence = presence
        self.probes: Dict[str, Optional[Probe]] = {'broker:connection': broker, 'archive:connection': archive}
        self.clock = clock
        self._remembered: Dict[str, Tuple[float, Check]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def healthy() -> Dict[str, Any]:
        """The process serves: nothing else is asked."""
        return {'status': PASS}

    def ready(self) -> Tuple[int, Dict[str, Any]]:
        """(HTTP status, health+json document): 200 for pass and warn, 503 for fail."""
        checks: Dict[str, Check] = {}
        checks.update(self._database())
        checks['workers:seen'] = self._workers(checks['database:schema'].status == PASS)
        checks.update(self._volume())
        for name in self.probes:
            checks[name] = self._remembered_check(name)
        status = overall(checks)
        document = {'status': status, 'checks': {name: [check.document()] for name, check in checks.items()}}
        return (503 if status == FAIL else 200), document

    @staticmethod
    def _database() -> Dict[str, Check]:
        started = time.perf_counter()
        try:
            with database.connection():
                version = schema.current_version()
        except Exception as exc:  # any driver error: the database is what is wrong
            reason = ' '.join(str(exc).split()) or type(exc).__name__
            return {'database:connection': Check(FAIL, f'cannot reach the database: {reason}'),
                    'database:schema': Check(FAIL, 'not checked: no database')}
        took = round((time.perf_counter() - started) * 1000, 1)
        reached = Check(PASS, observed_value=took, observed_unit='ms')
        wanted = '.'.join(map(str, schema.SCHEMA_VERSION))
        if version is None:
            return {'database:connection': reached,
                    'database:schema': Check(FAIL, 'the database has no cart schema: run pacifica-cartd-cmd dbsync')}
        found = '.'.join(map(str, version))
        if version[0] != schema.SCHEMA_VERSION[0] or version < schema.SCHEMA_VERSION:
            return {'database:connection': reached,
                    'database:schema': Check(FAIL, f'schema {found} is not usable by this version ({wanted}): '
                                                   'run pacifica-cartd-cmd dbsync', found)}
        return {'database:connection': reached, 'database:schema': Check(PASS, observed_value=found)}

    def _workers(self, database_usable: bool) -> Check:
        if self.presence.enabled and not database_usable:
            return Check(WARN, 'not checked: no usable database')
        try:
            seen = self.presence.sighting()
        except Exception as exc:  # any driver error: the database checks say what is wrong
            return Check(WARN, f'not checked: {" ".join(str(exc).split()) or type(exc).__name__}')
        if seen is None:
            return Check(PASS, 'not checked: worker_heartbeat is 0')
        if seen.absence:
            return Check(WARN, f'no worker: {seen.absence}; carts wait until one starts', seen.workers)
        return Check(PASS, observed_value=seen.workers)

    def _volume(self) -> Dict[str, Check]:
        root = self.volume.root
        try:
            stats = os.statvfs(root)
        except OSError as exc:
            return {'volume:writable': Check(WARN, f'cannot look at {root}: {exc.strerror}'),
                    'volume:free': Check(WARN, 'not checked')}
        read_only = bool(stats.f_flag & os.ST_RDONLY)
        writable = not read_only and os.access(root, os.W_OK | os.X_OK)
        free, size = stats.f_bavail * stats.f_frsize, stats.f_blocks * stats.f_frsize
        checks = {'volume:writable': Check(PASS) if writable else Check(
            WARN, f'{root} is {"mounted read-only" if read_only else "not writable"}: no file can be staged')}
        low = size > 0 and free < size * LOW_FREE_SHARE
        checks['volume:free'] = Check(WARN if low else PASS,
                                      f'less than {LOW_FREE_SHARE:.0%} of {root} is free' if low else '',
                                      free, 'bytes')
        return checks

    def _remembered_check(self, name: str) -> Check:
        probe = self.probes[name]
        if probe is None:
            return Check(PASS, 'none configured for this process')
        with self._lock:
            remembered = self._remembered.get(name)
            if remembered is not None and self.clock() - remembered[0] < CACHE_S:
                return remembered[1]
        problem = probe()
        check = Check(PASS) if problem is None else Check(WARN, problem)
        with self._lock:
            self._remembered[name] = (self.clock(), check)
        return check
