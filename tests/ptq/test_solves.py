"""Sharing solves between workers (``jq.ptq.solves``): a kernel cut into column blocks, each block
solved on its own and the results joined, is the whole kernel's solve, bit for bit; kernels whose
scales span the output channels are never cut; the split and the owners depend on shapes only."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jq
from jq.calibrate.collect import LayerInputs
from jq.calibrate.stats import init_stats, update_stats
from jq.ptq import solves
from jq.spec import Algorithm

K = 128


def _task(rule, n: int, seed: int = 0, name: str = "mlp/down/kernel") -> solves.Solve:
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((512, K)).astype(np.float32) * np.linspace(0.2, 3.0, K, dtype=np.float32)
  w = jnp.asarray(rng.standard_normal((K, n)).astype(np.float32))
  stats = update_stats(init_stats(K), jnp.asarray(x), jnp.ones((512,), jnp.float32))
  inputs = LayerInputs(stats, np.min(x, 0), np.max(x, 0), jnp.asarray(x[:256]))
  return solves.Solve(name, 0, rule.algorithm, w, inputs, rule.weight, rule.algorithm_options,
                      name)


CASES = {
    "gptq-w4a16-g128-actorder": jq.recipe_rules("gptq-w4a16-g128-actorder")[-1],
    "gptq-w8a16": jq.default_rules(jq.W8A16, algorithm=Algorithm.GPTQ)[-1],
    "gptq-w2a16-g32": jq.default_rules(jq.W2A16_G32, algorithm=Algorithm.GPTQ)[-1],
    "gptq-w3a16-g128": jq.recipe_rules("gptq-w3a16-g128")[-1],   # 8 values in 3 bytes
    "awq-w4a16-g32": jq.recipe_rules("awq-w4a16-g32")[-1],
}


@pytest.mark.parametrize("recipe", list(CASES))
def test_column_blocks_joined_are_the_whole_solve(recipe):
  """150 output channels in 3 blocks (int2 packs 4 per byte, int3 8 per 3 bytes: edges on
  multiples of 4 or 8, a ragged last block), beside a narrow kernel (N < K: GPTQ's K³
  factorisation dominates; not cut)."""
  big, small = _task(CASES[recipe], 150), _task(CASES[recipe], 8, seed=1, name="small")
  pieces = solves.split([big, small], 3)
  cut = [p for i, p in pieces if i == 0]
  assert len(cut) == 3 and [i for i, _ in pieces].count(1) == 1
  per = CASES[recipe].weight.qtype.pack_values
  assert all(p.cols[0] % per == 0 for p in cut) and cut[-1].cols[1] == 150
  assert [p.cols for p in cut] == [(0, cut[1].cols[0]), (cut[1].cols[0], cut[2].cols[0]),
                                   (cut[2].cols[0], 150)]
  assert cut[1].name == f"mlp/down/kernel[:, {cut[1].cols[0]}:{cut[1].cols[1]}]"
  whole, _ = solves.solve_on(big, None)
  joined, note = solves.join([solves.solve_on(p, None) for p in cut])
  assert joined.shape == whole.shape and joined.tile == whole.tile and note == ""
  for field in ("values", "scale", "zero_point"):
    a, b = getattr(whole, field), getattr(joined, field)
    assert (a is None) == (b is None), field
    if a is not None:
      np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=field)


def test_a_block_cut_again_joins_to_that_block():
  """A process's block spread over its devices: cut again (absolute columns), joined back."""
  half = solves.split([_task(CASES["awq-w4a16-g32"], 150)], 2)[1][1]
  again = [p for _, p in solves.split([half], 2)]
  assert [p.cols for p in again] == [(74, 112), (112, 150)] and half.cols == (74, 150)
  np.testing.assert_array_equal(
      np.asarray(solves.join([solves.solve_on(p, None) for p in again])[0].values),
      np.asarray(solves.solve_on(half, None)[0].values))


def test_kernels_whose_scales_span_the_channels_are_never_cut():
  per_tensor = jq.default_rules(jq.QuantSpec(qtype=jq.QType.INT8,
                                             granularity=jq.Granularity.TENSOR),
                                algorithm=Algorithm.GPTQ)[-1]
  big, small = _task(per_tensor, 96), _task(per_tensor, 8, name="small")
  assert [(i, p.cols) for i, p in solves.split([big, small], 4)] == [(0, None), (1, None)]
  rtn = jq.recipe_rules("w4a16-g32")[-1]     # rounding to nearest: nothing to share
  assert [p.cols for _, p in solves.split([_task(rtn, 96), small], 4)] == [None, None]
  assert solves.owners([_task(rtn, 96)], 2) == {}


def test_owners_balance_the_blocks():
  rule = CASES["gptq-w2a16-g32"]
  tasks = [_task(rule, 512, name="up"), _task(rule, 128, name="q"), _task(rule, 128, name="k")]
  pieces = [p for _, p in solves.split(tasks, 2)]
  assert [p.cols for p in pieces if p.path == "up"] == [(0, 256), (256, 512)]
  owner = solves.owners(pieces, 2)
  load = [sum(solves.cost(pieces[j]) for j in owner if owner[j] == w) for w in (0, 1)]
  assert sorted(owner.values()) == [0, 0, 1, 1] and max(load) / min(load) < 1.2, load


class _Device:
  """A device as ``factor_from`` sees it: what it reports of its memory."""
  def __init__(self, limit):
    self.limit = limit

  def memory_stats(self):
    return None if self.limit is None else {"bytes_limit": self.limit}


def test_which_gptq_solves_factor_their_hessian_split_over_devices():
  gptq, awq = _task(CASES["gptq-w8a16"], 64), _task(CASES["awq-w4a16-g32"], 64)
  # given: from K = 128 on; never on fewer than 2 devices
  assert solves.factor_from([_Device(None)] * 2, 128) == 128
  assert solves.factor_from([_Device(None)], 128) is None
  assert solves.factors_split(gptq, 128) and not solves.factors_split(gptq, 129)
  assert not solves.factors_split(awq, 1) and not solves.factors_split(gptq, None)
  # automatic: where the dense road's largest stage, 3 float32 K × K matrices, exceeds half the
  # smallest device (16 GB: K ≥ 25819, so 70B's down_proj, K = 28672; 80 GB: K ≥ 57735, so not
  # 405B's, K = 53248: its 34 GB fit); no limit reported: never
  assert solves.factor_from([_Device(16 * 10**9)] * 4, None) == 25819
  assert solves.factor_from([_Device(80 * 10**9), _Device(16 * 10**9)], None) == 25819
  assert solves.factor_from([_Device(80 * 10**9)] * 8, None) == 57735
  assert solves.factor_from([_Device(None)] * 8, None) is None
  with pytest.raises(ValueError, match="split_factor_from=0 must be an int >= 1"):
    jq.ptq.PTQConfig(split_factor_from=0)


def test_kernels_reading_one_input_are_solved_as_one():
  """q, k and v (one LayerInputs, one spec) become one GPTQ solve of their columns side by side,
  in q's place; cut back, each kernel is its own solve, bit for bit.  Another input, another
  spec, scales spanning the channels, another algorithm, or more than 3K columns together (gate
  and up): left alone."""
  rule = CASES["gptq-w4a16-g128-actorder"]
  q = _task(rule, 128, name="attn/q")
  k = q._replace(path="attn/k", name="attn/k", w=_task(rule, 32, seed=1).w)
  v = q._replace(path="attn/v", name="attn/v", w=_task(rule, 32, seed=2).w)
  other = _task(rule, 200, seed=3, name="mlp/up")                 # its own inputs
  gate = other._replace(path="mlp/gate", name="mlp/gate")         # 400 > 3K columns with up
  w8 = q._replace(path="attn/w8", name="attn/w8", spec=CASES["gptq-w8a16"].weight)
  per_tensor = jq.QuantSpec(qtype=jq.QType.INT8, granularity=jq.Granularity.TENSOR)
  pt = q._replace(path="attn/pt", name="attn/pt", spec=per_tensor)
  rtn = q._replace(path="attn/r", name="attn/r", algo=Algorithm.RTN)
  tasks = [other, q, w8, k, pt, rtn, v, gate]
  fused, parts = solves.fuse(tasks)
  assert [t.name for t in fused] == ["mlp/up", "attn/q + attn/k + attn/v", "attn/w8", "attn/pt",
                                     "attn/r", "mlp/gate"]
  assert fused[1].also == ("attn/k", "attn/v") and fused[1].w.shape == (K, 192)
  assert parts[1] == [(1, 0, 128), (3, 128, 160), (6, 160, 192)] and parts[5] == [(7, 0, 200)]
  got = solves.unfuse(parts, {f: solves.solve_on(t, None) for f, t in enumerate(fused)})
  assert sorted(got) == list(range(len(tasks)))
  for i in (1, 3, 6):
    alone, _ = solves.solve_on(tasks[i], None)
    assert got[i][0].shape == alone.shape and got[i][0].tile == alone.tile
    for field in ("values", "scale", "zero_point"):
      a, b = getattr(alone, field), getattr(got[i][0], field)
      assert (a is None) == (b is None), field
      if a is not None:
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=f"{i} {field}")
  with pytest.raises(ValueError, match=r"columns \[0, 5\) .* do not fall on whole tiles"):
    solves.columns(got[1][0], 0, 5)
