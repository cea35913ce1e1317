"""Chat templates render in a small pool of child processes, never on the event loop.

A template is untrusted code (it comes in a GGUF or a ``/api/create`` body). Jinja's
sandbox stops it reaching Python internals, but not from looping for minutes or
asking for gigabytes: rendered inline, a nested loop froze every endpoint for 59 s,
and ``{{ 'a' * 10**9 }}`` (folded as a constant while compiling) 67 s at a 3.9 GB peak.
So each render goes to a child process that

* caps its address space (``RLIMIT_AS``): past it the render gets a ``MemoryError``;
* arms a CPU-time timer (``ITIMER_PROF``, user + system time) around each render:
  when it fires, the render stops between two bytecodes;
* is killed by the gateway if no answer comes within a wall-clock limit (a single C
  call, a huge ``**`` say, never reaches a bytecode boundary), or if the client goes
  away while it renders (the awaiting task is cancelled). A killed or limit-hit
  child is replaced by a fresh one on the next render.

Each limit becomes a 400 that names it. The children are started on first use (a
server that never renders pays nothing) and keep their compiled templates, so a
normal render costs a round trip of two pipe writes and the JSON of the messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from typing import Any

import orjson

from server.prompt import TemplateError

log = logging.getLogger("kiln.render")

CPU_SECONDS = 2.0  # CPU time one render may take; real templates take milliseconds
MEMORY_BYTES = 512 << 20  # the child's address space, messages and output included
POOL_SIZE = 2  # renders at once; more wait (FIFO) for a free child
_LINE_LIMIT = 256 << 20  # a 16 MiB prompt as escaped JSON, with room


def _gib(n: int) -> str:
    return f"{n / (1 << 30):g} GiB" if n >= 1 << 30 else f"{n / (1 << 20):g} MiB"


class _Child:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def call(self, payload: bytes) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(payload)
        await self.proc.stdin.drain()
        line = await self.proc.stdout.readline()
        if not line:
            raise EOFError(f"the render process exited (status {await self.proc.wait()})")
        return orjson.loads(line)

    def kill(self) -> asyncio.Future[int]:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        return asyncio.ensure_future(self.proc.wait())  # reaped in the background


class RenderPool:
    """``await pool.render(template, messages, ...)``: ``server.prompt.render`` in a child."""

    def __init__(self, size: int = POOL_SIZE, cpu_seconds: float = CPU_SECONDS,
                 memory_bytes: int = MEMORY_BYTES, wall_seconds: float | None = None) -> None:
        self.cpu_seconds = cpu_seconds
        self.memory_bytes = memory_bytes
        # CPU time is at most wall time; on a busy machine it is much less, so the
        # wall limit is generous and only catches what the CPU timer cannot.
        self.wall_seconds = wall_seconds or max(5.0, 4 * cpu_seconds)
        self._slots = asyncio.Semaphore(size)
        self._idle: list[_Child] = []
        self._dying: set[asyncio.Future[int]] = set()  # killed children not yet reaped
        self._closed = False
        self.spawned = 0  # children started (tests and logs read it)

    async def _spawn(self) -> _Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server.render", str(self.cpu_seconds), str(self.memory_bytes),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=_LINE_LIMIT,
            start_new_session=True,  # a Ctrl-C at the terminal goes to the gateway only
        )
        self.spawned += 1
        child = _Child(proc)
        # Started when it says so: its imports are not the render's wall-clock time.
        assert proc.stdout is not None
        if not await proc.stdout.readline():
            raise TemplateError(f"rendering the chat template failed: the render process did not start "
                                f"(status {await proc.wait()})")
        return child

    async def render(self, template: str | None, messages: list[dict[str, Any]], **kw: Any) -> str:
        """Keyword arguments as ``server.prompt.render``; raises ``TemplateError`` (400)."""
        try:
            payload = orjson.dumps({"template": template, "messages": messages, **kw},
                                   option=orjson.OPT_NON_STR_KEYS | orjson.OPT_APPEND_NEWLINE, default=str)
        except orjson.JSONEncodeError:  # JSON allows "\ud800"; UTF-8 (and the prompt) cannot hold it
            raise TemplateError("the request contains invalid Unicode (an unpaired surrogate)") from None
        async with self._slots:
            if self._closed:
                raise TemplateError("the server is shutting down")
            child = self._idle.pop() if self._idle else await self._spawn()
            reusable = False
            try:
                reply = await asyncio.wait_for(child.call(payload), self.wall_seconds)
                reusable = "limit" not in reply
            except asyncio.TimeoutError:
                raise TemplateError(f"the chat template took more than {self.wall_seconds:g} s to render "
                                    f"(the render was stopped)") from None
            except (EOFError, OSError, ValueError) as e:
                log.warning("render process failed: %s", e)
                raise TemplateError(f"rendering the chat template failed: the render process died ({e})") from None
            finally:
                # Killed unless it answered in full: after a timeout, a cancellation (the
                # client left) or a limit, its state is not worth trusting.
                if reusable and not self._closed:
                    self._idle.append(child)
                else:
                    reaped = child.kill()
                    self._dying.add(reaped)
                    reaped.add_done_callback(self._dying.discard)
        if "text" in reply:
            return reply["text"]
        limit = reply.get("limit")
        if limit == "cpu":
            raise TemplateError(f"the chat template took more than {self.cpu_seconds:g} s of CPU to render")
        if limit == "memory":
            raise TemplateError(f"the chat template needed more than {_gib(self.memory_bytes)} of memory "
                                f"to render")
        raise TemplateError(reply.get("error") or "rendering the chat template failed")

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for child in idle:
            if child.proc.stdin is not None:
                child.proc.stdin.close()  # the child exits at the end of its input
        for child in idle:
            try:
                await asyncio.wait_for(child.proc.wait(), 2)
            except asyncio.TimeoutError:
                await child.kill()
        if self._dying:
            await asyncio.wait(set(self._dying), timeout=2)


# -- the child process -------------------------------------------------------------------

class _CPULimit(BaseException):
    """Raised by the CPU timer; a BaseException so no ``except Exception`` swallows it."""


def main() -> None:
    import resource
    import signal

    from server import prompt

    cpu, memory = float(sys.argv[1]), int(sys.argv[2])
    prompt._compile("")  # import Jinja's lazily loaded parts before the cap

    def on_timer(*_: Any) -> None:
        raise _CPULimit

    signal.signal(signal.SIGPROF, on_timer)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a print() in here must not corrupt the protocol
    out.write(b'{"ready":true}\n')
    out.flush()
    for line in sys.stdin.buffer:
        reply: dict[str, Any]
        try:
            req = orjson.loads(line)
            signal.setitimer(signal.ITIMER_PROF, cpu)
            try:
                reply = {"text": prompt.render(req.pop("template"), req.pop("messages"), **req)}
            finally:
                signal.setitimer(signal.ITIMER_PROF, 0)
        except _CPULimit:
            reply = {"limit": "cpu"}
        except MemoryError:
            reply = {"limit": "memory"}
        except TemplateError as e:
            reply = {"error": e.message}
        except Exception as e:  # noqa: BLE001 - a bad request, reported to the gateway
            reply = {"error": f"rendering the chat template failed: {type(e).__name__}: {e}"}
        try:
            data = orjson.dumps(reply, option=orjson.OPT_APPEND_NEWLINE)
        except MemoryError:
            data = b'{"limit":"memory"}\n'
        out.write(data)
        out.flush()
        if "limit" in reply:
            return  # the gateway replaces this process


if __name__ == "__main__":
    main()
