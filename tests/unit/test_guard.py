"""The loop guard trips on degenerate repetition, and not on lists, code or prose."""

import re

import pytest

from server.guard import LoopGuard, LoopGuardConfig, normalise


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
     "very essence of life is revealed, a place where the light of the universe is reflected, a place where the "
     "soul of the earth is revealed", "a place where the"),
    # ... and on "What is the capital of France?"
    ("L'Étoile, la Marseillaise, la femme au roi, la femme au roi, la femme au roi, la femme au roi, la", "femme au"),
    ("no no no no no no no no no no no no no no no no no no no", "no no no"),
])
def test_trips(text, phrase):
    at, reason = feed(text)
    assert at is not None and phrase in reason


def test_trips_on_a_repeated_line():
    at, reason = feed("Hello there, friend!\n" * 30)
    assert at is not None and "'hello there, friend' 4 times in a row" in reason


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
    # SmolLM2 at 1.0 on Romeo and Juliet: a title three times in a paragraph is no loop
    "In the iconic Romeo and Juliet story, the plot revolves around forbidden love. At its core, Romeo and "
    "Juliet is a tragicomic exploration of destiny, and the plot culminates in the death of Romeo and Juliet.",
    "Row, row, row your boat,\nGently down the stream.\nMerrily, merrily, merrily, merrily,\nLife is but a dream.",
])
def test_leaves_alone(text):
    assert feed(text) == (None, None)


def test_disabled():
    assert feed("no " * 50, enabled=False) == (None, None)


@pytest.mark.parametrize("text, line", [
    # kiln's story: one item renumbered, dozens of times
    ("".join(f"{i}. The cat.\n" for i in range(1, 40)), "the cat"),
    ("1. The cat. 2. The cat. 3. The cat. 4. The cat. 5. The cat. 6. The cat.", "the cat"),  # inline
    ("".join(f"{'-*•+'[i % 4]} The cat is on the mat.\n" for i in range(20)), "the cat is on the mat"),
    ("".join(f"{('The Cat', 'the cat', '  THE  CAT ', '**The cat**!')[i % 4]}\n" for i in range(20)), "the cat"),
    ("".join(f"Step {i}: Mix the flour.\n" for i in range(1, 20)), "mix the flour"),
    ("".join(f"| {i} | France | Paris |\n" for i in range(1, 20)), "| france | paris |"),
    ("".join(f"{i}.\nThe cat sat.\n\n" for i in range(1, 20)), "the cat sat"),  # numbers on lines of their own
    ("".join(f"{i}. Red: fire.\n{i + 1}. Blue: sky.\n" for i in range(1, 40, 2)), "red: fire"),  # a 2-line block
    ("".join(f"{i}. Max\n" for i in range(1, 30)), "max"),  # a word: 10 times
    ("```python\n" + 'print("The quick brown fox jumps over the lazy dog")\n' * 20, "print("),
    ("[0, 0, 0],\n" * 30, "[0,0,0]"),
])
def test_trips_on_repeated_lines(text, line):
    at, reason = feed(text)
    assert at is not None and line in reason and "times in a row" in reason, reason


@pytest.mark.parametrize("text", [
    # a tic-tac-toe board: 9 identical lines of code (the cycle check alone cut it)
    "```html\n<div class=\"board\">\n" + '  <div class="cell"></div>\n' * 9 + "</div>\n```",
    "1. True\n2. True\n3. False\n4. True\n5. True\n6. True\n7. True\n8. False\n",  # an answer key
    "Day 4: Free day\nDay 5: Free day\nDay 6: Free day\nDay 7: Fly home\n",  # not a list marker
    "| Day | Hours |\n|---|---|\n" + "".join(f"| {d} | 9:00 - 17:00 |\n" for d in "Mon Tue Wed Thu".split()),
    "[\n" + ",\n".join(f'  {{\n    "id": {i},\n    "done": false\n  }}' for i in range(6)) + "\n]",
    "board = [\n" + "    [0, 0, 0, 0, 0, 0, 0, 0],\n" * 8 + "]\n",
    "".join(f"7 x {i} = {7 * i}\n" for i in range(1, 11)),
    "def a():\n    return result\n\n}\n}\n}\n}\ndef b():\n    return result\n\n}\n}\n}\n}\n",
])
def test_leaves_structure_alone(text):
    assert feed(text) == (None, None)


def test_line_check_can_be_turned_off():
    assert feed("".join(f"{i}. The cat.\n" for i in range(1, 40)), max_line_repeats=0) == (None, None)


@pytest.mark.parametrize("line, same", [
    ("1. The cat.", "the cat"), ("  - **The Cat**!", "the cat"), ("b) the cat;", "the cat"),
    ("iv. The cat", "the cat"), ("Step 12: The cat", "the cat"), ("| 3 | The cat |", "| the cat |"),
    ("1.5 kg of flour", "1.5 kg of flour"), ("Day 5: Rest", "day 5: rest"),
])
def test_normalise(line, same):
    assert normalise(line) == same
