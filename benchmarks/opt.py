"""OPT dense and conv layers forward + backward vs plain ones (ratios, not times).

    python benchmarks/opt.py [--d 256] [--batch 128] [--runs 15] [--conv-batch 32]
    python benchmarks/opt.py --load 4   # with 4 busy processes

Times one jitted step (loss, gradients w.r.t. the parameters and the input) of
`optax_ortho.linen.OrthogonalDense(d)` for each orthogonal map, and of
`flax.linen.Dense(d)`, interleaved in one process; reports the median over
`--runs` rounds of each ratio to the plain Dense (goal for Cayley:
<= 3.3x, 1.5x the 2.2x arithmetic floor in benchmarks/RESULTS.md),
and the same for `OrthogonalConv(64, (3, 3))` (Cayley) against `nn.Conv` on
CIFAR-sized activations `(--conv-batch, 32, 32, 64)` (goal: <= 1.2x),
for wall time and for process CPU time (on a shared machine the wall time of
LAPACK calls includes waiting for a core; CPU time counts only the work).
Each timing runs at least `--reps` steps and at least `--window` seconds.
By default XLA runs each op on one thread (see `--multi-thread`). `--load N`
starts N busy Python processes for the timed rounds (and ends them); the load
average before and after is recorded. Writes `benchmarks/opt.json` (or `--out`).
"""

from __future__ import annotations

import os

# One OpenBLAS thread, set before numpy and jax load it: jaxlib's CPU LAPACK
# kernels call scipy's OpenBLAS, whose spinning thread pool fights XLA's
# threads (SVDs 10-200x slower on a busy CPU; docs/getting_started.md).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import math
import sys
import time

# One thread per op unless the caller chose otherwise: on a shared 2-core
# machine a multi-threaded LAPACK call mostly measures waiting for a core.
if "--multi-thread" not in sys.argv:
  os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false"
                        " intra_op_parallelism_threads=1")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from busy import busy_processes  # noqa: E402  (benchmarks/, the script's folder)

from optax_ortho import linen as ortho_nn  # noqa: E402

METHODS = ("cayley", "householder", "lowdin", "gram_schmidt")


def make_step(layer, x):
  variables = layer.init(jax.random.key(0), x)
  params = variables["params"]
  rest = {k: v for k, v in variables.items() if k != "params"}

  @jax.jit
  def step(params, x):
    def loss(p, x):
      return jnp.sum(jnp.square(layer.apply({"params": p, **rest}, x)))

    return jax.grad(loss, argnums=(0, 1))(params, x)

  return lambda: jax.block_until_ready(step(params, x))


def time_once(fn, reps):
  """(wall seconds, process CPU seconds) per step."""
  t0, c0 = time.perf_counter(), time.process_time()
  for _ in range(reps):
    fn()
  return (time.perf_counter() - t0) / reps, (time.process_time() - c0) / reps


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--d", type=int, default=256)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--runs", type=int, default=15)
  parser.add_argument("--reps", type=int, default=10,
                      help="least steps per timing (the conv layers: 1)")
  parser.add_argument("--window", type=float, default=0.05,
                      help="least seconds per timing: more steps for a fast"
                      " layer (see below)")
  parser.add_argument("--conv-batch", type=int, default=32,
                      help="batch of the (B, 32, 32, 64) conv input; 0 skips it")
  parser.add_argument("--multi-thread", action="store_true",
                      help="keep XLA's default thread pools")
  parser.add_argument("--load", type=int, default=0,
                      help="busy processes to run alongside the timed rounds")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(
      os.path.abspath(__file__)), "opt.json"))
  args = parser.parse_args(argv)
  x = jax.random.normal(jax.random.key(1), (args.batch, args.d))
  fns = {"dense": make_step(nn.Dense(args.d), x)}
  for m in METHODS:
    fns[f"opt[{m}]"] = make_step(ortho_nn.OrthogonalDense(args.d, method=m), x)
  k = args.d // 4
  fns[f"s-opt[cayley, k={k}]"] = make_step(
      ortho_nn.OrthogonalDense(args.d, method="cayley", stochastic=k), x)
  if args.conv_batch:
    xc = jax.random.normal(jax.random.key(2), (args.conv_batch, 32, 32, 64))
    fns["conv"] = make_step(nn.Conv(64, (3, 3)), xc)
    fns["opt_conv[cayley]"] = make_step(ortho_nn.OrthogonalConv(64, (3, 3)), xc)
  for fn in fns.values():  # compile and warm up
    fn()
    fn()
  # Steps per timing: at least --reps, and enough to fill --window seconds
  # (measured idle, before any --load). On a busy machine a window shorter
  # than the scheduler's slice (a few ms) is either untouched or preempted,
  # which times a fast layer's short windows unlike a slow layer's long ones
  # (10 Dense steps, 3.5 ms: 4.8x for the Cayley layer where windows of 50
  # steps give 2.8x). Equal windows compare the throughput a user sees.
  steps = {}
  for k, fn in fns.items():
    least = args.reps if "conv" not in k else 1
    steps[k] = max(least, math.ceil(args.window / time_once(fn, least)[0]))
  times = {k: [] for k in fns}
  with busy_processes(args.load):
    loadavg_before = os.getloadavg()
    for _ in range(args.runs):
      for k, fn in fns.items():  # interleaved: drift hits every method alike
        times[k].append(time_once(fn, steps[k]))
    loadavg_after = os.getloadavg()
  rows = []
  for k, t in times.items():
    t = np.array(t)
    base = np.array(times["conv" if "conv" in k else "dense"])
    wall, cpu = t[:, 0] / base[:, 0], t[:, 1] / base[:, 1]
    rows.append({"layer": k, "wall_ratio": float(np.median(wall)),
                 "wall_ratio_q25": float(np.quantile(wall, 0.25)),
                 "wall_ratio_q75": float(np.quantile(wall, 0.75)),
                 "cpu_ratio": float(np.median(cpu)),
                 "cpu_ratio_q25": float(np.quantile(cpu, 0.25)),
                 "cpu_ratio_q75": float(np.quantile(cpu, 0.75))})
  print(f"d={args.d} batch={args.batch} (conv: {args.conv_batch}x32x32x64):"
        f" forward+backward / plain Dense (Conv), median"
        f" of {args.runs} interleaved runs (wall time; process CPU time)")
  print(f"{'layer':<24} {'wall':>7} {'[q25, q75]':>16} {'cpu':>7} {'[q25, q75]':>16}")
  for r in rows:
    print(f"{r['layer']:<24} {r['wall_ratio']:>7.2f} [{r['wall_ratio_q25']:6.2f},"
          f" {r['wall_ratio_q75']:6.2f}] {r['cpu_ratio']:>7.2f}"
          f" [{r['cpu_ratio_q25']:6.2f}, {r['cpu_ratio_q75']:6.2f}]")
  print(f"load average before {loadavg_before}, after {loadavg_after}")
  result = {"args": vars(args), "device": str(jax.devices()[0]),
            "busy_processes": args.load, "loadavg_before": loadavg_before,
            "loadavg_after": loadavg_after,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "steps_per_timing": steps,
            "rows": rows}
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main()
