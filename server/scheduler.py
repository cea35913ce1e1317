"""Which models are loaded, who may use them, and when they go.

* A bounded queue per model: past ``max_queue`` waiting requests, a 503 with
  Ollama's "server busy" message and ``Retry-After``.
* ``num_parallel`` slots per model, taken in arrival order (asyncio's semaphore is
  FIFO), so no request starves.
* Up to ``max_loaded_models`` models within the memory budget; when one more must
  load, idle models go first, the one that expires soonest first.
* ``keep_alive``: each request's value (or the default) sets when an idle model is
  unloaded; 0 unloads right after the request, a negative value never, and so does
  one of ``MAX_KEEP_ALIVE`` or more (Go's longest duration, about 292 years: Ollama
  cannot hold a longer one either, and dates that far out overflow).
* A model whose weights and KV cache exceed the memory budget is refused (503 with
  the numbers) without unloading anything; idle models are unloaded only when that
  makes the new one fit.
* A worker that died is restarted by the next request that needs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from backends.base import Backend, BackendError, InvalidRequest, ModelSpec
from backends.store import Manifest, ModelStore
from backends.worker import WorkerBackend
from server.errors import KilnError, ServerBusy, Unavailable
from server.settings import Settings

log = logging.getLogger("kiln.scheduler")

BackendFactory = Callable[[ModelSpec], Backend]
FOREVER = float("inf")
MAX_KEEP_ALIVE = (2**63 - 1) / 1e9  # seconds in Go's time.Duration; longer counts as forever


class InsufficientMemory(KilnError):
    """The model cannot fit the memory budget even with every other model unloaded."""

    status = 503


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def parse_duration(value: Any) -> float:
    """keep_alive: a number of seconds or a Go duration string ("5m", "1h30m", "-1");
    negative, or ``MAX_KEEP_ALIVE`` and beyond, is ``FOREVER``."""
    seconds = _parse_duration(value)
    return FOREVER if seconds >= MAX_KEEP_ALIVE else seconds


def _parse_duration(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("keep_alive must be a duration")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError("keep_alive must be finite")
        return FOREVER if value < 0 else float(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"invalid duration {value!r}")
    s = value.strip()
    try:
        n = float(s)
        return FOREVER if n < 0 else n
    except ValueError:
        pass
    sign = -1 if s.startswith("-") else 1
    s = s.lstrip("+-")
    units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    total, num = 0.0, ""
    i = 0
    while i < len(s):
        c = s[i]
        if c.isdigit() or c == ".":
            num += c
            i += 1
            continue
        unit = next((u for u in ("ns", "us", "µs", "ms", "s", "m", "h") if s.startswith(u, i)), None)
        if unit is None or not num:
            raise ValueError(f"invalid duration {value!r}")
        total += float(num) * units[unit]
        num = ""
        i += len(unit)
    if num:
        raise ValueError(f"invalid duration {value!r} (missing unit)")
    return FOREVER if sign < 0 else total


@dataclass
class Runner:
    key: str
    manifest: Manifest
    spec: ModelSpec
    backend: Backend
    info: dict[str, Any] = field(default_factory=dict)
    refcount: int = 0
    keep_alive: float = 300.0
    expires_at: float = FOREVER  # wall-clock seconds
    load_ns: int = 0
    timer: asyncio.TimerHandle | None = None
    last_used: float = field(default_factory=time.time)
    slots: asyncio.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        self.slots = asyncio.Semaphore(self.num_parallel)

    @property
    def num_ctx(self) -> int:
        """Context per request: what the engine reports (a static NPU pipeline has its own)."""
        return int(self.info.get("num_ctx") or self.spec.num_ctx)

    @property
    def num_parallel(self) -> int:
        return int(self.info.get("num_parallel") or self.spec.num_parallel)

    @property
    def size(self) -> int:
        return int(self.info.get("model_bytes") or self.manifest.size) + int(self.info.get("kv_bytes") or 0)

    @property
    def expires_at_rfc3339(self) -> str:
        # Forever is shown as Ollama shows it, ~292 years out; nothing later is ever
        # shown, so no keep_alive can overflow the date (it made /api/ps 500 for all).
        now, latest = time.time(), time.time() + MAX_KEEP_ALIVE
        when = self.expires_at
        if self.refcount:  # in use: it expires keep_alive after the last request ends
            when = now + self.keep_alive
        when = min(when, latest)
        return dt.datetime.fromtimestamp(when, dt.timezone.utc).astimezone().isoformat()


@dataclass
class Lease:
    """A request's hold on one slot of a loaded model."""

    runner: Runner
    load_ns: int  # what this request spent loading the model (0 if it was loaded)


def _auto_parallel() -> int:
    return 4


def estimate_kv_bytes(m: Manifest, num_ctx: int, parallel: int) -> int:
    info, arch = m.model_info, m.model_info.get("general.architecture", "")
    layers = info.get(f"{arch}.block_count") or 0
    embd = info.get(f"{arch}.embedding_length") or 0
    heads = info.get(f"{arch}.attention.head_count") or 1
    kv_heads = info.get(f"{arch}.attention.head_count_kv") or heads
    if not (layers and embd):
        return 0
    per_token = 2 * layers * (embd // heads) * kv_heads * 2  # K and V, f16
    return per_token * num_ctx * parallel


class Scheduler:
    def __init__(self, settings: Settings, store: ModelStore,
                 backend_factory: BackendFactory | None = None) -> None:
        self.settings = settings
        self.store = store
        self.backend_factory = backend_factory or (lambda spec: WorkerBackend(spec))
        self.runners: dict[str, Runner] = {}
        self.waiting: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._changed = asyncio.Condition()
        self.default_keep_alive = parse_duration(settings.keep_alive)
        self.on_event: Callable[[str, Runner, float], None] | None = None  # metrics hook
        self.restarts = 0

    # -- public ----------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def use(self, manifest: Manifest, *, num_ctx: int | None = None,
                  keep_alive: float | None = None) -> AsyncIterator[Lease]:
        """Holds one slot of the model (loading it first if needed) for a request."""
        key = manifest.name.lower()
        if self.waiting.get(key, 0) >= self.settings.max_queue:
            raise ServerBusy(retry_after=1)
        self.waiting[key] = self.waiting.get(key, 0) + 1
        acquired = False
        try:
            runner, load_ns = await self._get(manifest, num_ctx)
            await runner.slots.acquire()
            acquired = True
        finally:
            self.waiting[key] -= 1
            if not acquired and key in self.runners:
                self._expire_later(self.runners[key])
        runner.refcount += 1
        self._cancel_timer(runner)
        try:
            yield Lease(runner, load_ns)
        finally:
            runner.slots.release()
            runner.refcount -= 1
            runner.last_used = time.time()
            if keep_alive is not None:
                runner.keep_alive = keep_alive
            await self._release(runner)

    async def load(self, manifest: Manifest, keep_alive: float | None = None) -> Runner:
        """Loads a model without generating (Ollama's empty prompt)."""
        async with self.use(manifest, keep_alive=keep_alive) as lease:
            return lease.runner

    async def unload(self, name: str) -> bool:
        runner = self.runners.get(name.lower())
        if runner is None:
            return False
        runner.keep_alive = 0
        if runner.refcount == 0:
            await self._unload(runner)
        return True

    def loaded(self) -> list[Runner]:
        return sorted(self.runners.values(), key=lambda r: r.expires_at, reverse=True)

    async def shutdown(self) -> None:
        await asyncio.gather(*(self._unload(r) for r in list(self.runners.values())),
                             return_exceptions=True)

    # -- internals ---------------------------------------------------------------
    def _spec(self, m: Manifest, num_ctx: int | None) -> ModelSpec:
        want = num_ctx or m.parameters.get("num_ctx") or self.settings.context_length
        ctx = min(int(want), m.context_length) if m.context_length else int(want)
        if ctx < int(want):
            log.warning("%s: num_ctx %d is more than the model's trained context; using %d",
                        m.name, want, ctx)
        ref = m.files[0]
        return ModelSpec(
            name=m.name, path=str(self.store.resolve(ref)), backend=m.backend, num_ctx=ctx,
            num_parallel=self.settings.num_parallel or _auto_parallel(),
            num_threads=self.settings.threads, devices=list(m.devices),
            cache_dir=str(self.store.root / "cache"), extra=dict(m.extra),
        )

    async def _get(self, m: Manifest, num_ctx: int | None) -> tuple[Runner, int]:
        key = m.name.lower()
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            runner = self.runners.get(key)
            if runner is not None:
                if not runner.backend.alive:
                    log.warning("%s: worker is gone (%s); restarting", m.name,
                                getattr(runner.backend, "_dead", "exited"))
                    self.restarts += 1
                    self._emit("restart", runner, 0.0)
                    await self._unload(runner)
                elif runner.manifest.digest != m.digest or (num_ctx and num_ctx > runner.num_ctx
                                                            and runner.num_ctx < m.context_length):
                    log.info("%s: reloading (manifest or num_ctx changed)", m.name)
                    self._check_budget(m, self._spec(m, num_ctx))
                    await self._wait_idle(runner)
                    await self._unload(runner)
                else:
                    return runner, 0
            spec = self._spec(m, num_ctx)
            await self._make_room(m, spec)
            backend = self.backend_factory(spec)
            t0 = time.monotonic_ns()
            try:
                info = await asyncio.wait_for(backend.load(), self.settings.load_timeout)
            except asyncio.TimeoutError:
                await backend.unload()
                raise Unavailable(f"model '{m.name}' did not load within {self.settings.load_timeout:.0f}s")
            except (BackendError, InvalidRequest) as e:
                await backend.unload()
                # The worker names the file it could not load; the client sees it relative
                # to the store (the absolute path says where the user's home is).
                raise type(e)(self.scrub(str(e))) from None
            except BaseException:
                await backend.unload()
                raise
            runner = Runner(key, m, spec, backend, info=info,
                            keep_alive=self.default_keep_alive, load_ns=time.monotonic_ns() - t0)
            self.runners[key] = runner
            log.info("%s: loaded in %.2fs (%s)", m.name, runner.load_ns / 1e9, info.get("device", "?"))
            self._emit("load", runner, runner.load_ns / 1e9)
            return runner, runner.load_ns

    def scrub(self, message: str) -> str:
        """``message`` with paths inside the model store made relative to it."""
        return message.replace(str(self.store.root) + "/", "").replace(str(self.store.root), ".")

    def _check_budget(self, m: Manifest, spec: ModelSpec) -> int:
        """The bytes the model needs; refuses one that could never fit, before anything
        is unloaded or tried (a 1.5 TB context once evicted the loaded model first)."""
        kv = estimate_kv_bytes(m, spec.num_ctx, spec.num_parallel)
        need, budget = m.size + kv, self.settings.memory_limit
        if need > budget:
            loaded = ", ".join(f"{r.manifest.name} ({_gib(r.size)})" for r in self.runners.values()) or "none"
            raise InsufficientMemory(
                f"model '{m.name}' needs {_gib(need)} (weights {_gib(m.size)} + KV cache {_gib(kv)} for "
                f"num_ctx={spec.num_ctx} x {spec.num_parallel} parallel), more than the memory budget of "
                f"{_gib(budget)} (KILN_MEMORY_BUDGET); loaded: {loaded}. Lower num_ctx or KILN_NUM_PARALLEL")
        return need

    async def _make_room(self, m: Manifest, spec: ModelSpec) -> None:
        need, budget = self._check_budget(m, spec), self.settings.memory_limit
        while True:
            used = sum(r.size for r in self.runners.values())
            full = len(self.runners) >= self.settings.loaded_models_limit
            over = self.runners and used + need > budget
            if not (full or over):
                return
            idle = [r for r in self.runners.values() if r.refcount == 0]
            busy = [r for r in self.runners.values() if r.refcount]
            # Unload only when that makes room: with the busy models alone it must fit.
            if idle and sum(r.size for r in busy) + need <= budget \
                    and len(busy) < self.settings.loaded_models_limit:
                victim = min(idle, key=lambda r: r.expires_at)
                log.info("unloading %s to make room for %s", victim.manifest.name, m.name)
                await self._unload(victim)
                continue
            async with self._changed:  # every model is busy: wait for one to finish
                await self._changed.wait()

    async def _wait_idle(self, runner: Runner) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: runner.refcount == 0)

    async def _release(self, runner: Runner) -> None:
        async with self._changed:
            self._changed.notify_all()
        if runner.refcount == 0:
            if runner.keep_alive == 0:
                await self._unload(runner)
            else:
                self._expire_later(runner)

    def _expire_later(self, runner: Runner) -> None:
        self._cancel_timer(runner)
        if runner.refcount or runner.keep_alive == FOREVER:
            runner.expires_at = FOREVER
            return
        runner.expires_at = time.time() + runner.keep_alive
        loop = asyncio.get_running_loop()
        runner.timer = loop.call_later(runner.keep_alive, lambda: asyncio.ensure_future(self._expire(runner)))

    async def _expire(self, runner: Runner) -> None:
        if runner.refcount == 0 and self.runners.get(runner.key) is runner:
            log.info("%s: keep_alive expired; unloading", runner.manifest.name)
            await self._unload(runner)

    def _cancel_timer(self, runner: Runner) -> None:
        if runner.timer is not None:
            runner.timer.cancel()
            runner.timer = None

    async def _unload(self, runner: Runner) -> None:
        self._cancel_timer(runner)
        if self.runners.get(runner.key) is runner:
            del self.runners[runner.key]
        t0 = time.monotonic()
        await runner.backend.unload()
        self._emit("unload", runner, time.monotonic() - t0)
        async with self._changed:
            self._changed.notify_all()

    def _emit(self, event: str, runner: Runner, seconds: float) -> None:
        if self.on_event is not None:
            self.on_event(event, runner, seconds)

