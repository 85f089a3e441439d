"""A tiny pre-LN transformer LM written twice (linen and nnx) with the layer types jq adapts, plus
test helpers: calibration of static activation scales and fake-quant float references.

Widths are chosen so group size 32 does not divide the contracting axes (48 and 80) and 16 does.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

import jq
from jq import numerics, ops


@dataclasses.dataclass(frozen=True)
class TinyConfig:
  vocab: int = 64
  d: int = 48
  heads: int = 4
  head_dim: int = 12
  ffn: int = 80
  layers: int = 2
  max_len: int = 16


CFG = TinyConfig()


def fast_jit(fn):
  """``jax.jit`` compiled with XLA's backend optimizations off: same numerics, faster compiles
  for one-shot test computations."""
  def call(*args):
    return jax.jit(fn).lower(*args).compile(
        compiler_options={"xla_backend_optimization_level": 0})(*args)
  return call


def _attend(q, k, v, mask):
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
  s = jnp.where(mask, s, -1e9)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)


# ---- linen ------------------------------------------------------------------------------------

class LinenAttention(nn.Module):
  cfg: TinyConfig

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    q = nn.DenseGeneral((c.heads, c.head_dim), name="q_proj")(x)
    k = nn.DenseGeneral((c.heads, c.head_dim), name="k_proj")(x)
    v = nn.DenseGeneral((c.heads, c.head_dim), name="v_proj")(x)
    b, t = x.shape[:2]
    if self.is_mutable_collection("cache"):  # KV cache: prefill, then one token at a time
      shape = (b, c.max_len, c.heads, c.head_dim)
      ck = self.variable("cache", "k", jnp.zeros, shape, x.dtype)
      cv = self.variable("cache", "v", jnp.zeros, shape, x.dtype)
      idx = self.variable("cache", "index", lambda: jnp.array(0, jnp.int32))
      i = idx.value
      ck.value = lax.dynamic_update_slice(ck.value, k, (0, i, 0, 0))
      cv.value = lax.dynamic_update_slice(cv.value, v, (0, i, 0, 0))
      idx.value = i + t
      k, v = ck.value, cv.value
      mask = jnp.arange(c.max_len)[None, :] <= (i + jnp.arange(t))[:, None]
    else:
      mask = jnp.tril(jnp.ones((t, t), bool))
    o = _attend(q, k, v, mask)
    return nn.DenseGeneral(c.d, axis=(-2, -1), name="o_proj")(o)


class LinenMlp(nn.Module):
  cfg: TinyConfig

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    gate = nn.Einsum((c.d, c.ffn), "btd,df->btf", name="gate_proj")(x)
    up = nn.Dense(c.ffn, name="up_proj")(x)
    return nn.Dense(c.d, name="down_proj")(jax.nn.silu(gate) * up)


class LinenBlock(nn.Module):
  cfg: TinyConfig

  @nn.compact
  def __call__(self, x):
    x = x + LinenAttention(self.cfg, name="attn")(nn.LayerNorm(name="ln_1")(x))
    return x + LinenMlp(self.cfg, name="mlp")(nn.LayerNorm(name="ln_2")(x))


class LinenTinyLM(nn.Module):
  cfg: TinyConfig = CFG

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.cfg.vocab, self.cfg.d, name="embed")(tokens)
    for i in range(self.cfg.layers):
      x = LinenBlock(self.cfg, name=f"block_{i}")(x)
    return nn.Dense(self.cfg.vocab, name="lm_head")(nn.LayerNorm(name="ln_f")(x))


def _fill(abstract, seed: int):
  """Random values for an abstract param tree, drawn with numpy (no XLA compiles)."""
  rng = np.random.default_rng(seed)

  def one(kp, a):
    name = jq.tree.path_str(kp)
    if name.endswith("bias"):
      x = 0.05 * rng.standard_normal(a.shape)
    elif name.endswith("scale"):  # LayerNorm
      x = 1.0 + 0.1 * rng.standard_normal(a.shape)
    elif "embed" in name:
      x = rng.standard_normal(a.shape)
    else:  # kernels: unit-variance outputs
      fan_in = a.shape[0] * (a.shape[1] if len(a.shape) == 3 and a.shape[-1] == CFG.d else 1)
      x = rng.standard_normal(a.shape) / np.sqrt(fan_in)
    return jnp.asarray(x, a.dtype)

  return jax.tree_util.tree_map_with_path(one, abstract)


def tokens(seed: int = 1, shape=(2, 8)):
  return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab, shape), jnp.int32)


def linen_model(seed: int = 0):
  model = LinenTinyLM()
  tok = tokens(seed + 1)
  abstract = jax.eval_shape(model.init, jax.random.key(0), tok)
  variables = {"params": _fill(abstract["params"], seed)}
  return model, variables, tok


# ---- nnx --------------------------------------------------------------------------------------

class NnxAttention(nnx.Module):
  def __init__(self, c: TinyConfig, rngs: nnx.Rngs):
    self.q_proj = nnx.LinearGeneral(c.d, (c.heads, c.head_dim), rngs=rngs)
    self.k_proj = nnx.LinearGeneral(c.d, (c.heads, c.head_dim), rngs=rngs)
    self.v_proj = nnx.LinearGeneral(c.d, (c.heads, c.head_dim), rngs=rngs)
    self.o_proj = nnx.LinearGeneral((c.heads, c.head_dim), c.d, axis=(-2, -1), rngs=rngs)

  def __call__(self, x):
    t = x.shape[1]
    o = _attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), jnp.tril(jnp.ones((t, t), bool)))
    return self.o_proj(o)


class NnxMlp(nnx.Module):
  def __init__(self, c: TinyConfig, rngs: nnx.Rngs):
    self.gate_proj = nnx.Einsum("btd,df->btf", (c.d, c.ffn), (c.ffn,), rngs=rngs)
    self.up_proj = nnx.Linear(c.d, c.ffn, rngs=rngs)
    self.down_proj = nnx.Linear(c.ffn, c.d, rngs=rngs)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class NnxBlock(nnx.Module):
  def __init__(self, c: TinyConfig, rngs: nnx.Rngs):
    self.ln_1 = nnx.LayerNorm(c.d, rngs=rngs)
    self.attn = NnxAttention(c, rngs)
    self.ln_2 = nnx.LayerNorm(c.d, rngs=rngs)
    self.mlp = NnxMlp(c, rngs)

  def __call__(self, x):
    x = x + self.attn(self.ln_1(x))
    return x + self.mlp(self.ln_2(x))


class NnxTinyLM(nnx.Module):
  def __init__(self, c: TinyConfig = CFG, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(c.vocab, c.d, rngs=rngs)
    self.blocks = nnx.List([NnxBlock(c, rngs) for _ in range(c.layers)])
    self.ln_f = nnx.LayerNorm(c.d, rngs=rngs)
    self.lm_head = nnx.Linear(c.d, c.vocab, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    for blk in self.blocks:
      x = blk(x)
    return self.lm_head(self.ln_f(x))


def nnx_model(seed: int = 0):
  model = nnx.eval_shape(lambda: NnxTinyLM(rngs=nnx.Rngs(0)))
  nnx.update(model, _fill(nnx.state(model), seed))
  return model, tokens(seed + 1)


# ---- hooks used by the helpers: observe/transform each layer's input --------------------------

def _x_contracting(kind: str, mod, x, eq: str | None = None) -> tuple[int, ...]:
  if kind == "dense":
    return (x.ndim - 1,)
  if kind == "dense_general":
    axis = mod.axis if isinstance(mod.axis, (tuple, list)) else (mod.axis,)
    return tuple(a % x.ndim for a in axis)
  plan = ops.parse_einsum(eq, x.ndim, len(mod.shape if hasattr(mod, "shape") else mod.kernel_shape))
  return tuple(plan.dimension_numbers[0][0])


def linen_input_hook(fn):
  """An interceptor calling ``x = fn(kernel_path, x, contracting_axes)`` before linear layers."""
  def interceptor(next_fun, args, kwargs, ctx):
    mod = ctx.module
    if ctx.method_name != "__call__" or not isinstance(mod, (nn.Dense, nn.DenseGeneral, nn.Einsum)):
      return next_fun(*args, **kwargs)
    path = "/".join(("params",) + tuple(mod.path) + ("kernel",))
    x = args[0]
    if isinstance(mod, nn.Einsum):
      eq = kwargs.get("einsum_str") or mod.einsum_str
      axes = _x_contracting("einsum", mod, x, eq)
    else:
      axes = _x_contracting("dense" if isinstance(mod, nn.Dense) else "dense_general", mod, x)
    return next_fun(fn(path, x, axes), *args[1:], **kwargs)
  return interceptor


def nnx_input_hook(model, fn):
  """Returns a copy of ``model`` whose linear layers call ``x = fn(kernel_path, x, axes)`` first
  (through the layers' public ``dot_general``/``einsum_op`` attributes)."""
  model = nnx.clone(model)
  for path, layer in nnx.iter_modules(model):
    kpath = "/".join(str(p) for p in path + ("kernel",))
    if isinstance(layer, (nnx.Linear, nnx.LinearGeneral)):
      def dg(x, k, dims, *a, _p=kpath, **kw):
        return lax.dot_general(fn(_p, x, tuple(dims[0][0])), k, dims, *a, **kw)
      layer.dot_general = dg
    elif isinstance(layer, nnx.Einsum):
      def es(eq, x, k, *a, _p=kpath, _l=layer, **kw):
        return jnp.einsum(eq, fn(_p, x, _x_contracting("einsum", _l, x, eq)), k, *a, **kw)
      layer.einsum_op = es
  return model


# ---- calibration and fake-quant references ----------------------------------------------------

def _observe(ranges):
  """Input hook recording each layer's input (min, max); works under jit (values are arrays)."""
  def fn(path, x, axes):
    xf = jnp.asarray(x, jnp.float32)
    lo, hi = jnp.min(xf), jnp.max(xf)
    if path in ranges:
      lo, hi = jnp.minimum(lo, ranges[path][0]), jnp.maximum(hi, ranges[path][1])
    ranges[path] = (lo, hi)
    return x
  return fn


def scales_from_ranges(ranges, spec: jq.ActivationSpec):
  """``{path: (scale, zero_point)}`` per-tensor activation scales from observed ranges."""
  out = {}
  qt = spec.qtype
  for path, (lo, hi) in ranges.items():
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if spec.symmetric:
      out[path] = (jnp.float32(max(-lo, hi) / qt.qmax or 1.0), None)
    else:
      s = (hi - lo) / (qt.qmax - qt.qmin) or 1.0
      z = min(max(round(qt.qmin - lo / s), qt.qmin), qt.qmax)
      out[path] = (jnp.float32(s), jnp.asarray(z, qt.unpacked_dtype))
  return out


def linen_ranges(model, variables, tokens):
  """Observed (min, max) of every linear layer's input, keyed by kernel path."""
  @jax.jit
  def run(v, t):
    ranges = {}
    with nn.intercept_methods(linen_input_hook(_observe(ranges))):
      model.apply(v, t)
    return ranges
  return run(variables, tokens)


def linen_case():
  """``(model, variables, tokens, float outputs, input ranges)`` of :func:`linen_model`: what the
  linen recipe tests start from."""
  model, variables, tokens = linen_model()
  y_float = jax.jit(model.apply)(variables, tokens)
  return model, variables, tokens, y_float, linen_ranges(model, variables, tokens)


def nnx_ranges(model, tokens):
  ranges = {}
  graphdef, state = nnx.split(nnx_input_hook(model, _observe(ranges)))

  @jax.jit
  def run(st, t):
    ranges.clear()
    nnx.merge(graphdef, st)(t)
    return dict(ranges)
  return run(state, tokens)


def _fake_quant(qleaves):
  """Input transform that fake-quantizes activations of layers whose kernel has int8 activations."""
  def fn(path, x, axes):
    q = qleaves.get(path)
    if isinstance(q, jq.QArray) and q.activation is not None:
      return ops.fake_quant_activations(x, axes, q.activation)
    return x
  return fn


def linen_reference(model, qvars, tokens, **kwargs):
  """The float model on ``dequantize_tree(qvars)`` with fake-quantized int8 layer inputs."""
  qleaves = dict(jq.leaves_with_paths(qvars))
  with nn.intercept_methods(linen_input_hook(_fake_quant(qleaves))):
    return model.apply(jq.dequantize_tree(qvars), tokens, **kwargs)


def nnx_reference(model, qstate, tokens):
  ref = nnx.clone(model)
  nnx.update(ref, jq.dequantize_tree(qstate))
  qleaves = dict(jq.leaves_with_paths(qstate))
  return nnx_input_hook(ref, _fake_quant(qleaves))(tokens)


def relative_weight_error(qtree) -> jax.Array:
  """max over quantized kernels of ||step/2|| / ||dequantize(q)||: a bound on the relative
  weight error set by the quantization step (NF4: the widest table gap).  Jittable."""
  worst = jnp.float32(0.0)
  for _, q in jq.leaves_with_paths(qtree):
    if isinstance(q, jq.QArray):
      step = jnp.broadcast_to(numerics.expand(q.scale.astype(jnp.float32), q.tile, q.shape),
                              q.shape)
      if q.qtype.is_table:
        step = step * float(np.max(np.diff(jq.NF4_TABLE)))
      worst = jnp.maximum(worst, jnp.linalg.norm(step / 2) / jnp.linalg.norm(q.dequantize()))
  return worst
