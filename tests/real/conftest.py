"""The real-model suites run on the llama.cpp backend by default. With
``KILN_CONFORMANCE_BACKEND`` set they run, unchanged, against the same model served
by OpenVINO: ``openvino-cpu`` (the GGUF through OpenVINO GenAI's continuous-batching
pipeline) or ``openvino-npu`` (an int4 IR compiled for the NPU profile, run by the
static NPU pipeline with OpenVINO's NPU wrapper on the CPU, ``NPUW_DEVICES=CPU``).
``upstream``: the model lives on a second kiln node, reached through ``[[upstreams]]``
(``api = "ollama"``, discovered: it shadows the front's own copy)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Server, require_model, start_server, stop_server

BACKEND = os.environ.get("KILN_CONFORMANCE_BACKEND", "llamacpp")
COMPILE_ARGS = {
    "openvino-cpu": ["--profile", "cpu", "--no-export"],
    "openvino-npu": ["--profile", "npu", "--npuw-devices", "CPU", "--max-prompt-len", "1024",
                     "--min-response-len", "256"],
}


def compile_into(store: Path, backend: str) -> None:
    """Puts the bundled model into ``store`` as ``smollm2:135m``, served by OpenVINO."""
    gguf = require_model()
    cmd = [sys.executable, "-m", "compile", str(gguf), "--name", "smollm2:135m", "--store", str(store),
           *COMPILE_ARGS[backend]]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("kiln")
    if BACKEND == "upstream":
        (tmp / "node").mkdir()
        node = start_server(tmp / "node", env={"KILN_NUM_PARALLEL": "4"})
        (tmp / "config.toml").write_text(f'[[upstreams]]\nname = "node"\napi = "ollama"\nurls = ["{node.url}"]\n')
        s = start_server(tmp, env={"KILN_CONFIG": str(tmp / "config.toml")})
        yield s
        stop_server(s)
        stop_server(node)
        return
    if BACKEND != "llamacpp":
        if BACKEND not in COMPILE_ARGS:
            pytest.fail(f"unknown KILN_CONFORMANCE_BACKEND {BACKEND!r} (llamacpp, {', '.join(COMPILE_ARGS)})")
        compile_into(tmp / "models", BACKEND)
    s = start_server(tmp, env={"KILN_NUM_PARALLEL": "4"})
    yield s
    stop_server(s)
