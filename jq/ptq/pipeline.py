"""Post-training quantization of a whole model, block by block (the model integration of
``jq.algorithms``).

For each transformer block, in order:

1. **Capture**: run the block on its calibration inputs (the outputs of the already-quantized
   blocks before it when ``sequential=True``, as in GPTQ's sequential mode) under
   ``jq.ptq.capture`` and fold every linear's input into streaming statistics
   (``LayerStats``: ``XᵀX``, per-channel ``max|x|``/``Σ|x|``; a per-channel min/max observer; a
   small evenly spaced token sample for AWQ).  Nothing else of the activations is kept.
2. **Smooth** (AWQ or SmoothQuant, where every linear of a :class:`ScaleGroup` asks for it): find
   per-input-channel scales ``s``, fold ``1/s`` into the producing norm or linear and ``s`` into
   the consumers' rows.  The float block computes the same function; the consumers' statistics
   are transformed exactly (``XᵀX → D⁻¹XᵀXD⁻¹``), so nothing is captured twice.
3. **Quantize** each linear by its rule: RTN, GPTQ (with its Hessian), or AWQ's clip search then
   RTN; attach static activation scales (from the observed ranges) or the dynamic marker.
4. **Propagate**: compute the block's outputs with the quantized weights (sequential) or the float
   ones, as the next block's inputs.

Leaves outside the blocks that a rule quantizes (e.g. an untied output head) use RTN.
"""
from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jq.algorithms import (awq_search_clip, awq_search_scale, fold_scale_into_linear,
                           fold_scale_into_norm, gptq_quantize, scale_consumer, smooth_scales)
from jq.calibrate import act_params, init_stats, mean_abs, minmax
from jq.calibrate.stats import LayerStats, update_stats
from jq.ptq.blocks import BlockwiseModel, get_path, set_path
from jq.ptq.capture import capture_dense_inputs
from jq.qarray import ActivationQuant, QArray
from jq.quantize import quantize
from jq.spec import ActMode, Algorithm, Clip, Rule
from jq.tree import dequantize_tree, leaves_with_paths, plan, quantize_tree


@dataclasses.dataclass(frozen=True, kw_only=True)
class PTQConfig:
  """Options of the block-wise pipeline.

  Attributes:
    sequential: calibrate block ``i`` on the outputs of the quantized blocks ``< i``.
    gptq_damp, gptq_block_size, gptq_act_order: GPTQ options (see ``gptq_quantize``).
    gptq_first_token_weight: weight of each calibration sequence's first token in GPTQ's Hessian
      (``Σ w_t x_tᵀx_t``).  Position 0 is the attention sink every later token attends to, and its
      inputs point in directions the other tokens rarely visit; with plain ``XᵀX`` (weight 1)
      GPTQ pushes its error into exactly those directions.  On SmolLM2 (w4a16 g128) that made the
      sink's q/k/v error ~10x RTN's and perplexity *worse* than RTN's (41.7 vs 38.0, float 29.1)
      although every layer's error on ordinary tokens was 2-5x lower; with weight 16 GPTQ gives
      35.1, with act-order 33.4 (``benchmarks/results/ptq_compare_cpu.md``; 16 was the best of
      1/4/8/16/32/128/1024 in a sweep on 8 of the evaluation windows).  The idea that these pivot
      tokens must be kept intact is IntactKV's (Liu et al., 2024, arXiv:2403.01241); weight 1 gives
      textbook GPTQ.
    awq_grid: number of ``α`` candidates in AWQ's scale search.
    awq_clip: run AWQ's per-group clip search after scaling.
    smoothquant_alpha: SmoothQuant migration strength.
    chunk: calibration sequences per captured forward (memory vs. speed).
    sample_tokens: tokens kept per linear for AWQ's searches.
  """
  sequential: bool = True
  gptq_damp: float = 0.01
  gptq_block_size: int = 128
  gptq_act_order: bool = False
  gptq_first_token_weight: float = 16.0
  awq_grid: int = 20
  awq_clip: bool = True
  smoothquant_alpha: float = 0.5
  chunk: int = 8
  sample_tokens: int = 512


@dataclasses.dataclass
class PTQResult:
  """``qparams``: quantized tree; ``ref_params``: the float tree they approximate (smoothing
  folded in, so per-layer errors compare like with like); ``log``: per-layer notes."""
  qparams: Any
  ref_params: Any
  log: list[str]
  seconds: float


class _Capture:
  """Jitted streaming statistics for every Dense input of one block."""

  def __init__(self, blocks: BlockwiseModel, sample_per_chunk: int, first_token_weight: float):
    self.blocks = blocks
    self.first_token_weight = float(first_token_weight)
    self.obs = minmax(per_channel=True)
    self.sample_per_chunk = sample_per_chunk
    self._step = jax.jit(self._step_impl)
    self._fwd = jax.jit(blocks.apply_block)

  def _step_impl(self, bp, x, state):
    _, found = capture_dense_inputs(self.blocks.apply_block, bp, x)
    new = {}
    for path, inp in found.items():
      if isinstance(inp, list):
        raise ValueError(f"{path}: the layer runs more than once per block; block-wise "
                         "calibration expects each linear to run once")
      st, mm = state[path] if state is not None else (init_stats(inp.shape[-1]),
                                                       self.obs.init(inp.shape[-1]))
      flat = inp.reshape(-1, inp.shape[-1]).astype(jnp.float32)
      idx = jnp.linspace(0, flat.shape[0] - 1, self.sample_per_chunk).astype(jnp.int32)
      # (batch, length, ..., K): position 0 of each sequence gets its own Hessian weight
      tw = jnp.ones(inp.shape[:-1], jnp.float32)
      if inp.ndim >= 3 and self.first_token_weight != 1.0:
        tw = tw.at[:, 0].set(self.first_token_weight)
      new[path] = (update_stats(st, flat, tw.reshape(-1)), self.obs.update(mm, flat), flat[idx])
    return new

  def run(self, bp, xs: Sequence[jax.Array]):
    state, samples = None, {}
    for x in xs:
      out = self._step(bp, x, state)
      state = {p: (st, mm) for p, (st, mm, _) in out.items()}
      for p, (_, _, smp) in out.items():
        samples.setdefault(p, []).append(smp)
    return ({p: v[0] for p, v in state.items()}, {p: v[1] for p, v in state.items()},
            {p: jnp.concatenate(v) for p, v in samples.items()})

  def forward(self, bp, xs):
    return [self._fwd(bp, x) for x in xs]


def _scale_stats(st: LayerStats, s: jax.Array) -> LayerStats:
  """Statistics of ``x / s`` from those of ``x``."""
  inv = 1.0 / s
  return st._replace(xtx=st.xtx * inv[:, None] * inv[None, :], absmax=st.absmax * inv,
                     abssum=st.abssum * inv)


def _group_algorithm(rules: Sequence[Rule | None]) -> Algorithm | None:
  algos = {r.algorithm if (r is not None and r.weight is not None) else None for r in rules}
  if len(algos) == 1 and next(iter(algos)) in (Algorithm.AWQ, Algorithm.SMOOTHQUANT):
    return next(iter(algos))
  return None


def quantize_blockwise(params: dict[str, Any], blocks: BlockwiseModel, rules: Sequence[Rule],
                       calib_tokens: np.ndarray, *, config: PTQConfig = PTQConfig(),
                       progress: bool = False) -> PTQResult:
  """Quantizes ``{"params": ...}`` of a block-structured model with calibration (see module doc).

  Args:
    params: the model's variables, ``{"params": {...}}`` (float).
    blocks: the model's :class:`~jq.ptq.blocks.BlockwiseModel` view.
    rules: ordered rules; each rule's ``algorithm`` picks RTN/GPTQ/AWQ/SmoothQuant per layer.
    calib_tokens: ``(sequences, length)`` int token ids (disjoint from evaluation text).
    config: :class:`PTQConfig`.

  Raises:
    ValueError: empty or too small calibration set, NaN activations, or a rule asking for a
      calibration algorithm on a leaf outside the blocks.
  """
  t0 = time.perf_counter()
  calib = np.asarray(calib_tokens)
  if calib.ndim != 2 or calib.shape[0] < 1 or calib.shape[1] < 2:
    raise ValueError(f"calibration tokens have shape {calib.shape}; need (sequences >= 1, "
                     "length >= 2)")
  rules = tuple(rules)
  decided = {p.path: p.rule for p in plan(params, rules)}
  p = params["params"]
  chunk = max(1, min(config.chunk, calib.shape[0]))
  n_chunks = -(-calib.shape[0] // chunk)
  if not config.gptq_first_token_weight >= 0:
    raise ValueError(f"gptq_first_token_weight={config.gptq_first_token_weight} must be >= 0")
  cap = _Capture(blocks, max(1, config.sample_tokens // n_chunks), config.gptq_first_token_weight)
  embed = jax.jit(blocks.embed)
  xs = [embed(p, jnp.asarray(calib[i:i + chunk], jnp.int32)) for i in range(0, len(calib), chunk)]
  log: list[str] = []
  qp, refp = dict(p), dict(p)
  it = range(blocks.num_blocks)
  if progress:
    from tqdm.auto import tqdm
    it = tqdm(it, desc="calibrating blocks", unit="block")
  for i in it:
    key = blocks.block_key(i)
    prefix = f"params/{key}/"
    bp = p[key]
    stats, ranges, samples = cap.run(bp, xs)
    for path, st in stats.items():
      n_bad = int(st.nonfinite)
      if n_bad:
        raise ValueError(f"{prefix}{path}: {n_bad} NaN/Inf activation values during calibration")
    scale_of: dict[str, jax.Array] = {}
    fbp = bp
    for g in blocks.scale_groups():
      algo = _group_algorithm([decided.get(prefix + c) for c in g.consumers])
      if algo is None:
        continue
      ws = [get_path(fbp, c) for c in g.consumers]
      spec = decided[prefix + g.consumers[0]].weight
      first = g.consumers[0]
      if algo is Algorithm.AWQ:
        s, info = awq_search_scale(samples[first], ws, dataclasses.replace(spec, clip=Clip()),
                                   grid=config.awq_grid, block_fn=g.block_fn,
                                   act_mean=mean_abs(stats[first], prefix + first),
                                   name=prefix + first)
        log.append(f"{prefix}{'+'.join(c.split('/')[-2] for c in g.consumers)}: awq "
                   f"alpha={float(info.alpha):.2f} loss {float(info.loss):.3e} "
                   f"(rtn {float(info.rtn_loss):.3e})")
      else:
        s = smooth_scales(stats[first], ws, config.smoothquant_alpha, name=prefix + first)
      fold = fold_scale_into_norm if g.prev_kind == "norm" else fold_scale_into_linear
      fbp = set_path(fbp, g.prev, fold(get_path(fbp, g.prev), s, name=prefix + g.prev))
      for c in g.consumers:
        fbp = set_path(fbp, c, scale_consumer(get_path(fbp, c), s, name=prefix + c))
        stats[c] = _scale_stats(stats[c], s)
        scale_of[c] = s
        samples[c] = samples[c] / s
    qbp = fbp
    for rel in stats:
      rule = decided.get(prefix + rel)
      if rule is None or rule.weight is None:
        continue
      name = prefix + rel
      w = get_path(fbp, rel)
      spec = rule.weight
      if rule.algorithm is Algorithm.GPTQ:
        q, info = gptq_quantize(w, stats[rel], spec, damp=config.gptq_damp,
                                block_size=config.gptq_block_size,
                                act_order=config.gptq_act_order, name=name)
        if int(info.retries) or bool(info.fallback):
          log.append(f"{name}: gptq damping retries={int(info.retries)} "
                     f"fallback={bool(info.fallback)}")
      elif rule.algorithm is Algorithm.AWQ and config.awq_clip:
        noclip = dataclasses.replace(spec, clip=Clip())
        w_clipped, _ = awq_search_clip(samples[rel], w, noclip, name=name)
        q = quantize(w_clipped, noclip, name=name)
      else:
        q = quantize(w, spec, name=name)
      if rule.activation is not None:
        q = dataclasses.replace(q, activation=_activation(rule, ranges[rel], scale_of.get(rel),
                                                          cap.obs, name))
      qbp = set_path(qbp, rel, q)
    qp[key], refp[key] = qbp, fbp
    xs = cap.forward(dequantize_tree(qbp) if config.sequential else bp, xs)
  rest = _quantize_outside_blocks({"params": qp}, decided, blocks)
  return PTQResult(qparams=rest, ref_params={"params": refp}, log=log,
                   seconds=time.perf_counter() - t0)


def _activation(rule: Rule, mm_state, s, obs, name: str) -> ActivationQuant:
  if rule.activation.mode is ActMode.DYNAMIC:
    return ActivationQuant(scale=None, zero_point=None, spec=rule.activation)
  lo, hi = obs.finalize(mm_state, name)
  if s is not None:  # ranges of x / s, per channel (s > 0)
    lo, hi = lo / s, hi / s
  scale, zp = act_params(jnp.min(lo), jnp.max(hi), rule.activation)
  return ActivationQuant(scale=jnp.asarray(scale, jnp.float32).reshape(()),
                         zero_point=None if zp is None else zp.reshape(()), spec=rule.activation)


def _quantize_outside_blocks(tree, decided: dict[str, Rule | None], blocks: BlockwiseModel):
  block_prefixes = tuple(f"params/{blocks.block_key(i)}/" for i in range(blocks.num_blocks))
  todo = []
  for path, leaf in leaves_with_paths(tree):
    rule = decided.get(path)
    if path.startswith(block_prefixes) or isinstance(leaf, QArray) or rule is None or \
        rule.weight is None:
      continue
    if rule.algorithm is not Algorithm.RTN or rule.activation is not None:
      raise ValueError(f"{path}: shape {tuple(leaf.shape)} dtype {leaf.dtype}: "
                       f"{rule.algorithm.value}/activation quantization is only available for "
                       "the linears inside transformer blocks; use RTN weight-only here")
    todo.append(Rule(pattern=f"^{re.escape(path)}$", weight=rule.weight))
  return quantize_tree(tree, todo) if todo else tree
