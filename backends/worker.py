"""One worker process per loaded model, and the gateway's handle on it.

Why a process (as Ollama runs a runner per model): a blocking engine loop stays off
the gateway's event loop (OpenVINO's ``step()`` holds the GIL), a native crash takes
down one model and not the server, and unloading gives the memory back.

The wire between them is JSON lines. The worker keeps its real stdout for the
protocol and points fd 1 at stderr, so a native library that prints cannot corrupt
it. Gateway -> worker::

    {"op": "generate", "id": ID, "req": {...}}   {"op": "cancel", "id": ID}
    {"op": "tokenize", "id": ID, "text": "..."}  {"op": "embed", "id": ID, "texts": [...]}
    {"op": "detokenize", "id": ID, "ids": [...]}
    {"op": "validate", "id": ID, "req": {...}}   {"op": "stats", "id": ID}

Worker -> gateway::

    {"op": "ready", "info": {...}, "capabilities": {...}}  or  {"op": "fatal", "error": "..."}
    {"id": ID, "chunk": {...}}    {"id": ID, "result": ...}    {"id": ID, "error": "..."}

The worker exits when its stdin closes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson

from backends.base import (
    Backend,
    BackendError,
    Capabilities,
    Chunk,
    Embeddings,
    GenerationRequest,
    InvalidRequest,
    ModelSpec,
)

log = logging.getLogger("kiln.worker")

_LINE_LIMIT = 256 << 20  # embeddings of long batches are big lines
_LOG_LINE_LIMIT = 64 << 10  # stderr without a newline (a progress bar's \r) is logged in pieces


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
        self.items: collections.deque[dict[str, Any]] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None

    def put(self, msg: dict[str, Any]) -> None:
        self.items.append(msg)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def get(self) -> dict[str, Any]:
        while not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        return self.items.popleft()


class WorkerBackend(Backend):
    """The gateway's side: spawns ``python -m backends.worker`` and speaks to it."""

    def __init__(self, spec: ModelSpec, env: dict[str, str] | None = None) -> None:
        self.spec = spec
        self.env = env or {}
        self.capabilities = Capabilities()
        self.info: dict[str, Any] = {}
        self._pipes: _Pipes | None = None
        self._stdin: asyncio.WriteTransport | None = None
        self._pending: dict[str, _Inbox] = {}
        self._dead: str | None = None
        self._ready: asyncio.Future[dict[str, Any]] | None = None
        self._log = logging.getLogger(f"kiln.worker.{spec.name}")

    @property
    def pid(self) -> int | None:
        return self._pipes.transport.get_pid() if self._pipes and self._pipes.transport else None

    @property
    def alive(self) -> bool:
        return self._pipes is not None and self._dead is None

    async def load(self) -> dict[str, Any]:
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
        self._send({"op": "load", "spec": self.spec.to_dict()})
        try:
            msg = await self._ready
        except BaseException:
            await self.unload()
            raise
        self.capabilities = Capabilities(**msg.get("capabilities", {}))
        self.info = msg.get("info", {})
        return self.info

    def _send(self, msg: dict[str, Any]) -> None:
        if not self.alive or self._stdin is None:
            raise BackendError(self._dead or "the model's worker process is not running")
        self._stdin.write(orjson.dumps(msg) + b"\n")

    def _on_message(self, line: bytes) -> None:
        msg = orjson.loads(line)
        q = self._pending.get(msg.get("id", ""))
        if q is not None:
            q.put(msg)
        elif msg.get("op") in ("ready", "fatal") and self._ready and not self._ready.done():
            if msg["op"] == "ready":
                self._ready.set_result(msg)
            else:
                self._ready.set_exception(BackendError(msg["error"]))

    def _on_log(self, line: bytes) -> None:
        self._log.debug("%s", line.decode(errors="replace").rstrip())

    def _on_exit(self, rc: int | None, error: str | None) -> None:
        if error:
            reason = error
        elif rc and rc < 0:
            reason = f"the model's worker process was killed by signal {-rc}"
        elif rc:
            reason = f"the model's worker process exited with status {rc}"
        else:
            reason = "the model's worker process exited"
        self._dead = self._dead or reason
        if self._ready and not self._ready.done():
            self._ready.set_exception(BackendError(reason))
        for q in self._pending.values():
            q.put({"error": reason, "fatal": True})

    async def _call(self, op: str, **kw: Any) -> Any:
        rid = uuid.uuid4().hex
        q = _Inbox()
        self._pending[rid] = q
        try:
            self._send({"op": op, "id": rid, **kw})
            msg = await q.get()
        finally:
            self._pending.pop(rid, None)
        if "error" in msg:
            raise (BackendError if msg.get("fatal") else InvalidRequest)(msg["error"])
        return msg["result"]

    async def stream(self, req: GenerationRequest) -> AsyncIterator[Chunk]:
        q = _Inbox()
        self._pending[req.id] = q
        finished = False
        try:
            self._send({"op": "generate", "id": req.id, "req": req.to_dict()})
            while True:
                msg = await q.get()
                if "error" in msg:
                    raise (BackendError if msg.get("fatal") else InvalidRequest)(msg["error"])
                chunk = Chunk.from_dict(msg["chunk"])
                if chunk.finish_reason is not None:
                    finished = True
                yield chunk
                if finished:
                    return
        finally:
            self._pending.pop(req.id, None)
            if not finished and self.alive:
                self._send({"op": "cancel", "id": req.id})

    async def tokenize(self, text: str) -> list[int]:
        return await self._call("tokenize", text=text)

    async def embed(self, texts: list[str]) -> Embeddings:
        return Embeddings(**await self._call("embed", texts=texts))

    async def detokenize(self, ids: list[int]) -> str:
        return await self._call("detokenize", ids=ids)

    async def validate(self, req: GenerationRequest) -> None:
        await self._call("validate", req=req.to_dict())

    async def stats(self) -> dict[str, Any]:
        return await self._call("stats") if self.alive else {}

    async def unload(self, timeout: float = 10.0) -> None:
        pipes, self._pipes = self._pipes, None
        if pipes is None or pipes.transport is None:
            return
        self._dead = self._dead or "the model was unloaded"
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

def main() -> None:
    proto = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything the engine prints goes to stderr, never into the protocol
    sys.stdout = sys.stderr
    logging.basicConfig(level=os.environ.get("KILN_WORKER_LOG", "WARNING"), stream=sys.stderr)
    lock = threading.Lock()

    def send(msg: dict[str, Any]) -> None:
        line = orjson.dumps(msg, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_APPEND_NEWLINE)
        with lock:
            proto.write(line)
            proto.flush()

    first = orjson.loads(sys.stdin.readline() or "{}")
    if first.get("op") != "load":
        return
    spec = ModelSpec(**first["spec"])
    from backends.registry import engine_class

    try:
        cls = engine_class(spec.backend)
        engine = cls(spec)
    except Exception as e:  # noqa: BLE001 - reported to the gateway, which decides
        send({"op": "fatal", "error": str(e) or type(e).__name__})
        return
    send({"op": "ready", "info": engine.info(), "capabilities": dataclasses.asdict(cls.capabilities)})

    def reply(rid: str, fn: Any, *args: Any) -> None:
        try:
            result = fn(*args)
            if dataclasses.is_dataclass(result):
                result = dataclasses.asdict(result)
            send({"id": rid, "result": result})
        except InvalidRequest as e:
            send({"id": rid, "error": str(e)})
        except Exception as e:  # noqa: BLE001
            log.exception("%s failed", fn)
            send({"id": rid, "error": f"{type(e).__name__}: {e}"})

    try:
        for line in sys.stdin:
            msg = orjson.loads(line)
            op, rid = msg.get("op"), msg.get("id", "")
            if op == "generate":
                req = GenerationRequest.from_dict(msg["req"])
                engine.submit(req, lambda c, rid=rid: send({"id": rid, "chunk": c.to_dict()}))
            elif op == "cancel":
                engine.cancel(rid)
            elif op == "tokenize":
                threading.Thread(target=reply, args=(rid, engine.tokenize, msg["text"]), daemon=True).start()
            elif op == "detokenize":
                threading.Thread(target=reply, args=(rid, engine.detokenize, msg["ids"]), daemon=True).start()
            elif op == "embed":
                threading.Thread(target=reply, args=(rid, engine.embed, msg["texts"]), daemon=True).start()
            elif op == "validate":
                req = GenerationRequest.from_dict(msg["req"])
                threading.Thread(target=reply, args=(rid, engine.validate, req), daemon=True).start()
            elif op == "stats":
                reply(rid, engine.stats)
    finally:
        engine.close()


if __name__ == "__main__":
    main()
