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
`eigh` per flagged matrix (square-ish ones `exact.split_route`). Either way
the matrices whose check fails, and those not flagged, take the SVD.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

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

# With more distinct narrow widths than `_MAX_WIDTHS`, they share an
# iteration per power of two from `_MIN_WIDTH` up, their Gram matrices padded
# (`_padded`): one iteration's products cost XLA:CPU about a second of
# compile time, so a model of many distinct shapes would otherwise compile
# for minutes. With few, each width keeps its own, so that a low-rank layer
# (always on the SVD) sends no other width to the repair.
_MAX_WIDTHS = 4
_MIN_WIDTH = 8
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
  narrow = {i for i, parts in enumerate(groups)
            if parts[0].shape[-1] <= ITER_MAX_N and parts[0].dtype == jnp.float32}
  pad = len({groups[i][0].shape[-1] for i in narrow}) > _MAX_WIDTHS
  widths: dict[int, list[int]] = {}
  for i, parts in enumerate(groups):
    n = parts[0].shape[-1]
    if i in narrow:
      widths.setdefault(max(_MIN_WIDTH, 1 << (n - 1).bit_length()) if pad else n,
                        []).append(i)
    else:
      out[i] = _stacked(parts, use_gram[i], eps[i])
  for idx in widths.values():
    done = _narrow([groups[i] for i in idx], [use_gram[i] for i in idx],
                   [eps[i] for i in idx])
    for i, r in zip(idx, done):
      out[i] = r
  return out


def _narrow(groups: Groups, use_gram: list[jax.Array], eps: list[float]) -> list[Factors]:
  """The groups of one padded width: the iteration if any matrix is flagged, then the
  SVD for those it did not bring home (one SVD call site per group, whatever
  the flags: each costs XLA as much compile time as a branch of products)."""
  flags = jnp.concatenate(use_gram)
  found = jax.lax.cond(jnp.any(flags), _iterate, _unflagged, groups, use_gram)
  ok = jnp.concatenate([f.use_gram for f in found])
  return jax.lax.cond(jnp.all(ok), lambda found, *_: found,
                      functools.partial(_repair, eps=eps), found, groups, use_gram)


def _unflagged(groups: Groups, use_gram: list[jax.Array]) -> list[Factors]:
  return [Factors([jnp.zeros_like(x) for x in grp], jnp.zeros_like(f))
          for grp, f in zip(groups, use_gram)]


def _iterate(groups: Groups, use_gram: list[jax.Array]) -> list[Factors]:
  """The checked Gram iteration of every matrix of one padded width, in one batch.

  The iteration runs whatever the flags and guards say (products only: no
  input can hang it); a matrix not flagged, not finite or out of range
  comes out not ok. A Gram matrix narrower than the others is padded with
  an identity block (each scaled to a largest diagonal entry of one):
  polynomials of a block-diagonal matrix are block-diagonal, so its own
  block of P is its factor, and the padding's eigenvalues, equal to the
  largest possible, converge with the rest and leave the check as strict.
  """
  parts = [x for grp in groups for x in grp]
  grams = [gram(x) for x in parts]
  width = max(g.shape[-1] for g in grams)
  d = stack_parts([jnp.max(jnp.diagonal(g, axis1=-2, axis2=-1), axis=-1) for g in grams])
  lo, hi = _CLEAN_RANGE
  clean = jnp.concatenate(use_gram) & (d >= lo) & (d <= hi)  # False on NaN
  scale = jnp.where(clean, d, jnp.ones((), d.dtype))[:, None, None]
  sizes = [x.shape[0] for x in parts]
  g = stack_parts([_padded(gi / si, width)
                   for gi, si in zip(grams, split_stack(scale, sizes))])
  p, ok = gram_factor(g)
  ok = clean & ok
  factor = iter(split_stack(p * jax.lax.rsqrt(scale), sizes))
  q = [[mm(x, next(factor)[:, :x.shape[-1], :x.shape[-1]]) for x in grp] for grp in groups]
  oks = split_stack(ok, [sum(x.shape[0] for x in grp) for grp in groups])
  return [Factors(qi, oki) for qi, oki in zip(q, oks)]


def _padded(g: jax.Array, width: int) -> jax.Array:
  """The (b, n, n) stack `g` as (b, width, width), identity in the new block."""
  extra = width - g.shape[-1]
  if not extra:
    return g
  eye = jnp.diag(jnp.concatenate([jnp.zeros(g.shape[-1], g.dtype), jnp.ones(extra, g.dtype)]))
  return jnp.pad(g, ((0, 0), (0, extra), (0, extra))) + eye


def _repair(found: list[Factors], groups: Groups, use_gram: list[jax.Array],
            eps: list[float]) -> list[Factors]:
  """The SVD (guarded) for every matrix the iteration did not bring home."""
  guarded = [checks.lapack_input(stack_parts(parts)) for parts in groups]
  svd = _svd_where([unit_scale(a) for a, _ in guarded], [~f.use_gram for f in found], eps)
  out = []
  for (q, ok), (q_svd, ok_svd), (_, finite), parts, f in zip(
      found, svd, guarded, groups, use_gram):
    q = checks.poison(jnp.where(ok[:, None, None], stack_parts(q), q_svd), finite)
    out.append(Factors(split_stack(q, [x.shape[0] for x in parts]),
                       jnp.where(finite, ok | ok_svd, f)))
  return out


def _svd_where(stacks: list[jax.Array], masks: list[jax.Array],
               eps: list[float]) -> list[Factors]:
  """`exact.svd_route` of the matrices of the stacks whose mask is set.

  Stacks whose rows round up to the same power of two share one call site,
  each zero-padded to the largest (`exact.svd_route_padded`): every call
  site costs XLA:CPU about as much compile time as a branch of products,
  and a model of many distinct shapes would otherwise have one per shape.
  """
  by_rows: dict[int, list[int]] = {}
  for i, a in enumerate(stacks):
    by_rows.setdefault(1 << (a.shape[-2] - 1).bit_length(), []).append(i)
  out: list = [None] * len(stacks)
  for idx in by_rows.values():
    if len(idx) == 1:
      i = idx[0]
      out[i] = _masked_map(functools.partial(exact.svd_route, eps=eps[i]), masks[i],
                           stacks[i])
      continue
    rows = max(stacks[i].shape[-2] for i in idx)
    cols = max(stacks[i].shape[-1] for i in idx)
    padded = stack_parts([jnp.pad(stacks[i], ((0, 0), (0, rows - stacks[i].shape[-2]),
                                              (0, cols - stacks[i].shape[-1])))
                          for i in idx])
    cutoff = jnp.concatenate([
        jnp.full(stacks[i].shape[:1], exact.svd_cutoff(
            stacks[i].shape[-2], stacks[i].shape[-1], stacks[i].dtype, eps[i]), stacks[i].dtype)
        for i in idx])
    ncols = jnp.concatenate([jnp.full(stacks[i].shape[:1], stacks[i].shape[-1], jnp.int32)
                             for i in idx])
    q, ok = _masked_map(lambda args: exact.svd_route_padded(*args),
                        jnp.concatenate([masks[i] for i in idx]), (padded, cutoff, ncols))
    sizes = [stacks[i].shape[0] for i in idx]
    for i, qi, oki in zip(idx, split_stack(q, sizes), split_stack(ok, sizes)):
      out[i] = Factors(qi[:, :stacks[i].shape[-2], :stacks[i].shape[-1]], oki)
  return out


def _eigh_then_svd(a: jax.Array, use_gram: jax.Array, eps: float) -> Factors:
  """One `eigh` per flagged matrix, then the SVD for those that failed its check.

  Square-ish matrices take `exact.split_route`, the others the Gram route;
  the SVD's flag says whether that route would pass.
  """
  m, n = a.shape[-2:]
  split = m < exact.GRAM_MIN_ASPECT * n and exact.split_size(n) > 0
  route: Callable[[jax.Array], Factors] = (
      functools.partial(exact.split_route, eps=eps) if split else exact.gram_route)
  svd = exact.split_svd_route if split else exact.svd_route
  q, ok = _masked_map(route, use_gram, a)
  q_svd, ok_svd = _masked_map(functools.partial(svd, eps=eps), ~ok, a)
  return Factors(jnp.where(ok[:, None, None], q, q_svd), ok | ok_svd)


def _stacked(parts: list[jax.Array], use_gram: jax.Array, eps: float) -> Factors:
  return _split(guarded_auto(_eigh_then_svd, stack_parts(parts), use_gram, eps), parts)


def _split(factors: Factors, parts: list[jax.Array]) -> Factors:
  return Factors(split_stack(factors.q, [x.shape[0] for x in parts]), factors.use_gram)


def _call_if(fn, args):
  x, flag = args
  return jax.lax.cond(flag, fn, lambda x: no_factors(jax.tree.leaves(x)[0]), x)


def _masked_map(fn, mask: jax.Array, a) -> Factors:
  """`fn` on the matrices of the stack whose `mask` is set, `no_factors` on
  the others, one unbatched LAPACK call per matrix.

  A `cond` per matrix runs its calls one at a time on XLA:CPU, where
  unconditional calls run concurrently (four 512x512 SVDs behind runtime
  `cond`s took 1.9x as long as unconditional ones on 2 cores). So a stack
  whose mask is all set, the usual case, makes the calls without a `cond`;
  one with some set pays the `cond`s; one with none makes no call.
  """
  stack = jax.tree.leaves(a)[0]  # `a`: the stack, or a tuple led by it
  if stack.shape[0] == 1:  # all or none: no per-matrix `cond` needed
    return Factors(*jax.lax.cond(mask[0], lambda a: checks.lapack_map(fn, a),
                                 lambda a: no_factors(stack), a))
  index = jnp.where(jnp.all(mask), 0, jnp.where(jnp.any(mask), 1, 2))
  return Factors(*jax.lax.switch(index, [
      lambda a, mask: checks.lapack_map(fn, a),
      lambda a, mask: checks.lapack_map(functools.partial(_call_if, fn), (a, mask)),
      lambda a, mask: no_factors(stack),
  ], a, mask))

