"""Pallas GPU kernels equal their XLA reference twins.

On CPU the kernels run in Pallas interpret mode (small shapes: interpret mode is slow) and are
also *lowered* for CUDA (``lowering_platforms=("cuda",)``), which runs the whole Pallas -> Triton
IR lowering without a GPU: every primitive must have a Triton rule, every block shape must be a
power of two and every dot must have matching operand types.  Compiling the Triton IR to PTX and
running it needs a GPU: the ``gpu``-marked tests do that and are skipped elsewhere.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jq import spec as S
from jq import _compat
from jq.ops import pallas_w8a8, pallas_wo, reference
from jq.qarray import ActivationQuant
from jq.quantize import quantize as _quantize_eager
from jq.qtypes import QType

ON_GPU = _compat.on_gpu()
INTERPRET = not ON_GPU
HIGHEST = jax.lax.Precision.HIGHEST
quantize = jax.jit(_quantize_eager, static_argnums=1)  # one compile instead of ~50 eager ops


def _dn(x_ndim: int):
  return (((x_ndim - 1,), (0,)), ((), ()))


def _data(m, k, n, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((m, k)), dtype)
  w = jnp.asarray(rng.standard_normal((k, n)) * 0.1, jnp.float32)
  return x, w


_ref_wo = jax.jit(reference.weight_only_dot_general, static_argnums=(2, 3, 4))
_ref_int8 = jax.jit(reference.int8_dot_general, static_argnums=2)


def _close(y, yr, rtol=2e-5):
  y, yr = np.asarray(y, np.float32), np.asarray(yr, np.float32)
  np.testing.assert_allclose(y, yr, rtol=rtol, atol=rtol * max(1.0, float(np.abs(yr).max())))


INT4_G32 = S.QuantSpec(qtype=QType.INT4, granularity=S.Granularity.GROUP, group_size=32)
UINT4_G64 = dataclasses.replace(S.W4A16_G128, group_size=64)
INT4_CHANNEL = S.QuantSpec(qtype=QType.INT4)
UINT8_ASYM = S.QuantSpec(qtype=QType.UINT8, symmetric=False)
INT8_TENSOR = S.QuantSpec(qtype=QType.INT8, granularity=S.Granularity.TENSOR)

# (spec, (M, K, N), block overrides): decode shapes (M <= 64), the large-M launch (M > 64),
# K = 576 (a partial last group at g128), odd N (a half-empty last byte), split-K.
WO_CASES = [
    (S.W8A16, (1, 64, 64), {}),
    (S.W8A16, (33, 576, 130), {}),
    (UINT8_ASYM, (80, 96, 130), {}),  # large-M launch
    (INT8_TENSOR, (5, 96, 64), dict(block_k=32, split_k=2)),
    (S.W4A16_G128, (5, 576, 130), {}),  # uint4 asym, partial last group
    (S.W4A16_G128, (33, 576, 64), dict(block_k=64, split_k=3)),
    (INT4_G32, (1, 96, 65), {}),  # odd N: half-empty last byte
    (INT4_G32, (80, 64, 64), {}),
    (UINT4_G64, (5, 96, 130), {}),
    (INT4_CHANNEL, (5, 96, 130), {}),
]


@pytest.mark.parametrize("spec,shape,blocks", WO_CASES,
                         ids=[f"{c[0].describe()}-{c[1]}-{c[2]}" for c in WO_CASES])
def test_weight_only_matches_reference(spec, shape, blocks):
  m, k, n = shape
  x, w = _data(m, k, n)
  q = quantize(w, spec)
  y = pallas_wo.weight_only_dot_general(x, q, _dn(2), HIGHEST, interpret=INTERPRET, **blocks)
  assert y.shape == (m, n) and y.dtype == x.dtype
  _close(y, _ref_wo(x, q, _dn(2), HIGHEST))
  _close(y, jnp.dot(x, q.dequantize(jnp.float32), precision=HIGHEST))  # independent of reference


def test_weight_only_bf16_batched_input():
  x, w = _data(6, 576, 130, dtype=jnp.bfloat16)
  q = quantize(w, S.W4A16_G128)
  x3 = x.reshape(2, 3, 576)
  y = pallas_wo.weight_only_dot_general(x3, q, _dn(3), interpret=INTERPRET)
  assert y.shape == (2, 3, 130) and y.dtype == jnp.bfloat16
  yr = _ref_wo(x3, q, _dn(3))
  _close(y, yr, rtol=2e-2)  # one bf16 rounding of the output


def test_weight_only_preferred_element_type():
  x, w = _data(3, 64, 64, dtype=jnp.bfloat16)
  q = quantize(w, S.W8A16)
  y = pallas_wo.weight_only_dot_general(x, q, _dn(2), preferred_element_type=jnp.float32,
                                        interpret=INTERPRET)
  assert y.dtype == jnp.float32
  _close(y, _ref_wo(x, q, _dn(2), None, jnp.float32), rtol=1e-5)


def test_unsupported_layouts_are_reported():
  x, w = _data(2, 64, 64)
  nf4 = quantize(w, S.NF4_G64)
  assert "nf4" in pallas_wo.unsupported_reason(x.shape, x.dtype, nf4, _dn(2))
  odd_group = quantize(w, dataclasses.replace(S.W4A16_G128, group_size=24))
  assert "group size 24" in pallas_wo.unsupported_reason(x.shape, x.dtype, odd_group, _dn(2))
  q = quantize(w, S.W8A16)
  assert pallas_wo.unsupported_reason(x.shape, x.dtype, q, (((0,), (1,)), ((), ())))
  assert pallas_wo.unsupported_reason(x.shape, x.dtype, q, _dn(2)) is None
  assert "activation" in pallas_w8a8.unsupported_reason(x.shape, x.dtype, q, _dn(2))
  with pytest.raises(NotImplementedError, match="nf4"):
    pallas_wo.weight_only_dot_general(x, nf4, _dn(2), interpret=True)
  with pytest.raises(ValueError, match="block_k"):
    pallas_wo.weight_only_dot_general(x, q, _dn(2), block_k=24, interpret=True)



@pytest.mark.parametrize("m", [1, 16, 33, 64, 65, 256, 4096])
@pytest.mark.parametrize("k,n", [(576, 130), (4096, 14336), (14336, 4096)])
@pytest.mark.parametrize("x_bytes", [2, 4])
def test_default_configs_fit_shared_memory(m, k, n, x_bytes):
  """Default launches stay inside the shared-memory budget (an H100 run once failed with
  'requested 262144, available 232448' for block_m=64, block_k=256, 4 stages)."""
  for packed, group in ((False, None), (True, 128), (True, 32)):
    c = pallas_wo.default_config(m, k, n, packed=packed, group=group, x_bytes=x_bytes)
    smem = pallas_wo.smem_bytes(c.block_m, c.block_n, c.block_k, packed, x_bytes, c.num_stages)
    assert c.num_stages >= 2 and smem <= _compat.SMEM_BUDGET, (packed, group, c, smem)
  c = pallas_w8a8.default_config(m, k, n)
  assert c.num_stages * (c.block_m * c.block_k + c.block_k * c.block_n) <= _compat.SMEM_BUDGET
  assert _compat.fit_stages(100, 10, 4, budget=250) == 2
  assert _compat.fit_stages(10**6, 0, 4, budget=1) == 1

# ---- W8A8 -----------------------------------------------------------------------------------

DYN_SYM = ActivationQuant(None, None, S.A8_DYNAMIC)
DYN_ASYM = ActivationQuant(None, None, S.ActivationSpec(qtype=QType.UINT8, symmetric=False))
STATIC_SYM = ActivationQuant(jnp.float32(0.02), None, S.A8_STATIC)
STATIC_ASYM = ActivationQuant(jnp.float32(0.03), jnp.asarray(100, jnp.uint8),
                              S.ActivationSpec(mode=S.ActMode.STATIC, qtype=QType.UINT8,
                                               symmetric=False))

W8A8_CASES = [
    (S.W8A16, DYN_SYM, (1, 64, 64), {}),
    (S.W8A16, DYN_SYM, (33, 576, 130), {}),
    (UINT8_ASYM, DYN_ASYM, (80, 96, 130), {}),  # large-M launch
    (S.W8A16, STATIC_SYM, (5, 96, 130), {}),
    (UINT8_ASYM, STATIC_ASYM, (5, 96, 130), dict(block_k=32, split_k=3)),
]


@pytest.mark.parametrize("wspec,act,shape,blocks", W8A8_CASES,
                         ids=[f"{c[0].describe()}-{c[1].spec.describe()}-{c[2]}-{c[3]}"
                              for c in W8A8_CASES])
def test_int8_dot_general_matches_reference(wspec, act, shape, blocks):
  m, k, n = shape
  x, w = _data(m, k, n)
  q = dataclasses.replace(quantize(w, wspec), activation=act)
  y = pallas_w8a8.int8_dot_general(x, q, _dn(2), interpret=INTERPRET, **blocks)
  # jit the reference: XLA turns x / 127 into x * (1/127) under jit, and so does interpret mode
  yr = _ref_int8(x, q, _dn(2))
  assert y.shape == (m, n) and y.dtype == x.dtype
  # interpret mode rounds exactly like the jitted reference; on a GPU, x / s may round differently
  # from XLA's and move a tie by one activation step
  _close(y, yr, rtol=1e-6 if INTERPRET else 2e-2)


@pytest.mark.parametrize("act,shape,blocks", [
    (DYN_SYM, (33, 576), dict(block_k=128)),  # several K chunks: two passes over the row
    (DYN_SYM, (3, 96), {}),
    (DYN_ASYM, (5, 96), dict(block_m=2, block_k=32)),
])
def test_quantize_per_token_matches_reference(act, shape, blocks):
  x, _ = _data(shape[0], shape[1], 1, seed=3)
  x = x.at[1].set(0.0)  # an all-zero row gets scale 1
  q, s, z = pallas_w8a8.quantize_activations(x, (1,), act, interpret=INTERPRET, **blocks)
  qr, sr, zr = jax.jit(reference.quantize_activations, static_argnums=1)(x, (1,), act)
  step = 0 if INTERPRET else 1  # see test_int8_dot_general_matches_reference
  np.testing.assert_array_less(np.abs(np.asarray(q) - np.asarray(qr)), step + 1)
  np.testing.assert_allclose(np.asarray(s), np.asarray(sr), rtol=0 if INTERPRET else 1e-6)
  if zr is None:
    assert z is None
  else:
    np.testing.assert_array_less(np.abs(np.asarray(z) - np.asarray(zr)), step + 1)


@pytest.mark.parametrize("w_unsigned,zero_points,blocks", [
    (False, False, {}),
    (True, True, dict(block_k=32, split_k=3)),
])
def test_int8_matmul_is_int32_exact(w_unsigned, zero_points, blocks):
  m, k, n = 5, 576, 130
  rng = np.random.default_rng(1)
  xq = jnp.asarray(rng.integers(-128, 128, (m, k)), jnp.int8)
  if w_unsigned:
    wq = jnp.asarray(rng.integers(0, 256, (k, n)), jnp.uint8)
  else:
    wq = jnp.asarray(rng.integers(-128, 128, (k, n)), jnp.int8)
  xz = jnp.asarray(rng.integers(-20, 20, (m,)), jnp.int32) if zero_points else None
  wz = jnp.asarray(rng.integers(100, 150, (n,)), jnp.uint8) if zero_points else None
  y = pallas_w8a8.int8_matmul_2d(xq, jnp.ones((m,), jnp.float32), wq, jnp.ones((n,), jnp.float32),
                                 x_zero_point=xz, w_zero_point=wz, out_dtype=jnp.float32,
                                 interpret=INTERPRET, **blocks)
  a = np.asarray(xq, np.int64) - (0 if xz is None else np.asarray(xz, np.int64)[:, None])
  b = np.asarray(wq, np.int64) - (0 if wz is None else np.asarray(wz, np.int64)[None, :])
  want = a @ b
  assert np.abs(want).max() < 2 ** 24  # exactly representable in the float32 output
  np.testing.assert_array_equal(np.asarray(y, np.int64), want)


def test_int8_bias_is_fused():
  x, w = _data(5, 96, 130)
  q = dataclasses.replace(quantize(w, S.W8A16), activation=DYN_SYM)
  bias = jnp.linspace(-1.0, 1.0, 130, dtype=jnp.float32)
  y = pallas_w8a8.int8_dot_general(x, q, _dn(2), bias=bias, interpret=INTERPRET)
  y0 = pallas_w8a8.int8_dot_general(x, q, _dn(2), interpret=INTERPRET)
  _close(y - y0, jnp.broadcast_to(bias, y.shape), rtol=1e-5)


# ---- Triton lowering without a GPU ----------------------------------------------------------

def _lower_for_cuda(fn, *args):
  """StableHLO text of ``fn`` lowered for CUDA (the Pallas call becomes a Triton custom call)."""
  try:
    traced = jax.jit(fn).trace(*args)
    return traced.lower(lowering_platforms=("cuda",)).as_text()
  except (TypeError, RuntimeError) as e:
    # an API move, or a jaxlib that compiles Triton at lowering time and has no CUDA compiler
    if ON_GPU or not any(s in str(e) for s in ("lowering_platforms", "compilation handler",
                                                "Unknown backend", "not available")):
      raise
    pytest.skip(f"CUDA lowering is not available without a GPU here: {e}")


@pytest.mark.parametrize("spec,shape", [
    (UINT8_ASYM, (1, 576, 1536)),
    (S.W4A16_G128, (300, 576, 129)),
], ids=["uint8-decode", "uint4g128-large"])
def test_weight_only_lowers_to_triton(spec, shape):
  m, k, n = shape
  x, w = _data(m, k, n, dtype=jnp.bfloat16)
  q = quantize(w, spec)
  text = _lower_for_cuda(functools.partial(pallas_wo.weight_only_dot_general,
                                           dimension_numbers=_dn(2)), x, q)
  assert "__gpu$xla.gpu.triton" in text or "triton_kernel_call" in text


@pytest.mark.parametrize("wspec,act,m", [(S.W8A16, DYN_ASYM, 1), (UINT8_ASYM, STATIC_ASYM, 300)],
                         ids=["dynamic-decode", "static-large"])
def test_int8_lowers_to_triton(wspec, act, m):
  x, w = _data(m, 576, 1536, dtype=jnp.bfloat16)
  q = dataclasses.replace(quantize(w, wspec), activation=act)
  fn = functools.partial(pallas_w8a8.int8_dot_general, dimension_numbers=_dn(2),
                         bias=jnp.zeros((1536,), jnp.bfloat16))
  text = _lower_for_cuda(fn, x, q)
  assert "__gpu$xla.gpu.triton" in text or "triton_kernel_call" in text


# ---- on a real GPU --------------------------------------------------------------------------

gpu = pytest.mark.skipif(not ON_GPU, reason="needs a GPU (jax.devices()[0].platform == 'gpu')")

GPU_SHAPES = [(1, 576, 1536), (16, 4096, 1024), (300, 576, 1536)]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("spec", [S.W8A16, UINT8_ASYM, S.W4A16_G128, INT4_G32, UINT4_G64],
                         ids=lambda s: s.describe())
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_gpu_weight_only(spec, shape):
  m, k, n = shape
  x, w = _data(m, k, n, dtype=jnp.bfloat16)
  q = quantize(w, spec)
  y = jax.jit(functools.partial(pallas_wo.weight_only_dot_general, dimension_numbers=_dn(2)))(x, q)
  yr = jnp.dot(x.astype(jnp.float32), q.dequantize(jnp.float32), precision=HIGHEST)
  _close(y, yr, rtol=2e-2)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("wspec,act", [(S.W8A16, DYN_SYM), (UINT8_ASYM, DYN_ASYM),
                                       (S.W8A16, STATIC_SYM), (UINT8_ASYM, STATIC_ASYM)],
                         ids=lambda v: v.describe() if hasattr(v, "describe") else
                         v.spec.describe())
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_gpu_int8(wspec, act, shape):
  m, k, n = shape
  x, w = _data(m, k, n, dtype=jnp.bfloat16)
  q = dataclasses.replace(quantize(w, wspec), activation=act)
  y = jax.jit(functools.partial(pallas_w8a8.int8_dot_general, dimension_numbers=_dn(2)))(x, q)
  yr = _ref_int8(x, q, _dn(2))
  # the activation rounding may differ by one step where x / s lands on a tie (GPU division)
  _close(y, yr, rtol=2e-2)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("spec", [S.W8A16, S.W4A16_G128], ids=lambda s: s.describe())
def test_gpu_large_m(spec):
  x, w = _data(1024, 4096, 4096, dtype=jnp.bfloat16)
  q = quantize(w, spec)
  y = jax.jit(functools.partial(pallas_wo.weight_only_dot_general, dimension_numbers=_dn(2)))(x, q)
  yr = jnp.dot(x.astype(jnp.float32), q.dequantize(jnp.float32), precision=HIGHEST)
  _close(y, yr, rtol=2e-2)


@pytest.mark.gpu
@gpu
def test_gpu_int8_gemm_exact():
  m, k, n = 256, 4096, 1024
  rng = np.random.default_rng(0)
  xq = jnp.asarray(rng.integers(-128, 128, (m, k)), jnp.int8)
  wq = jnp.asarray(rng.integers(-128, 128, (k, n)), jnp.int8)
  ones = jnp.ones
  for kw in ({}, dict(split_k=4)):
    y = pallas_w8a8.int8_matmul_2d(xq, ones((m,), jnp.float32), wq, ones((n,), jnp.float32),
                                   out_dtype=jnp.float32, **kw)
    want = jax.lax.dot(xq, wq, preferred_element_type=jnp.int32)
    np.testing.assert_array_equal(np.asarray(y, np.int64), np.asarray(want, np.int64))


@pytest.mark.gpu
@gpu
def test_gpu_no_recompilation():
  x, w = _data(4, 576, 1536, dtype=jnp.bfloat16)
  q = quantize(w, S.W4A16_G128)
  f = jax.jit(functools.partial(pallas_wo.weight_only_dot_general, dimension_numbers=_dn(2)))
  if not hasattr(f, "_cache_size"):
    pytest.skip("jax.jit object has no _cache_size in this JAX")
  f(x, q).block_until_ready()
  before = f._cache_size()
  f(x + jnp.bfloat16(1), q).block_until_ready()
  assert f._cache_size() == before
