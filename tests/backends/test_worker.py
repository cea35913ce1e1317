"""The gateway's side of a model's worker process (``backends/worker.py``): a real
worker subprocess running the fake engine, and the pipe protocol's line splitting."""

from __future__ import annotations

import asyncio
import subprocess

import pytest

from backends.base import BackendError, FinishReason, GenerationRequest, ModelSpec
from backends.worker import WorkerBackend, _Pipes


def spec(**extra: object) -> ModelSpec:
    return ModelSpec(name="fake", path="/dev/null", backend="fake", extra=dict(extra))


async def generate(w: WorkerBackend, prompt: str = "hello") -> tuple[str, list]:
    chunks = [c async for c in w.stream(GenerationRequest(prompt=prompt))]
    return "".join(c.text for c in chunks), chunks


def test_streams_tokens_and_answers_calls():
    async def main() -> None:
        w = WorkerBackend(spec(reply="one two three four"))
        await w.load()
        try:
            text, chunks = await generate(w)
            assert text == "one two three four"
            assert [c.text for c in chunks[:-1]] == ["one", " two", " three", " four"]
            assert chunks[-1].finish_reason == FinishReason.STOP and chunks[-1].usage.completion_tokens == 4
            assert await w.tokenize("a b c") == await w.tokenize("a b c") and len(await w.tokenize("a b c")) == 3
            # concurrent streams get their own messages
            texts = await asyncio.gather(*(generate(w, f"line {i}") for i in range(5)))
            assert all(t == "one two three four" for t, _ in texts)
        finally:
            await w.unload()
        assert not w.alive

    asyncio.run(main())


def test_a_crash_mid_stream_ends_the_stream_with_the_reason():
    async def main() -> None:
        w = WorkerBackend(spec(reply="a b c d e f", crash_at=2, delay=0.01))
        await w.load()
        got: list[str] = []
        with pytest.raises(BackendError, match="exited with status 3"):
            async for c in w.stream(GenerationRequest(prompt="x")):
                got.append(c.text)
        assert "".join(got) == "a b" and not w.alive
        with pytest.raises(BackendError, match="exited with status 3"):
            await w.tokenize("after")
        await w.unload()

    asyncio.run(main())


def test_a_worker_that_cannot_load_reports_why():
    async def main() -> None:
        w = WorkerBackend(ModelSpec(name="x", path="/nonexistent", backend="no-such-engine"))
        with pytest.raises(BackendError, match="unknown backend"):
            await w.load()
        assert not w.alive

    asyncio.run(main())


class _Transport:
    def __init__(self, pid: int) -> None:
        self.pid = pid

    def get_pid(self) -> int:
        return self.pid

    def get_returncode(self) -> int | None:
        return None


def test_lines_are_split_whatever_the_pipe_delivers():
    async def main() -> None:
        lines: list[bytes] = []
        pipes = _Pipes(lines.append, lambda line: None, lambda rc, error: None)
        for data in (b'{"a":1}\n', b'{"b"', b':2}\n{"c":3}\n{"d"', b":4}", b"\n", b"\n"):
            pipes.pipe_data_received(1, data)
        assert lines == [b'{"a":1}', b'{"b":2}', b'{"c":3}', b'{"d":4}', b""]
        assert pipes.error is None

    asyncio.run(main())


@pytest.mark.parametrize("data", [b"not json\n", b"x" * 64, b'["a list"]\n'])
def test_a_worker_breaking_the_protocol_is_killed(monkeypatch, data):
    monkeypatch.setattr("backends.worker._LINE_LIMIT", 32)

    async def main() -> None:
        victim = subprocess.Popen(["sleep", "60"], start_new_session=True)
        exits: list[tuple] = []
        w = WorkerBackend(spec())
        pipes = _Pipes(w._on_message, lambda line: None, lambda rc, error: exits.append((rc, error)))
        pipes.connection_made(_Transport(victim.pid))
        pipes.pipe_data_received(1, data)
        assert victim.wait(10) == -9
        assert pipes.error and pipes.error.startswith("protocol error from the worker")
        pipes.connection_lost(None)
        assert exits == [(None, pipes.error)]

    asyncio.run(main())


def test_stderr_without_newlines_is_logged_in_pieces(monkeypatch):
    monkeypatch.setattr("backends.worker._LOG_LINE_LIMIT", 16)

    async def main() -> None:
        logged: list[bytes] = []
        pipes = _Pipes(lambda line: None, logged.append, lambda rc, error: None)
        for _ in range(5):
            pipes.pipe_data_received(2, b"progress 10%\r")  # 13 bytes, never a newline
        pipes.pipe_data_received(2, b"done\n")
        assert pipes.error is None and b"".join(logged) == b"progress 10%\r" * 5 + b"done"

    asyncio.run(main())
