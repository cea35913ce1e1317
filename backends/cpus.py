"""How many threads an engine should compute with by default.

llama.cpp's own tools and Ollama default to the number of PHYSICAL cores: a second
hyperthread on a core adds little to matrix work and takes the core's share from it,
and a thread left over serves the rest of the server (here the gateway process,
which otherwise preempts a decode thread for every streamed token). Only the CPUs
this process may run on count (``taskset``, a container's cpuset).
"""

from __future__ import annotations

import os
from pathlib import Path

SYSFS_CPU = Path("/sys/devices/system/cpu")


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
