"""``kiln compile``: a local Hugging Face model directory or a GGUF file -> an OpenVINO
IR (weights compressed with NNCF), tokenizer and detokenizer, in the model store.

Stages, each reported on stderr as ``[i/n] what ... done in Xs``:

1. read and validate the source (GGUF header, architecture), hash it;
2. load it with transformers (a GGUF is dequantized to fp32 on the way);
3. export it with optimum-intel (``export_from_model``, stateful, with KV cache);
4. compress the weights with NNCF (int4 sym/asym with group size and ratio, int8) or
   keep them in fp16;
5. convert the tokenizer and detokenizer with openvino-tokenizers (a BPE GGUF's
   vocabulary is rebuilt as llama.cpp splits it, see ``compile.source``);
6. for ``--profile npu``, compile the static-shape NPU model once and keep the blob
   (``EXPORT_BLOB``), so that the server imports it instead of compiling;
7. move the directory into ``<store>/models/<id>/``, check that OpenVINO GenAI loads
   it from there alone and generates, and write the manifest ``/api/tags`` lists.

``--no-export`` keeps a GGUF as it is (llama, qwen2, qwen3) for OpenVINO GenAI's own
GGUF reader: it goes into the store's blobs and runs on CPU or GPU, never the NPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from backends.gguf import human_number
from backends.openvino.request import (npu_attention_properties, npu_prefill_properties, npu_prompt_size,
                                      npuw_device_properties)
from backends.store import FileRef, Manifest, ModelName, ModelStore
from compile.source import (
    CompileError,
    Source,
    check_architecture,
    compare_tokenizers,
    convert_tokenizer,
    gguf_bpe_tokenizer,
    gguf_path_for_openvino,
    license_of,
    read_source,
    source_sha256,
)

PROFILE_DEVICES = {"npu": ["NPU", "CPU"], "gpu": ["GPU", "CPU"], "cpu": ["CPU"]}
# The NPU profile's prompt limit by default: the model's trained context less the response
# room, up to this. Agents send 7,000-16,000 tokens (Open WebUI's first chat is 7,013,
# OpenClaw's default turn 13,256); the static KV cache is allocated for all of it.
NPU_PROMPT_CAP = 16384
# Chunked prefill (PREFILL_HINT=DYNAMIC): the prompt goes through the static prefill model
# this many tokens at a time, so a long prompt needs no graph of its own length.
NPU_PREFILL_CHUNK = 1024
SMOKE_PROMPT = "The capital of France is"


@dataclass
class Options:
    source: str
    name: str
    profile: str = "cpu"
    weight_format: str = "int4"
    sym: bool = False
    group_size: int = 128
    ratio: float = 1.0
    group_size_fallback: str = "adjust"
    max_prompt_len: int = 0  # 0: from the model's trained context (npu_prompt_len)
    max_prompt_cap: int = NPU_PROMPT_CAP
    min_response_len: int = 128
    prefill_chunk_size: int = NPU_PREFILL_CHUNK  # 0: PREFILL_HINT=STATIC, the whole prompt at once
    npuw_devices: str | None = None
    store: str = ""
    no_export: bool = False
    verify: bool = True
    task: str = "generate"  # or "embedding" (compile.embedding)
    backend: str = "openvino"  # for --task embedding: or "llamacpp" (a GGUF)
    pooling: str | None = None  # --task embedding: overrides the model's own
    embeddings: bool = False  # a generation model: also its hidden states, for /api/embed
    notes: list[str] = field(default_factory=list)  # what the options overrode, to say so

    @property
    def quantization(self) -> str:
        if self.weight_format == "fp16":
            return "F16"
        kind = "SYM" if self.sym else "ASYM"
        if self.weight_format == "int8":
            return f"INT8_{kind}"
        return f"INT4_{kind}_" + ("CW" if self.group_size == -1 else f"G{self.group_size}")


class Progress:
    """``[2/7] loading the model with transformers ... done in 31.2s`` on stderr."""

    def __init__(self, total: int, out: Any = None) -> None:
        self.total, self.n, self.out = total, 0, out or sys.stderr

    def stage(self, label: str) -> _Stage:
        self.n += 1
        return _Stage(self, self.n, label)

    def say(self, text: str) -> None:
        print(f"      {text}", file=self.out, flush=True)


class _Stage:
    def __init__(self, p: Progress, n: int, label: str) -> None:
        self.p, self.n, self.label = p, n, label
        self.seconds = 0.0

    def __enter__(self) -> _Stage:
        self.t = time.monotonic()
        print(f"[{self.n}/{self.p.total}] {self.label} ...", file=self.p.out, flush=True)
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.seconds = time.monotonic() - self.t
        state = "done" if exc_type is None else "failed"
        print(f"[{self.n}/{self.p.total}] {self.label}: {state} in {self.seconds:.1f}s",
              file=self.p.out, flush=True)


# -- the stages -----------------------------------------------------------------------
def load_model(src: Source) -> tuple[Any, Any | None, int]:
    """The transformers model, the source's HF tokenizer (None for a BPE GGUF, whose
    tokenizer is rebuilt from the vocabulary) and its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw: dict[str, Any] = {"dtype": torch.float32, "low_cpu_mem_usage": True}
    if src.kind == "gguf":
        kw["gguf_file"] = src.path.name
        where = str(src.path.parent)
    else:
        where = str(src.path)
    try:
        model = AutoModelForCausalLM.from_pretrained(where, **kw)
    except (ValueError, OSError, ImportError) as e:
        raise CompileError(f"transformers cannot load {src.path}: {e}") from None
    model.eval()
    tok = None
    bpe_gguf = src.gguf is not None and src.gguf.metadata.get("tokenizer.ggml.model") == "gpt2"
    if not bpe_gguf:
        try:
            tok = AutoTokenizer.from_pretrained(where, **({"gguf_file": kw["gguf_file"]} if src.gguf else {}))
        except (ValueError, OSError) as e:
            raise CompileError(f"transformers cannot load the tokenizer of {src.path}: {e}") from None
        if src.gguf is not None:
            tok = spm_gguf_tokenizer(tok, src.gguf)
    return model, tok, sum(p.numel() for p in model.parameters())


def spm_gguf_tokenizer(tok: Any, info: Any) -> Any:
    """transformers' tokenizer of a SentencePiece GGUF vocabulary, made to tokenize as
    llama.cpp does. As converted, its vocabulary has holes (transformers warns so) and
    openvino-tokenizers turned it into one that split Gemma 3's text into pieces no
    model saw; saved and loaded again, it is whole. Then what the conversion leaves out:
    the control tokens (``<start_of_turn>``, ``<end_of_turn>``...) are matched whole in
    the text, and BOS is added when the GGUF says so. Checked against llama.cpp's tokens
    of the same text."""
    import tempfile

    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="kiln-tokenizer-") as d:
        tok.save_pretrained(d)
        tok = AutoTokenizer.from_pretrained(d)

    md = info.metadata
    tokens, types = md.get("tokenizer.ggml.tokens") or [], md.get("tokenizer.ggml.token_type") or []
    control = [str(tokens[i]) for i, t in enumerate(types)
               if t == 3 and not str(tokens[i]).startswith("<unused")]  # Gemma has 6,000 unused ones
    if control:
        tok.add_special_tokens({"additional_special_tokens":
                                [AddedToken(c, special=True, normalized=False) for c in control]})
    if md.get("tokenizer.ggml.add_bos_token") and not getattr(tok, "add_bos_token", True):
        tok.add_bos_token = True
    return tok


# optimum-intel 2.1.0 refuses to export the Gemma family with transformers newer than 5.0
# (GemmaOpenVINOConfig.MAX_TRANSFORMERS_VERSION); kiln's pinned transformers exports Gemma 3's
# text model correctly (its IR loads and generates, on CPU and through the NPU pipeline: the
# last stage of every compile checks that), so for these model types the cap is lifted.
EXPORT_PAST_VERSION_CAP = ("gemma3_text",)


def lift_version_cap(model_type: str) -> None:
    if model_type not in EXPORT_PAST_VERSION_CAP:
        return
    from optimum.exporters.tasks import TasksManager

    config = TasksManager.get_exporter_config_constructor(
        "openvino", task="text-generation-with-past", model_type=model_type, library_name="transformers")
    cls = getattr(config, "func", config)
    if getattr(cls, "MAX_TRANSFORMERS_VERSION", None):
        cls.MAX_TRANSFORMERS_VERSION = None


def export_ir(model: Any, tok: Any, out: Path, opts: Options) -> None:
    from optimum.exporters.openvino import export_from_model
    from optimum.intel import OVConfig

    ov_config = OVConfig(dtype="fp16") if opts.weight_format == "fp16" else None
    lift_version_cap(getattr(model.config, "model_type", ""))
    export_from_model(model, str(out), task="text-generation-with-past", ov_config=ov_config,
                      preprocessors=[tok] if tok is not None else None)


def compress_weights(out: Path, opts: Options) -> None:
    import nncf
    import openvino as ov

    xml = out / "openvino_model.xml"
    model = ov.Core().read_model(str(xml))
    if opts.weight_format == "int8":
        mode = nncf.CompressWeightsMode.INT8_SYM if opts.sym else nncf.CompressWeightsMode.INT8_ASYM
        model = nncf.compress_weights(model, mode=mode)
    else:
        mode = nncf.CompressWeightsMode.INT4_SYM if opts.sym else nncf.CompressWeightsMode.INT4_ASYM
        fallback = nncf.GroupSizeFallbackMode(opts.group_size_fallback)
        try:
            model = nncf.compress_weights(
                model, mode=mode, ratio=opts.ratio, group_size=opts.group_size,
                advanced_parameters=nncf.AdvancedCompressionParameters(group_size_fallback_mode=fallback))
        except nncf.InvalidGroupSizeError as e:
            raise CompileError(f"{e} (or pass --group-size-fallback adjust)") from None
    tmp = out / "openvino_model.compressed.xml"
    ov.save_model(model, str(tmp), compress_to_fp16=False)
    del model
    tmp.replace(xml)
    tmp.with_suffix(".bin").replace(xml.with_suffix(".bin"))


def write_tokenizer(src: Source, tok: Any, out: Path, progress: Progress, scratch: Path) -> None:
    if tok is None:  # a BPE GGUF
        assert src.gguf is not None
        tok = gguf_bpe_tokenizer(src.gguf, warn=progress.say)
        tok.save_pretrained(str(out))  # replaces transformers' SentencePiece-style rendition
    convert_tokenizer(tok, out)
    if src.gguf is not None and src.gguf.metadata.get("tokenizer.ggml.model") == "gpt2":
        bad = compare_tokenizers(out, src.path, scratch)
        progress.say("tokenizer matches OpenVINO GenAI's own GGUF tokenizer" if not bad else
                     f"warning: tokenizer differs from OpenVINO GenAI's GGUF tokenizer on {bad!r}")


def npu_group_size(n_params: int) -> int:
    """OpenVINO's NPU guidance: INT4 symmetric in groups of 128 up to about 5B
    parameters, per channel (-1) above, where it runs faster."""
    return 128 if n_params < 5_000_000_000 else -1


def npu_prompt_len(opts: Options, trained: int) -> tuple[int, str]:
    """The MAX_PROMPT_LEN to compile (as OpenVINO's NPU wrapper will really size it: up to
    a multiple of 64, and of the prefill chunk when chunked) and a note on how it was
    chosen. By default the model's trained context less MIN_RESPONSE_LEN, capped at
    ``max_prompt_cap`` and rounded down to whole chunks; an explicit ``--max-prompt-len``
    is kept (rounded up as NPUW rounds it) unless the model was not trained that far."""
    unit = opts.prefill_chunk_size or 64
    room = trained - opts.min_response_len if trained else 0
    if opts.max_prompt_len:
        n = npu_prompt_size(opts.max_prompt_len, opts.prefill_chunk_size)
        if room and n > room:
            raise CompileError(
                f"--max-prompt-len {opts.max_prompt_len} (compiled as {n}, rounded as OpenVINO's NPU "
                f"wrapper rounds it) plus --min-response-len {opts.min_response_len} is more than the "
                f"{trained} tokens the model was trained for")
        note = "" if n == opts.max_prompt_len else f" (--max-prompt-len {opts.max_prompt_len} rounded up, as OpenVINO's NPU wrapper does)"
        return n, f"MAX_PROMPT_LEN {n}{note}"
    ceiling = min(room, opts.max_prompt_cap) if room else opts.max_prompt_cap
    # less than one chunk: NPUW then prefills statically, in a graph rounded to 64
    n = ceiling // unit * unit or max(64, ceiling // 64 * 64)
    why = (f"the trained context {trained} less MIN_RESPONSE_LEN {opts.min_response_len}" if room and room <= opts.max_prompt_cap
           else f"capped at {opts.max_prompt_cap} (--max-prompt-cap)" if room
           else f"the model names no trained context; --max-prompt-cap {opts.max_prompt_cap}")
    return n, f"MAX_PROMPT_LEN {n}: {why}, in whole prefill chunks of {unit}"


def trained_context(src: Source) -> int:
    if src.gguf is not None:
        return int(src.gguf.context_length or 0)
    return int(src.config.get("max_position_embeddings") or src.config.get("n_positions") or 0)


def npu_properties(opts: Options, ir: Path) -> dict[str, Any]:
    props: dict[str, Any] = {"MAX_PROMPT_LEN": opts.max_prompt_len, "MIN_RESPONSE_LEN": opts.min_response_len}
    props.update(npu_prefill_properties(opts.prefill_chunk_size))
    props.update(npu_attention_properties(ir))
    props.update(npuw_device_properties(opts.npuw_devices))
    return props


def compile_npu(out: Path, opts: Options) -> float:
    """Compiles the static NPU model once, exporting the blob; returns the seconds."""
    import openvino_genai as ov_genai

    t = time.monotonic()
    try:
        pipe = ov_genai.LLMPipeline(str(out), "NPU", **npu_properties(opts, out), EXPORT_BLOB="YES",
                                    BLOB_PATH=str(out / "npu.blob"))
    except Exception as e:  # noqa: BLE001
        raise CompileError(f"the NPU could not compile this model: {_short(e)}") from None
    seconds = time.monotonic() - t
    del pipe
    return seconds


def smoke_test(path: str, device: str, props: dict[str, Any]) -> tuple[float, str]:
    """Loads from the store directory alone and generates a few tokens."""
    import openvino_genai as ov_genai

    t = time.monotonic()
    try:
        pipe = ov_genai.LLMPipeline(path, device, **props)
        seconds = time.monotonic() - t
        cfg = ov_genai.GenerationConfig()
        cfg.max_new_tokens, cfg.apply_chat_template = 8, False
        text = pipe.generate(SMOKE_PROMPT, cfg)
    except Exception as e:  # noqa: BLE001
        raise CompileError(f"OpenVINO GenAI cannot run the result on {device}: {_short(e)}") from None
    return seconds, str(text)


def _short(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith("Exception from ")]
    return " ".join(lines)[:500] or type(e).__name__


def model_id(sha: str, opts: Options) -> str:
    """The directory under models/: one per source and compile settings."""
    key = {k: v for k, v in asdict(opts).items() if k not in ("name", "store", "verify", "source", "notes")}
    return hashlib.sha256(f"{sha}\0{json.dumps(key, sort_keys=True)}".encode()).hexdigest()[:16]


def base_manifest(src: Source, opts: Options, sha: str, n_params: int, tok: Any = None) -> Manifest:
    g = src.gguf
    cfg = src.config
    arch = src.architecture
    m = Manifest(name=opts.name, backend="openvino", format="openvino", family=arch, families=[arch],
                 parameter_size=human_number(n_params) if n_params else "",
                 license=license_of(src), source=str(src.path),
                 devices=list(PROFILE_DEVICES[opts.profile]))
    if g is not None:
        m.context_length, m.embedding_length = g.context_length, g.embedding_length
        m.chat_template = g.chat_template
        m.bos_token, m.eos_token = g.token_text("bos"), g.token_text("eos")
        m.model_info = g.model_info()
    else:
        m.context_length = trained_context(src) or 2048
        m.embedding_length = int(cfg.get("hidden_size") or 0)
        m.model_info = {"general.architecture": arch, "general.parameter_count": n_params,
                        f"{arch}.context_length": m.context_length}
        if tok is not None:
            template = getattr(tok, "chat_template", None)
            m.chat_template = template if isinstance(template, str) else None
            m.bos_token, m.eos_token = tok.bos_token, tok.eos_token
    m.extra = {"profile": opts.profile, "source": str(src.path), "source_sha256": sha}
    return m


# -- the command --------------------------------------------------------------------
def parse_args(argv: list[str] | None, default_store: Callable[[], Path] | None = None) -> Options:
    """``default_store``: the store when ``--store`` is not given. ``kiln compile`` passes
    the gateway's ``models`` setting (compile/ does not import the gateway, and the store's
    location is declared once, in ``server.settings``); ``python -m compile`` has none, so
    it needs ``--store``."""
    ap = argparse.ArgumentParser(
        prog="kiln compile",
        description="Compile a local Hugging Face model directory or GGUF file to OpenVINO IR "
                    "(quantized), with its tokenizer, into kiln's model store.",
        epilog="Needs the compile extra: pip install torch==2.13.0 (a CPU build), then "
               "pip install 'kiln[compile]'. Works offline from local files.")
    ap.add_argument("source", metavar="SOURCE", help="a local HF model directory or a .gguf file")
    ap.add_argument("--name", required=True, help="the model's name in the store, e.g. smollm2-ov:135m")
    ap.add_argument("--profile", choices=["npu", "gpu", "cpu"], default="cpu",
                    help="the target: sets the device preference and, for npu, static shapes (default cpu)")
    ap.add_argument("--weight-format", choices=["int4", "int8", "fp16"], default=None,
                    help="default int4 for text generation, fp16 for an embedding model")
    ap.add_argument("--task", choices=["auto", "generate", "embedding"], default="auto",
                    help="embedding: a sentence-embedding model (served on /api/embed and /v1/embeddings); "
                         "auto (default): embedding for a directory whose sentence-transformers modules.json "
                         "names a Pooling module, else generate")
    ap.add_argument("--backend", choices=["openvino", "llamacpp"], default="openvino",
                    help="--task embedding: the engine to compile for; llamacpp writes a GGUF (BERT models)")
    ap.add_argument("--embeddings", action="store_true",
                    help="a generation model: also export its hidden states (fp16, about twice the "
                         "parameter count in bytes) so that OpenVINO serves /api/embed for it, mean-pooled "
                         "as llama.cpp does")
    ap.add_argument("--pooling", choices=["mean", "cls", "last"], default=None,
                    help="--task embedding: the pooling, when the model's modules.json does not say")
    sym = ap.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=None,
                     help="symmetric quantization (forced for the NPU)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric (default for cpu, gpu)")
    ap.add_argument("--group-size", type=int, default=None,
                    help="int4 group size; -1 is per channel (default: -1 for npu, else 128)")
    ap.add_argument("--group-size-fallback", choices=["adjust", "ignore", "error"], default="adjust",
                    help="layers whose width the group size does not divide: smaller groups (adjust), "
                         "backup precision (ignore) or fail (default adjust)")
    ap.add_argument("--ratio", type=float, default=1.0, help="share of layers in int4, the rest int8 (default 1.0)")
    ap.add_argument("--max-prompt-len", type=int, default=0,
                    help="NPU: MAX_PROMPT_LEN, the longest prompt (with chat history) the static pipeline "
                         "takes (default: the model's trained context less --min-response-len, up to "
                         "--max-prompt-cap)")
    ap.add_argument("--max-prompt-cap", type=int, default=NPU_PROMPT_CAP,
                    help=f"NPU: the default MAX_PROMPT_LEN's ceiling (default {NPU_PROMPT_CAP}; the KV cache "
                         f"for all of it is allocated at load)")
    ap.add_argument("--min-response-len", type=int, default=128, help="NPU: MIN_RESPONSE_LEN (default 128)")
    ap.add_argument("--prefill-chunk-size", type=int, default=NPU_PREFILL_CHUNK,
                    help=f"NPU: prefill the prompt this many tokens at a time (NPUW_LLM_PREFILL_CHUNK_SIZE, a "
                         f"power of two; default {NPU_PREFILL_CHUNK}); 0 = one static prefill of "
                         f"MAX_PROMPT_LEN (PREFILL_HINT=STATIC)")
    ap.add_argument("--npuw-devices", default=None,
                    help="NPU: where OpenVINO's NPU wrapper runs (NPUW_DEVICES); CPU when no NPU is present")
    ap.add_argument("--store", default=None, help="the model store (default: kiln's `models` setting, as "
                                                  "`kiln config` shows it; required with python -m compile)")
    ap.add_argument("--no-export", action="store_true",
                    help="keep a GGUF as it is, for OpenVINO GenAI's GGUF reader (CPU/GPU)")
    ap.add_argument("--no-verify", dest="verify", action="store_false",
                    help="skip loading the result from the store to check it")
    a = ap.parse_args(argv)
    if a.store is None:
        if default_store is None:
            ap.error("--store is required (kiln compile takes the model store from kiln's settings)")
        a.store = str(default_store())
    task = a.task if a.task != "auto" else ("embedding" if is_sentence_model(a.source) else "generate")
    weight_format = a.weight_format or ("fp16" if task == "embedding" else "int4")
    opts = Options(source=a.source, name=a.name, profile=a.profile, weight_format=weight_format,
                   sym=bool(a.sym), group_size=a.group_size if a.group_size is not None else 128,
                   ratio=a.ratio, group_size_fallback=a.group_size_fallback,
                   max_prompt_len=a.max_prompt_len, min_response_len=a.min_response_len,
                   max_prompt_cap=a.max_prompt_cap, prefill_chunk_size=a.prefill_chunk_size,
                   npuw_devices=a.npuw_devices, store=a.store,
                   no_export=a.no_export, verify=a.verify, task=task, backend=a.backend, pooling=a.pooling,
                   embeddings=a.embeddings)
    if task == "embedding" and a.backend == "llamacpp" and weight_format != "fp16":
        ap.error(f"--backend llamacpp writes the GGUF in fp16; --weight-format {weight_format} is for OpenVINO "
                 f"(llama.cpp's llama-quantize makes smaller GGUFs)")
    if task == "embedding" and a.embeddings:
        ap.error("--embeddings is for a generation model; an embedding model (--task embedding) is all embeddings")
    if task != "embedding" and (a.backend != "openvino" or a.pooling):
        ap.error("--backend llamacpp and --pooling are for --task embedding (a GGUF of a generation model "
                 "is served by llama.cpp as it is: kiln create NAME -f model.gguf)")
    if task == "embedding" and a.no_export:
        ap.error("--no-export is for GGUF generation models; an embedding model is exported")
    if opts.profile == "npu":
        if a.sym is False:
            opts.notes.append("the NPU needs symmetric weights: --asym overridden, using --sym")
        opts.sym = True
        if a.group_size is None:
            opts.group_size = 0  # decided by the model's size once it is loaded (npu_group_size)
    if not 0 < opts.ratio <= 1:
        ap.error("--ratio must be in (0, 1]")
    if a.group_size is not None and (a.group_size == 0 or a.group_size < -1):
        ap.error("--group-size must be positive or -1")
    if opts.max_prompt_len < 0 or opts.min_response_len < 1 or opts.max_prompt_cap < 64:
        ap.error("--max-prompt-len and --min-response-len must be positive, --max-prompt-cap at least 64")
    chunk = opts.prefill_chunk_size
    if chunk < 0 or chunk & (chunk - 1):
        ap.error("--prefill-chunk-size must be a power of two (or 0 for one static prefill)")
    try:
        ModelName.parse(opts.name)
    except ValueError as e:
        ap.error(str(e))
    return opts


def main(argv: list[str] | None = None, default_store: Callable[[], Path] | None = None) -> int:
    # Offline: a hub id must fail here, not after a long wait on the network.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    opts = parse_args(argv, default_store)
    try:
        manifest = run(opts)
    except CompileError as e:
        print(f"kiln compile: error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("kiln compile: interrupted", file=sys.stderr, flush=True)
        return 130
    where = f"devices {', '.join(manifest.devices)}" if manifest.backend == "openvino" else manifest.backend
    print(f"{manifest.name}: {manifest.quantization}, {manifest.size / 1e6:.1f} MB, {where} -> {opts.store}",
          file=sys.stderr, flush=True)
    return 0


def is_sentence_model(source: str) -> bool:
    """A sentence-transformers directory: its modules.json names a Pooling module."""
    modules = Path(source).expanduser() / "modules.json"
    try:
        return any(str(m.get("type", "")).endswith("Pooling") for m in json.loads(modules.read_text()))
    except (OSError, ValueError, AttributeError):
        return False


def run(opts: Options, out: Any = None) -> Manifest:
    if opts.task == "embedding":
        from compile.embedding import run_embedding

        return run_embedding(opts, out)
    if opts.no_export:
        return run_direct(opts, out)
    progress = Progress((7 if opts.profile == "npu" else 6) + opts.embeddings, out)
    for note in opts.notes:
        progress.say(note)
    with progress.stage(f"reading {opts.source}"):
        src = read_source(opts.source)
        if src.gguf is not None:
            g = src.gguf
            progress.say(f"GGUF v{g.version}: {g.architecture}, {g.quantization}, "
                         f"{human_number(g.parameter_count)} parameters")
        else:
            progress.say(f"Hugging Face directory: {src.architecture}, {src.size / 1e6:.0f} MB")
        check_architecture(src.architecture, kind=src.kind)
        sha = source_sha256(src)
        progress.say(f"sha256 {sha}")
        if opts.profile == "npu":
            opts.max_prompt_len, how = npu_prompt_len(opts, trained_context(src))
            progress.say(how)
    store = ModelStore(opts.store)
    work_root = store.root / "tmp"
    work_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="compile-", dir=work_root))
    try:
        with progress.stage("loading the model with transformers" +
                            (" (dequantizing the GGUF)" if src.gguf else "")):
            model, tok, n_params = load_model(src)
            progress.say(f"{type(model).__name__}, {human_number(n_params)} parameters")
            if opts.group_size == 0:
                opts.group_size = npu_group_size(n_params)
                progress.say(f"NPU group size {opts.group_size} for a model of this size"
                             + (" (per channel)" if opts.group_size == -1 else ""))
        with progress.stage("exporting to OpenVINO IR with optimum-intel"):
            export_ir(model, tok, work, opts)
            del model
        label = ("weights kept in fp16" if opts.weight_format == "fp16"
                 else f"compressing weights to {opts.quantization} (ratio {opts.ratio}) with NNCF")
        with progress.stage(label):
            if opts.weight_format != "fp16":
                compress_weights(work, opts)
        with progress.stage("converting the tokenizer and detokenizer"):
            write_tokenizer(src, tok, work, progress, work_root)
        manifest = base_manifest(src, opts, sha, n_params, tok)
        manifest.quantization = opts.quantization
        manifest.extra["weight_format"] = opts.weight_format
        if opts.weight_format != "fp16":
            manifest.extra["sym"] = opts.sym
        if opts.weight_format == "int4":
            manifest.extra.update(group_size=opts.group_size, ratio=opts.ratio,
                                  group_size_fallback=opts.group_size_fallback)
        if opts.profile == "npu":
            npu_stage(opts, work, manifest, progress)
        hidden = hidden_stage(src, sha, opts, store, progress)
        with progress.stage("writing to the store and checking it loads from there"):
            rel = f"models/{model_id(sha, opts)}"
            final, size = move_into_store(store, work, rel)
            manifest.files = [FileRef(role="ir", path=rel, sha256=sha, size=size), *hidden]
            if opts.verify:
                try:
                    verify(final, opts, manifest, progress)
                except BaseException:
                    shutil.rmtree(final, ignore_errors=True)  # no manifest will point at it
                    raise
            manifest = store.put(manifest)
            progress.say(f"{manifest.name} -> {final}")
        return manifest
    finally:
        shutil.rmtree(work, ignore_errors=True)
        try:
            work_root.rmdir()  # only when no other compile is using it
        except OSError:
            pass


def move_into_store(store: ModelStore, work: Path, rel: str) -> tuple[Path, int]:
    """The exported directory ``work`` becomes ``rel`` under the store (what was there
    before is replaced); its path there and its size in bytes."""
    final = store.root / rel
    if final.exists():
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    work.rename(final)
    return final, sum(f.stat().st_size for f in final.rglob("*") if f.is_file())


def hidden_stage(src: Source, sha: str, opts: Options, store: ModelStore, progress: Progress) -> list[FileRef]:
    """--embeddings: the hidden-state graph, in a directory of its own under models/."""
    if not opts.embeddings:
        return []
    from compile.embedding import export_hidden_states

    with progress.stage("exporting the hidden states (fp16) for /api/embed"):
        rel = f"models/{model_id(sha, opts)}-hidden"
        final = store.root / rel
        if final.exists():
            shutil.rmtree(final)
        size = export_hidden_states(src, final)
        progress.say(f"{size / 1e6:.0f} MB -> {final}")
    return [FileRef(role="embedding", path=rel, size=size)]


def npu_stage(opts: Options, work: Path, manifest: Manifest, progress: Progress) -> None:
    import openvino as ov

    if not opts.npuw_devices and "NPU" not in ov.Core().available_devices:
        opts.npuw_devices = "CPU"
        progress.say("no NPU on this machine: the NPU pipeline runs with its partitions on the CPU "
                     "(NPUW_DEVICES=CPU)")
    where = f"NPUW_DEVICES={opts.npuw_devices}" if opts.npuw_devices else "the NPU"
    prefill = (f"prefill in chunks of {opts.prefill_chunk_size}" if opts.prefill_chunk_size
               else "one static prefill")
    with progress.stage(f"compiling the static NPU model ({where}, MAX_PROMPT_LEN={opts.max_prompt_len}, "
                        f"MIN_RESPONSE_LEN={opts.min_response_len}, {prefill}) and exporting the blob"):
        seconds = compile_npu(work, opts)
        progress.say(f"first load {seconds:.1f}s (compile + blob export), blob "
                     f"{(work / 'npu.blob').stat().st_size / 1e6:.1f} MB")
    manifest.extra.update(
        max_prompt_len=opts.max_prompt_len, min_response_len=opts.min_response_len,
        prefill_chunk_size=opts.prefill_chunk_size,
        npu_blob="npu.blob", npu_first_load_s=round(seconds, 2),
        npu_blob_config={"max_prompt_len": opts.max_prompt_len, "min_response_len": opts.min_response_len,
                         "prefill_chunk_size": opts.prefill_chunk_size,
                         "npuw_devices": opts.npuw_devices, "npuw_f16ic": npuw_device_properties(opts.npuw_devices).get("NPUW_F16IC"),
                         "prefill_attention_hint": npu_attention_properties(work).get("NPUW_LLM_PREFILL_ATTENTION_HINT"),
                         "openvino": ov.__version__})
    if opts.npuw_devices:
        manifest.extra["npuw_devices"] = opts.npuw_devices


def verify(final: Path, opts: Options, manifest: Manifest, progress: Progress) -> None:
    if opts.profile == "npu":
        props = {**npu_properties(opts, final), "BLOB_PATH": str(final / "npu.blob"),
                 "WEIGHTS_PATH": str(final / "openvino_model.bin")}
        seconds, text = smoke_test(str(final), "NPU", props)
        first = manifest.extra.get("npu_first_load_s") or 0
        manifest.extra["npu_blob_load_s"] = round(seconds, 2)
        progress.say(f"NPU blob import {seconds:.1f}s vs first load {first:.1f}s "
                     f"({first / max(seconds, 1e-3):.1f}x faster)")
    else:
        seconds, text = smoke_test(str(final), "CPU", {})
        progress.say(f"loaded on CPU in {seconds:.1f}s" +
                     (" (the IR is the same for the GPU)" if opts.profile == "gpu" else ""))
    progress.say(f"{SMOKE_PROMPT!r} -> {text!r}")


def run_direct(opts: Options, out: Any = None) -> Manifest:
    """--no-export: the GGUF itself, for OpenVINO GenAI's GGUF reader."""
    progress = Progress(3 + opts.embeddings, out)
    with progress.stage(f"reading {opts.source}"):
        src = read_source(opts.source)
        if src.gguf is None:
            raise CompileError("--no-export takes a .gguf file; a Hugging Face directory must be exported")
        if opts.profile == "npu":
            raise CompileError("a GGUF cannot run on the NPU as it is; drop --no-export to compile it to IR")
        check_architecture(src.architecture, kind="gguf", direct=True)
        tok_model = src.gguf.metadata.get("tokenizer.ggml.model")
        if tok_model != "gpt2":
            raise CompileError(f"OpenVINO GenAI reads only BPE (gpt2) GGUF tokenizers; this one is "
                               f"'{tok_model}'. Drop --no-export to convert it to IR")
        sha = source_sha256(src)
        progress.say(f"GGUF v{src.gguf.version}: {src.architecture}, {src.gguf.quantization}, sha256 {sha}")
    store = ModelStore(opts.store)
    with progress.stage("copying the GGUF into the store"):
        def chunks() -> Any:
            with open(src.path, "rb") as f:
                yield from iter(lambda: f.read(1 << 20), b"")

        blob = store.blob_path(f"sha256:{sha}")
        if not blob.is_file():
            store.write_blob(f"sha256:{sha}", chunks())
    hidden = hidden_stage(src, sha, opts, store, progress)
    with progress.stage("checking OpenVINO GenAI loads it"):
        m = base_manifest(src, opts, sha, src.gguf.parameter_count)
        m.format, m.quantization = "gguf", src.gguf.quantization
        m.files = [FileRef(role="model", path=str(blob.relative_to(store.root)), sha256=sha, size=src.size),
                   *hidden]
        if opts.verify:
            (store.root / "tmp").mkdir(exist_ok=True)
            scratch = Path(tempfile.mkdtemp(prefix="verify-", dir=store.root / "tmp"))
            try:
                seconds, text = smoke_test(gguf_path_for_openvino(blob, scratch), "CPU", {})
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            progress.say(f"loaded on CPU in {seconds:.1f}s; {SMOKE_PROMPT!r} -> {text!r}")
        m = store.put(m)
    return m
