"""JSON forms of specs and rules (for ``--rules FILE``, checkpoint headers and printed plans).

Example rules file::

  [
    {"pattern": "embed|norm|lm_head", "weight": null},
    {"pattern": "layers_0/", "weight": {"qtype": "int8", "granularity": "channel"}},
    {"pattern": "kernel$", "weight": {"qtype": "uint4", "symmetric": false,
                                      "granularity": "group", "group_size": 128},
     "algorithm": "gptq", "options": {"act_order": true, "damp": 0.01}}
  ]

``options`` holds the rule's algorithm options (``jq.spec.GPTQOptions``, ``AWQOptions`` or
``SmoothQuantOptions``, chosen by ``algorithm``); fields left out keep their defaults.
"""
from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jq.qtypes import QType
from jq.spec import (ALGORITHM_OPTIONS, ActivationSpec, ActMode, Algorithm, AWQOptions, Clip,
                     ClipMethod, GPTQOptions, Granularity, QuantSpec, Rule, SmoothQuantOptions)

_ENUMS = {"qtype": QType, "granularity": Granularity, "method": ClipMethod, "mode": ActMode,
          "algorithm": Algorithm}


def _to_json(obj: Any) -> Any:
  if isinstance(obj, enum.Enum):
    return obj.value
  if dataclasses.is_dataclass(obj):
    return {f.name: _to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
  if isinstance(obj, tuple):
    return list(obj)
  return obj


def _show(v: Any) -> str:
  """A JSON value as written in the file (``"false"``, ``2.5``, ``null``)."""
  try:
    return json.dumps(v)
  except (TypeError, ValueError):
    return repr(v)


# Expected JSON types of the spec fields (enum fields: _ENUMS; clip: an object).
_BOOLS = {"symmetric", "required"}
_INTS = {"group_size", "group_axis", "grid"}
_NUMBERS = {"ratio", "percentile", "min_ratio"}
_STRINGS = {"scale_dtype", "pattern"}
_NULLABLE = {"group_size", "group_axis", "channel_axes"}


def _is_json_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def check_field_type(k: str, v: Any, where: str) -> None:
  """Raises ValueError ``"<where>.<k>: expected ..., got <v>"`` when a JSON value has the wrong
  type for spec/rule field ``k`` (fields not listed here are checked by their dataclass)."""
  loc = f"{where}.{k}"
  if v is None and k in _NULLABLE:
    return
  if k in _BOOLS and not isinstance(v, bool):
    raise ValueError(f"{loc}: expected a bool (true or false), got {_show(v)}")
  if k in _INTS and not _is_json_int(v):
    raise ValueError(f"{loc}: expected an int{' or null' if k in _NULLABLE else ''}, got "
                     f"{_show(v)}")
  if k in _NUMBERS and not (isinstance(v, (int, float)) and not isinstance(v, bool)):
    raise ValueError(f"{loc}: expected a number, got {_show(v)}")
  if k in _STRINGS and not isinstance(v, str):
    raise ValueError(f"{loc}: expected a string, got {_show(v)}")
  if k in _ENUMS and not isinstance(v, str):
    raise ValueError(f"{loc}: expected one of {[m.value for m in _ENUMS[k]]}, got {_show(v)}")
  if k == "channel_axes" and not (isinstance(v, list) and all(_is_json_int(a) for a in v)):
    raise ValueError(f"{loc}: expected a list of ints or null, got {_show(v)}")
  if k == "clip" and not isinstance(v, dict):
    raise ValueError(f"{loc}: expected an object, got {_show(v)}")


def _build(cls, d: dict[str, Any], where: str):
  if not isinstance(d, dict):
    raise ValueError(f"{where}: expected an object, got {type(d).__name__}")
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = set(d) - names
  if unknown:
    raise ValueError(f"{where}: unknown field(s) {sorted(unknown)} for {cls.__name__}; "
                     f"known: {sorted(names)}")
  kw = {}
  for k, v in d.items():
    check_field_type(k, v, where)
    if k in _ENUMS:
      try:
        v = _ENUMS[k](v)
      except ValueError as e:
        raise ValueError(f"{where}: {k}={v!r} is not one of "
                         f"{[m.value for m in _ENUMS[k]]}") from e
    elif k == "clip":
      v = _build(Clip, v, f"{where}.clip")
    elif k == "channel_axes" and v is not None:
      v = tuple(v)
    kw[k] = v
  try:
    return cls(**kw)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from e


def spec_to_json(spec: QuantSpec | ActivationSpec | None) -> Any:
  return None if spec is None else _to_json(spec)


def spec_from_json(d: dict[str, Any] | None, where: str = "spec") -> QuantSpec | None:
  return None if d is None else _build(QuantSpec, d, where)


def activation_from_json(d: dict[str, Any] | None, where: str = "activation"
                         ) -> ActivationSpec | None:
  return None if d is None else _build(ActivationSpec, d, where)


def rule_to_json(rule: Rule) -> dict[str, Any]:
  return _to_json(rule)


def options_from_json(d: dict[str, Any] | None, algorithm: Algorithm, where: str = "options"
                      ) -> GPTQOptions | AWQOptions | SmoothQuantOptions | None:
  """The options object of ``algorithm`` from its JSON form (``None``: the defaults).

  Raises:
    ValueError: naming the JSON location (``where.field``): an algorithm without options, an
      unknown field, or a value of the wrong type or range.
  """
  if d is None:
    return None
  cls = ALGORITHM_OPTIONS.get(algorithm)
  if cls is None:
    raise ValueError(f"{where}: algorithm {algorithm.value!r} takes no options; drop 'options' "
                     f"or set 'algorithm' to one of {[a.value for a in ALGORITHM_OPTIONS]}")
  if not isinstance(d, dict):
    raise ValueError(f"{where}: expected an object of {algorithm.value} options, got "
                     f"{type(d).__name__}")
  names = [f.name for f in dataclasses.fields(cls)]
  for k, v in d.items():
    if k not in names:
      raise ValueError(f"{where}.{k}: unknown {algorithm.value} option; known: {names}")
    try:
      cls(**{k: v})  # each field checked alone, so the message names the field at fault
    except (TypeError, ValueError) as e:
      raise ValueError(f"{where}.{k}: {v!r}: {e}") from e
  return cls(**d)


def rule_from_json(d: dict[str, Any], where: str = "rule") -> Rule:
  """A :class:`Rule` from its JSON form.

  Raises:
    ValueError: naming the JSON location (``rules[2].weight.symmetric: expected a bool (true or
      false), got "false"``): a missing pattern, unknown fields, or values of the wrong type or
      range.
  """
  if not isinstance(d, dict) or "pattern" not in d or "weight" not in d:
    got = sorted(d) if isinstance(d, dict) else type(d).__name__
    raise ValueError(f"{where}: a rule needs at least 'pattern' and 'weight' (null keeps the "
                     f"matching parameters in float), got {got}")
  d = dict(d)
  names = {f.name for f in dataclasses.fields(Rule)}
  if set(d) - names:
    raise ValueError(f"{where}: unknown field(s) {sorted(set(d) - names)}; known: {sorted(names)}")
  for k in ("pattern", "required"):
    if k in d:
      check_field_type(k, d[k], where)
  if "algorithm" in d:
    check_field_type("algorithm", d["algorithm"], where)
  d["weight"] = spec_from_json(d.get("weight"), f"{where}.weight")
  d["activation"] = activation_from_json(d.get("activation"), f"{where}.activation")
  if "algorithm" in d:
    try:
      d["algorithm"] = Algorithm(d["algorithm"])
    except ValueError as e:
      raise ValueError(f"{where}: algorithm={d['algorithm']!r} is not one of "
                       f"{[a.value for a in Algorithm]}") from e
  if "options" in d:
    d["options"] = options_from_json(d["options"], d.get("algorithm", Algorithm.RTN),
                                     f"{where}.options")
  try:
    return Rule(**d)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from e


def rules_to_json(rules: Sequence[Rule]) -> str:
  """Rules as pretty JSON (reusable with ``jq-quant quantize --rules FILE``)."""
  return json.dumps([rule_to_json(r) for r in rules], indent=2)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for k, v in pairs:
    if k in out:
      raise ValueError(f"rules: key {k!r} appears twice in one object ({_show(out[k])} and "
                       f"{_show(v)}); keep one")
    out[k] = v
  return out


def rules_from_json(text: str) -> tuple[Rule, ...]:
  """Rules from the text of a rules file (a JSON list of rule objects, at least one).

  Raises:
    ValueError: not JSON, a key given twice in one object, an empty list, or a rule error naming
      its location (see :func:`rule_from_json`).
  """
  try:
    data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
  except json.JSONDecodeError as e:
    raise ValueError(f"rules: not valid JSON: {e}") from e
  except RecursionError as e:
    raise ValueError("rules: the JSON nests too deeply to be a rules file") from e
  if not isinstance(data, list):
    raise ValueError("rules: expected a JSON list of rule objects")
  if not data:
    raise ValueError("rules: the list is empty, so nothing would be quantized; give at least one "
                     "rule (e.g. {\"pattern\": \"kernel$\", \"weight\": {\"qtype\": \"int8\"}})")
  return tuple(rule_from_json(d, f"rules[{i}]") for i, d in enumerate(data))


def load_rules(path: str | Path) -> tuple[Rule, ...]:
  """Rules from a rules file (UTF-8 JSON, see :func:`rules_from_json`); OSErrors name the path."""
  try:
    text = Path(path).read_bytes().decode("utf-8-sig")  # (a BOM, as some editors write, is fine)
  except UnicodeDecodeError as e:
    raise ValueError(f"rules file {path}: not UTF-8 text ({e}); a rules file is a JSON list of "
                     "rule objects") from e
  return rules_from_json(text)
