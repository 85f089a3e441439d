"""GPTQ: accurate post-training quantization with second-order error feedback.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", 2022, arXiv:2210.17323.

For a Dense kernel ``W`` of shape ``(K, N)`` with inputs ``X`` of shape ``(tokens, K)``, GPTQ
minimises ``‖X W − X Ŵ‖²`` one *input channel* at a time.  (The paper's "columns" are the input
channels; in jq's ``(in, out)`` layout they are the *rows* of ``W``.)  With ``H = 2 XᵀX / n`` and
``U`` the upper Cholesky factor of ``H⁻¹`` (``H⁻¹ = UᵀU``), quantizing row ``i`` to ``q_i`` and
spreading its error over the not-yet-quantized rows,

    e = (w_i − q_i) / U_ii,        W[j] ← W[j] − U_ij · e   for j > i,

is the optimal (OBS) update.  Updates are applied lazily in blocks of ``block_size`` rows: inside a
block row by row, to the rest of ``W`` once per block (one matmul).

Implementation notes (differences from the reference implementation are marked *):

* Dead inputs (``H_ii == 0``: the channel was always 0) get ``H_ii = 1`` and their weight row is
  set to 0 before anything else (*the reference computes per-channel scales before zeroing them;
  jq zeroes first, so a dead row cannot widen a scale).
* Damping: ``H + λI`` with ``λ = damp · mean(diag H)``.  If a Cholesky factorisation fails
  (NaN, i.e. ``H`` is numerically not positive definite), ``λ`` is multiplied by 10 and the
  factorisation retried, up to ``max_retries`` times; if all fail, ``H`` is replaced by its diagonal
  (no error feedback: GPTQ degenerates to round-to-nearest).  If the result is still not finite
  (e.g. a catastrophically conditioned ``H`` blew up the updated weights), the round-to-nearest
  result is returned instead.  The outcome is reported in :class:`GPTQInfo`; GPTQ never returns NaN.
* Group-wise scales (``Granularity.GROUP`` along axis 0, no act-order) are computed from the
  *updated* weights when the first row of each group is reached, as in the reference (there, from
  ``W[:, i:i+groupsize]``).  The block size is adjusted so that a group never straddles a block
  boundary unless it starts at one (block a multiple of the group size, or vice versa), which
  makes those weights exactly the current ones (*the reference reads partly stale weights when the
  two sizes do not divide each other).
* Per-tensor/per-channel scales, and all scales with ``static_groups=True`` or ``act_order=True``,
  are computed once from the original (dead-zeroed) weights, like the reference's
  ``static_groups=True``.
* ``act_order``: rows are processed in order of decreasing ``H_ii`` (most salient inputs first),
  but group ``g`` keeps the scale of the *original contiguous* rows ``[g·G, (g+1)·G)``.  The stored
  :class:`~jq.qarray.QArray` therefore has ordinary contiguous groups and needs no ``g_idx``
  permutation at inference (the reference's ``desc_act`` without static groups would).
* Jitted stages: the factorisation (ordering, Cholesky, inverse: each compiled once per ``K``,
  shared by all specs; at most 3 float32 ``K × K`` matrices held at a time, see
  :func:`_prepare`) and the blocked loop (``lax.fori_loop`` over blocks and rows).  The weights
  are padded to whole blocks with zero rows whose Hessian block is the identity, so they never
  interact with real rows and quantize exactly to 0.  ``gptq_quantize`` can itself be called
  under ``jax.jit`` (the value checks then only run on concrete inputs; the factorisation's
  stages then run as one program).
* ``devices=``: a Hessian too large for one device is placed split by rows over several, factored
  there (``jq.algorithms.factor_split``: a blocked UL factorisation ``H = RRᵀ`` and ``U = R⁻¹``,
  the same factor as the dense road up to float32 rounding order) and read one row panel at a
  time by the loop, the kernel's output channels split over the same devices.
* The rounding grid is jq's own (``jq.quantize``), and the result is built with
  :func:`jq.quantize.quantize_with_params`, so ``dequantize(result)`` is exactly the weights GPTQ
  optimised.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jq import numerics
from jq.algorithms import factor_split
from jq.calibrate.stats import LayerStats, hessian_scale
from jq.qarray import QArray
from jq.quantize import check_float_input, compute_params, quantize_with_params
from jq.spec import Clip, ClipMethod, Granularity, QuantSpec

_HIGHEST = jax.lax.Precision.HIGHEST


class GPTQInfo(NamedTuple):
  """Diagnostics of one GPTQ call (all arrays).

  Attributes:
    loss: GPTQ's proxy loss ``½ Σ_i ‖w_i − q_i‖² / U_ii²`` (the increase of ``½‖XW − XŴ‖²/n``
      predicted by the OBS updates).
    damp: the relative damping finally used (``damp · 10^retries``).
    retries: how many times damping was increased after a failed Cholesky factorisation.
    dead: number of dead input channels (``H_ii == 0``) whose rows were set to 0.
    fallback: 1 if no factorisation succeeded (diagonal ``H`` used), 2 if the result was not
      finite and round-to-nearest was returned, 0 otherwise.
  """
  loss: jax.Array
  damp: jax.Array
  retries: jax.Array
  dead: jax.Array
  fallback: jax.Array


def _fq_row(w: jax.Array, s: jax.Array, z: jax.Array | None, spec: QuantSpec) -> jax.Array:
  """Dequantized row ``w`` (N,) on jq's grid with per-element scale ``s`` / zero point ``z``."""
  elem = dataclasses.replace(spec, granularity=Granularity.CHANNEL, channel_axes=(0, 1),
                             group_axis=None, group_size=None, clip=Clip())
  q = quantize_with_params(w[None], s[None], None if z is None else z[None], elem)
  return q.dequantize(jnp.float32)[0]


def _ordered(h: jax.Array, scale: jax.Array, *, act_order: bool):
  """``scale · H`` symmetrised, dead channels (``H_ii ≤ 0``) replaced by the identity, in
  processing order; with its diagonal, the diagonal's mean, the processing order and the dead
  mask."""
  k = h.shape[0]
  h = h.astype(jnp.float32) * scale
  h = 0.5 * (h + h.T)
  dead = ~(jnp.diag(h) > 0)
  h = jnp.where(dead[:, None] | dead[None, :], jnp.eye(k, dtype=jnp.float32), h)
  if act_order:
    perm = jnp.argsort(-jnp.diag(h), stable=True)
    h = h[perm[:, None], perm[None, :]]
  else:
    perm = jnp.arange(k)
  return h, jnp.diag(h), jnp.mean(jnp.diag(h)), perm, dead


def _cholesky(h: jax.Array, rel: jax.Array, mean_diag: jax.Array):
  """``M`` (lower) with ``J(H + λI)J = MMᵀ``, ``λ = rel · mean_diag`` and ``J`` the reversal, and
  whether the factorisation succeeded (finite, positive diagonal)."""
  k = h.shape[0]
  m = jax.lax.linalg.cholesky(h[::-1, ::-1] + (rel * mean_diag) * jnp.eye(k, dtype=jnp.float32),
                              symmetrize_input=False)
  return m, jnp.all(jnp.isfinite(m)) & jnp.all(jnp.diag(m) > 0)


def _inverse(m: jax.Array):
  """``U = J M⁻¹ J`` (upper, ``(H + λI)⁻¹ = UᵀU``) and whether it is finite with a positive
  diagonal."""
  k = m.shape[0]
  u = jax.lax.linalg.triangular_solve(m, jnp.eye(k, dtype=jnp.float32), left_side=True,
                                      lower=True)[::-1, ::-1]
  return u, jnp.all(jnp.isfinite(u)) & jnp.all(jnp.diag(u) > 0)


def _diagonal(h_diag: jax.Array, rel: jax.Array, mean_diag: jax.Array) -> jax.Array:
  """The last resort's ``U``: ``diag(1 / sqrt(H_ii + λ))`` (no correlations, no error feedback)."""
  return jnp.diag(jax.lax.rsqrt(h_diag + rel * mean_diag + jnp.finfo(jnp.float32).tiny))


def _upper_chol_inverse(h: jax.Array, h_diag: jax.Array, mean_diag: jax.Array, damp: jax.Array,
                        max_retries: int):
  """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹ = UᵀU``, increasing ``λ`` on failure, as one
  traced program (:func:`_prepare` under ``jax.jit``).

  With ``J`` the reversal permutation and ``J(H + λI)J = MMᵀ`` (``M`` lower), ``H + λI = RRᵀ`` with
  ``R = JMJ`` upper, so ``(H + λI)⁻¹ = (R⁻¹)ᵀR⁻¹`` and ``U = R⁻¹ = J M⁻¹ J``: one factorisation
  and one triangular inverse, instead of the reference's factorise-invert-factorise.  A failed
  factorisation is retried with ``λ × 10``; if all fail, or the inverse is not finite, ``U`` is
  :func:`_diagonal`'s.

  Returns ``(U, relative_damp, retries, failed)``.
  """

  def cond(c):
    _, _, tries, ok = c
    return (~ok) & (tries < max_retries)

  def body(c):
    _, rel, tries, _ = c
    rel = jnp.where(tries < 0, rel, rel * 10.0)
    m, ok = _cholesky(h, rel, mean_diag)
    return m, rel, tries + 1, ok

  init = (jnp.zeros_like(h), damp, jnp.int32(-1), jnp.bool_(False))
  m, rel, tries, ok = jax.lax.while_loop(cond, body, init)
  u, inverted = _inverse(m)
  ok = ok & inverted
  return jnp.where(ok, u, _diagonal(h_diag, rel, mean_diag)), rel, tries, ~ok


def _block_layout(k: int, block_size: int, dynamic_groups: bool, g: int
                  ) -> tuple[int, int, int]:
  """Effective block size, padded row count and the rows padding is counted in (a block, or a
  group spanning several blocks)."""
  b = max(1, min(block_size, k))
  if not dynamic_groups:
    return b, -(-k // b) * b, b
  if g <= b:
    b = (b // g) * g
  elif g % b:
    b = g
  span = max(b, g)
  return b, -(-k // span) * span, span


def _layout(spec: QuantSpec, k: int, n: int, block_size: int, static_groups: bool):
  """``(tile, dynamic_groups, block, padded rows, span)`` of a ``(k, n)`` kernel's GPTQ loop."""
  tile = spec.tile((k, n))
  dynamic_groups = (spec.granularity is Granularity.GROUP and (spec.group_axis or 0) % 2 == 0
                    and not static_groups)     # (act-order implies static groups)
  return (tile, dynamic_groups, *_block_layout(k, block_size, dynamic_groups, tile[0]))


_ordered_jit = jax.jit(_ordered, static_argnames=("act_order",))
_cholesky_jit = jax.jit(_cholesky)
_inverse_jit = jax.jit(_inverse, donate_argnums=0)
_diagonal_jit = jax.jit(_diagonal)


def _prepare(h: jax.Array, scale: jax.Array, damp: jax.Array, *, act_order: bool,
             max_retries: int):
  """Dead inputs, processing order and the factor ``U`` of ``H = scale · h``.

  Concrete inputs run one jitted stage at a time (each compiled once per ``K``, shared by specs):
  :func:`_ordered`, :func:`_cholesky` (retried with more damping in Python), then :func:`_inverse`
  on the factor it consumes, once the ordered ``H`` is dropped.  No stage holds more than three
  ``K × K`` float32 matrices (a single program holds ~5.5: for Llama's ``down_proj``,
  K = 8192 or 14336, that is 0.6-1.9 GiB less).  Traced inputs (``gptq_quantize`` under
  ``jax.jit``) run the same stages as one program (:func:`_upper_chol_inverse`).

  Returns ``(u, perm, dead, relative_damp, retries, failed)``; ``u`` is in processing order.
  """
  if not all(numerics.is_concrete(x) for x in (h, scale, damp)):
    hp, h_diag, mean_diag, perm, dead = _ordered(h, scale, act_order=act_order)
    u, rel, retries, failed = _upper_chol_inverse(hp, h_diag, mean_diag, damp, max_retries)
    return u, perm, dead, rel, retries, failed
  hp, h_diag, mean_diag, perm, dead = _ordered_jit(h, scale, act_order=act_order)
  rel = jnp.float32(damp)
  for tries in range(max_retries + 1):
    if tries:
      rel = rel * jnp.float32(10.0)
    m, ok = _cholesky_jit(hp, rel, mean_diag)
    if bool(ok):
      break
    m = None                              # (a failed factor is not kept through the retry)
  del hp                                  # (the inverse needs only the factor)
  u = None
  if bool(ok):
    u, ok = _inverse_jit(m)               # (donates the factor)
  m = None
  if not bool(ok):
    u = _diagonal_jit(h_diag, rel, mean_diag)
  return u, perm, dead, rel, jnp.int32(tries), ~ok


@functools.partial(jax.jit, static_argnames=("spec", "block_size", "static_groups", "mesh"))
def _gptq(w: jax.Array, u: jax.Array, perm: jax.Array, dead: jax.Array, *, spec: QuantSpec,
          block_size: int, static_groups: bool, mesh=None):
  """The blocked GPTQ loop; returns ``(qarray, loss, fallback_to_rtn)``.  With ``mesh``, ``u`` is
  split by rows over it and already padded (``jq.algorithms.factor_split``); the loop reads it one
  row panel at a time."""
  k, n = w.shape
  w = jnp.where(dead[:, None], 0.0, w.astype(jnp.float32))

  tile, dynamic_groups, b, kp, span = _layout(spec, k, n, block_size, static_groups)
  g = tile[0]
  n_groups = -(-k // g)
  has_zp = not spec.symmetric and not spec.qtype.is_table

  # round-to-nearest reference (also the fallback), and static per-element scales
  scale0, zp0 = compute_params(w, spec)

  def per_element(t):
    return jnp.broadcast_to(numerics.expand(t.astype(jnp.float32), tile, (k, n)), (k, n))

  inv_perm = jnp.argsort(perm)
  wp = w[perm]

  if mesh is None:
    pad = kp - k
    if pad:   # (identity on the padding, set in place: no second K × K matrix)
      u = jnp.pad(u, ((0, pad), (0, pad)))
      u = u.at[jnp.arange(k, kp), jnp.arange(k, kp)].set(1.0)

    def panel(i1):
      return jax.lax.dynamic_slice_in_dim(u, i1, b, axis=0)
  else:
    kp = u.shape[0]
    pad = kp - k

    def panel(i1):
      return factor_split.row_panel(u, i1, b, mesh)
  wp = jnp.pad(wp, ((0, pad), (0, 0)))
  if dynamic_groups:
    s_el = z_el = None
  else:
    s_el = jnp.pad(per_element(scale0)[perm], ((0, pad), (0, 0)), constant_values=1.0)
    z_el = (jnp.pad(per_element(zp0)[perm], ((0, pad), (0, 0))) if has_zp else None)

  fill = jnp.nan if spec.clip.method is ClipMethod.PERCENTILE else 0.0

  def group_params(rows: jax.Array, start: jax.Array):
    """Scale/zp rows (N,) of the group of ``rows`` (g, N) starting at padded row ``start``."""
    valid = (start + jnp.arange(g)) < k
    s, z = compute_params(jnp.where(valid[:, None], rows, fill), spec)
    s = jnp.broadcast_to(s.astype(jnp.float32), (1, n))[0]
    z = jnp.broadcast_to(z.astype(jnp.float32), (1, n))[0] if has_zp else None
    return s, z

  def column(j, c, i1):
    """Quantizes row ``j`` of the current block (``i1`` = block start)."""
    w1, q1, e1, loss, sbuf, zbuf, u1 = c
    i = i1 + j
    row = w1[j]
    d = u1[j, j]
    if dynamic_groups:
      s = sbuf[i // g]
      z = zbuf[i // g] if has_zp else None
    else:
      s = jax.lax.dynamic_index_in_dim(s_el, i, keepdims=False)
      z = jax.lax.dynamic_index_in_dim(z_el, i, keepdims=False) if has_zp else None
    q = _fq_row(row, s, z, spec)
    err = (row - q) / d
    w1 = w1 - u1[j][:, None] * err[None, :]          # u1[j, :j] == 0: only rows >= j change
    q1 = q1.at[j].set(q)
    e1 = e1.at[j].set(err)
    loss = loss + jnp.sum(err * err)
    return w1, q1, e1, loss, sbuf, zbuf, u1

  def block(bi, c):
    wfull, qfull, loss, sbuf, zbuf = c
    i1 = bi * b
    w1 = jax.lax.dynamic_slice_in_dim(wfull, i1, b, axis=0)
    u_rows = panel(i1)                                                      # (b, kp)
    u1 = jax.lax.dynamic_slice_in_dim(u_rows, i1, b, axis=1)
    q1 = jnp.zeros_like(w1)
    e1 = jnp.zeros_like(w1)
    inner = (w1, q1, e1, loss, sbuf, zbuf, u1)
    if dynamic_groups and g > b:       # a group spans whole blocks: set its scale at its first
      def set_group(sz):
        s, z = group_params(jax.lax.dynamic_slice_in_dim(wfull, i1, g, axis=0), i1)
        sz0 = sz[0].at[i1 // g].set(s)
        sz1 = sz[1].at[i1 // g].set(z) if has_zp else sz[1]
        return sz0, sz1
      sbuf, zbuf = jax.lax.cond(i1 % g == 0, set_group, lambda sz: sz, (sbuf, zbuf))
      inner = (w1, q1, e1, loss, sbuf, zbuf, u1)
      inner = jax.lax.fori_loop(0, b, lambda j, cc: column(j, cc, i1), inner)
    elif dynamic_groups:               # several groups per block: set each at its first row
      def group(gi, cc):
        w1_, q1_, e1_, loss_, sbuf_, zbuf_, u1_ = cc
        j0 = gi * g
        s, z = group_params(jax.lax.dynamic_slice_in_dim(w1_, j0, g, axis=0), i1 + j0)
        sbuf_ = sbuf_.at[(i1 + j0) // g].set(s)
        if has_zp:
          zbuf_ = zbuf_.at[(i1 + j0) // g].set(z)
        cc = (w1_, q1_, e1_, loss_, sbuf_, zbuf_, u1_)
        return jax.lax.fori_loop(j0, j0 + g, lambda j, c2: column(j, c2, i1), cc)
      inner = jax.lax.fori_loop(0, b // g, group, inner)
    else:
      inner = jax.lax.fori_loop(0, b, lambda j, cc: column(j, cc, i1), inner)
    _, q1, e1, loss, sbuf, zbuf, _ = inner
    # lazy batch update of all later rows: W[i2:] -= U[i1:i2, i2:]ᵀ E
    u_rows = jnp.where(jnp.arange(kp)[None, :] >= i1 + b, u_rows, 0.0)
    wfull = wfull - jax.lax.dot_general(u_rows, e1, (((0,), (0,)), ((), ())), precision=_HIGHEST)
    qfull = jax.lax.dynamic_update_slice_in_dim(qfull, q1, i1, axis=0)
    return wfull, qfull, loss, sbuf, zbuf

  n_buf = kp // g if dynamic_groups else 1
  sbuf = jnp.ones((n_buf, n), jnp.float32)
  zbuf = jnp.zeros((n_buf, n), jnp.float32)
  init = (wp, jnp.zeros_like(wp), jnp.float32(0.0), sbuf, zbuf)
  # (the split road's extra padding is zero rows that need no pass: only the first whole spans)
  _, qp, loss, sbuf, zbuf = jax.lax.fori_loop(0, -(-k // span) * span // b, block, init)

  wq = qp[:k][inv_perm]
  if dynamic_groups:
    n_cols = numerics.num_tiles((k, n), tile)[1]
    scale = sbuf[:n_groups, :n_cols].astype(scale0.dtype)
    zp = zbuf[:n_groups, :n_cols].astype(zp0.dtype) if has_zp else zp0
  else:
    scale, zp = scale0, zp0
  ok = jnp.all(jnp.isfinite(wq)) & jnp.all(jnp.isfinite(scale.astype(jnp.float32)))
  if has_zp:
    zp = jnp.where(ok, zp, zp0)
  scale = jnp.where(ok, scale, scale0)
  wq = jnp.where(ok, wq, w)     # RTN fallback: quantize_with_params rounds w on scale0
  return quantize_with_params(wq, scale, zp, spec), 0.5 * loss, ~ok


def _prepare_split(w, h, scale, spec: QuantSpec, devices: list, *, damp: float, block_size: int,
                   static_groups: bool, act_order: bool, max_retries: int):
  """:func:`_prepare`'s twin with ``H`` and ``U`` split by rows over ``devices``; also places
  ``w`` (split by output channels where they divide evenly, else whole on every device)."""
  if not (numerics.is_concrete(h) and numerics.is_concrete(scale)):
    raise ValueError("gptq_quantize(devices=...) needs a concrete Hessian (not under jax.jit)")
  k, n = w.shape
  hn, scale = np.asarray(h, np.float32), np.float32(scale)
  diag = np.diag(hn) * scale
  dead = ~(diag > 0)
  diag[dead] = 1.0
  perm = (np.argsort(-diag, kind="stable") if act_order else np.arange(k)).astype(np.int32)
  _, _, b, _, span = _layout(spec, k, n, block_size, static_groups)
  mesh = factor_split.mesh_of(devices)
  kp = factor_split.padded_size(k, len(devices), span)
  hp = factor_split.place_hessian(hn, scale, perm, dead, kp, mesh)
  u, rel, retries, failed = factor_split.upper_chol_inverse(
      hp, float(np.mean(diag, dtype=np.float32)), damp, max_retries, mesh=mesh, k=k, block=b)
  whole = NamedSharding(mesh, PartitionSpec())
  cols = PartitionSpec(None, "rows") if n % len(devices) == 0 else PartitionSpec()
  w = jax.device_put(w, NamedSharding(mesh, cols))
  perm, dead = jax.device_put(perm, whole), jax.device_put(dead, whole)
  return w, u, perm, dead, rel, retries, failed, mesh


def gptq_quantize(w: jax.Array, h: jax.Array | LayerStats, spec: QuantSpec, *,
                  damp: float = 0.01, block_size: int = 128, act_order: bool = False,
                  static_groups: bool = False, max_retries: int = 6, name: str = "<kernel>",
                  devices: Sequence[jax.Device] | None = None) -> tuple[QArray, GPTQInfo]:
  """Quantizes a Dense kernel with GPTQ (Frantar et al., 2022, arXiv:2210.17323).

  Minimises ``‖X W − X Ŵ‖²`` over the quantization grid of ``spec`` using the Hessian
  ``H = 2 XᵀX / n`` of the layer's inputs (see the module docstring for the algorithm and the
  choices made).  Jitted; recompiles only for new shapes or options.

  Args:
    w: kernel of shape ``(K, N)`` (``(in, out)``, as in ``flax.linen.Dense``), any float dtype.
    h: the Hessian ``(K, K)`` (``2 XᵀX / n``), or the :class:`~jq.calibrate.stats.LayerStats`
      of the layer's inputs.
    spec: weight spec; ``Granularity.GROUP`` should group axis 0 (the contracting axis).
    damp: relative damping ``λ / mean(diag H)``.
    block_size: rows per lazy batch update (adjusted to the group size, see module docstring).
    act_order: process input channels in order of decreasing ``H_ii`` ("desc_act"); groups stay
      the original contiguous ones, with scales from the original weights.
    static_groups: compute group scales from the original weights up front instead of from the
      updated weights as each group is reached.
    max_retries: how often damping is multiplied by 10 after a failed factorisation.
    name: parameter path used in error messages.
    devices: split the Hessian's factorisation and the factor over these devices
      (``jq.algorithms.factor_split``: each holds ``K / len(devices)`` rows of ``H`` and of
      ``U``, never the whole ``K × K``; the kernel's output channels are split over them too
      where they divide evenly).  For a Hessian too large for one device (Llama-3.1-405B's
      ``down_proj``, K = 53248).  The same result as one device up to float32 rounding order;
      the QArray comes back placed on these devices.  None: one device (the default).

  Returns:
    ``(qarray, info)``: the quantized kernel (an ordinary :class:`~jq.qarray.QArray` with
    ``spec``'s tiling) and :class:`GPTQInfo` diagnostics.

  Raises:
    ValueError: for a non-2-D or non-float kernel, a Hessian of the wrong shape, non-finite
      inputs, or empty statistics (no tokens / an all-zero Hessian).

  Example:
    >>> st = update_stats(init_stats(512), x)           # x: (tokens, 512)
    >>> qw, info = gptq_quantize(w, st, W4A16_G128, act_order=True, name="mlp/up/kernel")
  """
  scale, checked = jnp.float32(1.0), False
  if isinstance(h, LayerStats):   # H = scale · XᵀX, scaled where it is used (no second K × K)
    scale, h, checked = hessian_scale(h, name), h.xtx, True   # (finite: checked by check_stats)
  check_float_input(w, name)
  if w.ndim != 2:
    raise ValueError(f"{name}: shape {tuple(w.shape)} dtype {w.dtype}: GPTQ quantizes 2-D "
                     "(in, out) kernels; reshape other kernels to (contracting, out) first")
  k, n = w.shape
  if tuple(np.shape(h)) != (k, k):
    raise ValueError(f"{name}: shape {tuple(w.shape)}: Hessian has shape {tuple(np.shape(h))}, "
                     f"expected ({k}, {k}) (input channels = axis 0 of the kernel)")
  h = h if isinstance(h, (np.ndarray, jax.Array)) else jnp.asarray(h)
  if not jnp.issubdtype(h.dtype, jnp.floating):
    raise ValueError(f"{name}: Hessian dtype {h.dtype} is not floating point")
  if numerics.is_concrete(h):
    hf = np.asarray(h, np.float32)
    if not checked and not np.all(np.isfinite(hf)):
      raise ValueError(f"{name}: the Hessian has NaN/Inf entries; check the calibration inputs")
    if not np.any(np.diag(hf) > 0):
      raise ValueError(f"{name}: the Hessian is zero (no positive diagonal entry: empty "
                       "calibration statistics, the layer saw no nonzero input); calibrate with "
                       "data that reaches this layer")
  if not damp > 0:
    raise ValueError(f"{name}: damp={damp} must be > 0")
  if int(block_size) < 1:
    raise ValueError(f"{name}: block_size={block_size} must be >= 1")
  if int(max_retries) < 0:
    raise ValueError(f"{name}: max_retries={max_retries} must be >= 0")
  spec.tile((k, n), name=name, dtype=w.dtype)   # validates axes with a named error
  static_groups = bool(static_groups or act_order)
  if devices:
    w, u, perm, dead, rel, retries, failed, mesh = _prepare_split(
        w, h, scale, spec, list(devices), damp=float(damp), block_size=int(block_size),
        static_groups=static_groups, act_order=bool(act_order), max_retries=int(max_retries))
  else:
    mesh = None
    u, perm, dead, rel, retries, failed = _prepare(
        h, scale, jnp.float32(damp), act_order=bool(act_order), max_retries=int(max_retries))
  qarr, loss, rtn = _gptq(w, u, perm, dead, spec=spec, block_size=int(block_size),
                          static_groups=static_groups, mesh=mesh)
  info = GPTQInfo(loss=loss, damp=rel, retries=retries, dead=jnp.sum(dead, dtype=jnp.int32),
                  fallback=jnp.where(rtn, jnp.int32(2), failed.astype(jnp.int32)))
  return qarr.validate(name), info


__all__ = ["gptq_quantize", "GPTQInfo"]
