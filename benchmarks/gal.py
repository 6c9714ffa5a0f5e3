"""GAL training step vs the plain Adam step on the digits CNN (examples/compare.py).

Both steps are jitted and timed in the same process, interleaved (plain, GAL,
plain, GAL, ...), each sample timing `--inner` consecutive steps; the ratio of
medians over `--repeats` samples is reported (goal: <= 1.05x, the paper
reports about +3 %). Absolute times mean little on a shared machine.

    python benchmarks/gal.py                 # batch 64 and 256, 21 repeats
    python benchmarks/gal.py --repeats 3 --inner 2 --batch-sizes 16   # smoke

Writes benchmarks/gal.json (or `--json`).
"""

from __future__ import annotations

import os

# One OpenBLAS thread, set before numpy and jax load it: jaxlib's CPU LAPACK
# kernels call scipy's OpenBLAS, whose spinning thread pool fights XLA's
# threads (SVDs 10-200x slower on a busy CPU; docs/getting_started.md).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import sys
import time

import jax
import numpy as np
import optax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))
from compare import CNN  # noqa: E402
from compare import cross_entropy  # noqa: E402
from compare import load_digits_split  # noqa: E402

import optax_ortho  # noqa: E402


def make_steps(batch_size: int):
  (x_train, y_train), _ = load_digits_split()
  model = CNN()
  params = model.init(jax.random.key(0), x_train[:1])
  x, y = x_train[:batch_size], y_train[:batch_size]
  lr = 3e-3

  plain_tx = optax.adam(lr)

  @jax.jit
  def plain(params, state):
    loss, grads = jax.value_and_grad(
        lambda p: cross_entropy(model.apply(p, x), y))(params)
    updates, state = plain_tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  gal_tx = optax.chain(optax_ortho.gal(10, lr), optax.adam(lr))
  value_and_grad = optax_ortho.gal_value_and_grad(model.apply, cross_entropy)

  @jax.jit
  def gal(params, state):
    loss, grads, gal_args = value_and_grad(params, x, y)
    updates, state = gal_tx.update(grads, state, params, **gal_args)
    return optax.apply_updates(params, updates), state, loss

  return ((plain, params, plain_tx.init(params)),
          (gal, params, gal_tx.init(params)))


def time_steps(step, params, state, inner: int):
  t0 = time.perf_counter()
  for _ in range(inner):
    params, state, loss = step(params, state)
  jax.block_until_ready(loss)
  return (time.perf_counter() - t0) / inner, params, state


def compiled_stats(step, params, state) -> dict:
  """Deterministic cross-check: XLA's flop count and number of kernels."""
  compiled = step.lower(params, state).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  text = compiled.as_text()
  entry = text[text.index("ENTRY"):]
  kernels = sum(1 for line in entry.splitlines()
                if " = " in line and any(f" {op}(" in line for op in (
                    "fusion", "convolution", "dot", "custom-call")))
  return {"flops": float(cost.get("flops", float("nan"))), "kernels": kernels}


def bench(batch_size: int, repeats: int, inner: int) -> dict:
  runs = [list(r) for r in make_steps(batch_size)]
  stats = [compiled_stats(*r) for r in runs]
  for r in runs:  # compile and warm up
    _, r[1], r[2] = time_steps(*r, inner=2)
  times = [[], []]
  for _ in range(repeats):
    for i, r in enumerate(runs):
      t, r[1], r[2] = time_steps(*r, inner=inner)
      times[i].append(t)
  plain, gal = (float(np.median(t)) for t in times)
  ratios = np.array(times[1]) / np.array(times[0])
  return {"batch_size": batch_size, "plain_ms": 1e3 * plain, "gal_ms": 1e3 * gal,
          "ratio": gal / plain, "ratio_q25": float(np.percentile(ratios, 25)),
          "ratio_q75": float(np.percentile(ratios, 75)), "repeats": repeats,
          "inner": inner, "flops_ratio": stats[1]["flops"] / stats[0]["flops"],
          "kernels_plain": stats[0]["kernels"], "kernels_gal": stats[1]["kernels"]}


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
  parser.add_argument("--repeats", type=int, default=21)
  parser.add_argument("--inner", type=int, default=20)
  parser.add_argument("--json", default=os.path.join(os.path.dirname(
      os.path.abspath(__file__)), "gal.json"))
  args = parser.parse_args(argv)
  rows = [bench(b, args.repeats, args.inner) for b in args.batch_sizes]
  print(f"{'batch':>6} {'plain ms':>9} {'GAL ms':>9} {'GAL/plain':>10}"
        f" {'IQR of paired ratios':>22} {'flops ratio':>12} {'kernels':>10}")
  for r in rows:
    print(f"{r['batch_size']:>6} {r['plain_ms']:>9.3f} {r['gal_ms']:>9.3f}"
          f" {r['ratio']:>10.3f}   [{r['ratio_q25']:.3f}, {r['ratio_q75']:.3f}]"
          f"       {r['flops_ratio']:>8.4f} {r['kernels_plain']:>4}->{r['kernels_gal']}")
  with open(args.json, "w") as f:
    json.dump({"device": str(jax.devices()[0]), "goal_ratio": 1.05,
               "rows": rows}, f, indent=1)
  return rows


if __name__ == "__main__":
  main()
