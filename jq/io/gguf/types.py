"""GGUF tensor types: the ``GGMLType`` enum, the type tables of this package and its error classes.

:func:`to_ggml_type` accepts an enum member, its name (``"q4_0"``, ``"Q8_0"``, ``"f16"``) or value.
"""
from __future__ import annotations

import gguf

GGMLType = gguf.GGMLQuantizationType
BLOCK = 32          # block length of the legacy types along the input axis
QK_K = gguf.QK_K    # super-block length of the K-quants

#: Types :func:`encode_tensor` and :func:`export_gguf` can write.
EXPORT_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q8_0, GGMLType.Q4_0,
                GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q4_K, GGMLType.Q6_K)
#: Types with an exact jq QArray twin (:func:`quantize_for_gguf`, :func:`gguf_spec`).
TWIN_TYPES = (GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q5_0)
#: Types imported as QArrays (others are imported as float32).
QARRAY_IMPORT_TYPES = TWIN_TYPES + (GGMLType.Q6_K, GGMLType.Q3_K)

_FLOAT_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)
_K_TYPES = (GGMLType.Q4_K, GGMLType.Q6_K)
_K_FALLBACK = {GGMLType.Q4_K: GGMLType.Q5_0, GGMLType.Q6_K: GGMLType.Q8_0}
_SYM = {GGMLType.Q8_0: (-128, 127), GGMLType.Q4_0: (-8, 7), GGMLType.Q5_0: (-16, 15)}
_ASYM_QMAX = {GGMLType.Q4_1: 15, GGMLType.Q5_1: 31}


class GGUFFormatError(ValueError):
  """A file is not a readable GGUF (bad magic, truncated, unknown tensor type, wrong sizes)."""


class GGUFExportError(ValueError):
  """A tensor or model cannot be written as the requested GGUF."""


def to_ggml_type(t: GGMLType | str | int) -> GGMLType:
  """``GGMLQuantizationType`` from an enum, its name (``"q4_0"``, ``"Q8_0"``, ``"f16"``) or value."""
  if isinstance(t, GGMLType):
    return t
  if isinstance(t, str):
    try:
      return GGMLType[t.strip().upper()]
    except KeyError:
      raise ValueError(f"unknown GGUF tensor type {t!r}; writable types are "
                       f"{[x.name.lower() for x in EXPORT_TYPES]}") from None
  try:
    return GGMLType(int(t))
  except (ValueError, TypeError):
    raise ValueError(f"unknown GGUF tensor type {t!r}") from None
