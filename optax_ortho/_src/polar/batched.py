"""`"auto"` on GPU and TPU: each stack of same-shaped matrices in batched calls.

At most one batched `eigh` and one batched SVD per stack (cuSOLVER's batched
kernels; TPU's batched HLO), each behind a real branch (`cond`, not a
select): a stack whose flags say SVD never runs the `eigh`, and one that
passes the Gram check never runs the SVD.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from optax_ortho._src.polar import exact
from optax_ortho._src.polar.guard import Factors
from optax_ortho._src.polar.guard import guarded_auto
from optax_ortho._src.polar.guard import no_factors
from optax_ortho._src.stacks import split_stack
from optax_ortho._src.stacks import stack_parts


def route_groups(groups: list[list[jax.Array]], use_gram: list[jax.Array],
                 eps: list[float]) -> list[Factors]:
  """`"auto"` for groups of same-shaped parts, one `Factors` per group."""
  out = []
  for parts, f, e in zip(groups, use_gram, eps):
    q, ok = guarded_auto(_route, stack_parts(parts), f, e)
    out.append(Factors(split_stack(q, [x.shape[0] for x in parts]), ok))
  return out


def _svd_stack(a: jax.Array, eps: float) -> Factors:
  return Factors(*jax.vmap(functools.partial(exact.svd_route, eps=eps))(a))


def _route(a: jax.Array, use_gram: jax.Array, eps: float) -> Factors:
  q, ok = jax.lax.cond(jnp.all(use_gram), exact.gram_route, no_factors, a)
  q_svd, ok_svd = jax.lax.cond(
      jnp.all(ok), no_factors, functools.partial(_svd_stack, eps=eps), a)
  return Factors(jnp.where(ok[:, None, None], q, q_svd), ok | ok_svd)
