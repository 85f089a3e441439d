"""Error metrics between a reference and an approximation (float32 accumulation)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _f32(a, b):
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  if a.shape != b.shape:
    raise ValueError(f"metrics: shapes differ: {a.shape} vs {b.shape}")
  return a, b


def mse(ref: jax.Array, approx: jax.Array) -> jax.Array:
  """Mean squared error."""
  a, b = _f32(ref, approx)
  return jnp.mean((a - b) ** 2)


def sqnr(ref: jax.Array, approx: jax.Array) -> jax.Array:
  """Signal-to-quantization-noise ratio in dB: ``10 log10(Σ ref² / Σ (ref − approx)²)``.

  ``inf`` for an exact approximation.
  """
  a, b = _f32(ref, approx)
  noise = jnp.sum((a - b) ** 2)
  return jnp.where(noise == 0, jnp.inf, 10.0 * jnp.log10(jnp.sum(a * a) / noise))


def cosine(ref: jax.Array, approx: jax.Array) -> jax.Array:
  """Cosine similarity of the flattened tensors (1 for two all-zero tensors)."""
  a, b = _f32(ref, approx)
  a, b = a.ravel(), b.ravel()
  # rescale by the largest magnitude first: squares of large tensors overflow float32
  a = a / jnp.maximum(jnp.max(jnp.abs(a), initial=0.0), jnp.finfo(jnp.float32).tiny)
  b = b / jnp.maximum(jnp.max(jnp.abs(b), initial=0.0), jnp.finfo(jnp.float32).tiny)
  na, nb = jnp.linalg.norm(a), jnp.linalg.norm(b)
  ua, ub = a / jnp.where(na == 0, 1.0, na), b / jnp.where(nb == 0, 1.0, nb)
  return jnp.where((na == 0) & (nb == 0), 1.0, jnp.clip(jnp.dot(ua, ub), -1.0, 1.0))


def max_abs_error(ref: jax.Array, approx: jax.Array) -> jax.Array:
  a, b = _f32(ref, approx)
  return jnp.max(jnp.abs(a - b)) if a.size else jnp.float32(0)


def kl_divergence(logits_p: jax.Array, logits_q: jax.Array, axis: int = -1) -> jax.Array:
  """Per-position ``KL(softmax(p) || softmax(q))`` along ``axis`` (nats).

  Entries where ``p`` has zero probability (e.g. ``-inf`` masked logits) contribute 0.
  """
  lp = jax.nn.log_softmax(jnp.asarray(logits_p, jnp.float32), axis=axis)
  lq = jax.nn.log_softmax(jnp.asarray(logits_q, jnp.float32), axis=axis)
  p = jnp.exp(lp)
  return jnp.sum(jnp.where(p > 0, p * (lp - lq), 0.0), axis=axis)


def error_stats(ref: jax.Array, approx: jax.Array) -> dict[str, float]:
  """All tensor metrics as Python floats."""
  return {"mse": float(mse(ref, approx)), "sqnr_db": float(sqnr(ref, approx)),
          "cosine": float(cosine(ref, approx)), "max_abs": float(max_abs_error(ref, approx))}
