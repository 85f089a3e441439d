"""Each adapted layer type and option equals the float layer on the dequantized kernel."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jq
import jq.nn as jqnn
import tiny_models as tm

X3 = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 12)), jnp.float32)
RULES = jq.default_rules(jq.W4A16_G32, kernel_pattern=r"kernel$")


class LinenLayers(nn.Module):
  @nn.compact
  def __call__(self, x):
    return {
        "dense_nobias": nn.Dense(7, use_bias=False, name="a")(x),
        "dense_bf16": nn.Dense(7, dtype=jnp.bfloat16, name="b")(x),
        "general_batch": nn.DenseGeneral((3, 4), axis=-1, batch_dims=(0,), name="c")(x),
        "general_2axes": nn.DenseGeneral(6, axis=(-2, -1), name="d")(x),
        "einsum_ellipsis": nn.Einsum((12, 3, 2), "...d,dhk->...hk", name="e")(x),
        "einsum_call_eq": nn.Einsum((5, 12, 4), name="f")(x, einsum_str="btd,tdk->bk"),
    }


def test_linen_layer_options():
  model = LinenLayers()
  variables = tm._fill(jax.eval_shape(model.init, jax.random.key(0), X3), 1)
  qapply = jqnn.quantized_apply(model)
  lays = jqnn.layouts(model, variables, X3)

  @tm.fast_jit
  def run(v, x):
    qv = jq.quantize_tree(v, RULES, layouts=lays)
    return qapply(qv, x), model.apply(jq.dequantize_tree(qv), x)

  got, want = run(variables, X3)
  for name in want:
    assert got[name].shape == want[name].shape and got[name].dtype == want[name].dtype, name
    tol = 2e-2 if want[name].dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(np.asarray(got[name], np.float32),
                               np.asarray(want[name], np.float32), rtol=tol, atol=tol, err_msg=name)


class NnxLayers(nnx.Module):
  def __init__(self, rngs):
    self.a = nnx.Linear(12, 7, use_bias=False, rngs=rngs)
    self.b = nnx.Linear(12, 7, dtype=jnp.bfloat16, rngs=rngs)
    self.c = nnx.LinearGeneral(12, (3, 4), batch_axis={0: 2}, rngs=rngs)
    self.d = nnx.LinearGeneral((5, 12), 6, axis=(-2, -1), rngs=rngs)
    self.e = nnx.Einsum("...d,dhk->...hk", (12, 3, 2), (3, 2), rngs=rngs)

  def __call__(self, x):
    return {"a": self.a(x), "b": self.b(x), "c": self.c(x), "d": self.d(x), "e": self.e(x)}


def test_nnx_layer_options():
  model = nnx.eval_shape(lambda: NnxLayers(nnx.Rngs(0)))
  nnx.update(model, tm._fill(nnx.state(model), 2))

  @tm.fast_jit
  def run(x):
    qstate = jq.quantize_tree(nnx.state(model, nnx.Param), RULES, layouts=jqnn.layouts(model))
    ref = nnx.clone(model)
    nnx.update(ref, jq.dequantize_tree(qstate))
    return jqnn.quantize_module(model, qstate)(x), ref(x)

  got, want = run(X3)
  for name in want:
    assert got[name].shape == want[name].shape and got[name].dtype == want[name].dtype, name
    tol = 2e-2 if want[name].dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(np.asarray(got[name], np.float32),
                               np.asarray(want[name], np.float32), rtol=tol, atol=tol, err_msg=name)
