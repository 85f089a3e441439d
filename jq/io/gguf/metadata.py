"""Writing GGUF key/value metadata: the GGUF value type of a Python value, added to a writer.

The ``tokenizer.ggml.*`` arrays get the types llama.cpp expects (strings, int32 token types, float32
scores) whatever Python values they arrive as.
"""
from __future__ import annotations

from typing import Any

import gguf
import numpy as np

from jq.io.gguf.types import GGUFExportError


_TOKENIZER_TYPES: dict[str, tuple[Any, Any]] = {
    "tokenizer.ggml.tokens": (gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING),
    "tokenizer.ggml.merges": (gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING),
    "tokenizer.ggml.token_type": (gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32),
    "tokenizer.ggml.scores": (gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.FLOAT32),
}


def _value_type(v: Any) -> gguf.GGUFValueType:
  if isinstance(v, (bool, np.bool_)):
    return gguf.GGUFValueType.BOOL
  if isinstance(v, (int, np.integer)):
    return gguf.GGUFValueType.UINT32 if 0 <= v < 2**32 else gguf.GGUFValueType.INT64
  if isinstance(v, (float, np.floating)):
    return gguf.GGUFValueType.FLOAT32
  if isinstance(v, str):
    return gguf.GGUFValueType.STRING
  if isinstance(v, (list, tuple)):
    return gguf.GGUFValueType.ARRAY
  raise GGUFExportError(f"metadata value {v!r} of type {type(v).__name__} has no GGUF type")


def _add_kv(writer: gguf.GGUFWriter, key: str, v: Any) -> None:
  if key in _TOKENIZER_TYPES:
    vt, sub = _TOKENIZER_TYPES[key]
    writer.add_key_value(key, list(v), vt, sub)
    return
  vt = _value_type(v)
  if vt is gguf.GGUFValueType.ARRAY:
    if not len(v):
      return
    sub = _value_type(v[0])
    if sub is gguf.GGUFValueType.UINT32 and any(int(x) < 0 for x in v):
      sub = gguf.GGUFValueType.INT32
    writer.add_key_value(key, list(v), vt, sub)
  else:
    writer.add_key_value(key, v, vt)
