"""Quantization configs: frozen, keyword-only, hashable dataclasses (usable as jit static args).

Variants come from ``dataclasses.replace``; no string mini-languages, no setters.
"""
from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Sequence

import numpy as np

from jq.qtypes import QType


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
    if not 0.0 < self.ratio <= 1.0:
      raise ValueError(f"Clip.ratio={self.ratio} must be in (0, 1]")
    if not 0.0 < self.percentile <= 100.0:
      raise ValueError(f"Clip.percentile={self.percentile} must be in (0, 100]")
    if self.grid < 1 or not 0.0 < self.min_ratio <= 1.0:
      raise ValueError(f"Clip grid={self.grid} must be >= 1 and min_ratio={self.min_ratio} in (0, 1]")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
  """How one tensor is quantized: ``x ≈ scale · (q − zero_point)``.

  Attributes:
    qtype: element type (int8, int4, int3, int2, their unsigned twins, or NF4).
    symmetric: symmetric (zero point 0, ``scale = absmax / qmax``) or asymmetric (range
      ``[min, max]`` stretched over ``[qmin, qmax]`` with an integer zero point; 0 is always exact).
    granularity: see :class:`Granularity`.
    channel_axes: axes that keep one scale per index (CHANNEL and GROUP).  ``(-1,)`` is the output
      axis of a Dense kernel ``(in, out)``.
    group_size: group length along ``group_axis`` (GROUP only).
    group_axis: the contracting axis that is split into groups (axis 0 of a Dense kernel).
    scale_dtype: dtype of stored scales (name, e.g. ``"float32"`` or ``"bfloat16"``).
    clip: range selection, see :class:`Clip`.

  Example:
    >>> spec = QuantSpec(qtype=QType.INT4, granularity=Granularity.GROUP, group_size=128)
    >>> spec4 = dataclasses.replace(spec, symmetric=False)
  """
  qtype: QType = QType.INT8
  symmetric: bool = True
  granularity: Granularity = Granularity.CHANNEL
  channel_axes: tuple[int, ...] = (-1,)
  group_size: int | None = None
  group_axis: int = 0
  scale_dtype: str = "float32"
  clip: Clip = Clip()

  def __post_init__(self):
    if isinstance(self.channel_axes, int):
      object.__setattr__(self, "channel_axes", (self.channel_axes,))
    object.__setattr__(self, "channel_axes", tuple(self.channel_axes))
    if not all(isinstance(a, int) for a in self.channel_axes) or not isinstance(self.group_axis, int):
      raise ValueError(f"QuantSpec: channel_axes={self.channel_axes} and group_axis="
                       f"{self.group_axis} must be ints")
    if self.group_size is not None and not isinstance(self.group_size, int):
      raise ValueError(f"QuantSpec.group_size={self.group_size!r} must be an int")
    if not isinstance(self.qtype, QType):
      raise ValueError(f"QuantSpec.qtype must be a QType, got {self.qtype!r}")
    if not isinstance(self.granularity, Granularity):
      raise ValueError(f"QuantSpec.granularity must be a Granularity, got {self.granularity!r}")
    if not isinstance(self.clip, Clip):
      raise ValueError(f"QuantSpec.clip must be a Clip, got {self.clip!r}")
    if self.qtype.is_table and not self.symmetric:
      raise ValueError("QuantSpec: NF4 is a symmetric table type; use symmetric=True")
    if self.symmetric and not self.qtype.signed and not self.qtype.is_table:
      raise ValueError(f"QuantSpec: unsigned {self.qtype.value} needs symmetric=False "
                       f"(or use {self.qtype.value[1:]} for a symmetric grid)")
    if self.granularity is Granularity.GROUP:
      if self.group_size is None or self.group_size < 1:
        raise ValueError(f"QuantSpec: granularity=GROUP needs group_size >= 1, got {self.group_size}")
    elif self.group_size is not None:
      raise ValueError(f"QuantSpec: group_size={self.group_size} needs granularity=GROUP")
    if self.scale_dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"QuantSpec.scale_dtype={self.scale_dtype!r}: use float32, bfloat16 or float16")

  def tile(self, shape: Sequence[int], *, name: str = "<tensor>", dtype=None) -> tuple[int, ...]:
    """The per-scale tile of a tensor of ``shape`` under this spec (see ``jq.numerics``)."""
    nd = len(shape)
    where = f"{name}: shape {tuple(shape)}" + (
        f" dtype {np.dtype(dtype).name}" if dtype is not None else "")
    if self.granularity is Granularity.TENSOR:
      return tuple(shape)
    chan = set()
    for a in self.channel_axes:
      if not -nd <= a < nd:
        raise ValueError(f"{where}: channel axis {a} is out of range for rank {nd}")
      chan.add(a % nd)
    tile = [1 if i in chan else s for i, s in enumerate(shape)]
    if self.granularity is Granularity.GROUP:
      if not -nd <= self.group_axis < nd:
        raise ValueError(f"{where}: group_axis {self.group_axis} is out of range for rank {nd}")
      g = self.group_axis % nd
      if g in chan:
        raise ValueError(f"{where}: group_axis {self.group_axis} is also a channel axis")
      tile[g] = min(self.group_size, shape[g]) if shape[g] else self.group_size
    return tuple(tile)

  def describe(self) -> str:
    """Short human-readable label, e.g. ``int4 asym g128``."""
    g = {Granularity.TENSOR: "tensor", Granularity.CHANNEL: "channel"}.get(
        self.granularity, f"g{self.group_size}")
    sym = "sym" if self.symmetric else "asym"
    clip = "" if self.clip.method is ClipMethod.NONE else f" clip={self.clip.method.value}"
    return f"{self.qtype.value} {sym} {g}{clip}"


class ActMode(enum.Enum):
  """How activations of a quantized layer are treated.

  * ``DYNAMIC``: int8 per-token (per-row) scales computed at run time.
  * ``STATIC``: one calibrated scale (and zero point) per tensor, stored beside the kernel.
  """
  DYNAMIC = "dynamic"
  STATIC = "static"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ActivationSpec:
  mode: ActMode = ActMode.DYNAMIC
  qtype: QType = QType.INT8
  symmetric: bool = True

  def __post_init__(self):
    if self.qtype not in (QType.INT8, QType.UINT8):
      raise ValueError(f"ActivationSpec.qtype={self.qtype}: activations are quantized to 8 bits")
    if self.symmetric and not self.qtype.signed:
      raise ValueError("ActivationSpec: uint8 activations need symmetric=False")

  def describe(self) -> str:
    return f"a8 {self.mode.value} {'sym' if self.symmetric else 'asym'}"


class Algorithm(enum.Enum):
  """How weights are rounded: round-to-nearest, or a calibration-based algorithm."""
  RTN = "rtn"
  GPTQ = "gptq"
  AWQ = "awq"
  SMOOTHQUANT = "smoothquant"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
  """Path regex -> how to treat matching leaves.  Rules are ordered; the first match wins.

  Attributes:
    pattern: regular expression searched (``re.search``) in the '/'-joined parameter path.
    weight: the weight spec, or ``None`` to keep matching leaves in float (skip).
    activation: ``None`` for weight-only; otherwise int8 activations (dynamic or static).
    algorithm: rounding algorithm for the weight.
    required: a required rule that matches no leaf is an error (catches typos in patterns).
  """
  pattern: str
  weight: QuantSpec | None
  activation: ActivationSpec | None = None
  algorithm: Algorithm = Algorithm.RTN
  required: bool = True

  def __post_init__(self):
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise ValueError(f"Rule.pattern {self.pattern!r} is not a valid regex: {e}") from e
    if self.weight is None and self.activation is not None:
      raise ValueError(f"Rule {self.pattern!r}: activation quantization needs a weight spec")
    if self.activation is not None and self.weight.qtype.bits != 8:
      raise ValueError(f"Rule {self.pattern!r}: int8 activations need an 8-bit weight "
                       f"(got {self.weight.qtype.value})")
    if self.activation is not None and self.weight.granularity is Granularity.GROUP:
      raise ValueError(f"Rule {self.pattern!r}: int8 x int8 matmuls need per-channel or per-tensor "
                       "weight scales (group scales do not factor out of the integer dot)")

  def matches(self, path: str) -> bool:
    return re.search(self.pattern, path) is not None

  def describe(self) -> str:
    if self.weight is None:
      return "float (skipped)"
    out = f"{self.algorithm.value} w:{self.weight.describe()}"
    return out + (f" {self.activation.describe()}" if self.activation else "")


# Paths that default rules keep in float: embeddings, norms, biases, the output head.
SKIP_PATTERNS = (r"embed", r"norm|(^|/)ln_|layernorm", r"(^|/)bias$", r"lm_head|(^|/)head(/|$)|output_proj")


def default_rules(weight: QuantSpec | None, activation: ActivationSpec | None = None, *,
                  algorithm: Algorithm = Algorithm.RTN, kernel_pattern: str = r"(^|/)kernel$"
                  ) -> tuple[Rule, ...]:
  """Skip embeddings, norms, biases and the output head; quantize every other ``kernel``."""
  skips = tuple(Rule(pattern=p, weight=None, required=False) for p in SKIP_PATTERNS)
  return skips + (Rule(pattern=kernel_pattern, weight=weight, activation=activation,
                       algorithm=algorithm),)


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
A8_STATIC = ActivationSpec(mode=ActMode.STATIC)

RECIPES: dict[str, tuple[QuantSpec, ActivationSpec | None]] = {
    "w8a16": (W8A16, None),
    "w4a16-g128": (W4A16_G128, None),
    "w4a16-g32": (W4A16_G32, None),
    "w3a16-g128": (W3A16_G128, None),
    "w2a16-g32": (W2A16_G32, None),
    "nf4-g64": (NF4_G64, None),
    "w8a8-dynamic": (W8A16, A8_DYNAMIC),
    "w8a8-static": (W8A16, A8_STATIC),
}


def recipe_rules(name: str) -> tuple[Rule, ...]:
  """Default rules for a named RTN recipe (see ``RECIPES``)."""
  if name not in RECIPES:
    raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
  w, a = RECIPES[name]
  return default_rules(w, a)
