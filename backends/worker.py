"""One worker process per loaded model, and the gateway's handle on it.

Why a process (as Ollama runs a runner per model): a blocking engine loop stays off
the gateway's event loop (OpenVINO's ``step()`` holds the GIL), a native crash takes
down one model and not the server, and unloading gives the memory back.

The wire between them is JSON lines. The worker keeps its real stdout for the
protocol and points fd 1 at stderr, so a native library that prints cannot corrupt
it. Gateway -> worker::

    {"op": "generate", "id": ID, "req": {...}}   {"op": "cancel", "id": ID}
    {"op": "tokenize", "id": ID, "text": "..."}  {"op": "embed", "id": ID, "texts": [...]}
    {"op": "validate", "id": ID, "req": {...}}   {"op": "stats", "id": ID}

Worker -> gateway::

    {"op": "ready", "info": {...}, "capabilities": {...}}  or  {"op": "fatal", "error": "..."}
    {"id": ID, "chunk": {...}}    {"id": ID, "result": ...}    {"id": ID, "error": "..."}

The worker exits when its stdin closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import uuid
from collections.abc import AsyncIterator
from typing import Any

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


class WorkerBackend(Backend):
    """The gateway's side: spawns ``python -m backends.worker`` and speaks to it."""

    def __init__(self, spec: ModelSpec, env: dict[str, str] | None = None) -> None:
        self.spec = spec
        self.env = env or {}
        self.capabilities = Capabilities()
        self.proc: asyncio.subprocess.Process | None = None
        self.info: dict[str, Any] = {}
        self._pending: dict[str, asyncio.Queue[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._stderr: asyncio.Task[None] | None = None
        self._dead: str | None = None
        self._ready: asyncio.Future[dict[str, Any]] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None and self._dead is None

    async def load(self) -> dict[str, Any]:
        env = {**os.environ, **self.env}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "backends.worker",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env, limit=_LINE_LIMIT,
            start_new_session=True,  # a Ctrl-C at the terminal goes to the gateway only
        )
        self._ready = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read_loop())
        self._stderr = asyncio.create_task(self._log_loop())
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
        if not self.alive or self.proc is None or self.proc.stdin is None:
            raise BackendError(self._dead or "the model's worker process is not running")
        self.proc.stdin.write(json.dumps(msg, separators=(",", ":")).encode() + b"\n")

    async def _read_loop(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        reason = "the model's worker process exited"
        try:
            while line := await self.proc.stdout.readline():
                msg = json.loads(line)
                op = msg.get("op")
                if op in ("ready", "fatal"):
                    if self._ready and not self._ready.done():
                        if op == "ready":
                            self._ready.set_result(msg)
                        else:
                            self._ready.set_exception(BackendError(msg["error"]))
                    continue
                q = self._pending.get(msg.get("id", ""))
                if q is not None:
                    q.put_nowait(msg)
        except (ValueError, asyncio.LimitOverrunError) as e:
            reason = f"protocol error from the worker: {e}"
        finally:
            rc = await self.proc.wait()
            if rc and rc < 0:
                reason = f"the model's worker process was killed by signal {-rc}"
            elif rc:
                reason = f"the model's worker process exited with status {rc}"
            self._dead = reason
            err = BackendError(reason)
            if self._ready and not self._ready.done():
                self._ready.set_exception(err)
            for q in self._pending.values():
                q.put_nowait({"error": reason, "fatal": True})

    async def _log_loop(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        wlog = logging.getLogger(f"kiln.worker.{self.spec.name}")
        while line := await self.proc.stderr.readline():
            wlog.debug("%s", line.decode(errors="replace").rstrip())

    async def _call(self, op: str, **kw: Any) -> Any:
        rid = uuid.uuid4().hex
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
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
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
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

    async def validate(self, req: GenerationRequest) -> None:
        await self._call("validate", req=req.to_dict())

    async def stats(self) -> dict[str, Any]:
        return await self._call("stats") if self.alive else {}

    async def unload(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        self._dead = self._dead or "the model was unloaded"
        if proc.returncode is None:
            try:
                assert proc.stdin is not None
                proc.stdin.close()  # the worker exits when its stdin closes
                await asyncio.wait_for(proc.wait(), timeout)
            except (asyncio.TimeoutError, OSError, AssertionError):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        for t in (self._reader, self._stderr):
            if t:
                t.cancel()


# -- the worker process ----------------------------------------------------------

def main() -> None:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything the engine prints goes to stderr, never into the protocol
    sys.stdout = sys.stderr
    logging.basicConfig(level=os.environ.get("KILN_WORKER_LOG", "WARNING"), stream=sys.stderr)
    lock = threading.Lock()

    def send(msg: dict[str, Any]) -> None:
        line = json.dumps(msg, separators=(",", ":"))
        with lock:
            proto.write(line + "\n")

    first = json.loads(sys.stdin.readline() or "{}")
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
            msg = json.loads(line)
            op, rid = msg.get("op"), msg.get("id", "")
            if op == "generate":
                req = GenerationRequest.from_dict(msg["req"])
                engine.submit(req, lambda c, rid=rid: send({"id": rid, "chunk": c.to_dict()}))
            elif op == "cancel":
                engine.cancel(rid)
            elif op == "tokenize":
                threading.Thread(target=reply, args=(rid, engine.tokenize, msg["text"]), daemon=True).start()
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
