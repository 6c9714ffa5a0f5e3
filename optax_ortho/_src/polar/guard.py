"""The guard in front of every polar route: default cutoff, finiteness, scale.

A matrix with an `Inf` or `NaN` entry never reaches a LAPACK call (jaxlib's
CPU SVD spins forever on an Inf in its first row): it is replaced by zeros
before and comes out all NaN, its route flag kept; the other matrices of the
stack are unaffected. Every matrix is divided by its largest |entry| first:
the polar factor does not depend on a positive scale, and at max-abs 1 the
Gram matrix of the exact methods and the Frobenius norm of the iterative ones
neither overflow nor underflow, whatever the input's magnitude.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp

from optax_ortho._src import checks


class Factors(NamedTuple):
  """Polar factors of a stack with the route flags for the next call.

  The flags are what `orthonormalize("auto")` keeps in its state: a matrix
  that passed the Gram route's check keeps it; one that took the SVD goes
  back to the Gram route when its singular values say it would pass.

  Attributes:
    q: the polar factors: a (k, m, n) stack, or for a group of parts one
      (b_i, m, n) stack per part.
    use_gram: (k,) bool, per matrix: try the Gram route first next time.
  """

  q: Any
  use_gram: jax.Array


def no_factors(a: jax.Array) -> Factors:
  """Zeros and False flags in the shape of a stack (or of one matrix)."""
  return Factors(jnp.zeros_like(a), jnp.zeros(a.shape[:-2], bool))


def default_eps(m: int, n: int) -> float:
  """Relative singular-value cutoff: numpy's matrix-rank default in float32."""
  return max(m, n) * float(jnp.finfo(jnp.float32).eps)


def unit_scale(a: jax.Array) -> jax.Array:
  """Each matrix divided by its largest |entry| (zero matrices unchanged)."""
  big = jnp.max(jnp.abs(a), axis=(-2, -1), keepdims=True)
  return a / jnp.where(big > 0, big, jnp.ones((), a.dtype))


def guarded(route: Callable[[jax.Array], jax.Array], a: jax.Array) -> jax.Array:
  """`route` on the finite, unit-scaled matrices of the stack; NaN for the others."""
  a, finite = checks.lapack_input(a)
  return checks.poison(route(unit_scale(a)), finite)


def guarded_auto(route: Callable[..., Factors], a: jax.Array,
                 use_gram: jax.Array, eps: float | jax.Array) -> Factors:
  """`guarded` for a route of `"auto"`: a non-finite matrix keeps its flag."""
  a, finite = checks.lapack_input(a)
  q, ok = route(unit_scale(a), use_gram, eps)
  return Factors(checks.poison(q, finite), jnp.where(finite, ok, use_gram))
