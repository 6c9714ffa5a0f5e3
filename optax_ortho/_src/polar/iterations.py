"""Polar factors by matrix products only: odd quintic iterations.

Three coefficient tables: Muon's (`"newton_schulz"`), Polar Express's
(`"polar_express"`), and the checked Gram iteration of `"auto"` on CPU,
which is exact because it verifies its own convergence. Every iterate is
`a` times a polynomial in G = a^T a, so for tall matrices the iteration runs
on n x n matrices (`gram_steps`).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp

from optax_ortho._src.stacks import gram
from optax_ortho._src.stacks import mm
from optax_ortho._src.stacks import mT

# optax.contrib.scale_by_muon's default quintic coefficients.
MUON_NS_COEFFS = (3.4445, -4.7750, 2.0315)
MUON_NS_EPS = 1e-8

# Amsel et al. 2025, Algorithm 1 (degree 5), with the paper's 1.01 safety factor
# on every polynomial but the last, which later steps repeat.
_PE_RAW = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
POLAR_EXPRESS_COEFFS = tuple(
    (a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in _PE_RAW[:-1]
) + (_PE_RAW[-1],)

# The checked Gram iteration: the optimal odd quintics for singular values in
# [0.05, 1] (each step's minimax fit on the interval the previous step left,
# as in Amsel et al. 2025, without their safety factor: float32 here), which
# bring [0.05, 1] to 1 +- 7e-3 in three steps, then Newton-Schulz's quintic
# 15/8 x - 5/4 x^3 + 3/8 x^5, which maps 1 + e to 1 - 5/2 e^3 (7e-3 to 1e-6).
ITER_COEFFS = (
    (6.752375313049097, -18.350969260850015, 13.263264908535787),
    (2.5378644936313997, -1.874676922197189, 0.4412803582183434),
    (1.9269785403021307, -1.3066162362881708, 0.3807051358773831),
    (1.875, -1.25, 0.375),
)
# Before the last step (the polish) the iterated Gram matrix G_K = I + E must
# have ||E^2||_F <= this. The polish maps a singular value 1 + e to
# 1 - 5/2 e^3 (to 1e-5 for |e| <= 0.05), so the Gram matrix after it would be
# the identity to (5/8) ||E^2||_F^(3/2) (Frobenius), at most 7.8e-5 here.
# Rounding leaves about 3e-5 in ||E^2||_F at n = 64; the steps leave 1.6e-3 on
# a well-conditioned matrix, and a singular value below about 1/20 of the
# largest (so a condition number above about 20, and every rank-deficient
# matrix) fails it.
ITER_TOL = 2.5e-3
# Widest matrices that iterate instead of calling `eigh`: 15 products of n x n
# matrices cost about one LAPACK `eigh` at n = 64, far less below, and more
# above (at n = 512 an `eigh` costs 8 products).
ITER_MAX_N = 64

# Tall stacks at least this tall iterate in the n x n Gram space: fewer flops
# from m >= 2n on, and XLA's CPU products of a tall matrix by a small one are
# slow, so it pays from 1.5 on.
_NS_GRAM_MIN_ASPECT = 1.5


def gram_steps(g: jax.Array, coeffs, matmul=mm, g2: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Odd quintic steps on the Gram matrix G = a^T a of a tall stack.

  With B_k = c0 I + c1 G_k + c2 G_k^2 the iterate a_k = a B_0 ... B_{k-1} has
  the Gram matrix G_{k+1} = G_k B_k^2 (all commute), so the steps need n x n
  products only. Returns the product P of the B_k (a @ P is the last
  iterate), and the Gram matrix G_K before the last step with its square
  (the last step's update of G is never needed). `g2`, if given, is G^2
  already.
  """
  eye = jnp.eye(g.shape[-1], dtype=g.dtype)
  p = None
  for i, (c0, c1, c2) in enumerate(coeffs):
    if i or g2 is None:
      g2 = matmul(g, g)
    b = c0 * eye + c1 * g + c2 * g2
    p = b if p is None else matmul(p, b)
    if i + 1 < len(coeffs):
      g = matmul(g, matmul(b, b))
  assert p is not None and g2 is not None, "coeffs must not be empty"
  return p, g, g2


def gram_factor(g: jax.Array) -> tuple[jax.Array, jax.Array]:
  """P with a @ P the polar factor of a, from G = a^T a, and whether it converged.

  G is divided by s = ||G^2||_F^(1/2), an upper bound on its largest
  eigenvalue (at most n^(1/4) above it), so the scaled singular values lie in
  [1 / (cond n^(1/8)), 1]; the coefficients bring [0.05, 1] to 1 +- 1e-6 in
  four steps (every matrix of cond <= 11.9 at n = 64 passes, more where s is
  closer to the top eigenvalue). The check that the Gram matrix before the
  last step is close enough to the identity for that step to finish the job
  (`ITER_TOL`) is what makes the result exact: a matrix that is
  rank-deficient or worse conditioned than the coefficients allow fails it
  (its singular values have not come near one).
  """
  g2 = mm(g, g)
  s = jnp.sqrt(jnp.sqrt(jnp.sum(jnp.square(g2), axis=(-2, -1), keepdims=True)))
  live = s > 0
  s = jnp.where(live, s, jnp.ones((), g.dtype))
  p, gk, gk2 = gram_steps(g / s, ITER_COEFFS, g2=g2 / jnp.square(s))
  eye = jnp.eye(g.shape[-1], dtype=g.dtype)
  e2 = gk2 - 2.0 * gk + eye  # (G_K - I)^2
  dev = jnp.sqrt(jnp.sum(jnp.square(e2), axis=(-2, -1)))
  ok = live[..., 0, 0] & (dev <= ITER_TOL)
  return p * jax.lax.rsqrt(s), ok


def gram_iterate(a: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Exact polar factor of each well-conditioned matrix of a (k, m, n) stack
  by matrix products only, and whether it converged (`gram_factor`)."""
  p, ok = gram_factor(gram(a))
  return mm(a, p), ok


def ns_iterate(a: jax.Array, coeffs) -> jax.Array:
  """Odd quintic iteration on a tall stack, in Muon's wide orientation.

  Muon runs x <- c0 x + (c1 A + c2 A^2) x with A = x x^T on the wide matrix
  x = a^T; here the same step is written on a directly (A = a^T a), which is
  the transpose of Muon's iterate. From aspect 1.5 on the iteration runs on
  n x n matrices (`gram_steps`, the same iterates in exact arithmetic) and
  multiplies a once by the product of the steps at the end: 4 m n^2 + 34 n^3
  flops for 5 steps instead of 20 m n^2 + 10 n^3.
  """
  m, n = a.shape[-2:]
  if m < _NS_GRAM_MIN_ASPECT * n:
    for c0, c1, c2 in coeffs:
      g = mT(a) @ a
      b = c1 * g + c2 * (g @ g)
      a = c0 * a + a @ b
    return a
  if not coeffs:
    return a
  p, _, _ = gram_steps(mT(a) @ a, coeffs, jnp.matmul)
  return a @ p


def _normalized(a: jax.Array, scale: float, eps: float) -> jax.Array:
  """a / (scale ||a||_F + eps), with the zero matrix's derivative zero.

  The norm's derivative at zero is 0 / 0; the factor is scale-invariant, so
  no direction out of zero is preferred and zero is the natural choice.
  """
  sq = jnp.sum(jnp.square(a), axis=(-2, -1), keepdims=True)
  live = sq > 0
  norm = jnp.sqrt(jnp.where(live, sq, 1.0))
  return jnp.where(live, a / (norm * scale + eps), 0.0)


def newton_schulz_polar(a: jax.Array, steps: int) -> jax.Array:
  return ns_iterate(_normalized(a, 1.0, MUON_NS_EPS), (MUON_NS_COEFFS,) * steps)


def polar_express_polar(a: jax.Array, steps: int) -> jax.Array:
  coeffs = tuple(itertools.islice(
      itertools.chain(POLAR_EXPRESS_COEFFS, itertools.repeat(POLAR_EXPRESS_COEFFS[-1])),
      steps))
  return ns_iterate(_normalized(a, 1.01, 1e-7), coeffs)
