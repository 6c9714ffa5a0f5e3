"""Exact polar factors: by SVD, and from `eigh` of the Gram matrix.

The functions on one matrix (`svd_route`, `svd_route_padded`, `split_route`)
are what the CPU route maps over a stack; those on a stack (`gram_route`) are
batched solver calls, one per stack, on GPU and TPU. `svd_polar` and `gram_polar` are the
`"svd"` and `"gram"` methods, with the per-platform lowering of
`checks.per_matrix`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from optax_ortho._src import checks
from optax_ortho._src.polar.guard import Factors
from optax_ortho._src.stacks import gram
from optax_ortho._src.stacks import mm
from optax_ortho._src.stacks import mT

# "auto" trusts the Gram route only where the matrix is this well conditioned:
# its float32 error grows like eps * cond^2, and cond <= 10 keeps it near 1e-6.
GRAM_MAX_COND = 10.0
# The Gram route is tried only on matrices at least this tall (a Gaussian
# matrix of aspect 1.5 has condition number about GRAM_MAX_COND, a squarer one
# more): `polar(method="auto")` sends the others to the SVD, and the CPU route
# of `orthonormalize` to `split_route`, whose SVD block would cost a tall
# matrix more than its Gram route does.
GRAM_MIN_ASPECT = 1.5


def noise_floor(m: int, n: int, dtype) -> float:
  """Smallest relative singular value told apart from rounding noise.

  A rank-r matrix rounded to ``dtype`` has spurious singular values of a few
  ``finfo(dtype).eps`` times the largest (measured on rank-1 float32 matrices
  of 4 x 3 to 1024 x 256: at most 3.2 eps). The exact methods drop singular
  values at or below ``max(eps, noise_floor)`` times the largest, so that
  ``eps=0`` keeps the rank instead of inflating rounding noise into unit
  directions.
  """
  return 4.0 * math.sqrt(max(m, n)) * float(jnp.finfo(dtype).eps)


def svd_cutoff(m: int, n: int, dtype, eps: float | jax.Array) -> jax.Array:
  """The relative singular-value cutoff: `eps`, at least the noise floor.

  `eps` may be traced (`optax.inject_hyperparams`), hence `jnp.maximum`.
  """
  return jnp.maximum(eps, noise_floor(m, n, dtype))


def svd_route_padded(x: jax.Array, cutoff: jax.Array | float,
                     n: jax.Array | int) -> Factors:
  """`svd_route` of a matrix zero-padded from `n` columns (and maybe rows).

  The padding adds zero singular values, which the cutoff drops, so the
  factor is the unpadded one's, zero-padded; the flag reads the n-th
  singular value.
  """
  u, s, vt = jnp.linalg.svd(x, full_matrices=False)
  keep = s > cutoff * s[0]
  return Factors(mm(u * keep, vt), (s[n - 1] * GRAM_MAX_COND >= s[0]) & (s[0] > 0))


def svd_route(m: jax.Array, eps: float | jax.Array) -> Factors:
  """Exact polar factor of one matrix by SVD, and whether the Gram route would do."""
  return svd_route_padded(m, svd_cutoff(m.shape[0], m.shape[1], m.dtype, eps),
                          m.shape[1])


def split_size(n: int) -> int:
  """Columns of `split_route`'s SVD block: a quarter of the matrix's."""
  return n // 4


def split_svd_route(m: jax.Array, eps: float) -> Factors:
  """`svd_route`, its flag saying whether `split_route` would pass: the
  singular value `split_size(n)` from the smallest within GRAM_MAX_COND of
  the largest."""
  rows, n = m.shape
  return svd_route_padded(m, svd_cutoff(rows, n, m.dtype, eps), n - split_size(n))


def svd_polar(a: jax.Array, eps: float) -> jax.Array:
  return checks.per_matrix(lambda m: svd_route(m, eps).q, a)


def gram_from_eig(a: jax.Array, w: jax.Array, v: jax.Array,
                  wtol: float | jax.Array) -> jax.Array:
  """a (G^T G)^(-1/2) from the eigendecomposition of the Gram matrix."""
  keep = w > wtol * w[..., -1:]
  inv_sqrt = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, w, 1.0)), 0.0)
  return mm(a, mm(v * inv_sqrt[..., None, :], mT(v)))


def gram_polar(a: jax.Array, eps: float) -> jax.Array:
  # `a` is scaled to max-abs 1 by the guard, so squaring it can neither
  # overflow nor underflow to zero (it did outside about 1e+-19).
  w, v = checks.per_matrix(jnp.linalg.eigh, gram(a))
  # Eigenvalues of the Gram matrix are squared singular values, and float32
  # eigh resolves them only to about n * eps * w_max: below that, drop them.
  wtol = jnp.maximum(
      jnp.square(eps), a.shape[-1] * float(jnp.finfo(a.dtype).eps))
  return gram_from_eig(a, w, v, wtol)


def gram_route(a: jax.Array) -> Factors:
  """Polar factors of a stack from `eigh` of its Gram matrices (one solver
  call for the stack), and whether each is exact enough (cond <= 10)."""
  return gram_route_of(a, gram(a))


def gram_route_of(a: jax.Array, g: jax.Array) -> Factors:
  """`gram_route` from the Gram matrices `g` of `a` (or ones padded past its
  columns)."""
  w, v = jnp.linalg.eigh(g)
  ok = (w[..., 0] * GRAM_MAX_COND**2 >= w[..., -1]) & (w[..., -1] > 0)
  return Factors(gram_from_eig(a, w, v, 0.0), ok)


def split_route(m: jax.Array, eps: float | jax.Array) -> Factors:
  """Exact polar factor of one m x n matrix (m >= n, n >= 4) from `eigh` of its
  Gram matrix, the directions of its smallest singular values by a thin SVD.

  The Gram route's float32 error grows like eps * cond^2 through the small
  singular values only: the eigenvectors of eigenvalues within
  GRAM_MAX_COND^2 of the largest, and a @ v / sqrt(w) for them, are as exact
  as the Gram route on a well-conditioned matrix. Rounding mixes the
  `split_size(n)` smallest eigenvectors with the others; their columns
  a @ v are projected off the others' (which removes what the mix brought
  in) and factored by an SVD of m x n / 4, which also applies the cutoff.
  Square gradients, too ill conditioned for the Gram route, pass where at
  most a quarter of their singular values lie below the largest /
  GRAM_MAX_COND (a Gaussian square matrix has an eighth there). The flag
  says whether they do.
  """
  rows, n = m.shape
  k = split_size(n)
  cutoff = svd_cutoff(rows, n, m.dtype, eps)
  w, v = jnp.linalg.eigh(gram(m))
  av = mm(m, v)
  top = w[k:]
  big = av[:, k:] * jax.lax.rsqrt(jnp.where(top > 0, top, 1.0))
  small = av[:, :k] - mm(big, mm(mT(big), av[:, :k]))
  u, s, vt = jnp.linalg.svd(small, full_matrices=False)
  keep = s > cutoff * jnp.sqrt(w[-1])
  q = mm(jnp.concatenate([mm(u * keep, vt), big], axis=-1), mT(v))
  ok = ((w[k] * GRAM_MAX_COND**2 >= w[-1]) & (w[k] > jnp.square(cutoff) * w[-1])
        & (w[-1] > 0))
  return Factors(q, ok)
