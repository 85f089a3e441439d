"""The Pallas Mosaic GPU weight-only kernel equals its XLA reference twin.

On CPU the kernel runs in Mosaic GPU interpret mode (shared memory, TMA copies, barriers and wgmma
simulated) and is *lowered* for CUDA, which runs the whole Mosaic GPU lowering (layout inference,
swizzled TMA transfers, wgmma operand checks) without a GPU.  Compiling and running it needs a
Hopper GPU: the ``gpu``-marked test does that and is skipped elsewhere.
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
from jq.ops import dispatch, mosaic_wo, reference
from jq.quantize import quantize as _quantize_eager
from jq.qtypes import QType

pytestmark = pytest.mark.skipif(not _compat.has_mosaic_gpu(), reason="no Pallas Mosaic GPU here")

ON_GPU = _compat.on_gpu()
INTERPRET = not ON_GPU     # on a GPU the same tests run the compiled kernel
TOL = 1e-5 if INTERPRET else 1e-3
HIGHEST = jax.lax.Precision.HIGHEST
quantize = jax.jit(_quantize_eager, static_argnums=1)
MOSAIC = jq.KernelPolicy(mosaic="always")


def _dn(c: int, x_ndim: int):
  return ((tuple(range(x_ndim - c, x_ndim)), tuple(range(c))), ((), ()))


def _data(x_shape, w_shape, seed=0, dtype=jnp.bfloat16):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal(x_shape), dtype)
  return x, jnp.asarray(rng.standard_normal(w_shape) * 0.1, jnp.float32)


def _reference(x, q, dn):
  return reference.weight_only_dot_general(x, q, dn, HIGHEST, jnp.float32)


INT4_G64 = S.QuantSpec(qtype=QType.INT4, granularity=S.Granularity.GROUP, group_size=64)
UINT8_ASYM = S.QuantSpec(qtype=QType.UINT8, symmetric=False)
INT8_TENSOR = S.QuantSpec(qtype=QType.INT8, granularity=S.Granularity.TENSOR)

# (spec, x shape, w shape): per channel / group / tensor, zero points or not, int8 and both
# nibbles of int4; M not a multiple of the tile (padded rows), two tiles along N and along K
CASES = [
    (S.W8A16, (96, 128), (128, 128)),
    (UINT8_ASYM, (3, 192), (192, 64)),
    (INT8_TENSOR, (64, 128), (128, 192)),
    (INT4_G64, (80, 128), (128, 256)),  # tile_m 128: two int4 planes of 64-column tiles
    (S.W4A16_G128, (2, 5, 192), (192, 128)),  # K = 192: a partial last group of 64 rows
]


@pytest.mark.parametrize("spec,x_shape,w_shape", CASES,
                         ids=lambda v: v.describe() if hasattr(v, "describe") else str(v))
def test_weight_only_equals_reference(spec, x_shape, w_shape):
  x, w = _data(x_shape, w_shape)
  q = quantize(w, spec)
  dn = _dn(1, x.ndim)
  y = mosaic_wo.weight_only_dot_general(x, q, dn, preferred_element_type=jnp.float32,
                                        interpret=INTERPRET)
  assert y.shape == x.shape[:-1] + w.shape[1:] and y.dtype == jnp.float32
  # the reference dequantizes group-wise weights to bf16 like the kernel; per-channel scales are
  # applied to the float32 sum in both
  np.testing.assert_allclose(np.asarray(y), np.asarray(_reference(x, q, dn)), rtol=TOL,
                             atol=TOL)


def test_float16_input_bfloat16_output_and_dense_general_heads():
  """f16 activations; a DenseGeneral ``(d, heads, head_dim)`` kernel and its output projection
  ``(heads, head_dim, d)`` contracting x's last two axes, both run as their 2-D matrices."""
  x, w = _data((4, 128), (128, 2, 64), seed=1, dtype=jnp.float16)
  q = jq.quantize(w, S.W8A16, layout=jq.Layout(contracting=(0,), channels=(1, 2)))
  y = mosaic_wo.weight_only_dot_general(x, q, _dn(1, 2), interpret=INTERPRET)
  assert y.shape == (4, 2, 64) and y.dtype == jnp.float16
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(_reference(x, q, _dn(1, 2))),
                             rtol=2e-3, atol=2e-3)
  h, wo = _data((4, 2, 64), (2, 64, 128), seed=2)
  qo = jq.quantize(wo, INT4_G64, layout=jq.Layout(contracting=(0, 1), channels=(2,)))
  yo = mosaic_wo.weight_only_dot_general(h, qo, _dn(2, 3), preferred_element_type=jnp.float32,
                                         interpret=INTERPRET)
  np.testing.assert_allclose(np.asarray(yo), np.asarray(_reference(h, qo, _dn(2, 3))),
                             rtol=TOL, atol=TOL)


@pytest.mark.parametrize("spec", [UINT8_ASYM, INT4_G64], ids=lambda s: s.describe())
def test_lowers_for_cuda(spec):
  fn = functools.partial(mosaic_wo.weight_only_dot_general, dimension_numbers=_dn(1, 2),
                         interpret=False)
  for m in (256, 1):   # prefill tiles; decode: split K, 8 rows written back
    x, w = _data((m, 576), (576, 1536))
    q = quantize(w, spec)
    text = jax.jit(fn).trace(x, q).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_launches_keep_two_steps_in_flight_within_shared_memory():
  """The x tile is held one step longer than the pipeline would (wgmma still reads it), so a
  one-slot pipeline would deadlock: every default launch keeps >= 2 steps in flight and fits."""
  for planes, out_bytes, zp, cols, m in itertools.product((1, 2), (2, 4), (False, True),
                                                          (64, 128, 384, 4096), (1, 80, 4096)):
    cfg = mosaic_wo.default_config(m, cols, k=2048, planes=planes, x_bytes=2,
                                   out_bytes=out_bytes, zp=zp)
    assert cfg.max_concurrent_steps >= 2 and cols % cfg.tile_n == 0
    part_bytes = 4 if cfg.split_k > 1 else out_bytes   # split K writes float32 partials
    assert mosaic_wo.smem_bytes(cfg, planes, 2, part_bytes, zp,
                                cfg.max_concurrent_steps) <= _compat.SMEM_BUDGET
  x, w = _data((8, 128), (128, 128))
  with pytest.raises(ValueError, match="max_concurrent_steps=1"):
    mosaic_wo.wo_matmul_2d(x, quantize(w, S.W8A16), max_concurrent_steps=1, interpret=True)


def test_split_k_decode_equals_reference():
  """Decode-sized problems split K across programs (float32 partial tiles summed by XLA): by
  default where the output tiles alone would leave SMs idle, or forced; with group scales whose
  groups straddle no slice and per-channel scales applied to every partial; rows trimmed to M
  rounded up to 8, and whole 64-row tiles (M = 130) when x spans several."""
  cases = [(S.W4A16_G128, (1, 512), (512, 256), None),   # default: 4 slices of 2 steps
           (UINT8_ASYM, (9, 256), (256, 128), 2),
           (S.W8A16, (130, 256), (256, 64), 4)]         # one step per slice, three row tiles
  for spec, x_shape, w_shape, split in cases:
    x, w = _data(x_shape, w_shape, seed=4)
    q = quantize(w, spec)
    if split is None:
      cfg = mosaic_wo.default_config(x_shape[0], int(q.values.shape[1]), k=w_shape[0], planes=2,
                                     x_bytes=2, out_bytes=4, zp=True, sms=132)
      assert cfg.split_k == 4, cfg
    y = mosaic_wo.wo_matmul_2d(x, q, out_dtype=jnp.float32, split_k=split,
                               tile_m=64 if split == 4 else None, interpret=INTERPRET)
    np.testing.assert_allclose(np.asarray(y), np.asarray(_reference(x, q, _dn(1, 2))),
                               rtol=TOL, atol=TOL)
  with pytest.raises(ValueError, match="split_k=3"):
    mosaic_wo.wo_matmul_2d(x, q, split_k=3, interpret=True)
  # float32 partials of two int4 planes in 128 x 128 tiles do not fit shared memory
  x, w = _data((128, 256), (256, 256))
  with pytest.raises(ValueError, match="bytes of shared memory"):
    mosaic_wo.wo_matmul_2d(x, quantize(w, INT4_G64), tile_m=128, tile_n=128, split_k=2,
                           interpret=True)


def test_split_k_choice():
  """The fewest K slices that fill the SMs, each >= 2 steps and dividing the steps, capped by
  the partial sums' traffic; prefill (enough tiles) does not split."""
  assert mosaic_wo.split_k_for(16, 32, 132, limit=64) == 16    # 9 would do, 16 divides 32
  assert mosaic_wo.split_k_for(8, 128, 132, limit=64) == 32
  assert mosaic_wo.split_k_for(8, 128, 132, limit=8) == 8
  assert mosaic_wo.split_k_for(132, 32, 132, limit=64) == 1
  assert mosaic_wo.split_k_for(4, 3, 132, limit=64) == 1       # a slice needs two steps
  # Llama-3.2-1B decode, int4 g128 q projection (2048 x 2048): 8 column tiles per plane pair
  cfg = mosaic_wo.default_config(1, 1024, k=2048, planes=2, x_bytes=2, out_bytes=2, zp=True,
                                 sms=132)
  assert (cfg.tile_n, cfg.split_k) == (128, 16)
  assert mosaic_wo.default_config(4096, 1024, k=2048, planes=2, x_bytes=2, out_bytes=2, zp=True,
                                  sms=132).split_k == 1


def test_unsupported_problems_are_named():
  x = jnp.ones((8, 128), jnp.bfloat16)
  w = jnp.ones((128, 128), jnp.float32)
  cases = [
      (jnp.ones((8, 128), jnp.float32), quantize(w, S.W8A16), "bfloat16 or float16"),
      (jnp.ones((8, 96), jnp.bfloat16), quantize(jnp.ones((96, 128)), S.W8A16), "K = 96"),
      (x, quantize(jnp.ones((128, 96)), S.W8A16), "96 columns"),
      (x, quantize(w, dataclasses.replace(INT4_G64, group_size=32)), "group size 32"),
      (x, quantize(jnp.ones((128, 64)), INT4_G64), "32 bytes of packed columns"),
  ]
  for xx, q, words in cases:
    why = mosaic_wo.unsupported_reason(xx.shape, xx.dtype, q, _dn(1, 2))
    assert why is not None and words in why and "mosaic weight-only" in why, why
    with pytest.raises(NotImplementedError, match="mosaic weight-only"):
      mosaic_wo.weight_only_dot_general(xx, q, _dn(1, 2), interpret=INTERPRET)
  assert mosaic_wo.unsupported_reason(x.shape, x.dtype, quantize(w, INT4_G64), _dn(1, 2)) is None


def test_dispatch_holds_it_back_until_measured():
  x, w = _data((64, 128), (128, 128), seed=3)
  q = quantize(w, S.W4A16_G128)
  dn = _dn(1, 2)
  c = dispatch.route(x, q, dn, backend="gpu", policy=jq.KernelPolicy())
  assert c.name != "mosaic_gpu_weight_only"
  assert "mosaic_gpu_weight_only" in c.note.text and "mosaic='always'" in c.note.text
  c = dispatch.route(x, q, dn, backend="gpu", policy=MOSAIC)
  assert c.name == "mosaic_gpu_weight_only"
  assert dispatch.route(x, q, dn, backend="cpu", policy=MOSAIC).name != c.name
  # refused problems fall through to the Triton kernel or XLA, without the note claiming it
  c32 = dispatch.route(x.astype(jnp.float32), q, dn, backend="gpu", policy=MOSAIC)
  assert c32.name != "mosaic_gpu_weight_only"
  assert c32.note is None or "mosaic_gpu" not in c32.note.text
  # the registered function takes dispatch's call (positional precision and output dtype)
  y = c.impl.fn(x, q, dn, None, jnp.float32)  # interpret mode off a GPU
  np.testing.assert_allclose(np.asarray(y), np.asarray(_reference(x, q, dn)), rtol=TOL,
                             atol=TOL)


# ---- on a real GPU --------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU (jax.devices()[0].platform == 'gpu')")
@pytest.mark.parametrize("spec", [S.W8A16, UINT8_ASYM, S.W4A16_G128, INT4_G64],
                         ids=lambda s: s.describe())
@pytest.mark.parametrize("mkn", [(1, 576, 1536), (300, 2048, 512), (1024, 2048, 8192)], ids=str)
def test_gpu_weight_only(spec, mkn):
  m, k, n = mkn
  x, w = _data((m, k), (k, n))
  q = quantize(w, spec)
  y = jax.jit(functools.partial(mosaic_wo.weight_only_dot_general,
                                dimension_numbers=_dn(1, 2)))(x, q)
  yr = jnp.dot(x.astype(jnp.float32), q.dequantize(jnp.float32), precision=HIGHEST)
  y, yr = np.asarray(y, np.float32), np.asarray(yr)
  np.testing.assert_allclose(y, yr, rtol=2e-2, atol=2e-2 * float(np.abs(yr).max()))
