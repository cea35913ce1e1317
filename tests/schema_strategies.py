"""Hypothesis strategies of JSON schemas, for the converter's property tests
(tests/unit/test_schema_gbnf.py) and the OpenVINO pipeline's grammar fuzz
(tests/backends/test_openvino_structured.py)."""

from hypothesis import strategies as st

SMALL = st.integers(-30, 30)
SCALARS = st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=3)
KEYS = st.sampled_from(["a", "b", "ab", "é", 'q"', "", "x y"])
LEAVES = (
    st.fixed_dictionaries({"type": st.sampled_from(["integer", "number"])}, optional={
        "minimum": SMALL, "maximum": SMALL, "exclusiveMinimum": SMALL, "exclusiveMaximum": SMALL})
    | st.fixed_dictionaries({"type": st.just("string")}, optional={
        "minLength": st.integers(0, 4), "maxLength": st.integers(0, 6)})
    | st.sampled_from([{"type": "string", "format": f} for f in ("date", "time", "date-time", "uuid")]
                      + [{"type": "boolean"}, {"type": "null"}, {}, True, {"type": ["string", "null"]}])
    | st.lists(SCALARS, min_size=1, max_size=4).map(lambda v: {"enum": v})
    | SCALARS.map(lambda v: {"const": v}))


def _compound(inner):
    extra = st.sampled_from([None, False, True, {"type": "integer", "maximum": 3}])
    objects = st.builds(
        lambda props, req, ap: {"type": "object", "properties": props, "required": req,
                                **({} if ap is None else {"additionalProperties": ap})},
        st.dictionaries(KEYS, inner, max_size=4), st.lists(KEYS, max_size=2, unique=True), extra)
    maps = st.builds(lambda ap: {"type": "object", "additionalProperties": ap}, inner)
    arrays = st.builds(
        lambda items, prefix, lo, hi: {"type": "array", "items": items, "prefixItems": prefix,
                                       "minItems": lo, **({} if hi is None else {"maxItems": hi})},
        inner | st.just(False), st.lists(inner, max_size=2), st.integers(0, 3),
        st.none() | st.integers(0, 5))
    return (objects | maps | arrays | st.lists(inner, min_size=1, max_size=3).map(lambda b: {"anyOf": b})
            | st.lists(inner, min_size=1, max_size=2).map(lambda b: {"allOf": b}))


SCHEMAS = st.recursive(LEAVES, _compound, max_leaves=8)

# "$defs" named so that a rule name made from them would start with a digit or be a
# boolean (xgrammar lexes "1st" as a number and "true" as a boolean, not as rule names).
DEF_NAMES = st.sampled_from(["1st", "true", "false", "é", "a b", "2"])
WITH_DEFS = st.builds(
    lambda defs, use: {"$defs": defs, "type": "array",
                       "prefixItems": [{"$ref": f"#/$defs/{k}"} for k in list(defs)[:use]], "items": False},
    st.dictionaries(DEF_NAMES, SCHEMAS, min_size=1, max_size=3), st.integers(1, 3))
