"""`"auto"` on GPU and TPU: each stack of same-shaped matrices in batched calls.

At most one batched `eigh` and one batched SVD per stack (cuSOLVER's batched
kernels; TPU's batched HLO), each behind a real branch (`cond`, not a
select): a stack whose flags say SVD never runs the `eigh`, and one that
passes the Gram check never runs the SVD. Narrow matrices of more than a few
distinct widths are zero-padded into a few stacks first (`buckets`), as on
CPU: a model of a hundred distinct shapes then traces and compiles a few
routes, not a hundred. The flags decide per stack: one matrix not flagged
(a low-rank layer) sends its whole stack to the SVD.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from optax_ortho._src.polar import buckets
from optax_ortho._src.polar import exact
from optax_ortho._src.polar.guard import Factors
from optax_ortho._src.polar.guard import guarded_auto
from optax_ortho._src.polar.guard import no_factors
from optax_ortho._src.stacks import gram
from optax_ortho._src.stacks import split_stack
from optax_ortho._src.stacks import stack_parts


def route_groups(groups: list[list[jax.Array]], use_gram: list[jax.Array],
                 eps: list[float]) -> list[Factors]:
  """`"auto"` for groups of same-shaped parts, one `Factors` per group."""
  out: list = [None] * len(groups)
  widths, padded = buckets.narrow_widths(groups)
  if padded:
    for idx in widths.values():
      for members, b in zip(*buckets.of_width(groups, use_gram, eps, idx,
                                              buckets.SHARED_ROWS)):
        found = guarded_auto(functools.partial(_route, cols=b.cols), b.stack,
                             b.use_gram, b.cutoff)
        for i, factors in zip(members, buckets.unbucket(found, [groups[i] for i in members])):
          out[i] = factors
  for i, (parts, f, e) in enumerate(zip(groups, use_gram, eps)):
    if out[i] is None:
      q, ok = guarded_auto(_route, stack_parts(parts), f, e)
      out[i] = Factors(split_stack(q, [x.shape[0] for x in parts]), ok)
  return out


def _route(a: jax.Array, use_gram: jax.Array, eps: float | jax.Array,
           cols: np.ndarray | None = None) -> Factors:
  """The batched Gram route if every matrix is flagged, then the batched SVD
  unless every one passed. A stack zero-padded from `cols` columns
  (`buckets`) takes `padded_gram_route`, and `eps` is then each matrix's
  cutoff."""
  gram_route: Callable[[jax.Array], Factors]
  svd: Callable[[jax.Array], tuple[jax.Array, jax.Array]]
  if cols is None:
    gram_route = exact.gram_route
    svd = jax.vmap(functools.partial(exact.svd_route, eps=eps))
  else:
    gram_route = functools.partial(padded_gram_route, cols=cols)
    svd = functools.partial(jax.vmap(exact.svd_route_padded), cutoff=eps, n=jnp.asarray(cols))
  q, ok = jax.lax.cond(jnp.all(use_gram), gram_route, no_factors, a)
  q_svd, ok_svd = jax.lax.cond(jnp.all(ok), no_factors, lambda a: Factors(*svd(a)), a)
  return Factors(jnp.where(ok[:, None, None], q, q_svd), ok | ok_svd)


def padded_gram_route(a: jax.Array, cols: np.ndarray) -> Factors:
  """`exact.gram_route` of a stack zero-padded from `cols` columns.

  The padding's Gram block is the identity times each matrix's largest
  diagonal entry d: the largest eigenvalue of its own block is at most
  n d (n <= 64 columns), so the padding's eigenvalues lie within the
  check's bound of it and leave the check as strict.
  """
  g = gram(a)
  eye = buckets.identity_padding(cols, a.shape[-1], a.dtype)
  if eye is not None:
    d = jnp.max(jnp.diagonal(g, axis1=-2, axis2=-1), axis=-1)
    g = g + eye * jnp.where(d > 0, d, jnp.ones((), d.dtype))[:, None, None]
  return exact.gram_route_of(a, g)
