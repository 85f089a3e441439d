"""A zoo of small, ordinary Flax models (linen and nnx) for the layout tests in ``test_zoo.py``.

Each model function returns ``(model, variables_or_None, example_input)``: linen models give their
variables dict (``nn.with_partitioning`` boxes left in place where the model uses them); nnx
models give ``None`` (the module holds its state).  Parameters are drawn with numpy from the
abstract ``init`` (``jax.eval_shape``), so building a model compiles nothing and takes
milliseconds.

The models use the layers as their authors would, with nothing jq-specific:

* ``gpt2_linen``: ``nn.DenseGeneral`` q/k/v of shape ``(d, heads, head_dim)`` (or one fused
  ``(d, 3, heads, head_dim)``), output ``(heads, head_dim, d)``, tied head (``Embed.attend``).
* ``llama_scan_linen``: 2-D ``nn.Dense`` layers stacked by ``nn.scan`` into ``(L, in, out)``.
* ``nnx_transformer``: fused qkv ``nnx.Einsum``, ``nnx.LinearGeneral`` output, ``nnx.Linear``
  subclasses, and ``CustomDot``, a layer jq cannot run quantized (it calls ``x @ kernel`` itself).
* ``vit_linen``: patch ``nn.Conv``, ``nn.MultiHeadDotProductAttention``, classifier ``head``.
* ``cnn_linen`` / ``cnn_nnx``: 2-D convs (one grouped), a 1-D conv (linen), pooling, a Dense.

``scale_heads`` multiplies slices of a kernel by very different factors, so that heads (or stacked
layers, or output features) have deliberately different magnitudes.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# ---- sizes ------------------------------------------------------------------------------------

# GPT-2 style: q kernel (256, 4, 64), o kernel (4, 64, 256) (groups of 128 span two heads).
GPT_D, GPT_HEADS, GPT_HEAD_DIM, GPT_FFN, GPT_VOCAB, GPT_LAYERS, SEQ = 256, 4, 64, 512, 128, 2, 16
# Llama style: stacked kernels (2, 256, 256) etc.
LLAMA_D, LLAMA_HEADS, LLAMA_FFN, LLAMA_VOCAB, LLAMA_LAYERS = 256, 4, 384, 128, 2
# nnx transformer: qkv Einsum kernel (128, 3, 4, 32), o kernel (4, 32, 128).
NNX_D, NNX_HEADS, NNX_HEAD_DIM, NNX_FFN, NNX_VOCAB, NNX_LAYERS = 128, 4, 32, 256, 96, 2
# ViT: 16x16x3 images, 4x4 patches -> 16 tokens + class token; q kernel (128, 4, 32).
VIT_D, VIT_HEADS, VIT_MLP, VIT_CLASSES, VIT_LAYERS, IMG = 128, 4, 256, 10, 2, 16
BATCH = 2


# ---- helpers ----------------------------------------------------------------------------------

def _path_str(kp) -> str:
  """'/'-joined key path (an nnx Variable's trailing ``value`` dropped), as ``jq`` spells it."""
  parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in kp]
  if parts and parts[-1] in ("value", "raw_value"):
    parts = parts[:-1]
  return "/".join(parts)


def fill(abstract, seed: int, fan_in: Callable[[str, tuple[int, ...]], int]):
  """Random values for an abstract tree (``jax.ShapeDtypeStruct`` leaves, boxes kept), drawn with
  numpy: kernels ``N(0, 1/fan_in)``, biases small, norm scales near 1, embeddings, class token and
  position embeddings ``N(0, 0.25)``."""
  rng = np.random.default_rng(seed)

  def one(kp, a):
    name = _path_str(kp)
    leaf = name.rsplit("/", 1)[-1]
    if leaf == "bias":
      x = 0.02 * rng.standard_normal(a.shape)
    elif leaf == "scale":  # LayerNorm / RMSNorm
      x = 1.0 + 0.1 * rng.standard_normal(a.shape)
    elif leaf == "embedding" or "cls" in leaf or "pos" in leaf:
      x = 0.5 * rng.standard_normal(a.shape)
    else:
      x = rng.standard_normal(a.shape) / math.sqrt(fan_in(name, tuple(a.shape)))
    return jnp.asarray(x, a.dtype)

  return jax.tree_util.tree_map_with_path(one, abstract)


def _fan_in_all_but_last(name: str, shape: tuple[int, ...]) -> int:
  """Dense (in, out), conv (..., in, out) and DenseGeneral outputs (heads, head_dim, d)."""
  return int(np.prod(shape[:-1])) if len(shape) > 1 else 1


def _tokens(seed: int, vocab: int, shape=(BATCH, SEQ)) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


def _images(seed: int, shape=(BATCH, IMG, IMG, 3)) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def example_batches(name: str, n: int = 4, seed: int = 100, batch: int = BATCH) -> list[jax.Array]:
  """``n`` random inputs of the zoo model ``name`` (for calibration), different from the example."""
  out = []
  for i in range(n):
    if name in ("vit_linen", "cnn_linen", "cnn_nnx"):
      out.append(_images(seed + i, (batch, IMG, IMG, 3)))
    else:
      vocab = {"llama_scan_linen": LLAMA_VOCAB, "nnx_transformer": NNX_VOCAB}.get(name, GPT_VOCAB)
      out.append(_tokens(seed + i, vocab, (batch, SEQ)))
  return out


def _causal_attend(q, k, v):
  """Softmax attention over ``(batch, time, heads, head_dim)`` with a causal mask."""
  t = q.shape[1]
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
  s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, jnp.float32(-1e9))
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)


def _is_box(x) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def _get(tree, path: str):
  """The node at a '/'-path of nested dicts, or of an nnx module (attributes, list indices)."""
  node = tree
  for part in path.split("/"):
    if isinstance(node, dict):
      node = node[part]
    elif part.isdigit():
      node = node[int(part)]
    else:
      node = getattr(node, part)
  return node


def _set(tree, path: str, value):
  """A copy of nested dicts ``tree`` with the leaf at ``path`` replaced (boxes kept)."""
  head, _, rest = path.partition("/")
  new = dict(tree)
  if rest:
    new[head] = _set(tree[head], rest, value)
  else:
    old = tree[head]
    new[head] = old.replace_boxed(value) if _is_box(old) else value
  return new


def _chunk_factors(n: int, factors: Sequence[float]) -> np.ndarray:
  if n % len(factors):
    raise ValueError(f"axis of size {n} does not split into {len(factors)} equal slices")
  return np.repeat(np.asarray(factors, np.float64), n // len(factors))


def scale_heads(variables, path: str, axis: int, factors: Sequence[float], *,
                identical: bool = False):
  """Multiplies ``len(factors)`` equal consecutive slices of the leaf at ``path`` along ``axis``
  by ``factors`` (one slice per head when the axis is the heads axis; a block of output features,
  of contracting rows or a stacked layer otherwise).

  With ``identical=True`` every slice is first made a copy of the first one, so the slices differ
  by their factor only: a quantizer that gives each slice its own scales then gives every slice the
  same SQNR (to float rounding), with no sampling noise even for slices of a hundred weights.

  ``variables`` is a linen variables dict (paths like ``params/h_0/attn/q/kernel``; a
  ``nn.Partitioned`` box keeps its metadata) or an nnx module (paths like
  ``blocks/0/attn/qkv/kernel``; the module is updated in place and returned).
  """
  if isinstance(variables, nnx.Module):
    var = _get(variables, path)
    w = np.asarray(var.get_value(), np.float64)
    var.set_value(jnp.asarray(_scaled(w, axis, factors, identical), var.get_value().dtype))
    return variables
  leaf = _get(variables, path)
  w = leaf.unbox() if _is_box(leaf) else leaf
  return _set(variables, path, jnp.asarray(
      _scaled(np.asarray(w, np.float64), axis, factors, identical), w.dtype))


def _scaled(w: np.ndarray, axis: int, factors: Sequence[float], identical: bool) -> np.ndarray:
  f = _chunk_factors(w.shape[axis], factors)
  if identical:
    n = w.shape[axis] // len(factors)
    first = np.take(w, np.arange(n), axis=axis)
    w = np.concatenate([first] * len(factors), axis=axis)
  shape = [1] * w.ndim
  shape[axis] = w.shape[axis]
  return w * f.reshape(shape)


def get_kernel(variables, path: str) -> jax.Array:
  """The float array at ``path`` (linen dict, boxes unwrapped, or nnx module)."""
  if isinstance(variables, nnx.Module):
    return _get(variables, path).get_value()
  leaf = _get(variables, path)
  return leaf.unbox() if _is_box(leaf) else leaf


# ---- GPT-2 (linen) ----------------------------------------------------------------------------

class GPT2Attention(nn.Module):
  d: int
  heads: int
  head_dim: int
  fused_qkv: bool

  @nn.compact
  def __call__(self, x):
    shape = (self.heads, self.head_dim)
    if self.fused_qkv:
      qkv = nn.DenseGeneral((3,) + shape, name="qkv")(x)  # (b, t, 3, heads, head_dim)
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
      q = nn.DenseGeneral(shape, name="q")(x)
      k = nn.DenseGeneral(shape, name="k")(x)
      v = nn.DenseGeneral(shape, name="v")(x)
    return nn.DenseGeneral(self.d, axis=(-2, -1), name="o")(_causal_attend(q, k, v))


class GPT2Mlp(nn.Module):
  d: int
  ffn: int
  partitioned: bool

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.lecun_normal()
    if self.partitioned:
      init = nn.with_partitioning(init, (None, "model"))
    h = jax.nn.gelu(nn.Dense(self.ffn, kernel_init=init, name="fc")(x))
    return nn.Dense(self.d, kernel_init=init, name="proj")(h)


class GPT2Block(nn.Module):
  fused_qkv: bool
  partitioned_mlp: bool

  @nn.compact
  def __call__(self, x):
    x = x + GPT2Attention(GPT_D, GPT_HEADS, GPT_HEAD_DIM, self.fused_qkv, name="attn")(
        nn.LayerNorm(name="ln_1")(x))
    return x + GPT2Mlp(GPT_D, GPT_FFN, self.partitioned_mlp, name="mlp")(
        nn.LayerNorm(name="ln_2")(x))


class GPT2(nn.Module):
  fused_qkv: bool = False

  @nn.compact
  def __call__(self, tokens):
    wte = nn.Embed(GPT_VOCAB, GPT_D, name="wte")
    pos = nn.Embed(SEQ, GPT_D, name="wpe")(jnp.arange(tokens.shape[1]))
    x = wte(tokens) + pos[None]
    for i in range(GPT_LAYERS):
      x = GPT2Block(self.fused_qkv, partitioned_mlp=(i == 0), name=f"h_{i}")(x)
    return wte.attend(nn.LayerNorm(name="ln_f")(x))  # tied head


def _gpt2_fan_in(name: str, shape) -> int:
  if name.endswith(("/q/kernel", "/k/kernel", "/v/kernel", "/qkv/kernel")):
    return shape[0]
  return _fan_in_all_but_last(name, shape)


def gpt2_linen(fused_qkv: bool = False, seed: int = 0):
  """GPT-2 style LM; block ``h_0``'s MLP kernels are ``nn.Partitioned(..., (None, "model"))``."""
  model = GPT2(fused_qkv=fused_qkv)
  tokens = _tokens(seed + 1, GPT_VOCAB)
  abstract = jax.eval_shape(model.init, jax.random.key(0), tokens)
  return model, {"params": fill(abstract["params"], seed, _gpt2_fan_in)}, tokens


# ---- Llama with nn.scan (linen) ---------------------------------------------------------------

class SwiGLU(nn.Module):
  d: int
  ffn: int

  @nn.compact
  def __call__(self, x):
    gate = nn.Dense(self.ffn, use_bias=False, name="gate")(x)
    up = nn.Dense(self.ffn, use_bias=False, name="up")(x)
    return nn.Dense(self.d, use_bias=False, name="down")(jax.nn.silu(gate) * up)


class LlamaBlock(nn.Module):
  d: int
  heads: int
  ffn: int

  @nn.compact
  def __call__(self, x, _):
    b, t, _d = x.shape
    hd = self.d // self.heads
    h = nn.RMSNorm(name="attn_norm")(x)
    split = lambda y: y.reshape(b, t, self.heads, hd)
    q = split(nn.Dense(self.d, use_bias=False, name="q")(h))
    k = split(nn.Dense(self.d, use_bias=False, name="k")(h))
    v = split(nn.Dense(self.d, use_bias=False, name="v")(h))
    o = _causal_attend(q, k, v).reshape(b, t, self.d)
    x = x + nn.Dense(self.d, use_bias=False, name="o")(o)
    mlp = nn.remat(SwiGLU)(self.d, self.ffn, name="mlp")
    return x + mlp(nn.RMSNorm(name="mlp_norm")(x)), None


class LlamaScan(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(LLAMA_VOCAB, LLAMA_D, name="embed")(tokens)
    layers = nn.scan(LlamaBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=LLAMA_LAYERS)
    x, _ = layers(LLAMA_D, LLAMA_HEADS, LLAMA_FFN, name="layers")(x, None)
    return nn.Dense(LLAMA_VOCAB, use_bias=False, name="lm_head")(nn.RMSNorm(name="norm")(x))


def _llama_fan_in(name: str, shape) -> int:
  return shape[-2]  # (L, in, out) stacked, (in, out) head


def llama_scan_linen(seed: int = 0):
  """Llama style LM; every block kernel is stacked ``(LLAMA_LAYERS, in, out)`` by ``nn.scan``."""
  model = LlamaScan()
  tokens = _tokens(seed + 1, LLAMA_VOCAB)
  abstract = jax.eval_shape(model.init, jax.random.key(0), tokens)
  return model, {"params": fill(abstract["params"], seed, _llama_fan_in)}, tokens


# ---- nnx transformer --------------------------------------------------------------------------

class SubLinear(nnx.Linear):
  """A subclass that keeps ``nnx.Linear.__call__``."""


class DoubledLinear(nnx.Linear):
  """A subclass whose ``__call__`` changes the function: twice the Linear's output."""

  def __call__(self, x):
    return super().__call__(x) * 2.0


class CustomDot(nnx.Module):
  """A layer jq cannot run quantized: it multiplies by its own ``kernel`` Param itself."""

  def __init__(self, d_in: int, d_out: int, *, rngs: nnx.Rngs):
    self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (d_in, d_out)))

  def __call__(self, x):
    return x @ self.kernel[...]


class NnxAttention(nnx.Module):
  def __init__(self, d: int, heads: int, head_dim: int, *, rngs: nnx.Rngs):
    self.qkv = nnx.Einsum("btd,dkhe->btkhe", (d, 3, heads, head_dim), (3, heads, head_dim),
                          rngs=rngs)
    self.o = nnx.LinearGeneral((heads, head_dim), d, axis=(-2, -1), rngs=rngs)

  def __call__(self, x):
    qkv = self.qkv(x)
    return self.o(_causal_attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]))


class NnxMlp(nnx.Module):
  def __init__(self, d: int, ffn: int, *, rngs: nnx.Rngs):
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "model"))
    self.up = SubLinear(d, ffn, kernel_init=init, rngs=rngs)
    self.down = DoubledLinear(ffn, d, rngs=rngs)

  def __call__(self, x):
    return self.down(jax.nn.gelu(self.up(x)))


class NnxBlock(nnx.Module):
  def __init__(self, *, rngs: nnx.Rngs):
    self.ln_1 = nnx.LayerNorm(NNX_D, rngs=rngs)
    self.attn = NnxAttention(NNX_D, NNX_HEADS, NNX_HEAD_DIM, rngs=rngs)
    self.ln_2 = nnx.LayerNorm(NNX_D, rngs=rngs)
    self.mlp = NnxMlp(NNX_D, NNX_FFN, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.ln_1(x))
    return x + self.mlp(self.ln_2(x))


class NnxTransformer(nnx.Module):
  def __init__(self, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(NNX_VOCAB, NNX_D, rngs=rngs)
    self.blocks = nnx.List([NnxBlock(rngs=rngs) for _ in range(NNX_LAYERS)])
    self.custom = CustomDot(NNX_D, NNX_D, rngs=rngs)
    self.ln_f = nnx.LayerNorm(NNX_D, rngs=rngs)
    self.lm_head = nnx.Linear(NNX_D, NNX_VOCAB, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    for blk in self.blocks:
      x = blk(x)
    x = x + self.custom(x)
    return self.lm_head(self.ln_f(x))


def _nnx_fan_in(name: str, shape) -> int:
  if name.endswith("qkv/kernel"):
    return shape[0]
  return _fan_in_all_but_last(name, shape)


def _fill_nnx(model: nnx.Module, seed: int, fan_in) -> nnx.Module:
  state = nnx.state(model)
  nnx.update(model, fill(state, seed, fan_in))
  return model


def nnx_transformer(seed: int = 0):
  """nnx LM (fused qkv Einsum, LinearGeneral o, Linear subclasses, CustomDot ``custom``)."""
  with nnx.use_eager_sharding(False):  # sharding metadata only; the caller places the arrays
    model = nnx.eval_shape(lambda: NnxTransformer(rngs=nnx.Rngs(0)))
  return _fill_nnx(model, seed, _nnx_fan_in), None, _tokens(seed + 1, NNX_VOCAB)


# ---- ViT (linen) ------------------------------------------------------------------------------

class ViTBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x + nn.MultiHeadDotProductAttention(num_heads=VIT_HEADS, name="attn")(
        nn.LayerNorm(name="ln_1")(x))
    h = nn.LayerNorm(name="ln_2")(x)
    h = nn.Dense(VIT_D, name="mlp_out")(jax.nn.gelu(nn.Dense(VIT_MLP, name="mlp_in")(h)))
    return x + h


class ViT(nn.Module):
  @nn.compact
  def __call__(self, images):
    x = nn.Conv(VIT_D, kernel_size=(4, 4), strides=4, padding="VALID", name="patches")(images)
    b = x.shape[0]
    x = x.reshape(b, -1, VIT_D)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, VIT_D))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, VIT_D)), x], axis=1)
    x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, x.shape[1], VIT_D))
    for i in range(VIT_LAYERS):
      x = ViTBlock(name=f"encoder_{i}")(x)
    return nn.Dense(VIT_CLASSES, name="head")(nn.LayerNorm(name="ln_f")(x[:, 0]))


def _vit_fan_in(name: str, shape) -> int:
  if name.endswith(("query/kernel", "key/kernel", "value/kernel")):
    return shape[0]
  return _fan_in_all_but_last(name, shape)


def vit_linen(seed: int = 0):
  """Tiny ViT on 16x16 images: 4x4 patch conv, class token, MultiHeadDotProductAttention."""
  model = ViT()
  images = _images(seed + 1)
  abstract = jax.eval_shape(model.init, jax.random.key(0), images)
  return model, {"params": fill(abstract["params"], seed, _vit_fan_in)}, images


# ---- CNNs -------------------------------------------------------------------------------------

class LinenCustomDot(nn.Module):
  """A linen layer jq cannot run quantized: ``jnp.dot`` on its own ``kernel`` param."""
  features: int

  @nn.compact
  def __call__(self, x):
    w = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
    return jnp.dot(x, w)


class CNN(nn.Module):
  @nn.compact
  def __call__(self, images):
    x = jax.nn.relu(nn.Conv(16, (3, 3), name="conv1")(images))
    x = jax.nn.relu(nn.Conv(32, (3, 3), feature_group_count=2, name="conv2")(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))               # (b, 8, 8, 32)
    x = x.reshape(x.shape[0], -1, x.shape[-1])               # (b, 64, 32): a 1-D sequence
    x = jax.nn.relu(nn.Conv(32, (3,), name="conv1d")(x))
    # average pool by hand: flax's avg_pool divides by an int, which strict promotion refuses
    x = x.reshape(x.shape[0], -1, 2, x.shape[-1]).mean(axis=2)  # (b, 32, 32)
    x = jnp.mean(x, axis=1)
    x = x + LinenCustomDot(32, name="custom")(x)
    return nn.Dense(VIT_CLASSES, name="fc")(x)


def cnn_linen(seed: int = 0):
  """Linen CNN: 3x3 conv, grouped 3x3 conv, max pool, 1-D conv, avg pool, custom dot, Dense."""
  model = CNN()
  images = _images(seed + 1)
  abstract = jax.eval_shape(model.init, jax.random.key(0), images)
  return model, {"params": fill(abstract["params"], seed, _fan_in_all_but_last)}, images


class NnxCNN(nnx.Module):
  def __init__(self, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(3, 16, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, (3, 3), feature_group_count=2, rngs=rngs)
    self.conv3 = nnx.Conv(32, 32, (3, 3), strides=2, rngs=rngs)
    self.fc = nnx.Linear(32, VIT_CLASSES, rngs=rngs)

  def __call__(self, images):
    x = jax.nn.relu(self.conv1(images))
    x = jax.nn.relu(self.conv2(x))
    x = nnx.max_pool(x, (2, 2), strides=(2, 2))              # (b, 8, 8, 32)
    x = jax.nn.relu(self.conv3(x))                           # (b, 4, 4, 32)
    return self.fc(jnp.mean(x, axis=(1, 2)))                 # global average pool (by hand)


def cnn_nnx(seed: int = 0):
  """nnx CNN: 3x3 conv, grouped 3x3 conv, max pool, strided conv, avg pool, Linear."""
  model = nnx.eval_shape(lambda: NnxCNN(rngs=nnx.Rngs(0)))
  return _fill_nnx(model, seed, _fan_in_all_but_last), None, _images(seed + 1)


MODELS: dict[str, Callable[[], tuple]] = {
    "gpt2_linen": lambda: gpt2_linen(fused_qkv=False),
    "gpt2_fused_linen": lambda: gpt2_linen(fused_qkv=True),
    "llama_scan_linen": llama_scan_linen,
    "nnx_transformer": nnx_transformer,
    "vit_linen": vit_linen,
    "cnn_linen": cnn_linen,
    "cnn_nnx": cnn_nnx,
}


def is_nnx(name: str) -> bool:
  return name.endswith("nnx") or name.startswith("nnx")


__all__ = ["MODELS", "scale_heads", "get_kernel", "example_batches", "fill", "gpt2_linen",
           "llama_scan_linen", "nnx_transformer", "vit_linen", "cnn_linen", "cnn_nnx",
           "SubLinear", "DoubledLinear", "CustomDot", "LinenCustomDot", "is_nnx"]
