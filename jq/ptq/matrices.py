"""A kernel of any layout as the ``(K, N)`` matrices the PTQ algorithms work on, and back.

For a kernel with layout (batch axes B, contracting axes C, channel axes O), one matrix per batch
index: ``W_b`` of shape ``(prod C, prod O)`` (axes flattened in order).  Groups of
:meth:`jq.QuantSpec.tile` are contiguous runs of the flattened contracting axes (see
:func:`jq.layout.group_tile`), so a matrix spec with ``group_size = prod(tile over C)`` gives the
same grid; :func:`assemble` turns the matrices' QArrays back into one QArray of the kernel's
shape and tile, exactly (the codes are re-derived from values that lie on the grid).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jq import numerics
from jq.layout import Layout
from jq.qarray import QArray
from jq.quantize import quantize_with_params
from jq.spec import Granularity, QuantSpec


@dataclasses.dataclass(frozen=True)
class MatrixView:
  """How a kernel of ``shape`` maps to ``n`` matrices ``(K, N)``."""
  shape: tuple[int, ...]
  layout: Layout

  @property
  def perm(self) -> tuple[int, ...]:
    lay = self.layout
    return lay.batch + lay.contracting + lay.channels

  @property
  def n(self) -> int:
    return int(np.prod([self.shape[a] for a in self.layout.batch], dtype=np.int64))

  @property
  def k(self) -> int:
    return int(np.prod([self.shape[a] for a in self.layout.contracting], dtype=np.int64))

  @property
  def out(self) -> int:
    return int(np.prod([self.shape[a] for a in self.layout.channels], dtype=np.int64))

  def matrices(self, w: jax.Array) -> jax.Array:
    """``(n, K, N)``."""
    return jnp.transpose(w, self.perm).reshape(self.n, self.k, self.out)

  def kernel(self, mats: jax.Array) -> jax.Array:
    """Inverse of :meth:`matrices`."""
    sizes = tuple(self.shape[a] for a in self.perm)
    return jnp.transpose(jnp.reshape(mats, sizes), np.argsort(self.perm))

  def matrix_spec(self, spec: QuantSpec, *, name: str) -> QuantSpec:
    """The ``(K, N)`` spec whose grid is ``spec``'s on the kernel (one layer of a stack)."""
    tile = spec.tile(self.shape, layout=self.layout, name=name)
    if spec.granularity is Granularity.TENSOR:
      return dataclasses.replace(spec, channel_axes=None, group_axis=None)
    if spec.granularity is Granularity.CHANNEL:
      return dataclasses.replace(spec, channel_axes=(1,), group_axis=None)
    g = int(np.prod([tile[a] for a in self.layout.contracting], dtype=np.int64))
    return dataclasses.replace(spec, channel_axes=(1,), group_axis=0, group_size=g)


def assemble(view: MatrixView, qs: Sequence[QArray], spec: QuantSpec, *, name: str) -> QArray:
  """One QArray of the kernel's shape from the QArrays of its ``n`` matrices.

  Raises:
    ValueError: naming ``name`` when the matrices' grids do not tile the kernel (a bug).
  """
  tile = spec.tile(view.shape, layout=view.layout, name=name)
  tiles = numerics.num_tiles(view.shape, tile)
  tsizes = tuple(tiles[a] for a in view.perm)
  deq = view.kernel(jnp.stack([q.dequantize(jnp.float32) for q in qs]))

  def grid(parts):
    t = jnp.stack(parts)
    if int(np.prod(t.shape)) != int(np.prod(tsizes)):
      raise ValueError(f"{name}: matrix scales of shape {tuple(t.shape)} do not tile the kernel "
                       f"of shape {view.shape} (tiles {tiles})")
    return jnp.transpose(t.reshape(tsizes), np.argsort(view.perm))

  scale = grid([q.scale for q in qs])
  zp = None if qs[0].zero_point is None else grid([q.zero_point for q in qs])
  return quantize_with_params(deq, scale, zp, spec, name=name, layout=view.layout)


__all__ = ["MatrixView", "assemble"]
