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
    def __init__(self, config: LoopGuardConfig) -> None:
        self.c = config
        self.tokens: collections.deque[str] = collections.deque(maxlen=max(config.window, config.cycle_tokens))
        self.line: collections.deque[str] = collections.deque(maxlen=config.window)
        self.reason: str | None = None

    def feed(self, piece: str) -> bool:
        """Adds one generated piece; True when the generation should stop."""
        if not self.c.enabled or self.reason:
            return self.reason is not None
        token = piece.strip().lower() or piece
        self.tokens.append(token)
        if "\n" in piece:
            self.line.clear()
        else:
            self.line.append(token)
        t = list(self.tokens)
        n = len(t)
        if n >= self.c.max_run and len(set(t[-self.c.max_run:])) == 1:
            self.reason = f"the same token {t[-1]!r} {self.c.max_run} times in a row"
        elif n >= self.c.cycle_tokens:
            tail = t[-self.c.cycle_tokens:]
            for p in range(2, self.c.max_period + 1):
                if all(tail[i] == tail[i - p] for i in range(p, len(tail))):
                    phrase = " ".join(tail[-p:])
                    self.reason = f"a {p}-token phrase repeated {self.c.cycle_tokens // p} times ({phrase[:60]!r})"
                    break
        if self.reason is None and self.c.max_ngram_repeats and len(self.line) >= self.c.ngram:
            window = list(self.line)
            last = tuple(window[-self.c.ngram:])
            if all(w.isalpha() for w in last):
                count = sum(1 for i in range(len(window) - self.c.ngram + 1)
                            if tuple(window[i:i + self.c.ngram]) == last)
                if count >= self.c.max_ngram_repeats:
                    self.reason = f"the phrase {' '.join(last)!r} {count} times in {len(window)} tokens"
        return self.reason is not None
