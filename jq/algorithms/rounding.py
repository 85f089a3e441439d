"""Learned rounding: SignRound / AutoRound (Cheng et al., 2023, arXiv:2309.05516).

Round-to-nearest decides each weight's code alone; GPTQ and AWQ decide them in closed form from
second-order or scale statistics.  Learned rounding instead *trains* the decisions on calibration
data, block by block: per weight an offset ``v`` in [-0.5, 0.5] added before rounding (so each
code can move to its other neighbour), and per group two factors on the grid's range ends (how
far the range is clipped), to minimise the block's output error.  Rounding has no gradient; the
straight-through estimator passes the gradient of ``round(u)`` as that of ``u``.

For one ``(K, N)`` matrix starting from a QArray ``q0`` (RTN, GPTQ or AWQ) with per-tile scale
``s0`` and zero point ``z0``, and range factors ``a`` (upper end) and ``b`` (lower end), in units
of ``s0``::

    lo = (qmin − z0)·b,   hi = (qmax − z0)·a,   f = (hi − lo) / (qmax − qmin)
    s  = s0·f,            z  = clip(qmin − round(lo / f), qmin, qmax)
    q  = clip(round(w / s + v) + z, qmin, qmax),      ŵ = s·(q − z)

(symmetric grids: ``s = s0·a``, no zero point).  With ``v = 0`` and ``a = b = 1`` this is exactly
``q0``'s grid and, for base weights on that grid (GPTQ's) or RTN's input, exactly ``q0``.

:func:`tune` runs the optimisation for a set of such matrices against any loss (the calibration
road passes a block's output error): an ``optax`` optimizer (SignRound's signed gradient descent
with a linearly decaying rate by default, or Adam), offsets and factors projected back into their
ranges after each step, a jitted step, and a fall back to the starting point when the loss turns
non-finite or ends no lower than it started.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jq import numerics
from jq.qarray import QArray
from jq.qtypes import QType
from jq.spec import AutoRoundOptions, QuantSpec


class Rounding(NamedTuple):
  """The learned variables of one matrix: offsets ``v`` (its shape) and the per-tile range
  factors ``a`` (upper end) and ``b`` (lower end; unused on symmetric grids)."""
  v: jax.Array
  a: jax.Array
  b: jax.Array


@dataclasses.dataclass(frozen=True)
class Start:
  """One matrix's fixed data: base weights ``w`` (float32; the weights rounding starts from) and
  the starting grid (``scale``, ``zero_point`` per tile, float32; scales are stored as
  ``scale_dtype``)."""
  w: jax.Array
  scale: jax.Array
  zero_point: jax.Array | None
  qtype: QType
  tile: tuple[int, ...]
  scale_dtype: Any = jnp.float32

  @classmethod
  def from_qarray(cls, q0: QArray, w: jax.Array) -> "Start":
    """The start at ``q0``'s grid, rounding ``w`` (its float input; GPTQ: ``q0``'s own values)."""
    if q0.qtype.symmetric_only:
      raise ValueError(f"learned rounding needs an integer grid, got {q0.qtype.value}")
    if tuple(np.shape(w)) != q0.shape:
      raise ValueError(f"learned rounding: weights of shape {tuple(np.shape(w))} for a QArray of "
                       f"shape {q0.shape}")
    zp = None if q0.zero_point is None else q0.zero_point.astype(jnp.float32)
    return cls(jnp.asarray(w, jnp.float32), q0.scale.astype(jnp.float32), zp, q0.qtype, q0.tile,
               jnp.dtype(q0.scale.dtype))

  def identity(self) -> Rounding:
    """``v = 0``, ``a = b = 1``: the starting grid."""
    ones = jnp.ones(self.scale.shape, jnp.float32)
    return Rounding(jnp.zeros(self.w.shape, jnp.float32), ones, ones)


def _round_ste(x: jax.Array) -> jax.Array:
  return x + jax.lax.stop_gradient(numerics.round_half_even(x) - x)


def _stored(scale: jax.Array, dtype) -> jax.Array:
  """``scale`` as it will be stored (``dtype``), with the gradient of the unrounded value."""
  if jnp.dtype(dtype) == jnp.float32:
    return scale
  return scale + jax.lax.stop_gradient(scale.astype(dtype).astype(jnp.float32) - scale)


def grid(start: Start, r: Rounding) -> tuple[jax.Array, jax.Array | None]:
  """Per-tile ``(scale, zero_point)`` (float32, the scale rounded to its stored precision) of the
  learned range factors (see module doc)."""
  qt = start.qtype
  if start.zero_point is None:
    return _stored(start.scale * r.a, start.scale_dtype), None
  n = float(qt.qmax - qt.qmin)
  lo = (qt.qmin - start.zero_point) * r.b
  hi = (qt.qmax - start.zero_point) * r.a
  f = (hi - lo) * np.float32(1.0 / n)
  z = jnp.clip(qt.qmin - _round_ste(lo / f), qt.qmin, qt.qmax)
  return _stored(start.scale * f, start.scale_dtype), z


def _codes(start: Start, r: Rounding, scale, zp) -> jax.Array:
  qt, shape = start.qtype, start.w.shape
  u = start.w / numerics.expand(scale, start.tile, shape) + r.v
  q = _round_ste(u)
  if zp is not None:
    q = q + numerics.expand(zp, start.tile, shape)
  # (not jnp.clip: its gradient at a range end is 1/2, and the range ends are always used)
  return jnp.where(q < qt.qmin, float(qt.qmin), jnp.where(q > qt.qmax, float(qt.qmax), q))


def dequantized(start: Start, r: Rounding) -> jax.Array:
  """``ŵ`` (float32, the matrix's shape), differentiable in ``r`` (straight-through rounding)."""
  scale, zp = grid(start, r)
  q = _codes(start, r, scale, zp)
  if zp is not None:
    q = q - numerics.expand(zp, start.tile, start.w.shape)
  return q * numerics.expand(scale, start.tile, start.w.shape)


def to_qarray(start: Start, r: Rounding, spec: QuantSpec) -> QArray:
  """The learned rounding as an ordinary QArray of ``spec``'s grid (scales stored in
  ``spec.scale_dtype``, as :func:`grid` already rounded them): the same codes as
  :func:`dequantized`, so it dequantizes to the same values up to the last bit (XLA may contract
  the grid's multiply-adds in one compiled program and not in another)."""
  if jnp.dtype(spec.scale_dtype) != start.scale_dtype:
    raise ValueError(f"learned rounding: the start's scales are {start.scale_dtype}, the spec "
                     f"stores {spec.scale_dtype}")
  values, scale, zp = _stored_parts(start.w, start.scale, start.zero_point, r, start.qtype,
                                    start.tile, start.scale_dtype)
  return QArray(values=values, scale=scale, zero_point=zp, activation=None, qtype=start.qtype,
                shape=tuple(start.w.shape), tile=start.tile)


@functools.partial(jax.jit, static_argnames=("qtype", "tile", "scale_dtype"))
def _stored_parts(w, scale, zero_point, r: Rounding, qtype: QType, tile, scale_dtype):
  """``(packed values, scales, zero points)`` of :func:`to_qarray`, in one compiled program."""
  start = Start(w, scale, zero_point, qtype, tile, scale_dtype)
  scale, zp = grid(start, r)
  q = _codes(start, r, scale, zp)
  zp_out = None if zp is None else zp.astype(qtype.unpacked_dtype)
  return (numerics.pack(q.astype(qtype.unpacked_dtype), qtype), scale.astype(scale_dtype),
          zp_out)


def project(r: Rounding, clip_min: float) -> Rounding:
  """Offsets into [-0.5, 0.5], range factors into [clip_min, 1]."""
  return Rounding(jnp.clip(r.v, -0.5, 0.5), jnp.clip(r.a, clip_min, 1.0),
                  jnp.clip(r.b, clip_min, 1.0))


def optimizer(options: AutoRoundOptions) -> optax.GradientTransformation:
  """The options' optimizer: signed gradient descent (SignRound) or Adam, with the learning rate
  decaying linearly to 0 over ``options.steps``."""
  lr = optax.linear_schedule(options.learning_rate, 0.0, options.steps)
  if options.optimizer == "adam":
    return optax.adam(lr)
  return optax.chain(optax.scale_by_sign(), optax.scale_by_learning_rate(lr))


@dataclasses.dataclass
class TuneInfo:
  """What :func:`tune` did: the full loss at the start and the end, the per-step (minibatch)
  losses, and whether (and why) it fell back to the start."""
  start_loss: float
  end_loss: float
  losses: list[float]
  fell_back: str = ""

  def describe(self) -> str:
    if self.fell_back:
      return f"autoround fell back to its start ({self.fell_back}); loss {self.start_loss:.4g}"
    gain = 100.0 * (1.0 - self.end_loss / self.start_loss) if self.start_loss > 0 else 0.0
    return (f"autoround {len(self.losses)} steps: loss {self.start_loss:.4g} -> "
            f"{self.end_loss:.4g} ({gain:.0f}% lower)")


Loss = Callable[[dict[Hashable, jax.Array], Any, Any, jax.Array], jax.Array]


def tune(loss: Loss, starts: dict[Hashable, Start], operands: Any, data: Any,
         options: AutoRoundOptions, *, rows_per_step: int,
         opt: optax.GradientTransformation | None = None,
         on_step: Callable[[int, float], None] | None = None
         ) -> tuple[dict[Hashable, Rounding], TuneInfo]:
  """Learns the rounding of ``starts`` to minimise ``loss``.

  The whole run (the loss over every row at the start, the steps, the loss at the end) is one
  jitted program: one compilation per call.

  Args:
    loss: ``loss(weights, operands, data, idx)``: the loss of each row ``idx`` of ``data``
      (shape ``idx.shape``), given ``{key: ŵ}`` (the learned matrices, float32).
    starts: the matrices, by key.
    operands: passed to ``loss`` unchanged (the model's other parameters), as jit arguments.
    data: a pytree of arrays with a leading row axis (the loss's inputs and targets).
    options: steps, learning rate, optimizer, ``learn_clip``, ``clip_min``, ``seed``.
    rows_per_step: rows of ``data`` per step (:func:`minibatches`).
    opt: an optax optimizer to use instead of :func:`optimizer(options) <optimizer>`.
    on_step: called with ``(step, minibatch loss)`` after each step (a host callback).

  Returns:
    ``({key: Rounding}, TuneInfo)``: the learned variables, or the start's when the loss turned
    non-finite or the full loss (the mean over every row) did not go down.
  """
  rows = int(jax.tree_util.tree_leaves(data)[0].shape[0])
  groups = np.stack(minibatches(rows, rows_per_step, options.steps, options.seed))
  m = groups.shape[1]
  # every row once, in chunks of m (the last chunk ends at the last row; rows it repeats from
  # the one before weigh 0)
  starts_at = list(range(0, rows - m + 1, m)) + ([rows - m] if rows % m else [])
  chunks = np.stack([np.arange(j, j + m) for j in starts_at])
  weight = np.ones(chunks.shape, np.float32)
  if rows % m:
    weight[-1, :m - rows % m] = 0.0
  opt = opt if opt is not None else optimizer(options)
  learn_clip = options.learn_clip

  def weights(rounds):
    if not learn_clip:
      rounds = {k: Rounding(r.v, jax.lax.stop_gradient(r.a), jax.lax.stop_gradient(r.b))
                for k, r in rounds.items()}
    return {k: dequantized(starts[k], r) for k, r in rounds.items()}

  def objective(rounds, ops, d, idx):
    return jnp.mean(loss(weights(rounds), ops, d, idx).astype(jnp.float32))

  def full(rounds, ops, d):
    per = jax.lax.map(lambda c: loss(weights(rounds), ops, d, c).astype(jnp.float32),
                      jnp.asarray(chunks))
    return jnp.sum(per * weight) / rows

  def step(carry, xs):
    rounds, state, ops, d = carry
    i, idx = xs
    value, grads = jax.value_and_grad(objective)(rounds, ops, d, idx)
    with jax.numpy_dtype_promotion("standard"):   # (optax mixes Python floats and int counts)
      updates, state = opt.update(grads, state, rounds)
      rounds = optax.apply_updates(rounds, updates)
    rounds = {k: project(r, options.clip_min) for k, r in rounds.items()}
    if on_step is not None:
      jax.debug.callback(lambda a, b: on_step(int(a), float(b)), i, value)
    return (rounds, state, ops, d), value

  @jax.jit
  def run(first, ops, d, order):
    start = full(first, ops, d)
    (rounds, _, _, _), losses = jax.lax.scan(
        step, (first, opt.init(first), ops, d), (jnp.arange(len(groups)), order))
    return rounds, losses, start, full(rounds, ops, d)

  first = {k: s.identity() for k, s in starts.items()}
  rounds, losses, start_loss, end_loss = run(first, operands, data, jnp.asarray(groups))
  losses = [float(x) for x in np.asarray(losses)]
  start_loss, end_loss = float(start_loss), float(end_loss)
  if not np.isfinite(start_loss):
    return first, TuneInfo(start_loss, start_loss, losses, "the starting loss is not finite")
  bad = [i for i, x in enumerate(losses) if not np.isfinite(x)]
  if bad:
    return first, TuneInfo(start_loss, start_loss, losses,
                           f"the loss became {losses[bad[0]]} at step {bad[0] + 1}")
  if not np.isfinite(end_loss) or not all(
      bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(rounds)):
    return first, TuneInfo(start_loss, start_loss, losses, f"the final loss is {end_loss}")
  if end_loss >= start_loss:
    return first, TuneInfo(start_loss, start_loss, losses,
                           f"the loss did not go down ({start_loss:.4g} -> {end_loss:.4g})")
  return rounds, TuneInfo(start_loss, end_loss, losses)


def minibatches(rows: int, per_step: int, steps: int, seed: int) -> list[np.ndarray]:
  """Row indices for ``steps`` minibatches of ``min(per_step, rows)`` rows: epochs of a seeded
  permutation, each cut into whole minibatches (a remainder waits for the next epoch's shuffle)."""
  m = max(1, min(per_step, rows))
  rng = np.random.default_rng(seed)
  out: list[np.ndarray] = []
  while len(out) < steps:
    perm = rng.permutation(rows)
    out += [np.sort(perm[j:j + m]) for j in range(0, rows - m + 1, m)]
  return out[:steps]


__all__ = ["Rounding", "Start", "grid", "dequantized", "to_qarray", "project", "optimizer",
           "tune", "TuneInfo", "minibatches"]
