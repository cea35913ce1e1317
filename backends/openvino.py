"""OpenVINO GenAI engine: continuous batching on CPU/GPU, the static pipeline on the NPU.

One engine per loaded model, inside its worker process (``backends.worker``).

* CPU and GPU run a ``ContinuousBatchingPipeline`` driven by one stepping thread:
  ``add_request`` per request, ``step()`` while there is work, each handle read only
  when ``can_read()`` (``read()`` blocks, and ``step()`` holds the GIL for a whole step).
  Token ids are decoded here, incrementally, so that stop strings, counts and UTF-8
  boundaries are handled the same way on every device.
* The NPU runs the stateful ``LLMPipeline(path, "NPU")``: static shapes, batch 1, so
  requests queue FIFO in one thread and stream through a ``StreamerBase``.

Devices are tried in order (``spec.devices``, default NPU, GPU, CPU). A device that
cannot take the model, or fails to compile or load it, is recorded in
``info()["fallbacks"]`` with its reason and the next one is tried.

``spec.path`` is an OpenVINO IR directory (``openvino_model.xml`` plus
``openvino_tokenizer.xml``/``openvino_detokenizer.xml``, as ``kiln compile`` writes
it) or a ``.gguf`` file (llama, qwen2 or qwen3 with a BPE tokenizer; not on the NPU).
``spec.num_parallel`` is the batch's ``max_num_seqs``; ``spec.num_ctx`` is the
context of each sequence, and the KV cache is sized to hold ``num_parallel`` full
contexts and allocated at load by a warm-up step (so a device without the memory fails
at load and falls through, rather than at the tenth request). ``spec.cache_dir`` is
OpenVINO's ``CACHE_DIR``.

Sampling: temperature (greedy at 0), top_p, top_k, min_p, the repetition, presence and
frequency penalties and the seed map to a ``GenerationConfig`` per request;
``typical_p`` and ``repeat_last_n`` have no OpenVINO counterpart and are ignored.
Stop strings are matched here, on the decoded text, so none is ever returned.

``spec.extra`` keys (all optional):

``max_prompt_len`` (int, 1024), ``min_response_len`` (int, 128)
    The NPU's static shapes (``MAX_PROMPT_LEN``/``MIN_RESPONSE_LEN``). The NPU's KV
    cache holds their sum; a longer prompt is refused (``check_prompt``).
``npuw_devices`` (str)
    ``NPUW_DEVICES``: where OpenVINO's NPU wrapper runs its partitions. ``"CPU"``
    runs the whole NPU pipeline on the CPU (tests, machines without an NPU).
``npuw_online_pipeline`` (str)
    ``NPUW_ONLINE_PIPELINE`` (OpenVINO's default, ``REG``, when unset).
``npu_blob`` (str), ``npu_blob_config`` (dict)
    The NPU model compiled ahead of time by ``kiln compile --profile npu`` (a path
    relative to the IR directory, imported with ``WEIGHTS_PATH``), and the settings it
    was compiled with (``max_prompt_len``, ``min_response_len``, ``npuw_devices``). A
    blob whose settings differ from the ones in force, or that fails to import (say,
    after an OpenVINO upgrade), is skipped and the model is compiled afresh.
``source`` (str)
    Where the model came from; named in the recompile hint of an over-long prompt.
``ov_properties`` (dict), ``device_properties`` (dict of device -> dict)
    Extra OpenVINO properties for every device, or for one.
``max_num_batched_tokens`` (int, ``max(spec.num_batch, 256)``), ``enable_prefix_caching``
    (bool, true): the batch's ``SchedulerConfig``.
``kv_block_size`` (int; 32 on CPU, 16 elsewhere): tokens per KV block, for sizing.
"""

from __future__ import annotations

import logging
import os
import queue
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
    Engine,
    FinishReason,
    GenerationRequest,
    InvalidRequest,
    ModelSpec,
    Usage,
)
from backends.text import StopMatcher

log = logging.getLogger("kiln.openvino")

DEFAULT_DEVICES = ["NPU", "GPU", "CPU"]
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")  # openvino-genai's GGUF reader
DEFAULT_MAX_PROMPT_LEN = 1024
DEFAULT_MIN_RESPONSE_LEN = 128


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

    def __init__(self, req: GenerationRequest, emit: Emit, decode: Any) -> None:
        self.req, self.emit = req, emit
        self.detok = _Detokenizer(decode)
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

    def feed(self, ids: list[int]) -> bool:
        """Takes generated ids; emits the text they complete. True on a stop string."""
        if not ids or self.done:
            return self.stop.stopped
        if self.t_first is None:
            self.t_first = time.monotonic_ns()
        self.generated += len(ids)
        self.pending += len(ids)
        text = self.stop.feed(self.detok.feed(ids))
        if text:
            self.emit(Chunk(text=text, n_tokens=self.pending))
            self.pending = 0
        return self.stop.stopped

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
        self.emit(Chunk(text=tail, n_tokens=self.pending, finish_reason=reason, usage=usage,
                        detail=detail))

    def fail(self, detail: str) -> None:
        self.finish(FinishReason.ERROR, detail)


class OpenVINOEngine(Engine):
    name = "openvino"
    # No grammar: OpenVINO GenAI compiles a structured-output grammar (xgrammar) inside
    # step(), and one that fails to compile makes that and every later step() of the
    # pipeline fail (probed on 2026.4.1); there is no way to check a grammar first
    # without the xgrammar package, which needs torch.
    capabilities = Capabilities(batching=True, tokenize=True, grammar=False, embeddings=False)

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
        self.devices = [d.strip() for d in (spec.devices or DEFAULT_DEVICES) if d.strip()]
        self.fallbacks: list[dict[str, str]] = []
        self.device: str | None = None
        self.pipeline = ""
        self.cache = "none"
        self._tok_lock = threading.Lock()
        self._runner: _Runner | None = None
        t0 = time.monotonic()
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
        self._bos = self._bos_prefix()
        self._runner.start(self)

    # -- loading -------------------------------------------------------------------
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
        if self.npuw_devices:
            props["NPUW_DEVICES"] = self.npuw_devices
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
                  "npuw_devices": self.npuw_devices}
        differ = sorted(k for k, v in wanted.items() if built.get(k) != v)
        if differ:
            return None, f"blob built for other {', '.join(differ)}; "
        return blob, ""

    # -- tokens --------------------------------------------------------------------
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

    def tokenize(self, text: str) -> list[int]:
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

    def validate(self, req: GenerationRequest) -> None:
        """What the gateway asks before streaming, to answer 400 rather than fail midway."""
        if req.json_schema is not None or req.grammar:
            raise InvalidRequest("the openvino backend does not do grammar-constrained decoding")
        if self.pipeline == "npu_static":
            self.check_prompt(len(self.tokenize(req.prompt)))

    def _too_long(self, n: int) -> str:
        source = (self.spec.extra or {}).get("source") or "SOURCE"
        suggest = -(-n // 1024) * 1024
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
        if req.json_schema is not None or req.grammar:
            raise InvalidRequest("the openvino backend does not do grammar-constrained decoding")
        c.validate()
        return c

    # -- the protocol ----------------------------------------------------------------
    def submit(self, req: GenerationRequest, emit: Emit) -> None:
        st = _Request(req, emit, self._decode)
        try:
            assert self._runner is not None
            self._runner.submit(st)
        except Exception as e:  # noqa: BLE001 - submit never raises
            st.fail(f"could not queue the request: {e}")

    def cancel(self, req_id: str) -> None:
        if self._runner is not None:
            self._runner.cancel(req_id)

    def info(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "device": self.device,
            "devices": self.devices,
            "fallbacks": list(self.fallbacks),
            "pipeline": self.pipeline,
            "format": "gguf" if self.is_gguf else "openvino",
            "load_seconds": self.load_seconds,
            "cache": self.cache,
        }
        if self.pipeline == "npu_static":
            d.update(max_prompt_len=self.max_prompt_len, min_response_len=self.min_response_len,
                     num_ctx=self.max_prompt_len + self.min_response_len, num_parallel=1)
            if self.npuw_devices:
                d["npuw_devices"] = self.npuw_devices
        elif isinstance(self._runner, _ContinuousBatching):
            d.update(num_ctx=self._runner.num_ctx, num_parallel=self._runner.seqs,
                     kv_cache_bytes=self._runner.kv_cache_bytes)
        return d

    def stats(self) -> dict[str, Any]:
        return self._runner.stats() if self._runner else {}

    def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.close()


def _is_gguf(p: Path) -> bool:
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


def _listing(d: str) -> set[str]:
    try:
        return {str(p) for p in Path(d).rglob("*")}
    except OSError:
        return set()


class _Runner:
    """A pipeline and the one thread that drives it."""

    tokenizer: Any
    base_config: Any

    def __init__(self) -> None:
        self.engine: OpenVINOEngine | None = None
        self.thread: threading.Thread | None = None
        self.active: dict[str, _Request] = {}

    def start(self, engine: OpenVINOEngine) -> None:
        self.engine = engine
        self.thread = threading.Thread(target=self.loop, name=f"ov-{engine.spec.name}", daemon=True)
        self.thread.start()

    def loop(self) -> None:
        raise NotImplementedError

    def submit(self, st: _Request) -> None:
        raise NotImplementedError

    def cancel(self, req_id: str) -> None:
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        raise NotImplementedError

    def prepare(self, st: _Request, room: int, what: str, ids: list[int] | None = None) -> Any:
        """Tokenizes, caps max_new_tokens to what is left of ``room`` and builds the
        config; None if the request was finished here instead."""
        assert self.engine is not None
        ids = self.engine.tokenize(st.req.prompt) if ids is None else ids
        st.prompt_tokens = len(ids)
        left = room - len(ids)
        if left <= 0:
            st.fail(f"the prompt is {len(ids)} tokens; {what} holds {room}")
            return None
        asked = st.req.sampling.max_tokens
        if asked is not None and asked <= 0:
            st.finish(FinishReason.LENGTH)
            return None
        st.max_new = left if asked is None else min(asked, left)
        if asked is None or asked > left:
            st.capped_by = f"{what} is full ({room} tokens)"
        try:
            cfg = self.engine.generation_config(st.req, st.max_new)
        except InvalidRequest as e:
            st.fail(str(e))
            return None
        except Exception as e:  # noqa: BLE001 - a bad option fails this request only
            st.fail(f"invalid generation options: {short_error(e)}")
            return None
        return ids, cfg

    def length_detail(self, st: _Request) -> str | None:
        return st.capped_by if st.capped_by and st.generated >= st.max_new else None


class _ContinuousBatching(_Runner):
    def __init__(self, factory: Any, num_ctx: int, seqs: int) -> None:
        super().__init__()
        self.factory = factory  # builds the pipeline again after a failed step
        self.num_ctx, self.seqs, self.next_id = num_ctx, seqs, 0
        self.pipe = self.build()
        self.tokenizer = self.pipe.get_tokenizer()
        self.base_config = self.pipe.get_config()
        self.cv = threading.Condition()
        self.incoming: list[_Request] = []
        self.cancels: set[str] = set()
        self.closed = False
        self.handles: dict[str, Any] = {}
        self.snapshot: dict[str, Any] = {}
        self.broken: str | None = None

    def build(self) -> Any:
        """The pipeline, after one warm-up step: OpenVINO allocates the KV cache at the
        first step, and a device without the memory must fail here, at load, where the
        engine can fall back to the next device."""
        import openvino_genai as g

        pipe = self.factory()
        cfg = g.GenerationConfig()
        cfg.max_new_tokens, cfg.apply_chat_template = 1, False
        handle = pipe.add_request(self.next_id, "Hello", cfg)  # a dropped handle drops the request
        self.next_id += 1
        while pipe.has_non_finished_requests():
            pipe.step()
        del handle
        self.kv_cache_bytes = pipe.get_metrics().cache_size_in_bytes
        return pipe

    def submit(self, st: _Request) -> None:
        with self.cv:
            if self.closed:
                raise BackendError("the model is unloading")
            self.incoming.append(st)
            self.cv.notify()

    def cancel(self, req_id: str) -> None:
        with self.cv:
            self.cancels.add(req_id)
            self.cv.notify()

    def loop(self) -> None:
        import numpy as np
        import openvino as ov

        g = self.engine.ov_genai  # type: ignore[union-attr]
        while True:
            busy = bool(self.active) or (self.pipe is not None and self.pipe.has_non_finished_requests())
            if not busy:  # what the last step reported is over: nothing is left in the pipeline
                self.snapshot.update(requests=0, scheduled_requests=0)
            with self.cv:
                while not (self.closed or self.incoming or self.cancels or busy):
                    self.cv.wait()
                if self.closed:
                    break
                incoming, self.incoming = self.incoming, []
                cancels, self.cancels = self.cancels, set()
            for st in incoming:
                if self.broken:
                    st.fail(self.broken)
                    continue
                if st.req.id in cancels:
                    st.cancelled = True
                    st.finish(FinishReason.CANCELLED)
                    continue
                prepared = self.prepare(st, self.num_ctx, "the context window (num_ctx)")
                if prepared is None:
                    continue
                ids, cfg = prepared
                try:
                    tensor = ov.Tensor(np.array([ids], dtype=np.int64))
                    self.handles[st.req.id] = self.pipe.add_request(self.next_id, tensor, cfg)
                    self.next_id += 1
                    self.active[st.req.id] = st
                except Exception as e:  # noqa: BLE001
                    st.fail(f"could not start the request: {short_error(e)}")
            for rid in cancels:
                st = self.active.pop(rid, None)
                if st is not None:
                    self.handles.pop(rid).cancel()
                    st.cancelled = True
                    st.finish(FinishReason.CANCELLED)
            if self.pipe is None or (not self.active and not self.pipe.has_non_finished_requests()):
                continue
            try:
                self.pipe.step()
            except Exception as e:  # noqa: BLE001 - the batch failed: tell each request
                log.exception("step() failed")
                for rid, st in list(self.active.items()):
                    self.handles.pop(rid).cancel()
                    st.fail(f"OpenVINO failed: {short_error(e)}")
                self.active.clear()
                self.rebuild()
                continue
            for rid, st in list(self.active.items()):
                self.drain(rid, st, g)
            m = self.pipe.get_metrics()
            self.snapshot = {"requests": m.requests, "scheduled_requests": m.scheduled_requests,
                             "kv_cache_usage": m.cache_usage, "kv_cache_bytes": m.cache_size_in_bytes}
        for rid, st in list(self.active.items()):
            self.handles.pop(rid).cancel()
            st.fail("the model was unloaded")
        self.active.clear()

    def rebuild(self) -> None:
        """A request that fails inside step() stays in the pipeline and fails every
        later step (an xgrammar error does), so a failed step costs a fresh pipeline."""
        self.pipe = None  # free the old one first: two may not fit
        try:
            self.pipe = self.build()
            log.warning("rebuilt the pipeline after a failed step")
        except Exception as e:  # noqa: BLE001
            log.exception("could not rebuild the pipeline")
            self.broken = f"the pipeline could not be rebuilt after a failure: {short_error(e)}"

    def drain(self, rid: str, st: _Request, g: Any) -> None:
        h = self.handles[rid]
        finish = None
        while h.can_read():
            for out in h.read().values():
                if st.feed(list(out.generated_ids)):
                    h.stop()
                    self.end(rid)
                    st.finish(FinishReason.STOP)
                    return
                if out.finish_reason != g.GenerationFinishReason.NONE:
                    finish = out.finish_reason
        status = h.get_status()
        if finish is None and status == g.GenerationStatus.RUNNING:
            return
        self.end(rid)
        if finish == g.GenerationFinishReason.STOP:
            st.finish(FinishReason.STOP)
        elif finish == g.GenerationFinishReason.LENGTH:
            st.finish(FinishReason.LENGTH, self.length_detail(st))
        elif status == g.GenerationStatus.IGNORED:
            # The scheduler dropped it for want of KV blocks: say so, never cut silently.
            st.finish(FinishReason.LENGTH, "the KV cache is full (raise num_ctx or lower num_parallel)")
        elif status in (g.GenerationStatus.CANCEL, g.GenerationStatus.STOP):
            st.finish(FinishReason.CANCELLED)
        else:
            st.finish(FinishReason.LENGTH if st.generated >= st.max_new else FinishReason.STOP,
                      self.length_detail(st))

    def end(self, rid: str) -> None:
        self.active.pop(rid, None)
        self.handles.pop(rid, None)

    def stats(self) -> dict[str, Any]:
        return {"active": len(self.active), "queued": len(self.incoming), **self.snapshot}

    def close(self) -> None:
        with self.cv:
            self.closed = True
            self.cv.notify()
        if self.thread is not None:
            self.thread.join(timeout=30)


class _NpuStatic(_Runner):
    def __init__(self, pipe: Any, max_prompt_len: int, min_response_len: int) -> None:
        super().__init__()
        self.pipe = pipe
        self.max_prompt_len, self.min_response_len = max_prompt_len, min_response_len
        self.tokenizer = pipe.get_tokenizer()
        self.base_config = pipe.get_generation_config()
        self.queue: queue.Queue[_Request | None] = queue.Queue()
        self.waiting: dict[str, _Request] = {}
        self.lock = threading.Lock()

    def submit(self, st: _Request) -> None:
        with self.lock:
            self.waiting[st.req.id] = st
        self.queue.put(st)

    def cancel(self, req_id: str) -> None:
        with self.lock:
            st = self.active.get(req_id) or self.waiting.get(req_id)
            if st is not None:
                st.cancelled = True  # the streamer returns CANCEL at its next token

    def loop(self) -> None:
        while (st := self.queue.get()) is not None:
            with self.lock:
                self.waiting.pop(st.req.id, None)
                if st.cancelled:
                    st.finish(FinishReason.CANCELLED)
                    continue
                self.active[st.req.id] = st
            try:
                self.run(st)
            except Exception as e:  # noqa: BLE001
                log.exception("NPU generate failed")
                st.fail(f"OpenVINO failed: {short_error(e)}")
            finally:
                with self.lock:
                    self.active.pop(st.req.id, None)

    def run(self, st: _Request) -> None:
        import numpy as np
        import openvino as ov

        engine = self.engine
        assert engine is not None
        g = engine.ov_genai
        ids = engine.tokenize(st.req.prompt)
        if len(ids) > self.max_prompt_len:  # the backstop for a gateway that did not check first
            st.prompt_tokens = len(ids)
            st.fail(engine._too_long(len(ids)))
            return
        capacity = self.max_prompt_len + self.min_response_len
        prepared = self.prepare(st, capacity, "the NPU's KV cache (MAX_PROMPT_LEN + MIN_RESPONSE_LEN)", ids)
        if prepared is None:
            return
        ids, cfg = prepared
        state = {"stop": False}

        class Streamer(g.StreamerBase):
            def write(self, token: Any) -> Any:
                tokens = token if isinstance(token, list) else [token]
                if st.feed([int(t) for t in tokens]):
                    state["stop"] = True
                    return g.StreamingStatus.STOP
                if st.cancelled:
                    return g.StreamingStatus.CANCEL
                return g.StreamingStatus.RUNNING

            def end(self) -> None:
                pass

        res = self.pipe.generate(ov.Tensor(np.array([ids], dtype=np.int64)), cfg, Streamer())
        reasons = list(getattr(res, "finish_reasons", []) or [])
        reason = reasons[0] if reasons else g.GenerationFinishReason.NONE
        if state["stop"]:
            st.finish(FinishReason.STOP)
        elif st.cancelled:
            st.finish(FinishReason.CANCELLED)
        elif reason == g.GenerationFinishReason.STOP:
            st.finish(FinishReason.STOP)
        elif reason == g.GenerationFinishReason.LENGTH or st.generated >= st.max_new:
            st.finish(FinishReason.LENGTH, self.length_detail(st))
        else:
            # NONE without a cancel: the static KV cache ran out (the pipeline says no more).
            st.finish(FinishReason.LENGTH, f"the NPU's KV cache is full ({capacity} tokens)")

    def stats(self) -> dict[str, Any]:
        return {"active": len(self.active), "queued": len(self.waiting)}

    def close(self) -> None:
        with self.lock:
            for st in self.active.values():
                st.cancelled = True
        while True:  # requests still waiting get an answer, not silence
            try:
                st = self.queue.get_nowait()
            except queue.Empty:
                break
            if st is not None:
                st.fail("the model was unloaded")
        self.queue.put(None)
        if self.thread is not None:
            self.thread.join(timeout=60)
