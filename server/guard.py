"""The loop guard: stops a generation that has fallen into degenerate repetition.

Small models under long agent prompts loop ("a place where ... a place where ...")
until their token limit. The guard watches the generated pieces (one per token) and
trips on either pattern:

* a run: the same token ``max_run`` times in a row;
* a cycle: the last ``cycle_tokens`` tokens are one phrase of 2..``max_period`` tokens
  repeated back to back;
* a recurring phrase: an n-gram of ``ngram`` words seen ``max_ngram_repeats``
  times within one line (at most ``window`` words; a word split over several tokens is
  one word, so "merrily, merrily, merrily" is no phrase), which catches loops whose filler
  words vary ("a place where the very fabric ..., a place where the light ..."). Lists
  repeat their structure from line to line ("Red is the most fundamental colour ...\n
  Blue is the second most fundamental colour ..."), so repetition across lines does not
  count; and only n-grams of words count, so code and JSON, which repeat punctuation
  and keys by nature, do not trip it. Under a grammar (structured output) this check is
  off: JSON is one line, its strings are bounded by the schema, and a cut would leave
  JSON that does not parse.
* a repeated line: the same line ``max_line_repeats`` times back to back, or a block of
  up to ``max_line_period`` lines repeated that many times, comparing lines as a reader
  would: without their list numbering (``1.``, ``2)``, ``a.``, ``Step 3:``, a table's
  ``| 3 |`` cell), bullets, markdown emphasis, case, surrounding whitespace and trailing
  punctuation. That is the loop the checks above let through: "1. The cat sat.\n2. The
  cat sat.\n3. The cat sat." differs from line to line in its number only. An item
  written inline after a sentence ("1. The cat. 2. The cat. 3. The cat.") counts as a
  line of its own. Structure repeats by nature, so some lines take more repeats: a line
  inside a code fence (compared exactly, indentation and case kept: a grid of identical
  ``<div class="cell"></div>``) or of one word (an answer key's "True") takes
  ``max_code_line_repeats``; a line with no letter in it (``}``, ``],``, ``[0, 0, 0],``, a
  table's ``|---|``) ``max_bare_line_repeats``, and does not count in a block of lines
  that have letters. Blank lines neither count nor break a run. With this check on, the
  cycle check leaves alone phrases that span a line break: repetition across lines is
  this check's to judge (a tic-tac-toe board in HTML is 9 identical lines, which the
  cycle check would cut at the 6th). Under a grammar it is off, like the recurring
  phrase. The thresholds were chosen on a corpus of ordinary and degenerate answers
  (``tests/data/guard_corpus.jsonl``, ``python -m bench.guard_corpus``).
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class LoopGuardConfig:
    enabled: bool = True
    max_run: int = 16
    max_period: int = 24
    cycle_tokens: int = 48
    ngram: int = 4
    max_ngram_repeats: int = 4
    window: int = 64
    max_line_repeats: int = 4  # 0: the line check is off
    max_line_period: int = 8
    max_code_line_repeats: int = 10  # in a code fence, and for a line of one word
    max_bare_line_repeats: int = 16  # for a line with no letter


# A list marker, or several (``- 1.``, ``> *``, ``Step 2:``), at the start of a line;
# a table row's leading number cell (``| 3 |``) is one too.
_MARKER = re.compile(r"^(?:(?:[-*+•·>#]+|\|\s*\d{1,3}\s*(?=\|)|(?:step\s+)?\(?(?:\d{1,3}|[A-Za-z]|[ivxIVX]{1,4})[.):]"
                     r"(?=[\s*_]|$))\s*)+", re.IGNORECASE)
# An item written inline: a number after the end of a sentence or clause ("cat. 2. The").
_INLINE_ITEM = re.compile(r"(?<=[.!?;,])[ \t]+(?=\(?\d{1,3}[.)][ \t])")
_EMPHASIS = re.compile(r"[*_`~]+")
_SPACES = re.compile(r"\s+")
_FENCE = ("```", "~~~")
_MAX_LINE = 2000  # characters of an unfinished line kept (a longer line is the n-gram check's)


def normalise(line: str) -> str:
    """A line as a reader compares it: no numbering, bullets, emphasis, case, spacing or
    trailing punctuation."""
    s = _EMPHASIS.sub("", _MARKER.sub("", line.strip()))
    return _SPACES.sub(" ", s).strip(" .,;:!?").lower()


class LoopGuard:
    def __init__(self, config: LoopGuardConfig) -> None:
        self.c = config
        self.tokens: collections.deque[str] = collections.deque(maxlen=max(config.window, config.cycle_tokens))
        self.since_break = 1 << 30  # tokens since the last one with a line break
        self.line: collections.deque[str] = collections.deque(maxlen=config.window)
        self.reason: str | None = None
        self.partial = ""  # the line being written
        self.in_code = False
        most = max(config.max_line_repeats, config.max_code_line_repeats, config.max_bare_line_repeats)
        keep = most * max(config.max_line_period, 1)
        self.lines: collections.deque[str] = collections.deque(maxlen=keep)  # lines with letters, as compared
        self.times: collections.deque[int] = collections.deque(maxlen=keep)  # the repeats that trip each
        self.bare: collections.deque[str] = collections.deque(maxlen=keep)  # the run of lines without a letter

    def feed(self, piece: str) -> bool:
        """Adds one generated piece; True when the generation should stop."""
        if not self.c.enabled or self.reason:
            return self.reason is not None
        token = piece.strip().lower() or piece
        self.tokens.append(token)
        new_word = False
        if "\n" in piece:
            self.line.clear()
            self.since_break = 0
        else:
            self.since_break += 1
            if self.line and not piece[:1].isspace() and token.isalpha() and self.line[-1].isalpha():
                self.line[-1] += token  # one word in several tokens ("m", "err", "ily")
            else:
                self.line.append(token)
                new_word = True
        t = list(self.tokens)
        n = len(t)
        if n >= self.c.max_run and len(set(t[-self.c.max_run:])) == 1:
            self.reason = f"the same token {t[-1]!r} {self.c.max_run} times in a row"
        elif n >= self.c.cycle_tokens:
            tail = t[-self.c.cycle_tokens:]
            for p in range(2, self.c.max_period + 1):
                if self.c.max_line_repeats and self.since_break < p:
                    break  # this phrase and every longer one span a line break: the line check's
                if all(tail[i] == tail[i - p] for i in range(p, len(tail))):
                    phrase = " ".join(tail[-p:])
                    self.reason = f"a {p}-token phrase repeated {self.c.cycle_tokens // p} times ({phrase[:60]!r})"
                    break
        if self.reason is None and self.c.max_ngram_repeats and new_word and len(self.line) > self.c.ngram:
            window = list(self.line)[:-1]  # the words before this one are whole
            last = tuple(window[-self.c.ngram:])
            if all(w.isalpha() for w in last):
                count = sum(1 for i in range(len(window) - self.c.ngram + 1)
                            if tuple(window[i:i + self.c.ngram]) == last)
                if count >= self.c.max_ngram_repeats:
                    self.reason = f"the phrase {' '.join(last)!r} {count} times in {len(window)} tokens"
        if self.reason is None and self.c.max_line_repeats:
            self._feed_line(piece)
        return self.reason is not None

    def _feed_line(self, piece: str) -> None:
        start = max(0, len(self.partial) - 8)  # an inline item's marker (" 12. ") may begin before this piece
        self.partial += piece
        while self.reason is None:
            cut = self.partial.find("\n")
            if cut < 0 and not self.in_code and piece.strip() != piece:  # only whitespace ends a marker
                m = _INLINE_ITEM.search(self.partial, start)
                cut = m.start() if m else -1
            if cut < 0:
                break
            line, self.partial, start = self.partial[:cut], self.partial[cut + 1:], 0
            self._line(line)
        if len(self.partial) > _MAX_LINE:
            self.partial = self.partial[-_MAX_LINE:]

    def _line(self, line: str) -> None:
        if line.lstrip().startswith(_FENCE):
            self.in_code = not self.in_code
            return
        key = line.rstrip() if self.in_code else normalise(line)
        if not key.strip():
            return  # blank, or numbering alone ("1.")
        if not any(c.isalpha() for c in key):
            # Bare lines have runs of their own, which a line with letters ends; they do
            # not end a run of lines with letters ("1.\nThe cat.\n2.\nThe cat.").
            self.bare.append(_SPACES.sub("", key))
            self._repeats(self.bare, [self.c.max_bare_line_repeats] * len(self.bare))
            return
        self.bare.clear()
        terse = self.in_code or " " not in key
        self.lines.append(key)
        self.times.append(self.c.max_code_line_repeats if terse else self.c.max_line_repeats)
        self._repeats(self.lines, self.times)

    def _repeats(self, lines: collections.deque[str], times_of: collections.deque[int] | list[int]) -> None:
        """Trips on the last line, or block of lines, repeated as many times as it takes
        (a block: the fewest any of its lines takes; "P.S.\nI hope you ..." is no answer key)."""
        t, n = list(lines), list(times_of)
        for p in range(1, self.c.max_line_period + 1):
            times = min(n[-p:])
            if len(t) < p * times:
                continue
            tail = t[-p * times:]
            if all(tail[i] == tail[i - p] for i in range(p, len(tail))):
                what = "line" if p == 1 else f"{p}-line block"
                self.reason = f"the {what} {tail[-p][:60]!r} {times} times in a row"
                return
