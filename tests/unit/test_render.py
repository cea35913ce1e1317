"""Chat templates render in child processes with CPU-time, memory and wall-clock
limits (server/render.py): a runaway template is a 400 naming the limit, its process
is replaced, and a render whose caller went away is killed at once."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from server import prompt
from server.prompt import TemplateError
from server.render import RenderPool

LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]


def run(coro):
    return asyncio.run(coro)


async def _with_pool(fn, **kw):
    pool = RenderPool(**kw)
    try:
        return await fn(pool)
    finally:
        await pool.close()


def test_renders_as_in_process():
    async def go(pool):
        out = await pool.render(prompt.FALLBACK_TEMPLATE, CHAT, bos_token="<s>", extra={"enable_thinking": True})
        again = await pool.render(prompt.FALLBACK_TEMPLATE, CHAT)
        return out, again, pool.spawned

    out, again, spawned = run(_with_pool(go))
    assert out == prompt.render(prompt.FALLBACK_TEMPLATE, CHAT) == again
    assert spawned == 1  # the child is kept between renders


def test_cpu_limit_is_a_400_naming_it_and_the_child_is_replaced():
    async def go(pool):
        t0 = time.monotonic()
        with pytest.raises(TemplateError, match=r"took more than 0.5 s of CPU to render"):
            await pool.render(LOOPS, CHAT)
        took = time.monotonic() - t0
        ok = await pool.render(prompt.FALLBACK_TEMPLATE, CHAT)
        return took, ok, pool.spawned

    took, ok, spawned = run(_with_pool(go, cpu_seconds=0.5, wall_seconds=30))
    assert took < 20
    assert ok.startswith("<|im_start|>system")
    assert spawned == 2


@pytest.mark.parametrize("template", ["{{ 'a' * 10**9 }}", "{{ ('a' * 10**8) * 4 }}"])
def test_memory_limit_is_a_400_naming_it(template):
    async def go(pool):
        with pytest.raises(TemplateError, match=r"needed more than 256 MiB of memory"):
            await pool.render(template, CHAT)
        return await pool.render("{{ messages | length }}", CHAT)

    assert run(_with_pool(go, memory_bytes=256 << 20)) == "2"


def test_wall_clock_limit_kills_the_child():
    async def go(pool):
        with pytest.raises(TemplateError, match=r"took more than 0.3 s to render"):
            await pool.render(LOOPS, CHAT)
        return await pool.render("ok", CHAT)

    assert run(_with_pool(go, cpu_seconds=60, wall_seconds=0.3)) == "ok"


def test_a_cancelled_render_is_killed_at_once():
    """The client went away: the render's process is killed, not left to burn its budget."""

    async def check():
        pool = RenderPool(cpu_seconds=60, wall_seconds=60)
        children = []
        spawn = pool._spawn

        async def recording():
            children.append(await spawn())
            return children[-1]

        pool._spawn = recording  # type: ignore[method-assign]
        try:
            task = asyncio.ensure_future(pool.render(LOOPS, CHAT))
            for _ in range(200):  # until the child is up and has the render
                await asyncio.sleep(0.05)
                if children:
                    break
            await asyncio.sleep(0.3)
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            t0 = time.monotonic()
            rc = await asyncio.wait_for(children[0].proc.wait(), 5)
            assert rc < 0  # killed by a signal, long before its 60 s CPU budget
            assert time.monotonic() - t0 < 2
            assert await pool.render("{{ 1 + 1 }}", CHAT) == "2"
            assert len(children) == 2
        finally:
            await pool.close()

    run(check())


def test_two_runaways_leave_the_event_loop_free():
    """The gateway's loop keeps turning while both children burn their CPU budget."""

    async def go(pool):
        gaps: list[float] = []
        hostile = [asyncio.ensure_future(pool.render(LOOPS, CHAT)) for _ in range(2)]
        while not all(h.done() for h in hostile):
            t0 = time.monotonic()
            await asyncio.sleep(0.01)
            gaps.append(time.monotonic() - t0 - 0.01)
        for h in hostile:
            with pytest.raises(TemplateError, match="of CPU"):
                h.result()
        return gaps

    gaps = run(_with_pool(go, cpu_seconds=1, wall_seconds=30))
    gaps.sort()
    assert len(gaps) > 20
    assert gaps[int(len(gaps) * 0.99)] < 0.1, gaps[-5:]


def test_template_errors_and_sandbox_come_back_as_400s():
    async def go(pool):
        with pytest.raises(TemplateError, match="invalid chat template"):
            await pool.render("{% for %}", CHAT)
        with pytest.raises(TemplateError, match="no system"):
            await pool.render("{{ raise_exception('no system') }}", CHAT)
        with pytest.raises(TemplateError):
            await pool.render("{{ self._TemplateReference__context.cycler.__init__.__globals__.os.popen('id').read() }}", CHAT)
        with pytest.raises(TemplateError, match="unpaired surrogate"):
            await pool.render("{{ messages }}", [{"role": "user", "content": "\ud800"}])
        return pool.spawned

    assert run(_with_pool(go)) == 1  # refusals are answers, not limits: the child stays


def test_loopcontrols_extension():
    t = "{% for m in messages %}{% if m.role == 'user' %}{% break %}{% endif %}{{ m.content }}{% endfor %}"
    assert prompt.render(t, CHAT) == "Be brief."
    t = "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}{{ m.content }}{% endfor %}"
    assert run(_with_pool(lambda pool: pool.render(t, CHAT))) == "hello"


def test_jinja_floor():
    import jinja2

    version = tuple(int(x) for x in jinja2.__version__.split(".")[:3])
    assert version >= (3, 1, 6)  # 3.1.5 and older have published sandbox escapes
    pyproject = open(os.path.join(os.path.dirname(__file__), "..", "..", "pyproject.toml")).read()
    assert '"jinja2>=3.1.6"' in pyproject
