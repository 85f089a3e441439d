"""``jq.calibrate.collect`` / ``capture_inputs``: every adapted layer's input, per stacked layer."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jq.nn as jqnn
from jq.calibrate import Want, capture_inputs, collect


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    h = nn.DenseGeneral((4, 8), name="q")(x)                     # (..., 4, 8)
    return x + nn.DenseGeneral(32, axis=(-2, -1), name="o")(h), None


class Stack(nn.Module):
  @nn.compact
  def __call__(self, x):
    x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=3)(name="layers")(x, None)
    return x


def _setup():
  model = Stack()
  x = jax.random.normal(jax.random.key(1), (2, 5, 32))
  return model, model.init(jax.random.key(0), x), x


def _block_inputs(variables, x):
  """The inputs of q and o of each stacked layer, computed by hand."""
  out = []
  for i in range(3):
    p = jax.tree_util.tree_map(lambda a: a[i], variables["params"]["layers"])
    h = jnp.einsum("btd,dhe->bthe", x, p["q"]["kernel"]) + p["q"]["bias"]
    out.append((x, h))
    x = Block().apply({"params": p}, x, None)[0]
  return out


def test_collect_gives_each_stacked_layer_its_own_statistics():
  model, variables, x = _setup()
  qapply = jqnn.quantized_apply(model)
  got = collect(lambda v, b: qapply(v, b), [x, 2 * x],
                {"params/layers/q/kernel": Want(stack=3, xtx=True),
                 "params/layers/o/kernel": Want(stack=3, xtx=True, samples=4)}, operands=variables)
  want = _block_inputs(variables, x)
  want2 = _block_inputs(variables, 2 * x)
  for i in range(3):
    for path, j in (("params/layers/q/kernel", 0), ("params/layers/o/kernel", 1)):
      a = np.concatenate([np.asarray(want[i][j]).reshape(-1, 32),
                          np.asarray(want2[i][j]).reshape(-1, 32)])
      st = got[path].stats
      np.testing.assert_allclose(np.asarray(st.xtx[i]), a.T @ a, rtol=2e-4, atol=1e-3)
      assert int(st.count[i]) == a.shape[0]
      np.testing.assert_allclose(got[path].hi[i], a.max(axis=0), rtol=1e-5)
  assert got["params/layers/o/kernel"].samples.shape == (3, 4, 32)


def test_capture_inputs_flattens_the_contracting_axes_in_kernel_order():
  model, variables, x = _setup()
  p = jax.tree_util.tree_map(lambda a: a[0], variables["params"]["layers"])
  _, found = capture_inputs(Block().apply, {"params": p}, x, None)   # one block, no scan
  o = found["o/kernel"]            # DenseGeneral(axis=(-2, -1)): (heads, head_dim) -> K = 32
  assert o.shape == (2, 5, 32)
  h = _block_inputs(variables, x)[0][1]
  np.testing.assert_allclose(np.asarray(o), np.asarray(h).reshape(2, 5, 32), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(found["q/kernel"]), np.asarray(x), rtol=0)


class Fork(nn.Module):
  """q, k, v and u read one input (u is asked for other statistics)."""
  @nn.compact
  def __call__(self, x):
    q, k, v, u = (nn.Dense(16, name=n)(x) for n in ("q", "k", "v", "u"))
    return q + k + v + u


def test_layers_reading_one_input_share_one_host_sum():
  model = Fork()
  x = jax.random.normal(jax.random.key(2), (2, 5, 32))
  variables = model.init(jax.random.key(0), x)
  qapply = jqnn.quantized_apply(model)
  paths = [f"params/{n}/kernel" for n in ("q", "k", "v", "u")]
  wants = {p: Want(xtx=True, samples=4) for p in paths}
  wants["params/u/kernel"] = Want(xtx=True)   # other wants: a group of its own
  got = collect(lambda v, b: qapply(v, b), [x, 2 * x], wants, operands=variables)
  q, k, v, u = (got[p] for p in paths)
  assert q is k is v and q.stats.xtx is v.stats.xtx      # one sum, not three copies
  assert u is not q and u.samples is None
  a = np.concatenate([np.asarray(x).reshape(-1, 32), 2 * np.asarray(x).reshape(-1, 32)])
  for st in (q.stats, u.stats):
    np.testing.assert_allclose(st.xtx, a.T @ a, rtol=2e-5, atol=1e-4)
    assert int(st.count) == a.shape[0]
  # each alone: the same statistics as shared
  alone = collect(lambda v, b: qapply(v, b), [x, 2 * x], {"params/k/kernel": wants[paths[1]]},
                  operands=variables)["params/k/kernel"]
  np.testing.assert_array_equal(alone.stats.xtx, k.stats.xtx)
  np.testing.assert_array_equal(alone.samples, k.samples)


class _Expert(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(8, use_bias=False, name="proj")(x)


class _MoEBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):   # expert e reads (e + 1)·x: its input range is (e + 1)× expert 0's
    xe = jnp.stack([x * (e + 1.0) for e in range(8)])
    ex = nn.vmap(_Expert, in_axes=0, out_axes=0, variable_axes={"params": 0},
                 split_rngs={"params": True}, axis_size=8)
    return x + ex(name="experts")(xe).mean(0).sum(-1, keepdims=True), None


class _MoEStack(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.scan(_MoEBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=2)(name="layers")(x, None)[0]


def test_vmapped_experts_get_their_own_statistics_in_expert_order():
  """``jax.debug.callback`` unrolls a vmap into unordered per-expert callbacks: the statistics of
  ``nn.vmap`` experts (inside an ``nn.scan``) reached the host in any order and were summed
  onto the wrong expert (silently wrong static scales)."""
  model = _MoEStack()
  x = jax.random.normal(jax.random.key(1), (2, 6, 16))
  variables = model.init(jax.random.key(0), x)
  qapply = jqnn.quantized_apply(model)
  path = "params/layers/experts/proj/kernel"
  # the layers' inputs by hand: layer 0 reads x, layer 1 reads layer 0's output
  p0 = jax.tree_util.tree_map(lambda a: a[0], variables["params"]["layers"])
  x1 = _MoEBlock().apply({"params": p0}, x, None)[0]
  for _ in range(3):   # (the old order was a race: sometimes right)
    for want in (Want(stack=16), Want(stack=16, xtx=True)):
      got = collect(lambda v, b: qapply(v, b), [x], {path: want}, operands=variables)[path]
      assert got.hi.shape[0] == 16
      for layer, xin in enumerate((x, x1)):
        for e in range(8):
          np.testing.assert_allclose(got.hi[layer * 8 + e].max(),
                                     float(jnp.max(xin * (e + 1.0))), rtol=1e-5)
          if want.xtx:
            a = np.asarray(xin * (e + 1.0)).reshape(-1, 16)
            np.testing.assert_allclose(np.asarray(got.stats.xtx[layer * 8 + e]), a.T @ a,
                                       rtol=2e-4, atol=1e-3)


def test_token_samples_come_from_the_nonzero_rows_of_an_input_with_zero_rows():
  """An expert's input is zero where a token was not routed to it: its AWQ token sample spreads
  over the rows it did get (then zeros when there are fewer), and a dense input keeps its
  evenly spaced sample."""
  model = nn.Dense(8)
  x = jax.random.normal(jax.random.key(1), (2, 16, 32))
  variables = model.init(jax.random.key(0), x)
  qapply = jqnn.quantized_apply(model)
  live = np.zeros(32, bool)
  live[[1, 4, 5, 9, 17, 20, 26, 30]] = True
  masked = x * jnp.asarray(live, x.dtype).reshape(2, 16, 1)
  path = "params/kernel"
  rows = np.asarray(x).reshape(-1, 32)
  for want_n, expect in ((4, rows[[1, 5, 17, 26]]), (12, None)):
    got = collect(lambda v, b: qapply(v, b), [masked], {path: Want(samples=want_n)},
                  operands=variables)[path].samples
    if expect is not None:
      np.testing.assert_array_equal(got, expect)
    else:   # more wanted than there are: all 8 live rows, then zero rows
      np.testing.assert_array_equal(got[:8], rows[live])
      assert not got[8:].any()
  dense = collect(lambda v, b: qapply(v, b), [x], {path: Want(samples=4)},
                  operands=variables)[path].samples
  np.testing.assert_array_equal(dense, rows[np.linspace(0, 31, 4).astype(int)])
