"""Defaults, and one request's state between its runner and its stream."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends.base import Chunk, Emit, FinishReason, GenerationRequest, Usage
from backends.text import StopMatcher

DEFAULT_DEVICES = ["NPU", "GPU", "CPU"]
DEFAULT_MAX_PROMPT_LEN = 1024
DEFAULT_MIN_RESPONSE_LEN = 128


def npu_prompt_size(n: int, chunk: int | None) -> int:
    """The MAX_PROMPT_LEN OpenVINO's NPU wrapper really compiles for ``n``: rounded up to 64,
    then, when that is more than one prefill chunk, up to whole chunks (a prompt limit of
    one chunk or less is prefilled statically)."""
    n = -(-n // 64) * 64
    if chunk and chunk < n:
        n = -(-n // chunk) * chunk
    return n


def npu_prefill_properties(chunk: int | None) -> dict[str, object]:
    """The NPU pipeline's prefill: in chunks of ``chunk`` tokens (a power of two;
    OpenVINO's NPU wrapper then rounds MAX_PROMPT_LEN up to whole chunks), or with 0 the
    whole prompt in one static graph of MAX_PROMPT_LEN. None: OpenVINO's default."""
    if chunk is None:
        return {}
    if chunk == 0:
        return {"PREFILL_HINT": "STATIC"}
    return {"PREFILL_HINT": "DYNAMIC", "NPUW_LLM_PREFILL_CHUNK_SIZE": chunk}


def npuw_device_properties(devices: str | None) -> dict[str, object]:
    """Where OpenVINO's NPU wrapper runs its partitions (``NPUW_DEVICES``) and, when that is
    the CPU alone, the tensors between partitions kept in f32 (``NPUW_F16IC=NO``; on in
    OpenVINO 2026.4's LLM pipeline). Those tensors carry the residual stream, and Gemma 3's
    exceeds f16's 65,504 (270M: 102,328 at BOS in layer 14 on the CPU pipeline): in f16
    it overflows to inf, RMSNorm turns that into NaN, and every greedy token is 0,
    ``<pad>``. The CPU computes in f32 anyway, so nothing is lost. On a real NPU,
    OpenVINO's default is kept (not measured here: no NPU). None: OpenVINO's defaults."""
    if not devices:
        return {}
    props: dict[str, object] = {"NPUW_DEVICES": devices}
    if devices.strip().upper() == "CPU":
        props["NPUW_F16IC"] = "NO"
    return props


def has_sliding_window(ir_dir: Path) -> bool:
    """Whether the IR's model has sliding-window attention layers (its ``config.json``
    names a ``sliding_window``, as Gemma 2 and 3 and Phi-3 do)."""
    try:
        config = json.loads((ir_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    if not text.get("sliding_window") or text.get("use_sliding_window") is False:  # Qwen2 names one, unused
        return False
    return "sliding_attention" in (text.get("layer_types") or ["sliding_attention"])


def npu_attention_properties(ir_dir: Path) -> dict[str, object]:
    """The NPU pipeline's prefill attention: NPUW's plain static attention over the whole
    KV cache (``NPUW_LLM_PREFILL_ATTENTION_HINT=STATIC``) for a model with sliding-window
    layers. Measured on Gemma 3 270M (window 512) through NPUW on the CPU, OpenVINO 2026.4.1,
    chunked prefill: with the pipeline's default prefill attention, a 1,000-token prompt
    that fits one chunk already answered ``<eos>`` first and a 2,000-token one ``* * *``,
    at MAX_PROMPT_LEN 4096 and 16384 alike (static prefill, MAX_PROMPT_LEN 1024: prose);
    with STATIC it answers in prose at every length to 13,000 tokens. The generate side's
    attention hint changed nothing. Other models keep OpenVINO's default."""
    return {"NPUW_LLM_PREFILL_ATTENTION_HINT": "STATIC"} if has_sliding_window(ir_dir) else {}


@dataclass
class Needs:
    """What a runner needs of its engine, and nothing more (runners.py does not import
    the engine): the model's name, OpenVINO GenAI, the tokenizer, a request's
    ``GenerationConfig``, and the NPU's "prompt too long" message."""

    name: str
    ov_genai: Any
    tokenize: Callable[[str], list[int]]
    config: Callable[[GenerationRequest, int], Any]
    too_long: Callable[[int], str]

    def prompt_ids(self, req: GenerationRequest) -> list[int]:
        """The ids the gateway sent (``Backend.prepare``), else the prompt's own."""
        return list(req.tokens) if req.tokens is not None else self.tokenize(req.prompt)


def short_error(e: BaseException, limit: int = 400) -> str:
    """OpenVINO errors carry a chain of "Exception from <file>:<line>:" lines; keep
    the lines that say what went wrong."""
    lines = [ln.strip() for ln in str(e).splitlines()]
    useful = [ln for ln in lines if ln and not ln.startswith("Exception from ")]
    text = " ".join(useful) or str(e).strip() or type(e).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _Detokenizer:
    """Incremental decoding, as vLLM does it: decode a window of a few tokens before
    the new ones and emit only what they add. Text ending in U+FFFD (half a UTF-8
    character) is held back until the next token completes it."""

    def __init__(self, decode: Any) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = 0  # start of the window
        self.read = 0  # tokens already turned into emitted text

    def feed(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        before = self.decode(self.ids[self.prefix : self.read])
        after = self.decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        before = self.decode(self.ids[self.prefix : self.read])
        after = self.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :].rstrip("\ufffd")


class _Request:
    """One generation in flight: decoding, stop strings, counts and the last chunk."""

    def __init__(self, req: GenerationRequest, emit: Emit, decode: Any,
                 piece: Callable[[int], str | None] | None = None) -> None:
        self.req, self.emit = req, emit
        self.detok = _Detokenizer(decode)
        self.piece = piece  # a token's own text (for its log-probability entry)
        # With SamplingParams.logprobs: the entries of tokens whose text is not sent yet
        self.logprobs: list[dict[str, Any]] | None = [] if req.sampling.logprobs is not None else None
        self.stop = StopMatcher(req.sampling.stop)
        self.prompt_tokens = 0
        self.generated = 0
        self.pending = 0  # tokens read but not yet reported in a chunk
        self.max_new = 0
        self.capped_by: str | None = None  # why max_new is below what was asked
        self.cancelled = False
        self.done = False
        self.t0 = time.monotonic_ns()
        self.t_first: int | None = None

    def feed(self, ids: list[int], logprobs: list[float] | None = None) -> bool:
        """Takes generated ids (and, with SamplingParams.logprobs, the log-probability
        OpenVINO gave each); emits the text they complete. True on a stop string."""
        if not ids or self.done:
            return self.stop.stopped
        if self.t_first is None:
            self.t_first = time.monotonic_ns()
        self.generated += len(ids)
        self.pending += len(ids)
        if self.logprobs is not None:
            if logprobs is None or len(logprobs) != len(ids):
                self.fail("OpenVINO returned no log-probability for a generated token")
                return True
            for tok, lp in zip(ids, logprobs):
                piece = self.piece(tok) if self.piece is not None else ""
                if piece is None:
                    continue
                self.logprobs.append({"id": tok, "token": piece, "bytes": list(piece.encode("utf-8")),
                                      "logprob": float(lp), "top": []})
        text = self.stop.feed(self.detok.feed(ids))
        if text:
            self.emit(Chunk(text=text, n_tokens=self.pending, logprobs=self._take_logprobs()))
            self.pending = 0
        return self.stop.stopped

    def _take_logprobs(self) -> list[dict[str, Any]] | None:
        if self.logprobs is None:
            return None
        out, self.logprobs = self.logprobs, []
        return out

    def finish(self, reason: FinishReason, detail: str | None = None) -> None:
        if self.done:
            return
        self.done = True
        tail = ""
        if reason in (FinishReason.STOP, FinishReason.LENGTH) and not self.stop.stopped:
            tail = self.stop.feed(self.detok.flush())
            tail += "" if self.stop.stopped else self.stop.flush()
        now = time.monotonic_ns()
        first = self.t_first or now
        usage = Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.generated,
                      prompt_ns=max(1, first - self.t0), eval_ns=max(1, now - first))
        # Entries of text held back and dropped (a stop string's tokens) go with it, as llama.cpp's do.
        logprobs = self._take_logprobs() if not self.stop.stopped else ([] if self.logprobs is not None else None)
        self.emit(Chunk(text=tail, n_tokens=self.pending, finish_reason=reason, usage=usage,
                        detail=detail, stop_sequence=self.stop.matched, logprobs=logprobs))

    def fail(self, detail: str) -> None:
        self.finish(FinishReason.ERROR, detail)
