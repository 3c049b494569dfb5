"""The files the workloads ask for: written once into the archive directory, with their sizes and digests."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import random
import struct
from typing import Dict, List, Sequence

MiB = 1 << 20
KiB = 1 << 10


@dataclasses.dataclass(frozen=True)
class ArchiveFile:
    """One file in the archive: its archive id, its path inside a cart, its size and digest."""

    archive_id: str
    path: str
    size: int
    digest: str


def fileids(files: Sequence[ArchiveFile], hashtype: str) -> List[Dict[str, str]]:
    """The POST body's `fileids` for these files."""
    return [{'id': item.archive_id, 'path': item.path, 'hashtype': hashtype, 'hashsum': item.digest}
            for item in files]


def expected(files: Sequence[ArchiveFile]) -> Dict[str, ArchiveFile]:
    """Path inside the cart -> file, for checking a downloaded tar."""
    return {item.path: item for item in files}


def total_bytes(files: Sequence[ArchiveFile]) -> int:
    """Sum of the files' sizes."""
    return sum(item.size for item in files)


class DataWriter:
    """Writes workload files straight into the archive's POSIX directory (the archive serves them as they are)."""

    def __init__(self, archive_root: pathlib.Path, hashtype: str) -> None:
        """Files go to archive_root/<archive id>; digests are of `hashtype`."""
        self.root = archive_root
        self.hashtype = hashtype
        self.root.mkdir(parents=True, exist_ok=True)
        # Large files are cut from this pool (different offsets per block, plus a block header),
        # so that gigabytes need no gigabytes of randomness yet no two blocks are alike.
        self._pool = os.urandom(9 * MiB)

    def small_files(self, prefix: str, count: int, size: int, per_dir: int = 100) -> List[ArchiveFile]:
        """`count` files of `size` random bytes, ids `<prefix>-000000`, paths `<prefix>/dNNN/<id>.dat`."""
        files = []
        for index in range(count):
            archive_id = f'{prefix}-{index:06d}'
            data = os.urandom(size)
            (self.root / archive_id).write_bytes(data)
            files.append(ArchiveFile(archive_id, f'{prefix}/d{index // per_dir:03d}/{archive_id}.dat', size,
                                     hashlib.new(self.hashtype, data).hexdigest()))
        return files

    def random_files(self, prefix: str, count: int, max_size: int, rng: random.Random) -> List[ArchiveFile]:
        """`count` files of 1 to `max_size` random bytes (sizes drawn from `rng`), ids `<prefix>-000000`."""
        files = []
        for index in range(count):
            archive_id = f'{prefix}-{index:06d}'
            data = rng.randbytes(rng.randint(1, max_size))
            (self.root / archive_id).write_bytes(data)
            files.append(ArchiveFile(archive_id, f'{archive_id}.dat', len(data),
                                     hashlib.new(self.hashtype, data).hexdigest()))
        return files

    def large_files(self, prefix: str, count: int, size: int, start: int = 0) -> List[ArchiveFile]:
        """`count` files of `size` bytes written block by block (never held in memory)."""
        files = []
        for index in range(start, start + count):
            archive_id = f'{prefix}-{index:03d}'
            digest = hashlib.new(self.hashtype)
            with open(self.root / archive_id, 'wb') as out:
                written = 0
                block = 0
                while written < size:
                    length = min(MiB, size - written)
                    header = struct.pack('<QQ', index, block)
                    offset = (index * 7919 + block * 104729) % (8 * MiB)
                    data = header + self._pool[offset:offset + length - len(header)]
                    digest.update(data)
                    out.write(data)
                    written += length
                    block += 1
            files.append(ArchiveFile(archive_id, f'{prefix}/{archive_id}.bin', size, digest.hexdigest()))
        return files
