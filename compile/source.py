"""What ``kiln compile`` reads: the source (a local Hugging Face directory or a GGUF
file), its architecture, licence and digest, and its tokenizer.

Nothing here touches the network. transformers and optimum are imported only by the
checks that need them.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backends.gguf import GGUFError, GGUFInfo, read_gguf
from backends.store import sha256_file

# What openvino-genai 2026.4's own GGUF reader builds (gguf_modeling.cpp).
DIRECT_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")
# llama.cpp's pre-tokenizer splits for BPE ("gpt2") GGUF vocabularies (llama-vocab.cpp).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
                 r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
                r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS: dict[str, list[str]] = {
    "gpt-2": [_GPT2_SPLIT], "default": [_GPT2_SPLIT],
    "smollm": [r"\p{N}", _GPT2_SPLIT], "starcoder": [r"\p{N}", _GPT2_SPLIT],
    "llama-bpe": [_LLAMA3_SPLIT], "llama3": [_LLAMA3_SPLIT], "smaug-bpe": [_LLAMA3_SPLIT],
    "qwen2": [_QWEN2_SPLIT], "deepseek-r1-qwen": [_QWEN2_SPLIT],
}
_PROBES = ["Hello world", "<|im_start|>user\nWhat is 12345 + 678?<|im_end|>\n",
           "  spaces   and\ttabs\n\nnew lines", "émoji 🎉 日本語 don't I'll"]


class CompileError(Exception):
    """A compile that cannot go on; the message is all the user sees."""


@dataclass
class Source:
    path: Path
    kind: str  # "gguf" or "hf"
    architecture: str
    gguf: GGUFInfo | None = None
    config: dict[str, Any] = field(default_factory=dict)
    size: int = 0


# -- the source ---------------------------------------------------------------------
def read_source(source: str) -> Source:
    """Validates SOURCE without touching the network or a heavy library."""
    p = Path(source).expanduser()
    if not p.exists():
        if re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not source.endswith(".gguf"):
            raise CompileError(
                f"'{source}' is not a local directory or .gguf file; kiln compile works offline from "
                f"local files (download the model first, e.g. with huggingface-cli download {source} "
                f"--local-dir DIR, then kiln compile DIR)")
        raise CompileError(f"{source}: no such file or directory")
    if p.is_file():
        try:
            info = read_gguf(p, full_arrays=True)  # the tokenizer is built from its vocabulary
        except GGUFError as e:
            raise CompileError(f"{source} is not a usable GGUF file: {e}") from None
        return Source(p.resolve(), "gguf", info.architecture, gguf=info, size=info.size)
    cfg = p / "config.json"
    if not cfg.is_file():
        ggufs = sorted(p.glob("*.gguf"))
        hint = f" (to compile a GGUF, pass the file: {ggufs[0]})" if ggufs else ""
        raise CompileError(f"{source} has no config.json: not a Hugging Face model directory{hint}")
    try:
        config = json.loads(cfg.read_text())
    except ValueError as e:
        raise CompileError(f"{cfg}: {e}") from None
    arch = str(config.get("model_type") or "")
    if not arch:
        raise CompileError(f"{cfg} names no model_type")
    size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return Source(p.resolve(), "hf", arch, config=config, size=size)


def source_sha256(src: Source) -> str:
    if src.kind == "gguf":
        return sha256_file(src.path)
    h = hashlib.sha256()  # a directory: the digest of its files' names and digests
    for f in sorted(x for x in src.path.rglob("*") if x.is_file() and ".cache" not in x.parts):
        h.update(f"{f.relative_to(src.path).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def _gguf_to_transformers(arch: str) -> str:
    # transformers renames these (modeling_gguf_pytorch_utils.load_gguf_checkpoint)
    return {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "minimax-m2": "minimax_m2"}.get(arch, arch)


def check_architecture(arch: str, *, kind: str, direct: bool = False) -> None:
    """Raises ``CompileError`` unless the architecture can be served as asked.

    ``direct``: a GGUF for openvino-genai's own reader. Otherwise the export path: the
    GGUF must be readable by transformers, and the model type exportable by optimum-intel.
    """
    if direct:
        if arch not in DIRECT_GGUF_ARCHITECTURES:
            raise CompileError(
                f"OpenVINO GenAI reads GGUF files of the {', '.join(DIRECT_GGUF_ARCHITECTURES)} "
                f"architectures; this one is '{arch}'. Drop --no-export to convert it to OpenVINO IR")
        return
    if kind == "gguf":
        try:
            from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
        except ImportError as e:
            raise CompileError(f"the compile extra is not installed ({e}); see kiln compile --help") from None
        supported = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]
        if _gguf_to_transformers(arch) not in supported and arch not in supported:
            raise CompileError(
                f"unsupported architecture '{arch}': transformers cannot read GGUF files of it "
                f"(it reads {', '.join(sorted(supported))})")
        return
    model_types = exportable_model_types()
    if arch not in model_types:
        raise CompileError(f"unsupported architecture '{arch}': optimum-intel cannot export it to "
                           f"OpenVINO for text generation")


def exportable_model_types() -> set[str]:
    try:
        import optimum.exporters.openvino  # noqa: F401 - registers the OpenVINO export configs
        from optimum.exporters.tasks import TasksManager
    except ImportError as e:
        raise CompileError(f"the compile extra is not installed ({e}); see kiln compile --help") from None
    return set(TasksManager.get_supported_model_type_for_task("text-generation-with-past", exporter="openvino"))


def license_of(src: Source) -> str | None:
    if src.gguf is not None:
        lic = src.gguf.metadata.get("general.license")
        return str(lic) if lic else None
    readme = src.path / "README.md"
    if readme.is_file():
        m = re.search(r"^---\s*\n(.*?)\n---", readme.read_text(errors="replace"), re.S)
        if m and (lm := re.search(r"^license:\s*['\"]?([^'\"\n]+)", m.group(1), re.M)):
            return lm.group(1).strip()
    for name in ("LICENSE", "LICENSE.txt", "LICENSE.md"):
        f = src.path / name
        if f.is_file():
            return f.read_text(errors="replace").strip().splitlines()[0][:200] if f.stat().st_size else None
    return None


# -- the tokenizer ------------------------------------------------------------------
def gguf_bpe_tokenizer(info: GGUFInfo, warn: Any = None) -> Any:
    """A Hugging Face fast tokenizer built from a BPE ("gpt2") GGUF vocabulary, split
    as llama.cpp splits it. transformers' own GGUF conversion wraps such vocabularies
    in a SentencePiece-style class that openvino-tokenizers cannot convert."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    md = info.metadata
    tokens = [str(t) for t in md["tokenizer.ggml.tokens"]]
    merges = [tuple(str(m).split(" ", 1)) for m in md.get("tokenizer.ggml.merges", [])]
    types = list(md.get("tokenizer.ggml.token_type", []))
    pre = str(md.get("tokenizer.ggml.pre", "default"))
    splits = PRE_TOKENIZER_SPLITS.get(pre)
    if splits is None:
        splits = [_GPT2_SPLIT]
        if warn:
            warn(f"warning: unknown pre-tokenizer '{pre}'; splitting text as GPT-2 does")
    tk = Tokenizer(BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    # control (3) and user-defined (4) tokens are matched whole in the text, as llama.cpp does
    tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                           for i, t in enumerate(types) if t in (3, 4)])

    def tok(key: str) -> str | None:
        i = md.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    bos = tok("bos")
    if md.get("tokenizer.ggml.add_bos_token") and bos is not None:
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))])
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=tok("eos"),
                                 unk_token=tok("unknown"), pad_token=tok("padding") or tok("eos"))
    if info.chat_template:
        hf.chat_template = info.chat_template
    return hf


def convert_tokenizer(hf_tok: Any, out: Path) -> None:
    import openvino as ov
    from openvino_tokenizers import convert_tokenizer as ov_convert

    try:
        tok, detok = ov_convert(hf_tok, with_detokenizer=True)
    except Exception as e:  # noqa: BLE001 - the conversion has many ways to fail
        raise CompileError(f"openvino-tokenizers cannot convert this tokenizer "
                           f"({type(hf_tok).__name__}): {e}") from None
    ov.save_model(tok, str(out / "openvino_tokenizer.xml"))
    ov.save_model(detok, str(out / "openvino_detokenizer.xml"))


def compare_tokenizers(ir_dir: Path, gguf: Path, scratch: Path) -> list[str]:
    """Probe strings whose ids differ between the converted tokenizer and the one
    OpenVINO GenAI builds from the GGUF itself (what --no-export serving uses)."""
    import openvino_genai as ov_genai

    a, b = ov_genai.Tokenizer(str(ir_dir)), ov_genai.Tokenizer(gguf_path_for_openvino(gguf, scratch))
    bad = []
    for s in _PROBES:
        ia = list(a.encode(s, add_special_tokens=False).input_ids.data[0])
        ib = list(b.encode(s, add_special_tokens=False).input_ids.data[0])
        if ia != ib:
            bad.append(s)
    return bad


def gguf_path_for_openvino(p: Path, scratch: Path) -> str:
    """OpenVINO GenAI recognizes a GGUF by its extension; store blobs have none, so
    they get a ``.gguf`` symlink in ``scratch``."""
    if p.suffix.lower() == ".gguf":
        return str(p)
    link = scratch / f"{p.name}.gguf"
    if not link.exists():
        link.symlink_to(p)
    return str(link)
