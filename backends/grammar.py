"""A request's grammar, the same for every engine, and a check of its text.

``for_schema`` turns a request's JSON schema into GBNF with kiln's own converter
(``backends.schema_gbnf``): llama.cpp and OpenVINO enforce the same schema subset and
refuse the same keywords with the same 400.

``check`` reads that text as the dialect both engines' grammar parsers take, llama.cpp's
GBNF and the EBNF of xgrammar (which OpenVINO GenAI compiles inside
``ContinuousBatchingPipeline.step()``), and raises ``GrammarError`` for anything outside it.
It runs before a request reaches OpenVINO's pipeline: there a grammar that fails to compile
fails that step() and every later one, whatever is cancelled (probed on openvino-genai
2026.4.1: an undefined rule, a rule named ``1st``, an empty rule body), so the pipeline
would have to be rebuilt and every request in flight would fail. What it requires:

* one rule a line, ``name ::= body``; each name defined once, ``root`` among them; a name
  starts with a letter and is not ``true``/``false`` (xgrammar lexes those as a number
  or a boolean);
* every referenced rule defined; no empty body, alternative or group;
* literals and classes with the escapes both take (``\\" \\\\ \\xHH \\uHHHH \\UHHHHHHHH``,
  and ``\\] \\[ \\- \\^`` in a class); no ``\\d``/``\\s``/``\\w`` class escapes (xgrammar
  refuses them); ranges with their bounds in order;
* repetition counts ``{m}``, ``{m,}``, ``{m,n}`` with m <= n <= 2000 (llama.cpp refuses more);
* groups nested at most 100 deep.

tests/backends/test_openvino_structured.py compiles every grammar the converter makes for
a fuzzed set of schemas in the real pipeline, each after this check passed it.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

from backends.base import InvalidRequest

__all__ = ["GrammarError", "check", "for_schema"]

MAX_REPEAT = 2000
MAX_DEPTH = 100
_NAME = re.compile(r"[a-z][a-z0-9-]*")
_HEX = {"x": 2, "u": 4, "U": 8}
_LIT_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "r": "\r", "t": "\t"}
_CLS_ESCAPES = {**_LIT_ESCAPES, "]": "]", "[": "[", "-": "-", "^": "^"}


class GrammarError(ValueError):
    """The grammar text is outside the dialect both engines compile."""


@functools.lru_cache(maxsize=64)
def _convert(schema_json: str) -> str:
    # kiln's own converter: it enforces every keyword it accepts exactly (integer
    # bounds, string lengths, no control characters...) and refuses the others.
    from backends.schema_gbnf import SchemaError, convert

    try:
        return convert(json.loads(schema_json))
    except SchemaError as e:
        raise InvalidRequest(f"the JSON schema cannot be enforced: {e}") from None


def for_schema(schema: Any) -> str:
    """The GBNF for a request's JSON schema (format, response_format, a forced tool call);
    InvalidRequest naming what cannot be enforced exactly."""
    return _convert(json.dumps(schema))  # key order matters: the model writes members in it


def check(text: str) -> None:
    """Raises GrammarError unless ``text`` is in the dialect described above."""
    rules: dict[str, int] = {}
    refs: list[tuple[str, int]] = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        name, sep, body = line.partition(" ::= ")
        if not sep:
            raise GrammarError(f"line {n} is not 'name ::= body'")
        if not _NAME.fullmatch(name) or name in ("true", "false"):
            raise GrammarError(f"line {n}: {name!r} is not a rule name both engines read")
        if name in rules:
            raise GrammarError(f"rule {name!r} is defined twice")
        rules[name] = n
        _Body(body, n, refs).parse()
    if "root" not in rules:
        raise GrammarError("no 'root' rule")
    for ref, n in refs:
        if ref not in rules:
            raise GrammarError(f"line {n}: rule {ref!r} is not defined")


class _Body:
    """A recursive-descent reader of one rule body: alt := seq ("|" seq)*,
    seq := item+, item := atom quantifier?, atom := name | literal | class | "(" alt ")"."""

    def __init__(self, text: str, line: int, refs: list[tuple[str, int]]) -> None:
        self.s, self.i, self.line, self.refs, self.depth = text, 0, line, refs, 0

    def fail(self, what: str) -> GrammarError:
        return GrammarError(f"line {self.line}, column {self.i + 1} of its body: {what}")

    def ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in " \t":
            self.i += 1

    def peek(self) -> str:
        self.ws()
        return self.s[self.i] if self.i < len(self.s) else ""

    def parse(self) -> None:
        self.alt()
        if self.peek():
            raise self.fail(f"unexpected {self.s[self.i]!r}")

    def alt(self) -> None:
        self.seq()
        while self.peek() == "|":
            self.i += 1
            self.seq()

    def seq(self) -> None:
        if self.peek() in ("", "|", ")"):
            raise self.fail("an empty sequence (xgrammar refuses it)")
        while self.peek() not in ("", "|", ")"):
            self.atom()
            self.quantifier()

    def atom(self) -> None:
        c = self.peek()
        if c == "(":
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise self.fail(f"groups nested more than {MAX_DEPTH} deep")
            self.i += 1
            self.alt()
            if self.peek() != ")":
                raise self.fail("expected ')'")
            self.i += 1
            self.depth -= 1
        elif c == '"':
            self.literal()
        elif c == "[":
            self.cls()
        elif m := _NAME.match(self.s, self.i):
            if m.group() in ("true", "false"):
                raise self.fail(f"{m.group()!r} is a boolean to xgrammar, not a rule")
            self.refs.append((m.group(), self.line))
            self.i = m.end()
        else:
            raise self.fail(f"unexpected {c!r}")

    def quantifier(self) -> None:
        if self.i < len(self.s) and self.s[self.i] in "?*+":
            self.i += 1
        elif self.i < len(self.s) and self.s[self.i] == "{":
            m = re.compile(r"\{(\d+)(,(\d*))?\}").match(self.s, self.i)
            if not m:
                raise self.fail("a malformed repetition")
            lo = int(m.group(1))
            hi = lo if m.group(2) is None else (int(m.group(3)) if m.group(3) else None)
            if max(lo, hi or 0) > MAX_REPEAT or (hi is not None and hi < lo):
                raise self.fail(f"repetition {m.group()} (counts 0..{MAX_REPEAT}, m <= n)")
            self.i = m.end()

    def char(self, escapes: dict[str, str]) -> int:
        """One character of a literal or class, escapes read; its code point."""
        c = self.s[self.i]
        if c == "\\":
            e = self.s[self.i + 1: self.i + 2]
            if e in _HEX:
                digits = self.s[self.i + 2: self.i + 2 + _HEX[e]]
                if len(digits) != _HEX[e] or not all(d in "0123456789abcdefABCDEF" for d in digits):
                    raise self.fail(f"a malformed \\{e} escape")
                cp = int(digits, 16)
                if cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF:
                    raise self.fail(f"\\{e}{digits} is not a Unicode scalar value")
                self.i += 2 + _HEX[e]
                return cp
            if e not in escapes:
                raise self.fail(f"the escape \\{e} (not one both engines read)")
            self.i += 2
            return ord(escapes[e])
        if c in "\n\r":
            raise self.fail("a line break inside a literal or class")
        self.i += 1
        return ord(c)

    def literal(self) -> None:
        self.i += 1
        while self.i < len(self.s) and self.s[self.i] != '"':
            self.char(_LIT_ESCAPES)
        if self.i >= len(self.s):
            raise self.fail("an unterminated literal")
        self.i += 1

    def cls(self) -> None:
        self.i += 1
        if self.s[self.i: self.i + 1] == "^":
            self.i += 1
        n = 0
        while self.i < len(self.s) and self.s[self.i] != "]":
            lo = self.char(_CLS_ESCAPES)
            if self.s[self.i: self.i + 1] == "-" and self.s[self.i + 1: self.i + 2] not in ("]", ""):
                self.i += 1
                hi = self.char(_CLS_ESCAPES)
                if hi < lo:
                    raise self.fail("a class range with its bounds out of order")
            n += 1
        if self.i >= len(self.s):
            raise self.fail("an unterminated class")
        if not n:
            raise self.fail("an empty class")
        self.i += 1
