"""Integer and table-based element types of quantized arrays."""
from __future__ import annotations

import enum

import numpy as np

# QLoRA's NormalFloat4 (Dettmers et al., 2023): quantiles of N(0, 1) rescaled to [-1, 1], with an
# exact zero.  Values as published in bitsandbytes.
NF4_TABLE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)


class QType(enum.Enum):
  """Element type of a quantized array.

  ``INT*``/``UINT*`` are uniform grids; ``NF4`` stores 4-bit indices into ``NF4_TABLE``.  Sub-byte
  types are packed along the last axis: two 4-bit (or 3-bit) values per byte, four 2-bit values per
  byte.  3-bit values use 4-bit storage slots (they are not packed across byte boundaries).
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

  @property
  def bits(self) -> int:
    """Information bits per value."""
    return 4 if self is QType.NF4 else int(self.value.lstrip("uint"))

  @property
  def storage_bits(self) -> int:
    """Bits each value occupies in packed storage (3-bit values use 4-bit slots)."""
    return {8: 8, 4: 4, 3: 4, 2: 2}[self.bits]

  @property
  def per_byte(self) -> int:
    return 8 // self.storage_bits

  @property
  def signed(self) -> bool:
    return self.value.startswith("int")

  @property
  def is_table(self) -> bool:
    return self is QType.NF4

  @property
  def qmin(self) -> int:
    return -(1 << (self.bits - 1)) if self.signed else 0

  @property
  def qmax(self) -> int:
    return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

  @property
  def unpacked_dtype(self) -> np.dtype:
    """numpy dtype of unpacked integer values (and of zero points)."""
    return np.dtype(np.int8 if self.signed else np.uint8)

  @property
  def storage_dtype(self) -> np.dtype:
    """numpy dtype of the packed ``values`` array."""
    return self.unpacked_dtype if self.storage_bits == 8 else np.dtype(np.uint8)

  @classmethod
  def _missing_(cls, value):
    raise ValueError(f"{value!r} is not a jq QType; choose one of {[m.value for m in cls]} (no "
                     "float8 types: jq quantizes to integer grids and NF4)")

  @classmethod
  def from_bits(cls, bits: int, *, signed: bool = True) -> "QType":
    """``QType.from_bits(4) is QType.INT4``; raises ValueError for unsupported widths."""
    if (not isinstance(bits, (int, np.integer)) or isinstance(bits, bool)
        or bits not in (2, 3, 4, 8)):
      raise ValueError(f"bits={bits!r} is not supported; choose the int 2, 3, 4 or 8")
    return cls(("int" if signed else "uint") + str(int(bits)))
