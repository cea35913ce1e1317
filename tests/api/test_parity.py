"""The same request through both dialects gives the engine the same request.

Dialect defaults are the dialects' own and set explicitly in every case (OpenAI's
``/v1/completions`` has ``max_tokens`` 16 and takes its prompt raw, so it is compared with
a raw ``/api/generate``; it has no ``response_format``, so the schema case leaves it out).

Each case is sent through ``/api/chat``, ``/api/generate``, ``/v1/chat/completions`` and
``/v1/completions``, and what the engine received (``GenerationRequest``: sampling, stop
strings, output schema; the prompt between the two chat routes and between the two
completion routes) is compared. A dialect that skips a step of the one generation path
(the generation policy once applied on ``/api`` only) shows up here as a difference.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

MODEL = "smollm2:135m"
USER = "Name three colours."
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}

# name -> (Ollama options and top-level fields, OpenAI fields, kiln settings)
CASES: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    "greedy, seed, stop, max tokens": (
        {"options": {"temperature": 0, "top_p": 1.0, "seed": 7, "stop": ["\n\n", "END"], "num_predict": 5}},
        {"temperature": 0, "top_p": 1.0, "seed": 7, "stop": ["\n\n", "END"], "max_tokens": 5}, {}),
    "sampling and penalties": (
        {"options": {"temperature": 0.5, "top_p": 0.8, "presence_penalty": 0.3, "frequency_penalty": 0.2,
                     "num_predict": 32}},
        {"temperature": 0.5, "top_p": 0.8, "presence_penalty": 0.3, "frequency_penalty": 0.2, "max_tokens": 32}, {}),
    "a JSON schema": (
        {"format": SCHEMA, "options": {"temperature": 0, "top_p": 1.0, "num_predict": 32}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}},
         "temperature": 0, "top_p": 1.0, "max_tokens": 32}, {}),
    "Ollama options on /v1": (
        {"options": {"temperature": 0.2, "top_p": 0.9, "top_k": 5, "min_p": 0.1, "repeat_penalty": 1.2,
                     "num_predict": 8}},
        {"temperature": 0.2, "top_p": 0.9, "max_tokens": 8,
         "options": {"top_k": 5, "min_p": 0.1, "repeat_penalty": 1.2}}, {}),
    "the generation policy clamps both dialects": (
        {"options": {"temperature": 1.9, "top_p": 1.0, "num_predict": 100000}},
        {"temperature": 1.9, "top_p": 1.0, "max_tokens": 100000},
        {"policy": {"limits": {"temperature": {"max": 1.0}, "num_predict": {"max": 64}}}}),
}


def _engine_request(client: Any, fake_engine: Any, path: str, body: dict[str, Any]) -> Any:
    fake_engine.requests.clear()
    r = client.post(path, json={"model": MODEL, "stream": False, **body})
    assert r.status_code == 200, (path, r.text)
    assert len(fake_engine.requests) == 1, path
    return fake_engine.requests[0]


@pytest.mark.parametrize("case", list(CASES))
def test_both_dialects_give_the_engine_the_same_request(make_client, fake_engine, case):
    ollama, openai, settings = CASES[case]
    c = make_client(**settings)
    reqs = {
        "/api/chat": _engine_request(c, fake_engine, "/api/chat",
                                     {"messages": [{"role": "user", "content": USER}], **ollama}),
        "/api/generate": _engine_request(c, fake_engine, "/api/generate", {"prompt": USER, "raw": True, **ollama}),
        "/v1/chat/completions": _engine_request(c, fake_engine, "/v1/chat/completions",
                                                {"messages": [{"role": "user", "content": USER}], **openai}),
    }
    if "response_format" not in openai:
        reqs["/v1/completions"] = _engine_request(c, fake_engine, "/v1/completions", {"prompt": USER, **openai})
    seen = {path: (dataclasses.asdict(r.sampling), r.json_schema) for path, r in reqs.items()}
    first = seen["/api/chat"]
    for path, got in seen.items():
        assert got == first, f"{case}: {path} differs from /api/chat"
    assert reqs["/api/chat"].prompt == reqs["/v1/chat/completions"].prompt
    if "/v1/completions" in reqs:
        assert reqs["/api/generate"].prompt == reqs["/v1/completions"].prompt == USER
    for r in reqs.values():  # tokenized once, by the gateway's prepare call
        assert r.tokens is not None and len(r.tokens) > 0
