"""The loop guard trips on degenerate repetition, and not on lists, code or prose."""

import re

import pytest

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
