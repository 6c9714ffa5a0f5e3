"""Exact polar factors of square matrices: the SVD against cheaper candidates.

    python benchmarks/square_polar.py [--reps 11] [--n 512] [--k 4]
    python benchmarks/square_polar.py --load 4   # with 4 busy processes

A Gaussian n x n matrix has a condition number of order n, far past the Gram
route's limit of 10, so `"auto"` sent square matrices to the SVD before
`exact.split_route`. This times, on a stack of `--k` Gaussian n x n matrices (the transformer pytree's
attention output kernels), each candidate as `"auto"` runs it on CPU (one
unbatched LAPACK call per matrix, `checks.lapack_map`), rounds interleaved,
median; and its relative Frobenius error against a float64 NumPy SVD on the
same stack and on matrices of log-spaced singular values (condition numbers
`--conds`). Candidates:

* `svd`: `exact.svd_route`, the SVD fallback of `"auto"`.
* `split`: `exact.split_route`, what `"auto"` runs on square-ish matrices on
  CPU: the Gram route for all but the quarter of smallest singular values,
  those by an SVD of a quarter of the columns. Its errors are those of
  `"auto"`: the SVD's where the route's check fails (`split_passes_*` in
  the JSON).
* `gram_eigh`: `exact.gram_route` (`eigh` of the Gram matrix): the cost floor
  of an `eigh`-based route, exact only up to a condition number of about 10.
* `newton_eigh`: one scaled Newton step X = (z a + (z a)^-T) / 2 (an `inv`),
  which leaves the polar factor unchanged and brings the condition number
  c to about sqrt(c) / 2, then the Gram route on X. The scale z is
  1 / sqrt(s_max s_min), both estimated by `--power` power-iteration steps.
* `newton_eigh_frob`: the same with Higham's Frobenius-norm scale.

Writes `benchmarks/square_polar.json` (or `--out`) and prints a Markdown table.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from busy import busy_processes  # noqa: E402  (benchmarks/, the script's folder)

from optax_ortho import testing  # noqa: E402
from optax_ortho._src import checks  # noqa: E402
from optax_ortho._src.polar import exact  # noqa: E402


def norm2_estimate(a: jax.Array, steps: int) -> jax.Array:
  """A lower estimate of the largest singular value: power iteration on a^T a."""
  v = jnp.ones((a.shape[-1], 1), a.dtype)
  for _ in range(steps):
    u = a @ v
    v = a.T @ (u / jnp.sqrt(jnp.sum(u * u)))
  return jnp.sqrt(jnp.sum(v * v))


def newton_eigh(a: jax.Array, power: int) -> jax.Array:
  y = jnp.linalg.inv(a)
  if power:
    z = jnp.sqrt(norm2_estimate(y, power) / norm2_estimate(a, power))
  else:
    z = jnp.sqrt(jnp.linalg.norm(y) / jnp.linalg.norm(a))
  return exact.gram_route(0.5 * (z * a + y.T / z)[None]).q[0]


def candidates(n: int, power: int) -> dict:
  eps = exact.svd_cutoff(n, n, jnp.float32, n * float(jnp.finfo(jnp.float32).eps))
  one = {
      "svd": lambda x: exact.svd_route_padded(x, eps, n).q,
      "split": lambda x: exact.split_route(x, eps).q,
      "gram_eigh": lambda x: exact.gram_route(x[None]).q[0],
      "newton_eigh": functools.partial(newton_eigh, power=power),
      "newton_eigh_frob": functools.partial(newton_eigh, power=0),
  }
  return {k: jax.jit(functools.partial(checks.lapack_map, f)) for k, f in one.items()}


def log_spaced(n: int, cond: float, rng) -> np.ndarray:
  u, _ = np.linalg.qr(rng.standard_normal((n, n)))
  v, _ = np.linalg.qr(rng.standard_normal((n, n)))
  return (u * np.logspace(0, -np.log10(cond), n)) @ v.T


def rel_errors(q, a) -> list[float]:
  ref = testing.polar_reference(np.asarray(a, np.float64))
  q = np.asarray(q, np.float64)
  return [float(np.linalg.norm(q[i] - r) / np.linalg.norm(r)) for i, r in enumerate(ref)]


def main(argv=None):
  parser = argparse.ArgumentParser(
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--reps", type=int, default=11)
  parser.add_argument("--n", type=int, default=512)
  parser.add_argument("--k", type=int, default=4, help="matrices in the stack")
  parser.add_argument("--power", type=int, default=2, help="power-iteration steps")
  parser.add_argument("--conds", type=float, nargs="+", default=[1e2, 1e3, 5e3])
  parser.add_argument("--load", type=int, default=0,
                      help="busy processes to run alongside")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__),
                                                    "square_polar.json"))
  args = parser.parse_args(argv)
  rng = np.random.default_rng(0)
  gauss = jnp.asarray(rng.standard_normal((args.k, args.n, args.n)), jnp.float32)
  graded = jnp.asarray(np.stack([log_spaced(args.n, c, rng) for c in args.conds]),
                       jnp.float32)
  fns = candidates(args.n, args.power)
  s = np.linalg.svd(np.asarray(gauss, np.float64), compute_uv=False)
  meta = {"device": str(jax.devices()[0]), "jax": jax.__version__, "n": args.n,
          "k": args.k, "reps": args.reps, "power": args.power,
          "busy_processes": args.load, "gauss_conds": (s[:, 0] / s[:, -1]).tolist(),
          "graded_conds": args.conds}
  errors = {k: {"gauss": rel_errors(f(gauss), gauss), "graded": rel_errors(f(graded), graded)}
            for k, f in fns.items()}
  # Where `split_route`'s check fails, `"auto"` takes the SVD: those errors are the SVD's.
  split_ok = jax.jit(functools.partial(checks.lapack_map, lambda x: exact.split_route(x, 0.0).use_gram))
  meta["split_passes_gauss"] = np.asarray(split_ok(gauss)).tolist()
  meta["split_passes_graded"] = np.asarray(split_ok(graded)).tolist()
  errors["split"] = {kind: [e if ok else s for e, s, ok in zip(
      errors["split"][kind], errors["svd"][kind], meta[f"split_passes_{kind}"])]
      for kind in ("gauss", "graded")}
  times: dict[str, list[float]] = {k: [] for k in fns}
  with busy_processes(args.load):
    meta["loadavg_before"] = os.getloadavg()
    for f in fns.values():
      jax.block_until_ready(f(gauss))
    for _ in range(args.reps):
      for k, f in fns.items():
        t0 = time.perf_counter()
        jax.block_until_ready(f(gauss))
        times[k].append(time.perf_counter() - t0)
    meta["loadavg_after"] = os.getloadavg()
  med = {k: float(np.median(v)) for k, v in times.items()}
  rows = [{"candidate": k, "median_s": med[k], "vs_svd": med[k] / med["svd"],
           "max_rel_error_gauss": max(errors[k]["gauss"]),
           "rel_error_graded": errors[k]["graded"]} for k in fns]
  with open(args.out, "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  print(f"{meta}\n")
  conds = " | ".join(f"error, cond {c:g}" for c in args.conds)
  print(f"| candidate | x svd | max error, Gaussian | {conds} |")
  print("|---|---|---|" + "---|" * len(args.conds))
  for r in rows:
    graded_errs = " | ".join(f"{e:.1e}" for e in r["rel_error_graded"])
    print(f"| {r['candidate']} | {r['vs_svd']:.2f} | {r['max_rel_error_gauss']:.1e} | "
          f"{graded_errs} |")


if __name__ == "__main__":
  main()
