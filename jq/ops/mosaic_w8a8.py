"""Pallas Mosaic GPU (Hopper: TMA loads, wgmma) W8A8 matmul: int8 × int8 -> int32 and
fp8 × fp8 -> float32 on the tensor cores, rescaled per token × per channel in the epilogue.

Twin of :func:`jq.ops.reference.int8_dot_general` and :func:`jq.ops.reference.fp8_dot_general`
(same signature; :func:`w8a8_matmul_2d` also takes a ``bias``), for prefill-sized problems: on an
H100, XLA's int8 × int8 path took 1.33-1.39x bf16's time at M = 4096 although int8 tensor cores
have twice bf16's peak.

The activations are quantized by XLA first (:func:`jq.ops.reference.quantize_activations`: one
pass over ``x``, the same values the reference multiplies), unsigned operands shifted by −128 into
int8 with their zero points (``q − z`` unchanged).  wgmma takes 8-bit operands K-major only, so
XLA also transposes the weight to ``(N, K)`` per call (one extra pass over its bytes, fused with
the shift; small beside a prefill GEMM's ``2·M·K·N`` operations: at M = 4096 and K = N = 2048 the
weight's 4 MiB against 34 GOPs).  Each program computes a ``(tile_m, tile_n)`` output tile: a
pipeline (``plgpu.emit_pipeline``) brings per ``tile_k``-element step (128, or 64 where K is an
odd multiple of 64) the x tile and the transposed weight tile (both swizzled) into shared memory
by TMA, and ``wgmma`` accumulates their product asynchronously into an int32 (fp8: float32)
accumulator, each step's MMA running while the next step's tiles load (both tiles held one step
longer, ``delay_release``).  The epilogue applies,
exactly as the reference does, the zero-point corrections in int32 (wrapping like the
reference's), ``y = acc · sx[m] · sw[n]`` in float32 and ``+ bias[n]``, and writes the tile by TMA.

Corrections: ``Σ(qx − zx)(qw − zw) = Σ qx·qw − zw[n]·(Sx[m] − K·zx[m]) − zx[m]·Sw[n]`` with
``Sx``/``Sw`` the row sums of qx / column sums of qw (computed by XLA; only when a zero point
exists): two outer products of per-row and per-column int32 vectors.

Mosaic GPU's interpreter cannot yet read a transposed shared-memory operand, so in interpret mode
(CPU tests) each step copies the weight tile, transposed, into a scratch tile that wgmma reads
instead; everything else (pipeline, indexing, epilogue) is the compiled kernel's code.

Not yet compiled on a GPU: tested in Mosaic GPU interpret mode and lowered for CUDA on CPU, held
back by the kernel policy (``KernelPolicy(mosaic="always")`` opts in) until
``benchmarks/gpu_check.py`` has measured it (see ``jq.ops.kernels``).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.typing import ArrayLike

from jq import _compat
from jq.ops import reference
from jq.ops.mosaic_wo import rows_written, run_as_matrix, swizzled
from jq.qarray import QArray
from jq.qtypes import QType
from jq.spec import ActMode

SUPPORTED_QTYPES = (QType.INT8, QType.UINT8, QType.FP8_E4M3)
X_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(np.float16), np.dtype(np.float32))
OUT_DTYPES = X_DTYPES
TILE_K = 128    # 128 bytes of an 8-bit row: the widest wgmma swizzle
MIN_TILE_K = 64  # (64-byte swizzle) for K = 64 · odd, e.g. SmolLM2's 576
MIN_TILE_N = 64
MIN_STEPS_IN_FLIGHT = 2  # both tiles are held a step longer (delay_release=1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TileConfig:
  """Launch parameters of the Mosaic GPU W8A8 kernel.

  Attributes:
    tile_m: rows of ``x`` per program (64 or 128; wgmma's M is 64 per warpgroup).
    tile_n: output columns per program (64 or 128).
    tile_k: contraction elements per pipeline step: 128 (one swizzled 128-byte row), or 64
      where K is an odd multiple of 64.
    max_concurrent_steps: pipeline depth (TMA loads in flight).
  """
  tile_m: int
  tile_n: int
  tile_k: int = TILE_K
  max_concurrent_steps: int = 4


def _where(x_shape, x_dtype, w: QArray) -> str:
  return (f"mosaic w8a8: x {tuple(x_shape)} {np.dtype(x_dtype)}, w QArray({w.qtype.value}, "
          f"shape={w.shape}, tile={w.tile})")


def unsupported_reason(x_shape, x_dtype, w: QArray, dimension_numbers) -> str | None:
  """Why :func:`w8a8_dot_general` cannot run ``x × w`` (None when it can)."""
  where = _where(x_shape, x_dtype, w)
  a = w.activation
  if a is None:
    return (f"{where}: the weight carries no activation quantization (the weight-only kernels "
            "run it)")
  if w.qtype not in SUPPORTED_QTYPES:
    return f"{where}: needs an int8, uint8 or fp8 e4m3 weight"
  if (w.qtype is QType.FP8_E4M3) != (a.spec.qtype is QType.FP8_E4M3):
    return (f"{where}: activations {a.spec.qtype.value} and weight {w.qtype.value} must both be "
            "fp8 or both integer")
  if (why := reference.plain_matmul_reason(x_shape, w.shape, dimension_numbers)) is not None:
    return f"{where}: {why}"
  if np.dtype(x_dtype) not in X_DTYPES:
    return f"{where}: x dtype must be bfloat16, float16 or float32"
  c = len(tuple(dimension_numbers[0][0]))
  wm = reference.as_matrix(w, c)
  if wm is None or wm.scale.shape[0] != 1 or wm.scale.shape[1] not in (1, wm.shape[1]):
    return f"{where}: weight scales must be per output channel or per tensor"
  if a.spec.mode is ActMode.STATIC and (a.scale is None or np.size(a.scale) != 1):
    return f"{where}: static activation quantization needs one calibrated scale"
  k, n = int(wm.shape[0]), int(wm.shape[1])
  if k % MIN_TILE_K:
    return f"{where}: K = {k} is not a multiple of {MIN_TILE_K}"
  if n % MIN_TILE_N:
    return f"{where}: N = {n} is not a multiple of {MIN_TILE_N}"
  return None


def smem_bytes(cfg: TileConfig, out_bytes: int, stages: int) -> int:
  """Shared memory of a launch: per step the x and weight tiles (one byte per element); once the
  output tile and the epilogue's vectors (at most 3 per-row and 4 per-column, 4 bytes each)."""
  step = (cfg.tile_m + cfg.tile_n) * cfg.tile_k
  return stages * step + cfg.tile_m * cfg.tile_n * out_bytes + 4 * (3 * cfg.tile_m
                                                                     + 4 * cfg.tile_n)


def default_config(m: int, n: int, *, k: int, out_bytes: int) -> TileConfig:
  """Shape-based launch parameters (not yet tuned on a GPU): 128-row tiles past 64 rows, 128
  columns and 128-element K steps where N and K allow, the deepest pipeline (<= 4 steps) that
  fits shared memory."""
  cfg = TileConfig(tile_m=64 if m <= 64 else 128, tile_n=128 if n % 128 == 0 else 64,
                   tile_k=TILE_K if k % TILE_K == 0 else MIN_TILE_K)
  return _fit(cfg, out_bytes)


def _fit(cfg: TileConfig, out_bytes: int) -> TileConfig:
  per = smem_bytes(cfg, out_bytes, 1) - smem_bytes(cfg, out_bytes, 0)
  return dataclasses.replace(cfg, max_concurrent_steps=_compat.fit_stages(
      per, smem_bytes(cfg, out_bytes, 0), 4))


def _operands(x: jax.Array, w: QArray) -> tuple[jax.Array, jax.Array, list, list]:
  """The kernel's 8-bit operands and epilogue vectors: ``qx (M, K)``, ``qwᵀ (N, K)``, the
  per-row vectors ``[(name, (M,) array)]`` and per-column ones (float32 scales, int32 zero-point
  corrections)."""
  act = w.activation
  qx, sx, zx = reference.quantize_activations(x, (1,), act)
  m, k = x.shape
  n = int(w.shape[1])
  rows = [("sx", jnp.broadcast_to(jnp.reshape(sx, (-1,)), (m,)).astype(jnp.float32))]
  cols = [("sw", jnp.broadcast_to(jnp.reshape(w.scale, (-1,)), (n,)).astype(jnp.float32))]
  qw = w.unpacked()
  if w.qtype is QType.FP8_E4M3:
    return qx, qw.T, rows, cols
  qx8, qx32, zx = reference._to_int8(qx, zx, act.spec.qtype)
  qw8, qw32, zw = reference._to_int8(qw, w.zero_point, w.qtype)
  if zw is not None:  # − zw[n] · (Sx[m] − K·zx[m])
    sx_sum = jnp.sum(qx32, axis=1, dtype=jnp.int32)
    if zx is not None:
      sx_sum = sx_sum - jnp.int32(k) * jnp.reshape(zx, (-1,))
    rows.append(("zw_rows", jnp.broadcast_to(sx_sum, (m,))))
    cols.append(("zw", jnp.broadcast_to(jnp.reshape(zw, (-1,)), (n,))))
  if zx is not None:  # − zx[m] · Sw[n]
    rows.append(("zx", jnp.broadcast_to(jnp.reshape(zx, (-1,)), (m,))))
    cols.append(("zx_cols", jnp.sum(qw32, axis=0, dtype=jnp.int32)))
  return qx8, qw8.T, rows, cols


@functools.partial(jax.jit, static_argnames=("out_dtype", "tile_m", "tile_n", "tile_k",
                                             "max_concurrent_steps", "interpret"))
def w8a8_matmul_2d(x: jax.Array, w: QArray, bias: jax.Array | None = None, *, out_dtype=None,
                   tile_m: int | None = None, tile_n: int | None = None,
                   tile_k: int | None = None, max_concurrent_steps: int | None = None,
                   interpret: bool = False) -> jax.Array:
  """``x (M, K) @ w (K, N) -> (M, N)`` with ``w``'s activation quantization, the Mosaic GPU kernel.

  Args:
    x: float activations ``(M, K)`` (bfloat16, float16 or float32).
    w: a supported 2-D QArray carrying ``w.activation`` (see :func:`unsupported_reason`).
    bias: optional ``(N,)``, added in float32 in the epilogue.
    out_dtype: bfloat16, float16 or float32 (default ``x.dtype``).
    tile_m, tile_n, tile_k, max_concurrent_steps: launch overrides (:class:`TileConfig`).
    interpret: run in Mosaic GPU interpret mode (CPU, tests).
  """
  plgpu = _compat.mosaic_gpu()
  m, k = x.shape
  n = int(w.shape[1])
  out_dtype = np.dtype(out_dtype or x.dtype)
  if out_dtype not in OUT_DTYPES:
    raise ValueError(f"mosaic w8a8: out_dtype {out_dtype} is not one of "
                     f"{[str(d) for d in OUT_DTYPES]}")
  if (why := unsupported_reason(x.shape, x.dtype, w, (((1,), (0,)), ((), ())))) is not None:
    raise NotImplementedError(why)
  ob = out_dtype.itemsize
  cfg = dataclasses.replace(default_config(m, n, k=k, out_bytes=ob), **{f: v for f, v in dict(
      tile_m=tile_m, tile_n=tile_n, tile_k=tile_k,
      max_concurrent_steps=max_concurrent_steps).items()
      if v is not None})
  if (cfg.tile_m not in (64, 128) or cfg.tile_n not in (64, 128) or n % cfg.tile_n
      or cfg.tile_k not in (MIN_TILE_K, TILE_K) or k % cfg.tile_k):
    raise ValueError(f"mosaic w8a8: tile_m={cfg.tile_m}, tile_n={cfg.tile_n}, tile_k="
                     f"{cfg.tile_k}: expected 64 or 128, tile_n dividing N = {n} and tile_k "
                     f"K = {k}")
  if max_concurrent_steps is None:  # the overrides' tiles may fit fewer steps
    cfg = _fit(cfg, ob)
  if cfg.max_concurrent_steps < MIN_STEPS_IN_FLIGHT:
    raise ValueError(f"mosaic w8a8: max_concurrent_steps={cfg.max_concurrent_steps}: needs >= "
                     f"{MIN_STEPS_IN_FLIGHT} (both tiles are held one step longer)")
  if (need := smem_bytes(cfg, ob, cfg.max_concurrent_steps)) > _compat.SMEM_BUDGET:
    raise ValueError(f"mosaic w8a8: {cfg} needs {need} bytes of shared memory (budget "
                     f"{_compat.SMEM_BUDGET}): use smaller tiles")
  qx, qwt, rows, cols = _operands(x, w)
  if bias is not None:
    if tuple(bias.shape) != (n,):
      raise ValueError(f"mosaic w8a8: bias shape {tuple(bias.shape)} != ({n},)")
    cols.append(("bias", bias.astype(jnp.float32)))
  tm, tn, tk = cfg.tile_m, cfg.tile_n, cfg.tile_k
  mp = -(-m // tm) * tm
  if mp != m:  # rows past M are zeros (and cut off the output)
    qx = jnp.pad(qx, ((0, mp - m), (0, 0)))
    rows = [(name, jnp.pad(v, (0, mp - m))) for name, v in rows]
  out_rows = rows_written(m, tm)
  n_out = min(out_rows, tm)  # rows per program
  fp8 = w.qtype is QType.FP8_E4M3
  acc_dtype = jnp.float32 if fp8 else jnp.int32
  op_dtype = qx.dtype
  names = [name for name, _ in rows] + [name for name, _ in cols]
  vecs = [v for _, v in rows] + [v for _, v in cols]
  n_rows, n_vecs = len(rows), len(rows) + len(cols)
  op_tf = swizzled(tk, op_dtype)

  def kernel(x_gmem, wt_gmem, *refs):
    vec_gmem = refs[:n_vecs]
    out_gmem = refs[n_vecs]
    out_smem, barrier, *vec_smem = refs[n_vecs + 1:n_vecs + 3 + n_vecs]
    w_scratch = refs[n_vecs + 3 + n_vecs:]

    def with_acc(acc):
      mi, ni = lax.axis_index("m"), lax.axis_index("n")
      for i in range(n_vecs):  # the epilogue's vectors, fetched while the pipeline runs
        at = pl.ds(mi * tm, tm) if i < n_rows else pl.ds(ni * tn, tn)
        plgpu.copy_gmem_to_smem(vec_gmem[i].at[at], vec_smem[i], barrier.at[i])

      def step(_, x_smem, wt_smem):
        if w_scratch:  # interpret mode: wgmma reads a transposed copy (see the module docstring)
          w_scratch[0][...] = wt_smem[...].T
          plgpu.commit_smem()
          b = w_scratch[0]
        else:  # K-major: what wgmma needs of an 8-bit operand
          b = plgpu.transpose_ref(wt_smem, (1, 0))
        plgpu.wgmma(acc, x_smem, b)
        plgpu.wgmma_wait(1)  # the previous step's MMA is done: its tiles are released

      plgpu.emit_pipeline(
          step, grid=(k // tk,), max_concurrent_steps=cfg.max_concurrent_steps,
          in_specs=[plgpu.BlockSpec((tm, tk), lambda s: (mi, s), transforms=op_tf,
                                    delay_release=1),
                    plgpu.BlockSpec((tn, tk), lambda s: (ni, s), transforms=op_tf,
                                    delay_release=1)],
      )(x_gmem, wt_gmem)
      plgpu.wgmma_wait(0)
      y = acc[...]
      vec = {}
      for i, name in enumerate(names):
        plgpu.barrier_wait(barrier.at[i])
        vec[name] = lax.broadcast_in_dim(vec_smem[i][...], y.shape, [0 if i < n_rows else 1])
      if "zw" in vec:  # int32, wrapping like the reference's sums
        y = y - vec["zw"] * vec["zw_rows"]
      if "zx" in vec:
        y = y - vec["zx"] * vec["zx_cols"]
      y = y.astype(jnp.float32) * vec["sx"] * vec["sw"]
      if "bias" in vec:
        y = y + vec["bias"]
      out_smem[...] = y.astype(out_dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(out_smem.at[pl.ds(0, n_out)],
                              out_gmem.at[pl.ds(mi * tm, n_out), pl.ds(ni * tn, tn)])
      plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(with_acc, plgpu.ACC((tm, tn), acc_dtype))

  scratch = [plgpu.SMEM((tm, tn), out_dtype, transforms=swizzled(tn, out_dtype)),
             plgpu.Barrier(num_barriers=n_vecs),
             *[plgpu.SMEM((tm if i < n_rows else tn,), v.dtype) for i, v in enumerate(vecs)]]
  if interpret:
    scratch.append(plgpu.SMEM((tk, tn), op_dtype, transforms=swizzled(tn, op_dtype)))
  call = plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((out_rows, n), out_dtype),
      grid=(mp // tm, n // tn), grid_names=("m", "n"), scratch_types=scratch,
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=_compat.gpu_interpret_params() if interpret else False)
  return call(qx, qwt, *vecs)[:m]


def w8a8_dot_general(x: ArrayLike, w: QArray, dimension_numbers, precision=None,
                     preferred_element_type=None, *, out_sharding=None,
                     interpret: bool | None = None, **tiles: Any) -> jax.Array:
  """Mosaic GPU twin of :func:`jq.ops.reference.int8_dot_general` (int8 / uint8 weights) and
  :func:`jq.ops.reference.fp8_dot_general` (fp8 e4m3), for ``x[..., K] · w[K, N...]``
  (``DenseGeneral`` kernels run as their 2-D matrix, :func:`jq.ops.reference.as_matrix`).
  ``precision`` is unused (8-bit operands).

  Example:
    >>> qw = jq.tree.with_activation(jq.quantize(w, jq.W8A16), jq.A8_DYNAMIC, None, path="w",
    ...                              leaf=w)
    >>> y = w8a8_dot_general(x, qw, (((x.ndim - 1,), (0,)), ((), ())))
  """
  del precision
  return run_as_matrix(w8a8_matmul_2d, unsupported_reason, "mosaic w8a8", x, w, dimension_numbers,
                       preferred_element_type, out_sharding=out_sharding, interpret=interpret,
                       out_dtypes=OUT_DTYPES, **tiles)


__all__ = ["TileConfig", "default_config", "unsupported_reason", "w8a8_matmul_2d",
           "w8a8_dot_general", "SUPPORTED_QTYPES"]
