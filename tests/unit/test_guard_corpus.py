"""The loop guard over its corpus (tests/data/guard_corpus.jsonl, made and measured by
``python -m bench.guard_corpus``): no ordinary answer is cut, and degenerate ones are
caught at least as often as when the thresholds were chosen."""

import collections

from bench import guard_corpus

ENTRIES = guard_corpus.load()
CATCH_RATE = 1.0  # measured on the committed corpus (the README's loop guard section)


def test_the_corpus_is_as_described():
    by = collections.Counter((e["source"], e["label"]) for e in ENTRIES)
    assert by["hand", "ordinary"] >= 30
    assert len({e["id"] for e in ENTRIES}) == len(ENTRIES)
    for e in ENTRIES:
        assert "".join(e["pieces"]) == e["text"], e["id"]  # the guard is fed what the text says


def test_no_ordinary_answer_is_cut():
    ordinary, _ = guard_corpus.totals(guard_corpus.measure(ENTRIES))
    assert ordinary.n and ordinary.tripped == 0, ordinary.ids


def test_degenerate_answers_are_caught():
    _, degenerate = guard_corpus.totals(guard_corpus.measure(ENTRIES))
    assert degenerate.n and degenerate.tripped >= CATCH_RATE * degenerate.n, degenerate.ids
