"""Sample the resident memory of process trees from /proc in a background thread."""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from typing import Dict, List, Mapping, Optional, Tuple


def rss_bytes(pid: int) -> Optional[int]:
    """VmRSS of one process, or None when it is gone."""
    try:
        with open(f'/proc/{pid}/status', encoding='ascii', errors='replace') as status:
            for line in status:
                if line.startswith('VmRSS:'):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return 0


def children(pid: int) -> List[int]:
    """Direct children of a process (its celery pool processes, for a worker)."""
    found: List[int] = []
    try:
        for task in os.listdir(f'/proc/{pid}/task'):
            with open(f'/proc/{pid}/task/{task}/children', encoding='ascii') as handle:
                found.extend(int(part) for part in handle.read().split())
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return found


def tree(pid: int) -> List[int]:
    """A process and all its descendants."""
    result = [pid]
    index = 0
    while index < len(result):
        result.extend(children(result[index]))
        index += 1
    return result


@dataclasses.dataclass
class TreePeaks:
    """Peaks of one labelled process tree."""

    first_root: int = 0          # the root process's RSS at the first sample
    last_root: int = 0           # ... at the last sample
    peak_root: int = 0           # the root process's peak
    min_root: int = 0            # ... and its lowest
    peak_process: int = 0        # the largest peak of any single process in the tree
    peak_sum: int = 0            # the largest sum over the tree at one moment
    first_sum: int = 0           # the sum over the tree at the first sample
    last_sum: int = 0            # ... at the last sample
    min_sum: int = 0             # the lowest sum over the tree at one moment
    processes: int = 0           # processes in the tree at the last sample
    sums: List[int] = dataclasses.field(default_factory=list)  # the sum over the tree at every sample
    per_pid: Dict[int, int] = dataclasses.field(default_factory=dict)


class RssSampler:
    """Samples label -> root pid trees every `interval` seconds until stopped."""

    def __init__(self, roots: Mapping[str, int], interval: float = 0.1) -> None:
        """Watch these trees (e.g. {'server': pid, 'worker1': pid})."""
        self.roots = dict(roots)
        self.interval = interval
        self.peaks: Dict[str, TreePeaks] = {label: TreePeaks() for label in self.roots}
        self.samples = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _sample(self) -> None:
        for label, root in self.roots.items():
            peaks = self.peaks[label]
            total = 0
            count = 0
            for pid in tree(root):
                value = rss_bytes(pid)
                if value is None:
                    continue
                total += value
                count += 1
                peaks.per_pid[pid] = max(peaks.per_pid.get(pid, 0), value)
                peaks.peak_process = max(peaks.peak_process, value)
                if pid == root:
                    if not self.samples:
                        peaks.first_root = value
                    peaks.last_root = value
                    peaks.peak_root = max(peaks.peak_root, value)
                    peaks.min_root = min(peaks.min_root, value) if self.samples else value
            peaks.peak_sum = max(peaks.peak_sum, total)
            peaks.min_sum = min(peaks.min_sum, total) if self.samples else total
            if not self.samples:
                peaks.first_sum = total
            peaks.last_sum = total
            peaks.processes = count
            peaks.sums.append(total)
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self._sample()
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def __enter__(self) -> 'RssSampler':
        """Take a first sample and start the thread."""
        self._sample()
        self._thread = threading.Thread(target=self._loop, name='rss-sampler', daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        """Take a last sample and stop."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._sample()

    def summary(self, labels: Tuple[str, ...]) -> Tuple[int, int]:
        """(largest single-process peak, sum of the trees' peak sums) over these labels."""
        return (max((self.peaks[label].peak_process for label in labels), default=0),
                sum(self.peaks[label].peak_sum for label in labels))


_TICKS = os.sysconf('SC_CLK_TCK')


def tree_cpu_seconds(root: int) -> float:
    """CPU time of a process tree: each live process's own time plus that of its reaped children."""
    total = 0
    for pid in tree(root):
        try:
            with open(f'/proc/{pid}/stat', encoding='ascii', errors='replace') as handle:
                fields = handle.read().rsplit(')', 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        total += sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    return total / _TICKS


def _machine_busy_seconds() -> float:
    """CPU time the whole machine spent busy (all but idle and iowait)."""
    with open('/proc/stat', encoding='ascii') as handle:
        fields = [int(value) for value in handle.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / _TICKS


class CpuWatch:
    """How much CPU this run's own processes used, and how much the rest of the machine used meanwhile."""

    def __init__(self) -> None:
        """Take the first reading."""
        self.start = self._read()

    @staticmethod
    def _read() -> Tuple[float, float, float]:
        return time.monotonic(), tree_cpu_seconds(os.getpid()), _machine_busy_seconds()

    def since(self) -> Tuple[float, float, float]:
        """(wall seconds, CPU seconds of this run's tree, CPU seconds of everything else) since the start."""
        now = self._read()
        wall = now[0] - self.start[0]
        ours = now[1] - self.start[1]
        return wall, ours, max(0.0, (now[2] - self.start[2]) - ours)


def self_cpu_seconds() -> float:
    """CPU time of this process's own threads (the benchmark client), without its children."""
    usage = os.times()
    return usage.user + usage.system


def cpu_snapshot(roots: Mapping[str, int]) -> Dict[str, float]:
    """label -> CPU seconds so far of each labelled tree (several roots may share a label), plus 'client'."""
    snapshot: Dict[str, float] = {'client': self_cpu_seconds()}
    for label, root in roots.items():
        group = label.rstrip('0123456789')
        snapshot[group] = snapshot.get(group, 0.0) + tree_cpu_seconds(root)
    return snapshot


def cpu_delta(before: Mapping[str, float], after: Mapping[str, float]) -> Dict[str, float]:
    """CPU seconds each label used between two snapshots."""
    return {label: after[label] - before.get(label, 0.0) for label in after}
