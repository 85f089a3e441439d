"""The straight-through estimator (STE) of activation-quantized contractions.

A W8A8 / fp8 layer quantizes its float input ``x`` before the integer (or fp8) contraction:
``round(x / s) (+ z)`` clipped to int8, or ``e4m3(clip(x / s, ±448))``, with a calibrated
per-tensor scale (static) or a per-token absmax scale (dynamic).  Differentiated literally, the
rounding has derivative 0 almost everywhere (static scales: ``jax.grad`` with respect to ``x`` is
exactly 0) and the absmax scale adds a spurious term (dynamic: gradients far from the layer's).

:func:`straight_through` is the one place every activation-quantized road passes through:
``jq.ops.dot_general`` (and so ``matmul``, ``einsum`` and the ``jq.nn`` layers) wraps whichever
registered implementation it chose (the XLA int8 and fp8 references, the Pallas / Mosaic
kernels), and ``jq.ops.conv_general_dilated`` wraps its int8 convolution.  The forward is the
quantized computation, unchanged (same operations, same values); its derivative with respect to
``x`` is that of the same contraction of the unquantized ``x`` with the dequantized weight (the
weight-only road), as quantization-aware training and its peers (torchao, AutoRound) define it::

    ∂y/∂x · t  =  op(m ⊙ t, dequantize(w))          (op linear in x)

``m`` is the clip mask of static scales (the clipped STE): 0 where the quantizer's clip changes
the quantized value (there the layer does not respond to ``x``), 1 elsewhere: ``qmin ≤ round(x/s)
+ z ≤ qmax`` (PyTorch's fake-quantize mask; ``jq.qat``'s LSQ mask on the unrounded code differs
only within half a step of the range's ends), fp8 ``|x/s| ≤ 464`` (it clips before rounding, and
448 < ``|x/s|`` ≤ 464 rounds to 448 anyway: the calibration's absmax, a rounding error past 448,
keeps its gradient).  Dynamic scales use the identity STE (``m = 1``): a per-token absmax scale
covers its token's range, so nothing clips.  The weight (its frozen integer storage and scales,
the calibrated activation scale included) gets zero tangents and cotangents.

The quantized computation runs as it would without the estimator, in the same program (not in a
sub-jaxpr), on ``stop_gradient`` operands, so automatic differentiation never enters it (integer
dots, Pallas calls); a ``jax.custom_jvp`` identity on its output carries the tangent above.  So
``jax.grad`` / ``jax.vjp`` (which transpose that linear tangent), ``jax.jvp`` / ``jax.jacfwd``,
``jax.jit`` and ``jax.vmap`` all work.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from jq import numerics
from jq.ops import reference
from jq.qarray import QArray

Contraction = Callable[[jax.Array, QArray], jax.Array]


def straight_through(quantized: Contraction, dequantized: Contraction, x: jax.Array,
                     w: QArray) -> jax.Array:
  """``quantized(x, w)``, differentiated with respect to ``x`` as ``dequantized`` (module
  docstring).

  Args:
    quantized: the activation-quantized contraction (``w.activation`` set); what runs forward.
    dequantized: the same contraction of a float ``x`` with the weight-only view of ``w``
      (``activation=None``): linear in ``x``, with ``quantized``'s output shape and dtype; its
      derivative is the gradient.  It must close over static values only (shapes, dimension
      numbers, dtypes), never over traced arrays.
    x: the float activations.
    w: the quantized weight; its ``activation`` gives the clip mask of static scales.
  """
  leaves, treedef = jax.tree_util.tree_flatten(w)
  y = quantized(lax.stop_gradient(x), _frozen(w, leaves, treedef))
  # The weight goes in as its leaves: JAX would otherwise rebuild a QArray from its (zero)
  # tangents, and a concrete zero activation scale fails ActivationQuant's checks.
  return _attach(dequantized, treedef, y, x, tuple(leaves))


def _frozen(w: QArray, leaves, treedef) -> QArray:
  """``w`` with every array under ``stop_gradient``; ``w`` itself when they all hold values (then
  nothing differentiates it, and a rebuilt QArray would check its activation scale again)."""
  if all(numerics.is_concrete(a) for a in leaves):
    return w
  return jax.tree_util.tree_unflatten(treedef, [lax.stop_gradient(a) for a in leaves])


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _attach(dequantized, treedef, y, x, leaves):
  """``y`` (the quantized output), whose tangent is the estimator's."""
  del dequantized, treedef, x, leaves
  return y


@_attach.defjvp
def _attach_jvp(dequantized, treedef, primals, tangents):
  y, x, leaves = primals
  _, tx, _ = tangents   # y's tangent is zero (stop_gradient); the weight is frozen storage
  w = jax.tree_util.tree_unflatten(treedef, leaves)
  mask = reference.activation_clip_mask(x, w.activation)
  if mask is not None:
    tx = jnp.where(mask, tx, jnp.zeros_like(tx))
  return y, dequantized(tx, dataclasses.replace(w, activation=None))


__all__ = ["straight_through"]
