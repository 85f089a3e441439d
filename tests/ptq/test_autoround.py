"""Learned rounding through ``jq.ptq.quantize_model``: block by block on any linen/nnx model
(DenseGeneral heads, ``nn.scan`` stacks, nnx lists), an ordinary QArray checkpoint out, and a
diverging run that falls back to its start and says so."""
from __future__ import annotations

import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jq
import jq.nn as jqnn
from jq import W2A16_G32, Algorithm, AutoRoundOptions
from jq.ptq import quantize_model

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_quantize_model import _quantized_kl, _setup  # noqa: E402  pylint: disable=wrong-import-position


def _rules(**options):
  return jq.default_rules(W2A16_G32, algorithm=Algorithm.AUTOROUND,
                          options=AutoRoundOptions(**options))


@pytest.mark.parametrize("name", ["gpt2_linen", "llama_scan_linen", "nnx_transformer"])
def test_learned_rounding_beats_rtn_and_gptq_on_any_model(name):
  model, variables, calib, evalb = _setup(name)
  rtn, _ = _quantized_kl(model, variables, jq.default_rules(W2A16_G32), calib, evalb)
  gptq, _ = _quantized_kl(model, variables, jq.default_rules(W2A16_G32, algorithm=Algorithm.GPTQ),
                          calib, evalb)
  learned, res = _quantized_kl(model, variables, _rules(steps=40), calib, evalb)
  assert learned < 0.9 * min(rtn, gptq), (learned, rtn, gptq)
  rows = [r for r in res.report if r.algorithm.startswith("autoround")]
  assert rows and all("autoround 40 steps: loss" in r.note for r in rows), res.report
  lines = [line for line in res.log if "autoround" in line]
  units = 2   # two blocks (or two stacked layers) per zoo model
  assert len(lines) >= units and all("lower" in line for line in lines[:units]), res.log


@pytest.mark.parametrize("init", ["gptq", "awq"])
def test_the_checkpoint_is_ordinary_and_starts_from_the_chosen_algorithm(tmp_path, init):
  model, variables, calib, _ = _setup("gpt2_linen")
  res = quantize_model(model, variables, _rules(steps=20, init=init, target="local"), calib)
  assert {r.algorithm for r in res.report} >= {f"autoround (from {init})"}, res.report
  if init == "awq":   # AWQ's scales were folded (and checked) before the learning started
    assert any("awq scales folded into" in line for line in res.log), res.log
  path = tmp_path / "q.safetensors"
  jq.io.save(path, nn.unbox(res.variables))   # (the zoo's GPT-2 keeps nn.with_partitioning boxes)
  back = jq.io.load(path)
  run = jax.jit(jqnn.quantized_apply(model))
  np.testing.assert_array_equal(run(back, calib[0]), run(nn.unbox(res.variables), calib[0]))
  for p, q in jq.leaves_with_paths(back):
    if isinstance(q, jq.QArray):
      q.validate(p)


def test_a_diverging_run_keeps_its_start_and_the_report_says_so():
  model, variables, calib, _ = _setup("gpt2_linen")
  rtn = quantize_model(model, variables, jq.default_rules(W2A16_G32), calib)
  res = quantize_model(model, variables, _rules(steps=3, optimizer="adam", lr=1e6), calib)
  assert all("fell back to its start" in r.note for r in res.report), res.report
  for (p, a), (_, b) in zip(jq.leaves_with_paths(rtn.variables),
                            jq.leaves_with_paths(res.variables)):
    if isinstance(a, jq.QArray):
      np.testing.assert_array_equal(a.unpacked(), b.unpacked(), err_msg=p)
      assert bool(jnp.all(jnp.isfinite(b.scale)))


def test_roads_learned_rounding_cannot_take_are_refused():
  model, variables, calib, _ = _setup("gpt2_linen")
  with pytest.raises(ValueError, match="adapter-free road"):
    quantize_model(model, variables, _rules(steps=2), calib, blocks=object())


def test_a_per_example_keyword_argument_is_refused_up_front_and_a_broadcast_one_runs():
  """Learned rounding runs rows drawn from all batches with the same keyword arguments: a mask
  with a row per example failed in a raw broadcast deep in the attention (or, at a step of the
  batches' size, would silently mask other rows)."""
  class M(nn.Module):
    @nn.compact
    def __call__(self, x, *, mask):
      h = nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(x, x, mask=mask)
      return nn.Dense(16, name="fc")(x + h)
  m = M()
  calib = [jax.random.normal(jax.random.key(i), (4, 6, 16)) for i in range(3)]
  per_example = jnp.ones((4, 1, 6, 6), bool)
  variables = m.init(jax.random.key(0), calib[0], mask=per_example)
  with pytest.raises(ValueError, match=r"keyword argument 'mask' of shape \(4, 1, 6, 6\) has a "
                                       r"row per example .* leading size of 1"):
    quantize_model(m, variables, _rules(steps=2), calib, mask=per_example)
  res = quantize_model(m, variables, _rules(steps=2), calib, mask=per_example[:1])
  assert any("outside blocks: autoround" in line for line in res.log), res.log
