"""Shared helpers of the quality benchmarks (``quality.py``, ``ptq_compare.py``).

* :class:`LMReference`: the float causal LM evaluated once over fixed windows of held-out text;
  its log-probabilities are kept on the host so every quantized variant costs one forward per
  window instead of two.  Numbers are those of ``jq.app.evaluate`` (same windows, same scoring:
  disjoint windows, no BOS, the first token of each window is context only; float32
  ``log_softmax``; sums in float64).
* :class:`EncoderReference`: the float sentence embeddings of the encoder, computed once.
* :func:`checkpoint_bytes`: size of a tree saved with ``jq.io.save`` (temporary file).
* :func:`markdown_table`, :func:`peak_rss_bytes`.
"""
from __future__ import annotations

import functools
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@functools.cache
def load_model(name: str):
  """``jq_models.registry.load(name)``, once per process (the smoke tests run both scripts in one)."""
  from jq_models import registry
  return registry.load(name)


@jax.jit
def _ref_stats(logits: jax.Array, inputs: jax.Array):
  """Float32 log-probs of the predicting positions and the NLL of their targets."""
  lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(lp, inputs[:, 1:, None], axis=-1)[..., 0]
  return lp, nll


@jax.jit
def _cand_stats(lp_ref: jax.Array, logits_q: jax.Array, inputs: jax.Array):
  """Per position: NLL of the candidate, KL(ref || candidate), argmax agreement."""
  lp_q = jax.nn.log_softmax(logits_q[:, :-1].astype(jnp.float32), axis=-1)
  nll_q = -jnp.take_along_axis(lp_q, inputs[:, 1:, None], axis=-1)[..., 0]
  kl = jnp.sum(jnp.exp(lp_ref) * (lp_ref - lp_q), axis=-1)
  agree = jnp.argmax(lp_ref, axis=-1) == jnp.argmax(lp_q, axis=-1)
  return nll_q, kl, agree


class LMReference:
  """Float reference of a causal LM over ``windows`` disjoint windows of ``window`` tokens.

  Memory: ``windows * (window - 1) * vocab * 4`` bytes of host memory (16 x 512 windows of
  SmolLM2: 1.6 GB).

  Example::

    ref = LMReference(model, windows=16, window=512)
    ref.float_metrics()                 # {"ppl_float": ..., ...}
    ref.compare(lambda t: q_apply(qvars, t))   # same keys as jq.app.evaluate
  """

  def __init__(self, model, *, windows: int, window: int, progress: Callable[[str], None] | None = None):
    if windows < 1 or window < 2:
      raise ValueError(f"need windows >= 1 and window >= 2, got {windows} x {window}")
    tokens = np.asarray(model.eval_tokens(), np.int32)
    if len(tokens) < windows * window:
      raise ValueError(f"evaluation text has {len(tokens)} tokens, fewer than {windows} windows "
                       f"of {window}")
    self.windows, self.window = windows, window
    self.inputs = [tokens[i * window:(i + 1) * window][None] for i in range(windows)]
    f_apply = jax.jit(model.module.apply)
    fvars = model.variables
    self.float_fn = lambda t: f_apply(fvars, t)
    self._lp: list[np.ndarray] = []
    nll_sum, sec = 0.0, 0.0
    for i, x in enumerate(self.inputs):
      t0 = time.perf_counter()
      logits = jax.block_until_ready(self.float_fn(jnp.asarray(x)))
      sec += time.perf_counter() - t0
      lp, nll = _ref_stats(logits, jnp.asarray(x))
      self._lp.append(np.asarray(lp))
      nll_sum += float(np.asarray(nll, np.float64).sum())
      if progress:
        progress(f"float window {i + 1}/{windows}")
    self.n = windows * (window - 1)
    self.nll_float = nll_sum / self.n
    self.seconds_float = sec

  def float_metrics(self) -> dict[str, float]:
    return {"ppl_float": math.exp(self.nll_float), "eval_tokens": self.n,
            "tokens_per_s_float": self.windows * self.window / self.seconds_float}

  def compare(self, logits_fn: Callable[[jax.Array], Any]) -> dict[str, float]:
    """Perplexity, mean/max KL(float || candidate) and top-1 agreement of ``logits_fn``."""
    sums = np.zeros(3, np.float64)
    kl_max, sec = 0.0, 0.0
    for x, lp in zip(self.inputs, self._lp):
      t0 = time.perf_counter()
      logits = jax.block_until_ready(logits_fn(jnp.asarray(x)))
      sec += time.perf_counter() - t0
      if logits.shape[:2] != x.shape:
        raise ValueError(f"candidate returned logits of shape {logits.shape} for tokens {x.shape}")
      nll_q, kl, agree = (np.asarray(s, np.float64) for s in _cand_stats(jnp.asarray(lp), logits,
                                                                         jnp.asarray(x)))
      sums += [nll_q.sum(), kl.sum(), agree.sum()]
      kl_max = max(kl_max, float(kl.max()))
    if not np.all(np.isfinite(sums)):
      raise FloatingPointError(f"candidate produced non-finite log-probs (sums {sums})")
    return {"ppl_float": math.exp(self.nll_float), "ppl_quant": math.exp(sums[0] / self.n),
            "kl": float(sums[1] / self.n), "kl_max": kl_max,
            "top1_agreement": float(sums[2] / self.n), "eval_tokens": self.n,
            "tokens_per_s_float": self.windows * self.window / self.seconds_float,
            "tokens_per_s_quant": self.windows * self.window / sec}


def jq_logits_fn(model, qvars) -> Callable[[jax.Array], Any]:
  """``tokens -> logits`` of the model on jq-quantized variables (jitted)."""
  from jq.nn import quantized_apply
  q_apply = jax.jit(quantized_apply(model.module.apply))
  return lambda t: q_apply(qvars, t)


class EncoderReference:
  """Float sentence embeddings of an encoder on its held-out sentences, computed once."""

  def __init__(self, model, *, sentences: int = 256):
    self.model = model
    self.sentences = model.eval_sentences(sentences)
    self.ref = model.embed(model.module, self.sentences)

  def compare(self, qvars) -> dict[str, float]:
    from jq.nn import quantize_module
    got = self.model.embed(quantize_module(self.model.module, qvars), self.sentences)
    ref = self.ref
    cos = np.sum(ref * got, axis=-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1))
    return {"cosine_mean": float(np.mean(cos)), "cosine_min": float(np.min(cos)),
            "sentences": len(self.sentences)}


def checkpoint_bytes(tree, *, rules=None, metadata: dict | None = None) -> int:
  """Size in bytes of ``tree`` written by ``jq.io.save`` (to a temporary file, then deleted)."""
  from jq import io as jqio
  fd, path = tempfile.mkstemp(suffix=".safetensors")
  os.close(fd)
  try:
    jqio.save(path, tree, metadata=metadata, rules=rules)
    return os.path.getsize(path)
  finally:
    os.unlink(path)


def quantized_linear_bytes(ref_vars, qvars) -> tuple[int, int]:
  """``(float bytes, quantized bytes)`` of the leaves that are QArrays in ``qvars`` (sizes only:
  nothing is dequantized)."""
  from jq import tree as jqtree
  ref = dict(jqtree.leaves_with_paths(ref_vars))
  pairs = [(ref[p], q) for p, q in jqtree.leaves_with_paths(qvars) if jqtree.is_qarray(q)]
  return sum(jqtree.nbytes(w) for w, _ in pairs), sum(q.nbytes for _, q in pairs)


def mib(n: float | None) -> str:
  return "-" if n is None else f"{n / 2**20:.1f}"


def fmt(x: Any, spec: str) -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "-"
  return format(x, spec)


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub markdown table; the first column left-aligned, the rest right-aligned."""
  cells = [[str(c) for c in head]] + [[str(c) for c in r] for r in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
  def line(r):
    return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths))) + " |"
  sep = "| " + " | ".join(("-" * w) if i == 0 else ("-" * (w - 1) + ":")
                          for i, w in enumerate(widths)) + " |"
  return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def peak_rss_bytes() -> float:
  """This process's peak resident memory (``VmHWM`` of ``/proc/self/status``); NaN elsewhere."""
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024.0
  except OSError:
    pass
  return float("nan")


def log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
