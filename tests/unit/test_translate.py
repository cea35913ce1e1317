"""Table-driven tests of the dialect translations (no HTTP), like Ollama's openai_test.go."""

import base64
import datetime as dt
import struct

import pytest

from backends.base import Chunk, FinishReason, Usage
from server.errors import BadRequest
from server.inference import Result
from server.ollama import translate as ol
from server.ollama.protocol import ChatRequest, GenerateRequest
from server.openai import translate as oa
from server.openai.protocol import ChatCompletionRequest, CompletionRequest

RESULT = Result(FinishReason.LENGTH, Usage(prompt_tokens=10, completion_tokens=5, cached_tokens=3,
                                           prompt_ns=1000, eval_ns=2000), total_ns=5000, load_ns=7)


# -- Ollama ---------------------------------------------------------------------------

def test_ollama_chat_to_internal():
    req = ChatRequest(model="m", messages=[{"role": "User", "content": "hi"}], options={"temperature": 0.1},
                      keep_alive="1m", tools=[], format="json")
    inf = ol.chat_to_internal(req)
    assert inf.messages == [{"role": "user", "content": "hi"}]
    assert inf.options == {"temperature": 0.1} and inf.keep_alive == 60 and inf.tools is None
    assert inf.format == "json"


@pytest.mark.parametrize("keep_alive, seconds", [(None, None), (0, 0), (1800, 1800), ("5m", 300), ("1h30m", 5400),
                                                 ("-1", float("inf")), (-1, float("inf")), ("250ms", 0.25)])
def test_keep_alive(keep_alive, seconds):
    assert ol.keep_alive(keep_alive) == seconds


@pytest.mark.parametrize("bad", ["forever", "5x", "m", True])
def test_keep_alive_bad(bad):
    with pytest.raises(BadRequest):
        ol.keep_alive(bad)


@pytest.mark.parametrize("fmt, expected", [(None, None), ("", None), ("json", "json"), ({"type": "object"},
                                                                                        {"type": "object"})])
def test_format(fmt, expected):
    assert ol.check_format(fmt) == expected


def test_format_bad():
    with pytest.raises(BadRequest, match="invalid format"):
        ol.check_format("xml")


@pytest.mark.parametrize("req, message", [
    (dict(raw=True, system="s"), "raw mode"),
    (dict(raw=True, context=[1, 2]), "context"),  # raw mode has no context (Ollama's 400)
    (dict(think="lots"), "invalid think"),
])
def test_generate_refusals(req, message):
    with pytest.raises(BadRequest, match=message):
        ol.generate_to_internal(GenerateRequest(model="m", prompt="p", **req))


def test_ollama_final_metrics_are_integers():
    final = ol.generate_final("M", RESULT, "text")
    assert final["done"] is True and final["done_reason"] == "length" and final["response"] == "text"
    for key in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration", "prompt_eval_count",
                "eval_count"):
        assert type(final[key]) is int
    assert final["prompt_eval_count"] == 10  # caching never changes the reported count
    assert dt.datetime.fromisoformat(final["created_at"]).tzinfo is not None
    chunk = ol.chat_chunk("M", Chunk(text="a"))
    assert chunk["message"] == {"role": "assistant", "content": "a"} and chunk["done"] is False


def test_parameters_text_matches_continue_regex():
    import re

    text = ol.parameters_text({"stop": ["<|im_end|>", "x"], "temperature": 0.2, "num_ctx": 2048})
    for line in text.splitlines():
        assert re.match(r'^(\S+)\s+((?:".*")|\S+)$', line), line
    assert 'stop                           "<|im_end|>"' in text


# -- OpenAI -------------------------------------------------------------------------------

def chat_req(**kw):
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], **kw)


@pytest.mark.parametrize("kw, options", [
    ({}, {}),
    ({"max_tokens": 5}, {"num_predict": 5}),
    ({"max_completion_tokens": 6, "max_tokens": 5}, {"num_predict": 6}),
    ({"temperature": 0, "seed": 3, "stop": "x"}, {"temperature": 0, "seed": 3, "stop": ["x"]}),
    ({"frequency_penalty": 0.5, "presence_penalty": -0.5}, {"frequency_penalty": 0.5, "presence_penalty": -0.5}),
    # num_ctx: top-level (extra_body) over an Ollama options object; OpenAI fields over options
    ({"num_ctx": 16384}, {"num_ctx": 16384}),
    ({"options": {"num_ctx": 2048, "temperature": 0.3}}, {"num_ctx": 2048, "temperature": 0.3}),
    ({"options": {"num_ctx": 2048}, "num_ctx": 4096, "temperature": 0.5}, {"num_ctx": 4096, "temperature": 0.5}),
])
def test_openai_options(kw, options):
    inf = oa.chat_to_internal(chat_req(**kw))
    assert inf.options == options
    # OpenAI's 1.0 is only a fallback, applied after the model's parameters and policy
    assert inf.fallback == {"temperature": 1.0, "top_p": 1.0}


@pytest.mark.parametrize("header, body, want", [
    ("16384", {}, 16384),
    (" 2048 ", {"options": {"num_ctx": 1024}}, 1024),  # the body wins over the header
    ("4096", {"num_ctx": 8192}, 8192),
])
def test_openai_num_ctx_header(header, body, want):
    assert oa.chat_to_internal(chat_req(**body), num_ctx_header=header).options["num_ctx"] == want


@pytest.mark.parametrize("header", ["big", "0", "1.5"])
def test_openai_num_ctx_header_refused(header):
    with pytest.raises(BadRequest, match="X-Kiln-Num-Ctx"):
        oa.chat_to_internal(chat_req(), num_ctx_header=header)


@pytest.mark.parametrize("kw, message", [
    ({"temperature": 3}, "temperature"),
    ({"top_p": -0.1}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 0}, "n must be between 1 and 128"),
    ({"n": 129}, "n must be between 1 and 128"),
    ({"logit_bias": {"x": 2}}, "logit_bias"),
    ({"logit_bias": {"1": 101}}, "between -100 and 100"),
    ({"logit_bias": {"-1": 1}}, "negative"),
    ({"top_logprobs": 2}, "requires logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {}}}, "schema"),
])
def test_openai_refusals(kw, message):
    with pytest.raises(BadRequest, match=message):
        oa.chat_to_internal(chat_req(**kw))


def test_openai_logprobs_and_logit_bias_reach_the_inference():
    inf = oa.chat_to_internal(chat_req(logprobs=True, top_logprobs=3, logit_bias={"7": -100, "9": 2.5}))
    assert inf.logprobs == 3 and inf.logit_bias == {7: -100.0, 9: 2.5}
    assert oa.chat_to_internal(chat_req(logprobs=True)).logprobs == 0
    assert oa.chat_to_internal(chat_req(logprobs=False, top_logprobs=None)).logprobs is None


def test_openai_messages():
    req = ChatCompletionRequest(model="m", messages=[
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ])
    msgs = oa.chat_to_internal(req).messages
    assert msgs[0] == {"role": "system", "content": "be brief"}
    assert msgs[1]["content"] == "a\nb"
    assert msgs[2]["tool_calls"][0]["function"]["arguments"] == {"x": 1}
    assert msgs[3]["tool_call_id"] == "c1"


@pytest.mark.parametrize("rf, fmt", [(None, None), ({"type": "text"}, None), ({"type": "json_object"}, "json"),
                                     ({"type": "json_schema", "json_schema": {"schema": {"type": "object"}}},
                                      {"type": "object"})])
def test_response_format(rf, fmt):
    assert oa.response_format(rf) == fmt


def test_openai_shapes():
    body = oa.chat_completion("chatcmpl-1", "M", "hello", RESULT)
    assert body["object"] == "chat.completion" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
                             "prompt_tokens_details": {"cached_tokens": 3}}
    s = oa.ChatStream("M", include_usage=True)
    first, content, *tail = [s.role(), s.content(Chunk(text="x")), *s.finish(RESULT)]
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert content["choices"][0]["delta"] == {"content": "x"} and content["usage"] is None
    assert tail[0]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "length", "logprobs": None}
    assert tail[1]["choices"] == [] and tail[1]["usage"]["total_tokens"] == 15
    assert len({c["id"] for c in (first, content, *tail)}) == 1


def test_completion_request():
    [inf] = oa.completion_to_internal(CompletionRequest(model="m", prompt=["once"], max_tokens=3))
    assert inf.raw and inf.prompt == "once" and inf.options["num_predict"] == 3
    a, b = oa.completion_to_internal(CompletionRequest(model="m", prompt=["a", [4, 5]], n=2))
    assert (a.prompt, a.prompt_ids, b.prompt, b.prompt_ids, a.n, b.n) == ("a", None, "", [4, 5], 2, 2)
    with pytest.raises(BadRequest):
        oa.completion_to_internal(CompletionRequest(model="m", prompt=["a"] * 65))


def test_base64_embedding_is_little_endian_float32():
    enc = oa.encode_embedding([1.0, -0.5], "base64")
    assert struct.unpack("<2f", base64.b64decode(enc)) == (1.0, -0.5)
