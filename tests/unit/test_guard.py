"""The loop guard trips on degenerate repetition, and not on lists, code or prose."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.guard import LoopGuard, LoopGuardConfig


def feed(text: str, **config) -> tuple[int | None, str | None]:
    g = LoopGuard(LoopGuardConfig(**config))
    pieces = re.findall(r"\s*\w+|\s*[^\w\s]+|\s+", text)  # about one piece per token
    for i, p in enumerate(pieces):
        if g.feed(p):
            return i, g.reason
    return None, None


@pytest.mark.parametrize("text, phrase", [
    # SmolLM2 at temperature 0 on "Write a haiku about a kiln."
    ("In the heart of the earth, a kiln, a place where the very fabric of the world is woven, a place where the "
     "very essence of life is revealed, a place where the light of the universe is reflected", "a place where"),
    # ... and on "What is the capital of France?"
    ("L'Étoile, la Marseillaise, la femme au roi, la femme au roi, la femme au roi, la femme au roi", "femme au"),
    ("no no no no no no no no no no no no no no no no no no no", "no no no"),
])
def test_trips(text, phrase):
    at, reason = feed(text)
    assert at is not None and phrase in reason


def test_trips_on_a_repeated_line():
    at, reason = feed("Hello there, friend!\n" * 30)
    assert at is not None and "repeated" in reason


@pytest.mark.parametrize("text", [
    "The primary colours are:\n\nRed is the most fundamental colour and is often associated with fire.\n"
    "Blue is the second most fundamental colour and is often associated with the sky.\n"
    "Yellow is the third most fundamental colour and is often associated with the sun.",
    "x = foo(1)\ny = foo(2)\nz = foo(3)\nw = foo(4)\nfor i in range(10):\n    print(i)\n"
    "for j in range(10):\n    print(j)\nfor k in range(10):\n    print(k)\n",
    '{"items": [{"name": "a", "value": 1}, {"name": "b", "value": 2}, {"name": "c", "value": 3}, '
    '{"name": "d", "value": 4}, {"name": "e", "value": 5}]}',
    "Photosynthesis is the process by which green plants use sunlight to synthesize food from carbon dioxide and "
    "water. Photosynthesis in plants involves chlorophyll and generates oxygen. The process of photosynthesis "
    "takes place in the chloroplasts, and the light reactions of photosynthesis make ATP.",
])
def test_leaves_alone(text):
    assert feed(text) == (None, None)


def test_disabled():
    assert feed("no " * 50, enabled=False) == (None, None)


# -- the incremental checks trip exactly when a scan of the window would -------------------

def _reference(pieces: list[str], c: LoopGuardConfig) -> tuple[int, str] | None:
    """The guard's three checks as plain scans of the recent tokens (its first,
    quadratic version), which the counters in ``LoopGuard`` must agree with."""
    tokens: list[str] = []
    line: list[str] = []
    for i, piece in enumerate(pieces):
        token = piece.strip().lower() or piece
        tokens.append(token)
        line = [] if "\n" in piece else (line + [token])[-c.window:]
        t = tokens
        if len(t) >= c.max_run and len(set(t[-c.max_run:])) == 1:
            return i, f"the same token {t[-1]!r} {c.max_run} times in a row"
        if len(t) >= c.cycle_tokens:
            tail = t[-c.cycle_tokens:]
            for p in range(2, c.max_period + 1):
                if all(tail[j] == tail[j - p] for j in range(p, len(tail))):
                    phrase = " ".join(tail[-p:])
                    return i, f"a {p}-token phrase repeated {c.cycle_tokens // p} times ({phrase[:60]!r})"
        if c.max_ngram_repeats and len(line) >= c.ngram:
            last = tuple(line[-c.ngram:])
            if all(w.isalpha() for w in last):
                count = sum(1 for j in range(len(line) - c.ngram + 1) if tuple(line[j:j + c.ngram]) == last)
                if count >= c.max_ngram_repeats:
                    return i, f"the phrase {' '.join(last)!r} {count} times in {len(line)} tokens"
    return None


@settings(max_examples=400, deadline=None)
@given(vocab=st.lists(st.sampled_from([" a", " b", " c", "D", ",", " e1", "\n", " x\ny", " "]), min_size=2,
                      max_size=6, unique=True),
       script=st.lists(st.tuples(st.lists(st.integers(0, 5), min_size=1, max_size=6), st.integers(1, 8)),
                       min_size=1, max_size=30),
       max_run=st.sampled_from([3, 5, 16]), max_period=st.sampled_from([2, 5, 24]),
       cycle_tokens=st.sampled_from([6, 12, 48]), ngram=st.sampled_from([2, 3]),
       repeats=st.sampled_from([0, 2, 3]), window=st.sampled_from([8, 16, 64]))
def test_counters_agree_with_a_scan_of_the_window(vocab, script, max_run, max_period, cycle_tokens, ngram,
                                                 repeats, window):
    c = LoopGuardConfig(max_run=max_run, max_period=max_period, cycle_tokens=cycle_tokens, ngram=ngram,
                        max_ngram_repeats=repeats, window=window)
    pieces = [vocab[k % len(vocab)] for phrase, times in script for _ in range(times) for k in phrase]
    g = LoopGuard(c)
    got = next(((i, g.reason) for i, p in enumerate(pieces) if g.feed(p)), None)
    assert got == _reference(pieces, c)
