"""The engine contract's one ``EngineInfo`` schema, checked on every engine kiln has: the
fake one, llama.cpp and OpenVINO (CPU) on the bundled model, each loaded in a real worker
process as the scheduler loads it (so the info is the one decoded from the wire), and an
upstream model. What the gateway reads from it (the scheduler's memory budget and
``/api/ps`` size, the request checks, ``/api/show``) must be there under the schema's
names: OpenVINO's KV cache once hid behind ``kv_cache_bytes`` while the scheduler read
``kv_bytes``."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import msgspec
import pytest

from backends import protocol as wire
from backends.base import Capabilities, EngineInfo, ModelSpec
from tests.models import bundled_gguf, missing

SCHEMA = {f.name for f in dataclasses.fields(EngineInfo)} - {"details"}
OPTIONAL = {"max_token_bytes", "max_prompt_len", "n_vocab"}  # None: the engine has no such bound


def worker_info(spec: ModelSpec) -> EngineInfo:
    """The info a real worker process sends when it has loaded ``spec``."""
    from backends.worker import WorkerBackend

    async def main() -> EngineInfo:
        w = WorkerBackend(spec)
        try:
            return await w.load()
        finally:
            await w.unload()

    return asyncio.run(main())


def check_schema(info: EngineInfo) -> dict[str, Any]:
    """The checks every engine's info passes; returns what ``/api/ps`` shows of it."""
    assert isinstance(info, EngineInfo) and isinstance(info.capabilities, Capabilities)
    # strict on the wire: a field of the wrong type or name fails decoding, not a later read
    assert msgspec.json.decode(wire.encode(wire.Ready(info=info)), type=wire.Ready).info == info
    collide = SCHEMA & set(info.details)
    assert not collide, f"details {collide} would be hidden by the schema's fields in /api/ps"
    public = info.public()
    assert SCHEMA - OPTIONAL <= public.keys(), SCHEMA - OPTIONAL - public.keys()
    assert isinstance(info.device, str) and info.device
    return public


def check_local(info: EngineInfo, spec: ModelSpec) -> None:
    """An engine that holds the model: the memory it took and the bounds it checks."""
    assert 0 < info.num_ctx <= spec.num_ctx and 1 <= info.num_parallel <= spec.num_parallel
    assert info.kv_bytes > 0, "the KV cache the memory budget and /api/ps count"
    assert info.n_vocab == 49152  # SmolLM2's vocabulary: token ids are checked against it


def test_fake_engine_info() -> None:
    info = worker_info(ModelSpec(name="fake", path="/dev/null", backend="fake", num_ctx=512, num_parallel=2))
    check_schema(info)
    assert (info.num_ctx, info.num_parallel) == (512, 2)


@pytest.mark.real_model
def test_llama_cpp_info() -> None:
    spec = ModelSpec(name="smollm2", path=str(bundled_gguf()), num_ctx=512, num_parallel=2)
    info = worker_info(spec)
    check_schema(info)
    check_local(info, spec)
    assert info.model_bytes == Path(spec.path).stat().st_size and info.max_token_bytes
    assert info.capabilities.grammar and info.capabilities.embeddings and info.capabilities.logit_bias


@pytest.mark.real_model
@pytest.mark.skipif(missing("openvino_genai"), reason="openvino-genai missing")
def test_openvino_cpu_info(tmp_path: Path) -> None:
    spec = ModelSpec(name="smollm2-ov", path=str(bundled_gguf()), backend="openvino", devices=["CPU"],
                     num_ctx=512, num_parallel=2, cache_dir=str(tmp_path))
    info = worker_info(spec)
    public = check_schema(info)
    check_local(info, spec)
    assert info.device == "CPU" and public["pipeline"] == "continuous_batching"
    assert info.capabilities.grammar, public  # xgrammar compiled a grammar at load (else the reason is shown)
    assert not info.capabilities.embeddings  # refused with a 400 before the engine is asked


def test_upstream_info() -> None:
    from backends.upstream import UpstreamBackend, UpstreamConfig, UpstreamPool

    pool = UpstreamPool([UpstreamConfig(name="node", api="ollama", urls=["http://127.0.0.1:9"], models=["m:1"])])

    async def main() -> EngineInfo:
        try:
            return await UpstreamBackend(pool, "m:1").load()
        finally:
            await pool.close()

    info = asyncio.run(main())
    public = check_schema(info)
    assert info.device == "upstream" and public["upstream"] == "node" and public["replicas"] == ["http://127.0.0.1:9"]
