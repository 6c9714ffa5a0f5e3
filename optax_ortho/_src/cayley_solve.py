"""Solves with I - S, S skew: the linear algebra of every Cayley map here.

The Cayley map Q = (I - S)^{-1}(I + S) = 2 (I - S)^{-1} - I needs solves with
M = I - S, whose symmetric part is the identity. Such a matrix needs no
pivoting: every leading block and every Schur complement of it again has a
symmetric part >= I, so they are all invertible with inverses of norm <= 1,
and a 2 x 2 block (Schur-complement) recursion computes M^{-1} stably from
matrix products, with one small LAPACK inverse at each leaf.

Why not LU: LAPACK's LU and triangular solves run at a fraction of the
matrix-product speed on CPU (a 256 x 256 LU plus four triangular solves with
128 right-hand sides took 1.2 ms in one OPT layer's step, the three products
of the plain layer 0.25 ms). The inverse costs n^3 multiply-adds against LU's
n^3 / 3, all of them in products; after it, the forward solve and the
transposed one of the backward pass are products too. Measured forward +
backward of one solve with k right-hand sides on one thread (inverse / LU):
0.78 at n = 256, k = 16; 0.77 at k = 128; 0.56 at k = n; 0.50 at n = 512,
k = n; but 1.12 at n = 512, k = 16. So below k = n / 16 the LU is kept.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from optax_ortho._src import checks
from optax_ortho._src.stacks import mm
from optax_ortho._src.stacks import mT

# Blocks at most this wide are inverted by LAPACK (one unbatched call each);
# wider ones are split. 64 measured fastest in the OPT layer's step (32 and
# 128 were 5-7 % slower).
_LEAF = 64
# The inverse pays once the right-hand sides number at least n / 16.
_MIN_RHS_FRACTION = 16


def unit_symmetric_inverse(m: jax.Array) -> jax.Array:
  """M^{-1} for a square M whose symmetric part is >= I (e.g. I - S, S skew).

  No pivoting (none is needed for such an M); products (at HIGHEST
  precision: errors in an inverse do not average out) everywhere but at the
  leaves, which are `jnp.linalg.inv` of blocks at most `_LEAF` wide.
  """
  n = m.shape[-1]
  if n <= _LEAF:
    return jnp.linalg.inv(m)
  h = n // 2
  a, b, c, d = m[:h, :h], m[:h, h:], m[h:, :h], m[h:, h:]
  a_inv = unit_symmetric_inverse(a)
  c_a_inv = mm(c, a_inv)
  a_inv_b = mm(a_inv, b)
  # The Schur complement's symmetric part is again >= I.
  s_inv = unit_symmetric_inverse(d - mm(c_a_inv, b))
  top_right = -mm(a_inv_b, s_inv)
  bottom_left = -mm(s_inv, c_a_inv)
  top_left = a_inv - mm(top_right, c_a_inv)
  return jnp.block([[top_left, top_right], [bottom_left, s_inv]])


def solve(s: jax.Array, b: jax.Array, *, rows: bool = False) -> jax.Array:
  """(I - S)^{-1} b, or b (I - S)^{-1} with `rows`, for a skew (n, n) S.

  `b` is (n, k) (or (k, n) with `rows`). S must be finite (callers guard it
  with `checks.lapack_input`). Differentiable in S and b: the backward pass
  reuses the inverse (or the LU factors) through `custom_linear_solve`.
  """
  n = s.shape[-1]
  k = b.shape[0] if rows else b.shape[-1]
  m = jnp.eye(n, dtype=s.dtype) - s
  if n == 0 or k == 0:
    return b
  if _MIN_RHS_FRACTION * k < n:
    if rows:
      return jnp.linalg.solve(m.T, b.T).T
    return jnp.linalg.solve(m, b)
  m_inv = jax.lax.stop_gradient(unit_symmetric_inverse(jax.lax.stop_gradient(m)))
  if rows:
    return jax.lax.custom_linear_solve(
        lambda z: mm(z, m), b,
        solve=lambda _, y: mm(y, m_inv),
        transpose_solve=lambda _, y: mm(y, m_inv.T))
  return jax.lax.custom_linear_solve(
      lambda z: mm(m, z), b,
      solve=lambda _, y: mm(m_inv, y),
      transpose_solve=lambda _, y: mm(m_inv.T, y))


def skew(r: jax.Array) -> jax.Array:
  """The authors' skew matrix of the Cayley map: triu(R) - triu(R)^T (the
  diagonal cancels, so only R's strict upper triangle matters)."""
  upper = jnp.triu(r)
  return upper - mT(upper)


def cayley_times(r: jax.Array, b: jax.Array, *, rows: bool = False) -> jax.Array:
  """Q(R) b (or b Q(R) with `rows`) for the Cayley map, without forming Q.

  Q = (I - S)^{-1}(I + S) = 2 (I - S)^{-1} - I with S = `skew(R)`, so
  Q b = 2 (I - S)^{-1} b - b: one `solve` with b's columns (rows). A
  non-finite R never reaches LAPACK: it is zeroed there and the result is
  NaN. Computed in float32 (or R's dtype, if wider).
  """
  r = r.astype(jnp.promote_types(r.dtype, jnp.float32))
  a, ok = checks.lapack_input(skew(r)[None])
  b = b.astype(a.dtype)
  return checks.poison(2.0 * solve(a[0], b, rows=rows) - b, ok)
