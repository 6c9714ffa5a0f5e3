"""The main job (examples/compare.py) with gradient_norm_penalty(refresh_every=5) beside it.

Registers ``gnp[refresh5]`` (the ``gnp`` method with ``refresh_every=5``) in
compare.py's method table and runs compare.py's own ``main``, so the numbers
(test accuracy, steps to 95 %, time per step against SGD) are measured exactly
as the README's table measures them.

    python benchmarks/gnp_refresh_compare.py --methods sgd gnp gnp[refresh5] --seeds 3
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

import compare  # noqa: E402
import optax  # noqa: E402

import optax_ortho  # noqa: E402

REFRESH_EVERY = 5

compare.register("gnp[refresh5]", compare.Method(
    lambda: optax.chain(
        optax_ortho.gradient_norm_penalty(compare.GNP_ALPHA, compare.GNP_RADIUS,
                                          refresh_every=REFRESH_EVERY),
        optax.sgd(compare.SGD_LR, momentum=0.9)),
    "sgd", grads=compare.gnp_grads,
    description=f"gradient norm penalty (alpha {compare.GNP_ALPHA}, radius"
                f" {compare.GNP_RADIUS}, second gradient every {REFRESH_EVERY} steps)"
                " + SGD momentum"))

if __name__ == "__main__":
  compare.main(sys.argv[1:])
