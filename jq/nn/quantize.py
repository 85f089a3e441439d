"""Model-aware quantization: rules + the layouts read from the model (+ calibrated static scales).

* linen: :func:`quantize_variables` traces the unchanged model abstractly to learn each kernel's
  layout (``jq.nn.linen.layouts``), then calls ``jq.quantize_tree`` with them.
* nnx: :func:`quantize_nnx_state` (behind ``jq.nn.quantize_module``) reads the layouts from the
  modules.

Kernels that a rule would quantize but whose layer jq cannot run quantized (custom code on its
params, layer types jq does not adapt) stay float and are reported by name (a warning), never
quantized into a model that would then fail or compute something else.
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from jq.calibrate.collect import input_ranges
from jq.calibrate.observers import act_params
from jq.layout import Layout
from jq.qtypes import QType
from jq.spec import ActMode, Rule
from jq.tree import plan, quantize_tree

PyTree = Any


def _as_args(batch) -> tuple:
  return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def _report_unmatched_custom(planned, reasons: Mapping[str, str],
                             stacks: Mapping[str, int]) -> None:
  """Matrices that no rule names and that modules' own code uses (MoE experts as raw
  ``self.param`` s under an einsum) stay float: said in a warning, with what would quantize them.
  A parameter beside stacked kernels (``nn.scan``) counts by its per-layer rank (a scanned norm's
  ``(L, D)`` scale is no matrix)."""
  def per_layer_rank(path: str, shape: tuple) -> int:
    scope = path.rsplit("/", 2)[0] + "/"   # the module around the parameter's module
    n = max((c for k, c in stacks.items() if k.startswith(scope)), default=1)
    lead, k = 1, 0
    while n > 1 and k < len(shape) and lead < n:
      lead, k = lead * shape[k], k + 1
    return len(shape) - (k if lead == n else 0)
  left = [p for p in planned if p.rule is None and p.path in reasons
          and per_layer_rank(p.path, p.shape) >= 2]
  if not left:
    return
  listing = "; ".join(f"{p.path} {p.shape}: {reasons[p.path]}" for p in left[:4])
  warnings.warn(f"jq: {len(left)} matrix parameter(s) stay float: no rule matches them and no "
                f"layer jq runs uses them: {listing}{'; ...' if left[4:] else ''} (to quantize "
                "them, compute them with nn.Dense/nn.DenseGeneral/nn.Einsum, e.g. experts as "
                "nn.Einsum or nn.vmap over nn.Dense)", stacklevel=4)


def runnable_rules(params: PyTree, rules: Sequence[Rule], lays: Mapping[str, Layout],
                   reasons: Mapping[str, str], stacks: Mapping[str, int] | None = None
                   ) -> tuple[tuple[Rule, ...], dict[str, str]]:
  """``rules`` with a float rule in front for every leaf they quantize that no adapted layer runs
  (``stacks``: ``{kernel path: stacked layers}``, for the report of unmatched matrices).

  Returns:
    ``(rules, {path: why it stays float})``.
  """
  kept = {}
  planned = plan(params, rules)
  for p in planned:
    why = _conv_activation_problem(p, lays.get(p.path))
    if why:
      raise ValueError(
          f"{p.path}: shape {p.shape} dtype {p.dtype} ({lays[p.path].layer}): rule "
          f"{p.rule.pattern!r} ({p.rule.describe()}) quantizes this convolution's input, but "
          f"{why}; put Rule(pattern={'^' + re.escape(p.path) + '$'!r}, weight=<its weight "
          "spec>, activation=None) before it to quantize the kernel weight-only")
    if p.quantized and p.path not in lays:
      if len(p.shape) < 2:  # a bias, norm or scalar: the rule (not the layer) is at fault
        raise ValueError(f"{p.path}: shape {p.shape} dtype {p.dtype}: rule {p.rule.pattern!r} "
                         f"quantizes this rank-{len(p.shape)} parameter, but no layer that jq "
                         "runs quantized uses it; keep it in float with "
                         f"Rule(pattern={'^' + re.escape(p.path) + '$'!r}, weight=None) before it")
      kept[p.path] = reasons.get(p.path, "no layer that jq runs quantized uses it")
  _report_unmatched_custom(planned, reasons, stacks or {})
  if not kept:
    return tuple(rules), {}
  for r in rules:  # a required rule whose every match stays float would seem to match nothing
    mine = [p.path for p in planned if p.rule is r]
    if r.required and r.weight is not None and mine and all(m in kept for m in mine):
      raise ValueError(f"rule {r.pattern!r} ({r.describe()}) matches only parameters whose layer "
                       f"jq cannot run quantized: {mine[0]} ({kept[mine[0]]})"
                       + (f" and {len(mine) - 1} more" if len(mine) > 1 else "")
                       + "; drop the rule, or make it weight=None (or required=False)")
  skips = tuple(Rule(pattern=f"^{re.escape(p)}$", weight=None, required=False) for p in kept)
  listing = "; ".join(f"{p}: {why}" for p, why in kept.items())
  warnings.warn(f"jq: {len(kept)} parameter(s) the rules would quantize stay float because their "
                f"layer cannot run quantized: {listing}", stacklevel=3)
  return skips + tuple(rules), kept


def _conv_activation_problem(p: Any, layout: Layout | None) -> str:
  """Why the convolution using ``p``'s kernel cannot quantize its input as ``p``'s rule asks
  (``jq.ops.conv``: int8 activations with 8-bit integer weights only); "" when it can, or when
  the layer is not a convolution."""
  if not p.quantized or p.rule.activation is None or layout is None or \
      layout.layer.split("(")[0] not in ("nn.Conv", "nnx.Conv"):
    return ""
  act, w = p.rule.activation.qtype, p.rule.weight.qtype
  if act.is_float:
    return f"{act.value} activations are not supported for convolutions (only int8)"
  if w not in (QType.INT8, QType.UINT8):
    return f"int8 activations need 8-bit integer weights, the rule asks for {w.value}"
  return ""


def static_scales(rules: Sequence[Rule], params: PyTree, run, operands,
                  batches: Iterable[Any] | None, stacks: Mapping[str, int]
                  ) -> dict[str, tuple[Any, Any]]:
  """Calibrated ``{path: (scale, zero_point)}`` for leaves whose rule asks for static int8
  activations (per stacked layer for stacked kernels); ``{}`` when none does."""
  wanted = {p.path: p.rule.activation for p in plan(params, rules)
            if p.quantized and p.rule.activation is not None
            and p.rule.activation.mode is ActMode.STATIC}
  if not wanted:
    return {}
  if batches is None:
    raise ValueError(f"rules ask for static int8 activations for {sorted(wanted)[:3]}...; pass "
                     "calibration_batches=[inputs, ...] (or act_scales=) to calibrate them")
  if isinstance(batches, Mapping) or not hasattr(batches, "__iter__"):  # (a dict: its keys)
    raise ValueError(f"calibration_batches must be an iterable of calibration inputs, got a "
                     f"{type(batches).__name__}"
                     + (f" with keys {list(batches)[:4]}" if isinstance(batches, Mapping) else "")
                     + " (one batch? pass a list of them: [batch, ...])")
  ranges = input_ranges(run, batches, paths=wanted, operands=operands,
                        stacks={p: n for p, n in stacks.items() if p in wanted})
  return act_scales_from_ranges(ranges, wanted)


def act_scales_from_ranges(ranges: Mapping[str, tuple[Any, Any]],
                           specs: Mapping[str, Any], log: list[str] | None = None
                           ) -> dict[str, tuple[Any, Any]]:
  """``{path: (scale, zero_point)}`` of static int8 activations from calibrated input ranges.

  A stacked layer (an ``nn.vmap`` expert) that no calibration input reached (range ``[0, 0]``)
  takes the range of its stack (every expert reads the same hidden states): a scale of 1 would
  round its real inputs to a handful of levels.  So does an expert of its own module
  (``.../experts_3/gate_proj/kernel``): it takes the range of the same layer of its sibling
  experts that were reached.  Each such case is reported, in ``log`` or as a warning."""
  out = {}
  for p, spec in specs.items():
    lo, hi = (np.asarray(r, np.float32) for r in ranges[p])
    dead = (lo == 0) & (hi == 0)
    siblings = _sibling_ranges(p, ranges) if dead.all() else []
    if siblings:
      lo = np.minimum.reduce([a for a, _ in siblings]) + np.zeros_like(lo)
      hi = np.maximum.reduce([b for _, b in siblings]) + np.zeros_like(hi)
      line = (f"{p}: no calibration input reached this expert (no token was routed to it): its "
              f"static activation scale takes the range of its {len(siblings)} sibling experts, "
              f"[{float(lo.min()):.4g}, {float(hi.max()):.4g}]")
    elif dead.any() and not dead.all():
      which = [int(i) for i in np.flatnonzero(dead)]
      lo, hi = np.where(dead, lo[~dead].min(), lo), np.where(dead, hi[~dead].max(), hi)
      line = (f"{p}: stacked layers {which} saw no calibration input (experts no token was "
              f"routed to?): their static activation scales take the range of the others, "
              f"[{float(lo[dead][0]):.4g}, {float(hi[dead][0]):.4g}]")
    elif dead.all():
      line = (f"{p}: no calibration input reached this layer (its inputs were all zero): its "
              "static activation scale is 1, a placeholder; calibrate with data that reaches it")
    else:
      line = None
    if line is not None:
      if log is None:
        warnings.warn("jq: " + line, stacklevel=2)
      else:
        log.append(line)
    out[p] = act_params(jnp.asarray(lo), jnp.asarray(hi), spec)
  return out


_EXPERT = re.compile(r"(^|/)experts_\d+(/)")


def _sibling_ranges(path: str, ranges: Mapping[str, tuple[Any, Any]]) -> list[tuple[Any, Any]]:
  """The whole ranges (``(min, max)`` over their stacks) of the same layer of the other experts
  (``experts_N`` in place of ``path``'s) that calibration reached; empty if ``path`` is not an
  expert's."""
  if not _EXPERT.search(path):
    return []
  layer = _EXPERT.sub(r"\1experts_\2", path)   # the path with its expert number dropped
  out = []
  for q, (lo, hi) in ranges.items():
    lo, hi = np.asarray(lo, np.float32), np.asarray(hi, np.float32)
    if q != path and _EXPERT.sub(r"\1experts_\2", q) == layer and (lo.any() or hi.any()):
      out.append((lo.min(), hi.max()))
  return out


def quantize_variables(model, variables: PyTree, rules: Sequence[Rule], *example_args,
                       act_scales: Mapping[str, Any] | None = None,
                       calibration_batches: Iterable[Any] | None = None,
                       **example_kwargs) -> PyTree:
  """Quantizes a linen model's variables with scales that follow each layer's axes.

  The model is traced abstractly with ``example_args``/``example_kwargs`` (what you pass to
  ``model.apply`` after the variables) to learn each kernel's layout: Dense ``(in, out)``;
  DenseGeneral per head and feature; Einsum from its subscripts; Conv per output feature with
  window and input features contracting; ``nn.scan``/``nn.vmap`` stacks with one scale set per
  layer.  Then :func:`jq.quantize_tree` runs with those layouts.

  Args:
    model: a linen module (or its ``apply``).
    variables: its float variables (``nn.Partitioned`` boxes are kept; their values become
      QArrays).
    rules: ordered rules (first match wins).
    *example_args, **example_kwargs: an example call (arrays may be ``jax.ShapeDtypeStruct``).
    act_scales: calibrated static activation scales ``{kernel path: (scale, zero_point)}``.
    calibration_batches: inputs (arrays, or tuples of arguments) to calibrate static int8
      activations when a rule asks for them and ``act_scales`` is not given.

  Example:
    >>> qvars = jq.nn.quantize_variables(model, variables, jq.recipe_rules("w4a16-g128"), tokens)
    >>> logits = jax.jit(jq.nn.quantized_apply(model))(qvars, tokens)
  """
  from jq.nn import linen  # pylint: disable=import-outside-toplevel
  lays, stacks, reasons = linen.layouts_and_stacks(model, variables, *example_args,
                                                   **example_kwargs)
  rules, _ = runnable_rules(variables, rules, lays, reasons, stacks)
  if act_scales is None:
    qapply = linen.quantized_apply(model)
    act_scales = static_scales(
        rules, variables, lambda v, b: qapply(v, *_as_args(b), **example_kwargs), variables,
        calibration_batches, stacks)
  return quantize_tree(variables, rules, act_scales=act_scales, layouts=lays)


def quantize_nnx_state(module, rules: Sequence[Rule], *,
                       act_scales: Mapping[str, Any] | None = None,
                       calibration_batches: Iterable[Any] | None = None) -> PyTree:
  """``nnx.state(module, nnx.Param)`` quantized with the layouts read from the module's layers."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from jq.nn import nnx as jnnx  # pylint: disable=import-outside-toplevel
  layers = jnnx.module_layers(module)
  lays = {m.path: m.layout for m in layers if m.layout is not None}
  reasons = {m.path: m.reason for m in layers if m.layout is None}
  state = nnx.state(module, nnx.Param)
  stacks = {m.path: m.stack for m in layers if m.stack > 1}
  rules, _ = runnable_rules(state, rules, lays, reasons, stacks)
  if act_scales is None:
    graphdef, full = nnx.split(jnnx.with_quantized_classes(module))
    act_scales = static_scales(rules, state,
                               lambda st, b: nnx.merge(graphdef, st)(*_as_args(b)), full,
                               calibration_batches, stacks)
  return quantize_tree(state, rules, act_scales=act_scales, layouts=lays)


__all__ = ["quantize_variables", "quantize_nnx_state", "runnable_rules", "static_scales",
           "act_scales_from_ranges"]
