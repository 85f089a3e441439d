"""Nothing silently wrong: tampered or corrupt checkpoints are refused, never loaded as another
model.

* jq safetensors: every single-bit flip of the header bytes either loads the identical tree or
  raises CheckpointError; flipped tensor bytes fail their CRC-32/SHA-256 (verify=True only).
* jq orbax: tampered header or tensors are refused.
* JSON headers are parsed with size/depth limits (CheckpointError, not RecursionError).
* compressed-tensors import checks the config against the data; its regexes cannot hang; shard
  paths stay inside the checkpoint.
* GGUF tensor tables with overlapping data ranges are refused.
"""
from __future__ import annotations

import collections
import json
import os
import shutil
import struct
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jq
import jq.io
from jq.io import CheckpointError, codec
from jq.io import compressed_tensors as C
from jq.io.gguf import reader as GR
from jq.io.gguf.types import GGUFFormatError
from jq.io.safetensors_io import read_tensors, write_safetensors
from jq.qarray import QArray
from jq.tree import is_qarray, leaves_with_paths


def _tree():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.standard_normal((4, 8)).astype(np.float32))
  q = jq.quantize(w, jq.QuantSpec(qtype=jq.QType.INT4), name="kernel")
  assert q.qtype is jq.QType.INT4 and q.shape == (4, 8)
  return {"params": {"dense": {"kernel": q,
                               "bias": jnp.asarray(rng.standard_normal(8).astype(np.float32))}},
          "step": 3}


def assert_identical(a, b) -> None:
  """Same containers, keys, QArray static fields, dtypes and bits."""
  la, ta = jax.tree_util.tree_flatten(a, is_leaf=is_qarray)
  lb, tb = jax.tree_util.tree_flatten(b, is_leaf=is_qarray)
  assert ta == tb
  for x, y in zip(la, lb):
    assert type(x) is type(y)
    if isinstance(x, QArray):
      assert (x.qtype, x.shape, x.tile) == (y.qtype, y.shape, y.tile)
      assert (x.zero_point is None) == (y.zero_point is None)
      for f in ("values", "scale", "zero_point"):
        u, v = getattr(x, f), getattr(y, f)
        if u is not None:
          assert u.dtype == v.dtype and np.array_equal(np.asarray(u), np.asarray(v))
    elif hasattr(x, "dtype"):
      assert x.dtype == y.dtype and x.shape == y.shape
      assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
    else:
      assert x == y


@pytest.fixture
def saved(tmp_path):
  tree = _tree()
  path = tmp_path / "m.safetensors"
  jq.io.save(path, tree, metadata={"model": "toy", "lr": 0.1})
  return path, tree


def _split(path):
  data = path.read_bytes()
  (n,) = struct.unpack("<Q", data[:8])
  return json.loads(data[8:8 + n]), data[8 + n:]


def _rewrite_jq(path, fn, reseal=False) -> None:
  """Applies ``fn`` to the jq header dict and writes the file back (tensor bytes unchanged);
  ``reseal`` recomputes the integrity record (a consistent header with wrong content)."""
  st, body = _split(path)
  h = json.loads(st["__metadata__"]["jq"])
  fn(h)
  if reseal:
    h = codec.seal(h)
  st["__metadata__"]["jq"] = json.dumps(h)
  raw = json.dumps(st).encode()
  raw += b" " * (-(8 + len(raw)) % 8)
  path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


# ---- safetensors: every bit of the header ---------------------------------------------------


def test_every_single_bit_flip_of_the_header_is_detected(saved):
  """Exhaustive: all bits of the 8-byte length and the header JSON (the outer safetensors table
  and the jq header inside it).  Each flip loads the identical tree or raises CheckpointError."""
  path, tree = saved
  orig = path.read_bytes()
  (n,) = struct.unpack("<Q", orig[:8])
  outcomes = collections.Counter()
  fd = os.open(path, os.O_RDWR)
  try:
    for i in range(8 + n):
      for bit in range(8):
        os.pwrite(fd, bytes([orig[i] ^ (1 << bit)]), i)
        try:
          out = jq.io.load(path)
        except CheckpointError as e:
          outcomes["SHA-256" if "SHA-256" in str(e) else "other CheckpointError"] += 1
        except Exception as e:  # pylint: disable=broad-except
          pytest.fail(f"flip of bit {bit} of byte {i} raised {type(e).__name__}: {e}")
        else:
          assert_identical(tree, out)
          outcomes["identical"] += 1
        finally:
          os.pwrite(fd, orig[i:i + 1], i)
  finally:
    os.close(fd)
  assert path.read_bytes() == orig
  assert sum(outcomes.values()) == 8 * (8 + n)
  assert outcomes["SHA-256"] > 1000, outcomes  # the digest is what catches the parseable flips


@pytest.mark.parametrize("edit,field", [
    (lambda h: h["leaves"]["params/dense/kernel"].update(qtype="uint4"), "leaves"),
    (lambda h: h["leaves"]["params/dense/kernel"].update(qtype="nf4"), "leaves"),
    (lambda h: h["leaves"]["params/dense/kernel"].update(tile=[2, 1]), "leaves"),
    (lambda h: h["leaves"]["params/dense/kernel"].update(shape=[4, 7]), "leaves"),
    (lambda h: h["leaves"]["step"].update(value=4), "leaves"),
    (lambda h: h["metadata"].update(model="other"), "metadata"),
    (lambda h: h["tensors"]["params/dense/bias"].update(crc32=1), "tensors"),
    (lambda h: h["integrity"]["fields"].update(tree="0" * 64), None),
    (lambda h: h["integrity"].update(header="0" * 64), None),
])
def test_semantic_header_edits_are_refused(saved, edit, field):
  """The probe's tampering (qtype int4 -> uint4/nf4, another tile or shape, ...) loaded as a
  different model before headers carried digests."""
  path, _ = saved
  _rewrite_jq(path, edit)
  with pytest.raises(CheckpointError, match="SHA-256") as e:
    jq.io.load(path, verify=False)  # the header check never depends on verify
  assert str(path) in str(e.value)
  if field:
    assert f"'{field}'" in str(e.value)
  with pytest.raises(CheckpointError, match="SHA-256"):
    jq.io.load_header(path)


def test_tensor_bit_flips_fail_verify_but_load_without(saved):
  path, tree = saved
  st, _ = _split(path)
  orig = path.read_bytes()
  start = len(orig) - len(_split(path)[1])
  for name, entry in st.items():
    if name == "__metadata__":
      continue
    begin, end = entry["data_offsets"]
    for pos in (begin, (begin + end) // 2, end - 1):
      data = bytearray(orig)
      data[start + pos] ^= 0x10
      path.write_bytes(bytes(data))
      with pytest.raises(CheckpointError, match=f"{name}.*(CRC-32|SHA-256)"):
        jq.io.load(path)
      out = jq.io.load(path, verify=False)
      assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(tree)
  path.write_bytes(orig)
  assert_identical(tree, jq.io.load(path))


def test_lazy_leaves_are_checked_when_read(saved):
  """``load(lazy=True)`` checks the header and structure, reads nothing; each leaf's ``load()``
  reads and checks its tensors as ``load`` does, so a corrupt tensor fails there, by name."""
  path, tree = saved
  lazy = jq.io.load(path, lazy=True)
  kernel = lazy["params"]["dense"]["kernel"]
  assert isinstance(kernel, jq.io.LazyLeaf) and lazy["step"] == 3
  assert (kernel.shape, kernel.qtype) == ((4, 8), jq.QType.INT4)
  assert lazy["params"]["dense"]["bias"].dtype == np.float32
  assert_identical(tree, jax.tree.map(jq.io.load_leaf, lazy))
  st, _ = _split(path)
  orig = path.read_bytes()
  begin, end = st["params/dense/kernel.scale"]["data_offsets"]
  data = bytearray(orig)
  data[len(orig) - len(_split(path)[1]) + begin] ^= 0x10
  path.write_bytes(bytes(data))
  lazy = jq.io.load(path, lazy=True)     # (the header is intact)
  jq.io.load_leaf(lazy["params"]["dense"]["bias"])
  with pytest.raises(CheckpointError, match=r"kernel\.scale.*(CRC-32|SHA-256)"):
    kernel = lazy["params"]["dense"]["kernel"].load()
  with pytest.raises(ValueError, match="lazy=True .* does not take shardings"):
    jq.io.load(path, lazy=True, shardings=jax.sharding.SingleDeviceSharding(jax.devices()[0]))


def test_sha256_is_checked_beyond_crc32(saved):
  """A header that is consistent (re-sealed) but records another SHA-256 for a tensor: the CRC
  agrees, the SHA-256 does not (both the whole-file and the sharded paths)."""
  path, _ = saved
  _rewrite_jq(path, lambda h: h["tensors"]["params/dense/bias"].update(sha256="0" * 64),
              reseal=True)
  with pytest.raises(CheckpointError, match=r"params/dense/bias.*SHA-256"):
    jq.io.load(path)
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with pytest.raises(CheckpointError, match=r"params/dense/bias.*SHA-256"):
    jq.io.load(path, shardings=one)
  jq.io.load(path, verify=False)
  jq.io.load(path, shardings=one, verify=False)


def test_header_records_digests_and_load_header_says_verified(saved):
  path, _ = saved
  h = jq.io.load_header(path)
  assert h["verified"] is True
  assert h["integrity"] == codec.integrity_record({k: v for k, v in h.items()
                                                   if k not in ("integrity", "verified")})
  arrays = read_tensors(path)
  for name, t in h["tensors"].items():
    assert t["sha256"] == codec.sha256_hex(arrays[name]) and t["crc32"] == codec.crc32(arrays[name])


def test_checkpoints_without_digests_still_load_unverified(saved):
  """Files written before the integrity record existed: loaded (CRC-32 still checked), reported
  as unverified; but a header with an unknown top-level key and no record is refused (a damaged
  'integrity' key must not pass for an old file)."""
  path, tree = saved

  def legacy(h):
    del h["integrity"]
    for t in h["tensors"].values():
      del t["sha256"]

  _rewrite_jq(path, legacy)
  assert_identical(tree, jq.io.load(path))
  assert jq.io.load_header(path)["verified"] is False
  _rewrite_jq(path, lambda h: h.update(integritx={}))
  with pytest.raises(CheckpointError, match="no 'integrity' record but unknown top-level"):
    jq.io.load(path)


# ---- JSON limits ------------------------------------------------------------------------------


def _raw_safetensors(path, header_bytes: bytes, body: bytes = b"") -> None:
  header_bytes += b" " * (-(8 + len(header_bytes)) % 8)
  path.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + body)


def test_deeply_nested_headers_raise_checkpoint_error(tmp_path):
  p = tmp_path / "deep.safetensors"
  deep = "[" * 100_000 + "]" * 100_000
  _raw_safetensors(p, json.dumps({"__metadata__": {"jq": deep}}).encode())
  for fn in (jq.io.load, jq.io.load_header):
    with pytest.raises(CheckpointError, match="nests 100000 levels deep"):
      fn(p)
  _raw_safetensors(p, ("{\"x\":" + deep + "}").encode())  # the outer table itself
  with pytest.raises(CheckpointError, match="safetensors header nests"):
    jq.io.load(p)
  with pytest.raises(CheckpointError, match="nests"):
    jq.io.read_tensors(p)
  # deep but within Python's recursion limit, and with brackets inside strings (not counted)
  assert codec.json_depth('{"a": "[[[[[[", "b": [[1], {"c": "]]\\"[["}]}') == 3
  nested = {"a": None}
  for _ in range(200):
    nested = {"a": nested}
  with pytest.raises(CheckpointError, match="nest"):
    jq.io.save(tmp_path / "m.safetensors", {"w": jnp.ones(2)}, metadata=nested)
  assert not (tmp_path / "m.safetensors").exists()


def test_header_size_limit_and_duplicate_keys():
  with pytest.raises(CheckpointError, match="more than the 100-byte limit"):
    codec.parse_json(b"[" + b"0," * 100 + b"0]", "hdr", max_bytes=100)
  with pytest.raises(CheckpointError, match="hdr: duplicate key 'a'"):
    codec.parse_json(b'{"a": 1, "a": 2}', "hdr")
  with pytest.raises(CheckpointError, match="hdr is not valid JSON"):
    codec.parse_json(b'{"a": \xff}', "hdr")


def test_non_finite_json_numbers_in_headers_are_checkpoint_errors(saved, tmp_path):
  """Python's json reads NaN/Infinity; jq never writes them, and the digest of a header holding
  one used to fail with json's raw 'Out of range float values are not JSON compliant'."""
  for const in ("NaN", "Infinity", "-Infinity"):
    with pytest.raises(CheckpointError, match=f"hdr: non-finite number {const} in a JSON header"):
      codec.parse_json(f'{{"a": {const}}}'.encode(), "hdr")
  path, _ = saved
  data = path.read_bytes()
  old = b'\\"toy\\"'  # the metadata string inside the jq header (a JSON string in a JSON string)
  path.write_bytes(data.replace(old, b"NaN".ljust(len(old)), 1))  # same length: still parses
  for fn in (jq.io.load, jq.io.load_header, lambda p: jq.io.load(p, verify=False)):
    with pytest.raises(CheckpointError, match="non-finite number NaN"):
      fn(path)
  pytest.importorskip("orbax.checkpoint")
  d = tmp_path / "ck"
  jq.io.save_orbax(d, _tree(), metadata={"model": "toy"})
  h = json.loads((d / "jq" / "metadata").read_text())
  h["metadata"]["model"] = float("nan")
  (d / "jq" / "metadata").write_text(json.dumps(h))
  with pytest.raises(CheckpointError, match="non-finite number NaN"):
    jq.io.load_orbax(d)


def test_metadata_must_be_a_str_keyed_mapping(tmp_path):
  p = tmp_path / "m.safetensors"
  # int keys used to be saved as strings without a word ({1: "a"} read back as {"1": "a"})
  with pytest.raises(CheckpointError, match=r"metadata\['layers'\]: key 1 of type int is not a "
                                            r"str; JSON would store it as a string"):
    jq.io.save(p, _tree(), metadata={"layers": {1: "a"}})
  with pytest.raises(CheckpointError, match=r"metadata\['runs'\]\[0\]: key None"):
    jq.io.save(p, _tree(), metadata={"runs": [{None: 1}]})
  with pytest.raises(CheckpointError, match="metadata must be a dict .* got str 'toy'"):
    jq.io.save(p, _tree(), metadata="toy")  # was dict()'s "update sequence element #0 ..."
  assert not p.exists()
  jq.io.save(p, _tree(), metadata={"layers": {"1": "a"}, "shape": (1, 2)})
  assert jq.io.load_header(p)["metadata"] == {"layers": {"1": "a"}, "shape": [1, 2]}


# ---- orbax --------------------------------------------------------------------------------------


def test_orbax_tampered_header_and_tensors_are_detected(tmp_path):
  pytest.importorskip("orbax.checkpoint")
  tree = _tree()
  d = tmp_path / "ck"
  jq.io.save_orbax(d, tree, metadata={"model": "toy"})
  meta = d / "jq" / "metadata"
  orig = meta.read_bytes()
  assert json.loads(orig)["integrity"]["algorithm"] == "sha256"

  for edit in (lambda h: h["leaves"]["params/dense/kernel"].update(qtype="uint4"),
               lambda h: h["leaves"]["params/dense/kernel"].update(tile=[2, 1]),
               lambda h: h["metadata"].update(model="other")):
    h = json.loads(orig)
    edit(h)
    meta.write_text(json.dumps(h))
    with pytest.raises(CheckpointError, match="SHA-256"):
      jq.io.load_orbax(d, verify=False)

  # single-bit flips spread over the header file: identical tree or CheckpointError
  rng = np.random.default_rng(0)
  for i in sorted(rng.choice(len(orig), 12, replace=False)):
    data = bytearray(orig)
    data[i] ^= 1 << int(rng.integers(8))
    meta.write_bytes(bytes(data))
    try:
      out = jq.io.load_orbax(d)
    except CheckpointError:
      continue
    assert_identical(tree, out)

  meta.write_bytes(("[" * 5000 + "]" * 5000).encode())
  with pytest.raises(CheckpointError, match="nests 5000 levels deep"):
    jq.io.load_orbax(d)

  # tensors from another tree of the same structure (one bias value changed)
  meta.write_bytes(orig)
  other = _tree()
  other["params"]["dense"]["bias"] = other["params"]["dense"]["bias"].at[3].add(1.0)
  jq.io.save_orbax(tmp_path / "other", other)
  shutil.rmtree(d / "tensors")
  shutil.copytree(tmp_path / "other" / "tensors", d / "tensors")
  with pytest.raises(CheckpointError, match=r"params/dense/bias.*(CRC-32|SHA-256)"):
    jq.io.load_orbax(d)
  swapped = jq.io.load_orbax(d, verify=False)
  assert np.array_equal(swapped["params"]["dense"]["bias"], other["params"]["dense"]["bias"])


# ---- compressed-tensors ------------------------------------------------------------------------

CFG = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
           num_kv_heads=1, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5, max_seq_len=64,
           tie_embeddings=True)
KERNELS = r"(^|/)kernel$"
UP = "model.layers.0.mlp.up_proj"


def _tiny_llama(seed=0):
  rng = np.random.default_rng(seed)
  d, f, v = CFG["hidden_size"], CFG["intermediate_size"], CFG["vocab_size"]
  q, kv = CFG["num_heads"] * CFG["head_dim"], CFG["num_kv_heads"] * CFG["head_dim"]
  w = lambda *s: (rng.standard_normal(s) * 0.05).astype(np.float32)
  return {"embed": {"embedding": w(v, d)}, "final_norm": {"scale": 1 + w(d)},
          "layers_0": {
              "attn": {"q_proj": {"kernel": w(d, q)}, "k_proj": {"kernel": w(d, kv)},
                       "v_proj": {"kernel": w(d, kv)}, "o_proj": {"kernel": w(q, d)}},
              "mlp": {"gate_proj": {"kernel": w(d, f)}, "up_proj": {"kernel": w(d, f)},
                      "down_proj": {"kernel": w(f, d)}},
              "input_norm": {"scale": 1 + w(d)}, "post_attn_norm": {"scale": 1 + w(d)}}}


def _export(path, rules, act_scales=None):
  rules = tuple(rules)
  q = jax.jit(lambda p, a: jq.quantize_tree(p, rules, act_scales=a))(_tiny_llama(), act_scales)
  C.export_compressed_tensors(q, CFG, path)
  return q


def _edit_config(ck, fn):
  cfg = json.loads((ck / "config.json").read_text())
  fn(cfg["quantization_config"])
  (ck / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(ck, fn):
  t = read_tensors(ck / "model.safetensors")
  fn(t)
  write_safetensors(ck / "model.safetensors", t)


@pytest.fixture(scope="module")
def ct_asym(tmp_path_factory):
  ck = tmp_path_factory.mktemp("ct") / "asym"
  _export(ck, jq.default_rules(jq.QuantSpec(qtype=jq.QType.UINT4, symmetric=False,
                                            granularity=jq.Granularity.GROUP, group_size=16)))
  return ck


@pytest.fixture
def ck(ct_asym, tmp_path):
  out = tmp_path / "ck"
  shutil.copytree(ct_asym, out)
  return out


def test_ct_good_checkpoint_loads(ck):
  _, params = C.load_compressed_tensors(ck)
  assert params["layers_0"]["mlp"]["up_proj"]["kernel"].qtype is jq.QType.UINT4


def test_ct_symmetric_flag_must_agree_with_zero_points(ck):
  _edit_config(ck, lambda q: q["config_groups"]["group_0"]["weights"].update(symmetric=True))
  with pytest.raises(C.CompressedTensorsError, match="symmetric=true but the module stores a "
                                                     "weight_zero_point"):
    C.load_compressed_tensors(ck)
  _edit_config(ck, lambda q: q["config_groups"]["group_0"]["weights"].update(symmetric="yes"))
  with pytest.raises(C.CompressedTensorsError, match="symmetric='yes' is not a boolean"):
    C.load_compressed_tensors(ck)


def test_ct_weight_shape_must_match_the_packed_data(ck):
  _edit_tensors(ck, lambda t: t.update(
      {f"{UP}.weight_shape": np.array([64, 31], np.int64)}))  # 31 int4 still fit in 4 words
  with pytest.raises(C.CompressedTensorsError,
                     match=r"up_proj.*weight_shape \[64, 31\] disagrees with weight_packed"):
    C.load_compressed_tensors(ck)
  _edit_tensors(ck, lambda t: t.update({f"{UP}.weight_shape": np.array([64, 32, 1], np.int64)}))
  with pytest.raises(C.CompressedTensorsError, match="is not two non-negative integers"):
    C.load_compressed_tensors(ck)


def test_ct_scales_must_be_finite_and_positive(ck):
  t = read_tensors(ck / "model.safetensors")
  good = t[f"{UP}.weight_scale"]
  for bad in (np.nan, np.inf, 0.0, -1.0):
    s = good.copy()
    s[3, 1] = bad
    _edit_tensors(ck, lambda t, s=s: t.update({f"{UP}.weight_scale": s}))
    with pytest.raises(C.CompressedTensorsError,
                       match=r"up_proj.*weight_scale must be finite and positive.*\(3, 1\)"):
      C.load_compressed_tensors(ck)


def test_ct_static_activation_checks(tmp_path):
  a8s = jq.ActivationSpec(mode=jq.ActMode.STATIC, qtype=jq.QType.INT8, symmetric=True)
  paths = [p for p, _ in leaves_with_paths(_tiny_llama()) if p.endswith("kernel")]
  ck = tmp_path / "w8a8"
  _export(ck, [jq.Rule(pattern=KERNELS, weight=jq.W8A16, activation=a8s)],
          {p: (jnp.float32(0.02), None) for p in paths})
  C.load_compressed_tensors(ck)
  t0 = read_tensors(ck / "model.safetensors")
  _edit_tensors(ck, lambda t: t.update({f"{UP}.input_scale": np.array([np.nan], np.float32)}))
  with pytest.raises(C.CompressedTensorsError, match="up_proj.*input_scale must be finite"):
    C.load_compressed_tensors(ck)
  _edit_tensors(ck, lambda t: t.update({f"{UP}.input_scale": t0[f"{UP}.input_scale"],
                                        f"{UP}.input_zero_point": np.array([3], np.int8)}))
  with pytest.raises(C.CompressedTensorsError,
                     match="symmetric=True but the module stores an input_zero_point"):
    C.load_compressed_tensors(ck)
  _edit_tensors(ck, lambda t: t.pop(f"{UP}.input_zero_point"))
  _edit_config(ck, lambda q: q["config_groups"]["group_0"]["input_activations"].update(
      symmetric=False))
  with pytest.raises(C.CompressedTensorsError, match="lacks an input_zero_point"):
    C.load_compressed_tensors(ck)


def test_ct_unknown_module_tensors_are_refused(ck):
  _edit_tensors(ck, lambda t: t.update({f"{UP}.weight_g_idx": np.arange(32, dtype=np.int32)}))
  with pytest.raises(C.CompressedTensorsError, match=r"\['weight_g_idx'\].*refusing to ignore"):
    C.load_compressed_tensors(ck)


def test_ct_index_paths_must_stay_inside_the_checkpoint(ck, tmp_path, monkeypatch):
  t = read_tensors(ck / "model.safetensors")
  (tmp_path / "outside").mkdir()
  write_safetensors(tmp_path / "outside" / "x.safetensors", t)
  os.remove(ck / "model.safetensors")
  read = []
  monkeypatch.setattr(C, "read_tensors", lambda p: read.append(p) or read_tensors(p))
  for target in ("../outside/x.safetensors", str(tmp_path / "outside" / "x.safetensors"),
                 "sub/../../outside/x.safetensors"):
    (ck / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: target for n in t}}))
    with pytest.raises(C.CompressedTensorsError, match="outside the checkpoint directory"):
      C.load_compressed_tensors(ck)
  assert read == []
  # shards inside (also in a subdirectory) are fine
  (ck / "shards").mkdir()
  names = sorted(t)
  write_safetensors(ck / "shards" / "a.safetensors", {n: t[n] for n in names[:5]})
  write_safetensors(ck / "b.safetensors", {n: t[n] for n in names[5:]})
  wmap = {n: ("shards/a.safetensors" if i < 5 else "b.safetensors") for i, n in enumerate(names)}
  (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
  C.load_compressed_tensors(ck)
  wmap[names[0]] = "b.safetensors"  # the index disagrees with the files
  (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
  with pytest.raises(C.CompressedTensorsError, match="does not hold it"):
    C.load_compressed_tensors(ck)


@pytest.mark.parametrize("pattern", [r"(?:.+)+!", r"(a+)+$", r"(a|a)*$", r"(?:x*)*y",
                                     r"((ab)*c)+d", r"(.*){2,}z", r".*.*.*.*.*!"])
def test_ct_catastrophic_regex_fails_fast(ck, pattern):
  _edit_config(ck, lambda q: q.update(ignore=["lm_head", f"re:{pattern}"]))
  t0 = time.perf_counter()
  with pytest.raises(C.CompressedTensorsError, match="refuses it"):
    C.load_compressed_tensors(ck)
  assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize("pattern", [r".*lm_head", r"model.layers.*.mlp.gate$",
                                     r"model\.layers\.\d+\.mlp\.(gate|up)_proj$", r"^(?:foo)?bar",
                                     r"[(+*)]+x", r"a{2}b{1,3}", r"\(.+\)+"])
def test_ct_ordinary_regexes_are_accepted(pattern):
  assert C._regex_risk(pattern) is None  # pylint: disable=protected-access


def test_ct_invalid_regex_is_a_clear_error(ck):
  _edit_config(ck, lambda q: q.update(ignore=["re:(unclosed"]))
  with pytest.raises(C.CompressedTensorsError, match="not a valid regular expression"):
    C.load_compressed_tensors(ck)


# ---- GGUF ---------------------------------------------------------------------------------------


def _gguf(path, tensors, data_len=None):
  """A GGUF v3 file of F32 tensors ``[(name, n_elements, offset)]`` (no metadata)."""
  b = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), 0)
  for name, n, off in tensors:
    raw = name.encode()
    b += struct.pack("<Q", len(raw)) + raw + struct.pack("<IQIQ", 1, n, 0, off)
  b += b"\0" * (-len(b) % 32)
  end = max(off + 4 * n for _, n, off in tensors) if data_len is None else data_len
  b += np.arange(end // 4, dtype=np.float32).tobytes()
  path.write_bytes(b)


def test_gguf_overlapping_tensors_are_refused(tmp_path):
  p = tmp_path / "t.gguf"
  _gguf(p, [("a", 32, 0), ("b", 32, 128)])
  _, ts = GR.load_gguf_qarrays(p)
  assert np.array_equal(ts["b"], np.arange(32, 64, dtype=np.float32))
  _gguf(p, [("a", 32, 0), ("b", 32, 64)])
  with pytest.raises(GGUFFormatError, match=r"tensors 'a' .*and 'b' .*overlap"):
    GR.load_gguf_qarrays(p)
  _gguf(p, [("b", 8, 32), ("a", 32, 0), ("c", 8, 256)])
  with pytest.raises(GGUFFormatError, match=r"tensors 'a' .*and 'b' .*overlap"):
    GR.read_gguf_metadata(p)
  _gguf(p, [("a", 32, 0), ("b", 32, 128)], data_len=200)
  with pytest.raises(GGUFFormatError, match=r"'b'.*truncated"):
    GR.load_gguf_qarrays(p)
