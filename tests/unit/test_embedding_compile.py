"""kiln compile --task embedding's reading of a sentence-transformers directory and its
command line (no export: the real compile is tests/real/test_embedding_model.py)."""

from __future__ import annotations

import json

import pytest

from compile.embedding import sentence_config
from compile.openvino import parse_args
from compile.source import CompileError
from tests.models import minilm_dir


def st_dir(tmp_path, modules, pooling=None, sbert=None):
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    if pooling is not None:
        (tmp_path / "1_Pooling").mkdir()
        (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    if sbert is not None:
        (tmp_path / "sentence_bert_config.json").write_text(json.dumps(sbert))
    return tmp_path


T, P, N = ("sentence_transformers.models." + k for k in ("Transformer", "Pooling", "Normalize"))


def test_minilm_is_mean_pooled_normalised_256_tokens():
    assert sentence_config(minilm_dir(), None) == {"pooling": "mean", "normalize": True, "max_length": 256}


def test_cls_pooling_without_normalize(tmp_path):
    d = st_dir(tmp_path, [{"type": T, "path": ""}, {"type": P, "path": "1_Pooling"}],
               {"pooling_mode_cls_token": True}, {"max_seq_length": 512})
    assert sentence_config(d, None) == {"pooling": "cls", "normalize": False, "max_length": 512}
    assert sentence_config(d, "mean")["pooling"] == "mean"  # --pooling overrides


@pytest.mark.parametrize("modules, pooling, fragment", [
    ([{"type": T, "path": ""}, {"type": P, "path": "1_Pooling"}, {"type": "sentence_transformers.models.Dense",
                                                                  "path": "2_Dense"}],
     {"pooling_mode_mean_tokens": True}, "Dense"),
    ([{"type": T, "path": ""}, {"type": P, "path": "1_Pooling"}], {"pooling_mode_max_tokens": True}, "none of mean"),
    ([{"type": T, "path": ""}, {"type": N, "path": "2_Normalize"}], None, "--pooling"),
])
def test_what_neither_engine_can_pool_is_refused(tmp_path, modules, pooling, fragment):
    with pytest.raises(CompileError, match=fragment):
        sentence_config(st_dir(tmp_path, modules, pooling), None)


def test_the_task_is_found_and_weights_default_to_fp16(tmp_path):
    o = parse_args([str(minilm_dir()), "--name", "m:1", "--store", str(tmp_path)])
    assert (o.task, o.weight_format, o.backend) == ("embedding", "fp16", "openvino")
    g = parse_args(["model.gguf", "--name", "m:1", "--store", str(tmp_path)])
    assert (g.task, g.weight_format) == ("generate", "int4")


@pytest.mark.parametrize("args", [["--backend", "llamacpp", "--weight-format", "int4"], ["--embeddings"],
                                  ["--no-export"]])
def test_embedding_flag_conflicts(tmp_path, args, capsys):
    with pytest.raises(SystemExit):
        parse_args([str(minilm_dir()), "--name", "m:1", "--store", str(tmp_path), *args])
    assert "error" in capsys.readouterr().err


def test_llamacpp_backend_is_for_embedding_models(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["model.gguf", "--name", "m:1", "--store", str(tmp_path), "--backend", "llamacpp"])
    assert "--task embedding" in capsys.readouterr().err
