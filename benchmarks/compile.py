"""Compile time and memory of one jitted training step as a model grows.

    python benchmarks/compile.py [--leaves 10 100 500 1000] [--shapes 10 50 100]
    python benchmarks/compile.py --leaves 1000 --shapes   # only the leaves curve
    python benchmarks/compile.py --load 4   # with 4 busy processes

Each configuration runs in a fresh interpreter, which first compiles the step
of `optax.adam` (the baseline) and then each candidate on the same parameter
tree: a tree of N same-shaped (8, 4) leaves, or of N leaves of distinct
shapes. Reported per candidate: seconds to lower and compile the jitted step
on CPU, seconds to export it for cuda (`jax.export` of a new function: tracing
and lowering, no compilation), the
growth of the process's peak RSS during its compilation, and the ratio of the
compile time to Adam's. Writes `benchmarks/compile.json` (or `--out`) and
prints a Markdown table.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from busy import busy_processes  # noqa: E402  (benchmarks/, the script's folder)

CANDIDATES = ("adam", "orthogonal_sgd_auto", "orthogonal_sgd_svd")

_CHILD = r'''
import json, resource, sys, time
import jax, jax.numpy as jnp, optax
import optax_ortho

kind, count, candidates = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
if kind == "leaves":
  shapes = [(8, 4)] * count
else:  # distinct shapes, tall and wide, up to 64 columns
  shapes = [(8 + 3 * i, 4 + (7 * i) % 61) for i in range(count)]
params = {f"w{i:04d}": jnp.zeros(s, jnp.float32) for i, s in enumerate(shapes)}
make = {
    "adam": lambda: optax.adam(1e-3),
    "orthogonal_sgd_auto": lambda: optax_ortho.orthogonal_sgd(0.005),
    "orthogonal_sgd_svd": lambda: optax_ortho.orthogonal_sgd(0.005, method="svd"),
}
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
out = {}
for name in candidates:
  tx = make[name]()
  state = tx.init(params)
  def make_step():  # a new function each time: nothing traced is reused
    def step(p, s, g):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s
    return step
  args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                      (params, state, params))
  before = rss()
  t0 = time.perf_counter()
  jax.jit(make_step()).lower(*args).compile()
  cpu_s = time.perf_counter() - t0
  grown = rss() - before
  t0 = time.perf_counter()
  jax.export.export(jax.jit(make_step()), platforms=("cuda",))(*args).mlir_module()
  cuda_s = time.perf_counter() - t0
  out[name] = {"compile_s": cpu_s, "cuda_export_s": cuda_s, "rss_growth_mb": grown,
               "peak_rss_mb": rss()}
print(json.dumps(out))
'''


def run(kind: str, count: int, candidates, timeout: float) -> dict:
  env = dict(os.environ)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
  try:
    res = subprocess.run(
        [sys.executable, "-c", _CHILD, kind, str(count), ",".join(candidates)],
        capture_output=True, text=True, timeout=timeout, env=env, check=True)
  except subprocess.TimeoutExpired:
    return {"timeout_s": timeout}
  return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--leaves", type=int, nargs="*", default=[10, 100, 500, 1000])
  parser.add_argument("--shapes", type=int, nargs="*", default=[10, 50, 100])
  parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES[1:]))
  parser.add_argument("--timeout", type=float, default=1800.0)
  parser.add_argument("--load", type=int, default=0,
                      help="busy processes running beside the measurements")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "compile.json"))
  args = parser.parse_args()
  candidates = ["adam"] + [c for c in args.candidates if c != "adam"]
  rows = []
  with busy_processes(args.load):
    with open("/proc/loadavg") as f:
      load_before = f.read().split()[:3]
    for kind, counts in (("leaves", args.leaves), ("shapes", args.shapes)):
      for count in counts:
        res = run(kind, count, candidates, args.timeout)
        rows.append({"kind": kind, "count": count, "results": res})
        print(kind, count, json.dumps(res), flush=True)
    with open("/proc/loadavg") as f:
      load_after = f.read().split()[:3]
  meta = {"cpus": os.cpu_count(), "loadavg_before": load_before,
          "loadavg_after": load_after, "candidates": candidates,
          "busy_processes": args.load}
  with open(args.out, "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  print(f"\n{meta}\n")
  print("| tree | candidate | compile (s) | x Adam | cuda export (s) | RSS growth (MB) |")
  print("|---|---|---|---|---|---|")
  for row in rows:
    res = row["results"]
    tree = f"{row['count']} {'(8, 4) leaves' if row['kind'] == 'leaves' else 'shapes'}"
    if "timeout_s" in res:
      print(f"| {tree} | all | timeout | | | |")
      continue
    base = res["adam"]["compile_s"]
    for name, r in res.items():
      print(f"| {tree} | {name} | {r['compile_s']:.2f} | {r['compile_s'] / base:.1f}"
            f" | {r['cuda_export_s']:.2f} | {r['rss_growth_mb']:.0f} |")


if __name__ == "__main__":
  main()
