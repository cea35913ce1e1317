"""A BERT sentence-embedding model (a Hugging Face directory) -> a GGUF llama.cpp loads,
with the ``gguf`` package (the compile extra).

llama.cpp's own converter (``convert_hf_to_gguf.py`` and its ``conversion/`` package) is
in llama-cpp-python's sdist but not in the wheel pip installs, so ``kiln compile`` cannot
call it; this writes what its ``BertModel`` class writes (llama.cpp 0.3.36's
``conversion/bert.py``): the hyper-parameters, non-causal attention, the
sentence-transformers pooling, the WordPiece vocabulary in llama.cpp's "phantom space"
form (a word-initial token gets U+2581 in front, a ``##`` continuation loses its
``##``), the special token ids, and the tensors under llama.cpp's names
(``gguf.get_tensor_name_map``). Only the plain ``bert`` model type: its relatives
(RoBERTa, Nomic, Jina) need the converter's other classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compile.source import CompileError

POOLING_TYPES = {"mean": 1, "cls": 2, "last": 3}  # gguf.PoolingType
GGUF_ARCHITECTURES = ("bert",)
F32_TENSORS = ("position_embd.weight", "token_types.weight")


def write_bert_gguf(model: Any, tok: Any, src_dir: Path, config: dict[str, Any], pooling: str,
                    out: Path, weight_format: str) -> None:
    import gguf
    import torch

    if config.get("model_type") not in GGUF_ARCHITECTURES:
        raise CompileError(f"kiln writes GGUF embedding models of the {', '.join(GGUF_ARCHITECTURES)} architecture; "
                           f"this one is '{config.get('model_type')}'. Compile it for OpenVINO instead "
                           f"(--backend openvino)")
    if weight_format not in ("fp16", "f32"):
        raise CompileError(f"a GGUF embedding model is written in fp16 (or f32), not {weight_format}")
    n_layer = int(config["num_hidden_layers"])
    w = gguf.GGUFWriter(str(out), "bert")
    w.add_name(src_dir.name)
    w.add_block_count(n_layer)
    w.add_context_length(int(config.get("max_position_embeddings") or 512))
    w.add_embedding_length(int(config["hidden_size"]))
    w.add_feed_forward_length(int(config["intermediate_size"]))
    w.add_head_count(int(config["num_attention_heads"]))
    w.add_layer_norm_eps(float(config.get("layer_norm_eps") or 1e-12))
    w.add_causal_attention(False)
    w.add_pooling_type(gguf.PoolingType(POOLING_TYPES[pooling]))
    f16 = weight_format == "fp16"
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)

    # the vocabulary, as llama.cpp's BertModel.set_vocab writes it
    vocab = tok.vocab
    size = int(config.get("vocab_size") or len(vocab))
    reverse = {i: t for t, i in vocab.items()}
    added = set(tok.get_added_vocab())
    tokens, types = [], []
    for i in range(size):
        t = reverse.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif t in added:
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL)
        else:
            tokens.append(t[2:] if t.startswith("##") else "\u2581" + t)
            types.append(gguf.TokenType.NORMAL)
    w.add_token_type_count(int(config.get("type_vocab_size") or 1))
    w.add_tokenizer_model("bert")
    w.add_tokenizer_pre("default")  # llama.cpp ignores the pre-tokenizer of a WordPiece vocabulary
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(src_dir, n_vocab=len(tokens)).add_to_gguf(w)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, n_layer)
    for name, t in model.state_dict().items():
        name = name.removeprefix("bert.")
        if name in ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias") or name.startswith("cls."):
            continue
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise CompileError(f"no llama.cpp name for the tensor {name}")
        data = t.detach().to(torch.float32).numpy()
        # as llama.cpp's converter: matrices in f16; norms, biases, 1-D tensors and the position
        # and token-type embeddings in f32 (ggml adds those to f32 activations, and its CPU
        # add of an f16 operand aborts: "binary_op: unsupported types")
        if f16 and data.ndim == 2 and not new.endswith("_norm.weight") and new not in F32_TENSORS:
            data = data.astype("float16")
        w.add_tensor(new, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
