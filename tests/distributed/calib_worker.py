"""One calibration run for tests/distributed (run as a script: JAX must be configured first).

``python calib_worker.py OUT [--devices N] [--process-id I --num-processes N --port P]
[--recipes a,b] [--bad rules|batches|tokens] [--timeout S] [--skip-collect]
[--cpu-collectives gloo|none]``

* ``--devices N`` (one process): N virtual CPU devices; every recipe runs once on one device
  (``<recipe>.single.npz``) and once data-parallel on a mesh of the N devices
  (``<recipe>.mesh.npz``).
* ``--process-id``: one of several ``jax.distributed`` processes on localhost; it quantizes its
  share (``jq.distributed.process_batches``) and writes ``<recipe>.p<I>.npz``; with
  ``--devices N`` data-parallel over its own N devices (``jq.distributed.local_mesh()``).
* ``--global-mesh`` (with ``--process-id`` and ``--devices N``): one mesh of every process's
  devices (``PTQConfig(mesh=...)`` over processes) instead of a mesh per process; first, a 2-D
  mesh whose processes share data-axis slices must be refused (``overlap.txt``).
* neither: the single-process reference, ``<recipe>.single.npz``.
* first (unless ``--skip-collect``): ``jq.calibrate.collect`` of a scanned stack, written to
  ``collect.<single|mesh|p<I>>.npz``.
* ``--bad``: this process disagrees with the others (other rules, another calibration set) or
  fails (a negative token id); the error goes to ``error.p<I>.txt`` and the exit status is 3.
* ``--cpu-collectives none``: no cross-process XLA collectives on CPU; the statistics then travel
  through the coordinator's key-value store.

Every QArray is written as its integer codes (``<path>.codes``), scales (``<path>.scale``), zero
points and static activation scale (``<path>.act_scale``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def _args(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("out")
  ap.add_argument("--devices", type=int, default=1)
  ap.add_argument("--process-id", type=int, default=None)
  ap.add_argument("--num-processes", type=int, default=2)
  ap.add_argument("--port", type=int, default=0)
  ap.add_argument("--recipes", default="gptq-w4a16-g32,w8a8-static")
  ap.add_argument("--bad", default="", choices=["", "rules", "batches", "tokens"])
  ap.add_argument("--timeout", type=float, default=40.0)
  ap.add_argument("--batches", type=int, default=4)
  ap.add_argument("--skip-collect", action="store_true")
  ap.add_argument("--global-mesh", action="store_true")
  ap.add_argument("--cpu-collectives", default="gloo", choices=["gloo", "none"])
  return ap.parse_args(argv)


def setup(batches: int = 4, rows: int = 8):
  """The tiny decoder, its variables and the calibration set (the same in every process)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jq_models.decoder import Decoder, DecoderConfig
  cfg = DecoderConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=4, head_dim=16, max_seq_len=64)
  model = Decoder(cfg)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  rng = np.random.default_rng(0)
  calib = [rng.integers(0, cfg.vocab_size, (rows, 32)).astype(np.int32) for _ in range(batches)]
  return model, variables, calib


def stack_setup(batches: int = 4):
  """A scanned stack (``nn.scan``: vmapped callbacks, one per stacked layer) and float batches
  of 8 rows, for :func:`collect_check`."""
  import flax.linen as nn
  import jax
  import numpy as np

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      h = nn.DenseGeneral((4, 8), name="q")(x)
      return x + nn.DenseGeneral(32, axis=(-2, -1), name="o")(h), None

  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=3)(name="layers")(x, None)
      return x

  model = Stack()
  rng = np.random.default_rng(1)
  xs = [rng.standard_normal((8, 5, 32)).astype(np.float32) for _ in range(batches)]
  return model, model.init(jax.random.key(0), xs[0]), xs


def collect_check(path: str, *, mesh=None, share=None) -> None:
  """``jq.calibrate.collect`` of the scanned stack (XᵀX, ranges and a token sample per stacked
  layer), written to ``path``: on one device, on ``mesh``, or this process's ``share`` of the
  batches summed across processes."""
  import numpy as np
  import jq.distributed
  import jq.nn as jqnn
  from jq.calibrate import Want, collect
  model, variables, xs = stack_setup()
  qapply = jqnn.quantized_apply(model)
  wants = {"params/layers/q/kernel": Want(stack=3, xtx=True, samples=24),
           "params/layers/o/kernel": Want(stack=3, xtx=True, samples=10)}
  kw = {}
  if mesh is not None and len({d.process_index for d in mesh.devices.flat}) > 1:
    xs = list(jq.distributed.process_batches(xs))   # (a global batch joins the processes' rows)
  elif share is not None:
    mine = jq.distributed.process_batches(xs)
    xs = list(mine)
    kw = dict(batch_ids=mine.indices, total_batches=mine.total,
              reduce=jq.distributed.allreduce_stats)
  got = collect(lambda v, b: qapply(v, b), xs, wants, operands=variables, mesh=mesh, **kw)
  out = {}
  for p, inp in got.items():
    for k, v in inp.stats._asdict().items():
      out[f"{p}.{k}"] = np.asarray(v)
    out[f"{p}.lo"], out[f"{p}.hi"], out[f"{p}.samples"] = inp.lo, inp.hi, inp.samples
  np.savez(path, **out)


def solve_on_check(path: str) -> None:
  """A GPTQ solve on another device of the mesh gives the default device's bits: writes the
  names of the fields that differ (none: an empty file)."""
  import importlib
  import jax
  import numpy as np
  import jq
  from jq.calibrate.stats import init_stats, update_stats
  from jq.ptq import solves
  qm = importlib.import_module("jq.ptq.quantize_model")   # the module, not jq.ptq's function
  rng = np.random.default_rng(3)
  x = jax.numpy.asarray(rng.standard_normal((256, 64)).astype(np.float32))
  w = jax.numpy.asarray(rng.standard_normal((64, 48)).astype(np.float32))
  stats = update_stats(init_stats(64), x, jax.numpy.ones((256,), jax.numpy.float32))
  rule = jq.recipe_rules("gptq-w4a16-g32")[-1]
  inputs = qm.LayerInputs(stats, np.zeros(64, np.float32), np.zeros(64, np.float32), None)
  task = solves.Solve("k", 0, rule.algorithm, w, inputs, rule.weight, rule.algorithm_options, "k")
  (a, _), (b, _) = solves.solve_on(task, None), solves.solve_on(task, jax.devices()[5])
  # the same kernel cut into 3 column blocks, each solved on its own device, then joined
  blocks = solves.split([task, task._replace(w=w[:, :8])], 3)
  c, _ = solves.join([solves.solve_on(p, jax.devices()[1 + j]) for j, (i, p) in enumerate(blocks)
                      if i == 0])
  with open(path, "w") as f:
    f.write(" ".join(f"{name}:{c_}" for name, other in (("device", b), ("blocks", c))
                     for c_ in ("values", "scale") if not np.array_equal(
                         np.asarray(getattr(a, c_)), np.asarray(getattr(other, c_)))))


def split_check(out: str, model, variables, calib, mesh) -> None:
  """The caller's parameters split over the mesh (every kernel along its output axis): GPTQ and
  SmoothQuant (a fold) run on them as they are; writes the trees, the logs and, per quantized
  kernel, the PartitionSpec of its values and of the float kernel it replaced."""
  import json
  import jax
  import jq
  import jq.stream
  from jax.sharding import NamedSharding, PartitionSpec as P
  from jq.ptq import PTQConfig, quantize_model

  def split(x):
    n = mesh.devices.size
    spec = (P(*([None] * (x.ndim - 1)), "data") if x.ndim >= 2 and x.shape[-1] % n == 0
            else P())
    return jax.device_put(x, NamedSharding(mesh, spec))

  placed = jax.tree.map(split, variables)
  specs = {}
  for recipe in ("gptq-w4a16-g32", "smoothquant-w8a8"):
    if recipe == "smoothquant-w8a8":
      dump(os.path.join(out, f"{recipe}.single.npz"),
           quantize_model(model, variables, jq.recipe_rules(recipe), calib).variables)
    res = quantize_model(model, placed, jq.recipe_rules(recipe), calib,
                         config=PTQConfig(mesh=mesh))
    dump(os.path.join(out, f"{recipe}.split.npz"), res.variables)
    with open(os.path.join(out, f"{recipe}.split.log"), "w") as f:
      f.write("\n".join(res.log))
    flat = dict(jq.leaves_with_paths(placed))
    specs[recipe] = {p: [str(q.values.sharding.spec), str(flat[p].sharding.spec)]
                     for p, q in jq.leaves_with_paths(res.variables) if isinstance(q, jq.QArray)}
  # rounding to nearest on the streamed road's in-memory twin: split leaves come back split
  rtn = jq.stream.quantize_in_memory(placed, jq.recipe_rules("w4a16-g32"))
  flat = dict(jq.leaves_with_paths(placed))
  specs["w4a16-g32 in memory"] = {p: [str(q.values.sharding.spec), str(flat[p].sharding.spec)]
                                  for p, q in jq.leaves_with_paths(rtn) if isinstance(q, jq.QArray)}
  with open(os.path.join(out, "split.json"), "w") as f:
    json.dump(specs, f)


def factor_check(out: str, model, variables, calib, mesh) -> None:
  """GPTQ with every Hessian factored split over the mesh's devices
  (``PTQConfig.split_factor_from``): writes the tree and the log, and ``factor.json``: per
  device, the bytes the compiled split factorisation of a K = 512 Hessian holds (arguments,
  outputs, workspace) against one device's dense factorisation, and the shape of a device's rows
  of the factor."""
  import json
  import jax
  import jax.numpy as jnp
  import numpy as np
  import jq
  from jq.algorithms import factor_split, gptq
  from jq.ptq import PTQConfig, quantize_model
  res = quantize_model(model, variables, jq.recipe_rules("gptq-w4a16-g32"), calib,
                       config=PTQConfig(mesh=mesh, split_factor_from=64))
  dump(os.path.join(out, "gptq-w4a16-g32.factored.npz"), res.variables)
  with open(os.path.join(out, "gptq-w4a16-g32.factored.log"), "w") as f:
    f.write("\n".join(res.log))
  k = 512
  x = np.random.default_rng(5).standard_normal((1024, k)).astype(np.float32)
  h = 2 * x.T @ x / len(x)
  rows = factor_split.mesh_of(list(mesh.devices.flat))
  hp = factor_split.place_hessian(h, 1.0, np.arange(k), np.zeros(k, bool), k, rows)
  u, _, _, failed = factor_split.upper_chol_inverse(hp, float(np.mean(np.diag(h))), 0.01, 0,
                                                    mesh=rows, k=k, block=64)

  def held(m):   # (a donated argument's buffer is the output's: counted once)
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes)

  split = factor_split._factor.lower(hp, jnp.float32(0.1), mesh=rows, k=k, block=64)
  kk, one = jax.ShapeDtypeStruct((k, k), jnp.float32), jax.ShapeDtypeStruct((), jnp.float32)
  dense = [gptq._ordered_jit.lower(kk, one, act_order=False),   # the dense road's stages: its
           gptq._cholesky_jit.lower(kk, one, one), gptq._inverse_jit.lower(kk)]   # peak: the largest
  u0 = gptq._prepare(h, jnp.float32(1.0), jnp.float32(0.01), act_order=False, max_retries=0)[0]
  with open(os.path.join(out, "factor.json"), "w") as f:
    json.dump({"split_bytes": held(split.compile().memory_analysis()),
               "dense_bytes": max(held(c.compile().memory_analysis()) for c in dense),
               "shard": list(u.addressable_shards[0].data.shape), "failed": bool(failed),
               "u_err": float(np.max(np.abs(np.asarray(u) - np.asarray(u0)))
                              / np.max(np.abs(np.asarray(u0))))}, f)


def dump(path: str, tree) -> None:
  import jax.numpy as jnp
  import numpy as np
  import jq
  out = {}
  for p, q in jq.tree.leaves_with_paths(tree):
    if isinstance(q, jq.QArray):
      out[p + ".codes"] = np.asarray(q.unpacked())
      out[p + ".scale"] = np.asarray(q.scale)
      out[p + ".dequantized"] = np.asarray(q.dequantize(jnp.float32))
      if q.zero_point is not None:
        out[p + ".zero_point"] = np.asarray(q.zero_point)
      if q.activation is not None and q.activation.scale is not None:
        out[p + ".act_scale"] = np.asarray(q.activation.scale)
    else:
      out[p] = np.asarray(q)
  np.savez(path, **out)


def main(argv=None) -> int:
  a = _args(argv)
  if a.devices > 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={a.devices}")
  import jax
  jax.config.update("jax_numpy_dtype_promotion", "strict")   # as in the test suite
  import jq
  import jq.distributed
  from jq.ptq import PTQConfig, quantize_model
  me = "single"
  if a.process_id is not None:
    jq.distributed.initialize(f"localhost:{a.port}", a.num_processes, a.process_id,
                              timeout_s=a.timeout, init_timeout_s=int(a.timeout),
                              cpu_collectives=a.cpu_collectives)
    me = f"p{a.process_id}"
  model, variables, calib = setup(a.batches + (2 if a.bad == "batches" else 0))
  recipes = a.recipes.split(",")
  if a.bad == "rules":
    recipes = ["gptq-w4a16-g128" if r == "gptq-w4a16-g32" else "gptq-w4a16-g32" for r in recipes]
  times = {}
  try:
    spanning = None
    if a.global_mesh:
      import numpy as np
      spanning = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    if not a.skip_collect:
      collect_check(os.path.join(a.out, f"collect.{me}.npz"), mesh=spanning,
                    share=None if a.process_id is None else a.process_id)
      if a.devices > 1 and a.process_id is None:
        mesh = jax.make_mesh((a.devices,), ("data",))
        collect_check(os.path.join(a.out, "collect.mesh.npz"), mesh=mesh)
        try:
          quantize_model(model, variables, jq.recipe_rules("w8a8-static"),
                         calib[:1] + [calib[1][:a.devices - 2]],
                         config=PTQConfig(mesh=mesh))
        except ValueError as e:
          with open(os.path.join(a.out, "indivisible.txt"), "w") as f:
            f.write(str(e))
    for recipe in recipes:
      rules = jq.recipe_rules(recipe)
      if a.process_id is not None:
        mine = jq.distributed.process_batches(calib)
        if a.bad == "tokens":
          mine[0] = mine[0].copy()
          mine[0][0, 0] = -1
        t = time.perf_counter()
        cfg = (PTQConfig(mesh=spanning) if spanning is not None else
               PTQConfig(mesh=jq.distributed.local_mesh()) if a.devices > 1 else None)
        res = quantize_model(model, variables, rules, mine, config=cfg)
        times[recipe] = time.perf_counter() - t
        dump(os.path.join(a.out, f"{recipe}.{me}.npz"), res.variables)
        with open(os.path.join(a.out, f"{recipe}.{me}.log"), "w") as f:
          f.write("\n".join(res.log))
        continue
      res = quantize_model(model, variables, rules, calib)
      dump(os.path.join(a.out, f"{recipe}.single.npz"), res.variables)
      if a.devices > 1 and a.process_id is None:
        mesh = jax.make_mesh((a.devices,), ("data",))
        res = quantize_model(model, variables, rules, calib, config=PTQConfig(mesh=mesh))
        dump(os.path.join(a.out, f"{recipe}.mesh.npz"), res.variables)
        with open(os.path.join(a.out, f"{recipe}.mesh.log"), "w") as f:
          f.write("\n".join(res.log))
    if spanning is not None:   # last: a failed run is not resumed (its peers were told)
      import numpy as np
      from jq.ptq.onload import quantize_onloaded
      try:   # (refused before anything is read or written)
        quantize_onloaded(None, [], jq.recipe_rules("gptq-w4a16-g32"), np.zeros((1, 8), np.int32),
                          os.path.join(a.out, "onloaded"), config=PTQConfig(mesh=spanning))
      except ValueError as e:
        with open(os.path.join(a.out, f"onload.{me}.txt"), "w") as f:
          f.write(str(e))
      crossed = np.array(jax.devices()).reshape(a.num_processes, -1).T   # processes along "model"
      try:
        quantize_model(model, variables, jq.recipe_rules("w8a8-static"),
                       jq.distributed.process_batches(calib), config=PTQConfig(
                           mesh=jax.sharding.Mesh(crossed, ("data", "model"))))
      except ValueError as e:
        with open(os.path.join(a.out, f"overlap.{me}.txt"), "w") as f:
          f.write(str(e))
    if a.devices > 1 and a.process_id is None:
      solve_on_check(os.path.join(a.out, "solve_on.txt"))
      split_check(a.out, model, variables, calib, jax.make_mesh((a.devices,), ("data",)))
      factor_check(a.out, model, variables, calib, jax.make_mesh((a.devices,), ("data",)))
  except Exception as e:  # pylint: disable=broad-except
    with open(os.path.join(a.out, f"error.{me}.txt"), "w") as f:
      f.write(f"{type(e).__name__}: {e}")
    import traceback
    traceback.print_exc()
    return 3
  print(f"{me}: done {times}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
