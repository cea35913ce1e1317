"""One worker process per loaded model, and the gateway's handle on it.

Why a process (as Ollama runs a runner per model): a blocking engine loop stays off
the gateway's event loop (OpenVINO's ``step()`` holds the GIL), a native crash takes
down one model and not the server, and unloading gives the memory back.

The wire between them is JSON lines, the typed messages of ``backends.protocol``. The
worker keeps its real stdout for the protocol and points fd 1 at stderr, so a native
library that prints cannot corrupt it. Its stderr is the gateway's log: each line at the
level the worker logged it (a line without one, a native library's, as a warning), and
the last warnings and errors are kept: a worker that dies is reported with them, as
Ollama reports its runner's last error line.

The worker exits when its stdin closes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import sys
import threading
import uuid
from collections.abc import AsyncGenerator, Callable
from typing import Any

from backends import protocol as wire
from backends.base import (
    Backend,
    BackendError,
    Chunk,
    Embeddings,
    EngineInfo,
    EngineUnavailable,
    GenerationRequest,
    ModelSpec,
)

log = logging.getLogger("kiln.worker")

_LINE_LIMIT = 256 << 20  # embeddings of long batches are big lines
_LOG_LINE_LIMIT = 64 << 10  # stderr without a newline (a progress bar's \r) is logged in pieces
_LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"  # the worker's; the gateway reads the level back
_LEVELS = {name: getattr(logging, name) for name in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")}
_KEPT_LINES = 5  # the last warnings and errors, for the error a dead worker is reported with


class _Pipes(asyncio.SubprocessProtocol):
    """The worker's stdout and stderr, split into lines as the bytes arrive.

    A protocol rather than reader tasks: a streamed token costs the gateway one
    callback, not a ``readline`` and a task switch. It matters on a machine whose
    cores all decode: each wake-up of the gateway is time taken from the engine.
    """

    def __init__(self, on_message: Callable[[bytes], None], on_log: Callable[[bytes], None],
                 on_exit: Callable[[int | None, str | None], None]) -> None:
        self.handlers = {1: on_message, 2: on_log}
        self.buffers = {1: bytearray(), 2: bytearray()}
        self.on_exit = on_exit
        self.error: str | None = None
        self.transport: asyncio.SubprocessTransport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        buf = self.buffers[fd]
        if b"\n" not in data:  # part of a line (embeddings come as long ones)
            buf += data
            if fd == 2 and len(buf) > _LOG_LINE_LIMIT:
                self.handlers[2](bytes(buf))
                buf.clear()
            elif len(buf) > _LINE_LIMIT:
                buf.clear()
                self.fail(f"protocol error from the worker: a line longer than {_LINE_LIMIT} bytes")
            return
        if buf:
            buf += data
            data = bytes(buf)
            buf.clear()
        *lines, rest = data.split(b"\n")
        buf += rest
        for line in lines:
            if self.error is not None:
                return
            try:
                self.handlers[fd](line)
            except Exception as e:  # noqa: BLE001 - not JSON, or not a message
                self.fail(f"protocol error from the worker: {type(e).__name__}: {e}")

    def fail(self, reason: str) -> None:
        """A worker that breaks the protocol is killed; ``connection_lost`` then reports it."""
        self.error = self.error or reason
        if self.transport is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.transport.get_pid(), signal.SIGKILL)

    def connection_lost(self, exc: Exception | None) -> None:
        """The process has exited and both pipes are drained."""
        rc = self.transport.get_returncode() if self.transport is not None else None
        self.on_exit(rc, self.error)
        if not self.closed.done():
            self.closed.set_result(None)


class _Inbox:
    """One request's messages from the worker, in order: a deque and the reader's
    waiter (what an ``asyncio.Queue`` does, with a fraction of its calls per token)."""

    __slots__ = ("items", "waiter")

    def __init__(self) -> None:
        self.items: collections.deque[wire.FromWorker] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None

    def put(self, msg: wire.FromWorker) -> None:
        self.items.append(msg)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def get(self) -> wire.FromWorker:
        while not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        return self.items.popleft()


class WorkerBackend(Backend):
    """The gateway's side: spawns ``python -m backends.worker`` and speaks to it."""

    def __init__(self, spec: ModelSpec, env: dict[str, str] | None = None, log_level: str = "WARNING") -> None:
        self.spec = spec
        self.env = env or {}
        self.log_level = log_level.upper()
        self.info: EngineInfo | None = None
        self._pipes: _Pipes | None = None
        self._stdin: asyncio.WriteTransport | None = None
        self._pending: dict[str, _Inbox] = {}
        self._dead: BackendError | None = None
        self._ready: asyncio.Future[EngineInfo] | None = None
        self._log = logging.getLogger(f"kiln.worker.{spec.name}")
        self.last_lines: collections.deque[str] = collections.deque(maxlen=_KEPT_LINES)

    @property
    def pid(self) -> int | None:
        return self._pipes.transport.get_pid() if self._pipes and self._pipes.transport else None

    @property
    def alive(self) -> bool:
        return self._pipes is not None and self._dead is None

    @property
    def dead_reason(self) -> str | None:
        return str(self._dead) if self._dead is not None else None

    async def load(self) -> EngineInfo:
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        _, self._pipes = await loop.subprocess_exec(
            lambda: _Pipes(self._on_message, self._on_log, self._on_exit),
            sys.executable, "-m", "backends.worker",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, **self.env},
            start_new_session=True,  # a Ctrl-C at the terminal goes to the gateway only
        )
        assert self._pipes.transport is not None
        self._stdin = self._pipes.transport.get_pipe_transport(0)  # type: ignore[assignment]
        self._send(wire.Load(spec=self.spec, log_level=self.log_level))
        try:
            self.info = await self._ready
        except BaseException:
            await self.unload()
            raise
        return self.info

    def _send(self, msg: wire.ToWorker) -> None:
        if self._dead is not None:
            raise type(self._dead)(str(self._dead))
        if not self.alive or self._stdin is None:
            raise EngineUnavailable("the model's worker process is not running")
        self._stdin.write(wire.encode(msg) + b"\n")

    def _on_message(self, line: bytes) -> None:
        msg = wire.from_worker(line)
        if isinstance(msg, wire.Ready | wire.Fatal):
            if self._ready is not None and not self._ready.done():
                if isinstance(msg, wire.Fatal):
                    self._ready.set_exception(BackendError(msg.error))
                elif msg.version != wire.VERSION:
                    self._ready.set_exception(BackendError(
                        f"the worker speaks protocol version {msg.version}, the gateway {wire.VERSION}"))
                else:
                    self._ready.set_result(msg.info)
            return
        q = self._pending.get(msg.id)
        if q is not None:
            q.put(msg)

    def _on_log(self, line: bytes) -> None:
        text = line.decode(errors="replace").rstrip()
        if not text.strip():
            return
        name, _, rest = text.partition(" ")
        level = _LEVELS.get(name)
        if level is None:  # a native library's own line (an assert, a traceback's)
            level, rest = logging.WARNING, text
        if level >= logging.WARNING:
            self.last_lines.append(rest)
        self._log.log(level, "%s", rest)

    def _on_exit(self, rc: int | None, error: str | None) -> None:
        if error:
            reason = error
        elif rc and rc < 0:
            reason = f"the model's worker process was killed by signal {-rc}"
        elif rc:
            reason = f"the model's worker process exited with status {rc}"
        else:
            reason = "the model's worker process exited"
        if self._dead is None:
            if self.last_lines and not error:
                reason = f"{reason}: {self.last_lines[-1]}"
            # A worker that was unloaded is not there to ask (503); one that died failed (500).
            self._dead = BackendError(reason) if self._pipes is not None else EngineUnavailable(reason)
        if self._ready and not self._ready.done():
            self._ready.set_exception(self._dead)
        for rid, q in self._pending.items():
            q.put(wire.Error(id=rid, kind=wire.kind_of(self._dead), message=str(self._dead)))

    async def _call(self, msg: wire.Prepare | wire.Tokenize | wire.Detokenize | wire.Embed | wire.Stats
                    ) -> wire.FromWorker:
        q = _Inbox()
        self._pending[msg.id] = q
        try:
            self._send(msg)
            reply = await q.get()
        finally:
            self._pending.pop(msg.id, None)
        if isinstance(reply, wire.Error):
            raise wire.exception(reply.kind, reply.message)
        return reply

    async def stream(self, req: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        q = _Inbox()
        self._pending[req.id] = q
        finished = False
        try:
            self._send(wire.Generate(id=req.id, req=req))
            while True:
                msg = await q.get()
                if isinstance(msg, wire.Error):
                    raise wire.exception(msg.kind, msg.message)
                assert isinstance(msg, wire.ChunkOut)
                chunk = msg.chunk
                if chunk.finish_reason is not None:
                    finished = True
                yield chunk
                if finished:
                    return
        finally:
            self._pending.pop(req.id, None)
            if not finished and self.alive:
                self._send(wire.Cancel(id=req.id))

    async def _prepare(self, req: GenerationRequest) -> list[int]:
        reply = await self._call(wire.Prepare(id=_rid(), req=req))
        assert isinstance(reply, wire.Tokens)
        return reply.ids

    async def tokenize(self, text: str) -> list[int]:
        reply = await self._call(wire.Tokenize(id=_rid(), text=text))
        assert isinstance(reply, wire.Tokens)
        return reply.ids

    async def embed(self, texts: list[str | list[int]]) -> Embeddings:
        reply = await self._call(wire.Embed(id=_rid(), texts=texts))
        assert isinstance(reply, wire.Vectors)
        return reply.embeddings

    async def detokenize(self, ids: list[int]) -> str:
        reply = await self._call(wire.Detokenize(id=_rid(), ids=ids))
        assert isinstance(reply, wire.Text)
        return reply.text

    async def stats(self) -> dict[str, Any]:
        if not self.alive:
            return {}
        reply = await self._call(wire.Stats(id=_rid()))
        assert isinstance(reply, wire.StatsOut)
        return reply.stats

    async def unload(self, timeout: float = 10.0) -> None:
        pipes, self._pipes = self._pipes, None
        if pipes is None or pipes.transport is None:
            return
        self._dead = self._dead or EngineUnavailable("the model was unloaded")
        if not pipes.closed.done():
            try:
                assert self._stdin is not None
                self._stdin.close()  # the worker exits when its stdin closes
                await asyncio.wait_for(asyncio.shield(pipes.closed), timeout)
            except (asyncio.TimeoutError, OSError, AssertionError):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pipes.transport.get_pid(), signal.SIGKILL)
                await pipes.closed
        pipes.transport.close()


# -- the worker process ----------------------------------------------------------

def _rid() -> str:
    return uuid.uuid4().hex


def main() -> None:
    proto = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything the engine prints goes to stderr, never into the protocol
    sys.stdout = sys.stderr
    lock = threading.Lock()

    def send(msg: wire.FromWorker) -> None:
        line = wire.encode(msg) + b"\n"
        with lock:
            proto.write(line)
            proto.flush()

    try:
        first = wire.to_worker(sys.stdin.buffer.readline())
    except Exception as e:  # noqa: BLE001 - a gateway of another version, or none
        send(wire.Fatal(error=f"the worker could not read its load message: {e}"))
        return
    if not isinstance(first, wire.Load):
        return
    if first.version != wire.VERSION:
        send(wire.Fatal(error=f"the gateway speaks protocol version {first.version}, the worker {wire.VERSION}"))
        return
    logging.basicConfig(level=first.log_level, stream=sys.stderr, format=_LOG_FORMAT)
    spec = first.spec
    from backends.registry import engine_class

    try:
        engine = engine_class(spec.backend)(spec)
    except Exception as e:  # noqa: BLE001 - reported to the gateway, which decides
        send(wire.Fatal(error=str(e) or type(e).__name__))
        return
    send(wire.Ready(info=engine.info()))

    def emitter(rid: str) -> Callable[[Chunk], None]:
        return lambda chunk: send(wire.ChunkOut(id=rid, chunk=chunk))

    def answer(msg: wire.Call) -> wire.Reply:
        if isinstance(msg, wire.Prepare):
            return wire.Tokens(id=msg.id, ids=engine.prepare(msg.req))
        if isinstance(msg, wire.Tokenize):
            return wire.Tokens(id=msg.id, ids=engine.tokenize(msg.text))
        if isinstance(msg, wire.Detokenize):
            return wire.Text(id=msg.id, text=engine.detokenize(msg.ids))
        if isinstance(msg, wire.Embed):
            return wire.Vectors(id=msg.id, embeddings=engine.embed(msg.texts))
        return wire.StatsOut(id=msg.id, stats=engine.stats())

    def reply(msg: wire.Call) -> None:
        try:
            send(answer(msg))
        except Exception as e:  # noqa: BLE001 - the call's error goes back with its kind
            if wire.kind_of(e) == "engine":
                log.exception("%s failed", type(msg).__name__)
            send(wire.error_of(msg.id, e))

    try:
        for line in sys.stdin.buffer:
            msg = wire.to_worker(line)
            if isinstance(msg, wire.Generate):
                engine.submit(msg.req, emitter(msg.id))
            elif isinstance(msg, wire.Cancel):
                engine.cancel(msg.id)
            elif isinstance(msg, wire.Stats):
                reply(msg)  # counters: answered at once
            elif not isinstance(msg, wire.Load):  # a call that may take a while: in its own thread
                threading.Thread(target=reply, args=(msg,), daemon=True).start()
    finally:
        engine.close()


if __name__ == "__main__":
    main()
