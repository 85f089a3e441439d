"""Quantization configs: frozen, keyword-only, hashable dataclasses (usable as jit static args).

Variants come from ``dataclasses.replace``; no string mini-languages, no setters.
"""
from __future__ import annotations

import dataclasses
import enum
import itertools
import re
from collections.abc import Sequence

import numpy as np

from jq.layout import Layout, group_tile
from jq.qtypes import QType


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_real(v) -> bool:
  """An int or float (numpy ones too), not a bool."""
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _as_python(obj, *fields: str) -> None:
  """Stores numpy scalars of a (checked) frozen dataclass's ``fields`` as Python ints/floats, so
  the config hashes like its Python twin and serialises to JSON (rules files, checkpoints)."""
  for f in fields:
    v = getattr(obj, f)
    if isinstance(v, np.integer):
      object.__setattr__(obj, f, int(v))
    elif isinstance(v, np.floating):
      object.__setattr__(obj, f, float(v))
    elif isinstance(v, tuple) and any(isinstance(a, np.integer) for a in v):
      object.__setattr__(obj, f, tuple(int(a) for a in v))


def _check_bool(owner: str, field: str, v) -> None:
  if not isinstance(v, bool):
    raise ValueError(f"{owner}.{field}={v!r} must be a bool (True or False), got "
                     f"{type(v).__name__}")


class Granularity(enum.Enum):
  """How many scales a tensor gets.

  * ``TENSOR``: one scale for the whole tensor.
  * ``CHANNEL``: one scale per index of ``channel_axes`` (e.g. per output column of a Dense kernel).
  * ``GROUP``: per channel, and additionally one scale per ``group_size`` consecutive elements along
    ``group_axis`` (the contracting axis).  A group size that does not divide the axis leaves a
    partial last group.
  """
  TENSOR = "tensor"
  CHANNEL = "channel"
  GROUP = "group"


class ClipMethod(enum.Enum):
  """How the quantization range is chosen from the data.

  * ``NONE``: the full min/max (or absmax) range.
  * ``FIXED``: the full range times ``ratio``.
  * ``PERCENTILE``: the ``percentile``-th percentile of the values (per tile).
  * ``MSE``: per tile, the ratio in ``linspace(min_ratio, 1, grid)`` minimising the squared
    quantization error (jittable; a scan over ratios, so memory stays one tensor).
  """
  NONE = "none"
  FIXED = "fixed"
  PERCENTILE = "percentile"
  MSE = "mse"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Clip:
  method: ClipMethod = ClipMethod.NONE
  ratio: float = 1.0
  percentile: float = 99.9
  grid: int = 20
  min_ratio: float = 0.5

  def __post_init__(self):
    if not isinstance(self.method, ClipMethod):
      raise ValueError(f"Clip.method must be a ClipMethod, got {self.method!r}")
    for field in ("ratio", "percentile", "min_ratio"):
      if not _is_real(getattr(self, field)):
        raise ValueError(f"Clip.{field}={getattr(self, field)!r} must be a number, got "
                         f"{type(getattr(self, field)).__name__}")
    if not _is_int(self.grid):
      raise ValueError(f"Clip.grid={self.grid!r} must be an int, got {type(self.grid).__name__}")
    if not 0.0 < self.ratio <= 1.0:
      raise ValueError(f"Clip.ratio={self.ratio} must be in (0, 1]")
    if not 0.0 < self.percentile <= 100.0:
      raise ValueError(f"Clip.percentile={self.percentile} must be in (0, 100]")
    if self.grid < 1 or not 0.0 < self.min_ratio <= 1.0:
      raise ValueError(f"Clip grid={self.grid} must be >= 1 and min_ratio={self.min_ratio} in (0, 1]")
    _as_python(self, "ratio", "percentile", "grid", "min_ratio")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
  """How one tensor is quantized: ``x ≈ scale · (q − zero_point)``.

  Attributes:
    qtype: element type (int8, int4, int3, int2, their unsigned twins, NF4, or float8 e4m3).
    symmetric: symmetric (zero point 0, ``scale = absmax / qmax``; float8: ``absmax / 448``, the
      values cast to e4m3 rather than rounded to integers) or asymmetric (range
      ``[min, max]`` stretched over ``[qmin, qmax]`` with an integer zero point; 0 is always exact).
    granularity: see :class:`Granularity`.
    channel_axes: axes that keep one scale per index (CHANNEL and GROUP).  ``None`` (the default):
      the layer's own output axes, read from its :class:`jq.Layout` (every output axis: per head
      and per feature), or ``(1,)`` for a 2-D kernel without a layout (Dense ``(in, out)``).
    group_size: at most this many elements per group along the contracting axes (GROUP only).
    group_axis: ``None`` (the default): groups run along the layer's contracting axes, flattened
      where there are several (see :func:`jq.layout.group_tile`); an int names one axis instead.
      Stacked-layer axes (``nn.scan``) always get one scale set per layer.
    scale_dtype: dtype of stored scales (name, e.g. ``"float32"`` or ``"bfloat16"``).
    clip: range selection, see :class:`Clip`.

  Example:
    >>> spec = QuantSpec(qtype=QType.INT4, granularity=Granularity.GROUP, group_size=128)
    >>> spec4 = dataclasses.replace(spec, symmetric=False)
  """
  qtype: QType = QType.INT8
  symmetric: bool = True
  granularity: Granularity = Granularity.CHANNEL
  channel_axes: tuple[int, ...] | None = None
  group_size: int | None = None
  group_axis: int | None = None
  scale_dtype: str = "float32"
  clip: Clip = Clip()

  def __post_init__(self):
    _check_bool("QuantSpec", "symmetric", self.symmetric)
    if self.channel_axes is not None:
      if isinstance(self.channel_axes, (str, bytes)) or not isinstance(
          self.channel_axes, (int, np.integer, tuple, list)):
        raise ValueError(f"QuantSpec.channel_axes={self.channel_axes!r} must be a tuple of ints "
                         "(or None: from the layer's layout)")
      if isinstance(self.channel_axes, (int, np.integer)):
        object.__setattr__(self, "channel_axes", (self.channel_axes,))
      object.__setattr__(self, "channel_axes", tuple(self.channel_axes))
    if ((self.channel_axes is not None and not all(_is_int(a) for a in self.channel_axes))
        or (self.group_axis is not None and not _is_int(self.group_axis))):
      raise ValueError(f"QuantSpec: channel_axes={self.channel_axes} and group_axis="
                       f"{self.group_axis} must be ints (or None: from the layer's layout)")
    if self.group_size is not None and not _is_int(self.group_size):
      raise ValueError(f"QuantSpec.group_size={self.group_size!r} must be an int")
    if not isinstance(self.qtype, QType):
      raise ValueError(f"QuantSpec.qtype must be a QType, got {self.qtype!r}")
    if not isinstance(self.granularity, Granularity):
      raise ValueError(f"QuantSpec.granularity must be a Granularity, got {self.granularity!r}")
    if not isinstance(self.clip, Clip):
      raise ValueError(f"QuantSpec.clip must be a Clip, got {self.clip!r}")
    if self.qtype.is_table and not self.symmetric:
      raise ValueError("QuantSpec: NF4 is a symmetric table type; use symmetric=True")
    if self.qtype.is_float and not self.symmetric:
      raise ValueError(f"QuantSpec: {self.qtype.value} is symmetric only (float8 grids have no "
                       "zero point); use symmetric=True")
    if self.symmetric and not self.qtype.signed and not self.qtype.is_table:
      raise ValueError(f"QuantSpec: unsigned {self.qtype.value} needs symmetric=False "
                       f"(or use {self.qtype.value[1:]} for a symmetric grid)")
    if self.granularity is Granularity.GROUP:
      if self.group_size is None or self.group_size < 1:
        raise ValueError(f"QuantSpec: granularity=GROUP needs group_size >= 1, got {self.group_size}")
    elif self.group_size is not None:
      raise ValueError(f"QuantSpec: group_size={self.group_size} needs granularity=GROUP")
    elif self.group_axis is not None:
      raise ValueError(f"QuantSpec: group_axis={self.group_axis} needs granularity=GROUP")
    if not isinstance(self.scale_dtype, str) or self.scale_dtype not in (
        "float32", "bfloat16", "float16"):
      raise ValueError(f"QuantSpec.scale_dtype={self.scale_dtype!r}: use float32, bfloat16 or float16")
    _as_python(self, "channel_axes", "group_size", "group_axis")

  def tile(self, shape: Sequence[int], *, layout: Layout | None = None, name: str = "<tensor>",
           dtype=None) -> tuple[int, ...]:
    """The per-scale tile of a tensor of ``shape`` under this spec.

    With a ``layout`` (see :mod:`jq.layout`): batch (stacked-layer) axes always get tile 1; CHANNEL
    gives tile 1 on every output axis; GROUP adds groups of at most ``group_size`` elements along
    the flattened contracting axes; TENSOR is one scale per batch index.  Axes named in the spec
    must agree with the layout (no scale shared across output axes or stacked layers).  Without
    a layout, a 2-D kernel is read as Dense ``(in, out)``; a kernel of higher rank needs its axes
    named in the spec (TENSOR needs no axes: one scale for the whole tensor).

    Raises:
      ValueError: naming ``name``, the shape (and dtype, layer): axes out of range, axes the layer
        does not have, or a rank > 2 kernel with neither a layout nor named axes.
    """
    nd = len(shape)
    where = f"{name}: shape {tuple(shape)}" + (
        f" dtype {np.dtype(dtype).name}" if dtype is not None else "")
    if layout is not None:
      if not isinstance(layout, Layout):
        raise ValueError(f"{where}: layout must be a jq.Layout (or None), got "
                         f"{type(layout).__name__} {layout!r}")
      layout.check(shape, name=name)
      where += f" ({layout.layer})" if layout.layer else ""
    elif self.granularity is not Granularity.TENSOR and (
        self.channel_axes is None or (self.granularity is Granularity.GROUP
                                      and self.group_axis is None)):
      if nd == 2:
        layout = Layout(contracting=(0,), channels=(1,), layer="Dense (in, out)")
      else:
        raise ValueError(
            f"{where}: a rank-{nd} kernel without a layout: which axes are heads, features or "
            "stacked layers is not known, so a scale could be shared across them; use "
            "jq.nn.quantize_variables(model, variables, rules, *inputs) (linen) or "
            "jq.nn.quantize_module (nnx), pass layouts=jq.nn.layouts(...) to quantize_tree, or "
            "name channel_axes (and group_axis) in the QuantSpec")
    batch = set(layout.batch) if layout is not None else set()
    if self.granularity is Granularity.TENSOR:
      return tuple(1 if i in batch else s for i, s in enumerate(shape))
    chan = self._channels(nd, layout, where)
    tile = [1 if i in chan else s for i, s in enumerate(shape)]
    if self.granularity is Granularity.GROUP:
      if self.group_axis is None:
        axes = layout.contracting
        for a, t in zip(axes, group_tile([shape[a] for a in axes], self.group_size)):
          tile[a] = t
      else:
        if not -nd <= self.group_axis < nd:
          raise ValueError(f"{where}: group_axis {self.group_axis} is out of range for rank {nd}")
        g = self.group_axis % nd
        if g in chan:
          raise ValueError(f"{where}: group_axis {self.group_axis} is also a channel axis")
        if layout is not None and g not in layout.contracting:
          raise ValueError(f"{where}: group_axis {self.group_axis} is not a contracting axis of "
                           f"the layer (layout {layout.describe()})")
        tile[g] = min(self.group_size, shape[g]) if shape[g] else self.group_size
    return tuple(tile)

  def _channels(self, nd: int, layout: Layout | None, where: str) -> set[int]:
    if self.channel_axes is None:
      return set(layout.channels) | set(layout.batch)
    chan = set()
    for a in self.channel_axes:
      if not -nd <= a < nd:
        raise ValueError(f"{where}: channel axis {a} is out of range for rank {nd}")
      chan.add(a % nd)
    if layout is not None:
      wrong = sorted(chan & set(layout.contracting))
      if wrong:
        raise ValueError(f"{where}: channel_axes={self.channel_axes} names contracting axis "
                         f"{wrong} of the layer (layout {layout.describe()}); drop channel_axes "
                         "to use the layer's own output axes")
      shared = sorted((set(layout.channels) | set(layout.batch)) - chan)
      if shared:
        raise ValueError(f"{where}: channel_axes={self.channel_axes} would share one scale across "
                         f"output/stacked axes {shared} (layout {layout.describe()}); drop "
                         "channel_axes to use the layer's own output axes")
    return chan

  def admits_tile(self, shape: Sequence[int], tile: Sequence[int]) -> bool:
    """Whether some layout of ``shape`` gives ``tile`` under this spec (checks a stored tile)."""
    shape, tile = tuple(shape), tuple(tile)
    if self.channel_axes is not None and (self.granularity is not Granularity.GROUP
                                          or self.group_axis is not None):
      try:
        if self.tile(shape) == tile:
          return True
      except ValueError:
        pass
    nd = len(shape)
    if nd > 6:
      return False
    for roles in itertools.product(range(3), repeat=nd):
      if 0 not in roles:
        continue
      lay = Layout(contracting=tuple(i for i, r in enumerate(roles) if r == 0),
                   channels=tuple(i for i, r in enumerate(roles) if r == 1),
                   batch=tuple(i for i, r in enumerate(roles) if r == 2))
      try:
        if self.tile(shape, layout=lay) == tile:
          return True
      except ValueError:
        continue
    return False

  def describe(self) -> str:
    """Short human-readable label, e.g. ``int4 asym g128``."""
    g = {Granularity.TENSOR: "tensor", Granularity.CHANNEL: "channel"}.get(
        self.granularity, f"g{self.group_size}")
    sym = "sym" if self.symmetric else "asym"
    clip = "" if self.clip.method is ClipMethod.NONE else f" clip={self.clip.method.value}"
    return f"{self.qtype.value} {sym} {g}{clip}"


class ActMode(enum.Enum):
  """How activations of a quantized layer are treated.

  * ``DYNAMIC``: per-token (per-row) scales computed at run time.
  * ``STATIC``: one calibrated scale (and zero point) per tensor, stored beside the kernel.
  """
  DYNAMIC = "dynamic"
  STATIC = "static"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ActivationSpec:
  """How a layer's input is quantized at run time.

  Attributes:
    mode: see :class:`ActMode`.
    qtype: the activation element type: ``INT8``/``UINT8`` (integer grids, ``int8 × int8 ->
      int32`` dots) or ``FP8_E4M3`` (``scale = absmax / 448``, ``fp8 × fp8 -> float32`` dots; needs
      float8 weights, symmetric only).
    symmetric: no zero point (``scale = absmax / qmax``), or an integer zero point (int8/uint8).
  """
  mode: ActMode = ActMode.DYNAMIC
  qtype: QType = QType.INT8
  symmetric: bool = True

  def __post_init__(self):
    if not isinstance(self.mode, ActMode):
      raise ValueError(f"ActivationSpec.mode must be an ActMode, got {self.mode!r}")
    if not isinstance(self.qtype, QType):
      raise ValueError(f"ActivationSpec.qtype must be a QType, got {self.qtype!r}")
    _check_bool("ActivationSpec", "symmetric", self.symmetric)
    if self.qtype not in (QType.INT8, QType.UINT8, QType.FP8_E4M3):
      raise ValueError(f"ActivationSpec.qtype={self.qtype}: activations are quantized to 8 bits "
                       "(int8, uint8 or fp8_e4m3)")
    if self.qtype.is_float and not self.symmetric:
      raise ValueError(f"ActivationSpec: {self.qtype.value} activations are symmetric only (no "
                       "zero point); use symmetric=True")
    if self.symmetric and not self.qtype.signed:
      raise ValueError("ActivationSpec: uint8 activations need symmetric=False")

  def describe(self) -> str:
    if self.qtype.is_float:
      return f"a8 {self.mode.value} {self.qtype.value}"
    return f"a8 {self.mode.value} {'sym' if self.symmetric else 'asym'}"


class Algorithm(enum.Enum):
  """How weights are rounded: round-to-nearest, or a calibration-based algorithm."""
  RTN = "rtn"
  GPTQ = "gptq"
  AWQ = "awq"
  SMOOTHQUANT = "smoothquant"
  AUTOROUND = "autoround"


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTQOptions:
  """GPTQ (Frantar et al., 2022, arXiv:2210.17323) options of a rule.

  Attributes:
    act_order: process input channels by decreasing Hessian diagonal (groups stay contiguous).
    damp: relative dampening added to the Hessian diagonal.
    block_size: columns per lazy-update block.
    first_token_weight: weight of each calibration sequence's first token in the Hessian
      (``Σ w_t x_tᵀx_t``).  Position 0 is the attention sink every later token attends to, and
      its inputs point in directions the other tokens rarely visit; with plain ``XᵀX`` (weight 1,
      textbook GPTQ) GPTQ pushes its error into exactly those directions.  On SmolLM2 (w4a16
      g128) that made the sink's q/k/v error ~10x RTN's and perplexity *worse* than RTN's (41.7
      vs 38.0, float 29.1) although every layer's error on ordinary tokens was 2-5x lower; with
      weight 16 GPTQ gives 35.1, with act-order 33.4 (``benchmarks/results/ptq_compare_cpu.md``;
      16 was the best of 1/4/8/16/32/128/1024 in a sweep on 8 of the evaluation windows).  The
      idea that these pivot tokens must be kept intact is IntactKV's (Liu et al., 2024,
      arXiv:2403.01241).  Calibration captures a block's inputs once, so the GPTQ rules of one
      block must agree on it.

  Example:
    >>> rules = default_rules(W4A16_G128, algorithm=Algorithm.GPTQ,
    ...                       options=GPTQOptions(act_order=True))
  """
  act_order: bool = False
  damp: float = 0.01
  block_size: int = 128
  first_token_weight: float = 16.0

  def __post_init__(self):
    if not isinstance(self.act_order, bool):
      raise ValueError(f"GPTQOptions.act_order={self.act_order!r} must be a bool")
    if not (_is_real(self.damp) and 0 < self.damp < float("inf")):
      raise ValueError(f"GPTQOptions.damp={self.damp!r} must be a positive finite number")
    if not (_is_int(self.block_size) and self.block_size >= 1):
      raise ValueError(f"GPTQOptions.block_size={self.block_size!r} must be an int >= 1")
    if not (_is_real(self.first_token_weight) and 0 <= self.first_token_weight < float("inf")):
      raise ValueError(f"GPTQOptions.first_token_weight={self.first_token_weight!r} must be a "
                       "finite number >= 0")
    _as_python(self, "damp", "block_size", "first_token_weight")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AWQOptions:
  """AWQ (Lin et al., 2023, arXiv:2306.00978) options: ``grid`` scale exponents searched,
  whether the per-group clip search runs after scaling, and ``duo`` scaling (AutoAWQ's
  ``s = mean|x|^α / mean_w^(1−α)`` instead of ``mean|x|^α``)."""
  grid: int = 20
  clip: bool = True
  duo: bool = False

  def __post_init__(self):
    if not (_is_int(self.grid) and self.grid >= 1):
      raise ValueError(f"AWQOptions.grid={self.grid!r} must be an int >= 1")
    for k in ("clip", "duo"):
      if not isinstance(getattr(self, k), bool):
        raise ValueError(f"AWQOptions.{k}={getattr(self, k)!r} must be a bool")
    _as_python(self, "grid")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SmoothQuantOptions:
  """SmoothQuant (Xiao et al., 2022, arXiv:2211.10438): migration strength ``alpha`` in [0, 1]."""
  alpha: float = 0.5

  def __post_init__(self):
    if not (_is_real(self.alpha) and 0.0 <= self.alpha <= 1.0):
      raise ValueError(f"SmoothQuantOptions.alpha={self.alpha!r} must be in [0, 1]")
    _as_python(self, "alpha")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AutoRoundOptions:
  """Learned rounding (SignRound / AutoRound, Cheng et al., 2023, arXiv:2309.05516) options.

  Block by block, per-weight rounding offsets ``v`` in [-0.5, 0.5] and per-group factors on the
  grid's range ends (``clip_min``..1) are trained to minimize the block's output error against
  the float model (``jq.algorithms.rounding``).

  Attributes:
    init: where rounding starts: ``"rtn"``, ``"gptq"`` (its rounding and scales, default
      options) or ``"awq"`` (its input-channel scales folded first, then its clip search).
    steps: optimizer steps per block.
    lr: learning rate; None: ``1 / steps`` (SignRound's: with signed steps and a linear decay to
      0 every offset can move by at most half a grid step).
    optimizer: ``"signsgd"`` (the sign of the gradient, SignRound) or ``"adam"``.
    learn_clip: also learn the range factors (else only the rounding offsets).
    clip_min: the smallest range factor.
    batch_tokens: tokens per step (whole sequences; at least one sequence): the calibration
      batches are split into sequences and regrouped to about this many tokens per step.
    target: ``"float"``: each block's output is matched to the float model's (the block's input
      is the quantized prefix's output, its target the float prefix's: errors of earlier blocks
      are corrected, as in AutoRound); ``"local"``: to the float block on the same input.
    loss: ``"relative"``: each token's squared error divided by its target's squared norm, then
      averaged (every token counts alike); ``"mse"``: the plain mean squared error (AutoRound's).
      Decoders grow a few tokens (each sequence's first, the attention sink) to norms ~100x the
      others': in SmolLM2 from block 11 on the first token holds 98% of the output's energy, so
      the plain MSE tunes the rounding for that one token.
    seed: order of the steps' batches.
  """
  init: str = "rtn"
  steps: int = 200
  lr: float | None = None
  optimizer: str = "signsgd"
  learn_clip: bool = True
  clip_min: float = 0.5
  batch_tokens: int = 2048
  target: str = "float"
  loss: str = "relative"
  seed: int = 0

  def __post_init__(self):
    if self.init not in ("rtn", "gptq", "awq"):
      raise ValueError(f"AutoRoundOptions.init={self.init!r}: choose 'rtn', 'gptq' or 'awq'")
    if not (_is_int(self.steps) and self.steps >= 1):
      raise ValueError(f"AutoRoundOptions.steps={self.steps!r} must be an int >= 1")
    if self.lr is not None and not (_is_real(self.lr) and 0 < self.lr < float("inf")):
      raise ValueError(f"AutoRoundOptions.lr={self.lr!r} must be a positive finite number "
                       "(or None: 1 / steps)")
    if self.optimizer not in ("signsgd", "adam"):
      raise ValueError(f"AutoRoundOptions.optimizer={self.optimizer!r}: choose 'signsgd' or "
                       "'adam'")
    _check_bool("AutoRoundOptions", "learn_clip", self.learn_clip)
    if not (_is_real(self.clip_min) and 0 < self.clip_min <= 1):
      raise ValueError(f"AutoRoundOptions.clip_min={self.clip_min!r} must be in (0, 1]")
    if not (_is_int(self.batch_tokens) and self.batch_tokens >= 1):
      raise ValueError(f"AutoRoundOptions.batch_tokens={self.batch_tokens!r} must be an int >= 1")
    if self.target not in ("float", "local"):
      raise ValueError(f"AutoRoundOptions.target={self.target!r}: choose 'float' or 'local'")
    if self.loss not in ("relative", "mse"):
      raise ValueError(f"AutoRoundOptions.loss={self.loss!r}: choose 'relative' or 'mse'")
    if not (_is_int(self.seed) and self.seed >= 0):
      raise ValueError(f"AutoRoundOptions.seed={self.seed!r} must be an int >= 0")
    _as_python(self, "steps", "lr", "clip_min", "batch_tokens", "seed")

  @property
  def learning_rate(self) -> float:
    return float(self.lr) if self.lr is not None else 1.0 / self.steps

  @property
  def init_algorithm(self) -> "Algorithm":
    return Algorithm(self.init)


ALGORITHM_OPTIONS = {Algorithm.GPTQ: GPTQOptions, Algorithm.AWQ: AWQOptions,
                     Algorithm.SMOOTHQUANT: SmoothQuantOptions,
                     Algorithm.AUTOROUND: AutoRoundOptions}

Options = GPTQOptions | AWQOptions | SmoothQuantOptions | AutoRoundOptions


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
  """Path regex -> how to treat matching leaves.  Rules are ordered; the first match wins.

  Attributes:
    pattern: regular expression searched (``re.search``) in the '/'-joined parameter path.
    weight: the weight spec, or ``None`` to keep matching leaves in float (skip).
    activation: ``None`` for weight-only; otherwise int8 (or fp8 e4m3) activations, dynamic or
      static.
    algorithm: rounding algorithm for the weight.
    options: the algorithm's options (:class:`GPTQOptions`, :class:`AWQOptions`,
      :class:`SmoothQuantOptions`); None: its defaults (see :attr:`algorithm_options`).
    required: a required rule that matches no leaf is an error (catches typos in patterns).
  """
  pattern: str
  weight: QuantSpec | None
  activation: ActivationSpec | None = None
  algorithm: Algorithm = Algorithm.RTN
  options: Options | None = None
  required: bool = True

  def __post_init__(self):
    if not isinstance(self.pattern, str):
      raise ValueError(f"Rule.pattern={self.pattern!r} must be a string (a regular expression), "
                       f"got {type(self.pattern).__name__}")
    if self.weight is not None and not isinstance(self.weight, QuantSpec):
      raise ValueError(f"Rule {self.pattern!r}: weight must be a QuantSpec or None, got "
                       f"{self.weight!r}")
    if self.activation is not None and not isinstance(self.activation, ActivationSpec):
      raise ValueError(f"Rule {self.pattern!r}: activation must be an ActivationSpec or None, got "
                       f"{self.activation!r}")
    if not isinstance(self.algorithm, Algorithm):
      raise ValueError(f"Rule {self.pattern!r}: algorithm must be an Algorithm, got "
                       f"{self.algorithm!r}")
    _check_bool(f"Rule {self.pattern!r}", "required", self.required)
    if not self.pattern:
      raise ValueError("Rule.pattern is empty, which matches every parameter path; write '.*' to "
                       "mean every path, or the pattern you meant")
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise ValueError(f"Rule.pattern {self.pattern!r} is not a valid regex: {e}") from e
    if self.weight is None and self.activation is not None:
      raise ValueError(f"Rule {self.pattern!r}: activation quantization needs a weight spec")
    if self.activation is not None and self.activation.qtype.is_float:
      if self.weight.qtype is not self.activation.qtype:
        raise ValueError(f"Rule {self.pattern!r}: {self.activation.qtype.value} activations need "
                         f"{self.activation.qtype.value} weights (got {self.weight.qtype.value}); "
                         "fp8 x fp8 dots take two float8 operands")
    elif self.activation is not None and (self.weight.qtype.bits != 8
                                          or self.weight.qtype.is_float):
      raise ValueError(f"Rule {self.pattern!r}: int8 activations need an 8-bit weight of an "
                       f"integer type (got {self.weight.qtype.value}; fp8_e4m3 weights take "
                       "fp8_e4m3 activations)")
    if self.activation is not None and self.weight.granularity is Granularity.GROUP:
      raise ValueError(f"Rule {self.pattern!r}: {self.activation.qtype.value} x "
                       f"{self.weight.qtype.value} matmuls need per-channel or per-tensor weight "
                       "scales (group scales do not factor out of the dot)")

    if (self.algorithm is Algorithm.AUTOROUND and self.weight is not None
        and self.weight.qtype.symmetric_only):
      kind = "a lookup table" if self.weight.qtype.is_table else "a float format"
      raise ValueError(f"Rule {self.pattern!r}: learned rounding (autoround) works on integer "
                       f"grids; {self.weight.qtype.value} is {kind} (use rtn, gptq or awq)")
    if self.options is not None:
      want = ALGORITHM_OPTIONS.get(self.algorithm)
      if want is None or not isinstance(self.options, want):
        raise ValueError(f"Rule {self.pattern!r}: options {type(self.options).__name__} do not "
                         f"belong to algorithm {self.algorithm.value}")

  @property
  def algorithm_options(self) -> Options | None:
    """The options in effect: ``options``, or the algorithm's defaults (None for RTN)."""
    if self.options is not None:
      return self.options
    cls = ALGORITHM_OPTIONS.get(self.algorithm)
    return None if cls is None else cls()

  @property
  def initial(self) -> "Rule":
    """The rule that rounds first: itself, or for learned rounding the same rule with its
    ``init`` algorithm (default options), whose result the learning starts from."""
    if self.algorithm is not Algorithm.AUTOROUND:
      return self
    return dataclasses.replace(self, algorithm=self.algorithm_options.init_algorithm, options=None)

  def matches(self, path: str) -> bool:
    return re.search(self.pattern, path) is not None

  def describe(self) -> str:
    if self.weight is None:
      return "float (skipped)"
    out = f"{self.algorithm.value} w:{self.weight.describe()}"
    return out + (f" {self.activation.describe()}" if self.activation else "")


# Paths that default rules keep in float: embeddings, norms, biases, MoE routers and Qwen2-MoE's
# shared-expert gate (small and sensitive: a flipped top-k choice sends a token to another
# expert; vLLM reads both unquantized), the output head.
HEAD_PATTERN = r"lm_head|(^|/)head(/|$)|output_proj"
SKIP_PATTERNS = (r"embed", r"norm|(^|/)ln(_|\d*(/|$))|layernorm", r"(^|/)bias$",
                 r"(^|/)(router|shared_expert_gate)(/|$)", HEAD_PATTERN)


def head_rule(spec: QuantSpec, *, embeddings: bool = True) -> Rule:
  """A weight-only rule for the output head, to put before the rules that skip it
  (``default_rules(..., head=spec)`` does).

  It matches the head's kernel (``lm_head``, ``head``, ``output_proj``: one scale per vocabulary
  column) and, with ``embeddings``, every embedding table (``nn.Embed`` / ``nnx.Embed``'s
  ``embedding``: one scale per row).  A head tied to the token embedding (``embed.attend``) *is*
  that table, so its lookups read the quantized rows too; in a model with its own head kernel,
  ``embeddings=False`` keeps the lookup tables float (with True they are quantized too, saving
  their memory, as llama.cpp pairs ``token_embd`` with ``output``).  In decoding the head is
  one of the largest weights read per token (Llama-3.2-1B: its tied 262M of 1.24B parameters).

  Example:
    >>> rules = (jq.head_rule(jq.W8A16),) + jq.recipe_rules("gptq-w4a16-g128")
  """
  if not isinstance(spec, QuantSpec):
    raise ValueError(f"head_rule: expected a QuantSpec (e.g. jq.W8A16), got {spec!r}")
  tables = r"|(?:^|/)embedding$" if embeddings else ""
  return Rule(pattern=rf"(?:{HEAD_PATTERN}).*kernel${tables}", weight=spec)


def default_rules(weight: QuantSpec | None, activation: ActivationSpec | None = None, *,
                  algorithm: Algorithm = Algorithm.RTN,
                  options: Options | None = None,
                  kernel_pattern: str = r"(^|/)kernel$",
                  head: QuantSpec | None = None) -> tuple[Rule, ...]:
  """Skip embeddings, norms, biases, MoE routers (``router``, ``shared_expert_gate``) and the
  output head; quantize every other ``kernel``.

  ``algorithm`` and its ``options`` (see :class:`Rule`) go to the kernel rule.  ``head``: also
  quantize the output head and the embedding tables with this weight-only spec (round to
  nearest; see :func:`head_rule`).

  Example:
    >>> rules = default_rules(W4A16_G128, algorithm=Algorithm.GPTQ,
    ...                       options=GPTQOptions(act_order=True))
    >>> rules = default_rules(W4A16_G128, head=W8A16)     # int8 head (and embedding tables)
  """
  heads = () if head is None else (head_rule(head),)
  skips = tuple(Rule(pattern=p, weight=None, required=False) for p in SKIP_PATTERNS)
  return heads + skips + (Rule(pattern=kernel_pattern, weight=weight, activation=activation,
                               algorithm=algorithm, options=options),)


# ---- presets --------------------------------------------------------------------------------
W8A16 = QuantSpec(qtype=QType.INT8, symmetric=True, granularity=Granularity.CHANNEL)
W4A16_G128 = QuantSpec(qtype=QType.UINT4, symmetric=False, granularity=Granularity.GROUP,
                       group_size=128)
W4A16_G32 = dataclasses.replace(W4A16_G128, group_size=32)
W3A16_G128 = QuantSpec(qtype=QType.UINT3, symmetric=False, granularity=Granularity.GROUP,
                       group_size=128)
W2A16_G32 = QuantSpec(qtype=QType.UINT2, symmetric=False, granularity=Granularity.GROUP,
                      group_size=32)
NF4_G64 = QuantSpec(qtype=QType.NF4, symmetric=True, granularity=Granularity.GROUP, group_size=64)
A8_DYNAMIC = ActivationSpec(mode=ActMode.DYNAMIC)
# Per-token int8 with a zero point: the ``w8a8-dynamic`` recipe's activations.  The inputs that
# follow a norm carry a few large channels of one sign (SmolLM2's attention-sink dimensions), so
# a symmetric per-token range leaves half of its codes unused: on the first 1024 tokens of
# lee_background.cor SmolLM2 W8A8 dynamic is +2.75% perplexity over float with symmetric
# activations and +0.97% with asymmetric ones (qwix's symmetric scheme: +2.38%).
A8_DYNAMIC_ASYM = ActivationSpec(mode=ActMode.DYNAMIC, symmetric=False)
A8_STATIC = ActivationSpec(mode=ActMode.STATIC)
# Float8 e4m3 (OCP FP8, what H100-class GPUs multiply natively and vLLM serves as FP8): weights
# per output channel, activations per token at run time or one calibrated scale per tensor.
FP8_CHANNEL = QuantSpec(qtype=QType.FP8_E4M3, symmetric=True, granularity=Granularity.CHANNEL)
A_FP8_DYNAMIC = ActivationSpec(mode=ActMode.DYNAMIC, qtype=QType.FP8_E4M3)
A_FP8_STATIC = ActivationSpec(mode=ActMode.STATIC, qtype=QType.FP8_E4M3)

RECIPES: dict[str, tuple[QuantSpec, ActivationSpec | None]] = {
    "w8a16": (W8A16, None),
    "w4a16-g128": (W4A16_G128, None),
    "w4a16-g32": (W4A16_G32, None),
    "w3a16-g128": (W3A16_G128, None),
    "w2a16-g32": (W2A16_G32, None),
    "nf4-g64": (NF4_G64, None),
    "w8a8-dynamic": (W8A16, A8_DYNAMIC_ASYM),
    "w8a8-static": (W8A16, A8_STATIC),
    # Grids the serving formats store exactly, so `quantize --recipe X && export` re-rounds nothing:
    # llama.cpp's Q8_0 / Q4_0 (blocks of 32 along the input, one fp16 scale; Q4_0's codes -8..7
    # hold jq's symmetric int4), and compressed-tensors' (vLLM's) W4A16 g128 / W8A8 int8 schemes.
    "gguf-q8_0": (QuantSpec(qtype=QType.INT8, symmetric=True, granularity=Granularity.GROUP,
                            group_size=32, scale_dtype="float16"), None),
    "gguf-q4_0": (QuantSpec(qtype=QType.INT4, symmetric=True, granularity=Granularity.GROUP,
                            group_size=32, scale_dtype="float16"), None),
    "ct-w4a16": (QuantSpec(qtype=QType.INT4, symmetric=True, granularity=Granularity.GROUP,
                           group_size=128), None),
    "ct-w8a8": (W8A16, A8_DYNAMIC),
    # float8 e4m3, per-channel weights (compressed-tensors' FP8_DYNAMIC scheme; its FP8 scheme's
    # static per-tensor activations; fp8 weight-only, vLLM's W8A16 FP8): exported as they are
    "fp8-dynamic": (FP8_CHANNEL, A_FP8_DYNAMIC),
    "fp8-static": (FP8_CHANNEL, A_FP8_STATIC),
    "fp8-weight-only": (FP8_CHANNEL, None),
}


# Learned rounding recipes' options: the settings measured on SmolLM2 on a 2-core CPU (README,
# benchmarks/results/autoround_smollm2.md); AutoRound's own defaults (200 steps of 8 x 2048
# tokens) cost ~15x more steps x tokens.
AUTOROUND_W4 = AutoRoundOptions(steps=60, batch_tokens=1024)
AUTOROUND_W3 = AutoRoundOptions(steps=30, batch_tokens=512)
AUTOROUND_W2 = AutoRoundOptions(steps=60, batch_tokens=512)

# Calibration recipes: an RTN recipe above (its weight and activation specs), the algorithm that
# rounds the kernels, and the algorithm's options (None: its defaults).
ALGORITHM_RECIPES: dict[str, tuple[str, Algorithm,
                                   Options | None]] = {
    "gptq-w4a16-g128": ("w4a16-g128", Algorithm.GPTQ, None),
    "gptq-w4a16-g128-actorder": ("w4a16-g128", Algorithm.GPTQ, GPTQOptions(act_order=True)),
    "gptq-w4a16-g32": ("w4a16-g32", Algorithm.GPTQ, None),
    "gptq-w3a16-g128": ("w3a16-g128", Algorithm.GPTQ, None),
    "awq-w4a16-g128": ("w4a16-g128", Algorithm.AWQ, None),
    "awq-w4a16-g32": ("w4a16-g32", Algorithm.AWQ, None),
    "awq-w3a16-g128": ("w3a16-g128", Algorithm.AWQ, None),
    "autoround-w4a16-g128": ("w4a16-g128", Algorithm.AUTOROUND, AUTOROUND_W4),
    "autoround-w3a16-g128": ("w3a16-g128", Algorithm.AUTOROUND, AUTOROUND_W3),
    "autoround-w2a16-g32": ("w2a16-g32", Algorithm.AUTOROUND, AUTOROUND_W2),
    "smoothquant-w8a8": ("w8a8-dynamic", Algorithm.SMOOTHQUANT, None),
    "smoothquant-w8a8-static": ("w8a8-static", Algorithm.SMOOTHQUANT, None),
}


def recipe_names() -> list[str]:
  """Every named recipe: the RTN ones (``RECIPES``), then the calibration ones
  (``ALGORITHM_RECIPES``), each sorted."""
  return sorted(RECIPES) + sorted(ALGORITHM_RECIPES)


def recipe_rules(name: str, *,
                 options: Options | None = None,
                 head: QuantSpec | None = None) -> tuple[Rule, ...]:
  """Default rules (see :func:`default_rules`) of a named recipe (see :func:`recipe_names`).

  Args:
    name: e.g. ``"w4a16-g128"`` or ``"gptq-w4a16-g128-actorder"``.
    options: replaces the recipe's algorithm options (their class must match its algorithm).
    head: also quantize the output head and the embedding tables, weight-only, with this spec
      (e.g. ``W8A16``; see :func:`head_rule`).  Default: they stay float.

  Example:
    >>> recipe_rules("gptq-w4a16-g128", options=GPTQOptions(first_token_weight=1.0))
    >>> recipe_rules("w4a16-g128", head=W8A16)            # int8 head: less to read per token

  Raises:
    ValueError: unknown name (the message lists the known ones), or options that do not belong
      to the recipe's algorithm.
  """
  if name in RECIPES:
    base, algorithm, opts = name, Algorithm.RTN, None
  elif name in ALGORITHM_RECIPES:
    base, algorithm, opts = ALGORITHM_RECIPES[name]
  else:
    raise ValueError(f"unknown recipe {name!r}; choose one of {recipe_names()}")
  if options is not None:
    want = ALGORITHM_OPTIONS.get(algorithm)
    if want is None or not isinstance(options, want):
      raise ValueError(f"recipe {name!r} uses {algorithm.value}; options "
                       f"{type(options).__name__} do not belong to it")
    opts = options
  w, a = RECIPES[base]
  return default_rules(w, a, algorithm=algorithm, options=opts, head=head)
