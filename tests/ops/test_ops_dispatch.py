"""The dispatch registry: (backend, mode, qtype, predicate) -> implementation; clear errors."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import jq
from jq.ops import kernels
from jq import ops
from jq.ops import dispatch
from jq.qarray import ActivationQuant
from jq.qtypes import QType
from jq.spec import A8_DYNAMIC, A8_STATIC, Granularity, QuantSpec

K, N = 48, 16
DN = (((1,), (0,)), ((), ()))
W = jnp.asarray(np.random.default_rng(0).standard_normal((K, N)), jnp.float32)


def _x(m=4):
  return jnp.ones((m, K), jnp.float32)


@pytest.fixture
def fake_kernel():
  """Registers a CPU int4 weight-only 'kernel' for small M; removed afterwards."""
  calls = []

  def fn(x, w, dn, precision=None, preferred_element_type=None, *, out_sharding=None):
    calls.append(x.shape)
    return ops.weight_only_dot_general(x, w, dn, precision, preferred_element_type)

  impl = ops.register(ops.Impl(name="fake_int4_small_m", fn=fn,
                               modes=frozenset({ops.Mode.WEIGHT_ONLY}),
                               backends=frozenset({"cpu"}), qtypes=frozenset({QType.INT4}),
                               predicate=lambda p: p.m <= 8 and p.out_sharding is None,
                               priority=10))
  yield impl, calls
  ops.unregister(impl.name)


def test_reference_is_the_default():
  q = jq.quantize(W, QuantSpec(qtype=QType.INT4))
  assert ops.choose(_x(), q, DN)[0] == "xla_reference_weight_only"
  q8 = dataclasses.replace(jq.quantize(W, jq.W8A16),
                           activation=ActivationQuant(None, None, A8_DYNAMIC))
  assert ops.choose(_x(), q8, DN) == ("xla_reference_int8", ops.int8_dot_general)


def test_registered_kernel_is_chosen_where_it_applies(fake_kernel):
  impl, calls = fake_kernel
  q4 = jq.quantize(W, QuantSpec(qtype=QType.INT4))
  assert ops.choose(_x(4), q4, DN)[0] == impl.name
  assert ops.choose(_x(64), q4, DN)[0] == "xla_reference_weight_only"  # predicate: M <= 8
  assert ops.choose(_x(4), q4, DN, backend="gpu")[0] != impl.name   # a CPU-only kernel
  q8 = jq.quantize(W, jq.W8A16)
  assert ops.choose(_x(4), q8, DN)[0] == "xla_reference_weight_only"  # qtype filter
  y = ops.dot_general(_x(4), q4, DN)
  assert calls == [(4, K)]
  np.testing.assert_allclose(y, _x(4) @ q4.dequantize(), rtol=1e-5)
  ops.unregister(impl.name)
  assert ops.choose(_x(4), q4, DN)[0] == "xla_reference_weight_only"


def test_priority_and_replacement_by_name(fake_kernel):
  impl, _ = fake_kernel
  q4 = jq.quantize(W, QuantSpec(qtype=QType.INT4))
  low = ops.register(dataclasses.replace(impl, name="fake_low", priority=5))
  try:
    assert ops.choose(_x(), q4, DN)[0] == impl.name
    ops.register(dataclasses.replace(low, priority=20))  # same name: replaced, now preferred
    assert ops.choose(_x(), q4, DN)[0] == "fake_low"
    assert [i.name for i in ops.registered()].count("fake_low") == 1
  finally:
    ops.unregister("fake_low")


def test_route_notes_warn_where_slower_than_float():
  g = jq.quantize(W, jq.W4A16_G32)
  gpu_big = ops.route(_x(128), g, DN, backend="gpu")
  assert gpu_big.problem.grouped and gpu_big.note.slower_than_float
  assert "0.4x" in gpu_big.note.text
  before = kernels.policy()
  kernels.enable("auto")
  try:   # decode-sized int8 on GPU takes the Pallas kernel, whose note is not a warning
    r = ops.route(_x(1), jq.quantize(W, jq.W8A16), DN, backend="gpu")
    assert r.name == "pallas_gpu_weight_only" and not r.note.slower_than_float
  finally:
    kernels.enable(before)
  cpu_small = ops.route(_x(1), g, DN, backend="cpu")
  assert cpu_small.note.slower_than_float and "CPU" in cpu_small.note.text
  assert not ops.route(_x(256), g, DN, backend="cpu").note.slower_than_float


def test_problem_describes_the_contraction():
  p = ops.make_problem(jnp.ones((2, 3, K)), jq.quantize(W, jq.W4A16_G32),
                       (((2,), (0,)), ((), ())), name="layer/kernel")
  assert (p.m, p.k, p.n, p.grouped, p.asymmetric) == (6, K, N, True, True)
  assert p.mode is ops.Mode.WEIGHT_ONLY and p.qtype is QType.UINT4


@pytest.mark.parametrize("make,match", [
    (lambda: (jnp.ones((4, K), jnp.int32), jq.quantize(W, jq.W8A16)), "floating point"),
    (lambda: (_x(), W), "must be a jq.QArray"),
    (lambda: (jnp.ones((4, K + 1)), jq.quantize(W, jq.W8A16)), r"size 49.*size 48"),
    (lambda: (_x(), dataclasses.replace(jq.quantize(W, QuantSpec(qtype=QType.INT4)),
                                        activation=ActivationQuant(None, None, A8_DYNAMIC))),
     "8-bit integer weights"),
    (lambda: (_x(), dataclasses.replace(
        jq.quantize(W, QuantSpec(qtype=QType.INT8, granularity=Granularity.GROUP, group_size=16)),
        activation=ActivationQuant(None, None, A8_DYNAMIC))), "group scales"),
    (lambda: (_x(), dataclasses.replace(jq.quantize(W, jq.W8A16),
                                        activation=ActivationQuant(None, None, A8_STATIC))),
     "needs a calibrated scale"),
])
def test_errors_name_the_layer(make, match):
  x, w = make()
  with pytest.raises(ValueError, match=match) as e:
    ops.dot_general(x, w, DN, name="model/dense_3/kernel")
  assert "model/dense_3/kernel" in str(e.value)


@pytest.mark.parametrize("eq,match", [
    ("bd,df", "explicit"), ("bdd,df->bf", "distinct letters"), ("bd,df->b", "rhs-only"),
    ("bd,...df->bf", r"'\.\.\.'"), ("bcd,df->bf", "does not fit"),
])
def test_einsum_errors(eq, match):
  with pytest.raises(ValueError, match=match):
    ops.einsum(eq, _x(), jq.quantize(W, jq.W8A16), name="e/kernel")


def test_matmul_needs_rank_2():
  q = jq.quantize(jnp.ones((2, K, N)), jq.W8A16, layout=jq.Layout(contracting=(1,), channels=(2,),
                                                                   batch=(0,)))
  with pytest.raises(ValueError, match="rank-2"):
    ops.matmul(_x(), q)


def test_registry_module_is_small_and_reference_always_registered():
  names = [i.name for i in dispatch.registered()]
  assert {"xla_reference_weight_only", "xla_reference_int8"} <= set(names)
