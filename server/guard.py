"""The loop guard: stops a generation that has fallen into degenerate repetition.

Small models under long agent prompts loop ("a place where ... a place where ...")
until their token limit. The guard watches the generated pieces (one per token) and
trips on either pattern:

* a run: the same token ``max_run`` times in a row;
* a cycle: the last ``cycle_tokens`` tokens are one phrase of 2..``max_period`` tokens
  repeated back to back;
* a recurring phrase: an n-gram of ``ngram`` word tokens seen ``max_ngram_repeats``
  times within one line (at most ``window`` tokens), which catches loops whose filler
  words vary ("a place where the very fabric ..., a place where the light ..."). Lists
  repeat their structure from line to line ("Red is the most fundamental colour ...\n
  Blue is the second most fundamental colour ..."), so repetition across lines does not
  count; and only n-grams of words count, so code and JSON, which repeat punctuation
  and keys by nature, do not trip it. Under a grammar (structured output) this check is
  off: JSON is one line, its strings are bounded by the schema, and a cut would leave
  JSON that does not parse.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass


@dataclass(frozen=True)
class LoopGuardConfig:
    enabled: bool = True
    max_run: int = 16
    max_period: int = 24
    cycle_tokens: int = 48
    ngram: int = 3
    max_ngram_repeats: int = 3
    window: int = 64


class LoopGuard:
    """Checks each piece in constant time: counters kept up to date as pieces arrive,
    not the recent window scanned again (it runs once per streamed token)."""

    def __init__(self, config: LoopGuardConfig) -> None:
        self.c = config
        self.tokens: collections.deque[str] = collections.deque(maxlen=config.cycle_tokens + 1)
        self.run = 0  # how many times the last token came in a row
        # streak[p]: how many tokens in a row equal the token p before them
        self.streak = [0] * (config.max_period + 1)
        self.line_len = 0  # tokens of the current line, up to the window
        self.gram: tuple[str, ...] = ()  # the line's last n tokens
        self.grams: collections.deque[tuple[str, ...]] = collections.deque(
            maxlen=max(1, config.window - config.ngram + 1))  # the n-grams in the window
        self.counts: collections.Counter[tuple[str, ...]] = collections.Counter()
        self.reason: str | None = None

    def feed(self, piece: str) -> bool:
        """Adds one generated piece; True when the generation should stop."""
        if not self.c.enabled or self.reason:
            return self.reason is not None
        c = self.c
        token = piece.strip().lower() or piece
        t = self.tokens
        self.run = self.run + 1 if t and t[-1] == token else 1
        t.append(token)
        n, streak, period = len(t), self.streak, 0
        for p in range(2, c.max_period + 1):
            streak[p] = streak[p] + 1 if n > p and t[-1 - p] == token else 0
            if not period and streak[p] >= c.cycle_tokens - p:
                period = p  # the last cycle_tokens - p tokens each equal the one p before
        if self.run >= c.max_run:
            self.reason = f"the same token {token!r} {c.max_run} times in a row"
        elif period and n >= c.cycle_tokens:
            phrase = " ".join(list(t)[-period:])
            self.reason = f"a {period}-token phrase repeated {c.cycle_tokens // period} times ({phrase[:60]!r})"
        if c.max_ngram_repeats:
            self._ngram(piece, token)
        return self.reason is not None

    def _ngram(self, piece: str, token: str) -> None:
        c = self.c
        if "\n" in piece:
            self.line_len, self.gram = 0, ()
            self.grams.clear()
            self.counts.clear()
            return
        self.line_len = min(self.line_len + 1, c.window)
        self.gram = (self.gram + (token,))[-c.ngram:]
        if len(self.gram) < c.ngram:
            return
        if len(self.grams) == self.grams.maxlen:
            self.counts[self.grams[0]] -= 1
        self.grams.append(self.gram)
        self.counts[self.gram] += 1
        if self.reason is None and all(w.isalpha() for w in self.gram):
            count = self.counts[self.gram]
            if count >= c.max_ngram_repeats:
                self.reason = f"the phrase {' '.join(self.gram)!r} {count} times in {self.line_len} tokens"
