"""The default thread count: physical cores among the CPUs this process may use, no more
than its CPU quota, one fewer for each core other processes keep busy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from backends.cpus import CpuShare, allowed_cpus, cpu_quota, default_threads, physical_cores


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


# -- the CPU quota and the moment-to-moment count ----------------------------------------

def test_cgroup_v2_quota_is_the_smallest_on_the_path(tmp_path):
    proc, cg = tmp_path / "proc", tmp_path / "cg"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text("0::/kiln/worker\n")
    (cg / "kiln" / "worker").mkdir(parents=True)
    (cg / "kiln" / "cpu.max").write_text("150000 100000\n")  # docker --cpus 1.5
    (cg / "kiln" / "worker" / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(cg, proc) == 1.5
    (cg / "kiln" / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(cg, proc) is None


def test_cgroup_v1_quota(tmp_path):
    proc, cg = tmp_path / "proc", tmp_path / "cg"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text("4:memory:/x\n1:cpu,cpuacct:/\n0::/\n")
    (cg / "cpu,cpuacct").mkdir(parents=True)
    (cg / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("100000\n")
    (cg / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota(cg, proc) == 1.0
    (cg / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_quota(cg, proc) is None


class FakeProc:
    """/proc/stat of two CPUs and the stat files of this process and its parent, in ticks."""

    def __init__(self, root: Path) -> None:
        self.root, self.t = root, 0.0
        self.cpu = {0: 0, 1: 0}  # busy ticks per CPU
        self.mine = 0  # this process's and its parent's ticks
        (root / "self").mkdir(parents=True)
        (root / str(os.getppid())).mkdir(parents=True, exist_ok=True)
        self.write()

    def write(self) -> None:
        lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]
        lines += [f"cpu{c} {b} 0 0 1000 0 0 0 0 0 0" for c, b in self.cpu.items()]
        (self.root / "stat").write_text("\n".join(lines) + "\nintr 1 2 3\n")
        stat = "1 (python (x)) S " + " ".join(["0"] * 10) + f" {self.mine} 0 0"
        (self.root / "self" / "stat").write_text(stat + "\n")
        (self.root / str(os.getppid()) / "stat").write_text("2 (kiln) S " + " ".join(["0"] * 12) + "\n")

    def second(self, others: float, mine: float) -> None:
        """One second in which other processes use ``others`` CPUs and this one ``mine``."""
        hz = os.sysconf("SC_CLK_TCK")
        self.t += 1.0
        self.cpu[0] += round(mine * hz)
        self.cpu[1] += round(others * hz)
        self.mine += round(mine * hz)
        self.write()


def test_a_busy_core_takes_a_thread_and_gives_it_back(tmp_path):
    fake = FakeProc(tmp_path)
    share = CpuShare(2, proc=tmp_path, cpus={0, 1}, clock=lambda: fake.t)
    assert share.threads() == 2
    fake.second(others=0.1, mine=1.9)  # the gateway's and the machine's odd jobs: keep both
    assert share.threads() == 2
    fake.second(others=0.6, mine=1.4)  # a hog on one core, getting its fair share of it
    assert share.threads() == 1 and share.busy == pytest.approx(0.6)
    fake.second(others=0.35, mine=1.0)  # between the two thresholds: no flapping
    assert share.threads() == 1
    fake.second(others=1.0, mine=1.0)
    assert share.threads() == 1
    fake.second(others=0.1, mine=1.0)  # the hog has gone
    assert share.threads() == 2


def test_measures_at_most_once_per_interval(tmp_path):
    fake = FakeProc(tmp_path)
    share = CpuShare(2, proc=tmp_path, cpus={0, 1}, clock=lambda: fake.t, interval=2.0)
    fake.second(others=1.0, mine=1.0)
    assert share.threads() == 2  # one second: not yet
    fake.second(others=1.0, mine=1.0)
    assert share.threads() == 1


def test_only_the_allowed_cpus_are_watched(tmp_path):
    fake = FakeProc(tmp_path)
    share = CpuShare(1, proc=tmp_path, cpus={0}, clock=lambda: fake.t)
    fake.second(others=1.0, mine=1.0)  # cpu1 is busy, but not ours
    assert share.threads() == 1 and share.busy == 0.0


def test_no_proc_stays_at_the_most(tmp_path):
    share = CpuShare(2, proc=tmp_path / "missing", cpus={0, 1})
    assert share.threads() == 2


def test_this_machines_default():
    assert 1 <= default_threads() <= physical_cores()
    share = CpuShare(default_threads())
    assert 1 <= share.threads() <= default_threads()
