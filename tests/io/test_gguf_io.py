"""GGUF export/import: byte equality with gguf-py, exact jq twins, Llama round trips, bad input."""
from __future__ import annotations

import dataclasses
import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jq
from jq.io import gguf as G
from jq.io.gguf import llama as GL
from jq.io.gguf import reader as GR
from jq.tree import is_qarray, leaves_with_paths

T = gguf.GGMLQuantizationType
CFG = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
           num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5, max_seq_len=256,
           tie_embeddings=True)


def _weights(rng, shape, zero_block=True):
  """Gaussian weights with a few outliers, an all-zero block and exact .5 ties."""
  w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
  w[rng.random(shape) < 0.01] *= 20
  if zero_block:
    w[:32, 0] = 0.0
  w[:32, 1] = np.arange(32, dtype=np.float32) - 16.0      # q = (x/d) lands on .5 ties
  return w


def tiny_llama(rng, cfg=CFG):
  d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
  q, kv = cfg["num_heads"] * cfg["head_dim"], cfg["num_kv_heads"] * cfg["head_dim"]
  p = {"embed": {"embedding": _weights(rng, (v, d))},
       "final_norm": {"scale": rng.standard_normal(d).astype(np.float32)}}
  for i in range(cfg["num_layers"]):
    p[f"layers_{i}"] = {
        "attn": {"q_proj": {"kernel": _weights(rng, (d, q))},
                 "k_proj": {"kernel": _weights(rng, (d, kv))},
                 "v_proj": {"kernel": _weights(rng, (d, kv))},
                 "o_proj": {"kernel": _weights(rng, (q, d))}},
        "mlp": {"gate_proj": {"kernel": _weights(rng, (d, f))},
                "up_proj": {"kernel": _weights(rng, (d, f))},
                "down_proj": {"kernel": _weights(rng, (f, d))}},
        "input_norm": {"scale": rng.standard_normal(d).astype(np.float32)},
        "post_attn_norm": {"scale": rng.standard_normal(d).astype(np.float32)}}
  return p


def tiny_tokenizer(vocab=CFG["vocab_size"]):
  return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
          "tokenizer.ggml.tokens": [f"tok{i}" for i in range(vocab)],
          "tokenizer.ggml.token_type": [3, 3] + [1] * (vocab - 2),
          "tokenizer.ggml.merges": ["t o", "to k"], "tokenizer.ggml.bos_token_id": 1,
          "tokenizer.ggml.eos_token_id": 0, "tokenizer.ggml.add_bos_token": False,
          "tokenizer.chat_template": "{{ messages }}"}


_dequantize = jax.jit(lambda q: q.dequantize(jnp.float32))   # jq's own dequantization
_quantize = jax.jit(jq.quantize, static_argnames=("spec", "name"))


def _deq(x):
  return np.asarray(_dequantize(x)) if is_qarray(x) else np.asarray(x)


def _hf_to_gguf_rows(w_out_in, n_heads):
  out = w_out_in.shape[0]
  return w_out_in.reshape(n_heads, 2, out // n_heads // 2, -1).swapaxes(1, 2).reshape(
      w_out_in.shape)


# ---- tensor level ---------------------------------------------------------------------------

@pytest.mark.parametrize("t", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
@pytest.mark.parametrize("block_axis", [0, 1])
def test_float_export_bytes_equal_gguf(t, block_axis):
  rng = np.random.default_rng(1)
  w = _weights(rng, (96, 64))
  if block_axis == 1:
    w = np.ascontiguousarray(w.T)
  ref = gguf.quants.quantize(np.ascontiguousarray(w.T if block_axis == 0 else w), T[t])
  got = G.encode_tensor(w, t, block_axis=block_axis)
  assert got.dtype == ref.dtype and got.shape == ref.shape
  assert np.array_equal(got.view(np.uint8), ref.view(np.uint8))
  # a bf16 / f16 tensor written as its own type: its bits as they are (no float32 detour), the
  # same bytes as gguf's rounding of its float32 values, subnormals and signed zeros included
  for dt in (jnp.bfloat16, np.float16):
    x = (w * np.float32(10.0) ** rng.integers(-42, 2, w.shape)).astype(dt)
    x[:3, 0] = np.asarray([0.0, -0.0, 1e-41], np.float32).astype(dt)
    ref = gguf.quants.quantize(np.ascontiguousarray(
        (x.T if block_axis == 0 else x).astype(np.float32)), T[t])
    got = G.encode_tensor(x, t, block_axis=block_axis)
    assert got.dtype == ref.dtype and np.array_equal(got.view(np.uint8), ref.view(np.uint8))


@pytest.mark.parametrize("t", ["Q8_0", "Q4_0", "Q5_0"])
def test_twin_qarray_is_gguf_grid(t):
  rng = np.random.default_rng(2)
  w = _weights(rng, (128, 48))           # kernel (in, out)
  q = G.quantize_for_gguf(w, t)
  spec = G.gguf_spec(t)
  assert q.qtype is spec.qtype and q.tile == spec.tile(w.shape)
  assert q.scale.dtype == jnp.float16 and (q.zero_point is None) == spec.symmetric
  ref = gguf.quants.quantize(np.ascontiguousarray(w.T), T[t])
  assert np.array_equal(G.encode_tensor(q, t), ref)                   # no re-rounding
  assert np.array_equal(_deq(q).T, gguf.quants.dequantize(ref, T[t]))  # same values, exactly
  back = G.decode_tensor(ref, t, ref.shape[:1] + (128,))
  assert is_qarray(back) and np.array_equal(_deq(back), _deq(q).T)


def test_hand_computed_blocks():
  # Q8_0: d = 127/127 = 1; gguf rounds half away from zero (jq's own rounding is half-even).
  x = np.zeros((1, 32), np.float32)
  x[0, :4] = [127.0, -63.5, 0.5, 2.5]
  b = G.encode_tensor(x, "q8_0", block_axis=1)[0]
  assert list(b[:2]) == [0x00, 0x3C]                                  # fp16 1.0
  assert list(b[2:6].view(np.int8)) == [127, -64, 1, 3]
  # Q4_0: x = j - 16; the largest |x| is -16, so d = -16 / -8 = 2, u_j = trunc(x_j / 2 + 8.5).
  x = (np.arange(32, dtype=np.float32) - 16)[None]
  b = G.encode_tensor(x, "q4_0", block_axis=1)[0]
  assert list(b[:2]) == [0x00, 0x40]                                  # fp16 2.0
  u = np.minimum((np.arange(32) + 1) // 2, 15)
  assert list(b[2:]) == [int(u[i] | (u[i + 16] << 4)) for i in range(16)]
  assert b[2] == 0x80
  q = G.quantize_for_gguf(x, "q4_0", block_axis=1)     # d > 0: codes u, zero point 8
  assert int(q.zero_point[0, 0]) == 8 and float(q.scale[0, 0]) == 2.0
  q = G.quantize_for_gguf(-x, "q4_0", block_axis=1)    # d < 0: codes 15 - u, zero point 7
  assert int(q.zero_point[0, 0]) == 7 and float(q.scale[0, 0]) == 2.0
  assert np.array_equal(G.encode_tensor(q, "q4_0", block_axis=1),
                        gguf.quants.quantize(-x, T.Q4_0))


def _random_blocks(rng, t, n_rows, n_cols):
  bs, ts = gguf.GGML_QUANT_SIZES[t]
  raw = rng.integers(0, 256, size=(n_rows * n_cols // bs, ts), dtype=np.uint8)
  f16 = lambda k: (rng.standard_normal(k) * 0.01).astype(np.float16).view(np.uint8).reshape(-1, 2)
  n = raw.shape[0]
  offsets = {T.Q8_0: [0], T.Q4_0: [0], T.Q5_0: [0], T.Q4_1: [0, 2], T.Q5_1: [0, 2],
             T.Q6_K: [ts - 2], T.Q3_K: [ts - 2], T.Q4_K: [0, 2], T.Q5_K: [0, 2],
             T.Q2_K: [ts - 4, ts - 2]}[t]
  for o in offsets:
    raw[:, o:o + 2] = f16(n)
  return raw.reshape(n_rows, -1)


@pytest.mark.parametrize("t", ["Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1", "Q6_K", "Q3_K", "Q4_K",
                               "Q5_K", "Q2_K", "F16", "BF16"])
def test_decode_equals_gguf_dequantize(t):
  rng = np.random.default_rng(3)
  shape = (4, 512)
  if t in ("F16", "BF16"):
    raw = gguf.quants.quantize(rng.standard_normal(shape).astype(np.float32), T[t])
  else:
    raw = _random_blocks(rng, T[t], *shape)     # arbitrary codes, negative scales included
  if t == "Q8_0":  # code -128 with a negative d has no positive-scale int8 twin (see below)
    codes = raw.reshape(-1, 34)[:, 2:]
    codes[codes == 0x80] = 0x81
  got = G.decode_tensor(raw, t, shape)
  assert is_qarray(got) == (t in ("Q8_0", "Q4_0", "Q5_0", "Q6_K", "Q3_K"))
  assert np.array_equal(_deq(got), gguf.quants.dequantize(raw, T[t]))


def test_decode_falls_back_to_float_when_no_twin():
  block = np.zeros((1, 34), np.uint8)
  block[0, :2] = np.array([-0.5], np.float16).view(np.uint8)
  block[0, 2:] = np.arange(-128, -96, dtype=np.int8).view(np.uint8)   # -128 * (-0.5) = +64
  got = G.decode_tensor(block, "q8_0", (1, 32))
  assert not is_qarray(got)
  assert np.array_equal(got, gguf.quants.dequantize(block, T.Q8_0))


def test_jq_grids_that_gguf_stores_exactly():
  rng = np.random.default_rng(4)
  w = jnp.asarray(_weights(rng, (128, 64)))
  # jq's own rounding on Q8_0's layout (fp16 scales): a different grid, but one Q8_0 holds.
  q8 = _quantize(w, G.gguf_spec("q8_0"))
  b = G.encode_tensor(q8, "q8_0")
  assert np.array_equal(gguf.quants.dequantize(b, T.Q8_0), _deq(q8).T)
  # int4 symmetric, fp16 scales, groups of 32 or 64 -> Q4_0 (and Q4_1, Q5_0) without re-rounding.
  for g in (32, 64):
    spec = jq.QuantSpec(qtype=jq.QType.INT4, granularity=jq.Granularity.GROUP, group_size=g,
                        scale_dtype="float16")
    q4 = _quantize(w, spec)
    for t in ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0"):
      b = G.encode_tensor(q4, t)
      assert np.array_equal(gguf.quants.dequantize(b, G.to_ggml_type(t)), _deq(q4).T), (g, t)
  # per-channel int8 with fp16 scales -> Q8_0 (the channel scale repeats in every block)
  qc = _quantize(w, jq.QuantSpec(qtype=jq.QType.INT8, scale_dtype="float16"))
  assert np.array_equal(gguf.quants.dequantize(G.encode_tensor(qc, "q8_0"), T.Q8_0), _deq(qc).T)


def test_inexact_grids_are_refused_unless_requantize():
  rng = np.random.default_rng(5)
  w = jnp.asarray(_weights(rng, (128, 64)))
  q = _quantize(w, jq.W4A16_G128)                 # uint4 asym, float32 scales
  with pytest.raises(G.GGUFExportError, match=r"layers_0/mlp.*Q4_0.*requantize=True"):
    G.encode_tensor(q, "q4_0", name="layers_0/mlp/up_proj/kernel")
  with pytest.raises(G.GGUFExportError, match="NF4"):
    G.encode_tensor(_quantize(w, jq.NF4_G64), "q4_0")
  g16 = _quantize(w, jq.QuantSpec(qtype=jq.QType.INT8, granularity=jq.Granularity.GROUP,
                                    group_size=16, scale_dtype="float16"))
  with pytest.raises(G.GGUFExportError, match="scales vary inside GGUF block"):
    G.encode_tensor(g16, "q8_0")
  with pytest.raises(G.GGUFExportError, match="F16 cannot hold"):
    G.encode_tensor(q, "f16")
  for t in ("q4_0", "q4_1", "q8_0", "f16"):
    got = G.encode_tensor(q, t, requantize=True)
    ref = gguf.quants.quantize(np.ascontiguousarray(_deq(q).T), G.to_ggml_type(t))
    assert np.array_equal(got, ref), t
  assert np.array_equal(G.encode_tensor(q, "f32"), _deq(q).T)   # F32 is always exact


def test_tensor_level_errors():
  w = np.zeros((40, 64), np.float32)
  with pytest.raises(ValueError, match=r"w: shape \(40, 64\).*not a multiple of the GGUF block"):
    G.quantize_for_gguf(w, "q8_0", name="w")
  with pytest.raises(ValueError, match="no exact jq QuantSpec twin"):
    G.gguf_spec("q4_1")
  with pytest.raises(ValueError, match="unknown GGUF tensor type"):
    G.to_ggml_type("q9_9")
  with pytest.raises(G.GGUFExportError, match="IQ4_NL is not supported"):
    G.encode_tensor(np.zeros((256, 8), np.float32), "iq4_nl")
  with pytest.raises(ValueError, match=r"axis 0 \(96\) is not a multiple of the GGUF block size 256"):
    G.encode_tensor(np.zeros((96, 8), np.float32), "q6_k")
  with pytest.raises(ValueError, match="NaN"):
    G.quantize_for_gguf(np.full((32, 2), np.nan, np.float32), "q8_0")


@pytest.mark.parametrize("t", ["Q6_K", "Q4_K"])
def test_k_quants(t):
  rng = np.random.default_rng(10)
  w = _weights(rng, (512, 24))                     # kernel (in=512, out=24): rows of 2 super-blocks
  w[:256, 2] = 0.0                                 # an all-zero super-block
  b = G.encode_tensor(w, t)
  bs, ts = gguf.GGML_QUANT_SIZES[T[t]]
  assert b.shape == (24, 2 * ts) and b.dtype == np.uint8
  deq = gguf.quants.dequantize(b, T[t])
  amax = np.abs(w.T).reshape(24, -1, 256).max(-1, keepdims=True)    # per super-block
  err = np.abs(deq - w.T).reshape(24, -1, 256)
  assert np.all(err <= amax * (1 / 32 if t == "Q6_K" else 1 / 8)) and np.all(deq[2, :256] == 0)
  back = G.decode_tensor(b, t, (24, 512))
  assert np.array_equal(_deq(back), deq)
  if t == "Q6_K":   # the imported QArray is written back exactly (values; sign conventions may differ)
    assert is_qarray(back) and back.tile == (1, 16)
    again = G.encode_tensor(back, t, block_axis=1)
    assert np.array_equal(gguf.quants.dequantize(again, T[t]), deq)
  else:
    with pytest.raises(G.GGUFExportError, match="Q4_K.*requantize=True"):
      G.encode_tensor(G.quantize_for_gguf(w, "q8_0"), t)
    q = G.quantize_for_gguf(w, "q8_0")
    assert np.array_equal(G.encode_tensor(q, t, requantize=True), G.encode_tensor(_deq(q), t))


def _ggml_lib():
  """libggml-base from an installed llama-cpp-python, with ``ggml_quantize_chunk`` (or None)."""
  import ctypes
  import importlib.util
  import pathlib
  spec = importlib.util.find_spec("llama_cpp")
  if spec is None or not spec.submodule_search_locations:
    return None
  for d in spec.submodule_search_locations:
    for name in ("libggml-base.so", "libggml-base.dylib", "libggml.so"):
      for f in pathlib.Path(d).rglob(name):
        lib = ctypes.CDLL(str(f))
        if hasattr(lib, "ggml_quantize_chunk"):
          lib.ggml_quantize_chunk.restype = ctypes.c_size_t
          lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                              ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                              ctypes.c_void_p]
          return lib
  return None


def test_bytes_equal_ggml_c_reference():
  """Optional: every writable block type equals ggml's own C quantizer (needs llama-cpp-python)."""
  lib = _ggml_lib()
  if lib is None:
    pytest.skip("llama_cpp (with libggml-base) is not installed")
  rng = np.random.default_rng(11)
  x = _weights(rng, (512, 64)).T.copy()           # (rows=64, n=512)
  x[3, :256] = 0.0
  x[4, :64] = 1e-3
  for t in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q6_K", "Q4_K"):
    bs, ts = gguf.GGML_QUANT_SIZES[T[t]]
    ref = np.zeros((64, 512 // bs * ts), np.uint8)
    lib.ggml_quantize_chunk(int(T[t]), x.ctypes.data, ref.ctypes.data, 0, 64, 512, None)
    assert np.array_equal(G.encode_tensor(x, t, block_axis=1), ref), t


# ---- model level ----------------------------------------------------------------------------

@pytest.mark.parametrize("t", ["q8_0", "q4_0", "q5_1", "f16"])
def test_llama_export_reads_back(tmp_path, t):
  rng = np.random.default_rng(6)
  params = tiny_llama(rng)
  path = tmp_path / "tiny.gguf"
  written = G.export_gguf({"params": params}, CFG, tiny_tokenizer(), path, t, name="tiny")
  r = gguf.GGUFReader(path)
  names = {x.name: x for x in r.tensors}
  assert set(names) == set(written) and len(names) == 2 + 9 * CFG["num_layers"]
  assert list(names["blk.0.attn_q.weight"].shape) == [64, 64]
  assert list(names["blk.1.attn_k.weight"].shape) == [64, 32]       # ne = [in, out]
  assert list(names["blk.0.ffn_down.weight"].shape) == [96, 64]
  assert list(names["token_embd.weight"].shape) == [64, 128]
  assert names["blk.0.attn_norm.weight"].tensor_type == T.F32
  assert names["blk.0.ffn_up.weight"].tensor_type == G.to_ggml_type(t)
  meta = {k: f.contents() for k, f in r.fields.items()}
  assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 2
  assert meta["llama.attention.head_count_kv"] == 2 and meta["llama.rope.dimension_count"] == 16
  assert meta["llama.embedding_length"] == 64 and meta["llama.feed_forward_length"] == 96
  assert meta["tokenizer.ggml.tokens"][:3] == ["tok0", "tok1", "tok2"]
  assert meta["tokenizer.ggml.pre"] == "smollm" and meta["tokenizer.ggml.bos_token_id"] == 1
  assert r.fields["tokenizer.ggml.token_type"].types[-1] == gguf.GGUFValueType.INT32
  # tensors: gguf's quantization of the (Q/K re-permuted) weights, byte for byte
  wq = params["layers_0"]["attn"]["q_proj"]["kernel"].T
  ref = gguf.quants.quantize(_hf_to_gguf_rows(wq, CFG["num_heads"]), G.to_ggml_type(t))
  assert np.array_equal(np.asarray(names["blk.0.attn_q.weight"].data).view(np.uint8),
                        ref.view(np.uint8))
  # import: the jq tree back, Q/K in HF order, dequantized exactly like gguf
  hp, back, meta2 = G.load_gguf_params(path)
  assert hp == G.LlamaHParams(**{**CFG, "rms_norm_eps": float(np.float32(1e-5))})
  for p, x in leaves_with_paths(back):
    name = GL._gguf_name(p)[0]
    gd = gguf.quants.dequantize(names[name].data, names[name].tensor_type)
    if p.endswith("kernel"):
      heads = {"q_proj": 4, "k_proj": 2}.get(p.split("/")[-2])
      gd = gd.T if heads is None else GL._permute_rows(gd, np.argsort(GL._qk_perm(
          gd.shape[0], heads, p)), 1).T
    assert np.array_equal(_deq(x), gd), p


def test_llama_export_k_quants_and_fallback(tmp_path):
  cfg = {**CFG, "hidden_size": 256, "head_dim": 64, "intermediate_size": 320}
  params = tiny_llama(np.random.default_rng(12), cfg)
  notes = []
  written = G.export_gguf(params, cfg, None, tmp_path / "k.gguf", "q6_k", embed_type="q6_k",
                          notes=notes)
  assert written["blk.0.attn_q.weight"] == T.Q6_K and written["token_embd.weight"] == T.Q6_K
  assert written["blk.0.ffn_down.weight"] == T.Q8_0        # 320 inputs: llama-quantize's fallback
  assert any("blk.0.ffn_down.weight): 320 input columns are not a multiple of 256, so Q6_K falls "
             "back to Q8_0" in n for n in notes)
  # the float embedding stays float unless a type is asked for
  written = G.export_gguf(params, cfg, None, tmp_path / "kf.gguf", "q6_k")
  assert written["token_embd.weight"] == T.F32
  written = G.export_gguf(params, cfg, None, tmp_path / "k4.gguf", "q4_k", embed_type="q8_0")
  assert written["blk.1.ffn_up.weight"] == T.Q4_K and written["blk.1.ffn_down.weight"] == T.Q5_0
  hp, back, _ = G.load_gguf_params(tmp_path / "k.gguf")
  q = back["layers_0"]["attn"]["q_proj"]["kernel"]
  assert is_qarray(q) and q.tile == (16, 1) and hp.hidden_size == 256
  err = np.abs(_deq(q) - params["layers_0"]["attn"]["q_proj"]["kernel"]).max()
  assert err < 0.05 * np.abs(params["layers_0"]["attn"]["q_proj"]["kernel"]).max()


def test_rows_no_block_divides_fall_back_to_float_by_name(tmp_path):
  """Inputs of 80 / 112: a 32-block type (asked for, or Q4_K's Q5_0) falls back to F16 for a
  float tensor (llama-quantize's last resort), to F32 for a QArray F16 cannot hold exactly (so
  the export still computes the checkpoint's function), each named in the notes."""
  cfg = {**CFG, "hidden_size": 80, "head_dim": 20, "intermediate_size": 112}
  params = tiny_llama(np.random.default_rng(3), cfg)
  for t in ("q8_0", "q4_k"):
    notes = []
    written = G.export_gguf(params, cfg, None, tmp_path / f"{t}.gguf", t, embed_type="q8_0",
                            notes=notes)
    assert written["blk.0.ffn_down.weight"] == written["token_embd.weight"] == T.F16, written
    assert any(n.startswith("params/layers_0/mlp/down_proj/kernel (blk.0.ffn_down.weight): 112 "
                            f"input columns are not a multiple of {32 if t == 'q8_0' else 256}, "
                            f"so {t.upper()} falls back to F16") for n in notes), notes
    assert len(notes) == 2 * 7 + 1
  w = params["layers_1"]["mlp"]["up_proj"]["kernel"]
  q = _quantize(w, jq.QuantSpec(qtype=jq.QType.INT8))   # one scale per column of 80
  grid = dict(params, layers_1={**params["layers_1"], "mlp": {**params["layers_1"]["mlp"],
                                                              "up_proj": {"kernel": q}}})
  written = G.export_gguf(grid, cfg, None, tmp_path / "grid.gguf", "q8_0")
  assert written["blk.1.ffn_up.weight"] == T.F32
  _, back, _ = G.load_gguf_params(tmp_path / "grid.gguf")
  assert np.array_equal(_deq(back["layers_1"]["mlp"]["up_proj"]["kernel"]), _deq(q))
  written = G.export_gguf(grid, cfg, None, tmp_path / "grid16.gguf", "q8_0", requantize=True)
  assert written["blk.1.ffn_up.weight"] == T.F16   # asked to round: F16, as llama-quantize


def test_an_int8_embedding_is_written_as_q8_0_not_as_the_linears_type(tmp_path):
  """An int8 head (``jq.head_rule``) keeps 8 bits in GGUF without ``embed_type``: Q8_0, exact when
  its grid is Q8_0's, re-rounded (and reported) only in its block scales otherwise."""
  params = tiny_llama(np.random.default_rng(13))
  emb = params["embed"]["embedding"]
  params["embed"]["embedding"] = G.quantize_for_gguf(emb, "q8_0", block_axis=1)
  written = G.export_gguf(params, CFG, None, tmp_path / "e.gguf", "q4_0")
  assert written["token_embd.weight"] == T.Q8_0 and written["blk.0.attn_q.weight"] == T.Q4_0
  params["embed"]["embedding"] = jq.quantize(emb, jq.W8A16, layout=jq.Layout(contracting=(1,),
                                                                            channels=(0,)))
  with pytest.raises(G.GGUFExportError, match="embed/embedding.*Q8_0"):
    G.export_gguf(params, CFG, None, tmp_path / "e2.gguf", "q4_0")
  notes = []
  written = G.export_gguf(params, CFG, None, tmp_path / "e2.gguf", "q4_0", requantize=True,
                          notes=notes)
  assert written["token_embd.weight"] == T.Q8_0
  assert any("embed/embedding: re-rounded from int8 sym tile (1, 64) to GGUF Q8_0" in n
             for n in notes), notes


def test_qarray_tree_round_trip(tmp_path):
  """export(jq twin QArrays) -> import gives the same QArrays and dequantized values."""
  rng = np.random.default_rng(7)
  params = tiny_llama(rng)
  q = {}
  for p, x in leaves_with_paths(params):
    if p.endswith("kernel"):
      x = G.quantize_for_gguf(x, "q4_0" if "mlp" in p else "q8_0", name=p)
    elif p == "embed/embedding":
      x = G.quantize_for_gguf(x, "q5_0", block_axis=1)
    q[p] = x
  tree = {}
  for p, x in q.items():
    node = tree
    for k in p.split("/")[:-1]:
      node = node.setdefault(k, {})
    node[p.split("/")[-1]] = x
  path = tmp_path / "mixed.gguf"
  written = G.export_gguf(tree, CFG, None, path, "q8_0", embed_type="q5_0",
                          tensor_types={r"ffn_": "q4_0"})
  assert written["blk.0.ffn_up.weight"] == T.Q4_0 and written["token_embd.weight"] == T.Q5_0
  _, back, _ = G.load_gguf_params(path)
  got = dict(leaves_with_paths(back))
  for p, x in q.items():
    y = got[p]
    assert np.array_equal(_deq(x), _deq(y)), p
    if is_qarray(x):
      assert is_qarray(y) and (x.qtype, x.tile, x.shape) == (y.qtype, y.tile, y.shape)
      assert np.array_equal(np.asarray(x.values), np.asarray(y.values))
      assert np.array_equal(np.asarray(x.scale), np.asarray(y.scale))
  # a jq checkpoint of the tree, loaded lazily (each leaf read as it is encoded): the same file
  jq.io.save(tmp_path / "mixed.safetensors", {"params": tree})
  lazy = jq.io.load(tmp_path / "mixed.safetensors", lazy=True)
  assert isinstance(lazy["params"]["layers_0"]["mlp"]["up_proj"]["kernel"], jq.io.LazyLeaf)
  assert G.export_gguf(lazy, CFG, None, tmp_path / "lazy.gguf", "q8_0", embed_type="q5_0",
                       tensor_types={r"ffn_": "q4_0"}) == written
  assert (tmp_path / "lazy.gguf").read_bytes() == path.read_bytes()


def test_model_level_errors(tmp_path):
  rng = np.random.default_rng(8)
  params = tiny_llama(rng)
  out = tmp_path / "x.gguf"
  bert = {"encoder": {"layer_0": {"attention": {"query": {"kernel": np.zeros((64, 64))}}}}}
  with pytest.raises(G.GGUFExportError, match="params/encoder/layer_0.*not a tensor of this llama decoder"):
    G.export_gguf(bert, CFG, None, out)
  with pytest.raises(G.GGUFExportError, match="architecture 'bert'"):
    G.export_gguf(params, {**CFG, "model_type": "bert"}, None, out)
  with pytest.raises(G.GGUFExportError, match=r"_proj/kernel: shape \(64, 64\) does not match the config"):
    G.export_gguf(params, {**CFG, "num_heads": 2, "head_dim": 16}, None, out)
  with pytest.raises(G.GGUFExportError, match="lacks 18 tensors"):
    G.export_gguf(params, {**CFG, "num_layers": 4}, None, out)
  with pytest.raises(G.GGUFExportError, match="cannot write GGUF IQ4_NL"):
    G.export_gguf(params, CFG, None, out, "iq4_nl")
  with pytest.raises(G.GGUFExportError, match="tokenizer has 3 tokens but vocab_size=128"):
    G.export_gguf(params, CFG, {"tokenizer.ggml.tokens": ["a", "b", "c"]}, out)
  qk = dict(params)
  qk["layers_0"] = dict(qk["layers_0"], attn=dict(qk["layers_0"]["attn"]))
  qk["layers_0"]["attn"]["q_proj"] = {"kernel": _quantize(
      jnp.asarray(params["layers_0"]["attn"]["q_proj"]["kernel"]), jq.W8A16)}
  with pytest.raises(G.GGUFExportError, match=r"params/layers_0/attn/q_proj/kernel.*Q8_0"):
    G.export_gguf(qk, CFG, None, out, "q8_0")
  G.export_gguf(qk, CFG, None, out, "q8_0", requantize=True)
  assert os.listdir(tmp_path) == ["x.gguf"]            # failed writes leave no temporary files


def test_corrupt_and_truncated_files(tmp_path):
  rng = np.random.default_rng(9)
  good = tmp_path / "good.gguf"
  G.export_gguf(tiny_llama(rng), CFG, tiny_tokenizer(), good, "q4_0")
  data = good.read_bytes()
  with pytest.raises(FileNotFoundError):
    G.load_gguf_qarrays(tmp_path / "missing.gguf")
  for bad, match in [(b"GGML" + data[4:], "not a GGUF file"),
                     (data[: len(data) // 2], "truncated"),
                     (data[:1000], "truncated"),
                     (data[:20], "too short"),
                     (data[:4] + (7).to_bytes(4, "little") + data[8:], "version 7")]:
    p = tmp_path / "bad.gguf"
    p.write_bytes(bad)
    with pytest.raises(G.GGUFFormatError, match=match):
      G.load_gguf_qarrays(p)
  meta, tensors = G.load_gguf_qarrays(good)
  assert meta["tokenizer.ggml.tokens"][5] == "tok5" and len(tensors) == 20


# ---- the real model -------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_export_q8_0_q4_0(tmp_path):
  fetch = pytest.importorskip("jq_models.fetch")
  src = fetch.fetch(fetch.SMOLLM2_GGUF)
  hp, qparams, meta = G.load_gguf_params(src)
  params = jq.dequantize_tree(qparams)      # float weights, exactly the source's values
  assert (hp.num_layers, hp.hidden_size, hp.num_heads, hp.num_kv_heads) == (30, 576, 9, 3)
  tok = G.tokenizer_metadata(meta)
  src_f = GR._GGUFFile(src)
  src_tensors = {ti.name: ti for ti in src_f.tensors}
  check = ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight",
           "blk.29.ffn_down.weight", "blk.17.attn_v.weight"]
  for t in ("q8_0", "q4_0"):
    out = tmp_path / f"smollm2.{t}.gguf"
    G.export_gguf(params, hp, tok, out, t, embed_type=t, name="SmolLM2-135M-Instruct (jq)")
    f = GR._GGUFFile(out)
    assert [x.name for x in f.tensors] == [x.name for x in src_f.tensors] or \
        {x.name for x in f.tensors} == set(src_tensors)
    for ti in f.tensors:
      assert ti.shape == src_tensors[ti.name].shape, ti.name
      want = T.F32 if ti.name.endswith("norm.weight") else G.to_ggml_type(t)
      assert ti.type == want, ti.name
    for name in check:   # bytes = gguf's quantization of the source weights (llama.cpp row order)
      s = src_tensors[name]
      w = gguf.quants.dequantize(src_f.tensor_bytes(s).reshape(s.shape[0], -1), s.type)
      ref = gguf.quants.quantize(w, G.to_ggml_type(t))
      assert np.array_equal(f.tensor_bytes(f.tensors[[x.name for x in f.tensors].index(name)]),
                            ref.reshape(-1)), (t, name)
    assert f.metadata["tokenizer.ggml.merges"] == meta["tokenizer.ggml.merges"]
    for k in ("llama.block_count", "llama.embedding_length", "llama.attention.head_count_kv",
              "llama.rope.freq_base", "llama.vocab_size", "tokenizer.ggml.pre",
              "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"):
      assert f.metadata[k] == meta[k], k
  r = gguf.GGUFReader(tmp_path / "smollm2.q8_0.gguf")   # gguf-py's own reader agrees
  assert len(r.tensors) == 272 and r.fields["general.file_type"].contents() == 7
  assert r.fields["tokenizer.ggml.tokens"].contents()[:3] == meta["tokenizer.ggml.tokens"][:3]


@pytest.mark.slow
def test_llama_cpp_runs_export_with_jq_perplexity(tmp_path):
  """Optional: llama.cpp loads the exported SmolLM2 and its perplexity matches jq's own."""
  llama_cpp = pytest.importorskip("llama_cpp")
  fetch = pytest.importorskip("jq_models.fetch")
  decoder = pytest.importorskip("jq_models.decoder")
  text = pytest.importorskip("jq_models.text")
  tokenizer = pytest.importorskip("jq_models.tokenizer")
  from jq.eval.perplexity import perplexity
  hp, qparams, meta = G.load_gguf_params(fetch.fetch(fetch.SMOLLM2_GGUF))
  params = jq.dequantize_tree(qparams)
  model = decoder.Llama(decoder.LlamaConfig(**dataclasses.asdict(hp)))
  logits_fn = jax.jit(lambda p, t: model.apply({"params": p}, t))
  results = {}
  for t in ("q8_0", "q4_0"):
    out = tmp_path / f"smollm2.{t}.gguf"
    G.export_gguf(params, hp, G.tokenizer_metadata(meta), out, t)
    ids = tokenizer.load_tokenizer(out).encode(text.eval_text())[:1024]   # tokenizer carried over
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=1024, n_batch=1024, logits_all=True,
                          n_threads=2, verbose=False)
    assert llm.tokenize(text.eval_text()[:400].encode(), add_bos=False)[:50] == ids[:50]
    llm.eval(ids)
    logits = np.asarray(llm.scores[:1024], np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    ppl_cpp = float(np.exp(-logp[np.arange(1023), ids[1:]].mean()))
    _, back, _ = G.load_gguf_params(out)        # the same file in jq: QArrays, dequantized
    deq = jq.dequantize_tree(back)
    ppl_jq = perplexity(lambda x: logits_fn(deq, x), np.asarray(ids), window=1024).ppl
    results[t] = (ppl_jq, ppl_cpp)
    assert abs(ppl_cpp / ppl_jq - 1) < 0.03, (t, ppl_jq, ppl_cpp)
  print("SmolLM2 perplexity, first 1024 eval tokens (jq, llama.cpp):", results)


def test_export_model_adapter(tmp_path):
  import types
  model = types.SimpleNamespace(config=CFG)
  params = {"params": tiny_llama(np.random.default_rng(13))}
  with pytest.raises(G.GGUFExportError, match="tokenizer_meta=tokenizer_metadata"):
    G.export_model(model, params, tmp_path / "a.gguf", ggml_type="q4_0")
  src = tmp_path / "src.gguf"
  G.export_gguf(params, CFG, tiny_tokenizer(), src, "f32")
  G.export_model(model, params, tmp_path / "a.gguf", ggml_type="q4_0", source_gguf=src)
  meta = G.read_gguf_metadata(tmp_path / "a.gguf")
  assert meta["tokenizer.ggml.tokens"] == tiny_tokenizer()["tokenizer.ggml.tokens"]
  assert meta["general.file_type"] == 2
