"""One configurable decoder-only transformer in Flax linen, with KV-cache decoding.

``DecoderConfig`` switches the features that tell the families apart (Llama 1-3.x incl. Llama 3.1's
RoPE scaling, Mistral, Mixtral, Qwen2/2.5, Qwen3, Qwen2/3-MoE, OLMo 2, OLMoE, Gemma 1-3, and the
bundled SmolLM2-135M). The module tree uses only standard linen layers so a quantization tool can
intercept them::

  params/embed/embedding                      (vocab, d)        tied input embedding / output head
  params/layers_{i}/input_norm/scale          (d,)              RMSNorm (not with pre_norms=False)
  params/layers_{i}/attn/{q,k,v,o}_proj/kernel (in, out)        nn.Dense (+ bias: qkv_bias, o_bias)
  params/layers_{i}/attn/{q,k}_norm/scale     (head_dim,)       qk_norm only (Qwen3, Gemma 3;
                                              (heads * head_dim,) with qk_norm_full: OLMo)
  params/layers_{i}/attn_out_norm/scale       (d,)              sandwich_norms only (Gemma 2/3)
  params/layers_{i}/post_attn_norm/scale      (d,)              the norm before the MLP (likewise)
  params/layers_{i}/mlp/{gate,up,down}_proj/kernel (in, out)    nn.Dense (SwiGLU or GeGLU)
  params/layers_{i}/mlp/router/kernel         (d, E)            mixture-of-experts layers: router,
  params/layers_{i}/mlp/experts_{e}/{gate,up,down}_proj/kernel  one gated MLP per expert,
  params/layers_{i}/mlp/shared_expert{,_gate}/...               Qwen2-MoE's shared expert
  params/layers_{i}/mlp_out_norm/scale        (d,)              sandwich_norms only
  params/final_norm/scale                     (d,)
  params/lm_head/kernel                       (d, vocab)        only when embeddings are untied

Q/K projections are in Hugging Face order (RoPE by "rotate_half"), not llama.cpp's interleaved order;
``jq_models.gguf_weights`` un-permutes them on load. ``jq_models.hf`` loads Hugging Face checkpoints.

Example::

  config, params = jq_models.gguf_weights.load_smollm2()
  model = Decoder(config)
  logits = model.apply({"params": params}, tokens)            # (B, T, V) float32
  new_ids = greedy_generate(model.apply, params, prompt_ids, 32, config=config)
  new_ids = greedy_generate(model.apply, params, prompt_ids, 32, config=config, kv_cache="int8")
  logits = model.apply({"params": params}, tokens, kv_quant="int8")  # what that cache computes
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jq import kv_cache as kvc
from jq.io.rope import (longrope_is_long, rope_attention_factor,  # noqa: F401  (this module's API)
                        rope_inv_freq)
from jq.nn.common import reference_road
from jq.qarray import check_values, index_str

_COMPUTE_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))


_ROPE_KINDS = ("linear", "llama3", "yarn", "longrope", "factors")
_ROPE_FACTOR_FIELDS = ("factors", "short_factors", "long_factors")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
  """RoPE frequency scaling of long-context checkpoints (Hugging Face ``rope_scaling``).

  Attributes:
    kind: ``"linear"`` (all frequencies divided by ``factor``), ``"llama3"`` (Llama 3.1's
      wavelength-dependent interpolation between ``low_freq_factor`` and ``high_freq_factor``),
      ``"yarn"`` (YaRN: frequencies between ``beta_fast`` and ``beta_slow`` rotations over the
      original context blended from kept to divided by ``factor``, and queries and keys scaled
      by ``attention_factor``; Qwen3's and OLMo 3's long context), ``"longrope"`` (LongRoPE,
      Phi-3's: each frequency divided by its own entry of ``short_factors``, or of
      ``long_factors`` in a call whose positions reach past ``original_max_position_embeddings``,
      queries and keys scaled by ``attention_factor``) or ``"factors"`` (each frequency divided
      by its own entry of ``factors``: llama.cpp's ``rope_freqs`` tensor, which is how a GGUF
      stores Llama 3.1's scaling).
    factor: the scaling factor (1.0 for ``factors``).
    low_freq_factor, high_freq_factor: ``llama3`` only.
    original_max_position_embeddings: ``llama3``, ``yarn`` and ``longrope``: the pretraining
      context.
    beta_fast, beta_slow, truncate: ``yarn`` only (``truncate``: the blend's bounds rounded
      outwards to whole frequencies).
    attention_factor: ``yarn`` and ``longrope``.
    factors: ``factors`` only; ``head_dim / 2`` positive numbers.
    short_factors, long_factors: ``longrope`` only; one positive number per rotated frequency.
  """
  kind: str
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192
  factors: tuple[float, ...] | None = None
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  attention_factor: float = 1.0
  truncate: bool = True
  short_factors: tuple[float, ...] | None = None
  long_factors: tuple[float, ...] | None = None

  def __post_init__(self):
    if self.kind not in _ROPE_KINDS:
      raise ValueError(f"RopeScaling.kind must be one of {_ROPE_KINDS}, got {self.kind!r}")
    if self.kind == "yarn" and not (self.beta_fast > self.beta_slow > 0
                                    and self.attention_factor > 0):
      raise ValueError(f"RopeScaling(yarn): need beta_fast > beta_slow > 0 and a positive "
                       f"attention_factor, got {self.beta_fast}, {self.beta_slow}, "
                       f"{self.attention_factor}")
    if (self.kind == "factors") != (self.factors is not None):
      raise ValueError("RopeScaling: factors is given exactly when kind is 'factors'")
    if (self.kind == "longrope") != (self.short_factors is not None) or (
        (self.short_factors is None) != (self.long_factors is None)):
      raise ValueError("RopeScaling: short_factors and long_factors are given exactly when kind "
                       "is 'longrope'")
    if self.kind == "longrope" and len(self.short_factors) != len(self.long_factors):
      raise ValueError(f"RopeScaling(longrope): {len(self.short_factors)} short_factors but "
                       f"{len(self.long_factors)} long_factors")
    if self.kind == "longrope" and not self.attention_factor > 0:
      raise ValueError(f"RopeScaling(longrope): attention_factor must be positive, got "
                       f"{self.attention_factor!r}")
    for name in _ROPE_FACTOR_FIELDS:
      if getattr(self, name) is not None:
        object.__setattr__(self, name, tuple(float(f) for f in getattr(self, name)))
        if not all(f > 0 and math.isfinite(f) for f in getattr(self, name)):
          raise ValueError(f"RopeScaling.{name} must be positive and finite")
    if not self.factor > 0:
      raise ValueError(f"RopeScaling.factor must be positive, got {self.factor!r}")
    if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
      raise ValueError(f"RopeScaling(llama3): need high_freq_factor > low_freq_factor > 0, got "
                       f"{self.high_freq_factor} and {self.low_freq_factor}")


_ACTIVATIONS = ("silu", "gelu_tanh")
_MOE_FIELDS = ("num_experts", "experts_per_token", "expert_size", "normalize_routing",
               "moe_layers", "shared_expert_size", "moe_names", "moe_dispatch")
_MOE_DISPATCH = ("auto", "grouped", "dense")
# features added after the first configs were written (OLMo's, Phi-3's): in JSON only when set
_LATER_FIELDS = {"qk_norm_full": False, "pre_norms": True, "rotary_dim": None,
                 "fused_projections": False}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderConfig:
  """Hyperparameters of a decoder-only transformer of the Llama lineage (defaults: SmolLM2-135M).

  One config covers Llama 1-3.x, Mistral, Qwen2/2.5, Qwen3, Gemma 1-3, OLMo 2-3, Phi-3/4 and the
  mixtures of experts Mixtral, Qwen2/3-MoE and OLMoE: the family features below default to plain
  Llama.
  Frozen and hashable, so it can be a ``jax.jit`` static argument; variants via
  ``dataclasses.replace(config, dtype=jnp.bfloat16)``.

  Attributes:
    vocab_size: number of tokens.
    hidden_size: model width ``d``.
    intermediate_size: gated-MLP hidden width.
    num_layers: number of decoder blocks.
    num_heads: query heads.
    num_kv_heads: key/value heads (grouped-query attention); divides ``num_heads``.
    head_dim: width of one head.
    rope_theta: RoPE base frequency (of the full-attention layers).
    rms_norm_eps: RMSNorm epsilon.
    max_seq_len: context length the model was trained for.
    tie_embeddings: output head is ``embed.attend`` (no ``lm_head`` params).
    dtype: compute dtype (float32, bfloat16 or float16); logits are float32.
    qkv_bias, o_bias, mlp_bias: biases on q/k/v (Qwen2), on o_proj, on the MLP linears.
    qk_norm: RMSNorm over each query and key head before RoPE (Qwen3, Gemma 3).
    qk_norm_full: the q/k RMSNorms normalize each token's whole projection (``num_heads *
      head_dim`` queries, ``num_kv_heads * head_dim`` keys) instead of each head (OLMo 2, OLMoE).
    norm_offset: RMSNorm multiplies by ``norm_offset + scale`` (Gemma: 1.0).
    embed_scale: embeddings are multiplied by ``sqrt(hidden_size)`` (Gemma).
    activation: the MLP gate's activation, ``"silu"`` (SwiGLU) or ``"gelu_tanh"`` (GeGLU, Gemma).
    sandwich_norms: extra RMSNorms on the attention and MLP outputs (Gemma 2/3).
    pre_norms: RMSNorms on the attention's and the MLP's inputs (every family but OLMo 2-3, which
      norm only their outputs: ``pre_norms=False`` with ``sandwich_norms``).
    query_scale: attention scores are multiplied by this (default ``head_dim ** -0.5``; Gemma 2/3:
      ``query_pre_attn_scalar ** -0.5``).
    attn_softcap, final_softcap: ``cap * tanh(x / cap)`` on attention scores / logits (Gemma 2).
    rope_scaling: frequency scaling of the full-attention layers (Llama 3.1: ``llama3``; YaRN;
      Phi-3's LongRoPE).
    rotary_dim: RoPE rotates the first ``rotary_dim`` features of each query and key head, the
      rest pass unrotated (Phi-4-mini's ``partial_rotary_factor``; ``None``: the whole head).
    sliding_window: keys further than this many positions back are masked on sliding layers.
    sliding_layers: which layers slide (``None``: all layers when ``sliding_window`` is set).
    local_rope_theta: RoPE base of the sliding layers (Gemma 3; ``None``: ``rope_theta``).
    num_experts: experts of a mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE); 0: every
      layer has one gated MLP.
    experts_per_token: experts each token is routed to (the router's top-k).
    expert_size: one expert's hidden width (``None``: ``intermediate_size``).
    normalize_routing: the top-k routing weights are renormalized to sum to 1 (Mixtral; Qwen's
      ``norm_topk_prob``); else they are the softmax's own values.
    moe_layers: which layers are mixtures of experts (``None``: all, when ``num_experts``); the
      others have a plain MLP of ``intermediate_size`` (Qwen's ``mlp_only_layers``).
    shared_expert_size: hidden width of an expert every token passes through, gated by
      ``sigmoid(shared_expert_gate(x))`` (Qwen2-MoE); 0: none.
    moe_names: Hugging Face naming of the experts: ``"qwen"`` (``mlp.experts.{e}.gate_proj``,
      router ``mlp.gate``) or ``"mixtral"`` (``block_sparse_moe.experts.{e}.w1``, router
      ``block_sparse_moe.gate``).
    fused_projections: the checkpoint stores q/k/v as one ``qkv_proj`` and gate/up as one
      ``gate_up_proj`` (Phi-3; ``jq.io.decoder_names``); jq's modules stay separate (the same
      function: their outputs are the fused one's row blocks).
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
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  qk_norm_full: bool = False
  norm_offset: float = 0.0
  embed_scale: bool = False
  activation: str = "silu"
  sandwich_norms: bool = False
  pre_norms: bool = True
  query_scale: float | None = None
  attn_softcap: float | None = None
  final_softcap: float | None = None
  rope_scaling: RopeScaling | None = None
  sliding_window: int | None = None
  sliding_layers: tuple[bool, ...] | None = None
  local_rope_theta: float | None = None
  num_experts: int = 0
  experts_per_token: int = 2
  expert_size: int | None = None
  normalize_routing: bool = True
  moe_layers: tuple[bool, ...] | None = None
  shared_expert_size: int = 0
  moe_names: str = "qwen"
  moe_dispatch: str = "auto"
  rotary_dim: int | None = None
  fused_projections: bool = False

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "max_seq_len"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"DecoderConfig.{name} must be a positive int, got {value!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"DecoderConfig: num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"DecoderConfig.head_dim must be even for RoPE, got {self.head_dim}")
    for name in ("tie_embeddings", "qkv_bias", "o_bias", "mlp_bias", "qk_norm", "qk_norm_full",
                 "embed_scale", "sandwich_norms", "pre_norms", "fused_projections"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"DecoderConfig.{name} must be a bool, got {getattr(self, name)!r}")
    if self.qk_norm_full and not self.qk_norm:
      raise ValueError("DecoderConfig.qk_norm_full is set but qk_norm is False")
    if not self.pre_norms and not self.sandwich_norms:
      raise ValueError("DecoderConfig: pre_norms=False needs sandwich_norms (a block without "
                       "any norm)")
    rd = self.rotary_dim
    if rd is not None and (isinstance(rd, bool) or not isinstance(rd, (int, np.integer))
                           or rd <= 0 or rd % 2 or rd > self.head_dim):
      raise ValueError(f"DecoderConfig.rotary_dim must be an even int in [2, head_dim="
                       f"{self.head_dim}] or None, got {rd!r}")
    if self.activation not in _ACTIVATIONS:
      raise ValueError(f"DecoderConfig.activation must be one of {_ACTIVATIONS}, got "
                       f"{self.activation!r}")
    for name in ("rope_theta", "rms_norm_eps", "query_scale", "attn_softcap", "final_softcap",
                 "local_rope_theta"):
      value = getattr(self, name)
      if value is not None and not (isinstance(value, (int, float, np.floating))
                                    and math.isfinite(value) and value > 0):
        raise ValueError(f"DecoderConfig.{name} must be a positive finite number, got {value!r}")
    if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
      raise ValueError(f"DecoderConfig.rope_scaling must be a RopeScaling, got "
                       f"{self.rope_scaling!r}")
    if self.sliding_window is not None and (isinstance(self.sliding_window, bool) or not isinstance(
        self.sliding_window, (int, np.integer)) or self.sliding_window <= 0):
      raise ValueError(f"DecoderConfig.sliding_window must be a positive int or None, got "
                       f"{self.sliding_window!r}")
    if self.sliding_layers is not None:
      if self.sliding_window is None:
        raise ValueError("DecoderConfig.sliding_layers is set but sliding_window is None")
      object.__setattr__(self, "sliding_layers", tuple(bool(b) for b in self.sliding_layers))
      if len(self.sliding_layers) != self.num_layers:
        raise ValueError(f"DecoderConfig.sliding_layers has {len(self.sliding_layers)} entries "
                         f"for {self.num_layers} layers")
    self._check_moe()
    try:
      dtype = np.dtype(self.dtype)
    except TypeError as e:
      raise ValueError(f"DecoderConfig.dtype: {self.dtype!r} is not a dtype") from e
    if dtype not in _COMPUTE_DTYPES:
      raise ValueError(f"DecoderConfig.dtype must be float32, bfloat16 or float16, got {dtype}")
    object.__setattr__(self, "dtype", dtype)

  def _check_moe(self) -> None:
    def count(name: str, lo: int) -> None:
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"DecoderConfig.{name} must be an int >= {lo}, got {v!r}")
    count("num_experts", 0)
    count("shared_expert_size", 0)
    if self.moe_names not in ("qwen", "mixtral"):
      raise ValueError(f"DecoderConfig.moe_names must be 'qwen' or 'mixtral', got "
                       f"{self.moe_names!r}")
    if self.moe_dispatch not in _MOE_DISPATCH:
      raise ValueError(f"DecoderConfig.moe_dispatch must be one of {_MOE_DISPATCH}, got "
                       f"{self.moe_dispatch!r}")
    if not isinstance(self.normalize_routing, bool):
      raise ValueError(f"DecoderConfig.normalize_routing must be a bool, got "
                       f"{self.normalize_routing!r}")
    if not self.num_experts:
      if self.moe_layers is not None or self.shared_expert_size:
        raise ValueError("DecoderConfig: moe_layers / shared_expert_size are set but "
                         "num_experts is 0")
      return
    count("experts_per_token", 1)
    if self.experts_per_token > self.num_experts:
      raise ValueError(f"DecoderConfig.experts_per_token={self.experts_per_token} exceeds "
                       f"num_experts={self.num_experts}")
    if self.expert_size is not None:
      count("expert_size", 1)
    if self.moe_layers is not None:
      object.__setattr__(self, "moe_layers", tuple(bool(b) for b in self.moe_layers))
      if len(self.moe_layers) != self.num_layers:
        raise ValueError(f"DecoderConfig.moe_layers has {len(self.moe_layers)} entries for "
                         f"{self.num_layers} layers")

  def is_moe(self, layer: int) -> bool:
    """Whether layer ``layer``'s MLP is a mixture of experts."""
    if not self.num_experts:
      return False
    return True if self.moe_layers is None else self.moe_layers[layer]

  def is_sliding(self, layer: int) -> bool:
    """Whether layer ``layer`` uses sliding-window attention."""
    if self.sliding_window is None:
      return False
    return True if self.sliding_layers is None else self.sliding_layers[layer]

  def to_json(self) -> dict[str, Any]:
    """A JSON-able dict that :meth:`from_json` turns back into this config."""
    out = dataclasses.asdict(self)
    if not self.num_experts:   # a dense config's JSON stays what jq wrote before MoE support
      for f in _MOE_FIELDS:
        del out[f]
    for f, default in _LATER_FIELDS.items():   # likewise for features added after them
      if out[f] == default:
        del out[f]
    out["dtype"] = np.dtype(self.dtype).name
    for name in _ROPE_FACTOR_FIELDS:
      if self.rope_scaling is not None and getattr(self.rope_scaling, name) is not None:
        out["rope_scaling"][name] = list(getattr(self.rope_scaling, name))
      elif self.rope_scaling is not None and name != "factors":   # (added later: omitted)
        del out["rope_scaling"][name]
    for name in ("sliding_layers", "moe_layers"):
      if getattr(self, name) is not None:
        out[name] = list(getattr(self, name))
    return out

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> "DecoderConfig":
    """Inverse of :meth:`to_json`; unknown keys are an error naming them."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(f"DecoderConfig: unknown fields {unknown}")
    kw = dict(d)
    if kw.get("rope_scaling") is not None:
      scaling = dict(kw["rope_scaling"])
      for name in _ROPE_FACTOR_FIELDS:
        if scaling.get(name) is not None:
          scaling[name] = tuple(scaling[name])
      kw["rope_scaling"] = RopeScaling(**scaling)
    for name in ("sliding_layers", "moe_layers"):
      if kw.get(name) is not None:
        kw[name] = tuple(kw[name])
    if "dtype" in kw:
      kw["dtype"] = jnp.dtype(kw["dtype"])
    return cls(**kw)


LlamaConfig = DecoderConfig  # the name SmolLM2-era code uses

class KVCache(NamedTuple):
  """Fixed-size key/value cache, one entry per layer.

  Attributes:
    keys: per layer, ``(batch, max_len, num_kv_heads, head_dim)`` (keys already rotated by RoPE):
      a float array, or a ``jq.kv_cache.QuantizedKV`` (int8 / fp8 values, a scale per token and
      head) for a quantized cache.
    values: per layer, same shape and kind as ``keys``.
    index: int32 scalar, the number of positions written so far (= position of the next token).
  """
  keys: tuple[kvc.Cache, ...]
  values: tuple[kvc.Cache, ...]
  index: jax.Array

  @property
  def max_len(self) -> int:
    return self.keys[0].shape[1]

  @property
  def kind(self) -> kvc.KVKind:
    """How keys and values are stored (``KVKind.NONE``: floats)."""
    return kvc.kind_of(self.keys[0])


def init_cache(config: DecoderConfig, batch_size: int, max_len: int, dtype: Any = None, *,
               kind: str | kvc.KVKind = "none") -> KVCache:
  """An empty cache for ``max_len`` positions (zeros; ``index`` 0). ``kind``: ``"none"`` (floats
  of ``dtype``, by default the config's compute dtype), ``"int8"`` or ``"fp8"`` (quantized keys
  and values with a float32 scale per token and head; see ``jq.kv_cache``). Writing past
  ``max_len`` is not detected inside jit: size it to ``prompt_len + max_new_tokens``."""
  if batch_size <= 0 or max_len <= 0:
    raise ValueError(f"init_cache: batch_size={batch_size} and max_len={max_len} must be positive")
  dtype = config.dtype if dtype is None else dtype
  make = lambda: kvc.init(batch_size, max_len, config.num_kv_heads, config.head_dim, kind, dtype)
  keys = tuple(make() for _ in range(config.num_layers))
  values = tuple(make() for _ in range(config.num_layers))
  return KVCache(keys=keys, values=values, index=jnp.zeros((), jnp.int32))


def apply_rope(x: jax.Array, positions: jax.Array, theta: float | np.ndarray,
               scale: float = 1.0) -> jax.Array:
  """Rotary embedding, Hugging Face "rotate_half" convention (pairs ``(i, i + R/2)`` of the
  first ``R`` features; the rest pass unrotated, as Phi-3's partial rotary).

  Args:
    x: ``(B, T, H, D)``.
    positions: ``(T,)`` integer positions.
    theta: base frequency (``R = D``), or the ``(R/2,)`` inverse frequencies (see
      :func:`rope_inv_freq`).
    scale: multiplies cos and sin (YaRN's and LongRoPE's ``rope_attention_factor``).

  Returns:
    ``x`` rotated, in ``x.dtype`` (computed in float32).
  """
  inv_freq = (jnp.asarray(theta, jnp.float32) if np.ndim(theta) else
              jnp.asarray(rope_inv_freq(x.shape[-1], float(theta))))
  d = 2 * inv_freq.shape[0]
  if d < x.shape[-1]:
    return jnp.concatenate([apply_rope(x[..., :d], positions, inv_freq, scale), x[..., d:]],
                           axis=-1)
  angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # (T, D/2)
  cos = jnp.cos(angles)[None, :, None, :]
  sin = jnp.sin(angles)[None, :, None, :]
  if scale != 1.0:
    cos, sin = cos * jnp.float32(scale), sin * jnp.float32(scale)
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., : d // 2], x32[..., d // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
  return x if cap is None else jnp.tanh(x / cap) * cap


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
            scale: float | None = None, softcap: float | None = None) -> jax.Array:
  """Grouped-query softmax attention; q ``(B,T,H,D)``, k/v ``(B,S,Hkv,D)``, mask ``(T,S)``."""
  b, t, h, d = q.shape
  hkv = k.shape[2]
  q = q.reshape(b, t, hkv, h // hkv, d)  # query head h = kv_head * group + g (HF repeat_kv order)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
  scores = _softcap(scores * (d ** -0.5 if scale is None else scale), softcap)
  scores = jnp.where(mask[None, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, h * d)


def _dense(features: int, name: str, config: DecoderConfig, bias: bool = False) -> nn.Dense:
  return nn.Dense(features, use_bias=bias, dtype=config.dtype, param_dtype=jnp.float32, name=name)


class RMSNorm(nn.Module):
  """``x / sqrt(mean(x**2) + epsilon) * (offset + scale)``, in float32, returned in ``dtype``.

  (``nn.RMSNorm`` mixes a float32 scale with bfloat16 inputs implicitly, which fails under
  ``jax.numpy_dtype_promotion("strict")``; the param is likewise called ``scale``, and may be
  stored in any float dtype.)  ``offset`` is 1.0 for Gemma, whose checkpoints store ``scale - 1``.
  """
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  offset: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.zeros if self.offset else nn.initializers.ones
    scale = self.param("scale", init, (x.shape[-1],), jnp.float32).astype(jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    return (y * (scale + self.offset if self.offset else scale)).astype(self.dtype)


def _rms_norm(name: str, config: DecoderConfig) -> RMSNorm:
  return RMSNorm(epsilon=config.rms_norm_eps, dtype=config.dtype, offset=config.norm_offset,
                 name=name)


class Attention(nn.Module):
  """Causal grouped-query self-attention with RoPE and an optional fixed-size KV cache.

  Without a cache, ``kv_quant`` (``"none"``, ``"int8"``, ``"fp8"``) fake-quantizes the keys and
  values as a cache of that kind would store them (``jq.kv_cache.fake_quant_kv``); with a cache,
  the cache's kind decides."""
  config: DecoderConfig
  layer: int = 0

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array,
               kv: tuple[kvc.Cache, kvc.Cache] | None = None,
               index: jax.Array | None = None, kv_quant: str | kvc.KVKind = "none"):
    c = self.config
    b, t, _ = x.shape
    hd, qkv_bias = c.head_dim, c.qkv_bias
    q = _dense(c.num_heads * hd, "q_proj", c, qkv_bias)(x)
    k = _dense(c.num_kv_heads * hd, "k_proj", c, qkv_bias)(x)
    v = _dense(c.num_kv_heads * hd, "v_proj", c, qkv_bias)(x).reshape(b, t, c.num_kv_heads, hd)
    if c.qk_norm and c.qk_norm_full:   # each token's whole projection (OLMo 2, OLMoE)
      q, k = _rms_norm("q_norm", c)(q), _rms_norm("k_norm", c)(k)
    q, k = q.reshape(b, t, c.num_heads, hd), k.reshape(b, t, c.num_kv_heads, hd)
    if c.qk_norm and not c.qk_norm_full:   # each head (Qwen3, Gemma 3)
      q, k = _rms_norm("q_norm", c)(q), _rms_norm("k_norm", c)(k)
    sliding = c.is_sliding(self.layer)
    rd = c.rotary_dim or hd
    if sliding and c.local_rope_theta is not None:
      inv_freq, scale = rope_inv_freq(rd, c.local_rope_theta), 1.0
    else:
      inv_freq = rope_inv_freq(rd, c.rope_theta, c.rope_scaling)
      scale = rope_attention_factor(c.rope_scaling)   # (YaRN's, LongRoPE's; else 1)
      if c.rope_scaling is not None and c.rope_scaling.kind == "longrope":
        inv_freq = jnp.where(longrope_is_long(c.rope_scaling, positions),
                             rope_inv_freq(rd, c.rope_theta, c.rope_scaling, long=True), inv_freq)
    q = apply_rope(q, positions, inv_freq, scale)
    k = apply_rope(k, positions, inv_freq, scale)
    if kv is None:
      keys, values = kvc.fake_quant_kv(k, kv_quant), kvc.fake_quant_kv(v, kv_quant)
      key_pos = positions
    else:
      kv = (kvc.update(kv[0], k, index), kvc.update(kv[1], v, index))
      key_pos = jnp.arange(kv[0].shape[1])
      keys, values = kvc.read(kv[0], q.dtype), kvc.read(kv[1], q.dtype)
    mask = key_pos[None, :] <= positions[:, None]
    if sliding:
      mask = mask & (key_pos[None, :] > positions[:, None] - c.sliding_window)
    out = _attend(q, keys, values, mask, scale=c.query_scale, softcap=c.attn_softcap)
    return _dense(c.hidden_size, "o_proj", c, c.o_bias)(out), kv


class MLP(nn.Module):
  """Gated feed-forward: ``down(act(gate(x)) * up(x))`` (SwiGLU, or GeGLU for Gemma); ``size``:
  its hidden width (``None``: ``intermediate_size``)."""
  config: DecoderConfig
  size: int | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    size = self.size or c.intermediate_size
    gate = _dense(size, "gate_proj", c, c.mlp_bias)(x)
    up = _dense(size, "up_proj", c, c.mlp_bias)(x)
    act = nn.silu(gate) if c.activation == "silu" else jax.nn.gelu(gate, approximate=True)
    return _dense(c.hidden_size, "down_proj", c, c.mlp_bias)(act * up)


def route(logits: jax.Array, k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
  """``(experts, weights)``, both ``(..., k)``, of router ``logits``: the ``k`` experts of highest
  softmax probability (int32) and their probabilities (float32; renormalized to sum to 1 when
  ``normalize``)."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  top, idx = jax.lax.top_k(probs, k)
  if normalize:
    top = top / jnp.sum(top, axis=-1, keepdims=True)
  return idx.astype(jnp.int32), top


class ExpertTiles(NamedTuple):
  """Routed (token, expert) pairs grouped into tiles of ``rows`` pairs of one expert each.

  Attributes:
    expert: ``(n,)`` the expert of each tile; ``num_experts`` for a tile left empty.
    pair: ``(n, rows)`` indices into the flattened ``(tokens * k)`` pairs.
    valid: ``(n, rows)`` which rows hold a pair (an expert's last tile is padded).
  """
  expert: jax.Array
  pair: jax.Array
  valid: jax.Array


def tile_rows(pairs: int, num_experts: int, cap: int = 256) -> int:
  """Rows of one expert tile for ``pairs`` routed pairs: the power of two at or above the mean
  pairs per expert, at most ``cap``."""
  mean = -(-pairs // num_experts)
  return min(cap, 1 << max(mean - 1, 0).bit_length())


def num_tiles(pairs: int, num_experts: int, rows: int) -> int:
  """Tiles enough for any routing of ``pairs`` pairs: ``sum_e ceil(count_e / rows)`` is at most
  ``(pairs + m (rows - 1)) / rows`` with ``m <= min(E, pairs)`` experts that have pairs."""
  return (pairs + min(num_experts, pairs) * (rows - 1)) // rows


def expert_tiles(experts: jax.Array, num_experts: int, rows: int) -> ExpertTiles:
  """Groups the routed pairs ``experts`` (``(N, k)`` expert ids) by expert into tiles of
  ``rows`` (static shapes: ``num_tiles`` tiles, the unused ones empty)."""
  flat = experts.reshape(-1)
  pairs = flat.shape[0]
  order = jnp.argsort(flat, stable=True)                      # pairs sorted by expert
  counts = jnp.bincount(flat, length=num_experts)
  tiles = (counts + rows - 1) // rows
  tiles_end = jnp.cumsum(tiles)
  start = jnp.cumsum(counts) - counts                         # each expert's first sorted pair
  j = jnp.arange(num_tiles(pairs, num_experts, rows), dtype=jnp.int32)
  expert = jnp.searchsorted(tiles_end, j, side="right").astype(jnp.int32)
  e = jnp.minimum(expert, num_experts - 1)
  row = (j - tiles_end[e] + tiles[e])[:, None] * rows + jnp.arange(rows, dtype=jnp.int32)
  valid = (expert[:, None] < num_experts) & (row < counts[e][:, None])
  pair = jnp.where(valid, order[jnp.clip(start[e][:, None] + row, 0, pairs - 1)], 0)
  return ExpertTiles(expert, pair.astype(jnp.int32), valid)


def grouped_is_cheaper(pairs: int, num_experts: int, k: int, backend: str) -> bool:
  """``moe_dispatch="auto"``'s choice: the grouped road where its tiles hold fewer rows than the
  dense road's ``tokens * E``, on CPU, where that is measured (``benchmarks/moe.py``: 1.7-15x
  faster in 11 of 12 cases).  On GPU and TPU each tile of the loop waits on its predicate, not
  yet measured against the dense road's ``E / k`` FLOPs: dense there until it is."""
  if backend != "cpu":
    return False
  rows = tile_rows(pairs, num_experts)
  return num_tiles(pairs, num_experts, rows) * rows < (pairs // k) * num_experts


class MoE(nn.Module):
  """Mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE): a float ``router`` (``(d, E)``) picks
  each token's ``experts_per_token`` experts; the output is their gated MLPs' sum weighted by
  the routing weights (plus, with ``shared_expert_size``, ``sigmoid(shared_expert_gate(x)) *
  shared_expert(x)``).  Every expert is an ``MLP`` of its own (``experts_{e}``).

  Two roads compute the same function, chosen by ``config.moe_dispatch``:

  * ``"grouped"``: the routed (token, expert) pairs are sorted by expert into tiles of one
    expert each (``expert_tiles``), and a loop over the tiles runs only each tile's expert
    (``nn.switch``): about ``k`` experts' FLOPs per token instead of ``E``, and at batch 1 only
    the routed experts' weights are read.
  * ``"dense"``: every expert runs on all tokens with the tokens not routed to it zeroed (a zero
    row stays zero through a bias-free gated MLP, and its weight is 0): ``E / k`` times the
    FLOPs, static shapes without a loop.  Initialization takes it (every expert's params), and
    so does calibration (``jq.nn.common.reference_road``): each expert's statistics then come
    from one input per model call, with the sequence axis kept, and every calibration road
    propagates the same bits.
  * ``"auto"`` (default): ``grouped_is_cheaper``.
  """
  config: DecoderConfig

  def setup(self):
    c = self.config
    self.router = _dense(c.num_experts, "router", c)
    self.experts = [MLP(c, c.expert_size, name=f"experts_{e}") for e in range(c.num_experts)]
    if c.shared_expert_size:
      self.shared_expert = MLP(c, c.shared_expert_size, name="shared_expert")
      self.shared_expert_gate = _dense(1, "shared_expert_gate", c)

  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    experts, weights = route(self.router(x), c.experts_per_token, c.normalize_routing)
    if self._grouped(experts.size):
      out = self._grouped_experts(x, experts, weights)
    else:
      out = self._dense_experts(x, experts, weights)
    if c.shared_expert_size:
      gate = nn.sigmoid(self.shared_expert_gate(x))
      out = out + (gate * self.shared_expert(x)).astype(jnp.float32)
    return out.astype(c.dtype)

  def _grouped(self, pairs: int) -> bool:
    dispatch = self.config.moe_dispatch
    if dispatch == "dense" or self.is_initializing() or reference_road():
      return False
    if dispatch == "grouped":
      return True
    c = self.config
    return grouped_is_cheaper(pairs, c.num_experts, c.experts_per_token, jax.default_backend())

  def _dense_experts(self, x, experts, weights):
    e_all = self.config.num_experts
    onehot = jax.nn.one_hot(experts, e_all, dtype=jnp.float32)          # (..., k, E)
    gate = jnp.einsum("...k,...ke->...e", weights, onehot)
    selected = jnp.sum(onehot, axis=-2)
    out = jnp.zeros(x.shape, jnp.float32)
    for e, expert in enumerate(self.experts):
      ye = expert(x * selected[..., e:e + 1].astype(x.dtype))
      out = out + ye.astype(jnp.float32) * gate[..., e:e + 1]
    return out

  def _grouped_experts(self, x, experts, weights):
    c = self.config
    k, d = c.experts_per_token, x.shape[-1]
    xf = x.reshape(-1, d)
    rows = tile_rows(experts.size, c.num_experts)
    tiles = expert_tiles(experts, c.num_experts, rows)
    pair_weight = weights.reshape(-1)

    def branch(e):
      return lambda mdl, xt: mdl.experts[e](xt).astype(jnp.float32)

    branches = [branch(e) for e in range(c.num_experts)]
    branches.append(lambda mdl, xt: jnp.zeros(xt.shape, jnp.float32))     # an empty tile

    def body(mdl, out, tile):
      expert, pair, valid = tile
      token = pair // k
      xt = jnp.where(valid[:, None], xf[token], jnp.zeros((), xf.dtype))
      yt = nn.switch(expert, branches, mdl, xt)
      w = jnp.where(valid, pair_weight[pair], 0.0)
      return out.at[token].add(yt * w[:, None]), None

    scan = nn.scan(body, variable_broadcast="params", split_rngs={"params": False})
    out, _ = scan(self, jnp.zeros(xf.shape, jnp.float32), tuple(tiles))
    return out.reshape(x.shape)


class Block(nn.Module):
  """Pre-norm decoder block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``; with
  ``sandwich_norms`` the attention and MLP outputs are normed too (``attn_out_norm``,
  ``mlp_out_norm``) before they join the residual, and with ``pre_norms=False`` only they are
  (OLMo 2: ``x + norm(attn(x))``)."""
  config: DecoderConfig
  layer: int = 0

  @nn.compact
  def __call__(self, x, positions, kv=None, index=None, kv_quant="none"):
    c = self.config
    pre = (lambda name, y: _rms_norm(name, c)(y)) if c.pre_norms else (lambda name, y: y)
    h, kv = Attention(c, self.layer, name="attn")(pre("input_norm", x), positions, kv, index,
                                                  kv_quant)
    if c.sandwich_norms:
      h = _rms_norm("attn_out_norm", c)(h)
    x = x + h
    mlp = MoE(c, name="mlp") if c.is_moe(self.layer) else MLP(c, name="mlp")
    h = mlp(pre("post_attn_norm", x))
    if c.sandwich_norms:
      h = _rms_norm("mlp_out_norm", c)(h)
    return x + h, kv


def check_token_ids(tokens, vocab_size: int, name: str) -> None:
  """Token ids outside ``[0, vocab_size)`` (an embedding lookup would give NaN or another token's
  row): ValueError naming the first.  Runs on concrete ids only (eagerly), or under
  ``jq.checked()`` inside ``jit``: the jitted forward pays nothing."""
  if not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
    raise ValueError(f"{name}: token ids must be integers, got dtype {jnp.result_type(tokens)}")
  if not np.size(tokens):
    return
  shape = tuple(np.shape(tokens))

  def fail(n, i, v):
    raise ValueError(f"{name}: tokens shape {shape}: {int(n)} token id(s) outside [0, "
                     f"{vocab_size}) (vocab_size {vocab_size}), first at index "
                     f"{index_str(i, shape)}: {int(v)}; the ids come from another tokenizer or "
                     "were corrupted")

  check_values(jnp.asarray(tokens), fail, lo=0, hi=vocab_size - 1)


def scale_embeddings(c: DecoderConfig, rows: jax.Array) -> jax.Array:
  """Embedding rows as the decoder's input hidden states, in ``c.dtype`` (Gemma: times
  ``sqrt(hidden_size)`` rounded to the compute dtype, as Hugging Face rounds it to the dtype it
  runs the model in; whatever dtype the table is stored in, so a bfloat16 checkpoint computed in
  float32 is scaled in float32, and every road that embeds tokens gets the same bits)."""
  rows = rows.astype(c.dtype)
  return rows * jnp.asarray(c.hidden_size ** 0.5, c.dtype) if c.embed_scale else rows


def embed_lookup(c: DecoderConfig, table: jax.Array, tokens: jax.Array) -> jax.Array:
  """The decoder's input hidden states from a float table (the rows in the table's dtype)."""
  return scale_embeddings(c, jnp.take(table, tokens, axis=0))


class OneBlock(nn.Module):
  """Block ``layer`` alone, as the decoder runs it on a fresh sequence (positions ``0..T-1``);
  its params are ``{"layers_<layer>": ...}``, the decoder's own paths (for onloaded calibration,
  ``jq.ptq.onload``)."""
  config: DecoderConfig
  layer: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    positions = jnp.arange(x.shape[1], dtype=jnp.int32)
    y, _ = Block(self.config, self.layer, name=f"layers_{self.layer}")(x, positions)
    return y


class Decoder(nn.Module):
  """Decoder-only causal LM (Llama, Mistral, Qwen2/3, Gemma 1-3, OLMo 2, their mixtures of experts,
  SmolLM2: see ``DecoderConfig``).

  ``apply({"params": p}, tokens)`` returns logits ``(B, T, V)`` float32 for positions ``0..T-1``.
  ``apply({"params": p}, tokens, cache=cache)`` continues from ``cache.index``: writes the new
  keys/values into the cache and returns ``(logits, new_cache)``; jittable with static shapes.
  ``apply({"params": p}, tokens, kv_quant="int8")`` (or ``"fp8"``) computes, without a cache,
  exactly what decoding with a cache of that kind computes (``init_cache(..., kind="int8")``).
  """
  config: DecoderConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, *, cache: KVCache | None = None,
               kv_quant: str | kvc.KVKind = "none"):
    c = self.config
    if tokens.ndim != 2:
      raise ValueError(f"Decoder: tokens must be (batch, time), got shape {tokens.shape}")
    if cache is not None and len(cache.keys) != c.num_layers:
      raise ValueError(f"Decoder: cache has {len(cache.keys)} layers, model has {c.num_layers}")
    kv_quant = kvc.as_kind(kv_quant)
    if cache is not None and kv_quant not in (kvc.KVKind.NONE, cache.kind):
      raise ValueError(f"Decoder: kv_quant={kv_quant.value!r} but the cache is "
                       f"{cache.kind.value!r}; a cache's kind decides how it stores keys/values")
    check_token_ids(tokens, c.vocab_size, "Decoder")
    # Gemma scales the rows in the table's own dtype (dtype=None: Flax keeps it); the lookup goes
    # through nn.Embed, so a quantized table (jq.head_rule) is read by jq's adapter.
    embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=None if c.embed_scale else c.dtype,
                     param_dtype=jnp.float32, name="embed")
    x = scale_embeddings(c, embed(tokens))
    index = jnp.zeros((), jnp.int32) if cache is None else cache.index
    positions = index + jnp.arange(tokens.shape[1], dtype=jnp.int32)
    keys, values = [], []
    for i in range(c.num_layers):
      kv = None if cache is None else (cache.keys[i], cache.values[i])
      x, kv = Block(c, i, name=f"layers_{i}")(x, positions, kv, index, kv_quant)
      if cache is not None:
        keys.append(kv[0])
        values.append(kv[1])
    x = _rms_norm("final_norm", c)(x)
    if c.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = nn.Dense(c.vocab_size, use_bias=False, dtype=c.dtype, param_dtype=jnp.float32,
                        name="lm_head")(x)
    logits = _softcap(logits.astype(jnp.float32), c.final_softcap)
    if cache is None:
      return logits
    return logits, KVCache(keys=tuple(keys), values=tuple(values), index=index + tokens.shape[1])


Llama = Decoder  # the name SmolLM2-era code uses


ApplyFn = Callable[..., Any]


def _variables(params: Mapping[str, Any]) -> Mapping[str, Any]:
  return params if "params" in params else {"params": params}


_BAR: list[Any] = []   # the progress bar of the greedy_generate call running now (if any)


def _tick(*_):
  if _BAR:
    _BAR[-1].update(1)


@functools.partial(jax.jit, static_argnames=("apply_fn", "max_new_tokens", "config", "eos_id",
                                             "progress", "kv_cache"))
def _generate(apply_fn, variables, prompt, *, max_new_tokens, config, eos_id, progress=False,
              kv_cache=kvc.KVKind.NONE):
  batch, prompt_len = prompt.shape
  cache = init_cache(config, batch, prompt_len + max_new_tokens, kind=kv_cache)
  logits, cache = apply_fn(variables, prompt, cache=cache)
  token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
  out = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(token)
  done = jnp.zeros((batch,), bool) if eos_id is None else token == eos_id
  if progress:
    jax.debug.callback(_tick, token)

  def step(i, carry):
    out, token, cache, done = carry
    if progress:   # one host tick per token (the CLI's progress bar)
      jax.debug.callback(_tick, i)
    logits, cache = apply_fn(variables, token[:, None], cache=cache)
    nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    if eos_id is not None:
      nxt = jnp.where(done, eos_id, nxt)
      done = done | (nxt == eos_id)
    return out.at[:, i].set(nxt), nxt, cache, done

  out, *_ = jax.lax.fori_loop(1, max_new_tokens, step, (out, token, cache, done))
  return out


def greedy_generate(apply_fn: ApplyFn, params: Mapping[str, Any], prompt_ids: ArrayLike,
                    max_new_tokens: int, *, config: DecoderConfig,
                    eos_id: int | None = None, progress: bool = False,
                    kv_cache: str | kvc.KVKind = "none") -> jax.Array:
  """Greedy decoding with a fixed-size KV cache, jitted end to end.

  One prefill call over the prompt, then a ``lax.fori_loop`` of single-token steps; the cache holds
  ``prompt_len + max_new_tokens`` positions. LongRoPE (Phi-3): once the sequence grows past the
  original context, the cache is recomputed over it with the long factors (a second prefill), as
  transformers does. Compiles once per (apply_fn, prompt shape,
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
    progress: a progress bar over the generated tokens (a host callback per token; compiled
      separately from the silent version).
    kv_cache: how the cache stores keys and values: ``"none"`` (the compute dtype), ``"int8"`` or
      ``"fp8"`` (``jq.kv_cache``: a float32 scale per token and head, dequantized inside the
      jitted step).

  Returns:
    ``(max_new_tokens,)`` or ``(B, max_new_tokens)`` int32 new token ids (prompt excluded),
    matching the rank of ``prompt_ids``.
  """
  kv_cache = kvc.as_kind(kv_cache)
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
  check_token_ids(prompt, config.vocab_size, "greedy_generate: prompt_ids")
  squeeze = prompt.ndim == 1
  prompt = prompt.reshape(1, -1) if squeeze else prompt
  scaling = config.rope_scaling
  first = (0 if scaling is None or scaling.kind != "longrope" else
           scaling.original_max_position_embeddings + 1 - prompt.shape[-1])
  if 0 < first < max_new_tokens:
    # LongRoPE: the cache of a sequence that grows past the original context holds keys rotated
    # with the short factors; transformers (Phi-3) then recomputes it over the whole sequence
    # with the long ones, once: so does jq (a second prefill, of the prompt and the tokens so far)
    kw = dict(config=config, eos_id=eos_id, progress=progress, kv_cache=kv_cache)
    head = greedy_generate(apply_fn, params, prompt, first, **kw)
    tail = greedy_generate(apply_fn, params, jnp.concatenate([prompt, head], axis=1),
                           max_new_tokens - first, **kw)
    if eos_id is not None:   # (a row that ended stays ended)
      tail = jnp.where(jnp.any(head == eos_id, axis=1, keepdims=True), eos_id, tail)
    out = jnp.concatenate([head, tail], axis=1)
    return out[0] if squeeze else out
  run = functools.partial(_generate, apply_fn, _variables(params), prompt.astype(jnp.int32),
                          max_new_tokens=max_new_tokens, config=config, eos_id=eos_id,
                          progress=bool(progress), kv_cache=kv_cache)
  if not progress:
    out = run()
  else:
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    _BAR.append(tqdm(total=max_new_tokens, desc="generating (compiles first)", unit="tok",
                     leave=False))
    try:
      out = jax.block_until_ready(run())
      jax.effects_barrier()
    finally:
      _BAR.pop().close()
  return out[0] if squeeze else out
