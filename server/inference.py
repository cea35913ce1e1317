"""The one generation path behind every dialect.

A dialect turns its wire request into an ``Inference``, calls ``Service.stream``, and
turns the ``Chunk``s and the closing ``Result`` into its wire format. ``stream`` is
primed: everything that can fail with a proper status code (unknown model, bad
options, a prompt longer than the context, a full queue) happens before its first
``yield``, so a dialect can still answer with that status, even when streaming.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any

from backends.base import BackendError, Chunk, FinishReason, GenerationRequest, Usage
from backends.openvino.request import npu_prompt_size
from backends.store import Manifest, ModelStore
from server import fim
from server import prompt as templates
from server.render import RenderPool
from server.errors import BadRequest, ContextOverflow, Unavailable
from server.metrics import Metrics
from server import tools
from server.guard import LoopGuard
from server.options import check, resolve
from server.policy import Policy, apply, merge
from server.reasoning import ThinkStream
from server.scheduler import Runner, Scheduler
from server.settings import Settings
from server.tools import ToolCall, ToolStream

log = logging.getLogger("kiln.inference")

@dataclass
class Ready:
    """The primed generator's first item: the request holds a slot; ``notes`` say
    what policy changed (sent as the ``X-Kiln-Adjusted`` header)."""

    notes: list[str]
    prompt_tokens: int = 0  # the prompt's tokens, counted before generating (Anthropic's message_start)

    def headers(self) -> dict[str, str]:
        return {"X-Kiln-Adjusted": "; ".join(self.notes)} if self.notes else {}


@dataclass
class Inference:
    """A generation request, whatever dialect it came in."""

    model: str
    messages: list[dict[str, Any]] | None = None  # chat
    prompt: str | None = None  # completion
    prompt_ids: list[int] | None = None  # completion: the prompt as token ids (raw; the engine gets them as they are)
    system: str | None = None
    template: str | None = None
    raw: bool = False
    suffix: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # checked Ollama options
    format: Any = None  # "json" or a JSON schema
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None  # "auto", "none", "required" or {"function": {"name": ...}}
    think: Any = None
    keep_alive: float | None = None  # seconds; None = the model's current/default
    images: list[str] | None = None
    trace: dict[str, Any] | None = None  # filled for the access log (model, tokens, ttft)
    truncate: bool | None = None  # Ollama's: drop the oldest turns to fit (None: the policy decides)
    shift: bool | None = None  # Ollama's; kiln never shifts the context (see README)
    context: list[int] | None = None  # /api/generate's: token ids of an earlier exchange, prepended
    return_context: bool = False  # /api/generate (not raw): give the exchange's token ids back
    # Defaults of the dialect, used only where neither the request, the model's parameters
    # nor the policy set the option (OpenAI's temperature and top_p of 1.0), and named.
    fallback: dict[str, Any] = field(default_factory=dict)
    fallback_from: str = "the dialect's default"
    stream: bool = True  # False: the client waits for the whole answer (an upstream may re-send it)
    # None: no log-probabilities; k: each sampled token's and its k most likely alternatives'
    logprobs: int | None = None
    logit_bias: dict[int, float] | None = None  # token id -> -100..100 (-100 bans)
    n: int = 1  # choices: sequences sampled from one evaluation of the prompt (Chunk.index)


@dataclass
class Result:
    """What a finished generation reports (Ollama's final metrics)."""

    finish: FinishReason
    usage: Usage
    total_ns: int
    load_ns: int
    detail: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    thinking: str = ""  # the whole reasoning text, for non-streamed replies
    context: list[int] | None = None  # token ids of prompt and answer (Inference.return_context)
    stop_sequence: str | None = None  # the stop string that ended it (Anthropic's stop_sequence)
    logprobs: list[dict[str, Any]] | None = None  # every token's (Inference.logprobs), for whole replies
    # With Inference.n > 1: one Result per choice (with its ``text``); this one's usage is
    # their sum, the prompt counted once, and its other fields are the first choice's.
    choices: list[Result] | None = None
    text: str = ""

    def headers(self) -> dict[str, str]:
        """Why it stopped, for a response sent after the generation ended."""
        out = {"X-Kiln-Finish-Reason": self.finish.value}
        if self.detail:
            out["X-Kiln-Finish-Detail"] = self.detail.encode("ascii", "replace").decode()
        return out


@dataclass
class Embedded:
    vectors: list[list[float]]
    prompt_tokens: int
    total_ns: int
    load_ns: int


@dataclass
class Prepared:
    manifest: Manifest
    inference: Inference
    request: GenerationRequest
    num_ctx: int | None
    policy: Policy
    notes: list[str]
    tool_stream: ToolStream | None = None
    fns: list[dict[str, Any]] | None = None  # the functions offered (re-rendered with the prompt)
    prefix: str = ""  # the text of Inference.context, before the rendered prompt


def check_ids(ids: list[int], n_vocab: int | None, field: str) -> None:
    """A 400 naming the first token id outside the model's vocabulary."""
    if not n_vocab:
        raise BadRequest(f"{field}: this model's engine does not say its vocabulary size, so token ids "
                         f"cannot be checked; give text")
    for t in ids:
        if not 0 <= t < n_vocab:
            raise BadRequest(f"{field}: token id {t} is outside the vocabulary (0..{n_vocab - 1})")


class Service:
    def __init__(self, settings: Settings, store: ModelStore, scheduler: Scheduler,
                 metrics: Metrics | None = None, renderer: RenderPool | None = None) -> None:
        self.settings = settings
        self.renderer = renderer or RenderPool()  # chat templates render in its processes
        self.store = store
        self.scheduler = scheduler
        self.metrics = metrics or Metrics()
        self.draining = False
        self.upstreams: Any = None  # backends.upstream.UpstreamPool when [[upstreams]] are configured

    # -- building the engine request -------------------------------------------------
    async def prepare(self, inf: Inference) -> Prepared:
        m = self.store.get(inf.model)
        caps = capabilities(m)
        if inf.tools and "tools" not in caps:
            raise BadRequest(f"{inf.model} does not support tools")
        if inf.think and "thinking" not in caps:
            raise BadRequest(f'"{inf.model}" does not support thinking')
        if inf.images:
            raise BadRequest(f'"{inf.model}" does not support images')
        if inf.suffix and "insert" not in caps:
            raise BadRequest(f'"{inf.model}" does not support insert')
        if "completion" not in caps:
            raise BadRequest(f'"{inf.model}" does not support generate')
        try:
            policy = merge(self.settings.policy, m.policy)
        except ValueError as e:
            raise BadRequest(f"invalid generation policy for {m.name}: {e}") from None
        options, notes = apply(policy, {**check(m.parameters, where="model parameters"), **inf.options})
        for name, value in inf.fallback.items():
            if name not in options:
                options[name] = value
                notes.append(f"{name}={value} ({inf.fallback_from})")
        if inf.shift:
            notes.append("shift: kiln does not shift the context; a generation that fills it ends with length")
        resolved = resolve({}, options)
        fns, forced = self._tools(inf, policy)
        req = GenerationRequest(prompt=await self.render(m, inf, fns), sampling=resolved.sampling)
        req.sampling.logprobs = inf.logprobs
        if inf.prompt_ids is not None:
            req.tokens = list(inf.prompt_ids)  # checked against the vocabulary in _check_features
        req.sampling.logit_bias = sorted((inf.logit_bias or {}).items())
        try:
            req.prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest("the request contains invalid Unicode (an unpaired surrogate)") from None
        if inf.format is not None:
            if forced:
                raise BadRequest("format cannot be combined with a required tool_choice")
            req.json_schema = {"type": "object"} if inf.format == "json" else inf.format
        stream = None
        if fns:
            stream = ToolStream(fns, forced=bool(forced))
            if forced:
                req.json_schema = tools.call_schema(forced)
        return Prepared(m, inf, req, resolved.num_ctx, policy, notes, stream, fns)

    @staticmethod
    def _tools(inf: Inference, policy: Policy) -> tuple[list[dict[str, Any]] | None, list[dict[str, Any]] | None]:
        """The functions offered, and those a call is forced to (tool_choice)."""
        if not inf.tools:
            return None, None
        choice = inf.tool_choice
        if choice is None:
            choice = policy.tool_choice
            if choice == "required-then-auto":
                last = (inf.messages or [{}])[-1].get("role")
                choice = "auto" if last == "tool" else "required"
        forced = tools.choose(inf.tools, choice)
        if forced == []:  # tool_choice "none"
            return None, None
        return tools.functions(inf.tools), forced

    async def render(self, m: Manifest, inf: Inference, fns: list[dict[str, Any]] | None = None) -> str:
        if inf.suffix:
            return await self._fill_in_middle(m, inf)
        if inf.raw:
            return inf.prompt or ""
        system = inf.system if inf.system is not None else m.system
        messages: list[dict[str, Any]] = list(m.messages)
        if inf.messages is not None:
            if system and not any(msg.get("role") == "system" for msg in inf.messages):
                messages.insert(0, {"role": "system", "content": system})
            messages.extend(inf.messages)
        else:
            if system:
                messages.insert(0, {"role": "system", "content": system})
            messages.append({"role": "user", "content": inf.prompt or ""})
        template = inf.template or m.chat_template
        native = bool(fns) and templates.supports(template, "tools")
        if fns and not native:
            messages = tools.history_for_template(messages)
            instructions = tools.system_prompt(fns)
            if messages and messages[0].get("role") == "system":
                messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{instructions}"}
            else:
                messages.insert(0, {"role": "system", "content": instructions})
        text = await self.renderer.render(template, messages, tools=inf.tools if native else None,
                                          bos_token=m.bos_token, eos_token=m.eos_token,
                                          extra={"enable_thinking": bool(inf.think)} if inf.think is not None
                                          else None)
        # The tokenizer adds BOS itself when the model asks for it; a template that
        # also writes it would give two.
        if m.bos_token and m.model_info.get("tokenizer.ggml.add_bos_token") and text.startswith(m.bos_token):
            text = text[len(m.bos_token):]
        return text

    async def _fill_in_middle(self, m: Manifest, inf: Inference) -> str:
        """A prompt with a ``suffix``: through the template when it reads ``suffix`` (as
        Ollama's FIM templates read ``.Suffix``), else the model's own FIM tokens from
        its GGUF, prefix-suffix-middle. ``prepare`` refused models with neither."""
        prompt = inf.prompt or ""
        template = inf.template or m.chat_template
        if templates.supports(template, "insert"):
            return await self.renderer.render(template, [{"role": "user", "content": prompt}], bos_token=m.bos_token,
                                              eos_token=m.eos_token, extra={"prompt": prompt, "suffix": inf.suffix})
        pre, suf, mid = fim.fim_tokens(m, self.store)
        return f"{pre}{prompt}{suf}{inf.suffix}{mid}"

    # -- running it --------------------------------------------------------------------
    async def stream(self, inf: Inference) -> AsyncGenerator[Any, None]:
        """Yields ``Ready`` once the request holds a slot, then ``Chunk``s, then a ``Result``."""
        t0 = time.monotonic_ns()
        if self.draining:
            raise Unavailable("the server is shutting down")
        if self.upstreams is not None and self.upstreams.find(inf.model) is not None:
            from server import remote  # an upstream model: server/remote.py (imports this module)

            async with contextlib.aclosing(remote.stream(self, inf)) as items:
                async for item in items:
                    yield item
            return
        trace = inf.trace = inf.trace if inf.trace is not None else {}
        trace["model"] = inf.model
        p = await self.prepare(inf)
        async with self.scheduler.use(p.manifest, num_ctx=p.num_ctx, keep_alive=inf.keep_alive,
                                      count=inf.n) as lease:
            if inf.context:
                # Ollama detokenizes the ids and writes the text before the new prompt; the
                # text is tokenized again with it (the same ids, for text the model wrote).
                p.prefix = await lease.runner.backend.detokenize(inf.context)
                p.request.prompt = p.prefix + p.request.prompt
            n_prompt = await self._fit_context(lease.runner, p)
            if self.settings.log_content:
                log.info("prompt %s: %r", trace.get("request_id", ""), p.request.prompt)
            yield Ready(p.notes, n_prompt)
            if inf.n > 1:
                async with contextlib.aclosing(self._choices(lease, p, trace, t0, n_prompt)) as items:
                    async for item in items:
                        yield item
                return
            run = _Run(self, p, trace, t0, n_prompt)
            try:
                async for chunk in lease.runner.backend.stream(p.request):
                    out = run.take(chunk)
                    if out is not None:
                        yield out
                    if run.done:
                        break  # leaving the loop closes the engine's stream, which cancels it
            except BaseException as e:
                run.failed(e)
                raise
            rest, result = run.finish(lease.load_ns)
            if inf.return_context:
                result.context = await lease.runner.backend.tokenize(p.request.prompt + "".join(run.output))
            if rest is not None:
                yield rest
            yield result

    async def stream_several(self, infs: Sequence[Inference]) -> AsyncGenerator[Any, None]:
        """Several prompts of one request (OpenAI's completions take a list of them), each
        its own ``stream`` at once, as separate requests would be. One ``Ready`` once every
        one holds its slots (a prompt refused before that keeps the request's status code;
        chunks that come earlier wait), their chunks merged as they come, prompt i's choice
        j re-indexed ``i * n + j``, then one ``Result`` whose ``choices`` are all of theirs
        and whose usage is their sum."""
        n = infs[0].n
        queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

        async def pump(i: int, inf: Inference) -> None:
            try:
                async with contextlib.aclosing(self.stream(inf)) as items:
                    async for item in items:
                        await queue.put((i, item))
            except BaseException as e:
                await queue.put((i, e))
                raise

        tasks = [asyncio.ensure_future(pump(i, inf)) for i, inf in enumerate(infs)]
        readies: list[Ready] = []
        results: dict[int, Result] = {}
        texts: dict[int, list[str]] = collections.defaultdict(list)
        held: list[Chunk] | None = []  # chunks that came before every prompt was Ready
        try:
            while len(results) < len(infs):
                i, item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, Ready):
                    readies.append(item)
                    if len(readies) == len(infs) and held is not None:
                        notes = list(dict.fromkeys(note for r in readies for note in r.notes))
                        yield Ready(notes, sum(r.prompt_tokens for r in readies))
                        for early in held:
                            yield early
                        held = None
                elif isinstance(item, Result):
                    results[i] = item
                else:
                    chunk = dataclasses.replace(item, index=i * n + item.index)
                    texts[chunk.index].append(chunk.text)
                    if held is not None:
                        held.append(chunk)
                    else:
                        yield chunk
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        choices: list[Result] = []
        for i in range(len(infs)):
            r = results[i]
            for j, c in enumerate(r.choices or [r]):
                choices.append(dataclasses.replace(c, text="".join(texts[i * n + j]), choices=None))
        us = [r.usage for r in results.values()]
        total = Usage(prompt_tokens=sum(u.prompt_tokens for u in us),
                      completion_tokens=sum(u.completion_tokens for u in us),
                      cached_tokens=sum(u.cached_tokens for u in us),
                      prompt_ns=max(u.prompt_ns for u in us), eval_ns=max(u.eval_ns for u in us))
        if infs[0].trace is not None:
            infs[0].trace.update(prompt_tokens=total.prompt_tokens, completion_tokens=total.completion_tokens)
        first = results[0]
        yield dataclasses.replace(first, usage=total, choices=choices,
                                  total_ns=max(r.total_ns for r in results.values()))

    async def _choices(self, lease: Any, p: Prepared, trace: dict[str, Any], t0: int,
                       n_prompt: int) -> AsyncGenerator[Any, None]:
        """``Inference.n`` sequences at once, one engine request each, in one prefix group:
        the engine evaluates the prompt once and copies its KV cache to the others. Each has
        its own seed (the request's + its index), loop guard, thinking and tool-call split;
        their chunks are merged as they come, tagged with ``index``."""
        n, base = p.inference.n, p.request
        queue: asyncio.Queue[Any] = asyncio.Queue()
        texts: list[list[str]] = [[] for _ in range(n)]

        async def pump(i: int) -> None:
            sampling = dataclasses.replace(base.sampling, seed=None if base.sampling.seed is None
                                           else base.sampling.seed + i)
            req = dataclasses.replace(base, id=uuid.uuid4().hex, sampling=sampling, prefix_group=base.id)
            stream = ToolStream(p.fns or [], forced=p.tool_stream.forced) if p.tool_stream is not None else None
            run = _Run(self, dataclasses.replace(p, request=req, tool_stream=stream), trace, t0, n_prompt)
            try:
                async with contextlib.aclosing(lease.runner.backend.stream(req)) as chunks:
                    async for chunk in chunks:
                        out = run.take(chunk)
                        if out is not None:
                            out.index = i
                            texts[i].append(out.text)
                            await queue.put(out)
                        if run.done:
                            break
                rest, result = run.finish(lease.load_ns)
            except BaseException as e:
                run.failed(e)
                await queue.put(e)
                raise
            if rest is not None:
                rest.index = i
                texts[i].append(rest.text)
                await queue.put(rest)
            await queue.put((i, result))

        tasks = [asyncio.ensure_future(pump(i)) for i in range(n)]
        results: list[Result | None] = [None] * n
        try:
            while any(r is None for r in results):
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, tuple):
                    results[item[0]] = item[1]
                    continue
                yield item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        done = [r for r in results if r is not None]
        for i, r in enumerate(done):
            r.text = "".join(texts[i])
        first = done[0]
        total = dataclasses.replace(first.usage, completion_tokens=sum(r.usage.completion_tokens for r in done),
                                    eval_ns=max(r.usage.eval_ns for r in done))
        trace.update(completion_tokens=total.completion_tokens)
        yield dataclasses.replace(first, usage=total, choices=done)

    async def _fit_context(self, runner: Runner, p: Prepared) -> int:
        """The prompt's token count, after checking it fits the context window; with
        ``truncate`` (or the "truncate" policy), the oldest non-system turns are dropped
        until it does."""
        ctx, trained, asked = runner.num_ctx, p.manifest.context_length, p.num_ctx
        why = None
        if asked and asked < ctx:
            ctx = asked  # a smaller window, served from the same allocation
        elif asked and asked > ctx:
            why = (f"the model was trained for {trained} tokens" if trained and asked > trained
                   else f"{p.manifest.name} is loaded with {ctx} tokens per request "
                        f"(the memory budget or its compiled length allows no more)")
            p.notes.append(f"num_ctx {asked} -> {ctx} ({why})")
            log.warning("%s: num_ctx %d asked; using %d: %s", p.manifest.name, asked, ctx, why)
        elif not asked and trained and ctx < trained:
            why = self.scheduler.context_for(p.manifest, None)[1]  # the memory budget, if it was that
        self._check_features(runner, p.request)
        n, ids = await self._count(runner, p.request, ctx)
        trace = p.inference.trace if p.inference.trace is not None else {}
        trace["prompt_tokens"] = n  # the access log shows it, refused or not
        if n == 0:
            raise BadRequest("the prompt is empty after templating")
        inf, dropped = p.inference, 0
        truncate = inf.truncate if inf.truncate is not None else p.policy.context_overflow == "truncate"
        limit = runner.info.max_prompt_len or 0  # the NPU's compiled prompt limit

        def over(k: int) -> bool:
            return k >= ctx or bool(limit and k > limit)

        while over(n) and truncate and inf.messages:
            turns = [i for i, m in enumerate(inf.messages) if m.get("role") != "system"]
            if len(turns) <= 1:
                break
            del inf.messages[turns[0]]
            dropped += 1
            p.request.prompt = p.prefix + await self.render(p.manifest, inf, p.fns)
            n, ids = await self._count(runner, p.request, ctx)
        if dropped:
            p.notes.append(f"dropped the {dropped} oldest message(s) to fit num_ctx={ctx}")
            log.info("%s: dropped the %d oldest message(s) to fit num_ctx=%d", p.manifest.name, dropped, ctx)
            trace["prompt_tokens"] = n
        param, exact = "messages" if inf.messages is not None else "prompt", ids is not None
        if limit and n > limit:
            raise ContextOverflow(n, limit, trained, exact=exact, param=param,
                                  compiled=npu_recompile_command(runner, n))
        if n >= ctx:
            raise ContextOverflow(n, ctx, trained, asked=asked, why=why, exact=exact,
                                  param=param)
        p.request.tokens = ids  # the engine generates from these: the prompt is tokenized once
        return n

    @staticmethod
    def _check_features(runner: Runner, req: GenerationRequest) -> None:
        """A 400 for what this model's engine cannot give, before anything streams."""
        caps, name = runner.info.capabilities, runner.spec.backend
        if req.tokens is not None:  # a prompt given as token ids
            check_ids(req.tokens, runner.info.n_vocab, "prompt")
        if req.sampling.logprobs is not None and not caps.logprobs:
            where = f"the {name} backend" + ("'s NPU pipeline" if runner.info.max_prompt_len else "")
            raise BadRequest(f"logprobs are not available on {where} (llama.cpp models have them)")
        if req.sampling.logprobs and req.sampling.logprobs > caps.max_top_logprobs:
            raise BadRequest(f"top_logprobs={req.sampling.logprobs} (alternatives per token): the {name} backend "
                             + (f"gives at most {caps.max_top_logprobs}" if caps.max_top_logprobs else
                                "reports only the sampled token's log-probability; ask for 0"))
        if req.sampling.logit_bias:
            if not caps.logit_bias:
                raise BadRequest(f"logit_bias is not available on the {name} backend (llama.cpp models have it)")
            n_vocab = runner.info.n_vocab or 0
            bad = [t for t, _ in req.sampling.logit_bias if n_vocab and not 0 <= t < n_vocab]
            if bad:
                raise BadRequest(f"logit_bias: token id {bad[0]} is outside the vocabulary (0..{n_vocab - 1})")

    @staticmethod
    async def _count(runner: Runner, req: GenerationRequest, ctx: int) -> tuple[int, list[int] | None]:
        """(tokens, ids): the prompt's token ids from the engine's one ``prepare`` call
        (which also checks its grammar); or, for a
        prompt whose size alone shows it cannot fit, a lower bound of the count and no ids,
        without tokenizing (a token covers at most ``max_token_bytes`` bytes): tokenizing
        megabytes only to refuse them held a slot."""
        per_token = runner.info.max_token_bytes
        if per_token:
            size = len(req.prompt.encode("utf-8", "surrogatepass"))
            if size > ctx * per_token:
                return size // per_token, None
        ids = await runner.backend.prepare(req)
        return len(ids), ids

    async def count_tokens(self, inf: Inference) -> int:
        """The tokens of the prompt ``inf`` renders to, template and tool definitions
        included, on the model's own tokenizer (Anthropic's /v1/messages/count_tokens)."""
        if self.upstreams is not None and self.upstreams.find(inf.model) is not None:
            raise BadRequest(f"{inf.model} is served by an upstream: kiln cannot count its tokens")
        if inf.trace is not None:
            inf.trace["model"] = inf.model
        p = await self.prepare(inf)
        async with self.scheduler.use(p.manifest, num_ctx=p.num_ctx, keep_alive=inf.keep_alive) as lease:
            return len(await lease.runner.backend.tokenize(p.request.prompt))

    async def embed(self, model: str, texts: Sequence[str | list[int]], *, keep_alive: float | None = None,
                    options: dict[str, Any] | None = None) -> Embedded:
        """Raw (not normalised) vectors, one per text or list of token ids."""
        t0 = time.monotonic_ns()
        if self.upstreams is not None and self.upstreams.find(model) is not None:
            from server import remote

            return await remote.embed(self, model, texts)
        m = self.store.get(model)
        resolve(m.parameters, options or {})
        async with self.scheduler.use(m, keep_alive=keep_alive) as lease:
            if texts and not lease.runner.backend.capabilities.embeddings:
                hint = (f": recompile it with kiln compile SOURCE --name {m.name} --embeddings (its hidden states)"
                        if m.backend == "openvino" else "")
                raise BadRequest(f"the {m.backend} backend does not compute embeddings with {m.name}{hint}")
            for t in texts:
                if not isinstance(t, str):
                    check_ids(t, lease.runner.info.n_vocab, "input")
            result = await lease.runner.backend.embed(list(texts)) if texts else None
        return Embedded(result.vectors if result else [], result.prompt_tokens if result else 0,
                        time.monotonic_ns() - t0, lease.load_ns)


# The loop guard looks at the pieces in runs of this many, not after each token: its
# code run cold between two tokens cost the gateway 0.05 ms of CPU per token (bench.gateway),
# taken from the decode threads; warm, a run of 8 costs about what one piece did. A loop
# it catches is therefore cut up to 7 tokens later; the generation's end is always checked.
GUARD_EVERY = 8


class _Run:
    """One generation's bookkeeping between the engine and the dialect: the loop guard,
    thinking and tool calls split out of the text, timings, metrics and the log."""

    def __init__(self, service: Service, p: Prepared, trace: dict[str, Any], t0: int, n_prompt: int) -> None:
        self.s, self.p, self.trace, self.t0 = service, p, trace, t0
        self.name = p.manifest.name
        self.usage = Usage(prompt_tokens=n_prompt)
        self.finish_reason = FinishReason.STOP
        self.detail: str | None = None
        self.stop_sequence: str | None = None
        config = p.policy.guard_config()
        if p.request.constrained:
            config = dataclasses.replace(config, max_ngram_repeats=0, max_line_repeats=0)  # see server/guard.py
        self.guard = LoopGuard(config)
        self.think = ThinkStream(p.request.prompt) if p.inference.think else None
        self.t_gen = time.monotonic_ns()
        self.gaps: list[float] = []  # inter-token latencies, observed in batches (see _timing)
        self.unguarded: list[str] = []  # pieces the loop guard has not seen yet (see GUARD_EVERY)
        self.first = self.last = self.n_out = 0
        self.text: list[str] = []
        self.output: list[str] = []  # the raw text, kept only for Inference.return_context
        self.keep_output = p.inference.return_context
        self.thinking: list[str] = []
        self.logprobs: list[dict[str, Any]] | None = [] if p.request.sampling.logprobs is not None else None
        self.done = False

    def _shape(self, text: str) -> tuple[str, str]:
        """(thinking, content) of raw output text."""
        thinking, content = self.think.feed(text) if self.think else ("", text)
        if self.p.tool_stream is not None:
            content = self.p.tool_stream.feed(content)
        return thinking, content

    def take(self, chunk: Chunk) -> Chunk | None:
        self.n_out += chunk.n_tokens
        if chunk.logprobs and self.logprobs is not None:
            self.logprobs += chunk.logprobs
        if chunk.text:
            self._timing()
            if self.s.settings.log_content:
                self.text.append(chunk.text)
            if self.keep_output:
                self.output.append(chunk.text)
            self.unguarded.append(chunk.text)
        if self.unguarded and (len(self.unguarded) >= GUARD_EVERY or chunk.finish_reason is not None):
            self._guard()
        if chunk.finish_reason is not None and not self.done:
            self.usage = chunk.usage or self.usage
            self.finish_reason, self.detail = chunk.finish_reason, chunk.detail
            self.stop_sequence = chunk.stop_sequence
            self.done = True
        if self.think is None and self.p.tool_stream is None and not self.done:
            return chunk  # plain text, passed on as it came
        thinking, content = self._shape(chunk.text)
        self.thinking.append(thinking)
        if thinking or content or not self.done:
            return Chunk(text=content, thinking=thinking, n_tokens=chunk.n_tokens, logprobs=chunk.logprobs)
        return None

    def _guard(self) -> None:
        """Runs the loop guard over the pieces since its last run."""
        pieces, self.unguarded = self.unguarded, []
        for piece in pieces:
            if self.guard.feed(piece):
                now = time.monotonic_ns()
                self.finish_reason, self.detail = FinishReason.LOOP, f"loop guard: {self.guard.reason}"
                self.usage.completion_tokens = self.n_out
                self.usage.prompt_ns, self.usage.eval_ns = self.first - self.t_gen, now - self.first
                log.warning("%s: stopped by the loop guard: %s", self.name, self.guard.reason)
                self.done = True
                return

    def _timing(self) -> None:
        now = time.monotonic_ns()
        if self.last:
            # Kept and observed together every 64 tokens and at the end: one pass over the
            # histogram's code while it is warm, not a cold one between every two tokens.
            self.gaps.append((now - self.last) / 1e9)
            if len(self.gaps) >= 64:
                self._observe_gaps()
        else:
            self.first = now
            self.trace["ttft_ms"] = round((now - self.t0) / 1e6, 1)
            self.s.metrics.ttft.labels(self.name).observe((now - self.t0) / 1e9)
        self.last = now

    def _observe_gaps(self) -> None:
        if self.gaps:
            itl = self.s.metrics.itl.labels(self.name)
            for gap in self.gaps:
                itl.observe(gap)
            self.gaps.clear()

    def failed(self, e: BaseException) -> None:
        self._observe_gaps()
        self.trace["error"] = type(e).__name__ if isinstance(e, Exception) else "cancelled"
        # A cancelled or failed request's access-log line still says what it cost.
        self.trace.update(prompt_tokens=self.usage.prompt_tokens, completion_tokens=self.n_out,
                          done_reason="error" if isinstance(e, Exception) else "cancelled")
        if isinstance(e, Exception):
            self.s.metrics.stream_errors.labels(self.name).inc()

    def finish(self, load_ns: int) -> tuple[Chunk | None, Result]:
        self._observe_gaps()
        thinking, content = self.think.flush() if self.think else ("", "")
        self.thinking.append(thinking)
        calls: list[ToolCall] = []
        if self.p.tool_stream is not None:
            content = self.p.tool_stream.feed(content)
            held, calls = self.p.tool_stream.finish()
            content += held
        u = self.usage
        self.trace.update(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                          cached_tokens=u.cached_tokens, done_reason=self.finish_reason.value)
        self.s.metrics.on_result(self.name, u, self.finish_reason)
        if self.s.settings.log_content:
            log.info("output %s: %r", self.trace.get("request_id", ""), "".join(self.text))
        if self.finish_reason == FinishReason.ERROR:
            self.s.metrics.stream_errors.labels(self.name).inc()
            raise BackendError(self.detail or "generation failed")
        rest = Chunk(text=content, thinking=thinking) if content or thinking else None
        return rest, Result(self.finish_reason, u, time.monotonic_ns() - self.t0, load_ns, self.detail, calls,
                            "".join(self.thinking), stop_sequence=self.stop_sequence, logprobs=self.logprobs)


def npu_recompile_command(runner: Runner, n_tokens: int) -> str:
    """The ``kiln compile`` that gives an NPU model room for a prompt of ``n_tokens``
    (rounded as OpenVINO's NPU wrapper rounds it), or "" when
    the model's trained context cannot hold it."""
    m, info = runner.manifest, runner.info
    need = npu_prompt_size(n_tokens, m.extra.get("prefill_chunk_size"))
    response = int(info.details.get("min_response_len") or m.extra.get("min_response_len") or 0)
    if m.context_length and need + response > m.context_length:
        return ""
    source = m.extra.get("source") or m.source.split(":", 1)[-1] or "SOURCE"
    devices = f" --npuw-devices {m.extra['npuw_devices']}" if m.extra.get("npuw_devices") else ""
    return f"kiln compile {source} --name {m.name} --profile npu --max-prompt-len {need}{devices}"


def capabilities(m: Manifest) -> list[str]:
    caps = list(m.capabilities or ["completion"])
    for feature in ("thinking", "insert"):
        if feature not in caps and templates.supports(m.chat_template, feature):
            caps.append(feature)
    if "insert" not in caps and "completion" in caps and fim.fim_ids(m) is not None and m.format == "gguf":
        caps.append("insert")
    # Every chat model takes tools: through its template, or kiln's tool instructions.
    if "completion" in caps and m.chat_template and "tools" not in caps:
        caps.append("tools")
    return caps
