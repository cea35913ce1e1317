"""Ollama options: types and ranges checked with a message naming the option."""

import math

import pytest

from server.errors import BadRequest
from server.options import check, resolve


@pytest.mark.parametrize("options, message", [
    ({"temperature": "hot"}, '"temperature" must be a number'),
    ({"temperature": -1}, '"temperature" is -1.0'),
    ({"temperature": math.nan}, "finite"),
    ({"top_k": -5}, '"top_k"'),
    ({"top_k": 1.5}, "integer"),
    ({"top_p": 2}, '"top_p"'),
    ({"num_predict": -3}, '"num_predict"'),
    ({"num_ctx": 10**12}, '"num_ctx"'),
    ({"seed": 2**70}, '"seed"'),
    ({"stop": [1, 2]}, "list of strings"),
    ({"stop": ["x"] * 17}, "at most 16"),
    ({"use_mmap": "yes"}, "boolean"),
    ({"num_thread": True}, "integer"),
])
def test_refused(options, message):
    with pytest.raises(BadRequest, match=message):
        check(options)


def test_not_an_object():
    with pytest.raises(BadRequest, match="must be an object"):
        check([1, 2])


def test_unknown_keys_ignored_and_nulls_dropped():
    assert check({"tfs_z": 1.0, "mirostat": 0, "temperature": None, "bogus": 3, "top_k": 10}) == {"top_k": 10}


def test_resolve_merges_model_defaults():
    r = resolve({"temperature": 0.2, "stop": ["<|im_end|>"], "num_ctx": 2048},
                {"temperature": 0.7, "num_predict": 5, "seed": 42, "stop": ["END"]})
    s = r.sampling
    assert (s.temperature, s.max_tokens, s.seed, s.stop, r.num_ctx) == (0.7, 5, 42, ["END"], 2048)


@pytest.mark.parametrize("num_predict, expected", [(-1, None), (-2, None), (0, 0), (7, 7)])
def test_num_predict(num_predict, expected):
    assert resolve({}, {"num_predict": num_predict}).sampling.max_tokens == expected


def test_seed_random_and_wrapped():
    assert resolve({}, {"seed": -1}).sampling.seed is None
    assert resolve({}, {"seed": 0xFFFFFFFF}).sampling.seed == 0  # 0xFFFFFFFF means "random" to llama.cpp
