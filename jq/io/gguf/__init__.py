"""GGUF (llama.cpp) export and import of jq QArrays, byte-exact with gguf-py's / ggml's quantizers.

GGUF stores a linear weight as a row-major ``(out, in)`` matrix (GGUF lists dims innermost first,
``ne = [in, out]``) cut into blocks of 32 consecutive ``in`` values; each block carries an fp16
scale ``d`` (and for the ``_1`` types an fp16 offset ``m``).  jq kernels are ``(in, out)``, so a
GGUF block is a jq group of 32 along the contracting axis (``tile = (32, 1)``).

Per GGUF type, the formulas of ``gguf/quants.py`` (gguf-py 0.19, bit-exact with ggml-quants.c) and
the jq twin (:func:`gguf_spec`, :func:`quantize_for_gguf`)::

  type  gguf quantize (per block x[0:32], float32 math)            gguf dequant      jq QArray twin
  Q8_0  d = amax/127; q = round_half_away(x * (1/d))                x = d*q           int8, zp None
  Q4_0  d = xmax/-8 (xmax: signed value of largest |x|);           x = d*(u-8)       uint4, zp 8|7
        u = clip(trunc(x * (1/d) + 8.5), 0, 15)
  Q5_0  d = xmax/-16; u = clip(trunc(x * (1/d) + 16.5), 0, 31)     x = d*(u-16)      int8 (holds 5 bit)
  Q4_1  d = (max-min)/15; m = min;                                 x = d*u + m       none (float)
        u = clip(trunc((x-min) * (1/d) + 0.5), 0, 15)
  Q5_1  as Q4_1 with 31                                            x = d*u + m       none (float)
  Q6_K  256-blocks; per 16: make_qx_quants (rmse search), int8     x = d*sc*(q-32)   int8, g16, f32 scale
        sub-scales sc = nearest(-128/max_scale * scale), d fp16       (import; export exact-fit)
  Q4_K  256-blocks; per 32: make_qkx2_quants (weighted min/scale    x = d*sc*q - dmin*m   none (float)
        search), 6-bit sc/m, fp16 d/dmin
  Q3_K  (import only) 256-blocks, 16 6-bit sub-scales, 3-bit q     x = d*(sc-32)*q   int4, g16, f32 scale

Modules, one job each:

* :mod:`~jq.io.gguf.types`: ``GGMLType``, :func:`to_ggml_type`, type tables, error classes.
* :mod:`~jq.io.gguf.blocks`: block fields and ggml's block byte layout (encode / decode).
* :mod:`~jq.io.gguf.reference`: ggml's / gguf-py's reference quantizers (legacy and K-quants).
* :mod:`~jq.io.gguf.qarray_np`: numpy twins of QArray pack / unpack / dequantize.
* :mod:`~jq.io.gguf.fit`: exact fit of a QArray's grid into GGUF blocks (export, no re-rounding).
* :mod:`~jq.io.gguf.codec`: one tensor, QArray / float <-> GGUF data (:func:`encode_tensor`,
  :func:`decode_tensor`, :func:`quantize_for_gguf`, :func:`gguf_spec`).
* :mod:`~jq.io.gguf.reader`: GGUF files: metadata, tensor table, :func:`load_gguf_qarrays`.
* :mod:`~jq.io.gguf.metadata`: writing key/value metadata.
* :mod:`~jq.io.gguf.llama`: Llama-family models (:func:`export_gguf`, :func:`gguf_to_params`).

Model level: :func:`export_gguf` writes a Llama-family param tree (``models/decoder.py`` layout,
float and/or QArray leaves) as a llama.cpp ``llama`` GGUF, re-applying llama.cpp's Q/K row
permutation; :func:`load_gguf_qarrays` reads any GGUF into ``{name: QArray | float32 array}``;
:func:`gguf_to_params` turns that back into the jq param tree.

Example:
  >>> meta, _ = load_gguf_qarrays("SmolLM2-135M-Instruct.Q4_1.gguf")
  >>> export_gguf(qparams, config, tokenizer_metadata(meta), "smollm2.q8_0.gguf", "q8_0")
"""
from jq.io.gguf.codec import decode_tensor, encode_tensor, gguf_spec, quantize_for_gguf
from jq.io.gguf.llama import (LlamaHParams, export_gguf, export_model, gguf_to_params,
                              load_gguf_params)
from jq.io.gguf.reader import load_gguf_qarrays, read_gguf_metadata, tokenizer_metadata
from jq.io.gguf.types import (EXPORT_TYPES, QARRAY_IMPORT_TYPES, TWIN_TYPES, GGMLType,
                              GGUFExportError, GGUFFormatError, to_ggml_type)

__all__ = ["GGMLType", "EXPORT_TYPES", "TWIN_TYPES", "QARRAY_IMPORT_TYPES", "GGUFFormatError",
           "GGUFExportError", "LlamaHParams", "to_ggml_type", "gguf_spec", "quantize_for_gguf",
           "encode_tensor", "decode_tensor", "load_gguf_qarrays", "read_gguf_metadata",
           "tokenizer_metadata", "export_gguf", "export_model", "gguf_to_params",
           "load_gguf_params"]
