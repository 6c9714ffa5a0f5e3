"""`"auto"` on CPU: one unbatched LAPACK call per matrix, products batched.

jaxlib's batched CPU LAPACK kernels (`ParallelBatchMap`) were seen to hang
forever on 2-core machines when a jitted program held several of them, so
every decomposition here runs on ONE matrix (`checks.lapack_map`: unbatched
calls, unrolled so that XLA runs independent ones concurrently).

Float32 matrices of at most `ITER_MAX_N` columns take the checked Gram
iteration (matrix products only, no LAPACK) without being stacked: each part
is read only in its Gram matrix G = a^T a and written only in a @ P, and the
small Gram matrices of every group of one width share one iteration. The
guard a LAPACK call needs is read off G (an Inf or NaN in `a`, or an
overflow, puts one on G's diagonal). Wider and float64 matrices take one
`eigh` per flagged matrix. Either way the matrices whose check fails, and
those not flagged, take the SVD.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from optax_ortho._src import checks
from optax_ortho._src.polar import exact
from optax_ortho._src.polar.guard import Factors
from optax_ortho._src.polar.guard import guarded_auto
from optax_ortho._src.polar.guard import no_factors
from optax_ortho._src.polar.guard import unit_scale
from optax_ortho._src.polar.iterations import ITER_MAX_N
from optax_ortho._src.polar.iterations import gram_factor
from optax_ortho._src.stacks import gram
from optax_ortho._src.stacks import mm
from optax_ortho._src.stacks import split_stack
from optax_ortho._src.stacks import stack_parts

# The iteration takes a Gram matrix whose largest diagonal entry (the largest
# squared column norm) lies in this range as it is: then no product of the
# stack overflowed, and none lost bits to underflow at float32's precision
# (entries below 2^-60 |G| are rounding noise there anyway).
_CLEAN_RANGE = (2.0**-60, 2.0**120)

# A group of more parts than this is stacked first: one product over the
# stack compiles in a fraction of the time of one product per part (models
# of hundreds of same-shaped layers), while the few big parts of a usual
# group are cheaper to leave where they lie.
_MAX_PARTS = 8

Groups = list[list[jax.Array]]


def route_groups(groups: Groups, use_gram: list[jax.Array],
                 eps: list[float]) -> list[Factors]:
  """`"auto"` for groups of same-shaped parts on CPU, one `Factors` per group."""
  many = [len(parts) > _MAX_PARTS for parts in groups]
  found = _route_groups([[stack_parts(p)] if big else p for p, big in zip(groups, many)],
                        use_gram, eps)
  return [_split(Factors(f.q[0], f.use_gram), p) if big else f
          for f, p, big in zip(found, groups, many)]


def _route_groups(groups: Groups, use_gram: list[jax.Array],
                  eps: list[float]) -> list[Factors]:
  out: list = [None] * len(groups)
  widths: dict[int, list[int]] = {}
  for i, parts in enumerate(groups):
    if parts[0].shape[-1] <= ITER_MAX_N and parts[0].dtype == jnp.float32:
      widths.setdefault(parts[0].shape[-1], []).append(i)
    else:
      out[i] = _stacked(parts, use_gram[i], eps[i])
  sets = list(widths.values())
  args = ([[groups[i] for i in idx] for idx in sets],
          [[use_gram[i] for i in idx] for idx in sets],
          [[eps[i] for i in idx] for idx in sets])
  if len(sets) == 1:
    done = _narrow(*args)
  elif sets:
    # One `cond` for every width: a tree whose narrow layers all take the SVD
    # (low-rank or ill-conditioned layers) pays one, not one per width.
    flags = jnp.concatenate([f for fs in args[1] for f in fs])
    done = jax.lax.cond(jnp.any(flags), functools.partial(_narrow, eps=args[2]),
                        functools.partial(_svd_widths, eps=args[2]), *args[:2])
  for idx, res in zip(sets, done if sets else []):
    for i, r in zip(idx, res):
      out[i] = r
  return out


def _narrow(widths: list[Groups], use_gram: list[list[jax.Array]],
            eps: list[list[float]]) -> list[list[Factors]]:
  """Each width: the iteration if any of its matrices is flagged, else the SVD."""
  return [jax.lax.cond(jnp.any(jnp.concatenate(f)), functools.partial(_iterate, eps=e),
                       functools.partial(_svd_groups, eps=e), g, f)
          for g, f, e in zip(widths, use_gram, eps)]


def _svd_widths(widths: list[Groups], use_gram: list[list[jax.Array]],
                eps: list[list[float]]) -> list[list[Factors]]:
  return [_svd_groups(g, f, e) for g, f, e in zip(widths, use_gram, eps)]


def _iterate(groups: Groups, use_gram: list[jax.Array],
             eps: list[float]) -> list[Factors]:
  """The checked Gram iteration of every matrix of one width, in one batch.

  The iteration runs whatever the flags and guards say (products only: no
  input can hang it); one `cond` then keeps the result, or sends the groups
  with a failed matrix to `_repair`.
  """
  parts = [x for grp in groups for x in grp]
  g = stack_parts([gram(x) for x in parts])
  d = jnp.max(jnp.diagonal(g, axis1=-2, axis2=-1), axis=-1)
  lo, hi = _CLEAN_RANGE
  clean = jnp.concatenate(use_gram) & (d >= lo) & (d <= hi)  # False on NaN
  scale = jnp.where(clean, d, jnp.ones((), d.dtype))[:, None, None]
  p, ok = gram_factor(g / scale)
  ok = clean & ok
  factor = iter(split_stack(p * jax.lax.rsqrt(scale), [x.shape[0] for x in parts]))
  q = [[mm(x, next(factor)) for x in grp] for grp in groups]
  oks = split_stack(ok, [sum(x.shape[0] for x in grp) for grp in groups])
  found = [Factors(qi, oki) for qi, oki in zip(q, oks)]
  return jax.lax.cond(jnp.all(ok), lambda found, *_: found,
                      functools.partial(_repair, eps=eps), found, groups, use_gram)


def _repair(found: list[Factors], groups: Groups, use_gram: list[jax.Array],
            eps: list[float]) -> list[Factors]:
  """The SVD (guarded) for every matrix the iteration did not bring home."""
  out = []
  for (q, ok), parts, f, e in zip(found, groups, use_gram, eps):
    a, finite = checks.lapack_input(stack_parts(parts))
    q_svd, ok_svd = _masked_map(functools.partial(exact.svd_route, eps=e), ~ok,
                                unit_scale(a))
    q = checks.poison(jnp.where(ok[:, None, None], stack_parts(q), q_svd), finite)
    out.append(Factors(split_stack(q, [x.shape[0] for x in parts]),
                       jnp.where(finite, ok | ok_svd, f)))
  return out


def _svd_all(a: jax.Array, use_gram: jax.Array, eps: float) -> Factors:
  del use_gram
  return Factors(*checks.lapack_map(functools.partial(exact.svd_route, eps=eps), a))


def _svd_groups(groups: Groups, use_gram: list[jax.Array],
                eps: list[float]) -> list[Factors]:
  """The SVD of every matrix of the groups, guarded, one unbatched call each."""
  return [_split(guarded_auto(_svd_all, stack_parts(parts), f, e), parts)
          for parts, f, e in zip(groups, use_gram, eps)]


def _eigh_then_svd(a: jax.Array, use_gram: jax.Array, eps: float) -> Factors:
  """One `eigh` per flagged matrix, then the SVD for those that failed its check."""
  q, ok = _masked_map(exact.gram_route, use_gram, a)
  q_svd, ok_svd = _masked_map(functools.partial(exact.svd_route, eps=eps), ~ok, a)
  return Factors(jnp.where(ok[:, None, None], q, q_svd), ok | ok_svd)


def _stacked(parts: list[jax.Array], use_gram: jax.Array, eps: float) -> Factors:
  return _split(guarded_auto(_eigh_then_svd, stack_parts(parts), use_gram, eps), parts)


def _split(factors: Factors, parts: list[jax.Array]) -> Factors:
  return Factors(split_stack(factors.q, [x.shape[0] for x in parts]), factors.use_gram)


def _call_if(fn, args):
  x, flag = args
  return jax.lax.cond(flag, fn, no_factors, x)


def _masked_map(fn, mask: jax.Array, a: jax.Array) -> Factors:
  """`fn` on the matrices of the stack whose `mask` is set, `no_factors` on
  the others, one unbatched LAPACK call per matrix.

  A `cond` per matrix runs its calls one at a time on XLA:CPU, where
  unconditional calls run concurrently (four 512x512 SVDs behind runtime
  `cond`s took 1.9x as long as unconditional ones on 2 cores). So a stack
  whose mask is all set, the usual case, makes the calls without a `cond`;
  one with some set pays the `cond`s; one with none makes no call.
  """
  if a.shape[0] == 1:  # all or none: no per-matrix `cond` needed
    return Factors(*jax.lax.cond(mask[0], lambda a: checks.lapack_map(fn, a),
                                 no_factors, a))
  index = jnp.where(jnp.all(mask), 0, jnp.where(jnp.any(mask), 1, 2))
  return Factors(*jax.lax.switch(index, [
      lambda a, mask: checks.lapack_map(fn, a),
      lambda a, mask: checks.lapack_map(functools.partial(_call_if, fn), (a, mask)),
      lambda a, mask: no_factors(a),
  ], a, mask))

