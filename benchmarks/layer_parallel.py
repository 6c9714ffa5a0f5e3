"""Per-device work of orthonormalize(parallel="layers") vs the replicated mode.

    python benchmarks/layer_parallel.py [--rounds 15]

Runs on 8 virtual CPU devices (a 2 x 4 ("data", "model") mesh of Explicit
axes) with the gradients of two models sharded FSDP + tensor-parallel style
(last axis over "model", the one before over "data", where they divide).
For each pytree and polar method it reports, as ratios layers / replicated:

* decompositions on the busiest device (SVD / eigh calls in the jaxpr, with
  `tests/harness.py`'s `decompositions_per_device`: scans multiplied out, the
  most expensive branch of the per-device switch), and their flops with the
  textbook counts (thin SVD 6mn^2 + 20n^3, symmetric eigh 9n^3);
* flops per device from XLA's cost analysis of the compiled, partitioned
  program (it sees matrix products, so it is the measure for Newton-Schulz;
  LAPACK custom calls count as zero in it and a loop's body once, so it is
  not shown for the exact methods);
* measured time of one jitted update, both modes timed in the same process,
  interleaved, median over rounds. The 8 virtual devices share this machine's
  cores, so replicated work is paid 8 times in wall time too.

Writes `benchmarks/layer_parallel.json` next to this script.
"""

from __future__ import annotations

import os

# One OpenBLAS thread, set before numpy and jax load it: jaxlib's CPU LAPACK
# kernels call scipy's OpenBLAS, whose spinning thread pool fights XLA's
# threads (SVDs 10-200x slower on a busy CPU; docs/getting_started.md).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import platform
import sys
import time

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import optax_ortho  # noqa: E402
from optax_ortho import testing  # noqa: E402
from tests import harness  # noqa: E402

METHODS = ("svd", "gram", "newton_schulz")


def transformer_shapes():
  return testing.transformer_shapes(d=64, layers=8, vocab=512)


TREES = {"resnet20": testing.resnet20_shapes, "transformer": transformer_shapes}


def spec_for(shape, mesh):
  if len(shape) < 2:
    return P()
  spec = [None] * len(shape)
  if shape[-1] % mesh.shape["model"] == 0:
    spec[-1] = "model"
  if shape[-2] % mesh.shape["data"] == 0:
    spec[-2] = "data"
  return P(*spec)


def xla_flops(compiled):
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", float("nan")))


def bench(tree_name, method, rounds, mesh):
  shapes = TREES[tree_name]()
  rng = np.random.default_rng(0)
  grads = {k: jax.device_put(jnp.asarray(rng.standard_normal(s), jnp.float32),
                             NamedSharding(mesh, spec_for(s, mesh)))
           for k, s in shapes.items()}
  fns, stats = {}, {}
  for parallel in ("replicated", "layers"):
    tx = optax_ortho.orthonormalize(method, parallel=parallel)
    fn = jax.jit(lambda g, tx=tx: tx.update(g, None)[0])
    count, flops = harness.decompositions_per_device(jax.make_jaxpr(fn)(grads))
    compiled = fn.lower(grads).compile()
    t0 = time.perf_counter()
    jax.block_until_ready(fn(grads))
    first = time.perf_counter() - t0
    fns[parallel] = fn
    stats[parallel] = {"decompositions": count, "decomposition_flops": flops,
                       "xla_flops": xla_flops(compiled), "first_call_s": first}
  out = {p: fns[p](grads) for p in fns}
  err = max(float(jnp.abs(out["layers"][k] - out["replicated"][k]).max())
            for k in grads)
  times = {p: [] for p in fns}
  for _ in range(rounds):
    for p, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(grads))
      times[p].append(time.perf_counter() - t0)
  rep, lay = stats["replicated"], stats["layers"]

  def ratio(key):
    return lay[key] / rep[key] if rep[key] else float("nan")

  per_round = np.array(times["layers"]) / np.array(times["replicated"])
  return {
      "pytree": tree_name, "method": method, "stats": stats,
      "max_abs_diff": err,
      "decompositions_ratio": ratio("decompositions"),
      "decomposition_flops_ratio": ratio("decomposition_flops"),
      "xla_flops_ratio": ratio("xla_flops"),
      "time_ratio": float(np.median(per_round)),
      "time_ratio_quartiles": [float(np.quantile(per_round, q)) for q in (0.25, 0.75)],
      "median_s": {p: float(np.median(t)) for p, t in times.items()},
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--trees", nargs="+", default=list(TREES), choices=list(TREES))
  parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__),
                                                    "layer_parallel.json"))
  args = parser.parse_args(argv)
  mesh = jax.make_mesh((2, 4), ("data", "model"),
                       axis_types=(AxisType.Explicit,) * 2)
  rows = []
  with jax.set_mesh(mesh):
    for t in args.trees:
      for m in args.methods:
        rows.append(bench(t, m, args.rounds, mesh))
        print(f"{t}/{m}: {rows[-1]['median_s']}", flush=True)
  meta = {"devices": jax.device_count(), "device": str(jax.devices()[0]),
          "jax": jax.__version__, "machine": platform.machine(),
          "cpus": os.cpu_count(), "rounds": args.rounds, "mesh": "2x4 Explicit"}
  with open(args.out, "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  print(f"{meta}\n")
  print("| pytree | method | decompositions / device (rep -> layers) |"
        " decomposition flops | XLA flops | time (quartiles) | max abs diff |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    s = r["stats"]
    q = r["time_ratio_quartiles"]
    dec = (f"{s['replicated']['decompositions']} -> {s['layers']['decompositions']}"
           f" | {r['decomposition_flops_ratio']:.3f}"
           if s["replicated"]["decompositions"] else "- | -")
    # XLA's cost analysis counts a while loop's body once: the exact methods'
    # lax.map loops make its flops meaningless, so it is shown only for the
    # loop-free iterative methods.
    xla = "-" if r["method"] in ("svd", "gram") else f"{r['xla_flops_ratio']:.3f}"
    print(f"| {r['pytree']} | {r['method']} | {dec} | {xla} |"
          f" {r['time_ratio']:.3f} ({q[0]:.2f}-{q[1]:.2f}) |"
          f" {r['max_abs_diff']:.1e} |")
  return rows


if __name__ == "__main__":
  main()
