"""The project's own test harness: what our tests and benchmarks inspect.

Not part of the public `optax_ortho.testing`: these look inside the programs
this library builds (solver calls per device), which users' tests have no
need to.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from jax.extend import core as jax_core

from optax_ortho._src.layer_parallel import matrix_cost


def decompositions_per_device(closed_jaxpr: Any) -> tuple[int, float]:
  """(LAPACK decompositions, their textbook flops) on the busiest device.

  Walks a jaxpr (from ``jax.make_jaxpr``) counting ``svd`` and ``eigh`` calls,
  batch axes and ``scan`` lengths (``lax.map``) multiplied out, sub-jaxprs
  (``jit``, ``shard_map``) added, and for a ``cond``/``switch`` the maximum
  over its branches (a device runs one branch: the layer-parallel mode's
  per-device ``switch``; ``"auto"``'s fallback counts as its SVD). Flops:
  thin SVD ``6mn^2 + 20n^3``, symmetric eigh ``9n^3``. A ``while`` body
  counts once.

  Example:
    >>> import jax, jax.numpy as jnp, optax_ortho
    >>> from tests.harness import decompositions_per_device
    >>> tx = optax_ortho.orthonormalize("svd")
    >>> g = {"a": jnp.ones((8, 4)), "b": jnp.ones((8, 4))}
    >>> jaxpr = jax.make_jaxpr(lambda g: tx.update(g, None)[0])(g)
    >>> decompositions_per_device(jaxpr)
    (2, 4096.0)
  """
  def subjaxprs(value):
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(v, jax_core.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, jax_core.Jaxpr):
        yield v

  def walk(jaxpr) -> tuple[int, float]:
    count, flops = 0, 0.0
    for eqn in jaxpr.eqns:
      name = eqn.primitive.name
      if name in ("svd", "eigh"):
        shape = eqn.invars[0].aval.shape
        k = int(np.prod(shape[:-2]))
        m, n = max(shape[-2:]), min(shape[-2:])
        count += k
        flops += k * (matrix_cost(m, n) if name == "svd" else 9 * n**3)
      if name == "cond":
        per_branch = [walk(b) for b in subjaxprs(eqn.params["branches"])]
        count += max(c for c, _ in per_branch)
        flops += max(f for _, f in per_branch)
        continue
      times = eqn.params["length"] if name == "scan" else 1
      for value in eqn.params.values():
        for sub in subjaxprs(value):
          c, f = walk(sub)
          count += times * c
          flops += times * f
    return count, flops

  return walk(closed_jaxpr.jaxpr)
