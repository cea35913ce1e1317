"""Helpers of the reliability suite (the fixtures are in conftest.py).

A module of its own because conftests cannot be imported by name: every one of them
is ``conftest``. Test modules here import ``reliability_support``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

MODEL = "smollm2:135m"
FULL_ENV = "KILN_RELIABILITY_FULL"
REPORT_ENV = "KILN_RELIABILITY_REPORT"


def _root_conftest() -> Any:
    """tests/conftest.py as a module, for ``start_server`` and friends, loaded from
    its path once under a name of its own."""
    name = "kiln_tests_root_conftest"
    if name not in sys.modules:
        path = Path(__file__).resolve().parent.parent / "conftest.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before exec: its dataclasses look themselves up there
        spec.loader.exec_module(module)
    return sys.modules[name]


_root = _root_conftest()
Server = _root.Server
start_server = _root.start_server
stop_server = _root.stop_server
free_port = _root.free_port
fake_factory = _root.fake_factory


# -- sizes -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Sizes:
    full: bool
    load_requests: int
    concurrency: int
    storm_clients: int
    fuzz_examples: int
    load_deadline: float  # seconds the load test may run before it stops starting requests
    storm_deadline: float

    @classmethod
    def pick(cls, full: bool) -> Sizes:
        if full:
            return cls(True, load_requests=1000, concurrency=16, storm_clients=200, fuzz_examples=200,
                       load_deadline=3000.0, storm_deadline=900.0)
        return cls(False, load_requests=120, concurrency=16, storm_clients=40, fuzz_examples=25,
                   load_deadline=420.0, storm_deadline=240.0)


def env_full() -> bool:
    return os.environ.get(FULL_ENV, "").strip().lower() not in ("", "0", "false", "no")


# -- figures -----------------------------------------------------------------------------

def write_report(test: str, full: bool, **figures: Any) -> dict[str, Any]:
    """Prints a test's figures and appends them to $KILN_RELIABILITY_REPORT as JSON."""
    record = {"test": test, "mode": "full" if full else "reduced",
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              # the machine is shared: the figures mean little without its load
              "loadavg_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(), **figures}
    line = json.dumps(record, default=str)
    print(f"\n[reliability] {line}")
    path = os.environ.get(REPORT_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    return record


# -- processes --------------------------------------------------------------------------

def children(pid: int) -> list[int]:
    """Direct children of a process, from /proc (the gateway's workers)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except FileNotFoundError:
            continue
    return sorted(set(out))


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except FileNotFoundError:
        return ""


def rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    return 0


def alive(pid: int) -> bool:
    """Running and not a zombie (a worker whose gateway died is reparented to init,
    which in a container may be slow to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def worker_pids(server: Any) -> list[int]:
    return [p for p in children(server.proc.pid) if "backends.worker" in cmdline(p)]


def tree_rss(server: Any) -> dict[str, int]:
    """RSS of the gateway and of its workers, in bytes."""
    workers = worker_pids(server)
    gw = server.rss_bytes()
    wk = sum(rss(p) for p in workers)
    return {"gateway": gw, "workers": wk, "total": gw + wk, "n_workers": len(workers)}


# -- HTTP ---------------------------------------------------------------------------------

def wait_until(fn: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fn():
            return True
        time.sleep(interval)
    return fn()


def ps_requests(url: str, model: str = MODEL) -> int | None:
    """``kiln.requests`` of /api/ps: requests holding a slot of the model (None: not loaded)."""
    for m in httpx.get(url + "/api/ps", timeout=30).json()["models"]:
        if m["name"] == model:
            return int(m["kiln"]["requests"])
    return None


Metrics = dict[str, list[tuple[dict[str, str], float]]]


def parse_metrics(text: str) -> Metrics:
    """Prometheus text format -> {name: [(labels, value)]} (enough for kiln's own)."""
    out: Metrics = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, labels = head, {}
        if "{" in head:
            name, rest = head.split("{", 1)
            for part in rest.rstrip("}").split('",'):
                if "=" in part:
                    k, v = part.split("=", 1)
                    labels[k.strip()] = v.strip().strip('"')
        try:
            out.setdefault(name, []).append((labels, float(value)))
        except ValueError:
            continue
    return out


def metric_sum(metrics: Metrics, name: str, **match: str | tuple[str, ...]) -> float:
    """The sum of a metric's samples whose labels match (a tuple: any of)."""
    total = 0.0
    for labels, value in metrics.get(name, []):
        ok = all(labels.get(k) in (want if isinstance(want, tuple) else (want,)) for k, want in match.items())
        if ok:
            total += value
    return total


def scrape(url: str, headers: dict[str, str] | None = None) -> Metrics:
    return parse_metrics(httpx.get(url + "/metrics", timeout=30, headers=headers).text)


def greedy_chat(url: str, content: str = "Say hello.", num_predict: int = 8, timeout: float = 180,
                headers: dict[str, str] | None = None) -> httpx.Response:
    """A normal, bounded, non-streamed chat: the "server still answers" probe."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "stream": False,
            "options": {"temperature": 0, "num_predict": num_predict}}
    return httpx.post(url + "/api/chat", json=body, timeout=timeout, headers=headers)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]
