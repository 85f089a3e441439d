"""Dispatch of the Pallas GPU kernels: by policy (auto/1/0) on GPU, never on CPU."""
import jax.numpy as jnp
import pytest

from jq import A8_DYNAMIC, NF4_G64, W4A16_G128, W8A16, quantize
from jq.ops import dispatch, kernels
import dataclasses
from jq.qarray import ActivationQuant

DN = (((1,), (0,)), ((), ()))


@pytest.fixture
def pallas_on():
  before = kernels.policy()
  kernels.enable(True)
  yield
  kernels.enable(before)


def _w(spec, act=None):
  w = quantize(jnp.ones((256, 128), jnp.float32), spec)
  return w if act is None else dataclasses.replace(
      w, activation=ActivationQuant(scale=None, zero_point=None, spec=act))


def test_gpu_routes_to_pallas_when_enabled(pallas_on):
  x = jnp.ones((4, 256), jnp.bfloat16)
  assert dispatch.route(x, _w(W4A16_G128), DN, backend="gpu").name == "pallas_gpu_weight_only"
  assert dispatch.route(x, _w(W8A16), DN, backend="gpu").name == "pallas_gpu_weight_only"
  assert dispatch.route(x, _w(W8A16, A8_DYNAMIC), DN, backend="gpu").name == "pallas_gpu_int8"
  # NF4 has no kernel: falls back to the reference
  assert dispatch.route(x, _w(NF4_G64), DN, backend="gpu").name == "xla_reference_weight_only"
  # CPU never takes a GPU kernel
  assert dispatch.route(x, _w(W4A16_G128), DN, backend="cpu").name == "xla_reference_weight_only"


def test_disabled_uses_reference():
  before = kernels.policy()
  kernels.disable()
  try:
    x = jnp.ones((4, 256), jnp.bfloat16)
    assert dispatch.route(x, _w(W4A16_G128), DN, backend="gpu").name == "xla_reference_weight_only"
  finally:
    kernels.enable(before)


def test_auto_policy_takes_kernels_for_small_m_weight_only():
  before = kernels.policy()
  kernels.enable("auto")
  dn3 = (((2,), (0,)), ((), ()))

  def route(m, w):
    return dispatch.route(jnp.ones((2, m // 2, 256), jnp.bfloat16), w, dn3, backend="gpu").name

  try:
    m4, m8 = kernels.AUTO_MAX_M_INT4, kernels.AUTO_MAX_M_INT8
    assert route(m4, _w(W4A16_G128)) == "pallas_gpu_weight_only"
    assert route(m4 + 2, _w(W4A16_G128)) == "xla_reference_weight_only"
    assert route(m8, _w(W8A16)) == "pallas_gpu_weight_only"
    assert route(m8 + 2, _w(W8A16)) == "xla_reference_weight_only"
    # W8A8 stays on XLA's int8 dot under auto
    assert route(2, _w(W8A16, A8_DYNAMIC)) != "pallas_gpu_int8"
  finally:
    kernels.enable(before)


def test_bad_policy_is_refused():
  with pytest.raises(ValueError, match="expected"):
    kernels.enable("sometimes")
