"""``nn.vmap`` stacks (MoE experts): one scale set per stacked layer, calibrated static scales per
layer; routers and experts jq cannot run are said."""
from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jq
import jq.nn as jqnn


class Expert(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(32, name="w")(x)


class Experts(nn.Module):
  shared_input: bool

  @nn.compact
  def __call__(self, x):
    ve = nn.vmap(Expert, variable_axes={"params": 0}, split_rngs={"params": True},
                 in_axes=None if self.shared_input else 0, out_axes=0, axis_size=4)
    return ve(name="experts")(x).sum(0)


@pytest.mark.parametrize("shared_input", [True, False])
def test_vmap_stack_gets_per_layer_scales(shared_input):
  model = Experts(shared_input)
  x = jax.random.normal(jax.random.key(1), (3, 16) if shared_input else (4, 3, 16))
  variables = model.init(jax.random.key(0), x)
  k = np.array(variables["params"]["experts"]["w"]["kernel"])
  k *= np.array([100.0, 1.0, 1.0, 0.01])[:, None, None]   # layers of very different scale
  if not shared_input:
    x = x * jnp.asarray([1.0, 2.0, 4.0, 8.0])[:, None, None]  # and inputs of different range
  variables["params"]["experts"]["w"]["kernel"] = jnp.asarray(k)
  lay = jqnn.layouts(model, variables, x)["params/experts/w/kernel"]
  assert lay.batch == (0,) and lay.contracting == (1,) and lay.channels == (2,)
  y_float = model.apply(variables, x)
  for recipe in ("w8a16", "w8a8-static"):
    qv = jqnn.quantize_variables(model, variables, jq.recipe_rules(recipe), x,
                                 calibration_batches=[x])
    q = qv["params"]["experts"]["w"]["kernel"]
    assert q.tile == (1, 16, 1)
    d = np.asarray(q.dequantize())
    sq = [float(jq.sqnr(k[i], d[i])) for i in range(4)]
    assert max(sq) - min(sq) < 1.0, sq
    if recipe == "w8a8-static":
      s = np.asarray(q.activation.scale)
      assert s.shape == (4,)
      if not shared_input:   # each layer's own input range: scales grow with the inputs
        assert np.all(np.diff(s) > 0), s
    y = jax.jit(jqnn.quantized_apply(model))(qv, x)
    rel = float(jnp.linalg.norm(y - y_float) / jnp.linalg.norm(y_float))
    assert rel < 2e-2, (recipe, rel)


class _ScannedExperts(nn.Module):
  @nn.compact
  def __call__(self, x):
    def block(mdl, h, _):
      he = jnp.stack([h * (e + 1.0) for e in range(4)])   # expert e reads (e + 1)·h
      ve = nn.vmap(Expert, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=0, out_axes=0, axis_size=4)
      return h + ve(name="experts")(he).mean(0)[..., :16], None
    scan = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    return scan(self, x, None)[0]


def test_scan_over_vmap_experts_gets_one_static_scale_per_layer_and_expert(tmp_path):
  """``nn.scan`` over ``nn.vmap`` experts: kernels stacked ``(L, E, ...)``.  The static activation
  scales came out flat ``(L·E,)`` and the quantized model could not run."""
  model = _ScannedExperts()
  x = jax.random.normal(jax.random.key(1), (2, 5, 16))
  variables = model.init(jax.random.key(0), x)
  assert variables["params"]["experts"]["w"]["kernel"].shape == (3, 4, 16, 32)
  qv = jqnn.quantize_variables(model, variables, jq.recipe_rules("w8a8-static"), x,
                               calibration_batches=[x])
  s = np.asarray(qv["params"]["experts"]["w"]["kernel"].activation.scale)
  assert s.shape == (3, 4)
  np.testing.assert_allclose(s / s[:, :1], np.broadcast_to([1.0, 2.0, 3.0, 4.0], (3, 4)),
                             rtol=1e-5)   # each expert its own range, in expert order
  y_float = model.apply(variables, x)
  y = jax.jit(jqnn.quantized_apply(model))(qv, x)
  assert float(jnp.linalg.norm(y - y_float) / jnp.linalg.norm(y_float)) < 2e-2
  jq.io.save(tmp_path / "m.safetensors", qv, rules=jq.recipe_rules("w8a8-static"))
  back = jq.io.load(tmp_path / "m.safetensors")
  np.testing.assert_array_equal(
      np.asarray(back["params"]["experts"]["w"]["kernel"].activation.scale), s)
  np.testing.assert_array_equal(np.asarray(jax.jit(jqnn.quantized_apply(model))(back, x)),
                                np.asarray(y))


class _RawExperts(nn.Module):
  """Experts as raw ``self.param`` s under an einsum (custom code jq does not run), a router."""
  @nn.compact
  def __call__(self, x):
    gates = jax.nn.softmax(nn.Dense(4, use_bias=False, name="router")(x), -1)
    wi = self.param("wi", nn.initializers.lecun_normal(batch_axis=(0,)), (4, 16, 32))
    h = jnp.einsum("bd,edf->bef", x, wi)
    return nn.Dense(16, name="out")(jnp.einsum("bef,be->bf", h, gates))


def test_routers_stay_float_and_raw_expert_params_are_said():
  model = _RawExperts()
  x = jax.random.normal(jax.random.key(1), (3, 16))
  variables = model.init(jax.random.key(0), x)
  with pytest.warns(UserWarning, match=r"1 matrix parameter\(s\) stay float: no rule matches "
                                       r"them .*params/wi \(4, 16, 32\): _RawExperts runs its own"):
    q = jqnn.quantize_variables(model, variables, jq.default_rules(jq.W8A16), x)
  assert isinstance(q["params"]["out"]["kernel"], jq.QArray)
  assert not isinstance(q["params"]["router"]["kernel"], jq.QArray)   # (default rules skip it)
  assert isinstance(q["params"]["wi"], jax.Array)


class _ScannedOwnNorm(nn.Module):
  """A scanned block with its own norm (``self.param``: ``(L, D)`` once stacked): no matrix."""
  @nn.compact
  def __call__(self, x):
    def block(mdl, h, _):
      w = mdl.param("weight", nn.initializers.ones, (h.shape[-1],))
      return h + nn.Dense(16, name="proj")(h * w), None
    return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=3)(self, x, None)[0]


def test_a_scanned_norm_of_its_own_is_not_reported_as_a_matrix():
  model = _ScannedOwnNorm()
  x = jax.random.normal(jax.random.key(1), (3, 16))
  variables = model.init(jax.random.key(0), x)
  assert variables["params"]["weight"].shape == (3, 16)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    jqnn.quantize_variables(model, variables, jq.default_rules(jq.W8A16), x)


class _ScanOnAxis1(nn.Module):
  @nn.compact
  def __call__(self, x):
    class Blk(nn.Module):
      @nn.compact
      def __call__(self, h, _):
        return h + nn.Dense(16, name="fc")(h), None
    h, _ = nn.scan(Blk, variable_axes={"params": 1}, split_rngs={"params": True},
                   length=3)(name="s")(x, None)
    return h


def test_a_scan_stacked_on_axis_1_gets_per_layer_weight_scales_and_says_why_not_static():
  """``nn.scan(variable_axes={"params": 1})``: weight scales per layer on the kernel's axis 1;
  static activation scales (one per layer) cannot be sliced there, which was said as a bare
  'do not match the kernel's leading (stacked) axes'."""
  model, x = _ScanOnAxis1(), jax.random.normal(jax.random.key(1), (4, 16))
  variables = model.init(jax.random.key(0), x)
  assert jqnn.layouts(model, variables, x)["params/s/fc/kernel"].batch == (1,)
  qv = jqnn.quantize_variables(model, variables, jq.recipe_rules("w8a16"), x)
  assert qv["params"]["s"]["fc"]["kernel"].scale.shape == (1, 3, 16)
  y = jax.jit(jqnn.quantized_apply(model))(qv, x)
  assert float(jq.sqnr(model.apply(variables, x), y)) > 30
  with pytest.raises(ValueError, match=r"params/s/fc/kernel: shape \(16, 3, 16\) .* stack the "
                                       r"layers on axis 0, or quantize their inputs dynamically"):
    jqnn.quantize_variables(model, variables, jq.recipe_rules("w8a8-static"), x,
                            calibration_batches=[x])
