"""The loop guard over its corpus (tests/data/guard_corpus.jsonl, made and measured by
``python -m bench.guard_corpus``): no ordinary answer is cut, and degenerate ones are
caught at least as often as when the thresholds were chosen."""

import collections

from bench import guard_corpus

ENTRIES = guard_corpus.load()
# Measured on the committed corpus (the README's loop guard section): of 98 degenerate
# answers, all 32 constructed and 44 of the model's 66 are cut.
CAUGHT = {"constructed": 32, "model": 44}


def test_the_corpus_is_as_described():
    by = collections.Counter((e["source"], e["label"]) for e in ENTRIES)
    assert by["model", "ordinary"] >= 200 and by["hand", "ordinary"] >= 30
    assert len({e["id"] for e in ENTRIES}) == len(ENTRIES)
    for e in ENTRIES:
        assert "".join(e["pieces"]) == e["text"], e["id"]  # the guard is fed what the text says


def test_no_ordinary_answer_is_cut():
    ordinary, _ = guard_corpus.totals(guard_corpus.measure(ENTRIES))
    assert ordinary.n and ordinary.tripped == 0, ordinary.ids


def test_degenerate_answers_are_caught():
    rows = guard_corpus.measure(ENTRIES)
    for source, caught in CAUGHT.items():
        row = rows[f"degenerate/{source}"]
        assert row.tripped >= caught, f"{source}: {row.tripped}/{row.n} caught, {caught} before; missed {row.ids}"
