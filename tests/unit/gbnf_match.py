"""A small GBNF recogniser for tests: does a grammar match a whole string?

It reads the subset ``backends.schema_gbnf`` emits (one rule per line, literals,
classes with escapes, groups, ``| ? * + {m} {m,} {m,n}``) and matches by computing
every end position reachable from a start (memoised per rule and position), so
ambiguous grammars are fine; left recursion is an error. llama.cpp's own engine
is checked against it in tests/backends/test_structured.py.
"""

from __future__ import annotations

import random
import re
from typing import Any

_ESC = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"', "[": "[", "]": "]"}
_HEXLEN = {"x": 2, "u": 4, "U": 8}
_POOL = ' az"\\\n\t\x00\x1f\x7f\x80é€😀-.,:{}[]09'


class Grammar:
    def __init__(self, text: str) -> None:
        self.rules: dict[str, Any] = {}
        for line in text.split("\n"):  # only \n ends a rule, as in llama.cpp
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            name, sep, body = line.partition(" ::= ")
            assert sep and re.fullmatch(r"[a-z0-9-]+", name), f"bad rule line {line!r}"
            assert name not in self.rules, f"rule {name} defined twice"
            p = _Parser(body)
            self.rules[name] = p.alt()
            assert p.i == len(body), f"trailing text in {line!r} at {p.i}"
        assert "root" in self.rules
        for name in self.refs():
            assert name in self.rules, f"undefined rule {name}"

    def refs(self) -> set[str]:
        out: set[str] = set()

        def walk(n: Any) -> None:
            if n[0] == "ref":
                out.add(n[1])
            elif n[0] in ("alt", "seq"):
                for c in n[1]:
                    walk(c)
            elif n[0] == "rep":
                walk(n[1])
        for r in self.rules.values():
            walk(r)
        return out

    def matches(self, s: str) -> bool:
        memo: dict[tuple[str, int], frozenset[int]] = {}

        def m(n: Any, i: int) -> frozenset[int]:
            kind = n[0]
            if kind == "lit":
                return frozenset([i + len(n[1])]) if s.startswith(n[1], i) else frozenset()
            if kind == "cls":
                if i < len(s) and (any(a <= s[i] <= b for a, b in n[2]) != n[1]):
                    return frozenset([i + 1])
                return frozenset()
            if kind == "ref":
                key = (n[1], i)
                if key not in memo:
                    memo[key] = None  # type: ignore[assignment]  # in progress
                    memo[key] = m(self.rules[n[1]], i)
                assert memo[key] is not None, f"left recursion through {n[1]}"
                return memo[key]
            if kind == "alt":
                return frozenset().union(*(m(c, i) for c in n[1]))
            if kind == "seq":
                pos = frozenset([i])
                for c in n[1]:
                    pos = frozenset().union(*(m(c, p) for p in pos))
                    if not pos:
                        break
                return pos
            _, x, lo, hi = n  # rep
            cur, out, count = frozenset([i]), set(), 0
            if lo == 0:
                out |= cur
            while cur and (hi is None or count < hi):
                cur = frozenset().union(*(m(x, p) for p in cur))
                count += 1
                if count >= lo:
                    if hi is None:
                        cur = cur - out
                    out |= cur
            return frozenset(out)

        return len(s) in m(self.rules["root"], 0)

    def sample(self, rnd: random.Random, max_depth: int = 40) -> str:
        """A random text the grammar matches: a random derivation, with repetitions
        kept short. Raises RecursionError when it nests beyond max_depth rules."""
        out: list[str] = []

        def gen(n: Any, depth: int) -> None:
            kind = n[0]
            if kind == "lit":
                out.append(n[1])
            elif kind == "cls":
                if n[1]:  # negated: any of a few interesting characters outside the class
                    pool = [c for c in _POOL if not any(a <= c <= b for a, b in n[2])]
                    out.append(rnd.choice(pool))
                else:
                    a, b = rnd.choice(n[2])
                    out.append(chr(rnd.randint(ord(a), ord(b))))
            elif kind == "ref":
                if depth > max_depth:
                    raise RecursionError(n[1])
                gen(self.rules[n[1]], depth + 1)
            elif kind == "alt":
                gen(rnd.choice(n[1]), depth)
            elif kind == "seq":
                for c in n[1]:
                    gen(c, depth)
            else:
                _, x, lo, hi = n
                extra = rnd.choice([0, 0, 1, 2, 3, 40])  # now and then a long run
                for _ in range(lo + (extra if hi is None else min(extra, hi - lo))):
                    gen(x, depth)

        gen(self.rules["root"], 0)
        return "".join(out)


class _Parser:
    def __init__(self, text: str) -> None:
        self.t, self.i = text, 0

    def ws(self) -> None:
        while self.i < len(self.t) and self.t[self.i] in " \t":
            self.i += 1

    def peek(self) -> str:
        self.ws()
        return self.t[self.i] if self.i < len(self.t) else ""

    def alt(self) -> Any:
        seqs = [self.seq()]
        while self.peek() == "|":
            self.i += 1
            seqs.append(self.seq())
        return seqs[0] if len(seqs) == 1 else ("alt", seqs)

    def seq(self) -> Any:
        items = []
        while self.peek() not in ("", "|", ")"):
            items.append(self.postfix(self.atom()))
        return ("seq", items)

    def postfix(self, a: Any) -> Any:
        c = self.t[self.i] if self.i < len(self.t) else ""  # no space before a suffix
        if c and c in "?*+":
            self.i += 1
            return ("rep", a, 0 if c != "+" else 1, 1 if c == "?" else None)
        if c == "{":
            j = self.t.index("}", self.i)
            body = self.t[self.i + 1:j]
            self.i = j + 1
            lo, _, hi = body.partition(",")
            return ("rep", a, int(lo), int(lo) if "," not in body else (int(hi) if hi else None))
        return a

    def char(self) -> str:
        c = self.t[self.i]
        if c != "\\":
            self.i += 1
            return c
        e = self.t[self.i + 1]
        if e in _HEXLEN:
            n = _HEXLEN[e]
            self.i += 2 + n
            return chr(int(self.t[self.i - n:self.i], 16))
        assert e in _ESC, f"unknown escape \\{e}"
        self.i += 2
        return _ESC[e]

    def atom(self) -> Any:
        c = self.peek()
        if c == '"':
            self.i += 1
            out = []
            while self.t[self.i] != '"':
                out.append(self.char())
            self.i += 1
            return ("lit", "".join(out))
        if c == "[":
            self.i += 1
            neg = self.t[self.i] == "^"
            self.i += neg
            ranges = []
            while self.t[self.i] != "]":
                a = self.char()
                if self.t[self.i] == "-" and self.t[self.i + 1] != "]":
                    self.i += 1
                    ranges.append((a, self.char()))
                else:
                    ranges.append((a, a))
            self.i += 1
            return ("cls", neg, ranges)
        if c == "(":
            self.i += 1
            inner = self.alt()
            assert self.peek() == ")", f"missing ) at {self.i}"
            self.i += 1
            return inner
        mo = re.compile(r"[a-z0-9-]+").match(self.t, self.i)
        assert mo, f"unexpected {self.t[self.i:self.i + 10]!r}"
        self.i = mo.end()
        return ("ref", mo.group())
