"""Stop strings over a token stream, and UTF-8 split across tokens."""

import pytest

from backends.text import StopMatcher, Utf8Stream


def run(stops, pieces):
    m = StopMatcher(stops)
    out = "".join(m.feed(p) for p in pieces)
    if not m.stopped:
        out += m.flush()
    return out, m.stopped


@pytest.mark.parametrize("stops, pieces, expected", [
    (["END"], ["hello ", "E", "N", "D", " more"], ("hello ", True)),
    (["END"], ["hello ", "EN", "x"], ("hello ENx", False)),
    (["END"], ["abcEND"], ("abc", True)),
    (["\n\n"], ["a\n", "\nb"], ("a", True)),
    (["<|im_end|>", "User:"], ["Hi", "<|im", "_end|>"], ("Hi", True)),
    (["ab", "b"], ["xab"], ("x", True)),
    ([], ["a", "b"], ("ab", False)),
    ([""], ["a"], ("a", False)),
])
def test_stop(stops, pieces, expected):
    assert run(stops, pieces) == expected


def test_held_back_text_is_never_a_partial_stop():
    m = StopMatcher(["STOP"])
    assert m.feed("xx ST") == "xx "
    assert m.feed("O") == ""
    assert m.feed("W") == "STOW"


def test_utf8_split():
    s = Utf8Stream()
    data = "café 🔥".encode()
    out = "".join(s.feed(data[i:i + 1]) for i in range(len(data))) + s.flush()
    assert out == "café 🔥"
