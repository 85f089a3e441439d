"""GPTQ's factor ``U`` (``H⁻¹ = UᵀU``, upper) with the rows of ``H`` and ``U`` split over devices.

One device's GPTQ solve holds the ``K × K`` Hessian and its factors: for Llama-3.1-405B's
``down_proj`` (K = 53248) that is 11.3 GB per float32 copy, more than a 16 GB TPU v5e chip can
hold with the factorisation's workspace.  Here every device holds ``K / d`` rows of ``H`` (which
become the rows of the upper factor ``R``, ``H = RRᵀ``) and ``K / d`` rows of ``U = R⁻¹``, and the
blocked algorithms below exchange one panel of ``b`` rows or columns per step:

* **UL factorisation** ``H = RRᵀ`` (``R`` upper), panels from the last to the first: the diagonal
  block's factor ``R_pp`` (``b × b``, every device computes it from the block its owner sends),
  the column panel above it ``R_{:p} = H_{:p} R_ppᵀ⁻¹`` (each device its own rows), then the
  trailing update ``H_{::} −= R_{:p} R_{:p}ᵀ`` (each device its rows, against the whole gathered
  column panel, ``K × b``).  Equivalent to the dense road's Cholesky of the reversed matrix
  (``jq.algorithms.gptq._upper_chol_inverse``).
* **Triangular inverse** ``U = R⁻¹`` by back substitution on ``R U = I``, panels from the last to
  the first: the owner's block row of the right-hand side is sent to all, solved against ``R_pp``,
  and each device updates its rows of the right-hand side with its rows of ``R``'s column panel.

Each device does ``~K³ / d`` flops per stage and holds two ``(K / d) × K`` float32 matrices plus
panels; GPTQ's loop then reads ``U`` one row panel at a time (:func:`row_panel`, broadcast by the
owner), so ``U`` is never gathered.  The numbers are those of the dense road up to float32
rounding order (tested on 8 CPU devices: ``tests/distributed``).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

_AXIS = "rows"
_HIGHEST = jax.lax.Precision.HIGHEST


def mesh_of(devices: Sequence[jax.Device]) -> Mesh:
  """The 1-D mesh (axis ``rows``) the factor's rows are split over."""
  return Mesh(np.asarray(list(devices), dtype=object), (_AXIS,))


def padded_size(k: int, devices: int, span: int) -> int:
  """Rows of the split factor: ``k`` rounded up to whole ``span``-row blocks on every device (a
  GPTQ block of rows then never straddles two devices)."""
  unit = devices * span
  return -(-k // unit) * unit


def place_hessian(h, scale, perm: np.ndarray, dead: np.ndarray, kp: int, mesh: Mesh
                  ) -> jax.Array:
  """``H = scale · h`` symmetrised, its dead channels replaced by the identity, permuted into
  processing order and padded with the identity to ``kp`` rows, **built row block by row block on
  the host** and placed split by rows (each device receives only its rows; ``H`` is never copied
  whole onto a device)."""
  h, scale = np.asarray(h, np.float32), np.float32(scale)
  k = h.shape[0]

  def rows(index):
    r = index[0]
    lo, hi = r.start or 0, r.stop if r.stop is not None else kp
    out = np.zeros((hi - lo, kp), np.float32)
    real = np.arange(lo, min(hi, k))
    if real.size:
      src = perm[real]
      block = 0.5 * (h[src][:, perm] * scale + h[:, src].T[:, perm] * scale)
      d_rows, d_cols = dead[src], dead[perm]
      block[d_rows] = 0.0
      block[:, d_cols] = 0.0
      block[np.arange(real.size), real] = np.where(d_rows, 1.0, block[np.arange(real.size), real])
      out[:real.size, :k] = block
    pad = np.arange(max(lo, k), hi)
    out[pad - lo, pad] = 1.0
    return out

  return jax.make_array_from_callback((kp, kp), NamedSharding(mesh, P(_AXIS, None)), rows)


@functools.partial(jax.jit, static_argnames=("mesh", "k", "block"))
def _factor(h: jax.Array, shift: jax.Array, *, mesh: Mesh, k: int, block: int):
  """``(U, factored, inverted)``: ``U`` of ``H + shift·I`` on its ``k`` real rows, split by rows
  like ``h``; whether the factorisation and the inverse came out finite with a positive
  diagonal."""
  kp = h.shape[0]
  d = mesh.devices.size
  r, b = kp // d, block
  panels = -(-k // b)       # the padding's panels are the identity's: nothing to do there

  def local(h_loc, shift):
    me = jax.lax.axis_index(_AXIS)
    row0 = me * r
    grow = row0 + jnp.arange(r)
    gcol = jnp.arange(kp)
    h_loc = h_loc + jnp.where((grow[:, None] == gcol[None, :]) & (grow[:, None] < k), shift, 0.0)

    def owned(c0):
      """(is this device the owner of the panel starting at row c0, local row of c0)."""
      return me == c0 // r, jnp.clip(c0 - row0, 0, r - b)

    def send(mine, x):
      return jax.lax.psum(jnp.where(mine, x, 0.0), _AXIS)

    def ul_step(t, a):
      c0 = (panels - 1 - t) * b
      mine, at = owned(c0)
      col = jax.lax.dynamic_slice_in_dim(a, c0, b, axis=1)                    # (r, b)
      diag = send(mine, jax.lax.dynamic_slice_in_dim(col, at, b, axis=0))     # (b, b)
      r_pp = jax.lax.linalg.cholesky(diag[::-1, ::-1], symmetrize_input=False)[::-1, ::-1]
      above = (grow < c0)[:, None]
      # R_ip = H_ip R_ppᵀ⁻¹ for rows above the panel (X R_ppᵀ = H_ip)
      x = jax.lax.linalg.triangular_solve(r_pp, col, left_side=False, lower=False,
                                          transpose_a=True)
      x = jnp.where(above, x, 0.0)
      x_all = jax.lax.all_gather(x, _AXIS, tiled=True)                       # (kp, b)
      a = a - jnp.matmul(x, x_all.T, precision=_HIGHEST)     # only rows and columns above c0
      inside = ((grow >= c0) & (grow < c0 + b))[:, None]
      own_rows = r_pp[jnp.clip(grow - c0, 0, b - 1)]
      return jax.lax.dynamic_update_slice_in_dim(
          a, jnp.where(above, x, jnp.where(inside, own_rows, 0.0)), c0, axis=1)

    a = jax.lax.fori_loop(0, panels, ul_step, h_loc)
    rr = jnp.where(gcol[None, :] >= grow[:, None], a, 0.0)                  # R (upper)

    def inv_step(t, u):
      c0 = (panels - 1 - t) * b
      mine, at = owned(c0)
      r_pp = send(mine, jax.lax.dynamic_slice(rr, (at, c0), (b, b)))
      rhs = send(mine, jax.lax.dynamic_slice_in_dim(u, at, b, axis=0))       # (b, kp)
      x = jax.lax.linalg.triangular_solve(r_pp, rhs, left_side=True, lower=False)
      r_col = jnp.where((grow < c0)[:, None], jax.lax.dynamic_slice_in_dim(rr, c0, b, axis=1), 0.0)
      u = u - jnp.matmul(r_col, x, precision=_HIGHEST)
      return jax.lax.cond(mine, lambda v: jax.lax.dynamic_update_slice_in_dim(v, x, at, axis=0),
                          lambda v: v, u)

    def fine(x):   # finite with a positive diagonal, on every device
      ok = jnp.all(jnp.isfinite(x)) & jnp.all(jnp.take_along_axis(x, grow[:, None], axis=1) > 0)
      return jax.lax.pmin(ok.astype(jnp.int32), _AXIS) > 0

    factored = fine(rr)
    eye = (grow[:, None] == gcol[None, :]).astype(jnp.float32)
    u = jax.lax.fori_loop(0, panels, inv_step, eye)
    return u, factored, fine(u)

  return jax.shard_map(local, mesh=mesh, in_specs=(P(_AXIS, None), P()),
                       out_specs=(P(_AXIS, None), P(), P()), check_vma=False)(h, shift)


@functools.partial(jax.jit, static_argnames=("mesh", "k"))
def _diagonal(h: jax.Array, shift: jax.Array, *, mesh: Mesh, k: int) -> jax.Array:
  """The last resort's ``U``: ``diag(1 / sqrt(H_ii + shift))`` (no error feedback), split by
  rows."""
  kp = h.shape[0]
  d = mesh.devices.size

  def local(h_loc, shift):
    row0 = jax.lax.axis_index(_AXIS) * (kp // d)
    grow = row0 + jnp.arange(kp // d)
    at = grow[:, None] == jnp.arange(kp)[None, :]
    hd = jnp.sum(jnp.where(at, h_loc, 0.0), axis=1) + jnp.where(grow < k, shift, 0.0)
    return jnp.where(at, jax.lax.rsqrt(hd + jnp.finfo(jnp.float32).tiny)[:, None], 0.0)

  return jax.shard_map(local, mesh=mesh, in_specs=(P(_AXIS, None), P()),
                       out_specs=P(_AXIS, None), check_vma=False)(h, shift)


def upper_chol_inverse(h: jax.Array, mean_diag: float, damp: float, max_retries: int, *,
                       mesh: Mesh, k: int, block: int):
  """The split road's twin of ``jq.algorithms.gptq._upper_chol_inverse``: ``U`` of
  ``H + λI`` (``λ = damp · mean_diag``, ×10 after each failed factorisation, at most
  ``max_retries`` times; then, or if the inverse is not finite, ``diag(H)`` alone), with ``h``
  from :func:`place_hessian`.

  Returns ``(U, relative_damp, retries, failed)`` like the dense road.
  """
  rel = np.float32(damp)
  for tries in range(max_retries + 1):
    if tries:
      rel = np.float32(rel * 10.0)
    u, factored, inverted = _factor(h, jnp.float32(rel * mean_diag), mesh=mesh, k=k,
                                    block=block)
    if bool(factored) and bool(inverted):
      return u, jnp.float32(rel), jnp.int32(tries), jnp.bool_(False)
    del u
    if bool(factored):
      break
  u = _diagonal(h, jnp.float32(rel * mean_diag), mesh=mesh, k=k)
  return u, jnp.float32(rel), jnp.int32(tries), jnp.bool_(True)


def row_panel(u: jax.Array, start: jax.Array, rows: int, mesh: Mesh) -> jax.Array:
  """Rows ``[start, start + rows)`` of ``U`` split by rows over ``mesh``, on every device (its
  owner sends them; the rows never straddle two devices, :func:`padded_size`).  For use inside
  ``jax.jit``."""
  kp = u.shape[0]
  r = kp // mesh.devices.size

  def local(u_loc, start):
    me = jax.lax.axis_index(_AXIS)
    at = jnp.clip(start - me * r, 0, r - rows)
    got = jax.lax.dynamic_slice_in_dim(u_loc, at, rows, axis=0)
    return jax.lax.psum(jnp.where(me == start // r, got, 0.0), _AXIS)

  return jax.shard_map(local, mesh=mesh, in_specs=(P(_AXIS, None), P()), out_specs=P(),
                       check_vma=False)(u, start)


__all__ = ["mesh_of", "padded_size", "place_hessian", "row_panel", "upper_chol_inverse"]
