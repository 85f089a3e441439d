"""Reading GGUF files: metadata, tensor table, and every tensor as a QArray or float32 array.

:class:`_GGUFFile` is a minimal little-endian GGUF v2/v3 parser (tensor data memory-mapped);
:func:`load_gguf_qarrays` decodes each tensor with :func:`jq.io.gguf.codec.decode_tensor`, so
``{name: QArray | float32 array}`` comes back for any GGUF, whatever its architecture.
"""
from __future__ import annotations

import dataclasses
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from jq.io.gguf.codec import decode_tensor
from jq.io.gguf.types import GGMLType, GGUFFormatError
from jq.qarray import QArray

_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                   10: "<Q", 11: "<q", 12: "<d"}
_NP_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<?",
               10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass(frozen=True)
class _TensorInfo:
  name: str
  shape: tuple[int, ...]   # numpy order (GGUF dims reversed)
  type: GGMLType
  offset: int              # absolute byte offset in the file
  nbytes: int


class _GGUFFile:
  """A minimal little-endian GGUF v2/v3 parser (header, metadata, tensor table; data memory-mapped).

  gguf-py's ``GGUFReader`` builds a numpy view per metadata element, which takes ~10 s for a
  50k-token vocabulary; this reads the same fields with ``struct`` in well under a second and
  reports truncation and inconsistencies (tensors past the end of the file or overlapping one
  another) as :class:`GGUFFormatError`.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    if not self.path.is_file():
      raise FileNotFoundError(f"GGUF file not found: {self.path}")
    size = self.path.stat().st_size
    if size < 24:
      raise GGUFFormatError(f"{self.path}: {size} bytes is too short for a GGUF header")
    self.data = np.memmap(self.path, mode="r", dtype=np.uint8)
    self.buf = memoryview(self.data)
    self.pos = 0
    try:
      self._parse()
    except (struct.error, UnicodeDecodeError, IndexError, OverflowError, ValueError) as e:
      if isinstance(e, GGUFFormatError):
        raise
      raise GGUFFormatError(f"{self.path}: corrupt or truncated GGUF at byte {self.pos} "
                            f"({type(e).__name__}: {e})") from e

  def _unpack(self, fmt: str):
    n = struct.calcsize(fmt)
    if self.pos + n > len(self.buf):
      raise GGUFFormatError(f"{self.path}: truncated GGUF (needs byte {self.pos + n}, file has "
                            f"{len(self.buf)})")
    v = struct.unpack_from(fmt, self.buf, self.pos)
    self.pos += n
    return v[0] if len(v) == 1 else v

  def _string(self) -> str:
    n = self._unpack("<Q")
    if self.pos + n > len(self.buf):
      raise GGUFFormatError(f"{self.path}: truncated GGUF (string of {n} bytes at {self.pos})")
    s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8")
    self.pos += n
    return s

  def _value(self, vtype: int) -> Any:
    if vtype in _SCALAR_FORMATS:
      return self._unpack(_SCALAR_FORMATS[vtype])
    if vtype == _STRING:
      return self._string()
    if vtype == _ARRAY:
      sub, n = self._unpack("<IQ")
      if sub in _NP_SCALARS:
        dt = np.dtype(_NP_SCALARS[sub])
        end = self.pos + n * dt.itemsize
        if end > len(self.buf):
          raise GGUFFormatError(f"{self.path}: truncated GGUF (array of {n} at {self.pos})")
        arr = np.frombuffer(self.buf[self.pos:end], dtype=dt)
        self.pos = end
        return arr.tolist()
      if sub == _STRING:
        out = []
        buf, pos, size = self.buf, self.pos, len(self.buf)
        for _ in range(n):
          if pos + 8 > size:
            raise GGUFFormatError(f"{self.path}: truncated GGUF (string array at {pos})")
          (ln,) = struct.unpack_from("<Q", buf, pos)
          pos += 8
          if pos + ln > size:
            raise GGUFFormatError(f"{self.path}: truncated GGUF (string array at {pos})")
          out.append(bytes(buf[pos:pos + ln]).decode("utf-8"))
          pos += ln
        self.pos = pos
        return out
      return [self._value(sub) for _ in range(n)]
    raise GGUFFormatError(f"{self.path}: unknown metadata value type {vtype} at byte {self.pos}")

  def _parse(self) -> None:
    magic = bytes(self.buf[:4])
    if magic != b"GGUF":
      raise GGUFFormatError(f"{self.path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    self.pos = 4
    version = self._unpack("<I")
    if version & 0xFFFF == 0:
      raise GGUFFormatError(f"{self.path}: big-endian GGUF files are not supported")
    if version not in (2, 3):
      raise GGUFFormatError(f"{self.path}: GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = self._unpack("<QQ")
    if n_tensors > len(self.buf) or n_kv > len(self.buf):
      raise GGUFFormatError(f"{self.path}: corrupt header ({n_tensors} tensors, {n_kv} keys)")
    self.metadata: dict[str, Any] = {}
    for _ in range(n_kv):
      key = self._string()
      self.metadata[key] = self._value(self._unpack("<I"))
    infos = []
    for _ in range(n_tensors):
      name = self._string()
      n_dims = self._unpack("<I")
      if n_dims > 8:
        raise GGUFFormatError(f"{self.path}: tensor {name!r} has {n_dims} dimensions")
      dims = [self._unpack("<Q") for _ in range(n_dims)]
      raw_type, offset = self._unpack("<IQ")
      infos.append((name, tuple(reversed(dims)), raw_type, offset))
    align = self.metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
      raise GGUFFormatError(f"{self.path}: general.alignment={align!r} is not a power of two")
    start = -(-self.pos // align) * align
    self.tensors: list[_TensorInfo] = []
    names = set()
    for name, shape, raw_type, offset in infos:
      try:
        t = GGMLType(raw_type)
      except ValueError:
        raise GGUFFormatError(f"{self.path}: tensor {name!r} has unknown type {raw_type}") from None
      if name in names:
        raise GGUFFormatError(f"{self.path}: duplicate tensor name {name!r}")
      names.add(name)
      bs, ts = gguf.GGML_QUANT_SIZES[t]
      if not shape or shape[-1] % bs:
        raise GGUFFormatError(f"{self.path}: tensor {name!r} shape {shape} does not split into "
                              f"{t.name} blocks of {bs}")
      nbytes = math.prod(shape[:-1]) * (shape[-1] // bs) * ts
      if start + offset + nbytes > len(self.buf):
        raise GGUFFormatError(f"{self.path}: tensor {name!r} ({t.name} {shape}) ends at byte "
                              f"{start + offset + nbytes} but the file has {len(self.buf)} bytes "
                              "(truncated?)")
      self.tensors.append(_TensorInfo(name, shape, t, start + offset, nbytes))
    self._check_disjoint()

  def _check_disjoint(self) -> None:
    """Tensor data ranges may not overlap (two tensors would share bytes: a crafted or corrupt
    table), nor run past the end of the file (checked above, per tensor)."""
    spans = sorted((ti for ti in self.tensors if ti.nbytes), key=lambda ti: ti.offset)
    for prev, ti in zip(spans, spans[1:]):
      if ti.offset < prev.offset + prev.nbytes:
        raise GGUFFormatError(
            f"{self.path}: tensors {prev.name!r} ({prev.type.name} {prev.shape}, bytes "
            f"[{prev.offset}, {prev.offset + prev.nbytes})) and {ti.name!r} ({ti.type.name} "
            f"{ti.shape}, bytes [{ti.offset}, {ti.offset + ti.nbytes})) overlap; the tensor table "
            "is corrupt")

  def tensor_bytes(self, ti: _TensorInfo) -> np.ndarray:
    return self.data[ti.offset:ti.offset + ti.nbytes]


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
  """All key/value metadata of a GGUF as Python values (lists for arrays).

  Raises:
    FileNotFoundError: ``path`` does not exist.
    GGUFFormatError: not a GGUF (v2/v3, little-endian), or truncated/corrupt.
  """
  return _GGUFFile(path).metadata


def load_gguf_qarrays(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, QArray | np.ndarray]]:
  """``(metadata, {tensor name: QArray or float32 array})`` of a GGUF file.

  Arrays have numpy shape = reversed GGUF dims (a linear weight is ``(out, in)``, blocks along the
  last axis).  Q8_0/Q4_0/Q5_0/Q6_K/Q3_K tensors become QArrays (see :func:`decode_tensor`); their
  ``dequantize()`` equals ``gguf.quants.dequantize`` exactly.  Q4_1/Q5_1 (float offset, no integer
  zero point), the other K-quants, IQ types and float types are returned as float32 arrays equal
  to ``gguf.quants.dequantize``.

  Raises:
    FileNotFoundError: ``path`` does not exist.
    GGUFFormatError: not a GGUF, truncated, or a tensor of the wrong size or unknown type.
  """
  f = _GGUFFile(path)
  tensors = {ti.name: decode_tensor(f.tensor_bytes(ti), ti.type, ti.shape, name=f"{path}:{ti.name}")
             for ti in f.tensors}
  return dict(f.metadata), tensors


def tokenizer_metadata(source: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
  """The ``tokenizer.*`` keys of a GGUF's metadata (or of a metadata dict), to carry over."""
  meta = source if isinstance(source, Mapping) else read_gguf_metadata(source)
  return {k: v for k, v in meta.items() if k.startswith("tokenizer.")}
