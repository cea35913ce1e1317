"""``kiln compile --profile npu``: the static prompt limit sized from the model's trained
context, chunked prefill, and what the settings refuse (no model needed; the real NPUW-on-CPU
compile and run are in tests/backends/test_openvino.py)."""

from __future__ import annotations

import json

import pytest

from backends.openvino.request import npu_attention_properties, npu_prefill_properties
from compile.openvino import NPU_PREFILL_CHUNK, NPU_PROMPT_CAP, Options, npu_prompt_len, npu_properties, parse_args
from compile.source import CompileError


def npu(*args: str) -> Options:
    return parse_args(["model.gguf", "--name", "m:1", "--profile", "npu", "--store", "store", *args])


def test_defaults_size_the_prompt_for_agents_from_the_trained_context():
    o = npu()
    assert (o.max_prompt_len, o.max_prompt_cap, o.prefill_chunk_size) == (0, NPU_PROMPT_CAP, NPU_PREFILL_CHUNK)
    # Gemma 3 270M, 32,768 trained: capped at 16K, whole chunks
    n, how = npu_prompt_len(o, 32768)
    assert n == 16384 and "capped at 16384" in how
    # SmolLM2, 8,192 trained: 8192 - 128 response tokens, down to whole 1024-token chunks
    n, how = npu_prompt_len(o, 8192)
    assert n == 7168 and "trained context 8192" in how
    # a 13K agent prompt fits the default on a 32K model; a model trained for less than a
    # chunk gets a static prefill of what it has (NPUW does not chunk a prompt of one chunk)
    assert npu_prompt_len(o, 32768)[0] > 13_256
    assert npu_prompt_len(o, 1024)[0] == 896
    assert npu_prompt_len(o, 0)[0] == NPU_PROMPT_CAP  # no trained context named: the cap


def test_the_cap_and_the_limit_are_settable():
    assert npu_prompt_len(npu("--max-prompt-cap", "8192"), 32768)[0] == 8192
    # explicit: kept, rounded up to whole chunks as OpenVINO's NPU wrapper rounds it
    n, how = npu_prompt_len(npu("--max-prompt-len", "14000"), 32768)
    assert n == 14336 and "rounded up" in how
    assert npu_prompt_len(npu("--max-prompt-len", "4096"), 32768)[0] == 4096
    # one chunk or less is prefilled statically: only rounded to 64
    assert npu_prompt_len(npu("--max-prompt-len", "256"), 32768)[0] == 256
    assert npu_prompt_len(npu("--max-prompt-len", "1000"), 32768)[0] == 1024
    # without chunks NPUW rounds to 64
    assert npu_prompt_len(npu("--max-prompt-len", "1000", "--prefill-chunk-size", "0"), 32768)[0] == 1024
    assert npu_prompt_len(npu("--max-prompt-len", "100", "--prefill-chunk-size", "0"), 32768)[0] == 128


def test_a_limit_past_the_trained_context_is_refused():
    with pytest.raises(CompileError, match="more than the 8192 tokens the model was trained for"):
        npu_prompt_len(npu("--max-prompt-len", "8192"), 8192)


@pytest.mark.parametrize("bad", [["--prefill-chunk-size", "1000"], ["--prefill-chunk-size", "-2"],
                                 ["--max-prompt-len", "-1"], ["--max-prompt-cap", "10"]])
def test_bad_settings_are_refused(bad, capsys):
    with pytest.raises(SystemExit):
        npu(*bad)
    assert "error:" in capsys.readouterr().err


def test_properties_ask_for_chunked_prefill(tmp_path):
    o = npu("--max-prompt-len", "14336", "--npuw-devices", "CPU")
    assert npu_properties(o, tmp_path) == {"MAX_PROMPT_LEN": 14336, "MIN_RESPONSE_LEN": 128, "PREFILL_HINT": "DYNAMIC",
                                 "NPUW_LLM_PREFILL_CHUNK_SIZE": 1024, "NPUW_DEVICES": "CPU",
                                 "NPUW_F16IC": "NO"}  # f32 between NPUW's partitions on the CPU (Gemma 3)
    assert npu_properties(npu("--npuw-devices", "NPU,CPU"), tmp_path)["NPUW_DEVICES"] == "NPU,CPU"
    assert "NPUW_F16IC" not in npu_properties(npu("--npuw-devices", "NPU,CPU"), tmp_path)  # a real NPU: OpenVINO's default
    assert npu_prefill_properties(0) == {"PREFILL_HINT": "STATIC"}
    assert npu_prefill_properties(None) == {}  # a manifest from before: OpenVINO's default


def test_kiln_compile_writes_to_the_store_the_settings_name(monkeypatch, tmp_path, capsys):
    """``kiln compile`` without --store uses the server's ``models`` setting (here from the
    TOML file, which the compiler once ignored for KILN_MODELS/OLLAMA_MODELS and a fixed
    path); ``python -m compile`` has no settings and needs --store."""
    import compile.openvino as ov
    from server.cli import main as kiln

    seen: list[str] = []

    def run(opts: Options, out: object = None) -> None:
        seen.append(opts.store)
        raise CompileError("stopped before compiling")

    monkeypatch.setattr(ov, "run", run)
    cfg = tmp_path / "kiln.toml"
    cfg.write_text(f'models = "{tmp_path / "from-toml"}"\n')
    monkeypatch.setenv("KILN_CONFIG", str(cfg))
    monkeypatch.delenv("KILN_MODELS", raising=False)
    monkeypatch.delenv("OLLAMA_MODELS", raising=False)
    assert kiln(["compile", "model.gguf", "--name", "m:1"]) == 1
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "from-env"))
    assert kiln(["compile", "model.gguf", "--name", "m:1"]) == 1
    assert kiln(["compile", "model.gguf", "--name", "m:1", "--store", str(tmp_path / "given")]) == 1
    assert seen == [str(tmp_path / "from-toml"), str(tmp_path / "from-env"), str(tmp_path / "given")]
    with pytest.raises(SystemExit):
        ov.main(["model.gguf", "--name", "m:1"])
    assert "--store is required" in capsys.readouterr().err


@pytest.mark.parametrize("config, hint", [
    ({"model_type": "gemma3_text", "sliding_window": 512,
      "layer_types": ["sliding_attention"] * 5 + ["full_attention"]}, "STATIC"),
    ({"model_type": "gemma3", "text_config": {"sliding_window": 1024}}, "STATIC"),  # no layer_types: all slide
    ({"model_type": "qwen2", "sliding_window": 32768, "use_sliding_window": False}, None),
    ({"model_type": "gemma3_text", "sliding_window": 512, "layer_types": ["full_attention"] * 6}, None),
    ({"model_type": "llama"}, None),
])
def test_sliding_window_models_prefill_with_static_attention(tmp_path, config, hint):
    """Gemma 3 through NPUW with chunked prefill answered <eos> or '* * *' at 1,000-2,000 tokens
    with the pipeline's default prefill attention (backends.openvino.request.npu_attention_properties)."""
    (tmp_path / "config.json").write_text(json.dumps(config))
    props = npu_properties(npu("--npuw-devices", "CPU"), tmp_path)
    assert props.get("NPUW_LLM_PREFILL_ATTENTION_HINT") == hint
    assert npu_attention_properties(tmp_path / "missing") == {}
