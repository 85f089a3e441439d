"""Quantization-aware training with learned step sizes (LSQ), as pure functions over Flax params.

LSQ (Esser et al., 2019, arXiv:1902.08153) trains each quantizer's step size ``s`` together with the
weights.  A weight ``w`` of a tile with step ``s`` and (asymmetric grids) integer zero point ``z``
is fake-quantized as::

    ŵ = s · (clip(round(w / s) + z, qmin, qmax) − z)

with the straight-through estimator for ``w`` (gradient 1 where ``qmin < w/s + z < qmax``, 0
outside) and LSQ's gradient for the step, scaled by ``g = 1/sqrt(n · qmax)`` (``n`` elements per
tile)::

    ∂ŵ/∂s = round(w/s) − w/s   inside,     qmin − z  or  qmax − z   outside (clipped).

The zero point is learned as a float and used rounded (straight through), with gradient ``−s``
for clipped elements and 0 inside: the offset of LSQ+ (Bhalgat et al., 2020, arXiv:2004.09576) in
code units, so the learned grid is always one a :class:`jq.QArray` stores exactly.

The road:

* :func:`init` (pure) or :func:`init_model` (reads layouts and calibrates static activation
  ranges from a linen/nnx model): a :class:`QATState` whose steps start at
  :func:`jq.compute_params` of the float weights, so step 0 is round-to-nearest exactly, and whose
  static int8 activation steps start at the calibrated PTQ scales.
* :func:`fake_quantized` (weights) and :func:`fake_quant_apply` (weights and the layer inputs of
  int8-activation rules, through the same hooks ``jq.nn`` uses; the model is not edited):
  differentiable with respect to params and state, for any optax loop.
* :func:`finalize`: an ordinary quantized tree (QArray leaves on the learned grids, static
  activation scales attached) for ``jq.io.save`` and ``jq.nn.quantized_apply``; its dequantized
  weights equal the fake-quantized ones bit for bit.
* :func:`distill`: the whole loop, KL to the float model's logits, ending in that checkpoint.

Example:
  >>> state = jq.qat.init_model(model, variables, rules, batches)
  >>> apply = jq.qat.fake_quant_apply(model)
  >>> loss = lambda p, st, x: kl(model.apply(variables, x), apply(p, st, x))
  >>> ...   # optax steps over (params, state); jq.qat.default_optimizer() suits both
  >>> qvars = jq.qat.finalize(params, state)
"""
from __future__ import annotations

import contextvars
import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jq import metrics, numerics
from jq.layout import Layout
from jq.qarray import ActivationQuant, QArray
from jq.quantize import compute_params, quantize_with_params
from jq.spec import ActivationSpec, ActMode, Algorithm, Granularity, QuantSpec, Rule
from jq.tree import (check_rules, leaf_layout, leaves_with_paths, map_with_paths, plan,
                     with_activation)

PyTree = Any
_F32 = jnp.float32


# ---- the LSQ fake quantizer --------------------------------------------------------------------

def _effective_step(step: jax.Array, scale_dtype: str) -> jax.Array:
  """The step the grid uses: stored in ``scale_dtype`` (what a QArray keeps) and kept within the
  scales jq can quantize with (positive; ``1/s`` a normal float32), as float32.  NaN stays NaN."""
  lo, hi = numerics.scale_limits(scale_dtype)
  return jnp.clip(step.astype(scale_dtype), lo, min(hi, 2.0 ** 126)).astype(_F32)


def _effective_zero(zero: jax.Array, qmin: int, qmax: int) -> jax.Array:
  """The integer zero point the grid uses (float32): ``clip(round(zero), qmin, qmax)``."""
  return jnp.clip(numerics.round_half_even(zero.astype(_F32)), qmin, qmax)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _grad_scale(x: jax.Array, g: float) -> jax.Array:
  """Identity whose gradient is multiplied by ``g`` (LSQ's step-size gradient scale)."""
  return x


def _grad_scale_fwd(x, g):
  return x, None


def _grad_scale_bwd(g, _, ct):
  return (ct * g,)


_grad_scale.defvjp(_grad_scale_fwd, _grad_scale_bwd)


def _lsq_fwd(x, step, zero, qmin, qmax, scale_dtype, divide, out_dtype):
  s = _effective_step(step, scale_dtype)
  xf = x.astype(_F32)
  # Weights: ``x * (1/s)`` as jq.quantize computes codes (so step 0 is RTN bit for bit);
  # activations: ``x / s`` as jq.ops.reference.quantize_activations does.
  u = xf / s if divide else xf * (1.0 / s)
  v = numerics.round_half_even(u)
  z = None if zero is None else _effective_zero(zero, qmin, qmax)
  c = jnp.clip(v if z is None else v + z, qmin, qmax)
  d = c if z is None else c - z
  return (d * s).astype(out_dtype), (u, v, d, s, z)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _lsq(x, step, zero, qmin, qmax, scale_dtype, divide, out_dtype):
  """Elementwise LSQ fake quantization (``step``/``zero`` broadcast to ``x``'s shape)."""
  return _lsq_fwd(x, step, zero, qmin, qmax, scale_dtype, divide, out_dtype)[0]


def _lsq_bwd(qmin, qmax, scale_dtype, divide, out_dtype, res, ct):
  u, v, d, s, z = res
  t = u if z is None else u + z           # the unrounded code
  inside = (t > qmin) & (t < qmax)
  ct = ct.astype(_F32)
  dx = jnp.where(inside, ct, 0.0).astype(out_dtype)
  ds = ct * jnp.where(inside, v - u, d)   # d = qmin − z or qmax − z where clipped
  dz = None if z is None else jnp.where(inside, 0.0, -ct * s)
  return dx, ds, dz


_lsq.defvjp(lambda x, step, zero, qmin, qmax, sdt, divide, odt:
            _lsq_fwd(x, step, zero, qmin, qmax, sdt, divide, odt), _lsq_bwd)


def lsq_grad_scale(shape: Sequence[int], tile: Sequence[int], qmax: int) -> float:
  """LSQ's step-size gradient scale ``1 / sqrt(n · qmax)``, ``n`` the elements of one tile."""
  n = int(np.prod([min(t, s) for s, t in zip(shape, tile)], dtype=np.int64))
  return 1.0 / math.sqrt(max(n, 1) * qmax)


def _check_grid(spec: QuantSpec, where: str) -> None:
  if not isinstance(spec, QuantSpec):
    raise ValueError(f"{where}: spec must be a jq.QuantSpec, got {type(spec).__name__}")
  if spec.qtype.symmetric_only:
    kind = "a lookup-table type" if spec.qtype.is_table else "a float8 type"
    raise ValueError(f"{where}: {spec.describe()} is {kind}; LSQ learns the step of "
                     "a uniform integer grid: use int8/int4/int3/int2 (e.g. jq.W4A16_G128 or "
                     "jq.W2A16_G32), or keep this parameter out of QAT")


def fake_quant_lsq(w: jax.Array, step: jax.Array, zero: jax.Array | None, spec: QuantSpec,
                   tile: Sequence[int], *, grad_scale: float | None = None,
                   name: str = "<tensor>") -> jax.Array:
  """``s · (clip(round(w/s) + z, qmin, qmax) − z)`` per tile, with LSQ gradients (module doc).

  The forward pass is exactly ``quantize_with_params(w, s, z, spec).dequantize(w.dtype)``, where
  ``s`` is ``step`` cast to ``spec.scale_dtype`` (and kept positive) and ``z = clip(round(zero))``;
  with ``step, zero = compute_params(w, spec)`` it is ``jq.quantize(w, spec).dequantize()``.

  Args:
    w: a float tensor.
    step: per-tile steps, shape ``numerics.num_tiles(w.shape, tile)``.
    zero: per-tile zero points (float, in code units) for an asymmetric spec; None if symmetric.
    spec: an integer-grid spec (int8/4/3/2, signed symmetric or unsigned asymmetric).
    tile: the tile of one step (``spec.tile(w.shape, layout=...)``).
    grad_scale: the step gradient's scale; None: ``1/sqrt(n · qmax)`` (LSQ).
    name: for errors.

  Raises:
    ValueError: naming ``name``, the shape and dtype: NF4 (a table type), a non-float ``w``, or
      steps / zero points of the wrong shape or presence.
  """
  w = jnp.asarray(w)
  where = f"{name}: shape {tuple(w.shape)} dtype {np.dtype(w.dtype).name}"
  _check_grid(spec, where)
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise ValueError(f"{where}: only floating-point tensors can be fake-quantized")
  tile = tuple(int(t) for t in tile)
  if len(tile) != w.ndim or any(t < 1 for t in tile):
    raise ValueError(f"{where}: tile {tile} must have one positive entry per axis")
  want = numerics.num_tiles(w.shape, tile)
  for label, a in (("step", step), ("zero", zero)):
    if a is not None and tuple(np.shape(a)) != want:
      raise ValueError(f"{where}: {label} has shape {tuple(np.shape(a))}, expected {want} (one "
                       f"per tile {tile})")
  if (zero is None) != spec.symmetric:
    raise ValueError(f"{where}: {spec.describe()} " + (
        "takes no zero point" if spec.symmetric else "needs a zero point (asymmetric grid)"))
  qt = spec.qtype
  g = lsq_grad_scale(w.shape, tile, qt.qmax) if grad_scale is None else float(grad_scale)

  def full(a):
    return jnp.broadcast_to(numerics.expand(_grad_scale(jnp.asarray(a).astype(_F32), g), tile,
                                            w.shape), w.shape)

  return _lsq(w, full(step), None if zero is None else full(zero), qt.qmin, qt.qmax,
              spec.scale_dtype, False, np.dtype(w.dtype).name)


def fake_quant_activation(x: jax.Array, act: ActivationSpec, *, step: jax.Array | None = None,
                          zero: jax.Array | None = None,
                          contracting: Sequence[int] | None = None) -> jax.Array:
  """A layer input ``x`` fake-quantized to int8 as the quantized layer will quantize it.

  Static (``act.mode`` STATIC): one learned per-tensor ``step`` (and ``zero`` if asymmetric), LSQ
  gradients with ``g = 1/sqrt(K · qmax)``, ``K`` the features per token (elements of the
  ``contracting`` axes; default: all but the leading axis).  Dynamic: per-token scales
  (``jq.ops.reference.fake_quant_activations`` over ``contracting``), nothing learned, gradient
  straight through.
  """
  from jq.ops import reference  # pylint: disable=import-outside-toplevel
  x = jnp.asarray(x)
  axes = tuple(range(1, x.ndim)) if contracting is None else tuple(
      int(a) % x.ndim for a in contracting)
  if act.mode is ActMode.DYNAMIC:
    y = reference.fake_quant_activations(x, axes or tuple(range(x.ndim)),
                                         ActivationQuant(scale=None, zero_point=None, spec=act))
    return x + jax.lax.stop_gradient(y - x)
  if act.qtype.is_float:
    raise ValueError(f"static {act.describe()} activations: LSQ learns the step of an integer "
                     "grid; use int8 activations (jq.A8_STATIC) or dynamic fp8 for QAT")
  if step is None or (zero is None) != act.symmetric:
    raise ValueError(f"static {act.describe()} activations need a learned step"
                     + ("" if act.symmetric else " and zero point"))
  qt = act.qtype
  k = int(np.prod([x.shape[a] for a in axes], dtype=np.int64)) if axes else 1
  g = 1.0 / math.sqrt(max(k, 1) * qt.qmax)

  def full(a):
    return jnp.broadcast_to(_grad_scale(jnp.asarray(a).astype(_F32), g), x.shape)

  return _lsq(x, full(step), None if zero is None else full(zero), qt.qmin, qt.qmax, "float32",
              True, np.dtype(x.dtype).name)


# ---- state -------------------------------------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerState:
  """The learned quantizers of one kernel and (int8-activation rules) of its layer's input.

  Attributes:
    step: per-tile weight steps (float32), shape ``num_tiles(kernel shape, tile)``.
    zero: per-tile zero points (float32, code units) for asymmetric specs, else None.
    act_step: the static int8 input step (float32 scalar), else None.
    act_zero: its zero point (float32) for asymmetric static activations, else None.
    spec, tile, layout: the weight's grid (static).
    activation: the rule's activation spec (static; None for weight-only).
  """
  step: jax.Array
  zero: jax.Array | None
  act_step: jax.Array | None
  act_zero: jax.Array | None
  spec: QuantSpec = dataclasses.field(metadata=dict(static=True))
  tile: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  layout: Layout | None = dataclasses.field(metadata=dict(static=True))
  activation: ActivationSpec | None = dataclasses.field(metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QATState:
  """``layers``: ``{kernel path: LayerState}`` (paths as ``jq.tree.leaves_with_paths`` gives).

  A pytree whose leaves are the learned arrays; specs, tiles and layouts are static, so it can be
  a ``jit`` argument and an optax parameter tree.
  """
  layers: dict[str, LayerState]

  def describe(self) -> str:
    n_act = sum(1 for lq in self.layers.values() if lq.activation is not None)
    specs = sorted({lq.spec.describe() for lq in self.layers.values()})
    return (f"{len(self.layers)} kernel(s) ({', '.join(specs)}), {n_act} with int8 activations")


def _where(path: str, leaf) -> str:
  return (f"{path}: shape {tuple(getattr(leaf, 'shape', ()))} dtype "
          f"{getattr(leaf, 'dtype', type(leaf).__name__)}")


def _check_layer(path: str, leaf, rule: Rule, layouts) -> Layout | None:
  """The static checks of one kernel QAT will learn; returns its layout."""
  where = _where(path, leaf)
  if isinstance(leaf, QArray):
    raise ValueError(f"{path}: already quantized ({leaf.qtype.value}); QAT starts from the float "
                     "parameters")
  dt = getattr(leaf, "dtype", None)
  if dt is None or not jnp.issubdtype(dt, jnp.floating):
    raise ValueError(f"{where}: only floating-point tensors can be quantized; skip this "
                     f"parameter with Rule(pattern={path!r}, weight=None) before rule "
                     f"{rule.pattern!r}")
  spec = rule.weight
  _check_grid(spec, f"{where}: rule {rule.pattern!r}")
  if rule.algorithm is not Algorithm.RTN:
    raise ValueError(f"{where}: rule {rule.pattern!r} asks for {rule.algorithm.value}; QAT starts "
                     "from round-to-nearest and learns the grid itself: use algorithm=RTN")
  if leaf.ndim < 2 and spec.granularity is not Granularity.TENSOR:
    raise ValueError(f"{where}: per-channel/group quantization of a rank-{leaf.ndim} tensor; skip "
                     "it with a rule (weight=None) or use Granularity.TENSOR")
  return leaf_layout(path, leaf, layouts)


def _act_init(path: str, leaf, rule: Rule, act_range) -> tuple[jax.Array | None, jax.Array | None]:
  """The initial static int8 input step (and zero point) of a layer: the PTQ scale of its range."""
  act, where = rule.activation, _where(path, leaf)
  if act is not None and act.mode is ActMode.STATIC:
    if act_range is None:
      raise ValueError(f"{where}: rule {rule.pattern!r} asks for static int8 activations; pass "
                       "this layer's input range in act_ranges= (jq.qat.init_model calibrates it)")
    from jq.calibrate.observers import act_params  # pylint: disable=import-outside-toplevel
    lo, hi = (np.asarray(a, np.float32) for a in act_range)
    if lo.ndim or hi.ndim:
      raise ValueError(f"{where}: a per-layer activation range of shape {lo.shape}: static int8 "
                       "activation QAT of stacked layers (nn.scan / nnx.scan) is not supported; "
                       "use dynamic int8 activations (jq.A8_DYNAMIC) for them")
    s, z = act_params(lo, hi, act)
    return s.astype(_F32), None if z is None else z.astype(_F32)
  return None, None


def _nonfinite(arrays: Mapping[str, Any]) -> list[str]:
  """Keys of the (float) arrays holding NaN/Inf, in one compiled reduction (none under a trace:
  like jq's value checks, these run on concrete arrays)."""
  if not all(numerics.is_concrete(x) for x in arrays.values()):
    return []
  ok = _finite_flags(dict(arrays))
  return [k for k in sorted(ok) if not bool(ok[k])]


@jax.jit
def _finite_flags(xs: dict) -> dict:
  return {k: jnp.all(jnp.isfinite(x)) for k, x in xs.items()}


def init(params: PyTree, rules: Sequence[Rule], *, layouts: Mapping[str, Layout] | None = None,
         act_ranges: Mapping[str, tuple[Any, Any]] | None = None) -> QATState:
  """The initial :class:`QATState` of ``params`` under ``rules`` (first match wins).

  Weight steps (and zero points) are :func:`jq.compute_params` of the float weights, so step 0 is
  round-to-nearest exactly; static int8 activation steps are the PTQ scales of the calibrated
  input ranges (``jq.calibrate.observers.act_params``).

  Args:
    params: a pytree of float arrays (linen variables, or an nnx ``Param`` state).
    rules: ordered rules with integer-grid weight specs and RTN (QAT learns the grid itself).
    layouts: ``{kernel path: Layout}`` from the model (``jq.nn.layouts``); without it a 2-D
      kernel is read as Dense ``(in, out)``.
    act_ranges: ``{kernel path: (lo, hi)}`` per-tensor input ranges for rules with static int8
      activations (``jq.calibrate.collect.input_ranges``; :func:`init_model` does it).

  Raises:
    ValueError: naming the path, shape and dtype: a required rule that matches nothing, NaN/Inf
      weights, a non-float or already quantized leaf, NF4 or a non-RTN algorithm, a missing
      layout or activation range, or rules that quantize nothing.
  """
  rules = check_rules(rules)
  leaves = dict(leaves_with_paths(params))
  ranges = dict(act_ranges or {})
  chosen = {p.path: p.rule for p in plan(params, rules) if p.quantized}
  if not chosen:
    raise ValueError(f"the rules quantize no parameter of the {len(leaves)} in the tree; paths "
                     f"look like: {', '.join(list(leaves)[:6])}")
  lays = {p: _check_layer(p, leaves[p], r, layouts) for p, r in chosen.items()}
  extra = sorted(p for p in ranges if p not in chosen or chosen[p].activation is None
                 or chosen[p].activation.mode is not ActMode.STATIC)
  if extra:
    raise ValueError(f"act_ranges has an entry for {extra[0]}, which no rule quantizes with "
                     "static int8 activations")
  acts = {p: _act_init(p, leaves[p], r, ranges.get(p)) for p, r in chosen.items()}

  def grids(ws):
    return {p: compute_params(w, chosen[p].weight, name=p, layout=lays[p]) for p, w in ws.items()}

  ws = {p: jnp.asarray(leaves[p]) for p in chosen}
  for p in _nonfinite(ws):   # the eager check names the path, count and first index
    compute_params(ws[p], chosen[p].weight, name=p, layout=lays[p])
  # One compiled computation for the tree (eager ops compile once per op and shape).
  out = jax.jit(grids)(ws)
  layers = {}
  for p, r in chosen.items():
    step, zero = out[p]
    leaf = leaves[p]
    layers[p] = LayerState(
        step=step.astype(_F32), zero=None if zero is None else zero.astype(_F32),
        act_step=acts[p][0], act_zero=acts[p][1], spec=r.weight,
        tile=tuple(r.weight.tile(leaf.shape, layout=lays[p], name=p, dtype=leaf.dtype)),
        layout=lays[p], activation=r.activation)
  return QATState(layers=layers)


def _check_state(state) -> None:
  if not isinstance(state, QATState):
    raise ValueError(f"expected a jq.qat.QATState (from jq.qat.init), got {type(state).__name__}")


def fake_quantized(params: PyTree, state: QATState) -> PyTree:
  """``params`` with every kernel of ``state`` fake-quantized on its learned grid.

  Differentiable with respect to both ``params`` (straight through) and ``state`` (LSQ); pure and
  jittable.  Layer inputs are not touched: :func:`fake_quant_apply` runs the model with them.

  Raises:
    ValueError: naming the path: a kernel of ``state`` missing from ``params`` or of another
      shape, or a QArray leaf.
  """
  _check_state(state)
  seen = set()

  def one(path, leaf):
    lq = state.layers.get(path)
    if lq is None:
      return leaf
    if isinstance(leaf, QArray):
      raise ValueError(f"{path}: a QArray; fake_quantized takes the float parameters")
    seen.add(path)
    return fake_quant_lsq(leaf, lq.step, lq.zero, lq.spec, lq.tile, name=path)

  out = map_with_paths(one, params)
  missing = sorted(set(state.layers) - seen)
  if missing:
    raise ValueError(f"{missing[0]}: the QAT state has a step for this kernel, but the params do "
                     f"not hold it ({len(missing)} missing); pass the tree the state was made from")
  return out


def finalize(params: PyTree, state: QATState) -> PyTree:
  """The quantized tree: each kernel of ``state`` a :class:`jq.QArray` on its learned grid
  (``jq.quantize_with_params``), static activation scales attached (``jq.tree.with_activation``).

  An ordinary jq checkpoint: ``jq.io.save``/``load``, ``jq.nn.quantized_apply`` and
  ``jq.nn.quantize_module`` take it as is.  Invariant: ``dequantize(finalize(p, st)[k]) ==
  fake_quantized(p, st)[k]`` exactly.

  Raises:
    ValueError: naming the path: NaN/Inf weights or steps (never a NaN checkpoint), or a kernel
      of ``state`` missing from ``params``.
  """
  _check_state(state)
  leaves = dict(leaves_with_paths(params))
  missing = sorted(p for p in state.layers if p not in leaves)
  if missing:
    raise ValueError(f"{missing[0]}: the QAT state has a step for this kernel, but the params do "
                     "not hold it")
  for p in state.layers:
    if isinstance(leaves[p], QArray) or not jnp.issubdtype(
        getattr(leaves[p], "dtype", np.dtype(object)), jnp.floating):
      raise ValueError(f"{_where(p, leaves[p])}: finalize takes the float parameters")

  def one(path, leaf, lq):
    spec, qt = lq.spec, lq.spec.qtype
    step = _effective_step(lq.step, spec.scale_dtype)
    zero = None if lq.zero is None else _effective_zero(lq.zero, qt.qmin, qt.qmax)
    q = quantize_with_params(leaf, step, zero, spec, name=path, layout=lq.layout)
    if tuple(q.tile) != tuple(lq.tile):
      raise ValueError(f"{_where(path, leaf)}: the layout gives tile {q.tile}, but the state was "
                       f"made with tile {lq.tile}")
    act = None
    if lq.act_step is not None:
      aq = lq.activation.qtype
      act = (_effective_step(lq.act_step, "float32"), None if lq.act_zero is None else
             _effective_zero(lq.act_zero, aq.qmin, aq.qmax).astype(aq.unpacked_dtype))
    return with_activation(q, lq.activation, act, path=path, leaf=leaf)

  ws = {p: jnp.asarray(leaves[p]) for p in state.layers}
  learned = {f"{p}#{k}": v for p, lq in state.layers.items() for k, v in vars(lq).items()
             if isinstance(v, (jax.Array, np.ndarray))}
  bad = _nonfinite({**ws, **learned})
  if bad:
    p, _, k = bad[0].partition("#")
    what = f"its learned {k}" if k else "its values"
    raise ValueError(f"{_where(p, leaves[p])}: {what} hold NaN/Inf; refusing to write a non-finite "
                     "checkpoint")
  qs = jax.jit(lambda ws, st: {p: one(p, w, st.layers[p]) for p, w in ws.items()})(ws, state)
  return map_with_paths(lambda p, x: qs.get(p, x), params)


# ---- running a model with fake-quantized layer inputs -----------------------------------------

_ACTIVE: contextvars.ContextVar[Mapping[str, LayerState] | None] = contextvars.ContextVar(
    "jq_qat_layers", default=None)


def _input(path: str, x, x_axes) -> Any:
  """``x`` fake-quantized as the layer at kernel ``path`` will quantize it (or unchanged)."""
  layers = _ACTIVE.get()
  lq = None if layers is None else layers.get(path)
  if lq is None or lq.activation is None or not hasattr(x, "dtype"):
    return x
  return fake_quant_activation(x, lq.activation, step=lq.act_step, zero=lq.act_zero,
                               contracting=x_axes)


def _linen_interceptor(next_fun, args, kwargs, context):
  from jq.nn import linen as jlinen  # pylint: disable=import-outside-toplevel
  mod = context.module
  kind = jlinen._kind(mod, next_fun, context.method_name)  # pylint: disable=protected-access
  if (kind is None or not kind.observed or not args
      or jlinen._kernel(mod, kind.param) is None):  # pylint: disable=protected-access
    return next_fun(*args, **kwargs)
  path = jlinen._path(mod, kind.param)  # pylint: disable=protected-access
  return next_fun(_input(path, args[0], kind.x_axes(mod, args, kwargs)), *args[1:], **kwargs)


@functools.lru_cache(maxsize=None)
def _qat_class(cls: type) -> type:
  """``cls`` (an nnx layer class jq runs) with its base ``__call__`` fake-quantizing the input:
  a class inserted between a user's subclass and the nnx base, as ``jq.nn.quantize_module``
  does."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from jq.nn import common  # pylint: disable=import-outside-toplevel
  base = next(b for b in (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv)
              if issubclass(cls, b))

  def x_axes(self, inputs, args, kwargs):
    if base is nnx.Linear:
      return (-1,)
    if base is nnx.LinearGeneral:
      return None if self.batch_axis else tuple(self.axis)
    if base is nnx.Einsum:
      eq = (args[0] if args else kwargs.get("einsum_str")) or self.einsum_str
      return common.einsum_x_axes(eq.replace(" ", ""), inputs.ndim, len(self.kernel_shape),
                                  path=self.jq_qat_path)
    return None

  def __call__(self, inputs, *args, **kwargs):  # pylint: disable=invalid-name
    inputs = _input(self.jq_qat_path, inputs, x_axes(self, inputs, args, kwargs))
    return base.__call__(self, inputs, *args, **kwargs)

  mid = type(f"QAT{base.__name__}", (base,), {"__call__": __call__, "__module__": __name__})
  if cls is base:
    return mid
  return type(cls.__name__, (cls, mid), {"__module__": cls.__module__})


def _nnx_apply(module) -> Callable[..., Any]:
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from jq.nn import nnx as jnnx  # pylint: disable=import-outside-toplevel
  clone = nnx.clone(module)
  for m in jnnx.module_layers(clone):
    if m.layout is not None and not isinstance(m.layer, nnx.Embed):   # (ids: no fake quant)
      m.layer.__class__ = _qat_class(type(m.layer))
      m.layer.jq_qat_path = m.path
  graphdef, _, rest = nnx.split(clone, nnx.Param, ...)

  def apply(params, state, *args, **kwargs):
    fq = fake_quantized(params, state)
    token = _ACTIVE.set(state.layers)
    try:
      return nnx.merge(graphdef, fq, rest)(*args, **kwargs)
    finally:
      _ACTIVE.reset(token)

  return apply


def fake_quant_apply(model) -> Callable[..., Any]:
  """``apply(params, state, *args, **kwargs)``: the unchanged model on fake-quantized kernels,
  with the inputs of int8-activation layers fake-quantized too (static: the learned step; dynamic:
  per-token scales); differentiable with respect to ``params`` and ``state``.

  Args:
    model: a linen module (or its ``apply``): ``params`` are its variables, and inputs are
      intercepted with ``flax.linen.intercept_methods`` (the hook ``jq.nn.quantized_apply``
      uses); or an nnx module: ``params`` is ``nnx.state(module, nnx.Param)`` (or a trained copy),
      its other state is read from ``module`` as it is now (not updated).

  Example:
    >>> apply = jax.jit(jq.qat.fake_quant_apply(model))
    >>> logits = apply(variables, state, tokens)
  """
  from flax import nnx  # pylint: disable=import-outside-toplevel
  if isinstance(model, nnx.Module):
    return _nnx_apply(model)
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from jq.nn import linen as jlinen  # pylint: disable=import-outside-toplevel
  fn = jlinen._apply_fn(model)  # pylint: disable=protected-access

  def apply(variables, state, *args, **kwargs):
    fq = fake_quantized(variables, state)
    if all(lq.activation is None for lq in state.layers.values()):
      return fn(fq, *args, **kwargs)
    token = _ACTIVE.set(state.layers)
    try:
      with nn.intercept_methods(_linen_interceptor):
        return fn(fq, *args, **kwargs)
    finally:
      _ACTIVE.reset(token)

  return apply


# ---- model-aware init -------------------------------------------------------------------------

def _target(model, variables, batches: list, example_kwargs: dict):
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from jq.ptq.targets import linen_target, nnx_target  # pylint: disable=import-outside-toplevel
  if isinstance(model, nnx.Module):
    if variables is not None:
      raise ValueError("an nnx module holds its parameters: pass variables=None")
    if example_kwargs:
      raise ValueError(f"an nnx module takes no extra call arguments here, got "
                       f"{sorted(example_kwargs)}")
    return nnx_target(model)
  if variables is None:
    raise ValueError("a linen model needs its float variables")
  if not batches:
    raise ValueError("a linen model needs a batch (its first is the example input the layouts "
                     "are read from)")
  return linen_target(model, variables, batches[0], example_kwargs)


def _model_state(target, rules: Sequence[Rule], batches: list) -> tuple[QATState, list[str]]:
  from jq.calibrate.collect import input_ranges  # pylint: disable=import-outside-toplevel
  from jq.nn.quantize import runnable_rules  # pylint: disable=import-outside-toplevel
  rules, kept = runnable_rules(target.params, check_rules(rules), target.layouts,
                               target.reasons, target.stacks)
  log = [f"qat: {p} stays float: {why}" for p, why in kept.items()]
  static = [p.path for p in plan(target.params, rules) if p.quantized and p.rule.activation
            is not None and p.rule.activation.mode is ActMode.STATIC]
  stacked = [p for p in static if p in target.stacks]
  if stacked:
    raise ValueError(f"{stacked[0]}: stacked layers ({target.stacks[stacked[0]]}, nn.scan / "
                     "nnx.scan): static int8 activation QAT of stacked layers is not supported; "
                     "use dynamic int8 activations (jq.A8_DYNAMIC) for them")
  ranges = {}
  if static:
    if not batches:
      raise ValueError(f"{static[0]}: static int8 activations need calibration batches")
    ranges = input_ranges(target.run, batches, paths=static, operands=target.params)
  return init(target.params, rules, layouts=target.layouts, act_ranges=ranges), log


def init_model(model, variables, rules: Sequence[Rule], batches: Iterable[Any] | None = None,
               **example_kwargs) -> QATState:
  """:func:`init` with each kernel's layout read from the model and static int8 activation
  ranges calibrated on ``batches`` (through ``jq.calibrate``, the model unchanged).

  Kernels a rule would quantize but whose layer jq cannot run quantized stay float (a warning
  names them), as in ``jq.nn.quantize_variables``.

  Args:
    model: a linen module (with ``variables``) or an nnx module (``variables=None``).
    variables: the linen model's float variables; None for nnx.
    rules: ordered rules (integer grids, RTN).
    batches: model inputs (arrays or argument tuples); linen reads the layouts from the first;
      static activation ranges are calibrated on all.
    **example_kwargs: extra keyword arguments of the linen model call.
  """
  batches = [] if batches is None else list(batches)
  return _model_state(_target(model, variables, batches, example_kwargs), rules, batches)[0]


# ---- distillation -----------------------------------------------------------------------------

def _field(keypath) -> str:
  """The :class:`LayerState` field a leaf's key path ends in ("" for other leaves)."""
  last = keypath[-1] if keypath else None
  if isinstance(last, jax.tree_util.GetAttrKey) and last.name in (
      "step", "zero", "act_step", "act_zero"):
    return last.name
  return ""


def _rms(x: jax.Array, floor: float) -> jax.Array:
  return jnp.maximum(jnp.sqrt(jnp.mean(jnp.square(x.astype(_F32)))), floor)


def default_optimizer(learning_rate: float = 5e-3, *, step_learning_rate: float = 5e-3,
                      zero_learning_rate: float = 0.02, float_learning_rate: float = 1e-3,
                      min_scale: float = 1e-6):
  """Adam for QAT, with every update measured in the units it matters in.

  Over any tree that holds a :class:`QATState` beside the params (``(params, state)``, or
  ``distill``'s ``{"params": ..., "state": ...}``), Adam's direction is scaled per array by:

  * a quantized kernel: ``learning_rate`` times the RMS of its learned step, i.e. a fraction of
    a grid step (the kernel is found by its '/'-path ending in a key of ``state.layers``), so
    int8 and int2 kernels of any scale move alike;
  * a step (weights or activations): ``step_learning_rate`` times its own RMS (relative);
  * a zero point (code units): ``zero_learning_rate``;
  * any other float leaf: ``float_learning_rate`` times its own RMS.

  Adam normalizes gradient scales away (LSQ's ``g`` included).  ``update`` needs the params.

  Example:
    >>> opt = jq.qat.default_optimizer()
    >>> opt_state = opt.init((params, state))
    >>> updates, opt_state = opt.update(grads, opt_state, (params, state))
  """
  import optax  # pylint: disable=import-outside-toplevel
  from jq.tree import path_str  # pylint: disable=import-outside-toplevel

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("jq.qat.default_optimizer: update needs the params (its steps are "
                       "relative to them)")
    grids = {p: _rms(lq.step, min_scale)
             for st in jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, QATState))
             if isinstance(st, QATState) for p, lq in st.layers.items()}

    def one(kp, u, p):
      field = _field(kp)
      if field in ("zero", "act_zero"):
        scale = zero_learning_rate
      elif field:
        scale = step_learning_rate * _rms(p, min_scale)
      else:
        parts = path_str(kp).split("/")
        grid = next((grids[k] for k in ("/".join(parts[i:]) for i in range(len(parts)))
                     if k in grids), None)
        scale = (float_learning_rate * _rms(p, min_scale) if grid is None
                 else learning_rate * grid)
      return (-scale * u).astype(u.dtype)

    return jax.tree_util.tree_map_with_path(one, updates, params), state

  return optax.chain(optax.scale_by_adam(),
                     optax.GradientTransformation(lambda params: optax.EmptyState(), update))


@dataclasses.dataclass
class QATResult:
  """``variables`` (linen) or ``module`` (nnx): the quantized model, an ordinary jq checkpoint;
  ``params``: the trained float params; ``state``: the learned steps; ``losses``: the loss of
  every step taken; ``log``: what happened (fallbacks named)."""
  variables: Any
  module: Any
  params: Any
  state: QATState
  losses: list[float]
  log: list[str]
  seconds: float


def _as_args(batch) -> tuple:
  return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def _kl(teacher, student, temperature: float) -> jax.Array:
  """``T² · mean KL(softmax(t/T) || softmax(s/T))`` over every position."""
  for name, a in (("teacher", teacher), ("student", student)):
    if not hasattr(a, "ndim") or a.ndim < 1:
      raise ValueError(f"distill: the model's {name} output is a {type(a).__name__}, not logits; "
                       "pass logits_fn= to pick them out of the output")
  t = teacher.astype(_F32) / temperature
  s = student.astype(_F32) / temperature
  return jnp.mean(metrics.kl_divergence(t, s)) * (temperature * temperature)


def _all_finite(tree) -> bool:
  leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return not _nonfinite(dict(enumerate(leaves)))


def distill(model, variables, rules: Sequence[Rule], batches: Iterable[Any], *, steps: int,
            optimizer=None, temperature: float = 1.0, train_float: bool = False,
            logits_fn: Callable[[Any], jax.Array] | None = None, progress: bool = False,
            **example_kwargs) -> QATResult:
  """QAT by distillation: learns weights and step sizes so that the fake-quantized model's logits
  match the float model's (``T² · KL(softmax(teacher/T) ‖ softmax(student/T))`` averaged over
  positions), then :func:`finalize` s the result into an ordinary quantized checkpoint.

  Steps run jitted, one batch each (cycling through ``batches``).  A NaN/Inf loss stops training
  and returns the best iterate so far (lowest loss; the log says so), as does a final update that
  left non-finite values: the checkpoint is never NaN.

  Args:
    model: a linen module (with ``variables``) or an nnx module (``variables=None``).
    variables: the linen model's float variables; None for nnx.
    rules: ordered rules with integer-grid weights (RTN); int8 activation rules fake-quantize
      their layers' inputs (static: learned steps, calibrated first on ``batches``).
    batches: model inputs (arrays or argument tuples), e.g. token arrays of calibration text.
    steps: optimizer steps.
    optimizer: an optax ``GradientTransformation`` over ``{"params": trained leaves, "state":
      QATState}``; None: :func:`default_optimizer`.
    temperature: distillation temperature ``T > 0``.
    train_float: also train the float leaves the rules keep (embeddings, norms, biases, head);
      by default only the quantized kernels and the steps learn.
    logits_fn: picks the logits out of the model's output (default: the output itself).
    progress: a progress bar over the steps.
    **example_kwargs: extra keyword arguments of the linen model call.

  Example:
    >>> res = jq.qat.distill(model, variables, jq.recipe_rules("w2a16-g32"), batches, steps=200)
    >>> jq.io.save("model.safetensors", res.variables)

  Raises:
    ValueError: bad ``steps``/``temperature``, no batches, or what :func:`init` raises.
  """
  import optax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
    raise ValueError(f"distill: steps={steps!r} must be an int >= 0")
  if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
    raise ValueError(f"distill: temperature={temperature!r} must be a positive number")
  batches = list(batches)
  if not batches:
    raise ValueError("distill: no batches were given")
  target = _target(model, variables, batches, example_kwargs)
  state, log = _model_state(target, rules, batches)
  params0 = target.params
  log.append(f"qat: {state.describe()}")
  trained = sorted(state.layers)
  if train_float:
    trained = [p for p, x in leaves_with_paths(params0) if p in state.layers or (
        hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating))]
  leaves0 = dict(leaves_with_paths(params0))
  train = {"params": {p: leaves0[p] for p in trained}, "state": state}
  apply = fake_quant_apply(model)
  pick = logits_fn or (lambda out: out)
  if isinstance(model, nnx.Module):
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)

    def teacher(p, args):
      return nnx.merge(graphdef, p, rest)(*args)
  else:
    from jq.nn import linen as jlinen  # pylint: disable=import-outside-toplevel
    fn = jlinen._apply_fn(model)  # pylint: disable=protected-access

    def teacher(p, args):
      return fn(p, *args, **example_kwargs)

  def merged(base, sub):
    return map_with_paths(lambda p, x: sub.get(p, x), base)

  def loss_fn(tr, base, batch):
    args = _as_args(batch)
    ref = jax.lax.stop_gradient(pick(teacher(base, args)))
    out = pick(apply(merged(base, tr["params"]), tr["state"], *args, **example_kwargs))
    return _kl(ref, out, float(temperature))

  opt = default_optimizer() if optimizer is None else optimizer

  @jax.jit
  def step(tr, opt_state, base, batch):
    loss, grads = jax.value_and_grad(loss_fn)(tr, base, batch)
    # optax's Adam raises its decay rates to an int32 step count (``b1 ** count``), which needs
    # implicit promotion: the optimizer runs under the standard rules, jq's own code never does.
    with jax.numpy_dtype_promotion("standard"):
      updates, opt_state = opt.update(grads, opt_state, tr)
      return loss, optax.apply_updates(tr, updates), opt_state

  with jax.numpy_dtype_promotion("standard"):
    opt_state = opt.init(train)
  losses: list[float] = []
  best, best_loss, best_step = train, float("inf"), 0
  it = range(steps)
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    it = tqdm(it, desc="qat", unit="step")
  stopped = False
  for i in it:
    loss, new, opt_state = step(train, opt_state, params0, batches[i % len(batches)])
    loss = float(loss)
    if not math.isfinite(loss):
      log.append(f"qat: step {i}: the loss is {loss}; stopped and returned the best iterate so "
                 f"far (step {best_step}, loss {best_loss:.6g})")
      train, stopped = best, True
      break
    losses.append(loss)
    if loss < best_loss:
      best, best_loss, best_step = train, loss, i
    train = new
  if not stopped and steps and not _all_finite(train):
    log.append(f"qat: the last update left NaN/Inf values; returned the best iterate so far "
               f"(step {best_step}, loss {best_loss:.6g})")
    train = best
  if losses:
    log.append(f"qat: loss (T={temperature}) {losses[0]:.6g} at step 0 -> {losses[-1]:.6g} at "
               f"step {len(losses) - 1}")
  params = merged(params0, train["params"])
  qparams = finalize(params, train["state"])
  finished = target.finish(qparams)
  is_nnx = target.kind == "nnx"
  return QATResult(variables=None if is_nnx else finished, module=finished if is_nnx else None,
                   params=params, state=train["state"], losses=losses, log=log,
                   seconds=time.perf_counter() - t0)


__all__ = ["LayerState", "QATResult", "QATState", "default_optimizer", "distill",
           "fake_quant_activation", "fake_quant_apply", "fake_quant_lsq", "fake_quantized",
           "finalize", "init", "init_model", "lsq_grad_scale"]
