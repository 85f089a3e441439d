"""Model-level workflows behind ``jq-quant``: quantize, evaluate, generate, plan.

Works on the small model interface of ``jq_models.registry`` (duck-typed: ``kind``, ``module``,
``params``/``variables``, ``tokenizer``, ``eval_tokens()``, ``calibration_tokens()``,
``embed()``, ``eval_sentences()``), so nothing here imports ``models``.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jq import kv_cache as kvc
from jq import nn as jqnn
from jq import stream
from jq import tree as jqtree
from jq.eval.perplexity import compare
from jq.eval import sensitivity
from jq.ptq import pipeline, recipes
from jq.spec import Rule, SKIP_PATTERNS


DEFAULT_LENGTH = 512   # tokens per calibration sequence / evaluation window unless told


def context_length(config, length: int | None, what: str) -> int:
  """The sequence length to run a model of ``config`` at: ``length`` if given, else
  :data:`DEFAULT_LENGTH` or the model's whole context where that is shorter.  A given length
  longer than the context would be run anyway (RoPE extrapolates) and may not fit in memory:
  refused, naming the flag (``what``)."""
  limit = getattr(config, "max_seq_len", None)
  if length is None:
    return DEFAULT_LENGTH if limit is None else min(DEFAULT_LENGTH, limit)
  if limit is not None and length > limit:
    raise ValueError(f"{what} = {length} exceeds the model's context of {limit} tokens")
  return length


def float_variables(model) -> Any:
  """The float variables a quantized tree of this model is compared against."""
  if model.kind == "causal_lm":
    return model.variables
  from flax import nnx
  return nnx.state(model.module, nnx.Param)


def quantize_model(model, rules: Sequence[Rule], *, ptq_config: pipeline.PTQConfig | None = None,
                   calib_sequences: int = 32, calib_len: int | None = None,
                   calib_text: str = "news", progress: bool = False) -> tuple[Any, Any, list[str]]:
  """Returns ``(qvars, ref_vars, log)``: the quantized tree, the float tree it approximates
  (with any AWQ/SmoothQuant scales folded in) and notes from calibration.

  The algorithms' options come from the rules (``Rule.options``); ``ptq_config`` only says how
  the block-wise pipeline runs (sequential, chunk, sample_tokens).  ``calib_text``: a causal
  LM's calibration text (``jq_models.registry.calibration_text``: news, shakespeare or a file);
  ``calib_len``: tokens per sequence (default: :func:`context_length`)."""
  from jq.ptq import quantize_model as calibrated  # pylint: disable=import-outside-toplevel
  rules = tuple(rules)
  if model.kind == "causal_lm":
    if recipes.needs_calibration(rules):   # the generic road: blocks found in the module tree
      calib_len = context_length(model.config, calib_len,
                                 "--calib-len (calibration sequence length)")
      cfg = ptq_config or pipeline.PTQConfig()
      try:
        calib = model.calibration_tokens(calib_sequences, calib_len, calib_text)
      except ValueError as e:
        raise ValueError(f"--calib-sequences/--calib-len/--calib-text: {e}") from e
      res = calibrated(model.module, model.variables, rules, _share(
          [calib[i:i + cfg.chunk] for i in range(0, len(calib), cfg.chunk)], cfg),
                       config=cfg, progress=progress)
      return res.variables, res.ref, res.log
    lays = jqnn.layouts(model.module, model.variables, jax.ShapeDtypeStruct((1, 8), jnp.int32))
    return (stream.quantize_in_memory(model.variables, rules, layouts=lays, progress=progress),
            model.variables, [])
  state = float_variables(model)
  if recipes.needs_calibration(rules):   # the generic road: any nnx model, no adapter
    res = calibrated(model.module, None, rules,
                     _share(model.calibration_batches(calib_sequences * 4), ptq_config),
                     config=ptq_config, progress=progress)
    return float_variables(dataclasses.replace(model, module=res.module)), res.ref, res.log
  return jqtree.quantize_tree(state, rules, layouts=jqnn.layouts(model.module)), state, []


def _share(batches: list, cfg: pipeline.PTQConfig | None) -> list:
  """This process's share of the calibration batches when several processes calibrate together
  (``jax.distributed``; ``jq.distributed.process_batches``), else all of them."""
  if jax.process_count() <= 1 or (cfg is not None and cfg.distributed is False):
    return batches
  from jq import distributed  # pylint: disable=import-outside-toplevel
  return distributed.process_batches(batches)


def check_matches(model, qvars, *, source: str) -> None:
  """Raises ValueError if the checkpoint's tree does not fit the model (paths and shapes)."""
  want = {p: tuple(getattr(x, "shape", ())) for p, x in jqtree.leaves_with_paths(float_variables(model))}
  got = {p: tuple(getattr(x, "shape", ())) for p, x in jqtree.leaves_with_paths(qvars)}
  missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  if missing or extra:
    raise ValueError(f"{source} does not fit model {model.name}: missing {missing[:5]}, "
                     f"unexpected {extra[:5]} (a checkpoint for another model?)")
  bad = [(p, got[p], want[p]) for p in want if got[p] != want[p]]
  if bad:
    p, g, w = bad[0]
    raise ValueError(f"{source}: {p} has shape {g}, model {model.name} expects {w}")


def _kv_kind(model, kv_cache: str | kvc.KVKind) -> kvc.KVKind:
  """``kv_cache`` as a kind; a quantized cache needs a decoder (a causal LM with a KV cache)."""
  kind = kvc.as_kind(kv_cache)
  if kind is not kvc.KVKind.NONE and model.kind != "causal_lm":
    raise ValueError(f"--kv-cache {kind.value}: {model.name} is an {model.kind}, not a decoder "
                     "with a KV cache; only --kv-cache none applies to it")
  return kind


def kv_cache_memory(model, kv_cache: str | kvc.KVKind) -> dict[str, Any]:
  """Bytes per token of a decoder's KV cache of kind ``kv_cache`` (keys and values of every
  layer, scales included) and its ratio to the float cache (the config's compute dtype)."""
  c = model.config
  size = lambda kind: kvc.bytes_per_token(c.num_layers, c.num_kv_heads, c.head_dim, kind, c.dtype)
  kind = _kv_kind(model, kv_cache)
  return {"kv_cache": kind.value, "kv_bytes_per_token": size(kind),
          "kv_bytes_per_token_float": size("none"),
          "kv_ratio_to_float": size(kind) / size("none")}


def _logits_fns(model, qvars, kv_cache: kvc.KVKind = kvc.KVKind.NONE):
  from jq.nn import quantized_apply
  f_apply = jax.jit(model.module.apply)
  apply = model.module.apply
  if kv_cache is not kvc.KVKind.NONE:   # the full-sequence forward reads what that cache stores
    apply = functools.partial(apply, kv_quant=kv_cache)
  q_apply = jax.jit(quantized_apply(apply))
  fvars = model.variables
  return (lambda t: f_apply(fvars, t)), (lambda t: q_apply(qvars, t))


def evaluate(model, qvars, *, windows: int = 8, window: int | None = None, progress: bool = False,
             kv_cache: str | kvc.KVKind = "none") -> dict[str, Any]:
  """Quality of ``qvars`` against the float model on held-out text.

  Causal LM: perplexity of both, mean KL(float || quant), top-1 agreement, tokens/s, over
  ``windows`` disjoint windows of ``window`` tokens (default: :func:`context_length`).  Encoder:
  mean/min cosine similarity of sentence embeddings on held-out sentences.  ``kv_cache``
  (``"int8"``, ``"fp8"``; decoders only): the quantized model reads keys and values as that
  cache stores them (the float model keeps float ones), and the cache's bytes per token are
  reported (:func:`kv_cache_memory`).
  """
  kind = _kv_kind(model, kv_cache)
  if model.kind == "causal_lm":
    window = context_length(model.config, window, "--window (evaluation window)")
    tokens = model.eval_tokens()
    need = windows * window
    if len(tokens) < window:
      raise ValueError(f"evaluation text has {len(tokens)} tokens, fewer than one window of {window}")
    tokens = tokens[:need]
    if len(tokens) < need:   # (said, not silently fewer: the text holds no more)
      import warnings  # pylint: disable=import-outside-toplevel
      warnings.warn(f"jq: --eval-windows {windows}: the evaluation text holds "
                    f"{len(tokens) // window} windows of {window} tokens; evaluating those",
                    stacklevel=2)
    f_fn, q_fn = _logits_fns(model, qvars, kind)
    cmp = compare(f_fn, q_fn, tokens, window=window, progress=progress)
    out = {"ppl_float": cmp.ref.ppl, "ppl_quant": cmp.quant.ppl, "kl": cmp.kl,
           "top1_agreement": cmp.top1_agreement, "eval_tokens": cmp.ref.n_predictions,
           "tokens_per_s_float": cmp.ref.tokens_per_s, "tokens_per_s_quant": cmp.quant.tokens_per_s}
    return out if kind is kvc.KVKind.NONE else {**out, **kv_cache_memory(model, kind)}
  from jq.nn import quantize_module
  sentences = model.eval_sentences()
  ref = model.embed(model.module, sentences)
  qmod = quantize_module(model.module, qvars)
  got = model.embed(qmod, sentences)
  cos = np.sum(ref * got, axis=-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1))
  return {"cosine_mean": float(np.mean(cos)), "cosine_min": float(np.min(cos)),
          "sentences": len(sentences)}


def generate(model, qvars, prompt: str, *, max_new_tokens: int = 64, chat: bool = True,
             progress: bool = False, kv_cache: str | kvc.KVKind = "none") -> tuple[str, int]:
  """Greedy continuation of ``prompt`` by the quantized model (jitted, KV cache of kind
  ``kv_cache``: ``"none"``, ``"int8"`` or ``"fp8"``)."""
  from jq.nn import quantized_apply
  kind = _kv_kind(model, kv_cache)
  ids = model.prompt_ids(prompt, chat=chat)
  limit = getattr(model.config, "max_seq_len", None)
  if limit is not None and len(ids) + max_new_tokens > limit:
    raise ValueError(f"--max-new-tokens {max_new_tokens} after the prompt's {len(ids)} tokens "
                     f"exceeds the model's context of {limit} tokens")
  out = model.generate(quantized_apply(model.module.apply), qvars, ids, max_new_tokens,
                       progress=progress, kv_cache=kind.value)
  stop = set(getattr(model.tokenizer, "stop_ids", ()) or ()) | {model.tokenizer.eos_id}
  toks = [int(t) for t in out]
  ends = [i for i, t in enumerate(toks) if t in stop]
  if ends:
    toks = toks[:ends[0]]
  return model.tokenizer.decode(toks, skip_special_tokens=True), len(toks)


# The planner's menu (recipe names).  3-bit weights are packed densely (3 bits a value), so
# "w3 g128" sits between w4 and w2: on SmolLM2 at 4.0 bits/weight it took the plan's perplexity
# from 152 to 54 (benchmarks/results/mixed_precision_smollm2.md).
DEFAULT_OPTIONS = {"w8 channel": "w8a16", "w4 g32": "w4a16-g32", "w4 g128": "w4a16-g128",
                   "w3 g128": "w3a16-g128", "w2 g32": "w2a16-g32"}


def block_scan(model, *, options: Mapping[str, str] | None = None, calib_len: int = 256,
               calib_sequences: int = 2, progress: bool = False) -> sensitivity.ScanResult:
  """Sensitivity scan of a causal LM per transformer block: the next-token KL and the bytes of
  each block quantized alone with each option (``{name: recipe}``, default
  :data:`DEFAULT_OPTIONS`), on ``calib_sequences`` calibration sequences of ``calib_len``."""
  if model.kind != "causal_lm":
    raise ValueError(f"{model.name}: the sensitivity scan measures next-token KL; it needs a causal LM")
  from jq.spec import RECIPES
  options = {k: RECIPES[v][0] for k, v in (options or DEFAULT_OPTIONS).items()}
  tokens = jnp.asarray(model.calibration_tokens(calib_sequences, calib_len))
  params = model.variables
  groups = sensitivity.group_paths(sensitivity.quantizable_kernels(params))
  return sensitivity.sensitivity_scan(lambda p, t: model.module.apply(p, t), params, tokens,
                                      groups, options, progress=progress)


def mixed_precision_plan(model, *, bits_per_weight: float, calib_len: int = 256,
                         calib_sequences: int = 2, progress: bool = False,
                         scan: sensitivity.ScanResult | None = None) -> dict[str, Any]:
  """Sensitivity scan per transformer block (:func:`block_scan`, or ``scan`` if given), then a
  plan under ``bits_per_weight``.

  Returns ``{"scan", "plan", "rules", "bits", "kl"}``; ``rules`` is reusable with
  ``jq-quant quantize --rules``.
  """
  if scan is None:
    scan = block_scan(model, calib_len=calib_len, calib_sequences=calib_sequences,
                      progress=progress)
  plan = sensitivity.plan_mixed_precision(scan, bits_per_weight=bits_per_weight)
  skips = tuple(Rule(pattern=p, weight=None, required=False) for p in SKIP_PATTERNS)
  rules = sensitivity.plan_to_rules(plan, scan, skip_rules=skips)
  return {"scan": scan, "plan": plan, "rules": rules,
          "bits": sensitivity.plan_bits_per_weight(plan, scan),
          "kl": sensitivity.planned_kl(plan, scan)}
