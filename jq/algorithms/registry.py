"""The weight-rounding algorithms, by :class:`jq.Algorithm`: one function each.

Every entry maps ``(w, inputs, spec, options, name) -> (QArray, note)`` for one kernel matrix
``w`` of shape ``(K, N)`` (contracting axes flattened, channels flattened; one layer of a stack)
with its input statistics (:class:`Inputs`).  AWQ's and SmoothQuant's per-input-channel scales
are found and folded by the caller (they concern a group of kernels sharing one input); here AWQ
runs its per-group clip search and SmoothQuant rounds to nearest.  Learned rounding
(:mod:`jq.algorithms.rounding`) is not a per-matrix solver: it trains all of a block's kernels
together on the block's output, starting from one of these (``Rule.initial``); the calibration
road (``jq.ptq.quantize_model``) runs it after them.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from jq.algorithms.awq import awq_search_clip
from jq.algorithms.gptq import gptq_quantize
from jq.calibrate.stats import LayerStats
from jq.qarray import QArray
from jq.quantize import quantize
from jq.spec import Algorithm, Clip, QuantSpec


class Inputs(NamedTuple):
  """What the algorithms know of one kernel matrix's input ``X (tokens, K)``."""
  stats: LayerStats | None
  samples: jax.Array | None


Solver = Callable[[jax.Array, Inputs, QuantSpec, Any, str], tuple[QArray, str]]


def _rtn(w, inputs, spec, options, name):
  return quantize(w, spec, name=name), ""


def _gptq(w, inputs, spec, options, name, devices=None):
  if inputs.stats is None:
    raise ValueError(f"{name}: GPTQ needs this layer's captured inputs (XᵀX); none were collected")
  q, info = gptq_quantize(w, inputs.stats, spec, damp=options.damp,
                          block_size=options.block_size, act_order=options.act_order, name=name,
                          devices=devices)
  note = ""
  if int(info.retries) or bool(info.fallback):
    note = f"gptq damping retries={int(info.retries)} fallback to RTN={bool(info.fallback)}"
  return q, note


def _awq(w, inputs, spec, options, name):
  if not options.clip:
    return quantize(w, spec, name=name), ""
  if inputs.samples is None:
    raise ValueError(f"{name}: AWQ's clip search needs a sample of this layer's inputs")
  noclip = dataclasses.replace(spec, clip=Clip())
  w_clipped, _ = awq_search_clip(inputs.samples, w, noclip, name=name)
  return quantize(w_clipped, noclip, name=name), ""


SOLVERS: dict[Algorithm, Solver] = {Algorithm.RTN: _rtn, Algorithm.GPTQ: _gptq,
                                    Algorithm.AWQ: _awq, Algorithm.SMOOTHQUANT: _rtn}


def solve(algorithm: Algorithm, w: jax.Array, inputs: Inputs, spec: QuantSpec, options: Any,
          name: str, *, devices=None) -> tuple[QArray, str]:
  """``SOLVERS[algorithm](...)``; a ValueError names the algorithm when none is registered.
  ``devices``: GPTQ's Hessian factorisation split over them (``gptq_quantize(devices=...)``);
  only GPTQ takes it."""
  if algorithm not in SOLVERS:
    raise ValueError(f"{name}: no solver registered for algorithm {algorithm!r}")
  if devices is not None:
    if algorithm is not Algorithm.GPTQ:
      raise ValueError(f"{name}: only GPTQ splits its solve over devices, not {algorithm!r}")
    return SOLVERS[algorithm](w, inputs, spec, options, name, devices=devices)
  return SOLVERS[algorithm](w, inputs, spec, options, name)


__all__ = ["Inputs", "Solver", "SOLVERS", "solve"]
