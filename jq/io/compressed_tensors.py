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
* ``float-quantized`` (FP8, ``type: float``, ``num_bits: 8``, symmetric): ``weight``
  float8_e4m3fn ``(out, in)`` and ``weight_scale`` ``(out, 1)`` (``channel``) or ``(1,)``
  (``tensor``); dequantization ``weight · scale``; CT's own scale is ``absmax / 448``
  (``(max − min) / 2`` of e4m3's range), jq's too.  Input activations as for ``int-quantized``
  but ``type: float`` (FP8_DYNAMIC: per token, dynamic; FP8: per tensor with ``input_scale``);
  none for fp8 weight-only (vLLM's W8A16 FP8).

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
  but may not run in vLLM).  ``fp8_e4m3`` kernels (per channel or per tensor), weight-only or
  with fp8 activations -> ``float-quantized``.
* Scales keep their jq dtype (float32/bfloat16/float16).  jq dequantizes in float32; CT (torch)
  dequantizes in the scale dtype, so with bf16/fp16 scales its float result is that product
  rounded to bf16/fp16.
* Not representable (refused with a ValueError unless ``requantize=True``, which dequantizes and
  quantizes with CT's own min-max formulas at the same bit width/symmetry, group size if it divides
  ``in``, else per channel; fp8 per channel): NF4, a partial last group, groups along the output
  axis, fp8 group scales.

Checked against the real packages (optional tests, skipped without them): compressed-tensors
0.20's ``pack_to_int32`` and its compressors' ``decompress`` reproduce jq's packing and dequantized
weights bit for bit; transformers 5.24 loads symmetric checkpoints and its logits equal jq's
(fp8-dynamic included: its fake-quantized per-token fp8 activations give jq's fp8 model's logits).
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
import functools
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
from jq.io.codec import load_leaf
from jq.io.gguf.llama import LlamaHParams
from jq.io.gguf.qarray_np import (_dequantize_np, _pack_np, _unpacked_np, fuse_leaves,
                                  split_outputs)
from jq.io.safetensors_io import read_tensors, write_safetensors
from jq.qarray import ActivationQuant, QArray
from jq.qtypes import QType
from jq.spec import ActivationSpec, ActMode
from jq.tree import is_qarray, leaves_with_paths

CT_VERSION = "0.20.0"   # the compressed-tensors release whose conventions this module follows
PACK_QUANTIZED = "pack-quantized"
INT_QUANTIZED = "int-quantized"
FLOAT_QUANTIZED = "float-quantized"
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
  flags = tuple((k, bool(getattr(config, k, False))) for k in (
      "qkv_bias", "o_bias", "mlp_bias", "qk_norm", "sandwich_norms", "fused_projections"))
  flags += (("pre_norms", bool(getattr(config, "pre_norms", True))),)
  if getattr(config, "fused_projections", False):   # (the parts' rows)
    flags += tuple((k, getattr(config, k)) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads",
        "head_dim"))
  moe = tuple((k, getattr(config, k)) for k in ("num_experts", "shared_expert_size", "moe_names")
              if hasattr(config, k))
  return _block_names(flags, moe)


@functools.lru_cache(maxsize=16)
def _block_names(flags: tuple, moe: tuple) -> tuple[dict[str, str], dict[str, str]]:
  """:func:`_names` of hashable fields (a model's every module is looked up: cached)."""
  flags, moe = dict(flags), dict(moe)
  # one block of each kind the config has: a plain MLP, and a mixture of experts
  ones = [types.SimpleNamespace(**flags, num_layers=1, tie_embeddings=False)]
  if moe.get("num_experts"):
    ones.append(types.SimpleNamespace(**flags, **moe, num_layers=1, tie_embeddings=False))
  glob, block = {}, {}
  for t in (t for one in ones for t in decoder_names.decoder_tensors(one)):
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
  fmt: str                 # pack-quantized | int-quantized | float-quantized
  act: tuple[str, bool] | None = None   # (jq activation mode, symmetric)
  kind: str = "int"        # int | float (weights and activations alike)

  def weights_json(self) -> dict[str, Any]:
    d = {"num_bits": self.num_bits, "type": self.kind, "symmetric": self.symmetric,
         "group_size": self.group_size, "strategy": self.strategy, "dynamic": False,
         "observer": "minmax"}
    if not self.symmetric:
      d["zp_dtype"] = "torch.int8"
    return d

  def input_json(self) -> dict[str, Any] | None:
    if self.act is None:
      return None
    mode, sym = self.act
    d = {"num_bits": 8, "type": self.kind, "symmetric": sym, "group_size": None,
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


def _ct_from_qarray(q: QArray, module: str, group: int | None = None
                    ) -> tuple[_Scheme, dict[str, np.ndarray]]:
  """CT tensors (``weight_packed``/``weight`` ...) of a jq kernel QArray ``(in, out)``.

  ``group``: the checkpoint's group size, if its group-wise kernels share one: a weight-only
  per-channel kernel whose input dim it divides is stored as that group scheme, its one scale per
  row repeated for each group (the same values: exact), so a g128 recipe whose 128-input layers
  came out per channel stays one scheme (transformers 5 decompresses only one scheme when zero
  points are packed)."""
  where = f"{module}: QArray(qtype={q.qtype.value}, shape={q.shape}, tile={q.tile})"
  q.validate(module)
  if q.qtype.is_float:
    return _ct_from_fp8(q, where)
  if q.activation is not None and q.activation.spec.qtype.is_float:
    raise CompressedTensorsError(f"{where}: {q.activation.spec.qtype.value} activations with "
                                 "integer weights have no compressed-tensors scheme")
  if q.qtype.is_table:
    raise CompressedTensorsError(f"{where}: NF4 has no compressed-tensors int equivalent; pass "
                                 f"{REQUANTIZE_HINT} to store it as int4")
  if len(q.shape) != 2:
    raise CompressedTensorsError(f"{where}: only 2-D kernels can be stored")
  n_in, n_out = q.shape
  ti, to = q.tile
  bits = q.qtype.bits
  sym = q.zero_point is None
  if ti >= n_in and to >= n_out:
    strategy, g = "tensor", None
  elif ti >= n_in and group is not None and q.activation is None and n_in % group == 0:
    strategy, g = "group", group   # one scale per row, repeated per group below
  elif ti >= n_in:
    strategy, g = "channel", None
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
    if strategy == "group" and scale.shape[1] != n_in // g:     # per channel, as groups
      scale = np.repeat(scale, n_in // g, axis=1)
      zp = None if zp is None else np.repeat(zp, n_in // g, axis=1)
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


def _ct_from_fp8(q: QArray, where: str) -> tuple[_Scheme, dict[str, np.ndarray]]:
  """``float-quantized`` tensors (``weight`` float8 ``(out, in)``, ``weight_scale``) of an fp8
  kernel QArray ``(in, out)`` with per-channel or per-tensor scales."""
  if len(q.shape) != 2:
    raise CompressedTensorsError(f"{where}: only 2-D kernels can be stored")
  n_in, n_out = q.shape
  scale = np.asarray(q.scale)
  if tuple(q.tile) == (n_in, n_out):
    strategy, scale = "tensor", scale.reshape(1)
  elif q.tile[0] >= n_in:
    strategy, scale = "channel", _expand_rows(scale, q.tile[1], n_out)   # (out, 1)
  else:
    raise CompressedTensorsError(
        f"{where}: fp8 weights with groups of {q.tile[0]} along the input; compressed-tensors' "
        "float-quantized format is written here per channel or per tensor: quantize per channel "
        f"(jq.FP8_CHANNEL), or pass {REQUANTIZE_HINT} to re-round per channel")
  a = q.activation
  if a is not None and not a.spec.qtype.is_float:
    raise CompressedTensorsError(f"{where}: {a.spec.qtype.value} activations with fp8 weights "
                                 "have no compressed-tensors scheme")
  act = None if a is None else (a.spec.mode.value, True)
  scheme = _Scheme(8, True, strategy, None, FLOAT_QUANTIZED, act, kind="float")
  out = {"weight": np.ascontiguousarray(_unpacked_np(q).T),
         "weight_scale": np.ascontiguousarray(scale)}
  if a is not None and a.spec.mode is ActMode.STATIC:
    out["input_scale"] = np.asarray(a.scale, np.float32).reshape(1)
  return scheme, out


def _fp8_requantized_qarray(q: QArray) -> QArray:
  """An fp8 QArray re-rounded per output channel with CT's formulas: ``scale = absmax / 448``
  (an all-zero channel gets the scale dtype's eps), ``e4m3(clamp(w / scale, ±448))``."""
  w = _dequantize_np(q)                          # (in, out)
  sdt = np.dtype(q.scale.dtype)
  scale = (np.abs(w).max(axis=0, keepdims=True) / np.float32(QType.FP8_E4M3.qmax)).astype(sdt)
  scale = np.where(scale == 0, np.asarray(np.finfo(sdt).eps, sdt), scale)
  v = np.clip(w / scale.astype(np.float32), QType.FP8_E4M3.qmin, QType.FP8_E4M3.qmax)
  return QArray(values=jnp.asarray(v.astype(ml_dtypes.float8_e4m3fn)), scale=jnp.asarray(scale),
                zero_point=None, activation=q.activation, qtype=QType.FP8_E4M3,
                shape=tuple(q.shape), tile=(q.shape[0], 1))


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
  if q.qtype.is_float:
    return _fp8_requantized_qarray(q)
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
                              notes: list[str] | None = None,
                              progress: bool = False,
                              max_shard_bytes: int = 2 << 30) -> dict[str, Any]:
  """Writes a decoder param tree with jq int8/int4 (int3/int2) or fp8 kernels as a compressed-tensors
  dir.

  The directory gets ``model.safetensors`` (or, past ``max_shard_bytes``, Hugging Face's
  ``model-0000i-of-0000N.safetensors`` shards and ``model.safetensors.index.json``) and
  ``config.json`` (``LlamaForCausalLM`` plus ``quantization_config``), and is replaced atomically.
  Float leaves are stored in their own dtype; float linears (and ``lm_head``) go into the
  ``ignore`` list.  Each leaf is packed and goes into the shard being filled, written when full:
  with a lazily loaded checkpoint (``jq.io.load(path, lazy=True)``, each leaf read as it is
  packed) the export holds one shard, not the model.

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
    progress: show a bar over the tensors while packing.

  Returns:
    The ``quantization_config`` written.

  Raises:
    CompressedTensorsError: a non-Llama parameter, a quantized non-kernel, an unrepresentable grid.
  """
  hp = LlamaHParams.from_config(config)
  names = {t.jq: t for t in decoder_names.decoder_tensors(
      config if not isinstance(config, Mapping) else hp)}
  tree = params["params"] if isinstance(params, Mapping) and set(params) == {"params"} else params
  leaves = list(leaves_with_paths(tree))
  sizes = {int(x.tile[0]) for _, x in leaves if getattr(x, "qtype", None) is not None
           and len(x.shape) == 2 and x.tile[0] < x.shape[0] and x.shape[0] % x.tile[0] == 0}
  group = sizes.pop() if len(sizes) == 1 else None   # (see _ct_from_qarray)
  unknown = [p for p, _ in leaves if p not in names]
  if unknown:
    raise CompressedTensorsError(f"params/{unknown[0]}: not a tensor of this decoder config "
                                 f"(expected e.g. {sorted(names)[:3]})")
  try:
    leaves = [(paths[0], t.hf, leaf) for t, paths, leaf in fuse_leaves(
        [(names[p], p, leaf if names[p].rows is None else load_leaf(leaf))
         for p, leaf in leaves], lambda t: t.hf)]
  except ValueError as e:
    raise CompressedTensorsError(str(e)) from e
  if progress:
    from tqdm.auto import tqdm
    leaves = tqdm(leaves, desc="packing", unit="tensor", leave=False)
  path = Path(path)
  tmp = temporary_sibling_dir(path)
  try:
    shards = _ShardFiller(tmp, max_shard_bytes)
    qconfig, hf = _pack_all(leaves, shards, hp, group, requantize, notes, hf_config,
                            hf_config_extra)
    shards.finish()
    with atomic_write(os.path.join(tmp, "config.json")) as f:
      f.write(json.dumps(hf, indent=2, sort_keys=True).encode("utf-8"))
    for name, content in (extra_files or {}).items():
      if os.path.basename(name) != name or name in (*shards.names, "config.json",
                                                    "model.safetensors.index.json"):
        raise CompressedTensorsError(f"extra file name {name!r} must be a plain file name other "
                                     "than the weights' and config.json")
      with atomic_write(os.path.join(tmp, name)) as f:
        f.write(content.encode("utf-8") if isinstance(content, str) else content)
    replace_dir(tmp, path)
  except BaseException:
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return qconfig


class _ShardFiller:
  """Tensors into safetensors files of at most ``max_bytes`` each (one tensor may exceed it),
  each written when full; :meth:`finish` names them as Hugging Face does (``model.safetensors``
  alone, else ``model-0000i-of-0000N.safetensors`` and ``model.safetensors.index.json``)."""

  def __init__(self, directory: str, max_bytes: int):
    self.directory, self.max_bytes = directory, max_bytes
    self.pending: dict[str, np.ndarray] = {}
    self.pending_bytes = self.total = 0
    self.parts: list[list[str]] = []
    self.names: list[str] = []

  def put(self, name: str, x: np.ndarray) -> None:
    if self.pending and self.pending_bytes + x.nbytes > self.max_bytes:
      self._flush()
    self.pending[name] = x
    self.pending_bytes += x.nbytes
    self.total += x.nbytes

  def _flush(self) -> None:
    write_safetensors(os.path.join(self.directory, f".part-{len(self.parts):05d}"), self.pending,
                      {"format": "pt"})
    self.parts.append(sorted(self.pending))
    self.pending, self.pending_bytes = {}, 0

  def finish(self) -> None:
    if self.pending or not self.parts:
      self._flush()
    n = len(self.parts)
    self.names = (["model.safetensors"] if n == 1 else
                  [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
    for i, name in enumerate(self.names):
      os.replace(os.path.join(self.directory, f".part-{i:05d}"),
                 os.path.join(self.directory, name))
    if n > 1:
      index = {"metadata": {"total_size": self.total},
               "weight_map": {t: name for name, part in zip(self.names, self.parts)
                              for t in part}}
      with atomic_write(os.path.join(self.directory, "model.safetensors.index.json")) as f:
        f.write(json.dumps(index, indent=2, sort_keys=True).encode("utf-8"))


def _pack_all(leaves, shards: _ShardFiller, hp: LlamaHParams, group: int | None,
              requantize: bool, notes: list[str] | None, hf_config: Mapping[str, Any] | None,
              hf_config_extra: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict]:
  """Packs every leaf into ``shards`` (read there if lazy); returns ``(quantization_config,
  config.json)``."""
  schemes: dict[_Scheme, list[str]] = {}
  float_linears: list[str] = []
  embed_dtype = None
  for p, hf_name, leaf in leaves:
    leaf = load_leaf(leaf)
    module, linear = hf_name.rpartition(".")[0], p.endswith("/kernel")
    if is_qarray(leaf):
      if not linear:
        tied = (" (a tied head: quantize the model without --head / jq.head_rule, or export "
                "to GGUF)" if p == "embed/embedding" else "")
        raise CompressedTensorsError(f"params/{p}: shape {tuple(leaf.shape)} "
                                     f"{leaf.qtype.value}: only Linear kernels can be quantized "
                                     "in a compressed-tensors checkpoint (embeddings and norms "
                                     f"stay float){tied}")
      try:
        scheme, ts = _ct_from_qarray(leaf, module, group)
      except CompressedTensorsError:
        if not requantize:
          raise
        scheme, ts = _ct_from_qarray(_requantized_qarray(leaf), module, group)
        if notes is not None:
          notes.append(f"params/{p}: re-rounded from {leaf.qtype.value} "
                       f"{'sym' if leaf.zero_point is None else 'asym'} tile {tuple(leaf.tile)} to "
                       f"compressed-tensors {scheme.kind}{scheme.num_bits} "
                       f"{'sym' if scheme.symmetric else 'asym'} {scheme.strategy}"
                       f"{'' if scheme.group_size is None else f' {scheme.group_size}'}")
      schemes.setdefault(scheme, []).append(module)
      for k, v in ts.items():
        shards.put(f"{module}.{k}", v)
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
      shards.put(hf_name, np.ascontiguousarray(x))
  if not schemes:
    raise CompressedTensorsError("params has no QArray kernels; nothing to compress (use "
                                 "jq.io.save or plain safetensors for float models)")
  # a tied head has no lm_head tensor, but transformers and vLLM build the Linear: ignore it
  quantized_head = any("lm_head" in modules for modules in schemes.values())
  ignore = sorted(set(float_linears) | (set() if quantized_head else {"lm_head"}))
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
    if len(schemes) > 1 and notes is not None:
      notes.append(f"{len(schemes)} weight schemes with zero points in one checkpoint: vLLM loads "
                   "it, transformers 5.x does not (its decompression applies the first config "
                   "group's scheme to every dense layer); re-quantize with one grid for "
                   "transformers")
    experts = sorted(m for sc, modules in schemes.items() if not sc.symmetric
                     for m in modules if ".experts." in m)
    if experts and notes is not None:
      notes.append(f"{len(experts)} expert linears with zero points (e.g. {experts[0]}): vLLM "
                   "loads them, transformers 5.x does not (it fuses the experts on load without "
                   "their weight_zero_point); a symmetric recipe (ct-w4a16) loads in both")
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
  return qconfig, hf


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

_MAX_UNBOUNDED_REPEATS = 4      # `.*` / `+` / `{n,}` per pattern (each multiplies backtracking)
_MAX_PATTERN_CHARS = 1000
_BRACES = re.compile(r"\{(\d+)\}|\{(\d*),(\d*)\}")
_PATTERNS: dict[str, re.Pattern] = {}


def _regex_risk(pattern: str) -> str | None:
  """Why ``pattern`` could backtrack catastrophically (None: it cannot by this syntactic check).

  Refused: a group repeated more than once (``*``, ``+``, ``{n,}``, ``{n,m}`` with ``m > 1``)
  that itself contains a repetition or an alternation (``(?:.+)+``, ``(a|a)*``: exponential
  time), more than :data:`_MAX_UNBOUNDED_REPEATS` unbounded repetitions (``.*.*.*...``: a high
  polynomial), or more than :data:`_MAX_PATTERN_CHARS` characters.  Conservative: some harmless
  patterns (``(?:q|k)+``) are refused too; ``ignore``/``targets`` patterns in real checkpoints
  (``re:.*lm_head``, ``re:model.layers.*.mlp.gate$``) pass.
  """
  if len(pattern) > _MAX_PATTERN_CHARS:
    return f"is longer than {_MAX_PATTERN_CHARS} characters"
  stack = [[False, False]]      # per open group: [holds a repetition, holds an alternation]
  closed = None                 # flags of the group that just closed (what a quantifier repeats)
  unbounded, i, n = 0, 0, len(pattern)
  while i < n:
    c = pattern[i]
    if c == "\\":
      i, closed = i + 2, None
      continue
    if c == "[":                # a character class is one atom
      j = i + 1
      j += j < n and pattern[j] == "^"
      j += j < n and pattern[j] == "]"
      while j < n and pattern[j] != "]":
        j += 2 if pattern[j] == "\\" else 1
      i, closed = j + 1, None
      continue
    if c == "(":
      stack.append([False, False])
      i, closed = i + 1, None
      continue
    if c == ")" and len(stack) > 1:
      closed = stack.pop()
      stack[-1][0] |= closed[0]
      stack[-1][1] |= closed[1]
      i += 1
      continue
    most, length = -1, 0        # the quantifier at i: its maximum count (None: unbounded)
    if c in "*+":
      most, length = None, 1
    elif c == "?":
      most, length = 1, 1
    elif c == "{":
      m = _BRACES.match(pattern, i)
      if m:
        most = int(m.group(1)) if m.group(1) else (int(m.group(3)) if m.group(3) else None)
        length = m.end() - i
    if length:
      if most is None or most > 1:
        if closed is not None and (closed[0] or closed[1]):
          return ("repeats a group that itself contains a repetition or an alternation (nested "
                  "quantifiers can take exponential time)")
        unbounded += most is None
      stack[-1][0] = True
      i += length
      i += i < n and pattern[i] in "?+"   # lazy / possessive
      closed = None
      continue
    if c == "|":
      stack[-1][1] = True
    i, closed = i + 1, None
  if unbounded > _MAX_UNBOUNDED_REPEATS:
    return (f"has {unbounded} unbounded repetitions (more than {_MAX_UNBOUNDED_REPEATS} can take "
            "a very long time to fail)")
  return None


def _compiled(pattern: str) -> re.Pattern:
  """``pattern`` compiled, once checked by :func:`_regex_risk` (cached)."""
  hit = _PATTERNS.get(pattern)
  if hit is None:
    risk = _regex_risk(pattern)
    if risk:
      raise CompressedTensorsError(f"quantization_config: pattern 're:{pattern}' {risk}; jq "
                                   "refuses it (rewrite it without nested repetition)")
    try:
      hit = re.compile(pattern)
    except re.error as e:
      raise CompressedTensorsError(f"quantization_config: pattern 're:{pattern}' is not a valid "
                                   f"regular expression ({e})") from e
    _PATTERNS[pattern] = hit
  return hit


def _matches(module: str, target: str) -> bool:
  """Whether a target (or ignore) entry names ``module``, a linear's name (the only modules
  schemes are looked up for: the class target ``Linear`` matches each of them, also the
  projections not named ``*_proj``: Mixtral's experts ``w1``/``w2``/``w3``, MoE routers)."""
  if not isinstance(target, str):
    raise CompressedTensorsError(f"quantization_config: target/ignore entry {target!r} is not a "
                                 "string")
  if target.startswith("re:"):
    return _compiled(target[3:]).match(module) is not None
  if target == "Linear":
    return True
  return target == module


def _str_list(v: Any, where: str) -> list[str]:
  if v is None:
    return []
  if not isinstance(v, list) or not all(isinstance(t, str) for t in v):
    raise CompressedTensorsError(f"quantization_config.{where} must be a list of strings, got "
                                 f"{v!r}")
  return v


def _scheme_for(module: str, qconfig: Mapping[str, Any]) -> tuple[dict, dict | None, str] | None:
  """The ``(weights, input_activations, format)`` scheme of linear ``module``; ``None``: float."""
  if any(_matches(module, t) for t in _str_list(qconfig.get("ignore"), "ignore")):
    return None
  groups = qconfig.get("config_groups") or {}
  if not isinstance(groups, Mapping):
    raise CompressedTensorsError(f"quantization_config.config_groups is not a mapping: {groups!r}")
  for name, g in groups.items():
    if not isinstance(g, Mapping):
      raise CompressedTensorsError(f"quantization_config.config_groups.{name} is a preset "
                                   f"reference ({g!r}); only explicit schemes are supported")
    if any(_matches(module, t) for t in _str_list(g.get("targets"), f"config_groups.{name}."
                                                  "targets")):
      w, a = g.get("weights"), g.get("input_activations")
      for what, d in (("weights", w), ("input_activations", a)):
        if d is not None and not isinstance(d, Mapping):
          raise CompressedTensorsError(f"quantization_config.config_groups.{name}.{what} is not "
                                       f"a mapping: {d!r}")
      return w, a, g.get("format") or qconfig.get("format")
  return None


def _shard_files(path: Path, index: Path) -> dict[str, list[str]]:
  """``{shard file name: [tensor names]}`` from ``model.safetensors.index.json``, every file
  checked to lie inside the checkpoint directory."""
  try:
    idx = json.loads(index.read_text(encoding="utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
    raise CompressedTensorsError(f"{index}: not valid JSON ({e})") from e
  wmap = idx.get("weight_map") if isinstance(idx, dict) else None
  if not isinstance(wmap, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                           for k, v in wmap.items()):
    raise CompressedTensorsError(f"{index}: 'weight_map' must map tensor names to file names")
  root = path.resolve()
  files: dict[str, list[str]] = {}
  for name, fname in wmap.items():
    files.setdefault(fname, []).append(name)
  for fname in files:
    target = root / fname
    # the directory holding the shard must lie inside the checkpoint (the file itself may be a
    # symlink, as in the Hugging Face cache, where snapshots link to ../../blobs/<hash>)
    parent = target.parent.resolve()
    if (os.path.isabs(fname) or ".." in Path(fname).parts
        or not (parent == root or root in parent.parents)):
      raise CompressedTensorsError(f"{index}: weight_map names {fname!r}, which lies outside the "
                                   f"checkpoint directory {root}; refusing to read it")
  return files


def _read_all(path: Path) -> dict[str, np.ndarray]:
  index = path / "model.safetensors.index.json"
  if index.is_file():
    files = _shard_files(path, index)
  elif (path / "model.safetensors").is_file():
    files = {"model.safetensors": None}
  else:
    raise FileNotFoundError(f"{path}: no model.safetensors (or model.safetensors.index.json)")
  out: dict[str, np.ndarray] = {}
  origin: dict[str, str] = {}
  for fname in sorted(files):
    ts = read_tensors(path / fname)
    for name in files[fname] or ():
      if name not in ts:
        raise CompressedTensorsError(f"{index}: weight_map puts tensor {name!r} in {fname}, but "
                                     "that file does not hold it")
    for name, arr in ts.items():
      if name in out:
        raise CompressedTensorsError(f"{path}: tensor {name!r} is stored in both "
                                     f"{origin[name]} and {fname}")
      out[name], origin[name] = arr, fname
  return out


def load_compressed_tensors(path: str | os.PathLike, config: Any = None
                            ) -> tuple[dict[str, Any], dict[str, Any]]:
  """``(hf_config, params)``: a compressed-tensors decoder checkpoint as a jq param tree.

  ``config`` (a ``DecoderConfig``) names the family's tensors (biases, q/k norms, Gemma 2/3's
  norms; see ``jq.io.decoder_names``); ``None`` reads a plain Llama.

  Quantized linears become kernel QArrays ``(in, out)`` (symmetric schemes -> signed jq types,
  asymmetric -> unsigned with the zero point shifted by ``2^(b-1)``), W8A8 layers carry an
  ``ActivationQuant``; ``float-quantized`` (FP8) linears become ``fp8_e4m3`` QArrays (with fp8
  activations when the scheme has them); other tensors are float arrays (linears transposed to
  ``(in, out)``).
  ``params`` is the inner dict (wrap as ``{"params": params}``); :func:`llama_hparams` turns
  ``hf_config`` into ``LlamaConfig`` fields.

  Raises:
    FileNotFoundError: missing files.
    CompressedTensorsError: not compressed-tensors, unsupported scheme (NVFP4, fp8 block/group
      scales, block or token weight strategies, >8 bits), tensors inconsistent with the scheme,
      unknown modules.
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
  fused = _fused_modules(config)
  for module, ts in modules.items():
    parts = fused.get(module)
    p = parts[0][0] if parts else jq_param_path(module, config)
    if "bias" in ts:   # a linear's bias is stored float beside its (possibly packed) weight
      if not p.endswith("/kernel"):
        raise CompressedTensorsError(f"{module}: a bias on a module that is not a linear")
      _set_parts(params, p.rpartition("/")[0] + "/bias", jnp.asarray(ts.pop("bias")), parts,
                 module)
    scheme = _scheme_for(module, qconfig) if p.endswith("kernel") else None
    if scheme is None or scheme[0] is None:
      if "weight" not in ts or set(ts) != {"weight"}:
        raise CompressedTensorsError(f"{module}: tensors {sorted(ts)} but no quantization scheme "
                                     "applies to it (ignored or untargeted)")
      x = ts["weight"]
      if p.endswith("kernel"):
        x = x.T
      _set_parts(params, p, jnp.asarray(np.ascontiguousarray(x)), parts, module)
    else:
      _set_parts(params, p, _qarray_from_module(module, ts, *scheme), parts, module)
  return hf, params


def _fused_modules(config: Any) -> dict[str, list[tuple[str, tuple[int, int]]]]:
  """Hugging Face module of each fused projection (Phi-3's ``qkv_proj``) -> ``(jq kernel path,
  rows)`` of its parts, in row order; empty unless ``config.fused_projections``."""
  if not getattr(config, "fused_projections", False):
    return {}
  out: dict[str, list[tuple[str, tuple[int, int]]]] = {}
  for t in decoder_names.decoder_tensors(config):
    if t.rows is not None and t.path[-1] == "kernel":
      out.setdefault(t.hf.removesuffix(".weight"), []).append((t.jq, t.rows))
  return out


def _set_parts(tree: dict, path: str, value: Any,
               parts: list[tuple[str, tuple[int, int]]] | None, module: str) -> None:
  """``_set`` of one module's value, or of each fused part's output columns (``parts``; the
  path's last name, ``kernel`` or ``bias``, kept)."""
  if not parts:
    _set(tree, path, value)
    return
  leaf = path.rpartition("/")[2]
  if value.shape[-1] != parts[-1][1][1]:
    raise CompressedTensorsError(f"{module}: {value.shape[-1]} output features; the config's "
                                 f"fused parts have {parts[-1][1][1]}")
  if is_qarray(value):
    try:
      pieces = split_outputs(value, [rows for _, rows in parts], module)
    except ValueError as e:
      raise CompressedTensorsError(str(e)) from e
  else:
    pieces = [value[..., a:b] for _, (a, b) in parts]
  for (p, _), piece in zip(parts, pieces):
    _set(tree, p.rpartition("/")[0] + "/" + leaf, piece)


def _set(tree: dict, path: str, value: Any) -> None:
  parts = path.split("/")
  for k in parts[:-1]:
    tree = tree.setdefault(k, {})
  tree[parts[-1]] = value


_MODULE_TENSORS = frozenset(("weight", "weight_packed", "weight_shape", "weight_scale",
                             "weight_zero_point", "input_scale", "input_zero_point"))


def _flag(d: Mapping[str, Any], key: str, default: bool, where: str) -> bool:
  v = d.get(key, default)
  if v is None:
    return default
  if not isinstance(v, bool):
    raise CompressedTensorsError(f"{where}: {key}={v!r} is not a boolean")
  return v


def _positive_scales(x: np.ndarray, what: str, where: str) -> None:
  x = np.asarray(x)
  if not (np.issubdtype(x.dtype, np.floating) or x.dtype == ml_dtypes.bfloat16):
    raise CompressedTensorsError(f"{where}: {what} has shape {x.shape} dtype {x.dtype}; expected "
                                 "floating-point scales")
  f = x.astype(np.float32)
  bad = ~(np.isfinite(f) & (f > 0))
  if bad.any():
    i = np.unravel_index(int(np.argmax(bad)), f.shape) if f.ndim else ()
    raise CompressedTensorsError(f"{where}: {what} must be finite and positive; {int(bad.sum())} "
                                 f"of {f.size} are not, first at index {tuple(map(int, i))}: "
                                 f"{f[i]}")


def _int_zero_points(z: np.ndarray, what: str, lo: int, hi: int, where: str) -> np.ndarray:
  z = np.asarray(z)
  if not np.issubdtype(z.dtype, np.integer):
    raise CompressedTensorsError(f"{where}: {what} has dtype {z.dtype}; expected integers")
  if z.size and (z.min() < lo or z.max() > hi):
    raise CompressedTensorsError(f"{where}: {what} span [{z.min()}, {z.max()}], outside "
                                 f"[{lo}, {hi}]")
  return z


def _qarray_from_module(module: str, ts: Mapping[str, np.ndarray], w: Mapping[str, Any],
                        a: Mapping[str, Any] | None, fmt: str | None) -> QArray:
  where = f"{module} (tensors {sorted(ts)})"
  unknown = sorted(set(ts) - _MODULE_TENSORS)
  if unknown:
    raise CompressedTensorsError(f"{where}: tensors {unknown} are not part of a compressed-tensors "
                                 "int scheme jq reads (e.g. g_idx activation reordering); "
                                 "refusing to ignore them")
  if w.get("type", "int") == "float":
    return _fp8_from_module(module, ts, w, a, where)
  if w.get("type", "int") != "int":
    raise CompressedTensorsError(f"{where}: weight type {w.get('type')!r} is not supported (int "
                                 "or float)")
  bits = w.get("num_bits", 8)
  if isinstance(bits, bool) or not isinstance(bits, int) or bits not in (2, 3, 4, 8):
    raise CompressedTensorsError(f"{where}: num_bits={bits!r}; jq supports 2, 3, 4 and 8")
  sym = _flag(w, "symmetric", True, f"{where}: weights")
  strategy = w.get("strategy") or ("group" if w.get("group_size") else "tensor")
  if strategy not in ("tensor", "channel", "group"):
    raise CompressedTensorsError(f"{where}: weight strategy {strategy!r} is not supported")
  g = w.get("group_size") if strategy == "group" else None
  if strategy == "group" and (isinstance(g, bool) or not isinstance(g, int) or g < 1):
    raise CompressedTensorsError(f"{where}: group_size={g!r} is not a positive integer")
  if "weight_scale" not in ts:
    raise CompressedTensorsError(f"{where}: missing weight_scale")
  scale = ts["weight_scale"]
  _positive_scales(scale, "weight_scale", where)
  if sym and "weight_zero_point" in ts:
    raise CompressedTensorsError(f"{where}: the scheme says symmetric=true but the module stores a "
                                 "weight_zero_point (the config and the data disagree)")
  if "weight_packed" in ts:
    if "weight_shape" not in ts:
      raise CompressedTensorsError(f"{where}: weight_packed without weight_shape")
    ws = np.asarray(ts["weight_shape"])
    if not np.issubdtype(ws.dtype, np.integer) or ws.size != 2 or ws.min() < 0:
      raise CompressedTensorsError(f"{where}: weight_shape {ws.tolist()} (dtype {ws.dtype}) is not "
                                   "two non-negative integers")
    shape = tuple(int(s) for s in ws.reshape(-1))
    packed = np.asarray(ts["weight_packed"])
    try:
      qv = unpack_int32(packed, bits, shape)
    except ValueError as e:
      raise CompressedTensorsError(f"{where}: {e}") from e
    # the words must be exactly the packing of weight_shape's values: a shorter weight_shape would
    # otherwise silently drop the values in the last word (whose padding must be zero)
    if not np.array_equal(pack_int32(qv, bits), packed):
      raise CompressedTensorsError(
          f"{where}: weight_shape {list(shape)} disagrees with weight_packed {packed.shape}: the "
          f"packed words hold {bits}-bit values beyond column {shape[1]} (nonzero padding)")
  elif "weight" in ts and ts["weight"].dtype == np.int8:
    stated = np.asarray(ts.get("weight_shape", ts["weight"].shape)).reshape(-1).tolist()
    if tuple(stated) != ts["weight"].shape:
      raise CompressedTensorsError(f"{where}: weight_shape {stated} disagrees with the int8 "
                                   f"weight's shape {ts['weight'].shape}")
    qv = ts["weight"]
    if qv.ndim != 2:
      raise CompressedTensorsError(f"{where}: int8 weight has shape {qv.shape}; expected 2-D")
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
      if not np.array_equal(pack_int32(zp, bits, packed_dim=0), z):
        raise CompressedTensorsError(f"{where}: weight_zero_point {z.shape} holds values beyond "
                                     f"the {want[0]} output rows (nonzero padding)")
    else:
      z = _int_zero_points(z, "weight_zero_point", lo, hi, where)
      if (z.size != 1) if strategy == "tensor" else (tuple(z.shape) != want):
        raise CompressedTensorsError(f"{where}: weight_zero_point shape {z.shape}, expected {want} "
                                     f"for strategy {strategy}")
      zp = z.reshape(want)
  act = None
  if a is None:
    stray = sorted({"input_scale", "input_zero_point"} & set(ts))
    if stray:
      raise CompressedTensorsError(f"{where}: {stray} stored but the scheme quantizes no input "
                                   "activations")
  else:
    if a.get("num_bits", 8) != 8 or a.get("type", "int") != "int" or bits != 8:
      raise CompressedTensorsError(f"{where}: input activations {a} are not int8 (jq: W8A8 only)")
    asym = not _flag(a, "symmetric", True, f"{where}: input_activations")
    dynamic = _flag(a, "dynamic", False, f"{where}: input_activations")
    spec = ActivationSpec(mode=ActMode.DYNAMIC if dynamic else ActMode.STATIC,
                          qtype=QType.UINT8 if asym else QType.INT8, symmetric=not asym)
    if spec.mode is ActMode.STATIC:
      if a.get("strategy") != "tensor" or "input_scale" not in ts:
        raise CompressedTensorsError(f"{where}: static activations need strategy 'tensor' and an "
                                     "input_scale tensor")
      if asym != ("input_zero_point" in ts):
        raise CompressedTensorsError(
            f"{where}: input_activations say symmetric={not asym} but the module "
            f"{'lacks' if asym else 'stores'} an input_zero_point (the config and the data "
            "disagree)")
      if np.asarray(ts["input_scale"]).size != 1:
        raise CompressedTensorsError(f"{where}: input_scale has shape {ts['input_scale'].shape}; "
                                     "expected one per-tensor scale")
      _positive_scales(ts["input_scale"], "input_scale", where)
      s = jnp.asarray(np.asarray(ts["input_scale"], np.float32).reshape(()))
      z = None
      if asym:
        iz = _int_zero_points(ts["input_zero_point"], "input_zero_point", -128, 127, where)
        if iz.size != 1:
          raise CompressedTensorsError(f"{where}: input_zero_point has shape {iz.shape}; expected "
                                       "one per-tensor zero point")
        z = jnp.asarray((iz.astype(np.int32).reshape(()) + 128).astype(np.uint8))
      act = ActivationQuant(scale=s, zero_point=z, spec=spec)
    else:
      stray = sorted({"input_scale", "input_zero_point"} & set(ts))
      if stray:
        raise CompressedTensorsError(f"{where}: {stray} stored but the input activations are "
                                     "dynamic (per-token scales computed at run time)")
      act = ActivationQuant(scale=None, zero_point=None, spec=spec)
  q = _qarray_from_ct(np.asarray(qv), np.asarray(scale).reshape(want) if strategy != "tensor"
                      else np.asarray(scale).reshape(1), zp, bits, sym, strategy, g, act)
  return q.validate(module)


def _fp8_from_module(module: str, ts: Mapping[str, np.ndarray], w: Mapping[str, Any],
                     a: Mapping[str, Any] | None, where: str) -> QArray:
  """An fp8 kernel QArray ``(in, out)`` from a ``float-quantized`` module (``weight`` float8
  ``(out, in)``, per-channel or per-tensor ``weight_scale``, fp8 input activations if any)."""
  if w.get("num_bits", 8) != 8 or not _flag(w, "symmetric", True, f"{where}: weights"):
    raise CompressedTensorsError(f"{where}: weight type 'float' with num_bits="
                                 f"{w.get('num_bits', 8)!r}, symmetric={w.get('symmetric')!r}: jq "
                                 "reads float weights as symmetric 8-bit (float8 e4m3) only")
  strategy = w.get("strategy") or "tensor"
  if strategy not in ("tensor", "channel"):
    raise CompressedTensorsError(f"{where}: float weight strategy {strategy!r} is not supported "
                                 "(tensor or channel)")
  stray = sorted({"weight_zero_point", "weight_packed", "input_zero_point"} & set(ts))
  if stray:
    raise CompressedTensorsError(f"{where}: {stray} stored with a symmetric float8 scheme (the "
                                 "config and the data disagree)")
  if "weight" not in ts or "weight_scale" not in ts:
    raise CompressedTensorsError(f"{where}: a float-quantized module needs weight and "
                                 "weight_scale")
  qv = np.asarray(ts["weight"])
  if qv.dtype != ml_dtypes.float8_e4m3fn or qv.ndim != 2:
    raise CompressedTensorsError(f"{where}: weight has shape {qv.shape} dtype {qv.dtype}; "
                                 "expected a 2-D float8_e4m3fn (F8_E4M3) tensor")
  if "weight_shape" in ts and np.asarray(ts["weight_shape"]).reshape(-1).tolist() != list(qv.shape):
    raise CompressedTensorsError(f"{where}: weight_shape disagrees with the weight's shape "
                                 f"{qv.shape}")
  n_out, n_in = qv.shape
  scale = np.asarray(ts["weight_scale"])
  _positive_scales(scale, "weight_scale", where)
  if (scale.size != 1) if strategy == "tensor" else (tuple(scale.shape) != (n_out, 1)):
    raise CompressedTensorsError(f"{where}: weight_scale shape {scale.shape}, expected "
                                 f"{(1,) if strategy == 'tensor' else (n_out, 1)} for strategy "
                                 f"{strategy}")
  act = None
  if a is None:
    if "input_scale" in ts:
      raise CompressedTensorsError(f"{where}: ['input_scale'] stored but the scheme quantizes no "
                                   "input activations")
  else:
    if a.get("num_bits", 8) != 8 or a.get("type", "int") != "float" or not _flag(
        a, "symmetric", True, f"{where}: input_activations"):
      raise CompressedTensorsError(f"{where}: input activations {dict(a)} with float8 weights are "
                                   "not symmetric float8 (jq: fp8 x fp8 only)")
    dynamic = _flag(a, "dynamic", False, f"{where}: input_activations")
    if dynamic:
      if a.get("strategy", "token") != "token" or "input_scale" in ts:
        raise CompressedTensorsError(f"{where}: dynamic float8 activations need strategy 'token' "
                                     "and no input_scale")
      act = ActivationQuant(scale=None, zero_point=None, spec=ActivationSpec(
          mode=ActMode.DYNAMIC, qtype=QType.FP8_E4M3))
    else:
      if a.get("strategy") != "tensor" or "input_scale" not in ts:
        raise CompressedTensorsError(f"{where}: static activations need strategy 'tensor' and an "
                                     "input_scale tensor")
      if np.asarray(ts["input_scale"]).size != 1:
        raise CompressedTensorsError(f"{where}: input_scale has shape {ts['input_scale'].shape}; "
                                     "expected one per-tensor scale")
      _positive_scales(ts["input_scale"], "input_scale", where)
      act = ActivationQuant(scale=jnp.asarray(np.asarray(ts["input_scale"], np.float32).reshape(())),
                            zero_point=None, spec=ActivationSpec(mode=ActMode.STATIC,
                                                                 qtype=QType.FP8_E4M3))
  s, tile = ((scale.reshape(1, 1), (n_in, n_out)) if strategy == "tensor"
             else (scale.reshape(n_out, 1).T, (n_in, 1)))
  q = QArray(values=jnp.asarray(np.ascontiguousarray(qv.T)),
             scale=jnp.asarray(np.ascontiguousarray(s)), zero_point=None, activation=act,
             qtype=QType.FP8_E4M3, shape=(n_in, n_out), tile=tile)
  return q.validate(module)


__all__ = ["export_compressed_tensors", "export_model", "load_compressed_tensors", "pack_int32", "unpack_int32",
           "hf_llama_config", "llama_hparams", "hf_module_name", "jq_param_path",
           "CompressedTensorsError", "PACK_QUANTIZED", "INT_QUANTIZED", "FLOAT_QUANTIZED",
           "CT_VERSION"]
