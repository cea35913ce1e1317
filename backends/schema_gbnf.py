"""JSON Schema -> GBNF for llama.cpp's grammar sampler: enforced exactly, or refused.

kiln promises that structured output parses and validates against the request's
schema, so each keyword is either enforced by the grammar or refused with
``SchemaError`` (kiln answers 400). Unknown keywords are annotations, as JSON Schema
says (so is ``format`` beyond date, time, date-time and uuid). The grammar is
*stricter* than the schema where that keeps it finite, small and unambiguous, but
no restriction ever lets an invalid document through:

* members come in declaration order, required ones first, then optional ones, each
  at most once; with ``properties`` and no ``additionalProperties`` only those are
  allowed (as in llama.cpp's converter); extra keys next to declared ones contain
  no escapes, so that no escape can spell a declared name;
* whitespace is at most one space after ``{ [ , :`` and after each value;
* integers have at most 16 digits unless a bound needs more; numbers at most 16
  integer and 16 fraction digits and a 2-digit exponent (``1e999`` parses as inf);
  bounded numbers have no exponent, and next to an exclusive bound at most 15
  significant digits, so that parsing as a double cannot round onto the bound;
* enum/const values match in their compact ``json.dumps`` form only;
* strings have no raw control characters (nor DEL) and no ``\\u`` escapes of
  surrogates, so that lengths count code points as JSON Schema does;
* "time"/"date-time" take "Z" or a numeric offset, <= 9 fraction digits, no leap
  second; OpenAPI's ``nullable`` adds nothing (null is valid in one reading only).

Not enforced: the "exactly one" of ``oneOf``, whose branches are alternatives.
"""

from __future__ import annotations

import json
import math
import re
from fractions import Fraction
from typing import Any
from urllib.parse import unquote

__all__ = ["SchemaError", "convert"]


class SchemaError(ValueError):
    """The schema needs something the grammar cannot enforce exactly."""


INT_DIGITS = 16  # an integer's digits when no bound needs more
FRAC_DIGITS = 16
SIG_DIGITS = 15  # decimals of <= 15 significant digits stay distinct as doubles (DBL_DIG)
NUMBER_BOUND = 10**15  # number bounds: exact doubles, with room for SIG_DIGITS
MAX_REPEAT = 1000  # llama.cpp refuses x{m,n} beyond 2000: longer runs repeat a chunk

_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
_KEYWORDS_OF = {  # what a schema without "type" is inferred to be from
    "object": {"properties", "required", "additionalProperties", "minProperties", "maxProperties"},
    "array": {"items", "prefixItems", "minItems", "maxItems", "uniqueItems"},
    "string": {"minLength", "maxLength", "format"},
    "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"},
}
_UNSUPPORTED = {"pattern", "patternProperties", "propertyNames", "dependentRequired",
                "dependentSchemas", "dependencies", "contains", "minContains", "maxContains",
                "not", "if", "then", "else", "unevaluatedProperties", "unevaluatedItems",
                "$dynamicRef", "$recursiveRef"}
_ASSERTIONS = {"type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", *_UNSUPPORTED,
               *(k for ks in _KEYWORDS_OF.values() for k in ks)}
_MIN_KEYS = {"minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties"}
_MAX_KEYS = {"maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties"}
_FORMATS = {"date", "time", "date-time", "uuid"}
_REF = frozenset({"$ref"})
_MERGED_BELOW = {"properties", "additionalProperties", "items", "prefixItems"}

_NOT_CHAR = r'"\\\x7F\x00-\x1F'  # in [^...]: what a raw string character cannot be
_HEX = "[0-9a-fA-F]"
_FRAC_ANY = f'( "." [0-9]{{1,{FRAC_DIGITS}}} )?'
_FRAC_ZERO = f'( "." "0"{{1,{FRAC_DIGITS}}} )?'
_LEAP_YY = '( "0" [48] | [2468] [048] | [13579] [26] )'  # 04..96 in steps of 4
_PRIMS: dict[str, str] = {  # shared rules, emitted when used; their names are reserved
    "space": '" "?',
    # No \u escapes of surrogates: a pair would be 2 characters here, 1 code point
    # for minLength/maxLength. Such characters can be written raw.
    "char": rf'[^{_NOT_CHAR}] | "\\" ( ["\\/bfnrt] | "u" ( [0-9a-cA-CefEF] {_HEX}{{3}}'
            rf' | [dD] [0-7] {_HEX}{{2}} ) )',
    "string": r'"\"" char* "\""',
    "number": f'"-"? ( "0" | [1-9] [0-9]{{0,{INT_DIGITS - 1}}} ) {_FRAC_ANY} ( [eE] [+-]? [0-9]{{1,2}} )?',
    "boolean": '"true" | "false"',
    "value": 'object | array | string | number | boolean | "null"',
    "object": '"{" space ( string ":" space value space ( "," space string ":" space value space )* )? "}"',
    "array": '"[" space ( value space ( "," space value space )* )? "]"',
    # Years 0001-9999 (as datetime), days per month, Feb 29 in leap years only.
    "year": '[1-9] [0-9]{3} | "0" ( [1-9] [0-9]{2} | "0" ( [1-9] [0-9] | "0" [1-9] ) )',
    "leap-year": f'[0-9]{{2}} {_LEAP_YY} | {_LEAP_YY} "00"',
    "date-part": 'year "-" ( ( "0" [13578] | "1" [02] ) "-" ( "0" [1-9] | [12] [0-9] | "3" [01] )'
                 ' | ( "0" [469] | "11" ) "-" ( "0" [1-9] | [12] [0-9] | "30" )'
                 ' | "02-" ( "0" [1-9] | "1" [0-9] | "2" [0-8] ) ) | leap-year "-02-29"',
    "time-part": '( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] ":" [0-5] [0-9] ( "." [0-9]{1,9} )?'
                 ' ( "Z" | [+-] ( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] )',
    "date": r'"\"" date-part "\""',
    "time": r'"\"" time-part "\""',
    "date-time": r'"\"" date-part "T" time-part "\""',
    "uuid": rf'"\"" {_HEX}{{8}} "-" {_HEX}{{4}} "-" {_HEX}{{4}} "-" {_HEX}{{4}} "-" {_HEX}{{12}} "\""',
}
_ATOM = re.compile(r'[a-z0-9-]+|"(?:\\.|[^"\\])*"')


def convert(schema: dict[str, Any] | bool) -> str:
    """A GBNF grammar (start rule ``root``) whose every match is a JSON text valid
    against ``schema``; SchemaError for what it cannot enforce exactly."""
    if not isinstance(schema, (dict, bool)):
        raise SchemaError(f"a schema must be an object or a boolean, not {type(schema).__name__}")
    try:
        return _Converter(schema).grammar()
    except SchemaError:
        raise
    except (TypeError, AttributeError, ValueError, OverflowError) as e:  # a keyword's value is wrong
        raise SchemaError(f"malformed schema ({e})") from None
    except RecursionError:
        raise SchemaError("the schema is nested too deeply") from None


# --- GBNF text ------------------------------------------------------------------

def _hex(c: str) -> str:
    n = ord(c)
    return f"\\x{n:02X}" if n < 0x100 else f"\\u{n:04X}" if n < 0x10000 else f"\\U{n:08X}"


def _lit(text: str) -> str:
    """A GBNF literal; unprintable characters (line separators too) as hex escapes."""
    return '"' + "".join("\\" + c if c in '"\\' else c if c.isprintable() else _hex(c)
                         for c in text) + '"'


def _cls_char(c: str) -> str:
    """A character inside [...]: llama.cpp knows few escapes there, so hex for the rest."""
    return c if c.isascii() and c.isalnum() else _hex(c)


def _grp(expr: str) -> str:
    return expr if _ATOM.fullmatch(expr) else f"( {expr} )"


def _seq(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def _rep(x: str, m: int, n: int | None) -> str:
    """x{m,n} (n None: unbounded), in its shortest spelling."""
    if n is None:
        return {0: f"{x}*", 1: f"{x}+"}.get(m, f"{x}{{{m},}}")
    if n == 0:
        return ""
    if m == n:
        return x if m == 1 else f"{x}{{{m}}}"
    return f"{x}?" if (m, n) == (0, 1) else f"{x}{{{m},{n}}}"


def _json(v: Any) -> str:
    try:
        return json.dumps(v, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError:
        raise SchemaError(f"{v!r} is not a JSON value") from None


def _deps(body: str) -> list[str]:
    """The shared rules a rule body refers to (literals and classes skipped)."""
    bare = re.sub(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]', " ", body)
    return [w for w in re.findall(r"[a-z][a-z0-9-]*", bare) if w in _PRIMS]


# --- integers and decimals ----------------------------------------------------------

def _same_len(x: str, y: str) -> str:
    """Digit strings between x and y, both of the same length. The alternatives start
    with different digits, so each number has one parse."""
    if x == y:
        return _lit(x)
    if len(x) == 1:
        return f"[{x}-{y}]"
    if x[0] == y[0]:
        return _seq(_lit(x[0]), _grp(_same_len(x[1:], y[1:])))
    n = len(x) - 1
    lo_full, hi_full = x[1:] == "0" * n, y[1:] == "9" * n  # x0.. / y9.. need no own branch
    first, last = chr(ord(x[0]) + (not lo_full)), chr(ord(y[0]) - (not hi_full))
    alts = [] if lo_full else [_seq(_lit(x[0]), _grp(_same_len(x[1:], "9" * n)))]
    if first <= last:
        alts.append(_seq(_lit(first) if first == last else f"[{first}-{last}]", _rep("[0-9]", n, n)))
    if not hi_full:
        alts.append(_seq(_lit(y[0]), _grp(_same_len("0" * n, y[1:]))))
    return " | ".join(alts)


def _nat_range(a: int, b: int) -> str:
    """a..b (0 <= a <= b) without leading zeros; the lengths strictly between those of
    a and b are one [1-9] [0-9]{m,n}."""
    if a == 0:
        return '"0"' if b == 0 else f'"0" | {_nat_range(1, b)}'
    la, lb = len(str(a)), len(str(b))
    if la == lb:
        return _same_len(str(a), str(b))
    head = "" if a == 10 ** (la - 1) else _same_len(str(a), "9" * la)
    tail = "" if b == 10**lb - 1 else _same_len("1" + "0" * (lb - 1), str(b))
    lo_len, hi_len = la + bool(head), lb - bool(tail)
    mid = _seq("[1-9]", _rep("[0-9]", lo_len - 1, hi_len - 1)) if lo_len <= hi_len else ""
    return " | ".join(x for x in (head, mid, tail) if x)


def _int_range(lo: int, hi: int) -> str:
    """The integers lo..hi, never as "-0"."""
    alts = [f'"-" {_grp(_nat_range(-hi if hi < 0 else 1, -lo))}'] if lo < 0 else []
    return " | ".join(alts + ([_nat_range(max(lo, 0), hi)] if hi >= 0 else []))


def _frac_nonzero(k: int) -> str:
    """A fraction of 1..k digits, not all zeros (split at its first non-zero digit)."""
    expr = "[1-9]"
    for i in range(2, k + 1):
        expr = f'[1-9] {_rep("[0-9]", 0, i - 1)} | "0" ( {expr} )'
    return f'"." ( {expr} )'


def _magnitude(a: int, a_incl: bool, b: int | None, b_incl: bool) -> str | None:
    """Decimals m (no sign, no exponent) with a <(=) m <(=) b, b None for unbounded:
    ranges of integer parts, each with the fractions allowed there."""
    if b is not None and (a > b or (a == b and not (a_incl and b_incl))):
        return None
    top = b if b is not None else max(10**INT_DIGITS - 1, a)

    def frac(i: int) -> str | None:
        if i == b:
            return _FRAC_ZERO if b_incl else None
        k = SIG_DIGITS - len(str(i))  # digits that keep i.f off an exclusive bound as a double
        if i == a and not a_incl:
            return _frac_nonzero(k) if k > 0 else None
        if b is not None and i == b - 1 and not b_incl:
            return f'( "." {_rep("[0-9]", 1, k)} )?' if k > 0 else ""
        return _FRAC_ANY

    segments: list[list[Any]] = []  # [first, last, fraction], equal neighbours merged

    def push(lo: int, hi: int, f: str | None) -> None:
        if f is not None and lo <= hi:
            if segments and segments[-1][2] == f and segments[-1][1] == lo - 1:
                segments[-1][1] = hi
            else:
                segments.append([lo, hi, f])

    prev = a - 1
    for i in sorted(i for i in ({a} if b is None else {a, b - 1, b}) if a <= i <= top):
        push(prev + 1, i - 1, _FRAC_ANY)
        push(i, i, frac(i))
        prev = i
    push(prev + 1, top, _FRAC_ANY)
    return " | ".join(_seq(_grp(_int_range(lo, hi)), f) for lo, hi, f in segments) or None


def _bounds(s: dict[str, Any]) -> tuple[Fraction | None, bool, Fraction | None, bool]:
    """(low, inclusive, high, inclusive), exact, from the four bound keywords."""
    def num(key: str) -> Fraction | None:
        v = s.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                              or not math.isfinite(v)):
            raise SchemaError(f"{key} must be a number, not {v!r}")
        return None if v is None else Fraction(v)

    lo, lo_incl, hi, hi_incl = num("minimum"), True, num("maximum"), True
    if (ex := num("exclusiveMinimum")) is not None and (lo is None or ex >= lo):
        lo, lo_incl = ex, False
    if (ex := num("exclusiveMaximum")) is not None and (hi is None or ex <= hi):
        hi, hi_incl = ex, False
    return lo, lo_incl, hi, hi_incl


# --- schemas ----------------------------------------------------------------------

def _normalize(s: dict[str, Any]) -> dict[str, Any]:
    """Older spellings -> 2020-12: tuple "items", draft-4 exclusive flags."""
    s = dict(s)
    if isinstance(s.get("items"), list):
        s["prefixItems"] = s.pop("items")
        if "additionalItems" in s:
            s["items"] = s.pop("additionalItems")
    s.pop("additionalItems", None)  # ignored unless "items" is a list
    for bound, ex in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if isinstance(s.get(ex), bool) and s.pop(ex) and bound in s:
            s[ex] = s.pop(bound)
    return s


def _constraints(s: dict[str, Any], besides: frozenset[str] = frozenset()) -> set[str]:
    return {k for k in s if k in _ASSERTIONS and k not in besides
            and not (k == "format" and s[k] not in _FORMATS)}


def _both(x: Any, y: Any) -> Any:
    """allOf of two subschemas, simplified."""
    if x is True or x == {}:
        return y
    if y is True or y == {}:
        return x
    return False if x is False or y is False else {"allOf": [x, y]}


def _type_set(t: Any) -> set[str]:
    return {t} if isinstance(t, str) else set(t)


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """One schema meaning a AND b, or SchemaError."""
    out = dict(a)
    for k, v in b.items():
        same = k in out and _json(out[k]) == _json(v)  # as JSON: in Python, False == 0
        if k not in out or same or k not in _ASSERTIONS or k in _MERGED_BELOW:
            out.setdefault(k, v)  # the first annotation wins
        elif k == "type":
            ta, tb = _type_set(out[k]), _type_set(v)
            both = ta & tb
            if ("integer" in ta and "number" in tb) or ("number" in ta and "integer" in tb):
                both.add("integer")  # the integers are numbers both allow
            if not both:
                raise SchemaError(f"allOf: types {out[k]!r} and {v!r} have nothing in common")
            out[k] = [t for t in _TYPES if t in both]
        elif k in _MIN_KEYS or k in _MAX_KEYS:
            out[k] = (max if k in _MIN_KEYS else min)(out[k], v)
        elif k == "required":
            out[k] = [*out[k], *(r for r in v if r not in out[k])]
        elif k == "enum":
            out[k] = [x for x in out[k] if _json(x) in {_json(y) for y in v}]
        else:
            raise SchemaError(f"allOf: cannot combine two different {k!r}")
    # Each side's additionalProperties / items applies to the other side's properties /
    # prefixItems as well.
    pa, pb = a.get("properties") or {}, b.get("properties") or {}
    xa, xb = a.get("additionalProperties", True), b.get("additionalProperties", True)
    if pa or pb:
        out["properties"] = {k: _both(pa.get(k, xa), pb.get(k, xb)) for k in {**pa, **pb}}
    if "additionalProperties" in a or "additionalProperties" in b:
        out["additionalProperties"] = _both(xa, xb)
    if "prefixItems" in a and "prefixItems" in b:
        raise SchemaError("allOf: cannot combine two prefixItems")
    ia, ib = a.get("items", True), b.get("items", True)
    if "prefixItems" in a or "prefixItems" in b:
        prefix, other = (a["prefixItems"], ib) if "prefixItems" in a else (b["prefixItems"], ia)
        out["prefixItems"] = [_both(p, other) for p in prefix]
    if "items" in a or "items" in b:
        out["items"] = _both(ia, ib)
    return out


def _has_type(v: Any, t: str) -> bool:
    if t in ("integer", "number") and (isinstance(v, bool) or not isinstance(v, (int, float))):
        return False
    return {"null": v is None, "boolean": isinstance(v, bool), "string": isinstance(v, str),
            "array": isinstance(v, list), "object": isinstance(v, dict), "number": True,
            "integer": isinstance(v, int) or (isinstance(v, float) and v.is_integer())}[t]


def _kw(s: dict[str, Any], key: str, kind: type) -> Any:
    """A keyword's object or array value (empty if absent)."""
    v = s.get(key, kind())
    if not isinstance(v, kind):
        raise SchemaError(f"{key} must be {'an object' if kind is dict else 'an array'}")
    return v


def _count(s: dict[str, Any], key: str) -> int | None:
    v = s.get(key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0
                          or not math.isfinite(v) or v != int(v)):
        raise SchemaError(f"{key} must be a non-negative integer, not {v!r}")
    return None if v is None else int(v)


def _key_excluding(names: list[str]) -> str:
    """A JSON string that is none of ``names``: raw characters only while it still
    spells the start of one (an escape could spell a name), anything once it differs."""
    def node(words: list[str]) -> str:
        alts = [] if "" in words else [r'"\""']
        heads = sorted({w[0] for w in words if w and w[0] not in '"\\\x7f' and w[0] >= " "})
        alts.append(f'[^{_NOT_CHAR}{"".join(map(_cls_char, heads))}] char* "\\""')
        alts += [_seq(_lit(c), _grp(node([w[1:] for w in words if w[:1] == c]))) for c in heads]
        return " | ".join(alts)
    return f'"\\"" ( {node(names)} )'


class _Converter:
    def __init__(self, root: dict[str, Any] | bool) -> None:
        self.root = root
        self.rules: dict[str, str] = {"root": ""}  # in output order, root first
        self.by_body: dict[str, str] = {}  # identical bodies share one rule
        self.refs: dict[str, str] = {}  # $ref -> its rule, so recursion is a rule reference

    def grammar(self) -> str:
        self.rules["root"] = self.uses(self.body(self.root, "root", frozenset()))
        return "".join(f"{n} ::= {b}\n" for n, b in self.rules.items())

    def name(self, hint: str) -> str:
        base = re.sub(r"[^a-z0-9]+", "-", hint.lower()).strip("-") or "r"
        if base[0].isdigit() or base in ("true", "false"):
            # OpenVINO's xgrammar lexes those as a number or a boolean, not a rule name
            # (a "$defs" entry named "1st" made its step() fail); llama.cpp takes both.
            base = f"r-{base}"
        name, i = base, 1
        while name in self.rules or name in _PRIMS:
            i += 1
            name = f"{base}-{i}"
        return name

    def add(self, hint: str, body: str) -> str:
        """An atom for ``body``: itself if it is one, else a (shared) rule."""
        if _ATOM.fullmatch(body):
            return body
        if body not in self.by_body:
            self.by_body[body] = name = self.name(hint)
            self.rules[name] = self.uses(body)
        return self.by_body[body]

    def uses(self, body: str) -> str:
        """``body``, once the shared rules it refers to are in."""
        for dep in _deps(body):
            self.prim(dep)
        return body

    def prim(self, name: str) -> str:
        if name not in self.rules:
            self.rules[name] = _PRIMS[name]  # first: "value" and "object" refer to each other
            self.uses(_PRIMS[name])
        return name

    def visit(self, s: Any, name: str, guard: frozenset[str]) -> str:
        return self.add(name, self.body(s, name, guard))

    def resolve(self, ref: Any) -> Any:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise SchemaError(f"only local $ref (#/...) is supported, not {ref!r}")
        node: Any = self.root
        for part in ref[1:].split("/")[1:]:
            part = unquote(part).replace("~1", "/").replace("~0", "~")
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict) and part in node:
                node = node[part]
            else:
                raise SchemaError(f"$ref {ref!r} points nowhere")
        return node

    def ref(self, ref: str, guard: frozenset[str]) -> str:
        # guard: the refs entered since the last matched character; one of them
        # again would be a loop that matches nothing (left recursion).
        if ref in guard:
            raise SchemaError(f"$ref {ref!r} recurses without matching any text")
        if ref not in self.refs:
            self.refs[ref] = name = self.name(ref.rsplit("/", 1)[-1] if "/" in ref else "self")
            self.rules[name] = ""  # reserved: its body may refer to it
            self.rules[name] = self.uses(self.body(self.resolve(ref), name, guard | {ref}))
        return self.refs[ref]

    def flatten(self, s: Any, seen: set[str], depth: int = 0) -> dict[str, Any]:
        """``s`` with its $ref and allOf merged in; the refs inlined go to ``seen``."""
        if depth > 32:
            raise SchemaError("$ref/allOf nesting is too deep (circular?)")
        if s is True:
            return {}
        if not isinstance(s, dict):
            raise SchemaError("the schema false matches nothing" if s is False
                              else f"a schema must be an object or a boolean, not {s!r}")
        s = _normalize(s)
        parts = []
        if "$ref" in s:
            seen.add(s["$ref"])
            parts.append(self.flatten(self.resolve(s["$ref"]), seen, depth + 1))
        parts += [self.flatten(p, seen, depth + 1) for p in _kw(s, "allOf", list)]
        out = {k: v for k, v in s.items() if k not in ("$ref", "allOf")}
        for p in parts:
            out = _merge(out, p)
        return out

    def body(self, s: Any, name: str, guard: frozenset[str]) -> str:
        """A rule body for ``s``; sub-schemas get rules named after their path."""
        if s is True:
            return self.prim("value")
        if isinstance(s, dict) and isinstance(s.get("$ref"), str) and not _constraints(s, _REF):
            return self.ref(s["$ref"], guard)  # a rule of its own, so that it can recurse
        seen: set[str] = set()
        s = self.flatten(s, seen)
        if seen & guard:
            raise SchemaError(f"$ref {min(seen & guard)!r} recurses without matching any text")
        guard |= seen
        for key in ("anyOf", "oneOf"):  # oneOf's "exactly one" is not enforced
            if key in s:
                rest = {k: v for k, v in s.items() if k != key}
                branches = [b for b in _kw(s, key, list) if b is not False]
                if not branches:
                    raise SchemaError(f"no {key} branch can match")
                if _constraints(rest):  # A and (B or C) = (A and B) or (A and C)
                    branches = [{"allOf": [rest, b]} for b in branches]
                return " | ".join(dict.fromkeys(self.visit(b, f"{name}-{i}", guard)
                                                for i, b in enumerate(branches)))
        if bad := _UNSUPPORTED & s.keys():
            raise SchemaError(f"{min(bad)!r} is not supported")
        if "enum" in s or "const" in s:
            return self.enum(s)
        types = self.types(s)
        if not types:
            return self.prim("value")
        alts = []
        for t in types:
            tname = f"{name}-{t}" if len(types) > 1 else name
            alts.append('"null"' if t == "null" else self.prim("boolean") if t == "boolean" else
                        getattr(self, t)(s, tname))
        return " | ".join(alts)

    def types(self, s: dict[str, Any]) -> list[str]:
        if "type" not in s:  # inferred from the keywords: stricter, never weaker
            return [t for t, keys in _KEYWORDS_OF.items() if _constraints(s) & keys]
        types = _type_set(s["type"])
        if unknown := types - set(_TYPES):
            raise SchemaError(f"unknown type {min(unknown)!r}")
        if "number" in types:
            types.discard("integer")  # one way to match an integer
        if not types:
            raise SchemaError("type [] matches nothing")
        return [t for t in _TYPES if t in types]

    def enum(self, s: dict[str, Any]) -> str:
        values = _kw(s, "enum", list) if "enum" in s else [s["const"]]
        if "enum" in s and "const" in s:
            values = [v for v in values if _json(v) == _json(s["const"])]
        if other := _constraints(s, frozenset({"enum", "const", "type"})):
            raise SchemaError(f"enum/const together with {min(other)!r} is not supported")
        if "type" in s:
            types = self.types(s)
            values = [v for v in values if any(_has_type(v, t) for t in types)]
        if not values:
            raise SchemaError("no enum/const value satisfies the schema")
        return " | ".join(dict.fromkeys(_lit(_json(v)) for v in values))

    def string(self, s: dict[str, Any], name: str) -> str:
        lo, hi = _count(s, "minLength") or 0, _count(s, "maxLength")
        if s.get("format") in _FORMATS:
            if lo or hi is not None:
                raise SchemaError(f"format {s['format']!r} with minLength/maxLength is not supported")
            return self.prim(s["format"])
        if hi is not None and lo > hi:
            raise SchemaError("minLength > maxLength: no string fits")
        if not lo and hi is None:
            return self.prim("string")
        return _seq(r'"\""', self.rep(self.prim("char"), lo, hi, "char"), r'"\""')

    def rep(self, x: str, m: int, n: int | None, hint: str) -> str:
        """x{m,n} as llama.cpp takes it: it refuses counts above 2000, so a long run
        is x{m} then x{0,n-m}, each made of chunks of MAX_REPEAT (unambiguously)."""
        k = MAX_REPEAT
        if max(m, n or 0) > k * k:
            raise SchemaError(f"a length limit of {max(m, n or 0)} is too large")
        if m <= k and (n is None or n <= k):
            return _rep(x, m, n)
        chunk = self.add(f"{hint}-chunk", _rep(x, k, k))
        head = _seq(_rep(chunk, m // k, m // k), _rep(x, m % k, m % k))
        if n is None or n - m <= k:
            return _seq(head, _rep(x, 0, None if n is None else n - m))
        q, r = divmod(n - m, k)
        # fewer than q chunks and a tail shorter than one | q chunks and a tail of <= r
        return _seq(head, f"( {_seq(_rep(chunk, 0, q - 1), _rep(x, 0, k - 1))}"
                          f" | {_seq(_rep(chunk, q, q), _rep(x, 0, r))} )")

    def integer(self, s: dict[str, Any], name: str) -> str:
        mult = s.get("multipleOf")
        if mult is not None and (isinstance(mult, bool) or not isinstance(mult, (int, float))
                                 or not 0 < mult < math.inf or (1 / Fraction(mult)).denominator != 1):
            raise SchemaError("multipleOf is not supported (except divisors of 1, on integers)")
        lo, lo_incl, hi, hi_incl = _bounds(s)
        ilo = None if lo is None else math.ceil(lo) if lo_incl else math.floor(lo) + 1
        ihi = None if hi is None else math.floor(hi) if hi_incl else math.ceil(hi) - 1
        cap = max([10**INT_DIGITS - 1] + [10 ** len(str(abs(v))) - 1 for v in (ilo, ihi) if v is not None])
        ilo, ihi = -cap if ilo is None else ilo, cap if ihi is None else ihi
        if ilo > ihi:
            raise SchemaError(f"no integer lies between the bounds ({ilo} > {ihi})")
        return _int_range(ilo, ihi)

    def number(self, s: dict[str, Any], name: str) -> str:
        if "multipleOf" in s:
            raise SchemaError("multipleOf is not supported for numbers")
        lo, lo_incl, hi, hi_incl = _bounds(s)
        if lo is None and hi is None:
            return self.prim("number")
        for v in (lo, hi):
            if v is not None and (v.denominator != 1 or abs(v) >= NUMBER_BOUND):
                raise SchemaError(f"number bounds must be whole numbers below 10^15 in magnitude "
                                  f"(not {float(v)!r}); use type integer, or whole bounds")
        alts = []
        if hi is None or hi > 0 or (hi == 0 and hi_incl):  # x >= 0, written without "-"
            a, a_incl = (int(lo), lo_incl) if lo is not None and lo >= 0 else (0, True)
            if m := _magnitude(a, a_incl, None if hi is None else int(hi), hi_incl):
                alts.append(m)
        if lo is None or lo < 0:  # x <= 0 as "-" m: "-0" only where 0 is allowed
            a, a_incl = (-int(hi), hi_incl) if hi is not None and hi <= 0 else (0, True)
            if m := _magnitude(a, a_incl, None if lo is None else -int(lo), lo_incl):
                alts.append(f'"-" {_grp(m)}')
        if not alts:
            raise SchemaError("no number lies between the bounds")
        return " | ".join(alts)

    def object(self, s: dict[str, Any], name: str) -> str:
        props, required = dict(_kw(s, "properties", dict)), _kw(s, "required", list)
        if not all(isinstance(r, str) for r in required):
            raise SchemaError("required must be an array of strings")
        extra = s.get("additionalProperties", "properties" not in s)
        extra = True if extra == {} else extra
        for r in required:  # undeclared but required: its schema is additionalProperties'
            if r not in props and s.get("additionalProperties") is False:
                raise SchemaError(f"required property {r!r} is not allowed (additionalProperties is false)")
            props.setdefault(r, True if extra is False else extra)
        lo, hi = _count(s, "minProperties") or 0, _count(s, "maxProperties")
        if not props and extra is True and not lo and hi is None:
            return self.prim("object")
        req: list[str] = []
        opt: list[str] = []
        for k, sub in props.items():
            if sub is False and k in required:
                raise SchemaError(f"required property {k!r} has the schema false")
            if sub is not False:  # false: the key must not appear
                kv = f'{_lit(_json(k))} ":" space {self.visit(sub, f"{name}-{k}", frozenset())} space'
                (req if k in required else opt).append(kv)
        # min/maxProperties: only what the structure already gives, or "not empty"
        if lo > len(req) and not (lo == 1 and not req):
            raise SchemaError("minProperties beyond the required properties is not supported")
        if hi is not None and (extra is not False or hi < len(req) + len(opt)):
            raise SchemaError("maxProperties is not supported unless every allowed key fits")
        extra_kv = tail = ""
        if extra is not False:  # extra keys are not declared ones (those have their schema)
            key = self.add(f"{name}-extra-key", _key_excluding(list(props))) if props else "string"
            value = self.visit(extra, f"{name}-extra", frozenset())
            extra_kv = self.add(f"{name}-extra-kv", f'{key} ":" space {value} space')
            tail = f'( "," space {extra_kv} )*'
        chain = ""  # optionals in order, each at most once: S_i ::= kv_i ("," S_i+1)? | S_i+1
        for i in range(len(opt) - 1, -1, -1):
            body = f'{opt[i]} ( "," space {chain} )? | {chain}' if chain else opt[i]
            chain = self.add(f"{name}-opt-{i}", body)
        if req:
            members = _seq(' "," space '.join(req), f'( "," space {chain} )?' if chain else "", tail)
        elif chain or extra_kv:
            members = f'( {" | ".join(_seq(x, tail) for x in (chain, extra_kv) if x)} ){"" if lo else "?"}'
        elif lo:
            raise SchemaError("minProperties cannot be met: no property is allowed")
        else:
            members = ""
        return _seq('"{" space', members, '"}"')

    def array(self, s: dict[str, Any], name: str) -> str:
        prefix, items = _kw(s, "prefixItems", list), s.get("items", True)
        items = True if items == {} else items
        lo, hi = _count(s, "minItems") or 0, _count(s, "maxItems")
        if items is False:
            hi = len(prefix) if hi is None else min(hi, len(prefix))
        if s.get("uniqueItems") is True and (hi is None or hi > 1):
            raise SchemaError("uniqueItems is not supported")
        if hi is not None and lo > hi:
            raise SchemaError("no array length satisfies minItems/maxItems/items")
        if not prefix and items is True and not lo and hi is None:
            return self.prim("array")
        if hi == 0:
            return '"[" space "]"'
        pre = [self.visit(p, f"{name}-{i}", frozenset()) for i, p in enumerate(prefix)]
        item = self.visit(items, f"{name}-item", frozenset()) if items is not False else ""

        def rest(k: int) -> str:  # the elements from index k on; element k is present
            if k >= len(pre):
                return _seq(f"{item} space", self.rep(f'( "," space {item} space )', max(lo - k, 1) - 1,
                                                      None if hi is None else hi - k - 1, f"{name}-items"))
            if (hi is not None and k + 1 >= hi) or (k + 1 >= len(pre) and not item):
                return f"{pre[k]} space"
            nxt = f'"," space {rest(k + 1)}'
            return f"{pre[k]} space {nxt}" if k + 1 < lo else f"{pre[k]} space ( {nxt} )?"

        return f'"[" space {rest(0)} "]"' if lo else f'"[" space ( {rest(0)} )? "]"'
