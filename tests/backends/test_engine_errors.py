"""Whose fault an error is, across the worker boundary: a request the engine cannot serve
is a 400, an engine that failed a 500 with the engine's own words, one that is not there a
503; a worker's stderr reaches the gateway's log at its level, and a worker that dies is
reported with its last error line (as Ollama reports its runner's)."""

from __future__ import annotations

import hashlib
import logging
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from backends import protocol as wire
from backends.base import BackendError, EngineUnavailable, InvalidRequest, ModelSpec
from backends.worker import WorkerBackend
from server.errors import classify
from tests.models import bundled_gguf

MODEL = "smollm2:135m"


@pytest.fixture
def worker_client(tmp_path: Path) -> Iterator[Callable[..., TestClient]]:
    """``worker_client(**extra)``: the app with every model in a real worker process
    running the fake engine with ``extra``."""
    from server.app import create_app
    from server.settings import Settings

    clients: list[TestClient] = []

    def make(**extra: Any) -> TestClient:
        def factory(spec: ModelSpec) -> WorkerBackend:
            spec.backend, spec.extra = "fake", {**spec.extra, **extra}
            return WorkerBackend(spec)

        bundled_gguf()  # the bundled model's name is registered (its GGUF is not loaded)
        c = TestClient(create_app(Settings(models=tmp_path / "models"), factory), base_url="http://localhost")
        c.__enter__()
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.__exit__(None, None, None)


def test_error_kinds_map_to_statuses() -> None:
    for exc, kind, status in ((InvalidRequest("bad"), "invalid", 400), (BackendError("broke"), "engine", 500),
                              (EngineUnavailable("gone"), "unavailable", 503), (KeyError("k"), "engine", 500)):
        err = wire.error_of("r", exc)
        assert err.kind == kind
        back = wire.exception(err.kind, err.message)
        assert classify(back)[0] == status, exc
        assert wire.from_worker(wire.encode(err)) == err  # typed on the wire both ways
    assert wire.error_of("r", KeyError("k")).message == "KeyError: 'k'"  # not kiln's: named


def test_an_engine_failure_is_a_500_with_the_engines_own_words(worker_client) -> None:
    c = worker_client(embed_error="ggml_backend_alloc: failed to allocate 8.00 GiB")
    r = c.post("/api/embed", json={"model": MODEL, "input": "hello"})
    assert r.status_code == 500, r.text  # was a 400: every error from a live worker read as the client's
    assert r.json() == {"error": "ggml_backend_alloc: failed to allocate 8.00 GiB"}
    r = c.post("/v1/embeddings", json={"model": MODEL, "input": "hello"})
    assert r.status_code == 500 and r.json()["error"]["type"] == "api_error"
    assert r.json()["error"]["message"] == "ggml_backend_alloc: failed to allocate 8.00 GiB"


def test_a_worker_that_dies_is_a_500_with_its_last_error_line(worker_client) -> None:
    c = worker_client(crash_at=0, crash_message="GGML_ASSERT(n_tokens_all <= cparams.n_batch) failed")
    r = c.post("/api/generate", json={"model": MODEL, "prompt": "hi", "stream": False})
    assert r.status_code == 500, r.text
    assert r.json()["error"] == ("the model's worker process exited with status 3: "
                                 "GGML_ASSERT(n_tokens_all <= cparams.n_batch) failed")
    r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 500 and "GGML_ASSERT" in r.json()["error"]["message"]  # restarted, died again


def test_worker_stderr_is_logged_at_its_level_and_the_last_errors_kept(caplog) -> None:
    w = WorkerBackend(ModelSpec(name="m", path=""))
    caplog.set_level(logging.DEBUG, logger="kiln.worker.m")
    for line in (b"DEBUG kiln.llamacpp: load_tensors: CPU model buffer size = 100 MiB",
                 b"WARNING kiln.openvino: m: GPU cannot run it: no device",
                 b"ERROR kiln.worker: <function> failed", b"Traceback (most recent call last):", b"  "):
        w._on_log(line)
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.DEBUG, "kiln.llamacpp: load_tensors: CPU model buffer size = 100 MiB"),
        (logging.WARNING, "kiln.openvino: m: GPU cannot run it: no device"),
        (logging.ERROR, "kiln.worker: <function> failed"),
        (logging.WARNING, "Traceback (most recent call last):"),  # a native or unprefixed line
    ]
    assert list(w.last_lines) == ["kiln.openvino: m: GPU cannot run it: no device",
                                  "kiln.worker: <function> failed", "Traceback (most recent call last):"]


def test_a_call_to_an_unloaded_worker_is_a_503() -> None:
    import asyncio

    async def main() -> None:
        w = WorkerBackend(ModelSpec(name="fake", path="/dev/null", backend="fake"))
        await w.load()
        await w.unload()
        with pytest.raises(EngineUnavailable) as e:
            await w.tokenize("x")
        assert classify(e.value)[0] == 503

    asyncio.run(main())


def _hollow_gguf() -> bytes:
    """A GGUF whose header is sound but which llama.cpp cannot load (no hyperparameters)."""
    def s(text: str) -> bytes:
        return struct.pack("<Q", len(text)) + text.encode()

    body = b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + s("general.architecture") + struct.pack("<I", 8) + s("llama")
    body += s("w") + struct.pack("<I", 1) + struct.pack("<Q", 32) + struct.pack("<IQ", 0, 0)
    return body + b"\0" * (-len(body) % 32) + b"\0" * 128


@pytest.mark.real_model
def test_llama_cpp_failing_to_load_is_a_500_with_its_own_error_line(tmp_path: Path) -> None:
    """The real engine in a real worker: llama.cpp's own reason reaches the client."""
    from server.app import create_app
    from server.settings import Settings

    bundled_gguf()
    data = _hollow_gguf()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with TestClient(create_app(Settings(models=tmp_path / "models")), base_url="http://localhost") as c:
        assert c.post(f"/api/blobs/{digest}", content=data).status_code == 201
        r = c.post("/api/create", json={"model": "hollow", "files": {"m.gguf": digest}, "stream": False})
        assert r.status_code == 200, r.text
        r = c.post("/api/generate", json={"model": "hollow", "prompt": "hi", "raw": True, "stream": False})
    assert r.status_code == 500, r.text
    message = r.json()["error"]
    assert message.startswith(f"llama.cpp could not load blobs/sha256-{digest[7:]}: "), message
    # llama.cpp's own words, as it logged them
    assert "llama_model_load: error loading model: error loading model hyperparameters: " \
           "key not found in model: llama.context_length" in message, message


@pytest.mark.real_model
def test_the_worker_logs_at_the_level_the_settings_give(caplog, tmp_path: Path) -> None:
    """KILN_WORKER_LOG is a setting the scheduler hands each worker in its load message:
    at debug llama.cpp's loading lines reach the gateway's log; at the default (warning)
    the worker does not send them."""
    import asyncio

    from backends.store import ModelStore
    from server.scheduler import Scheduler
    from server.settings import Settings

    caplog.set_level(logging.DEBUG, logger="kiln.worker.m")
    spec = ModelSpec(name="m", path=str(bundled_gguf()), num_ctx=256)

    def debug_lines(settings: Settings) -> list[str]:
        async def main() -> None:
            w = Scheduler(settings, ModelStore(tmp_path / "models")).backend_factory(spec)
            await w.load()
            await w.unload()

        caplog.clear()
        asyncio.run(main())
        return [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]

    assert any("llama_model_loader: " in line for line in debug_lines(Settings(worker_log="debug")))
    assert debug_lines(Settings()) == []
