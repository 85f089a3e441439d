"""Post-training quantization of a whole model, block by block (the model integration of
``jq.algorithms``).

For each transformer block, in order:

1. **Capture**: run the block on its calibration inputs (the outputs of the already-quantized
   blocks before it when ``sequential=True``, as in GPTQ's sequential mode) under
   ``jq.calibrate.capture_inputs`` and fold every linear's input into streaming statistics
   (``LayerStats``: ``XᵀX``, per-channel ``max|x|``/``Σ|x|``; a per-channel min/max observer; a
   small evenly spaced token sample for AWQ).  Nothing else of the activations is kept.
2. **Smooth** (AWQ or SmoothQuant, where every linear of a :class:`ScaleGroup` asks for it): find
   per-input-channel scales ``s``, fold ``1/s`` into the producer (a norm's scale and bias; a
   linear's output columns and bias) and ``s`` into the consumers' rows.  Every fold is CHECKED:
   the float block, run on the block's calibration inputs, must give the same outputs with and
   without it (relative error ``‖Δ‖/‖y‖ ≤ FOLD_TOLERANCE`` in float32); otherwise the fold is
   reverted, its linears are quantized without the algorithm (RTN; plain W8A8 for SmoothQuant)
   and the log names the group and the error.  The consumers' statistics are transformed exactly
   (``XᵀX → D⁻¹XᵀXD⁻¹``), so nothing is captured twice.
3. **Quantize** each linear by its rule: RTN, GPTQ (with its Hessian), or AWQ's clip search then
   RTN; attach static activation scales (from the observed ranges) or the dynamic marker.  The
   algorithms' options come from the rules (``Rule.algorithm_options``).
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
from jq.calibrate.collect import capture_inputs
from jq.algorithms.fold import FOLD_TOLERANCE, relative_error
from jq.calibrate.stats import scale_stats, update_stats
from jq.ptq.blocks import BlockwiseModel, ScaleGroup, get_path, set_path
from jq.qarray import ActivationQuant, QArray
from jq.quantize import quantize
from jq.spec import ActMode, Algorithm, Clip, Rule
from jq.tree import dequantize_tree, leaves_with_paths, plan, quantize_tree


# Largest relative change ``‖y_folded − y‖ / ‖y‖`` (float32) of a block's outputs on its
# calibration inputs that a scale fold may cause; rounding alone stays near 1e-7.


@dataclasses.dataclass(frozen=True, kw_only=True)
class PTQConfig:
  """How calibration runs (``quantize_model`` and the block-wise pipeline; the algorithms'
  options are in the rules: ``Rule.options``, see :class:`jq.spec.GPTQOptions`, ``AWQOptions``,
  ``SmoothQuantOptions``).

  Attributes:
    sequential: calibrate block ``i`` on the outputs of the quantized blocks ``< i``.
    chunk: calibration sequences per forward (memory vs. speed; the CLI's batch size).
    sample_tokens: tokens kept per linear for AWQ's searches.
    mesh: data-parallel calibration (``quantize_model``): a ``jax.sharding.Mesh`` of this
      process's devices (or of every process's: see below), e.g.
      ``jax.make_mesh((8,), ("data",))``.  Every calibration batch is split along its leading
      axis over the mesh's data axis (each device runs its rows; the leading axis of every batch
      must divide by the number of devices there, else a ValueError names the batch).
      Parameters the caller split over the mesh's devices (NamedShardings,
      e.g. from ``with_partitioning`` specs) stay split as given: never replicated, the finished
      kernels that replace them and the quantized kernels they become split the same way
      (``jq.sharding.qarray_sharding``); every other parameter is replicated.  A mesh of
      ``Explicit`` axes (``jax.make_mesh``'s default) is used through its ``Auto`` twin, which is
      also the mesh of the split results.  The GPTQ/AWQ solves are spread over the devices
      (``jq.ptq.solves``: a wide kernel cut into column blocks), each holding its kernel
      matrix and ``K × K`` Hessian on one device, except the GPTQ kernels of
      ``split_factor_from`` input channels or more.  XLA all-reduces the statistics, which
      reach the host once per model call.  Against one device: counts, min/max and the token
      samples are the same bits, and so are RTN weights; ``XᵀX`` and ``Σ|x|`` are float32 sums in
      another order, and the activations themselves may differ in their last bits (XLA compiles
      other per-device shapes), so static activation scales and GPTQ's rounding may move.
      Measured with 8 CPU devices on a tiny 2-block decoder (tests/distributed): ``XᵀX`` within
      1e-7 of its largest entry; ``w8a8-static``: weight codes and scales identical, activation
      scales within 1.2e-6 (relative); ``gptq-w4a16-g32``: codes identical, scales within 2e-6
      (another tiny decoder, SmoothQuant W8A8: 0.02 % of the codes off by one).  The tests allow
      at most 1 % of the codes off by one step and scales within 1e-5.  Several processes
      (``distributed``) without a mesh give the one-process tree bit for bit in the tests: each
      batch's statistics are the same float32 values, summed in float64 on the host.  The mesh
      may also hold the devices of every process (``jax.distributed``; the processes on
      disjoint, equal slices of the data axis, each passing its own batches from
      ``jq.distributed.process_batches``, as many and as shaped as the others'): each global
      batch joins the processes' batches, XLA all-reduces the statistics across them, and every
      process gets the same host sums (``jq.calibrate.collect``); the solves are shared as
      without a mesh, each process's over its own devices.  Parameters are replicated there
      (split ones, and ``split_params``, are refused).  Tested with 2 processes of 2 CPU
      devices: GPTQ, AWQ and SmoothQuant W8A8 static codes identical to one process, scales
      within 2e-6.
    split_params: with a mesh, split every parameter not already split over it along its last
      axis over the data axis, where the length divides (others replicated;
      ``jq.sharding.split_last_axis``), then keep them split as above: no device holds the
      whole model (XLA gathers each weight where a calibration forward uses it, as in FSDP).
      NumPy parameters go straight into their shards.  The CLI's ``--devices N`` sets it.
    split_factor_from: GPTQ kernels with at least this many input channels ``K`` are solved on
      all of this process's mesh devices together, one at a time: the Hessian, its factor and
      the kernel's output channels split over them (``jq.algorithms.factor_split``), so no
      device holds a ``K × K`` matrix whole (Llama-3.1-405B's ``down_proj``: K = 53248, 11.3 GB
      per float32 copy).  The same codes as one device up to float32 rounding order.  None
      (default): where one device's solve (3 float32 ``K × K`` matrices) would take more than
      half of a device's memory, as the devices report it (GPUs, TPUs; CPU devices report no
      limit, so never on CPU).  Needs a mesh of at least 2 devices in this process.
    data_axis: the mesh axis the batches are split over (default: the mesh's only axis, or its
      ``"data"`` axis); other axes hold copies.
    distributed: sum the statistics over the processes of ``jax.distributed`` (each holding its
      own share of the batches, :func:`jq.distributed.process_batches`) and split the GPTQ/AWQ
      solves between them (each kernel solved in one process, the result shared), so that every
      process holds the same quantized tree; None: when ``jax.process_count() > 1``.  The processes
      first check that they run the same calibration (a ValueError in each otherwise); see
      :mod:`jq.distributed`.
  """
  sequential: bool = True
  chunk: int = 8
  sample_tokens: int = 512
  mesh: Any = None
  data_axis: str | None = None
  distributed: bool | None = None
  split_params: bool = False
  split_factor_from: int | None = None

  def __post_init__(self):
    if not isinstance(self.sequential, bool):
      raise ValueError(f"PTQConfig.sequential={self.sequential!r} must be a bool")
    for k in ("chunk", "sample_tokens"):
      v = getattr(self, k)
      if not (isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1):
        raise ValueError(f"PTQConfig.{k}={v!r} must be an int >= 1")
    if self.mesh is not None and not isinstance(self.mesh, jax.sharding.Mesh):
      raise ValueError(f"PTQConfig.mesh={self.mesh!r} must be a jax.sharding.Mesh (e.g. "
                       "jax.make_mesh((8,), ('data',))) or None")
    if self.data_axis is not None:
      if not isinstance(self.data_axis, str):
        raise ValueError(f"PTQConfig.data_axis={self.data_axis!r} must be a mesh axis name")
      if self.mesh is None:
        raise ValueError(f"PTQConfig.data_axis={self.data_axis!r} is set but mesh is None")
      if self.data_axis not in self.mesh.axis_names:
        raise ValueError(f"PTQConfig.data_axis={self.data_axis!r} is not an axis of the mesh "
                         f"{tuple(self.mesh.axis_names)}")
    if self.mesh is not None and self.data_axis is None and len(self.mesh.axis_names) > 1 \
        and "data" not in self.mesh.axis_names:
      raise ValueError(f"PTQConfig.mesh has axes {tuple(self.mesh.axis_names)}; set data_axis "
                       "to the one the batches are split over")
    if not isinstance(self.split_params, bool):
      raise ValueError(f"PTQConfig.split_params={self.split_params!r} must be a bool")
    if self.split_params and self.mesh is None:
      raise ValueError("PTQConfig.split_params=True splits parameters over a mesh; mesh is None")
    v = self.split_factor_from
    if v is not None and not (isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                              and v >= 1):
      raise ValueError(f"PTQConfig.split_factor_from={v!r} must be an int >= 1 (input channels) "
                       "or None")
    if self.distributed is not None and not isinstance(self.distributed, bool):
      raise ValueError(f"PTQConfig.distributed={self.distributed!r} must be a bool or None")

  def split(self, tree):
    """``tree`` split over the mesh as ``split_params`` asks (``tree`` itself otherwise)."""
    if not self.split_params:
      return tree
    from jq.calibrate.collect import data_sharding  # pylint: disable=import-outside-toplevel
    from jq.sharding import split_last_axis  # pylint: disable=import-outside-toplevel
    batch, _, _ = data_sharding(self.mesh, self.data_axis)
    return split_last_axis(tree, batch.mesh, batch.spec[0])


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

  def __init__(self, blocks: BlockwiseModel, sample_per_chunk: int):
    self.blocks = blocks
    self.obs = minmax(per_channel=True)
    self.sample_per_chunk = sample_per_chunk
    self._step = jax.jit(self._step_impl)
    self._fwd = jax.jit(blocks.apply_block)

  def _step_impl(self, bp, x, state, first_token_weight):
    _, found = capture_inputs(self.blocks.apply_block, bp, x)
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
      if inp.ndim >= 3:
        tw = tw.at[:, 0].set(first_token_weight)
      new[path] = (update_stats(st, flat, tw.reshape(-1)), self.obs.update(mm, flat), flat[idx])
    return new

  def run(self, bp, xs: Sequence[jax.Array], first_token_weight: float):
    state, samples = None, {}
    w = jnp.asarray(first_token_weight, jnp.float32)
    for x in xs:
      out = self._step(bp, x, state, w)
      state = {p: (st, mm) for p, (st, mm, _) in out.items()}
      for p, (_, _, smp) in out.items():
        samples.setdefault(p, []).append(smp)
    return ({p: v[0] for p, v in state.items()}, {p: v[1] for p, v in state.items()},
            {p: jnp.concatenate(v) for p, v in samples.items()})

  def forward(self, bp, xs):
    return [self._fwd(bp, x) for x in xs]

  def exact_forward(self, bp, xs):
    """Float32 outputs with float32 matmuls (no TF32/bf16 passes), for the fold check."""
    with jax.default_matmul_precision("highest"):
      return [self._fwd(bp, x).astype(jnp.float32) for x in xs]


def _group_algorithm(rules: Sequence[Rule | None]) -> Algorithm | None:
  algos = {r.algorithm if (r is not None and r.weight is not None) else None for r in rules}
  if len(algos) == 1 and next(iter(algos)) in (Algorithm.AWQ, Algorithm.SMOOTHQUANT):
    return next(iter(algos))
  return None


def _group_label(prefix: str, g: ScaleGroup) -> str:
  return f"{prefix}{'+'.join(c.split('/')[-2] if '/' in c else c for c in g.consumers)}"


def _group_options(prefix: str, g: ScaleGroup, rules: Sequence[Rule], algo: Algorithm):
  """The algorithm options the consumers of ``g`` share (one ``s`` per group)."""
  opts = {prefix + c: r.algorithm_options for c, r in zip(g.consumers, rules)}
  if len(set(opts.values())) > 1:
    listed = "; ".join(f"{p}: {o}" for p, o in opts.items())
    raise ValueError(f"{_group_label(prefix, g)}: these linears share one input (one set of "
                     f"{algo.value} scales folds into {prefix}{g.prev}), but their rules give "
                     f"different options ({listed}); give them the same options in --rules")
  return next(iter(opts.values()))


def _block_first_token_weight(decided: dict[str, Rule | None], prefix: str) -> float:
  """The GPTQ rules' ``first_token_weight`` in one block (1.0 without GPTQ: then only GPTQ's
  Hessian would see it).  The block's inputs are captured once, so its GPTQ rules must agree."""
  by: dict[float, list[str]] = {}
  for path, rule in decided.items():
    if path.startswith(prefix) and rule is not None and rule.weight is not None and \
        rule.algorithm is Algorithm.GPTQ:
      by.setdefault(float(rule.algorithm_options.first_token_weight), []).append(path)
  if len(by) > 1:
    listed = "; ".join(f"{w:g} for {paths}" for w, paths in sorted(by.items()))
    raise ValueError(f"{prefix}: the GPTQ rules of this block give different "
                     f"first_token_weight options ({listed}); the block's inputs are captured "
                     "once per block, so give every GPTQ rule of a block the same "
                     "first_token_weight")
  return next(iter(by)) if by else 1.0


def _has_path(tree: dict[str, Any], path: str) -> bool:
  node = tree
  for k in path.split("/"):
    if not isinstance(node, dict) or k not in node:
      return False
    node = node[k]
  return True


def _fold_producer(bp: dict[str, Any], g: ScaleGroup, s: jax.Array, prefix: str
                   ) -> tuple[dict[str, Any], list[str]]:
  """``bp`` with ``x → x / s`` folded into the producer of the group's input: a norm's scale and
  its ``bias`` sibling, or a linear's output columns (kernel) and its ``bias``.  Returns the new
  block and the paths changed."""
  if g.prev_kind == "norm":
    fold = fold_scale_into_norm
  elif g.prev_kind == "linear":
    fold = fold_scale_into_linear
  else:
    raise ValueError(f"{prefix}{g.prev}: ScaleGroup.prev_kind={g.prev_kind!r}; use 'norm' or "
                     "'linear'")
  parent = g.prev.rpartition("/")[0]
  bias = f"{parent}/bias" if parent else "bias"
  paths = [g.prev] + ([bias] if bias != g.prev and _has_path(bp, bias) else [])
  for path in paths:
    bp = set_path(bp, path, fold(get_path(bp, path), s, name=prefix + path))
  return bp, paths


def quantize_blockwise(params: dict[str, Any], blocks: BlockwiseModel, rules: Sequence[Rule],
                       calib_tokens: np.ndarray, *, config: PTQConfig = PTQConfig(),
                       progress: bool = False) -> PTQResult:
  """Quantizes ``{"params": ...}`` of a block-structured model with calibration (see module doc).

  Args:
    params: the model's variables, ``{"params": {...}}`` (float).
    blocks: the model's :class:`~jq.ptq.blocks.BlockwiseModel` view.
    rules: ordered rules; each rule's ``algorithm`` picks RTN/GPTQ/AWQ/SmoothQuant per layer and
      its ``options`` (``Rule.algorithm_options``) the algorithm's settings.
    calib_tokens: ``(sequences, length)`` int token ids (disjoint from evaluation text).
    config: :class:`PTQConfig`.

  Returns:
    :class:`PTQResult`; its ``log`` names every scale fold that was checked and skipped (the
    folded float block did not compute the same function) and every GPTQ damping fallback.

  Raises:
    ValueError: empty or too small calibration set, NaN activations, a rule asking for a
      calibration algorithm on a leaf outside the blocks, linears of one scale group whose rules
      give different options, or GPTQ rules of one block with different ``first_token_weight``.
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
  cap = _Capture(blocks, max(1, config.sample_tokens // n_chunks))
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
    stats, ranges, samples = cap.run(bp, xs, _block_first_token_weight(decided, prefix))
    for path, st in stats.items():
      n_bad = int(st.nonfinite)
      if n_bad:
        raise ValueError(f"{prefix}{path}: {n_bad} NaN/Inf activation values during calibration")
    scale_of: dict[str, jax.Array] = {}
    plain: set[str] = set()       # linears of a skipped fold: quantized without the algorithm
    fbp = bp
    y_ref = None
    for g in blocks.scale_groups():
      g_rules = [decided.get(prefix + c) for c in g.consumers]
      algo = _group_algorithm(g_rules)
      label = _group_label(prefix, g)
      if algo is None:
        asked = sorted({r.algorithm.value for r in g_rules if r is not None and r.weight is not None
                        and r.algorithm in (Algorithm.AWQ, Algorithm.SMOOTHQUANT)})
        if asked:
          log.append(f"{label}: not smoothed: {'/'.join(asked)} needs every linear of the group "
                     f"({', '.join(prefix + c for c in g.consumers)}) to ask for it (they share "
                     "one input); quantized without it")
        continue
      opts = _group_options(prefix, g, g_rules, algo)
      ws = [get_path(fbp, c) for c in g.consumers]
      spec = g_rules[0].weight
      first = g.consumers[0]
      note = None
      if algo is Algorithm.AWQ:
        s, info = awq_search_scale(samples[first], ws, dataclasses.replace(spec, clip=Clip()),
                                   grid=opts.grid, block_fn=g.block_fn,
                                   act_mean=mean_abs(stats[first], prefix + first),
                                   duo=opts.duo, name=prefix + first)
        note = (f"{label}: awq alpha={float(info.alpha):.2f} loss {float(info.loss):.3e} "
                f"(rtn {float(info.rtn_loss):.3e})")
      else:
        s = smooth_scales(stats[first], ws, opts.alpha, name=prefix + first)
      cand, changed = _fold_producer(fbp, g, s, prefix)
      for c in g.consumers:
        cand = set_path(cand, c, scale_consumer(get_path(cand, c), s, name=prefix + c))
      # Check: the folded float block must compute the same function on the calibration inputs.
      if y_ref is None:
        y_ref = cap.exact_forward(bp, xs)
      err = relative_error(y_ref, cap.exact_forward(cand, xs))
      if not err <= FOLD_TOLERANCE:
        plain.update(g.consumers)
        fallback = "RTN" if algo is Algorithm.AWQ else "plain W8A8 (RTN weights)"
        log.append(f"{label}: {algo.value} fold into {', '.join(prefix + c for c in changed)} "
                   f"SKIPPED: the folded float block's outputs differ from the original's by "
                   f"{err:.2e} (relative, tolerance {FOLD_TOLERANCE:.0e}) on the calibration "
                   f"inputs; {', '.join(prefix + c for c in g.consumers)} quantized with "
                   f"{fallback} instead")
        continue
      if note is not None:
        log.append(note)
      fbp = cand
      for c in g.consumers:
        stats[c] = scale_stats(stats[c], s)
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
      opts = rule.algorithm_options
      if rule.algorithm is Algorithm.GPTQ:
        q, info = gptq_quantize(w, stats[rel], spec, damp=opts.damp, block_size=opts.block_size,
                                act_order=opts.act_order, name=name)
        if int(info.retries) or bool(info.fallback):
          log.append(f"{name}: gptq damping retries={int(info.retries)} "
                     f"fallback={bool(info.fallback)}")
      elif rule.algorithm is Algorithm.AWQ and opts.clip and rel not in plain:
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
