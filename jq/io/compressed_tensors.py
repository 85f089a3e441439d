"""compressed-tensors checkpoints (vLLM, transformers) of jq-quantized Llama-family models.

A checkpoint is a directory with ``model.safetensors`` (Hugging Face names, ``(out, in)`` weights)
and ``config.json`` whose ``quantization_config`` has ``quant_method: compressed-tensors``.  The
conventions below were read from compressed-tensors 0.20.0 (``quantization/lifecycle/forward.py``,
``quantization/utils/helpers.py``, ``compressors/pack_quantized``, ``compressors/naive_quantized``,
``quantization/lifecycle/initialize.py``); its package (which needs torch) is not a dependency.

compressed-tensors (CT) conventions:

* Integer grid: signed, full range ``[-2^(b-1), 2^(b-1) - 1]`` for every ``num_bits`` (int4 is
  ``[-8, 7]``, not the narrow ``[-7, 7]``); zero points are signed too (``zp_dtype`` int8).
  Dequantization is ``(q - zp) * scale``, computed in the scale's dtype.
* Scales CT computes itself (``calculate_qparams``): symmetric ``absmax / ((qmax - qmin) / 2)``,
  i.e. ``absmax / 7.5`` for int4 and ``absmax / 127.5`` for int8 (not ``/8``); asymmetric
  ``(max - min) / (qmax - qmin)`` with ``zp = clamp(round(qmin - min / scale))``.  jq uses
  ``absmax / qmax`` (``/7``, ``/127``).  Stored grids are taken as they are, so this difference only
  matters when this module has to requantize (it then uses CT's formulas).
* Scale shapes: ``tensor`` ``(1,)``; ``channel`` ``(out, 1)``; ``group`` ``(out, in / group_size)``
  (CT requires ``in % group_size == 0``; a partial last group is not representable).
* ``pack-quantized`` (weight-only, 1..8 bits): ``weight_packed`` int32 ``(out, ceil(in·b / 32))``:
  each value is offset by ``2^(b-1)`` (stored unsigned) and 32 consecutive values fill exactly
  ``b`` words, value ``i`` at bit ``i·b`` (little end first, crossing word boundaries when ``b``
  does not divide 32).  For int4 that is eight values per int32, the first in the low nibble:
  ``[-8, -7, -1, 0, 1, 2, 6, 7]`` -> ``[0, 1, 7, 8, 9, 10, 14, 15]`` -> ``0xFEA98710`` (the
  offset convention gives exactly this word; two's-complement nibbles would give ``0x76210F98``).
  Asymmetric ``group``/``channel`` zero points are packed the same way along the *output* dim:
  ``weight_zero_point`` int32 ``(ceil(out·b / 32), n_groups)``; ``tensor`` zero points stay int8
  ``(1,)``.  ``weight_shape`` is int64 ``[out, in]``.  The last partial word is zero-padded after
  the offset (as CT's ``pack_to_int32``).
* ``int-quantized`` (W8A8): ``weight`` int8 ``(out, in)``, ``weight_scale`` (+ int8
  ``weight_zero_point`` if asymmetric) unpacked; input activations ``strategy: token, dynamic:
  true`` (jq's dynamic per-token mode) or ``strategy: tensor, dynamic: false`` with per-layer
  ``input_scale`` ``(1,)`` (+ int8 ``input_zero_point``) (jq's static mode).

How jq maps onto it (all exact, no re-rounding):

* jq kernels ``(in, out)`` are transposed to ``(out, in)``; tiles ``(in, 1)`` -> ``channel``,
  ``(g, 1)`` with ``in % g == 0`` -> ``group`` (``group_size = g``), the whole tensor -> ``tensor``;
  tiles shared across output channels are expanded per row (dequantization unchanged).
* Signed jq types (int8/int4/int3/int2) are written as they are.  Unsigned asymmetric jq types
  (uint4 etc., jq's asymmetric presets) are shifted: ``q_ct = q - 2^(b-1)``, ``zp_ct = zp -
  2^(b-1)``; ``q_ct - zp_ct = q - zp``.  On import, asymmetric schemes become unsigned jq types and
  symmetric ones signed types, so a jq → CT → jq round trip gives identical dequantized values.
* Weight-only 2/3/4/8-bit -> ``pack-quantized``; 8-bit with activation quantization ->
  ``int-quantized`` (vLLM's Marlin/Machete kernels take 4 and 8 bits; 2/3-bit files are valid CT
  but may not run in vLLM).
* Scales keep their jq dtype (float32/bfloat16/float16).  jq dequantizes in float32; CT (torch)
  dequantizes in the scale dtype, so with bf16/fp16 scales its float result is that product
  rounded to bf16/fp16.
* Not representable (refused with a ValueError unless ``requantize=True``, which dequantizes and
  quantizes with CT's own min-max formulas at the same bit width/symmetry, group size if it divides
  ``in``, else per channel): NF4, a partial last group, groups along the output axis.

Checked against the real packages (optional tests, skipped without them): compressed-tensors
0.20's ``pack_to_int32`` and its compressors' ``decompress`` reproduce jq's packing and dequantized
weights bit for bit; transformers 5.24 loads symmetric checkpoints and its logits equal jq's.
Asymmetric checkpoints hit a transformers/compressed-tensors 0.20 problem: the model is compressed
on the meta device, where ``PackedQuantizationCompressor.compress`` leaves ``weight_zero_point``
unpacked ``(out, groups)``, so the packed zero points (which CT's own compressor writes and vLLM
reads) are rejected as a size mismatch.

Example:
  >>> export_compressed_tensors(qparams, config, "smollm2-w4a16")
  >>> hf_config, params = load_compressed_tensors("smollm2-w4a16")
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jq.io import decoder_names
from jq.io.hints import REQUANTIZE_HINT
from jq.io.atomic import atomic_write, replace_dir, temporary_sibling_dir
from jq.io.gguf.llama import LlamaHParams
from jq.io.gguf.qarray_np import _dequantize_np, _pack_np, _unpacked_np
from jq.io.safetensors_io import read_tensors, write_safetensors
from jq.qarray import ActivationQuant, QArray
from jq.qtypes import QType
from jq.spec import ActivationSpec, ActMode
from jq.tree import is_qarray, leaves_with_paths

CT_VERSION = "0.20.0"   # the compressed-tensors release whose conventions this module follows
PACK_QUANTIZED = "pack-quantized"
INT_QUANTIZED = "int-quantized"
MIXED = "mixed-precision"


class CompressedTensorsError(ValueError):
  """A tree cannot be written, or a directory read, as a compressed-tensors checkpoint."""


# ------------------------------------------------------------------------------------------------
# int32 packing (compressed_tensors.compressors.pack_quantized.helpers).
# ------------------------------------------------------------------------------------------------

def pack_int32(values: np.ndarray, num_bits: int, packed_dim: int = 1) -> np.ndarray:
  """CT's ``pack_to_int32``: signed ``b``-bit values of a 2-D array, densely packed into int32.

  Each value is offset by ``2^(b-1)``; 32 consecutive values along ``packed_dim`` fill ``b`` words,
  value ``i`` at bit ``i·b`` little-end first; the result keeps ``ceil(n·b / 32)`` words.

  Example:
    >>> hex(pack_int32(np.array([[-8, -7, -1, 0, 1, 2, 6, 7]]), 4).view(np.uint32)[0, 0])
    '0xfea98710'
  """
  if not 1 <= num_bits <= 8:
    raise ValueError(f"pack_int32: num_bits={num_bits} must be in [1, 8]")
  v = np.asarray(values)
  if v.ndim != 2:
    raise ValueError(f"pack_int32: expected a 2-D array, got shape {v.shape}")
  lo, hi = -(1 << (num_bits - 1)), (1 << (num_bits - 1)) - 1
  if v.size and (v.min() < lo or v.max() > hi):
    raise ValueError(f"pack_int32: values span [{v.min()}, {v.max()}], outside int{num_bits} "
                     f"[{lo}, {hi}]")
  u = v.astype(np.int64) + (1 << (num_bits - 1))
  if packed_dim == 0:
    u = u.T
  rows, cols = u.shape
  n_words = -(-cols * num_bits // 32)
  if 32 % num_bits == 0:  # fast path: whole values per word, value j of a word at bit j·b
    per = 32 // num_bits
    u = np.pad(u, ((0, 0), (0, n_words * per - cols))).reshape(rows, n_words, per)
    words = (u << (np.arange(per, dtype=np.int64) * num_bits)).sum(-1, dtype=np.int64)
    out = words.astype(np.uint32).view(np.int32)
    return np.ascontiguousarray(out.T if packed_dim == 0 else out)
  groups = -(-cols // 32)
  u = np.pad(u, ((0, 0), (0, groups * 32 - cols)))
  bits = ((u[..., None] >> np.arange(num_bits)) & 1).astype(np.uint8)      # (rows, g*32, b)
  bits = bits.reshape(rows, groups, 32 * num_bits)
  words = np.ascontiguousarray(np.packbits(bits, axis=-1, bitorder="little")).view("<i4")
  out = words.reshape(rows, groups * num_bits)[:, :n_words].astype(np.int32)
  return np.ascontiguousarray(out.T if packed_dim == 0 else out)


def unpack_int32(packed: np.ndarray, num_bits: int, shape: tuple[int, int],
                 packed_dim: int = 1) -> np.ndarray:
  """Inverse of :func:`pack_int32` (CT's ``unpack_from_int32``): int8 values of ``shape``."""
  if not 1 <= num_bits <= 8:
    raise ValueError(f"unpack_int32: num_bits={num_bits} must be in [1, 8]")
  w = np.asarray(packed)
  if w.dtype != np.int32 or w.ndim != 2:
    raise ValueError(f"unpack_int32: expected a 2-D int32 array, got shape {w.shape} dtype "
                     f"{w.dtype}")
  if packed_dim == 0:
    w = w.T
  rows, n_words = w.shape
  cols = int(shape[packed_dim])
  if rows != int(shape[1 - packed_dim]) or n_words != -(-cols * num_bits // 32):
    raise ValueError(f"unpack_int32: packed shape {np.asarray(packed).shape} does not hold "
                     f"{num_bits}-bit values of shape {tuple(shape)} packed along dim {packed_dim}")
  offset = 1 << (num_bits - 1)
  if 32 % num_bits == 0:  # fast path (see pack_int32)
    per = 32 // num_bits
    u = (w.view(np.uint32)[..., None] >> (np.arange(per, dtype=np.uint32) * num_bits)) & (
        (1 << num_bits) - 1)
    out = (u.reshape(rows, n_words * per)[:, :cols].astype(np.int16) - offset).astype(np.int8)
    return np.ascontiguousarray(out.T if packed_dim == 0 else out)
  groups = -(-n_words // num_bits)
  w = np.pad(w, ((0, 0), (0, groups * num_bits - n_words)))
  b = np.ascontiguousarray(w.astype("<i4")).view(np.uint8).reshape(rows, groups, 4 * num_bits)
  bits = np.unpackbits(b, axis=-1, bitorder="little").reshape(rows, groups * 32, num_bits)
  u = (bits.astype(np.int32) << np.arange(num_bits, dtype=np.int32)).sum(-1)[:, :cols]
  out = (u - offset).astype(np.int8)
  return np.ascontiguousarray(out.T if packed_dim == 0 else out)


# ------------------------------------------------------------------------------------------------
# Names.
# ------------------------------------------------------------------------------------------------

_LAYER_RE = re.compile(r"layers_(\d+)/(.+)")
_HF_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")


def _names(config: Any = None) -> tuple[dict[str, str], dict[str, str]]:
  """``(global, per-block)`` jq path -> Hugging Face module maps from ``jq.io.decoder_names`` (the
  block one for layer 0, without its prefixes); ``config=None``: plain Llama."""
  one = types.SimpleNamespace(**{k: getattr(config, k, False) for k in (
      "qkv_bias", "o_bias", "mlp_bias", "qk_norm", "sandwich_norms")}, num_layers=1,
                              tie_embeddings=False)
  glob, block = {}, {}
  for t in decoder_names.decoder_tensors(one):
    module = t.hf.rpartition(".")[0] if t.hf.endswith(".weight") else t.hf
    if t.path[0] == "layers_0":
      block["/".join(t.path[1:])] = module.removeprefix("model.layers.0.")
    else:
      glob[t.jq] = module
  return glob, block


def hf_module_name(path: str, config: Any = None) -> tuple[str, bool]:
  """``(Hugging Face module name, is_linear)`` of a decoder param path (``params/`` prefix
  dropped); a bias maps to ``<module>.bias``."""
  glob, block = _names(config)
  if path in glob:
    return glob[path], path.endswith("kernel")
  m = _LAYER_RE.fullmatch(path)
  if m and m.group(2) in block:
    return f"model.layers.{int(m.group(1))}.{block[m.group(2)]}", m.group(2).endswith("kernel")
  raise CompressedTensorsError(
      f"params/{path}: not part of a Llama-family param tree (expected embed/embedding, "
      "layers_N/{attn/{q,k,v,o}_proj,mlp/{gate,up,down}_proj}/kernel, layers_N/{input_norm,"
      "post_attn_norm}/scale, final_norm/scale, lm_head/kernel)")


def jq_param_path(module: str, config: Any = None) -> str:
  """Inverse of :func:`hf_module_name`."""
  glob, block = _names(config)
  inv_global = {v: k for k, v in glob.items()}
  if module in inv_global:
    return inv_global[module]
  m = _HF_LAYER_RE.fullmatch(module)
  inv = {v: k for k, v in block.items()}
  if m and m.group(2) in inv:
    return f"layers_{int(m.group(1))}/{inv[m.group(2)]}"
  raise CompressedTensorsError(f"{module}: not a Llama-family module this loader knows")


# ------------------------------------------------------------------------------------------------
# QArray <-> CT tensors.
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Scheme:
  """The (hashable) part of a CT scheme that one module's tensors determine."""
  num_bits: int
  symmetric: bool
  strategy: str            # tensor | channel | group
  group_size: int | None
  fmt: str                 # pack-quantized | int-quantized
  act: tuple[str, bool] | None = None   # (jq activation mode, symmetric)

  def weights_json(self) -> dict[str, Any]:
    d = {"num_bits": self.num_bits, "type": "int", "symmetric": self.symmetric,
         "group_size": self.group_size, "strategy": self.strategy, "dynamic": False,
         "observer": "minmax"}
    if not self.symmetric:
      d["zp_dtype"] = "torch.int8"
    return d

  def input_json(self) -> dict[str, Any] | None:
    if self.act is None:
      return None
    mode, sym = self.act
    d = {"num_bits": 8, "type": "int", "symmetric": sym, "group_size": None,
         "strategy": "token" if mode == "dynamic" else "tensor", "dynamic": mode == "dynamic",
         "observer": None if mode == "dynamic" else "minmax"}
    if not sym:
      d["zp_dtype"] = "torch.int8"
    return d


def _expand_rows(t: np.ndarray, tile_out: int, out: int) -> np.ndarray:
  """Per-tile values (n_in_tiles, n_out_tiles) -> (out, n_in_tiles), one row per output channel."""
  if t.shape[1] != out:
    t = np.repeat(t, tile_out, axis=1)[:, :out] if t.shape[1] > 1 else np.repeat(t, out, axis=1)
  return np.ascontiguousarray(t.T)


def _ct_from_qarray(q: QArray, module: str) -> tuple[_Scheme, dict[str, np.ndarray]]:
  """CT tensors (``weight_packed``/``weight`` ...) of a jq kernel QArray ``(in, out)``."""
  where = f"{module}: QArray(qtype={q.qtype.value}, shape={q.shape}, tile={q.tile})"
  q.validate(module)
  if q.qtype.is_table:
    raise CompressedTensorsError(f"{where}: NF4 has no compressed-tensors int equivalent; pass "
                                 f"{REQUANTIZE_HINT} to store it as int4")
  if len(q.shape) != 2:
    raise CompressedTensorsError(f"{where}: only 2-D kernels can be stored")
  n_in, n_out = q.shape
  ti, to = q.tile
  bits = q.qtype.bits
  sym = q.zero_point is None
  if ti >= n_in:
    strategy, g = ("tensor", None) if to >= n_out else ("channel", None)
  elif n_in % ti == 0:
    strategy, g = "group", ti
  else:
    raise CompressedTensorsError(
        f"{where}: group size {ti} does not divide the input dim {n_in} (a partial last group); "
        f"compressed-tensors needs in % group_size == 0: choose a divisor, or pass {REQUANTIZE_HINT}")
  if strategy == "tensor" and q.scale.size != 1:
    raise CompressedTensorsError(f"{where}: unexpected scale shape {q.scale.shape}")
  shift = 0 if q.qtype.signed else 1 << (bits - 1)
  v = _unpacked_np(q).astype(np.int32).T - shift         # (out, in)
  scale = np.asarray(q.scale)
  zp = None if sym else np.asarray(q.zero_point).astype(np.int32) - shift
  if strategy == "tensor":
    scale = scale.reshape(1)
    zp = None if zp is None else zp.reshape(1).astype(np.int8)
  else:
    scale = _expand_rows(scale, to, n_out)                      # (out, n_groups) / (out, 1)
    zp = None if zp is None else _expand_rows(zp, to, n_out)
  act = None
  if q.activation is not None:
    if bits != 8 or strategy == "group":
      raise CompressedTensorsError(f"{where}: activation quantization needs an 8-bit per-channel "
                                   "or per-tensor weight")
    act = (q.activation.spec.mode.value, q.activation.spec.symmetric)
  fmt = INT_QUANTIZED if act is not None else PACK_QUANTIZED
  scheme = _Scheme(bits, sym, strategy, g, fmt, act)
  out: dict[str, np.ndarray] = {}
  if fmt == INT_QUANTIZED:
    out["weight"] = v.astype(np.int8)
    if zp is not None:
      out["weight_zero_point"] = zp.astype(np.int8)
  else:
    out["weight_packed"] = pack_int32(v, bits)
    out["weight_shape"] = np.array([n_out, n_in], np.int64)
    if zp is not None:
      out["weight_zero_point"] = (zp.astype(np.int8) if strategy == "tensor"
                                  else pack_int32(zp, bits, packed_dim=0))
  out["weight_scale"] = np.ascontiguousarray(scale)
  a = q.activation
  if a is not None and a.spec.mode is ActMode.STATIC:
    out["input_scale"] = np.asarray(a.scale, np.float32).reshape(1)
    if not a.spec.symmetric:
      azp = np.asarray(a.zero_point).astype(np.int32).reshape(1)
      azp = azp - (0 if a.spec.qtype.signed else 128)
      out["input_zero_point"] = azp.astype(np.int8)
  return scheme, out


def _ct_requantize(w: np.ndarray, bits: int, sym: bool, strategy: str, g: int | None,
                   scale_dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  """CT's min-max quantization (``calculate_qparams`` + ``quantize``) of an ``(out, in)`` matrix.

  Returns ``(q, scale, zp)`` with CT's shapes (``zp`` None if symmetric).
  """
  qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
  n_out, n_in = w.shape
  if strategy == "group":
    x = w.reshape(n_out, n_in // g, g)
  elif strategy == "channel":
    x = w.reshape(n_out, 1, n_in)
  else:
    x = w.reshape(1, 1, -1)
  lo = np.minimum(x.min(-1), 0).astype(np.float32)
  hi = np.maximum(x.max(-1), 0).astype(np.float32)
  if sym:
    scale = np.maximum(np.abs(lo), np.abs(hi)) / np.float32((qmax - qmin) / 2)
    zp = np.zeros_like(scale)
  else:
    scale = (hi - lo) / np.float32(qmax - qmin)
    with np.errstate(divide="ignore", invalid="ignore"):
      zp = np.clip(qmin - lo / scale, qmin, qmax)
  scale = scale.astype(scale_dtype)
  eps = np.finfo(scale_dtype).eps
  scale = np.where(scale == 0, np.asarray(eps, scale_dtype), scale)
  zp = np.round(np.nan_to_num(zp)).astype(np.int8)
  s32 = scale.astype(np.float32)[..., None]
  v = x / s32 + (0 if sym else zp.astype(np.float32)[..., None])
  q = np.clip(np.round(v), qmin, qmax).astype(np.int8).reshape(w.shape)
  if strategy == "tensor":
    scale, zp = scale.reshape(1), zp.reshape(1)
  return q, scale, (None if sym else zp)


def _requantized_qarray(q: QArray) -> QArray:
  """A CT-representable jq QArray holding CT's own quantization of ``q``'s dequantized values."""
  w = _dequantize_np(q).T                        # (out, in)
  n_out, n_in = w.shape
  bits = 4 if q.qtype.is_table else q.qtype.bits
  sym = q.zero_point is None
  ti = q.tile[0]
  # a partial last group: the largest common group size that divides the input dim and is no
  # coarser than the original one, else one scale per output channel
  divisors = [d for d in (ti, 128, 64, 32, 16) if d <= ti and d < n_in and n_in % d == 0]
  if ti < n_in and divisors:
    strategy, g = "group", divisors[0]
  else:
    strategy, g = ("tensor", None) if q.tile == tuple(q.shape) else ("channel", None)
  sdt = np.dtype(q.scale.dtype)
  qv, scale, zp = _ct_requantize(w, bits, sym, strategy, g, sdt)
  return _qarray_from_ct(qv, scale, zp, bits, sym, strategy, g, q.activation)


def _qarray_from_ct(qv: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, bits: int,
                    sym: bool, strategy: str, g: int | None,
                    activation: ActivationQuant | None) -> QArray:
  """jq kernel QArray ``(in, out)`` from CT values ``(out, in)`` and CT-shaped scales/zero points."""
  n_out, n_in = qv.shape
  qtype = QType.from_bits(bits, signed=sym)
  shift = 0 if sym else 1 << (bits - 1)
  v = qv.astype(np.int32).T + shift                                   # (in, out)
  if strategy == "tensor":
    s, tile = scale.reshape(1, 1), (n_in, n_out)
    z = None if zp is None else zp.reshape(1, 1)
  elif strategy == "channel":
    s, tile = scale.reshape(n_out, 1).T, (n_in, 1)
    z = None if zp is None else zp.reshape(n_out, 1).T
  else:
    s, tile = scale.T, (g, 1)
    z = None if zp is None else zp.T
  zq = None if z is None else jnp.asarray((z.astype(np.int32) + shift).astype(qtype.unpacked_dtype))
  return QArray(values=jnp.asarray(_pack_np(v.astype(qtype.unpacked_dtype), qtype)),
                scale=jnp.asarray(np.ascontiguousarray(s)), zero_point=zq, activation=activation,
                qtype=qtype, shape=(n_in, n_out), tile=tile)


# ------------------------------------------------------------------------------------------------
# Export.
# ------------------------------------------------------------------------------------------------

def hf_llama_config(config: Any, *, torch_dtype: str = "float32") -> dict[str, Any]:
  """A Hugging Face ``LlamaForCausalLM`` ``config.json`` dict from a jq/``LlamaConfig`` config."""
  hp = LlamaHParams.from_config(config)
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "hidden_size": int(hp.hidden_size), "intermediate_size": int(hp.intermediate_size),
      "num_hidden_layers": int(hp.num_layers), "num_attention_heads": int(hp.num_heads),
      "num_key_value_heads": int(hp.num_kv_heads), "head_dim": int(hp.head_dim),
      "hidden_act": "silu", "max_position_embeddings": int(hp.max_seq_len),
      "rms_norm_eps": float(hp.rms_norm_eps), "rope_theta": float(hp.rope_theta),
      "vocab_size": int(hp.vocab_size), "tie_word_embeddings": bool(hp.tie_embeddings),
      "attention_bias": False, "mlp_bias": False, "torch_dtype": torch_dtype,
  }


def llama_hparams(hf_config: Mapping[str, Any]) -> LlamaHParams:
  """:class:`LlamaHParams` (``LlamaConfig`` field names) from a Hugging Face Llama config dict."""
  if hf_config.get("model_type", "llama") != "llama":
    raise CompressedTensorsError(f"config.json model_type={hf_config.get('model_type')!r}: only "
                                 "'llama' is supported")
  try:
    heads = int(hf_config["num_attention_heads"])
    return LlamaHParams(
        vocab_size=int(hf_config["vocab_size"]), hidden_size=int(hf_config["hidden_size"]),
        intermediate_size=int(hf_config["intermediate_size"]),
        num_layers=int(hf_config["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(hf_config.get("num_key_value_heads", heads)),
        head_dim=int(hf_config.get("head_dim") or hf_config["hidden_size"] // heads),
        rope_theta=float(hf_config.get("rope_theta", 10000.0)),
        rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-5)),
        max_seq_len=int(hf_config.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)))
  except KeyError as e:
    raise CompressedTensorsError(f"config.json lacks {e.args[0]!r}") from None


def export_compressed_tensors(params: Any, config: Any, path: str | os.PathLike, *,
                              requantize: bool = False,
                              hf_config_extra: Mapping[str, Any] | None = None,
                              extra_files: Mapping[str, str | bytes] | None = None,
                              hf_config: Mapping[str, Any] | None = None,
                              notes: list[str] | None = None) -> dict[str, Any]:
  """Writes a decoder param tree with jq int8/int4 (int3/int2) kernels as a compressed-tensors dir.

  The directory gets ``model.safetensors`` and ``config.json`` (``LlamaForCausalLM`` plus
  ``quantization_config``) and is replaced atomically.  Float leaves are stored in their own
  dtype; float linears (and ``lm_head``) go into the ``ignore`` list.

  Args:
    params: ``{"params": {...}}`` or the inner dict (``models/decoder.py`` paths).
    config: ``DecoderConfig`` (its family flags say which tensors exist: biases, q/k norms, Gemma
      2/3's four norms; names from ``jq.io.decoder_names``) or a mapping with Llama's field names.
    path: output directory.
    requantize: store unrepresentable QArrays (NF4, partial last groups, ...) by re-quantizing
      them with compressed-tensors' own formulas instead of raising (a partial last group becomes
      the largest of 128/64/32/16 that divides the input dim, else per-channel).
    hf_config_extra: merged into ``config.json`` (e.g. ``bos_token_id``, ``eos_token_id``).
    extra_files: more files for the directory, e.g. ``{"tokenizer.json": text}``.
    hf_config: the source checkpoint's ``config.json``; written (with ``quantization_config``)
      instead of a Llama config, so every family keeps its own architecture and fields.
    notes: when given, one line per re-rounded layer (from which grid to which).

  Returns:
    The ``quantization_config`` written.

  Raises:
    CompressedTensorsError: a non-Llama parameter, a quantized non-kernel, an unrepresentable grid.
  """
  hp = LlamaHParams.from_config(config)
  names = {t.jq: t for t in decoder_names.decoder_tensors(
      config if not isinstance(config, Mapping) else hp)}
  tree = params["params"] if isinstance(params, Mapping) and set(params) == {"params"} else params
  tensors: dict[str, np.ndarray] = {}
  schemes: dict[_Scheme, list[str]] = {}
  float_linears: list[str] = []
  embed_dtype = None
  for p, leaf in leaves_with_paths(tree):
    if p not in names:
      raise CompressedTensorsError(f"params/{p}: not a tensor of this decoder config (expected "
                                   f"e.g. {sorted(names)[:3]})")
    hf_name = names[p].hf
    module, linear = hf_name.rpartition(".")[0], p.endswith("/kernel")
    if is_qarray(leaf):
      if not linear:
        raise CompressedTensorsError(f"params/{p}: only Linear kernels can be quantized in a "
                                     "compressed-tensors checkpoint (embeddings/norms stay float)")
      try:
        scheme, ts = _ct_from_qarray(leaf, module)
      except CompressedTensorsError:
        if not requantize:
          raise
        scheme, ts = _ct_from_qarray(_requantized_qarray(leaf), module)
        if notes is not None:
          notes.append(f"params/{p}: re-rounded from {leaf.qtype.value} "
                       f"{'sym' if leaf.zero_point is None else 'asym'} tile {tuple(leaf.tile)} to "
                       f"compressed-tensors int{scheme.num_bits} "
                       f"{'sym' if scheme.symmetric else 'asym'} {scheme.strategy}"
                       f"{'' if scheme.group_size is None else f' {scheme.group_size}'}")
      schemes.setdefault(scheme, []).append(module)
      for k, v in ts.items():
        tensors[f"{module}.{k}"] = v
    else:
      x = np.asarray(leaf)
      if not (np.issubdtype(x.dtype, np.floating) or x.dtype == ml_dtypes.bfloat16):
        raise CompressedTensorsError(f"params/{p}: shape {x.shape} dtype {x.dtype}: expected a "
                                     "float array or a QArray")
      if linear:
        x = x.T
        float_linears.append(module)
      if p == "embed/embedding":
        embed_dtype = x.dtype
      tensors[hf_name] = np.ascontiguousarray(x)
  if not schemes:
    raise CompressedTensorsError("params has no QArray kernels; nothing to compress (use "
                                 "jq.io.save or plain safetensors for float models)")
  ignore = sorted(set(float_linears) | ({"lm_head"} if "lm_head" not in float_linears else set()))
  groups: dict[str, Any] = {}
  formats = {s.fmt for s in schemes}
  for i, (s, modules) in enumerate(schemes.items()):
    groups[f"group_{i}"] = {
        "targets": ["Linear"] if len(schemes) == 1 else sorted(modules),
        "weights": s.weights_json(), "input_activations": s.input_json(),
        "output_activations": None, "format": s.fmt}
  qconfig = {
      "config_groups": groups, "format": formats.pop() if len(formats) == 1 else MIXED,
      "global_compression_ratio": None, "ignore": ignore, "kv_cache_scheme": None,
      "quant_method": "compressed-tensors", "quantization_status": "compressed",
      "sparsity_config": {}, "transform_config": {}, "version": CT_VERSION,
  }
  if any(not sc.symmetric for sc in schemes):
    # transformers 5.x builds the compressed modules on the meta device with *unpacked* zero
    # points and then refuses the packed weight_zero_point this format (and vLLM) uses; told not
    # to run compressed, it decompresses on load and gets the values right. vLLM and
    # compressed-tensors ignore the key.
    qconfig["run_compressed"] = False
  dtype_name = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16",
                np.dtype(ml_dtypes.bfloat16): "bfloat16"}.get(np.dtype(embed_dtype or np.float32),
                                                              "float32")
  if hf_config is not None:
    hf = {k: v for k, v in hf_config.items() if k not in ("quantization_config",
                                                           "compression_config")}
    hf["torch_dtype"] = dtype_name
  else:
    hf = hf_llama_config(hp, torch_dtype=dtype_name)
  hf.update(dict(hf_config_extra or {}))
  hf["quantization_config"] = qconfig
  path = Path(path)
  tmp = temporary_sibling_dir(path)
  try:
    write_safetensors(os.path.join(tmp, "model.safetensors"), tensors,
                      {"format": "pt"})
    with atomic_write(os.path.join(tmp, "config.json")) as f:
      f.write(json.dumps(hf, indent=2, sort_keys=True).encode("utf-8"))
    for name, content in (extra_files or {}).items():
      if os.path.basename(name) != name or name in ("model.safetensors", "config.json"):
        raise CompressedTensorsError(f"extra file name {name!r} must be a plain file name other "
                                     "than model.safetensors / config.json")
      with atomic_write(os.path.join(tmp, name)) as f:
        f.write(content.encode("utf-8") if isinstance(content, str) else content)
    replace_dir(tmp, path)
  except BaseException:
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return qconfig


def export_model(params: Any, path: str | os.PathLike, *, config: Any = None,
                 model: Any = None, requantize: bool = False, **kwargs: Any) -> dict[str, Any]:
  """:func:`export_compressed_tensors` with the config taken from ``config`` or ``model.config``.

  Raises:
    CompressedTensorsError: neither was given (head counts, RoPE base and norm epsilon cannot be
      read off the parameter shapes).
  """
  if config is None and model is not None:
    config = getattr(model, "config", None)
  if config is None:
    raise CompressedTensorsError(
        "export_model: pass config=<LlamaConfig> (or model=<object with .config>); head counts, "
        "rope_theta and rms_norm_eps cannot be inferred from the parameter shapes")
  return export_compressed_tensors(params, config, path, requantize=requantize, **kwargs)


# ------------------------------------------------------------------------------------------------
# Import.
# ------------------------------------------------------------------------------------------------

def _matches(module: str, target: str) -> bool:
  if target.startswith("re:"):
    return re.match(target[3:], module) is not None
  if target == "Linear":
    return module == "lm_head" or (_HF_LAYER_RE.fullmatch(module) is not None
                                   and module.rsplit(".", 1)[-1].endswith("_proj"))
  return target == module


def _scheme_for(module: str, qconfig: Mapping[str, Any]) -> tuple[dict, dict | None, str] | None:
  if any(_matches(module, t) for t in qconfig.get("ignore") or []):
    return None
  for name, g in (qconfig.get("config_groups") or {}).items():
    if not isinstance(g, Mapping):
      raise CompressedTensorsError(f"quantization_config.config_groups.{name} is a preset "
                                   f"reference ({g!r}); only explicit schemes are supported")
    if any(_matches(module, t) for t in g.get("targets") or []):
      return g.get("weights"), g.get("input_activations"), g.get("format") or qconfig.get("format")
  return None


def _read_all(path: Path) -> dict[str, np.ndarray]:
  index = path / "model.safetensors.index.json"
  if index.is_file():
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
  elif (path / "model.safetensors").is_file():
    files = ["model.safetensors"]
  else:
    raise FileNotFoundError(f"{path}: no model.safetensors (or model.safetensors.index.json)")
  out: dict[str, np.ndarray] = {}
  for fname in files:
    out.update(read_tensors(path / fname))
  return out


def load_compressed_tensors(path: str | os.PathLike, config: Any = None
                            ) -> tuple[dict[str, Any], dict[str, Any]]:
  """``(hf_config, params)``: a compressed-tensors decoder checkpoint as a jq param tree.

  ``config`` (a ``DecoderConfig``) names the family's tensors (biases, q/k norms, Gemma 2/3's
  norms; see ``jq.io.decoder_names``); ``None`` reads a plain Llama.

  Quantized linears become kernel QArrays ``(in, out)`` (symmetric schemes -> signed jq types,
  asymmetric -> unsigned with the zero point shifted by ``2^(b-1)``), W8A8 layers carry an
  ``ActivationQuant``; other tensors are float arrays (linears transposed to ``(in, out)``).
  ``params`` is the inner dict (wrap as ``{"params": params}``); :func:`llama_hparams` turns
  ``hf_config`` into ``LlamaConfig`` fields.

  Raises:
    FileNotFoundError: missing files.
    CompressedTensorsError: not compressed-tensors, unsupported scheme (float/FP8/NVFP4, block or
      token weight strategies, >8 bits), tensors inconsistent with the scheme, unknown modules.
  """
  path = Path(path)
  cfg_file = path / "config.json"
  if not cfg_file.is_file():
    raise FileNotFoundError(f"{path}: no config.json")
  try:
    hf = json.loads(cfg_file.read_text(encoding="utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CompressedTensorsError(f"{cfg_file}: not valid JSON ({e})") from e
  qconfig = hf.get("quantization_config") or hf.get("compression_config")
  if not isinstance(qconfig, Mapping) or qconfig.get("quant_method") != "compressed-tensors":
    raise CompressedTensorsError(f"{cfg_file}: quantization_config.quant_method is not "
                                 "'compressed-tensors'")
  raw = _read_all(path)
  modules: dict[str, dict[str, np.ndarray]] = {}
  for name, arr in raw.items():
    module, _, leaf = name.rpartition(".")
    if name.endswith("rotary_emb.inv_freq"):
      continue
    modules.setdefault(module, {})[leaf] = arr
  params: dict[str, Any] = {}
  for module, ts in modules.items():
    p = jq_param_path(module, config)
    if "bias" in ts:   # a linear's bias is stored float beside its (possibly packed) weight
      if not p.endswith("/kernel"):
        raise CompressedTensorsError(f"{module}: a bias on a module that is not a linear")
      _set(params, p.rpartition("/")[0] + "/bias", jnp.asarray(ts.pop("bias")))
    scheme = _scheme_for(module, qconfig) if p.endswith("kernel") else None
    if scheme is None or scheme[0] is None:
      if "weight" not in ts or set(ts) != {"weight"}:
        raise CompressedTensorsError(f"{module}: tensors {sorted(ts)} but no quantization scheme "
                                     "applies to it (ignored or untargeted)")
      x = ts["weight"]
      if p.endswith("kernel"):
        x = x.T
      _set(params, p, jnp.asarray(np.ascontiguousarray(x)))
    else:
      _set(params, p, _qarray_from_module(module, ts, *scheme))
  return hf, params


def _set(tree: dict, path: str, value: Any) -> None:
  parts = path.split("/")
  for k in parts[:-1]:
    tree = tree.setdefault(k, {})
  tree[parts[-1]] = value


def _qarray_from_module(module: str, ts: Mapping[str, np.ndarray], w: Mapping[str, Any],
                        a: Mapping[str, Any] | None, fmt: str | None) -> QArray:
  where = f"{module} (tensors {sorted(ts)})"
  if w.get("type", "int") != "int":
    raise CompressedTensorsError(f"{where}: weight type {w.get('type')!r} is not supported (int only)")
  bits = int(w.get("num_bits", 8))
  if bits not in (2, 3, 4, 8):
    raise CompressedTensorsError(f"{where}: num_bits={bits}; jq supports 2, 3, 4 and 8")
  sym = bool(w.get("symmetric", True))
  strategy = w.get("strategy") or ("group" if w.get("group_size") else "tensor")
  if strategy not in ("tensor", "channel", "group"):
    raise CompressedTensorsError(f"{where}: weight strategy {strategy!r} is not supported")
  g = int(w["group_size"]) if strategy == "group" else None
  if "weight_scale" not in ts:
    raise CompressedTensorsError(f"{where}: missing weight_scale")
  scale = ts["weight_scale"]
  if "weight_packed" in ts:
    if "weight_shape" not in ts:
      raise CompressedTensorsError(f"{where}: weight_packed without weight_shape")
    shape = tuple(int(s) for s in np.asarray(ts["weight_shape"]).reshape(-1))
    if len(shape) != 2:
      raise CompressedTensorsError(f"{where}: weight_shape {shape} is not 2-D")
    try:
      qv = unpack_int32(ts["weight_packed"], bits, shape)
    except ValueError as e:
      raise CompressedTensorsError(f"{where}: {e}") from e
  elif "weight" in ts and ts["weight"].dtype == np.int8:
    qv = ts["weight"]
    shape = qv.shape
  else:
    raise CompressedTensorsError(f"{where}: format {fmt!r} needs weight_packed (pack-quantized) or "
                                 "an int8 weight (int-quantized)")
  n_out, n_in = shape
  lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
  if qv.size and (qv.min() < lo or qv.max() > hi):
    raise CompressedTensorsError(f"{where}: values span [{qv.min()}, {qv.max()}], outside int{bits}")
  want = {"tensor": (1,), "channel": (n_out, 1),
          "group": (n_out, -(-n_in // g) if g else 0)}[strategy]
  if strategy == "group" and n_in % g:
    raise CompressedTensorsError(f"{where}: group_size {g} does not divide in={n_in}")
  if (scale.size != 1) if strategy == "tensor" else (tuple(scale.shape) != want):
    raise CompressedTensorsError(f"{where}: weight_scale shape {scale.shape}, expected {want} for "
                                 f"strategy {strategy}")
  zp = None
  if not sym:
    if "weight_zero_point" not in ts:
      raise CompressedTensorsError(f"{where}: asymmetric scheme without weight_zero_point")
    z = ts["weight_zero_point"]
    if z.dtype == np.int32 and strategy != "tensor":
      try:
        zp = unpack_int32(z, bits, want, packed_dim=0)
      except ValueError as e:
        raise CompressedTensorsError(f"{where}: weight_zero_point: {e}") from e
    else:
      zp = np.asarray(z).reshape(want)
      if zp.size and (zp.min() < lo or zp.max() > hi):
        raise CompressedTensorsError(f"{where}: zero points outside int{bits}")
  act = None
  if a is not None:
    if int(a.get("num_bits", 8)) != 8 or a.get("type", "int") != "int" or bits != 8:
      raise CompressedTensorsError(f"{where}: input activations {a} are not int8 (jq: W8A8 only)")
    asym = not bool(a.get("symmetric", True))
    spec = ActivationSpec(mode=ActMode.DYNAMIC if a.get("dynamic") else ActMode.STATIC,
                          qtype=QType.UINT8 if asym else QType.INT8, symmetric=not asym)
    if spec.mode is ActMode.STATIC:
      if a.get("strategy") != "tensor" or "input_scale" not in ts:
        raise CompressedTensorsError(f"{where}: static activations need strategy 'tensor' and an "
                                     "input_scale tensor")
      s = jnp.asarray(np.asarray(ts["input_scale"], np.float32).reshape(()))
      z = None
      if asym:
        z = jnp.asarray((np.asarray(ts["input_zero_point"]).astype(np.int32).reshape(()) + 128
                         ).astype(np.uint8))
      act = ActivationQuant(scale=s, zero_point=z, spec=spec)
    else:
      act = ActivationQuant(scale=None, zero_point=None, spec=spec)
  q = _qarray_from_ct(np.asarray(qv), np.asarray(scale).reshape(want) if strategy != "tensor"
                      else np.asarray(scale).reshape(1), zp, bits, sym, strategy, g, act)
  return q.validate(module)


__all__ = ["export_compressed_tensors", "export_model", "load_compressed_tensors", "pack_int32", "unpack_int32",
           "hf_llama_config", "llama_hparams", "hf_module_name", "jq_param_path",
           "CompressedTensorsError", "PACK_QUANTIZED", "INT_QUANTIZED", "CT_VERSION"]
