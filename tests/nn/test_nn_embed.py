"""Quantized embedding tables (``nn.Embed`` / ``nnx.Embed``): lookups read the quantized rows and a
tied head's ``attend`` is a quantized dot, each equal to the float layer on the dequantized table;
``jq.head_rule`` / ``default_rules(head=...)`` choose the head."""
from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jq
import jq.nn as jqnn

V, D = 40, 48
IDS = jnp.asarray([[0, 5, 39, 7, -1, 3], [2, 2, 11, 38, 0, -40]], jnp.int32)
SPECS = {"w8a16": jq.W8A16, "w4a16-g16": jq.QuantSpec(qtype=jq.QType.UINT4, symmetric=False,
                                                       granularity=jq.Granularity.GROUP,
                                                       group_size=16),
         "nf4-g16": jq.QuantSpec(qtype=jq.QType.NF4, symmetric=True,
                                 granularity=jq.Granularity.GROUP, group_size=16),
         "fp8": jq.FP8_CHANNEL}


class TiedLM(nn.Module):
  """Token + learned position embeddings, a Dense, the head tied to the token embedding."""
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, ids):
    tok = nn.Embed(V, D, dtype=self.dtype, name="tok")
    x = tok(ids) + nn.Embed(8, D, dtype=self.dtype, name="pos")(jnp.arange(ids.shape[1]))
    return tok.attend(nn.Dense(D, dtype=self.dtype, name="mlp")(x))


def _variables(model, seed=0):
  v = model.init(jax.random.key(seed), IDS)
  return jax.tree.map(lambda a: a * 4.0, v)     # embeddings of a realistic size (not ~1e-2)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_linen_lookup_and_tied_head_equal_the_float_layer_on_the_dequantized_table(name):
  model = TiedLM()
  variables = _variables(model)
  lays = jqnn.layouts(model, variables, IDS)
  assert lays["params/tok/embedding"] == jq.Layout(contracting=(1,), channels=(0,),
                                                   layer="nn.Embed(40, 48)")
  qvars = jqnn.quantize_variables(model, variables, jq.default_rules(jq.W8A16, head=SPECS[name]),
                                  IDS)
  table = qvars["params"]["tok"]["embedding"]
  assert isinstance(table, jq.QArray) and table.tile[0] == 1          # one scale set per row
  assert isinstance(qvars["params"]["pos"]["embedding"], jq.QArray)   # every table (embeddings=True)
  got = jax.jit(jqnn.quantized_apply(model))(qvars, IDS)
  want = model.apply(jq.dequantize_tree(qvars), IDS)
  assert got.dtype == want.dtype and got.shape == (2, 6, V)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  # out-of-range ids give NaN rows, as Flax's float lookup does; negative ones count from the end
  bad = IDS.at[0, 1].set(V)
  got, want = jqnn.quantized_apply(model)(qvars, bad), model.apply(jq.dequantize_tree(qvars), bad)
  assert np.isnan(np.asarray(got[0, 1])).all() and np.isnan(np.asarray(want[0, 1])).all()
  np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-5, atol=1e-5)


def test_linen_embed_dtypes_follow_flax():
  """bf16 ``dtype``: lookups and attend compute in it, as Flax's promote_dtype does."""
  model = TiedLM(dtype=jnp.bfloat16)
  variables = _variables(model)
  qvars = jqnn.quantize_variables(model, variables, jq.default_rules(jq.W8A16, head=jq.W8A16), IDS)
  got = jqnn.quantized_apply(model)(qvars, IDS)
  want = model.apply(jq.dequantize_tree(qvars), IDS)
  assert got.dtype == want.dtype == jnp.bfloat16
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  # bf16 rounding: jq multiplies the integer codes and applies float32 scales after the dot
  np.testing.assert_allclose(got, want, atol=1e-2 * np.abs(want).max())


def test_explain_lists_the_lookup_and_the_tied_head():
  model = TiedLM()
  variables = _variables(model)
  qvars = jqnn.quantize_variables(model, variables, jq.default_rules(jq.W8A16, head=jq.W8A16), IDS)
  routes = jq.explain(model, qvars, IDS, file=None)
  tok = [r for r in routes if r.path == "params/tok/embedding"]
  assert [r.layer.split("(")[0] for r in tok] == ["nn.Embed", "nn.Embed.attend"]
  assert tok[0].impl == "take (rows)" and tok[0].m == 12
  assert tok[1].mode == "weight-only" and tok[1].m == 12 and tok[1].weight.startswith("int8")
  floats = jq.explain(model, variables, IDS, file=None)
  assert [r.layer for r in floats if r.path == "params/tok/embedding"] == ["Embed", "Embed.attend"]


def test_head_rule_matches_the_head_and_optionally_the_tables():
  rules = jq.recipe_rules("w4a16-g128", head=jq.W8A16)
  first = lambda p: next(r for r in rules if re.search(r.pattern, p))
  for path in ("params/lm_head/kernel", "params/head/kernel", "params/output_proj/kernel",
               "params/embed/embedding", "model/wte/embedding"):
    assert first(path).weight == jq.W8A16, path
  for path in ("params/lm_head/bias", "params/embed_norm/scale"):
    assert first(path).weight is None, path
  assert first("params/layers_0/q/kernel").weight == jq.W4A16_G128
  only_head = jq.head_rule(jq.W8A16, embeddings=False)
  assert re.search(only_head.pattern, "params/lm_head/kernel")
  assert not re.search(only_head.pattern, "params/embed/embedding")
  with pytest.raises(ValueError, match="expected a QuantSpec"):
    jq.head_rule("int8")


def test_take_is_jnp_take_of_the_dequantized_table():
  w = jnp.asarray(np.random.default_rng(1).standard_normal((V, D)), jnp.float32)
  lay = jq.Layout(contracting=(1,), channels=(0,))
  for spec in SPECS.values():
    q = jq.quantize(w, spec, layout=lay)
    want = jnp.take(jq.dequantize(q), IDS, axis=0)
    np.testing.assert_array_equal(np.asarray(jq.ops.take(q, IDS)), np.asarray(want))
  # groups across rows (a Dense-style layout) work too: the rows' scales are gathered
  q = jq.quantize(w, jq.W4A16_G32)
  np.testing.assert_array_equal(np.asarray(jq.ops.take(q, IDS, dtype=jnp.bfloat16)),
                                np.asarray(jnp.take(jq.dequantize(q, jnp.bfloat16), IDS, axis=0)))
  with pytest.raises(ValueError, match="indices must be integers"):
    jq.ops.take(q, jnp.zeros((2,), jnp.float32))
  dyn = jq.quantize_tree({"w": w}, (jq.Rule(pattern="w", weight=jq.W8A16,
                                             activation=jq.A8_DYNAMIC),))["w"]
  with pytest.raises(ValueError, match="weight-only"):
    jq.ops.take(dyn, IDS)


class NnxTied(nnx.Module):
  def __init__(self, rngs):
    self.tok = nnx.Embed(V, D, rngs=rngs)
    self.mlp = nnx.Linear(D, D, rngs=rngs)

  def __call__(self, ids):
    return self.tok.attend(self.mlp(self.tok(ids)))


class OwnAttend(nnx.Embed):
  """A subclass computing on its table itself: jq cannot run it quantized."""

  def attend(self, query, out_sharding=None):
    return query @ self.embedding[...].T * 0.5


def test_nnx_embed_runs_quantized_and_a_custom_attend_stays_float():
  model = NnxTied(nnx.Rngs(0))
  qmodel = jqnn.quantize_module(model, jq.default_rules(jq.W8A16, head=SPECS["w4a16-g16"]))
  assert isinstance(qmodel.tok.embedding.get_value(), jq.QArray)
  got = nnx.jit(lambda m, x: m(x))(qmodel, IDS)
  ref = nnx.clone(model)
  nnx.update(ref, jq.dequantize_tree(nnx.state(qmodel, nnx.Param)))
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref(IDS)), rtol=1e-5, atol=1e-5)
  layers = [r.layer.split("(")[0] for r in jq.explain(qmodel, IDS, file=None)
            if r.path == "tok/embedding"]
  assert layers == ["nnx.Embed", "nnx.Embed.attend"]

  model.tok = OwnAttend(V, D, rngs=nnx.Rngs(1))
  # the head rule asks for a head jq cannot run: an error naming it (not a silently float head)
  with pytest.raises(ValueError, match=r"tok/embedding \(OwnAttend.attend reads self.embedding"):
    jqnn.quantize_module(model, jq.default_rules(jq.W8A16, head=jq.W8A16))
  rules = (jq.Rule(pattern="embedding", weight=jq.W8A16, required=False),) + jq.default_rules(
      jq.W8A16)
  with pytest.warns(UserWarning, match=r"tok/embedding: OwnAttend.attend reads self.embedding"):
    qmodel = jqnn.quantize_module(model, rules)
  assert not isinstance(qmodel.tok.embedding.get_value(), jq.QArray)
  assert isinstance(qmodel.mlp.kernel.get_value(), jq.QArray)
