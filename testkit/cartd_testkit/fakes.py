"""Fakes of the cart's task queue and archive client, for unit tests of the service on a temp SQLite file.

The real archive interface (POSIX backend) always reports `disk` and always sends its
headers, so tape recalls, `error` media and header-less answers cannot be produced by it:
the unit tests stand FakeArchive (bytes from a dict, media and header presence per id) in
for the archive client, and FakeQueue (lists) for the task queue; run_queue then runs what
was queued as a worker would.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

from pacifica.cartd.archive import ArchiveStatus, Download, new_hash
from pacifica.cartd.errors import ArchiveError, HashMismatch

if TYPE_CHECKING:
    from pacifica.cartd.service import CartService

T = TypeVar('T')
MAX_TASKS = 50  # run_queue's bound: a cart whose tasks keep requeueing fails the test


class FakeQueue:
    """Records what the service queues."""

    def __init__(self) -> None:
        self.staged: List[Tuple[int, List[int], float, int]] = []
        self.bundles: List[int] = []
        self.revoked: List[str] = []
        self.broken = False

    def enqueue_stage(self, cart_id: int, file_ids: Sequence[int], countdown: float = 0, tape_round: int = 0) -> str:
        if self.broken:
            raise ConnectionError('broker unreachable')
        self.staged.append((cart_id, list(file_ids), countdown, tape_round))
        return f'task-{len(self.staged)}'

    def enqueue_bundle(self, cart_id: int) -> str:
        self.bundles.append(cart_id)
        return 'bundle'

    def revoke(self, task_ids: Sequence[str]) -> None:
        self.revoked.extend(task_ids)


@dataclasses.dataclass
class FakeArchive:
    """Serves bytes from a dict; media and header presence per id are set by the test."""

    files: Dict[str, bytes]
    media: Dict[str, str] = dataclasses.field(default_factory=dict)
    stage_calls: List[str] = dataclasses.field(default_factory=list)
    downloads: List[str] = dataclasses.field(default_factory=list)
    fail_downloads: int = 0

    def with_retries(self, action: Callable[[], T]) -> T:
        """Mirrors ArchiveClient.with_retries, without retrying."""
        return action()

    def status(self, archive_id: str) -> ArchiveStatus:
        media = self.media.get(archive_id, 'disk')
        if media == 'no-headers':
            return ArchiveStatus('', None, None, '')
        return ArchiveStatus(media, len(self.files[archive_id]), 1500000000.0, 'File was found')

    def stage(self, archive_id: str) -> None:
        self.stage_calls.append(archive_id)

    def download(self, archive_id: str, partial: pathlib.Path, hash_type: str, hash_value: str,
                 expected_size: Optional[int], progress: Optional[Callable[[], None]] = None,
                 offset: Optional[int] = None) -> Download:
        self.downloads.append(archive_id)
        if self.fail_downloads:
            self.fail_downloads -= 1
            raise ArchiveError('archive GET answered 503: busy')
        data = self.files[archive_id]
        if offset is None:
            partial.write_bytes(data)
        else:
            assert expected_size == len(data)
            with open(partial, 'r+b') as target:
                target.seek(offset)
                target.write(data)
        digest = new_hash(hash_type)
        digest.update(data)
        if digest.hexdigest() != hash_value:
            raise HashMismatch('File hash does not match provided hash')
        return Download(len(data), None)


def run_queue(service: 'CartService', queue: FakeQueue) -> None:
    """Run queued stage tasks like a worker would, tape re-checks included."""
    done = 0
    while done < len(queue.staged):
        cart_id, file_ids, _countdown, tape_round = queue.staged[done]
        done += 1
        on_tape = service.stage_files(cart_id, file_ids, tape_round)
        service.requeue_tape_files(cart_id, on_tape, tape_round)
        assert done < MAX_TASKS, 'tasks kept requeueing'
