"""Llama-family models: the param tree of ``models/decoder.py`` <-> a llama.cpp ``llama`` GGUF.

:func:`export_gguf` writes a Llama-family param tree (``models/decoder.py`` layout, float and/or
QArray leaves) as a llama.cpp ``llama`` GGUF, re-applying llama.cpp's Q/K row permutation;
:func:`gguf_to_params` turns the tensors of :func:`jq.io.gguf.reader.load_gguf_qarrays` back into
the jq param tree (:func:`load_gguf_params` does both steps).  :class:`LlamaHParams` holds the
hyperparameters, from a config or from GGUF ``llama.*`` metadata.

Checked with llama-cpp-python 0.3.36 (optional test): exported SmolLM2 files load and run; the
perplexity of the first 1024 tokens of ``jq_models.text.eval_text()`` is 27.99 in jq vs 28.17 in
llama.cpp for Q8_0 and 39.21 vs 39.36 for Q4_0 (llama.cpp also quantizes activations to 8 bits).
"""
from __future__ import annotations

import dataclasses
import os
import re
import tempfile
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf
import jax.numpy as jnp
import numpy as np

from jq.io import decoder_names
from jq.io.rope import rope_inv_freq
from jq.io.hints import REQUANTIZE_HINT
from jq.io.codec import load_leaf
from jq.io.gguf.codec import encode_tensor
from jq.io.gguf.metadata import _add_kv
from jq.io.gguf.qarray_np import _dequantize_np, _pack_np, _unpacked_np, fuse_leaves
from jq.io.gguf.reader import load_gguf_qarrays, tokenizer_metadata
from jq.io.gguf.types import (_K_FALLBACK, EXPORT_TYPES, QK_K, GGMLType, GGUFExportError,
                              GGUFFormatError, to_ggml_type)
from jq.qarray import QArray, dequantize
from jq.tree import is_qarray, leaves_with_paths


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaHParams:
  """Hyperparameters of a Llama-family decoder, with ``jq_models.decoder.LlamaConfig``'s names."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-5
  max_seq_len: int = 2048
  tie_embeddings: bool = True

  @classmethod
  def from_config(cls, config: Any) -> "LlamaHParams":
    """From a ``LlamaConfig``-like object or a mapping with the same field names.

    Raises:
      GGUFExportError: missing or non-positive fields, or a declared architecture other than llama.
    """
    get = (lambda k: config.get(k)) if isinstance(config, Mapping) else (
        lambda k: getattr(config, k, None))
    arch = get("architecture") or get("model_type")
    if arch is not None and str(arch).lower() not in ("llama", "smollm2", "llamaforcausallm"):
      raise GGUFExportError(f"config architecture {arch!r} is not supported; the GGUF exporter "
                            "writes Llama-family decoders ('llama') only")
    vals = {}
    for f in dataclasses.fields(cls):
      v = get(f.name)
      if v is None and f.name == "head_dim" and get("hidden_size") and get("num_heads"):
        v = int(get("hidden_size")) // int(get("num_heads"))
      if v is None:
        if f.default is dataclasses.MISSING:
          raise GGUFExportError(f"config has no {f.name!r}; GGUF llama export needs "
                                f"{[x.name for x in dataclasses.fields(cls)]}")
        continue
      vals[f.name] = v
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
              "num_kv_heads", "head_dim", "max_seq_len"):
      if k in vals and (int(vals[k]) != vals[k] or int(vals[k]) <= 0):
        raise GGUFExportError(f"config.{k}={vals[k]!r} must be a positive integer")
    hp = cls(**vals)
    if hp.num_heads % hp.num_kv_heads:
      raise GGUFExportError(f"config num_heads={hp.num_heads} is not a multiple of "
                            f"num_kv_heads={hp.num_kv_heads}")
    return hp

  @classmethod
  def from_metadata(cls, meta: Mapping[str, Any]) -> "LlamaHParams":
    """From GGUF ``llama.*`` metadata (tie_embeddings is decided by the tensors; True here)."""
    arch = meta.get("general.architecture")
    if arch != "llama":
      raise GGUFFormatError(f"GGUF architecture {arch!r} is not supported; only 'llama' is")

    def key(k, default=None):
      v = meta.get(f"llama.{k}", default)
      if v is None:
        raise GGUFFormatError(f"GGUF metadata key 'llama.{k}' is missing")
      if isinstance(v, list):
        raise GGUFFormatError(f"GGUF llama.{k} is per-layer ({v[:4]}...): not supported")
      return v

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", hidden // heads))
    if int(key("rope.dimension_count", head_dim)) != head_dim:
      raise GGUFFormatError("GGUF llama.rope.dimension_count != head_dim (partial rotary) is not "
                            "supported")
    return cls(vocab_size=int(key("vocab_size", 0)) or -1, hidden_size=hidden,
               intermediate_size=int(key("feed_forward_length")),
               num_layers=int(key("block_count")), num_heads=heads,
               num_kv_heads=int(key("attention.head_count_kv", heads)), head_dim=head_dim,
               rope_theta=float(key("rope.freq_base", 10000.0)),
               rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
               max_seq_len=int(key("context_length", 2048)))


_FLOAT_OF = {np.dtype(np.float32): GGMLType.F32, np.dtype(np.float16): GGMLType.F16,
             np.dtype(jnp.bfloat16): GGMLType.BF16}
def _llama_tables() -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
  """``(block kernels, block norms, globals)``: jq path -> GGUF stem of the plain ``llama``
  architecture, from the one mapping (``jq.io.decoder_names``)."""
  one = types.SimpleNamespace(num_layers=1, tie_embeddings=False)
  kernels, norms, globs = {}, {}, {}
  for t in decoder_names.decoder_tensors(one):
    stem = t.gguf.removesuffix(".weight")
    if t.path[0] == "layers_0":
      rel = "/".join(t.path[1:])
      (kernels if t.path[-1] == "kernel" else norms)[rel] = stem.removeprefix("blk.0.")
    else:
      globs[t.jq] = stem
  return kernels, norms, globs


_BLOCK_KERNELS, _BLOCK_NORMS, _GLOBALS = _llama_tables()
_LAYER_RE = re.compile(r"layers_(\d+)/(.+)")


def _gguf_name(path: str) -> tuple[str, str]:
  """(GGUF tensor name, kind) of a param path; kind is 'kernel', 'embed', 'norm' or 'head'."""
  if path in _GLOBALS:
    kind = {"token_embd": "embed", "output_norm": "norm", "output": "kernel"}[_GLOBALS[path]]
    return _GLOBALS[path] + ".weight", kind
  m = _LAYER_RE.fullmatch(path)
  if m and m.group(2) in _BLOCK_KERNELS:
    return f"blk.{int(m.group(1))}.{_BLOCK_KERNELS[m.group(2)]}.weight", "kernel"
  if m and m.group(2) in _BLOCK_NORMS:
    return f"blk.{int(m.group(1))}.{_BLOCK_NORMS[m.group(2)]}.weight", "norm"
  raise GGUFExportError(
      f"params/{path}: not part of a Llama-family param tree (expected embed/embedding, "
      "layers_N/{attn/{q,k,v,o}_proj,mlp/{gate,up,down}_proj}/kernel, layers_N/{input_norm,"
      "post_attn_norm}/scale, final_norm/scale, lm_head/kernel); only the 'llama' architecture "
      "is supported")


def _qk_perm(out: int, n_heads: int, name: str) -> np.ndarray:
  """Row order HF -> llama.cpp (interleaved RoPE pairs) of a Q/K weight with ``out`` rows."""
  if out % (2 * n_heads):
    raise GGUFExportError(f"{name}: {out} rows do not split into {n_heads} heads of even size")
  idx = np.arange(out)
  return idx.reshape(n_heads, 2, out // n_heads // 2).swapaxes(1, 2).reshape(out)


def _expected_shapes(hp: LlamaHParams) -> dict[str, tuple[int, ...]]:
  d, f = hp.hidden_size, hp.intermediate_size
  q, kv = hp.num_heads * hp.head_dim, hp.num_kv_heads * hp.head_dim
  return {"attn_q": (d, q), "attn_k": (d, kv), "attn_v": (d, kv), "attn_output": (q, d),
          "ffn_gate": (d, f), "ffn_up": (d, f), "ffn_down": (f, d), "attn_norm": (d,),
          "ffn_norm": (d,), "token_embd": (hp.vocab_size, d), "output_norm": (d,),
          "output": (d, hp.vocab_size)}


def _permute_rows(x: Any, perm: np.ndarray, block_axis: int) -> Any:
  """Applies a row (output-channel) permutation to a float array or QArray of either layout."""
  if not is_qarray(x):
    return np.take(np.asarray(x), perm, axis=1 - block_axis)
  out_axis = 1 - block_axis
  q = x
  if q.tile[out_axis] != 1:  # shared scales across rows: permutation within a tile is harmless
    if q.scale.shape[out_axis] != 1:
      raise GGUFExportError(f"QArray tile {q.tile} shares scales across output rows of the Q/K "
                            "projection; cannot permute rows exactly (use per-channel or group "
                            f"scales, or {REQUANTIZE_HINT})")
  v = np.take(_unpacked_np(q), perm, axis=out_axis)
  scale = q.scale if q.scale.shape[out_axis] == 1 else jnp.take(q.scale, perm, axis=out_axis)
  zp = q.zero_point
  if zp is not None and zp.shape[out_axis] != 1:
    zp = jnp.take(zp, perm, axis=out_axis)
  return dataclasses.replace(q, values=jnp.asarray(_pack_np(v, q.qtype)), scale=scale,
                             zero_point=zp)


def _file_type(t: GGMLType) -> int:
  if t is GGMLType.F32:
    return int(gguf.LlamaFileType.ALL_F32)
  if t is GGMLType.Q4_K:
    return int(gguf.LlamaFileType.MOSTLY_Q4_K_S)   # llama.cpp names K-quant mixes; pure Q4_K ~ S
  return int(gguf.LlamaFileType[f"MOSTLY_{t.name}"])


ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen2moe", "qwen3moe", "olmo2", "olmoe", "gemma",
                 "gemma2", "gemma3", "phi3")
_PLAIN = dict(qkv_bias=False, o_bias=False, mlp_bias=False, qk_norm=False, qk_norm_full=False,
              pre_norms=True, norm_offset=0.0,
              embed_scale=False, activation="silu", sandwich_norms=False, query_scale=None,
              attn_softcap=None, final_softcap=None, rope_scaling=None, sliding_window=None,
              sliding_layers=None, local_rope_theta=None, rotary_dim=None)


def arch_problems(config: Any, arch: str) -> list[str]:
  """Why llama.cpp's ``arch`` would run ``config`` differently (empty: it runs it as is).

  llama.cpp fixes per architecture what a ``DecoderConfig`` leaves open: which tensors exist,
  Gemma 2's sliding pattern (every other layer) and Gemma 3's (5 of 6), Gemma's query scale
  (``1/sqrt(head_dim)``, or ``1/sqrt(hidden/heads)`` for the 27B models), the local RoPE base
  (10000; Gemma 3's linear RoPE scaling applies to its global layers only, as in jq and
  transformers), and it has no sliding window for ``llama``.  Mixtures of experts: as
  ``jq.io.decoder_names.GGUF_MOE`` says (renormalized routing or not, a shared expert, the
  experts' width), experts in every layer.
  """
  if arch not in ARCHITECTURES:
    return [f"unknown architecture {arch!r} (choose one of {list(ARCHITECTURES)})"]
  if isinstance(config, Mapping):
    return [] if arch == "llama" else [f"a plain config mapping describes a llama model, not {arch}"]
  get = lambda k: getattr(config, k, _PLAIN[k])
  layers, heads, hd = int(config.num_layers), int(config.num_heads), int(config.head_dim)
  gemma = arch.startswith("gemma")
  want = {**_PLAIN, **decoder_names.GGUF_FEATURES.get(arch, {})}
  if arch == "qwen2moe":   # llama.cpp reads q/k/v biases when the file has them
    want["qkv_bias"] = get("qkv_bias")
  if arch in ("gemma2", "gemma3"):
    big = (arch, layers) in (("gemma2", 46), ("gemma3", 62))
    want["query_scale"] = (config.hidden_size / heads if big else hd) ** -0.5
    if arch == "gemma2":   # soft-capping values are written; gemma3 has none
      want.update(attn_softcap=get("attn_softcap"), final_softcap=get("final_softcap"))
    if get("sliding_window") is not None:
      pattern = 2 if arch == "gemma2" else 6
      want.update(sliding_window=get("sliding_window"),
                  sliding_layers=tuple(bool((i + 1) % pattern) for i in range(layers)))
    if arch == "gemma3":
      want["local_rope_theta"] = 10000.0 if get("sliding_window") is not None else None
      scaling = get("rope_scaling")   # linear on the global layers (Gemma 3 4B-27B: factor 8),
      if scaling is not None and scaling.kind == "linear":   # the local ones unscaled: as jq
        want["rope_scaling"] = scaling
  if arch == "phi3":   # partial rotary and LongRoPE's two factor sets (no window: llama.cpp's
    scaling = get("rope_scaling")   # phi3 ignores it)
    want.update(rotary_dim=get("rotary_dim"),
                rope_scaling=scaling if scaling is not None and scaling.kind == "longrope"
                else None)
  if arch == "llama":   # llama.cpp reads biases and RoPE scaling for llama; nothing else
    for k in ("qkv_bias", "o_bias", "mlp_bias", "rope_scaling"):
      want[k] = get(k)
    scaling = get("rope_scaling")
    if scaling is not None and scaling.kind in ("yarn", "longrope"):   # rope_freqs holds one set
      want["rope_scaling"] = None                                      # of factors, no scale
  out = _moe_problems(config, arch)
  if arch == "olmoe" and config.num_kv_heads != config.num_heads:   # its k_norm is n_embd wide
    out.append(f"num_kv_heads={config.num_kv_heads} (llama.cpp's olmoe: {heads}, no "
               "grouped-query attention)")
  for k, v in want.items():
    have = get(k)
    if k == "norm_offset" and gemma:
      continue   # either form: the exporter writes offset + w
    if k == "query_scale" and have is None:
      have = hd ** -0.5
    if k == "query_scale" and v is None:
      v = hd ** -0.5
    if k == "local_rope_theta" and have is None and v is not None:
      have = config.rope_theta
    if k == "sliding_layers" and have is None and get("sliding_window") is not None:
      have = tuple([True] * layers)
    same = (abs(have - v) <= 1e-6 * abs(v)) if isinstance(v, float) and have is not None else have == v
    if not same:
      out.append(f"{k}={have!r} (llama.cpp's {arch}: {v!r})")
  return out


def _moe_problems(config: Any, arch: str) -> list[str]:
  experts = int(getattr(config, "num_experts", 0) or 0)
  moe = decoder_names.GGUF_MOE.get(arch)
  if not experts:
    return [f"no mixture of experts (llama.cpp's {arch} is one)"] if moe and moe.always else []
  if moe is None:
    return [f"a mixture of experts (num_experts={experts}; llama.cpp's {arch} has none: write "
            f"one of {list(decoder_names.GGUF_MOE)})"]
  out = []
  if config.normalize_routing != moe.normalize:
    out.append(f"normalize_routing={config.normalize_routing} (llama.cpp's {arch}: "
               f"{moe.normalize})")
  if config.moe_layers is not None and not all(config.moe_layers):
    dense = [i for i, m in enumerate(config.moe_layers) if not m]
    out.append(f"plain MLPs in layers {dense} (llama.cpp's {arch}: experts in every layer)")
  if bool(config.shared_expert_size) != moe.shared:
    out.append(f"shared_expert_size={config.shared_expert_size} (llama.cpp's {arch}: "
               f"{'a gated shared expert' if moe.shared else 'none'})")
  if moe.ff_width and config.expert_size not in (None, config.intermediate_size):
    out.append(f"expert_size={config.expert_size} != intermediate_size="
               f"{config.intermediate_size} (llama.cpp's {arch}: experts of feed_forward_length)")
  return out


def _add_family_metadata(writer: gguf.GGUFWriter, config: Any, arch: str) -> None:
  if isinstance(config, Mapping):
    return
  if getattr(config, "num_experts", 0):
    writer.add_expert_count(int(config.num_experts))
    writer.add_expert_used_count(int(config.experts_per_token))
    writer.add_expert_feed_forward_length(int(config.expert_size or config.intermediate_size))
    if config.shared_expert_size:
      writer.add_expert_shared_feed_forward_length(int(config.shared_expert_size))
  if arch == "gemma2":
    if config.attn_softcap is not None:
      writer.add_attn_logit_softcapping(float(config.attn_softcap))
    if config.final_softcap is not None:
      writer.add_final_logit_softcapping(float(config.final_softcap))
  if arch in ("gemma2", "gemma3") and config.sliding_window is not None:
    writer.add_sliding_window(int(config.sliding_window))
  scaling = getattr(config, "rope_scaling", None)
  if scaling is not None and scaling.kind == "linear":
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(float(scaling.factor))
  if scaling is not None and scaling.kind == "longrope":   # (its factors: two tensors)
    writer.add_rope_scaling_attn_factors(float(scaling.attention_factor))
    writer.add_rope_scaling_orig_ctx_len(int(scaling.original_max_position_embeddings))


def _rope_freqs(config: Any, head_dim: int) -> np.ndarray | None:
  """llama.cpp's ``rope_freqs`` (per-frequency divisors) of a ``llama3`` / ``factors`` scaling."""
  scaling = getattr(config, "rope_scaling", None)
  if scaling is None or scaling.kind in ("linear", "longrope"):
    return None
  if scaling.kind == "factors":
    return np.asarray(scaling.factors, np.float32)
  base = rope_inv_freq(head_dim, float(config.rope_theta))
  return (base / rope_inv_freq(head_dim, float(config.rope_theta), scaling)).astype(np.float32)


def _qarray_default(leaf, main_type: GGMLType) -> GGMLType:
  """The type of a quantized ``token_embd`` / ``output`` without ``embed_type``: Q8_0 for 8-bit
  integer codes (an int8 head, ``jq.head_rule``; re-rounded only in its block scales), else the
  linears' type."""
  q = leaf.qtype
  return GGMLType.Q8_0 if q.bits == 8 and not q.is_float else main_type


def export_gguf(params: Any, config: Any, tokenizer_meta: Mapping[str, Any] | None,
                path: str | os.PathLike, ggml_type: GGMLType | str = "q8_0", *,
                embed_type: GGMLType | str | None = None,
                tensor_types: Mapping[str, GGMLType | str] | None = None,
                requantize: bool = False, name: str | None = None,
                extra_metadata: Mapping[str, Any] | None = None,
                notes: list[str] | None = None, arch: str = "llama",
                progress: bool = False) -> dict[str, GGMLType]:
  """Writes a Llama-family param tree (float and/or QArray leaves) as a llama.cpp GGUF.

  Tensor names and hyperparameters are those llama.cpp's ``llama`` architecture reads
  (``token_embd.weight``, ``blk.N.attn_q.weight`` ... ``output_norm.weight``); Q/K rows are put
  back in llama.cpp's interleaved RoPE order; kernels ``(in, out)`` are written as GGUF
  ``[in, out]`` (numpy ``(out, in)``).  Norms are always F32.  QArray leaves are stored without
  re-rounding when exact (see :func:`encode_tensor`); float leaves are quantized with gguf's
  reference.  The file is written to a temporary sibling and renamed into place.

  Args:
    params: ``{"params": {...}}`` or the inner dict, paths as in ``models/decoder.py``.
    config: ``LlamaConfig`` (or a mapping with its field names); see :class:`LlamaHParams`.
    tokenizer_meta: the ``tokenizer.*`` metadata to carry over (:func:`tokenizer_metadata` of the
      source GGUF): tokens, merges, token types, bos/eos ids, pre-tokenizer, chat template.
      ``None`` writes no tokenizer (llama.cpp then cannot tokenize).
    path: output ``.gguf``.
    ggml_type: type of the linear weights (``q8_0``, ``q4_0``, ``q4_1``, ``q5_0``, ``q5_1``,
      ``q4_k``, ``q6_k``, ``f16``, ``bf16``, ``f32``).  Like llama-quantize, a tensor whose rows
      are not a multiple of 256 falls back from Q4_K to Q5_0 and from Q6_K to Q8_0 (a line in
      ``notes`` says so per tensor).
    embed_type: type of ``token_embd`` (and ``output``). Default: a float leaf keeps its float
      type (F32 / F16 / BF16: the model the user quantized left it float), an 8-bit integer
      QArray leaf (an int8 head) is written as Q8_0, any other QArray leaf as ``ggml_type``.
    tensor_types: overrides, ``{regex on the GGUF tensor name: type}``; first match wins.
    requantize: re-round QArrays the chosen type cannot store exactly instead of raising.
    name: ``general.name``.
    extra_metadata: more key/values to write (e.g. ``general.*`` from the source file).
    notes: when given, one line per tensor whose grid changed (re-rounded, or a K-quant
      fallback), so every change to the model is reported by name.
    arch: the llama.cpp architecture to write: ``llama`` (Llama, Mistral, SmolLM2, and Mixtral's
      mixture of experts), ``qwen2``, ``qwen3``, ``qwen2moe``, ``qwen3moe``, ``olmo2``,
      ``olmoe``, ``gemma``, ``gemma2`` or ``gemma3``.  A mixture of experts is written as
      llama.cpp stores it: each layer's experts stacked into one ``ffn_{gate,up,down}_exps``
      tensor (one type for all of them), the float router ``ffn_gate_inp`` F32 and Qwen2-MoE's
      shared-expert gate one F32 vector.  The config's family features (a ``DecoderConfig``:
      biases, q/k norms, Gemma's norms and soft-capping, sliding layers, RoPE scaling, routing)
      must be ones that architecture runs as the config says; anything llama.cpp would compute
      differently is refused by name (see :func:`arch_problems`).
    progress: show a bar over the tensors while encoding.

  Returns:
    ``{GGUF tensor name: type written}``.

  Raises:
    GGUFExportError: unknown (non-Llama) parameters, shape mismatch with ``config``, an inexact
      QArray without ``requantize``, an unsupported type.

  Example:
    >>> meta, _ = load_gguf_qarrays(src)
    >>> export_gguf(params, config, tokenizer_metadata(meta), "out.gguf", "q4_0")
  """
  main_type = to_ggml_type(ggml_type)
  to_type = to_ggml_type
  if main_type not in EXPORT_TYPES:
    raise GGUFExportError(f"cannot write GGUF {main_type.name}; choose one of "
                          f"{[x.name.lower() for x in EXPORT_TYPES]}")
  emb_type = None if embed_type is None else to_type(embed_type)
  if emb_type is not None and emb_type not in EXPORT_TYPES:   # (not only where its blocks fit)
    raise GGUFExportError(f"cannot write GGUF {emb_type.name} (embed_type); choose one of "
                          f"{[x.name.lower() for x in EXPORT_TYPES]}")
  overrides = [(re.compile(p), to_type(v)) for p, v in (tensor_types or {}).items()]
  hp = LlamaHParams.from_config(config)
  problems = arch_problems(config, arch)
  if problems:
    raise GGUFExportError(f"GGUF architecture {arch!r} cannot hold this model as configured: "
                          + "; ".join(problems))
  tree = params["params"] if isinstance(params, Mapping) and set(params) == {"params"} else params
  leaves = leaves_with_paths(tree)
  if not leaves:
    raise GGUFExportError("params is empty")
  family = config if not isinstance(config, Mapping) else hp
  if hasattr(family, "fused_projections"):   # (the architecture's naming, whatever the source's)
    family = dataclasses.replace(family, fused_projections=arch in decoder_names.GGUF_FUSED)
  names = {t.jq: t for t in decoder_names.decoder_tensors(family)}
  entries: list[tuple[decoder_names.TensorName, Any, str, str]] = []
  for p, leaf in leaves:
    t = names.get(p)
    if t is None:
      raise GGUFExportError(
          f"params/{p}: not a tensor of this {arch} decoder (expected embed/embedding, "
          "layers_N/{attn/{q,k,v,o}_proj,mlp/{gate,up,down}_proj}/kernel, layers_N/{input_norm,"
          "post_attn_norm}/scale, final_norm/scale, lm_head/kernel and the config's family "
          "tensors)")
    want = decoder_names.expected_shape(t.path, family)
    if tuple(leaf.shape) != want:
      raise GGUFExportError(f"params/{p}: shape {tuple(leaf.shape)} does not match the config "
                            f"(expected {want} for {t.gguf})")
    kind = ("embed" if t.path[-1] == "embedding" else "norm" if t.path[-1] in ("scale", "bias")
            else "kernel")
    entries.append((t, leaf, kind, p))
  seen = {p for _, _, _, p in entries}
  missing = [t.gguf for t in names.values() if t.jq not in seen]
  if missing:
    raise GGUFExportError(f"params lacks {len(missing)} tensors of a {hp.num_layers}-layer {arch} "
                          f"model, e.g. {missing[:3]}")
  try:   # (phi3: q/k/v into one attn_qkv, gate/up into one ffn_up)
    kinds = {p: kind for _, _, kind, p in entries}
    entries = [(t, leaf, kinds[paths[0]], paths[0]) for t, paths, leaf in fuse_leaves(
        [(t, p, leaf if t.rows is None else load_leaf(leaf)) for t, leaf, _, p in entries],
        lambda t: t.gguf)]
  except ValueError as e:
    raise GGUFExportError(str(e)) from e
  tok = dict(tokenizer_meta or {})
  bad = [k for k in tok if not k.startswith("tokenizer.")]
  if bad:
    raise GGUFExportError(f"tokenizer_meta keys must start with 'tokenizer.', got {bad[:3]}")
  if "tokenizer.ggml.tokens" in tok and len(tok["tokenizer.ggml.tokens"]) != hp.vocab_size:
    raise GGUFExportError(f"tokenizer has {len(tok['tokenizer.ggml.tokens'])} tokens but "
                          f"vocab_size={hp.vocab_size}")

  # Each tensor is encoded, handed to the writer's temporary file (beside the output) and dropped:
  # the export holds one tensor at a time (a layer's experts until they are stacked) beside ``params``, whose
  # leaves may be read here one by one (jq.io.load(path, lazy=True): nothing held at all).
  experts: dict[str, list[tuple[int, np.ndarray, GGMLType, str]]] = {}
  n_experts: dict[str, int] = {}
  for tn, _, _, _ in entries:
    if tn.expert is not None:
      n_experts[tn.gguf] = n_experts.get(tn.gguf, 0) + 1
  written: dict[str, GGMLType] = {}
  path = Path(path)
  if not path.parent.is_dir():
    raise FileNotFoundError(f"cannot write {path}: directory {path.parent} does not exist")
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.jq-tmp-", dir=path.parent)
  os.close(fd)
  writer = None
  try:
    writer = gguf.GGUFWriter(tmp, arch, use_temp_file=True)
    # (its tensors wait in a file beside the output, not in gguf-py's 256 MB in-memory spool)
    writer.temp_file = tempfile.TemporaryFile(  # pylint: disable=consider-using-with
        dir=path.parent)
    writer.add_name(name or "jq export")
    writer.add_string("general.quantized_by", "jq")
    writer.add_context_length(int(hp.max_seq_len))
    writer.add_embedding_length(int(hp.hidden_size))
    writer.add_block_count(int(hp.num_layers))
    writer.add_feed_forward_length(int(hp.intermediate_size))
    writer.add_head_count(int(hp.num_heads))
    writer.add_head_count_kv(int(hp.num_kv_heads))
    writer.add_rope_dimension_count(int(getattr(config, "rotary_dim", None) or hp.head_dim))
    writer.add_rope_freq_base(float(hp.rope_theta))
    writer.add_layer_norm_rms_eps(float(hp.rms_norm_eps))
    writer.add_vocab_size(int(hp.vocab_size))
    if hp.head_dim * hp.num_heads != hp.hidden_size or arch != "llama":
      writer.add_key_length(int(hp.head_dim))
      writer.add_value_length(int(hp.head_dim))
    _add_family_metadata(writer, config, arch)
    writer.add_file_type(_file_type(main_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for k, v in (extra_metadata or {}).items():
      _add_kv(writer, k, v)
    for k, v in tok.items():
      _add_kv(writer, k, v)
    freqs = _rope_freqs(config, int(hp.head_dim))
    if freqs is not None:   # llama.cpp's form of Llama 3.1's RoPE scaling
      writer.add_tensor("rope_freqs.weight", freqs)
    scaling = getattr(config, "rope_scaling", None)
    if scaling is not None and scaling.kind == "longrope":
      writer.add_tensor("rope_factors_long.weight", np.asarray(scaling.long_factors, np.float32))
      writer.add_tensor("rope_factors_short.weight",
                        np.asarray(scaling.short_factors, np.float32))
    if progress:
      from tqdm.auto import tqdm
      entries = tqdm(entries, desc="encoding", unit="tensor", leave=False)
    for tn, leaf, kind, p in entries:
      leaf = load_leaf(leaf)   # (a lazily loaded checkpoint's leaf: read now, dropped after)
      gname = tn.gguf
      shexp_gate = gname.endswith(".ffn_gate_inp_shexp.weight")
      if shexp_gate:     # llama.cpp's is one F32 vector (n_embd): its exact values, float
        leaf = dequantize(leaf, jnp.float32) if is_qarray(leaf) else leaf
      if kind == "norm" or shexp_gate or (gname.endswith(".ffn_gate_inp.weight")
                                          and not is_qarray(leaf)):
        t = GGMLType.F32   # norms; a float MoE router (llama-quantize keeps routers F32 too)
      else:
        t = main_type
        if kind == "embed" or gname == "output.weight":
          t = emb_type if emb_type is not None else (
              _qarray_default(leaf, main_type) if is_qarray(leaf)
              else _FLOAT_OF.get(np.dtype(leaf.dtype), GGMLType.F32))
        for rx, ot in overrides:
          if rx.search(gname):
            t = ot
            break
      x, block_axis = leaf, (1 if kind == "embed" else 0)
      t = _fitting_type(t, leaf, block_axis if kind != "norm" else 0, f"params/{p} ({gname})",
                        requantize, notes)
      if arch == "llama" and (".attn_q." in gname or ".attn_k." in gname):
        heads = hp.num_heads if ".attn_q." in gname else hp.num_kv_heads
        if kind == "norm":   # a q/k bias: the same row order as its weight
          x = np.asarray(x)[_qk_perm(leaf.shape[0], heads, f"params/{p}")]
        else:
          x = _permute_rows(x, _qk_perm(leaf.shape[1], heads, f"params/{p}"), block_axis)
      offset = float(getattr(config, "norm_offset", 0.0) or 0.0)
      if offset and gname.endswith("norm.weight"):   # llama.cpp stores Gemma's norms as 1 + w
        x = np.asarray(x, np.float32) + np.float32(offset)
      data = encode_tensor(x, t, block_axis=block_axis if kind != "norm" else 0,
                           requantize=requantize, name=f"params/{p}", notes=notes)
      if shexp_gate:
        data = data.reshape(-1)
      if tn.expert is None:
        writer.add_tensor(gname, data, raw_dtype=_raw_type(t))
      else:   # a layer's experts: stacked once the last one is encoded
        parts = experts.setdefault(gname, [])
        parts.append((tn.expert, data, t, p))
        if len(parts) == n_experts[gname]:
          writer.add_tensor(gname, _stack_experts(gname, experts.pop(gname)),
                            raw_dtype=_raw_type(t))
      written[gname] = t
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    if writer is not None:
      writer.close()
      if writer.temp_file is not None:
        writer.temp_file.close()
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return written


def _raw_type(t: GGMLType) -> GGMLType | None:
  """``GGUFWriter.add_tensor``'s ``raw_dtype``: None for F32/F16 (numpy's own dtypes)."""
  return None if t in (GGMLType.F32, GGMLType.F16) else t


def _stack_experts(gname: str, parts: list[tuple[int, np.ndarray, GGMLType, str]]) -> np.ndarray:
  """llama.cpp's stacked expert tensor (numpy ``(E, out, row bytes)``) from each expert's encoding;
  every expert must have been written with the same type."""
  parts = sorted(parts, key=lambda part: part[0])
  types = {t for _, _, t, _ in parts}
  if len(types) > 1:
    by_type = {t.name: next(p for _, _, u, p in parts if u is t) for t in types}
    raise GGUFExportError(f"{gname}: the experts stacked in it would get different types "
                          f"({by_type}); llama.cpp stores one type per stacked tensor: give "
                          "them one type (tensor_types / the rules)")
  return np.stack([data for _, data, _, _ in parts])


def _fitting_type(t: GGMLType, leaf: Any, block_axis: int, name: str, requantize: bool,
                  notes: list[str] | None) -> GGMLType:
  """``t``, or what llama-quantize falls back to for rows its blocks do not divide: a K-quant
  (256) to Q5_0 / Q8_0, and a 32-block type to F16.  jq goes on to F16 for a 32-block type
  asked for directly too (llama-quantize stops there), and to F32 for a QArray whose values F16
  cannot hold exactly (unless ``requantize``); every fallback is noted by name."""
  if t not in EXPORT_TYPES:   # (encode_tensor names it)
    return t
  n = leaf.shape[block_axis] if leaf.ndim == 2 else None
  chosen = t
  if n is not None and chosen in _K_FALLBACK and n % QK_K:
    chosen = _K_FALLBACK[chosen]
  if n is not None and n % gguf.GGML_QUANT_SIZES[chosen][0]:
    chosen = GGMLType.F16
    if is_qarray(leaf) and not requantize:
      deq = _dequantize_np(leaf)
      if not np.array_equal(deq.astype(np.float16).astype(np.float32), deq):
        chosen = GGMLType.F32
  if chosen is not t and notes is not None:
    notes.append(f"{name}: {n} input columns are not a multiple of "
                 f"{gguf.GGML_QUANT_SIZES[t][0]}, so {t.name} falls back to {chosen.name}"
                 + (" (as llama-quantize does)" if chosen is _K_FALLBACK.get(t) else ""))
  return chosen


def export_model(model: Any, params: Any, path: str | os.PathLike, *,
                 ggml_type: GGMLType | str = "q8_0", requantize: bool = False,
                 tokenizer_meta: Mapping[str, Any] | None = None,
                 source_gguf: str | os.PathLike | None = None, **kwargs: Any) -> dict[str, GGMLType]:
  """:func:`export_gguf` for an app-level model object (anything with a ``.config``).

  The tokenizer is carried over from ``tokenizer_meta``, else from the ``tokenizer.*`` metadata of
  ``source_gguf``, else of ``model.gguf_path`` if the model has one.  ``kwargs`` go to
  :func:`export_gguf` (``embed_type``, ``tensor_types``, ``name``, ...).

  Raises:
    GGUFExportError: no tokenizer source was given (a GGUF without one does not run in llama.cpp).
  """
  if tokenizer_meta is None:
    source = source_gguf if source_gguf is not None else getattr(model, "gguf_path", None)
    if source is None:
      raise GGUFExportError(
          "export_model: pass tokenizer_meta=tokenizer_metadata(<source .gguf>) or "
          "source_gguf=<the model's original .gguf> so the tokenizer (tokens, merges, "
          "pre-tokenizer, special ids) can be carried over")
    tokenizer_meta = tokenizer_metadata(source)
  return export_gguf(params, model.config, tokenizer_meta, path, ggml_type,
                     requantize=requantize, **kwargs)


def gguf_to_params(tensors: Mapping[str, QArray | np.ndarray], metadata: Mapping[str, Any]
                   ) -> tuple[LlamaHParams, dict[str, Any]]:
  """``(hparams, params)``: a llama GGUF's tensors as the jq param tree of ``models/decoder.py``.

  Kernels become ``(in, out)`` (QArrays transposed exactly: tile ``(32, 1)``), Q/K rows are put in
  Hugging Face order, ``tie_embeddings`` is False when the file has ``output.weight``.  The
  ``params`` dict is the inner one (wrap as ``{"params": params}`` for ``model.apply``).
  """
  hp = LlamaHParams.from_metadata(metadata)
  if "token_embd.weight" not in tensors:
    raise GGUFFormatError("GGUF has no token_embd.weight tensor")
  vocab = tensors["token_embd.weight"].shape[0]
  hp = dataclasses.replace(hp, vocab_size=vocab if hp.vocab_size < 0 else hp.vocab_size,
                           tie_embeddings="output.weight" not in tensors)
  shapes = _expected_shapes(hp)
  inv_globals = {v: k for k, v in _GLOBALS.items()}
  inv_block = {v: k for k, v in {**_BLOCK_KERNELS, **_BLOCK_NORMS}.items()}
  params: dict[str, Any] = {}
  for gname, x in tensors.items():
    if gname == "rope_freqs.weight":
      continue   # Llama 3.1's RoPE scaling: the config's (gguf_weights.read_config reads it)
    base = gname.removesuffix(".weight")
    if base in inv_globals:
      path, kind = inv_globals[base], base
    elif (m := re.fullmatch(r"blk\.(\d+)\.(\w+)", base)) and m.group(2) in inv_block:
      if int(m.group(1)) >= hp.num_layers:
        raise GGUFFormatError(f"GGUF tensor {gname}: layer >= block_count={hp.num_layers}")
      path, kind = f"layers_{int(m.group(1))}/{inv_block[m.group(2)]}", m.group(2)
    else:
      raise GGUFFormatError(f"GGUF tensor {gname!r} is not part of a llama model")
    if kind in ("attn_q", "attn_k"):
      heads = hp.num_heads if kind == "attn_q" else hp.num_kv_heads
      perm = _qk_perm(x.shape[0], heads, gname)
      x = _permute_rows(x, np.argsort(perm), 1)
    if path.endswith("kernel"):
      x = _transpose(x)
    if tuple(x.shape) != shapes[kind]:
      raise GGUFFormatError(f"GGUF tensor {gname} -> params/{path}: shape {tuple(x.shape)}, "
                            f"expected {shapes[kind]} from the metadata")
    node = params
    parts = path.split("/")
    for k in parts[:-1]:
      node = node.setdefault(k, {})
    node[parts[-1]] = x if is_qarray(x) else jnp.asarray(x)
  return hp, params


def _transpose(x: Any) -> Any:
  if not is_qarray(x):
    return np.ascontiguousarray(np.asarray(x).T)
  v = _unpacked_np(x).T
  return QArray(values=jnp.asarray(_pack_np(v, x.qtype)), scale=x.scale.T,
                zero_point=None if x.zero_point is None else x.zero_point.T,
                activation=x.activation, qtype=x.qtype, shape=tuple(x.shape[::-1]),
                tile=tuple(x.tile[::-1]))


def load_gguf_params(path: str | os.PathLike) -> tuple[LlamaHParams, dict[str, Any], dict[str, Any]]:
  """``(hparams, params, metadata)`` of a llama GGUF, quantized tensors as exact jq QArrays."""
  meta, tensors = load_gguf_qarrays(path)
  hp, params = gguf_to_params(tensors, meta)
  return hp, params, meta
