"""Orthonormalisation cost as ratios against baselines timed in the same run.

    python benchmarks/orthonormalize.py [--reps 15]

Two gradient pytrees: ResNet-20 (CIFAR, Flax layout) and a transformer (d=512,
4 layers). Baselines: a naive jitted per-leaf `jnp.linalg.svd` polar, and
`optax.contrib.scale_by_muon(beta=0, nesterov=False)`. Every candidate is
timed once per round, rounds interleaved, median over rounds. Accuracy is the
relative Frobenius error against a float64 NumPy SVD. Writes
`benchmarks/orthonormalize.json` and prints a Markdown table.
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
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax.contrib import MuonDimensionNumbers

import optax_ortho
from optax_ortho import testing

METHODS = ("svd", "gram", "auto", "newton_schulz", "polar_express")


def make_tree(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}


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


def bench_tree(name, shapes, reps):
  tree = make_tree(shapes)
  matrices = {k: g for k, g in tree.items() if g.ndim >= 2}
  candidates = {
      "naive_svd": (jax.jit(naive_svd), matrices),
      "muon": (jax.jit(muon_fn(matrices)), matrices),
  }
  for m in METHODS:
    tx = optax_ortho.orthonormalize(m)
    state = tx.init(tree)
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
  parser = argparse.ArgumentParser()
  parser.add_argument("--reps", type=int, default=15)
  parser.add_argument("--trees", nargs="+", default=["resnet20", "transformer"],
                      choices=["resnet20", "transformer"])
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__),
                                                    "orthonormalize.json"))
  args = parser.parse_args(argv)
  shapes = {"resnet20": testing.resnet20_shapes,
            "transformer": testing.transformer_shapes}
  rows = [r for t in args.trees for r in bench_tree(t, shapes[t](), args.reps)]
  meta = {"device": str(jax.devices()[0]), "jax": jax.__version__,
          "machine": platform.machine(), "cpus": os.cpu_count(), "reps": args.reps}
  with open(args.out, "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  print(f"{meta}\n")
  print("| pytree | candidate | x naive SVD | x muon | rel. error vs float64 |")
  print("|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['pytree']} | {r['candidate']} | {r['vs_naive_svd']:.2f} | "
          f"{r['vs_muon']:.2f} | {r['rel_error']:.1e} |")


if __name__ == "__main__":
  main()
