"""Pallas Mosaic GPU (Hopper: TMA loads, wgmma) weight-only matmul: ``y = x @ dequantize(w)``.

Twin of :func:`jq.ops.reference.weight_only_dot_general`, for prefill-sized problems (where the
Triton kernels of :mod:`jq.ops.pallas_wo` trail bf16: 1.5-6.7x its time at M >= 256 on an H100)
and, split along K, for decode-sized ones.
Supported weights: 2-D ``(K, N)`` QArrays (or DenseGeneral kernels that flatten to one, as
:func:`jq.ops.reference.as_matrix`) of type int8 / uint8 / int4 / uint4, per-channel, per-tensor
or group-wise along K (group a multiple of 64), with or without zero points; ``x`` bfloat16 or
float16.  K must be a multiple of 64 and N (int4: N / 2) of 64 (real models: 576, 1536, 2048,
8192 ...); other shapes stay on the Triton kernel or XLA (:func:`unsupported_reason`).

Each program computes a ``(tile_m, tile_n)`` output tile (x's rows padded to a whole tile).  A
pipeline (``plgpu.emit_pipeline``) brings, per ``tile_k`` step, the x tile (swizzled for wgmma),
the int8 weight tile and that step's group-scale and zero-point rows into shared memory by TMA.
The weight tile is dequantized in registers and written back to shared memory in x's dtype:
group-wise ``(q − zp) · s`` in float32 rounded once (what ``dequantize`` computes); per channel
just ``q − zp``, an integer exact in 16 bits, with ``s`` applied to the float32 sum in the
epilogue (as the reference does).  ``wgmma`` multiplies it into a float32 accumulator
asynchronously: two dequantization slots and the x tile held one step longer
(``delay_release``) let step ``s + 1``'s dequantization run while step ``s``'s MMA does.  int4
bytes hold column ``2j`` in the low nibble and ``2j + 1`` in the high one: the two nibbles are
two *planes*, each with its own dequantized tile, accumulator and output (of ``N / 2`` columns,
with the scales' even / odd columns), interleaved by XLA afterwards.

Decode (few rows, so few output tiles: 16 for a 2048-column int4 weight, on a GPU of 132 SMs)
splits K into ``split_k`` slices (:func:`default_config`): a third grid axis whose programs each
contract one slice into a float32 partial tile, summed by XLA.  wgmma's 64 rows are computed
for x's few (zero-padded) rows, but only ``M`` rounded up to 8 rows are written back.

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
from jq.ops import pallas_wo, reference
from jq.qarray import QArray
from jq.qtypes import QType

SUPPORTED_QTYPES = (QType.INT8, QType.UINT8, QType.INT4, QType.UINT4)
X_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(np.float16))
OUT_DTYPES = X_DTYPES + (np.dtype(np.float32),)
TILE_K = 64     # 128 bytes of a 16-bit x row: the widest wgmma swizzle
MIN_TILE_N = 64


@dataclasses.dataclass(frozen=True, kw_only=True)
class TileConfig:
  """Launch parameters of the Mosaic GPU weight-only kernel.

  Attributes:
    tile_m: rows of ``x`` per program (64 or 128; wgmma's M is 64 per warpgroup).
    tile_n: output columns per program and plane (64 or 128).
    tile_k: contraction rows per pipeline step (64; divides the scale group).
    max_concurrent_steps: pipeline depth (TMA loads in flight).
    split_k: programs sharing one output tile, each contracting ``K / split_k`` rows into a
      float32 partial tile (summed by XLA): decode-sized problems have too few output tiles to
      occupy the GPU's SMs otherwise.
  """
  tile_m: int
  tile_n: int
  tile_k: int = TILE_K
  max_concurrent_steps: int = 4
  split_k: int = 1


def _plane_cols(w: QArray) -> int:
  """Columns of one plane: N, or N / 2 bytes for int4 (two planes)."""
  return int(w.values.shape[1])


def unsupported_reason(x_shape, x_dtype, w: QArray, dimension_numbers) -> str | None:
  """Why :func:`weight_only_dot_general` cannot run ``x × w`` (None when it can)."""
  if (why := pallas_wo.unsupported_reason(x_shape, x_dtype, w, dimension_numbers)) is not None:
    return why.replace("pallas weight-only", "mosaic weight-only", 1)
  where = f"mosaic weight-only: x {tuple(x_shape)} {np.dtype(x_dtype)}, w QArray(" \
          f"{w.qtype.value}, shape={w.shape}, tile={w.tile})"
  if np.dtype(x_dtype) not in X_DTYPES:
    return f"{where}: x dtype must be bfloat16 or float16 (wgmma's 16-bit operands)"
  c = len(tuple(dimension_numbers[0][0]))
  wm = reference.as_matrix(w, c)
  k = int(wm.shape[0])
  if k % TILE_K:
    return f"{where}: K = {k} is not a multiple of {TILE_K}"
  cols = _plane_cols(wm)
  if cols % MIN_TILE_N:
    what = "bytes of packed columns" if wm.qtype.storage_bits == 4 else "columns"
    return f"{where}: {cols} {what} are not a multiple of {MIN_TILE_N}"
  group = reference.group_rows(wm)
  if group is not None and group % TILE_K:
    return f"{where}: K group size {group} is not a multiple of {TILE_K}"
  return None


def smem_bytes(cfg: TileConfig, planes: int, x_bytes: int, out_bytes: int, zp: bool,
               stages: int) -> int:
  """Shared memory of a launch: per pipeline step the x tile, the int8 weight tile and the scale
  (and zero-point) rows, plus one x tile held a step longer (``delay_release``); once two slots
  of dequantized tiles, the output tiles and the epilogue's scale rows, per plane."""
  rows = planes * (2 if zp else 1) * cfg.tile_n * 4
  x_tile = cfg.tile_m * cfg.tile_k * x_bytes
  step = x_tile + cfg.tile_k * cfg.tile_n + rows
  fixed = planes * (2 * cfg.tile_k * cfg.tile_n * x_bytes + cfg.tile_m * cfg.tile_n * out_bytes
                    + cfg.tile_n * 4)
  return stages * step + x_tile + fixed


MIN_STEPS_IN_FLIGHT = 2  # the x tile is held a step longer (delay_release=1): one slot deadlocks


def _fit(cfg: TileConfig, planes: int, x_bytes: int, out_bytes: int, zp: bool) -> TileConfig:
  """``cfg`` with the deepest pipeline (<= 4 steps) whose shared memory fits."""
  per = (smem_bytes(cfg, planes, x_bytes, out_bytes, zp, 1)
         - smem_bytes(cfg, planes, x_bytes, out_bytes, zp, 0))
  fixed = smem_bytes(cfg, planes, x_bytes, out_bytes, zp, 0)
  return dataclasses.replace(cfg, max_concurrent_steps=_compat.fit_stages(per, fixed, 4))


MIN_SLICE_STEPS = 2  # K steps per split-K slice: one step would leave nothing to pipeline


def rows_written(m: int, tile_m: int) -> int:
  """Output rows a launch writes: whole row tiles, or for a single tile (decode) only ``m``
  rounded up to the shared-memory tiling's 8 rows."""
  return -(-m // 8) * 8 if m <= tile_m else -(-m // tile_m) * tile_m


def split_k_for(tiles: int, steps: int, sms: int, limit: int) -> int:
  """K slices per output tile: the fewest that give ``tiles × split >= sms`` programs (one wave
  on every SM), each of ``>= MIN_SLICE_STEPS`` K steps, dividing ``steps`` and at most
  ``limit``; 1 when the tiles alone fill the SMs (prefill)."""
  best = 1
  for d in range(1, min(steps // MIN_SLICE_STEPS, limit) + 1):
    if tiles * best >= sms:
      break
    if steps % d == 0:
      best = d
  return best


def default_config(m: int, cols: int, *, k: int, planes: int, x_bytes: int, out_bytes: int,
                   zp: bool, sms: int | None = None) -> TileConfig:
  """Shape-based launch parameters (not yet tuned on a GPU): the widest ``tile_n`` dividing the
  plane's columns that still leaves >= 2 pipeline steps in flight (the smallest tiles always do:
  2 x (8 + 4 + 1) KiB per step + 74 KiB), and for problems with fewer output tiles than the GPU
  has SMs (decode) K split into slices (:func:`split_k_for`; ``sms``: the GPU's, default
  :func:`jq._compat.num_sms`).  The slices' float32 partial sums are written and read back
  (8 bytes per element, slice and plane): at most ``K / (8 · rows · planes)`` slices keep that
  traffic within the weight's own bytes (K per stored column)."""
  tile_m = 64 if m <= 64 else 128
  sms = _compat.num_sms() if sms is None else sms
  for tile_m, tile_n in ((tile_m, 128), (tile_m, 64), (64, 64)):
    if cols % tile_n:
      continue
    split = split_k_for(-(-m // tile_m) * (cols // tile_n), k // TILE_K, sms,
                        limit=k // (8 * rows_written(m, tile_m) * planes))
    cfg = _fit(TileConfig(tile_m=tile_m, tile_n=tile_n, split_k=split), planes, x_bytes,
               4 if split > 1 else out_bytes, zp)  # (split K: float32 partial tiles)
    if cfg.max_concurrent_steps >= MIN_STEPS_IN_FLIGHT:
      break
  return cfg


def swizzled(cols: int, dtype) -> tuple[Any, ...]:
  """Tiling and swizzle transforms of a shared-memory tile whose rows have ``cols`` elements."""
  plgpu = _compat.mosaic_gpu()
  bits = np.dtype(dtype).itemsize * 8
  swizzle = plgpu.find_swizzle(cols * bits, "jq")
  return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


def _planes(w: QArray, n: int) -> tuple[list[jax.Array], list[jax.Array] | None]:
  """Per plane: the scale and zero-point rows, flattened ``(groups * cols,)`` (float32)."""
  scale, zp = w.scale, w.zero_point
  groups = int(scale.shape[0])
  if scale.shape[1] != n:  # per tensor along N: a few bytes, broadcast once
    scale = jnp.broadcast_to(scale, (groups, n))
    zp = None if zp is None else jnp.broadcast_to(zp, (groups, n))
  cut = ((slice(None),) if w.qtype.storage_bits == 8 else
         (slice(0, None, 2), slice(1, None, 2)))
  flat = lambda a, c: a[:, c].astype(jnp.float32).reshape(-1)
  return ([flat(scale, c) for c in cut],
          None if zp is None else [flat(zp, c) for c in cut])


@functools.partial(jax.jit, static_argnames=("out_dtype", "tile_m", "tile_n",
                                             "max_concurrent_steps", "split_k", "interpret"))
def wo_matmul_2d(x: jax.Array, w: QArray, *, out_dtype=None, tile_m: int | None = None,
                 tile_n: int | None = None, max_concurrent_steps: int | None = None,
                 split_k: int | None = None, interpret: bool = False) -> jax.Array:
  """``x (M, K) @ dequantize(w) (K, N) -> (M, N)`` with the Mosaic GPU kernel.

  Args:
    x: bfloat16 / float16 activations ``(M, K)``.
    w: a supported QArray of shape ``(K, N)`` (see :func:`unsupported_reason`).
    out_dtype: bfloat16, float16 or float32 (default ``x.dtype``).
    tile_m, tile_n, max_concurrent_steps, split_k: launch overrides (:class:`TileConfig`).
    interpret: run in Mosaic GPU interpret mode (CPU, tests).
  """
  plgpu = _compat.mosaic_gpu()
  m, k = x.shape
  n = int(w.shape[1])
  out_dtype = np.dtype(out_dtype or x.dtype)
  if out_dtype not in OUT_DTYPES:
    raise ValueError(f"mosaic weight-only: out_dtype {out_dtype} is not one of "
                     f"{[str(d) for d in OUT_DTYPES]}")
  if (why := unsupported_reason(x.shape, x.dtype, w, (((1,), (0,)), ((), ())))) is not None:
    raise NotImplementedError(why)
  packed = w.qtype.storage_bits == 4
  n_planes = 2 if packed else 1
  cols = _plane_cols(w)
  scales, zps = _planes(w, n)
  xb, ob = np.dtype(x.dtype).itemsize, out_dtype.itemsize
  cfg = default_config(m, cols, k=k, planes=n_planes, x_bytes=xb, out_bytes=ob,
                       zp=zps is not None)
  cfg = dataclasses.replace(cfg, **{f: v for f, v in dict(
      tile_m=tile_m, tile_n=tile_n, max_concurrent_steps=max_concurrent_steps,
      split_k=split_k).items() if v is not None})
  if cfg.tile_m not in (64, 128) or cfg.tile_n not in (64, 128) or cols % cfg.tile_n:
    raise ValueError(f"mosaic weight-only: tile_m={cfg.tile_m}, tile_n={cfg.tile_n}: expected "
                     f"64 or 128, tile_n dividing the {cols} plane columns")
  tm, tn, tk, split = cfg.tile_m, cfg.tile_n, cfg.tile_k, cfg.split_k
  if split < 1 or (k // tk) % split:
    raise ValueError(f"mosaic weight-only: split_k={split} does not divide the {k // tk} "
                     f"K steps of {tk} rows")
  part_dtype = np.dtype(np.float32) if split > 1 else out_dtype  # split K: float32 partials
  launch = (n_planes, xb, part_dtype.itemsize, zps is not None)
  if max_concurrent_steps is None:  # the overrides' tiles and output may fit fewer steps
    cfg = _fit(cfg, *launch)
  if (need := smem_bytes(cfg, *launch, max(cfg.max_concurrent_steps, MIN_STEPS_IN_FLIGHT))
      ) > _compat.SMEM_BUDGET:
    raise ValueError(f"mosaic weight-only: {cfg} needs {need} bytes of shared memory with "
                     f"{MIN_STEPS_IN_FLIGHT}+ steps in flight (budget {_compat.SMEM_BUDGET}): "
                     f"use smaller tiles")
  if cfg.max_concurrent_steps < MIN_STEPS_IN_FLIGHT:
    raise ValueError(f"mosaic weight-only: max_concurrent_steps={cfg.max_concurrent_steps}: "
                     f"needs >= {MIN_STEPS_IN_FLIGHT} (the x tile is held one step longer)")
  mp = -(-m // tm) * tm
  if mp != m:  # rows past M are zeros (and cut off the output)
    x = jnp.pad(x, ((0, mp - m), (0, 0)))
  grid_m, grid_n, steps = mp // tm, cols // tn, k // tk // split
  out_rows = rows_written(m, tm)
  rows = min(out_rows, tm)  # per program
  group = reference.group_rows(w)
  grouped = group is not None
  group_steps = group // tk if grouped else k // tk
  signed, has_zp = w.qtype.signed, zps is not None
  dt = np.dtype(x.dtype)
  x_tf, q_tf = swizzled(tk, dt), swizzled(tn, np.int8)
  wd_tf, out_tf = swizzled(tn, dt), swizzled(tn, part_dtype)
  # rows the pipeline brings per step: group scales (grouped only), zero points; per-channel
  # scales are read once, for the epilogue
  n_rows = n_planes * (int(grouped) + int(has_zp))

  def kernel(x_gmem, q_gmem, *refs):
    scale_gmem = refs[:n_planes]
    rows_gmem = refs[n_planes * (1 - grouped):n_planes * (1 - grouped) + n_rows]
    outs = refs[n_planes + n_planes * has_zp:n_planes * (2 + has_zp)]
    wd_smem, out_smem, s_smem, s_barrier = refs[n_planes * (2 + has_zp):]

    def with_accs(*accs):
      mi, ni, ki = lax.axis_index("m"), lax.axis_index("n"), lax.axis_index("k")
      k0 = ki * steps  # this program's first K step
      if not grouped:  # the epilogue's scales, fetched while the pipeline runs
        for p in range(n_planes):
          plgpu.copy_gmem_to_smem(scale_gmem[p].at[pl.ds(ni * tn, tn)], s_smem.at[p],
                                  s_barrier.at[p])

      def step(idx, x_smem, q_smem, *row_smem):
        wd = wd_smem.at[idx[0] % 2]  # this step's dequantization overlaps the last one's MMA
        q = q_smem[...]
        if packed:  # low nibble: even columns, high nibble: odd ones; signed: (u ^ 8) − 8
          q = q.astype(jnp.int32)  # (pointwise 8-bit arithmetic does not lower)
          nibbles = (q & 0xF, (q >> 4) & 0xF)
          vals = [(v ^ 8).astype(jnp.float32) - 8.0 if signed else v.astype(jnp.float32)
                  for v in nibbles]
        else:
          vals = [q.astype(jnp.float32)]
        for p, v in enumerate(vals):
          row = lambda r: lax.broadcast_in_dim(r[...], v.shape, [1])
          if has_zp:
            v = v - row(row_smem[n_planes * grouped + p])
          if grouped:  # else q − zp is an integer (|q − zp| <= 255): exact in 16 bits
            v = v * row(row_smem[p])
          wd.at[p][...] = v.astype(dt)
        plgpu.commit_smem()  # the dequantized tiles are visible to wgmma
        for p in range(n_planes):
          plgpu.wgmma(accs[p], x_smem, wd.at[p])
        # the previous step's MMA is done: its wd slot is free and its x tile released (the x
        # spec's delay_release); this step's MMA keeps running into the next dequantization
        plgpu.wgmma_wait(1)

      row_spec = plgpu.BlockSpec((tn,), lambda s: (((k0 + s) // group_steps) * grid_n + ni,))
      plgpu.emit_pipeline(
          step, grid=(steps,), max_concurrent_steps=cfg.max_concurrent_steps,
          in_specs=[plgpu.BlockSpec((tm, tk), lambda s: (mi, k0 + s), transforms=x_tf,
                                    delay_release=1),
                    plgpu.BlockSpec((tk, tn), lambda s: (k0 + s, ni), transforms=q_tf),
                    *[row_spec] * n_rows],
      )(x_gmem, q_gmem, *rows_gmem)
      plgpu.wgmma_wait(0)
      for p in range(n_planes):
        y = accs[p][...]
        if not grouped:
          plgpu.barrier_wait(s_barrier.at[p])
          y = y * lax.broadcast_in_dim(s_smem.at[p][...], y.shape, [1])
        out_smem.at[p][...] = y.astype(part_dtype)
      plgpu.commit_smem()
      for p in range(n_planes):
        dst = outs[p].at[ki] if split > 1 else outs[p]
        plgpu.copy_smem_to_gmem(out_smem.at[p, pl.ds(0, rows)],
                                dst.at[pl.ds(mi * tm, rows), pl.ds(ni * tn, tn)])
      plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(with_accs, *[plgpu.ACC((tm, tn), jnp.float32)] * n_planes)

  call = plgpu.kernel(
      kernel,
      out_type=[jax.ShapeDtypeStruct((split,) * (split > 1) + (out_rows, cols), part_dtype)]
      * n_planes,
      grid=(grid_m, grid_n, split), grid_names=("m", "n", "k"),
      scratch_types=[plgpu.SMEM((2, n_planes, tk, tn), dt, transforms=wd_tf),
                     plgpu.SMEM((n_planes, tm, tn), part_dtype, transforms=out_tf),
                     plgpu.SMEM((n_planes, tn), jnp.float32),
                     plgpu.Barrier(num_barriers=n_planes)],
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=_compat.gpu_interpret_params() if interpret else False)
  ys = call(x, w.values, *scales, *(zps or []))
  if split > 1:  # the K slices' partial sums
    ys = [y.sum(axis=0) for y in ys]
  y = ys[0] if n_planes == 1 else jnp.stack(ys, axis=-1).reshape(out_rows, n)
  return y[:m].astype(out_dtype)


def weight_only_dot_general(x: ArrayLike, w: QArray, dimension_numbers, precision=None,
                            preferred_element_type=None, *, out_sharding=None,
                            interpret: bool | None = None, **tiles: Any) -> jax.Array:
  """Mosaic GPU twin of :func:`jq.ops.reference.weight_only_dot_general` (the layouts of
  :func:`jq.ops.pallas_wo.weight_only_dot_general`; ``precision`` is unused: 16-bit operands).

  Example:
    >>> w = jq.quantize(kernel, jq.W4A16_G128)
    >>> y = weight_only_dot_general(x.astype(jnp.bfloat16), w, (((x.ndim - 1,), (0,)), ((), ())))
  """
  del precision
  return run_as_matrix(wo_matmul_2d, unsupported_reason, "mosaic weight-only", x, w,
                       dimension_numbers, preferred_element_type, out_sharding=out_sharding,
                       interpret=interpret, out_dtypes=OUT_DTYPES, **tiles)


def run_as_matrix(matmul_2d, why_not, what: str, x: ArrayLike, w: QArray, dimension_numbers,
                  preferred_element_type, *, out_sharding, interpret: bool | None, out_dtypes,
                  **tiles: Any) -> jax.Array:
  """The ``dot_general`` entry of a Mosaic GPU kernel (this module's and
  :mod:`jq.ops.mosaic_w8a8`'s): refuses ``out_sharding`` and what ``why_not(x_shape, x_dtype, w,
  dimension_numbers)`` names, runs ``matmul_2d`` on the 2-D matrices
  (:func:`jq.ops.reference.matrix_matmul`) in the output dtype when the kernel writes it (else
  float32), interpret mode by default off a GPU."""
  x = jnp.asarray(x)
  interpret = _compat.default_interpret() if interpret is None else interpret
  if out_sharding is not None:
    raise NotImplementedError(f"{what}: out_sharding is not supported")
  if (why := why_not(x.shape, x.dtype, w, dimension_numbers)) is not None:
    raise NotImplementedError(why)
  out_dtype = np.dtype(preferred_element_type or x.dtype)
  kernel_dtype = out_dtype if out_dtype in out_dtypes else np.dtype(np.float32)
  return reference.matrix_matmul(matmul_2d, x, w, dimension_numbers, out_dtype=kernel_dtype,
                                 interpret=interpret, **tiles).astype(out_dtype)


__all__ = ["TileConfig", "default_config", "unsupported_reason", "wo_matmul_2d",
           "weight_only_dot_general", "SUPPORTED_QTYPES"]
