"""A deterministic engine for fast tests of the HTTP layer and the worker machinery.

It never stands in for a real engine in a feature's test: it only makes the framing,
error paths and scheduling of the gateway testable in milliseconds.

Its reply is, in order of precedence: the next entry of ``FakeEngine.script``
(``FakeEngine.enqueue("text")``), ``spec.extra["reply"]``, or an echo of the
prompt's last line. A reply is emitted one word (token) at a time.
``spec.extra``: ``delay`` seconds per token, ``fail_at`` (raise after N tokens),
``crash_at`` (kill the process after N tokens: tests the gateway's restart), after
writing ``crash_message`` to stderr (as a native library's assert would),
``embed_error`` (``embed`` fails as an engine does, with that text), and ``info``
(``EngineInfo`` fields: the limits a real engine reports, e.g. an NPU's ``max_prompt_len``).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import re
import sys
import threading
import time
from typing import Any, ClassVar

from backends.base import (
    BackendError,
    Capabilities,
    Chunk,
    Emit,
    Embeddings,
    Engine,
    EngineInfo,
    FinishReason,
    GenerationRequest,
    ModelSpec,
    Usage,
)
from backends.text import StopMatcher


class FakeEngine(Engine):
    name = "fake"
    capabilities = Capabilities(embeddings=True, grammar=True)
    script: ClassVar[collections.deque[str]] = collections.deque()
    requests: ClassVar[list[GenerationRequest]] = []
    words: ClassVar[dict[int, str]] = {}  # id -> word, for detokenize

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.cancelled: set[str] = set()
        self.active = 0
        self.lock = threading.Lock()

    @classmethod
    def enqueue(cls, *replies: str) -> None:
        cls.script.extend(replies)

    def submit(self, req: GenerationRequest, emit: Emit) -> None:
        FakeEngine.requests.append(req)
        try:
            reply = FakeEngine.script.popleft()
        except IndexError:
            reply = self.spec.extra.get("reply") or _echo(req.prompt)
        threading.Thread(target=self._run, args=(req, reply, emit), daemon=True).start()

    def _run(self, req: GenerationRequest, reply: str, emit: Emit) -> None:
        extra = self.spec.extra
        pieces = re.findall(r"\s*\S+", reply) or [""]
        matcher = StopMatcher(req.sampling.stop)
        limit = req.sampling.max_tokens
        n_prompt = len(req.tokens if req.tokens is not None else self.tokenize(req.prompt))
        t0 = time.monotonic_ns()
        with self.lock:
            self.active += 1
        finish, n = FinishReason.STOP, 0
        try:
            for piece in pieces:
                if req.id in self.cancelled:
                    finish = FinishReason.CANCELLED
                    break
                if limit is not None and n >= limit:
                    finish = FinishReason.LENGTH
                    break
                if extra.get("fail_at") is not None and n >= extra["fail_at"]:
                    emit(Chunk(finish_reason=FinishReason.ERROR, detail="fake engine failure",
                               usage=Usage(n_prompt, n)))
                    return
                if extra.get("crash_at") is not None and n >= extra["crash_at"]:
                    if extra.get("crash_message"):
                        print(extra["crash_message"], file=sys.stderr, flush=True)
                    os._exit(3)
                if extra.get("delay"):
                    time.sleep(extra["delay"])
                n += 1
                text = matcher.feed(piece)
                if text:
                    emit(Chunk(text=text, n_tokens=1))
                if matcher.stopped:
                    break
            else:
                if tail := matcher.flush():
                    emit(Chunk(text=tail))
            elapsed = time.monotonic_ns() - t0
            emit(Chunk(finish_reason=finish, stop_sequence=matcher.matched,
                       usage=Usage(prompt_tokens=n_prompt, completion_tokens=n,
                                   prompt_ns=max(1, elapsed // 10), eval_ns=max(1, elapsed))))
        finally:
            with self.lock:
                self.active -= 1
            self.cancelled.discard(req.id)

    def cancel(self, req_id: str) -> None:
        self.cancelled.add(req_id)

    def tokenize(self, text: str) -> list[int]:
        ids = [int(hashlib.md5(w.encode()).hexdigest()[:6], 16) for w in text.split()]
        FakeEngine.words.update(zip(ids, text.split()))
        return ids

    def detokenize(self, ids: list[int]) -> str:
        """The words of ids this engine made (its ids are hashes: only seen ones come back)."""
        return " ".join(FakeEngine.words.get(i, "?") for i in ids)

    def embed(self, texts: list[str | list[int]]) -> Embeddings:
        if self.spec.extra.get("embed_error"):
            raise BackendError(self.spec.extra["embed_error"])
        vecs = []
        for t in texts:
            d = hashlib.sha256(t.encode() if isinstance(t, str) else str(t).encode()).digest()
            vecs.append([(b - 127.5) / 127.5 for b in d[:16]])
        return Embeddings(vecs, sum(len(self.tokenize(t)) if isinstance(t, str) else len(t) for t in texts))

    def info(self) -> EngineInfo:
        # extra["info"]: what a real engine would report (an NPU's compiled limits, say)
        fields = {"device": "fake", "num_ctx": self.spec.num_ctx, "num_parallel": self.spec.num_parallel,
                  "capabilities": self.capabilities, **self.spec.extra.get("info", {})}
        details = {k: fields.pop(k) for k in list(fields) if k not in _INFO_FIELDS}
        return EngineInfo(**fields, details=details)

    def stats(self) -> dict[str, Any]:
        return {"active": self.active}

    def close(self) -> None:
        pass


_INFO_FIELDS = {f.name for f in dataclasses.fields(EngineInfo)}


def _echo(prompt: str) -> str:
    lines = [ln for ln in prompt.strip().splitlines() if ln.strip()]
    return f"You said: {lines[-1].strip()}" if lines else "Hello."
