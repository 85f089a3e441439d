"""Evaluation on text: perplexity and KL divergence between models."""
from jq.eval.perplexity import Comparison, PerplexityResult, compare, kl_divergence, perplexity

__all__ = ["Comparison", "PerplexityResult", "compare", "kl_divergence", "perplexity"]
