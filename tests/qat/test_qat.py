"""jq.qat: LSQ fake quantization (exact at step 0, the paper's gradients, straight-through weights),
finalize into an ordinary checkpoint (bit-exact with the last fake-quantized step, through jq.io),
int8 activations through the model's own layer hooks, and distillation that beats round-to-nearest
PTQ on a tiny decoder."""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jq
from jq import qat
from jq.nn.quantize import static_scales

# ---- a tiny pre-LN decoder (linen): DenseGeneral attention, Dense MLP --------------------------

VOCAB, D, HEADS, FFN, T = 64, 64, 4, 128, 16


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="ln_1")(x)
    q, k, v = (nn.DenseGeneral((HEADS, D // HEADS), name=f"{n}_proj")(h) for n in "qkv")
    t = x.shape[1]
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D // HEADS)
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -1e9)
    o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)
    x = x + nn.DenseGeneral(D, axis=(-2, -1), name="o_proj")(o)
    h = nn.LayerNorm(name="ln_2")(x)
    return x + nn.Dense(D, name="down_proj")(jax.nn.gelu(nn.Dense(FFN, name="up_proj")(h)))


class TinyLM(nn.Module):
  layers: int = 2

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, D, name="embed")(tokens)
    for i in range(self.layers):
      x = Block(name=f"block_{i}")(x)
    return nn.Dense(VOCAB, name="lm_head")(nn.LayerNorm(name="ln_f")(x))


def _fill(abstract, seed: int):
  """Random params drawn with numpy (no XLA compiles): unit-variance layer outputs."""
  rng = np.random.default_rng(seed)

  def one(kp, a):
    name = jq.tree.path_str(kp)
    if name.endswith("bias"):
      x = 0.02 * rng.standard_normal(a.shape)
    elif name.endswith("scale"):
      x = 1.0 + 0.1 * rng.standard_normal(a.shape)
    elif "embed" in name:
      x = rng.standard_normal(a.shape)
    else:
      fan_in = a.shape[0] * (a.shape[1] if len(a.shape) == 3 and a.shape[-1] == D else 1)
      x = rng.standard_normal(a.shape) / np.sqrt(fan_in)
    return jnp.asarray(x, a.dtype)

  return jax.tree_util.tree_map_with_path(one, abstract)


def _batches(seed: int, n: int, b: int = 4):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.integers(0, VOCAB, (b, T)), jnp.int32) for _ in range(n)]


def _linen(layers: int = 2, seed: int = 0):
  model = TinyLM(layers=layers)
  tok = _batches(seed, 1)[0]
  return model, _fill(jax.eval_shape(model.init, jax.random.key(0), tok), seed)


@pytest.fixture(scope="module")
def tiny():
  with jax.numpy_dtype_promotion("strict"):   # module fixtures run outside the autouse one
    return _tiny()


def _tiny():
  model, variables = _linen()
  train, held = _batches(0, 16), _batches(1, 4)
  rules = jq.default_rules(jq.W2A16_G32)
  lays = jq.nn.layouts(model, variables, train[0])
  rtn = jax.jit(lambda v: jq.quantize_tree(v, rules, layouts=lays))(variables)  # the PTQ road
  return dict(model=model, variables=variables, train=train, held=held, rules=rules, lays=lays,
              rtn=rtn, qapply=jax.jit(jq.nn.quantized_apply(model)), fapply=jax.jit(model.apply))


@pytest.fixture(scope="module")
def distilled(tiny):
  with jax.numpy_dtype_promotion("strict"):
    return qat.distill(tiny["model"], tiny["variables"], tiny["rules"], tiny["train"], steps=200)


def _kl(tiny, qvars, batches) -> float:
  return float(np.mean([float(jnp.mean(jq.kl_divergence(tiny["fapply"](tiny["variables"], b),
                                                        tiny["qapply"](qvars, b))))
                        for b in batches]))


# ---- the fake quantizer --------------------------------------------------------------------

SPECS = [jq.W8A16, dataclasses.replace(jq.W4A16_G128, group_size=32), jq.W3A16_G128,
         jq.W2A16_G32, jq.QuantSpec(qtype=jq.QType.INT4, granularity=jq.Granularity.GROUP,
                                    group_size=32)]


def _params(w, spec, layout=None):
  step, zero = jq.compute_params(w, spec, layout=layout)
  return step, None if zero is None else zero.astype(jnp.float32)


def test_step_zero_is_round_to_nearest_exactly():
  # (80, 48): groups of 32 leave a partial last group; the 3-D kernel is a DenseGeneral's
  rng = np.random.default_rng(0)
  cases = [(0, None), (1, jq.Layout(contracting=(0,), channels=(1, 2)))]
  ws = {0: jnp.asarray(rng.standard_normal((80, 48)), jnp.float32),
        1: jnp.asarray(rng.standard_normal((64, 4, 16)), jnp.float32)}

  @jax.jit
  def both(ws):
    out = []
    for (spec, (w, layout)) in [(s, cases[0]) for s in SPECS] + [(SPECS[1], cases[1])]:
      step, zero = _params(ws[w], spec, layout)
      tile = spec.tile(ws[w].shape, layout=layout)
      out.append((qat.fake_quant_lsq(ws[w], step, zero, spec, tile),
                  jq.quantize(ws[w], spec, layout=layout).dequantize()))
    return out

  pairs = both(ws)
  assert len(pairs) == len(SPECS) + 1
  for fake, ref in pairs:
    np.testing.assert_array_equal(fake, ref)


def _lsq_reference(w, step, zero, spec, tile, ct):
  """LSQ's gradients (Esser et al. 2019, eq. 3; the zero point as LSQ+'s offset) in float64."""
  qt = spec.qtype
  w, ct = np.asarray(w, np.float64), np.asarray(ct, np.float64)
  s = np.asarray(jq.numerics.expand(step, tile, w.shape), np.float64)
  s = np.broadcast_to(s, w.shape)
  z = 0.0 if zero is None else np.broadcast_to(
      np.asarray(jq.numerics.expand(jnp.round(zero), tile, w.shape), np.float64), w.shape)
  u = w / s
  t = u + z
  inside = (t > qt.qmin) & (t < qt.qmax)
  end = np.where(t <= qt.qmin, qt.qmin, qt.qmax) - z
  g = 1.0 / math.sqrt(np.prod(tile) * qt.qmax)

  def per_tile(e):
    return np.asarray(jq.numerics.stats_to_tiles(
        jnp.sum(jq.numerics.split(jnp.asarray(e, jnp.float32), tile, fill=0.0),
                axis=jq.numerics.tile_axes(w.shape, tile), keepdims=True), w.shape, tile))

  ds = g * per_tile(ct * np.where(inside, np.round(u) - u, end))
  dz = g * per_tile(ct * np.where(inside, 0.0, -s))
  ste = per_tile(ct * np.where(inside, u, 0.0))     # the straight-through part of ∂ŵ/∂s
  return ct * inside, ds, dz, inside, ste, g


@pytest.mark.parametrize("spec", [jq.W2A16_G32, jq.QuantSpec(qtype=jq.QType.INT4)],
                         ids=lambda s: s.describe())
def test_step_and_zero_gradients_are_lsq(spec):
  # codes in [-9, 9] (many clip at both ends) at least 0.2 from a rounding boundary, so the
  # finite differences below change no code
  rng = np.random.default_rng(1)
  tile = spec.tile((64, 6))
  step = jnp.asarray(rng.uniform(0.05, 0.2, jq.numerics.num_tiles((64, 6), tile)), jnp.float32)
  zero = None if spec.symmetric else jnp.full(step.shape, 1.3, jnp.float32)
  u = rng.integers(-9, 10, (64, 6)) + rng.uniform(-0.3, 0.3, (64, 6))
  w = jnp.asarray(u, jnp.float32) * jq.numerics.expand(step, tile, (64, 6))
  ct = jnp.asarray(rng.standard_normal(w.shape), jnp.float32)
  f = lambda w, s, z: jnp.sum(ct * qat.fake_quant_lsq(w, s, z, spec, tile))  # noqa: E731
  dw, ds, dz = jax.grad(f, argnums=(0, 1, 2))(w, step, zero)
  rdw, rds, rdz, inside, ste, g = _lsq_reference(w, step, zero, spec, tile, ct)
  assert 0 < inside.sum() < inside.size
  np.testing.assert_array_equal(dw, rdw)
  np.testing.assert_allclose(ds, rds, rtol=1e-4, atol=1e-6)
  if zero is None:
    assert dz is None
  else:
    np.testing.assert_allclose(dz, rdz, rtol=1e-4, atol=1e-6)
  # finite differences: between code changes the forward is (code − z)·s, exactly linear in s;
  # its slope is LSQ's step gradient (without g) plus the straight-through term Σ ct·w/s over
  # the tile's unclipped elements (eq. 3 replaces the code's derivative 0 by that of w/s)
  eps = 1e-3 * step
  codes = lambda s: jnp.round(w / jq.numerics.expand(s, tile, w.shape))  # noqa: E731
  np.testing.assert_array_equal(codes(step + eps), codes(step - eps))
  # (the sums in float64: a float32 sum of 384 terms, divided by 2·eps, carries ~5e-3 of
  # rounding noise that depends on the order XLA sums in)
  fq = lambda s: np.asarray(qat.fake_quant_lsq(w, s, zero, spec, tile), np.float64)  # noqa: E731
  ct64 = np.asarray(ct, np.float64)
  fd = np.zeros(step.shape, np.float64)
  for i in np.ndindex(step.shape):
    e = jnp.zeros_like(step).at[i].set(eps[i])
    fd[i] = np.sum(ct64 * (fq(step + e) - fq(step - e))) / (2 * float(eps[i]))
  np.testing.assert_allclose(fd, np.asarray(ds) / g + ste, rtol=2e-3, atol=2e-3)


def test_straight_through_weight_gradient_is_one_inside_zero_outside():
  spec = jq.W2A16_G32                                     # codes 0..3
  w = jnp.asarray(np.linspace(-3.0, 3.0, 64).reshape(64, 1), jnp.float32)
  step = jnp.full((2, 1), 0.5, jnp.float32)
  zero = jnp.full((2, 1), 1.0, jnp.float32)               # codes cover w in (-0.5, 1.0)
  dw = jax.grad(lambda w: jnp.sum(qat.fake_quant_lsq(w, step, zero, spec, (32, 1))))(w)
  t = np.asarray(w)[:, 0] / 0.5 + 1.0
  inside = (t > 0) & (t < 3)
  assert inside.any() and (~inside).any()
  np.testing.assert_array_equal(np.asarray(dw)[:, 0], inside.astype(np.float32))


def test_a_plain_optax_loop_trains_params_and_steps():
  # the pure functions in a user's own loop: a 3-bit layer learns a new linear map, its weights
  # and steps training together
  rng = np.random.default_rng(2)
  params = {"dense": {"kernel": jnp.asarray(rng.standard_normal((64, 16)) / 8, jnp.float32)}}
  x = jnp.asarray(rng.standard_normal((256, 64)), jnp.float32)
  target = x @ jnp.asarray(rng.standard_normal((64, 16)) / 8, jnp.float32)
  state = qat.init(params, (jq.Rule(pattern=r"kernel$", weight=jq.W3A16_G128),))
  opt = qat.default_optimizer(0.2, step_learning_rate=0.02)

  def loss(tree):
    fq = qat.fake_quantized(*tree)
    return jnp.mean(jnp.square(x @ fq["dense"]["kernel"] - target))

  @jax.jit
  def step(tree, opt_state):
    value, grads = jax.value_and_grad(loss)(tree)
    with jax.numpy_dtype_promotion("standard"):   # optax's Adam promotes its int32 count
      updates, opt_state = opt.update(grads, opt_state, tree)
      return value, optax.apply_updates(tree, updates), opt_state

  tree = (params, state)
  with jax.numpy_dtype_promotion("standard"):
    opt_state = opt.init(tree)
  losses = []
  for _ in range(60):
    value, tree, opt_state = step(tree, opt_state)
    losses.append(float(value))
  assert losses[-1] < 0.1 * losses[0]
  assert bool(jnp.any(tree[1].layers["dense/kernel"].step != state.layers["dense/kernel"].step))
  q = qat.finalize(*tree)["dense"]["kernel"]
  np.testing.assert_array_equal(q.dequantize(), qat.fake_quantized(*tree)["dense"]["kernel"])


def test_bad_inputs_name_the_path():
  w = jnp.ones((64, 8), jnp.float32)
  params = {"dense": {"kernel": w}, "count": {"kernel": jnp.ones((4, 4), jnp.int32)}}
  with pytest.raises(ValueError, match=r"dense/kernel.*lookup-table"):
    qat.init(params, (jq.Rule(pattern=r"dense/kernel", weight=jq.NF4_G64),))
  with pytest.raises(ValueError, match=r"lookup-table"):
    qat.fake_quant_lsq(w, jnp.ones((1, 8)), None, jq.NF4_G64, (64, 1))
  with pytest.raises(ValueError, match=r"matched no parameter"):
    qat.init(params, (jq.Rule(pattern=r"dense/kernel", weight=jq.W8A16),
                      jq.Rule(pattern=r"attn/q_proj", weight=jq.W8A16)))
  with pytest.raises(ValueError, match=r"count/kernel: shape \(4, 4\) dtype int32.*floating"):
    qat.init(params, (jq.Rule(pattern=r"kernel$", weight=jq.W8A16),))
  with pytest.raises(ValueError, match=r"dense/kernel.*gptq"):
    qat.init(params, (jq.Rule(pattern=r"dense/kernel", weight=jq.W8A16,
                              algorithm=jq.Algorithm.GPTQ),))
  with pytest.raises(ValueError, match=r"dense/kernel: shape \(64, 8\) dtype float32 has 1 NaN"):
    qat.init({"dense": {"kernel": w.at[3, 2].set(jnp.nan)}},
             (jq.Rule(pattern=r"dense/kernel", weight=jq.W8A16),))
  with pytest.raises(ValueError, match=r"dense/kernel.*stacked layers"):
    qat.init({"dense": {"kernel": w}}, (jq.Rule(pattern=r"dense/kernel", weight=jq.W8A16,
                                                activation=jq.A8_STATIC),),
             act_ranges={"dense/kernel": (-np.ones(2), np.ones(2))})
  with pytest.raises(ValueError, match=r"dense/kernel.*static int8 activations; pass"):
    qat.init({"dense": {"kernel": w}}, (jq.Rule(pattern=r"dense/kernel", weight=jq.W8A16,
                                                activation=jq.A8_STATIC),))
  with pytest.raises(ValueError, match=r"w: shape \(64, 8\).*step has shape \(2, 8\)"):
    qat.fake_quant_lsq(w, jnp.ones((2, 8)), None, jq.W8A16, (64, 1), name="w")
  state = qat.init({"dense": {"kernel": w}}, (jq.Rule(pattern=r"dense/kernel", weight=jq.W8A16),))
  with pytest.raises(ValueError, match=r"dense/kernel: the QAT state has a step"):
    qat.fake_quantized({"other": {"kernel": w}}, state)
  nan_state = jax.tree_util.tree_map(lambda s: s * jnp.nan, state)
  with pytest.raises(ValueError, match=r"dense/kernel.*learned step hold NaN"):
    qat.finalize({"dense": {"kernel": w}}, nan_state)


# ---- distillation on the tiny decoder ------------------------------------------------------

def test_distill_beats_round_to_nearest_ptq(tiny, distilled):
  # step 0 is RTN exactly: the first loss is RTN's KL on the first batch
  assert distilled.losses[0] == pytest.approx(_kl(tiny, tiny["rtn"], tiny["train"][:1]), rel=1e-4)
  assert distilled.losses[-1] < 0.5 * distilled.losses[0]
  kl_rtn = _kl(tiny, tiny["rtn"], tiny["held"])
  kl_qat = _kl(tiny, distilled.variables, tiny["held"])
  print(f"held-out KL to the float model, w2a16 g32: RTN {kl_rtn:.4f}, QAT {kl_qat:.4f}")
  assert kl_qat < 0.6 * kl_rtn


def test_finalize_equals_the_last_fake_quantized_step(tiny, distilled):
  fq = dict(jq.leaves_with_paths(jax.jit(qat.fake_quantized)(distilled.params, distilled.state)))
  rtn = dict(jq.leaves_with_paths(tiny["rtn"]))
  deq = dict(jq.leaves_with_paths(jax.jit(jq.dequantize_tree)(distilled.variables)))
  moved = 0
  for path, q in jq.leaves_with_paths(distilled.variables):
    if isinstance(q, jq.QArray):
      np.testing.assert_array_equal(deq[path], fq[path])
      moved += int(np.any(np.asarray(q.scale) != np.asarray(rtn[path].scale)))  # RTN = step 0
  assert moved == len(distilled.state.layers) == 12


def test_checkpoint_round_trips_through_io(tiny, distilled, tmp_path):
  path = str(tmp_path / "qat.safetensors")
  jq.io.save(path, distilled.variables)
  loaded = jq.io.load(path)
  a, b = jq.leaves_with_paths(distilled.variables), jq.leaves_with_paths(loaded)
  assert [p for p, _ in a] == [p for p, _ in b]
  for (p, x), (_, y) in zip(a, b):
    for u, v in zip(jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)):
      np.testing.assert_array_equal(u, v, err_msg=p)
  x = tiny["held"][0]
  np.testing.assert_array_equal(tiny["qapply"](loaded, x), tiny["qapply"](distilled.variables, x))


class TinyMlp(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, D, name="embed")(tokens)
    x = x + nn.Dense(D, name="down_proj")(jax.nn.gelu(nn.Dense(FFN, name="up_proj")(x)))
    return nn.Dense(VOCAB, name="lm_head")(x)


def test_nan_learning_rate_falls_back_to_finite_params():
  model = TinyMlp()
  batches = _batches(5, 2)
  variables = _fill(jax.eval_shape(model.init, jax.random.key(0), batches[0]), 3)
  res = qat.distill(model, variables, jq.default_rules(jq.W4A16_G32), batches, steps=5,
                    optimizer=optax.sgd(1e38))
  assert any("stopped and returned the best iterate so far (step 0" in line
             for line in res.log), res.log
  assert 1 <= len(res.losses) < 5 and all(math.isfinite(v) for v in res.losses)
  for _, leaf in jq.leaves_with_paths(res.variables):
    for a in jax.tree_util.tree_leaves(leaf):
      assert not jnp.issubdtype(a.dtype, jnp.floating) or bool(jnp.all(jnp.isfinite(a)))


def test_int8_activations_run_as_the_quantized_model():
  # static int8 inputs (learned steps) for the MLP, dynamic per-token ones for attention
  model, variables = _linen(layers=1, seed=4)
  batches = _batches(7, 2)
  skips = jq.default_rules(None)[:-1]
  rules = skips + (jq.Rule(pattern=r"(up|down)_proj/kernel$", weight=jq.W8A16,
                           activation=jq.A8_STATIC),
                   jq.Rule(pattern=r"_proj/kernel$", weight=jq.W8A16,
                           activation=jq.A8_DYNAMIC_ASYM))
  state = qat.init_model(model, variables, rules, batches)
  qapply = jq.nn.quantized_apply(model)
  ptq = static_scales(rules, variables, lambda v, b: qapply(v, b), variables, batches, {})
  assert sorted(ptq) == sorted(p for p in state.layers if "up_proj" in p or "down_proj" in p)
  for p, lq in state.layers.items():   # step 0: the PTQ road's calibrated static scales
    if p in ptq:
      np.testing.assert_array_equal(lq.act_step, ptq[p][0])
      assert lq.act_zero is None and ptq[p][1] is None
    else:
      assert lq.act_step is None and lq.activation.mode is jq.ActMode.DYNAMIC
  x = batches[0]
  fake_apply = qat.fake_quant_apply(model)
  fake = jax.jit(fake_apply)(variables, state, x)
  real = jax.jit(qapply)(qat.finalize(variables, state), x)
  np.testing.assert_allclose(fake, real, rtol=1e-4, atol=1e-4)
  grads = jax.jit(jax.grad(lambda st: jnp.mean(jq.kl_divergence(   # any reference will do
      real * 1.1, fake_apply(variables, st, x)))))(state)
  for p, lq in grads.layers.items():
    assert bool(jnp.all(jnp.isfinite(lq.step))) and bool(jnp.any(lq.step != 0)), p
    if p in ptq:
      assert bool(jnp.isfinite(lq.act_step)) and float(lq.act_step) != 0.0, p


# ---- nnx -------------------------------------------------------------------------------------

class NnxMlp(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
    self.up = nnx.Linear(D, FFN, rngs=rngs)
    self.down = nnx.Linear(FFN, D, rngs=rngs)
    self.lm_head = nnx.Linear(D, VOCAB, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    x = x + self.down(jax.nn.gelu(self.up(x)))
    return self.lm_head(x)


def test_distill_an_nnx_module():
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: NnxMlp(nnx.Rngs(0))))
  module = nnx.merge(graphdef, _fill(abstract, 9))
  batches = _batches(8, 4)
  res = qat.distill(module, None, jq.default_rules(jq.W2A16_G32), batches, steps=30)
  assert res.variables is None and res.losses[-1] < res.losses[0]
  x = batches[0]
  fake = jax.jit(qat.fake_quant_apply(module))(res.params, res.state, x)
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(res.module, x), fake, rtol=1e-4,
                             atol=1e-4)
  assert isinstance(res.module.up.kernel.get_value(), jq.QArray)
