"""The real-model suites run on the llama.cpp backend by default. With
``KILN_CONFORMANCE_BACKEND`` set they run, unchanged, against the same model served
by OpenVINO: ``openvino-cpu`` (the GGUF through OpenVINO GenAI's continuous-batching
pipeline) or ``openvino-npu`` (an int4 IR compiled for the NPU profile, run by the
static NPU pipeline with OpenVINO's NPU wrapper on the CPU, ``NPUW_DEVICES=CPU``).
``upstream``: the model lives on a second kiln node, reached through ``[[upstreams]]``
(``api = "ollama"``, discovered: it shadows the front's own copy).

``KILN_CONFORMANCE_MODEL=gemma3`` runs them on Gemma 3 270M instead of SmolLM2 (a base
model, trained for 32,768 tokens, served with Gemma's own chat template; see
``tests.models.REAL_MODELS``). Not with ``upstream``."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends.store import FileRef, ModelStore, sha256_file
from tests.conftest import Server, require_model, start_server, stop_server
from tests.models import RealModel, conformance_model

BACKEND = os.environ.get("KILN_CONFORMANCE_BACKEND", "llamacpp")
# --embeddings: the model's hidden states too, so that OpenVINO serves /api/embed for it
COMPILE_ARGS = {
    "openvino-cpu": ["--profile", "cpu", "--no-export", "--embeddings"],
    "openvino-npu": ["--profile", "npu", "--npuw-devices", "CPU", "--max-prompt-len", "1024",
                     "--min-response-len", "256", "--embeddings"],
}


# Gemma 3 is neither a llama/qwen architecture nor a BPE vocabulary: OpenVINO GenAI cannot
# read its GGUF as it is, so for the CPU too it is exported to IR.
GEMMA_COMPILE_ARGS = {**COMPILE_ARGS, "openvino-cpu": ["--profile", "cpu", "--embeddings"]}


def compile_into(store: Path, backend: str, model: RealModel | None = None) -> None:
    """Puts the conformance model into ``store`` under its name, served by OpenVINO."""
    model = model or conformance_model()
    gguf = model.locate() if model.template else require_model()
    args = (GEMMA_COMPILE_ARGS if model.family == "gemma3" else COMPILE_ARGS)[backend]
    cmd = [sys.executable, "-m", "compile", str(gguf), "--name", model.name, "--store", str(store), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]
    with_template(store, model)


def with_template(store: Path, model: RealModel) -> None:
    """Gives a model whose GGUF has no chat template its own (and its stop strings)."""
    if model.template is None:
        return
    s = ModelStore(store)
    m = s.get(model.name)
    m.chat_template, m.parameters = model.template, {**m.parameters, **model.parameters}
    s.put(m)


def put_gguf(store: Path, model: RealModel) -> None:
    """Registers a GGUF outside the bundled set for llama.cpp, as a seeded model is."""
    from backends.gguf import read_gguf
    from server.models import manifest_from_gguf

    path = model.locate()
    ref = FileRef("model", str(path), sha256_file(path), path.stat().st_size)
    ModelStore(store).put(manifest_from_gguf(model.name, read_gguf(path), ref, source=f"test:{path.name}"))
    with_template(store, model)


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
    elif conformance_model().template is not None:
        put_gguf(tmp / "models", conformance_model())
    s = start_server(tmp, env={"KILN_NUM_PARALLEL": "4"})
    yield s
    stop_server(s)
