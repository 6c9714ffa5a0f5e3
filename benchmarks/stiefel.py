"""stiefel_sgd update cost as ratios against baselines timed in the same run.

    python benchmarks/stiefel.py [--rounds 15] [--reps 5]
    python benchmarks/stiefel.py --load 4   # with 4 busy processes

Times one jitted `update` of `optax_ortho.stiefel_sgd` (and `apply_updates`)
on three parameter sets: the main job's model (examples/compare.py's OPT CNN
with `method=None`, its `R` leaves on the manifold: 9x9, 144x144, 512x512,
64x64; the gradients of one batch of 128 digits, the state after one step on
them, lr 0.05 as in compare.py), and two Gaussian sets, `square` (256 x 256)
and `tall` (two 1024 x 64), lr 0.05 (the step clamp binds: the worst case for
the series solve). Candidates, each timed once per round, rounds interleaved,
median over rounds:

* `sgd`: `optax.sgd(lr, momentum=0.9)` on the same parameters (the baseline);
* `stiefel`: `stiefel_sgd` as it is (Cayley solve by matrix products under
  the clamp);
* `stiefel_lu`: the same with the solve forced onto the LU path;
* `stiefel_old`: the step before the product-only solve (commit 6a2aa30: LU
  solves, and the clamp's |W|_F from two 2p x 2p Gram matrices);
* `stiefel_nocond`: `stiefel` with `_onto_manifold`'s `lax.cond` (whose SVD
  branch never runs here) replaced by its Newton-Schulz branch, to see what
  the untaken branch costs.

Reports wall time (`--load N` starts N busy Python processes for the run and
ends them) and the process CPU time. Writes `benchmarks/stiefel.json` (or
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
import platform  # noqa: E402
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
from optax_ortho._src.stacks import mT  # noqa: E402

LR = 0.05


def _old_cayley_step(x, m, lr, clamp):
  """`_cayley_step` of commit 6a2aa30, verbatim but for names."""
  mt = mT
  n, p = x.shape[-2:]
  xtm = mm(mt(x), m)
  pm = m - 0.5 * mm(x, xtm)
  tangent = m - mm(x, 0.5 * (xtm + mt(xtm)))
  u = jnp.concatenate([pm, x], axis=-1)
  v = jnp.concatenate([x, -pm], axis=-1)
  a = jnp.broadcast_to(lr, x.shape[:1]).astype(x.dtype)
  if clamp:
    w_sq = jnp.sum(mm(mt(u), u) * mm(mt(v), v), axis=(-2, -1))
    a = jnp.minimum(a, 1.0 / (jnp.sqrt(jnp.maximum(w_sq, 0.0)) + 1e-8))
  half = (0.5 * a)[:, None, None]
  if n <= 2 * p:
    w = mm(pm, mt(x)) - mm(x, mt(pm))
    eye = jnp.eye(n, dtype=x.dtype)

    def one(args):
      w, x, h = args
      return jnp.linalg.solve(eye + h * w, mm(eye - h * w, x))

    new_x = jax.lax.map(one, (w, x, half))
  else:
    eye = jnp.eye(2 * p, dtype=x.dtype)

    def one(args):
      u, v, x, h = args
      return jnp.linalg.solve(eye + h * mm(v.T, u), mm(v.T, x))

    z = jax.lax.map(one, (u, v, x, half))
    new_x = x - 2.0 * half * mm(u, z)
  return new_x, tangent


def _ns_only(x, tol):
  del tol
  eye = jnp.eye(x.shape[-1], dtype=x.dtype)
  return mm(x, 1.5 * eye - 0.5 * mm(mT(x), x))


PATCHES = {
    "stiefel": {},
    "stiefel_lu": {"_cayley_step": functools.partial(stiefel._cayley_step,
                                                     solver="lu")},
    "stiefel_old": {"_cayley_step": _old_cayley_step},
    "stiefel_nocond": {"_onto_manifold": _ns_only},
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


def cnn_problem():
  """compare.py's stiefel_sgd job: params, one batch's gradients, mask."""
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), "examples"))
  import compare
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


def candidates(params, grads, mask):
  out = {}

  def build(tx, patch):
    @jax.jit
    def step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    with patched(patch):
      state = tx.init(params)
      # The state after one step on these gradients, as in training.
      _, state = step(params, state, grads)
      jax.block_until_ready(step(params, state, grads))  # compiles here
    return lambda: jax.block_until_ready(step(params, state, grads))

  out["sgd"] = build(optax.sgd(LR, momentum=0.9), {})
  for name, patch in PATCHES.items():
    out[name] = build(optax_ortho.stiefel_sgd(LR, 0.9, mask=mask), patch)
  return out


def bench(name, problem, rounds, reps):
  fns = candidates(*problem)
  for fn in fns.values():
    fn()
  wall = {k: [] for k in fns}
  cpu = {k: [] for k in fns}
  for _ in range(rounds):
    for k, fn in fns.items():  # interleaved: drift hits every candidate alike
      t0, c0 = time.perf_counter(), time.process_time()
      for _ in range(reps):
        fn()
      wall[k].append((time.perf_counter() - t0) / reps)
      cpu[k].append((time.process_time() - c0) / reps)
  rows = []
  for k in fns:
    w, c = np.array(wall[k]), np.array(cpu[k])
    rows.append({
        "problem": name, "candidate": k,
        "median_ms": 1e3 * float(np.median(w)),
        "vs_sgd": float(np.median(w / np.array(wall["sgd"]))),
        "vs_old": float(np.median(w / np.array(wall["stiefel_old"]))),
        "cpu_vs_sgd": float(np.median(c / np.array(cpu["sgd"]))),
        "cpu_vs_old": float(np.median(c / np.array(cpu["stiefel_old"]))),
    })
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--reps", type=int, default=5, help="steps per timing")
  parser.add_argument("--problems", nargs="+", default=["cnn", "square", "tall"],
                      choices=["cnn", "square", "tall"])
  parser.add_argument("--load", type=int, default=0,
                      help="busy processes to run alongside")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(
      os.path.abspath(__file__)), "stiefel.json"))
  args = parser.parse_args(argv)
  problems = {
      "cnn": cnn_problem,
      "square": lambda: gaussian_problem({"w": (256, 256)}),
      "tall": lambda: gaussian_problem({"a": (1024, 64), "b": (1024, 64)}, 1),
  }
  meta = {"device": str(jax.devices()[0]), "jax": jax.__version__,
          "machine": platform.machine(), "cpus": os.cpu_count(),
          "rounds": args.rounds, "reps": args.reps, "busy_processes": args.load,
          "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
          "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
  rows = []
  with busy_processes(args.load):
    meta["loadavg_before"] = os.getloadavg()
    for name in args.problems:
      rows += bench(name, problems[name](), args.rounds, args.reps)
      meta["loadavg_after"] = os.getloadavg()
      with open(args.out, "w") as f:  # after every problem: a partial run counts
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
  print(f"{meta}\n")
  print("| problem | candidate | ms | x sgd | x old | cpu x sgd | cpu x old |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['problem']} | {r['candidate']} | {r['median_ms']:.2f} |"
          f" {r['vs_sgd']:.1f} | {r['vs_old']:.2f} | {r['cpu_vs_sgd']:.1f} |"
          f" {r['cpu_vs_old']:.2f} |")


if __name__ == "__main__":
  main()
