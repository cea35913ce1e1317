"""The engine: device choice with fallback, loading, and the Engine protocol."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from backends.base import (
    BackendError,
    Capabilities,
    Chunk,
    Emit,
    Embeddings,
    Engine,
    FinishReason,
    EngineInfo,
    GenerationRequest,
    InvalidRequest,
    ModelSpec,
)
from backends.grammar import GrammarError, check, for_schema
from backends.openvino.embedding import Embedder, HiddenStates
from backends.openvino.request import (DEFAULT_DEVICES, DEFAULT_MAX_PROMPT_LEN, DEFAULT_MIN_RESPONSE_LEN, Needs,
                                      _Request, npu_attention_properties, npu_prefill_properties, npu_prompt_size,
                                      npuw_device_properties,
                                      short_error)
from backends.openvino.runners import _ContinuousBatching, _NpuStatic, _Runner

log = logging.getLogger("kiln.openvino")

NO_GRAMMAR = "structured output is not available on this openvino pipeline: {}"
OUTSIDE_DIALECT = ("the grammar made from this JSON schema is outside the dialect OpenVINO's xgrammar is "
                   "known to compile ({}); it was refused before reaching the pipeline")
NO_TOP_LOGPROBS = ("top_logprobs: the openvino backend reports only the sampled token's log-probability "
                   "(OpenVINO GenAI gives no alternatives); ask for top_logprobs 0")
NO_EMBEDDINGS = ("{name} was compiled without its hidden states, so the openvino backend cannot embed with it: "
                 "recompile it with kiln compile SOURCE --name {name} --embeddings, or use an embedding model "
                 "(kiln compile DIR --task embedding, e.g. all-MiniLM-L6-v2)")
NO_NPU_LOGPROBS = "logprobs are not available on the openvino backend's NPU pipeline (it streams bare token ids)"


class OpenVINOEngine(Engine):
    name = "openvino"
    # grammar: kiln's own converter makes the GBNF (the same schema subset and 400s as on
    # llama.cpp), backends.grammar.check reads it before it goes anywhere near the
    # pipeline, and OpenVINO GenAI's xgrammar enforces it (StructuredOutputConfig.grammar).
    # The check matters: a grammar that fails to compile inside step() fails that and
    # every later step() of the continuous-batching pipeline (probed on 2026.4.1), where
    # the NPU's static pipeline fails only that generate() call.
    # logprobs: the continuous-batching pipeline's (CPU, GPU) GenerationOutput carries each
    # sampled token's log-probability, and nothing of the alternatives (max_top_logprobs=0);
    # the NPU's static pipeline streams bare token ids (info() says so).
    capabilities = Capabilities(grammar=True, embeddings=False, logprobs=True, max_top_logprobs=0)

    def __init__(self, spec: ModelSpec) -> None:
        import openvino_genai as ov_genai  # imported here: the gateway never loads OpenVINO

        self.ov_genai = ov_genai
        self.spec = spec
        extra = spec.extra or {}
        self.path = Path(spec.path)
        if not self.path.exists():
            raise BackendError(f"model not found: {spec.path}")
        if self.path.is_file() and self.path.suffix.lower() != ".gguf" and _is_gguf(self.path):
            self.path = self._gguf_link(self.path)
        self.is_gguf = self.path.suffix.lower() == ".gguf"
        if not self.is_gguf and not (self.path / "openvino_model.xml").is_file():
            raise BackendError(f"{spec.path} is neither a .gguf file nor an OpenVINO IR directory "
                               "(no openvino_model.xml)")
        self.max_prompt_len = int(extra.get("max_prompt_len") or DEFAULT_MAX_PROMPT_LEN)
        self.min_response_len = int(extra.get("min_response_len") or DEFAULT_MIN_RESPONSE_LEN)
        self.npuw_devices = extra.get("npuw_devices") or None
        chunk = extra.get("prefill_chunk_size")
        self.prefill_chunk = None if chunk is None else int(chunk)  # None: OpenVINO's default
        self.devices = [d.strip() for d in (spec.devices or DEFAULT_DEVICES) if d.strip()]
        self.fallbacks: list[dict[str, str]] = []
        self.device: str | None = None
        self.pipeline = ""
        self.cache = "none"
        self._tok_lock = threading.Lock()
        self._runner: _Runner | None = None
        self.no_grammar: str | None = None  # why structured output is off, if it is
        self._embedder: Embedder | None = None
        self._hidden: HiddenStates | None = None  # kiln compile --embeddings
        t0 = time.monotonic()
        if extra.get("task") == "embedding":  # an embedding model: no generation pipeline
            self._load_embedder()
            self.load_seconds = round(time.monotonic() - t0, 3)
            return
        for device in self.devices:
            self.cache = "none"
            reason = self._unusable(device)
            if reason is None:
                try:
                    self._runner = self._load(device)
                    self.device = device
                    break
                except Exception as e:  # noqa: BLE001 - any failure means "try the next device"
                    reason = short_error(e)
            self.fallbacks.append({"device": device, "error": reason})
            log.warning("%s: %s cannot run it: %s", spec.name, device, reason)
        if self._runner is None:
            tried = "; ".join(f"{f['device']}: {f['error']}" for f in self.fallbacks) or "no devices given"
            raise BackendError(f"could not load {spec.name} on any device ({tried})")
        if self.fallbacks:
            log.warning("%s runs on %s (fell back from %s)", spec.name, self.device,
                        ", ".join(f["device"] for f in self.fallbacks))
        self.load_seconds = round(time.monotonic() - t0, 3)
        self.tokenizer = self._runner.tokenizer
        self.n_vocab = self._vocab_size()
        self._bos = self._bos_prefix()
        self.no_grammar = self._runner.grammar_error
        if extra.get("embedding_path"):
            where = "CPU" if (self.device or "").upper().startswith("NPU") else self.device or "CPU"
            self._hidden = HiddenStates(str(extra["embedding_path"]), where, self._properties(where))
        self._runner.start(Needs(spec.name, ov_genai, self.tokenize,
                                 lambda req, max_new: self.generation_config(req, max_new), self._too_long))

    # -- loading -------------------------------------------------------------------
    def _load_embedder(self) -> None:
        """A feature-extraction IR (``kiln compile --task embedding``) on the first device
        that takes it; the NPU only with static shapes, which kiln does not compile."""
        if self.is_gguf:
            raise BackendError(f"{self.spec.name}: an embedding model on OpenVINO is an IR directory, not a GGUF")
        for device in self.devices:
            if device.upper().startswith("NPU"):
                reason = "kiln compiles embedding models with dynamic shapes, which the NPU cannot run"
            else:
                try:
                    self._embedder = Embedder(self.ov_genai, str(self.path), device, self.spec.extra or {},
                                              self._properties(device))
                    self.device, self.pipeline = device, "text_embedding"
                    self.tokenizer = self._embedder.tokenizer
                    self.n_vocab = self._vocab_size()  # ids in range reach Embedder.embed, which names why not
                    return
                except BackendError:
                    raise
                except Exception as e:  # noqa: BLE001 - any failure means "try the next device"
                    reason = short_error(e)
            self.fallbacks.append({"device": device, "error": reason})
            log.warning("%s: %s cannot run it: %s", self.spec.name, device, reason)
        tried = "; ".join(f"{f['device']}: {f['error']}" for f in self.fallbacks) or "no devices given"
        raise BackendError(f"could not load {self.spec.name} on any device ({tried})")

    def _gguf_link(self, blob: Path) -> Path:
        """OpenVINO GenAI knows a GGUF by its extension, and store blobs have none."""
        d = Path(self.spec.cache_dir or tempfile.gettempdir()) / "gguf-links"
        d.mkdir(parents=True, exist_ok=True)
        link = d / f"{blob.name}.gguf"
        if not (link.is_symlink() and link.resolve() == blob.resolve()):
            tmp = d / f".{blob.name}.{os.getpid()}"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(blob.resolve())
            tmp.replace(link)
        return link

    def _unusable(self, device: str) -> str | None:
        if device.upper().startswith("NPU") and self.is_gguf:
            return ("a GGUF file cannot run on the NPU (its static pipeline needs an exported IR: "
                    "kiln compile <model.gguf> --name NAME --profile npu)")
        return None

    def _properties(self, device: str) -> dict[str, Any]:
        extra = self.spec.extra or {}
        props: dict[str, Any] = dict(extra.get("ov_properties") or {})
        props.update((extra.get("device_properties") or {}).get(device.split(".")[0], {}))
        if device.upper() == "CPU" and self.spec.num_threads > 0:
            props.setdefault("INFERENCE_NUM_THREADS", self.spec.num_threads)
        return props

    def _load(self, device: str) -> _Runner:
        if device.upper().startswith("NPU"):
            return self._load_npu(device)
        return self._load_cb(device)

    def _load_cb(self, device: str) -> _Runner:
        g = self.ov_genai
        extra = self.spec.extra or {}
        num_ctx = max(16, int(self.spec.num_ctx))
        seqs = max(1, int(self.spec.num_parallel))
        block = int(extra.get("kv_block_size") or (32 if device.upper() == "CPU" else 16))
        sc = g.SchedulerConfig()
        sc.max_num_seqs = seqs
        sc.max_num_batched_tokens = int(extra.get("max_num_batched_tokens") or max(self.spec.num_batch, 256))
        sc.dynamic_split_fuse = True
        sc.enable_prefix_caching = bool(extra.get("enable_prefix_caching", True))
        # Every sequence may hold a full context at once: no preemption, no KV cut.
        sc.num_kv_blocks = seqs * (-(-(num_ctx + 1) // block) + 1)
        props = self._properties(device)
        kv_type = extra.get("kv_cache_type")
        if kv_type and device.upper() == "CPU":  # the CPU plugin's KV element type (its default: u8)
            props.setdefault("KV_CACHE_PRECISION", {"f16": "f16", "q8_0": "u8", "q4_0": "u4"}[kv_type])
        if self.spec.cache_dir:
            props.setdefault("CACHE_DIR", self.spec.cache_dir)
            self.cache = "cache-dir"
        self.pipeline = "continuous_batching"
        return _ContinuousBatching(lambda: g.ContinuousBatchingPipeline(str(self.path), sc, device, props, {}),
                                   num_ctx, seqs)

    def _load_npu(self, device: str) -> _Runner:
        g = self.ov_genai
        extra = self.spec.extra or {}
        props = self._properties(device)
        props.update(MAX_PROMPT_LEN=self.max_prompt_len, MIN_RESPONSE_LEN=self.min_response_len)
        props.update(npu_prefill_properties(self.prefill_chunk))
        props.update(npu_attention_properties(self.path))
        props.update(npuw_device_properties(self.npuw_devices))
        if extra.get("npuw_online_pipeline"):
            props["NPUW_ONLINE_PIPELINE"] = extra["npuw_online_pipeline"]
        pipe = None
        blob, note = self._usable_blob()
        if blob is not None:
            try:
                pipe = g.LLMPipeline(str(self.path), device, **props, BLOB_PATH=str(blob),
                                     WEIGHTS_PATH=str(self.path / "openvino_model.bin"))
                self.cache = "blob-import"
            except Exception as e:  # noqa: BLE001 - a stale blob must not cost the NPU
                log.warning("%s: the NPU blob %s did not import (%s); compiling afresh",
                            self.spec.name, blob, short_error(e))
                note = f"blob-import failed ({short_error(e, 160)}); "
        if pipe is None:
            cache_dir = self.spec.cache_dir
            if cache_dir:
                props["CACHE_DIR"] = cache_dir
                before = _listing(cache_dir)
                pipe = g.LLMPipeline(str(self.path), device, **props)
                self.cache = note + ("cache-dir cold" if _listing(cache_dir) - before else "cache-dir warm")
            else:
                pipe = g.LLMPipeline(str(self.path), device, **props)
                self.cache = note + "none"
        _canary(g, pipe)
        self.pipeline = "npu_static"
        return _NpuStatic(pipe, self.max_prompt_len, self.min_response_len)

    def _usable_blob(self) -> tuple[Path | None, str]:
        """The ahead-of-time NPU blob, if it was built for the settings in force; else
        (None, a note for info()["cache"])."""
        extra = self.spec.extra or {}
        if not extra.get("npu_blob") or self.is_gguf:
            return None, ""
        blob = Path(extra["npu_blob"])
        blob = blob if blob.is_absolute() else self.path / blob
        if not blob.is_file():
            return None, "blob missing; "
        built = extra.get("npu_blob_config") or {}
        wanted = {"max_prompt_len": self.max_prompt_len, "min_response_len": self.min_response_len,
                  "npuw_devices": self.npuw_devices, "prefill_chunk_size": self.prefill_chunk,
                  "npuw_f16ic": npuw_device_properties(self.npuw_devices).get("NPUW_F16IC"),
                  "prefill_attention_hint": npu_attention_properties(self.path).get("NPUW_LLM_PREFILL_ATTENTION_HINT")}
        differ = sorted(k for k, v in wanted.items() if built.get(k) != v)
        if differ:
            return None, f"blob built for other {', '.join(differ)}; "
        return blob, ""

    # -- tokens --------------------------------------------------------------------
    def _vocab_size(self) -> int | None:
        """The tokenizer's vocabulary size (token ids are checked against it), or None."""
        try:  # get_vocab, not get_vocab_vector: that one fails on a byte-level BPE token that is not UTF-8
            vocab = self.tokenizer.get_vocab()
            return max(vocab.values()) + 1 if vocab else None
        except Exception:  # noqa: BLE001 - an older GenAI without it: the gateway refuses token ids
            return None

    def _bos_prefix(self) -> list[int]:
        """What the tokenizer adds in front with add_special_tokens (usually BOS).

        The gateway's prompt is already templated, special tokens as text. llama.cpp
        parses those and adds BOS when the model asks for it; do the same, without
        doubling a BOS the template already wrote."""
        plain = self._encode_raw("a", False)
        full = self._encode_raw("a", True)
        n = len(full) - len(plain)
        return full[:n] if n > 0 and full[n:] == plain else []

    def _encode_raw(self, text: str, special: bool) -> list[int]:
        with self._tok_lock:
            t = self.tokenizer.encode(text, add_special_tokens=special).input_ids
        return [int(x) for x in t.data[0]]

    def _decode(self, ids: list[int]) -> str:
        with self._tok_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _piece(self, tok: int) -> str | None:
        """One token's text (a log-probability entry's token); None for the end-of-generation
        token, which OpenVINO hands back as generated and llama.cpp does not (nor its text)."""
        base = self._runner.base_config if self._runner else None
        if base is not None and (tok == base.eos_token_id or tok in base.stop_token_ids):
            return None
        with self._tok_lock:
            return self.tokenizer.decode([tok], skip_special_tokens=False)

    def detokenize(self, ids: list[int]) -> str:
        with self._tok_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=False)

    def tokenize(self, text: str) -> list[int]:
        if self._embedder is not None:  # what the model sees, [CLS] and [SEP] included
            return self._encode_raw(text, True)
        ids = self._encode_raw(text, False)
        if self._bos and ids[: len(self._bos)] != self._bos:
            ids = self._bos + ids
        return ids

    def check_prompt(self, n_tokens: int) -> None:
        """Raises ``InvalidRequest`` for a prompt the NPU's static shapes cannot take.
        The gateway calls it (or compares with ``info()["max_prompt_len"]``) before
        submitting, to answer 400 without a device call."""
        if self.pipeline == "npu_static" and n_tokens > self.max_prompt_len:
            raise InvalidRequest(self._too_long(n_tokens))

    def prepare(self, req: GenerationRequest) -> list[int]:
        """What the gateway asks before streaming, to answer 400 rather than fail midway."""
        self._grammar(req)  # a schema that cannot be enforced is a 400 now, not mid-stream
        if req.tokens is not None:
            return list(req.tokens)
        return self.tokenize(req.prompt)  # the gateway compares its length with info().max_prompt_len

    def _grammar(self, req: GenerationRequest) -> str | None:
        """The request's grammar, converted and checked; InvalidRequest for a schema kiln
        cannot enforce (as on llama.cpp) or a grammar outside the checked dialect."""
        if req.json_schema is None:
            return None
        if self.no_grammar:
            raise InvalidRequest(NO_GRAMMAR.format(self.no_grammar))
        text = for_schema(req.json_schema)
        try:
            _checked(text)
        except GrammarError as e:
            log.error("%s: refused a grammar kiln's converter made: %s", self.spec.name, e)
            raise InvalidRequest(OUTSIDE_DIALECT.format(e)) from None
        return text

    def _too_long(self, n: int) -> str:
        source = (self.spec.extra or {}).get("source") or "SOURCE"
        suggest = npu_prompt_size(n, self.prefill_chunk)
        return (f"the prompt is {n} tokens; this model was compiled for the NPU with "
                f"MAX_PROMPT_LEN={self.max_prompt_len}. Recompile with a larger limit: "
                f"kiln compile {source} --name {self.spec.name} --profile npu --max-prompt-len {suggest}")

    def generation_config(self, req: GenerationRequest, max_new: int) -> Any:
        g = self.ov_genai
        s = req.sampling
        c = g.GenerationConfig()
        c.apply_chat_template = False  # the gateway renders the template
        base = self._runner.base_config if self._runner else None
        if base is not None:
            if base.eos_token_id >= 0:
                c.eos_token_id = base.eos_token_id
            c.stop_token_ids = set(base.stop_token_ids)
        c.max_new_tokens = max_new
        if s.temperature > 0:
            c.do_sample = True
            c.temperature = float(s.temperature)
            if 0 < s.top_p < 1:
                c.top_p = float(s.top_p)
            if s.top_k > 0:
                c.top_k = int(s.top_k)
            if s.min_p > 0:
                c.min_p = float(s.min_p)
            c.rng_seed = int(s.seed) if s.seed is not None else random.getrandbits(31)
        if s.repeat_penalty > 0:
            c.repetition_penalty = float(s.repeat_penalty)
        c.presence_penalty = float(s.presence_penalty)
        c.frequency_penalty = float(s.frequency_penalty)
        grammar = self._grammar(req)  # also here: submit() may come without prepare()
        if grammar is not None:
            c.structured_output_config = g.StructuredOutputConfig(grammar=grammar)
        if s.logprobs is not None:  # the gateway refused these already (EngineInfo.capabilities)
            if self.pipeline == "npu_static":
                raise InvalidRequest(NO_NPU_LOGPROBS)
            if s.logprobs > 0:
                raise InvalidRequest(NO_TOP_LOGPROBS)
            c.logprobs = 1  # the sampled token's (OpenVINO GenAI computes no more)
        c.validate()
        return c

    # -- the protocol ----------------------------------------------------------------
    def embed(self, texts: list[str | list[int]]) -> Embeddings:
        if self._embedder is not None:
            return self._embedder.embed(texts)
        if self._hidden is None:
            raise InvalidRequest(NO_EMBEDDINGS.format(name=self.spec.name))
        limit = self.info().num_ctx
        return self._hidden.embed([self.tokenize(t) if isinstance(t, str) else list(t) for t in texts], limit)

    def submit(self, req: GenerationRequest, emit: Emit) -> None:
        if self._embedder is not None:  # the gateway refuses generation first ("completion" is not a capability)
            emit(Chunk(finish_reason=FinishReason.ERROR, detail=f"{self.spec.name} is an embedding model"))
            return
        st = _Request(req, emit, self._decode, self._piece)
        try:
            assert self._runner is not None
            self._runner.submit(st)
        except Exception as e:  # noqa: BLE001 - submit never raises
            st.fail(f"could not queue the request: {e}")

    def cancel(self, req_id: str) -> None:
        if self._runner is not None:
            self._runner.cancel(req_id)

    def info(self) -> EngineInfo:
        if self._embedder is not None:
            e = self._embedder
            return EngineInfo(device=self.device or "", num_ctx=e.max_length, num_parallel=1,
                              capabilities=Capabilities(embeddings=True), n_vocab=self.n_vocab,
                              details={"devices": self.devices, "fallbacks": list(self.fallbacks),
                                       "pipeline": self.pipeline, "format": "openvino",
                                       "load_seconds": self.load_seconds, "pooling": e.pooling,
                                       "normalize": e.normalize, "embedding_length": e.dimensions})
        caps = self.capabilities if not self.no_grammar else dataclasses.replace(self.capabilities, grammar=False)
        if self._hidden is not None:
            caps = dataclasses.replace(caps, embeddings=True)
        details: dict[str, Any] = {
            "devices": self.devices,
            "fallbacks": list(self.fallbacks),
            "pipeline": self.pipeline,
            "format": "gguf" if self.is_gguf else "openvino",
            "load_seconds": self.load_seconds,
            "cache": self.cache,
        }
        if self._hidden is not None:
            details["embeddings"] = f"hidden states, mean-pooled, on {self._hidden.device}"
        if self.no_grammar:
            details["structured_output"] = f"off: {self.no_grammar}"
        elif self._runner is not None and self._runner.grammar_init_seconds is not None:
            details["grammar_init_seconds"] = self._runner.grammar_init_seconds
        if isinstance(self._runner, _ContinuousBatching):
            return EngineInfo(device=self.device or "", num_ctx=self._runner.num_ctx, num_parallel=self._runner.seqs,
                              capabilities=caps, kv_bytes=self._runner.kv_cache_bytes,
                              n_vocab=self.n_vocab, details=details)
        details["min_response_len"] = self.min_response_len
        details["prefill"] = (f"chunks of {self.prefill_chunk}" if self.prefill_chunk
                              else "static" if self.prefill_chunk == 0 else "openvino default")
        if self.npuw_devices:
            details["npuw_devices"] = self.npuw_devices
        return EngineInfo(device=self.device or "", num_ctx=self.max_prompt_len + self.min_response_len,
                          num_parallel=1, capabilities=dataclasses.replace(caps, logprobs=False),
                          max_prompt_len=self.max_prompt_len, n_vocab=self.n_vocab, details=details)

    def stats(self) -> dict[str, Any]:
        return self._runner.stats() if self._runner else {}

    def close(self) -> None:
        runner, self._runner = self._runner, None
        self._embedder = None
        if runner is not None:
            runner.close()


@functools.lru_cache(maxsize=64)
def _checked(text: str) -> None:
    check(text)  # cached: a request's grammar is checked in prepare() and again at submit


def _canary(g: Any, pipe: Any) -> None:
    """Two greedy tokens after "Hello": a pipeline that answers only padding is broken for
    this model, and must fail at load (so the next device is tried, the reason shown)
    rather than return empty answers. Gemma 3 270M did so through NPUW on the CPU with
    OpenVINO's f16 interconnect (its residual stream overflows f16; npuw_device_properties
    keeps it in f32), and a real NPU computing in f16 may still."""
    import numpy as np
    import openvino as ov

    tok = pipe.get_tokenizer()
    pad = tok.get_pad_token_id()
    if pad < 0:
        return
    cfg = g.GenerationConfig()
    cfg.max_new_tokens, cfg.apply_chat_template = 2, False
    ids = [int(x) for x in tok.encode("Hello", add_special_tokens=True).input_ids.data[0]]
    out = [int(t) for t in pipe.generate(ov.Tensor(np.array([ids], dtype=np.int64)), cfg).tokens[0]]
    if out and all(t == pad for t in out):
        raise BackendError("the NPU pipeline generates only padding for this model (a canary of two "
                           "tokens after 'Hello'); it is not usable on this device")


def _is_gguf(p: Path) -> bool:
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


def _listing(d: str) -> set[str]:
    try:
        return {str(p) for p in Path(d).rglob("*")}
    except OSError:
        return set()
