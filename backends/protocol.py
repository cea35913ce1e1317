"""The messages between the gateway and a model's worker process: typed, versioned, one
module both sides import (as vLLM's ``EngineCoreRequest`` is).

Each message is one JSON line, tagged by ``op``; its payload is the internal types of
``backends.base`` (``ModelSpec``, ``GenerationRequest``, ``Chunk``, ``EngineInfo``...), so
a field added there travels without a second definition here, and a misspelt key fails
decoding on arrival instead of reading as missing (``kv_cache_bytes`` sent, ``kv_bytes``
read, once hid OpenVINO's KV cache from the memory budget).

Gateway -> worker: ``Load`` first, then ``Generate``/``Cancel`` and the calls
(``Prepare``, ``Detokenize``, ``Embed``, ``Stats``), each with its own ``id``.
Worker -> gateway: ``Ready`` or ``Fatal`` for the load; ``ChunkOut`` per piece of a
generation; for a call its result (``Tokens``, ``Text``, ``Vectors``, ``StatsOut``) or an
``Error`` whose ``kind`` says whose fault it was:

* ``invalid``: the request cannot be served as asked (a 400);
* ``engine``: the engine failed (a 500 with the engine's own text);
* ``unavailable``: the engine is not there to ask (unloading; a 503).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from backends.base import (
    BackendError,
    Chunk,
    Embeddings,
    EngineInfo,
    EngineUnavailable,
    GenerationRequest,
    InvalidRequest,
    ModelSpec,
)

VERSION = 1  # bumped when a message changes shape; a worker of another version refuses to load

ErrorKind = Literal["invalid", "engine", "unavailable"]


class Message(msgspec.Struct, tag_field="op", omit_defaults=True, kw_only=True):
    pass


# -- gateway -> worker ---------------------------------------------------------------

class Load(Message, tag="load"):
    spec: ModelSpec
    log_level: str = "WARNING"  # the lowest the worker logs at (KILN_WORKER_LOG)
    version: int = VERSION


class Generate(Message, tag="generate"):
    id: str
    req: GenerationRequest


class Cancel(Message, tag="cancel"):
    id: str


class Prepare(Message, tag="prepare"):
    """Tokenize a request's prompt and check what the engine checks before generating
    (that its grammar compiles): one round trip."""

    id: str
    req: GenerationRequest


class Tokenize(Message, tag="tokenize"):
    id: str
    text: str


class Detokenize(Message, tag="detokenize"):
    id: str
    ids: list[int]


class Embed(Message, tag="embed"):
    id: str
    texts: list[str | list[int]]  # each a text or token ids


class Stats(Message, tag="stats"):
    id: str


ToWorker = Load | Generate | Cancel | Prepare | Tokenize | Detokenize | Embed | Stats
Call = Prepare | Tokenize | Detokenize | Embed | Stats  # answered by one ``Reply``


# -- worker -> gateway ---------------------------------------------------------------

class Ready(Message, tag="ready"):
    info: EngineInfo
    version: int = VERSION


class Fatal(Message, tag="fatal"):
    error: str


class ChunkOut(Message, tag="chunk"):
    id: str
    chunk: Chunk


class Tokens(Message, tag="tokens"):
    id: str
    ids: list[int]


class Text(Message, tag="text"):
    id: str
    text: str


class Vectors(Message, tag="embeddings"):
    id: str
    embeddings: Embeddings


class StatsOut(Message, tag="stats"):
    id: str
    stats: dict[str, Any]


class Error(Message, tag="error"):
    id: str
    kind: ErrorKind
    message: str


FromWorker = Ready | Fatal | ChunkOut | Tokens | Text | Vectors | StatsOut | Error
Reply = Tokens | Text | Vectors | StatsOut | Error


def kind_of(exc: BaseException) -> ErrorKind:
    if isinstance(exc, InvalidRequest):
        return "invalid"
    if isinstance(exc, EngineUnavailable):
        return "unavailable"
    return "engine"


def error_of(rid: str, exc: BaseException) -> Error:
    """The reply for a call that raised: the engine's own message (an exception that is
    not one of kiln's is named, since its text alone may not say what failed)."""
    text = str(exc)
    if not isinstance(exc, InvalidRequest | BackendError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return Error(id=rid, kind=kind_of(exc), message=text)


def exception(kind: ErrorKind, message: str) -> Exception:
    """The exception the gateway raises for an ``Error`` of this kind."""
    if kind == "invalid":
        return InvalidRequest(message)
    if kind == "unavailable":
        return EngineUnavailable(message)
    return BackendError(message)


encode = msgspec.json.Encoder().encode
to_worker = msgspec.json.Decoder(ToWorker).decode
from_worker = msgspec.json.Decoder(FromWorker).decode
