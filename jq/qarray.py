"""QArray: a quantized array as plain pytree data.

``x ≈ (unpack(values) − zero_point) · expand(scale)``, or ``table[unpack(values)] · expand(scale)``
for NF4.  ``values`` holds packed storage (two int4 / four int2 per byte along the last axis);
``scale`` and ``zero_point`` have the logical rank with ``ceil(shape[i] / tile[i])`` entries per
axis.  ``qtype``, ``shape`` and ``tile`` are static (hashable) metadata.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jq import numerics
from jq.qtypes import QType
from jq.spec import ActivationSpec


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ActivationQuant:
  """How a layer's *input* is quantized at run time.

  ``scale``/``zero_point`` are the calibrated per-tensor values for static mode (shape ``()``), and
  ``None`` for dynamic mode (per-token scales computed on the fly).
  """
  scale: jax.Array | None
  zero_point: jax.Array | None
  spec: ActivationSpec = dataclasses.field(metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
  """A quantized tensor (see module docstring).  Call :meth:`validate` at API boundaries.

  Attributes:
    values: packed integer storage, shape ``numerics.packed_shape(shape, qtype)``.
    scale: per-tile scales, shape ``numerics.num_tiles(shape, tile)``.
    zero_point: per-tile integer zero points (``qtype.unpacked_dtype``), or None if symmetric.
    activation: for int8×int8 layers, how the input is quantized; None for weight-only.
    qtype: element type.
    shape: logical shape.
    tile: the block each scale covers.
  """
  values: jax.Array
  scale: jax.Array
  zero_point: jax.Array | None
  activation: ActivationQuant | None
  qtype: QType = dataclasses.field(metadata=dict(static=True))
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  tile: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def dtype(self):
    """The scale's dtype (``dequantize`` returns float32 unless given a dtype)."""
    return self.scale.dtype

  @property
  def nbytes(self) -> int:
    """Bytes of packed storage: values + scales + zero points (+ activation scales)."""
    leaves = jax.tree_util.tree_leaves(self)
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves))

  @property
  def bits_per_weight(self) -> float:
    return 8.0 * self.nbytes / max(1, int(np.prod(self.shape)))

  def unpacked(self) -> jax.Array:
    """Integer values in logical shape (int8 for signed types, uint8 otherwise)."""
    return numerics.unpack(self.values, self.qtype, self.shape[-1] if self.shape else 1).reshape(
        self.shape)

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    return dequantize(self, dtype)

  def validate(self, name: str = "<qarray>") -> "QArray":
    """Checks storage shapes and dtypes against the static metadata; raises ValueError naming
    ``name``.  Value checks (finite, positive scales) run only on concrete arrays."""
    if not isinstance(self.qtype, QType):
      raise ValueError(f"{name}: qtype {self.qtype!r} is not a QType")
    where = f"{name}: QArray(qtype={self.qtype.value}, shape={self.shape}, tile={self.tile})"
    if len(self.tile) != len(self.shape) or any(t < 1 for t in self.tile):
      raise ValueError(f"{where}: tile must have one positive entry per axis")
    want = numerics.packed_shape(self.shape, self.qtype)
    if tuple(self.values.shape) != want or self.values.dtype != self.qtype.storage_dtype:
      raise ValueError(f"{where}: values have shape {tuple(self.values.shape)} dtype "
                       f"{self.values.dtype}, expected {want} {self.qtype.storage_dtype}")
    tiles = numerics.num_tiles(self.shape, self.tile)
    if tuple(self.scale.shape) != tiles:
      raise ValueError(f"{where}: scale has shape {tuple(self.scale.shape)} dtype "
                       f"{self.scale.dtype}, expected {tiles} (one per tile)")
    if not jnp.issubdtype(self.scale.dtype, jnp.floating):
      raise ValueError(f"{where}: scale dtype {self.scale.dtype} is not floating point")
    if self.zero_point is not None:
      if self.qtype.is_table:
        raise ValueError(f"{where}: NF4 takes no zero point")
      if tuple(self.zero_point.shape) != tiles or self.zero_point.dtype != self.qtype.unpacked_dtype:
        raise ValueError(f"{where}: zero_point has shape {tuple(self.zero_point.shape)} dtype "
                         f"{self.zero_point.dtype}, expected {tiles} {self.qtype.unpacked_dtype}")
      if numerics.is_concrete(self.zero_point) and self.zero_point.size:
        zp = np.asarray(self.zero_point)
        if zp.min() < self.qtype.qmin or zp.max() > self.qtype.qmax:
          raise ValueError(f"{where}: zero points must lie in [{self.qtype.qmin}, "
                           f"{self.qtype.qmax}] (found {zp.min()}..{zp.max()})")
    if numerics.is_concrete(self.scale):
      s = np.asarray(jnp.asarray(self.scale, jnp.float32))
      if s.size and not (np.all(np.isfinite(s)) and np.all(s > 0)):
        raise ValueError(f"{where}: scales must be finite and positive "
                         f"(found min {np.nanmin(s)}, {np.sum(~np.isfinite(s))} non-finite)")
    if self.activation is not None:
      a = self.activation
      if (a.scale is None) != (a.spec.mode.value == "dynamic"):
        raise ValueError(f"{name}: activation mode {a.spec.mode.value} "
                         f"{'needs' if a.scale is None else 'takes no'} a calibrated scale")
    return self


def dequantize(q: QArray, dtype=jnp.float32) -> jax.Array:
  """``(unpack(values) − zero_point) · scale`` (or ``table[...] · scale``) in ``dtype``."""
  v = q.unpacked()
  scale = numerics.expand(q.scale.astype(jnp.float32), q.tile, q.shape)
  if q.qtype.is_table:
    x = numerics.nf4_decode(v, jnp.float32)
  else:
    x = v.astype(jnp.float32)
    if q.zero_point is not None:
      x = x - numerics.expand(q.zero_point.astype(jnp.float32), q.tile, q.shape)
  return (x * scale).astype(dtype)
