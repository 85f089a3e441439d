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
