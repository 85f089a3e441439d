"""Named recipes: rules (and PTQ options) that ``jq-quant --recipe`` and users can pick by name.

RTN recipes come from ``jq.spec.RECIPES``; the algorithm recipes add GPTQ, AWQ or SmoothQuant.
All skip embeddings, norms, biases and the output head (``jq.spec.default_rules``).
"""
from __future__ import annotations

import dataclasses

from jq.ptq.pipeline import PTQConfig
from jq.spec import (A8_DYNAMIC, A8_STATIC, RECIPES, W3A16_G128, W4A16_G32, W4A16_G128, W8A16,
                     Algorithm, Rule, default_rules)

_ALGO: dict[str, tuple[tuple[Rule, ...], PTQConfig]] = {
    "gptq-w4a16-g128": (default_rules(W4A16_G128, algorithm=Algorithm.GPTQ), PTQConfig()),
    "gptq-w4a16-g128-actorder": (default_rules(W4A16_G128, algorithm=Algorithm.GPTQ),
                                 PTQConfig(gptq_act_order=True)),
    "gptq-w4a16-g32": (default_rules(W4A16_G32, algorithm=Algorithm.GPTQ), PTQConfig()),
    "gptq-w3a16-g128": (default_rules(W3A16_G128, algorithm=Algorithm.GPTQ), PTQConfig()),
    "awq-w4a16-g128": (default_rules(W4A16_G128, algorithm=Algorithm.AWQ), PTQConfig()),
    "awq-w4a16-g32": (default_rules(W4A16_G32, algorithm=Algorithm.AWQ), PTQConfig()),
    "awq-w3a16-g128": (default_rules(W3A16_G128, algorithm=Algorithm.AWQ), PTQConfig()),
    "smoothquant-w8a8": (default_rules(W8A16, A8_DYNAMIC, algorithm=Algorithm.SMOOTHQUANT),
                         PTQConfig()),
    "smoothquant-w8a8-static": (default_rules(W8A16, A8_STATIC, algorithm=Algorithm.SMOOTHQUANT),
                                PTQConfig()),
}


def names() -> list[str]:
  return sorted(RECIPES) + sorted(_ALGO)


def rules(name: str) -> tuple[Rule, ...]:
  """The rules of a named recipe."""
  if name in RECIPES:
    w, a = RECIPES[name]
    return default_rules(w, a)
  if name in _ALGO:
    return _ALGO[name][0]
  raise ValueError(f"unknown recipe {name!r}; choose one of {names()}")


def config(name: str) -> PTQConfig:
  """PTQ options of a named recipe (defaults for RTN recipes)."""
  return _ALGO[name][1] if name in _ALGO else PTQConfig()


def needs_calibration(rules_: tuple[Rule, ...]) -> bool:
  """True when some rule uses GPTQ/AWQ/SmoothQuant or static activation scales."""
  return any(r.weight is not None and (r.algorithm is not Algorithm.RTN or (
      r.activation is not None and r.activation.mode.value == "static")) for r in rules_)


def with_options(name: str, **overrides) -> PTQConfig:
  return dataclasses.replace(config(name), **overrides)
