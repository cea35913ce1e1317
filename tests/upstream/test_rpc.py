"""U17 of the research note (scaleout.md §4.3), experimental: one model split across
machines with llama.cpp's RPC, as deploy/fleet/README.md describes it. Two
``ggml-rpc-server``s on loopback hold the layers, ``llama-server --rpc`` serves the
model, and kiln reaches it as an ``api = "openai"`` upstream. llama.cpp's RPC is
insecure on an open network: everything here listens on 127.0.0.1.

Needs the binaries of bench/build_llama_server.sh (llama-server and ggml-rpc-server
from the llama.cpp kiln pins, built with GGML_RPC; about 10-30 minutes on 2 cores).
Without them this test is skipped; ``make test-rpc`` builds them and runs it with
KILN_REQUIRE_RPC=1, which fails instead of skipping."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.models import bundled_gguf
from tests.upstream.conftest import wait_for

pytestmark = pytest.mark.real_model

CACHE = Path(os.environ.get("KILN_BENCH_CACHE", Path.home() / ".cache" / "kiln-bench"))
BIN = CACHE / "build-llama-server-0.3.36" / "bin"


def binaries() -> tuple[Path, Path]:
    server, rpc = BIN / "llama-server", BIN / "ggml-rpc-server"
    if not os.environ.get("KILN_REQUIRE_RPC"):
        # Experimental (U17): its own target, not the default suite (it needs the
        # llama.cpp binaries, 10-30 minutes to build on 2 cores).
        pytest.skip("the RPC split is tested by make test-rpc (KILN_REQUIRE_RPC=1)")
    if not (server.exists() and rpc.exists()):
        if os.environ.get("KILN_REQUIRE_RPC"):
            pytest.fail(f"llama-server and ggml-rpc-server are not built in {BIN} (bench/build_llama_server.sh)")
        pytest.skip(f"llama.cpp RPC binaries not built in {BIN}: make test-rpc builds them")
    return server, rpc


class Procs:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir, self.procs = log_dir, {}

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with open(self.log_dir / f"{name}.log", "wb") as out:
            p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = p
        return p

    def kill(self, name: str) -> None:
        p = self.procs[name]
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(10)

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")[-1500:]


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    for name in list(p.procs):
        p.kill(name)


def stream_tokens(url: str, model: str, n: int, on_token=None) -> tuple[list[dict], float]:
    """A streamed /v1/chat/completions through kiln: its events and tokens/s."""
    events: list[dict] = []
    first = time.monotonic()
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=120, json={
            "model": model, "messages": [{"role": "user", "content": "Tell a long story about a lighthouse."}],
            "max_tokens": n, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
                if len(events) == 1:
                    first = time.monotonic()
                if on_token is not None:
                    on_token(len(events))
    tokens = sum(1 for e in events if e.get("choices") and e["choices"][0]["delta"].get("content"))
    return events, (tokens - 1) / max(1e-9, time.monotonic() - first) if tokens > 1 else 0.0


def test_llama_server_over_rpc_as_an_upstream(procs, front) -> None:
    server, rpc = binaries()
    gguf = bundled_gguf()
    rpc_ports = [free_port(), free_port()]
    for i, port in enumerate(rpc_ports):
        procs.start(f"rpc{i}", [str(rpc), "-H", "127.0.0.1", "-p", str(port), "-t", "1"])
    split_port, local_port = free_port(), free_port()
    common = ["-m", str(gguf), "--host", "127.0.0.1", "-t", "1", "-np", "2", "-c", "4096", "--no-webui"]

    def start_split() -> None:
        procs.start("split", [str(server), *common, "--port", str(split_port), "-ngl", "99", "--alias", "smol-rpc",
                              "-lv", "4",  # this llama.cpp logs the devices a model loads onto at 4, not its default 3
                              "--rpc", ",".join(f"127.0.0.1:{p}" for p in rpc_ports)])

    wait_for(lambda: all(_listening(p) for p in rpc_ports), 10.0, step=0.1)
    start_split()
    procs.start("local", [str(server), *common, "--port", str(local_port), "--alias", "smol-local"])
    kiln = front([
        {"name": "split", "api": "openai", "urls": [f"http://127.0.0.1:{split_port}/v1"],
         "models": {"smol-rpc": "smol-rpc"}, "probe_interval": 0.5, "first_token_timeout": 60.0},
        {"name": "local", "api": "openai", "urls": [f"http://127.0.0.1:{local_port}/v1"],
         "models": {"smol-local": "smol-local"}, "probe_interval": 0.5, "first_token_timeout": 60.0}])
    fleet = lambda: httpx.get(kiln.url + "/health").json()["upstreams"]  # noqa: E731
    wait_for(lambda: fleet()["split"]["up"] == 1 and fleet()["local"]["up"] == 1, 60.0, step=0.2)
    loaded = [line for line in (procs.log_dir / "split.log").read_text(errors="replace").splitlines()
              if "model buffer size" in line]
    assert sum("RPC" in line for line in loaded) == 2, procs.log("split")  # the layers went to both RPC servers

    # tokens/s over RPC vs the same llama-server without it, both through kiln
    _, local_tps = stream_tokens(kiln.url, "smol-local", 48)
    events, rpc_tps = stream_tokens(kiln.url, "smol-rpc", 48)
    assert events[-1].get("usage") or any(e.get("choices") and e["choices"][0].get("finish_reason") for e in events)
    print(f"U17 llama-server --rpc (2 loopback rpc-servers) through kiln: {rpc_tps:.1f} tok/s vs "
          f"{local_tps:.1f} local (ratio {rpc_tps / max(local_tps, 1e-9):.2f}; reference about 0.5)")

    # one rpc-server SIGKILLed mid-stream: llama-server aborts (GGML_ABORT), kiln ends the
    # stream with an error event, never a finish, and marks the upstream down
    killed = [0.0]

    def kill_at_5(n: int) -> None:
        if n == 5 and not killed[0]:
            killed[0] = time.monotonic()
            procs.kill("rpc1")

    events, _ = stream_tokens(kiln.url, "smol-rpc", 2000, kill_at_5)
    took = time.monotonic() - killed[0]
    assert killed[0] and "error" in events[-1], events[-3:]
    assert not any(e.get("choices") and e["choices"][0].get("finish_reason") for e in events)
    wait_for(lambda: procs.procs["split"].poll() is not None, 10.0)  # llama-server aborted, as llama.cpp does
    print(f"U17 rpc-server killed mid-stream: error event {took:.3f}s after, llama-server exited "
          f"({procs.procs['split'].returncode}): {events[-1]['error'].get('message', '')[:120]}")
    assert took <= 1.0 and fleet()["split"]["up"] == 0
    t0 = time.monotonic()
    r = httpx.post(kiln.url + "/v1/chat/completions", timeout=10,
                   json={"model": "smol-rpc", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503 and "retry-after" in r.headers and time.monotonic() - t0 < 1.5
    assert httpx.post(kiln.url + "/v1/chat/completions", timeout=120, json={  # the rest of kiln is unharmed
        "model": "smol-local", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).status_code == 200

    # supervised: the rpc-server and llama-server restarted (systemd would), kiln sees it up again
    procs.start("rpc1", [str(rpc), "-H", "127.0.0.1", "-p", str(rpc_ports[1]), "-t", "1"])
    wait_for(lambda: _listening(rpc_ports[1]), 10.0, step=0.1)
    t0 = time.monotonic()
    start_split()
    back = wait_for(lambda: fleet()["split"]["up"] == 1, 60.0, step=0.2)
    print(f"U17 restarted: the split model up again in kiln {back:.1f}s after llama-server restarted")
    events, _ = stream_tokens(kiln.url, "smol-rpc", 8)
    assert any(e.get("choices") and e["choices"][0].get("finish_reason") for e in events)


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0
