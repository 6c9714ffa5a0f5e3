"""stiefel_sgd step cost as ratios against baselines timed in the same run.

    python benchmarks/stiefel.py [--rounds 15] [--reps 5]
    python benchmarks/stiefel.py --load 4   # with 4 busy processes
    python benchmarks/stiefel.py --profile  # XLA's cost analysis and op counts

Problems:

* `main`: the main job's training step (examples/compare.py, batch 64, after
  20 steps of training): forward, backward, update and apply. `sgd` is the
  plain CNN with `optax.sgd(0.05, momentum=0.9)`, every other candidate the OPT
  CNN (`method=None`) with its `R` leaves (9x9, 144x144, 512x512, 64x64) on
  the manifold, as compare.py's `stiefel_sgd`: the ratio compare.py reports.
* `cnn`: one jitted `update` + `apply_updates` alone on the same OPT CNN's
  parameters (gradients of one batch of 128 digits, the state after two steps
  on them, lr 0.05), `sgd` on the same parameters.
* `square` (one 256 x 256) and `tall` (two 1024 x 64): Gaussian gradients,
  lr 0.05 (the step clamp binds: the worst case for the series solve).

Candidates, each timed once per round, rounds interleaved, median over rounds:

* `sgd`: the baseline;
* `stiefel`: `stiefel_sgd` as it is;
* `stiefel_before`: the step before the manifold check by probes (Gram matrix
  and Newton-Schulz correction at every step, a `lax.cond` per series term,
  the Frobenius-norm bound on the series' ratio left out);
* `stiefel_lu`: `stiefel` with the Cayley solve forced onto the LU path;
* `product_512` (`main` only): one 512 x 512 matrix product at HIGHEST
  precision, the unit of the step's arithmetic floor.

Reports wall time and process CPU time (`--load N` starts N busy Python
processes for the run and ends them). Writes `benchmarks/stiefel.json` (or
`--out`).
"""

from __future__ import annotations

import os

# One BLAS thread: OpenBLAS's own pool spins against XLA's threads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from busy import busy_processes  # noqa: E402  (benchmarks/, the script's folder)

import optax_ortho  # noqa: E402
from optax_ortho._src import stiefel  # noqa: E402
from optax_ortho._src.stacks import mm  # noqa: E402

LR = 0.05


def _series_before(y, b, beta, yb=None):
  """`stiefel._series_solve` before the switch and the Frobenius bound."""
  eye = jnp.eye(y.shape[-1], dtype=y.dtype)
  c = (2.0 / (2.0 + beta))[:, None, None]
  z = (1.0 - c) * eye + c * mm(y, y)
  r0 = b - (mm(y, b) if yb is None else yb)
  r = r0 + mm(z, r0)
  rho = jnp.max(beta / (2.0 + beta))
  err = rho * rho
  tol = float(jnp.finfo(y.dtype).eps) / 8
  for _ in range(math.ceil(math.log(tol) / math.log(stiefel._RHO_MAX)) - 2):
    r = jax.lax.cond(err > tol, lambda r: r0 + mm(z, r), lambda r: r, r)
    err = err * rho
  return c * r


PATCHES = {
    "stiefel": {},
    "stiefel_before": {"_onto_manifold": stiefel._project_or_correct,
                       "_series_solve": _series_before},
    "stiefel_lu": {"_cayley_step": functools.partial(stiefel._cayley_step,
                                                     solver="lu")},
}


@contextlib.contextmanager
def patched(names):
  saved = {k: getattr(stiefel, k) for k in names}
  try:
    for k, v in names.items():
      setattr(stiefel, k, v)
    yield
  finally:
    for k, v in saved.items():
      setattr(stiefel, k, v)


def _compare():
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), "examples"))
  import compare
  return compare


def cnn_problem():
  """compare.py's stiefel_sgd parameters, one batch's gradients, the mask."""
  compare = _compare()
  (x, y), _ = compare.load_digits_split()
  x, y = jnp.asarray(x[:128]), jnp.asarray(y[:128])
  model = compare.OPTCNN(method=None)
  variables = model.init(jax.random.key(0), x[:1])
  params = variables["params"]

  def loss(p):
    return compare.cross_entropy(model.apply({**variables, "params": p}, x), y)

  mask = compare.stiefel_mask(params)
  return params, jax.grad(loss)(params), mask


def gaussian_problem(shapes, seed=0):
  keys = jax.random.split(jax.random.key(seed), 2 * len(shapes))
  params = {k: jax.nn.initializers.orthogonal()(keys[i], s)
            for i, (k, s) in enumerate(shapes.items())}
  grads = {k: jax.random.normal(keys[len(shapes) + i], s)
           for i, (k, s) in enumerate(shapes.items())}
  return params, grads, jax.tree.map(lambda _: True, params)


def update_candidates(params, grads, mask):
  """name -> (jitted step, its arguments): one update + apply."""
  def build(tx, patch):
    @jax.jit
    def step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    with patched(patch):
      state = tx.init(params)
      # The state after two steps on these gradients, as in training.
      for _ in range(2):
        _, state = step(params, state, grads)
      jax.block_until_ready(step(params, state, grads))  # compiles here
    return step, (params, state, grads)

  out = {"sgd": build(optax.sgd(LR, momentum=0.9), {})}
  for name, patch in PATCHES.items():
    out[name] = build(optax_ortho.stiefel_sgd(LR, 0.9, mask=mask), patch)
  return out


def main_job_candidates(batch=64, warmup=20):
  """name -> (jitted training step, its arguments), as compare.py trains."""
  compare = _compare()
  (x_train, y_train), _ = compare.load_digits_split()
  xb, yb = x_train[:batch], y_train[:batch]

  def build(name, patch):
    method = compare.METHODS[name]
    model = method.model()
    ctx = compare.Context(model=model, apply_fn=model.apply, loss_fn=lambda p, x, y:
                          compare.cross_entropy(model.apply(p, x), y))
    with patched(patch):
      tx = method.make()
      params = model.init(jax.random.key(0), x_train[:1])
      state = tx.init(params)

      @jax.jit
      def step(params, state, x, y):
        _, grads, extra = method.grads(ctx, params, x, y)
        updates, state = tx.update(grads, state, params, **extra)
        return optax.apply_updates(params, updates), state

      rng = np.random.default_rng(0)
      for _ in range(warmup):
        idx = rng.integers(0, len(x_train), batch)
        params, state = step(params, state, x_train[idx], y_train[idx])
      jax.block_until_ready(step(params, state, xb, yb))
    return step, (params, state, xb, yb)

  out = {"sgd": build("sgd", {})}
  for name, patch in PATCHES.items():
    out[name] = build("stiefel_sgd", patch)
  # The unit of the arithmetic floor: one product of the largest R's size.
  r = jax.random.normal(jax.random.key(0), (512, 512))
  out["product_512"] = (jax.jit(lambda a: mm(a, a)), (r,))
  return out


def profile(fns):
  """XLA's cost analysis and op counts of each candidate's compiled step."""
  rows = {}
  for k, (step, args) in fns.items():
    with patched(PATCHES.get(k, {})):
      compiled = step.lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    text = compiled.as_text()
    ops = re.findall(r"= \S+ ([a-z][\w-]*)\(", text)
    rows[k] = {
        "mflops": cost.get("flops", float("nan")) / 1e6,
        "mbytes": cost.get("bytes accessed", float("nan")) / 1e6,
        "custom_calls": sorted(set(re.findall(r'custom_call_target="(\w+)"', text))),
        "dots": ops.count("dot"), "conditionals": ops.count("conditional"),
        "fusions": ops.count("fusion"), "ops": len(ops),
    }
  return rows


def bench(name, fns, rounds, reps):
  runs = {k: (lambda s=step, a=args: jax.block_until_ready(s(*a)))
          for k, (step, args) in fns.items()}
  for fn in runs.values():
    fn()
  wall = {k: [] for k in runs}
  cpu = {k: [] for k in runs}
  for _ in range(rounds):
    for k, fn in runs.items():  # interleaved: drift hits every candidate alike
      t0, c0 = time.perf_counter(), time.process_time()
      for _ in range(reps):
        fn()
      wall[k].append((time.perf_counter() - t0) / reps)
      cpu[k].append((time.process_time() - c0) / reps)
  rows = []
  for k in runs:
    w, c = np.array(wall[k]), np.array(cpu[k])
    rows.append({
        "problem": name, "candidate": k,
        "median_ms": 1e3 * float(np.median(w)),
        "vs_sgd": float(np.median(w / np.array(wall["sgd"]))),
        "vs_before": float(np.median(w / np.array(wall["stiefel_before"]))),
        "cpu_vs_sgd": float(np.median(c / np.array(cpu["sgd"]))),
        "cpu_vs_before": float(np.median(c / np.array(cpu["stiefel_before"]))),
    })
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--reps", type=int, default=5, help="steps per timing")
  parser.add_argument("--problems", nargs="+", default=["main", "cnn", "square", "tall"],
                      choices=["main", "cnn", "square", "tall"])
  parser.add_argument("--load", type=int, default=0,
                      help="busy processes to run alongside")
  parser.add_argument("--profile", action="store_true",
                      help="also XLA's cost analysis and op counts per candidate")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(
      os.path.abspath(__file__)), "stiefel.json"))
  args = parser.parse_args(argv)
  problems = {
      "main": main_job_candidates,
      "cnn": lambda: update_candidates(*cnn_problem()),
      "square": lambda: update_candidates(*gaussian_problem({"w": (256, 256)})),
      "tall": lambda: update_candidates(
          *gaussian_problem({"a": (1024, 64), "b": (1024, 64)}, 1)),
  }
  meta = {"device": str(jax.devices()[0]), "jax": jax.__version__,
          "machine": platform.machine(), "cpus": os.cpu_count(),
          "rounds": args.rounds, "reps": args.reps, "busy_processes": args.load,
          "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
          "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
  rows, profiles = [], {}
  with busy_processes(args.load):
    meta["loadavg_before"] = os.getloadavg()
    for name in args.problems:
      fns = problems[name]()
      if args.profile:
        profiles[name] = profile(fns)
      rows += bench(name, fns, args.rounds, args.reps)
      meta["loadavg_after"] = os.getloadavg()
      with open(args.out, "w") as f:  # after every problem: a partial run counts
        json.dump({"meta": meta, "rows": rows, "profiles": profiles}, f, indent=1)
  print(f"{meta}\n")
  print("| problem | candidate | ms | x sgd | x before | cpu x sgd | cpu x before |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['problem']} | {r['candidate']} | {r['median_ms']:.2f} |"
          f" {r['vs_sgd']:.2f} | {r['vs_before']:.2f} | {r['cpu_vs_sgd']:.2f} |"
          f" {r['cpu_vs_before']:.2f} |")
  for name, prof in profiles.items():
    print(f"\n{name}: | candidate | MFLOP | MB | dots | conditionals | fusions | ops |"
          " custom calls |")
    for k, r in prof.items():
      print(f"| {k} | {r['mflops']:.0f} | {r['mbytes']:.0f} | {r['dots']} |"
            f" {r['conditionals']} | {r['fusions']} | {r['ops']} |"
            f" {', '.join(r['custom_calls'])} |")


if __name__ == "__main__":
  main()
