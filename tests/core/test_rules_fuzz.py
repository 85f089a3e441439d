"""Fuzzing the rules-file parser: any JSON, and any single-field mutation of a valid rules file,
either parses to rules that round-trip, or raises ValueError naming where (never another
exception type, never a rule holding a value of the wrong type)."""
from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

import jq
from jq import spec_json

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-300, 300) | st.floats(allow_nan=True) |
    st.text(max_size=12),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids,
                                                               max_size=5),
    max_leaves=20)
_BASE = json.loads(spec_json.rules_to_json(jq.recipe_rules("gptq-w4a16-g128-actorder")))
_FIELDS = sorted({(i, k) for i, r in enumerate(_BASE) for k in r}
                 | {(i, f"weight.{k}") for i, r in enumerate(_BASE) if r.get("weight")
                    for k in r["weight"]})


def _parse(text: str):
  try:
    rules = spec_json.rules_from_json(text)
  except ValueError:
    return None
  assert spec_json.rules_from_json(spec_json.rules_to_json(rules)) == rules
  for r in rules:
    assert isinstance(r.pattern, str) and isinstance(r.required, bool)
    if r.weight is not None:
      assert isinstance(r.weight.symmetric, bool)
      assert all(isinstance(a, int) and not isinstance(a, bool)
                 for a in (r.weight.channel_axes or ()))
  return rules


@given(_JSON)
def test_any_json_parses_or_raises_value_error(doc):
  _parse(json.dumps(doc))


@given(st.sampled_from(_FIELDS), _JSON)
def test_one_mutated_field_parses_or_raises_value_error(field, value):
  rules = json.loads(json.dumps(_BASE))
  i, key = field
  target = rules[i]
  if key.startswith("weight."):
    target, key = target["weight"], key.split(".", 1)[1]
  target[key] = value
  _parse(json.dumps(rules))
