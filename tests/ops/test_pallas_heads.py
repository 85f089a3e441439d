"""The Pallas weight-only kernel runs a DenseGeneral head's (K, heads, head_dim) kernel as the
(K, heads * head_dim) matrix (reference.as_matrix), equal to the XLA reference; kernels whose
scales cannot follow the reshape stay on XLA."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jq
from jq.ops import dispatch, pallas_wo, reference

DN = (((1,), (0,)), ((), ()))


@pytest.mark.parametrize("spec", [jq.W4A16_G128, jq.W8A16], ids=lambda s: s.describe())
def test_a_head_kernel_runs_as_its_matrix(spec):
  w = jax.random.normal(jax.random.key(0), (256, 4, 32), jnp.float32)
  x = jax.random.normal(jax.random.key(1), (2, 3, 256), jnp.float32)
  layout = jq.Layout(contracting=(0,), channels=(1, 2))
  q = jq.quantize(w, spec, layout=layout)
  dn = (((2,), (0,)), ((), ()))
  assert pallas_wo.unsupported_reason(x.shape, x.dtype, q, dn) is None
  got = pallas_wo.weight_only_dot_general(x, q, dn, interpret=True)
  want = reference.weight_only_dot_general(x, q, dn)
  assert got.shape == (2, 3, 4, 32)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))
  m = reference.as_matrix(q)
  np.testing.assert_array_equal(m.dequantize().reshape(256, 4, 32), q.dequantize())
  policy = jq.KernelPolicy(pallas="always")
  assert dispatch.route(x, q, dn, backend="gpu", policy=policy).name == "pallas_gpu_weight_only"


def test_scales_that_cannot_flatten_stay_on_xla():
  q = jq.quantize(jnp.ones((256, 4, 32), jnp.float32), jq.W4A16_G128,
                  layout=jq.Layout(contracting=(0,), channels=(1, 2)))
  mixed = dataclasses.replace(q, scale=q.scale[:, :1, :], zero_point=q.zero_point[:, :1, :],
                              tile=(q.tile[0], 4, 1))
  assert reference.as_matrix(mixed) is None
  reason = pallas_wo.unsupported_reason((3, 256), np.float32, mixed, DN)
  assert reason and "flatten" in reason
  assert dispatch.route(jnp.ones((3, 256)), mixed, DN, backend="gpu",
                        policy=jq.KernelPolicy(pallas="always")).name == "xla_reference_weight_only"


@pytest.mark.parametrize("spec", [jq.W4A16_G128, jq.W4A16_G32, jq.W8A16],
                         ids=lambda s: s.describe())
def test_an_output_projection_contracting_heads_runs_as_its_matrix(spec):
  """The (heads, head_dim, d) kernel of a DenseGeneral output projection contracts x's last two
  axes: it runs as its (heads * head_dim, d) matrix, groups spanning heads (g128: tile (2, 64))
  or inside one (g32) included."""
  w = jax.random.normal(jax.random.key(0), (4, 64, 96), jnp.float32)
  x = jax.random.normal(jax.random.key(1), (2, 3, 4, 64), jnp.float32)
  q = jq.quantize(w, spec, layout=jq.Layout(contracting=(0, 1), channels=(2,)))
  dn = (((2, 3), (0, 1)), ((), ()))
  assert pallas_wo.unsupported_reason(x.shape, x.dtype, q, dn) is None
  got = pallas_wo.weight_only_dot_general(x, q, dn, interpret=True)
  want = reference.weight_only_dot_general(x, q, dn)
  assert got.shape == (2, 3, 96)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))
  m = reference.as_matrix(q, 2)
  assert m.shape == (256, 96)
  np.testing.assert_array_equal(m.dequantize().reshape(w.shape), q.dequantize())
  policy = jq.KernelPolicy(pallas="always")
  assert dispatch.route(x, q, dn, backend="gpu", policy=policy).name == "pallas_gpu_weight_only"


def test_contracting_tiles_that_do_not_merge_stay_on_xla():
  """Groups of 2 heads x 32 of head_dim are not runs of the merged axis: no matrix, XLA runs."""
  q = jq.quantize(jnp.ones((4, 64, 96), jnp.float32), jq.W4A16_G32,
                  layout=jq.Layout(contracting=(0, 1), channels=(2,)))
  odd = dataclasses.replace(q, scale=q.scale[::2], zero_point=q.zero_point[::2], tile=(2, 32, 1))
  assert reference.as_matrix(odd, 2) is None
  dn = (((1, 2), (0, 1)), ((), ()))
  reason = pallas_wo.unsupported_reason((3, 4, 64), np.float32, odd, dn)
  assert reason and "flatten" in reason
  assert dispatch.route(jnp.ones((3, 4, 64)), odd, dn, backend="gpu",
                        policy=jq.KernelPolicy(pallas="always")).name == "xla_reference_weight_only"
