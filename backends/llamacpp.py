"""llama.cpp engine: continuous batching over llama-cpp-python's low-level ctypes API.

One engine thread owns one ``llama_context`` holding ``num_parallel`` sequences
(slots). Each step builds ONE ``llama_batch``: the pending token of every generating
sequence first, then prompt chunks of prefilling sequences until ``num_batch`` is
full (so a long prompt never stalls running streams for more than one chunk), calls
``llama_decode`` once and samples every sequence that got logits with its own
sampler chain. The high-level ``Llama`` class is not used: it drives one sequence.

llama-cpp-python is pinned (0.3.36): its ctypes signatures change between 0.3.x
releases (``llama_sampler_init_penalties`` took 9, then 4, now 5 arguments).
"""

from __future__ import annotations

import collections
import ctypes
import logging
import math
import os
import random
import re
import threading
import time
from typing import Any

import llama_cpp as L
import numpy as np

from backends.base import (KV_CACHE_TYPES, BackendError, Capabilities, Chunk, Emit, Embeddings, Engine, EngineInfo,
                           FinishReason, GenerationRequest, InvalidRequest, ModelSpec, SamplingParams,
                           Usage)
from backends.cpus import CpuShare, default_threads
from backends.gguf import read_gguf
from backends.grammar import for_schema
from backends.text import StopMatcher, Utf8Stream

log = logging.getLogger("kiln.llamacpp")

# ggml_log_level (ggml.h: 1 DEBUG, 2 INFO, 3 WARN, 4 ERROR, 5 CONT; the table in
# llama_cpp/_logger.py is stale) -> logging. llama.cpp logs every metadata key at
# INFO while loading and its warnings are advice ("n_ctx_seq < n_ctx_train"), so
# both are kept quiet; errors (a bad grammar, a failed load) are reported by this
# module anyway, so they are only warnings here.
_LOG_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.INFO, 4: logging.WARNING}
_log_buf = threading.local()  # llama.cpp sends lines in pieces; level 5 = "continued"
# llama.cpp's last error lines, for a BackendError's text: the reason, then "failed to load model"
_last_error: collections.deque[str] = collections.deque(maxlen=2)


@L.llama_log_callback
def _log_callback(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    try:  # an exception escaping a ctypes callback would be printed, never raised
        if level != 5:
            _log_buf.level = level
        buf = getattr(_log_buf, "text", "") + text.decode("utf-8", "replace")
        *lines, _log_buf.text = buf.split("\n")
        lvl = _LOG_LEVELS.get(getattr(_log_buf, "level", 1), logging.DEBUG)
        for line in lines:
            if line.strip():
                log.log(lvl, "%s", line)
                if getattr(_log_buf, "level", 1) == 4:
                    _last_error.append(line.strip())
    except Exception:
        pass


def _grammar(req: GenerationRequest) -> str | None:
    """The request's GBNF, converted from its JSON schema (format, response_format, a
    forced tool call) by kiln's own converter, as on every engine."""
    return for_schema(req.json_schema) if req.json_schema is not None else None


def _lcp(a: list[int], b: list[int]) -> int:
    n, i = min(len(a), len(b)), 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class _Entry:
    """A submitted request; ``tokens`` is filled in by the engine thread."""

    def __init__(self, req: GenerationRequest, emit: Emit) -> None:
        self.req, self.emit = req, emit
        self.tokens: list[int] | None = None
        self.cancelled = False  # set by cancel(); a long tokenization stops at the next piece


# Tokenization goes in pieces of about this many characters. llama.cpp splits the text
# at special tokens in a forward list it walks from the start for every split, so text
# dense with them took quadratic time (1.3 MB: 117 s, holding the engine thread); in
# pieces the work is linear, it stops once past the context, and a cancel stops it.
_PIECE_CHARS = 16 << 10
_GGML_KV_TYPES = {"f16": L.GGML_TYPE_F16, "q8_0": L.GGML_TYPE_Q8_0, "q4_0": L.GGML_TYPE_Q4_0}
# Embedding batches: at most this many texts, and tokens, in one llama_decode (a text
# longer than EMBED_TOKENS gets a context of its own length).
EMBED_SEQS = 64
EMBED_TOKENS = 512
_SPECIAL = L.LLAMA_TOKEN_ATTR_CONTROL | L.LLAMA_TOKEN_ATTR_USER_DEFINED | L.LLAMA_TOKEN_ATTR_UNKNOWN


class _Cancelled(Exception):
    pass


class _Splitter:
    """Where text may be cut so that tokenizing the pieces gives the tokens of the whole.

    llama.cpp first cuts the text at the special tokens it contains, then tokenizes the
    plain text between them on its own. So a cut just before a special token changes
    nothing, provided no special token's text spans the cut and there is no whitespace
    either side of it (a token with lstrip/rstrip eats it). With SPM vocabularies the
    piece after a cut starts with a special token, so the space prefix is the same.
    """

    def __init__(self, specials: list[str]) -> None:
        self.by_len: dict[int, set[str]] = {}
        for t in specials:
            if t and not t[0].isspace() and not t[-1].isspace():
                self.by_len.setdefault(len(t), set()).add(t)
        self.all_by_len: dict[int, set[str]] = {}
        for t in specials:
            if t:
                self.all_by_len.setdefault(len(t), set()).add(t)
        cuts = sorted((t for group in self.by_len.values() for t in group), key=len, reverse=True)
        # Candidates: where a special token starts. An alternation of a few hundred
        # literals runs in C; beyond (Gemma has 6,000 unused tokens) the first characters.
        self.first: re.Pattern[str] | None
        if len(cuts) > 512:
            self.first = re.compile("[" + "".join(re.escape(c) for c in sorted({t[0] for t in cuts})) + "]")
        else:
            self.first = re.compile("|".join(re.escape(t) for t in cuts)) if cuts else None

    def _safe(self, text: str, p: int) -> bool:
        if text[p - 1].isspace() or not any(text[p:p + n] in group for n, group in self.by_len.items()):
            return False
        for n, group in self.all_by_len.items():  # nothing may straddle the cut
            for start in range(max(0, p - n + 1), p):
                if text[start:start + n] in group:
                    return False
        return True

    def pieces(self, text: str) -> list[str]:
        if self.first is None or len(text) <= 2 * _PIECE_CHARS:
            return [text]
        out, start, pos = [], 0, _PIECE_CHARS
        while pos < len(text) - _PIECE_CHARS:
            m = self.first.search(text, pos)
            if m is None:
                break
            p = m.start()
            if self._safe(text, p):
                out.append(text[start:p])
                start, pos = p, p + _PIECE_CHARS
            else:
                pos = p + 1
        out.append(text[start:])
        return out


class _Candidates:
    """The engine's one reusable ``llama_token_data_array`` over the whole vocabulary,
    filled from a logits row with numpy (a Python loop over 49k tokens would cost more
    than the grammar check it replaces)."""

    def __init__(self, n_vocab: int) -> None:
        self.n_vocab = n_vocab
        self.buf = np.zeros(n_vocab, dtype=[("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
        self.ids = np.arange(n_vocab, dtype=np.int32)
        assert self.buf.itemsize == ctypes.sizeof(L.llama_token_data)
        self.ptr = self.buf.ctypes.data_as(L.llama_token_data_p)
        self.arr = L.llama_token_data_array()
        self.one = (L.llama_token_data * 1)()
        self.one_ptr = ctypes.cast(self.one, L.llama_token_data_p)
        self.one_arr = L.llama_token_data_array()

    def of(self, ctx: Any, i: int) -> Any:
        """Every token with its logit from row ``i`` of the last decode."""
        row = L.llama_get_logits_ith(ctx, i)
        self.buf["logit"] = np.ctypeslib.as_array(row, shape=(self.n_vocab,))
        self.buf["id"] = self.ids  # samplers reorder the array in place
        a: Any = self.arr  # (ctypes' stubs want an Array where C takes a pointer)
        a.data, a.size, a.selected, a.sorted = self.ptr, self.n_vocab, -1, False
        return ctypes.byref(a)

    def just(self, tok: int) -> Any:
        """An array of one token, to ask a grammar about it."""
        one: Any = self.one[0]
        one.id, one.logit, one.p = tok, 0.0, 0.0
        a: Any = self.one_arr
        a.data, a.size, a.selected, a.sorted = self.one_ptr, 1, -1, False
        return ctypes.byref(a)

    def selected(self) -> int:
        return int(self.arr.data[self.arr.selected].id)


class _Sampling:
    """A request's samplers: the chain (penalties, top_k ... dist, in llama-server's
    order) and, for constrained output, a grammar kept OUT of the chain.

    With the grammar first in the chain, llama.cpp checks every one of the 49k
    vocabulary entries against it for each token (measured: 58 against 120 tokens/s).
    Like llama-server, the chain picks a token from the unconstrained candidates; the
    grammar checks that one token; only if it is rejected is the grammar applied to the
    whole vocabulary and the chain run again on what is left: one check per token most
    of the time. Greedy output is the same either way (masking never changes a valid
    argmax); when sampling, a valid token keeps at least its unconstrained probability,
    as in llama-server, instead of being renormalised over the valid ones only.

    With log-probabilities asked for, the chain is two: ``pre`` (logit_bias and the
    penalties, which change logits in place and keep the array in token-id order) and
    the rest; the log-softmax of the logits between the two is what is reported
    (``last``: the sampled token's and the ``top`` most likely, over the whole vocabulary).
    """

    def __init__(self, chain: Any, grammar: Any = None, pre: Any = None, top: int | None = None) -> None:
        self.chain, self.grammar, self.pre, self.top = chain, grammar, pre, top
        self.last: tuple[float, list[tuple[int, float]]] | None = None

    def sample(self, ctx: Any, i: int, cand: _Candidates) -> int:
        if self.grammar is None and self.pre is None:
            return int(L.llama_sampler_sample(self.chain, ctx, i))
        arr = cand.of(ctx, i)
        logits = None
        if self.pre is not None:
            L.llama_sampler_apply(self.pre, arr)
            logits = cand.buf["logit"].astype(np.float64)
        L.llama_sampler_apply(self.chain, arr)
        tok = cand.selected()
        if self.grammar is not None:
            one = cand.just(tok)
            L.llama_sampler_apply(self.grammar, one)
            if cand.one[0].logit == -math.inf:  # rejected: constrain everything, sample again
                arr = cand.of(ctx, i)
                if self.pre is not None:
                    L.llama_sampler_apply(self.pre, arr)
                L.llama_sampler_apply(self.grammar, arr)
                L.llama_sampler_apply(self.chain, arr)
                tok = cand.selected()
            L.llama_sampler_accept(self.grammar, tok)
        if self.pre is not None:
            L.llama_sampler_accept(self.pre, tok)
        L.llama_sampler_accept(self.chain, tok)
        if logits is not None and self.top is not None:
            self.last = _log_softmax_at(logits, tok, self.top)
        return tok

    def free(self) -> None:
        for smpl in (self.chain, self.grammar, self.pre):
            if smpl:
                L.llama_sampler_free(smpl)
        self.chain = self.grammar = self.pre = None


# OpenAI's stand-in for a log-probability of minus infinity (a banned token): JSON has no -inf.
_LOGPROB_FLOOR = -9999.0


def _log_softmax_at(logits: Any, tok: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of ``tok`` and the ``top`` most likely tokens' under ``logits``."""
    finite = logits[np.isfinite(logits)]
    m = float(finite.max()) if finite.size else 0.0
    lse = m + math.log(float(np.exp(finite - m).sum())) if finite.size else 0.0
    lp = float(logits[tok]) - lse
    best: list[tuple[int, float]] = []
    if top > 0:
        ids = np.argpartition(-logits, top - 1)[:top]
        ids = ids[np.argsort(-logits[ids], kind="stable")]
        best = [(int(t), max(float(logits[t]) - lse, _LOGPROB_FLOOR)) for t in ids]
    return max(lp, _LOGPROB_FLOOR), best


class _Seq:
    """A request in a slot. ``tokens`` is the prompt followed by every sampled token
    that must be fed back; ``tokens[:n_past]`` is what the slot's KV cache holds."""

    def __init__(self, e: _Entry, slot: int, cached: int, sampler: _Sampling | None) -> None:
        self.req, self.emit, self.slot, self.sampler = e.req, e.emit, slot, sampler
        self.tokens = list(e.tokens or [])
        self.n_prompt = len(self.tokens)
        self.n_past = self.cached = cached
        self.n_out = 0  # sampled tokens, end-of-generation excluded
        self.n_unsent = 0  # tokens whose text is still held back
        self.utf8 = Utf8Stream()
        self.stop = StopMatcher(e.req.sampling.stop)
        self.t_admit, self.t_first = time.monotonic_ns(), 0
        self.logprobs: list[dict[str, Any]] | None = [] if e.req.sampling.logprobs is not None else None
        self.leader: _Seq | None = None  # a sibling whose prompt KV this one waits to copy
        self.followers: list[_Seq] = []


class LlamaCppEngine(Engine):
    name = "llamacpp"
    capabilities = Capabilities(embeddings=True, grammar=True, logprobs=True, logit_bias=True)

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        gguf = read_gguf(spec.path)  # untrusted file: validated before llama.cpp parses it
        num_ctx = spec.num_ctx
        if num_ctx > gguf.context_length:
            log.warning("num_ctx %d exceeds %s's trained context of %d tokens; using %d",
                        num_ctx, spec.name, gguf.context_length, gguf.context_length)
            num_ctx = gguf.context_length
        n_par = max(1, min(spec.num_parallel, L.llama_max_parallel_sequences()))
        if n_par != spec.num_parallel:
            log.warning("num_parallel %d is out of range; using %d", spec.num_parallel, n_par)
        # A fixed count when set; else the physical cores (and quota), one fewer for each
        # core other processes keep busy, re-measured every second (backends.cpus).
        self.n_threads = spec.num_threads or default_threads()
        self._share = None if spec.num_threads else CpuShare(self.n_threads)
        self._threads_now = self.n_threads
        # Every generating sequence puts one token in each batch.
        self.n_batch = max(spec.num_batch, n_par)

        L.llama_log_set(_log_callback, ctypes.c_void_p(0))
        L.llama_backend_init()
        _last_error.clear()
        self.model = L.llama_model_load_from_file(os.fsencode(spec.path),
                                                  L.llama_model_default_params())
        if not self.model:
            raise BackendError(_with_last_error(f"llama.cpp could not load {spec.path}"))
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.max_token_bytes, self._splitter = self._vocab_facts()
        self.n_embd = L.llama_model_n_embd(self.model)
        self.n_embd_out = L.llama_model_n_embd_out(self.model)  # size of a pooled embedding
        cp = self._context_params(num_ctx * n_par, self.n_batch, n_par)
        cp.kv_unified = False  # each sequence gets its own n_ctx/n_seq_max cells
        self.kv_type = str((spec.extra or {}).get("kv_cache_type") or "f16")
        if self.kv_type not in _GGML_KV_TYPES:
            L.llama_model_free(self.model)
            raise BackendError(f"unknown kv_cache_type {self.kv_type!r} ({', '.join(_GGML_KV_TYPES)})")
        cp.type_k = cp.type_v = _GGML_KV_TYPES[self.kv_type]
        if self.kv_type != "f16":  # llama.cpp keeps a quantized V cache only with flash attention
            cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            L.llama_model_free(self.model)
            raise BackendError(_with_last_error(f"llama.cpp could not create a context (num_ctx={num_ctx}, "
                                                f"KV cache {self.kv_type})"))
        self.mem = L.llama_get_memory(self.ctx)
        _last_error.clear()  # what a later failure names is its own
        # llama.cpp may round n_ctx up; never give a sequence more than was asked.
        self.n_ctx_seq = min(L.llama_n_ctx_seq(self.ctx), num_ctx)
        self.n_par = L.llama_n_seq_max(self.ctx)
        self.batch = L.llama_batch_init(self.n_batch, 0, 1)  # 1 = seq ids per token
        self.n_ctx_train = gguf.context_length
        self.kv_bytes = self._kv_bytes(gguf, L.llama_n_ctx(self.ctx))
        self._piece_buf = ctypes.create_string_buffer(64)
        self._cand = _Candidates(self.n_vocab)  # the engine thread's, for grammar sampling

        self._slot_cache: list[list[int]] = [[] for _ in range(self.n_par)]  # KV per slot
        self._slot_seq: list[_Seq | None] = [None] * self.n_par
        self._active: list[_Seq] = []  # admission order = prefill order
        self._cond = threading.Condition()
        self._waiting: collections.deque[_Entry] = collections.deque()  # guarded by _cond
        self._dropped: list[_Entry] = []  # cancelled while waiting; engine emits CANCELLED
        self._cancels: set[str] = set()
        self._active_ids: set[str] = set()
        self._closed = self._freed = False
        self._counters = dict(prompt_tokens_total=0, cached_tokens_total=0,
                              generated_tokens_total=0, decode_calls=0)
        self._emb_lock = threading.Lock()  # embed() runs on other threads than the engine's
        self._emb_ctx: Any = None
        self._emb_n = 0  # the embedding context's size
        self._emb_batch: Any = None
        self._emb_threads = self.n_threads
        # The model's own pooling (a sentence-embedding GGUF names it: bert.pooling_type);
        # a generation model's hidden states are mean-pooled, as before.
        pooling = gguf.arch_value("pooling_type")
        self.pooling = int(pooling) if pooling in (1, 2, 3) else L.LLAMA_POOLING_TYPE_MEAN
        # sentence-transformers' Normalize module (kiln compile --task embedding records it):
        # /api/embeddings then gets the model's own unit vectors, as on OpenVINO
        self.normalize = bool((spec.extra or {}).get("normalize"))
        self._thread = threading.Thread(target=self._run, name=f"llamacpp-{spec.name}",
                                        daemon=True)
        self._thread.start()

    def _context_params(self, n_ctx: int, n_batch: int, n_seq: int) -> Any:
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_seq_max = n_ctx, n_seq
        cp.n_batch = cp.n_ubatch = n_batch
        cp.n_threads = cp.n_threads_batch = self.n_threads
        return cp

    def _kv_bytes(self, gguf: Any, n_ctx: int) -> int:
        # K and V per layer: n_head_kv * head_dim values each, per cell, in the cache's type.
        n_head = max(1, L.llama_model_n_head(self.model))
        n_kv = L.llama_model_n_head_kv(self.model) or n_head
        k_dim = int(gguf.arch_value("attention.key_length", self.n_embd // n_head))
        v_dim = int(gguf.arch_value("attention.value_length", k_dim))
        return int(L.llama_model_n_layer(self.model) * n_ctx * n_kv * (k_dim + v_dim) * KV_CACHE_TYPES[self.kv_type])

    # --- public API (any thread) ---------------------------------------------

    def submit(self, req: GenerationRequest, emit: Emit) -> None:
        with self._cond:
            if not self._closed:
                self._waiting.append(_Entry(req, emit))
                self._cond.notify()
                return
        _safe_emit(emit, Chunk(finish_reason=FinishReason.ERROR, detail="the model is unloaded"))

    def cancel(self, req_id: str) -> None:
        with self._cond:
            for e in self._waiting:
                if e.req.id == req_id:  # not started: drop it now, no need to wait a step
                    e.cancelled = True
                    self._waiting.remove(e)
                    self._dropped.append(e)
                    self._cond.notify()
                    return
            if req_id in self._active_ids:
                self._cancels.add(req_id)
                self._cond.notify()

    def _vocab_facts(self) -> tuple[int | None, _Splitter | None]:
        """The longest token text in bytes, and the splitter for piecewise tokenization.

        A token never covers more input bytes than its text has (byte-level BPE writes a
        byte as one or two; SPM writes a space as three), so a prompt of B bytes is at
        least B / max_token_bytes tokens, and one that cannot fit is refused untokenized.
        Not for WPM/UGM vocabularies: they normalise (drop spaces, accents) first."""
        longest, specials = 0, []
        for i in range(self.n_vocab):
            text = L.llama_vocab_get_text(self.vocab, i) or b""
            longest = max(longest, len(text))
            if L.llama_vocab_get_attr(self.vocab, i) & _SPECIAL:
                specials.append(text.decode("utf-8", "replace"))
        kind = L.llama_vocab_type(self.vocab)
        bounded = kind in (L.LLAMA_VOCAB_TYPE_SPM, L.LLAMA_VOCAB_TYPE_BPE) and longest > 0
        # An EOS added at the end would land after the first piece: such models go whole.
        piecewise = bounded and not L.llama_vocab_get_add_eos(self.vocab)
        return (longest if bounded else None), (_Splitter(specials) if piecewise else None)

    def tokenize(self, text: str, *, limit: int | None = None, cancelled: Any = None) -> list[int]:
        """The tokens of ``text`` (with BOS if the model adds one). With ``limit``, stops
        once there are more than that many (the caller only needs to know it is too
        long); ``cancelled()`` is checked between pieces."""
        if self._freed:
            raise BackendError("the model is unloaded")
        pieces = self._splitter.pieces(text) if self._splitter is not None else [text]
        out: list[int] = []
        for i, piece in enumerate(pieces):
            if cancelled is not None and cancelled():
                raise _Cancelled
            out += self._tokenize(piece, add_special=i == 0)
            if limit is not None and len(out) > limit:
                break
        return out

    def _tokenize(self, text: str, add_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 16  # never more than a token per byte, plus BOS/EOS
        buf = (L.llama_token * n_max)()
        n = L.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, True)
        if n < 0:  # -n = the size needed
            n_max = -n
            buf = (L.llama_token * n_max)()
            n = L.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, True)
        if n < 0:
            raise InvalidRequest("the text could not be tokenized")
        return buf[:n]

    def detokenize(self, ids: list[int]) -> str:
        """Text of token ids with special tokens written out, so that tokenizing it again
        gives them back; a BOS the tokenizer adds by itself is left out."""
        if self._freed:
            raise BackendError("the model is unloaded")
        n_vocab = L.llama_vocab_n_tokens(self.vocab)
        if any(not 0 <= t < n_vocab for t in ids):
            raise InvalidRequest(f"context: a token id is outside the vocabulary (0..{n_vocab - 1})")
        arr = (L.llama_token * len(ids))(*ids)
        size = len(ids) * 16 + 16
        buf = ctypes.create_string_buffer(size)
        n = L.llama_detokenize(self.vocab, arr, len(ids), buf, size, True, True)
        if n < 0:  # -n = the size needed
            size = -n
            buf = ctypes.create_string_buffer(size)
            n = L.llama_detokenize(self.vocab, arr, len(ids), buf, size, True, True)
        return buf.raw[: max(n, 0)].decode("utf-8", "replace")

    def embed(self, texts: list[str | list[int]]) -> Embeddings:
        """The texts go through llama_decode together, one sequence each, as many in one
        batch as fit in the embedding context (EMBED_SEQS at most): a list is not decoded
        one text at a time. Measured on all-MiniLM-L6-v2 (bench.embeddings): see the README."""
        with self._emb_lock:
            if self._closed:
                raise BackendError("the model is unloaded")
            toks = [self.tokenize(t) if isinstance(t, str) else list(t) for t in texts]
            if any(not 0 <= tok < self.n_vocab for t in toks for tok in t):
                raise InvalidRequest(f"a token id is outside the vocabulary (0..{self.n_vocab - 1})")
            for t in toks:
                if not t:
                    raise InvalidRequest("cannot embed an empty text (0 tokens)")
                if len(t) > self.n_ctx_seq:
                    raise InvalidRequest(f"the input is {len(t)} tokens, more than the context "
                                         f"window of {self.n_ctx_seq} tokens (num_ctx)")
            total = sum(len(t) for t in toks)
            # Pooling needs a whole text in one ubatch: n_ubatch = n_ctx, sized to the texts at
            # hand (a power of two from 512, up to EMBED_TOKENS unless one text is longer), not
            # to num_ctx: a ubatch of a 32K context (Gemma 3) needs a compute buffer llama.cpp
            # could not allocate.
            want = max(min(total, EMBED_TOKENS), max(len(t) for t in toks))
            n = min(self.n_ctx_seq, max(512, 1 << (want - 1).bit_length()))
            if self._emb_ctx is None or self._emb_n < n:
                if self._emb_ctx is not None:
                    L.llama_batch_free(self._emb_batch)
                    L.llama_free(self._emb_ctx)
                    self._emb_ctx = None
                cp = self._context_params(n, n, EMBED_SEQS)
                cp.embeddings, cp.pooling_type = True, self.pooling
                cp.kv_unified = True  # the sequences of a batch share the n cells
                ctx = L.llama_init_from_model(self.model, cp)
                if not ctx:
                    raise BackendError(f"llama.cpp could not create an embedding context of {n} tokens")
                self._emb_ctx, self._emb_n = ctx, n
                self._emb_batch = L.llama_batch_init(n, 0, 1)
                self._emb_threads = self.n_threads
            ctx, b = self._emb_ctx, self._emb_batch
            # The threads follow the CPUs other processes leave free, as generation's do: on a
            # busy 2-core machine (load average 4-6) a short text took 67-303 ms with 2 fixed
            # threads, 7-9 ms adaptive, in the same minutes (all-MiniLM-L6-v2). (CpuShare is
            # also read by the engine thread; a concurrent reading only shortens one interval.)
            if self._share is not None and (nt := self._share.threads()) != self._emb_threads:
                L.llama_set_n_threads(ctx, nt, nt)
                self._emb_threads = nt
            vectors: list[list[float]] = []
            i = 0
            while i < len(toks):
                group: list[list[int]] = []
                used = 0
                while i < len(toks) and len(group) < EMBED_SEQS and used + len(toks[i]) <= self._emb_n:
                    group.append(toks[i])
                    used += len(toks[i])
                    i += 1
                L.llama_memory_clear(L.llama_get_memory(ctx), True)
                k = 0
                for seq, t in enumerate(group):
                    for pos, tok in enumerate(t):
                        b.token[k], b.pos[k], b.n_seq_id[k], b.logits[k] = tok, pos, 1, 1
                        b.seq_id[k][0] = seq
                        k += 1
                b.n_tokens = k
                if (rc := L.llama_decode(ctx, b)) != 0:
                    raise BackendError(f"llama_decode failed with code {rc} while embedding")
                for seq in range(len(group)):
                    vec = L.llama_get_embeddings_seq(ctx, seq)
                    if not vec:
                        raise BackendError("llama.cpp returned no embedding")
                    v = vec[: self.n_embd_out]
                    if self.normalize:
                        n2 = math.sqrt(sum(x * x for x in v)) or 1.0
                        v = [x / n2 for x in v]
                    vectors.append(v)
            return Embeddings(vectors, total)

    def prepare(self, req: GenerationRequest) -> list[int]:
        g = self._grammar_sampler(req)  # a schema that cannot be enforced is a 400 now, not mid-stream
        if g:
            L.llama_sampler_free(g)
        return list(req.tokens) if req.tokens is not None else self.tokenize(req.prompt)

    def _grammar_sampler(self, req: GenerationRequest) -> Any:
        """The request's grammar as a sampler (the caller frees it), or None."""
        grammar = _grammar(req)
        if not grammar:
            return None
        g = L.llama_sampler_init_grammar(self.vocab, grammar.encode("utf-8"), b"root")
        if not g:
            raise InvalidRequest("the grammar is not valid GBNF (or has no 'root' rule)")
        return g

    def info(self) -> EngineInfo:
        return EngineInfo(
            device="cpu", num_ctx=self.n_ctx_seq, num_parallel=self.n_par, capabilities=self.capabilities,
            model_bytes=os.path.getsize(self.spec.path), kv_bytes=self.kv_bytes,
            max_token_bytes=self.max_token_bytes,  # the gateway's cheap "cannot fit" check
            n_vocab=self.n_vocab,  # the gateway checks token ids (logit_bias) against it
            details={"num_batch": self.n_batch, "n_threads": self.n_threads,
                     "threads": "fixed" if self._share is None else "adaptive",
                     "n_ctx_train": self.n_ctx_train,
                     "kv_cache_type": self.kv_type,
                     "system_info": L.llama_print_system_info().decode("utf-8", "replace").strip()})

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {"active": len(self._active_ids), "waiting": len(self._waiting),
                    "num_parallel": self.n_par, "n_threads": self._threads_now, **self._counters}

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is threading.current_thread():
            return  # called from emit: freeing now would pull the context from under a step
        self._thread.join()
        with self._cond:
            if self._freed:
                return
            self._freed = True
        with self._emb_lock:
            if self._emb_ctx is not None:
                L.llama_batch_free(self._emb_batch)
                L.llama_free(self._emb_ctx)
                self._emb_ctx = None
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)  # the context before the model it was made from
        L.llama_model_free(self.model)

    # --- engine thread ---------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._closed or self._waiting or self._dropped or self._cancels
                           or self._active):
                    self._cond.wait()
                if self._closed:
                    break
                new = [e for e in self._waiting if e.tokens is None]
                dropped, self._dropped = self._dropped, []
                cancels, self._cancels = self._cancels, set()
            try:
                self._step(new, dropped, cancels)
            except Exception as e:  # a bug must not kill the thread and hang every stream
                log.exception("llama.cpp engine step failed")
                for s in list(self._active):
                    self._finish(s, FinishReason.ERROR, f"engine error: {e}", clear=True)
        # Unloaded: end everything still in flight.
        with self._cond:
            dropped, left = self._dropped, list(self._waiting)
            self._dropped, self._waiting = [], collections.deque()
        for entry in dropped:
            _safe_emit(entry.emit, Chunk(finish_reason=FinishReason.CANCELLED))
        for entry in left:
            _safe_emit(entry.emit, Chunk(finish_reason=FinishReason.ERROR, detail="the model was unloaded"))
        for s in list(self._active):
            self._finish(s, FinishReason.ERROR, "the model was unloaded")

    def _step(self, new: list[_Entry], dropped: list[_Entry], cancels: set[str]) -> None:
        for e in dropped:
            _safe_emit(e.emit, Chunk(finish_reason=FinishReason.CANCELLED,
                                     usage=Usage(prompt_tokens=len(e.tokens or []))))
        for s in [s for s in self._active if s.req.id in cancels]:
            self._finish(s, FinishReason.CANCELLED)  # its KV stays for prefix reuse
        for e in new:  # tokenize here, not in submit(): it may take a while
            self._check(e)
        self._admit()
        if self._active:
            self._decode_and_sample()

    def _check(self, e: _Entry) -> None:
        """Tokenizes a waiting request; one that cannot run ends now, not when a slot frees."""
        detail, reason = None, FinishReason.ERROR
        size = len(e.req.prompt.encode("utf-8"))
        toks: list[int] = []
        if e.req.tokens is not None:  # tokenized by prepare(): only the count is checked again
            toks = e.tokens = list(e.req.tokens)
            if any(not 0 <= t < self.n_vocab for t in toks):
                detail = f"a prompt token id is outside the vocabulary (0..{self.n_vocab - 1})"
        elif self.max_token_bytes and size > self.n_ctx_seq * self.max_token_bytes:
            detail = (f"the prompt is {size} bytes, more than the context window of {self.n_ctx_seq} tokens "
                      f"(num_ctx) can hold")  # refused untokenized: see _vocab_facts
        else:
            try:
                toks = self.tokenize(e.req.prompt, limit=self.n_ctx_seq, cancelled=lambda: e.cancelled)
                e.tokens = toks
            except _Cancelled:
                return  # it is in _dropped: the next step reports it
            except Exception as ex:
                toks, detail = [], f"the prompt could not be tokenized: {ex}"
        n, mt = len(toks), e.req.sampling.max_tokens
        if detail is None:
            if n == 0:
                detail = "the prompt is empty (0 tokens)"
            elif n >= self.n_ctx_seq:  # no cell left for even one generated token
                # past the limit, tokenizing stopped: n is then a lower bound
                detail = (f"the prompt is {'at least ' if n > self.n_ctx_seq else ''}{n} tokens, more than the "
                          f"context window of {self.n_ctx_seq} tokens (num_ctx)")
            elif mt is not None and mt <= 0:
                reason = FinishReason.LENGTH  # nothing asked for
            else:
                return
        with self._cond:
            if e not in self._waiting:
                return  # cancelled meanwhile: it is in _dropped
            self._waiting.remove(e)
        _safe_emit(e.emit, Chunk(finish_reason=reason, detail=detail, usage=Usage(prompt_tokens=n)))

    def _admit(self) -> None:
        while True:
            free = [k for k in range(self.n_par) if self._slot_seq[k] is None]
            with self._cond:
                if not free or not self._waiting or self._waiting[0].tokens is None:
                    return
                e = self._waiting.popleft()
                self._active_ids.add(e.req.id)
            toks = e.tokens or []
            try:
                sampler = self._sampler(e.req, toks)
            except InvalidRequest as ex:
                with self._cond:
                    self._active_ids.discard(e.req.id)
                _safe_emit(e.emit, Chunk(finish_reason=FinishReason.ERROR, detail=str(ex),
                                         usage=Usage(prompt_tokens=len(toks))))
                continue
            leader = self._leader_for(e.req, toks)
            if leader is not None:
                # The prompt is a sibling's, still being evaluated: this sequence waits and then
                # copies its KV cells (see _fork) instead of evaluating the prompt again. Any
                # free slot will do (it is overwritten): the one with the least worth keeping.
                slot = min(free, key=lambda k: len(self._slot_cache[k]))
                L.llama_memory_seq_rm(self.mem, slot, -1, -1)  # (in case it evaluates the prompt after all)
                self._slot_cache[slot] = []
                s = _Seq(e, slot, 0, sampler)
                s.leader = leader
                leader.followers.append(s)
                self._slot_seq[slot] = s
                self._active.append(s)
                self._counters["prompt_tokens_total"] += len(toks)
                continue
            # Prefix reuse: the free slot whose cached tokens share the longest prefix;
            # on a tie, the one with the least cached (least worth keeping). The last
            # prompt token is always evaluated again: its logits give the first token.
            slot = max(free, key=lambda k: (_lcp(self._slot_cache[k], toks),
                                            -len(self._slot_cache[k])))
            lcp = min(_lcp(self._slot_cache[slot], toks), len(toks) - 1)
            if not L.llama_memory_seq_rm(self.mem, slot, lcp, -1):
                L.llama_memory_seq_rm(self.mem, slot, -1, -1)  # e.g. recurrent models
                lcp = 0
            self._slot_cache[slot] = []
            s = _Seq(e, slot, lcp, sampler)
            self._slot_seq[slot] = s
            self._active.append(s)
            self._counters["prompt_tokens_total"] += len(toks)
            self._counters["cached_tokens_total"] += lcp

    def _leader_for(self, req: GenerationRequest, toks: list[int]) -> _Seq | None:
        if req.prefix_group is None:
            return None
        return next((s for s in self._active if s.req.prefix_group == req.prefix_group and s.leader is None
                     and s.n_past < s.n_prompt and s.tokens[: s.n_prompt] == toks), None)

    def _fork(self, s: _Seq) -> None:
        """The leader's prompt is in: its KV goes to every follower (a copy of the leader's
        KV stream, done by llama.cpp before the next decode), which then samples its first
        token from the leader's logits row."""
        for f in s.followers:
            L.llama_memory_seq_cp(self.mem, s.slot, f.slot, -1, -1)
            f.n_past = f.cached = s.n_past
            f.leader = None
            self._counters["cached_tokens_total"] += s.n_past
        s.followers = []

    def _sampler(self, req: GenerationRequest, prompt: list[int]) -> _Sampling:
        """The request's samplers (see ``_Sampling``); the caller frees them."""
        sp = req.sampling
        if any(not 0 <= t < self.n_vocab for t, _ in sp.logit_bias):
            raise InvalidRequest(f"logit_bias: a token id is outside the vocabulary (0..{self.n_vocab - 1})")
        if sp.logprobs is None:
            return _Sampling(self._chain(sp, prompt), self._grammar_sampler(req))
        pre = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        self._bias_and_penalties(pre, sp, prompt)
        rest = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        return _Sampling(self._chain(sp, prompt, rest), self._grammar_sampler(req), pre, sp.logprobs)

    def _bias_and_penalties(self, chain: Any, sp: SamplingParams, prompt: list[int]) -> None:
        if sp.logit_bias:
            arr: Any = (L.llama_logit_bias * len(sp.logit_bias))()
            for k, (tok, bias) in enumerate(sp.logit_bias):
                # OpenAI's -100 bans the token: exactly, not as a large negative number
                arr[k].token, arr[k].bias = int(tok), -math.inf if bias <= -100 else float(bias)
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_logit_bias(self.n_vocab, len(sp.logit_bias), arr))
        last_n = self.n_ctx_seq if sp.repeat_last_n < 0 else sp.repeat_last_n
        if last_n and (sp.repeat_penalty != 1.0 or sp.frequency_penalty or sp.presence_penalty):
            pen = L.llama_sampler_init_penalties(self.n_vocab, last_n, sp.repeat_penalty,
                                                 sp.frequency_penalty, sp.presence_penalty)
            # llama-server and Ollama count the prompt in the penalty window too.
            for tok in prompt[-last_n:]:
                L.llama_sampler_accept(pen, tok)
            L.llama_sampler_chain_add(chain, pen)

    def _chain(self, sp: SamplingParams, prompt: list[int], chain: Any = None) -> Any:
        """The sampler chain; with ``chain`` given, its bias and penalties are elsewhere."""
        if chain is None:
            chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
            self._bias_and_penalties(chain, sp, prompt)
        if sp.temperature <= 0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
            return chain
        if sp.top_k > 0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(sp.top_k))
        if 0 < sp.typical_p < 1:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_typical(sp.typical_p, 1))
        if sp.top_p < 1:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(sp.top_p, 1))
        if sp.min_p > 0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_min_p(sp.min_p, 1))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(sp.temperature))
        # A seed of -1 becomes LLAMA_DEFAULT_SEED (0xFFFFFFFF): random in llama.cpp too.
        seed = random.getrandbits(32) if sp.seed is None else sp.seed & 0xFFFFFFFF
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(seed))
        return chain

    def _fill(self, gen: list[_Seq], pre: list[_Seq], budget: int) -> list[tuple[_Seq, int, int]]:
        """Fills the batch; returns (seq, tokens added, logits row or -1) per sequence.

        Every generating sequence gets its one token (streams never wait for a
        prompt); prompts get what is left, in admission order. The batch is then laid
        out in SLOT order: with a KV cache per sequence llama.cpp splits a batch into
        ubatches of consecutive, increasing sequence ids (``split_equal(sequential)``),
        so slots in admission order cost one graph evaluation per run of consecutive
        ids — up to one per sequence (measured: 8 decode tokens took 48 ms in
        admission order, as long as 8 single-token decodes)."""
        plan = [(s, 1) for s in gen]
        room = self.n_batch - len(gen)
        for s in pre:
            k = min(budget, room, s.n_prompt - s.n_past)
            if k <= 0:
                break
            plan.append((s, k))
            room, budget = room - k, budget - k
        plan.sort(key=lambda p: p[0].slot)
        b = self.batch
        tok, pos, nsid, sid, want = b.token, b.pos, b.n_seq_id, b.seq_id, b.logits
        rows, n = [], 0
        for s, k in plan:
            for j in range(k):
                tok[n + j], pos[n + j], nsid[n + j], want[n + j] = (
                    s.tokens[s.n_past + j], s.n_past + j, 1, 0)
                sid[n + j][0] = s.slot
            done = s.n_past + k >= s.n_prompt
            if done:  # a decode token, or a prompt's last: its logits give the next token
                want[n + k - 1] = 1
            rows.append((s, k, n + k - 1 if done else -1))
            n += k
        b.n_tokens = n
        return rows

    def _decode_and_sample(self) -> None:
        gen = [s for s in self._active if s.n_past >= s.n_prompt]
        pre = [s for s in self._active if s.n_past < s.n_prompt and s.leader is None]
        budget = self.n_batch
        while True:
            rows = self._fill(gen, pre, budget)
            if not rows:
                return
            if self._share is not None and (n := self._share.threads()) != self._threads_now:
                L.llama_set_n_threads(self.ctx, n, n)
                self._threads_now = n
                log.info("%s: %d threads (other processes keep %.1f cores busy)", self.spec.name, n,
                         self._share.busy)
            rc = L.llama_decode(self.ctx, self.batch)
            self._counters["decode_calls"] += 1
            if rc == 0:
                break
            n_pre = sum(k for s, k, _ in rows if s in pre)
            if rc == 1 and n_pre > 1:  # no KV slot (memory unchanged): try less prompt
                budget = n_pre // 2
                continue
            if rc == 1:  # still no room: end the longest sequence, so this terminates
                victim = max((s for s, _, _ in rows), key=lambda s: s.n_past)
                (gen if victim in gen else pre).remove(victim)
                self._finish(victim, FinishReason.ERROR,
                             "llama.cpp found no free KV cache cell for this sequence", clear=True)
                continue
            # Aborted or failed: the KV of these sequences is unknown; drop them.
            for s, _, _ in rows:
                self._finish(s, FinishReason.ERROR, _with_last_error(f"llama_decode failed with code {rc}"),
                             clear=True)
            return
        for s, k, _ in rows:
            s.n_past += k
        for s, _, i in rows:
            if i >= 0:
                assert s.sampler is not None
                followers = s.followers
                if followers:
                    self._fork(s)
                self._on_token(s, s.sampler.sample(self.ctx, i, self._cand))
                for f in followers:  # the same row of logits: each with its own sampler (seed)
                    if f in self._active and f.sampler is not None:
                        self._on_token(f, f.sampler.sample(self.ctx, i, self._cand))

    def _on_token(self, s: _Seq, tok: int) -> None:
        s.t_first = s.t_first or time.monotonic_ns()
        if L.llama_vocab_is_eog(self.vocab, tok):
            return self._finish(s, FinishReason.STOP)
        s.n_out += 1
        s.n_unsent += 1
        self._counters["generated_tokens_total"] += 1
        piece = self._piece(tok)
        if s.logprobs is not None and s.sampler is not None and s.sampler.last is not None:
            lp, top = s.sampler.last
            s.logprobs.append({**self._token_entry(tok, piece), "logprob": lp,
                               "top": [{**self._token_entry(t), "logprob": v} for t, v in top]})
        text = s.stop.feed(s.utf8.feed(piece))
        if text:
            _safe_emit(s.emit, Chunk(text=text, n_tokens=s.n_unsent, logprobs=self._take_logprobs(s)))
            s.n_unsent = 0
        mt = s.req.sampling.max_tokens
        if s.stop.stopped:
            self._finish(s, FinishReason.STOP)
        elif mt is not None and s.n_out >= mt:
            self._finish(s, FinishReason.LENGTH)
        elif s.n_past >= self.n_ctx_seq:  # no cell left to feed this token back
            self._finish(s, FinishReason.LENGTH,
                         f"context window full (num_ctx={self.n_ctx_seq})")
        else:
            s.tokens.append(tok)

    def _token_entry(self, tok: int, piece: bytes | None = None) -> dict[str, Any]:
        piece = self._piece(tok) if piece is None else piece
        return {"id": tok, "token": piece.decode("utf-8", "replace"), "bytes": list(piece)}

    @staticmethod
    def _take_logprobs(s: _Seq) -> list[dict[str, Any]] | None:
        if s.logprobs is None:
            return None
        out, s.logprobs = s.logprobs, []
        return out

    def _piece(self, tok: int) -> bytes:
        buf = self._piece_buf
        n = L.llama_token_to_piece(self.vocab, tok, buf, len(buf), 0, False)
        if n < 0:
            buf = self._piece_buf = ctypes.create_string_buffer(-n)
            n = L.llama_token_to_piece(self.vocab, tok, buf, len(buf), 0, False)
        return buf.raw[: max(n, 0)]

    def _finish(self, s: _Seq, reason: FinishReason, detail: str | None = None,
                clear: bool = False) -> None:
        """Ends a sequence: flushes held text, emits the final chunk, frees its slot."""
        for f in s.followers:  # its prompt never finished: they evaluate it themselves
            f.leader = None
        s.followers = []
        if s.leader is not None:
            s.leader.followers.remove(s)
            s.leader = None
        if reason in (FinishReason.STOP, FinishReason.LENGTH) and not s.stop.stopped:
            tail = s.stop.feed(s.utf8.flush())
            tail += "" if s.stop.stopped else s.stop.flush()
            if tail:
                _safe_emit(s.emit, Chunk(text=tail, n_tokens=s.n_unsent, logprobs=self._take_logprobs(s)))
                s.n_unsent = 0
        now = time.monotonic_ns()
        first = s.t_first or now
        usage = Usage(prompt_tokens=s.n_prompt, completion_tokens=s.n_out, cached_tokens=s.cached,
                      prompt_ns=first - s.t_admit, eval_ns=now - first)
        if s.sampler:
            s.sampler.free()
            s.sampler = None
        if clear:
            L.llama_memory_seq_rm(self.mem, s.slot, -1, -1)  # removing a whole seq never fails
        self._slot_cache[s.slot] = [] if clear else s.tokens[: s.n_past]
        self._slot_seq[s.slot] = None
        self._active.remove(s)
        with self._cond:
            self._active_ids.discard(s.req.id)
            self._cancels.discard(s.req.id)
        # What is left belongs to text held back and dropped (a stop string's tokens)
        logprobs = self._take_logprobs(s) if not s.stop.stopped else ([] if s.logprobs is not None else None)
        _safe_emit(s.emit, Chunk(n_tokens=s.n_unsent, finish_reason=reason, usage=usage,
                                 detail=detail, stop_sequence=s.stop.matched, logprobs=logprobs))


def _with_last_error(message: str) -> str:
    """``message`` with llama.cpp's own last error lines (what it logged as the reason)."""
    return f"{message}: {'; '.join(_last_error)}" if _last_error else message


def _safe_emit(emit: Emit, chunk: Chunk) -> None:
    try:
        emit(chunk)
    except Exception:  # a broken consumer must not take the engine thread down
        log.exception("emit failed")
