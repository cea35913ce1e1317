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
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from backends.base import KV_CACHE_TYPES, Backend, BackendError, EngineInfo, InvalidRequest, ModelSpec
from backends.store import Manifest, ModelStore
from backends.worker import WorkerBackend
from server.durations import FOREVER, MAX_KEEP_ALIVE, parse_duration
from server.errors import BadRequest, KilnError, ServerBusy, Unavailable
from server.settings import Settings

log = logging.getLogger("kiln.scheduler")

BackendFactory = Callable[[ModelSpec], Backend]


class InsufficientMemory(KilnError):
    """The model cannot fit the memory budget even with every other model unloaded."""

    status = 503


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


__all__ = ["FOREVER", "parse_duration", "Scheduler", "Runner", "Lease", "estimate_kv_bytes"]


@dataclass
class Runner:
    key: str
    manifest: Manifest
    spec: ModelSpec
    backend: Backend
    info: EngineInfo
    refcount: int = 0
    keep_alive: float = 300.0
    expires_at: float = FOREVER  # wall-clock seconds
    load_ns: int = 0
    timer: asyncio.TimerHandle | None = None
    last_used: float = field(default_factory=time.time)
    slots: asyncio.Semaphore = field(init=False)
    many: asyncio.Lock = field(init=False)  # held while a request takes several slots

    def __post_init__(self) -> None:
        self.slots = asyncio.Semaphore(self.num_parallel)
        self.many = asyncio.Lock()

    @property
    def num_ctx(self) -> int:
        """Context per request: what the engine reports (a static NPU pipeline has its own)."""
        return self.info.num_ctx or self.spec.num_ctx

    @property
    def num_parallel(self) -> int:
        return self.info.num_parallel or self.spec.num_parallel

    @property
    def size(self) -> int:
        """What it holds in memory: weights and KV cache, as the engine reports them."""
        return (self.info.model_bytes or self.manifest.size) + self.info.kv_bytes

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


DEFAULT_CTX = 2048  # a model that names no trained context (Ollama's old default)
CTX_STEP = 256  # a context cut to fit the memory budget is a multiple of this


def estimate_kv_bytes(m: Manifest, num_ctx: int, parallel: int, kv_type: str = "") -> int:
    """K and V of every layer for ``num_ctx`` x ``parallel`` tokens, in ``kv_type``
    (f16 when unset). An upper bound for models with sliding-window layers."""
    info, arch = m.model_info, m.model_info.get("general.architecture", "")
    layers = info.get(f"{arch}.block_count") or 0
    embd = info.get(f"{arch}.embedding_length") or 0
    heads = info.get(f"{arch}.attention.head_count") or 1
    kv_heads = info.get(f"{arch}.attention.head_count_kv") or heads
    if not (layers and embd):
        return 0
    head_dim = info.get(f"{arch}.attention.key_length") or embd // heads  # Gemma's 256 > 640 / 4
    per_token = 2 * layers * head_dim * kv_heads * KV_CACHE_TYPES.get(kv_type or "f16", 2.0)  # K and V
    return int(per_token * num_ctx * parallel)


def npu_capacity(m: Manifest) -> int:
    """The static KV cache of a model compiled for the NPU first (its context), else 0."""
    if not (m.devices and m.devices[0].upper().startswith("NPU") and m.extra.get("max_prompt_len")):
        return 0
    return int(m.extra["max_prompt_len"]) + int(m.extra.get("min_response_len") or 0)


class Scheduler:
    def __init__(self, settings: Settings, store: ModelStore,
                 backend_factory: BackendFactory | None = None) -> None:
        self.settings = settings
        self.store = store
        self.backend_factory = backend_factory or (lambda spec: WorkerBackend(spec, log_level=settings.worker_log))
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
                  keep_alive: float | None = None, count: int = 1) -> AsyncIterator[Lease]:
        """Holds one slot of the model (loading it first if needed) for a request, or
        ``count`` of them (the n choices of one request: taken under the runner's lock, so
        that two such requests cannot each hold some slots and wait for the other's)."""
        key = manifest.name.lower()
        if self.waiting.get(key, 0) >= self.settings.max_queue:
            raise ServerBusy(retry_after=1)
        self.waiting[key] = self.waiting.get(key, 0) + 1
        acquired = False
        try:
            runner, load_ns = await self._get(manifest, num_ctx)
            if count > runner.num_parallel:
                raise BadRequest(f"n={count} is more than the {runner.num_parallel} sequences {manifest.name} runs at "
                                 f"once (KILN_NUM_PARALLEL)")
            if count == 1:
                await runner.slots.acquire()
            else:
                await self._acquire_many(runner, count)
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
            for _ in range(count):
                runner.slots.release()
            runner.refcount -= 1
            runner.last_used = time.time()
            if keep_alive is not None:
                runner.keep_alive = keep_alive
            await self._release(runner)

    @staticmethod
    async def _acquire_many(runner: Runner, count: int) -> None:
        async with runner.many:
            taken = 0
            try:
                for _ in range(count):
                    await runner.slots.acquire()
                    taken += 1
            except BaseException:
                for _ in range(taken):
                    runner.slots.release()
                raise

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
    def context_for(self, m: Manifest, num_ctx: int | None) -> tuple[int, str | None]:
        """The context per sequence the model loads with for a request asking ``num_ctx``:
        the default (the model's ``num_ctx`` parameter, else the setting, else the model's
        trained context) or the request's, whichever is larger; and why it is less than
        that, when it is."""
        trained = int(m.context_length or 0)
        default = m.parameters.get("num_ctx") or self.settings.context_length or trained or DEFAULT_CTX
        # By default the model's trained context, which is what clients size their prompts
        # for (Open WebUI's first chat is 7,000 tokens): one allocation that serves every
        # smaller request without a reload (a request asking for less gets a smaller window
        # of it, not a smaller allocation). Capped only by what fits the memory budget.
        ctx, why = max(int(num_ctx or 0), int(default)), None
        if trained and ctx > trained:
            ctx, why = trained, f"the model was trained for {trained} tokens"
        compiled = npu_capacity(m)
        if compiled and ctx > compiled:
            ctx, why = compiled, f"it is compiled for the NPU with room for {compiled} tokens (MAX_PROMPT_LEN + MIN_RESPONSE_LEN)"
        parallel = self.settings.parallel
        per_token = estimate_kv_bytes(m, 1, parallel, self.kv_cache_type(m))  # per token of context, all sequences
        if per_token:
            room = (self.settings.memory_limit - m.size) // per_token
            fit = max(CTX_STEP, room // CTX_STEP * CTX_STEP)
            if fit < ctx:
                ctx, why = fit, (f"{parallel} sequences of more would not fit the memory budget of "
                                 f"{self.settings.memory_limit >> 20} MiB (KILN_MEMORY_BUDGET, KILN_NUM_PARALLEL)")
        return ctx, why

    def kv_cache_type(self, m: Manifest) -> str:
        """The model's own (a manifest's ``kv_cache_type``), else the setting; "" = the engine's."""
        return str(m.extra.get("kv_cache_type") or self.settings.kv_cache_type or "")

    def kv_cache_plan(self, m: Manifest, num_ctx: int, parallel: int | None = None) -> dict[str, Any]:
        """The KV cache a load with ``num_ctx`` takes (what the memory budget counts)."""
        parallel = parallel or self.settings.parallel
        kv = self.kv_cache_type(m)
        return {"type": kv or "f16", "num_parallel": parallel, "num_ctx": num_ctx,
                "bytes": estimate_kv_bytes(m, num_ctx, parallel, kv)}

    def _spec(self, m: Manifest, num_ctx: int | None) -> ModelSpec:
        ctx, why = self.context_for(m, num_ctx)
        default = m.parameters.get("num_ctx") or self.settings.context_length
        asked = max(num_ctx or 0, default or 0)
        if why and asked:
            source = ("the request" if num_ctx == asked else "the model's num_ctx parameter"
                      if m.parameters.get("num_ctx") else "KILN_CONTEXT_LENGTH/OLLAMA_CONTEXT_LENGTH")
            log.warning("%s: num_ctx %d (from %s) is more than this model gets: %s; loading with %d",
                        m.name, asked, source, why, ctx)
        elif why:
            log.warning("%s: loading with a context of %d tokens: %s", m.name, ctx, why)
        ref = m.files[0]
        # kiln compile --embeddings: the hidden-state graph OpenVINO embeds with
        hidden = {"embedding_path": str(self.store.resolve(f)) for f in m.files[1:] if f.role == "embedding"}
        return ModelSpec(
            name=m.name, path=str(self.store.resolve(ref)), backend=m.backend, num_ctx=ctx,
            num_parallel=self.settings.parallel,
            num_threads=self.settings.threads, devices=list(m.devices),
            cache_dir=str(self.store.root / "cache"),
            extra={**m.extra, **hidden, **({"kv_cache_type": kv} if (kv := self.kv_cache_type(m)) else {})},
        )

    async def _get(self, m: Manifest, num_ctx: int | None) -> tuple[Runner, int]:
        key = m.name.lower()
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            runner = self.runners.get(key)
            if runner is not None:
                if not runner.backend.alive:
                    log.warning("%s: worker is gone (%s); restarting", m.name,
                                getattr(runner.backend, "dead_reason", None) or "exited")
                    self.restarts += 1
                    self._emit("restart", runner, 0.0)
                    await self._unload(runner)
                elif runner.manifest.digest != m.digest or self.context_for(m, num_ctx)[0] > runner.spec.num_ctx:
                    # Only a larger context than the one allocated reloads (compared with what
                    # was asked at load: a static NPU pipeline reports less and would reload
                    # on every request); a smaller one is served from the same allocation.
                    log.info("%s: reloading (manifest changed, or a larger num_ctx)", m.name)
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
                timeout = self.settings.load_timeout
                info = await asyncio.wait_for(backend.load(), None if timeout == FOREVER else timeout)
            except asyncio.TimeoutError:
                await backend.unload()
                raise Unavailable(f"model '{m.name}' did not load within {self.settings.load_timeout:.0f}s "
                                  f"(KILN_LOAD_TIMEOUT/OLLAMA_LOAD_TIMEOUT)")
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
            log.info("%s: loaded in %.2fs (%s)", m.name, runner.load_ns / 1e9, info.device)
            self._emit("load", runner, runner.load_ns / 1e9)
            return runner, runner.load_ns

    def scrub(self, message: str) -> str:
        """``message`` with paths inside the model store made relative to it."""
        return message.replace(str(self.store.root) + "/", "").replace(str(self.store.root), ".")

    def _check_budget(self, m: Manifest, spec: ModelSpec) -> int:
        """The bytes the model needs; refuses one that could never fit, before anything
        is unloaded or tried (a 1.5 TB context once evicted the loaded model first)."""
        kv_type = spec.extra.get("kv_cache_type") or ""
        kv = estimate_kv_bytes(m, spec.num_ctx, spec.num_parallel, kv_type)
        need, budget = m.size + kv, self.settings.memory_limit
        log.info("%s: weights %s + KV cache %s (%s, num_ctx=%d x %d parallel) = %s of the %s budget", m.name,
                 _gib(m.size), _gib(kv), kv_type or "f16", spec.num_ctx, spec.num_parallel, _gib(need), _gib(budget))
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

