"""``quantize_model``: calibrated quantization of any linen or nnx model, without adapters.

One road: layouts from the layers (``jq.nn``) → ``jq.calibrate.collect`` runs the unchanged model
over the calibration batches and folds every wanted layer's input into statistics (per stacked
layer) → AWQ/SmoothQuant scale groups found, folded and checked (``jq.ptq.folding``) → each kernel,
as ``(K, N)`` matrices (``jq.ptq.matrices``), through its rule's algorithm
(``jq.algorithms.registry``) → static activation scales attached → one QArray per kernel.

Calibration here is non-sequential (every layer sees the float model's activations); a
``BlockwiseModel`` (``blocks=``) runs the sequential block-by-block pipeline instead
(``jq.ptq.quantize_blockwise``).
"""
from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jq.algorithms import awq_search_scale, smooth_scales
from jq.algorithms.registry import Inputs, solve
from jq.calibrate.collect import LayerInputs, Want, collect, tensor_ranges
from jq.algorithms.fold import FOLD_TOLERANCE
from jq.calibrate.stats import LayerStats, mean_abs, scale_stats
from jq.nn.quantize import act_scales_from_ranges, runnable_rules
from jq.ptq import folding
from jq.ptq.matrices import MatrixView, assemble
from jq.ptq.targets import Target, as_args, linen_target, nnx_target
from jq.qarray import QArray
from jq.spec import ActMode, Algorithm, Clip, Rule
from jq.tree import leaves_with_paths, plan, quantize_tree, with_activation

PyTree = Any


@dataclasses.dataclass(frozen=True)
class LayerRow:
  """One quantized kernel: its path, how it was quantized, and what happened."""
  path: str
  algorithm: str
  spec: str
  note: str = ""


@dataclasses.dataclass
class PTQModelResult:
  """``variables`` (linen) or ``module`` (nnx): the quantized model; ``ref``: the float params
  with the AWQ/SmoothQuant scales folded in (the same function as the original, checked);
  ``report``: one row per quantized kernel; ``log``: groups, skips, fallbacks."""
  variables: Any
  module: Any
  ref: Any
  report: list[LayerRow]
  log: list[str]
  seconds: float


def _check_batches(batches) -> list[Any]:
  batches = list(batches)
  if not batches:
    raise ValueError("quantize_model: no calibration batches were given")
  for i, b in enumerate(batches):
    for x in as_args(b):
      a = np.asarray(x)
      if a.size == 0:
        raise ValueError(f"quantize_model: calibration batch {i} has an empty input of shape "
                         f"{a.shape}")
      if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
        raise ValueError(f"quantize_model: calibration batch {i} holds NaN/Inf values")
      if np.issubdtype(a.dtype, np.integer) and a.min() < 0:
        raise ValueError(f"quantize_model: calibration batch {i} holds negative token ids "
                         f"(min {a.min()})")
  return batches


def _stats_of(inputs: LayerInputs, layer: int, n: int):
  pick = (lambda a: a) if n == 1 else (lambda a: a[layer])
  st = None if inputs.stats is None else LayerStats(*[pick(v) for v in inputs.stats])
  smp = None if inputs.samples is None else jnp.asarray(pick(inputs.samples))
  return st, smp, pick(inputs.lo), pick(inputs.hi)


def quantize_model(model, variables, rules: Sequence[Rule], batches: Iterable[Any], *,
                   config: Any = None, blocks: Any = None, calib_batches_for_check: int = 2,
                   **example_kwargs) -> PTQModelResult:
  """Quantizes a linen model (with ``variables``) or an nnx module (``variables=None``) with
  calibration: RTN, GPTQ, AWQ, SmoothQuant and static int8 activations, per rule.

  Args:
    model: a linen module (or its apply) or an nnx module (not modified).
    variables: the linen model's float variables; ``None`` for nnx.
    rules: ordered rules; each rule's algorithm (and options) pick how its kernels are rounded.
    batches: calibration inputs (arrays, or tuples of arguments), e.g. token arrays.
    config: a ``jq.ptq.PTQConfig`` (its ``sample_tokens``; ``sequential`` needs ``blocks``).
    blocks: a ``jq.ptq.BlockwiseModel`` to run the sequential block-wise pipeline instead (linen).
    calib_batches_for_check: batches on which every fold is checked.
    **example_kwargs: extra keyword arguments of the model call (linen).

  Example:
    >>> res = jq.ptq.quantize_model(model, variables, jq.recipe_rules("gptq-w4a16-g128"),
    ...                             [tokens[i:i + 4] for i in range(0, 32, 4)])
    >>> logits = jax.jit(jq.nn.quantized_apply(model))(res.variables, tokens)

  Raises:
    ValueError: empty or NaN batches, a batch the model cannot run, a rule asking GPTQ/AWQ/
      SmoothQuant for a layer whose input cannot be captured; messages name the layer.
  """
  from jq.ptq import pipeline  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  cfg = config if config is not None else pipeline.PTQConfig(sequential=False)
  batches = _check_batches(batches)
  if blocks is not None:
    if variables is None:
      raise ValueError("quantize_model: blocks= (a BlockwiseModel) works with linen variables")
    res = pipeline.quantize_blockwise(variables, blocks, rules, np.concatenate(
        [np.asarray(as_args(b)[0]) for b in batches]), config=cfg)
    report = [LayerRow(p, "blockwise", f"{q.qtype.value} tile={'x'.join(map(str, q.tile))}")
              for p, q in leaves_with_paths(res.qparams) if isinstance(q, QArray)]
    return PTQModelResult(res.qparams, None, res.ref_params, report, res.log,
                          time.perf_counter() - t0)
  if getattr(cfg, "sequential", False):
    raise ValueError("quantize_model: sequential calibration needs blocks= (a BlockwiseModel); "
                     "pass config=PTQConfig(sequential=False) for the generic (non-sequential) "
                     "path")
  from flax import nnx  # pylint: disable=import-outside-toplevel
  if isinstance(model, nnx.Module):
    if variables is not None:
      raise ValueError("quantize_model: an nnx module carries its own state; pass variables=None")
    target = nnx_target(model)
  else:
    if variables is None:
      raise ValueError("quantize_model: a linen model needs its variables")
    try:
      target = linen_target(model, variables, batches[0], example_kwargs)
    except (TypeError, ValueError) as e:
      raise ValueError(f"quantize_model: the model cannot run calibration batch 0 "
                       f"({[np.shape(x) for x in as_args(batches[0])]}): {e}") from e
  log: list[str] = []
  rules, kept = runnable_rules(target.params, tuple(rules), target.layouts, target.reasons)
  decided = {p.path: p.rule for p in plan(target.params, rules) if p.quantized}
  params = target.params

  # 1. what each layer needs, collected in one pass over the batches
  wants = {}
  for path, rule in decided.items():
    algo = rule.algorithm
    static = rule.activation is not None and rule.activation.mode is ActMode.STATIC
    if algo is Algorithm.RTN and not static:
      continue
    opts = rule.algorithm_options
    wants[path] = Want(
        stack=target.stacks.get(path, 1), xtx=algo is not Algorithm.RTN,
        samples=cfg.sample_tokens if algo is Algorithm.AWQ else 0,
        first_token_weight=opts.first_token_weight if algo is Algorithm.GPTQ else 1.0)
  got = collect(target.run, batches, wants, operands=params) if wants else {}

  # 2. AWQ / SmoothQuant scale groups: found, folded, checked
  smoothing = [p for p, r in decided.items() if r.algorithm in (Algorithm.AWQ,
                                                                  Algorithm.SMOOTHQUANT)]
  scale_of: dict[str, jax.Array] = {}
  if smoothing:
    check = batches[:max(1, calib_batches_for_check)]
    groups = folding.find_groups(target, params, smoothing, batches[0], [_one_row(batches[0])],
                                 log)
    run = jax.jit(target.run)
    refs = [run(params, b) for b in check]
    found = {g.producer + ">" + "+".join(g.consumers): (g, s) for g in groups
             for s in [_group_scales(target, params, g, decided, got, log)] if s is not None}
    keys = list(found)
    while True:   # until the kept folds hold all together (checked together first, then halved)
      ok = folding.verify_folds(target, params, {k: found[k] for k in keys}, check, refs, run,
                                FOLD_TOLERANCE)
      for k in keys:
        if not ok[k]:
          g = found[k][0]
          log.append(f"{g.describe()}: folding the {decided[g.consumers[0]].algorithm.value} "
                     f"scales changed the float model by more than {FOLD_TOLERANCE:g}; group "
                     "skipped")
      if all(ok.values()):
        break
      keys = [k for k in keys if ok[k]]
    for key in keys:
      g, s = found[key]
      log.append(f"{g.describe()}: {decided[g.consumers[0]].algorithm.value} scales folded into "
                 f"{g.producer} ({g.kind}); float model unchanged")
      sv = np.asarray(s)
      for c in g.consumers:   # the consumers now read x / s: their statistics, exactly
        scale_of[c] = s
        inp = got[c]
        got[c] = LayerInputs(scale_stats(inp.stats, s), inp.lo / sv, inp.hi / sv,
                             None if inp.samples is None else inp.samples / sv[..., None, :])
    params = folding.apply_folds(target, params, [found[k] for k in keys])
  leaves = dict(leaves_with_paths(params))

  # 3. each kernel through its algorithm, as (K, N) matrices (static scales: of x / s if smoothed)
  static = {p: r.activation for p, r in decided.items()
            if r.activation is not None and r.activation.mode is ActMode.STATIC}
  act_scales = act_scales_from_ranges(tensor_ranges({p: got[p] for p in static}), static)
  report, new = [], {}
  rtn = {}
  for path, rule in decided.items():
    algo = rule.algorithm
    if algo is Algorithm.RTN and path not in wants:
      rtn[path] = rule
      continue
    w = jnp.asarray(leaves[path])
    view = MatrixView(tuple(w.shape), target.layouts[path])
    spec2 = view.matrix_spec(rule.weight, name=path)
    if algo in (Algorithm.AWQ, Algorithm.SMOOTHQUANT) and path not in scale_of:
      note = f"{algo.value} scales not applied (see log); rounded to nearest"
      algo_used = Algorithm.RTN
    else:
      note, algo_used = "", algo
    qs, notes = [], []
    for i, m in enumerate(view.matrices(w)):
      st, smp, _, _ = (_stats_of(got[path], i, view.n) if path in got else (None, None, 0, 0))
      q, nt = solve(algo_used, m, Inputs(st, smp), spec2, rule.algorithm_options,
                    f"{path}[{i}]" if view.n > 1 else path)
      qs.append(q)
      if nt:
        notes.append(nt if view.n == 1 else f"layer {i}: {nt}")
    q = assemble(view, qs, rule.weight, name=path)
    new[path] = with_activation(q, rule.activation, act_scales.get(path), path=path, leaf=w)
    report.append(LayerRow(path, algo_used.value, q.qtype.value + " tile=" +
                           "x".join(map(str, q.tile)), "; ".join([note] + notes).strip("; ")))
  qparams = folding.replace_leaves(params, new)
  if rtn:   # weight-only or dynamic RTN: one jitted quantize_tree
    qparams = quantize_tree(qparams, [dataclasses.replace(r, pattern=f"^{re.escape(p)}$")
                                      for p, r in rtn.items()], layouts=target.layouts)
    report += [LayerRow(p, "rtn", r.weight.describe()) for p, r in rtn.items()]
  for p, why in kept.items():
    log.append(f"{p}: kept float: {why}")
  out = target.finish(qparams)
  secs = time.perf_counter() - t0
  if target.kind == "nnx":
    return PTQModelResult(None, out, params, report, log, secs)
  return PTQModelResult(out, None, params, report, log, secs)


def _one_row(batch):
  """The first example of a batch (leading axis), for the many forwards of group discovery: a
  wrong fold changes any example's outputs by orders of magnitude more than rounding does."""
  try:
    return jax.tree_util.tree_map(lambda a: a[:1] if np.ndim(a) else a, batch)
  except (TypeError, IndexError):
    return batch


def _group_scales(target: Target, params, g: folding.Group, decided, got, log: list[str]):
  """The group's per-input-channel scales (AWQ search or SmoothQuant; ``(K,)`` or ``(L, K)``), or
  None with a log line when its consumers ask for different algorithms or options."""
  rules = [decided[c] for c in g.consumers]
  algos = {r.algorithm for r in rules}
  opts = {r.algorithm_options for r in rules}
  if len(algos) != 1 or len(opts) != 1 or next(iter(algos)) not in (Algorithm.AWQ,
                                                                     Algorithm.SMOOTHQUANT):
    log.append(f"{g.describe()}: consumers ask for different algorithms/options; not smoothed")
    return None
  algo, opt = algos.pop(), opts.pop()
  leaves = dict(leaves_with_paths(params))
  views = [MatrixView(tuple(leaves[c].shape), target.layouts[c]) for c in g.consumers]
  n = views[0].n
  ss = []
  for i in range(n):
    ws = [v.matrices(jnp.asarray(leaves[c], jnp.float32))[i] for v, c in zip(views, g.consumers)]
    st, smp, _, _ = _stats_of(got[g.consumers[0]], i, n)
    name = g.consumers[0] + (f"[{i}]" if n > 1 else "")
    if algo is Algorithm.SMOOTHQUANT:
      s = smooth_scales(st, ws, opt.alpha, name=name)
    else:
      spec2 = views[0].matrix_spec(dataclasses.replace(rules[0].weight, clip=Clip()), name=name)
      s, info = awq_search_scale(smp, ws, spec2, grid=opt.grid, act_mean=mean_abs(st, name),
                                 name=name)
      log.append(f"{name} group {g.describe()}: awq alpha={float(info.alpha):.2f} "
                 f"loss {float(info.loss):.3e} (rtn {float(info.rtn_loss):.3e})")
    ss.append(jnp.asarray(s, jnp.float32))
  return ss[0] if n == 1 else jnp.stack(ss)


__all__ = ["quantize_model", "PTQModelResult", "LayerRow"]
