"""Layouts: what each axis of a kernel means to the layer that uses it.

A kernel's axes are *contracting* (summed against the input: Dense ``in``, a conv's spatial and
input-feature axes), *channels* (output features: Dense ``out``, DenseGeneral's ``features`` such
as ``(heads, head_dim)``) or *batch* (an axis along which the kernel holds independent matrices:
the stack axis of ``nn.scan``/``nn.vmap`` layers, DenseGeneral's ``batch_dims``, Einsum letters
shared by input, kernel and output).

Scales follow the layout (:meth:`jq.QuantSpec.tile`): one set per batch index (never shared across
stacked layers), one per channel over *all* output axes (per head, per feature), and groups of at
most ``group_size`` elements along the flattened contracting axes.

Layouts come from the model (``jq.nn.layouts``), never from a default axis; a 2-D kernel without a
layout is read as Dense ``(in, out)``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True, kw_only=True)
class Layout:
  """The roles of a kernel's axes (non-negative axis indices; together they cover every axis once).

  Attributes:
    contracting: axes summed against the input, outer to inner in the kernel's memory order.
    channels: output axes (one scale per index under CHANNEL/GROUP granularity).
    batch: independent-matrix axes (stacked layers, dot batch dims): always one scale set each.
    layer: the layer that uses the kernel, for messages (e.g. ``nn.DenseGeneral(features=(4, 64))``).

  Example:
    >>> Layout(contracting=(0,), channels=(1, 2), layer="nn.DenseGeneral(features=(4, 64))")
  """
  contracting: tuple[int, ...]
  channels: tuple[int, ...]
  batch: tuple[int, ...] = ()
  layer: str = ""

  def __post_init__(self):
    for name in ("contracting", "channels", "batch"):
      v = getattr(self, name)
      if isinstance(v, int) and not isinstance(v, bool):
        v = (v,)
      try:
        v = tuple(v)
      except TypeError as e:
        raise ValueError(f"Layout.{name}={v!r} must be a tuple of axis indices") from e
      if not all(isinstance(a, int) and not isinstance(a, bool) and a >= 0 for a in v):
        raise ValueError(f"Layout.{name}={v!r} must hold non-negative int axis indices")
      object.__setattr__(self, name, tuple(sorted(v)))
    axes = self.contracting + self.channels + self.batch
    if len(set(axes)) != len(axes):
      raise ValueError(f"Layout {self.describe()}: an axis has two roles")
    if not isinstance(self.layer, str):
      raise ValueError(f"Layout.layer={self.layer!r} must be a str")

  @property
  def ndim(self) -> int:
    return len(self.contracting) + len(self.channels) + len(self.batch)

  def check(self, shape: Sequence[int], *, name: str = "<tensor>") -> "Layout":
    """ValueError naming ``name`` unless the roles cover ``range(len(shape))`` exactly."""
    if sorted(self.contracting + self.channels + self.batch) != list(range(len(shape))):
      raise ValueError(f"{name}: shape {tuple(shape)}: layout {self.describe()} does not give each "
                       f"of the {len(shape)} axes exactly one role")
    if not self.contracting:
      raise ValueError(f"{name}: shape {tuple(shape)}: layout {self.describe()} has no "
                       "contracting axis")
    return self

  def stacked(self, n: int) -> "Layout":
    """This layout with ``n`` new leading batch axes (a kernel stacked by ``nn.scan``/``vmap``)."""
    return self.inserted(tuple(range(n)))

  def inserted(self, positions: Sequence[int]) -> "Layout":
    """This layout with new batch axes at ``positions`` of the stacked kernel (sorted)."""
    positions = tuple(sorted(positions))
    def shift(a):
      for p in positions:
        if p <= a:
          a += 1
      return a
    return Layout(contracting=tuple(shift(a) for a in self.contracting),
                  channels=tuple(shift(a) for a in self.channels),
                  batch=tuple(shift(a) for a in self.batch) + positions, layer=self.layer)

  def describe(self) -> str:
    out = f"contracting={self.contracting} channels={self.channels}"
    out += f" batch={self.batch}" if self.batch else ""
    return out + (f" ({self.layer})" if self.layer else "")


def dense_layout(ndim: int = 2) -> Layout:
  """The ``(in, out)`` layout of a Dense kernel (with ``ndim - 2`` leading stack axes)."""
  return Layout(contracting=(0,), channels=(1,), layer="Dense (in, out)").stacked(ndim - 2)


def group_tile(sizes: Sequence[int], group_size: int) -> tuple[int, ...]:
  """Tile of groups of at most ``group_size`` elements over contracting axes of ``sizes``.

  The axes are flattened in order (outer to inner); a group fills inner axes whole before it
  spans an outer one, and never straddles a boundary it cannot fill: ``(4, 64)`` at 128 gives
  ``(2, 64)`` (two heads a group), at 32 ``(1, 32)``; ``(4, 48)`` at 128 gives ``(2, 48)`` (96 per
  group); ``(576,)`` at 128 gives ``(128,)`` with a partial last group.
  """
  tile = [1] * len(sizes)
  left = group_size
  for i in range(len(sizes) - 1, -1, -1):
    n = sizes[i]
    if left >= n:
      tile[i] = n
      left //= n
    else:
      tile[i] = max(left, 1)
      break
  return tuple(tile)


__all__ = ["Layout", "dense_layout", "group_tile"]
