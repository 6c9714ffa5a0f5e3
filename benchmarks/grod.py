"""GrOD's cost as ratios against baselines timed in the same run.

    python benchmarks/grod.py [--reps 31]

Model: examples/compare.py's CNN (about 25k parameters) on random 8x8 digit-
shaped batches. Two questions:

1. A GrOD L2-SP training step (value_and_grads + grod + SGD) against a plain
   L2-SP step (value_and_grad of task + lambda * L2-SP, SGD). Goal <= 1.10x.
2. value_and_grads against two separate `jax.grad` calls (each jitted on its
   own, as a user without the helper would write), for an L2-SP regulariser
   (parameters only) and a feature-distillation one (through the conv layers).
   Goal <= 0.65x. Also shown: two `jax.grad` inside ONE jit (XLA then merges
   the duplicate forward pass itself) and the plain `value_and_grad` of the sum
   (one backward pass: the floor).

Every candidate of a group is timed once per round, rounds interleaved, median
over rounds; each timing is `--inner` calls. Writes `benchmarks/grod.json` and
prints Markdown tables.
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

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import optax_ortho  # noqa: E402
from optax_ortho import regularizers  # noqa: E402

LAMBDA = 0.1


class CNN(nn.Module):
  """compare.py's CNN, also returning the second conv layer's feature map."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    f = nn.relu(nn.Conv(32, (3, 3), strides=(2, 2))(x))
    x = nn.relu(nn.Dense(64)(f.reshape((f.shape[0], -1))))
    return nn.Dense(10)(x), f


def problem(batch):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(0, 1, (batch, 8, 8, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
  model = CNN()
  params = model.init(jax.random.key(0), x[:1])
  source = jax.tree.map(lambda p: p + 0.01, params)
  teacher = model.apply(source, x)[1]

  def losses(p, kind):
    logits, f = model.apply(p, x)
    task = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    if kind == "l2_sp":
      return task, regularizers.l2_sp(p, source)
    return task, regularizers.feature_distillation(f, teacher)

  return params, losses


def time_group(candidates, args, reps, inner):
  for fn, a in candidates.values():  # compile and warm up
    jax.block_until_ready(fn(*a))
    jax.block_until_ready(fn(*a))
  times = {k: [] for k in candidates}
  for _ in range(reps):
    for k, (fn, a) in candidates.items():
      t0 = time.perf_counter()
      for _ in range(inner):
        out = fn(*a)
      jax.block_until_ready(out)
      times[k].append((time.perf_counter() - t0) / inner)
  return {k: float(np.median(v)) for k, v in times.items()}


def bench_step(batch, reps, inner):
  params, losses = problem(batch)
  def fn(p):
    return losses(p, "l2_sp")

  sgd = optax.sgd(0.01, momentum=0.9)

  def plain_step(p, s):
    _, g = jax.value_and_grad(lambda q: fn(q)[0] + LAMBDA * fn(q)[1])(p)
    u, s = sgd.update(g, s, p)
    return optax.apply_updates(p, u), s

  def grod_step(tx):
    vg = optax_ortho.value_and_grads(fn)

    def step(p, s):
      _, (gj, go) = vg(p)
      u, s = tx.update(gj, s, p, regularizer_grads=go)
      return optax.apply_updates(p, u), s
    return step

  txs = {g: optax.chain(optax_ortho.grod(LAMBDA, granularity=g), sgd)
         for g in ("global", "per_leaf")}
  cands = {"plain L2-SP step": (jax.jit(plain_step), (params, sgd.init(params)))}
  for g, tx in txs.items():
    cands[f"GrOD L2-SP step ({g})"] = (jax.jit(grod_step(tx)), (params, tx.init(params)))
  med = time_group(cands, None, reps, inner)
  base = med["plain L2-SP step"]
  return [{"group": f"training step, batch {batch}", "candidate": k,
           "ms": 1e3 * t, "ratio": t / base, "baseline": "plain L2-SP step"}
          for k, t in med.items()]


def bench_value_and_grads(kind, batch, reps, inner):
  params, losses = problem(batch)
  def fn(p):
    return losses(p, kind)

  g_task = jax.jit(jax.grad(lambda p: fn(p)[0]))
  g_reg = jax.jit(jax.grad(lambda p: fn(p)[1]))
  cands = {
      "two jax.grad, separate jits": (lambda p: (g_task(p), g_reg(p)), (params,)),
      "two jax.grad, one jit": (jax.jit(lambda p: (
          jax.grad(lambda q: fn(q)[0])(p), jax.grad(lambda q: fn(q)[1])(p))), (params,)),
      "value_and_grads": (jax.jit(optax_ortho.value_and_grads(fn)), (params,)),
      "value_and_grad of the sum (floor)": (
          jax.jit(jax.value_and_grad(lambda p: sum(fn(p)))), (params,)),
  }
  med = time_group(cands, None, reps, inner)
  base = med["two jax.grad, separate jits"]
  one = med["two jax.grad, one jit"]
  return [{"group": f"value_and_grads, {kind}, batch {batch}", "candidate": k,
           "ms": 1e3 * t, "ratio": t / base, "ratio_vs_one_jit": t / one,
           "baseline": "two jax.grad, separate jits"} for k, t in med.items()]


def table(rows):
  lines = ["| group | candidate | ms | ratio | ratio vs two grads in one jit |",
           "|---|---|---:|---:|---:|"]
  for r in rows:
    one = r.get("ratio_vs_one_jit")
    lines.append(f"| {r['group']} | {r['candidate']} | {r['ms']:.3f} |"
                 f" {r['ratio']:.3f} | {'-' if one is None else f'{one:.3f}'} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--reps", type=int, default=31)
  parser.add_argument("--inner", type=int, default=5)
  parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
  args = parser.parse_args(argv)
  rows = []
  for b in args.batches:
    rows += bench_step(b, args.reps, args.inner)
    for kind in ("l2_sp", "distill"):
      rows += bench_value_and_grads(kind, b, args.reps, args.inner)
  print(table(rows))
  out = {"args": vars(args), "platform": platform.platform(),
         "jax": jax.__version__, "devices": str(jax.devices()), "rows": rows}
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "grod.json")
  with open(path, "w") as f:
    json.dump(out, f, indent=1)
  print(f"wrote {path}")
  return rows


if __name__ == "__main__":
  main()
