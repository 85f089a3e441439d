"""Model zoo: on ordinary Flax models (``zoo.py``), jq's scales follow each layer's real axes.

What is held, per model (linen GPT-2 with separate or fused qkv, a Llama stacked by ``nn.scan``,
an nnx transformer, a ViT, two CNNs):

* layouts and tiles: DenseGeneral q/k/v kernels get one scale per head and feature, o kernels group
  along the flattened (heads, head_dim) contracting axes, stacked kernels one scale set per layer,
  convs one scale per output feature; layers jq cannot run quantized get no layout.
* per-head SQNR: heads (and stacked layers, and blocks of output features) scaled by factors from
  0.01 to 100 are each quantized as well as the best one (within 1 dB): nothing shares a scale
  across them.
* outputs: weight-only, int8 dynamic and int8 static (4 calibration batches) runs under ``jax.jit``
  stay close to float.
* ``jq.io`` round trip is bit for bit and the loaded tree computes the identical output.
* ``explain`` lists the layers in call order; a custom layer (``x @ kernel`` on its own param) is
  listed as float and never quantized.
* errors: a spec naming channel axes the layer lacks, and ``quantize_tree`` without layouts on a
  rank-3 kernel, raise ``ValueError`` naming the path and shape.
* sharding (one 8-device subprocess): quantized under ``jax.jit`` on a 2x4 ("data", "model") mesh,
  ``jq.sharding.partition_specs`` predicts every QArray field's sharding, and the sharded run
  equals the single-device one.
"""
from __future__ import annotations

import functools
import itertools
import pathlib
import re
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jq
import zoo

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import spawn  # noqa: E402  pylint: disable=wrong-import-position

W8A16 = jq.W8A16
G128 = jq.W4A16_G128
G32 = jq.W4A16_G32
SPECS = {"w8a16": W8A16, "w4a16-g128": G128, "w4a16-g32": G32}
RECIPES = ("w8a16", "w4a16-g128", "w8a8-dynamic", "w8a8-static")
MODELS = tuple(zoo.MODELS)

F4 = (1.0, 10.0, 100.0, 0.01)       # four heads / four blocks of output features
PAIRS = (1.0, 1.0, 100.0, 100.0)    # heads in pairs: a group of 128 spans exactly two 64-wide heads
QKV = (1.0, 100.0, 0.01)            # q, k, v of a fused kernel
LAYERS = (100.0, 0.01)              # the two stacked layers of the scan model
SQNR_SPREAD_DB = 1.0

# Relative output error ||y_q - y_float|| / ||y_float|| allowed per recipe.  Measured (CPU): the
# rms relative weight error is 0.006-0.007 (int8 per channel) and 0.09-0.10 (uint4 g128), and
# outputs move 1-2.7x that (Llama most): w8a16 0.006-0.019, w4a16-g128 0.08-0.24, w8a8-dynamic
# 0.008-0.028, w8a8-static 0.009-0.047 (Llama's static run is the closest to its limit).
TOLERANCE = {"w8a16": 2e-2, "w4a16-g128": 0.3, "w8a8-dynamic": 5e-2, "w8a8-static": 5e-2}


def _p(name: str, path: str) -> str:
  """Linen variables are under ``params/``; nnx state paths start at the module's attributes."""
  return path if zoo.is_nnx(name) else "params/" + path


# ---- per-model expectations -------------------------------------------------------------------

def _gpt2_attn(fused: bool) -> list[str]:
  return ["attn/qkv"] if fused else ["attn/q", "attn/k", "attn/v"]


def _call_order(name: str) -> list[str]:
  """Kernel paths of every layer with a kernel, in the order the model calls them."""
  if name.startswith("gpt2"):
    per = _gpt2_attn("fused" in name) + ["attn/o", "mlp/fc", "mlp/proj"]
    order = [f"h_{i}/{p}" for i in range(zoo.GPT_LAYERS) for p in per]
  elif name == "llama_scan_linen":
    order = [f"layers/{p}" for p in ("q", "k", "v", "o", "mlp/gate", "mlp/up", "mlp/down")]
    order += ["lm_head"]
  elif name == "nnx_transformer":
    order = [f"blocks/{i}/{p}" for i in range(zoo.NNX_LAYERS)
             for p in ("attn/qkv", "attn/o", "mlp/up", "mlp/down")] + ["custom", "lm_head"]
  elif name == "vit_linen":
    order = ["patches"] + [f"encoder_{i}/{p}" for i in range(zoo.VIT_LAYERS)
                           for p in ("attn/query", "attn/key", "attn/value", "attn/out", "mlp_in",
                                     "mlp_out")] + ["head"]
  elif name == "cnn_linen":
    order = ["conv1", "conv2", "conv1d", "custom", "fc"]
  else:
    order = ["conv1", "conv2", "conv3", "fc"]
  return [_p(name, p + "/kernel") for p in order]


# Kernels that default rules keep float (head / embeddings) or that jq cannot run (custom), and
# kernels whose status the test does not prescribe (an override of ``__call__`` may run float).
FLOAT_KERNELS = {"llama_scan_linen": ["lm_head"], "nnx_transformer": ["custom", "lm_head"],
                 "vit_linen": ["head"], "cnn_linen": ["custom"]}
CUSTOM = {"nnx_transformer": "custom/kernel", "cnn_linen": "params/custom/kernel"}
UNPRESCRIBED = {"nnx_transformer": [f"blocks/{i}/mlp/down/kernel" for i in range(zoo.NNX_LAYERS)]}


def _quantized_kernels(name: str) -> set[str]:
  floats = {_p(name, p + "/kernel") for p in FLOAT_KERNELS.get(name, [])}
  return set(_call_order(name)) - floats - set(UNPRESCRIBED.get(name, []))


def _layout(c, ch, b=()):
  return jq.Layout(contracting=c, channels=ch, batch=b)


# path -> (layout roles, {spec: tile})
def _expected_layouts(name: str) -> dict[str, tuple]:
  g = lambda p: _p(name, p)
  if name == "gpt2_linen":
    return {g("h_0/attn/q/kernel"): (_layout((0,), (1, 2)), {"w8a16": (256, 1, 1),
                                                             "w4a16-g128": (128, 1, 1),
                                                             "w4a16-g32": (32, 1, 1)}),
            g("h_1/attn/v/kernel"): (_layout((0,), (1, 2)), {"w8a16": (256, 1, 1)}),
            g("h_0/attn/o/kernel"): (_layout((0, 1), (2,)), {"w8a16": (4, 64, 1),
                                                             "w4a16-g128": (2, 64, 1),
                                                             "w4a16-g32": (1, 32, 1)}),
            g("h_0/mlp/fc/kernel"): (_layout((0,), (1,)), {"w8a16": (256, 1),
                                                           "w4a16-g128": (128, 1)})}
  if name == "gpt2_fused_linen":
    return {g("h_0/attn/qkv/kernel"): (_layout((0,), (1, 2, 3)), {"w8a16": (256, 1, 1, 1),
                                                                  "w4a16-g128": (128, 1, 1, 1)}),
            g("h_1/attn/o/kernel"): (_layout((0, 1), (2,)), {"w4a16-g128": (2, 64, 1)})}
  if name == "llama_scan_linen":
    return {g("layers/q/kernel"): (_layout((1,), (2,), (0,)), {"w8a16": (1, 256, 1),
                                                               "w4a16-g128": (1, 128, 1)}),
            g("layers/mlp/down/kernel"): (_layout((1,), (2,), (0,)), {"w8a16": (1, 384, 1),
                                                                      "w4a16-g128": (1, 128, 1)}),
            g("lm_head/kernel"): (_layout((0,), (1,)), {})}
  if name == "nnx_transformer":
    return {"blocks/0/attn/qkv/kernel": (_layout((0,), (1, 2, 3)), {"w8a16": (128, 1, 1, 1),
                                                                    "w4a16-g32": (32, 1, 1, 1)}),
            "blocks/1/attn/o/kernel": (_layout((0, 1), (2,)), {"w8a16": (4, 32, 1),
                                                               "w4a16-g128": (4, 32, 1),
                                                               "w4a16-g32": (1, 32, 1)}),
            "blocks/0/mlp/up/kernel": (_layout((0,), (1,)), {"w4a16-g128": (128, 1)})}
  if name == "vit_linen":
    return {g("patches/kernel"): (_layout((0, 1, 2), (3,)), {"w8a16": (4, 4, 3, 1),
                                                             "w4a16-g32": (2, 4, 3, 1)}),
            g("encoder_0/attn/query/kernel"): (_layout((0,), (1, 2)), {"w8a16": (128, 1, 1)}),
            g("encoder_1/attn/out/kernel"): (_layout((0, 1), (2,)), {"w4a16-g32": (1, 32, 1)})}
  if name == "cnn_linen":
    return {g("conv1/kernel"): (_layout((0, 1, 2), (3,)), {"w8a16": (3, 3, 3, 1)}),
            g("conv2/kernel"): (_layout((0, 1, 2), (3,)), {"w8a16": (3, 3, 8, 1),
                                                           "w4a16-g32": (1, 3, 8, 1)}),
            g("conv1d/kernel"): (_layout((0, 1), (2,)), {"w8a16": (3, 32, 1),
                                                         "w4a16-g32": (1, 32, 1)}),
            g("fc/kernel"): (_layout((0,), (1,)), {"w8a16": (32, 1)})}
  return {"conv1/kernel": (_layout((0, 1, 2), (3,)), {"w8a16": (3, 3, 3, 1)}),
          "conv2/kernel": (_layout((0, 1, 2), (3,)), {"w4a16-g128": (3, 3, 8, 1)}),
          "conv3/kernel": (_layout((0, 1, 2), (3,)), {"w4a16-g128": (1, 3, 32, 1)})}


# Per-head SQNR: (path, [(axis, factors), ...] to scale, axes whose slices are compared, specs).
# Output-feature axes may be checked under every spec; contracting axes only where the groups of
# the spec never span two slices with different factors.
ALL = ("w8a16", "w4a16-g128", "w4a16-g32")


def _head_cases(name: str) -> list[tuple]:
  g = lambda p: _p(name, p)
  o_heads_gpt = [(2, F4), (0, PAIRS)]
  if name == "gpt2_linen":
    return ([(g(f"h_0/attn/{p}/kernel"), [(1, F4)], (1,), ALL) for p in "qkv"] +
            [(g("h_0/attn/o/kernel"), o_heads_gpt, (2,), ALL),
             (g("h_0/attn/o/kernel"), o_heads_gpt, (0,), ("w4a16-g128", "w4a16-g32"))])
  if name == "gpt2_fused_linen":
    return [(g("h_0/attn/qkv/kernel"), [(1, QKV), (2, F4)], (1, 2), ALL),
            (g("h_1/attn/o/kernel"), o_heads_gpt, (2,), ALL),
            (g("h_1/attn/o/kernel"), o_heads_gpt, (0,), ("w4a16-g128", "w4a16-g32"))]
  if name == "llama_scan_linen":
    stacked = [(g(f"layers/{p}/kernel"), [(0, LAYERS)], (0,), ALL)
               for p in ("k", "v", "mlp/gate", "mlp/up", "mlp/down")]
    return stacked + [
        (g("layers/q/kernel"), [(0, LAYERS), (2, F4)], (0, 2), ALL),   # layers x heads
        (g("layers/o/kernel"), [(0, LAYERS), (1, PAIRS)], (0, 1), ("w4a16-g128", "w4a16-g32"))]
  if name == "nnx_transformer":
    return [("blocks/0/attn/qkv/kernel", [(1, QKV), (2, F4)], (1, 2), ALL),
            ("blocks/1/attn/o/kernel", [(2, F4), (0, F4)], (2,), ALL),
            ("blocks/1/attn/o/kernel", [(2, F4), (0, F4)], (0,), ("w4a16-g32",)),
            ("blocks/0/mlp/up/kernel", [(1, F4)], (1,), ALL)]
  if name == "vit_linen":
    return ([(g(f"encoder_0/attn/{p}/kernel"), [(1, F4)], (1,), ALL)
             for p in ("query", "key", "value")] +
            [(g("encoder_0/attn/out/kernel"), [(2, F4), (0, F4)], (2,), ALL),
             (g("encoder_0/attn/out/kernel"), [(2, F4), (0, F4)], (0,), ("w4a16-g32",)),
             (g("patches/kernel"), [(3, F4)], (3,), ALL)])
  if name == "cnn_linen":
    return [(g("conv1/kernel"), [(3, F4)], (3,), ALL), (g("conv2/kernel"), [(3, F4)], (3,), ALL),
            (g("conv1d/kernel"), [(2, F4)], (2,), ALL)]
  return [(f"{c}/kernel", [(3, F4)], (3,), ALL) for c in ("conv1", "conv2", "conv3")]


# ---- building, quantizing, running (cached per process; every test stands alone) ---------------

@functools.cache
def _float(name: str):
  """``(model, variables, x)``: linen variables as the model made them (boxes kept)."""
  return zoo.MODELS[name]()


def _fresh_nnx(name: str) -> nnx.Module:
  return nnx.clone(_float(name)[0])


def _rules(recipe: str):
  if recipe in SPECS:
    return jq.default_rules(SPECS[recipe])
  return jq.recipe_rules(recipe)


def _calibration(name: str, recipe: str):
  return zoo.example_batches(name, 4) if recipe == "w8a8-static" else None


def _quantize(name: str, model, variables, x, recipe: str):
  """Quantized linen variables or nnx module; under ``jax.jit`` unless it needs calibration."""
  rules, cal = _rules(recipe), _calibration(name, recipe)
  if zoo.is_nnx(name):
    if cal is not None:
      return jq.nn.quantize_module(model, rules, calibration_batches=cal)
    return nnx.jit(lambda m: jq.nn.quantize_module(m, rules))(model)
  if cal is not None:
    return jq.nn.quantize_variables(model, variables, rules, x, calibration_batches=cal)
  return jax.jit(lambda v, a: jq.nn.quantize_variables(model, v, rules, a))(variables, x)


@functools.cache
def _quantized(name: str, recipe: str):
  model, variables, x = _float(name)
  return _quantize(name, model, variables, x, recipe)


@functools.cache
def _linen_runner(name: str, quantized: bool):
  model = _float(name)[0]
  return jax.jit(jq.nn.quantized_apply(model) if quantized else model.apply)


@functools.cache
def _nnx_runner(graphdef):
  return jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))


def _run(name: str, model_or_vars, quantized: bool):
  """The model's output under ``jax.jit`` (nnx modules run through split/merge)."""
  x = _float(name)[2]
  if zoo.is_nnx(name):
    graphdef, state = nnx.split(model_or_vars)
    return np.asarray(_nnx_runner(graphdef)(state, x))
  return np.asarray(_linen_runner(name, quantized)(model_or_vars, x))


@functools.cache
def _float_output(name: str):
  model, variables, x = _float(name)
  return _run(name, model if zoo.is_nnx(name) else variables, False)


def _run_quantized(name: str, q):
  return _run(name, q, True)


def _qleaves(name: str, q) -> dict:
  tree = nnx.state(q, nnx.Param) if zoo.is_nnx(name) else q
  return dict(jq.leaves_with_paths(tree))


def _scaled(name: str, cases):
  """The float model/variables with every scaling of ``cases`` applied (each (path, axis) once);
  slices are made identical before scaling, so a right layout gives equal SQNRs to float rounding
  (random slices of ~100 weights, as in a 3x3x3 conv, differ by up to 2.5 dB by sampling alone)."""
  model, variables, x = _float(name)
  target = _fresh_nnx(name) if zoo.is_nnx(name) else variables
  done = set()
  for path, scalings, _, _ in cases:
    for axis, factors in scalings:
      if (path, axis) not in done:
        done.add((path, axis))
        target = zoo.scale_heads(target, path, axis, factors, identical=True)
  return target


@functools.cache
def _scaled_quantized(name: str, spec: str):
  model, variables, x = _float(name)
  scaled = _scaled(name, _head_cases(name))
  if zoo.is_nnx(name):
    return scaled, _quantize(name, scaled, None, x, spec)
  return scaled, _quantize(name, model, scaled, x, spec)


def _slices(w: np.ndarray, axes: tuple[int, ...], counts: tuple[int, ...]):
  """``(index, slice)`` over ``counts[i]`` equal consecutive chunks of each of ``axes``."""
  for idx in itertools.product(*[range(c) for c in counts]):
    sl = [slice(None)] * w.ndim
    for a, c, i in zip(axes, counts, idx):
      n = w.shape[a] // c
      sl[a] = slice(i * n, (i + 1) * n)
    yield idx, tuple(sl)


def _rel_err(y, ref) -> float:
  y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


# ---- (a) layouts, tiles and per-head SQNR -----------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_layouts_follow_the_layers(name):
  model, variables, x = _float(name)
  lays = jq.nn.layouts(model) if zoo.is_nnx(name) else jq.nn.layouts(model, variables, x)
  for path, (want, _) in _expected_layouts(name).items():
    got = lays.get(path)
    assert got is not None, f"{path}: no layout; layouts has {sorted(lays)}"
    assert (got.contracting, got.channels, got.batch) == (want.contracting, want.channels,
                                                           want.batch), (path, got.describe())
  if name in CUSTOM:  # jq cannot run the custom layer quantized: it has no layout
    assert CUSTOM[name] not in lays


@pytest.mark.parametrize("spec", ALL)
@pytest.mark.parametrize("name", MODELS)
def test_tiles_follow_the_layers(name, spec):
  _, q = _scaled_quantized(name, spec)
  leaves = _qleaves(name, q)
  for path, (_, tiles) in _expected_layouts(name).items():
    if spec in tiles:
      assert isinstance(leaves[path], jq.QArray), path
      assert leaves[path].tile == tiles[spec], (path, leaves[path].shape, leaves[path].tile)
  if name in CUSTOM:
    assert not isinstance(leaves[CUSTOM[name]], jq.QArray)


@pytest.mark.parametrize("spec", ALL)
@pytest.mark.parametrize("name", MODELS)
def test_per_head_sqnr(name, spec):
  """Heads / stacked layers / output-feature blocks of magnitudes 0.01..100 all get an SQNR within
  1 dB of the best one (one scale shared across them would cost the small ones 40-80 dB)."""
  scaled, q = _scaled_quantized(name, spec)
  leaves = _qleaves(name, q)
  checked = 0
  for path, scalings, axes, specs in _head_cases(name):
    if spec not in specs:
      continue
    factors = dict(scalings)
    w = np.asarray(zoo.get_kernel(scaled, path), np.float32)
    qa = leaves[path]
    assert isinstance(qa, jq.QArray), f"{path} was not quantized"
    deq = np.asarray(qa.dequantize(jnp.float32))
    sq = {idx: float(jq.metrics.sqnr(w[sl], deq[sl]))
          for idx, sl in _slices(w, axes, tuple(len(factors[a]) for a in axes))}
    best = max(sq.values())
    worst_idx = min(sq, key=sq.get)
    assert best - sq[worst_idx] <= SQNR_SPREAD_DB, (
        f"{path} ({spec}, tile {qa.tile}): slice {worst_idx} along axes {axes} has SQNR "
        f"{sq[worst_idx]:.2f} dB vs best {best:.2f} dB; all: "
        + ", ".join(f"{k}: {v:.1f}" for k, v in sq.items()))
    checked += 1
  assert checked


# ---- (b) outputs under jit --------------------------------------------------------------------

def _dequantized_reference(name: str, q):
  """The float model run on ``dequantize_tree`` of the quantized parameters."""
  if zoo.is_nnx(name):
    ref = nnx.clone(_float(name)[0])
    nnx.update(ref, jq.dequantize_tree(nnx.state(q, nnx.Param)))
    return _run(name, ref, False)
  return _run(name, jq.dequantize_tree(nn.meta.unbox(q)), False)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("name", MODELS)
def test_outputs_close_to_float(name, recipe):
  """Relative output error under ``jax.jit`` below ``TOLERANCE[recipe]``; weight-only runs equal
  the float model on the dequantized weights (so the error is the weights' alone)."""
  y_float = _float_output(name)
  q = _quantized(name, recipe)
  leaves = _qleaves(name, q)
  quantized = {p for p, v in leaves.items() if isinstance(v, jq.QArray)}
  assert _quantized_kernels(name) <= quantized, sorted(_quantized_kernels(name) - quantized)
  act = {"w8a8-dynamic": "dynamic", "w8a8-static": "static"}.get(recipe)
  for p in quantized:
    a = leaves[p].activation
    assert (None if a is None else a.spec.mode.value) == act, p
  y = _run_quantized(name, q)
  assert y.shape == y_float.shape and np.all(np.isfinite(y))
  err = _rel_err(y, y_float)
  assert 0 < err < TOLERANCE[recipe], f"{name} {recipe}: relative output error {err:.4f}"
  if act is None:
    ref_err = _rel_err(y, _dequantized_reference(name, q))
    assert ref_err < 1e-4, f"{name} {recipe}: {ref_err:.2e} from the dequantized float model"


# ---- (c) checkpoints --------------------------------------------------------------------------

IO_RECIPE = {"gpt2_linen": "w4a16-g128", "gpt2_fused_linen": "w8a8-static",
             "llama_scan_linen": "w8a8-static", "nnx_transformer": "w8a8-static",
             "vit_linen": "w4a16-g128", "cnn_linen": "w8a8-static", "cnn_nnx": "w4a16-g128"}


def _save_tree(name, q):
  if zoo.is_nnx(name):
    return nnx.to_pure_dict(nnx.state(q, nnx.Param))
  return nn.meta.unbox(q)


def _assert_identical(a, b, where=""):
  la, ta = jax.tree_util.tree_flatten_with_path(a, is_leaf=lambda x: isinstance(x, jq.QArray))
  lb, tb = jax.tree_util.tree_flatten_with_path(b, is_leaf=lambda x: isinstance(x, jq.QArray))
  assert [jq.tree.path_str(k) for k, _ in la] == [jq.tree.path_str(k) for k, _ in lb], where
  for (kp, x), (_, y) in zip(la, lb):
    path = jq.tree.path_str(kp)
    if isinstance(x, jq.QArray):
      assert isinstance(y, jq.QArray), path
      assert (x.qtype, x.shape, x.tile) == (y.qtype, y.shape, y.tile), path
      assert (x.activation is None) == (y.activation is None), path
      if x.activation is not None:
        assert x.activation.spec == y.activation.spec, path
      fx, tx = jax.tree_util.tree_flatten(x)
      fy, ty = jax.tree_util.tree_flatten(y)
      assert tx == ty, path
      pairs = zip(fx, fy)
    else:
      pairs = [(x, y)]
    for u, v in pairs:
      u, v = np.asarray(u), np.asarray(v)
      assert u.dtype == v.dtype and u.shape == v.shape, (path, u.dtype, v.dtype, u.shape, v.shape)
      assert np.array_equal(u, v), path


@pytest.mark.parametrize("name", MODELS)
def test_io_round_trip_is_bit_identical(name, tmp_path):
  recipe = IO_RECIPE[name]
  q = _quantized(name, recipe)
  tree = _save_tree(name, q)
  path = tmp_path / f"{name}.safetensors"
  jq.io.save(path, tree, rules=_rules(recipe))
  loaded = jq.io.load(path)
  _assert_identical(tree, loaded, name)
  y = _run_quantized(name, q)
  if zoo.is_nnx(name):
    again = jq.nn.quantize_module(_float(name)[0], loaded)
  else:
    again = loaded
  assert np.array_equal(_run_quantized(name, again), y)


# ---- (e) explain ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_explain_lists_layers_in_call_order(name):
  q = _quantized(name, "w8a8-dynamic")
  model, variables, x = _float(name)
  routes = jq.explain(q, x, file=None) if zoo.is_nnx(name) else jq.explain(model, q, x, file=None)
  order = _call_order(name)
  paths = [r.path for r in routes]
  assert [p for p in paths if p in order] == order, paths
  leaves = _qleaves(name, q)
  by_path = {r.path: r for r in routes}
  for p in order:
    want = "int8 dynamic" if isinstance(leaves[p], jq.QArray) else "float"
    assert by_path[p].mode == want, (p, by_path[p])
  if name in CUSTOM:
    assert by_path[CUSTOM[name]].mode == "float"
    assert not isinstance(leaves[CUSTOM[name]], jq.QArray)


def test_nnx_quantized_module_keeps_sharding_metadata():
  module = _float("nnx_transformer")[0]
  q = _quantized("nnx_transformer", "w8a16")
  path = ("blocks", 0, "mlp", "up", "kernel")
  float_var = module.blocks[0].mlp.up.kernel
  qvar = q.blocks[0].mlp.up.kernel
  assert isinstance(qvar.get_value(), jq.QArray)
  assert qvar.get_metadata().get("out_sharding") == float_var.get_metadata()["out_sharding"]
  specs = dict(nnx.to_flat_state(nnx.get_partition_spec(nnx.state(q))))
  spec = specs[path]
  spec = spec.get_value() if isinstance(spec, nnx.Variable) else spec
  assert spec == jax.sharding.PartitionSpec(None, "model"), spec


# ---- (f) bad input ----------------------------------------------------------------------------

def _one_rule(pattern: str, spec: jq.QuantSpec):
  return (jq.Rule(pattern=pattern, weight=spec), jq.Rule(pattern=".*", weight=None,
                                                          required=False))


@pytest.mark.parametrize("name,path,shape", [
    ("gpt2_linen", "params/h_0/attn/q/kernel", (256, 4, 64)),
    ("nnx_transformer", "blocks/0/attn/qkv/kernel", (128, 3, 4, 32)),
    ("vit_linen", "params/encoder_0/attn/out/kernel", (4, 32, 128)),
])
def test_channel_axes_the_layer_lacks_raise(name, path, shape):
  """Axis 0 of these kernels is contracting: a spec asking for one scale per index of it cannot
  follow the layer and must say so, naming the path and shape."""
  rules = _one_rule("^" + re.escape(path) + "$", jq.QuantSpec(channel_axes=(0,)))
  model, variables, x = _float(name)
  with pytest.raises(ValueError) as e:
    if zoo.is_nnx(name):
      jq.nn.quantize_module(model, rules)
    else:
      jq.nn.quantize_variables(model, variables, rules, x)
  assert path in str(e.value) and str(shape) in str(e.value), str(e.value)


@pytest.mark.parametrize("name", ["gpt2_linen", "llama_scan_linen"])
def test_quantize_tree_without_layouts_refuses_rank3_kernels(name):
  """Without layouts jq cannot know a rank-3 kernel's heads or stacked layers: it refuses rather
  than share one scale across them."""
  variables = nn.meta.unbox(_float(name)[1])
  rank3 = {p: tuple(v.shape) for p, v in jq.leaves_with_paths(variables)
           if p.endswith("kernel") and np.ndim(v) == 3}
  assert rank3
  with pytest.raises(ValueError) as e:
    jq.quantize_tree(variables, jq.recipe_rules("w8a16"))
  msg = str(e.value)
  assert any(p in msg and str(s) in msg for p, s in rank3.items()), msg


# ---- (d) sharded: one 8-device subprocess for all models --------------------------------------

SHARDED_SCRIPT = textwrap.dedent(r'''
    import os, sys, time
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, sys.argv[1])
    import jax, numpy as np
    import flax.linen as nn
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jq, jq.sharding, zoo

    assert len(jax.devices()) == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    dev0 = jax.devices()[0]
    # symmetric dynamic activations: with a zero point (the w8a8-dynamic recipe) a token's
    # extreme value can clip by one code when its rounded zero point flips, so outputs are not
    # continuous in x and the sharded sums' float32 reordering is not comparable at 1e-5
    CASES = [("gpt2_linen", "w8a8-sym"), ("gpt2_fused_linen", "w4a16-g128"),
             ("llama_scan_linen", "w4a16-g128"), ("nnx_transformer", "w8a8-sym"),
             ("vit_linen", "w8a16"), ("cnn_linen", "w8a8-sym"), ("cnn_nnx", "w4a16-g128")]
    only = sys.argv[2:]
    is_spec = lambda s: s is None or isinstance(s, P)

    def flat_specs(tree):
      flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_spec)
      return {jq.tree.path_str(k): s for k, s in flat}

    def float_specs(arrays, meta):
      """The model's own partition metadata where it has any, else kernels' output axis on
      "model" when 4 divides it, else replicated."""
      def one(path, a):
        s = meta.get(path)
        if s is not None and any(e is not None for e in s):
          return s
        if path.endswith("kernel") and a.ndim >= 2 and a.shape[-1] % 4 == 0:
          return P(*([None] * (a.ndim - 1) + ["model"]))
        return P()
      return jq.tree.map_with_paths(one, arrays)

    def place(tree, specs):
      sp = flat_specs(specs)
      return jq.tree.map_with_paths(lambda p, a: jax.device_put(a, NamedSharding(mesh, sp[p])),
                                    tree)

    def check_specs(qtree, fspecs, where):
      pred = dict(jq.leaves_with_paths(jq.sharding.partition_specs(qtree, fspecs, mesh=mesh)))
      n_sharded = 0
      for path, q in jq.leaves_with_paths(qtree):
        s = pred[path]
        if isinstance(q, jq.QArray):
          assert isinstance(s, jq.QArray), (where, path, s)
          fields = [("values", q.values, s.values), ("scale", q.scale, s.scale),
                    ("zero_point", q.zero_point, s.zero_point)]
          if q.activation is not None:
            fields += [("act.scale", q.activation.scale, s.activation.scale),
                       ("act.zero_point", q.activation.zero_point, s.activation.zero_point)]
          n_sharded += not q.values.sharding.is_fully_replicated
        else:
          fields = [("", q, s)]
        for field, arr, spec in fields:
          if arr is None:
            assert spec is None, (where, path, field, spec)
            continue
          assert isinstance(spec, P), (where, path, field, spec)
          assert arr.sharding.is_equivalent_to(NamedSharding(mesh, spec), arr.ndim), (
              where, path, field, arr.shape, arr.sharding, spec)
      assert n_sharded, f"{where}: no QArray is sharded"

    for name, recipe in CASES:
      if only and name not in only:
        continue
      t0 = time.time()
      rules = (jq.default_rules(jq.W8A16, jq.A8_DYNAMIC) if recipe == "w8a8-sym" else
               jq.recipe_rules(recipe))
      model, variables, x = zoo.MODELS[name]()
      xs = jax.device_put(x, NamedSharding(mesh, P("data")))
      if zoo.is_nnx(name):
        state = nnx.state(model, nnx.Param)
        meta = flat_specs(nnx.to_pure_dict(nnx.get_partition_spec(state)))
        arrays = nnx.to_pure_dict(state)
        fspecs = float_specs(arrays, meta)
        nnx.replace_by_pure_dict(state, place(arrays, fspecs))  # (in place)
        nnx.update(model, state)
        qm = nnx.jit(lambda m: jq.nn.quantize_module(m, rules))(model)
        qtree = nnx.to_pure_dict(nnx.state(qm, nnx.Param))
        check_specs(qtree, fspecs, name)
        # the kernels' own sharding metadata survives quantization
        qmeta = flat_specs(nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(qm, nnx.Param))))
        for p, s in meta.items():
          if s is not None and any(e is not None for e in s):
            assert qmeta.get(p) == s, (name, p, qmeta.get(p), s)
        graphdef, qstate = nnx.split(qm)
        run = jax.jit(lambda st, a: nnx.merge(graphdef, st)(a))
        got = run(qstate, xs)
        want = run(jax.device_put(qstate, dev0), jax.device_put(x, dev0))
      else:
        unboxed, box_specs = jq.sharding.unbox_specs(variables)
        meta = flat_specs(box_specs)
        if name == "gpt2_linen":  # block h_0's MLP carries nn.with_partitioning metadata
          assert meta["params/h_0/mlp/fc/kernel"] == P(None, "model"), meta
        fspecs = float_specs(unboxed, meta)
        qvars = jax.jit(lambda v, a: jq.nn.quantize_variables(model, v, rules, a))(
            place(unboxed, fspecs), xs)
        check_specs(qvars, fspecs, name)
        qapply = jax.jit(jq.nn.quantized_apply(model))
        got = qapply(qvars, xs)
        want = qapply(jax.device_put(qvars, dev0), jax.device_put(x, dev0))
      assert len(got.sharding.device_set) == 8, got.sharding
      # sharded contractions sum in another order: 1e-5 of the output's scale (float32 eps is 1e-7)
      want = np.asarray(want)
      np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5,
                                 atol=1e-5 * float(np.max(np.abs(want))), err_msg=name)
      print(f"{name} ok {time.time() - t0:.1f}s", flush=True)
''')


def test_sharded_quantize_and_run_match_single_device():
  here = pathlib.Path(__file__).parent
  proc = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, str(here)], capture_output=True,
                        text=True, env=spawn.env(8), timeout=300, cwd=str(here.parent.parent))
  assert proc.returncode == 0, proc.stdout + proc.stderr[-6000:]
  for name in MODELS:
    assert f"{name} ok" in proc.stdout, proc.stdout
