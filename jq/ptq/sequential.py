"""The order in which ``quantize_model`` calibrates a model: all at once, or block by block.

A *unit* is a set of kernels (whole, or one layer of a stack) calibrated together, with the
function that runs the model for them and its inputs.  Non-sequential calibration is one unit.
Sequential calibration (as in GPTQ's reference) calibrates each block on the outputs of the
blocks before it, quantized, with no adapter: the blocks are found in the module tree.

* **Blocks**: sibling modules called once each per forward, named ``<name>_<i>`` or
  ``<name><i>`` (linen's ``layers_0..N``, ``block0..N``) or ``<list>/<i>`` (an nnx list), of one
  class, the outermost such families, in call order.
* **Chained** (the fast road): block ``b`` runs inside the unchanged model, its hidden-state input
  (the first positional argument) replaced by the output of block ``b − 1`` on the quantized
  prefix, kept between blocks; only block ``b``'s output is returned, so XLA drops every other
  block from the compiled program.  Its other arguments (masks, positions) are computed by the
  model as usual.  This holds when each block's hidden input *is* the previous block's output
  (``x = block(x, ...)``), which the trace checks; where it is not (the model computes something
  between blocks), calibration switches to the rerun road for the remaining blocks, with a log
  line.
* **Rerun** (the reference twin): the whole model runs on the current parameters (blocks done so
  far dequantized) for every block: always right, one forward per block.  Stacked layers
  (``nn.scan``/``nnx.scan``) are calibrated layer by layer this way.

Kernels outside every block and stack are calibrated last, on the fully quantized prefix.
"""
from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax

from jq.ptq.targets import Call, Target

_INDEXED = re.compile(r"(.*?\D)_?(\d+)")


@dataclasses.dataclass
class Unit:
  """Kernels calibrated together.

  Attributes:
    name: for logs.
    layers: ``{kernel path: stacked layer indices}`` (``(0,)`` for an unstacked kernel).
    run: ``run(params, item)`` runs the model for this unit (see :func:`jq.calibrate.collect`).
    batches: the items ``run`` takes.
    block: module path of the block ``run`` computes (folds whose producer lies inside it are
      checked on ``run``'s output; others on the whole model), or None when ``run`` is the model.
    ref_batches: the items on which ``run`` with the float parameters gives the unit's float
      output (a block's on the *float* prefix's output; learned rounding's target), or None: the
      same as ``batches``.
  """
  name: str
  layers: dict[str, tuple[int, ...]]
  run: Callable[[Any, Any], Any]
  batches: list[Any]
  block: str | None = None
  ref_batches: list[Any] | None = None


class ChainBroken(Exception):
  """A block's hidden-state input is not the previous block's output."""


class _Done(BaseException):
  """Raised by :func:`block_runner`'s hook once block ``b`` has run: the rest of the model is
  not traced (it would be dropped from the compiled program anyway, but tracing it, and its
  derivative under ``jax.grad``, took most of a block's time on a 30-block model)."""


def find_blocks(calls: Sequence[Call], kernels: Sequence[str],
                stacked: Sequence[str] = ()) -> list[str]:
  """Module paths of the model's repeated blocks, in call order (see module doc): the outermost
  family of two or more indexed siblings, each called once, of one class, holding ``kernels`` in
  layers of their own (containers: single layers ``fc1``/``fc2``, ``Dense_0``/``Dense_1`` or
  ``conv1``/``conv2`` are a model's successive layers, not blocks, and calibrating them one at a
  time would quantize a fold's producer before its consumer is scaled).
  Siblings holding ``stacked`` kernels are layers *inside* an ``nn.scan``/``nnx.scan`` body
  (``fc1``/``fc2`` of the scanned block), traced once but run once per stacked layer: no blocks;
  nor are siblings called inside a ``vmap`` of the model (``Call.mapped``: a block's output,
  taken from inside the mapped function, would leak its tracer)."""
  stacked = set(stacked)
  count = collections.Counter(c.module for c in calls)
  first: dict[str, Call] = {}
  for c in calls:
    first.setdefault(c.module, c)
  families: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
  for mod in first:
    parent, _, last = mod.rpartition("/")
    m = _INDEXED.fullmatch(last)
    if last.isdigit():
      families[(parent, "")].append(mod)
    elif m:
      families[(parent, m.group(1))].append(mod)
  blocks = []
  for members in families.values():
    if (len(members) >= 2 and all(count[m] == 1 and not first[m].mapped for m in members)
        and len({first[m].cls for m in members}) == 1
        and all(any(k.startswith(m + "/") and "/" in k[len(m) + 1:] for k in kernels)
                for m in members)
        and not any(k in stacked and k.startswith(m + "/") for m in members for k in kernels)):
      blocks += members
  outer = [b for b in blocks if not any(b.startswith(o + "/") for o in blocks if o != b)]
  return sorted(outer, key=first_calls(calls).__getitem__)


def first_calls(calls: Sequence[Call]) -> dict[str, int]:
  """``{module path: index of its first call}``."""
  return {c.module: i for i, c in reversed(list(enumerate(calls)))}


def _hidden(args, kwargs):
  if args:
    return args[0]
  for v in kwargs.values():
    if isinstance(v, jax.Array) or hasattr(v, "aval"):
      return v
  return None


def _with_hidden(args, kwargs, x):
  if args:
    return (x,) + tuple(args[1:]), kwargs
  for key, v in kwargs.items():
    if isinstance(v, jax.Array) or hasattr(v, "aval"):
      return args, {**kwargs, key: x}
  raise ChainBroken("no array argument")


def first_leaf(y):
  return jax.tree_util.tree_leaves(y)[0]


def block_runner(target: Target, blocks: Sequence[str], b: int) -> Callable[[Any, Any], Any]:
  """``run(params, (batch, x))``: block ``b``'s output inside the model, its hidden input
  replaced by ``x`` (``x=None`` for the first block); raises :class:`ChainBroken` at trace time
  when block ``b``'s hidden input is not block ``b − 1``'s output.  The model stops at block
  ``b`` (:class:`_Done`)."""
  blk, prev = blocks[b], (blocks[b - 1] if b else None)

  def run(params, item):
    batch, x = item
    seen: dict[str, Any] = {}

    def at_prev(call, a, k):
      seen["prev"] = y = call(*a, **k)
      return y

    def at_block(call, a, k):
      if prev is not None:
        h, py = _hidden(a, k), seen.get("prev")
        if py is None or h is None or not (h is py or h is first_leaf(py)):
          raise ChainBroken(blk)
        a, k = _with_hidden(a, k, x)
      seen["out"] = call(*a, **k)
      raise _Done

    hooks = {blk: at_block, **({prev: at_prev} if prev else {})}
    try:
      target.run_hooked(params, batch, lambda path, _: hooks.get(path))
    except _Done:
      pass
    if "out" not in seen:
      raise ChainBroken(blk)
    return seen["out"]

  return run


class Schedule:
  """The units of one calibration, in order (iterate; set :attr:`params` to the current
  parameters, finished kernels dequantized, after each unit, and :attr:`ref` to the float ones).

  ``float_inputs``: chained blocks also carry the float model's hidden states (each block run on
  :attr:`ref` and the previous block's float output) as their units' ``ref_batches``.
  """

  def __init__(self, target: Target, kernels: Sequence[str], batches: Sequence[Any], *,
               sequential: bool, chained: bool = True, log: list[str] | None = None,
               float_inputs: bool = False):
    self.target, self.kernels, self.batches = target, list(kernels), list(batches)
    self.sequential, self.chained, self.float_inputs = sequential, chained, float_inputs
    self.log = log if log is not None else []
    self.params: Any = target.params
    self.ref: Any = target.params
    self.blocks: list[str] = []

  def _layers(self, paths) -> dict[str, tuple[int, ...]]:
    return {p: tuple(range(self.target.stacks.get(p, 1))) for p in paths}

  def __iter__(self) -> Iterator[Unit]:
    t = self.target
    if not self.sequential:
      yield Unit("model", self._layers(self.kernels), t.run, self.batches)
      return
    calls = t.calls(t.params, self.batches[0])
    self.blocks = find_blocks(calls, self.kernels,
                              [p for p in self.kernels if t.stacks.get(p, 1) > 1])
    if not self.blocks and not any(t.stacks.get(p, 1) > 1 for p in self.kernels):
      self.log.append("sequential: no repeated blocks found in the module tree (siblings named "
                      "<name>_<i>, <name><i> or list entries, called once each); every layer "
                      "is calibrated on the float model's activations")
    in_block = {p: b for p in self.kernels for b in self.blocks if p.startswith(b + "/")}
    stacked = collections.defaultdict(list)
    rest = []
    for p in self.kernels:
      if p in in_block:
        continue
      if t.stacks.get(p, 1) > 1:
        stacked[t.stacks[p]].append(p)
      else:
        rest.append(p)
    pos = first_calls(calls)
    def where(p):
      return pos.get(p.rpartition("/")[0], len(calls))
    segments = ([(min(pos[b] for b in self.blocks), "blocks", None)] if self.blocks else []) + [
        (min(where(p) for p in ps), "stack", n) for n, ps in stacked.items()]
    for _, kind, n in sorted(segments, key=lambda s: s[0]):
      if kind == "blocks":
        yield from self._blocks(in_block)
      else:
        for layer in range(n):
          yield Unit(f"stacked layer {layer}", {p: (layer,) for p in stacked[n]}, t.run,
                     self.batches)
    if rest:
      yield Unit("outside blocks", self._layers(rest), t.run, self.batches)

  def _blocks(self, in_block: dict[str, str]) -> Iterator[Unit]:
    t, chained, xs = self.target, self.chained, [None] * len(self.batches)
    xfs = list(xs)
    for b, blk in enumerate(self.blocks):
      layers = self._layers([p for p, k in in_block.items() if k == blk])
      if chained:
        run = block_runner(t, self.blocks, b)
        items = list(zip(self.batches, xs))
        try:
          jax.eval_shape(run, self.params, items[0])
        except ChainBroken:
          chained = False
          self.log.append(f"sequential: the input of block {blk} is not the output of "
                          f"{self.blocks[b - 1]} (the model computes something between blocks); "
                          "each remaining block is calibrated by running the whole model")
      if not chained:
        yield Unit(f"block {blk}", layers, t.run, self.batches)
        continue
      ref_items = list(zip(self.batches, xfs)) if self.float_inputs else None
      yield Unit(f"block {blk}", layers, run, items, block=blk, ref_batches=ref_items)
      if b + 1 < len(self.blocks):
        step = jax.jit(run)
        xs = [first_leaf(step(self.params, item)) for item in items]
        if ref_items is not None:
          xfs = [first_leaf(step(self.ref, item)) for item in ref_items]


__all__ = ["Unit", "Schedule", "find_blocks", "block_runner", "ChainBroken"]
