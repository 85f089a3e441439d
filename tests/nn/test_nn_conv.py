"""``jq.nn.conv.conv_layer`` equals Flax's ``nn.Conv`` / ``nnx.Conv`` on the dequantized kernel."""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jq
from jq import ops
from jq.nn import common
from jq.nn.conv import conv_layer, linen_conv_attrs, nnx_conv_attrs
from jq.qarray import ActivationQuant
from jq.qtypes import QType
from jq.spec import ActivationSpec, Granularity, QuantSpec

INT8 = QuantSpec(qtype=QType.INT8, channel_axes=(-1,))
UINT4_G2 = QuantSpec(qtype=QType.UINT4, symmetric=False, channel_axes=(-1,),
                     granularity=Granularity.GROUP, group_size=2, group_axis=-2)
NF4 = QuantSpec(qtype=QType.NF4, channel_axes=(-1,))


def fast_jit(fn):
  """``jax.jit`` with XLA's backend optimizations off: same numerics, faster compiles."""
  def call(*args):
    return jax.jit(fn).lower(*args).compile(
        compiler_options={"xla_backend_optimization_level": 0})(*args)
  return call


def _close(y, ref, rtol=1e-5):
  assert y.shape == ref.shape and y.dtype == ref.dtype, (y.shape, y.dtype, ref.shape, ref.dtype)
  y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
  np.testing.assert_allclose(y, ref, rtol=rtol, atol=rtol * max(1.0, float(np.abs(ref).max())))


def _params(kernel_shape, features, seed, bias=True, param_dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  fan_in = int(np.prod(kernel_shape[:-1]))
  k = jnp.asarray(rng.standard_normal(kernel_shape) / np.sqrt(fan_in), param_dtype)
  b = jnp.asarray(rng.standard_normal((features,)) * 0.1, param_dtype) if bias else None
  return k, b


# (id, linen nn.Conv keyword arguments, input shape, weight spec)
LINEN_CASES = [
    ("2d_same_stride2", dict(features=6, kernel_size=(3, 3), strides=2), (2, 9, 8, 4), INT8),
    ("1d_causal_kernel_dilation_int_kernel_size",
     dict(features=5, kernel_size=3, padding="CAUSAL", kernel_dilation=2), (2, 11, 4), UINT4_G2),
    ("2d_circular_groups2", dict(features=6, kernel_size=(3, 2), padding="CIRCULAR",
                                 kernel_dilation=(1, 2), feature_group_count=2),
     (2, 7, 6, 4), INT8),
    ("2d_reflect", dict(features=4, kernel_size=(3, 3), padding="REFLECT"), (2, 6, 6, 3), NF4),
    ("2d_pairs_input_dilation", dict(features=4, kernel_size=(2, 3), padding=((1, 0), 2),
                                     input_dilation=(2, 1), strides=(1, 2)), (2, 5, 6, 3),
     UINT4_G2),
    ("2d_int_padding", dict(features=4, kernel_size=(3, 3), padding=1), (2, 5, 6, 3), INT8),
    ("3d_valid_no_bias", dict(features=4, kernel_size=(2, 3, 2), padding="VALID",
                              use_bias=False), (2, 4, 5, 4, 3), UINT4_G2),
    ("2d_extra_batch_dims", dict(features=4, kernel_size=(3, 3)), (2, 3, 5, 5, 3), INT8),
    ("2d_no_batch_dim", dict(features=4, kernel_size=(3, 3), strides=2), (7, 6, 3), INT8),
    ("2d_bfloat16_dtype", dict(features=4, kernel_size=(3, 3), dtype=jnp.bfloat16),
     (2, 5, 5, 3), INT8),
    ("2d_bfloat16_params", dict(features=4, kernel_size=(3, 3), param_dtype=jnp.bfloat16),
     (2, 5, 5, 3), INT8),
]


def _linen_case(kwargs, x_shape, seed=0):
  mod = nn.Conv(**kwargs)
  # strict promotion: bfloat16 params take bfloat16 inputs (Flax's promote_dtype would refuse)
  x = jnp.asarray(np.random.default_rng(seed).standard_normal(x_shape),
                  kwargs.get("param_dtype", jnp.float32))
  shapes = jax.eval_shape(mod.init, jax.random.key(0), x)["params"]
  kernel, bias = _params(shapes["kernel"].shape, kwargs["features"], seed + 1,
                         bias="bias" in shapes, param_dtype=shapes["kernel"].dtype)
  return mod, x, kernel, bias


@pytest.mark.parametrize("case_id,kwargs,x_shape,spec", LINEN_CASES,
                         ids=[c[0] for c in LINEN_CASES])
def test_linen_conv_equals_flax_on_dequantized_kernel(case_id, kwargs, x_shape, spec):
  mod, x, kernel, bias = _linen_case(kwargs, x_shape)

  @fast_jit
  def run(x, kernel, bias):
    q = jq.quantize(kernel, spec, name="conv/kernel")
    y = conv_layer(x, q, bias, **linen_conv_attrs(mod), path="params/conv/kernel",
                   layer="nn.Conv")
    params = {"kernel": q.dequantize(kernel.dtype)}
    if bias is not None:
      params["bias"] = bias
    return y, mod.apply({"params": params}, x)

  y, ref = run(x, kernel, bias)
  _close(y, ref, rtol=2e-2 if jnp.bfloat16 in (kwargs.get("dtype"), kwargs.get("param_dtype"))
         else 1e-5)


# (id, nnx.Conv arguments, input shape, weight spec)
NNX_CASES = [
    ("2d_same_groups2_stride", dict(in_features=4, out_features=6, kernel_size=(3, 3), strides=2,
                                    feature_group_count=2), (2, 7, 7, 4), INT8),
    ("1d_causal_dilated", dict(in_features=3, out_features=5, kernel_size=(4,), padding="CAUSAL",
                               kernel_dilation=2), (3, 10, 3), UINT4_G2),
    ("2d_circular", dict(in_features=3, out_features=4, kernel_size=(3, 3), padding="CIRCULAR"),
     (2, 5, 6, 3), NF4),
    ("2d_pairs_input_dilation_no_bias",
     dict(in_features=3, out_features=4, kernel_size=(3, 2), padding=((2, 1), (0, 1)),
          input_dilation=2, use_bias=False), (2, 4, 5, 3), INT8),
    ("3d_same_extra_batch", dict(in_features=2, out_features=3, kernel_size=(2, 2, 3)),
     (2, 2, 4, 3, 5, 2), UINT4_G2),
    ("2d_no_batch_dim", dict(in_features=3, out_features=4, kernel_size=(3, 3), padding="VALID"),
     (6, 6, 3), INT8),
    ("2d_bf16_preferred_f32", dict(in_features=3, out_features=4, kernel_size=(3, 3),
                                   dtype=jnp.bfloat16, preferred_element_type=jnp.float32),
     (2, 5, 5, 3), INT8),
]


@pytest.mark.parametrize("case_id,kwargs,x_shape,spec", NNX_CASES, ids=[c[0] for c in NNX_CASES])
def test_nnx_conv_equals_flax_on_dequantized_kernel(case_id, kwargs, x_shape, spec):
  layer = nnx.eval_shape(lambda: nnx.Conv(**kwargs, rngs=nnx.Rngs(0)))  # params replaced below
  x = jnp.asarray(np.random.default_rng(1).standard_normal(x_shape), jnp.float32)
  kernel, bias = _params(layer.kernel_shape, kwargs["out_features"], 2,
                         bias=kwargs.get("use_bias", True))
  attrs = nnx_conv_attrs(layer)
  graphdef, state = nnx.split(layer)

  @fast_jit
  def run(x, kernel, bias):
    q = jq.quantize(kernel, spec, name="conv/kernel")
    y = conv_layer(x, q, bias, **attrs, path="conv/kernel", layer="nnx.Conv")
    ref_layer = nnx.merge(graphdef, state)  # a copy inside the trace: `layer` stays untouched
    ref_layer.kernel = nnx.Param(q.dequantize())
    if bias is not None:
      ref_layer.bias = nnx.Param(bias)
    with jax.numpy_dtype_promotion("standard"):  # Flax adds a bf16 bias to a float32 conv output
      return y, ref_layer(x)

  y, ref = run(x, kernel, bias)
  _close(y, ref, rtol=2e-2 if kwargs.get("dtype") == jnp.bfloat16 else 1e-5)


@pytest.mark.parametrize("aspec", [ActivationSpec(), ActivationSpec(qtype=QType.UINT8,
                                                                    symmetric=False)],
                         ids=lambda s: f"{s.describe()} {s.qtype.value}")
def test_int8_conv_equals_flax_on_per_example_fake_quant_input(aspec):
  """Int8 dynamic (symmetric and asymmetric uint8, asymmetric weights) with SAME zero padding."""
  mod, x, kernel, bias = _linen_case(dict(features=6, kernel_size=(3, 3), feature_group_count=2),
                                     (3, 6, 5, 4), seed=3)
  x = x + 0.5
  wspec = QuantSpec(qtype=QType.UINT8, symmetric=False, channel_axes=(-1,))

  @fast_jit
  def run(x, kernel, bias):
    q = dataclasses.replace(jq.quantize(kernel, wspec, name="conv/kernel"),
                            activation=ActivationQuant(None, None, aspec))
    y = conv_layer(x, q, bias, **linen_conv_attrs(mod), path="conv/kernel", layer="nn.Conv")
    xf = ops.fake_quant_activations(x, (1, 2, 3), q.activation)
    return y, mod.apply({"params": {"kernel": q.dequantize(), "bias": bias}}, xf)

  _close(*run(x, kernel, bias))


def test_mask_is_applied_weight_only_and_int8():
  mask = np.tril(np.ones((3, 3, 4, 5), np.float32), k=-1)
  mod, x, kernel, bias = _linen_case(dict(features=5, kernel_size=(3, 3), mask=mask),
                                     (2, 5, 5, 4), seed=4)
  act = ActivationQuant(None, None, ActivationSpec())

  @fast_jit
  def run(x, kernel, bias):
    q = jq.quantize(kernel, INT8, name="conv/kernel")
    qa = dataclasses.replace(q, activation=act)
    attrs = linen_conv_attrs(mod)
    y = conv_layer(x, q, bias, **attrs, path="conv/kernel", layer="nn.Conv")
    ya = conv_layer(x, qa, bias, **attrs, path="conv/kernel", layer="nn.Conv")
    params = {"params": {"kernel": q.dequantize(), "bias": bias}}
    return y, mod.apply(params, x), ya, mod.apply(params, ops.fake_quant_activations(
        x, (1, 2, 3), act))

  y, ref, ya, refa = run(x, kernel, bias)
  _close(y, ref)
  _close(ya, refa)
  with pytest.raises(ValueError, match="conv/kernel.*0 and 1"):
    q = dataclasses.replace(jq.quantize(kernel, INT8), activation=act)
    conv_layer(x, q, bias, **{**linen_conv_attrs(mod), "mask": mask * 0.5}, path="conv/kernel",
               layer="nn.Conv")


def test_routes_are_recorded_for_explain():
  mod, x, kernel, bias = _linen_case(dict(features=4, kernel_size=(3, 3), strides=2),
                                     (2, 6, 6, 3))
  q = jq.quantize(kernel, INT8, name="conv/kernel")
  qa = dataclasses.replace(q, activation=ActivationQuant(None, None, ActivationSpec()))
  with common.recording() as routes:
    jax.eval_shape(lambda x, q, qa: (conv_layer(x, q, bias, **linen_conv_attrs(mod),
                                                path="a/kernel", layer="nn.Conv"),
                                     conv_layer(x, qa, bias, **linen_conv_attrs(mod),
                                                path="b/kernel", layer="nn.Conv")), x, q, qa)
  assert [(r.path, r.layer, r.mode, r.impl, r.m) for r in routes] == [
      ("a/kernel", "nn.Conv", "weight-only", "xla", 2 * 3 * 3),
      ("b/kernel", "nn.Conv", "int8 dynamic", "xla", 2 * 3 * 3)]
  assert routes[0].weight == common.describe_qarray(q)


def test_errors_name_the_path():
  mod, x, kernel, bias = _linen_case(dict(features=4, kernel_size=(3, 3)), (2, 5, 5, 3))
  q = jq.quantize(kernel, INT8, name="conv/kernel")
  attrs = linen_conv_attrs(mod)
  call = lambda x, q, **kw: conv_layer(x, q, bias, **{**attrs, **kw}, path="m/conv/kernel",
                                       layer="nn.Conv")
  with pytest.raises(ValueError, match="m/conv/kernel.*does not match nn.Conv"):
    call(x[..., :2], q)  # 2 input features, kernel made for 3
  with pytest.raises(ValueError, match="m/conv/kernel.*jq.QArray"):
    call(x, kernel)
  with pytest.raises(ValueError, match="m/conv/kernel.*CAUSAL"):
    call(x, q, padding="CAUSAL")
  with pytest.raises(ValueError, match="m/conv/kernel.*feature_group_count=2"):
    call(x, q, feature_group_count=2)
  with pytest.raises(ValueError, match="m/conv/kernel.*rank"):
    call(x[0, 0], q)
  with pytest.raises(ValueError, match="m/conv/kernel.*padding"):
    call(x, q, padding=((1, 1),))
  with pytest.raises(ValueError, match="m/conv/kernel.*does not match"):
    call(x, q, features=5)
  with pytest.raises(ValueError, match="flax.linen.Conv"):
    linen_conv_attrs(nn.ConvLocal(features=4, kernel_size=(3, 3)))
  with pytest.raises(ValueError, match="custom conv_general_dilated"):
    nnx_conv_attrs(nnx.eval_shape(lambda: nnx.Conv(
        3, 4, (3, 3), conv_general_dilated=jax.lax.conv_general_dilated_local, rngs=nnx.Rngs(0))))
  with pytest.raises(ValueError, match="flax.nnx.Conv"):
    nnx_conv_attrs(nnx.eval_shape(lambda: nnx.Linear(3, 4, rngs=nnx.Rngs(0))))
