"""Quantized models run under jit with parameters sharded on an 8-device CPU mesh.

The check runs in a subprocess that sets ``--xla_force_host_platform_device_count=8`` before
importing jax, so the rest of the suite keeps one device.
"""
from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import spawn  # noqa: E402  pylint: disable=wrong-import-position

SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, sys.argv[1])
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jq, jq.nn as jqnn, tiny_models as tm

    assert len(jax.devices()) == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("x",))

    def shard(tree):
      # every array (QArray values / scales / zero points included) is split along its first
      # axis that 8 divides, or replicated
      def one(a):
        axis = next((i for i, d in enumerate(a.shape) if d % 8 == 0), None)
        spec = [None] * a.ndim
        if axis is not None:
          spec[axis] = "x"
        return jax.device_put(a, NamedSharding(mesh, P(*spec)))
      return jax.tree_util.tree_map(one, tree)

    with jax.numpy_dtype_promotion("strict"):
      model, variables, _ = tm.linen_model()
      tokens = tm.tokens(3, (8, 8))
      qapply = jax.jit(jqnn.quantized_apply(model))
      # linen: sub-byte group weights (weight-only); nnx below: int8 dynamic activations
      lays = jqnn.layouts(model, variables, tokens)
      qvars = jax.jit(lambda v: jq.quantize_tree(v, jq.default_rules(jq.W4A16_G32),
                                                 layouts=lays))(variables)
      want = qapply(qvars, tokens)
      qs = shard(qvars)
      assert any(not l.sharding.is_fully_replicated for l in jax.tree_util.tree_leaves(qs))
      got = qapply(qs, jax.device_put(tokens, NamedSharding(mesh, P("x"))))
      assert len(got.sharding.device_set) == 8
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
      print("linen ok")

      m, _ = tm.nnx_model()
      rules = jq.default_rules(jq.W8A16, jq.A8_DYNAMIC)
      qm = jqnn.quantize_module(
          m, jax.jit(lambda st: jq.quantize_tree(st, rules, layouts=jqnn.layouts(m)))(
              nnx.state(m, nnx.Param)))
      graphdef, state = nnx.split(qm)
      run = jax.jit(lambda st, t: nnx.merge(graphdef, st)(t))
      want = run(state, tokens)
      got = run(shard(state), jax.device_put(tokens, NamedSharding(mesh, P("x"))))
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
      print("nnx ok")
""")


def test_sharded_execution_matches_unsharded():
  here = pathlib.Path(__file__).parent
  proc = subprocess.run([sys.executable, "-c", SCRIPT, str(here)], capture_output=True,
                        text=True, env=spawn.env(8), timeout=300,
                        cwd=str(here.parent.parent))
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "linen ok" in proc.stdout and "nnx ok" in proc.stdout
