"""Greedy-decode throughput of a Llama-shaped ~1B model: bf16 vs jq's quantized kernels.

The model is written here in plain ``jax.numpy`` (random weights; Llama-3.2-1B shapes: d=2048,
SwiGLU 8192, 16 layers, 32 query / 8 KV heads of 64, vocab 128256, tied embeddings), so every
projection goes through one ``matmul(x, w)`` that is either a bf16 ``jnp.dot`` or a jq op on a
QArray.  Embeddings, norms and the output head stay bf16 (jq's default rules).  The whole decode
loop (``--steps`` tokens with a KV cache) is one jitted ``lax.fori_loop``, so the time is device
time, not Python dispatch.

Reported per (variant, batch): tokens/s (batch × steps / median loop time), ms per step, the
parameter bytes, on GPU the device memory in use with only that variant's parameters resident,
and the fraction of generated tokens equal to bf16's (random weights: a sanity signal only).

Usage::

  python benchmarks/decode.py --out decode.json     # GPU
  python benchmarks/decode.py --small               # CPU smoke run (interpret mode)
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jq import spec as S  # noqa: E402
from jq import ops as jq_ops  # noqa: E402
from jq import _compat  # noqa: E402
from jq import kv_cache  # noqa: E402
from jq.ops import pallas_w8a8, pallas_wo, reference  # noqa: E402
from jq.ops.policy import KernelPolicy  # noqa: E402
from jq.qarray import ActivationQuant, QArray  # noqa: E402
from jq.quantize import quantize  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
  vocab: int = 128256
  d: int = 2048
  ffn: int = 8192
  layers: int = 16
  heads: int = 32
  kv_heads: int = 8
  head_dim: int = 64
  max_len: int = 256
  eps: float = 1e-5
  theta: float = 500000.0
  tied: bool = True


SHAPES = {
    "1b": Config(),                                                   # Llama-3.2-1B (tied head)
    "8b": Config(d=4096, ffn=14336, layers=32, heads=32, kv_heads=8, head_dim=128,
                 tied=False),                                         # Llama-3.1-8B
}


SMALL = Config(vocab=512, d=128, ffn=256, layers=1, heads=4, kv_heads=2, head_dim=32, max_len=16)
PROJ = ("q", "k", "v", "o", "gate", "up", "down")
MOSAIC = KernelPolicy(mosaic="always")  # the "mosaic-*" variants (GPU only; elsewhere as auto)


def init_params(cfg: Config, key) -> dict:
  """Random bf16 parameters (normal × 0.02; norms 1)."""
  d, hd = cfg.d, cfg.head_dim
  shapes = dict(q=(d, cfg.heads * hd), k=(d, cfg.kv_heads * hd), v=(d, cfg.kv_heads * hd),
                o=(cfg.heads * hd, d), gate=(d, cfg.ffn), up=(d, cfg.ffn), down=(cfg.ffn, d))
  keys = iter(jax.random.split(key, 2 + cfg.layers * len(PROJ)))

  def normal(shape):
    return jax.random.normal(next(keys), shape, jnp.bfloat16) * jnp.bfloat16(0.02)

  layers = []
  for _ in range(cfg.layers):
    layer = {p: normal(shapes[p]) for p in PROJ}
    layer["norm1"] = jnp.ones((d,), jnp.bfloat16)
    layer["norm2"] = jnp.ones((d,), jnp.bfloat16)
    layers.append(layer)
  out = dict(embed=normal((cfg.vocab, d)), layers=layers, final_norm=jnp.ones((d,), jnp.bfloat16))
  if not cfg.tied:
    out["head"] = normal((d, cfg.vocab))
  return out


VARIANTS = {
    # name: (weight spec, activation quant, implementation)
    "bf16": (None, None, None),
    "w8a16": (S.W8A16, None, "jq"),
    "w4a16-g128": (S.W4A16_G128, None, "jq"),
    "w8a8": (S.W8A16, S.A8_DYNAMIC, "jq"),
    "xla-w8a16": (S.W8A16, None, "xla"),
    "xla-w4a16-g128": (S.W4A16_G128, None, "xla"),
    "xla-w8a8": (S.W8A16, S.A8_DYNAMIC, "xla"),
    "fp8": (S.FP8_CHANNEL, S.A_FP8_DYNAMIC, "dispatch"),    # XLA's native fp8 dot on GPU
    # jq.ops.dot_general: whatever dispatch picks under the JQ_PALLAS policy (default "auto")
    "jq-auto-w8a16": (S.W8A16, None, "dispatch"),
    "jq-auto-w4a16-g128": (S.W4A16_G128, None, "dispatch"),
    "jq-auto-w8a8": (S.W8A16, S.A8_DYNAMIC, "dispatch"),
    # the Mosaic GPU (TMA + wgmma, split-K) kernel where it takes the shape, else as "jq-auto"
    "mosaic-w8a16": (S.W8A16, None, "mosaic"),
    "mosaic-w4a16-g128": (S.W4A16_G128, None, "mosaic"),
}


def head_weight(params: dict):
  """The output head ``(d, vocab)``: its own array, else the tied embedding's transpose."""
  return params["head"] if "head" in params else params["embed"].T


def quantize_params(params: dict, variant: str, head: str = "bf16") -> dict:
  """The projections of ``params`` quantized for ``variant`` (embed and norms stay bf16); with
  ``head="int8"`` the output head is an int8 per-channel QArray (a tied head gets its own copy,
  read instead of the embedding table at every step)."""
  wspec, act, _ = VARIANTS[variant]
  if head == "int8" and wspec is not None:
    params = dict(params, head=jax.jit(functools.partial(quantize, spec=S.W8A16))(
        head_weight(params)))
  if wspec is None:
    return params
  q = jax.jit(functools.partial(quantize, spec=wspec))
  layers = []
  for layer in params["layers"]:
    new = dict(layer)
    for p in PROJ:
      qa = q(layer[p])
      if act is not None:
        qa = dataclasses.replace(qa, activation=ActivationQuant(None, None, act))
      new[p] = qa
    layers.append(new)
  return dict(params, layers=layers)


def make_matmul(variant: str, interpret: bool):
  _, act, impl = VARIANTS[variant]

  def matmul(x, w):
    if not isinstance(w, QArray):
      return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
    dn = (((x.ndim - 1,), (0,)), ((), ()))
    if impl == "dispatch":
      return jq_ops.dot_general(x, w, dn)
    if impl == "mosaic":
      return jq_ops.dot_general(x, w, dn, policy=MOSAIC)
    if impl == "jq":
      if act is not None:
        return pallas_w8a8.int8_dot_general(x, w, dn, interpret=interpret)
      return pallas_wo.weight_only_dot_general(x, w, dn, interpret=interpret)
    if act is not None:
      return reference.int8_dot_general(x, w, dn)
    return reference.weight_only_dot_general(x, w, dn)

  return matmul


def _rms_norm(x, w, eps):
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * w.astype(jnp.float32)).astype(x.dtype)


def _rope(x, pos, theta):
  """Rotate-half RoPE of ``x (B, H, hd)`` at scalar position ``pos``."""
  hd = x.shape[-1]
  inv = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
  ang = pos.astype(jnp.float32) * inv
  cos, sin = jnp.cos(ang), jnp.sin(ang)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def decode_step(params, caches, tok, pos, *, cfg: Config, matmul):
  """One greedy step: tokens ``(B,)`` at position ``pos`` -> next tokens, updated KV caches."""
  b = tok.shape[0]
  h = params["embed"][tok]
  new_caches = []
  group = cfg.heads // cfg.kv_heads
  valid = jnp.arange(cfg.max_len) <= pos
  for layer, (ck, cv) in zip(params["layers"], caches):
    a = _rms_norm(h, layer["norm1"], cfg.eps)
    q = _rope(matmul(a, layer["q"]).reshape(b, cfg.heads, cfg.head_dim), pos, cfg.theta)
    k = _rope(matmul(a, layer["k"]).reshape(b, cfg.kv_heads, cfg.head_dim), pos, cfg.theta)
    v = matmul(a, layer["v"]).reshape(b, cfg.kv_heads, cfg.head_dim)
    ck = kv_cache.update(ck, k[:, None], pos)       # (quantized per token and head, or bf16)
    cv = kv_cache.update(cv, v[:, None], pos)
    keys, values = kv_cache.read(ck, q.dtype), kv_cache.read(cv, q.dtype)
    qg = q.reshape(b, cfg.kv_heads, group, cfg.head_dim)
    s = jnp.einsum("bkgd,btkd->bkgt", qg, keys, preferred_element_type=jnp.float32)
    s = jnp.where(valid, s / np.sqrt(cfg.head_dim).astype(np.float32), -jnp.inf)
    p = jax.nn.softmax(s, axis=-1).astype(values.dtype)
    o = jnp.einsum("bkgt,btkd->bkgd", p, values).reshape(b, cfg.heads * cfg.head_dim)
    h = h + matmul(o, layer["o"])
    a = _rms_norm(h, layer["norm2"], cfg.eps)
    h = h + matmul(jax.nn.silu(matmul(a, layer["gate"])) * matmul(a, layer["up"]), layer["down"])
    new_caches.append((ck, cv))
  hn = _rms_norm(h, params["final_norm"], cfg.eps)
  w_head = head_weight(params)
  logits = (jq_ops.dot_general(hn, w_head, (((1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)
            if isinstance(w_head, QArray) else
            jnp.dot(hn, w_head, preferred_element_type=jnp.float32))
  return jnp.argmax(logits, axis=-1).astype(jnp.int32), new_caches


def make_generate(cfg: Config, matmul, steps: int, kv: str = "none"):
  """``generate(params, tok0) -> tokens (B, steps)``: the whole loop in one jitted call, with a
  bf16 KV cache (``kv="none"``) or an int8/fp8 one (``jq.kv_cache``)."""

  @jax.jit
  def generate(params, tok0):
    b = tok0.shape[0]
    new = lambda: kv_cache.init(b, cfg.max_len, cfg.kv_heads, cfg.head_dim, kv, jnp.bfloat16)
    caches = [(new(), new()) for _ in range(cfg.layers)]
    out = jnp.zeros((b, steps), jnp.int32)

    def body(i, carry):
      tok, caches, out = carry
      tok, caches = decode_step(params, caches, tok, i, cfg=cfg, matmul=matmul)
      return tok, caches, out.at[:, i].set(tok)

    return jax.lax.fori_loop(0, steps, body, (tok0, caches, out))[2]

  return generate


def _nbytes(tree) -> int:
  return int(sum(np.prod(a.shape) * np.dtype(a.dtype).itemsize
                 for a in jax.tree_util.tree_leaves(tree)))


def bytes_per_step(params: dict) -> int:
  """Weight bytes one batch-1 decode step reads: every projection and the head (one embedding
  row is negligible; with a tied bf16 head the table itself is the head)."""
  return _nbytes(params["layers"]) + _nbytes(head_weight(params))


def _bytes_in_use() -> int | None:
  stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
  return None if not stats else int(stats.get("bytes_in_use", 0))


def run(cfg: Config, variants, batches, *, steps: int, iters: int, interpret: bool,
        deadline: float = float("inf"), log=print, head: str = "bf16",
        kv: str = "none") -> list[dict]:
  """One row per (variant, batch).  ``speedup_vs_bf16`` is measured against the bf16 row of the
  same run; ``cap_vs_bf16`` is the batch-1 ceiling, bf16's bytes per step over the variant's."""
  rows = []
  ref_tokens, ref_tps = {}, {}
  bf16_bytes = None
  for variant in variants:
    if time.monotonic() > deadline:
      log(f"# time budget spent: skipping {variant}")
      continue
    row0 = dict(variant=variant)
    try:
      # the same key gives every variant the same float weights; only this variant's parameters
      # stay resident, so the device's bytes in use are (about) the parameter memory
      base = init_params(cfg, jax.random.key(0))
      bf16_bytes = bytes_per_step(base)
      params = jax.block_until_ready(quantize_params(base, variant, head))
      del base
      gc.collect()
      row0.update(param_bytes=_nbytes(params), device_bytes_in_use=_bytes_in_use(),
                  head=head if VARIANTS[variant][0] is not None else "bf16",
                  bytes_per_step=bytes_per_step(params),
                  cap_vs_bf16=bf16_bytes / bytes_per_step(params))
      kind = "none" if variant == "bf16" else kv
      gen = make_generate(cfg, make_matmul(variant, interpret), steps, kind)
      row0.update(kv_cache=kind, kv_bytes_per_token=kv_cache.bytes_per_token(
          cfg.layers, cfg.kv_heads, cfg.head_dim, kind, jnp.bfloat16))
    except Exception as e:  # noqa: BLE001
      rows.append(dict(row0, error=f"{type(e).__name__}: {str(e)[:300]}"))
      log(rows[-1])
      continue
    for b in batches:
      row = dict(row0, batch=b, steps=steps)
      try:
        tok0 = jnp.arange(b, dtype=jnp.int32) % cfg.vocab
        toks = jax.block_until_ready(gen(params, tok0))
        times = []
        for _ in range(iters):
          t0 = time.perf_counter()
          jax.block_until_ready(gen(params, tok0))
          times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        if variant == "bf16":
          ref_tokens[b], ref_tps[b] = np.asarray(toks), b * steps / t
        agree = (float(np.mean(np.asarray(toks) == ref_tokens[b]))
                 if b in ref_tokens else None)
        row.update(tokens_per_s=b * steps / t, ms_per_step=t / steps * 1e3,
                   token_agreement_vs_bf16=agree,
                   speedup_vs_bf16=(b * steps / t) / ref_tps[b] if b in ref_tps else None)
      except Exception as e:  # noqa: BLE001
        row.update(error=f"{type(e).__name__}: {str(e)[:300]}")
      rows.append(row)
      log(_fmt(row))
    del params
    gc.collect()
  return rows


def _fmt(r: dict) -> str:
  head = f"{r['variant']:<16} B={r.get('batch', '-'):<3}"
  if "error" in r:
    return head + " ERROR " + r["error"]
  mem = r.get("device_bytes_in_use")
  agree = r.get("token_agreement_vs_bf16")
  ratio = r.get("speedup_vs_bf16")
  return (head + f" {r['tokens_per_s']:>10.1f} tok/s  {r['ms_per_step']:>8.3f} ms/step  "
          + (f"{ratio:.2f}x bf16 (cap {r['cap_vs_bf16']:.2f}x, "
             f"{ratio / r['cap_vs_bf16']:.0%} of it)  " if ratio is not None else "")
          + f"params {r['param_bytes'] / 2**20:>8.1f} MiB"
          + (f"  in use {mem / 2**20:>8.1f} MiB" if mem else "")
          + (f"  agree {agree:.2f}" if agree is not None else ""))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--small", action="store_true", help="tiny model, CPU smoke run")
  p.add_argument("--out", type=Path)
  p.add_argument("--variants", nargs="*", default=None,
                 help=f"subset of {list(VARIANTS)} (default: bf16 w8a16 w4a16-g128 w8a8)")
  p.add_argument("--batches", type=int, nargs="*", default=None)
  p.add_argument("--steps", type=int, default=None)
  p.add_argument("--iters", type=int, default=None)
  p.add_argument("--budget-s", type=float, default=float("inf"))
  p.add_argument("--shape", choices=sorted(SHAPES), default="1b",
                 help="Llama-3.2-1B (tied head) or Llama-3.1-8B shapes")
  p.add_argument("--head", choices=("bf16", "int8"), default="bf16",
                 help="the output head of quantized variants: bf16, or int8 per channel")
  p.add_argument("--kv-cache", choices=kv_cache.KINDS, default="none",
                 help="the KV cache of quantized variants (bf16 keeps a bf16 cache)")
  args = p.parse_args(argv)
  start = time.monotonic()
  cfg = (dataclasses.replace(SMALL, tied=SHAPES[args.shape].tied) if args.small
         else SHAPES[args.shape])
  variants = args.variants or ["bf16", "w8a16", "w4a16-g128", "w8a8"]
  batches = args.batches or ([1, 2] if args.small else [1, 16])
  steps = args.steps or (4 if args.small else 128)
  iters = args.iters or (2 if args.small else 5)
  interpret = _compat.default_interpret()
  dev = jax.devices()[0]
  print(f"device {dev.device_kind} ({dev.platform}), jax {jax.__version__}, {cfg}, "
        f"steps={steps}, interpret={interpret}", flush=True)
  rows = run(cfg, variants, batches, steps=steps, iters=iters, interpret=interpret,
             deadline=start + args.budget_s, log=lambda s: print(s, flush=True), head=args.head,
             kv=args.kv_cache)
  if args.out:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(
        device=dev.device_kind, platform=dev.platform, jax_version=jax.__version__,
        jaxlib_version=importlib.import_module("jaxlib").__version__,
        config=dataclasses.asdict(cfg), shape=args.shape, head=args.head,
        kv_cache=args.kv_cache, steps=steps,
        interpret=interpret, rows=rows), indent=1))
    print(f"wrote {args.out}")
  return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
  sys.exit(main())
