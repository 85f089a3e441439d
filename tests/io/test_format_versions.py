"""Format versions: 3-bit values are packed eight to three bytes since version 2; files of
version 1 (4-bit slots, written by jq before that) still load, repacked, with their codes checked.

``data/`` holds version-1 files written by jq at commit 99692ca (``data/make_v1_3bit.py``) and the
codes and float32 values that jq read from them.
"""
from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
import safetensors.numpy

import jq
from jq import numerics
from jq import spec as S
from jq.io import CheckpointError
from jq.qtypes import QType

DATA = os.path.join(os.path.dirname(__file__), "data")
V1_FILE = os.path.join(DATA, "v1_3bit.safetensors")
V1_DIR = os.path.join(DATA, "v1_3bit_sharded")
V1_PATHS = ("params/a/kernel", "params/b/kernel", "params/c/kernel")


def _expected():
  return safetensors.numpy.load_file(os.path.join(DATA, "v1_3bit_expected.safetensors"))


def _check_v1_tree(tree):
  want = _expected()
  leaves = dict(jq.tree.leaves_with_paths(tree))
  for path in V1_PATHS:
    q = leaves[path]
    assert q.values.shape == numerics.packed_shape(q.shape, q.qtype)   # dense in memory
    np.testing.assert_array_equal(np.asarray(q.unpacked()), want[f"{path}.codes"])
    np.testing.assert_array_equal(np.asarray(q.dequantize()), want[f"{path}.float"])
  assert {leaves[p].qtype for p in V1_PATHS} == {QType.INT3, QType.UINT3, QType.UINT4}


@pytest.mark.parametrize("path", [V1_FILE, V1_DIR], ids=["file", "sharded"])
def test_version_1_three_bit_files_load_repacked(tmp_path, path):
  header = jq.io.load_header(path)
  assert header["version"] == 1
  assert header["tensors"]["params/a/kernel.values"]["shape"] == [32, 11]   # 21 in 4-bit slots
  tree = jq.io.load(path)
  _check_v1_tree(tree)
  assert tree["params"]["a"]["kernel"].values.shape == (32, 9)    # 3 units of 3 bytes
  # saved again: version 2, dense, the same values
  out = tmp_path / "again.safetensors"
  jq.io.save(out, tree)
  assert jq.io.load_header(out)["version"] == 2
  assert jq.io.load_header(out)["tensors"]["params/a/kernel.values"]["shape"] == [32, 9]
  _check_v1_tree(jq.io.load(out))


def test_version_1_codes_outside_the_range_are_refused(tmp_path):
  """A 4-bit slot can hold 3-bit codes out of range (a corrupt file): refused by name, not masked
  into range by repacking (unverified load: the digests would catch this damage first)."""
  bad = tmp_path / "bad.safetensors"
  shutil.copy(V1_FILE, bad)
  data = bytearray(bad.read_bytes())
  n = int.from_bytes(data[:8], "little")
  info = json.loads(data[8:8 + n])["params/a/kernel.values"]
  at = 8 + n + info["data_offsets"][0] + 11 + 2     # row 1, byte 2: values (1, 4) and (1, 5)
  data[at] = 0xD7                                    # slots 7 (> 3) and 0xD (-3: in range)
  bad.write_bytes(bytes(data))
  with pytest.raises(CheckpointError, match=r"params/a/kernel.*int3.*format version 1.*1 codes "
                                            r"outside \[-4, 3\], first at index \(1, 4\): 7"):
    jq.io.load(bad, verify=False)
  with pytest.raises(CheckpointError, match="SHA-256|CRC"):
    jq.io.load(bad)


def test_version_1_three_bit_files_refuse_placement():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  for path in (V1_FILE, V1_DIR):
    with pytest.raises(CheckpointError, match=r"params/a/kernel: format version 1 stores 3-bit "
                                              r"values in 4-bit slots.*without shardings"):
      jq.io.load(path, shardings=rep)


def test_written_version_follows_the_packing():
  """Only a file holding 3-bit values needs version 2; every other stays readable by older jq."""
  assert jq.io.FORMAT_VERSION == 2
  assert jq.io.codec.format_version([QType.INT4, "uint8", QType.NF4]) == 1
  assert jq.io.codec.format_version(["int4", QType.UINT3]) == 2
  w = np.random.default_rng(0).standard_normal((16, 24)).astype(np.float32)
  int3 = S.QuantSpec(qtype=QType.INT3, granularity=S.Granularity.GROUP, group_size=8)
  header, _ = jq.io.codec.encode({"w": jq.quantize(w, jq.W4A16_G32)})
  assert header["version"] == 1
  header, arrays = jq.io.codec.encode({"w": jq.quantize(w, int3)})
  assert header["version"] == 2 and arrays["w.values"].shape == (16, 9)


@pytest.mark.parametrize("values", [np.zeros((4, 3), np.int8), np.zeros((4, 2), np.uint8)],
                         ids=["dtype", "shape"])
def test_version_1_values_of_another_layout_are_refused(values):
  with pytest.raises(CheckpointError, match=r"params/w: values have shape .*; a format version 1 "
                                            r"file holds 3-bit values two per byte: \(4, 3\) uint8"):
    jq.io.codec._from_4bit_slots(values, QType.INT3, (4, 5), "params/w", abstract=False)
