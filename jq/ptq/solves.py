"""Sharing a unit's kernel solves between workers (processes or a mesh's devices).

A unit's solves (``jq.algorithms.registry.solve``: one ``(K, N)`` kernel matrix each) are
independent, so :func:`owners` hands them to ``n`` workers, the costliest first, each to the least
loaded.  A solve costing more than one worker's even share is first cut by :func:`split` into
column blocks (output channels): GPTQ's and AWQ's clip search treat each output column on its own
(the K×K statistics and the input sample are shared, the rounding order runs over K), so the
blocks' results, joined by :func:`join`, are the whole kernel's.  The block edges fall on whole
scale tiles and whole packed bytes; a kernel whose scales span its output channels (one scale per
tensor, say) is never cut.  A GPTQ solve whose ``K × K`` Hessian is too large for one device
(:func:`factor_from`) runs instead on all of a process's devices together, the Hessian and its
factor split by rows (``jq.algorithms.factor_split``).  All of it depends on shapes only: every
process computes the same plan.

The reverse holds too: GPTQ kernels that read one input (q, k and v: the same
:class:`~jq.calibrate.collect.LayerInputs`) with the same spec and options, at most ``3K``
columns together, are fused by :func:`fuse` into one solve of their columns side by side, so
their Hessian is factored once, not once per kernel; :func:`unfuse` cuts the result back into
each kernel's (the same bits as solving each alone, as for column blocks).
"""
from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jq.algorithms.registry import Inputs, solve
from jq.calibrate.collect import LayerInputs
from jq.calibrate.stats import LayerStats
from jq.qarray import QArray
from jq.spec import Algorithm


class Solve(NamedTuple):
  """One kernel matrix to solve (``jq.algorithms.registry.solve``), or a column block of one."""
  path: str
  index: int
  algo: Algorithm
  w: jax.Array
  inputs: LayerInputs | None
  spec: Any
  options: Any
  name: str
  cols: tuple[int, int] | None = None   # output channels [a, b) of the kernel matrix; None: all
  also: tuple[str, ...] = ()            # the other kernels fused into this solve (:func:`fuse`)

  @property
  def paths(self) -> tuple[str, ...]:
    """Every kernel this solve quantizes (its own, then those fused into it)."""
    return (self.path, *self.also)


def stats_samples(inp: LayerInputs | None):
  """``(LayerStats | None, samples | None)`` of a layer's collected inputs."""
  if inp is None:
    return None, None
  return inp.stats, None if inp.samples is None else jnp.asarray(inp.samples)


def solve_on(t: Solve, device) -> tuple[QArray, str]:
  """``solve`` of one task, on ``device`` (its inputs placed there) or where its inputs are; a
  list of devices: a GPTQ solve with its Hessian's factorisation split over them
  (:func:`factor_from`)."""
  stats, samples = stats_samples(t.inputs)
  w = t.w
  if isinstance(device, (list, tuple)):
    return solve(t.algo, w, Inputs(stats, samples), t.spec, t.options, t.name, devices=device)
  if device is not None:
    put = functools.partial(jax.device_put, device=device)
    w, samples = put(w), None if samples is None else put(samples)
    stats = None if stats is None else LayerStats(*[put(x) for x in stats])
    with jax.default_device(device):
      return solve(t.algo, w, Inputs(stats, samples), t.spec, t.options, t.name)
  return solve(t.algo, w, Inputs(stats, samples), t.spec, t.options, t.name)


def factor_from(devices: Sequence[Any], given: int | None) -> int | None:
  """The input channels ``K`` from which a GPTQ solve runs on all ``devices`` together, its
  Hessian and factor split by rows (``PTQConfig.split_factor_from``): ``given``, else where one
  device's solve (3 float32 ``K × K`` matrices in its largest stage, ``jq.algorithms.gptq``)
  would take more than half of the smallest device memory the devices report; None with fewer
  than 2 devices, or devices that report no memory limit (CPU)."""
  if len(devices) < 2:
    return None
  if given is not None:
    return int(given)
  limits = []
  for d in devices:
    try:
      limits.append((d.memory_stats() or {}).get("bytes_limit"))
    except Exception:  # pylint: disable=broad-except  # no memory statistics on this backend
      limits.append(None)
  if not all(limits):
    return None
  return max(1, math.isqrt(min(limits) // 2 // (3 * 4)))


def factors_split(t: Solve, threshold: int | None) -> bool:
  """``t`` is a GPTQ solve of at least ``threshold`` input channels (:func:`factor_from`)."""
  return (threshold is not None and t.algo is Algorithm.GPTQ
          and int(t.w.shape[-2]) >= threshold)


def cost(t: Solve) -> int:
  """Flops of a GPTQ solve (~ K²N + K³) or AWQ clip search (~ K·N per sampled token); 0 for the
  rest (rounding to nearest: cheaper to do everywhere than to send)."""
  k, n = (int(d) for d in t.w.shape[-2:])
  if t.algo is Algorithm.GPTQ:
    return k * k * n + k ** 3
  if t.algo is Algorithm.AWQ and t.options.clip:
    return k * n * 512
  return 0


def _column_unit(t: Solve) -> int | None:
  """The narrowest column block whose edges fall on whole scale tiles and packed bytes, or None
  where the scales span the output channels (the kernel cannot be cut)."""
  k, n = (int(d) for d in t.w.shape[-2:])
  tile_n = int(t.spec.tile((k, n), name=t.name, dtype=t.w.dtype)[-1])
  if tile_n >= n:
    return None
  return math.lcm(tile_n, int(t.spec.qtype.pack_values))


def fuse(tasks: Sequence[Solve]) -> tuple[list[Solve], list[list[tuple[int, int, int]]]]:
  """``(fused, parts)``: the GPTQ solves of ``tasks`` that read the same collected inputs (one
  ``LayerInputs`` object: q, k and v) with equal spec, options, dtype and input channels ``K``,
  whose output channels can be cut on whole scale tiles and packed bytes and add up to at most
  ``3K``, joined into one solve of their columns side by side, in the place of the first; every
  other task as it is.  ``parts[f]``: ``(task, a, b)`` for each task in ``fused[f]``, its
  columns ``[a, b)`` there.  The fused solve factors the shared Hessian once instead of once per
  kernel."""
  groups: dict[tuple, list[int]] = {}
  for i, t in enumerate(tasks):
    unit = (_column_unit(t) if t.algo is Algorithm.GPTQ and t.inputs is not None
            and t.cols is None and not t.also else None)
    if unit is None or int(t.w.shape[-1]) % unit:
      continue
    key = (id(t.inputs), t.spec, t.options, t.w.dtype, int(t.w.shape[-2]), unit)
    groups.setdefault(key, []).append(i)
  # only where the factorisation (~K³) is a sizeable share of the work: a wider group (gate and
  # up, N = 2 × 4K) saves little time and would double the solve's working set
  first = {g[0]: g for g in groups.values()
           if len(g) > 1 and sum(int(tasks[i].w.shape[-1]) for i in g) <= 3 * int(
               tasks[g[0]].w.shape[-2])}
  fused, parts, member = [], [], {i for g in first.values() for i in g}
  for i, t in enumerate(tasks):
    if i in first:
      members = [tasks[j] for j in first[i]]
      edges = [0, *itertools.accumulate(int(m.w.shape[-1]) for m in members)]
      fused.append(t._replace(w=jnp.concatenate([m.w for m in members], axis=-1),
                              name=" + ".join(m.name for m in members),
                              also=tuple(m.path for m in members[1:])))
      parts.append([(j, a, b) for j, a, b in zip(first[i], edges[:-1], edges[1:])])
    elif i not in member:
      fused.append(t)
      parts.append([(i, 0, int(t.w.shape[-1]))])
  return fused, parts


def columns(q: QArray, a: int, b: int) -> QArray:
  """Output channels ``[a, b)`` of ``q`` (edges on whole scale tiles and packed bytes)."""
  tile_n, per, nb = int(q.tile[-1]), q.qtype.pack_values, q.qtype.pack_bytes
  if a % tile_n or (b % tile_n and b != q.shape[-1]) or a % per or (b % per and b != q.shape[-1]):
    raise ValueError(f"columns [{a}, {b}) of a {q.shape} QArray do not fall on whole tiles "
                     f"({tile_n}) and packed bytes ({per} values in {nb})")

  def cut(x, unit, nbytes=1):
    return None if x is None else x[..., a // unit * nbytes:-(-b // unit) * nbytes]

  return QArray(values=cut(q.values, per, nb), scale=cut(q.scale, tile_n),
                zero_point=cut(q.zero_point, tile_n), activation=q.activation, qtype=q.qtype,
                shape=(*q.shape[:-1], b - a), tile=q.tile)


def unfuse(parts: Sequence[Sequence[tuple[int, int, int]]],
           got: Mapping[int, tuple[QArray, str]]) -> dict[int, tuple[QArray, str]]:
  """``{task: (QArray, note)}`` from :func:`fuse`'s ``parts`` and each fused solve's result
  (``got[f]``): each kernel's columns, with the fused solve's note."""
  out = {}
  for f, members in enumerate(parts):
    q, note = got[f]
    for i, a, b in members:
      out[i] = (q, note) if len(members) == 1 else (columns(q, a, b), note)
  return out


def split(tasks: Sequence[Solve], n: int) -> list[tuple[int, Solve]]:
  """``(task, piece)`` pairs: every task whole, except GPTQ/AWQ solves costing more than an even
  share (total / ``n``), cut into the fewest equal column blocks (at most ``n``) that bring a
  block under the share.  Every block of a GPTQ solve repeats its K³ factorisation, so a GPTQ
  kernel is cut only where its column work (K²N) is at least that (N ≥ K): cutting the others
  would add more work than it takes off the longest solve."""
  share = sum(cost(t) for t in tasks) / max(1, n)
  out = []
  for i, t in enumerate(tasks):
    c, unit = cost(t), _column_unit(t) if n > 1 else None
    k, width = (int(d) for d in t.w.shape[-2:])
    fixed = k ** 3 if t.algo is Algorithm.GPTQ else 0
    if not c or c <= share or unit is None or c - fixed < fixed:
      out.append((i, t))
      continue
    m = next((m for m in range(2, n + 1) if fixed + (c - fixed) / m <= share), n)
    m = min(m, width // unit)
    if m < 2:
      out.append((i, t))
      continue
    start = 0 if t.cols is None else t.cols[0]
    units = width // unit
    edges = [unit * (units * j // m) for j in range(m)] + [width]
    for a, b in zip(edges[:-1], edges[1:]):
      out.append((i, t._replace(w=t.w[..., a:b], cols=(start + a, start + b),
                                name=f"{t.name}[:, {start + a}:{start + b}]")))
  return out


def owners(tasks: Sequence[Solve], n: int) -> dict[int, int]:
  """``{task: worker}`` for the GPTQ/AWQ solves: the costliest first, each plus the tasks' mean
  cost for what does not grow with the flops (dispatch, host syncs, compiling a new shape), each
  to the least loaded of the ``n`` workers.  Rounding to nearest is left out (every worker does
  its own)."""
  costs = {k: c for k, t in enumerate(tasks) if (c := cost(t))}
  fixed = sum(costs.values()) // max(1, len(costs))
  costs = {k: c + fixed for k, c in costs.items()}
  load, owner = [0] * n, {}
  for k in sorted(costs, key=lambda k: (-costs[k], k)):
    p = min(range(n), key=lambda p: (load[p], p))
    owner[k], load[p] = p, load[p] + costs[k]
  return owner


def joined(pieces: Sequence[tuple[int, Solve]], got: dict[int, tuple[QArray, str]]
           ) -> dict[int, tuple[QArray, str]]:
  """``{task: (QArray, note)}`` from :func:`split`'s ``pieces`` and each piece's result
  (``got[j]`` for ``pieces[j]``), every task's blocks joined in order (:func:`join`)."""
  parts: dict[int, list[tuple[QArray, str]]] = {}
  for j, (i, _) in enumerate(pieces):
    parts.setdefault(i, []).append(got[j])
  return {i: join(p) for i, p in parts.items()}


def join(pieces: Sequence[tuple[QArray, str]]) -> tuple[QArray, str]:
  """One kernel's ``(QArray, note)`` from its column blocks' results, in column order: values,
  scales and zero points concatenated along the output channels (block edges fall on whole tiles
  and bytes), the blocks' distinct notes joined."""
  if len(pieces) == 1:
    return pieces[0]
  qs = [q for q, _ in pieces]
  first = qs[0]

  def cat(name):
    parts = [getattr(q, name) for q in qs]
    return None if parts[0] is None else jnp.concatenate(parts, axis=-1)

  shape = (*first.shape[:-1], sum(q.shape[-1] for q in qs))
  q = QArray(values=cat("values"), scale=cat("scale"), zero_point=cat("zero_point"),
             activation=first.activation, qtype=first.qtype, shape=shape, tile=first.tile)
  notes = "; ".join(dict.fromkeys(note for _, note in pieces if note))
  return q, notes


__all__ = ["Solve", "columns", "cost", "factor_from", "factors_split", "fuse", "join", "joined",
           "owners", "solve_on", "split", "stats_samples", "unfuse"]
