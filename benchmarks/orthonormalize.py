"""Orthonormalisation cost as ratios against baselines timed in the same run.

    python benchmarks/orthonormalize.py [--reps 15] [--trees cnn resnet20 transformer]
    python benchmarks/orthonormalize.py --load 4   # with 4 busy processes

Three gradient pytrees: the main job's small CNN (examples/compare.py's model,
gradients of one batch of 128 digits), ResNet-20 (CIFAR, Flax layout; gradients
of one synthetic batch of 128, so the 64x10 head gradient has rank <= 9 as in
training), and a transformer (d=512, 4 layers; Gaussian matrices, no model).
`--grads random` uses Gaussian matrices of the same shapes for all three.
Baselines: a naive jitted per-leaf `jnp.linalg.svd` polar, and
`optax.contrib.scale_by_muon(beta=0, nesterov=False)`. Every candidate is
timed once per round, rounds interleaved, median over rounds. Stateful methods
(`"auto"`) are timed with the state after one step on the same gradients, as
in training. Accuracy is the relative Frobenius error against a float64 NumPy
SVD. `--load N` starts N busy Python processes for the run (and ends them).
Writes `benchmarks/orthonormalize.json` (or `--out`) and prints a Markdown
table.
"""

from __future__ import annotations

import os

# One BLAS thread: OpenBLAS's own pool spins against XLA's.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from busy import busy_processes  # noqa: E402  (benchmarks/, the script's folder)
from optax.contrib import MuonDimensionNumbers  # noqa: E402

import optax_ortho  # noqa: E402
from optax_ortho import testing  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "examples"))

METHODS = ("svd", "gram", "auto", "newton_schulz", "polar_express")


def make_tree(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}


def _flat(tree):
  return {jax.tree_util.keystr(p): x
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def model_grads(name, batch=128, seed=0):
  """Gradients of one batch: the main job's CNN on digits, or ResNet-20."""
  import models
  import optax as ox
  rng = np.random.default_rng(seed)
  if name == "cnn":
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = jnp.asarray(digits.images[:batch, :, :, None] / 16.0, jnp.float32)
    y = jnp.asarray(digits.target[:batch])
    model = models.CNN()
  else:
    x = jnp.asarray(rng.standard_normal((batch, 32, 32, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, batch))
    model = models.ResNet20()
  variables = model.init(jax.random.key(seed), x)

  def loss(params):
    logits, _ = model.apply({**variables, "params": params}, x, train=True,
                            mutable=["batch_stats"])
    return ox.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return _flat(jax.grad(loss)(variables["params"]))


def cnn_shapes():
  return {k: g.shape for k, g in model_grads("cnn").items()}


def naive_svd(tree):
  def one(g):
    m = g.reshape(-1, g.shape[-1])
    u, _, vt = jnp.linalg.svd(m, full_matrices=False)
    return (u @ vt).reshape(g.shape)
  return {k: one(g) for k, g in tree.items()}


def muon_fn(matrices):
  dims = {k: MuonDimensionNumbers(tuple(range(g.ndim - 1)), g.ndim - 1)
          for k, g in matrices.items()}
  tx = optax.contrib.scale_by_muon(beta=0.0, nesterov=False,
                                   weight_dimension_numbers=dims)
  state = tx.init(matrices)
  return lambda t: tx.update(t, state)[0]


def reference(matrices):
  return {k: testing.polar_reference(np.asarray(g).reshape(-1, g.shape[-1]))
          .reshape(g.shape) for k, g in matrices.items()}


def rel_error(out, ref):
  num = sum(float(np.sum((np.asarray(out[k], np.float64) - r) ** 2)) for k, r in ref.items())
  den = sum(float(np.sum(r ** 2)) for r in ref.values())
  return (num / den) ** 0.5


def bench_tree(name, tree, reps):
  matrices = {k: g for k, g in tree.items() if g.ndim >= 2}
  candidates = {
      "naive_svd": (jax.jit(naive_svd), matrices),
      "muon": (jax.jit(muon_fn(matrices)), matrices),
  }
  for m in METHODS:
    tx = optax_ortho.orthonormalize(m)
    # The state after one step on these gradients, as in training.
    state = jax.jit(tx.update)(tree, tx.init(tree))[1]
    candidates[m] = (jax.jit(lambda t, tx=tx, s=state: tx.update(t, s)[0]), tree)
  outs = {}
  for k, (fn, arg) in candidates.items():  # compile and warm up
    t0 = time.perf_counter()
    outs[k] = jax.block_until_ready(fn(arg))
    print(f"{name}/{k}: first call {time.perf_counter() - t0:.1f} s", flush=True)
    jax.block_until_ready(fn(arg))
  times = {k: [] for k in candidates}
  for _ in range(reps):
    for k, (fn, arg) in candidates.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(arg))
      times[k].append(time.perf_counter() - t0)
  ref = reference(matrices)
  med = {k: float(np.median(v)) for k, v in times.items()}
  rows = []
  for k in candidates:
    rows.append({
        "pytree": name, "candidate": k, "median_s": med[k],
        "vs_naive_svd": med[k] / med["naive_svd"], "vs_muon": med[k] / med["muon"],
        "rel_error": rel_error({j: outs[k][j] for j in matrices}, ref),
    })
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--reps", type=int, default=15)
  parser.add_argument("--trees", nargs="+", default=["cnn", "resnet20", "transformer"],
                      choices=["cnn", "resnet20", "transformer"])
  parser.add_argument("--grads", choices=["real", "random"], default="real",
                      help="cnn/resnet20: gradients of a batch, or Gaussian")
  parser.add_argument("--load", type=int, default=0,
                      help="busy processes to run alongside")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__),
                                                    "orthonormalize.json"))
  args = parser.parse_args(argv)

  def tree_of(name):
    if name == "transformer":
      return make_tree(testing.transformer_shapes())
    if args.grads == "real":
      return model_grads(name)
    shapes = cnn_shapes() if name == "cnn" else testing.resnet20_shapes()
    return make_tree(shapes)

  trees = {t: tree_of(t) for t in args.trees}
  meta = {"device": str(jax.devices()[0]), "jax": jax.__version__,
          "machine": platform.machine(), "cpus": os.cpu_count(), "reps": args.reps,
          "grads": args.grads, "busy_processes": args.load,
          "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS")}
  rows = []
  with busy_processes(args.load):
    meta["loadavg_before"] = os.getloadavg()
    for t in args.trees:
      rows += bench_tree(t, trees[t], args.reps)
      meta["loadavg_after"] = os.getloadavg()
      with open(args.out, "w") as f:  # after every tree: a partial run counts
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
  print(f"{meta}\n")
  print("| pytree | candidate | x naive SVD | x muon | rel. error vs float64 |")
  print("|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['pytree']} | {r['candidate']} | {r['vs_naive_svd']:.2f} | "
          f"{r['vs_muon']:.2f} | {r['rel_error']:.1e} |")


if __name__ == "__main__":
  main()
