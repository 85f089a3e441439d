"""Sensitivity scan and the mixed-precision planner on a tiny Llama."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jq import W2A16_G32, W3A16_G128, W8A16, nbytes, quantize_tree
from jq.eval import sensitivity as sens
from jq.spec import Rule, SKIP_PATTERNS
from jq_models.decoder import Llama, LlamaConfig

CFG = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
                  num_kv_heads=2, head_dim=16, max_seq_len=32)


@pytest.fixture(scope="module")
def scan():
  model = Llama(CFG)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)), jnp.int32)
  params = {"params": model.init(jax.random.key(1), tokens)["params"]}
  groups = sens.group_paths(sens.quantizable_kernels(params))
  res = sens.sensitivity_scan(model.apply, params, tokens, groups,
                              {"w8": W8A16, "w3": W3A16_G128, "w2": W2A16_G32})
  return params, res


def test_scan_orders_options(scan):
  _, res = scan
  assert sorted(res.groups) == ["layers_0/", "layers_1/", "layers_2/"]
  for g in res.groups:
    assert 0 <= res.kl[g]["w8"] < res.kl[g]["w2"]
    assert res.nbytes[g]["w2"] < res.nbytes[g]["w8"]
  assert "layers_0/" in res.table()


def test_three_bit_option_is_packed_and_a_menu_can_leave_it_out(scan):
  params, res = scan
  from jq.tree import leaves_with_paths
  shapes = {p: x.shape for p, x in leaves_with_paths(params)}
  for g, members in res.groups.items():   # uint3: 3 bits a value + a float32 scale and a uint8
    want = sum(k * n * 3 // 8 + -(-k // 128) * n * 5   # zero point per column and group of 128
               for k, n in (shapes[p] for p in members))
    assert res.nbytes[g]["w3"] == want
    assert res.nbytes[g]["w2"] < res.nbytes[g]["w3"] < res.nbytes[g]["w8"]
  two = res.with_options(["w8", "w2"])
  assert list(two.options) == ["w8", "w2"] and two.groups == res.groups
  assert all(set(two.kl[g]) == set(two.nbytes[g]) == {"w8", "w2"} for g in two.groups)
  assert "w3" in res.options   # the scan itself is unchanged
  mid = 8.0 * sum(res.nbytes[g]["w3"] for g in res.groups) / sum(res.numel.values())
  assert set(sens.plan_mixed_precision(two, bits_per_weight=mid).values()) <= {"w8", "w2"}
  with pytest.raises(ValueError, match=r"options \['w4'\] are not in the scan's"):
    res.with_options(["w8", "w4"])


def test_plan_respects_budget_and_rules_reproduce_it(scan):
  params, res = scan
  res = res.with_options(["w8", "w2"])
  lo = 8.0 * sum(res.nbytes[g]["w2"] for g in res.groups) / sum(res.numel.values())
  hi = 8.0 * sum(res.nbytes[g]["w8"] for g in res.groups) / sum(res.numel.values())
  budget = (lo + hi) / 2
  plan = sens.plan_mixed_precision(res, bits_per_weight=budget)
  assert sens.plan_bits_per_weight(plan, res) <= budget + 1e-9
  assert set(plan.values()) == {"w2", "w8"}  # the mid budget mixes both
  assert sens.plan_mixed_precision(res, bits_per_weight=hi + 1) == {g: "w8" for g in res.groups}
  with pytest.raises(ValueError, match="below the smallest plan"):
    sens.plan_mixed_precision(res, bits_per_weight=lo / 2)
  skips = tuple(Rule(pattern=p, weight=None, required=False) for p in SKIP_PATTERNS)
  q = quantize_tree(params, sens.plan_to_rules(plan, res, skip_rules=skips))
  kernels = {p for ps in res.groups.values() for p in ps}
  from jq.tree import leaves_with_paths
  qbytes = sum(x.nbytes for p, x in leaves_with_paths(q) if p in kernels)
  assert qbytes == sum(res.nbytes[g][o] for g, o in plan.items())
