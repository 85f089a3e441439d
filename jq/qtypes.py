"""Element types of quantized arrays: integer grids, the NF4 table and float8 e4m3."""
from __future__ import annotations

import enum
import math

import ml_dtypes
import numpy as np

# QLoRA's NormalFloat4 (Dettmers et al., 2023): quantiles of N(0, 1) rescaled to [-1, 1], with an
# exact zero.  Values as published in bitsandbytes.
NF4_TABLE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)

# The largest finite float8 e4m3 value (OCP FP8 "E4M3FN": no infinities, NaN at S.1111.111).
FP8_E4M3_MAX = 448


class QType(enum.Enum):
  """Element type of a quantized array.

  ``INT*``/``UINT*`` are uniform grids; ``NF4`` stores 4-bit indices into ``NF4_TABLE``;
  ``FP8_E4M3`` stores the values themselves as ``float8_e4m3fn`` (one byte each, symmetric only:
  ``x ≈ v · scale`` with ``|v| <= 448``).  Sub-byte types are packed densely along the last
  axis in units of whole bytes: two 4-bit values per byte, four 2-bit values per byte, eight 3-bit
  values per three bytes (:attr:`pack_values` values in :attr:`pack_bytes` bytes).
  """
  INT8 = "int8"
  INT4 = "int4"
  INT3 = "int3"
  INT2 = "int2"
  UINT8 = "uint8"
  UINT4 = "uint4"
  UINT3 = "uint3"
  UINT2 = "uint2"
  NF4 = "nf4"
  FP8_E4M3 = "fp8_e4m3"

  @property
  def bits(self) -> int:
    """Information bits per value."""
    if self.is_float:
      return 8
    return 4 if self is QType.NF4 else int(self.value.lstrip("uint"))

  @property
  def storage_bits(self) -> int:
    """Bits each value occupies in packed storage (as many as it carries)."""
    return self.bits

  @property
  def pack_values(self) -> int:
    """Values in one packing unit: 1 (8-bit), 2 (4-bit), 4 (2-bit), 8 (3-bit)."""
    return math.lcm(self.storage_bits, 8) // self.storage_bits

  @property
  def pack_bytes(self) -> int:
    """Bytes of one packing unit: 3 for 3-bit values (eight of them), else 1."""
    return math.lcm(self.storage_bits, 8) // 8

  @property
  def signed(self) -> bool:
    return self.value.startswith("int") or self.is_float

  @property
  def is_table(self) -> bool:
    return self is QType.NF4

  @property
  def is_float(self) -> bool:
    """A floating-point element type (values stored as float8, not as integer codes)."""
    return self is QType.FP8_E4M3

  @property
  def symmetric_only(self) -> bool:
    """Types without zero points: the NF4 table and float8."""
    return self.is_table or self.is_float

  @property
  def qmin(self) -> int:
    """The smallest value (float8: ``-448``, the most negative finite e4m3 value)."""
    if self.is_float:
      return -FP8_E4M3_MAX
    return -(1 << (self.bits - 1)) if self.signed else 0

  @property
  def qmax(self) -> int:
    """The largest value: ``scale = absmax / qmax`` for symmetric grids (float8: 448)."""
    if self.is_float:
      return FP8_E4M3_MAX
    return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

  @property
  def unpacked_dtype(self) -> np.dtype:
    """numpy dtype of unpacked values (and of zero points): int8/uint8, float8_e4m3fn for fp8."""
    if self.is_float:
      return np.dtype(ml_dtypes.float8_e4m3fn)
    return np.dtype(np.int8 if self.signed else np.uint8)

  @property
  def storage_dtype(self) -> np.dtype:
    """numpy dtype of the packed ``values`` array."""
    return self.unpacked_dtype if self.storage_bits == 8 else np.dtype(np.uint8)

  @classmethod
  def _missing_(cls, value):
    raise ValueError(f"{value!r} is not a jq QType; choose one of {[m.value for m in cls]} (the "
                     "one float8 type is fp8_e4m3; e5m2 is not supported)")

  @classmethod
  def from_bits(cls, bits: int, *, signed: bool = True) -> "QType":
    """``QType.from_bits(4) is QType.INT4``; raises ValueError for unsupported widths."""
    if (not isinstance(bits, (int, np.integer)) or isinstance(bits, bool)
        or bits not in (2, 3, 4, 8)):
      raise ValueError(f"bits={bits!r} is not supported; choose the int 2, 3, 4 or 8")
    return cls(("int" if signed else "uint") + str(int(bits)))
