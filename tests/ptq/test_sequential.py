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
  assert find_blocks(calls, kernels) == ["blocks/fc1", "blocks/fc2"]     # (unstacked: blocks)
  assert find_blocks(calls, kernels, stacked=kernels) == []


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
