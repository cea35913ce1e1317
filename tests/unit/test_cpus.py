"""The default thread count: physical cores among the CPUs this process may use."""

from __future__ import annotations

from pathlib import Path

from backends.cpus import allowed_cpus, physical_cores


def _topology(root: Path, siblings: dict[int, str]) -> Path:
    for cpu, lst in siblings.items():
        d = root / f"cpu{cpu}" / "topology"
        d.mkdir(parents=True)
        (d / "thread_siblings_list").write_text(lst + "\n")
    return root


def test_hyperthreads_count_once(tmp_path):
    # 4 cores with 2 threads each, numbered the usual way: cpuN and cpuN+4 share a core.
    sysfs = _topology(tmp_path, {c: f"{c % 4},{c % 4 + 4}" for c in range(8)})
    assert physical_cores(set(range(8)), sysfs) == 4


def test_only_the_allowed_cpus_count(tmp_path):
    sysfs = _topology(tmp_path, {c: f"{c % 4},{c % 4 + 4}" for c in range(8)})
    assert physical_cores({0, 4}, sysfs) == 1  # one core's two threads (taskset -c 0,4)
    assert physical_cores({0, 1, 2}, sysfs) == 3


def test_no_smt_and_unreadable_topology(tmp_path):
    sysfs = _topology(tmp_path, {0: "0", 1: "1"})
    assert physical_cores({0, 1}, sysfs) == 2
    assert physical_cores({0, 1, 2, 3}, sysfs) == 4  # cpu2/3 unreadable: one core each
    assert physical_cores(set(), sysfs) == 1


def test_this_machine():
    cpus = allowed_cpus()
    assert 1 <= physical_cores() <= len(cpus)
