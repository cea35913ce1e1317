"""How many threads an engine should compute with, by default and from moment to moment.

llama.cpp's own tools and Ollama default to the number of PHYSICAL cores: a second
hyperthread on a core adds little to matrix work and takes the core's share from it,
and a thread left over serves the rest of the server (here the gateway process,
which otherwise preempts a decode thread for every streamed token). Only the CPUs
this process may run on count (``taskset``, a container's cpuset), and no more than
a cgroup's CPU quota (``docker --cpus``) grants.

A busy machine needs fewer threads still. ggml's threads meet at a barrier after
every operation of the graph (hundreds per token), so when another process keeps
one core busy, the thread that shares that core is preempted for a scheduler slice
(milliseconds) while its partners wait at the barrier: measured here with one core
busy, 2 threads made ~0.3-3 tokens/s where 1 thread made ~24. ``CpuShare`` watches
how much of this process's CPUs other processes use and gives the engine one thread
fewer for each core they keep busy.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

SYSFS_CPU = Path("/sys/devices/system/cpu")
CGROUP = Path("/sys/fs/cgroup")
PROC = Path("/proc")


def allowed_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


def physical_cores(cpus: set[int] | None = None, sysfs: Path = SYSFS_CPU) -> int:
    """Distinct cores among ``cpus`` (default: the allowed ones), from each CPU's
    ``topology/thread_siblings_list``; a CPU whose topology cannot be read counts as
    a core of its own."""
    cpus = allowed_cpus() if cpus is None else cpus
    cores: set[str] = set()
    for cpu in cpus:
        try:
            siblings = (sysfs / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text().strip()
        except OSError:
            siblings = f"cpu{cpu}"
        cores.add(siblings)
    return max(1, len(cores))


def cpu_quota(cgroup: Path = CGROUP, proc: Path = PROC) -> float | None:
    """The CPUs this process's cgroup quota grants (cgroup v2 ``cpu.max``, v1
    ``cpu.cfs_quota_us``; the smallest along the path to the root), or None if
    unlimited or unknown."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    quotas: list[float] = []
    names: tuple[str, ...]
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one unified hierarchy
            base, names = cgroup, ("cpu.max",)
        elif "cpu" in controllers.split(","):
            base, names = cgroup / controllers, ("cpu.cfs_quota_us", "cpu.cfs_period_us")
            if not base.is_dir():
                base = cgroup / "cpu"
        else:
            continue
        d = base / path.lstrip("/")
        while True:
            try:
                if len(names) == 1:
                    quota, period = (d / names[0]).read_text().split()[:2]
                else:
                    quota, period = ((d / n).read_text().strip() for n in names)
                if quota not in ("max", "-1") and float(period) > 0:
                    quotas.append(float(quota) / float(period))
            except (OSError, ValueError):
                pass
            if d == base or base not in d.parents:
                break
            d = d.parent
    return min(quotas) if quotas else None


def default_threads() -> int:
    """The physical cores this process may use, and no more than its CPU quota (a
    thread that gets part of a core stalls the others at every barrier)."""
    n = physical_cores()
    quota = cpu_quota()
    if quota is not None:
        n = min(n, max(1, math.floor(quota)))
    return n


def _process_jiffies(stat: Path) -> int:
    """utime + stime of a process (all its threads), in clock ticks."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


class CpuShare:
    """The thread count to compute with now: ``most`` less a thread for each core
    that other processes keep busy on the CPUs this process may use.

    Busy is measured from ``/proc/stat`` (user, nice, system, irq, softirq and steal
    time of the allowed CPUs) less this process's own time and its parent's (the
    gateway, whose work serves this engine), over the last ``interval`` seconds or
    more. A core is given up when others keep more than ``DOWN`` of it busy and
    taken back when they use less than ``UP`` of it: the gap keeps the count from
    flapping, and a thread sharing a core with a busy process stalls its partners
    even when that process has the core only part of the time.
    """

    DOWN, UP = 0.4, 0.25

    def __init__(self, most: int, *, interval: float = 1.0, proc: Path = PROC,
                 cpus: set[int] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.most = self.n = max(1, most)
        self.interval, self.proc, self.clock = interval, proc, clock
        self.cpus = allowed_cpus() if cpus is None else cpus
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.mine = [proc / "self" / "stat", proc / str(os.getppid()) / "stat"]
        self.busy = 0.0  # others' cores, last measured
        self._last = self._sample()

    def _sample(self) -> tuple[float, int] | None:
        """(now, busy ticks of the allowed CPUs not spent by this process or its parent)."""
        try:
            busy = 0
            for line in (self.proc / "stat").read_text().splitlines():
                if not line.startswith("cpu") or line.startswith("cpu "):
                    continue
                name, *vals = line.split()
                if int(name[3:]) in self.cpus:
                    v = [int(x) for x in vals]
                    busy += v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)
            for stat in self.mine:
                with contextlib.suppress(OSError, ValueError, IndexError):  # a parent gone: nothing
                    busy -= _process_jiffies(stat)
            return self.clock(), busy
        except (OSError, ValueError, IndexError):
            return None  # no /proc (not Linux): stay at ``most``

    def threads(self) -> int:
        """The count for the next graph; measures at most once per ``interval``."""
        if self._last is None or self.most == 1 or self.clock() - self._last[0] < self.interval:
            return self.n
        now = self._sample()
        if now is None:
            return self.n
        (t0, b0), (t1, b1) = self._last, now
        self._last = now
        self.busy = max(0.0, (b1 - b0) / self.hz / max(t1 - t0, 1e-9))
        free = self.most - self.busy
        if (down := math.floor(free + self.DOWN)) < self.n:
            self.n = max(1, down)
        elif (up := math.floor(free + self.UP)) > self.n:
            self.n = min(self.most, up)
        return self.n

