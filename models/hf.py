"""Hugging Face-format checkpoints of the major decoder families, read into ``jq_models.decoder``.

A checkpoint directory holds ``config.json``, the weights (``model.safetensors`` or shards listed in
``model.safetensors.index.json``), and usually ``tokenizer.json`` + ``tokenizer_config.json`` (with
its ``chat_template``) and ``generation_config.json``. Supported ``model_type`` values: ``llama``
(1-3.x, incl. ``rope_scaling`` type ``llama3``; ``yarn`` in any family), ``mistral``, ``qwen2``
(q/k/v biases), ``qwen3`` (q/k norms), ``gemma``, ``gemma2`` (soft-capping, sandwich norms, sliding
layers), ``gemma3_text`` (q/k norms, local RoPE base), ``olmo2`` (norms on the attention's and MLP's
outputs only, q/k norms over the whole projection), ``olmo3`` (``olmo2`` with sliding layers),
``phi3`` (Phi-3/3.5/4: fused ``qkv_proj`` / ``gate_up_proj``, LongRoPE, partial rotary) and
the mixtures of experts ``mixtral``, ``qwen2_moe`` (with its shared expert), ``qwen3_moe`` and
``olmoe`` (q/k norms as ``olmo2``'s). ``family_config`` turns ``config.json`` into a
``DecoderConfig``; tensor names come from the one mapping, ``jq.io.decoder_names``.

Weights are read lazily, one tensor at a time (or one row range: ``stream_sources``, the input of
``jq.stream``), with plain reads (no memory map, so nothing read stays resident); every file's
header and every tensor's shape is checked against the config before it is read, and bfloat16 stays
bfloat16.

Example::

  config, params = load_weights("path/to/Qwen2.5-0.5B")
  logits = jq_models.decoder.Decoder(config).apply({"params": params}, tokens)
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jq.io import decoder_names
from jq_models.decoder import DecoderConfig, RopeScaling

FAMILIES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "olmo2",
            "olmo3", "olmoe", "phi3", "gemma", "gemma2", "gemma3_text")
_QWEN = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")
_GEMMA = ("gemma", "gemma2", "gemma3_text")
_FLOAT_DTYPES = ("float32", "bfloat16", "float16")


class CheckpointError(ValueError):
  """A Hugging Face checkpoint jq cannot read; the message names the file and the field."""


def is_checkpoint_dir(path: str | Path) -> bool:
  return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def read_json(path: Path) -> dict[str, Any]:
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except FileNotFoundError:
    raise
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: not readable JSON ({e})") from e
  if not isinstance(data, dict):
    raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
  return data


# ------------------------------------------------------------------------------------------------
# config.json -> DecoderConfig


def _rope(raw: Mapping[str, Any], where: str, default_theta: float, rotary_dim: int = 0
          ) -> tuple[float, RopeScaling | None]:
  """``(theta, scaling)`` from a ``rope_parameters`` dict (transformers 5) or the older
  ``rope_theta`` + ``rope_scaling`` pair (``rotary_dim``: the rotated width LongRoPE's factors
  must match)."""
  params = raw.get("rope_parameters")
  if isinstance(params, Mapping) and "rope_theta" in params:
    theta, scaling = params["rope_theta"], params
  else:
    theta, scaling = raw.get("rope_theta", default_theta), raw.get("rope_scaling")
  if scaling is None:
    return float(theta), None
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind in ("su", "yarn") and raw.get("model_type") == "phi3":   # Phi-3's older names
    kind = "longrope"
  if kind == "default":
    return float(theta), None
  try:
    if kind == "linear":
      return float(theta), RopeScaling(kind="linear", factor=float(scaling["factor"]))
    if kind == "llama3":
      return float(theta), RopeScaling(
          kind="llama3", factor=float(scaling["factor"]),
          low_freq_factor=float(scaling["low_freq_factor"]),
          high_freq_factor=float(scaling["high_freq_factor"]),
          original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))
    if kind == "yarn":
      return float(theta), _yarn(raw, scaling)
    if kind == "longrope":
      return float(theta), _longrope(raw, scaling, rotary_dim)
  except KeyError as e:
    raise CheckpointError(f"{where}: rope scaling {kind!r} lacks field {e.args[0]!r}") from e
  except ValueError as e:
    raise CheckpointError(f"{where}: rope scaling {kind!r}: {e}") from e
  raise CheckpointError(f"{where}: rope scaling type {kind!r} is not supported (supported: "
                        "default, linear, llama3, yarn, longrope)")


def _longrope(raw: Mapping[str, Any], scaling: Mapping[str, Any], rotary_dim: int
              ) -> RopeScaling:
  """LongRoPE's fields as transformers reads them: the pretraining context from the config's own
  ``original_max_position_embeddings`` first (Phi-3's; its default 4096), else the scaling's,
  else ``max_position_embeddings``; the attention factor given, else ``sqrt(1 + ln(factor) /
  ln(context))`` with ``factor`` given, else the ratio of the two contexts."""
  phi3 = raw.get("model_type") == "phi3"
  old = int(raw.get("original_max_position_embeddings")
            or scaling.get("original_max_position_embeddings")
            or (4096 if phi3 else raw["max_position_embeddings"]))
  factor = scaling.get("factor")
  factor = float(raw.get("max_position_embeddings", 4096) / old if factor is None else factor)
  attention = scaling.get("attention_factor")
  if attention is None:
    attention = math.sqrt(1 + math.log(factor) / math.log(old)) if factor > 1 else 1.0
  short, long = (tuple(scaling[k]) for k in ("short_factor", "long_factor"))
  if len(short) != rotary_dim // 2 or len(long) != rotary_dim // 2:
    raise ValueError(f"{len(short)} short_factor and {len(long)} long_factor entries; the "
                     f"rotated width {rotary_dim} needs {rotary_dim // 2} each")
  return RopeScaling(kind="longrope", factor=factor, original_max_position_embeddings=old,
                     attention_factor=float(attention), short_factors=short, long_factors=long)


def _yarn(raw: Mapping[str, Any], scaling: Mapping[str, Any]) -> RopeScaling:
  """YaRN's fields as transformers reads them: the pretraining context from the config's own
  ``original_max_position_embeddings`` first (else the scaling's, else
  ``max_position_embeddings``), ``factor`` (else the ratio of the two contexts), the attention
  factor given, else from ``mscale`` / ``mscale_all_dim``, else ``0.1 ln(factor) + 1``."""
  old = int(raw.get("original_max_position_embeddings")
            or scaling.get("original_max_position_embeddings")
            or raw["max_position_embeddings"])
  factor = scaling.get("factor")
  factor = float(raw["max_position_embeddings"] / old if factor is None else factor)

  def mscale(m: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

  attention = scaling.get("attention_factor")
  if attention is None:
    m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    attention = mscale(m) / mscale(m_all) if m and m_all else mscale()
  return RopeScaling(kind="yarn", factor=factor, original_max_position_embeddings=old,
                     beta_fast=float(scaling.get("beta_fast") or 32),
                     beta_slow=float(scaling.get("beta_slow") or 1),
                     attention_factor=float(attention),
                     truncate=bool(scaling.get("truncate", True)))


def _moe(raw: Mapping[str, Any], family: str, layers: int, where: str) -> dict[str, Any]:
  """The ``DecoderConfig`` fields of a mixture-of-experts family's ``config.json``."""
  experts = raw.get("num_local_experts") or raw.get("num_experts")
  k = raw.get("num_experts_per_tok")
  if not experts or not k:
    raise CheckpointError(f"{where}: {family} needs num_local_experts (or num_experts) and "
                          "num_experts_per_tok")
  if family == "mixtral":
    return dict(num_experts=int(experts), experts_per_token=int(k), moe_names="mixtral")
  if family == "olmoe":   # experts of intermediate_size in every layer, Qwen's names
    return dict(num_experts=int(experts), experts_per_token=int(k), moe_names="qwen",
                normalize_routing=bool(raw.get("norm_topk_prob", False)))
  step = int(raw.get("decoder_sparse_step", 1) or 1)
  dense = set(raw.get("mlp_only_layers") or ())
  moe = tuple(i not in dense and (i + 1) % step == 0 for i in range(layers))
  if raw.get("moe_intermediate_size") is None:
    raise CheckpointError(f"{where}: field 'moe_intermediate_size' is missing")
  shared = int(raw.get("shared_expert_intermediate_size") or 0) if family == "qwen2_moe" else 0
  return dict(num_experts=int(experts), experts_per_token=int(k),
              expert_size=int(raw["moe_intermediate_size"]),
              normalize_routing=bool(raw.get("norm_topk_prob", False)),
              moe_layers=None if all(moe) else moe, shared_expert_size=shared, moe_names="qwen")


def family_config(raw: Mapping[str, Any], *, where: str = "config.json",
                  dtype: Any = np.float32) -> DecoderConfig:
  """The ``DecoderConfig`` of a Hugging Face ``config.json`` (already parsed).

  Raises:
    CheckpointError: unsupported ``model_type``/``architectures``, a missing field, or a feature
      this decoder lacks; the message names ``where`` and the field.
  """
  family = raw.get("model_type")
  if family not in FAMILIES:
    arch = raw.get("architectures")
    raise CheckpointError(f"{where}: model_type {family!r} (architectures {arch}) is not "
                          f"supported; supported: {', '.join(FAMILIES)}")

  def need(key: str) -> Any:
    if raw.get(key) is None:
      raise CheckpointError(f"{where}: field {key!r} is missing")
    return raw[key]

  heads = int(need("num_attention_heads"))
  hidden = int(need("hidden_size"))
  layers = int(need("num_hidden_layers"))
  gemma = family in _GEMMA
  kw: dict[str, Any] = {}
  if family in ("llama", "qwen3", "qwen3_moe", "olmo2", "olmo3", "olmoe") or gemma:  # (not Mistral)
    bias = bool(raw.get("attention_bias", False))
    kw.update(qkv_bias=bias, o_bias=bias)
  if family == "llama":
    kw["mlp_bias"] = bool(raw.get("mlp_bias", False))
  if family == "qwen2":
    kw["qkv_bias"] = True
  if family == "qwen2_moe":
    kw["qkv_bias"] = bool(raw.get("qkv_bias", True))
  if family in ("qwen3", "qwen3_moe", "gemma3_text"):
    kw["qk_norm"] = True
  if family in ("olmo2", "olmo3"):   # norms on the attention's and MLP's outputs only
    kw.update(pre_norms=False, sandwich_norms=True)
  if family in ("olmo2", "olmo3", "olmoe"):
    kw.update(qk_norm=True, qk_norm_full=True)
    if raw.get("clip_qkv") is not None:
      raise CheckpointError(f"{where}: clip_qkv={raw['clip_qkv']} is not supported (q/k/v "
                            "clamping)")
  if family in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
    kw.update(_moe(raw, family, layers, where))
  if family == "phi3":   # q/k/v stored as one qkv_proj, gate/up as one gate_up_proj
    kw["fused_projections"] = True
  if gemma:
    act = raw.get("hidden_activation") or raw.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu"):  # Gemma's legacy "gelu" means the tanh form
      raise CheckpointError(f"{where}: hidden_activation {act!r} is not supported for {family}")
    kw.update(norm_offset=1.0, embed_scale=True, activation="gelu_tanh")
  else:
    act = raw.get("hidden_act", "silu")
    if act != "silu":
      raise CheckpointError(f"{where}: hidden_act {act!r} is not supported (only silu)")
  if family in ("gemma2", "gemma3_text"):
    kw["sandwich_norms"] = True
    kw["query_scale"] = float(raw.get("query_pre_attn_scalar") or 256) ** -0.5
    kw["attn_softcap"] = raw.get("attn_logit_softcapping")
    kw["final_softcap"] = raw.get("final_logit_softcapping")
    if family == "gemma3_text" and kw["attn_softcap"] is not None:
      # transformers' Gemma 3 keeps the field but never passes it to its attention (Gemma 3
      # has q/k norms instead), so the checkpoint's function has no attention soft-capping
      import warnings  # pylint: disable=import-outside-toplevel
      warnings.warn(f"{where}: attn_logit_softcapping={kw['attn_softcap']} is ignored for "
                    "gemma3_text, as transformers' Gemma 3 ignores it", stacklevel=2)
      kw["attn_softcap"] = None

  # sliding-window layers
  window = raw.get("sliding_window", 4096 if family == "olmo3" else None)
  if family in _QWEN and not raw.get("use_sliding_window", False):
    window = None
  if family in ("qwen2_moe", "qwen3_moe") and window is not None:
    raise CheckpointError(f"{where}: use_sliding_window is not supported for {family}")
  types = raw.get("layer_types")
  if window is not None:
    if types is None and family == "gemma2":
      types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
    elif types is None and family == "gemma3_text":
      pattern = int(raw.get("sliding_window_pattern", 6))
      types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
               for i in range(layers)]
    elif types is None and family == "olmo3":   # every fourth layer is global
      types = ["sliding_attention" if (i + 1) % 4 else "full_attention" for i in range(layers)]
    elif types is None and family in ("qwen2", "qwen3"):
      first = int(raw.get("max_window_layers", 28))
      types = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    if types is not None:
      if len(types) != layers or not set(types) <= {"sliding_attention", "full_attention"}:
        raise CheckpointError(f"{where}: layer_types must list 'sliding_attention' or "
                              f"'full_attention' for each of the {layers} layers")
      kw["sliding_layers"] = tuple(t == "sliding_attention" for t in types)
    kw["sliding_window"] = int(window)

  # RoPE (gemma3, olmo3: a per-layer-type dict; else gemma3's rope_local_base_freq for the
  # sliding layers, and olmo3's rope_scaling on the full-attention layers only)
  theta_default = 1_000_000.0 if family == "gemma3_text" else 10_000.0
  head_dim = int(raw.get("head_dim") or hidden // heads)
  params = raw.get("rope_parameters") if isinstance(raw.get("rope_parameters"), Mapping) else {}
  partial = float(params.get("partial_rotary_factor") or raw.get("partial_rotary_factor")
                  or 1.0)
  rotary_dim = int(head_dim * partial)
  if partial != 1.0 and family != "phi3":
    raise CheckpointError(f"{where}: partial_rotary_factor={partial} is not supported for "
                          f"{family} (only phi3)")
  if rotary_dim != head_dim:
    kw["rotary_dim"] = rotary_dim
  per_type = raw.get("rope_parameters")
  per_layer_type = family in ("gemma3_text", "olmo3")
  if per_layer_type and isinstance(per_type, Mapping) and "full_attention" in per_type:
    contexts = {k: raw[k] for k in ("max_position_embeddings", "original_max_position_embeddings")
                if k in raw}   # (YaRN's)
    theta, scaling = _rope({**contexts, "rope_parameters": per_type["full_attention"]}, where,
                           theta_default, rotary_dim)
    local, local_scaling = _rope({**contexts, "rope_parameters": per_type.get("sliding_attention")
                                  or {}}, where, 10_000.0 if family == "gemma3_text" else theta)
    if local_scaling is not None:
      raise CheckpointError(f"{where}: rope scaling on sliding layers is not supported")
  else:
    theta, scaling = _rope(raw, where, theta_default, rotary_dim)
    local = float(raw.get("rope_local_base_freq", 10_000.0)) if family == "gemma3_text" else theta
  if per_layer_type:
    kw["local_rope_theta"] = local

  tie_default = gemma
  try:
    return DecoderConfig(
        vocab_size=int(need("vocab_size")), hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")), num_layers=layers, num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=head_dim, rope_theta=theta, rope_scaling=scaling,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5 if family == "phi3" else 1e-6)),
        max_seq_len=int(raw.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(raw.get("tie_word_embeddings", tie_default)), dtype=dtype, **kw)
  except CheckpointError:   # (need()'s, which names ``where`` already)
    raise
  except ValueError as e:
    raise CheckpointError(f"{where}: {e}") from e


# ------------------------------------------------------------------------------------------------
# tensor names


def hf_tensors(config: DecoderConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
  """Hugging Face tensor name -> ``(jq param path, Hugging Face shape)`` for every tensor the
  config needs (from the one mapping, ``jq.io.decoder_names``; a fused tensor names the path of
  its first part and has its parts' rows together)."""
  out = {}
  for t in decoder_names.decoder_tensors(config):
    shape = expected_shape(t.path, config)
    shape = shape[::-1] if t.transpose else shape
    out.setdefault(t.hf, (t.path, shape if t.rows is None else (t.fused_rows, *shape[1:])))
  return out


expected_shape = decoder_names.expected_shape


# ------------------------------------------------------------------------------------------------
# weights


def weight_files(directory: Path) -> dict[str, Path]:
  """Tensor name -> the safetensors file that holds it (single file or sharded index)."""
  index = directory / "model.safetensors.index.json"
  if index.is_file():
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise CheckpointError(f"{index}: field 'weight_map' is missing or empty")
    out = {}
    root = directory.resolve()
    for name, shard in weight_map.items():
      path = (directory / str(shard)).resolve()
      if root not in path.parents:
        raise CheckpointError(f"{index}: weight_map[{name!r}] = {shard!r} points outside "
                              f"{directory}")
      if not path.is_file():
        raise CheckpointError(f"{index}: shard {shard!r} (holding {name!r}) is missing")
      out[name] = path
    return out
  single = directory / "model.safetensors"
  if not single.is_file():
    raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json")
  return {k: single for k in _file_tensors(single)[0]}


def _file_tensors(file: Path) -> tuple[dict[str, Any], int]:
  """``({name: TensorInfo}, data start)`` of one safetensors file, checked (jq's reader: sizes,
  offsets, truncation), reading no tensor data."""
  from jq.io import safetensors_io
  try:
    with open(file, "rb") as f:
      infos, _, start = safetensors_io._read_header(f, str(file))  # pylint: disable=protected-access
  except (safetensors_io.CheckpointError, OSError) as e:
    raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from e
  return infos, start


def _reader(file: Path, info: Any, start: int, name: str, transpose: bool,
            rows: tuple[int, int] | None = None):
  """``read(a, b)``: columns ``[a, b)`` of the jq-layout tensor (rows of a transposed Hugging Face
  weight, read alone with one ``pread``: no memory map, so nothing stays resident). ``rows``: the
  jq tensor is these rows of the (fused) Hugging Face one."""
  shape, dt = info.shape, info.dtype
  row = int(np.prod(shape[1:], dtype=np.int64)) * dt.itemsize
  first = 0 if rows is None else rows[0]
  if rows is not None:
    shape = (rows[1] - rows[0], *shape[1:])

  def pread(begin: int, n: int) -> np.ndarray:
    buf = np.empty(n, np.uint8)
    with open(file, "rb") as f:
      f.seek(start + info.begin + begin)
      got = f.readinto(buf)
    if got != n:
      raise CheckpointError(f"{file}: tensor {name!r} (shape {shape} dtype {dt}): read {got} of "
                            f"{n} bytes; the file is truncated")
    return buf.view(dt)

  def read(a: int, b: int) -> np.ndarray:
    if transpose:   # Hugging Face (out, in): jq's columns are its rows
      return pread((first + a) * row, (b - a) * row).reshape(b - a, *shape[1:]).T
    whole = pread(first * row, int(np.prod(shape, dtype=np.int64)) * dt.itemsize).reshape(shape)
    return whole if not shape or (a, b) == (0, shape[-1]) else whole[..., a:b]

  return read


def stream_sources(directory: str | Path, config: DecoderConfig) -> list[Any]:
  """A ``jq.stream.SourceTensor`` (path ``params/...``, jq shape, stored dtype, lazy reader) for
  every tensor the config needs, in the decoder's order; shapes and dtypes are checked against the
  config and every file's header is checked (a truncated shard is named) before anything is read.

  Raises:
    CheckpointError: a missing or truncated shard or tensor, a tensor of the wrong shape or of a
      non-float dtype (naming the file and tensor).
  """
  from jq.stream import SourceTensor
  directory = Path(directory)
  files = weight_files(directory)
  names = hf_tensors(config)
  missing = sorted(set(names) - set(files), key=_natural)
  if missing:
    raise CheckpointError(f"{directory}: {len(missing)} tensors the config needs are missing, "
                          f"e.g. {missing[:3]}")
  unused = sorted((n for n in set(files) - set(names) if not _ignorable(n, config)), key=_natural)
  if unused:
    raise CheckpointError(
        f"{directory}: {len(unused)} tensors config.json gives no use for, e.g. {unused[:3]}: "
        "jq's decoder would drop them and compute another function than the checkpoint's (a "
        "config field such as attention_bias / mlp_bias that does not match the weights, or a "
        "feature jq does not support)")
  headers = {f: _file_tensors(f) for f in sorted(set(files[n] for n in names))}
  out = []
  for t in decoder_names.decoder_tensors(config):
    file = files[t.hf]
    infos, start = headers[file]
    info = infos.get(t.hf)
    if info is None:
      raise CheckpointError(f"{file.name}: tensor {t.hf!r}, which the index places here, is "
                            "missing from the file")
    shape, want = tuple(info.shape), expected_shape(t.path, config)
    if shape != names[t.hf][1]:
      raise CheckpointError(f"{file.name}: tensor {t.hf!r} has shape {shape}, config.json "
                            f"implies {names[t.hf][1]}")
    if info.dtype.name not in _FLOAT_DTYPES:
      raise CheckpointError(f"{file.name}: tensor {t.hf!r} has dtype {info.dtype}; expected "
                            "float32, bfloat16 or float16 (a quantized checkpoint?)")
    out.append(SourceTensor(path="params/" + t.jq, shape=want, dtype=info.dtype,
                            read=_reader(file, info, start, t.hf, t.transpose, t.rows),
                            where=f"{file.name}: {t.hf}"))
  return out


def _ignorable(name: str, config: DecoderConfig) -> bool:
  """Tensors a checkpoint may carry that transformers ignores as well: RoPE's precomputed inverse
  frequencies (older conversions), and a tied model's copy of the head."""
  return (name.endswith("rotary_emb.inv_freq")
          or (config.tie_embeddings and name == "lm_head.weight"))


def iter_tensors(directory: Path, config: DecoderConfig
                 ) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
  """``(jq path, array)`` for every tensor the config needs, read one at a time (lazily), shapes
  checked against the config before reading; float tensors keep their stored dtype."""
  for s in stream_sources(directory, config):
    yield tuple(s.path.split("/")[1:]), s.read_all()


def checkpoint_bytes(directory: str | Path) -> int:
  """Bytes of the weight files of a Hugging Face checkpoint directory."""
  return sum(p.stat().st_size for p in set(weight_files(Path(directory)).values()))


def _natural(name: str) -> list[Any]:
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def load_weights(directory: str | Path, *, dtype: Any = np.float32
                 ) -> tuple[DecoderConfig, dict[str, Any]]:
  """``(config, params)`` of a Hugging Face checkpoint directory; params are numpy arrays in their
  stored dtype (bfloat16 stays bfloat16), ``dtype`` is the compute dtype of the config."""
  directory = Path(directory)
  raw = read_json(directory / "config.json")
  config = family_config(raw, where=str(directory / "config.json"), dtype=dtype)
  params: dict[str, Any] = {}
  for path, arr in iter_tensors(directory, config):
    node = params
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = arr
  return config, params


# ------------------------------------------------------------------------------------------------
# tokenizer and chat template


def load_tokenizer(directory: str | Path):
  """The ``jq_models.tokenizer.Tokenizer`` of ``tokenizer.json`` + ``tokenizer_config.json`` (special
  tokens, ``add_bos_token``, ``chat_template``) + ``generation_config.json`` (EOS / stop ids)."""
  import tokenizers
  from jq_models.tokenizer import Tokenizer
  directory = Path(directory)
  tj = directory / "tokenizer.json"
  if not tj.is_file():
    raise CheckpointError(f"{directory}: no tokenizer.json (jq builds tokenizers from "
                          "tokenizer.json; convert a SentencePiece tokenizer.model with "
                          "transformers first)")
  try:
    backend = tokenizers.Tokenizer.from_file(str(tj))
  except Exception as e:  # tokenizers raises a bare Exception
    raise CheckpointError(f"{tj}: the tokenizer cannot be built ({e})") from e
  # a tokenizer.json may carry truncation and padding (BERT-style exports: 128 tokens, padded):
  # jq sets lengths itself, so calibration and evaluation texts are never cut short or padded
  # (as transformers' tokenizers, which apply them only when asked)
  backend.no_truncation()
  backend.no_padding()
  tc_path = directory / "tokenizer_config.json"
  tc = read_json(tc_path) if tc_path.is_file() else {}
  gc_path = directory / "generation_config.json"
  gc = read_json(gc_path) if gc_path.is_file() else {}

  def token_id(key: str) -> int | None:
    tok = tc.get(key)
    if isinstance(tok, dict):
      tok = tok.get("content")
    if tok is None:
      return None
    i = backend.token_to_id(str(tok))
    if i is None:
      raise CheckpointError(f"{tc_path}: {key} {tok!r} is not in tokenizer.json's vocabulary")
    return i

  bos, eos, pad = token_id("bos_token"), token_id("eos_token"), token_id("pad_token")
  gen_eos = gc.get("eos_token_id")
  if isinstance(gen_eos, list) and gen_eos:
    gen_eos = gen_eos[0]
  if eos is None and isinstance(gen_eos, int):
    eos = gen_eos
  eos_ids = gc.get("eos_token_id")
  stop = tuple(int(i) for i in (eos_ids if isinstance(eos_ids, list) else [eos_ids])
               if isinstance(i, int))
  if "add_bos_token" in tc:
    add_bos = bool(tc["add_bos_token"]) and bos is not None
  else:  # what tokenizer.json's own post-processor does
    ids = backend.encode("a", add_special_tokens=True).ids
    add_bos = bos is not None and bool(ids) and ids[0] == bos
  template = tc.get("chat_template")
  if isinstance(template, list):  # named templates: take "default"
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    template = named.get("default")
  jinja = directory / "chat_template.jinja"
  if template is None and jinja.is_file():
    template = jinja.read_text(encoding="utf-8")
  return Tokenizer(backend, bos_id=bos, eos_id=eos, pad_id=pad, add_bos=add_bos,
                   stop_ids=stop, chat_template=template)
