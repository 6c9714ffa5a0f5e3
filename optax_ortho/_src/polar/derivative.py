"""The derivative of the exact (pseudo-)polar factor, finite everywhere.

For a tall A = U_r S_r V_r^T (the singular values the factor keeps) and
Q = U_r V_r^T, the derivative along the matrices of rank r is

  dQ = U_r K V_r^T + (I - Q Q^T) dA V_r S_r^-1 V_r^T
       + U_r S_r^-1 U_r^T dA (I - V_r V_r^T),
  K_ij = (W_ij - W_ji) / (s_i + s_j),  W = U_r^T dA V_r

(Higham 2008, ch. 8, on the fixed-rank manifold). Off it the factor jumps
(a dropped singular value that grows past the cutoff adds a unit direction),
so the part of dA in the dropped directions, U_perp^T dA V_perp,
contributes nothing: a zero matrix has the zero derivative, a rank-1 matrix
the derivative of its one direction. Differentiating the SVD or `eigh`
instead divides by differences of equal singular values (0 / 0).

Everything is computed from A and Q, whatever route computed Q: V and the
singular values from `eigh` of H = Q^T A (symmetric, = V S V^T), U_r = Q V_r,
and the kept directions are those Q does not send to zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from optax_ortho._src import checks
from optax_ortho._src.stacks import mm
from optax_ortho._src.stacks import mT


def polar_jvp(a: jax.Array, q: jax.Array, da: jax.Array) -> jax.Array:
  """dQ for tangent `da` of the (k, m, n) stack `a` (m >= n) with factors `q`."""
  h = mm(mT(q), a)
  h, finite = checks.lapack_input(0.5 * (h + mT(h)))
  s, v = checks.per_matrix(jnp.linalg.eigh, h)
  u = mm(q, v)
  kept = jnp.sum(jnp.square(u), axis=-2) > 0.5  # |Q v_i| is 1 or 0
  s = jnp.where(kept, s, 1.0)
  inv_s = jnp.where(kept, 1.0 / s, 0.0)
  both = kept[..., :, None] & kept[..., None, :]
  w = mm(mT(u), mm(da, v))
  k = jnp.where(both, (w - mT(w)) / jnp.where(both, s[..., :, None] + s[..., None, :], 1.0),
                0.0)
  vsv = mm(v * inv_s[..., None, :], mT(v))  # V_r S_r^-1 V_r^T
  dq = (mm(u, mm(k, mT(v)))
        + mm(da - mm(q, mm(mT(q), da)), vsv)
        + mm(mm(q, mm(vsv, mT(q))), da - mm(da, mm(v * kept[..., None, :], mT(v)))))
  return checks.poison(dq, finite)
