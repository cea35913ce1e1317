"""backends.grammar: the dialect check the OpenVINO engine runs before a grammar can reach
its pipeline, and the shared schema-to-grammar entry point. Without a model; the real
pipeline compiles what passes in tests/backends/test_openvino_structured.py."""

from __future__ import annotations

import pytest

from backends.base import InvalidRequest
from backends.grammar import GrammarError, check, for_schema
from backends.schema_gbnf import convert

# Each of these either failed inside OpenVINO GenAI's step() (an undefined rule, an empty
# body, a rule name starting with a digit: probed on 2026.4.1) or is refused by xgrammar's
# parser or llama.cpp's by their sources (class escapes, reversed ranges, counts).
REFUSED = [
    ('root ::= foo\n', "'foo' is not defined"),
    ('root ::= \n', "empty sequence"),
    ('root ::= "a" | \n', "empty sequence"),
    ('root ::= ( )\n', "empty sequence"),
    ('root ::= x\n1x ::= "a"\nx ::= "b"\n', "not a rule name"),
    ('root ::= true\ntrue ::= "a"\n', "boolean"),
    ('root ::= [\\d]\n', "escape \\d"),
    ('root ::= [z-a]\n', "out of order"),
    ('root ::= []\n', "empty class"),
    ('root ::= "a"{2001}\n', "repetition"),
    ('root ::= "a"{3,2}\n', "repetition"),
    ('root ::= "\\ud800"\n', "not a Unicode scalar value"),
    ('root ::= "a\n', "unterminated literal"),
    ('root ::= "a"\nroot ::= "b"\n', "defined twice"),
    ('x ::= "a"\n', "no 'root' rule"),
    ('root = "a"\n', "not 'name ::= body'"),
    ("root ::= " + "( " * 101 + '"a"' + " )" * 101 + "\n", "nested more than 100"),
]


@pytest.mark.parametrize("text, why", REFUSED)
def test_refused(text, why):
    with pytest.raises(GrammarError, match=__import__("re").escape(why)):
        check(text)


def test_converter_output_passes():
    for schema in [True, {"type": "object"}, {"enum": ["Zoë\u2028", "😀", None]},
                   {"type": "string", "minLength": 1500, "maxLength": 5000},
                   {"type": "array", "items": {"type": "integer"}, "maxItems": 2500},
                   {"type": "string", "format": "date-time"}, {"type": "number", "minimum": -5, "maximum": 5}]:
        check(convert(schema))


def test_rule_names_from_defs_are_letters_first():
    schema = {"$defs": {"1st": {"type": "integer"}, "true": {"type": "null"}, "false": {"type": "boolean"}},
              "type": "array", "items": False,
              "prefixItems": [{"$ref": "#/$defs/1st"}, {"$ref": "#/$defs/true"}, {"$ref": "#/$defs/false"}]}
    text = convert(schema)
    check(text)
    names = [line.split(" ::= ")[0] for line in text.splitlines()]
    assert {"r-1st", "r-true", "r-false"} <= set(names), names


def test_for_schema_is_the_llama_cpp_400():
    with pytest.raises(InvalidRequest, match="the JSON schema cannot be enforced: 'pattern' is not supported"):
        for_schema({"type": "string", "pattern": "a+"})
    assert for_schema({"type": "object"}) == convert({"type": "object"})
