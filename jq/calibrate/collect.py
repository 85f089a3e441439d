"""Collecting the inputs of every quantizable layer while the UNCHANGED model runs.

The Flax adapters (``jq.nn``) call ``jq.nn.common.observe(kernel path, input)`` for every layer
they adapt, float or quantized; :func:`input_ranges` installs an observer that sends each input's
range to the host with ``jax.debug.callback``.  That works inside ``nn.scan``/``nnx.scan`` stacks,
whose layers share one traced body: the callbacks of a stacked layer arrive in layer order, so the
k-th of ``n·L`` calls in one model call belongs to layer ``k // n``.
"""
from __future__ import annotations

import collections
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def input_ranges(run: Callable[[Any, Any], Any], batches: Iterable[Any], *, paths: Collection[str],
                 stacks: Mapping[str, int] | None = None, operands: Any = None
                 ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Per-tensor ``(min, max)`` of each layer's input over all calibration batches.

  Args:
    run: ``run(operands, batch)`` runs the model once through jq's adapters (it is jitted here,
      with ``operands``, e.g. the variables, as an argument rather than a constant).
    batches: calibration inputs; each is passed to ``run`` as is.
    paths: kernel paths whose inputs are wanted.
    stacks: ``{path: number of stacked layers}``: those paths get one range per layer, shape
      ``(L,)``; others shape ``()``.

  Raises:
    ValueError: no batch, a wanted layer never ran, a non-finite input (naming the layer), or a
      stacked layer whose calls do not divide into its layers.
  """
  from jq.nn import common  # pylint: disable=import-outside-toplevel  (jq.nn imports calibrate)
  paths, stacks = set(paths), dict(stacks or {})
  seen: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)

  def host(path, lo, hi):  # (arrays when vmapped: one entry per mapped layer)
    seen[path].extend(zip(np.ravel(lo).tolist(), np.ravel(hi).tolist()))

  def observer(path, x):
    if path in paths:
      xf = jnp.asarray(x).astype(jnp.float32)
      jax.debug.callback(lambda lo, hi, p=path: host(p, lo, hi), jnp.min(xf), jnp.max(xf))

  def observed(ops, batch):
    with common.observing(observer):
      return run(ops, batch)

  step = jax.jit(observed)
  lo: dict[str, np.ndarray] = {}
  hi: dict[str, np.ndarray] = {}
  n_batches = 0
  for i, batch in enumerate(batches):
    seen.clear()
    jax.block_until_ready(step(operands, batch))
    jax.effects_barrier()
    n_batches += 1
    for path, calls in seen.items():
      r = np.asarray(calls, np.float64)
      if not np.all(np.isfinite(r)):
        raise ValueError(f"{path}: calibration batch {i} gives this layer a non-finite input")
      n = stacks.get(path, 1)
      if len(r) == 1 and n > 1:  # one input shared by every stacked layer (vmap, in_axes=None)
        r = np.repeat(r, n, axis=0)
      if len(r) % n:
        raise ValueError(f"{path}: {len(r)} calls in one model call do not divide into its {n} "
                         "stacked layers")
      r = r.reshape(n, -1, 2)
      b_lo, b_hi = r[..., 0].min(axis=1), r[..., 1].max(axis=1)
      if path in stacks:
        lo[path] = np.minimum(lo[path], b_lo) if path in lo else b_lo
        hi[path] = np.maximum(hi[path], b_hi) if path in hi else b_hi
      else:
        lo[path] = min(lo.get(path, np.inf), b_lo[0])
        hi[path] = max(hi.get(path, -np.inf), b_hi[0])
  if not n_batches:
    raise ValueError("calibration: no batches were given")
  missing = sorted(paths - set(lo))
  if missing:
    raise ValueError(f"calibration: layers {missing} never ran on the calibration batches; their "
                     "static activation scales cannot be calibrated")
  return {p: (np.asarray(lo[p], np.float32), np.asarray(hi[p], np.float32)) for p in lo}


__all__ = ["input_ranges"]
