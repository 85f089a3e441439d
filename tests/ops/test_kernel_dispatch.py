"""Dispatch of the Pallas GPU kernels: chosen on GPU only when enabled, never on CPU."""
import jax.numpy as jnp
import pytest

from jq import A8_DYNAMIC, NF4_G64, W4A16_G128, W8A16, quantize
from jq.ops import dispatch, kernels
import dataclasses
from jq.qarray import ActivationQuant

DN = (((1,), (0,)), ((), ()))


@pytest.fixture
def pallas_on():
  before = kernels.enabled()
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


def test_disabled_by_default_uses_reference():
  before = kernels.enabled()
  kernels.disable()
  try:
    x = jnp.ones((4, 256), jnp.bfloat16)
    assert dispatch.route(x, _w(W4A16_G128), DN, backend="gpu").name == "xla_reference_weight_only"
  finally:
    kernels.enable(before)
