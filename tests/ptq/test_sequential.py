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
