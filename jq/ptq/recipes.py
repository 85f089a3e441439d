"""Named recipes for ``jq-quant --recipe``: a thin view of the one table in :mod:`jq.spec`.

``jq.spec.RECIPES`` (RTN) and ``jq.spec.ALGORITHM_RECIPES`` (GPTQ, AWQ, SmoothQuant, with their
options in the rules) hold every recipe; all skip embeddings, norms, biases, MoE routers and the
output head (``jq.spec.default_rules``).  Algorithm options live in the rules (``Rule.options``),
so a rules file can say everything a recipe says.
"""
from __future__ import annotations

from jq.spec import ActMode, Algorithm, Rule, recipe_names, recipe_rules


def names() -> list[str]:
  """Every recipe name (``jq.spec.recipe_names``)."""
  return recipe_names()


def rules(name: str) -> tuple[Rule, ...]:
  """The rules of a named recipe (``jq.spec.recipe_rules``); ValueError lists the names."""
  return recipe_rules(name)


def needs_calibration(rules_: tuple[Rule, ...]) -> bool:
  """True when some rule uses GPTQ/AWQ/SmoothQuant or static activation scales."""
  return any(r.weight is not None and (r.algorithm is not Algorithm.RTN or (
      r.activation is not None and r.activation.mode is ActMode.STATIC)) for r in rules_)
