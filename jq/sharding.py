"""Shardings of quantized trees, carried over from the float model's PartitionSpecs.

A QArray's fields shard like the float kernel they replace.  The packed ``values`` take the
kernel's spec (sub-byte types pack along the last axis, which gets 2, 4 or 8/3 times shorter and is
split only on whole packing units); ``scale`` and ``zero_point`` keep the spec on per-channel and
stacked-layer axes (``tile[i] == 1``: one entry per index, like the kernel) and are replicated
along grouped axes (only ``ceil(n / group)`` entries); static activation scales are replicated.
With a mesh known, an entry whose mesh axes do not divide the dimension it would split is dropped
(replicated) instead of failing later.

Example:
  >>> qshapes = jax.eval_shape(lambda p: jq.quantize_tree(p, rules), params)
  >>> out = shardings(qshapes, float_shardings)   # QArrays of NamedShardings
  >>> qparams = jax.jit(lambda p: jq.quantize_tree(p, rules), out_shardings=out)(params)
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec, Sharding

from jq import numerics
from jq.qarray import QArray
from jq.tree import is_qarray, path_str

PyTree = Any


def _axis_size(mesh: Mesh | AbstractMesh, entry: Any) -> int:
  """Devices along a spec entry: 1 for None, the product of the named mesh axes otherwise."""
  if entry is None or not isinstance(entry, (str, tuple)):
    return 1  # None, or PartitionSpec.UNCONSTRAINED: splits nothing we can count
  names = entry if isinstance(entry, tuple) else (entry,)
  for n in names:
    if n not in mesh.shape:
      raise ValueError(f"PartitionSpec entry {entry!r} names mesh axis {n!r}, but the mesh has "
                       f"axes {tuple(mesh.shape)}")
  return math.prod(mesh.shape[n] for n in names)


def _fit(entries: Sequence[Any], shape: Sequence[int], mesh: Mesh | AbstractMesh | None
         ) -> tuple[Any, ...]:
  """``entries``, each one that does not divide its dimension of ``shape`` replaced by None (only
  when ``mesh`` is given)."""
  if mesh is None:
    return tuple(entries)
  return tuple(e if shape[i] % _axis_size(mesh, e) == 0 else None for i, e in enumerate(entries))


def split_last_axis(tree: PyTree, mesh: Mesh, axis: str) -> PyTree:
  """``tree`` placed on ``mesh``: every array leaf of 2 or more dimensions split along its last
  axis over the mesh axis ``axis`` where that length divides by the axis's size, every other leaf
  replicated; leaves already split over ``mesh``'s devices stay as they are.  NumPy leaves go
  straight into their shards (each device receives its part; none holds the whole array).  The
  CLI's ``--devices N`` loads a model this way (``PTQConfig.split_params``)."""
  n = int(mesh.shape[axis])
  devices = set(mesh.devices.flat)

  def one(x):
    if not isinstance(x, (jax.Array, np.ndarray)):
      return x
    s = getattr(x, "sharding", None)
    if isinstance(s, NamedSharding) and not s.is_fully_replicated and s.device_set == devices:
      return x
    cut = x.ndim >= 2 and x.shape[-1] % n == 0
    spec = PartitionSpec(*([None] * (x.ndim - 1)), axis) if cut else PartitionSpec()
    return jax.device_put(x, NamedSharding(mesh, spec))
  return jax.tree_util.tree_map(one, tree)


def qarray_partition_spec(q: QArray, spec: PartitionSpec, *,
                          mesh: Mesh | AbstractMesh | None = None) -> QArray:
  """The PartitionSpecs of a QArray's fields, from the spec its float kernel had.

  ``values`` get ``spec``; ``scale`` and ``zero_point`` get ``spec``'s entry on axes with
  ``tile[i] == 1`` and None on grouped axes; activation scales get ``P()``; None fields stay None.
  Each spec has as many entries as ``spec`` (a shorter ``spec`` stands for trailing Nones).  With
  ``mesh``, entries that do not divide their field's dimension (e.g. the packed last axis of int4
  values) become None.

  Args:
    q: a QArray (fields may be arrays or ``jax.ShapeDtypeStruct``s; only static metadata and which
      fields are None are read).
    spec: the float kernel's PartitionSpec (entries: None, a mesh axis name or a tuple of names).
    mesh: the mesh the specs are for, to drop entries that do not divide.

  Returns:
    A QArray with the same static metadata whose array fields are PartitionSpecs: a pytree of specs
    for ``jax.jit`` shardings or ``NamedSharding`` trees.

  Raises:
    ValueError: ``spec`` has more entries than the QArray has axes, or names an axis not in
      ``mesh``.

  Example:
    >>> q = jq.quantize(w, jq.W4A16_G128)            # w: (1024, 512), tile (128, 1)
    >>> s = qarray_partition_spec(q, P("data", "model"))
    >>> s.values, s.scale                              # P('data', 'model'), P(None, 'model')
  """
  entries = tuple(spec)
  if len(entries) > q.ndim:
    raise ValueError(f"QArray(qtype={q.qtype.value}, shape={q.shape}, tile={q.tile}): "
                     f"PartitionSpec {spec} has {len(entries)} entries for {q.ndim} axes")
  n = len(entries)
  full = entries + (None,) * (q.ndim - n)
  packed = numerics.packed_shape(q.shape, q.qtype)
  units = packed[:-1] + tuple(p // q.qtype.pack_bytes for p in packed[-1:])  # 3-bit: 3 bytes each
  values = _fit(full, units, mesh)
  per_tile = [e if t == 1 else None for e, t in zip(full, q.tile)]
  scale = _fit(per_tile, numerics.num_tiles(q.shape, q.tile), mesh)
  values, scale = PartitionSpec(*values[:n]), PartitionSpec(*scale[:n])
  act = q.activation
  if act is not None:
    act = dataclasses.replace(act, scale=None if act.scale is None else PartitionSpec(),
                              zero_point=None if act.zero_point is None else PartitionSpec())
  return dataclasses.replace(q, values=values, scale=scale,
                             zero_point=None if q.zero_point is None else scale, activation=act)


def qarray_sharding(q: QArray, sharding: Sharding) -> QArray:
  """The shardings of a QArray's fields, from the sharding its float kernel had.

  A ``NamedSharding`` is split per field with :func:`qarray_partition_spec` (same mesh and memory
  kind); any fully replicated sharding (e.g. ``SingleDeviceSharding``) is used for every field.

  Raises:
    TypeError: a sharding that is neither named nor fully replicated.

  Example:
    >>> qarray_sharding(q, NamedSharding(mesh, P(None, "model"))).scale.spec  # P(None, 'model')
  """
  if isinstance(sharding, NamedSharding):
    specs = qarray_partition_spec(q, sharding.spec, mesh=sharding.mesh)
    return jax.tree.map(lambda p: NamedSharding(sharding.mesh, p, memory_kind=sharding.memory_kind),
                        specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
  if isinstance(sharding, Sharding) and sharding.is_fully_replicated:
    return jax.tree.map(lambda _: sharding, q)
  raise TypeError(f"QArray(qtype={q.qtype.value}, shape={q.shape}): cannot derive field shardings "
                  f"from {sharding!r}; give a NamedSharding")


def partition_specs(qtree: PyTree, float_specs: PyTree, *,
                    mesh: Mesh | AbstractMesh | None = None) -> PyTree:
  """The spec tree of a quantized tree, from the specs of the float tree it came from.

  Every QArray of ``qtree`` is matched by one PartitionSpec (or NamedSharding) in ``float_specs``
  and expands to a QArray of specs (:func:`qarray_partition_spec`); every other leaf keeps its
  spec.  Given NamedShardings, QArrays expand to NamedShardings on the same mesh.

  Args:
    qtree: the quantized tree (arrays or ``jax.eval_shape`` output; QArrays are leaves).
    float_specs: the float tree's PartitionSpecs or NamedShardings, same structure.
    mesh: the mesh of the PartitionSpecs (drops entries that do not divide; see above).

  Raises:
    ValueError: the trees differ in structure, or a spec does not fit its QArray.
    TypeError: a QArray is matched by something other than a PartitionSpec or Sharding.

  Example:
    >>> specs = partition_specs(qparams, {"dense": {"kernel": P("data", "model"), "bias": P()}})
  """
  def one(kp, x, s):
    if not is_qarray(x):
      return s
    if isinstance(s, PartitionSpec):
      return qarray_partition_spec(x, s, mesh=mesh)
    if isinstance(s, NamedSharding):
      return qarray_sharding(x, s)
    raise TypeError(f"{path_str(kp)}: a QArray needs a PartitionSpec or NamedSharding, got "
                    f"{type(s).__name__}")
  return jax.tree_util.tree_map_with_path(one, qtree, float_specs, is_leaf=is_qarray)


def shardings(qtree: PyTree, float_shardings: PyTree) -> PyTree:
  """The sharding tree of a quantized tree, from the shardings of the float tree it came from.

  Like :func:`partition_specs`, with ``jax.sharding.Sharding`` leaves: each QArray's NamedSharding
  expands with :func:`qarray_sharding`; other leaves keep their sharding.

  Raises:
    ValueError: the trees differ in structure.
    TypeError: a leaf of ``float_shardings`` is not a Sharding, or cannot be split for a QArray.

  Example:
    >>> float_shardings = jax.tree.map(lambda a: a.sharding, params)
    >>> out = shardings(jax.eval_shape(quantize, params), float_shardings)
    >>> qparams = jax.jit(quantize, out_shardings=out)(params)
  """
  def one(kp, x, s):
    if not isinstance(s, Sharding):
      raise TypeError(f"{path_str(kp)}: expected a jax.sharding.Sharding, got {type(s).__name__} "
                      "(use partition_specs for PartitionSpecs)")
    return qarray_sharding(x, s) if is_qarray(x) else s
  return jax.tree_util.tree_map_with_path(one, qtree, float_shardings, is_leaf=is_qarray)


def unbox_specs(tree: PyTree) -> tuple[PyTree, PyTree]:
  """Splits linen variables with ``nn.Partitioned`` boxes into ``(unboxed tree, spec tree)``.

  A box's spec is ``P(*box.names)`` (logical names for ``nn.LogicallyPartitioned``: map them with
  ``nn.logical_to_mesh``), expanded with :func:`qarray_partition_spec` when the box holds a QArray;
  leaves outside boxes get ``P()``.  Boxes are unwrapped without applying sharding constraints.

  Example:
    >>> variables, specs = unbox_specs(jq.quantize_tree(boxed_variables, rules))
    >>> variables = jax.device_put(variables, jax.tree.map(
    ...     lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P)))
  """
  from flax.core import meta  # pylint: disable=import-outside-toplevel  (keep flax optional)

  is_box = lambda x: isinstance(x, meta.Partitioned)
  stop = lambda x: is_box(x) or is_qarray(x)

  def spec(x):
    value, s = (x.value, PartitionSpec(*x.names)) if is_box(x) else (x, PartitionSpec())
    return qarray_partition_spec(value, s) if is_qarray(value) else s

  unboxed = jax.tree.map(lambda x: x.value if is_box(x) else x, tree, is_leaf=stop)
  return unboxed, jax.tree.map(spec, tree, is_leaf=stop)


__all__ = ["qarray_partition_spec", "qarray_sharding", "partition_specs", "shardings",
           "split_last_axis", "unbox_specs"]
