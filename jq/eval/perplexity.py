"""Perplexity and KL divergence of causal language models over fixed-size token windows.

Model-agnostic: a model is any ``logits_fn(tokens[B, T]) -> logits[B, T, V]`` (jit it yourself;
every call here has the same shape, so it compiles once). Log-probabilities are float32
``log_softmax``; sums are accumulated in float64 on the host.

Windows: the token stream is cut into windows of ``window`` model inputs starting every ``stride``
tokens (default: disjoint windows). The first window scores all of its ``window - 1`` predictions;
a later window scores only its last ``min(stride, window - 1)`` predictions (the targets that
earlier windows have not scored), so no target is scored twice and each has at least
``window - stride`` tokens of context. With disjoint windows and no BOS, the first token of each
window is context only (as in llama.cpp). A tail shorter than a window is dropped. With
``bos_id``, each window is ``[bos] + window - 1`` text tokens and every text token is a target
(the first one predicted from BOS alone), so disjoint windows then score every token once.

  nll = mean over scored targets of -log p(target | context);   ppl = exp(nll)
  KL(P_ref || P_q) = sum_v p_ref(v) (log p_ref(v) - log p_q(v)), averaged over the same positions
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

LogitsFn = Callable[[jax.Array], ArrayLike]


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
  """Attributes:
    nll: mean negative log-likelihood per scored token, in nats.
    ppl: ``exp(nll)``.
    n_predictions: number of scored tokens.
    tokens_per_s: model input tokens (windows x window) per wall-clock second, including any
      compilation triggered by the first call.
  """
  nll: float
  ppl: float
  n_predictions: int
  tokens_per_s: float


@dataclasses.dataclass(frozen=True)
class Comparison:
  """Reference vs. candidate (e.g. float vs. quantized) over the same windows.

  Attributes:
    ref: perplexity of the reference model.
    quant: perplexity of the candidate model.
    kl: mean KL(P_ref || P_quant) per scored position, in nats.
    kl_max: largest per-position KL.
    top1_agreement: fraction of scored positions where both models' argmax agree.
  """
  ref: PerplexityResult
  quant: PerplexityResult
  kl: float
  kl_max: float
  top1_agreement: float


@dataclasses.dataclass(frozen=True)
class _Plan:
  tokens: np.ndarray  # 1-D int32 text tokens
  window: int
  body: int           # text tokens per window (window, or window - 1 with BOS)
  stride: int
  starts: tuple[int, ...]
  bos_id: int | None


def _plan(tokens: ArrayLike, window: int, stride: int | None, bos_id: int | None) -> _Plan:
  toks = np.asarray(tokens)
  if toks.ndim != 1:
    raise ValueError(f"tokens must be a 1-D array of token ids, got shape {toks.shape}")
  if not np.issubdtype(toks.dtype, np.integer):
    raise ValueError(f"tokens must be integers, got dtype {toks.dtype}")
  if not isinstance(window, (int, np.integer)) or window < 2:
    raise ValueError(f"window must be an int >= 2, got {window!r}")
  body = window - (bos_id is not None)
  stride = body if stride is None else stride
  if not isinstance(stride, (int, np.integer)) or not 1 <= stride <= body:
    raise ValueError(f"stride must be an int in [1, {body}] for window={window}"
                     f"{' with bos_id' if bos_id is not None else ''}, got {stride!r}")
  if toks.size < body:
    raise ValueError(f"text too short: {toks.size} tokens, one window needs {body} "
                     f"(window={window}{', bos_id set' if bos_id is not None else ''}); use a "
                     "smaller window or more text")
  starts = tuple(range(0, toks.size - body + 1, stride))
  return _Plan(toks.astype(np.int32), int(window), body, int(stride), starts, bos_id)


def _batches(plan: _Plan, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields ``(inputs[B, window], scored[B, window - 1])``; the last batch is padded with copies of
  the last window (scored nowhere) so every batch has the same shape."""
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
  n_pred = plan.window - 1
  first = np.ones(n_pred, bool)
  later = np.zeros(n_pred, bool)
  later[max(0, n_pred - plan.stride):] = True
  rows, masks = [], []
  for i, s in enumerate(plan.starts):
    row = plan.tokens[s:s + plan.body]
    if plan.bos_id is not None:
      row = np.concatenate([np.array([plan.bos_id], np.int32), row])
    rows.append(row)
    masks.append(first if i == 0 else later)
    if len(rows) == batch_size:
      yield np.stack(rows), np.stack(masks)
      rows, masks = [], []
  if rows:
    pad = batch_size - len(rows)
    yield (np.stack(rows + [rows[-1]] * pad),
           np.stack(masks + [np.zeros(n_pred, bool)] * pad))


def _check_logits(logits: jax.Array, inputs: np.ndarray, what: str) -> jax.Array:
  logits = jnp.asarray(logits)
  if logits.ndim != 3 or logits.shape[:2] != inputs.shape:
    raise ValueError(f"{what} returned logits of shape {logits.shape}; expected "
                     f"{inputs.shape + ('V',)} for tokens of shape {inputs.shape}")
  if int(inputs.max()) >= logits.shape[-1]:
    raise ValueError(f"token id {int(inputs.max())} is out of range for {what}'s vocabulary of "
                     f"{logits.shape[-1]}")
  return logits


@jax.jit
def _token_nll(logits: jax.Array, inputs: jax.Array) -> jax.Array:
  """Per-position NLL of ``inputs[:, 1:]`` under ``logits[:, :-1]``, float32 ``(B, T-1)``."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, inputs[:, 1:, None], axis=-1)[..., 0]


@jax.jit
def _pair_stats(logits_ref: jax.Array, logits_q: jax.Array, inputs: jax.Array):
  """Per-position (nll_ref, nll_q, KL(ref || q), argmax agreement), each ``(B, T-1)``."""
  lp_r = jax.nn.log_softmax(logits_ref[:, :-1].astype(jnp.float32), axis=-1)
  lp_q = jax.nn.log_softmax(logits_q[:, :-1].astype(jnp.float32), axis=-1)
  targets = inputs[:, 1:, None]
  nll_r = -jnp.take_along_axis(lp_r, targets, axis=-1)[..., 0]
  nll_q = -jnp.take_along_axis(lp_q, targets, axis=-1)[..., 0]
  kl = jnp.sum(jnp.exp(lp_r) * (lp_r - lp_q), axis=-1)
  agree = jnp.argmax(lp_r, axis=-1) == jnp.argmax(lp_q, axis=-1)
  return nll_r, nll_q, kl, agree


def _result(nll_sum: float, n: int, n_inputs: int, seconds: float) -> PerplexityResult:
  nll = nll_sum / n
  return PerplexityResult(nll=nll, ppl=math.exp(nll), n_predictions=n,
                          tokens_per_s=n_inputs / seconds if seconds > 0 else float("inf"))


def perplexity(logits_fn: LogitsFn, tokens: ArrayLike, *, window: int, stride: int | None = None,
               bos_id: int | None = None, batch_size: int = 1) -> PerplexityResult:
  """Perplexity of ``logits_fn`` on a 1-D token stream (see the module docstring for windows).

  Args:
    logits_fn: ``tokens[B, window] int32 -> logits[B, window, V]``.
    tokens: 1-D token ids (no BOS; pass ``bos_id`` to prepend one per window).
    window: model input length per call.
    stride: window start spacing, ``1 <= stride <= window`` (default: disjoint windows).
    bos_id: BOS token prepended to each window.
    batch_size: windows per call.

  Returns:
    ``PerplexityResult``. Example: one window of 1024 tokens, no BOS -> 1023 predictions.

  Raises:
    ValueError: the text is shorter than one window, or bad arguments/logits shapes.
  """
  plan = _plan(tokens, window, stride, bos_id)
  nll_sum, n = 0.0, 0
  t0 = time.perf_counter()
  for inputs, scored in _batches(plan, batch_size):
    logits = _check_logits(logits_fn(jnp.asarray(inputs)), inputs, "logits_fn")
    nll = np.asarray(_token_nll(logits, jnp.asarray(inputs)), np.float64)
    nll_sum += float(nll[scored].sum())
    n += int(scored.sum())
  seconds = time.perf_counter() - t0
  return _result(nll_sum, n, len(plan.starts) * plan.window, seconds)


def compare(logits_fn_ref: LogitsFn, logits_fn_q: LogitsFn, tokens: ArrayLike, *, window: int,
            stride: int | None = None, bos_id: int | None = None,
            batch_size: int = 1, progress: bool = False) -> Comparison:
  """Perplexity of both models and KL(P_ref || P_q) in one pass: one forward of each per batch.

  Arguments as for ``perplexity``; both models see exactly the same windows. ``tokens_per_s`` of
  each result counts only that model's own calls. ``progress`` shows a bar over the batches.
  """
  plan = _plan(tokens, window, stride, bos_id)
  sums = np.zeros(4, np.float64)  # nll_ref, nll_q, kl, agree
  kl_max, n = 0.0, 0
  sec_r = sec_q = 0.0
  batches = _batches(plan, batch_size)
  if progress:
    from tqdm.auto import tqdm
    batches = tqdm(batches, total=-(-len(plan.starts) // batch_size), desc="evaluating",
                   unit="window", leave=False)
  for inputs, scored in batches:
    x = jnp.asarray(inputs)
    t0 = time.perf_counter()
    lr = jax.block_until_ready(_check_logits(logits_fn_ref(x), inputs, "logits_fn_ref"))
    t1 = time.perf_counter()
    lq = jax.block_until_ready(_check_logits(logits_fn_q(x), inputs, "logits_fn_q"))
    t2 = time.perf_counter()
    sec_r += t1 - t0
    sec_q += t2 - t1
    if lr.shape != lq.shape:
      raise ValueError(f"logits shapes differ: ref {lr.shape} vs quant {lq.shape}")
    stats = [np.asarray(s, np.float64)[scored] for s in _pair_stats(lr, lq, x)]
    sums += [s.sum() for s in stats]
    kl_max = max(kl_max, float(stats[2].max(initial=0.0)))
    n += int(scored.sum())
  n_inputs = len(plan.starts) * plan.window
  return Comparison(ref=_result(sums[0], n, n_inputs, sec_r),
                    quant=_result(sums[1], n, n_inputs, sec_q),
                    kl=float(sums[2] / n), kl_max=kl_max, top1_agreement=float(sums[3] / n))


def kl_divergence(logits_fn_ref: LogitsFn, logits_fn_q: LogitsFn, tokens: ArrayLike, *,
                  window: int, stride: int | None = None, bos_id: int | None = None,
                  batch_size: int = 1) -> float:
  """Mean KL(P_ref || P_q) per scored position, in nats (``compare(...).kl``)."""
  return compare(logits_fn_ref, logits_fn_q, tokens, window=window, stride=stride, bos_id=bos_id,
                 batch_size=batch_size).kl
