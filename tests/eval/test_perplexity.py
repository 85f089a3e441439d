"""Perplexity / KL over fixed windows, on tiny synthetic logits functions."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jq.eval.perplexity import compare, kl_divergence, perplexity

V = 11


def uniform(tokens):
  return jnp.zeros(tokens.shape + (V,), jnp.float32)


_TABLE = jnp.asarray(np.random.default_rng(0).normal(size=(V, V)) * 2.0, jnp.float32)


@jax.jit
def bigram(tokens):
  """Logits depend only on the current token, so scores do not depend on the window."""
  return _TABLE[tokens]


def _bigram_nll(tokens, first=None):
  """Exact mean NLL of tokens[1:] (and tokens[0] given `first`) under the bigram model."""
  logp = np.asarray(jax.nn.log_softmax(_TABLE, axis=-1), np.float64)
  prev = tokens[:-1] if first is None else np.concatenate([[first], tokens[:-1]])
  tgt = tokens[1:] if first is None else tokens
  return float(-logp[prev, tgt].mean())


TOKENS = np.random.default_rng(1).integers(0, V, size=101).astype(np.int32)


def test_uniform_model_has_perplexity_vocab_size():
  r = perplexity(uniform, TOKENS, window=20)
  assert r.ppl == pytest.approx(V, rel=1e-6)
  assert r.nll == pytest.approx(math.log(V), rel=1e-6)
  assert r.n_predictions == 5 * 19  # 5 disjoint windows of 20 (tail of 1 dropped)
  assert r.tokens_per_s > 0


@pytest.mark.parametrize("window,stride", [(10, 9), (10, 1), (10, 3), (101, None)])
def test_overlapping_windows_score_every_target_once(window, stride):
  r = perplexity(bigram, TOKENS, window=window, stride=stride)
  starts = range(0, TOKENS.size - window + 1, stride or window)
  end = starts[-1] + window  # last token covered
  assert r.n_predictions == end - 1
  assert r.nll == pytest.approx(_bigram_nll(TOKENS[:end]), rel=1e-5)


def test_disjoint_windows_use_first_token_as_context():
  r = perplexity(bigram, TOKENS, window=10)
  assert r.n_predictions == 10 * 9
  per_window = [_bigram_nll(TOKENS[s:s + 10]) for s in range(0, 100, 10)]
  assert r.nll == pytest.approx(np.mean(per_window), rel=1e-5)


def test_bos_scores_first_token():
  bos = 7
  r = perplexity(bigram, TOKENS, window=11, stride=None, bos_id=bos)
  # windows of 10 text tokens after BOS: every text token of the first 100 is a target.
  assert r.n_predictions == 100
  per_window = [_bigram_nll(TOKENS[s:s + 10], first=bos) for s in range(0, 100, 10)]
  assert r.nll == pytest.approx(np.mean(per_window), rel=1e-5)


def test_batching_pads_without_changing_results_or_recompiling():
  calls = []

  @jax.jit
  def fn(tokens):
    return _TABLE[tokens]

  def counting(tokens):
    calls.append(tokens.shape)
    return fn(tokens)

  a = perplexity(bigram, TOKENS, window=10)
  b = perplexity(counting, TOKENS, window=10, batch_size=3)  # 10 windows -> 4 batches, last padded
  assert a.n_predictions == b.n_predictions and a.nll == pytest.approx(b.nll, rel=1e-6)
  assert set(calls) == {(3, 10)} and len(calls) == 4
  assert fn._cache_size() == 1


def test_identical_models_have_zero_kl():
  c = compare(bigram, bigram, TOKENS, window=20)
  assert c.kl == pytest.approx(0.0, abs=1e-7) and c.kl_max == pytest.approx(0.0, abs=1e-6)
  assert c.top1_agreement == 1.0
  assert c.ref.nll == pytest.approx(c.quant.nll, rel=1e-7)
  assert c.ref.nll == pytest.approx(perplexity(bigram, TOKENS, window=20).nll, rel=1e-7)


def test_kl_against_uniform_matches_formula():
  # KL(P || U) = log V - H(P), averaged over the scored positions (prev tokens of targets).
  logp = np.asarray(jax.nn.log_softmax(_TABLE, axis=-1), np.float64)
  kl_rows = (np.exp(logp) * (logp + math.log(V))).sum(-1)
  expected = kl_rows[TOKENS[:100]].mean()  # window 101: positions 0..99 scored
  assert kl_divergence(bigram, uniform, TOKENS, window=101) == pytest.approx(expected, rel=1e-5)
  c = compare(bigram, uniform, TOKENS, window=101)
  assert c.quant.ppl == pytest.approx(V, rel=1e-6)
  assert c.kl_max == pytest.approx(kl_rows[TOKENS[:100]].max(), rel=1e-5)


def test_errors():
  with pytest.raises(ValueError, match="too short"):
    perplexity(uniform, TOKENS[:5], window=10)
  with pytest.raises(ValueError, match="too short"):
    perplexity(uniform, TOKENS[:9], window=11, bos_id=0)  # needs 10 text tokens
  assert perplexity(uniform, TOKENS[:10], window=11, bos_id=0).n_predictions == 10
  with pytest.raises(ValueError, match="1-D"):
    perplexity(uniform, TOKENS[None], window=10)
  with pytest.raises(ValueError, match="stride"):
    perplexity(uniform, TOKENS, window=10, stride=11)
  with pytest.raises(ValueError, match="window"):
    perplexity(uniform, TOKENS, window=1)
  with pytest.raises(ValueError, match="logits of shape"):
    perplexity(lambda t: jnp.zeros((1, 3, V)), TOKENS, window=10)
  with pytest.raises(ValueError, match="out of range"):
    perplexity(lambda t: jnp.zeros(t.shape + (4,)), TOKENS, window=10)
