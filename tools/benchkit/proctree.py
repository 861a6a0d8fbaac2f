"""Run a command and measure its whole process tree: wall time, peak memory, bytes written to disk.

``run_measured(argv) -> Measured``; Linux only (reads ``/proc``). Used by ``tools/rehearse.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

PROC = Path("/proc")
READER_GRACE_S = 5.0  # how long to wait for output pipes that an escaped grandchild keeps open


@dataclass(frozen=True)
class Measured:
    """One finished command: exit status, wall time, memory peaks and disk writes of its process tree."""

    argv: tuple[str, ...]
    returncode: int
    wall_s: float
    peak_anon_bytes: int  # max over samples of sum(RssAnon) over the tree
    peak_rss_bytes: int  # max(sampled sum(VmRSS), kernel peaks: VmHWM, ru_maxrss when trustworthy)
    disk_written_bytes: int  # write_bytes (wchar where unreadable) of the tree, each process once
    stdout: str
    stderr: str
    sampled_rss_bytes: int = 0  # max over samples of sum(VmRSS) over the tree
    hwm_bytes: int = 0  # the largest VmHWM (kernel peak resident since exec) seen of any one process
    ru_maxrss_bytes: int = 0  # wait4's ru_maxrss: also holds our own peak when we spawned (see run_measured)
    samples: int = 0


@dataclass
class _Seen:
    """What the sampler knows about one process of the tree (mutable, sampler-private)."""

    start: str  # /proc/PID/stat start time: tells a reused PID apart
    written: int = 0


def _status(pid: int) -> dict[str, str]:
    """``/proc/PID/status`` as a dict; empty when the process is gone."""
    try:
        text = (PROC / str(pid) / "status").read_text()
    except OSError:  # vanished between listing and reading
        return {}
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def _kib(status: Mapping[str, str], key: str) -> int:
    """A ``NNN kB`` field of ``/proc/PID/status`` in bytes (0 when absent, e.g. a zombie)."""
    value = status.get(key, "").split()
    return int(value[0]) * 1024 if value else 0


def status_bytes(pid: int, key: str) -> int:
    """A ``NNN kB`` field of a live process's ``/proc/PID/status`` (``VmHWM``, ``VmRSS``...) in bytes;
    0 when the process is gone or has no such field."""
    return _kib(_status(pid), key)


def _written(pid: int) -> int | None:
    """Bytes the process (with its dead threads and reaped children) wrote; ``wchar`` if no ``write_bytes``."""
    try:
        fields = dict(line.split(": ", 1) for line in (PROC / str(pid) / "io").read_text().splitlines())
    except (OSError, ValueError):
        return None
    value = fields.get("write_bytes", fields.get("wchar"))
    return int(value) if value is not None else None


def _start_time(pid: int) -> str:
    """Field 22 of ``/proc/PID/stat`` (start time in ticks); '' when the process is gone."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants, found through ``/proc/PID/task/TID/children``."""
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        try:
            tasks = list((PROC / str(pid) / "task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                stack.extend(int(child) for child in (task / "children").read_text().split())
            except OSError:
                continue
    return found


@dataclass
class _Sampler:
    """Peaks of summed RssAnon / VmRSS over the tree, and each process's largest write counter."""

    root: int
    tree: bool = True
    peak_anon: int = 0
    peak_rss: int = 0
    hwm: int = 0
    samples: int = 0
    seen: dict[int, _Seen] = field(default_factory=dict)

    def sample(self) -> None:
        """Walk the tree once; processes that vanish mid-walk are skipped."""
        anon = rss = 0
        for pid in tree_pids(self.root) if self.tree else [self.root]:
            status = _status(pid)
            anon, rss = anon + _kib(status, "RssAnon"), rss + _kib(status, "VmRSS")
            self.hwm = max(self.hwm, _kib(status, "VmHWM"))
            written = _written(pid)
            if written is None:
                continue
            entry = self.seen.setdefault(pid, _Seen(_start_time(pid)))
            entry.written = max(entry.written, written)
        self.peak_anon, self.peak_rss = max(self.peak_anon, anon), max(self.peak_rss, rss)
        self.samples += 1

    def disk_written(self) -> int:
        """The root's final counter plus descendants still running outside the tree.

        The kernel adds a reaped child's counters to its parent's, so after the last sample (root
        exited, not yet reaped) the root's counter already holds every descendant reaped inside
        the tree; summing each process's own peak would count those twice. Only processes that
        outlived their parent (re-parented, still running) are added; an orphan that wrote and
        exited between samples is missed.
        """
        total = self.seen[self.root].written if self.root in self.seen else 0
        for pid, entry in self.seen.items():
            escaped = pid != self.root and entry.start and _start_time(pid) == entry.start
            total += entry.written if escaped else 0
        return total

    def run(self, stop: threading.Event, interval: float) -> None:
        """Sample every ``interval`` seconds until ``stop`` is set."""
        while not stop.is_set():
            self.sample()
            stop.wait(interval)


def _pump(stream: IO[str], sink: list[str], label: str | None) -> None:
    """Collect ``stream`` line by line; echo each line to our stderr as ``[label] line`` when labelled."""
    for line in iter(stream.readline, ""):
        sink.append(line)
        if label is not None:
            sys.stderr.write(f"[{label}] {line}" if line.endswith("\n") else f"[{label}] {line}\n")
            sys.stderr.flush()
    stream.close()


def _readers(proc: subprocess.Popen[str], label: str | None) -> tuple[list[threading.Thread], list[str], list[str]]:
    """Threads draining stdout and stderr (no pipe deadlock however much the child prints)."""
    out: list[str] = []
    err: list[str] = []
    threads = [threading.Thread(target=_pump, args=(proc.stdout, out, None), daemon=True),
               threading.Thread(target=_pump, args=(proc.stderr, err, label), daemon=True)]
    for thread in threads:
        thread.start()
    return threads, out, err


def run_measured(argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | Path | None = None,
                 interval: float = 0.05, label: str | None = None, tree: bool = True) -> Measured:
    """Run ``argv`` to completion, sampling its process tree every ``interval`` s via ``/proc``.

    Sampling can miss a spike shorter than ``interval``, so peak resident also takes the kernel's
    per-process peaks, which cover only the single largest process: VmHWM as last sampled, and
    ``ru_maxrss`` from ``os.wait4`` only when it exceeds our own peak at spawn time (exec carries
    the spawning process's high-water mark into the child's ``ru_maxrss``). Peak anonymous memory
    is sampled only. ``tree=False`` samples the child alone (a negative control: it misses
    grandchildren). With ``label``, the child's stderr is echoed live to ours as ``[label] line``.
    """
    own_peak = _kib(_status(os.getpid()), "VmHWM")
    start = time.perf_counter()
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            errors="replace", env=None if env is None else dict(env), cwd=cwd)
    readers, out, err = _readers(proc, label)
    sampler, stop = _Sampler(proc.pid, tree), threading.Event()
    thread = threading.Thread(target=sampler.run, args=(stop, interval), daemon=True)
    thread.start()
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited but not reaped: its /proc entry stays
    wall = time.perf_counter() - start
    stop.set()
    thread.join()
    sampler.sample()  # the zombie's io counters now include every child it reaped
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    for reader in readers:
        reader.join(READER_GRACE_S)
    maxrss = int(usage.ru_maxrss) * 1024  # KiB on Linux
    peak_rss = max(sampler.peak_rss, sampler.hwm, maxrss if maxrss > own_peak else 0)
    return Measured(tuple(argv), proc.returncode, wall, sampler.peak_anon, peak_rss, sampler.disk_written(),
                    "".join(out), "".join(err), sampler.peak_rss, sampler.hwm, maxrss, sampler.samples)
