"""The Pallas Mosaic GPU W8A8 kernel (int8 × int8 -> int32, fp8 × fp8 -> float32) equals its XLA
reference twins, :func:`jq.ops.reference.int8_dot_general` and ``fp8_dot_general``.

On CPU the kernel runs in Mosaic GPU interpret mode and is *lowered* for CUDA (the whole Mosaic
GPU lowering, including wgmma's operand checks: an 8-bit operand that is not K-major is refused
there).  On a GPU the same tests run the compiled kernel.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jq
from jq import _compat
from jq import spec as S
from jq.ops import dispatch, mosaic_w8a8, reference
from jq.qtypes import QType
from jq.quantize import quantize as _quantize_eager

pytestmark = pytest.mark.skipif(not _compat.has_mosaic_gpu(), reason="no Pallas Mosaic GPU here")

ON_GPU = _compat.on_gpu()
INTERPRET = not ON_GPU     # on a GPU the same tests run the compiled kernel
quantize = jax.jit(_quantize_eager, static_argnums=1)
MOSAIC = jq.KernelPolicy(mosaic="always")
UINT8_ASYM = S.QuantSpec(qtype=QType.UINT8, symmetric=False)
INT8_TENSOR = S.QuantSpec(qtype=QType.INT8, granularity=S.Granularity.TENSOR)
FP8_TENSOR = dataclasses.replace(S.FP8_CHANNEL, granularity=S.Granularity.TENSOR)


def _dn(c: int, x_ndim: int):
  return ((tuple(range(x_ndim - c, x_ndim)), tuple(range(c))), ((), ()))


def _w8a8(w, wspec, aspec, *, layout=None, x=None):
  """``w`` quantized with ``wspec``, carrying ``aspec`` (static: the scale (and zero point) of
  ``x``'s range, as calibration would give)."""
  q = _quantize_eager(w, wspec, layout=layout) if layout else quantize(w, wspec)
  static = None
  if aspec.mode is S.ActMode.STATIC:
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    qt = aspec.qtype
    if aspec.symmetric:
      static = (jnp.float32(max(-lo, hi) / qt.qmax), None)
    else:
      s = (hi - lo) / (qt.qmax - qt.qmin)
      static = (jnp.float32(s), jnp.int32(round(qt.qmin - lo / s)))
  return jq.tree.with_activation(q, aspec, static, path="w", leaf=w)


def _data(x_shape, w_shape, seed=0, dtype=jnp.bfloat16):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal(x_shape), dtype)
  return x, jnp.asarray(rng.standard_normal(w_shape) * 0.1, jnp.float32)


def _assert_same(y, yr, *, exact: bool = True):
  """Integer W8A8: the int32 sum is exact and rescaled as the reference does, so interpret mode
  gives the same float32 values (compiled: within an ulp or so); fp8: float32 sums in another
  order."""
  y, yr = np.asarray(y, np.float32), np.asarray(yr, np.float32)
  if exact and INTERPRET:
    np.testing.assert_array_equal(y, yr)
  else:
    tol = 1e-6 if exact else 1e-5
    np.testing.assert_allclose(y, yr, rtol=tol, atol=tol * float(np.abs(yr).max()))


def _reference(x, q, dn, out=jnp.float32):
  twin = reference.fp8_dot_general if q.qtype is QType.FP8_E4M3 else reference.int8_dot_general
  return twin(x, q, dn, None, out)


# (weight spec, activation spec, x shape, w shape): per channel / per tensor, dynamic / static,
# zero points on either side (uint8 weights shifted into int8), fp8; M not a multiple of the tile
# (padded rows, a decode-sized M), two tiles along N and three K steps
CASES = [
    (S.W8A16, S.A8_DYNAMIC, (70, 256), (256, 128)),
    (S.W8A16, S.A8_DYNAMIC, (5, 192), (192, 64)),  # K = 3 · 64: 64-element K steps
    (UINT8_ASYM, S.A8_DYNAMIC_ASYM, (3, 384), (384, 192)),
    (INT8_TENSOR, S.A8_STATIC, (130, 128), (128, 128)),
    (UINT8_ASYM, dataclasses.replace(S.A8_STATIC, symmetric=False), (2, 5, 128), (128, 64)),
    (S.FP8_CHANNEL, S.A_FP8_DYNAMIC, (64, 256), (256, 256)),
    (FP8_TENSOR, S.A_FP8_STATIC, (9, 128), (128, 128)),
]


def _id(v):
  return v.describe() if hasattr(v, "describe") else str(v)


@pytest.mark.parametrize("wspec,aspec,x_shape,w_shape", CASES, ids=_id)
def test_w8a8_equals_reference(wspec, aspec, x_shape, w_shape):
  x, w = _data(x_shape, w_shape)
  q = _w8a8(w, wspec, aspec, x=x)
  dn = _dn(1, x.ndim)
  y = mosaic_w8a8.w8a8_dot_general(x, q, dn, preferred_element_type=jnp.float32,
                                   interpret=INTERPRET)
  assert y.shape == x.shape[:-1] + w.shape[1:] and y.dtype == jnp.float32
  _assert_same(y, _reference(x, q, dn), exact=wspec.qtype is not QType.FP8_E4M3)


def test_bias_output_dtypes_and_dense_general_heads():
  """The epilogue's bias; bfloat16 / float16 outputs; a DenseGeneral ``(d, heads, head_dim)``
  kernel and its ``(heads, head_dim, d)`` output projection run as their 2-D matrices."""
  x, w = _data((40, 256), (256, 128), seed=1, dtype=jnp.float16)
  q = _w8a8(w, S.W8A16, S.A8_DYNAMIC)
  bias = jnp.linspace(-1, 1, 128, dtype=jnp.float32)
  y = mosaic_w8a8.w8a8_matmul_2d(x, q, bias, out_dtype=jnp.float32, interpret=INTERPRET)
  _assert_same(y, _reference(x, q, _dn(1, 2)) + bias[None])
  y16 = mosaic_w8a8.w8a8_dot_general(x, q, _dn(1, 2), interpret=INTERPRET)
  assert y16.dtype == jnp.float16
  _assert_same(y16, _reference(x, q, _dn(1, 2), jnp.float16))
  with pytest.raises(ValueError, match=r"bias shape \(64,\)"):
    mosaic_w8a8.w8a8_matmul_2d(x, q, bias[:64], interpret=INTERPRET)
  x, w = _data((4, 128), (128, 2, 64), seed=2)
  q = _w8a8(w, S.FP8_CHANNEL, S.A_FP8_DYNAMIC,
            layout=jq.Layout(contracting=(0,), channels=(1, 2)))
  y = mosaic_w8a8.w8a8_dot_general(x, q, _dn(1, 2), interpret=INTERPRET)
  assert y.shape == (4, 2, 64) and y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32),
                             np.asarray(_reference(x, q, _dn(1, 2), jnp.bfloat16), np.float32),
                             rtol=1e-2, atol=1e-2)
  h, wo = _data((3, 2, 64), (2, 64, 128), seed=3)
  qo = _w8a8(wo, S.W8A16, S.A8_DYNAMIC, layout=jq.Layout(contracting=(0, 1), channels=(2,)))
  yo = mosaic_w8a8.w8a8_dot_general(h, qo, _dn(2, 3), preferred_element_type=jnp.float32,
                                    interpret=INTERPRET)
  _assert_same(yo, _reference(h, qo, _dn(2, 3)))


@pytest.mark.parametrize("wspec,aspec", [(UINT8_ASYM, S.A8_DYNAMIC_ASYM),
                                         (S.FP8_CHANNEL, S.A_FP8_DYNAMIC)], ids=_id)
def test_lowers_for_cuda(wspec, aspec):
  fn = functools.partial(mosaic_w8a8.w8a8_dot_general, dimension_numbers=_dn(1, 2),
                         interpret=False)
  for m in (256, 1):   # prefill tiles; decode: 8 rows written back
    x, w = _data((m, 576), (576, 1536))
    q = _w8a8(w, wspec, aspec)
    text = jax.jit(fn).trace(x, q).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_launches_fit_shared_memory():
  for m, n, ob in itertools.product((1, 64, 65, 4096), (64, 192, 2048), (2, 4)):
    cfg = mosaic_w8a8.default_config(m, n, k=576, out_bytes=ob)
    assert n % cfg.tile_n == 0 and cfg.max_concurrent_steps >= mosaic_w8a8.MIN_STEPS_IN_FLIGHT
    assert mosaic_w8a8.smem_bytes(cfg, ob, cfg.max_concurrent_steps) <= _compat.SMEM_BUDGET
  assert mosaic_w8a8.default_config(4096, 2048, k=2048, out_bytes=2) == mosaic_w8a8.TileConfig(
      tile_m=128, tile_n=128, tile_k=128, max_concurrent_steps=4)
  assert mosaic_w8a8.default_config(1, 1536, k=576, out_bytes=2).tile_k == 64
  x, w = _data((8, 128), (128, 128))
  with pytest.raises(ValueError, match="max_concurrent_steps=1"):
    mosaic_w8a8.w8a8_matmul_2d(x, _w8a8(w, S.W8A16, S.A8_DYNAMIC), max_concurrent_steps=1,
                               interpret=True)


def test_unsupported_problems_are_named():
  x = jnp.ones((8, 128), jnp.bfloat16)
  w = jnp.ones((128, 128), jnp.float32)
  dyn = functools.partial(_w8a8, aspec=S.A8_DYNAMIC)
  grouped = S.QuantSpec(qtype=QType.INT8, granularity=S.Granularity.GROUP, group_size=64)
  cases = [
      (x, quantize(w, S.W8A16), "no activation quantization"),
      (x, dyn(w, S.QuantSpec(qtype=QType.INT4)), "int8, uint8 or fp8"),
      (x, dyn(w, grouped), "per output channel or per tensor"),
      (jnp.ones((8, 96), jnp.bfloat16), dyn(jnp.ones((96, 128)), S.W8A16), "K = 96"),
      (x, dyn(jnp.ones((128, 96)), S.W8A16), "N = 96"),
      (x.astype(jnp.int32), dyn(w, S.W8A16), "x dtype"),
  ]
  for xx, q, words in cases:
    why = mosaic_w8a8.unsupported_reason(xx.shape, xx.dtype, q, _dn(1, 2))
    assert why is not None and words in why and "mosaic w8a8" in why, why
    with pytest.raises(NotImplementedError, match="mosaic w8a8"):
      mosaic_w8a8.w8a8_dot_general(xx, q, _dn(1, 2), interpret=INTERPRET)
  q = dyn(w, S.W8A16)
  assert "x[..., K]" in mosaic_w8a8.unsupported_reason(x.shape, x.dtype, q,
                                                       (((0,), (0,)), ((), ())))
  assert mosaic_w8a8.unsupported_reason(x.shape, x.dtype, q, _dn(1, 2)) is None


@pytest.mark.parametrize("wspec,aspec", [(S.W8A16, S.A8_DYNAMIC),
                                         (S.FP8_CHANNEL, S.A_FP8_DYNAMIC)], ids=_id)
def test_dispatch_holds_it_back_until_measured(wspec, aspec):
  x, w = _data((64, 128), (128, 128), seed=4)
  q = _w8a8(w, wspec, aspec)
  dn = _dn(1, 2)
  c = dispatch.route(x, q, dn, backend="gpu", policy=jq.KernelPolicy())
  assert c.name != "mosaic_gpu_w8a8"
  assert "mosaic_gpu_w8a8" in c.note.text and "mosaic='always'" in c.note.text
  c = dispatch.route(x, q, dn, backend="gpu", policy=MOSAIC)
  assert c.name == "mosaic_gpu_w8a8"
  assert dispatch.route(x, q, dn, backend="cpu", policy=MOSAIC).name != c.name
  # a refused problem (K = 96) falls through, without the note claiming the kernel
  xs, ws = _data((64, 96), (96, 128), seed=5)
  cs = dispatch.route(xs, _w8a8(ws, wspec, aspec), dn, backend="gpu", policy=MOSAIC)
  assert cs.name != "mosaic_gpu_w8a8"
  assert cs.note is None or "mosaic_gpu" not in cs.note.text
  # the registered function takes dispatch's call (positional precision and output dtype)
  y = c.impl.fn(x, q, dn, None, jnp.float32)  # interpret mode off a GPU
  _assert_same(y, _reference(x, q, dn), exact=wspec.qtype is not QType.FP8_E4M3)


# ---- on a real GPU --------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU (jax.devices()[0].platform == 'gpu')")
@pytest.mark.parametrize("wspec,aspec", [(S.W8A16, S.A8_DYNAMIC), (UINT8_ASYM, S.A8_DYNAMIC_ASYM),
                                         (S.FP8_CHANNEL, S.A_FP8_DYNAMIC)], ids=_id)
@pytest.mark.parametrize("mkn", [(1, 576, 1536), (300, 2048, 512), (4096, 2048, 8192)], ids=str)
def test_gpu_w8a8(wspec, aspec, mkn):
  m, k, n = mkn
  x, w = _data((m, k), (k, n))
  q = _w8a8(w, wspec, aspec)
  y = jax.jit(functools.partial(mosaic_w8a8.w8a8_dot_general, dimension_numbers=_dn(1, 2),
                                preferred_element_type=jnp.float32))(x, q)
  yr = np.asarray(_reference(x, q, _dn(1, 2)))
  np.testing.assert_allclose(np.asarray(y), yr, rtol=1e-4, atol=1e-4 * float(np.abs(yr).max()))
