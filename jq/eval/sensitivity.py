"""Sensitivity scan and mixed-precision planning.

The scan quantizes one group of layers at a time (a transformer block, or a single kernel) with each
candidate spec and measures the mean KL divergence of the model's next-token distribution against
the float model.  Weight-only quantization is simulated exactly by running the float model on the
dequantized weights, so one compiled forward serves every candidate (no recompilation).

The planner then picks one spec per group to minimise the summed KL under a size budget (average
bits per weight over the planned kernels, or bytes): a multiple-choice knapsack solved by Lagrangian
relaxation (for each λ every group takes ``argmin KL + λ·bytes``; λ is bisected to the budget),
which is exact on the lower convex hull of each group's (bytes, KL) options.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jq import metrics
from jq.quantize import quantize
from jq.spec import QuantSpec, Rule, SKIP_PATTERNS
from jq.tree import leaves_with_paths, map_with_paths


def group_paths(paths: Sequence[str], pattern: str = r"layers[_/](\d+)/") -> dict[str, list[str]]:
  """Groups kernel paths by the first match of ``pattern`` (default: by transformer block).

  Paths with no match form their own group.  Group names are the matched text, e.g. ``layers_3/``.
  """
  out: dict[str, list[str]] = {}
  for p in paths:
    m = re.search(pattern, p)
    out.setdefault(m.group(0) if m else p, []).append(p)
  return out


def quantizable_kernels(params: Any, kernel_pattern: str = r"(^|/)kernel$") -> list[str]:
  """Paths of ``kernel`` leaves (rank >= 2) that the default rules would quantize."""
  out = []
  for path, leaf in leaves_with_paths(params):
    if re.search(kernel_pattern, path) and getattr(leaf, "ndim", 0) >= 2 and not any(
        re.search(s, path) for s in SKIP_PATTERNS):
      out.append(path)
  return out


@dataclasses.dataclass(frozen=True)
class ScanResult:
  """``kl[group][option]`` in nats, and ``nbytes[group][option]`` of that group's kernels."""
  groups: dict[str, list[str]]
  options: dict[str, QuantSpec]
  kl: dict[str, dict[str, float]]
  nbytes: dict[str, dict[str, int]]
  numel: dict[str, int]

  def with_options(self, names: Sequence[str]) -> "ScanResult":
    """The scan restricted to the options ``names`` (to plan from a smaller menu, no new scan).

    Raises:
      ValueError: a name that is not one of the scan's options.
    """
    unknown = [n for n in names if n not in self.options]
    if unknown:
      raise ValueError(f"options {unknown} are not in the scan's {list(self.options)}")
    keep = [o for o in self.options if o in names]
    return dataclasses.replace(
        self, options={o: self.options[o] for o in keep},
        kl={g: {o: d[o] for o in keep} for g, d in self.kl.items()},
        nbytes={g: {o: d[o] for o in keep} for g, d in self.nbytes.items()})

  def table(self) -> str:
    names = list(self.options)
    head = "group".ljust(14) + "".join(f"{n:>16}" for n in names)
    order = sorted(self.groups, key=lambda g: [int(t) if t.isdigit() else t
                                               for t in re.split(r"(\d+)", g)])
    rows = [head] + [g.ljust(14) + "".join(f"{self.kl[g][n]:>16.5f}" for n in names)
                     for g in order]
    return "\n".join(rows)


def sensitivity_scan(logits_fn: Callable[[Any, jax.Array], jax.Array], params: Any,
                     tokens: jax.Array, groups: Mapping[str, Sequence[str]],
                     options: Mapping[str, QuantSpec], *, progress: bool = False) -> ScanResult:
  """KL of the model with only one group quantized (with one option), for every pair.

  Args:
    logits_fn: ``(params, tokens[B, T]) -> logits[B, T, V]`` of the float model (jitted inside).
    params: float params (the tree ``logits_fn`` takes).
    tokens: a fixed calibration batch ``[B, T]`` (use text disjoint from the evaluation text).
    groups: ``{group name: [kernel paths]}`` (see :func:`group_paths`).
    options: ``{option name: QuantSpec}`` candidates.
  """
  fwd = jax.jit(logits_fn)
  ref = fwd(params, tokens)
  ref_logp = jax.nn.log_softmax(ref.astype(jnp.float32), axis=-1)

  @jax.jit
  def kl_of(p, ref_logp, tokens):  # arrays as arguments: closed-over ones become HLO constants
    return jnp.mean(metrics.kl_divergence(ref_logp, fwd(p, tokens)))

  leaves = dict(leaves_with_paths(params))
  kl: dict[str, dict[str, float]] = {}
  nb: dict[str, dict[str, int]] = {}
  numel = {g: int(sum(np.prod(leaves[p].shape) for p in ps)) for g, ps in groups.items()}
  items = [(g, o) for g in groups for o in options]
  if progress:
    from tqdm.auto import tqdm
    items = tqdm(items, desc="sensitivity scan", unit="run")
  cache = {}
  for g, o in items:
    members = set(groups[g])
    qs = {p: quantize(leaves[p], options[o], name=p) for p in members}
    cache[g, o] = qs
    swapped = map_with_paths(
        lambda path, x: qs[path].dequantize(x.dtype) if path in qs else x, params)
    kl.setdefault(g, {})[o] = float(kl_of(swapped, ref_logp, tokens))
    nb.setdefault(g, {})[o] = int(sum(q.nbytes for q in qs.values()))
  return ScanResult(dict(groups), dict(options), kl, nb, numel)


def plan_mixed_precision(scan: ScanResult, *, bits_per_weight: float | None = None,
                         max_bytes: int | None = None) -> dict[str, str]:
  """One option per group minimising the summed KL under the budget.

  Exactly one of ``bits_per_weight`` (average over the planned kernels, scales included) or
  ``max_bytes`` is given.

  Raises:
    ValueError: the budget is below what the smallest options need.
  """
  if (bits_per_weight is None) == (max_bytes is None):
    raise ValueError("give exactly one of bits_per_weight or max_bytes")
  total_numel = sum(scan.numel.values())
  budget = max_bytes if max_bytes is not None else bits_per_weight * total_numel / 8.0
  groups = list(scan.groups)

  def choose(lam):
    return {g: min(scan.options, key=lambda o: (scan.kl[g][o] + lam * scan.nbytes[g][o],
                                                 scan.nbytes[g][o])) for g in groups}

  def size(plan):
    return sum(scan.nbytes[g][o] for g, o in plan.items())

  smallest = {g: min(scan.options, key=lambda o: scan.nbytes[g][o]) for g in groups}
  if size(smallest) > budget:
    raise ValueError(f"budget {budget:,.0f} bytes is below the smallest plan "
                     f"({size(smallest):,} bytes, "
                     f"{8 * size(smallest) / total_numel:.2f} bits/weight)")
  best = choose(0.0)
  if size(best) <= budget:
    return best
  lo, hi = 0.0, 1.0
  while size(choose(hi)) > budget:
    hi *= 4.0
  for _ in range(60):
    mid = (lo + hi) / 2
    if size(choose(mid)) > budget:
      lo = mid
    else:
      hi = mid
  plan = choose(hi)
  # spend what is left of the budget greedily on the best KL gain per byte
  improved = True
  while improved:
    improved = False
    spare = budget - size(plan)
    cands = []
    for g in groups:
      cur = plan[g]
      for o in scan.options:
        extra = scan.nbytes[g][o] - scan.nbytes[g][cur]
        gain = scan.kl[g][cur] - scan.kl[g][o]
        if 0 < extra <= spare and gain > 0:
          cands.append((gain / extra, g, o))
    if cands:
      _, g, o = max(cands)
      plan[g] = o
      improved = True
  return plan


def plan_to_rules(plan: Mapping[str, str], scan: ScanResult, *, skip_rules: Sequence[Rule] = ()
                  ) -> tuple[Rule, ...]:
  """The plan as reusable rules: skips first, then one rule per group (escaped kernel paths)."""
  rules = list(skip_rules)
  for g, o in plan.items():
    pattern = "|".join(re.escape(p) + "$" for p in scan.groups[g])
    rules.append(Rule(pattern=pattern, weight=scan.options[o]))
  return tuple(rules)


def planned_kl(plan: Mapping[str, str], scan: ScanResult) -> float:
  """Sum of per-group KLs (the planner's additive estimate)."""
  return float(sum(scan.kl[g][o] for g, o in plan.items()))


def plan_bits_per_weight(plan: Mapping[str, str], scan: ScanResult) -> float:
  return 8.0 * sum(scan.nbytes[g][o] for g, o in plan.items()) / sum(scan.numel.values())
