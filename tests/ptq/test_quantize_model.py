"""``jq.ptq.quantize_model``: calibrated quantization of any linen/nnx model, no adapter.

Models from the layout zoo (tests/nn/zoo.py) with a few outlier input channels (norm scales x10,
as trained LLMs have), so that AWQ and SmoothQuant have something to fix.
"""
from __future__ import annotations

import dataclasses
import pathlib
import re
import sys
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn
from flax import nnx

import jq
import jq.nn as jqnn
from jq import A8_DYNAMIC, A8_STATIC, W4A16_G32, W4A16_G128, W8A16, Algorithm
from jq.ptq import PTQConfig, quantize_model, solves
from jq.ptq.matrices import MatrixView, assemble

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "nn"))
import zoo  # noqa: E402  pylint: disable=wrong-import-position

GPTQ = jq.default_rules(W4A16_G128, algorithm=Algorithm.GPTQ)
AWQ = jq.default_rules(W4A16_G128, algorithm=Algorithm.AWQ)
RTN = jq.default_rules(W4A16_G128)


def _kl(a, b) -> float:
  pa, pb = jax.nn.log_softmax(a, -1), jax.nn.log_softmax(b, -1)
  return float(jnp.mean(jnp.sum(jnp.exp(pa) * (pa - pb), -1)))


def _outliers(model, variables, factor=10.0):
  rng = np.random.default_rng(0)
  def bump(s):
    s = np.array(s)
    s[..., rng.choice(s.shape[-1], 4, replace=False)] *= factor
    return jnp.asarray(s)
  if variables is None:
    for _, m in nnx.iter_modules(model):
      if isinstance(m, nnx.LayerNorm):
        m.scale.set_value(bump(m.scale.get_value()))
    return None
  def one(kp, x):
    p = jq.tree.path_str(kp)
    return bump(x) if p.endswith("/scale") and ("norm" in p or "/ln_" in p) else x
  return jax.tree_util.tree_map_with_path(one, variables)


def _setup(name):
  model, variables, _ = zoo.gpt2_linen(False) if name == "gpt2_linen" else getattr(zoo, name)()
  variables = _outliers(model, variables)
  return model, variables, zoo.example_batches(name, n=4), zoo.example_batches(name, n=2, seed=7)


def _quantized_kl(model, variables, rules, calib, evalb):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")    # (the nnx zoo model's custom layer stays float, by name)
    res = quantize_model(model, variables, rules, calib)
  if variables is None:
    run_q, run_f = jax.jit(lambda b: res.module(b)), jax.jit(lambda b: model(b))
  else:
    qapply = jax.jit(jqnn.quantized_apply(model))
    run_q, run_f = (lambda b: qapply(res.variables, b)), jax.jit(lambda b: model.apply(variables, b))
  return float(np.mean([_kl(run_f(b), run_q(b)) for b in evalb])), res


@pytest.mark.parametrize("name", ["gpt2_linen", "llama_scan_linen", "nnx_transformer"])
def test_gptq_and_awq_beat_rtn_and_smoothquant_beats_plain_w8a8(name):
  model, variables, calib, evalb = _setup(name)
  kl = {k: _quantized_kl(model, variables, r, calib, evalb)[0] for k, r in [
      ("rtn", RTN), ("gptq", GPTQ), ("awq", AWQ),
      ("w8a8", jq.default_rules(W8A16, A8_STATIC)),
      ("sq", jq.default_rules(W8A16, A8_STATIC, algorithm=Algorithm.SMOOTHQUANT))]}
  assert kl["gptq"] < kl["rtn"] and kl["awq"] < kl["rtn"], kl
  assert kl["sq"] < kl["w8a8"], kl


def test_bias_folding_keeps_the_float_model_and_wrong_groups_are_skipped():
  """GPT-2 style: LayerNorm biases and linear biases fold exactly; fc -> proj across a GELU is
  never applied (it would change the model)."""
  model, variables, calib, evalb = _setup("gpt2_linen")
  for rules in (AWQ, jq.default_rules(W8A16, A8_DYNAMIC, algorithm=Algorithm.SMOOTHQUANT)):
    _, res = _quantized_kl(model, variables, rules, calib, evalb)
    folded = [l for l in res.log if "folded into" in l]
    assert any("ln_1 -> " in l for l in folded) and any("attn/v -> o" in l for l in folded)
    assert any("ln_2 -> fc" in l for l in folded), res.log
    assert not any("mlp/fc -> proj" in l for l in folded)
    assert any("mlp/proj/kernel: no producer" in l for l in res.log)
    for b in evalb:   # the folded float model (res.ref) is the original function
      want, got = model.apply(variables, b), model.apply(res.ref, b)
      assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) <= 1e-5
    changed = jq.tree.leaves_with_paths(res.ref)
    bias = dict(changed)["params/h_0/ln_1/bias"]
    assert not np.allclose(bias, zoo.get_kernel(variables, "params/h_0/ln_1/bias"))


def test_scan_stack_gets_per_layer_groups_and_static_scales():
  model, variables, calib, evalb = _setup("llama_scan_linen")
  kl, res = _quantized_kl(model, variables,
                          jq.default_rules(W8A16, A8_STATIC, algorithm=Algorithm.SMOOTHQUANT),
                          calib, evalb)
  folded = [l for l in res.log if "folded into" in l]
  for g in ("attn_norm -> k+q+v", "v -> o", "mlp_norm -> gate+up", "mlp/up -> down"):
    # in both layers: the stacked producer (v, up) is solved layer by layer, so its second
    # layer still takes its fold after the first layer was quantized
    assert sum(g in l for l in folded) == 2, res.log
  assert not any("already quantized" in l for l in res.log), res.log
  q = res.variables["params"]["layers"]["q"]["kernel"]
  assert q.activation.scale.shape == (2,) and q.tile == (1, 256, 1)
  assert kl < 0.5


class _NnxMlpBlock(nnx.Module):
  def __init__(self, rngs):
    self.norm = nnx.RMSNorm(32, rngs=rngs)
    self.gate = nnx.Linear(32, 64, use_bias=False, rngs=rngs)
    self.up = nnx.Linear(32, 64, rngs=rngs)
    self.down = nnx.Linear(64, 32, rngs=rngs)

  def __call__(self, x):
    h = self.norm(x)
    return x + self.down(nnx.silu(self.gate(h)) * self.up(h))


class _NnxScanStack(nnx.Module):
  """Blocks made by ``nnx.vmap`` (every parameter stacked ``(2, ...)``, paths ``blocks/up/...``
  with no parent module between the stack and its layers), applied by ``nnx.scan``."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(64, 32, rngs=rngs)

    @nnx.split_rngs(splits=2)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(r):
      return _NnxMlpBlock(r)
    self.blocks = make(rngs)

  def __call__(self, tok):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, block):
      return block(x)
    return body(self.embed(tok), self.blocks)


def test_nnx_scan_stack_folds_through_the_gated_product_in_every_layer():
  """up -> down (through ``silu(gate) * up``) is found where the consumer has no grandparent
  module (``blocks/down``), and folds into both stacked layers like the norm's group."""
  model = _NnxScanStack(nnx.Rngs(0))
  calib = [jnp.asarray(np.random.default_rng(i).integers(0, 64, (4, 8))) for i in range(3)]
  want = model(calib[0])
  res = quantize_model(model, None, jq.default_rules(W8A16, A8_DYNAMIC,
                                                     algorithm=Algorithm.SMOOTHQUANT), calib)
  folded = [l for l in res.log if "folded into" in l]
  assert sum("blocks/up -> down" in l for l in folded) == 2, res.log
  assert sum("blocks/norm -> gate+up" in l for l in folded) == 2, res.log
  got = res.module(calib[0])
  assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 0.05


class _Norm(nn.Module):
  dtype: Any

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.bfloat16)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)
    return y.astype(self.dtype) * scale.astype(self.dtype)


class _Bf16Mlp(nn.Module):
  dtype: Any = jnp.bfloat16

  @nn.compact
  def __call__(self, tok):
    kw = dict(dtype=self.dtype, param_dtype=jnp.bfloat16)
    x = nn.Embed(64, 32, **kw)(tok)
    h = _Norm(self.dtype, name="norm")(x)
    up = nn.Dense(64, name="up", **kw)(h)
    return x + nn.Dense(32, name="down", **kw)(nn.silu(nn.Dense(64, name="gate", **kw)(h)) * up)


def test_a_model_computing_in_bfloat16_is_told_to_calibrate_in_float32():
  """In bfloat16 compute every fold moves the outputs by rounding, so no fold passes the check:
  the log and a warning say so and what to do; the same parameters in a float32 instance fold."""
  model = _Bf16Mlp()
  calib = [jnp.asarray(np.random.default_rng(i).integers(0, 64, (4, 8))) for i in range(3)]
  variables = model.init(jax.random.key(0), calib[0])
  rules = jq.default_rules(W8A16, A8_DYNAMIC, algorithm=Algorithm.SMOOTHQUANT)
  with pytest.warns(UserWarning, match="computes in bfloat16"):
    res = quantize_model(model, variables, rules, calib)
  assert not any("folded into" in l for l in res.log), res.log
  assert any("computes in bfloat16" in l and "float32" in l for l in res.log), res.log
  res32 = quantize_model(_Bf16Mlp(dtype=jnp.float32), variables, rules, calib)
  folded = [l for l in res32.log if "folded into" in l]
  assert any("norm -> gate+up" in l for l in folded) and any("up -> down" in l for l in folded)


class _Bf16MlpFloat32Out(_Bf16Mlp):
  @nn.compact
  def __call__(self, tok):
    return super().__call__(tok).astype(jnp.float32)   # (logits cast at the end, as LLMs do)


def test_a_bfloat16_model_with_float32_outputs_is_told_to_calibrate_in_float32():
  """The note was read from the outputs' dtype only: layers computing in bfloat16 behind a final
  float32 cast failed every fold with no word on why."""
  model = _Bf16MlpFloat32Out()
  calib = [jnp.asarray(np.random.default_rng(i).integers(0, 64, (4, 8))) for i in range(3)]
  variables = model.init(jax.random.key(0), calib[0])
  assert model.apply(variables, calib[0]).dtype == jnp.float32
  rules = jq.default_rules(W8A16, A8_DYNAMIC, algorithm=Algorithm.SMOOTHQUANT)
  with pytest.warns(UserWarning, match="computes in bfloat16"):
    res = quantize_model(model, variables, rules, calib)
  assert not any("folded into" in l for l in res.log), res.log
  assert any("computes in bfloat16" in l and "float32" in l for l in res.log), res.log


def _kernels(res) -> dict[str, np.ndarray]:
  tree = res.variables if res.module is None else nnx.state(res.module, nnx.Param)
  return {p: np.asarray(q.dequantize(jnp.float32)) for p, q in jq.tree.leaves_with_paths(tree)
          if isinstance(q, jq.QArray)}


def test_gptq_kernels_reading_one_input_are_solved_as_one(monkeypatch):
  """q, k and v share one Hessian factorisation (``jq.ptq.solves.fuse``), layer by
  layer of a scan stack: the log names the groups, and every kernel has the bits of solving it
  alone."""
  model, variables, calib, _ = _setup("llama_scan_linen")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    res = quantize_model(model, variables, GPTQ, calib)
    monkeypatch.setattr(solves, "fuse", lambda tasks: (
        list(tasks), [[(i, 0, int(t.w.shape[-1]))] for i, t in enumerate(tasks)]))
    alone = quantize_model(model, variables, GPTQ, calib)
  line = next(l for l in res.log if "solved as one" in l)
  assert "layers/q/kernel + " in line and not any("solved as one" in l for l in alone.log), line
  got, want = _kernels(res), _kernels(alone)
  assert got.keys() == want.keys()
  for p in got:
    np.testing.assert_array_equal(got[p], want[p], err_msg=p)


@pytest.mark.parametrize("name,first,second", [
    ("gpt2_linen", "params/h_0/", "params/h_1/"), ("nnx_transformer", "blocks/0/", "blocks/1/"),
    ("llama_scan_linen", 0, 1)])
def test_sequential_calibrates_each_block_on_the_quantized_blocks_before_it(name, first, second):
  """The blocks are found in the module tree; the fast road (one block per step, chained) gives
  what the reference road (the whole model per block) gives; the first block sees the float
  model's activations, the second the quantized first block's."""
  model, variables, calib, _ = _setup(name)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    seq = _kernels(quantize_model(model, variables, GPTQ, calib))
    ref = _kernels(quantize_model(model, variables, GPTQ, calib, chained=False))
    flat = _kernels(quantize_model(model, variables, GPTQ, calib,
                                   config=PTQConfig(sequential=False)))
  assert seq.keys() == ref.keys() == flat.keys()
  for p in seq:
    np.testing.assert_allclose(seq[p], ref[p], rtol=0, atol=1e-6, err_msg=p)
  def part(prefix_or_layer):
    if isinstance(prefix_or_layer, str):
      return {p: v for p, v in seq.items() if p.startswith(prefix_or_layer)}, flat
    return ({p: v[prefix_or_layer] for p, v in seq.items() if "layers" in p},
            {p: v[prefix_or_layer] for p, v in flat.items() if "layers" in p})
  got, want = part(first)
  assert got and all(np.array_equal(v, want[p]) for p, v in got.items())
  got, want = part(second)
  assert got and all(not np.array_equal(v, want[p]) for p, v in got.items())


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x + nn.Dense(16, name="fc2")(jax.nn.relu(nn.Dense(32, name="fc1")(x)))


class _Between(nn.Module):
  """Blocks with a computation between them (the fast road cannot chain them)."""
  @nn.compact
  def __call__(self, x):
    for i in range(3):
      x = jnp.tanh(_Block(name=f"block_{i}")(x))
    return nn.Dense(8, name="head")(x)


def test_sequential_reruns_the_model_when_blocks_do_not_chain():
  model = _Between()
  rng = np.random.default_rng(0)
  calib = [jnp.asarray(rng.normal(size=(4, 6, 16)), jnp.float32) for _ in range(3)]
  variables = model.init(jax.random.key(0), calib[0])
  res = quantize_model(model, variables, GPTQ, calib)
  assert any("params/block_1 is not the output of params/block_0" in l for l in res.log), res.log
  ref = quantize_model(model, variables, GPTQ, calib, chained=False)
  got, want = _kernels(res), _kernels(ref)
  for p in want:
    np.testing.assert_allclose(got[p], want[p], rtol=0, atol=1e-6, err_msg=p)


class _CrossBlock(nn.Module):
  @nn.compact
  def __call__(self, x, mem):
    h = nn.Dense(32, use_bias=False, name="q")(_Norm(jnp.float32, name="norm")(x))
    return x + nn.Dense(32, use_bias=False, name="k")(mem) * jnp.tanh(h)


class _EncDec(nn.Module):
  """An encoder whose normed output every decoder block reads (T5's cross-attention k/v)."""
  @nn.compact
  def __call__(self, x):
    mem = _Norm(jnp.float32, name="enc_norm")(nn.Dense(32, name="enc")(x))
    for i in range(2):
      x = _CrossBlock(name=f"dec_{i}")(x, mem)
    return x


@pytest.mark.parametrize("rules,algo", [
    (jq.default_rules(W4A16_G32, algorithm=Algorithm.AWQ), "awq"),
    (jq.recipe_rules("smoothquant-w8a8-static"), "smoothquant")])
def test_sequential_folds_a_group_whose_consumers_lie_in_several_blocks(rules, algo):
  """Every decoder block's k reads the encoder's normed output: one scale group over two
  blocks.  Sequential calibration dropped it without a word (the k kernels rounded to nearest);
  it is folded with the first block, as the whole-model road folds it."""
  model = _EncDec()
  rng = np.random.default_rng(0)
  calib = [jnp.asarray(rng.normal(size=(4, 8, 32)), jnp.float32) for _ in range(3)]
  variables = _outliers(model, model.init(jax.random.key(0), calib[0]))
  ks = ("params/dec_0/k/kernel", "params/dec_1/k/kernel")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    res = {seq: quantize_model(model, variables, rules, calib, config=PTQConfig(sequential=seq))
           for seq in (True, False)}
  for seq, r in res.items():
    folded = [l for l in r.log if l.startswith("params/enc_norm -> k+k") and "folded" in l]
    assert folded, (seq, r.log)
    rows = {row.path: row for row in r.report}
    assert all(rows[k].algorithm == algo for k in ks), (seq, [rows[k] for k in ks])
  # the same fold and (but for the quantized encoder under the sequential road) the same kernels
  s_seq, s_flat = (np.asarray(r.variables["params"]["enc_norm"]["scale"]) for r in
                   (res[True], res[False]))
  assert not np.allclose(s_seq, np.asarray(variables["params"]["enc_norm"]["scale"]))
  np.testing.assert_allclose(s_seq, s_flat, rtol=0.2)
  y_float = model.apply(variables, calib[0])
  def err(qv):
    y = jax.jit(jqnn.quantized_apply(model))(qv, calib[0])
    return float(jnp.linalg.norm(y - y_float) / jnp.linalg.norm(y_float))
  rtn = err(jqnn.quantize_variables(model, variables, [dataclasses.replace(
      r, algorithm=Algorithm.RTN, options=None) for r in rules], calib[0],
      calibration_batches=calib))
  seq, flat = err(res[True].variables), err(res[False].variables)
  assert seq < 0.9 * rtn and abs(seq - flat) < 0.1 * flat, (seq, flat, rtn)


class _ConvNet(nnx.Module):
  def __init__(self, *, rngs):
    self.conv = nnx.Conv(3, 16, (3, 3), rngs=rngs)
    self.fc = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, x):
    return self.fc(nnx.relu(self.conv(x)).mean(axis=(1, 2)))


@pytest.mark.parametrize("recipe", ["gptq-w4a16-g128", "smoothquant-w8a8-static"])
def test_calibrated_recipes_round_a_convolution_to_nearest_and_say_so(recipe):
  """A convolution's input does not map onto its kernel's contracting axes: GPTQ/AWQ/SmoothQuant
  are not available there.  Any calibrated recipe on a model with a conv aborted the whole run
  (blaming "calibration batch 0"); the conv is rounded to nearest, by name in the log."""
  calib = [jax.random.normal(jax.random.key(i), (2, 8, 8, 3)) for i in range(2)]
  res = quantize_model(_ConvNet(rngs=nnx.Rngs(0)), None, jq.recipe_rules(recipe), calib)
  rows = {r.path: r.algorithm for r in res.report}
  assert rows == {"conv/kernel": "rtn", "fc/kernel": recipe.split("-")[0]}, rows
  assert any(l.startswith("conv/kernel: nnx.Conv") and "rounded to nearest" in l
             for l in res.log), res.log
  with pytest.raises(ValueError, match=r"^conv/kernel: this layer's input does not map"):
    from jq.calibrate import Want, collect   # pylint: disable=import-outside-toplevel
    net = jqnn.nnx.with_quantized_classes(_ConvNet(rngs=nnx.Rngs(0)))
    collect(lambda m, b: m(b), calib, {"conv/kernel": Want(xtx=True)}, operands=net)


class _Expert(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(32, use_bias=False, name="proj")(x)


class _SharedExperts(nn.Module):
  """``nn.scan`` over layers of ``nn.vmap`` experts that all read the layer's input
  (``in_axes=None``); expert 3 of each layer gets no tokens when ``dead``."""
  dead: bool = False

  @nn.compact
  def __call__(self, x):
    def block(mdl, h, _):
      ex = nn.vmap(_Expert, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=None, out_axes=0, axis_size=4)
      y = ex(name="experts")(h)                                     # (4, b, s, 32)
      if self.dead:
        y = y * jnp.asarray([1.0, 1.0, 1.0, 0.0])[:, None, None, None]
      return h + y.mean(0), None
    return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=2)(self, x, None)[0]


class _DeadExpert(nn.Module):
  """``nn.vmap`` experts with their own inputs; expert 3's buffer is empty (all zeros)."""
  @nn.compact
  def __call__(self, x):
    xe = jnp.stack([x * (e + 1.0) for e in range(3)] + [jnp.zeros_like(x)])
    ex = nn.vmap(_Expert, variable_axes={"params": 0}, split_rngs={"params": True},
                 in_axes=0, out_axes=0, axis_size=4)
    return ex(name="experts")(xe)


def test_gptq_on_scanned_experts_that_share_their_input():
  """Each of the 2 × 4 stacked experts gets its own Hessian (the layer's input), though the
  callback of an input shared by a vmap runs once per layer: that was "2 calls ... do not
  divide into its 8 stacked layers"."""
  model = _SharedExperts()
  rng = np.random.default_rng(0)
  calib = [jnp.asarray(rng.normal(size=(2, 8, 32)), jnp.float32) for _ in range(2)]
  variables = model.init(jax.random.key(0), calib[0])
  assert variables["params"]["experts"]["proj"]["kernel"].shape == (2, 4, 32, 32)
  res = quantize_model(model, variables, GPTQ, calib)
  assert {r.algorithm for r in res.report if "experts" in r.path} == {"gptq"}
  y_float = model.apply(variables, calib[0])
  def err(qv):
    y = jax.jit(jqnn.quantized_apply(model))(qv, calib[0])
    return float(jnp.linalg.norm(y - y_float) / jnp.linalg.norm(y_float))
  assert err(res.variables) < err(jqnn.quantize_variables(model, variables, RTN, calib[0]))


def test_an_expert_no_token_reached_is_rounded_to_nearest_and_takes_its_stacks_range():
  """GPTQ stopped the whole run on an expert with a zero Hessian, and its static activation
  scale was 1 (its real inputs rounded to a handful of levels): now that expert is rounded to
  nearest and takes the other experts' input range, each said in the log."""
  model = _DeadExpert()
  rng = np.random.default_rng(0)
  calib = [jnp.asarray(rng.normal(size=(2, 8, 32)), jnp.float32) for _ in range(2)]
  variables = model.init(jax.random.key(0), calib[0])
  res = quantize_model(model, variables, GPTQ, calib)
  assert any(l.startswith("params/experts/proj/kernel[3]: no nonzero calibration input")
             for l in res.log), res.log
  row = next(r for r in res.report if r.path == "params/experts/proj/kernel")
  assert "layer 3: no calibration input; rounded to nearest" in row.note, row
  res = quantize_model(model, variables, jq.recipe_rules("w8a8-static"), calib)
  s = np.asarray(res.variables["params"]["experts"]["proj"]["kernel"].activation.scale)
  assert s[3] == s[:3].max(), s
  assert any("stacked layers [3] saw no calibration input" in l for l in res.log), res.log


class _MoEBlock(nn.Module):
  """A Mixtral-style block: one norm, a router and ``nn.vmap`` experts all reading its output
  (soft routing, so that every expert sees every token)."""
  @nn.compact
  def __call__(self, x, _):
    h = nn.LayerNorm(name="ln")(x)
    w = jax.nn.softmax(nn.Dense(4, name="router")(h), -1)
    ys = nn.vmap(_GatedExpert, variable_axes={"params": 0}, split_rngs={"params": True},
                 in_axes=None, out_axes=0, axis_size=4)(name="experts")(h)
    return x + jnp.einsum("ebsd,bse->bsd", ys, w), None


class _GatedExpert(nn.Module):
  @nn.compact
  def __call__(self, x):
    g = nn.Dense(64, use_bias=False, name="gate")(x)
    u = nn.Dense(64, use_bias=False, name="up")(x)
    return nn.Dense(32, use_bias=False, name="down")(nn.silu(g) * u)


class _ScannedMoE(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.scan(_MoEBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=2)(name="blocks")(x, None)[0]


@pytest.mark.parametrize("recipe,twin", [("awq-w4a16-g32", "w4a16-g32"),
                                         ("smoothquant-w8a8", "w8a8-dynamic")])
def test_experts_that_share_a_norm_take_one_scale_per_layer_with_the_float_router(recipe, twin):
  """Experts (``nn.vmap``, ``in_axes=None``) under ``nn.scan`` after one LayerNorm per layer, with
  a router that stays float: AWQ/SmoothQuant found no producer ("no producer of their input could
  take the scales": the router reads the norm too).  Now each scanned layer's experts share one
  scale row chosen from all of them, folded into the norm's scale and bias, and the router's rows
  take it too (as AutoAWQ does for Mixtral); the float model is unchanged."""
  model = _ScannedMoE()
  rng = np.random.default_rng(0)
  outliers = np.ones(32)
  outliers[:3] = 30.0
  calib = [jnp.asarray(rng.normal(size=(2, 8, 32)) * outliers, jnp.float32) for _ in range(2)]
  variables = model.init(jax.random.key(0), calib[0])
  # (the experts' down projections rounded to nearest: one scale search per layer, to be quick)
  rtn_down = dataclasses.replace(jq.recipe_rules(twin)[-1], pattern=r"down/kernel$")
  res = quantize_model(model, variables, (rtn_down,) + jq.recipe_rules(recipe), calib,
                       config=PTQConfig(sequential=recipe.startswith("smooth")))
  assert any(l.startswith("params/blocks/ln -> gate+up (and router, kept float): "
                          f"{recipe.split('-')[0]} scales folded into params/blocks/ln (affine)")
             for l in res.log), res.log
  assert {r.path.split("/")[-2]: r.algorithm for r in res.report} == {
      "gate": recipe.split("-")[0], "up": recipe.split("-")[0], "down": "rtn"}, res.report
  before, after = variables["params"]["blocks"], res.ref["params"]["blocks"]
  s = np.asarray(after["experts"]["gate"]["kernel"] / before["experts"]["gate"]["kernel"])
  s = s[..., 0]                                                        # (layers, experts, K)
  np.testing.assert_allclose(s, np.broadcast_to(s[:, :1], s.shape), rtol=1e-5)
  assert not np.allclose(s[0, 0], s[1, 0], rtol=1e-3)                 # a row per layer
  router = np.asarray(after["router"]["kernel"] / before["router"]["kernel"])[..., 0]
  np.testing.assert_allclose(router, s[:, 0], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(after["ln"]["bias"]),
                             np.asarray(before["ln"]["bias"]) / s[:, 0], rtol=1e-5)
  y_float = model.apply(variables, calib[0])
  np.testing.assert_allclose(model.apply(res.ref, calib[0]), y_float, rtol=1e-4, atol=1e-4)
  def err(qv):
    y = jax.jit(jqnn.quantized_apply(model))(qv, calib[0])
    return float(jnp.linalg.norm(y - y_float) / jnp.linalg.norm(y_float))
  rtn = jqnn.quantize_variables(model, variables, jq.recipe_rules(twin), calib[0])
  assert err(res.variables) < 0.95 * err(rtn), (err(res.variables), err(rtn))


def test_a_non_finite_parameter_and_uneven_batches_for_learned_rounding_are_named_up_front():
  """A NaN/Inf kernel surfaced as the next layer's non-finite input, blamed on the data; batches
  of different lengths under learned rounding failed in a raw concatenate after the other solves."""
  model = _Between()
  rng = np.random.default_rng(0)
  calib = [jnp.asarray(rng.normal(size=(4, 6, 16)), jnp.float32) for _ in range(2)]
  variables = model.init(jax.random.key(0), calib[0])
  k = np.array(variables["params"]["block_1"]["fc2"]["kernel"])
  k[3, 5] = np.inf
  broken = {"params": {**variables["params"], "block_1": {
      **variables["params"]["block_1"], "fc2": {**variables["params"]["block_1"]["fc2"],
                                                "kernel": jnp.asarray(k)}}}}
  with pytest.raises(ValueError, match=r"^params/block_1/fc2/kernel: shape \(32, 16\) dtype "
                                       r"float32 has 1 NaN/Inf values \(first at index \(3, 5\)"):
    quantize_model(model, broken, GPTQ, calib)
  uneven = [calib[0], calib[1][:, :4]]
  ar = jq.default_rules(W4A16_G32, algorithm=Algorithm.AUTOROUND,
                        options=jq.AutoRoundOptions(steps=2))
  with pytest.raises(ValueError, match=r"batch 1 \[\(4, 4, 16\)\]: pad or crop them"):
    quantize_model(model, variables, ar, uneven)
  quantize_model(model, variables, GPTQ, uneven)   # (the other algorithms take them)


def test_matrix_view_reproduces_the_layout_grid():
  cases = [((256, 4, 64), jq.Layout(contracting=(0,), channels=(1, 2))),
           ((4, 64, 256), jq.Layout(contracting=(0, 1), channels=(2,))),
           ((3, 256, 64), jq.Layout(contracting=(1,), channels=(2,), batch=(0,))),
           ((3, 3, 8, 16), jq.Layout(contracting=(0, 1, 2), channels=(3,)))]
  for shape, lay in cases:
    w = jax.random.normal(jax.random.key(0), shape)
    for spec in (W8A16, W4A16_G128, W4A16_G32):
      view = MatrixView(shape, lay)
      spec2 = view.matrix_spec(spec, name="w")

      @jax.jit   # one program per case (op by op, the 12 cases took ~70 s of dispatch)
      def both(w, view=view, spec=spec, spec2=spec2, lay=lay):
        return (assemble(view, [jq.quantize(m, spec2) for m in view.matrices(w)], spec, name="w"),
                jq.quantize(w, spec, layout=lay))

      got, want = both(w)
      assert got.tile == want.tile
      np.testing.assert_array_equal(got.values, want.values)
      np.testing.assert_array_equal(got.scale, want.scale)


def test_bad_input_names_the_problem():
  model, variables, calib, _ = _setup("gpt2_linen")
  with pytest.raises(ValueError, match="no calibration batches"):
    quantize_model(model, variables, GPTQ, [])
  with pytest.raises(ValueError, match="batches must be an iterable .* got NoneType"):
    quantize_model(model, variables, GPTQ, None)
  with pytest.raises(ValueError, match=r"rules must be a list .* got a str \(a recipe name\? "
                                       r"jq.recipe_rules\('gptq-w4a16-g128'\)\)"):
    quantize_model(model, variables, "gptq-w4a16-g128", calib)   # (was a raw AttributeError)
  with pytest.raises(ValueError, match=r"rules must be a list .* got a Rule \(wrap one rule"):
    quantize_model(model, variables, GPTQ[-1], calib)
  with pytest.raises(ValueError, match="negative token ids"):
    quantize_model(model, variables, GPTQ, [-calib[0] - 1])
  with pytest.raises(ValueError, match="NaN"):
    quantize_model(model, variables, GPTQ, [jnp.full((2, 8), jnp.nan)])
  with pytest.raises(ValueError, match="cannot run calibration batch 0"):
    quantize_model(model, variables, GPTQ, [jnp.zeros((2, 8, 3), jnp.float32)])
  cnn, cvars, _ = zoo.cnn_linen()   # (a convolution: rounded to nearest, by name in the log)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    res = quantize_model(cnn, cvars, jq.default_rules(W8A16, algorithm=Algorithm.GPTQ),
                         zoo.example_batches("cnn_linen", n=1))
  assert any(re.match(r"params/\w+/kernel: nn.Conv.* rounded to nearest$", l) for l in res.log)


def test_a_batch_of_another_structure_or_width_is_named_with_its_layer():
  """A dict batch for a model taking an array reaches a layer as a dict, and a batch of the wrong
  feature width fails in flax's shape check: both are named by batch (and layer)."""
  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(8, name="fc")(x)
  m, x = M(), jnp.ones((4, 32))
  v = m.init(jax.random.key(0), x)
  rules = jq.recipe_rules("w8a8-static")
  with pytest.raises(ValueError, match=r"calibration batch 0 .*params/fc/kernel: the layer's "
                     "input is a dict"):
    jq.nn.quantize_variables(m, v, rules, x, calibration_batches=[{"x": x}])
  with pytest.raises(ValueError, match=r"cannot run calibration batch 0 \(\[\(4, 31\)\]\).*"
                     r"\(31, 8\)"):
    quantize_model(m, v, jq.recipe_rules("gptq-w4a16-g128"), [jnp.ones((4, 31))])


def test_dict_batches_are_checked_like_array_batches():
  """A model taking a dict batch: one dict passed where a list of batches belongs was iterated
  over its keys (a raw 'string indices' error, shapes shown as [()]), a wrong key was a bare
  KeyError, NaN inside a dict passed the up-front check and uneven dict batches passed learned
  rounding's length check."""
  class M(nn.Module):
    @nn.compact
    def __call__(self, batch):
      return nn.Dense(8, name="fc2")(nn.Dense(16, name="fc")(batch["x"]))
  m, b = M(), {"x": jnp.ones((4, 6, 32))}
  v = m.init(jax.random.key(0), b)
  gptq = jq.recipe_rules("gptq-w4a16-g128")
  with pytest.raises(ValueError, match=r"batches must be an iterable .* got a dict with keys "
                                       r"\['x'\] \(one batch\? pass a list"):
    quantize_model(m, v, gptq, b)
  with pytest.raises(ValueError, match=r"calibration_batches must be an iterable .* got a dict"):
    jq.nn.quantize_variables(m, v, jq.recipe_rules("w8a8-static"), b, calibration_batches=b)
  with pytest.raises(ValueError, match=r"cannot run calibration batch 0 \(\[\{'y': \(4, 6, 32\)"
                                       r"\}\]\): KeyError 'x'"):
    quantize_model(m, v, gptq, [{"y": b["x"]}])
  with pytest.raises(ValueError, match=r"calibration batch 1 holds NaN/Inf"):
    quantize_model(m, v, gptq, [b, {"x": b["x"].at[0, 0, 0].set(jnp.nan)}])
  ar = jq.default_rules(W4A16_G32, algorithm=Algorithm.AUTOROUND,
                        options=jq.AutoRoundOptions(steps=2))
  with pytest.raises(ValueError, match=r"batch 1 \[\{'x': \(4, 4, 32\)\}\]: pad or crop"):
    quantize_model(m, v, ar, [b, {"x": b["x"][:, :4]}])
  quantize_model(m, v, gptq, [b, {"x": b["x"][:, :4]}])   # (the other algorithms take them)


def test_a_later_batch_the_model_cannot_run_is_named():
  model, variables, calib, _ = _setup("gpt2_linen")
  bad = calib[:2] + [jnp.zeros((2, 8, 3), jnp.int32)]
  with pytest.raises(ValueError, match=r"calibration batch 2 \(shapes \(2, 8, 3\)\)"):
    quantize_model(model, variables, GPTQ, bad, config=PTQConfig(sequential=False))


def test_nnx_model_gets_the_keyword_arguments_and_its_bad_batch_is_named():
  """``quantize_model(module, None, rules, batches, **kw)``: the keyword arguments were dropped
  for nnx (a required one failed, an optional one, e.g. an attention mask, was silently left
  out of calibration), and a batch the module cannot run was a raw error deep in the model."""
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.fc = nnx.Linear(16, 8, rngs=rngs)

    def __call__(self, batch, *, gain):
      return self.fc(batch["x"] * gain)

  m = Net(nnx.Rngs(0))
  calib = [{"x": jax.random.normal(jax.random.key(i), (4, 16))} for i in range(2)]
  rules = jq.recipe_rules("w8a8-static")
  s1, s3 = (float(quantize_model(m, None, rules, calib, gain=jnp.float32(g)).module.fc.kernel
                  .get_value().activation.scale) for g in (1.0, 3.0))
  np.testing.assert_allclose(s3, 3 * s1, rtol=1e-5)
  with pytest.raises(ValueError, match=r"cannot run calibration batch 0 "
                                       r"\(\[\{'y': \(4, 16\)\}\]\): KeyError 'x'"):
    quantize_model(m, None, rules, [{"y": c["x"]} for c in calib], gain=jnp.float32(1.0))


def test_nnx_batchnorm_model_calibrates_in_eval_mode_only():
  """An nnx CNN with BatchNorm: in eval mode GPTQ keeps its running statistics without the
  warning a Param-only checkpoint gets (the module's own state is complete); in training mode
  (nnx's default until .eval()) calibration is refused by layer instead of failing inside flax or
  calibrating on batch statistics."""
  class CNN(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(3, 16, (3, 3), rngs=rngs)
      self.bn = nnx.BatchNorm(16, rngs=rngs)
      self.drop = nnx.Dropout(0.1, rngs=rngs)
      self.fc = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
      return self.fc(self.drop(nnx.relu(self.bn(self.conv(x))).mean((1, 2))))

  x = jax.random.normal(jax.random.key(0), (8, 8, 8, 3))
  calib = [jax.random.normal(jax.random.key(i), (8, 8, 8, 3)) for i in range(2)]
  m = CNN(nnx.Rngs(0))
  m(x + 1.0)     # (training mode: moves the running statistics)
  with pytest.raises(ValueError, match=r"quantize_model: layers of the module are in training "
                     r"mode: bn \(BatchNorm\), drop \(Dropout\).*module.eval\(\)"):
    quantize_model(m, None, GPTQ, calib)
  with pytest.raises(ValueError, match=r"quantize_module: .*training mode: bn \(BatchNorm\)"):
    jqnn.quantize_module(m, jq.recipe_rules("w8a8-static"), calibration_batches=calib)
  m.eval()
  with warnings.catch_warnings():
    warnings.filterwarnings("error", message=".*holds no value for")
    res = quantize_model(m, None, GPTQ, calib)
  np.testing.assert_array_equal(np.asarray(res.module.bn.mean[...]), np.asarray(m.bn.mean[...]))
  assert float(np.abs(np.asarray(m.bn.mean[...])).max()) > 0   # (statistics that moved)


@pytest.mark.parametrize("recipe", ["awq-w4a16-g32", "smoothquant-w8a8-static"])
def test_group_discovery_runs_models_whose_leading_axis_is_not_a_free_batch(recipe):
  """Scale-group discovery probes the model on one example of the first batch; a model that
  contracts its input's leading axis (DenseGeneral(axis=0)) or holds one kernel per index of it
  (batch_dims) cannot run on one example, so discovery takes the whole batch (it failed inside
  flax); the layers with no producer for the scales are logged."""
  class Mid(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.DenseGeneral((3, 8), axis=0, name="mid")(x)

  class BatchDims(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(16, name="fc")(nn.DenseGeneral(40, batch_dims=(0,), name="bd")(x))

  for m, shape in ((Mid(), (4, 6, 40)), (BatchDims(), (4, 6, 48))):
    x = jax.random.normal(jax.random.key(0), shape)
    v = m.init(jax.random.key(1), x)
    calib = [jax.random.normal(jax.random.key(i + 1), shape) for i in range(2)]
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      res = quantize_model(m, v, jq.recipe_rules(recipe), calib)
    assert any("AWQ/SmoothQuant scales not applied" in line for line in res.log), res.log
    ref = m.apply(v, x)
    y = jqnn.quantized_apply(m)(res.variables, x)
    assert float(jnp.abs(y - ref).max() / jnp.abs(ref).max()) < 0.2
