"""``quantize_model``: calibrated quantization of any linen or nnx model, without adapters.

One road: layouts from the layers (``jq.nn``) → ``jq.calibrate.collect`` runs the unchanged model
over the calibration batches and folds every wanted layer's input into statistics (per stacked
layer) → AWQ/SmoothQuant scale groups found, folded and checked (``jq.ptq.folding``) → each kernel,
as ``(K, N)`` matrices (``jq.ptq.matrices``), through its rule's algorithm
(``jq.algorithms.registry``) → learned rounding of the unit's ``autoround`` kernels together,
from those results, on the unit's output error (``jq.algorithms.rounding``) → static activation
scales attached → one QArray per kernel.

Sequential calibration (the default, ``PTQConfig(sequential=True)``) calibrates the model's
repeated blocks one at a time on the outputs of the quantized blocks before them; the blocks are
found in the module tree (``jq.ptq.sequential``).  ``sequential=False`` calibrates every layer on
the float model's activations in one pass.  A hand-written ``BlockwiseModel`` (``blocks=``) runs
the adapter pipeline (``jq.ptq.quantize_blockwise``) instead.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax.errors
import jax
import jax.numpy as jnp
import numpy as np

from jq.algorithms import awq_search_scale, rounding, smooth_scales
from jq.algorithms.fold import FOLD_TOLERANCE
from jq.calibrate.collect import (LayerInputs, Want, collect, data_sharding, put,
                                  shard_batches, spanned)
from jq.calibrate.stats import LayerStats, mean_abs, scale_stats
from jq.nn.common import calibration
from jq.nn.quantize import act_scales_from_ranges, runnable_rules
from jq.ptq import folding, solves
from jq.ptq.matrices import MatrixView, assemble
from jq.ptq.sequential import Schedule, Unit, first_leaf
from jq.ptq.targets import Target, as_args, linen_target, nnx_target
from jq.qarray import QArray, check_values, index_str
from jq.qtypes import QType
from jq.sharding import qarray_sharding
from jq.spec import ActMode, Algorithm, AutoRoundOptions, Clip, Rule
from jq.tree import check_rules, leaves_with_paths, path_str, plan, with_activation

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
  with the AWQ/SmoothQuant scales folded in (the same function as the original, checked; the
  kernels that were rounded: ``jq.report(res.ref, res.variables)`` gives their SQNR, against the
  original variables it would compare scaled kernels with unscaled ones); ``report``: one row
  per quantized kernel; ``log``: groups, skips, fallbacks."""
  variables: Any
  module: Any
  ref: Any
  report: list[LayerRow]
  log: list[str]
  seconds: float


def _batch_shapes(batch) -> Any:
  """The shapes of one calibration batch's inputs, as they nest (dicts of arrays too)."""
  return jax.tree_util.tree_map(lambda a: tuple(np.shape(a)), list(as_args(batch)))


def _cannot_run(batch, e: Exception) -> ValueError:
  kind = "KeyError " if isinstance(e, KeyError) else ""   # (a bare KeyError says only the key)
  return ValueError(f"quantize_model: the model cannot run calibration batch 0 "
                    f"({_batch_shapes(batch)}): {kind}{e}")


def _check_batches(batches, ids=None) -> list[Any]:
  if batches is None or isinstance(batches, (str, bytes)) or not hasattr(batches, "__iter__"):
    raise ValueError(f"quantize_model: batches must be an iterable of calibration inputs (arrays, "
                     f"or tuples of arguments), got {type(batches).__name__}")
  if isinstance(batches, Mapping):   # iterating it would give its keys
    raise ValueError(f"quantize_model: batches must be an iterable of calibration inputs, got a "
                     f"{type(batches).__name__} with keys {list(batches)[:4]} (one batch? pass a "
                     "list of them: [batch, ...])")
  batches = list(batches)
  if not batches:
    raise ValueError("quantize_model: no calibration batches were given")
  for i, b in zip(range(len(batches)) if ids is None else ids, batches):
    for x in as_args(b):
      for leaf in jax.tree_util.tree_leaves(x):   # (dict batches: every array in them)
        a = np.asarray(leaf)
        if a.size == 0:
          raise ValueError(f"quantize_model: calibration batch {i} has an empty input of shape "
                           f"{a.shape}")
        if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
          raise ValueError(f"quantize_model: calibration batch {i} holds NaN/Inf values")
      a = np.asarray(x)
      if np.issubdtype(a.dtype, np.integer) and a.min() < 0:
        raise ValueError(f"quantize_model: calibration batch {i} holds negative token ids "
                         f"(min {a.min()})")
  return batches


def _check_one_length(batches, ids=None) -> None:
  """Learned rounding draws rows from all the calibration batches at once: they must agree in
  every axis but the leading (batch) one."""
  def tail(b):
    return [tuple(np.shape(x))[1:] for x in jax.tree_util.tree_leaves(list(as_args(b)))]
  ids = list(range(len(batches))) if ids is None else list(ids)
  for i, b in zip(ids[1:], batches[1:]):
    if tail(b) != tail(batches[0]):
      raise ValueError(
          f"quantize_model: learned rounding (autoround) draws rows from all calibration batches "
          f"together, so they must agree in every axis but the first; batch {ids[0]} has inputs "
          f"of shapes {_batch_shapes(batches[0])}, batch {i} "
          f"{_batch_shapes(b)}: pad or crop them to one length")


def _check_kwargs_broadcast(batches, example_kwargs) -> None:
  """Learned rounding runs the model on rows drawn from all the batches with the same keyword
  arguments: one holding a row per example (a mask of the batch's size) would meet other rows
  (a broadcasting error deep in the model, or silently another row's mask)."""
  first = jax.tree_util.tree_leaves(list(as_args(batches[0])))
  n = np.shape(first[0])[0] if first and np.ndim(first[0]) else None
  if not n or n == 1:
    return
  for kp, x in jax.tree_util.tree_leaves_with_path(example_kwargs):
    if np.ndim(x) and np.shape(x)[0] == n:
      raise ValueError(
          f"quantize_model: learned rounding (autoround) draws rows from all calibration batches "
          f"together, but the keyword argument {path_str(kp)!r} of shape "
          f"{tuple(np.shape(x))} has a row per example of the batches (leading size {n}): pass "
          "per-example inputs inside the batches (a tuple or dict per batch), or give it a "
          "leading size of 1 so that it broadcasts")


@calibration
def quantize_model(model, variables, rules: Sequence[Rule], batches: Iterable[Any], *,
                   config: Any = None, blocks: Any = None, calib_batches_for_check: int = 2,
                   chained: bool = True, progress: bool = False, **example_kwargs) -> PTQModelResult:
  """Quantizes a linen model (with ``variables``) or an nnx module (``variables=None``) with
  calibration: RTN, GPTQ, AWQ, SmoothQuant and static int8 activations, per rule.

  Args:
    model: a linen module (or its apply) or an nnx module (not modified).
    variables: the linen model's float variables; ``None`` for nnx.
    rules: ordered rules; each rule's algorithm (and options) pick how its kernels are rounded.
    batches: calibration inputs (arrays, or tuples of arguments), e.g. token arrays.
    config: a ``jq.ptq.PTQConfig``: ``sequential`` (default True: block by block, see
      ``jq.ptq.sequential``), ``sample_tokens`` (AWQ's token sample per layer), ``mesh``
      (data-parallel calibration over this process's devices) and ``distributed`` (statistics
      summed over the processes of ``jax.distributed``, each passing its own share of the
      batches: ``jq.distributed.process_batches``; on by itself with several processes).
    blocks: a ``jq.ptq.BlockwiseModel`` to run the adapter pipeline instead (linen).
    calib_batches_for_check: batches on which every fold is checked.
    chained: sequential calibration runs one block per step where the model chains its blocks
      (``x = block(x, ...)``); False runs the whole model per block (the reference road).
    progress: a progress bar over the calibrated units (blocks).
    **example_kwargs: extra keyword arguments of the model call (linen and nnx).

  Example:
    >>> res = jq.ptq.quantize_model(model, variables, jq.recipe_rules("gptq-w4a16-g128"),
    ...                             [tokens[i:i + 4] for i in range(0, 32, 4)])
    >>> logits = jax.jit(jq.nn.quantized_apply(model))(res.variables, tokens)

  Several processes (``jax.distributed``)::

    >>> jq.distributed.initialize("localhost:12345", num_processes=2, process_id=p)
    >>> res = jq.ptq.quantize_model(model, variables, rules,
    ...                             jq.distributed.process_batches(batches))

  Raises:
    ValueError: empty or NaN batches, a batch the model cannot run, a rule asking GPTQ/AWQ/
      SmoothQuant for a layer whose input cannot be captured; messages name the layer.  A batch
      that does not divide over ``config.mesh``; processes that do not run the same calibration
      (in every process, naming the difference).
    jq.distributed.PeerError: another process failed (its error is quoted) or did not answer
      within ``jq.distributed.set_timeout``.
  """
  from jq.ptq import pipeline  # pylint: disable=import-outside-toplevel
  cfg = config if config is not None else pipeline.PTQConfig()
  if not isinstance(calib_batches_for_check, int) or isinstance(calib_batches_for_check, bool) \
      or calib_batches_for_check < 1:
    raise ValueError(f"quantize_model: calib_batches_for_check={calib_batches_for_check!r} must "
                     "be an int >= 1")
  if not isinstance(cfg, pipeline.PTQConfig):
    raise ValueError(f"quantize_model: config={config!r:.80} must be a jq.ptq.PTQConfig")
  dist = cfg.distributed if cfg.distributed is not None else jax.process_count() > 1
  if not dist or jax.process_count() <= 1:
    return _quantize_model(model, variables, rules, batches, cfg, blocks, calib_batches_for_check,
                           chained, progress, False, example_kwargs)
  from jq import distributed  # pylint: disable=import-outside-toplevel
  try:
    return _quantize_model(model, variables, rules, batches, cfg, blocks, calib_batches_for_check,
                           chained, progress, True, example_kwargs)
  except Exception as e:
    distributed.fail(f"{type(e).__name__}: {e}")   # the others stop at their next exchange
    raise


def _check_spanning(cfg, target, dist: bool) -> None:
  """A mesh over several processes: the processes hold equal, disjoint slices of the data axis
  (each global batch joins their rows: ``shard_batches`` checks the batches alike), and no
  parameter is split over the mesh (not supported across processes)."""
  if not dist:
    raise ValueError("quantize_model: PTQConfig.mesh holds devices of several processes, but "
                     "PTQConfig.distributed=False; a mesh over processes runs in all of them")
  mesh, axis = cfg.mesh, data_sharding(cfg.mesh, cfg.data_axis)[0].spec[0]
  rows = {}   # process -> its positions along the data axis
  for pos, d in np.ndenumerate(mesh.devices):
    rows.setdefault(d.process_index, set()).add(pos[list(mesh.axis_names).index(axis)])
  taken = [i for r in rows.values() for i in r]
  if len(taken) != len(set(taken)) or len({len(r) for r in rows.values()}) > 1:
    raise ValueError(f"quantize_model: the mesh {dict(mesh.shape)} spans processes "
                     f"{sorted(rows)}, but they do not hold equal, disjoint slices of its data "
                     f"axis {axis!r} ({ {p: sorted(r) for p, r in sorted(rows.items())} }); put "
                     "the processes along the data axis, or give each process a mesh of its own "
                     "devices (jq.distributed.local_mesh())")
  split = [p for p, x in leaves_with_paths(target.params) if isinstance(x, jax.Array)
           and not x.is_fully_replicated and len(x.sharding.device_set) > 1]
  if split or cfg.split_params:
    raise ValueError("quantize_model: parameters split over a mesh that spans processes are not "
                     f"supported ({', '.join(split[:3]) or 'PTQConfig.split_params=True'}); "
                     "replicate them, or give each process a mesh of its own devices")


def _quantize_model(model, variables, rules, batches, cfg, blocks, calib_batches_for_check,
                    chained, progress, dist: bool, example_kwargs) -> PTQModelResult:
  from jq.ptq import pipeline  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  given_ids, given_total = getattr(batches, "indices", None), getattr(batches, "total", None)
  batches = _check_batches(batches, given_ids)
  rules = check_rules(rules)
  if any(r.weight is not None and r.algorithm is Algorithm.AUTOROUND for r in rules) and (
      blocks is not None or dist):
    raise ValueError("quantize_model: learned rounding (autoround) runs on the adapter-free road "
                     "(blocks=None) in one process (a PTQConfig.mesh of this process's devices "
                     "works); " + ("blocks= was given" if blocks is not None else
                                   f"this run has {jax.process_count()} processes"))
  if any(r.weight is not None and r.algorithm is Algorithm.AUTOROUND for r in rules):
    _check_one_length(batches, given_ids)
    _check_kwargs_broadcast(batches, example_kwargs)
  if blocks is not None and (cfg.mesh is not None or dist):
    raise ValueError("quantize_model: blocks= (the adapter pipeline) runs on one device in one "
                     "process; PTQConfig.mesh and several processes need the adapter-free road "
                     "(blocks=None)")
  if blocks is not None:
    if variables is None:
      raise ValueError("quantize_model: blocks= (a BlockwiseModel) works with linen variables")
    res = pipeline.quantize_blockwise(variables, blocks, rules, np.concatenate(
        [np.asarray(as_args(b)[0]) for b in batches]), config=cfg)
    report = [LayerRow(p, "blockwise", f"{q.qtype.value} tile={'x'.join(map(str, q.tile))}")
              for p, q in leaves_with_paths(res.qparams) if isinstance(q, QArray)]
    return PTQModelResult(res.qparams, None, res.ref_params, report, res.log,
                          time.perf_counter() - t0)
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from jq import _compat  # pylint: disable=import-outside-toplevel
  if isinstance(model, nnx.Module):
    if variables is not None:
      raise ValueError("quantize_model: an nnx module carries its own state; pass variables=None")
    target = nnx_target(model, example_kwargs)
    target.params = cfg.split(_compat.auto_typed(target.params))
    try:   # (abstractly: named like a linen model's batch 0, not a raw error deep in the model)
      jax.eval_shape(target.run, target.params, batches[0])
    except (TypeError, ValueError, KeyError, flax.errors.FlaxError) as e:
      raise _cannot_run(batches[0], e) from e
  else:
    if variables is None:
      raise ValueError("quantize_model: a linen model needs its variables")
    variables = cfg.split(_compat.auto_typed(variables))   # (Explicit meshes: Auto)
    try:
      target = linen_target(model, variables, batches[0], example_kwargs)
    except (TypeError, ValueError, KeyError, flax.errors.FlaxError) as e:
      raise _cannot_run(batches[0], e) from e
  log: list[str] = []
  rules, kept = runnable_rules(target.params, tuple(rules), target.layouts,
                               target.reasons, target.stacks)
  decided = {p.path: p.rule for p in plan(target.params, rules) if p.quantized}
  _check_finite(target.params)
  _round_unmapped_to_nearest(target, decided, batches[0], log)
  first = {p: r.initial for p, r in decided.items()}   # (learned rounding starts from these)

  # what each layer needs, collected per unit (the whole model, or one block at a time)
  wants = {}
  for path, rule in first.items():
    algo = rule.algorithm
    static = rule.activation is not None and rule.activation.mode is ActMode.STATIC
    if algo is Algorithm.RTN and not static:
      continue
    opts = rule.algorithm_options
    wants[path] = Want(
        stack=target.stacks.get(path, 1), xtx=algo is not Algorithm.RTN,
        samples=cfg.sample_tokens if algo is Algorithm.AWQ else 0,
        first_token_weight=opts.first_token_weight if algo is Algorithm.GPTQ else 1.0)
  smoothing = [p for p, r in first.items() if r.algorithm in (Algorithm.AWQ,
                                                                Algorithm.SMOOTHQUANT)]
  groups = (folding.find_groups(target, target.params, smoothing, batches[0],
                                [_one_row(target, batches[0])], log,
                                float_layers=[p for p in target.layouts if p not in decided])
            if smoothing else [])
  ids, total = list(range(len(batches))), len(batches)
  if dist:
    from jq import distributed  # pylint: disable=import-outside-toplevel
    ids, total = distributed.plan_batches(
        len(batches), indices=given_ids, total=given_total,
        same=_fingerprint(model, target, rules, decided, groups, cfg, chained,
                          calib_batches_for_check))
  elif given_ids is not None and jax.process_count() <= 1:
    ids, total = list(given_ids), int(given_total)
  if cfg.mesh is not None and len(spanned(cfg.mesh)) > 1:
    _check_spanning(cfg, target, dist)
  if cfg.mesh is not None:
    batches = shard_batches(batches, cfg.mesh, cfg.data_axis, batch_ids=ids)
  state = _State(target, decided, wants, log, batches[:max(1, calib_batches_for_check)],
                 mesh=cfg.mesh, data_axis=cfg.data_axis, batch_ids=ids, total=total, dist=dist,
                 split_factor_from=cfg.split_factor_from)
  schedule = Schedule(target, list(decided), batches, sequential=cfg.sequential, log=log,
                      chained=chained, float_inputs=any(
                          r.algorithm is Algorithm.AUTOROUND and
                          r.algorithm_options.target == "float" for r in decided.values()))
  schedule.params, schedule.ref = state.placed(state.cur), state.placed(state.ref)
  it = iter(schedule)
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    it = state.bar = tqdm(it, desc="calibrating", unit="block")
  for unit in it:
    state.calibrate(unit, {p: wants[p] for p in unit.layers if p in wants}, groups)
    schedule.params, schedule.ref = state.placed(state.cur), state.placed(state.ref)
  report = state.report
  if state.solved_by:
    log.append(f"GPTQ/AWQ solves split over {jax.process_count()} processes: " + ", ".join(
        f"process {p} ran {c}" for p, c in sorted(state.solved_by.items())))
  if state.devices_used > 1:
    log.append(f"GPTQ/AWQ solves spread over {state.devices_used} devices of the mesh")
  if state.cut:
    log.append("solved in column blocks (output channels) on several workers: "
               + ", ".join(sorted(state.cut)))
  if state.fused:
    fused = list(dict.fromkeys(state.fused))
    log.append(f"GPTQ kernels reading one input solved as one (their Hessian factored once), "
               f"{len(fused)} groups: " + ", ".join(fused[:4]) + (", ..." if fused[4:] else ""))
  if state.factored:
    log.append(f"GPTQ Hessians factored split over the mesh's devices (K >= "
               f"{state.split_factor_from}; no device held a K × K "
               "matrix): " + ", ".join(sorted(state.factored)))
  qparams = folding.replace_leaves(state.ref, state.finish())
  if state.sharded:
    log.append(f"{len(state.sharded)} parameters split over the mesh's devices as given: kept "
               "split (never replicated), their quantized kernels split the same way")
  for p, why in kept.items():
    log.append(f"{p}: kept float: {why}")
  out = target.finish(qparams)
  secs = time.perf_counter() - t0
  if target.kind == "nnx":
    return PTQModelResult(None, out, state.ref, report, log, secs)
  return PTQModelResult(out, None, state.ref, report, log, secs)


class _State:
  """What calibration has done so far: ``ref`` (float, scales folded), ``cur`` (``ref`` with the
  finished kernels dequantized: what later units run on), the solved matrices, the inputs."""

  def __init__(self, target: Target, decided: dict[str, Rule], calibrated, log: list[str],
               check: list, *, mesh=None, data_axis: str | None = None,
               batch_ids: Sequence[int] | None = None, total: int | None = None,
               dist: bool = False, split_factor_from: int | None = None):
    self.target, self.decided, self.log, self.check = target, decided, log, check
    self.first = {p: r.initial for p, r in decided.items()}
    self.bar = None   # the progress bar (learned rounding reports its loss there)
    self.mesh, self.data_axis, self.dist = mesh, data_axis, dist
    self.batch_ids = None if batch_ids is None else list(batch_ids)
    self.total = total
    self._replicated = None if mesh is None else data_sharding(mesh, data_axis)[1]
    self._placed: dict[int, tuple[Any, Any]] = {}
    self.ref = self.cur = target.params
    # leaves the caller split over the mesh's devices: they stay split (never replicated), and so
    # do the finished kernels that replace them and the QArrays they become (on the Auto-typed
    # twin of the caller's mesh: ``_compat.auto_typed``)
    self.sharded = {p: x.sharding for p, x in leaves_with_paths(target.params)
                    if self._is_split(x)}
    self.views = {p: MatrixView(tuple(x.shape), target.layouts[p])
                  for p, x in leaves_with_paths(target.params) if p in decided}
    self.per_layer = {}   # matrix i is stacked layer i (else every matrix shares one input)
    for p, v in self.views.items():
      n = target.stacks.get(p, 1)
      self.per_layer[p] = n > 1 and v.n == n
      if n > 1 and v.n != n and p in calibrated:
        raise ValueError(f"{p}: a stacked kernel of shape {v.shape} with {v.n} matrices for {n} "
                         "layers (batch axes besides the stack axis) is not supported by the "
                         "calibrated algorithms; use RTN for it")
    self.mats: dict[str, dict[int, QArray]] = collections.defaultdict(dict)
    self.inputs: dict[str, dict[int, LayerInputs]] = collections.defaultdict(dict)
    self.scaled: set[tuple[str, int]] = set()   # (kernel, layer) whose input AWQ/SQ rescaled
    self.spanning: set = set()   # scale groups over several blocks, handled with the first
    self.rows_done: set = set()  # (group, row of its scales) folded (a row once, for all layers)
    self.report: list[LayerRow] = []
    self.notes: dict[str, list[str]] = collections.defaultdict(list)
    self.algo_used: dict[str, Algorithm] = {}
    self.solved_by: dict[int, int] = {}   # process -> GPTQ/AWQ solves (or blocks) it ran
    self.devices_used = 0                  # most devices one unit's solves ran on (a mesh)
    self.cut: set[str] = set()             # kernels whose solve was cut into column blocks
    self.factored: set[str] = set()        # GPTQ kernels solved with the Hessian split (mesh)
    self.fused: list[str] = []             # GPTQ kernels solved as one (one factorisation)
    self.split_factor_from = solves.factor_from(self._local_devices(), split_factor_from)

  def _layer(self, path: str, inputs: LayerInputs, layer: int) -> LayerInputs:
    if self.target.stacks.get(path, 1) == 1:
      return inputs
    return LayerInputs(None if inputs.stats is None else LayerStats(
        *[v[layer] for v in inputs.stats]), inputs.lo[layer], inputs.hi[layer],
                       None if inputs.samples is None else inputs.samples[layer])

  def _local_devices(self) -> list:
    """This process's devices of the mesh (none without a mesh)."""
    return [] if self.mesh is None else [d for d in self.mesh.devices.flat
                                         if d.process_index == jax.process_index()]

  def _is_split(self, x) -> bool:
    """``x`` is split over this mesh's devices (a NamedSharding that is not a full copy)."""
    s = getattr(x, "sharding", None)
    return (self.mesh is not None and isinstance(x, jax.Array)
            and isinstance(s, jax.sharding.NamedSharding) and not s.is_fully_replicated
            and s.device_set == set(self.mesh.devices.flat))

  def placed(self, tree):
    """``tree`` on the mesh: leaves split over its devices as they are (on the ``Auto`` twin of
    their mesh, which the calibration programs use), every other leaf replicated (each copied
    once and kept while it is in use); ``tree`` itself without a mesh."""
    if self._replicated is None:
      return tree
    auto = self._replicated.mesh

    def one(x):
      if not isinstance(x, (jax.Array, np.ndarray)):
        return x
      hit = self._placed.get(id(x))
      if hit is None or hit[0] is not x:
        to = (jax.sharding.NamedSharding(auto, x.sharding.spec) if self._is_split(x)
              else self._replicated)
        hit = self._placed[id(x)] = (x, put(x, to))
      return hit[1]
    return jax.tree_util.tree_map(one, tree)

  def _tree_as_given(self, tree):
    """``tree`` with the caller's split leaves split as they were (after a fold rescaled them)."""
    if not self.sharded:
      return tree
    return folding.replace_leaves(tree, {p: self._as_given(p, x)
                                         for p, x in leaves_with_paths(tree) if p in self.sharded})

  def _as_given(self, path: str, x):
    """A finished float kernel (or QArray) of ``path`` split like the caller's leaf was."""
    s = self.sharded.get(path)
    if s is None:
      return x
    return jax.device_put(x, qarray_sharding(x, s) if isinstance(x, QArray) else s)

  def _drop_placed(self) -> None:
    """Forgets the copies of leaves no longer in ``cur`` (folded or quantized ones)."""
    if self._placed:
      live = {id(x) for x in jax.tree_util.tree_leaves(self.cur)}
      self._placed = {k: v for k, v in self._placed.items() if k in live}

  def calibrate(self, unit: Unit, wants: dict[str, Want], groups) -> None:
    self._drop_placed()
    reduce = None
    if self.dist and (self.mesh is None or len(spanned(self.mesh)) == 1):
      from jq import distributed  # pylint: disable=import-outside-toplevel
      reduce = functools.partial(distributed.allreduce_stats,
                                 what=f"the statistics of {unit.name}")
    got = collect(unit.run, unit.batches, wants, operands=self.placed(self.cur), mesh=self.mesh,
                  data_axis=self.data_axis, batch_ids=self.batch_ids, total_batches=self.total,
                  reduce=reduce) if wants else {}
    sliced: dict[tuple, LayerInputs] = {}   # (layers reading one input keep one LayerInputs)
    for p, inp in got.items():
      for layer in unit.layers[p]:
        key = (id(inp), layer, self.target.stacks.get(p, 1))
        if key not in sliced:
          sliced[key] = self._layer(p, inp, layer)
        self.inputs[p][layer] = sliced[key]
    self._fold(unit, self._groups_of(unit, groups))
    leaves = dict(leaves_with_paths(self.ref))
    tasks = []
    for path, layers in unit.layers.items():
      rule, view = self.first[path], self.views[path]
      stacked = self.per_layer[path]
      algo = rule.algorithm
      if algo in (Algorithm.AWQ, Algorithm.SMOOTHQUANT) and not all(
          (path, i) in self.scaled for i in layers):
        self.notes[path].append(f"{algo.value} scales not applied (see log); rounded to nearest")
        algo = Algorithm.RTN
      self.algo_used.setdefault(path, algo)
      spec2 = view.matrix_spec(rule.weight, name=path)
      mats = view.matrices(jnp.asarray(leaves[path]))
      for i in (layers if stacked else range(view.n)):   # (unstacked: matrices of batch axes)
        inp, a = self.inputs[path].get(i if stacked else 0), algo
        name = f"{path}[{i}]" if view.n > 1 else path
        if a is Algorithm.GPTQ and _saw_nothing(inp):
          a = Algorithm.RTN
          self.log.append(f"{name}: no nonzero calibration input reached it (an expert no token "
                          "was routed to?): GPTQ has nothing to work with; rounded to nearest")
          self.notes[path].append((f"layer {i}: " if view.n > 1 else "")
                                  + "no calibration input; rounded to nearest")
        tasks.append(solves.Solve(path, i, a, mats[i], inp, spec2, rule.algorithm_options, name))
    for t, (q, note) in zip(tasks, self._solve(unit, tasks)):
      self.mats[t.path][t.index] = q
      if note:
        self.notes[t.path].append(note if self.views[t.path].n == 1 else
                                  f"layer {t.index}: {note}")
    learned = [p for p in unit.layers if self.decided[p].algorithm is Algorithm.AUTOROUND]
    for opts in dict.fromkeys(self.decided[p].algorithm_options for p in learned):
      self._learn(unit, [p for p in learned if self.decided[p].algorithm_options == opts], opts,
                  leaves)
    done = {}
    for path in unit.layers:
      view, mats = self.views[path], self.views[path].matrices(jnp.asarray(leaves[path]))
      done[path] = view.kernel(jnp.stack([
          self.mats[path][i].dequantize(jnp.float32) if i in self.mats[path] else mats[i]
          for i in range(view.n)])).astype(folding.wide_dtype(leaves[path].dtype))
      done[path] = self._as_given(path, done[path])
    self.cur = folding.replace_leaves(self.cur, done)

  def _solve(self, unit: Unit, tasks: Sequence[solves.Solve]) -> list[tuple[QArray, str]]:
    """Each task's ``(QArray, note)``.  With several processes, the GPTQ/AWQ solves are shared
    out (``jq.ptq.solves``: a solve costlier than a process's even share cut into column blocks,
    the costliest first, each to the least loaded process), each process runs its own and the
    results are sent to all (``jq.distributed.share``: the same bits everywhere); rounding to
    nearest is cheaper than sending it, so every process does it.  Within a process, a mesh's
    devices share its solves the same way (:meth:`_run`).  GPTQ kernels reading one input with
    one spec (q, k, v) are solved as one first (``solves.fuse``: one Hessian factorisation)."""
    n = jax.process_count() if self.dist else 1
    fused, parts = solves.fuse(tasks)
    self.fused.extend(" + ".join(t.paths) for t in fused if t.also)
    pieces = solves.split(fused, n)
    owner = solves.owners([p for _, p in pieces], n) if n > 1 else {}
    me = jax.process_index()
    for j in owner:
      self.solved_by[owner[j]] = self.solved_by.get(owner[j], 0) + 1
    self.cut.update(q for _, p in pieces if p.cols is not None for q in p.paths)
    got = self._run({j: p for j, (_, p) in enumerate(pieces) if owner.get(j, me) == me})
    if owner:
      got.update(self._shared(unit, {j: got[j] for j in owner if owner[j] == me}))
    out = solves.unfuse(parts, solves.joined(pieces, got))
    return [out[i] for i in range(len(tasks))]

  def _shared(self, unit: Unit, mine: dict[int, tuple[QArray, str]]
              ) -> dict[int, tuple[QArray, str]]:
    """Every process's solved pieces, from this process's ``mine`` (``jq.distributed.share``)."""
    from jq import distributed  # pylint: disable=import-outside-toplevel
    arrays, info = {}, {}
    for j, (q, note) in mine.items():
      arrays.update({f"{j}/{c}": getattr(q, c) for c in ("values", "scale", "zero_point")
                     if getattr(q, c) is not None})
      info[str(j)] = [q.qtype.value, list(q.shape), list(q.tile), note]
    arrays, infos = distributed.share(f"the solves of {unit.name}", arrays, info)
    out = {}
    for got in infos:
      for j, (qtype, shape, tile, note) in got.items():
        zp = arrays.get(f"{j}/zero_point")
        out[int(j)] = (QArray(values=jnp.asarray(arrays[f"{j}/values"]),
                              scale=jnp.asarray(arrays[f"{j}/scale"]),
                              zero_point=None if zp is None else jnp.asarray(zp),
                              activation=None, qtype=QType(qtype), shape=tuple(shape),
                              tile=tuple(tile)), note)
    out.update(mine)
    return out

  def _run(self, tasks: dict[int, solves.Solve]) -> dict[int, tuple[QArray, str]]:
    """Runs ``tasks`` in this process: on a mesh of several local devices, the GPTQ/AWQ solves
    are spread over them (``jq.ptq.solves`` again, column blocks included; one thread per
    device, each solve's inputs placed on its device, the results brought back to the default
    device: the same program on the same kind of device, so the same bits); everything else on
    the default device."""
    devices = self._local_devices()
    keys = list(tasks)
    if len(devices) < 2:
      return {k: solves.solve_on(tasks[k], None) for k in keys}
    home = jax.local_devices()[0]
    out = {}
    for k in [k for k in keys if solves.factors_split(tasks[k], self.split_factor_from)]:
      q, note = solves.solve_on(tasks[k], devices)
      out[k] = (jax.device_put(q, home), note)
      self.factored.update(tasks[k].paths)
    keys = [k for k in keys if k not in out]
    pieces = solves.split([tasks[k] for k in keys], len(devices))
    self.cut.update(q for _, p in pieces if p.cols is not None for q in p.paths)
    where = solves.owners([p for _, p in pieces], len(devices))
    got = {j: solves.solve_on(p, None) for j, (_, p) in enumerate(pieces) if j not in where}

    def run(d: int) -> dict[int, tuple[QArray, str]]:
      return {j: solves.solve_on(pieces[j][1], devices[d]) for j in where if where[j] == d}

    if where:
      with concurrent.futures.ThreadPoolExecutor(len(devices)) as pool:
        for part in pool.map(run, range(len(devices))):
          got.update({j: (jax.device_put(q, home), note) for j, (q, note) in part.items()})
      self.devices_used = max(self.devices_used, len(set(where.values())))
    out.update({keys[i]: q for i, q in solves.joined(pieces, got).items()})
    return out

  def _learn(self, unit: Unit, paths: list[str], opts: AutoRoundOptions, leaves) -> None:
    """Learned rounding (``jq.algorithms.rounding``) of the unit's ``paths`` together, starting
    from their solved matrices, to minimise the unit's output error against the float model's."""
    starts, fixed = {}, {}
    for p in paths:
      view = self.views[p]
      mats = view.matrices(jnp.asarray(leaves[p], jnp.float32))
      fixed[p] = jnp.stack([self.mats[p][i].dequantize(jnp.float32) if i in self.mats[p]
                            else mats[i] for i in range(view.n)])
      for i in (unit.layers[p] if self.per_layer[p] else range(view.n)):
        q0 = self.mats[p][i]
        starts[(p, i)] = rounding.Start.from_qarray(
            q0, fixed[p][i] if opts.init == "gptq" else mats[i])
    items = unit.batches
    refs = unit.ref_batches if opts.target == "float" and unit.ref_batches else items
    ref_run = jax.jit(unit.run)
    ref_params = self.placed(self.ref)
    targets = jnp.concatenate([first_leaf(ref_run(ref_params, it)).astype(jnp.float32)
                               for it in refs])
    seq_tokens = int(np.prod(targets.shape[1:-1], dtype=np.int64))
    # per token: 1 / its target's squared norm ("relative"), or 1 / its size ("mse")
    energy = jnp.sum(jnp.square(targets.reshape(len(targets), seq_tokens, -1)), axis=-1)
    if opts.loss == "relative":
      weight = 1.0 / jnp.maximum(energy, 1e-3 * jnp.median(energy) + 1e-30)
    else:
      weight = jnp.full(energy.shape, 1.0 / targets.shape[-1])
    data = (_rows(items, unit.name), targets, weight)
    wide = {p: folding.wide_dtype(leaves[p].dtype) for p in paths}
    run = unit.run

    def loss(ws, operands, d, idx):
      params, base = operands
      new = {}
      for p in paths:
        m = base[p]
        for (q, i), w in ws.items():
          if q == p:
            m = m.at[i].set(w)
        new[p] = self.views[p].kernel(m).astype(wide[p])
      item, target, weight = jax.tree_util.tree_map(lambda a: a[idx], d)
      y = first_leaf(run(folding.replace_leaves(params, new), item)).astype(jnp.float32)
      err = jnp.sum(jnp.square(y - target).reshape(len(idx), seq_tokens, -1), axis=-1)
      return jnp.mean(err * weight, axis=1)

    bar = self.bar

    def on_step(i, value):
      if i % 10 == 0 or i + 1 == opts.steps:
        bar.set_postfix_str(f"{unit.name}: autoround step {i + 1}/{opts.steps} "
                            f"loss {value:.4g}", refresh=True)

    got, info = rounding.tune(loss, starts, (self.placed(self.cur), fixed), data, opts,
                              rows_per_step=max(1, opts.batch_tokens // max(1, seq_tokens)),
                              on_step=on_step if bar is not None else None)
    line = f"{unit.name}: {info.describe()}"
    self.log.append(line)
    if bar is not None:
      bar.write(line)
    for (p, i), r in got.items():
      if not info.fell_back:
        spec2 = self.views[p].matrix_spec(self.decided[p].weight, name=p)
        self.mats[p][i] = rounding.to_qarray(starts[(p, i)], r, spec2)
    for p in paths:
      where = (f"layers {list(unit.layers[p])}: " if self.per_layer[p] and
               self.target.stacks.get(p, 1) > 1 else "")
      self.notes[p].append(where + info.describe())

  def _groups_of(self, unit: Unit, groups) -> list:
    """The scale groups folded with ``unit``: those whose consumers it holds (a stacked group in
    each of its layers' units), and once, with the first unit holding any of them, a group whose
    consumers lie in several blocks (a T5 encoder's output, read by every decoder block's
    cross-attention): they read one tensor, so this unit's consumers' statistics are the others'
    too, and the others, not quantized yet, take the fold before their blocks run."""
    out = []
    for g in groups:
      here = tuple(c for c in g.consumers if c in unit.layers)
      if len(here) == len(g.consumers):
        out.append(g)
        continue
      if not here or g in self.spanning:
        continue
      self.spanning.add(g)
      if any(self.target.stacks.get(c, 1) > 1 for c in g.consumers):
        self.log.append(f"{g.describe()}: stacked consumers in several blocks "
                        f"({', '.join(g.consumers)}); scales not applied (calibrate with "
                        "PTQConfig(sequential=False) to fold them)")
        continue
      out.append(dataclasses.replace(g, consumers=here + tuple(
          c for c in g.consumers if c not in here)))
    return out

  def _solved(self, path: str, layers) -> bool:
    """Whether kernel ``path`` is already quantized in any of ``layers`` (a stacked kernel is
    solved layer by layer: its later layers can still take a fold)."""
    done = self.mats.get(path, {})
    return any(i in done for i in layers) if self.per_layer.get(path) else bool(done)

  def _fold(self, unit: Unit, groups) -> None:
    """AWQ/SmoothQuant scales of the unit's groups: computed, folded into ``ref`` and ``cur``
    when the float model keeps its function (checked), else skipped with a log line."""
    found, covered = {}, {}
    for g in groups:
      rows = {r: ls for r, ls in group_rows(self.target, g, unit.layers[g.consumers[0]]).items()
              if (g, r) not in self.rows_done}
      if not rows:
        continue
      layers = tuple(i for ls in rows.values() for i in ls)
      if g.kind == "linear" and self._solved(g.params[0], layers):
        self.log.append(f"{g.describe()}: the producer {g.params[0]} is already quantized; "
                        "scales not applied")
        continue
      s = _group_scales(self.target, self.ref, g, self.first, self.inputs, rows, self.log)
      if s is not None:
        key = g.producer + ">" + "+".join(g.consumers)
        found[key], covered[key] = (g, s), rows
    if not found:
      return
    local = {k: v for k, v in found.items()
             if unit.block is not None and v[0].producer.startswith(unit.block + "/")}
    rest = {k: v for k, v in found.items() if k not in local}
    keys = []
    for part, run, batches in ((local, unit.run, unit.batches[:len(self.check)]),
                               (rest, self.target.run, self.check)):
      if part:
        keys += self._verified(part, jax.jit(run), batches)
    folds = [found[k] for k in keys]
    for k in keys:
      g, s = found[k]
      self.log.append(f"{g.describe()}: {self.first[g.consumers[0]].algorithm.value} scales "
                      f"folded into {g.producer} ({g.kind}{', 1 + scale' if g.offset else ''}); "
                      "float model unchanged")
      self.rows_done.update((g, r) for r in covered[k])
      n = self.target.stacks.get(g.consumers[0], 1)
      for c in g.consumers:   # the consumers now read x / s: their statistics, exactly
        for layer in (i for ls in covered[k].values() for i in ls):
          if layer not in unit.layers.get(c, ()):   # (a later unit's: collected folded)
            self.scaled.add((c, layer))
            continue
          row = folding.layer_row(s, layer, n)
          inp = self.inputs[c][layer]
          self.inputs[c][layer] = LayerInputs(
              scale_stats(inp.stats, row), inp.lo / row, inp.hi / row,
              None if inp.samples is None else inp.samples / row)
          self.scaled.add((c, layer))
    self.ref, self.cur = (self._tree_as_given(folding.apply_folds(self.target, t, folds))
                          for t in (self.ref, self.cur))

  def _verified(self, found, run, batches) -> list[str]:
    """Keys of the folds that hold all together (checked together first, then halved)."""
    if self._replicated is not None:   # the batches are on the mesh: so must the parameters be
      run = functools.partial(lambda f, p, b: f(self.placed(p), b), run)
    refs = [run(self.cur, b) for b in batches]
    keys = list(found)
    while True:
      ok = folding.verify_folds(self.target, self.cur, {k: found[k] for k in keys}, batches,
                                refs, run, FOLD_TOLERANCE)
      if self.dist:   # a fold holds where it holds on every process's check batches
        from jq import distributed  # pylint: disable=import-outside-toplevel
        ok = distributed.all_true("the fold checks", ok)
      for k in keys:
        if not ok[k]:
          g = found[k][0]
          self.log.append(f"{g.describe()}: folding the "
                          f"{self.first[g.consumers[0]].algorithm.value} scales changed the "
                          f"float model by more than {FOLD_TOLERANCE:g}; group skipped")
      if all(ok.values()):
        return keys
      keys = [k for k in keys if ok[k]]

  def finish(self) -> dict[str, Any]:
    """One QArray per kernel, with its activation quantization attached."""
    static = {p: r.activation for p, r in self.decided.items()
              if r.activation is not None and r.activation.mode is ActMode.STATIC}
    ranges = {}
    for p in static:
      per = [self.inputs[p][i] for i in sorted(self.inputs[p])]
      lo = np.stack([np.min(x.lo) for x in per])
      hi = np.stack([np.max(x.hi) for x in per])
      ranges[p] = (lo, hi) if self.target.stacks.get(p, 1) > 1 else (lo[0], hi[0])
    act_scales = act_scales_from_ranges(ranges, static, self.log)
    leaves = dict(leaves_with_paths(self.ref))
    new = {}
    for path, rule in self.decided.items():
      view = self.views[path]
      q = assemble(view, [self.mats[path][i] for i in range(view.n)], rule.weight, name=path)
      new[path] = self._as_given(path, with_activation(q, rule.activation, act_scales.get(path),
                                                      path=path, leaf=leaves[path]))
      algo = self.algo_used[path].value
      if rule.algorithm is Algorithm.AUTOROUND:
        algo = f"autoround (from {algo})"
      self.report.append(LayerRow(path, algo, q.qtype.value + " tile=" +
                                  "x".join(map(str, q.tile)), "; ".join(self.notes[path])))
    return new


def _fingerprint(model, target: Target, rules, decided, groups, cfg, chained: bool,
                 calib_batches_for_check: int) -> dict[str, Any]:
  """What every process of a distributed calibration must have the same (JSON-able): the model,
  its parameters (paths, shapes, dtypes and a few values of each), the rules, the config."""
  h = hashlib.sha256()
  for path, x in leaves_with_paths(target.params):
    h.update(f"{path}:{tuple(np.shape(x))}:{np.dtype(getattr(x, 'dtype', np.float32))};".encode())
    if hasattr(x, "shape") and np.size(x):
      h.update(np.asarray(jnp.ravel(x)[:8]).tobytes())
  mesh = None if cfg.mesh is None else dict(zip(map(str, cfg.mesh.axis_names),
                                                map(int, cfg.mesh.devices.shape)))
  model_desc = type(model).__qualname__ if target.kind == "nnx" else repr(model)
  model_desc = re.sub(r" at 0x[0-9a-fA-F]+", "", model_desc)   # (functions: no addresses)
  return {
      "model": hashlib.sha256(model_desc.encode()).hexdigest()[:16] + f" ({type(model).__name__})",
      "parameters": h.hexdigest()[:16],
      "rules": [repr(r) for r in rules],
      "kernels": len(decided),
      "groups": [g.describe() for g in groups],
      "config": {"sequential": cfg.sequential, "sample_tokens": cfg.sample_tokens,
                 "mesh": mesh, "data_axis": cfg.data_axis, "chained": chained,
                 "calib_batches_for_check": calib_batches_for_check},
  }


def _rows(items: Sequence[Any], name: str) -> Any:
  """The calibration items of a unit as one pytree of arrays with a leading row axis (each
  item's arrays share their leading batch axis; None leaves stay None)."""
  for it in items:
    leaves = jax.tree_util.tree_leaves(it)
    lead = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
    if len(lead) != 1 or None in lead:
      raise ValueError(f"{name}: learned rounding splits the calibration batches into rows along "
                       "their leading axis; a batch holds arrays of leading sizes "
                       f"{sorted(map(str, lead))} (every argument must share the batch axis)")
  return jax.tree_util.tree_map(lambda *a: jnp.concatenate([jnp.asarray(x) for x in a]), *items)


def _one_row(target, batch):
  """The first example of a batch (leading axis), for the many forwards of group discovery: a
  wrong fold changes any example's outputs by orders of magnitude more than rounding does. The
  whole batch where the model cannot run on one row (its leading axis is not a free batch axis:
  a layer contracts it, or holds one kernel per index of it, ``batch_dims``)."""
  try:
    row = jax.tree_util.tree_map(lambda a: a[:1] if np.ndim(a) else a, batch)
    jax.eval_shape(target.run, target.params, row)
    return row
  except Exception:  # pylint: disable=broad-except  (any failure: the batch as it was given)
    return batch


def _check_finite(params) -> None:
  """A NaN/Inf parameter is named (path, shape, dtype, first bad index) before calibration runs,
  rather than surfacing as a later layer's non-finite input, blamed on the data."""
  for path, x in leaves_with_paths(params):
    if not (isinstance(x, (jax.Array, np.ndarray)) and jnp.issubdtype(x.dtype, jnp.floating)
            and getattr(x, "is_fully_addressable", True) and x.size):
      continue

    def fail(n, i, v, path=path, x=x):
      raise ValueError(f"{path}: shape {tuple(x.shape)} dtype {x.dtype} has {int(n)} NaN/Inf "
                       f"values (first at index {index_str(i, x.shape)}: {float(v)}); "
                       "quantize_model cannot calibrate a model with non-finite parameters")

    check_values(x, fail, finite=True)


def _saw_nothing(inp: LayerInputs | None) -> bool:
  """The layer's ``XᵀX`` has no positive diagonal entry: no nonzero input reached it."""
  return (inp is not None and inp.stats is not None
          and not np.any(np.diagonal(np.asarray(inp.stats.xtx)) > 0))


def _round_unmapped_to_nearest(target: Target, decided: dict[str, Rule], batch,
                               log: list[str]) -> None:
  """GPTQ, AWQ and SmoothQuant (and learned rounding's GPTQ/AWQ start) need a layer's input to map
  onto its kernel's contracting axes: a convolution's (or an einsum's with batch letters) does
  not.  Such layers are rounded to nearest (learned rounding starts from it), each logged."""
  asked = {p for p, r in decided.items() if r.initial.algorithm is not Algorithm.RTN}
  if not asked:
    return
  from jq.nn import common, linen  # pylint: disable=import-outside-toplevel
  unmapped: list[str] = []

  def observer(path, _x, x_axes, _kernel):
    if x_axes is None and path in asked and path not in unmapped:
      unmapped.append(path)

  with common.observing(observer):   # (an abstract trace: nothing is computed)
    linen.abstract_call(target.run, target.params, batch)
  for path in unmapped:
    r = decided[path]
    algo = r.initial.algorithm.value
    decided[path] = (dataclasses.replace(r, options=dataclasses.replace(r.algorithm_options,
                                                                        init="rtn"))
                     if r.algorithm is Algorithm.AUTOROUND else
                     dataclasses.replace(r, algorithm=Algorithm.RTN, options=None))
    log.append(f"{path}: {target.layouts[path].layer or 'its layer'} reads an input that does "
               "not map onto the kernel's contracting axes (a convolution, or dot batch dims): "
               f"{algo} is not available there; rounded to nearest")


def group_rows(target: Target, g: folding.Group, layers) -> dict[int, tuple[int, ...]]:
  """The rows of ``g``'s scales that ``layers`` (a unit's layers of its consumers) fall in, each
  with every layer it covers: a row shared by stacked consumers (experts reading one input) is
  chosen from all of them at once, whichever of them the unit holds."""
  n = target.stacks.get(g.consumers[0], 1)
  if n == 1:
    return {0: (0,)}
  per = n // g.rows
  return {r: tuple(range(r * per, (r + 1) * per)) for r in sorted({i // per for i in layers})}


def _group_scales(target: Target, params, g: folding.Group, decided, inputs, rows, log):
  """The group's per-input-channel scales for ``rows`` (see :func:`group_rows`; AWQ search or
  SmoothQuant over every consumer matrix of each row, which all read one input): ``(K,)``, or
  ``(g.rows, K)`` (ones for the rows not in ``rows``); None with a log line when its consumers
  ask for different algorithms or options."""
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
  mats = [v.matrices(jnp.asarray(leaves[c], jnp.float32)) for v, c in zip(views, g.consumers)]
  stacked = target.stacks.get(g.consumers[0], 1) > 1
  out = jnp.ones((g.rows, views[0].k), jnp.float32)
  for r, layers in rows.items():
    # one input: the consumers' matrices of these layers (all of a kernel's if it is unstacked)
    ws = [m[i] for m in mats for i in (layers if stacked else range(len(m)))]
    if g.mixed:   # consumers of different inputs (experts): chosen from all of them together
      inp = _joined([inputs[c][i] for c in g.consumers for i in layers if i in inputs[c]])
    else:
      inp = next(inputs[g.consumers[0]][i] for i in layers if i in inputs[g.consumers[0]])
    name = g.consumers[0] + (f"[{layers[0]}]" if len(layers) == 1 and stacked else
                             f"[{layers[0]}:{layers[-1] + 1}]" if stacked else "")
    if algo is Algorithm.SMOOTHQUANT:
      sc = smooth_scales(inp.stats, ws, opt.alpha, name=name)
    else:
      spec2 = views[0].matrix_spec(dataclasses.replace(rules[0].weight, clip=Clip()), name=name)
      sc, info = awq_search_scale(jnp.asarray(inp.samples), ws, spec2, grid=opt.grid,
                                  act_mean=mean_abs(inp.stats, name), duo=opt.duo, name=name)
      log.append(f"{name} group {g.describe()}: awq alpha={float(info.alpha):.2f} "
                 f"loss {float(info.loss):.3e} (rtn {float(info.rtn_loss):.3e})")
    out = out.at[r].set(jnp.asarray(sc, jnp.float32))
  return out[0] if g.rows == 1 else out


def _joined(parts: Sequence[LayerInputs]) -> LayerInputs:
  """One layer's inputs from several inputs (each once): statistics summed, ranges joined, the
  token samples' nonzero rows together (an expert's input is zero where a token was not routed
  to it), padded with zero rows to a multiple of one sample's length (so that the AWQ search
  compiles for few shapes; a zero row adds nothing to its loss)."""
  parts = list({id(p): p for p in parts}.values())
  stats = None
  if all(p.stats is not None for p in parts):
    st = [p.stats for p in parts]
    stats = LayerStats(xtx=sum(x.xtx for x in st), count=sum(x.count for x in st),
                       absmax=functools.reduce(jnp.maximum, [x.absmax for x in st]),
                       abssum=sum(x.abssum for x in st), nonfinite=sum(x.nonfinite for x in st))
  samples = None
  if all(p.samples is not None for p in parts):
    rows = np.concatenate([np.asarray(p.samples) for p in parts])
    rows = rows[np.any(rows != 0, axis=-1)]
    unit = max(1, len(parts[0].samples))
    pad = -len(rows) % unit if len(rows) else unit
    samples = np.concatenate([rows, np.zeros((pad, rows.shape[-1]), rows.dtype)])
  return LayerInputs(stats, np.minimum.reduce([np.asarray(p.lo) for p in parts]),
                     np.maximum.reduce([np.asarray(p.hi) for p in parts]), samples)


__all__ = ["quantize_model", "PTQModelResult", "LayerRow"]
