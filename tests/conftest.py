"""Shared fixtures.

* ``fake_client``: the whole app in-process with the deterministic fake engine, for
  framing and error tests (milliseconds each).
* ``server``: a real ``kiln serve`` subprocess on the bundled model, driven by the
  official clients. Skipped when the bundled model is not installed, unless
  ``KILN_REQUIRE_REAL=1`` (CI), where that is a failure.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from backends.base import InProcessBackend, ModelSpec
from backends.fake import FakeEngine
from tests.models import bundled_gguf


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


require_model = bundled_gguf  # skipped without the bundled model; a failure under KILN_REQUIRE_REAL


@pytest.fixture
def fake_engine() -> Iterator[type[FakeEngine]]:
    FakeEngine.script.clear()
    FakeEngine.requests.clear()
    yield FakeEngine
    FakeEngine.script.clear()
    FakeEngine.requests.clear()


def fake_factory(**extra: object):
    def factory(spec: ModelSpec) -> InProcessBackend:
        spec.backend = "fake"
        spec.extra = {**spec.extra, **extra}
        return InProcessBackend(FakeEngine, spec)

    return factory


@pytest.fixture
def make_client(tmp_path: Path, fake_engine: type[FakeEngine]):
    """``make_client(**settings, engine={...})`` -> a TestClient on the fake engine."""
    from server.app import create_app
    from server.settings import Settings

    clients: list[TestClient] = []

    def make(engine: dict[str, object] | None = None, **settings: object) -> TestClient:
        s = Settings(models=tmp_path / "models", **settings)
        # A local client's Host: TestClient's default ("testserver") is a name the
        # DNS-rebinding guard refuses, as it should.
        c = TestClient(create_app(s, fake_factory(**(engine or {}))), base_url="http://localhost")
        c.__enter__()
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture
def fake_client(make_client) -> TestClient:
    return make_client()


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    store: Path
    log: Path

    @property
    def host(self) -> str:
        return self.url.removeprefix("http://")

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0


def start_server(tmp: Path, env: dict[str, str] | None = None, timeout: float = 60.0) -> Server:
    require_model()
    port = free_port()
    store = tmp / "models"
    log = tmp / "server.log"
    full_env = {**os.environ, "KILN_HOST": f"127.0.0.1:{port}", "KILN_MODELS": str(store),
                "KILN_CONFIG": str(tmp / "none.toml"), **(env or {})}
    full_env.pop("OLLAMA_HOST", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], env=full_env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"kiln serve exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/", timeout=1).status_code == 200:
                return Server(url, proc, store, log)
        except httpx.HTTPError:
            time.sleep(0.2)
    stop_server(Server(url, proc, store, log))
    raise RuntimeError("kiln serve did not start")


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One real server for the session, on the bundled model."""
    s = start_server(tmp_path_factory.mktemp("kiln"), env={"KILN_NUM_PARALLEL": "4"})
    yield s
    stop_server(s)
