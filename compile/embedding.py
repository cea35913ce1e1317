"""``kiln compile --task embedding``: a sentence-embedding model (a local Hugging Face
directory, e.g. all-MiniLM-L6-v2 as sentence-transformers saves it) -> the model store,
for OpenVINO (an IR exported by optimum-intel for feature extraction, run by
``TextEmbeddingPipeline``) or for llama.cpp (``--backend llamacpp``: a GGUF written by
``compile.gguf_bert``, BERT only).

The pooling, normalisation and longest input are the model's own: sentence-transformers'
``modules.json`` (a ``Pooling`` module and its ``config.json``; a ``Normalize`` module)
and ``sentence_bert_config.json`` (``max_seq_length``). A directory without them needs
``--pooling``. The last stage loads the result from the store and compares its vectors
with the transformers model's (the same pooling and normalisation) on a few sentences:
a compile whose cosine similarity falls below ``MIN_COSINE`` fails.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from backends.gguf import human_number
from backends.store import FileRef, Manifest, ModelStore
from compile.source import CompileError, Source, convert_tokenizer, license_of, read_source, source_sha256

MIN_COSINE = 0.99
PROBES = ["The capital of France is Paris.", "A man is playing a guitar on the street.",
          "Embeddings map text to vectors; similar meanings land close together."]


def sentence_config(path: Path, pooling: str | None) -> dict[str, Any]:
    """pooling ("mean", "cls", "last"), normalize and max_length from sentence-transformers'
    files; ``pooling`` (``--pooling``) overrides theirs."""
    found: str | None = None
    normalize = False
    modules = path / "modules.json"
    if modules.is_file():
        for mod in json.loads(modules.read_text()):
            kind = str(mod.get("type", ""))
            if kind.endswith("Pooling"):
                cfg = json.loads((path / mod.get("path", "") / "config.json").read_text())
                if cfg.get("pooling_mode_mean_tokens"):
                    found = "mean"
                elif cfg.get("pooling_mode_cls_token"):
                    found = "cls"
                elif cfg.get("pooling_mode_lasttoken"):
                    found = "last"
                elif cfg.get("pooling_mode") in ("mean", "cls", "lasttoken"):
                    found = {"lasttoken": "last"}.get(cfg["pooling_mode"], cfg["pooling_mode"])
                else:
                    raise CompileError(f"{path}: its pooling ({cfg}) is none of mean, CLS, last token, "
                                       f"which is all OpenVINO GenAI and llama.cpp pool by")
            elif kind.endswith("Normalize"):
                normalize = True
            elif not kind.endswith("Transformer"):
                raise CompileError(f"{path}: the sentence-transformers module {kind} has no counterpart in "
                                   f"OpenVINO GenAI or llama.cpp (only Transformer, Pooling, Normalize)")
    chosen = pooling or found
    if chosen is None:
        raise CompileError(f"{path} has no sentence-transformers modules.json naming its pooling; pass "
                           f"--pooling mean|cls|last as the model's card says")
    max_length = 0
    sbert = path / "sentence_bert_config.json"
    if sbert.is_file():
        max_length = int(json.loads(sbert.read_text()).get("max_seq_length") or 0)
    return {"pooling": chosen, "normalize": normalize, "max_length": max_length}


def reference(model: Any, tok: Any, texts: list[str], pooling: str, normalize: bool) -> Any:
    """What sentence-transformers computes for these modules: the transformer's last hidden
    state, pooled over the attention mask, L2-normalised when a Normalize module follows."""
    import torch

    b = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**b).last_hidden_state
    mask = b["attention_mask"].unsqueeze(-1).to(h.dtype)
    if pooling == "mean":
        v = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    elif pooling == "cls":
        v = h[:, 0]
    else:  # the last real token (right padding)
        v = h[torch.arange(h.shape[0]), b["attention_mask"].sum(1) - 1]
    if normalize:
        v = torch.nn.functional.normalize(v, dim=-1)
    return v.numpy()


def cosines(a: Any, b: Any) -> list[float]:
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return [float(x) for x in (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))]


def check_exportable(arch: str) -> None:
    try:
        import optimum.exporters.openvino  # noqa: F401 - registers the OpenVINO export configs
        from optimum.exporters.tasks import TasksManager
    except ImportError as e:
        raise CompileError(f"the compile extra is not installed ({e}); see kiln compile --help") from None
    if arch not in TasksManager.get_supported_model_type_for_task("feature-extraction", exporter="openvino"):
        raise CompileError(f"unsupported architecture '{arch}': optimum-intel cannot export it to OpenVINO "
                           f"for feature extraction")


def run_embedding(opts: Any, out: Any = None) -> Manifest:
    from compile.openvino import Progress, compress_weights, model_id, move_into_store

    progress = Progress(4 if opts.backend == "llamacpp" else 5, out)
    for note in opts.notes:
        progress.say(note)
    with progress.stage(f"reading {opts.source}"):
        src = read_source(opts.source)
        if src.kind != "hf":
            raise CompileError("an embedding model is compiled from its Hugging Face directory (config.json, "
                               "modules.json, weights), not from a GGUF")
        if opts.profile == "npu":
            raise CompileError("embedding models are compiled with dynamic shapes, which the NPU cannot run; "
                               "use --profile cpu or gpu")
        if opts.backend == "openvino":
            check_exportable(src.architecture)
        st = sentence_config(src.path, opts.pooling)
        sha = source_sha256(src)
        progress.say(f"Hugging Face directory: {src.architecture}, {src.size / 1e6:.0f} MB; pooling {st['pooling']}"
                     f"{', normalized' if st['normalize'] else ''}, inputs up to "
                     f"{st['max_length'] or 'the trained context of'} tokens; sha256 {sha}")
    store = ModelStore(opts.store)
    work_root = store.root / "tmp"
    work_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="compile-", dir=work_root))
    try:
        with progress.stage("loading the model with transformers"):
            model, tok, n_params = load_encoder(src)
            progress.say(f"{type(model).__name__}, {human_number(n_params)} parameters")
        max_length = st["max_length"] or int(src.config.get("max_position_embeddings") or 512)
        manifest = embedding_manifest(src, opts, sha, n_params, st, max_length)
        if opts.backend == "llamacpp":
            with progress.stage(f"writing a GGUF for llama.cpp ({opts.weight_format})"):
                from compile.gguf_bert import write_bert_gguf

                gguf_file = work / "model.gguf"
                write_bert_gguf(model, tok, src.path, src.config, st["pooling"], gguf_file, opts.weight_format)
        else:
            with progress.stage("exporting to OpenVINO IR with optimum-intel (feature extraction)"):
                export_encoder(model, tok, work, opts)
            label = ("weights kept in fp16" if opts.weight_format == "fp16"
                     else f"compressing weights to {opts.quantization} with NNCF")
            with progress.stage(label + ", converting the tokenizer"):
                if opts.weight_format != "fp16":
                    compress_weights(work, opts)
                convert_tokenizer(tok, work)
        with progress.stage("writing to the store and checking its vectors against transformers'"):
            ref = reference(model, tok, PROBES, st["pooling"], st["normalize"])
            if opts.backend == "llamacpp":
                from backends.store import sha256_file

                digest = sha256_file(gguf_file)
                blob = store.blob_path(f"sha256:{digest}")
                shutil.move(str(gguf_file), blob)
                size = blob.stat().st_size
                manifest.files = [FileRef(role="model", path=str(blob.relative_to(store.root)),
                                          sha256=digest, size=size)]
                final = blob
            else:
                rel = f"models/{model_id(sha, opts)}"
                final, size = move_into_store(store, work, rel)
                manifest.files = [FileRef(role="ir", path=rel, sha256=sha, size=size)]
            if opts.verify:
                try:
                    got, seconds = embed_from_store(final, manifest, PROBES)
                    cos = cosines(got, ref)
                    progress.say(f"loaded in {seconds:.1f}s; {len(got[0])} dimensions; cosine similarity to "
                                 f"transformers' vectors: min {min(cos):.5f} on {len(PROBES)} sentences")
                    if min(cos) < MIN_COSINE:
                        raise CompileError(f"the compiled model's vectors differ from the source's (cosine "
                                           f"{min(cos):.4f} < {MIN_COSINE}); try --weight-format fp16")
                    manifest.extra["verified_min_cosine"] = round(min(cos), 6)
                except BaseException:
                    if final.is_dir():
                        shutil.rmtree(final, ignore_errors=True)
                    else:
                        final.unlink(missing_ok=True)
                    raise
            manifest = store.put(manifest)
            progress.say(f"{manifest.name} -> {final}")
        return manifest
    finally:
        shutil.rmtree(work, ignore_errors=True)
        try:
            work_root.rmdir()
        except OSError:
            pass


def load_encoder(src: Source) -> tuple[Any, Any, int]:
    import torch
    from transformers import AutoModel, AutoTokenizer

    try:
        model = AutoModel.from_pretrained(str(src.path), dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(src.path))
    except (ValueError, OSError, ImportError) as e:
        raise CompileError(f"transformers cannot load {src.path}: {e}") from None
    model.eval()
    return model, tok, sum(p.numel() for p in model.parameters())


def export_encoder(model: Any, tok: Any, out: Path, opts: Any) -> None:
    from optimum.exporters.openvino import export_from_model
    from optimum.intel import OVConfig

    ov_config = OVConfig(dtype="fp16") if opts.weight_format == "fp16" else None
    export_from_model(model, str(out), task="feature-extraction", ov_config=ov_config, preprocessors=[tok])


def embedding_manifest(src: Source, opts: Any, sha: str, n_params: int, st: dict[str, Any],
                       max_length: int) -> Manifest:
    from compile.openvino import PROFILE_DEVICES

    arch, cfg = src.architecture, src.config
    dims = int(cfg.get("hidden_size") or 0)
    llama = opts.backend == "llamacpp"
    m = Manifest(name=opts.name, backend="llamacpp" if llama else "openvino", format="gguf" if llama else "openvino",
                 family=arch, families=[arch], parameter_size=human_number(n_params),
                 quantization="F16" if opts.weight_format == "fp16" else opts.quantization,
                 context_length=max_length, embedding_length=dims, license=license_of(src), source=str(src.path),
                 capabilities=["embedding"], devices=[] if llama else list(PROFILE_DEVICES[opts.profile]))
    m.model_info = {"general.architecture": arch, "general.parameter_count": n_params,
                    f"{arch}.context_length": max_length, f"{arch}.embedding_length": dims,
                    f"{arch}.pooling_type": st["pooling"]}
    m.extra = {"task": "embedding", "pooling": st["pooling"], "normalize": st["normalize"],
               "max_length": max_length, "source": str(src.path), "source_sha256": sha,
               "weight_format": opts.weight_format}
    if not llama:
        m.extra["profile"] = opts.profile
    return m


def embed_from_store(final: Path, m: Manifest, texts: list[str]) -> tuple[list[list[float]], float]:
    """Loads the result as the server will (the same engine class) and embeds ``texts``."""
    from backends.base import ModelSpec

    spec = ModelSpec(name=m.name, path=str(final), backend=m.backend, num_ctx=m.context_length,
                     devices=["CPU"], embedding=True, extra=dict(m.extra))
    t = time.monotonic()
    try:
        if m.backend == "llamacpp":
            from backends.llamacpp import LlamaCppEngine

            engine: Any = LlamaCppEngine(spec)
        else:
            from backends.openvino import OpenVINOEngine

            engine = OpenVINOEngine(spec)
        seconds = time.monotonic() - t
        try:
            return engine.embed(list(texts)).vectors, seconds
        finally:
            engine.close()
    except CompileError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CompileError(f"{m.backend} cannot run the result: {e}") from None


# -- a generation model's hidden states (kiln compile --embeddings) ---------------------
def export_hidden_states(src: Source, out: Path) -> int:
    """The generation model's last hidden states (after its final norm) as an OpenVINO graph
    of their own (optimum-intel's feature extraction, fp16), for ``/api/embed`` on a model
    OpenVINO serves: the engine mean-pools them over the model's own tokens, as llama.cpp
    does for a model without a pooling type (and Ollama with it). Returns its size."""
    import torch
    from optimum.exporters.openvino import export_from_model
    from optimum.intel import OVConfig
    from transformers import AutoModel

    kw: dict[str, Any] = {"dtype": torch.float32}
    where = str(src.path)
    if src.kind == "gguf":
        kw["gguf_file"], where = src.path.name, str(src.path.parent)
    try:
        model = AutoModel.from_pretrained(where, **kw)
    except (ValueError, OSError, ImportError) as e:
        raise CompileError(f"transformers cannot load {src.path} for its hidden states: {e}") from None
    model.eval()
    try:
        export_from_model(model, str(out), task="feature-extraction", ov_config=OVConfig(dtype="fp16"))
    except Exception as e:  # noqa: BLE001 - the exporter has many ways to fail
        raise CompileError(f"optimum-intel cannot export the hidden states of {src.architecture}: {e}") from None
    return sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
