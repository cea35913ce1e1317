"""The scheduler's bounds: a load that cannot fit the memory budget is refused with the
numbers and unloads nothing; idle models are unloaded only when that makes room;
keep_alive has a ceiling past which it means forever, and /api/ps dates never overflow."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from backends.base import EngineInfo
from backends.store import FileRef, Manifest, ModelStore
from server.scheduler import FOREVER, MAX_KEEP_ALIVE, InsufficientMemory, Runner, Scheduler, parse_duration
from server.settings import Settings

MB = 1 << 20


class _Backend:
    """What the scheduler needs of a backend: load, alive, unload."""

    def __init__(self, size: int) -> None:
        self.size, self.alive, self.unloaded = size, False, False

    async def load(self) -> EngineInfo:
        self.alive = True
        return EngineInfo(device="test", num_ctx=2048, num_parallel=1, model_bytes=self.size)

    async def unload(self) -> None:
        self.alive, self.unloaded = False, True


def _manifest(name: str, size: int) -> Manifest:
    # no architecture keys: the KV estimate is 0 and the model needs exactly its size
    return Manifest(name=name, files=[FileRef("model", f"/models/{name}.gguf", size=size)], context_length=4096)


def _scheduler(tmp_path, budget: int) -> Scheduler:
    settings = Settings(models=tmp_path / "models", memory_budget=budget, max_loaded_models=3, num_parallel=1)
    sizes: dict[str, int] = {}
    s = Scheduler(settings, ModelStore(tmp_path / "models"), lambda spec: _Backend(sizes[spec.name]))
    s.sizes = sizes  # type: ignore[attr-defined]
    return s


def _m(s: Scheduler, name: str, size: int) -> Manifest:
    s.sizes[name + ":latest"] = size  # type: ignore[attr-defined]
    return _manifest(name + ":latest", size)


def test_a_load_that_cannot_fit_is_refused_with_the_numbers_and_unloads_nothing(tmp_path):
    async def go():
        s = _scheduler(tmp_path, 1000 * MB)
        a = _m(s, "a", 400 * MB)
        await s.load(a)
        with pytest.raises(InsufficientMemory) as e:
            await s.load(_m(s, "huge", 1500 * MB))
        assert list(s.runners) == ["a:latest"] and s.runners["a:latest"].backend.alive
        return e.value

    err = asyncio.run(go())
    assert err.status == 503
    assert "needs 1.46 GiB" in err.message and "memory budget of 0.98 GiB" in err.message
    assert "loaded: a:latest (0.39 GiB)" in err.message


def test_idle_models_are_unloaded_only_when_that_makes_room(tmp_path):
    async def go():
        s = _scheduler(tmp_path, 1000 * MB)
        a, c, b = _m(s, "a", 400 * MB), _m(s, "c", 400 * MB), _m(s, "b", 700 * MB)
        await s.load(c)
        release = asyncio.Event()

        async def busy_a():
            async with s.use(a):
                await release.wait()

        holder = asyncio.ensure_future(busy_a())
        await asyncio.sleep(0.05)
        loading = asyncio.ensure_future(s.load(b))
        await asyncio.sleep(0.2)
        # a (busy, 400) + b (700) > 1000 whatever happens to c: c stays, b waits
        assert "c:latest" in s.runners and not s.runners["c:latest"].backend.unloaded
        assert not loading.done()
        release.set()
        await holder
        await asyncio.wait_for(loading, 5)
        return set(s.runners)

    assert asyncio.run(go()) == {"b:latest"}


@pytest.mark.parametrize("value, seconds", [
    (300, 300.0), ("5m", 300.0), (-1, FOREVER), ("-1m", FOREVER), (1e300, FOREVER), ("9999999999h", FOREVER),
    (MAX_KEEP_ALIVE, FOREVER), (MAX_KEEP_ALIVE - 1, MAX_KEEP_ALIVE - 1),
])
def test_keep_alive_beyond_the_maximum_is_forever(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("keep_alive, refcount", [(FOREVER, 0), (FOREVER, 1), (MAX_KEEP_ALIVE - 1, 1)])
def test_ps_dates_never_overflow(keep_alive, refcount):
    r = Runner.__new__(Runner)  # only the fields the date reads
    r.keep_alive, r.refcount, r.expires_at = keep_alive, refcount, FOREVER
    when = dt.datetime.fromisoformat(r.expires_at_rfc3339)
    assert 2300 < when.year < 2400
