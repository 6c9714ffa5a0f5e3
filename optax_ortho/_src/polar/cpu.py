"""`"auto"` on CPU: one unbatched LAPACK call per matrix, products batched.

jaxlib's batched CPU LAPACK kernels (`ParallelBatchMap`) were seen to hang
forever on 2-core machines when a jitted program held several of them, so
every decomposition here runs on ONE matrix (`checks.lapack_map`: unbatched
calls, unrolled so that XLA runs independent ones concurrently).

Float32 matrices of at most `ITER_MAX_N` columns take the checked Gram
iteration (matrix products only, no LAPACK): they are zero-padded into one
stack per width and power of two of rows (`buckets`), so that the program
holds a few ops per stack instead of per distinct shape, and the Gram
matrices of every stack of one width share one iteration. The guard the
iteration needs is read off G = a^T a (an Inf or NaN in `a`, or an
overflow, puts one on G's diagonal). Wider and float64 matrices take one
`eigh` per flagged matrix (square-ish ones `exact.split_route`). Either way
the matrices whose check fails, and those not flagged, take the SVD.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from optax_ortho._src import checks
from optax_ortho._src.polar import buckets
from optax_ortho._src.polar import exact
from optax_ortho._src.polar.guard import Factors
from optax_ortho._src.polar.guard import guarded_auto
from optax_ortho._src.polar.guard import no_factors
from optax_ortho._src.polar.guard import unit_scale
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
  widths, _ = buckets.narrow_widths(groups)
  narrow = {i for idx in widths.values() for i in idx}
  for i, parts in enumerate(groups):
    if i not in narrow:
      out[i] = _stacked(parts, use_gram[i], eps[i])
  if widths:
    for i, r in _narrow(groups, use_gram, eps, list(widths.values())).items():
      out[i] = r
  return out


def _narrow(groups: Groups, use_gram: list[jax.Array], eps: list[float],
            widths: list[list[int]]) -> dict[int, Factors]:
  """The narrow groups, `widths` the indices of those of each padded width:
  the iteration of each width if any of its matrices is flagged, then the
  SVD for those it did not bring home.

  The parts are zero-padded into stacks first (`buckets`), so that every
  later step runs once per stack: per part there is only the pad before and
  the slice after.
  """
  out: dict[int, Factors] = {}
  for idx in widths:
    members, stacks = buckets.of_width(groups, use_gram, eps, idx)
    found = jax.lax.cond(jnp.any(jnp.concatenate([b.use_gram for b in stacks])),
                         functools.partial(_iterate, cols=[b.cols for b in stacks]),
                         _unflagged, [b.stack for b in stacks], [b.use_gram for b in stacks])
    # One repair for the width, entered only when some matrix needs it. Per
    # width, not for all at once: on a mesh, a stack of layers of several
    # widths would lend its sharding to the factors of each.
    found = jax.lax.cond(
        jnp.all(jnp.concatenate([f.use_gram for f in found])), lambda found, *_: found,
        functools.partial(_repair, cols=[b.cols for b in stacks]), found,
        [b.stack for b in stacks], [b.use_gram for b in stacks],
        [b.cutoff for b in stacks])
    for b, f in zip(members, found):
      out.update(zip(b, buckets.unbucket(f, [groups[i] for i in b])))
  return out


def _unflagged(stacks: list[jax.Array], use_gram: list[jax.Array]) -> list[Factors]:
  return [Factors(jnp.zeros_like(a), jnp.zeros_like(f)) for a, f in zip(stacks, use_gram)]


def _iterate(stacks: list[jax.Array], use_gram: list[jax.Array],
             cols: list[np.ndarray]) -> list[Factors]:
  """The checked Gram iteration of every matrix of one padded width, in one batch.

  The iteration runs whatever the flags and guards say (products only: no
  input can hang it); a matrix not flagged, not finite or out of range
  comes out not ok. The Gram matrix of a matrix narrower than the stack
  (`cols`) gets an identity block in its zero padding (each scaled to a
  largest diagonal entry of one): polynomials of a block-diagonal matrix
  are block-diagonal, so its own block of P is its factor, and the
  padding's eigenvalues, equal to the largest possible, converge with the
  rest and leave the check as strict.
  """
  g = stack_parts([gram(a) for a in stacks])
  width = g.shape[-1]
  d = jnp.max(jnp.diagonal(g, axis1=-2, axis2=-1), axis=-1)
  lo, hi = _CLEAN_RANGE
  clean = jnp.concatenate(use_gram) & (d >= lo) & (d <= hi)  # False on NaN
  scale = jnp.where(clean, d, jnp.ones((), d.dtype))[:, None, None]
  g = g / scale
  eye = buckets.identity_padding(np.concatenate(cols), width, g.dtype)
  if eye is not None:
    g = g + eye
  p, ok = gram_factor(g)
  ok = clean & ok
  sizes = [a.shape[0] for a in stacks]
  factor = split_stack(p * jax.lax.rsqrt(scale), sizes)
  return [Factors(mm(a, pi), oki)
          for a, pi, oki in zip(stacks, factor, split_stack(ok, sizes))]


def _repair(found: list[Factors], stacks: list[jax.Array], use_gram: list[jax.Array],
            cutoffs: list[jax.Array], cols: list[np.ndarray]) -> list[Factors]:
  """The SVD (guarded) for every matrix the iteration did not bring home.

  The stacks (all of one width) of at most `buckets.SHARED_ROWS` rows share
  one call site, and the taller ones whose rows round up to the same power
  of two another, each matrix zero-padded to their most rows
  (`exact.svd_route_padded` cuts off the padding's zero singular values).
  """
  out: list = [None] * len(stacks)
  for idx in buckets.by_rows(range(len(stacks)), [a.shape[-2] for a in stacks],
                             buckets.SHARED_ROWS):
    # A model whose one low-rank layer always takes the SVD enters the
    # repair at every step: the other call sites' padding, guards and loops
    # are skipped unless one of their matrices needs them.
    need = ~jnp.concatenate([found[j].use_gram for j in idx])
    done = jax.lax.cond(
        jnp.any(need), functools.partial(_repair_rows, cols=[cols[j] for j in idx]),
        lambda found, *_: found, [found[j] for j in idx], [stacks[j] for j in idx],
        [use_gram[j] for j in idx], [cutoffs[j] for j in idx])
    for j, f in zip(idx, done):
      out[j] = f
  return out


def _repair_rows(found: list[Factors], stacks: list[jax.Array], use_gram: list[jax.Array],
                 cutoffs: list[jax.Array], cols: list[np.ndarray]) -> list[Factors]:
  """`_repair` of the stacks of one call site."""
  rows = max(a.shape[-2] for a in stacks)
  a, finite = checks.lapack_input(stack_parts([
      jnp.pad(x, ((0, 0), (0, rows - x.shape[-2]), (0, 0))) for x in stacks]))
  q_svd, ok_svd = _masked_loop(
      lambda args: exact.svd_route_padded(*args),
      ~jnp.concatenate([f.use_gram for f in found]),
      (unit_scale(a), jnp.concatenate(cutoffs), jnp.asarray(np.concatenate(cols))))
  sizes = [x.shape[0] for x in stacks]
  out = []
  for (q, ok), qs, oks, fin, flags in zip(found, split_stack(q_svd, sizes),
                                          split_stack(ok_svd, sizes),
                                          split_stack(finite, sizes), use_gram):
    q = jnp.where(ok[:, None, None], q, qs[:, :q.shape[-2], :q.shape[-1]])
    out.append(Factors(checks.poison(q, fin), jnp.where(fin, ok | oks, flags)))
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


def _masked_loop(fn, mask: jax.Array, a) -> Factors:
  """`_masked_map`, with the calls of a stack of more than one matrix in a
  loop: one call site, whatever the stack's length.

  For the SVD of narrow matrices that the iteration did not bring home:
  these calls are short and few, while XLA:CPU compiles every unrolled call
  anew (a model of many distinct shapes would pay for each of its matrices).
  """
  stack = jax.tree.leaves(a)[0]
  if stack.shape[0] == 1:
    return _masked_map(fn, mask, a)
  return Factors(*jax.lax.cond(
      jnp.any(mask), lambda a, mask: jax.lax.map(functools.partial(_call_if, fn), (a, mask)),
      lambda a, mask: no_factors(stack), a, mask))


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

