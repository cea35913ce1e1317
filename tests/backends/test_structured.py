"""Structured output on the llama.cpp engine (real model, CPU).

* llama.cpp's grammar engine (on a vocab-only load of the bundled model) accepts
  every grammar backends/schema_gbnf.py emits, and agrees with the recogniser the
  unit tests use (tests/unit/gbnf_match.py) on which texts match.
* Generating with a JSON schema gives text that parses and validates, for several
  schemas and seeds.
* The cost of grammar sampling per token, printed (run with -s to see it).
"""

from __future__ import annotations

import asyncio
import ctypes
import importlib.util
import json
import random
import statistics
import time
from pathlib import Path

import jsonschema
import pytest

from tests.models import real_import

L = real_import("llama_cpp")

from backends.base import (  # noqa: E402
    FinishReason,
    GenerationRequest,
    InProcessBackend,
    InvalidRequest,
    ModelSpec,
    SamplingParams,
)
from backends.llamacpp import LlamaCppEngine  # noqa: E402
from backends.schema_gbnf import convert  # noqa: E402
from server.tools import call_schema  # noqa: E402
from tests.models import chat, model_path  # noqa: E402
from tests.schemas import PERSON  # noqa: E402

pytestmark = pytest.mark.real_model

_spec = importlib.util.spec_from_file_location(
    "gbnf_match", Path(__file__).parents[1] / "unit" / "gbnf_match.py")
gbnf_match = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gbnf_match)

ADDRESS_BOOK = {
    "$defs": {"Address": {"type": "object", "properties": {
        "street": {"type": "string", "maxLength": 30},
        "zip": {"type": "integer", "minimum": 10000, "maximum": 99999}},
        "required": ["street", "zip"], "additionalProperties": False}},
    "type": "object", "properties": {
        "name": {"type": "string", "maxLength": 30},
        "home": {"$ref": "#/$defs/Address"},
        "work": {"anyOf": [{"$ref": "#/$defs/Address"}, {"type": "null"}]}},
    "required": ["name", "home", "work"]}
WEATHER_FN = {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"]}}
TIME_FN = {"name": "get_time", "parameters": {"type": "object", "properties": {
    "timezone": {"type": "string", "maxLength": 30}}, "required": ["timezone"]}}
MEASURE = {"type": "object", "properties": {
    "temperature": {"type": "number", "minimum": -50, "maximum": 60},
    "ratio": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
    "when": {"type": "string", "format": "date"}},
    "required": ["temperature", "ratio", "when"]}
FLAGS = {"type": "object", "properties": {
    "ok": {"type": ["boolean", "null"]},
    "count": {"type": ["integer", "null"], "minimum": 0, "maximum": 10}},
    "required": ["ok", "count"]}

# (schema, user prompt, max_tokens): bounds large enough that nothing is cut short
CASES = {
    "person": (PERSON, "Describe a person as JSON with name, age, city and tags.", 300),
    "enum": ({"type": "string", "enum": ["red", "green", "blue"]},
             "What color is the sky? Answer with a JSON string.", 20),
    "defs": (ADDRESS_BOOK, "Give a JSON contact with a name, a home address and a work address.", 300),
    "tool-call": (call_schema([WEATHER_FN, TIME_FN]), "What is the weather in Paris?", 200),
    "json-mode": ({"type": "object"}, "Answer with a JSON object with one short key and value.", 400),
    "number": (MEASURE, "Give today's weather measurement as JSON.", 200),
    "bool-null": (FLAGS, "Is the shop open, and how many people are inside? Answer in JSON.", 60),
}
SEEDS = range(4)
# Schemas that bound nothing: a small model can run on inside a JSON string until
# max_tokens (measured on 16 seeds: 1-3 per 16 at temperatures 0.3-0.8, whichever
# way the grammar is sampled). Everything else here is bounded and must end itself.
UNBOUNDED = {"json-mode"}


class Oracle:
    """llama.cpp's grammar engine on a vocab-only model: does it accept a whole text?"""

    def __init__(self, path: str) -> None:
        L.llama_backend_init()
        params = L.llama_model_default_params()
        params.vocab_only = True
        self.model = L.llama_model_load_from_file(path.encode(), params)
        assert self.model
        self.vocab = L.llama_model_get_vocab(self.model)
        self.eos = L.llama_vocab_eos(self.vocab)

    def close(self) -> None:
        L.llama_model_free(self.model)

    def tokens(self, text: str) -> list[int]:
        raw = text.encode()
        buf = (L.llama_token * (len(raw) + 8))()
        n = L.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), False, False)
        assert n >= 0
        return list(buf[:n])

    def grammar(self, gbnf: str):
        g = L.llama_sampler_init_grammar(self.vocab, gbnf.encode(), b"root")
        assert g, f"llama.cpp refused the grammar:\n{gbnf}"
        return g

    def accepts(self, gbnf: str, text: str) -> bool:
        """Each token of the text, then end-of-generation, must be allowed."""
        g = self.grammar(gbnf)
        try:
            for tok in [*self.tokens(text), self.eos]:
                cand = (L.llama_token_data * 1)(L.llama_token_data(tok, 0.0, 0.0))
                L.llama_sampler_apply(g, ctypes.byref(L.llama_token_data_array(cand, 1, -1, False)))
                if cand[0].logit == float("-inf"):
                    return False
                if tok != self.eos:
                    L.llama_sampler_accept(g, tok)
            return True
        finally:
            L.llama_sampler_free(g)


@pytest.fixture(scope="module")
def oracle():
    o = Oracle(model_path())
    yield o
    o.close()


@pytest.fixture(scope="module")
def backend():
    b = InProcessBackend(LlamaCppEngine, ModelSpec(name="t", path=model_path(), num_ctx=2048,
                                                   num_parallel=2))
    asyncio.run(b.load())
    yield b
    asyncio.run(b.unload())


# --- llama.cpp's grammar engine vs the recogniser ------------------------------------

GRAMMAR_SCHEMAS = [
    PERSON, ADDRESS_BOOK, MEASURE, FLAGS, True, {"type": "object"}, call_schema([WEATHER_FN, TIME_FN]),
    {"type": "string", "format": "date-time"}, {"type": "string", "format": "uuid"},
    {"type": "string", "format": "time"}, {"type": "string", "minLength": 1500, "maxLength": 5000},
    {"type": "array", "items": {"type": "integer"}, "maxItems": 2500},
    {"type": "object", "properties": {"ab": {"type": "integer"}}, "additionalProperties": {"type": "null"}},
    {"type": "object", "properties": {"next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}},
     "required": ["next"]},
    {"type": "array", "prefixItems": [{"const": "x"}, {"type": "number", "minimum": -1, "maximum": 1}],
     "items": False, "minItems": 1},
]
TEXTS = ['{"name":"Ann","age":30,"city":"Oslo"}', '{"age":30,"city":"Oslo","name":"Ann"}',
         '{"name": "Zoë 😀", "age": 150, "city": "\\u00e9\\n", "tags": ["a"]}',
         '{"name":"a\nb","age":1,"city":"x"}', '{"name":"x","age":151,"city":"x"}',
         '{"home":{"street":"Main St","zip":12345},"name":"Bo","work":null}',
         '{"ratio":0.5,"temperature":-50,"when":"2024-02-29"}', '{"count":null,"ok":true}',
         '{"count":11,"ok":true}', '{"ratio":1,"temperature":0,"when":"2023-02-29"}',
         '{"arguments":{"city":"Paris","unit":"celsius"},"name":"get_weather"}',
         '{"arguments":{"timezone":"UTC"},"name":"get_time"}', '{}', '[]', '"2024-01-01T00:00:00Z"',
         '"123e4567-e89b-12d3-a456-426614174000"', '"23:59:59.5+01:00"', '"' + "a" * 1500 + '"',
         "[" + ",".join(["1"] * 2500) + "]", "[" + ",".join(["1"] * 2501) + "]",
         '{"ab":1,"b":null,"a":null}', '{"ab":1,"ab":null}', '{"next":{"next":null}}',
         '["x"]', '["x",-1]', '["x",1.0]', '["x",1.5]', "null", "-0.5e-3", '{"a":[true,{}]}']


def test_llama_cpp_agrees_with_the_recogniser(oracle):
    for schema in GRAMMAR_SCHEMAS:
        gbnf = convert(schema)
        L.llama_sampler_free(oracle.grammar(gbnf))
        g = gbnf_match.Grammar(gbnf)
        for text in TEXTS:
            assert oracle.accepts(gbnf, text) == g.matches(text), (schema, text)


def test_llama_cpp_agrees_on_integer_ranges(oracle):
    rnd = random.Random(7)
    bounds = [(0, 150), (-1000, 1000), (100, 999), (-25, -3)]
    bounds += [tuple(sorted((rnd.randint(-10**6, 10**6), rnd.randint(-10**6, 10**6)))) for _ in range(6)]
    for lo, hi in bounds:
        gbnf = convert({"type": "integer", "minimum": lo, "maximum": hi})
        for v in {lo - 1, lo, hi, hi + 1, 0, (lo + hi) // 2, *(rnd.randint(lo - 50, hi + 50) for _ in range(30))}:
            assert oracle.accepts(gbnf, str(v)) == (lo <= v <= hi), (lo, hi, v)
        assert not oracle.accepts(gbnf, "-0") and not oracle.accepts(gbnf, "007")


# --- generation ----------------------------------------------------------------------

async def _generate(b: InProcessBackend, schema, prompt: str, max_tokens: int, seed: int):
    req = GenerationRequest(prompt=chat(prompt), json_schema=schema,
                            sampling=SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=seed))
    chunks = [c async for c in b.stream(req)]
    return "".join(c.text for c in chunks), chunks[-1]


@pytest.mark.parametrize("case", list(CASES))
def test_generation_parses_and_validates(backend, case):
    schema, prompt, max_tokens = CASES[case]
    validator = jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)

    async def run_all():
        return await asyncio.gather(*(_generate(backend, schema, prompt, max_tokens, s) for s in SEEDS))

    stopped = 0
    for seed, (text, last) in zip(SEEDS, asyncio.run(run_all())):
        if last.finish_reason == FinishReason.LENGTH and case in UNBOUNDED:
            continue  # cut by max_tokens, and said so: what OpenAI's JSON mode does too
        assert last.finish_reason == FinishReason.STOP, (seed, last.finish_reason, last.detail, text)
        stopped += 1
        doc = json.loads(text)
        validator.validate(doc)
    assert stopped >= len(SEEDS) // 2, "most answers must end on their own and validate"


def test_unenforceable_schema_is_an_invalid_request(backend):
    req = GenerationRequest(prompt=chat("hi"), json_schema={"type": "string", "pattern": "^a+$"})
    with pytest.raises(InvalidRequest, match="the JSON schema cannot be enforced: 'pattern'"):
        backend.engine.prepare(req)


def test_grammar_cost_per_token(backend, oracle, capsys):
    """Shows the time per generated token with and without a schema, and the cost of
    one grammar pass over the whole vocabulary (what the engine pays per token, since
    the grammar comes first in its sampler chain)."""
    prompt = CASES["person"][1]
    free, constrained = [], []
    for seed in range(3):  # interleaved, so that the machine's load drifts alike for both
        for schema, out in ((None, free), (PERSON, constrained)):
            _, last = asyncio.run(_generate(backend, schema, prompt, 40, seed))
            out.append(last.usage.eval_ns / max(1, last.usage.completion_tokens) / 1e6)
    n = L.llama_vocab_n_tokens(oracle.vocab)
    g = oracle.grammar(convert(PERSON))
    data = (L.llama_token_data * n)()
    passes = []  # along a document: cheap at punctuation, dearer inside free strings
    for tok in oracle.tokens('{"name":"Ann Lee","age":42,"city":"Oslo","tags":["x"]}'):
        for i in range(n):
            data[i] = L.llama_token_data(i, 0.0, 0.0)
        t = time.perf_counter()
        L.llama_sampler_apply(g, ctypes.byref(L.llama_token_data_array(data, n, -1, False)))
        passes.append((time.perf_counter() - t) * 1000)
        L.llama_sampler_accept(g, tok)
    L.llama_sampler_free(g)
    with capsys.disabled():
        print(f"\nper generated token: unconstrained {statistics.median(free):.1f} ms, "
              f"with the PERSON schema {statistics.median(constrained):.1f} ms (medians of 3); "
              f"one grammar pass over {n} candidates: median {statistics.median(passes):.1f} ms, "
              f"min {min(passes):.1f}, max {max(passes):.1f}")
    assert all(x > 0 for x in free + constrained)

