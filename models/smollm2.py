"""A Llama-family decoder (SmolLM2-135M-Instruct and kin) in Flax linen, with KV-cache decoding.

The module tree uses only standard linen layers so a quantization tool can intercept them::

  params/embed/embedding                      (vocab, d)        tied input embedding / output head
  params/layers_{i}/input_norm/scale          (d,)              RMSNorm
  params/layers_{i}/attn/{q,k,v,o}_proj/kernel (in, out)        nn.Dense, no bias
  params/layers_{i}/post_attn_norm/scale      (d,)
  params/layers_{i}/mlp/{gate,up,down}_proj/kernel (in, out)    nn.Dense, no bias (SwiGLU)
  params/final_norm/scale                     (d,)
  params/lm_head/kernel                       (d, vocab)        only when embeddings are untied

Q/K projections are in Hugging Face order (RoPE by "rotate_half"), not llama.cpp's interleaved order;
``models.gguf_weights`` un-permutes them on load.

Example::

  config, params = load_smollm2()
  model = Llama(config)
  logits = model.apply({"params": params}, tokens)            # (B, T, V) float32
  new_ids = greedy_generate(model.apply, params, prompt_ids, 32, config=config)
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

_COMPUTE_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
  """Hyperparameters of a Llama-family decoder (defaults: SmolLM2-135M).

  Frozen and hashable, so it can be a ``jax.jit`` static argument; variants via
  ``dataclasses.replace(config, dtype=jnp.bfloat16)``.

  Attributes:
    vocab_size: number of tokens.
    hidden_size: model width ``d``.
    intermediate_size: SwiGLU hidden width.
    num_layers: number of decoder blocks.
    num_heads: query heads.
    num_kv_heads: key/value heads (grouped-query attention); divides ``num_heads``.
    head_dim: width of one head.
    rope_theta: RoPE base frequency.
    rms_norm_eps: RMSNorm epsilon.
    max_seq_len: context length the model was trained for.
    tie_embeddings: output head is ``embed.attend`` (no ``lm_head`` params).
    dtype: compute dtype (float32, bfloat16 or float16); params stay float32, logits are float32.
  """
  vocab_size: int = 49152
  hidden_size: int = 576
  intermediate_size: int = 1536
  num_layers: int = 30
  num_heads: int = 9
  num_kv_heads: int = 3
  head_dim: int = 64
  rope_theta: float = 100000.0
  rms_norm_eps: float = 1e-5
  max_seq_len: int = 8192
  tie_embeddings: bool = True
  dtype: Any = jnp.float32

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "max_seq_len"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"LlamaConfig: num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"LlamaConfig.head_dim must be even for RoPE, got {self.head_dim}")
    try:
      dtype = np.dtype(self.dtype)
    except TypeError as e:
      raise ValueError(f"LlamaConfig.dtype: {self.dtype!r} is not a dtype") from e
    if dtype not in _COMPUTE_DTYPES:
      raise ValueError(f"LlamaConfig.dtype must be float32, bfloat16 or float16, got {dtype}")
    object.__setattr__(self, "dtype", dtype)


class KVCache(NamedTuple):
  """Fixed-size key/value cache, one entry per layer.

  Attributes:
    keys: per layer, ``(batch, max_len, num_kv_heads, head_dim)`` (keys already rotated by RoPE).
    values: per layer, same shape as ``keys``.
    index: int32 scalar, the number of positions written so far (= position of the next token).
  """
  keys: tuple[jax.Array, ...]
  values: tuple[jax.Array, ...]
  index: jax.Array

  @property
  def max_len(self) -> int:
    return self.keys[0].shape[1]


def init_cache(config: LlamaConfig, batch_size: int, max_len: int, dtype: Any = None) -> KVCache:
  """An empty cache for ``max_len`` positions (zeros; ``index`` 0). ``dtype`` defaults to the
  config's compute dtype. Writing past ``max_len`` is not detected inside jit: size it to
  ``prompt_len + max_new_tokens``."""
  if batch_size <= 0 or max_len <= 0:
    raise ValueError(f"init_cache: batch_size={batch_size} and max_len={max_len} must be positive")
  dtype = config.dtype if dtype is None else dtype
  shape = (batch_size, max_len, config.num_kv_heads, config.head_dim)
  keys = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
  values = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
  return KVCache(keys=keys, values=values, index=jnp.zeros((), jnp.int32))


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, Hugging Face "rotate_half" convention (pairs ``(i, i + D/2)``).

  Args:
    x: ``(B, T, H, D)``.
    positions: ``(T,)`` integer positions.
    theta: base frequency.

  Returns:
    ``x`` rotated, in ``x.dtype`` (computed in float32).
  """
  d = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # (T, D/2)
  cos = jnp.cos(angles)[None, :, None, :]
  sin = jnp.sin(angles)[None, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., : d // 2], x32[..., d // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Grouped-query softmax attention; q ``(B,T,H,D)``, k/v ``(B,S,Hkv,D)``, mask ``(T,S)``."""
  b, t, h, d = q.shape
  hkv = k.shape[2]
  q = q.reshape(b, t, hkv, h // hkv, d)  # query head h = kv_head * group + g (HF repeat_kv order)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
  scores = scores * (d ** -0.5)
  scores = jnp.where(mask[None, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, h * d)


def _dense(features: int, name: str, config: LlamaConfig) -> nn.Dense:
  return nn.Dense(features, use_bias=False, dtype=config.dtype, param_dtype=jnp.float32, name=name)


class RMSNorm(nn.Module):
  """``x / sqrt(mean(x**2) + epsilon) * scale``, computed in float32, returned in ``dtype``.

  (``nn.RMSNorm`` mixes a float32 scale with bfloat16 inputs implicitly, which fails under
  ``jax.numpy_dtype_promotion("strict")``; the param is likewise called ``scale``.)
  """
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    return (y * scale).astype(self.dtype)


def _rms_norm(name: str, config: LlamaConfig) -> RMSNorm:
  return RMSNorm(epsilon=config.rms_norm_eps, dtype=config.dtype, name=name)


class Attention(nn.Module):
  """Causal grouped-query self-attention with RoPE and an optional fixed-size KV cache."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array,
               kv: tuple[jax.Array, jax.Array] | None = None,
               index: jax.Array | None = None):
    c = self.config
    b, t, _ = x.shape
    q = _dense(c.num_heads * c.head_dim, "q_proj", c)(x).reshape(b, t, c.num_heads, c.head_dim)
    k = _dense(c.num_kv_heads * c.head_dim, "k_proj", c)(x).reshape(b, t, c.num_kv_heads, c.head_dim)
    v = _dense(c.num_kv_heads * c.head_dim, "v_proj", c)(x).reshape(b, t, c.num_kv_heads, c.head_dim)
    q = apply_rope(q, positions, c.rope_theta)
    k = apply_rope(k, positions, c.rope_theta)
    if kv is None:
      keys, values, key_pos = k, v, positions
    else:
      cache_k, cache_v = kv
      start = (0, index, 0, 0)
      keys = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), start)
      values = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), start)
      kv = (keys, values)
      key_pos = jnp.arange(cache_k.shape[1])
      keys, values = keys.astype(q.dtype), values.astype(q.dtype)
    mask = key_pos[None, :] <= positions[:, None]
    out = _attend(q, keys, values, mask)
    return _dense(c.hidden_size, "o_proj", c)(out), kv


class MLP(nn.Module):
  """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    gate = _dense(c.intermediate_size, "gate_proj", c)(x)
    up = _dense(c.intermediate_size, "up_proj", c)(x)
    return _dense(c.hidden_size, "down_proj", c)(nn.silu(gate) * up)


class Block(nn.Module):
  """Pre-norm decoder block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, x, positions, kv=None, index=None):
    c = self.config
    h, kv = Attention(c, name="attn")(_rms_norm("input_norm", c)(x), positions, kv, index)
    x = x + h
    x = x + MLP(c, name="mlp")(_rms_norm("post_attn_norm", c)(x))
    return x, kv


class Llama(nn.Module):
  """Llama-family causal LM.

  ``apply({"params": p}, tokens)`` returns logits ``(B, T, V)`` float32 for positions ``0..T-1``.
  ``apply({"params": p}, tokens, cache=cache)`` continues from ``cache.index``: writes the new
  keys/values into the cache and returns ``(logits, new_cache)``; jittable with static shapes.
  """
  config: LlamaConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, *, cache: KVCache | None = None):
    c = self.config
    if tokens.ndim != 2:
      raise ValueError(f"Llama: tokens must be (batch, time), got shape {tokens.shape}")
    if cache is not None and len(cache.keys) != c.num_layers:
      raise ValueError(f"Llama: cache has {len(cache.keys)} layers, model has {c.num_layers}")
    embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=c.dtype, param_dtype=jnp.float32,
                     name="embed")
    x = embed(tokens)
    index = jnp.zeros((), jnp.int32) if cache is None else cache.index
    positions = index + jnp.arange(tokens.shape[1], dtype=jnp.int32)
    keys, values = [], []
    for i in range(c.num_layers):
      kv = None if cache is None else (cache.keys[i], cache.values[i])
      x, kv = Block(c, name=f"layers_{i}")(x, positions, kv, index)
      if cache is not None:
        keys.append(kv[0])
        values.append(kv[1])
    x = _rms_norm("final_norm", c)(x)
    if c.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = nn.Dense(c.vocab_size, use_bias=False, dtype=c.dtype, param_dtype=jnp.float32,
                        name="lm_head")(x)
    logits = logits.astype(jnp.float32)
    if cache is None:
      return logits
    return logits, KVCache(keys=tuple(keys), values=tuple(values), index=index + tokens.shape[1])


ApplyFn = Callable[..., Any]


def _variables(params: Mapping[str, Any]) -> Mapping[str, Any]:
  return params if "params" in params else {"params": params}


@functools.partial(jax.jit, static_argnames=("apply_fn", "max_new_tokens", "config", "eos_id"))
def _generate(apply_fn, variables, prompt, *, max_new_tokens, config, eos_id):
  batch, prompt_len = prompt.shape
  cache = init_cache(config, batch, prompt_len + max_new_tokens)
  logits, cache = apply_fn(variables, prompt, cache=cache)
  token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
  out = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(token)
  done = jnp.zeros((batch,), bool) if eos_id is None else token == eos_id

  def step(i, carry):
    out, token, cache, done = carry
    logits, cache = apply_fn(variables, token[:, None], cache=cache)
    nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    if eos_id is not None:
      nxt = jnp.where(done, eos_id, nxt)
      done = done | (nxt == eos_id)
    return out.at[:, i].set(nxt), nxt, cache, done

  out, *_ = jax.lax.fori_loop(1, max_new_tokens, step, (out, token, cache, done))
  return out


def greedy_generate(apply_fn: ApplyFn, params: Mapping[str, Any], prompt_ids: ArrayLike,
                    max_new_tokens: int, *, config: LlamaConfig,
                    eos_id: int | None = None) -> jax.Array:
  """Greedy decoding with a fixed-size KV cache, jitted end to end.

  One prefill call over the prompt, then a ``lax.fori_loop`` of single-token steps; the cache holds
  ``prompt_len + max_new_tokens`` positions. Compiles once per (apply_fn, prompt shape,
  max_new_tokens, config, eos_id); ``apply_fn`` must be hashable (a bound ``model.apply`` or any
  function object) and have the signature of ``Llama.apply``:
  ``apply_fn(variables, tokens, cache=cache) -> (logits, cache)``.

  Args:
    apply_fn: ``model.apply`` or a drop-in replacement (e.g. a quantized apply function).
    params: the param tree, or a full variables dict with a ``"params"`` key.
    prompt_ids: ``(T,)`` or ``(B, T)`` token ids (all prompts the same length).
    max_new_tokens: number of tokens to generate (>= 1).
    config: the model config (sizes the cache).
    eos_id: if given, once a sequence emits it, the rest of that row is ``eos_id``.

  Returns:
    ``(max_new_tokens,)`` or ``(B, max_new_tokens)`` int32 new token ids (prompt excluded),
    matching the rank of ``prompt_ids``.
  """
  prompt = jnp.asarray(prompt_ids)
  if prompt.ndim not in (1, 2) or prompt.shape[-1] == 0:
    raise ValueError(f"greedy_generate: prompt_ids must be a non-empty (T,) or (B, T) array, got "
                     f"shape {prompt.shape}")
  if not jnp.issubdtype(prompt.dtype, jnp.integer):
    raise ValueError(f"greedy_generate: prompt_ids must be integers, got {prompt.dtype}")
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"greedy_generate: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
  total = prompt.shape[-1] + max_new_tokens
  if total > config.max_seq_len:
    raise ValueError(f"greedy_generate: prompt ({prompt.shape[-1]}) + max_new_tokens "
                     f"({max_new_tokens}) = {total} exceeds max_seq_len={config.max_seq_len}")
  squeeze = prompt.ndim == 1
  prompt = prompt.reshape(1, -1) if squeeze else prompt
  out = _generate(apply_fn, _variables(params), prompt.astype(jnp.int32),
                  max_new_tokens=max_new_tokens, config=config, eos_id=eos_id)
  return out[0] if squeeze else out


def load_smollm2(path: str | Path | None = None) -> tuple[LlamaConfig, dict[str, Any]]:
  """``(config, float32 params)`` of SmolLM2-135M-Instruct (or any llama GGUF at ``path``).

  ``path=None`` uses the cached ``models.fetch.SMOLLM2_GGUF``. See
  ``models.gguf_weights.load_llama_gguf``.
  """
  from models import gguf_weights  # deferred: gguf_weights imports LlamaConfig from here
  return gguf_weights.load_smollm2(path)
