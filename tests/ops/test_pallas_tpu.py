"""Pallas TPU kernels equal their XLA reference twins; dispatch keeps them off until measured.

On CPU the kernels run in Pallas's TPU interpret mode (``pltpu.InterpretParams``: VMEM scratch,
grid order and ``pl.when`` as on a TPU; slow, so the shapes are small and block overrides make
several grid steps) and are also *lowered* for TPU (``lowering_platforms=("tpu",)``), which runs
the Pallas -> Mosaic lowering without a TPU: block shapes must tile into (8, 128) and every
primitive needs a Mosaic rule.  Compiling the Mosaic module needs a TPU (not done here).

Tolerances: the int8 kernel's int32 sum is compared exactly (an int64 numpy oracle); its epilogue
multiplies in the reference's order, so float32 outputs agree to 2 float32 ulps and bfloat16 ones
to one bfloat16 step.  The int4 kernel dequantizes exactly as the reference does and differs only
in the float32 summation order (float32: 1e-5 of the largest output; bfloat16: one bfloat16 step
of it).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jq
from jq import spec as S
from jq.ops import dispatch, pallas_tpu, reference
from jq.qarray import ActivationQuant
from jq.qtypes import QType
from jq.quantize import quantize as _quantize_eager

quantize = jax.jit(_quantize_eager, static_argnums=1)
DN = (((1,), (0,)), ((), ()))
INT4_G128 = S.QuantSpec(qtype=QType.INT4, granularity=S.Granularity.GROUP, group_size=128)
INT4_G32 = dataclasses.replace(INT4_G128, group_size=32)
INT4_G512 = dataclasses.replace(INT4_G128, group_size=512)
INT4_CHANNEL = S.QuantSpec(qtype=QType.INT4)
TPU_ALWAYS = jq.KernelPolicy(tpu="always")


def _dn(x_ndim: int):
  return (((x_ndim - 1,), (0,)), ((), ()))


def _data(x_shape, n, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal(x_shape), dtype)
  w = jnp.asarray(rng.standard_normal((x_shape[-1], n)) * 0.1, jnp.float32)
  return x, w


def _w8a8(w, act=S.A8_DYNAMIC, scale=None):
  q = quantize(w, S.W8A16)
  return dataclasses.replace(q, activation=ActivationQuant(scale=scale, zero_point=None, spec=act))


def _ulp_close(y, yr, steps: float):
  """Elementwise within ``steps`` ulps of ``yr``'s dtype (relative to each value)."""
  y, yr = np.asarray(y), np.asarray(yr)
  assert y.dtype == yr.dtype and y.shape == yr.shape
  eps = float(jnp.finfo(yr.dtype).eps)
  y32, yr32 = y.astype(np.float32), yr.astype(np.float32)
  np.testing.assert_allclose(y32, yr32, rtol=steps * eps, atol=1e-30)


def _sum_close(y, yr):
  """Same values up to the float32 summation order (see the module docstring)."""
  y, yr = np.asarray(y), np.asarray(yr)
  assert y.dtype == yr.dtype and y.shape == yr.shape
  tol = 1e-5 if yr.dtype == np.float32 else float(jnp.finfo(yr.dtype).eps)
  scale = float(np.abs(yr.astype(np.float32)).max())
  np.testing.assert_allclose(y.astype(np.float32), yr.astype(np.float32), rtol=0,
                             atol=tol * scale)


# ---- int8 × int8 -------------------------------------------------------------------------------

def test_int8_matmul_int32_sum_is_exact():
  """Unit scales: the float32 output is the int32 sum itself (|acc| < 2^24), over 2 row blocks
  (40 rows padded to 64), 2 column blocks and 2 K steps through the int32 VMEM accumulator."""
  rng = np.random.default_rng(1)
  m, k, n = 40, 256, 256
  qx = rng.integers(-128, 128, (m, k), dtype=np.int8)
  qw = rng.integers(-128, 128, (k, n), dtype=np.int8)
  y = pallas_tpu.int8_matmul_2d(jnp.asarray(qx), jnp.ones((m,), jnp.float32), jnp.asarray(qw),
                                jnp.ones((n,), jnp.float32), block_m=32, block_n=128,
                                block_k=128, interpret=True)
  want = qx.astype(np.int64) @ qw.astype(np.int64)
  assert np.abs(want).max() < 2 ** 24 and y.shape == (m, n) and y.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(y).astype(np.int64), want)


def _kernel_dots(fn, *args) -> list:
  """The ``dot_general`` equations inside the ``pallas_call`` kernels of ``fn(*args)``."""
  def walk(jaxpr, inside):
    for eqn in jaxpr.eqns:
      if inside and eqn.primitive.name == "dot_general":
        yield eqn
      for v in eqn.params.values():
        sub = getattr(v, "jaxpr", v)
        if hasattr(sub, "eqns"):
          yield from walk(sub, inside or eqn.primitive.name == "pallas_call")
  return list(walk(jax.make_jaxpr(fn)(*args).jaxpr, False))


def test_int8_kernel_dot_is_int8_by_int8_to_int32():
  x, w = _data((16, 512), 256)
  (dot,) = _kernel_dots(lambda x, q: pallas_tpu.int8_dot_general(x, q, DN, interpret=True), x,
                        _w8a8(w))
  assert [v.aval.dtype for v in dot.invars] == [jnp.int8, jnp.int8]
  assert dot.params["preferred_element_type"] == jnp.int32


@pytest.mark.parametrize("act,x_shape,dtype,blocks", [
    (S.A8_DYNAMIC, (16, 512), jnp.float32, dict(block_k=256, block_n=128)),
    (S.A8_DYNAMIC, (2, 8, 512), jnp.bfloat16, {}),   # leading batch axes, bf16 output
    (S.A8_STATIC, (16, 512), jnp.float32, {}),
], ids=["dynamic-f32-blocks", "dynamic-bf16-batch", "static-f32"])
def test_int8_dot_general_matches_reference(act, x_shape, dtype, blocks):
  x, w = _data(x_shape, 256, dtype=dtype)
  q = _w8a8(w, act, scale=None if act.mode is S.ActMode.DYNAMIC else jnp.float32(0.03))
  dn = _dn(len(x_shape))
  y = jax.jit(lambda x, q: pallas_tpu.int8_dot_general(x, q, dn, interpret=True, **blocks))(x, q)
  yr = jax.jit(lambda x, q: reference.int8_dot_general(x, q, dn))(x, q)
  assert y.shape == (*x_shape[:-1], 256)
  _ulp_close(y, yr, 2 if dtype == jnp.float32 else 1)


# ---- int4 weight-only ------------------------------------------------------------------------

@pytest.mark.parametrize("spec,x_shape,dtype,blocks", [
    (INT4_G128, (16, 512), jnp.float32, dict(block_k=256)),   # 2 groups per K block
    (INT4_G128, (16, 512), jnp.bfloat16, {}),
    (INT4_CHANNEL, (2, 8, 512), jnp.bfloat16, {}),   # per channel, leading batch axes
    (INT4_CHANNEL, (16, 512), jnp.float32, dict(block_k=128)),  # 4 K steps, scale in epilogue
    (INT4_G32, (16, 256), jnp.float32, {}),          # 8 groups per K block
    (INT4_G512, (8, 1024), jnp.float32, dict(block_k=256)),   # K blocks inside a group
    (S.W4A16_G128, (16, 512), jnp.bfloat16, {}),     # uint4 with zero points
], ids=["int4g128-f32", "int4g128-bf16", "int4c-bf16-batch", "int4c-f32-ksteps", "int4g32-f32",
        "int4g512-f32", "uint4g128-asym-bf16"])
def test_int4_weight_only_matches_reference(spec, x_shape, dtype, blocks):
  x, w = _data(x_shape, 256, seed=2, dtype=dtype)
  q = quantize(w, spec)
  dn = _dn(len(x_shape))
  y = jax.jit(lambda x, q: pallas_tpu.weight_only_dot_general(x, q, dn, interpret=True,
                                                              **blocks))(x, q)
  yr = jax.jit(lambda x, q: reference.weight_only_dot_general(x, q, dn))(x, q)
  assert y.shape == (*x_shape[:-1], 256)
  _sum_close(y, yr)


def test_int4_nibble_order_and_sign():
  """Columns of distinct signed values, one row of x picking one K row: the output is that row
  of the weight, column for column (a swapped nibble order or a missing sign extension fails)."""
  k, n = 256, 256
  vals = (np.arange(k * n).reshape(k, n) % 16 - 8).astype(np.float32)  # every int4 value
  q = quantize(jnp.asarray(vals), dataclasses.replace(INT4_CHANNEL, symmetric=True))
  q = dataclasses.replace(q, scale=jnp.ones_like(q.scale))
  x = jnp.zeros((8, k), jnp.float32).at[jnp.arange(8), jnp.arange(8) * 31].set(1.0)
  y = pallas_tpu.weight_only_dot_general(x, q, DN, interpret=True)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(q.unpacked(), np.float32)[
      np.arange(8) * 31])


# ---- what the kernels refuse -------------------------------------------------------------------

def _q(spec, k, n, act=None):
  w = jnp.ones((k, n), jnp.float32)
  q = quantize(w, spec)
  return q if act is None else dataclasses.replace(q, activation=act)


DYN = ActivationQuant(scale=None, zero_point=None, spec=S.A8_DYNAMIC)


@pytest.mark.parametrize("x_shape,dtype,w,dn,match", [
    ((4, 200), jnp.float32, lambda: _q(INT4_CHANNEL, 200, 256), DN, "K=200 is not a multiple"),
    ((4, 256), jnp.float32, lambda: _q(INT4_G128, 256, 128), DN, "N=128 is not a multiple of 256"),
    ((4, 256), jnp.float32, lambda: _q(S.W8A16, 256, 100, DYN), DN, "N=100"),
    ((4, 256), jnp.float16, lambda: _q(INT4_G128, 256, 256), DN, "bfloat16 or float32"),
    ((4, 256), jnp.float32, lambda: _q(S.W8A16, 256, 256), DN, "int4 / uint4"),
    ((4, 256), jnp.float32, lambda: _q(S.NF4_G64, 256, 256), DN, "int4 / uint4"),
    ((4, 384), jnp.float32, lambda: _q(dataclasses.replace(INT4_G128, group_size=256), 384, 256),
     DN, "partial last group"),
    ((4, 256), jnp.float32, lambda: _q(dataclasses.replace(INT4_G128, group_size=16), 256, 256),
     DN, "group size 16"),
    ((256, 4), jnp.float32, lambda: _q(INT4_G128, 256, 256), (((0,), (0,)), ((), ())),
     "dimension_numbers"),
    ((4, 256), jnp.float32, lambda: _q(S.QuantSpec(qtype=QType.UINT8, symmetric=False), 256, 256,
                                      DYN), DN, "symmetric int8 weights"),
    ((4, 256), jnp.float32,
     lambda: _q(S.W8A16, 256, 256, ActivationQuant(None, None, S.A8_DYNAMIC_ASYM)), DN,
     "symmetric int8 activations"),
], ids=["ragged-K", "int4-N128", "int8-N100", "float16", "int8-weight-only", "nf4",
        "partial-group", "group16", "contract-x-axis0", "uint8-asym-weight", "asym-activations"])
def test_unsupported_reason_refuses(x_shape, dtype, w, dn, match):
  w = w()
  reason = pallas_tpu.unsupported_reason(x_shape, dtype, w, dn)
  assert reason is not None and match in reason, reason
  fn = (pallas_tpu.weight_only_dot_general if w.activation is None
        else pallas_tpu.int8_dot_general)
  with pytest.raises(NotImplementedError, match="pallas tpu"):
    fn(jnp.ones(x_shape, dtype), w, dn, interpret=True)


def test_unsupported_reason_accepts_and_blocks_are_checked():
  for w in (_q(INT4_G128, 512, 256), _q(S.W4A16_G128, 512, 512), _q(INT4_CHANNEL, 128, 256),
            _q(S.W8A16, 512, 128, DYN)):
    assert pallas_tpu.unsupported_reason((3, 7, w.shape[0]), jnp.bfloat16, w, _dn(3)) is None
  assert pallas_tpu.default_blocks(1, 1024, 768) == (32, 256, 512)
  assert pallas_tpu.default_blocks(300, 384, 512, int4=True, group=128) == (256, 512, 128)
  x, w = jnp.ones((8, 512), jnp.float32), _q(INT4_G128, 512, 256)
  with pytest.raises(ValueError, match="block_k=192"):
    pallas_tpu.weight_only_dot_general(x, w, DN, interpret=True, block_k=192)
  with pytest.raises(ValueError, match="block_n=128 must be a multiple of 256"):
    pallas_tpu.weight_only_dot_general(x, w, DN, interpret=True, block_n=128)
  with pytest.raises(NotImplementedError, match="out_sharding"):
    pallas_tpu.weight_only_dot_general(x, w, DN, out_sharding=object())


# ---- lowering to Mosaic (no TPU needed) ----------------------------------------------------------

def _lower_for_tpu(fn, *args) -> str:
  try:
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
  except (TypeError, RuntimeError) as e:  # an API move, or a jaxlib without the TPU lowering
    if not any(s in str(e) for s in ("lowering_platforms", "Unknown backend", "not available")):
      raise
    pytest.skip(f"TPU lowering is not available here: {e}")


@pytest.mark.parametrize("spec,act", [
    (S.W8A16, S.A8_DYNAMIC), (INT4_G128, None), (INT4_G32, None), (S.W4A16_G128, None),
    (INT4_CHANNEL, None), (INT4_G512, None)], ids=["w8a8", "int4g128", "int4g32", "uint4g128",
                                                   "int4c", "int4g512"])
def test_kernels_lower_to_mosaic(spec, act):
  x, w = _data((4, 1024), 512, dtype=jnp.bfloat16)
  q = quantize(w, spec)
  fn = pallas_tpu.weight_only_dot_general
  if act is not None:
    q, fn = dataclasses.replace(q, activation=ActivationQuant(None, None, act)), \
        pallas_tpu.int8_dot_general
  text = _lower_for_tpu(lambda x, q: fn(x, q, DN, interpret=False, block_k=256), x, q)
  assert "tpu_custom_call" in text


# ---- dispatch ----------------------------------------------------------------------------------

def test_tpu_dispatch_keeps_xla_until_measured_and_says_so():
  x = jnp.ones((16, 512), jnp.bfloat16)
  w4, w8 = _q(INT4_G128, 512, 256), _q(S.W8A16, 512, 256, DYN)
  w8s = _q(S.W8A16, 512, 256, ActivationQuant(jnp.float32(0.1), None, S.A8_STATIC))
  for w, ref_name, tpu_name in ((w4, "xla_reference_weight_only", "pallas_tpu_weight_only"),
                                (w8, "xla_reference_int8", "pallas_tpu_int8"),
                                (w8s, "xla_reference_int8", "pallas_tpu_int8")):
    c = dispatch.route(x, w, DN, backend="tpu", policy=jq.KernelPolicy())
    assert c.name == ref_name
    assert tpu_name in c.note.text and "not yet measured" in c.note.text
    assert "tpu='always'" in c.note.text
    assert dispatch.route(x, w, DN, backend="tpu", policy=TPU_ALWAYS).name == tpu_name
    assert dispatch.route(x, w, DN, backend="gpu", policy=TPU_ALWAYS).name != tpu_name
  # a problem the kernel refuses stays on XLA, and the note does not claim otherwise
  w_n128 = _q(INT4_G128, 512, 128)
  c = dispatch.route(x, w_n128, DN, backend="tpu", policy=TPU_ALWAYS)
  assert c.name == "xla_reference_weight_only"
  assert c.note is None or "pallas_tpu" not in c.note.text
  assert dispatch.route(x, w4, DN, backend="tpu", policy=TPU_ALWAYS,
                        out_sharding=object()).name == "xla_reference_weight_only"


def test_tpu_choice_runs_as_its_reference_twin():
  """The registered function takes dispatch's call (positional precision and output dtype)."""
  x, w = _data((16, 512), 256, seed=3, dtype=jnp.bfloat16)
  q = quantize(w, INT4_G128)
  c = dispatch.route(x, q, DN, backend="tpu", policy=TPU_ALWAYS)
  y = jax.jit(lambda x, q: c.impl.fn(x, q, DN, None, jnp.float32))(x, q)  # interpret on CPU
  yr = jax.jit(lambda x, q: reference.weight_only_dot_general(x, q, DN, None, jnp.float32))(x, q)
  _sum_close(y, yr)


def test_cpu_never_takes_a_tpu_kernel():
  x, w = _data((16, 512), 256, seed=4)
  everything = jq.KernelPolicy(pallas="always", tpu="always")
  for q in (quantize(w, INT4_G128), _w8a8(w)):
    name, _ = dispatch.choose(x, q, DN, backend="cpu", policy=everything)
    assert not name.startswith("pallas_tpu")
    ref = (reference.weight_only_dot_general if q.activation is None
           else reference.int8_dot_general)
    if jax.default_backend() == "cpu":
      np.testing.assert_array_equal(jq.ops.dot_general(x, q, DN, policy=everything),
                                    ref(x, q, DN))


class _Dense(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(256, name="out")(x)


def test_explain_on_tpu_names_the_unmeasured_kernel():
  model, x = _Dense(), jnp.ones((4, 512), jnp.float32)
  variables = model.init(jax.random.key(0), x)
  qvars = jq.nn.quantize_variables(model, variables, [jq.Rule(pattern="kernel", weight=INT4_G128)],
                                   x)
  (r,) = [r for r in jq.explain(model, qvars, x, backend="tpu", file=None) if r.mode != "float"]
  assert r.impl == "xla_reference_weight_only" and "pallas_tpu_weight_only" in r.note.text
  (r,) = [r for r in jq.explain(model, qvars, x, backend="tpu", file=None, policy=TPU_ALWAYS)
          if r.mode != "float"]
  assert r.impl == "pallas_tpu_weight_only"
