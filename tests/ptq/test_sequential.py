"""``jq.ptq.sequential.find_blocks``: which module families are a model's repeated blocks."""
from __future__ import annotations

from jq.ptq.sequential import find_blocks
from jq.ptq.targets import Call


def _calls(*mods):
  return [Call(m, cls, 0, 0) for m, cls in mods]


def test_indexed_siblings_called_once_are_blocks_outermost_first_in_call_order():
  calls = _calls(("params/embed", "Embed"),
                 ("params/block1/fc_0", "Dense"), ("params/block1/fc_1", "Dense"),
                 ("params/block1", "Block"),
                 ("params/block0/fc_0", "Dense"), ("params/block0/fc_1", "Dense"),
                 ("params/block0", "Block"), ("params/head", "Dense"))
  kernels = [f"params/block{i}/fc_{j}/kernel" for i in (0, 1) for j in (0, 1)] + [
      "params/head/kernel"]
  # the inner fc_0/fc_1 family lies inside the blocks; blocks are ordered by their calls
  assert find_blocks(calls, kernels) == ["params/block1", "params/block0"]


def test_nnx_lists_and_linen_names():
  calls = _calls(("layers/0/q", "Linear"), ("layers/0", "B"), ("layers/1/q", "Linear"),
                 ("layers/1", "B"))
  assert find_blocks(calls, ["layers/0/q/kernel", "layers/1/q/kernel"]) == ["layers/0", "layers/1"]
  calls = _calls(("params/layers_0/q", "Dense"), ("params/layers_0", "B"),
                 ("params/layers_1/q", "Dense"), ("params/layers_1", "B"))
  assert find_blocks(calls, ["params/layers_0/q/kernel", "params/layers_1/q/kernel"]) == [
      "params/layers_0", "params/layers_1"]


def test_not_blocks_shared_called_twice_mixed_classes_or_without_kernels():
  twice = _calls(("params/layers_0", "B"), ("params/layers_1", "B"), ("params/layers_0", "B"))
  assert find_blocks(twice, ["params/layers_0/k", "params/layers_1/k"]) == []
  mixed = _calls(("params/layers_0", "A"), ("params/layers_1", "B"))
  assert find_blocks(mixed, ["params/layers_0/k", "params/layers_1/k"]) == []
  empty = _calls(("params/layers_0", "B"), ("params/layers_1", "B"))
  assert find_blocks(empty, ["params/layers_0/k"]) == []
  assert find_blocks(_calls(("params/layers_0", "B")), ["params/layers_0/k"]) == []


def test_indexed_layers_inside_a_scan_body_are_not_blocks():
  """``fc1``/``fc2`` of an ``nnx.scan``-ed block are traced once but run per stacked layer: taking
  them for blocks made quantize_model leak the scan's tracers (a new-user model)."""
  calls = _calls(("blocks/fc1", "Linear"), ("blocks/fc2", "Linear"), ("blocks", "MLPBlock"))
  kernels = ["blocks/fc1/kernel", "blocks/fc2/kernel"]
  assert find_blocks(calls, kernels, stacked=kernels) == []


def test_single_layers_named_like_blocks_are_not_blocks():
  """``fc1``/``fc2``, ``Dense_0``/``Dense_1``, ``conv1``/``conv2``: a model's successive layers
  (one kernel each, their own), not blocks; calibrated as blocks, ``fc1`` was quantized before
  the ``fc1 -> fc2`` AWQ fold could scale it (a new-user MLP lost its fold to its names)."""
  calls = _calls(("params/norm", "LayerNorm"), ("params/fc1", "Dense"), ("params/fc2", "Dense"))
  assert find_blocks(calls, ["params/fc1/kernel", "params/fc2/kernel"]) == []
  calls = _calls(("params/Dense_0", "Dense"), ("params/Dense_1", "Dense"))
  assert find_blocks(calls, ["params/Dense_0/kernel", "params/Dense_1/kernel"]) == []
  calls = _calls(("params/conv1/Conv_0", "Conv"), ("params/conv1", "ConvBlock"),
                 ("params/conv2/Conv_0", "Conv"), ("params/conv2", "ConvBlock"))
  assert find_blocks(calls, ["params/conv1/Conv_0/kernel", "params/conv2/Conv_0/kernel"]) == [
      "params/conv1", "params/conv2"]     # (containers of layers: blocks)


def test_quantize_model_calibrates_a_scan_stack_with_indexed_layers():
  import jax
  from flax import nnx

  import jq
  from jq.ptq import quantize_model

  class Block(nnx.Module):
    def __init__(self, rngs):
      self.fc1, self.fc2 = nnx.Linear(16, 32, rngs=rngs), nnx.Linear(32, 16, rngs=rngs)

    def __call__(self, x):
      return x + self.fc2(jax.nn.gelu(self.fc1(x)))

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.blocks = _stack(rngs)

    def __call__(self, x):
      return nnx.scan(lambda blk, h: (blk(h), None), in_axes=(0, nnx.Carry),
                      out_axes=(nnx.Carry, 0))(self.blocks, x)[0]

  def _stack(rngs):
    @nnx.split_rngs(splits=2)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(r):
      return Block(r)
    return make(rngs)

  model = Net(nnx.Rngs(0))
  calib = [jax.random.normal(jax.random.key(i), (2, 4, 16)) for i in range(2)]
  res = quantize_model(model, None, jq.recipe_rules("gptq-w4a16-g128"), calib)
  assert isinstance(res.module.blocks.fc1.kernel.get_value(), jq.QArray)
  assert res.module(calib[0]).shape == (2, 4, 16)


def test_blocks_inside_a_vmap_of_the_model_are_not_calibrated_one_by_one():
  """``nn.vmap`` over a data axis with shared parameters (``variable_axes={"params": None}``):
  the blocks inside run on mapped values, so taking one block's output out of the model leaked
  the vmap's tracer (GPTQ/AWQ failed on a new-user model); they calibrate in one pass."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  import jq
  from jq.ptq import quantize_model

  class Blk(nn.Module):
    @nn.compact
    def __call__(self, x):
      return x + nn.Dense(32, name="fc")(nn.relu(x))

  class Inner(nn.Module):
    @nn.compact
    def __call__(self, x):
      return Blk(name="blk_1")(Blk(name="blk_0")(x))

  class Mapped(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.vmap(Inner, variable_axes={"params": None}, split_rngs={"params": False})(
          name="inner")(x)

  m, x = Mapped(), jax.random.normal(jax.random.key(0), (3, 4, 32))
  v = m.init(jax.random.key(1), x)
  calib = [jax.random.normal(jax.random.key(i), (3, 4, 32)) for i in range(2)]
  res = quantize_model(m, v, jq.recipe_rules("gptq-w4a16-g32"), calib)
  assert any("no repeated blocks found" in line for line in res.log), res.log
  y = jq.nn.quantized_apply(m)(res.variables, x)
  ref = m.apply(v, x)
  assert float(jnp.abs(y - ref).max() / jnp.abs(ref).max()) < 0.1
