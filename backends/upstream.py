"""The upstream engine kind: models served by other engines over HTTP.

An ``[[upstreams]]`` table of the config file names one group of replicas that speak
the same API (``openai`` or ``ollama``) and serve the same models; ``UpstreamPool``
holds them all, probes them, picks a replica per request and streams from it. To the
gateway each upstream model is an ``UpstreamBackend``: the same ``Backend`` protocol
as a worker process, so both dialects, the policy, the loop guard, tool and thinking
parsing, metrics and disconnect handling run unchanged.

Semantics (the common ones of SMG, vllm-router, production-stack; research note
scaleout.md §4.1):

* Routing: only replicas that serve the model and are up; among them those that have
  it loaded (Ollama/kiln ``/api/ps``), then the fewest requests in flight, counted at
  selection (a burst of simultaneous requests spreads; LiteLLM's ``least-busy`` sent
  8/0). A session prefix (``affinity``) keeps a conversation on the replica that has
  its prefix cached, unless that replica has more than ``2`` and more than ``1.5×``
  the requests of the least busy one (SMG's ``cache_aware`` balance thresholds);
  ties go to the replica sent fewest requests so far.
* Health: a probe of every replica each ``probe_interval`` (``fail_threshold``
  failures take it out, ``ok_threshold`` successes bring it back); a connection
  failure or a 502/503/504 takes it out at once (passive ejection).
* Failover: a request is re-sent to another replica only while nothing of it has
  reached the client: connect errors, 5xx/429 before the first token, the first-token
  timeout, and for a client waiting for the whole answer (``whole``) any failure before
  the answer is complete. After the first streamed token a failure ends the stream
  with an error (``BackendError``), never as if it had finished.
* No replica up, or all at ``max_inflight``: ``UpstreamUnavailable`` at once (the
  gateway answers 503 with ``Retry-After``), never a wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections.abc import AsyncGenerator
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
import orjson
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from backends import upstream_wire as wire
from backends.base import (Backend, BackendError, Capabilities, Chunk, Embeddings, EngineInfo, GenerationRequest,
                           InvalidRequest, ModelSpec)
from backends.store import InvalidName, ModelName, ModelNotFound
from backends.upstream_wire import UpstreamRequest

log = logging.getLogger("kiln.upstream")

AFFINITY_ABS, AFFINITY_REL = 2, 1.5


class UpstreamConfig(BaseModel):
    """One ``[[upstreams]]`` table."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    api: Literal["openai", "ollama"] = "openai"
    urls: list[str] = Field(min_length=1, description="Replicas; for openai with the API prefix (/v1, OVMS /v3)")
    models: dict[str, str] | list[str] | None = Field(
        None, description="Served models: names, or {kiln name: upstream id}; unset = discovered")
    api_key_env: str | None = None
    api_key: SecretStr | None = Field(None, description="Filled from api_key_env by the settings")
    max_inflight: int = Field(16, ge=1, description="Requests one replica gets at once; more wait as 503")
    health: str | None = Field(None, description="Probe path on the replica's origin (default /health, "
                                                 "Ollama: /); OVMS: /v2/health/ready")
    probe_interval: float = Field(2.0, gt=0)
    fail_threshold: int = Field(2, ge=1)
    ok_threshold: int = Field(2, ge=1)
    connect_timeout: float = Field(1.0, gt=0)
    first_token_timeout: float = Field(120.0, gt=0, description="Generous: a cold upstream loads its model first")
    stall_timeout: float = Field(30.0, gt=0)
    affinity: bool = True

    @field_validator("urls")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        out = []
        for url in v:
            parts = urlsplit(url.strip())
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"upstream url {url!r} is not http(s)://host[:port][/prefix]")
            out.append(url.strip().rstrip("/"))
        return out


class UpstreamUnavailable(BackendError):
    """No replica can take the request now; ``retry_after`` seconds is when one may."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _Retry(Exception):
    """A failure before anything reached the client: try another replica."""

    def __init__(self, message: str, eject: bool) -> None:
        super().__init__(message)
        self.eject = eject


def key(name: str) -> str:
    """The form names are matched in: kiln's canonical ``model:tag``, lower-cased."""
    try:
        return ModelName.parse(name).display.lower()
    except InvalidName:
        return name.strip().lower()


class Replica:
    def __init__(self, upstream: Upstream, url: str) -> None:
        self.upstream = upstream
        parts = urlsplit(url)
        self.origin = f"{parts.scheme}://{parts.netloc}"
        path = parts.path.rstrip("/")
        if upstream.config.api == "openai" and not path:
            path = "/v1"  # the OpenAI API's usual prefix; OVMS says /v3 itself
        self.base = self.origin + (path if upstream.config.api == "openai" else "")
        self.up = False  # until a probe succeeds: a replica still loading gets nothing
        self.inflight = 0
        self.routed = 0  # requests sent here, for tests and /health
        self.served: set[str] | None = None  # keys of the upstream ids it lists; None = not known (yet)
        self.ids: dict[str, str] = {}  # key -> the upstream's own spelling of the id
        self.loaded: set[str] = set()
        self.tags: dict[str, dict[str, Any]] = {}  # Ollama/kiln: key -> its /api/tags entry, as it sent it
        self.oks = self.fails = 0
        self.error = ""

    def serves(self, model_id: str) -> bool:
        return self.served is None or key(model_id) in self.served

    def mark_down(self, why: str) -> None:
        if self.up:
            log.warning("upstream %s: %s is out: %s", self.upstream.config.name, self.base, why)
        self.up, self.oks, self.error = False, 0, why

    def state(self) -> dict[str, Any]:
        return {"url": self.base, "up": self.up, "inflight": self.inflight, "requests": self.routed,
                "models": sorted(self.served) if self.served is not None else None,
                "loaded": sorted(self.loaded), **({"error": self.error} if self.error and not self.up else {})}


class Upstream:
    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        self.replicas = [Replica(self, u) for u in config.urls]
        headers = {"Authorization": f"Bearer {config.api_key.get_secret_value()}"} if config.api_key else {}
        # read=None: kiln times reads itself (first token, stalls); connect and pool waits are short so
        # a dead replica costs at most connect_timeout before the next is tried.
        self.client = httpx.AsyncClient(
            headers=headers, follow_redirects=False,
            timeout=httpx.Timeout(None, connect=config.connect_timeout, pool=config.connect_timeout, write=30.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        m = config.models
        self.configured: dict[str, str] | None = (
            None if m is None else {key(k): v for k, v in (m.items() if isinstance(m, dict) else ((n, n) for n in m))})
        self.names: dict[str, str] = {}  # key -> the name listed in the catalogue
        if isinstance(m, dict):
            self.names = {key(k): k for k in m}
        elif m is not None:
            self.names = {key(n): n for n in m}

    def model_id(self, name: str) -> str | None:
        k = key(name)
        if self.configured is not None:
            return self.configured.get(k)
        return self.names.get(k)

    def discovered(self) -> None:
        if self.configured is None:
            self.names = {}
            for r in self.replicas:
                for mid in r.served or ():
                    self.names.setdefault(mid, r.ids.get(mid, mid))


class UpstreamPool:
    def __init__(self, configs: list[UpstreamConfig]) -> None:
        self.upstreams = [Upstream(c) for c in configs]
        self.active: dict[str, int] = {}  # key -> requests in flight through this gateway (/api/ps)
        # httpx logs every request at INFO; per generation that doubles kiln's own access line.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        """Probes every replica once (bounded by the connect timeouts), then keeps probing."""
        await asyncio.gather(*(self._probe(r) for u in self.upstreams for r in u.replicas))
        for u in self.upstreams:
            u.discovered()
        self._task = asyncio.create_task(self._probe_loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for u in self.upstreams:
            await u.client.aclose()

    # -- the catalogue -----------------------------------------------------------------
    def find(self, name: str) -> Upstream | None:
        for u in self.upstreams:
            if u.model_id(name) is not None:
                return u
        return None

    def models(self) -> list[tuple[str, Upstream]]:
        """(name, upstream) of every model an upstream serves, first upstream first."""
        seen: set[str] = set()
        out = []
        for u in self.upstreams:
            for k, name in u.names.items():
                if k not in seen:
                    seen.add(k)
                    out.append((name, u))
        return out

    def where(self, name: str) -> dict[str, Any]:
        u = self.find(name)
        if u is None:
            return {}
        mid = u.model_id(name) or name
        reps = [r for r in u.replicas if r.serves(mid)]
        return {"location": "upstream", "upstream": u.config.name, "api": u.config.api, "upstream_model": mid,
                "replicas": [r.base for r in reps], "replicas_up": sum(r.up for r in reps),
                "loaded_on": [r.base for r in reps if key(mid) in r.loaded]}

    def native(self, name: str) -> tuple[Upstream, str, list[Replica]] | None:
        """For a model of an Ollama/kiln upstream (the API that has show, ps, copy, delete
        and load): the upstream, the model's id there and the replicas up that serve it,
        those that have it loaded first. None for an OpenAI upstream or an unknown name."""
        u = self.find(name)
        if u is None or u.config.api != "ollama":
            return None
        mid = u.model_id(name) or name
        reps = [r for r in u.replicas if r.up and r.serves(mid)]
        return u, mid, sorted(reps, key=lambda r: key(mid) not in r.loaded)

    async def call(self, r: Replica, method: str, path: str, body: dict[str, Any] | None = None,
                   timeout: float = 5.0) -> httpx.Response:
        """One management request to a replica (``path`` under its base URL). A transport
        failure takes the replica out, as a failed generation does."""
        c = r.upstream.config
        try:
            return await r.upstream.client.request(method, r.base + path, json=body,
                                                   timeout=httpx.Timeout(timeout, connect=c.connect_timeout))
        except httpx.HTTPError as e:
            r.mark_down(f"{path}: {type(e).__name__}: {e}")
            raise UpstreamUnavailable(f"upstream {c.name} ({r.base}): {type(e).__name__}: {e}") from None

    async def refresh(self, u: Upstream) -> None:
        """Re-reads the model lists of an upstream's replicas now (after a copy, delete or
        load there), instead of at the next probe."""
        timeout = httpx.Timeout(5.0, connect=u.config.connect_timeout)
        await asyncio.gather(*(self._discover(r, timeout) for r in u.replicas if r.up))
        u.discovered()

    def status(self) -> dict[str, Any]:
        return {u.config.name: {"api": u.config.api, "up": sum(r.up for r in u.replicas),
                                "replicas": [r.state() for r in u.replicas]} for u in self.upstreams}

    # -- health --------------------------------------------------------------------------
    async def _probe_loop(self) -> None:
        interval = min(u.config.probe_interval for u in self.upstreams) if self.upstreams else 2.0
        while True:
            await asyncio.sleep(interval)
            await asyncio.gather(*(self._probe(r) for u in self.upstreams for r in u.replicas),
                                 return_exceptions=True)
            for u in self.upstreams:
                u.discovered()

    async def _probe(self, r: Replica) -> None:
        c = r.upstream.config
        # At least 2 s: a short probe interval must not make a busy replica look dead.
        timeout = httpx.Timeout(min(max(c.probe_interval, 2.0), 5.0), connect=c.connect_timeout)
        path = c.health or ("/" if c.api == "ollama" else "/health")
        try:
            resp = await r.upstream.client.get(r.origin + path, timeout=timeout)
            ok = resp.status_code < 300 or resp.status_code == 404  # no such endpoint: the model list decides
            why = f"health {path}: HTTP {resp.status_code}"
            if ok and (c.models is None or c.api == "ollama"):
                ok, why = await self._discover(r, timeout)
        except httpx.HTTPError as e:
            ok, why = False, f"probe: {type(e).__name__}: {e}"
        if ok:
            r.oks, r.fails = r.oks + 1, 0
            # At start (never probed) one success is enough; after a failure ok_threshold are needed.
            if not r.up and (r.oks >= c.ok_threshold or not r.error):
                log.info("upstream %s: %s is up", c.name, r.base)
                r.up, r.error = True, ""
        else:
            r.fails, r.oks = r.fails + 1, 0
            if r.up and r.fails >= c.fail_threshold:
                r.mark_down(why)
            elif not r.up:
                r.error = why

    async def _discover(self, r: Replica, timeout: httpx.Timeout) -> tuple[bool, str]:
        """The models a replica serves (and, for Ollama/kiln, has loaded)."""
        c = r.upstream.config
        client = r.upstream.client
        try:
            if c.api == "ollama":
                tags = await client.get(r.base + "/api/tags", timeout=timeout)
                ps = await client.get(r.base + "/api/ps", timeout=timeout)
                if tags.status_code != 200:
                    return False, f"/api/tags: HTTP {tags.status_code}"
                entries = [m for m in tags.json().get("models") or [] if isinstance(m, dict)]
                ids = [m.get("name") or m.get("model") for m in entries]
                r.tags = {key(i): m for i, m in zip(ids, entries) if isinstance(i, str)}
                loaded = [m.get("name") or m.get("model") for m in ps.json().get("models") or []] \
                    if ps.status_code == 200 else []
            else:
                resp = await client.get(r.base + "/models", timeout=timeout)
                if resp.status_code != 200:
                    return False, f"/models: HTTP {resp.status_code}"
                ids = [m.get("id") for m in resp.json().get("data") or []]
                loaded = ids  # an OpenAI server serves what it lists
        except (httpx.HTTPError, ValueError, AttributeError) as e:
            return False, f"model list: {type(e).__name__}: {e}"
        names = [i for i in ids if isinstance(i, str)]
        if c.models is None:
            r.served = {key(i) for i in names}
            r.ids = {key(i): i for i in names}
        r.loaded = {key(i) for i in loaded if isinstance(i, str)}
        return True, ""

    # -- routing ---------------------------------------------------------------------------
    def select(self, u: Upstream, model_id: str, affinity: str | None, tried: set[int]) -> Replica:
        serving = [r for r in u.replicas if r.serves(model_id)]
        if not serving:
            raise ModelNotFound(model_id)
        up = [r for r in serving if r.up and id(r) not in tried]
        if not up:
            wait = max(1, math.ceil(u.config.probe_interval))
            raise UpstreamUnavailable(f"no replica of upstream '{u.config.name}' is up for {model_id}"
                                      f"{': ' + serving[0].error if serving[0].error else ''}", retry_after=wait)
        free = [r for r in up if r.inflight < u.config.max_inflight]
        if not free:
            raise UpstreamUnavailable(f"every replica of upstream '{u.config.name}' is busy "
                                      f"({u.config.max_inflight} requests each)", retry_after=1)
        low = min(r.inflight for r in free)

        def balanced(r: Replica) -> bool:
            return not (r.inflight - low > AFFINITY_ABS and r.inflight > AFFINITY_REL * low)

        pool = [r for r in free if key(model_id) in r.loaded and balanced(r)] or free
        if affinity and u.config.affinity:
            best = max(pool, key=lambda r: hashlib.blake2b(f"{affinity}\0{r.base}".encode(), digest_size=8).digest())
            if balanced(best):
                return best
        # Fewest in flight; on a tie the one sent fewest so far, so ties do not drift one way.
        return min(pool, key=lambda r: (r.inflight, r.routed))

    async def stream(self, name: str, req: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        u = self.find(name)
        if u is None:
            raise ModelNotFound(name)
        model_id = u.model_id(name) or name
        ureq = req if isinstance(req, UpstreamRequest) else UpstreamRequest(  # a rendered prompt: sent raw
            prompt=req.prompt, sampling=req.sampling, id=req.id, json_schema=req.json_schema, raw=True)
        k = key(name)
        self.active[k] = self.active.get(k, 0) + 1
        try:  # aclosing: a client that goes away closes the upstream request now, not when collected
            async with contextlib.aclosing(self._route(u, model_id, ureq)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            self.active[k] -= 1

    async def _route(self, u: Upstream, model_id: str, ureq: UpstreamRequest) -> AsyncGenerator[Chunk, None]:
        tried: set[int] = set()
        again: set[int] = set()  # replicas a whole request was sent to a second time
        last = ""
        while True:
            try:
                r = self.select(u, model_id, ureq.affinity, tried)
            except UpstreamUnavailable as e:
                if last:
                    raise UpstreamUnavailable(f"{e}; last failure: {last}", e.retry_after) from None
                raise
            tried.add(id(r))
            r.inflight += 1  # counted at selection, before any await
            r.routed += 1
            sent = False
            try:
                held: list[Chunk] = []
                async with contextlib.aclosing(self._once(r, model_id, ureq)) as chunks:
                    async for chunk in chunks:
                        if ureq.whole:
                            held.append(chunk)
                        else:
                            sent = True
                            yield chunk
                r.loaded.add(key(model_id))  # it has just generated with it
                for chunk in held:
                    yield chunk
                return
            except _Retry as e:
                if e.eject:
                    r.mark_down(str(e))
                elif ureq.whole and id(r) not in again:
                    # The replica answered (an error in its stream, a 5xx) and is still up: a whole
                    # request may go to it once more. Behind it may be a router (SMG) whose backend
                    # died mid-answer; sent again, the router picks a live one.
                    again.add(id(r))
                    tried.discard(id(r))
                last = f"{r.base}: {e}"
                log.warning("upstream %s: %s; re-sending to another replica", u.config.name, last)
                if sent:  # cannot happen (_once only retries before its first chunk); kept as a guard
                    raise BackendError(last) from None
            finally:
                r.inflight -= 1

    async def _once(self, r: Replica, model_id: str, req: UpstreamRequest) -> AsyncGenerator[Chunk, None]:
        """One attempt on one replica. Raises ``_Retry`` while nothing was yielded (or, for
        a ``whole`` request, for any failure), ``BackendError`` after."""
        c = r.upstream.config
        path, body = wire.build(c.api, model_id, req)
        yielded = False
        try:
            async with contextlib.AsyncExitStack() as stack:
                try:  # a node that accepts but never answers (SIGSTOP, a wedged engine) counts as no first token
                    async with asyncio.timeout(c.first_token_timeout):
                        resp = await stack.enter_async_context(r.upstream.client.stream(
                            "POST", r.base + path, content=orjson.dumps(body),
                            headers={"Content-Type": "application/json"}))
                except TimeoutError:
                    raise _Timeout(f"sent no answer within {c.first_token_timeout:g}s") from None
                if resp.status_code != 200:
                    await self._refused(r, resp, model_id)
                decoder = wire.Decoder(c.api)
                lines = resp.aiter_lines()
                while not decoder.done:
                    wait = c.stall_timeout if yielded else c.first_token_timeout
                    try:
                        async with asyncio.timeout(wait):
                            line = await anext(lines)
                    except StopAsyncIteration:  # a stream that ends without done/[DONE] was cut off
                        raise httpx.RemoteProtocolError("the stream ended before it was finished") from None
                    except TimeoutError:
                        what = "stalled" if yielded else "sent no first token"
                        raise _Timeout(f"{what} within {wait:g}s") from None
                    event = wire.parse_line(c.api, line)
                    if event is None:
                        continue
                    chunks = decoder.feed(event) if isinstance(event, dict) else decoder.end()  # "done"
                    for chunk in chunks:
                        yield chunk
                        yielded = True
                    if event == "done":
                        break
                for chunk in decoder.end():
                    yield chunk
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as e:
            raise _Retry(f"connect: {type(e).__name__}: {e}", eject=True) from None
        except (httpx.HTTPError, _Timeout, wire.UpstreamError) as e:
            message = f"{type(e).__name__}: {e}" if not isinstance(e, wire.UpstreamError) else str(e)
            transport = not isinstance(e, wire.UpstreamError)
            if not yielded or req.whole:
                raise _Retry(message, eject=transport) from None
            if transport:
                r.mark_down(message)
            raise BackendError(f"upstream {c.name} ({r.base}) failed mid-stream: {message}") from None

    async def _refused(self, r: Replica, resp: httpx.Response, model_id: str) -> None:
        """A non-200 answer, before any token: retried, or the client's error."""
        text = (await resp.aread())[:2000].decode("utf-8", "replace")
        try:
            err = orjson.loads(text).get("error", text)
            message = err.get("message", str(err)) if isinstance(err, dict) else str(err)
        except (ValueError, AttributeError):
            message = text
        status = resp.status_code
        if status == 429 or status >= 500:
            raise _Retry(f"HTTP {status}: {message}", eject=status in (502, 503, 504))
        if status == 404 and "model" in message.lower():
            if r.served is not None:
                r.served.discard(key(model_id))  # listed but gone: route the model elsewhere
            raise _Retry(f"HTTP 404: {message}", eject=False)
        raise InvalidRequest(f"upstream {r.upstream.config.name}: {message}")

    async def embed(self, name: str, texts: list[str]) -> Embeddings:
        u = self.find(name)
        if u is None:
            raise ModelNotFound(name)
        model_id = u.model_id(name) or name
        tried: set[int] = set()
        while True:
            r = self.select(u, model_id, None, tried)
            tried.add(id(r))
            r.inflight += 1
            r.routed += 1
            path, body = wire.embed_body(u.config.api, model_id, texts)
            try:
                resp = await u.client.post(r.base + path, content=orjson.dumps(body),
                                           headers={"Content-Type": "application/json"},
                                           timeout=httpx.Timeout(u.config.first_token_timeout,
                                                                 connect=u.config.connect_timeout))
                if resp.status_code != 200:
                    await self._refused(r, resp, model_id)
                vectors, n = wire.embed_result(u.config.api, resp.json())
                return Embeddings(vectors, n)
            except (httpx.HTTPError, _Retry) as e:
                if not isinstance(e, _Retry) or e.eject:
                    r.mark_down(str(e))
                log.warning("upstream %s: embeddings on %s failed (%s); re-sending", u.config.name, r.base, e)
            finally:
                r.inflight -= 1


class _Timeout(Exception):
    pass


class UpstreamBackend(Backend):
    """One upstream model, as the gateway holds a loaded model."""

    remote = True  # the upstream applies the template, counts tokens and checks the context
    def __init__(self, pool: UpstreamPool, name: str) -> None:
        self.pool, self.name = pool, name
        self.spec = ModelSpec(name=name, path="", backend="upstream")
        self.info = EngineInfo(device="upstream", num_ctx=0, num_parallel=0,
                               capabilities=Capabilities(embeddings=True, grammar=True))

    async def load(self) -> EngineInfo:
        assert self.info is not None
        self.info.details = self.pool.where(self.name)
        return self.info

    def stream(self, req: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        return self.pool.stream(self.name, req)

    async def tokenize(self, text: str) -> list[int]:
        raise InvalidRequest("an upstream model's tokens are counted by the upstream")

    async def embed(self, texts: list[str | list[int]]) -> Embeddings:
        if any(not isinstance(t, str) for t in texts):
            raise InvalidRequest("token ids cannot be embedded by an upstream model: its tokenizer is not kiln's")
        return await self.pool.embed(self.name, [t for t in texts if isinstance(t, str)])

    async def _prepare(self, req: GenerationRequest) -> list[int]:
        """The upstream renders, counts and checks what it can serve (its 4xx reaches the
        client as a 400): nothing to prepare here."""
        raise InvalidRequest("an upstream model's tokens are counted by the upstream")

    async def unload(self) -> None:
        """The upstream keeps its own models loaded."""
