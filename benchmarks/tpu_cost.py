"""What each polar method costs on TPU, seen from this CPU.

    python benchmarks/tpu_cost.py

No TPU here, so three views that need none, per method and gradient pytree
(ResNet-20 and the d=512 transformer of `optax_ortho.testing`):

* structure of the program lowered for TPU with `jax.export`: `while` loops,
  solver custom calls (`Qr`, `Eigh`, ...) and `dot_general`s, counted through
  the call graph (TPU's SVD is QR + QDWH + eigh in HLO; its eigh is a custom
  call for small matrices and QDWH-based divide and conquer for large ones);
* XLA's cost analysis of the same update compiled for CPU
  (`jax.jit(f).lower(...).compile().cost_analysis()`): exact for the
  matmul-only iterations; for the others it counts only what is not a LAPACK
  custom call, and a `while` body once;
* textbook flops of the TPU algorithms (model below), per matrix m x n, m >= n.

Candidates: `"svd"`, `"gram"`, `"newton_schulz"`, `"polar_express"` of
`orthonormalize`, and `jax.scipy.linalg.polar` (QDWH, no singular-value
cutoff) per matrix. Writes `benchmarks/tpu_cost.json`.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import collections  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import export  # noqa: E402

import optax_ortho  # noqa: E402
from optax_ortho import testing  # noqa: E402

_FUNC = re.compile(r"func\.func (?:public |private )?@([\w.$-]+)")

# Textbook flops, m >= n. QDWH on an n x n matrix in float32 as jax runs it:
# about 2 QR-based steps (QR of 2n x n with Q formed, and a product: ~8.7 n^3)
# and 4 Cholesky-based steps (Gram product, Cholesky, two triangular solves:
# ~4.3 n^3), then H = U^T A (2 n^3). Symmetric eigh: ~9 n^3 (the LAPACK count;
# TPU's Jacobi and QDWH divide and conquer take several times that).
EIGH = 9.0


def flops_model(method: str, m: int, n: int) -> float:
  qdwh_square = 2 * 8.7 * n**3 + 4 * 4.3 * n**3 + 2 * n**3
  if method == "svd":  # QR reduction, QDWH of R, eigh of H, U = Q U_p V
    reduce = 4 * m * n**2 - 4 / 3 * n**3 if m > 1.15 * n else 0.0
    return reduce + qdwh_square + EIGH * n**3 + 2 * m * n**2 + 4 * n**3
  if method == "gram":  # A^T A, eigh, V D V^T, A M
    return 2 * m * n**2 + EIGH * n**3 + 2 * n**3 + 2 * m * n**2
  if method == "qdwh":  # QDWH on m x n directly (QR of (m+n) x n)
    return 2 * (4 * (m + n) * n**2 + 2 * m * n**2) + 4 * (
        2 * m * n**2 + n**3 / 3 + 2 * m * n**2)
  if method in ("newton_schulz", "polar_express"):  # 5 quintic steps
    if m >= 1.5 * n:  # in the n x n Gram space (polar._ns_iterate)
      return 4 * m * n**2 + 34 * n**3
    return 5 * (4 * m * n**2 + 2 * n**3)
  raise ValueError(method)


def structure(text: str) -> dict:
  starts = [(m.start(), m.group(1)) for m in _FUNC.finditer(text)]
  bodies = {name: text[s:(starts[i + 1][0] if i + 1 < len(starts) else len(text))]
            for i, (s, name) in enumerate(starts)}

  @functools.cache
  def count(name):
    body = bodies[name]
    c = collections.Counter(re.findall(r"custom_call @(\w+)", body))
    c["while"] += body.count("stablehlo.while")
    c["dot_general"] += body.count("stablehlo.dot_general")
    for callee in re.findall(r"call @([\w.$-]+)\(", body):
      if callee in bodies:
        c.update(dict(count(callee)))
    return tuple(sorted(c.items()))

  return dict(count("main"))


def update_fn(method):
  if method == "qdwh":
    def one(g):
      a = g.reshape(-1, g.shape[-1])
      wide = a.shape[0] < a.shape[1]
      q = jax.scipy.linalg.polar(a.T if wide else a, method="qdwh")[0]
      return (q.T if wide else q).reshape(g.shape)

    return lambda tree: {k: one(g) for k, g in tree.items()}
  tx = optax_ortho.orthonormalize(method)
  return lambda tree: tx.update(tree, tx.init(tree))[0]


def main():
  trees = {"resnet20": testing.resnet20_shapes(),
           "transformer": testing.transformer_shapes()}
  rows = []
  for tree_name, shapes in trees.items():
    spec = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()
            if len(s) >= 2}
    for method in ("svd", "gram", "qdwh", "newton_schulz", "polar_express"):
      fn = update_fn(method)
      tpu = structure(export.export(jax.jit(fn), platforms=("tpu",))(spec)
                      .mlir_module())
      cost = jax.jit(fn).lower(spec).compile().cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      model = 0.0
      for s in spec.values():
        r, c = math.prod(s.shape[:-1]), s.shape[-1]
        model += flops_model(method, max(r, c), min(r, c))
      rows.append({"pytree": tree_name, "method": method,
                   "tpu_structure": tpu,
                   "xla_cpu_flops": float(cost.get("flops", 0.0)),
                   "model_flops": model})
      print(tree_name, method, f"model {model / 1e9:.3f} GFLOP,",
            f"XLA(cpu) {rows[-1]['xla_cpu_flops'] / 1e9:.3f} GFLOP,", tpu,
            flush=True)
  out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tpu_cost.json")
  with open(out, "w") as f:
    json.dump({"jax": jax.__version__, "rows": rows}, f, indent=1)
  print("\n| pytree | method | model GFLOP | x newton_schulz | XLA cost analysis"
        " (CPU) GFLOP | TPU program: while / Qr / Eigh / dot_general |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    ns = next(x["model_flops"] for x in rows if x["pytree"] == r["pytree"]
              and x["method"] == "newton_schulz")
    t = r["tpu_structure"]
    print(f"| {r['pytree']} | {r['method']} | {r['model_flops'] / 1e9:.3f} |"
          f" {r['model_flops'] / ns:.2f} | {r['xla_cpu_flops'] / 1e9:.3f} |"
          f" {t.get('while', 0)} / {t.get('Qr', 0)} / {t.get('Eigh', 0)} /"
          f" {t.get('dot_general', 0)} |")


if __name__ == "__main__":
  main()
