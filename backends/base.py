"""The one protocol every engine speaks, and the internal request/response types.

Two layers, so that a blocking engine never runs on the gateway's event loop:

* ``Engine``: synchronous, owns the native library, lives in a worker process
  (``backends.worker``) or, for tests and benchmarks, in a thread of the caller
  (``InProcessBackend``). It gets a ``GenerationRequest`` and calls ``emit`` with
  ``Chunk``s from its own thread.
* ``Backend``: asynchronous, what the gateway's scheduler holds. ``stream()`` is an
  async iterator of ``Chunk``s; closing it cancels the generation at once.

Nothing here imports the gateway (``server``): imports point ``server -> backends``.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import enum
import threading
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar


class FinishReason(str, enum.Enum):
    """Why a generation ended. Each wire dialect maps it to its own string."""

    STOP = "stop"  # end-of-generation token or a stop string
    LENGTH = "length"  # max tokens reached or the context is full
    CANCELLED = "cancelled"  # the client went away
    LOOP = "loop"  # the loop guard saw degenerate repetition
    ERROR = "error"


@dataclass(frozen=True)
class Capabilities:
    """What an engine can do, declared in its ``EngineInfo``; the gateway refuses a
    request that needs more (a 400) before anything is sent to the engine."""

    embeddings: bool = False
    grammar: bool = False  # JSON-schema constrained decoding
    logprobs: bool = False  # SamplingParams.logprobs: Chunk.logprobs of the sampled tokens
    max_top_logprobs: int = 20  # the most alternatives it can give per token (SamplingParams.logprobs)
    logit_bias: bool = False  # SamplingParams.logit_bias


class BackendError(RuntimeError):
    """The engine failed (crashed, refused to load, ran out of memory): a 500 whose
    message is the engine's own text."""


class EngineUnavailable(BackendError):
    """The engine is not there to ask (unloaded, unloading, its worker not running): a 503."""


class InvalidRequest(ValueError):
    """The request cannot be served as asked; the message is shown to the user (a 400)."""


@dataclass
class SamplingParams:
    """Generation options after defaults and policy were applied.

    ``max_tokens=None`` means "until end of generation or the context is full".
    ``temperature <= 0`` means greedy decoding.
    """

    max_tokens: int | None = None
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.0
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    # None: no log-probabilities; k (0..20): each sampled token's, and the k most likely
    # alternatives', over the whole vocabulary after logit_bias and the penalties (before
    # the grammar, top_k/top_p/min_p truncation and temperature). See Chunk.logprobs.
    logprobs: int | None = None
    logit_bias: list[tuple[int, float]] = field(default_factory=list)  # (token id, -100..100); -100 bans


@dataclass
class GenerationRequest:
    """What the gateway asks an engine for. One type for every wire dialect.

    ``prompt`` is the final text (chat template already applied). ``tokens`` are its
    ids, when the gateway has them (``Backend.prepare``): the engine then generates from
    them and does not tokenize the prompt again.
    """

    prompt: str
    sampling: SamplingParams = field(default_factory=SamplingParams)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    json_schema: dict[str, Any] | None = None  # output held to this schema (a grammar made from it)
    tokens: list[int] | None = None
    # Requests with the same group and prompt (the n choices of one client request): an
    # engine may evaluate the prompt once and copy its KV cache to the others.
    prefix_group: str | None = None

    @property
    def constrained(self) -> bool:
        """Output held to a grammar (made from ``json_schema``)."""
        return self.json_schema is not None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    prompt_ns: int = 0  # time spent evaluating the prompt
    eval_ns: int = 0  # time spent generating


@dataclass
class Chunk:
    """A piece of generated text. The last chunk of a request has ``finish_reason``
    and ``usage`` set (like Ollama's ``llm.CompletionResponse``)."""

    text: str = ""
    n_tokens: int = 0
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    detail: str | None = None  # why it finished, when that needs saying (loop guard, KV full)
    thinking: str = ""  # reasoning text; engines leave it empty, the gateway splits it out
    stop_sequence: str | None = None  # on the last chunk: the stop string that ended the generation
    # With SamplingParams.logprobs: one entry per sampled token whose text is in this chunk
    # (or was held back and dropped): {"id", "token", "bytes", "logprob", "top": [{"id",
    # "token", "bytes", "logprob"}, ...]}.
    logprobs: list[dict[str, Any]] | None = None
    index: int = 0  # the gateway's: which of a request's n choices it belongs to (not sent by engines)


@dataclass
class Embeddings:
    vectors: list[list[float]]
    prompt_tokens: int


# KV cache element types (KILN_KV_CACHE_TYPE, Ollama's OLLAMA_KV_CACHE_TYPE) and the bytes
# one value takes: llama.cpp's f16, q8_0 (34 bytes a block of 32), q4_0 (18 bytes).
KV_CACHE_TYPES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


@dataclass
class ModelSpec:
    """Everything an engine needs to load one model.

    ``extra["kv_cache_type"]``: a ``KV_CACHE_TYPES`` key; unset, the engine's default
    (llama.cpp f16; OpenVINO its own, u8 on the CPU)."""

    name: str
    path: str  # a .gguf file or an OpenVINO IR directory
    backend: str = "llamacpp"
    num_ctx: int = 4096  # context per sequence
    num_parallel: int = 1  # sequences that can run at once
    num_batch: int = 512
    num_threads: int = 0  # 0 = the engine's default (llama.cpp: the physical cores)
    devices: list[str] = field(default_factory=list)  # OpenVINO device preference
    cache_dir: str | None = None
    embedding: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # backend-specific settings


@dataclass
class EngineInfo:
    """What a loaded engine declares: one schema for every engine. The scheduler sizes
    memory and context from it, the gateway checks requests against it, ``/api/ps`` and
    ``/api/show`` report it (``details`` holds what only one engine has: fallbacks,
    pipeline, system info)."""

    device: str
    num_ctx: int  # context per sequence
    num_parallel: int  # sequences at once
    capabilities: Capabilities = field(default_factory=Capabilities)
    model_bytes: int = 0  # weights in memory; 0: the model file's size
    kv_bytes: int = 0  # the KV cache allocated for every sequence
    max_token_bytes: int | None = None  # the longest token's text (a prompt's size bounds its count)
    max_prompt_len: int | None = None  # a static pipeline's longest prompt (the NPU)
    n_vocab: int | None = None  # the vocabulary's size (token ids are checked against it)
    details: dict[str, Any] = field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        """A flat dict for kiln's fields in /api/ps and /api/show."""
        d = dataclasses.asdict(self)
        details = d.pop("details")
        return {**details, **{k: v for k, v in d.items() if v is not None}}


Emit = Callable[[Chunk], None]


class Engine(abc.ABC):
    """A blocking engine. One instance per loaded model, in its own process.

    ``submit`` must return at once; the engine calls ``emit`` from its own thread,
    and its last call for a request carries ``finish_reason``. ``emit`` may raise
    nothing; an engine that fails a request emits ``FinishReason.ERROR`` with a
    ``detail``.
    """

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]  # declared again in info()

    @abc.abstractmethod
    def __init__(self, spec: ModelSpec) -> None: ...

    @abc.abstractmethod
    def submit(self, req: GenerationRequest, emit: Emit) -> None: ...

    @abc.abstractmethod
    def cancel(self, req_id: str) -> None: ...

    @abc.abstractmethod
    def tokenize(self, text: str) -> list[int]: ...

    def embed(self, texts: list[str | list[int]]) -> Embeddings:
        """One vector per input: a text, or token ids (the gateway checked them against
        ``EngineInfo.n_vocab``) embedded as they are."""
        raise InvalidRequest(f"the {self.name} backend does not compute embeddings")

    def detokenize(self, ids: list[int]) -> str:
        """The text of token ids, special tokens included (Ollama's Detokenize, for the
        ``context`` of /api/generate)."""
        raise InvalidRequest(f"the {self.name} backend cannot turn token ids back into text")

    def prepare(self, req: GenerationRequest) -> list[int]:
        """The prompt's token ids, after checking what the engine would refuse once
        generating (a schema it cannot turn into a grammar): the one call the gateway makes
        before the first token. Raises ``InvalidRequest`` for a 400. A request that came
        with ``tokens`` (a prompt of token ids) is not tokenized: they are its ids."""
        return list(req.tokens) if req.tokens is not None else self.tokenize(req.prompt)

    @abc.abstractmethod
    def info(self) -> EngineInfo:
        """The loaded engine's declared facts (see ``EngineInfo``)."""

    def stats(self) -> dict[str, Any]:
        """Live counters (active slots, cached tokens) for metrics."""
        return {}

    @abc.abstractmethod
    def close(self) -> None: ...


class Backend(abc.ABC):
    """What the gateway holds for a loaded model."""

    spec: ModelSpec
    info: EngineInfo | None = None  # set by load()

    @property
    def capabilities(self) -> Capabilities:
        return self.info.capabilities if self.info is not None else Capabilities()

    @abc.abstractmethod
    async def load(self) -> EngineInfo:
        """Load the model; returns (and keeps) ``Engine.info()``."""

    @abc.abstractmethod
    def stream(self, req: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        """Generate. Closing the generator early cancels the request in the engine."""

    @abc.abstractmethod
    async def tokenize(self, text: str) -> list[int]: ...

    @abc.abstractmethod
    async def embed(self, texts: list[str | list[int]]) -> Embeddings: ...

    async def detokenize(self, ids: list[int]) -> str:
        raise InvalidRequest("this backend cannot turn token ids back into text")

    async def prepare(self, req: GenerationRequest) -> list[int]:
        """``Engine.prepare``: the prompt's token ids, checked. A feature the engine's
        declared capabilities lack is refused here, before anything is sent to it."""
        if req.constrained and not self.capabilities.grammar:
            raise InvalidRequest(f"the {self.spec.backend} backend does not do grammar-constrained decoding")
        return await self._prepare(req)

    @abc.abstractmethod
    async def _prepare(self, req: GenerationRequest) -> list[int]: ...

    async def stats(self) -> dict[str, Any]:
        return {}

    @abc.abstractmethod
    async def unload(self) -> None: ...

    @property
    def alive(self) -> bool:
        return True


class InProcessBackend(Backend):
    """Runs an ``Engine`` in this process: its blocking calls go to threads and its
    ``emit`` callbacks are handed to the event loop. Used for the fake engine in API
    tests and for "the engine called directly" in benchmarks."""

    def __init__(self, engine_cls: type[Engine], spec: ModelSpec) -> None:
        self.engine_cls = engine_cls
        self.spec = spec
        self.engine: Engine | None = None

    async def load(self) -> EngineInfo:
        self.engine = await asyncio.to_thread(self.engine_cls, self.spec)
        self.info = self.engine.info()
        return self.info

    async def stream(self, req: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        assert self.engine is not None, "load() first"
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Chunk] = asyncio.Queue()
        done = threading.Event()

        def emit(chunk: Chunk) -> None:
            if not done.is_set():
                loop.call_soon_threadsafe(queue.put_nowait, chunk)

        self.engine.submit(req, emit)
        try:
            while True:
                chunk = await queue.get()
                yield chunk
                if chunk.finish_reason is not None:
                    return
        finally:
            done.set()
            if self.engine is not None:
                self.engine.cancel(req.id)

    async def tokenize(self, text: str) -> list[int]:
        assert self.engine is not None
        return await asyncio.to_thread(self.engine.tokenize, text)

    async def embed(self, texts: list[str | list[int]]) -> Embeddings:
        assert self.engine is not None
        return await asyncio.to_thread(self.engine.embed, texts)

    async def detokenize(self, ids: list[int]) -> str:
        assert self.engine is not None
        return await asyncio.to_thread(self.engine.detokenize, ids)

    async def _prepare(self, req: GenerationRequest) -> list[int]:
        assert self.engine is not None
        return await asyncio.to_thread(self.engine.prepare, req)

    async def stats(self) -> dict[str, Any]:
        return self.engine.stats() if self.engine else {}

    async def unload(self) -> None:
        if self.engine is not None:
            engine, self.engine = self.engine, None
            await asyncio.to_thread(engine.close)
