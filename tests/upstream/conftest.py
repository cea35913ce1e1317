"""Fixtures for kiln's upstreams: fake engine nodes (fake_upstream.py, subprocesses so
they can be SIGKILLed) and a front ``kiln serve`` whose config points ``[[upstreams]]``
at them. Every wait here is bounded."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Server, free_port, start_server, stop_server

FAKE = Path(__file__).with_name("fake_upstream.py")


@dataclass
class Node:
    port: int
    args: list[str]
    proc: subprocess.Popen[bytes] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    host: str = "127.0.0.1"
    netns: str | None = None  # run inside this network namespace (tests/upstream/test_partition.py)

    @property
    def origin(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Node:
        inside = ["ip", "netns", "exec", self.netns] if self.netns else []  # ip execs the command: same pid
        self.proc = subprocess.Popen([*inside, sys.executable, str(FAKE), "--port", str(self.port),
                                      "--host", self.host, *self.args],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # "ready" once it listens (it prints nothing before)
        assert line.strip() == b"ready", line
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def stats(self) -> dict[str, Any]:
        return httpx.get(self.origin + "/stats", timeout=2).json()


@pytest.fixture
def nodes() -> Iterator[Any]:
    started: list[Node] = []

    def make(*args: str) -> Node:
        node = Node(free_port(), list(args)).start()
        started.append(node)
        return node

    yield make
    for n in started:
        n.kill()


def toml_value(v: Any) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    return json.dumps(v)


def write_config(path: Path, upstreams: list[dict[str, Any]], extra: str = "") -> Path:
    parts = [extra]
    for u in upstreams:
        parts.append("[[upstreams]]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in u.items()))
    path.write_text("\n".join(parts))
    return path


@pytest.fixture
def front(tmp_path: Path) -> Iterator[Any]:
    """``front(upstreams, env=...)`` -> a real ``kiln serve`` with those upstreams."""
    servers: list[Server] = []

    def make(upstreams: list[dict[str, Any]], env: dict[str, str] | None = None, name: str = "front") -> Server:
        d = tmp_path / name
        d.mkdir(exist_ok=True)
        config = write_config(d / "config.toml", upstreams)
        s = start_server(d, env={"KILN_CONFIG": str(config), **(env or {})})
        servers.append(s)
        return s

    yield make
    for s in servers:
        stop_server(s)


def wait_for(check: Any, timeout: float, step: float = 0.05) -> float:
    """Seconds until ``check()`` is true; fails after ``timeout``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if check():
            return time.monotonic() - t0
        time.sleep(step)
    raise AssertionError(f"not true within {timeout}s")


@dataclass
class Router:
    """SMG (the SGLang model gateway, PyPI ``smg``) in front of some workers."""

    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def models(self) -> list[str]:
        return [m["id"] for m in httpx.get(self.url + "/v1/models", timeout=2).json().get("data") or []]


def smg_binary() -> str:
    found = Path(sys.executable).with_name("smg")  # the venv's own, from the test extras
    if found.exists():
        return str(found)
    if os.environ.get("KILN_REQUIRE_REAL"):
        pytest.fail("SMG is not installed (pip install 'smg==1.13.0', in kiln's test extras)")
    pytest.skip("SMG is not installed")


@pytest.fixture
def smg(tmp_path: Path) -> Iterator[Any]:
    """``smg(worker_urls, policy)`` -> a running SMG on loopback (its Prometheus listener
    too, which defaults to 0.0.0.0), probing every second, never loading a tokenizer
    (it would look for one on a hub). Waits until it lists the workers' models."""
    started: list[Router] = []

    def make(workers: list[str], policy: str = "cache_aware", expect: int = 1) -> Router:
        port, prom = free_port(), free_port()
        log = tmp_path / f"smg-{port}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [smg_binary(), "launch", "--host", "127.0.0.1", "--port", str(port), "--policy", policy,
                 "--prometheus-host", "127.0.0.1", "--prometheus-port", str(prom), "--disable-tokenizer-autoload",
                 "--health-check-interval-secs", "1", "--worker-urls", *workers],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # its router is a child: killpg
        router = Router(f"http://127.0.0.1:{port}", proc, log)
        started.append(router)

        def ready() -> bool:
            try:
                return len(router.models()) >= expect
            except (httpx.HTTPError, ValueError):
                if proc.poll() is not None:  # not listening yet is fine; exited is not
                    pytest.fail(f"smg exited: {log.read_text()[-2000:]}")
                return False

        wait_for(ready, 30.0, step=0.2)
        return router

    yield make
    for r in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(r.proc.pid, signal.SIGKILL)
        r.proc.wait(5)
