"""Polar factor U V^T of a matrix, or of a stack of matrices.

One file per idea: `guard` (the cutoff, finiteness and scale guard every
route sits behind), `exact` (SVD and Gram/`eigh` factors), `iterations`
(Newton-Schulz, Polar Express and the checked Gram iteration), `auto` (the
`"auto"` contract and the one platform choice), `cpu` and `batched` (its
routes on CPU and on GPU/TPU). See docs/architecture.md.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp

from optax_ortho._src import checks
from optax_ortho._src.polar.auto import auto_polar_groups
from optax_ortho._src.polar.auto import auto_polar_stack
from optax_ortho._src.polar.derivative import polar_jvp
from optax_ortho._src.polar.exact import GRAM_MIN_ASPECT
from optax_ortho._src.polar.exact import gram_polar
from optax_ortho._src.polar.exact import noise_floor
from optax_ortho._src.polar.exact import svd_polar
from optax_ortho._src.polar.guard import Factors
from optax_ortho._src.polar.guard import default_eps
from optax_ortho._src.polar.guard import guarded
from optax_ortho._src.polar.iterations import MUON_NS_COEFFS
from optax_ortho._src.polar.iterations import POLAR_EXPRESS_COEFFS
from optax_ortho._src.polar.iterations import newton_schulz_polar
from optax_ortho._src.polar.iterations import polar_express_polar
from optax_ortho._src.stacks import mT

PolarMethod = Literal["svd", "gram", "newton_schulz", "polar_express", "auto"]
METHODS: tuple[str, ...] = ("svd", "gram", "newton_schulz", "polar_express", "auto")

__all__ = [
    "METHODS", "MUON_NS_COEFFS", "POLAR_EXPRESS_COEFFS", "Factors", "PolarMethod",
    "auto_polar_groups", "auto_polar_stack", "check_method", "default_eps",
    "noise_floor", "polar", "polar_stack",
]


def check_method(method: str) -> None:
  if method not in METHODS:
    raise ValueError(
        f"method={method!r} is not a polar method; expected one of {METHODS}."
    )


def polar_stack(
    a: jax.Array,
    method: str,
    *,
    eps: float | None = None,
    ns_steps: int = 5,
) -> jax.Array:
  """Polar factor of a float32 stack (k, m, n) with m >= n; no validation.

  Every method runs behind the guard (`guard.guarded`): a matrix with a
  non-finite entry comes out all NaN without reaching a solver call, the
  others unaffected.
  """
  m, n = a.shape[-2:]
  if a.size == 0:
    return a
  eps = default_eps(m, n) if eps is None else eps
  if method == "auto" and m >= GRAM_MIN_ASPECT * n:
    return auto_polar_stack(a, jnp.ones(a.shape[:1], bool), eps).q
  if method in ("svd", "gram", "auto"):
    return _exact(a, "gram" if method == "gram" else "svd", eps)
  if method == "newton_schulz":
    route = functools.partial(newton_schulz_polar, steps=ns_steps)
  else:
    route = functools.partial(polar_express_polar, steps=ns_steps)
  return guarded(route, a)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _exact(a: jax.Array, method: str, eps: float) -> jax.Array:
  route = gram_polar if method == "gram" else svd_polar
  return guarded(functools.partial(route, eps=eps), a)


@_exact.defjvp
def _exact_jvp(method, eps, primals, tangents):
  q = _exact(primals[0], method, eps)
  return q, polar_jvp(primals[0], q, tangents[0])


def polar(
    x: jax.Array,
    *,
    method: PolarMethod = "svd",
    eps: float | None = None,
    ns_steps: int = 5,
) -> jax.Array:
  r"""Polar factor :math:`U V^\top` of a matrix or of a batch of matrices.

  For :math:`X = U \Sigma V^\top` (thin SVD) the polar factor is the closest
  matrix with orthonormal columns (or rows) to :math:`X`. Rank-deficient inputs
  give the pseudo-polar factor :math:`U_r V_r^\top`, keeping only singular
  values above ``eps`` times the largest; a zero matrix gives zero.

  Methods:

  * ``"svd"``: exact, from ``jnp.linalg.svd``.
  * ``"gram"``: exact for well-conditioned matrices, from ``eigh`` of the smaller
    Gram matrix :math:`X^\top X`; its float32 error grows like
    :math:`\epsilon\,\kappa(X)^2`, and singular values below about
    :math:`\sqrt{n \epsilon}` of the largest are dropped.
  * ``"newton_schulz"``: ``optax.contrib.scale_by_muon``'s quintic iteration
    (same coefficients, normalisation and step count). Approximate: singular
    values land in roughly [0.7, 1.2].
  * ``"polar_express"``: the optimal per-step polynomials of Amsel et al.
    (2025). Approximate: after 5 steps singular values lie within about
    [0.85, 1.15], and more steps converge to the exact factor.
  * ``"auto"``: exact, the fastest route per matrix: the Gram route for tall
    or wide matrices whose condition number it verifies at run time (falling
    back to SVD otherwise), SVD for square-ish ones. On CPU, float32 matrices
    of at most 64 columns (rows, if wide) take the Gram route without LAPACK:
    a quintic iteration on the Gram matrix, accepted only where it reaches
    the identity (condition number up to about 20). Inside `orthonormalize`
    the route of each matrix is kept in the state, so a matrix that needed
    the SVD last step goes straight to it; there, on CPU, square-ish matrices
    wider than that try the Gram route too, with their smallest quarter of
    singular values factored by a thin SVD (exact where the rest lie within
    a factor 10 of the largest).

  ``jax.scipy.linalg.polar`` (QDWH) is exact too, but measured here it was 2-4x
  slower than the SVD on CPU, so it is not used.

  Computation is in float32 (or the input's precision, if higher); the result
  has the input's dtype.

  Faults (`docs/reliability.md`): a matrix with an `Inf` or `NaN` entry never
  reaches a LAPACK call and comes out all NaN, the other matrices of the batch
  unaffected; every matrix is divided by its largest `|entry|` first, so any
  finite scale gives the same factor; the exact methods never keep a singular
  value at or below `4 sqrt(max(m, n)) finfo(dtype).eps` times the largest
  (rounding noise), even with `eps=0`; empty inputs are returned as they are.

  Args:
    x: array of shape ``(..., m, n)``.
    method: one of ``"svd"``, ``"gram"``, ``"newton_schulz"``,
      ``"polar_express"``, ``"auto"``.
    eps: relative singular-value cutoff of the exact methods; default
      ``max(m, n) * finfo(float32).eps``.
    ns_steps: number of iterations of the iterative methods.

  Returns:
    The polar factor, with the shape and dtype of ``x``.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_ortho
    >>> q = optax_ortho.polar(jnp.array([[3.0, 0.0], [4.0, 5.0], [0.0, 1.0]]))
    >>> bool(jnp.allclose(q.T @ q, jnp.eye(2), atol=1e-5))
    True

  References:
    Higham, *Functions of Matrices*, SIAM 2008, ch. 8.

    Amsel et al., `The Polar Express: Optimal Matrix Sign Methods and Their
    Application to the Muon Algorithm <https://arxiv.org/abs/2505.16932>`_, 2025.
  """
  check_method(method)
  checks.float_leaves(x, "x")
  if x.ndim < 2:
    raise ValueError(f"x must have ndim >= 2 (..., m, n), got shape {x.shape}.")
  checks.positive_int(ns_steps, "ns_steps")
  if eps is not None:
    checks.hyperparam(eps, "eps", "in [0, 1) or None",
                      lambda v: 0.0 <= v < 1.0, schedule=False)
  m, n = x.shape[-2:]
  batch = x.shape[:-2]
  if x.size == 0:  # an empty matrix, or an empty batch: nothing to factor
    return x
  compute = jnp.promote_types(x.dtype, jnp.float32)
  a = x.astype(compute).reshape((-1, m, n))
  wide = m < n
  if wide:
    a = mT(a)
  q = polar_stack(a, method, eps=eps, ns_steps=ns_steps)
  if wide:
    q = mT(q)
  return q.reshape(batch + (m, n)).astype(x.dtype)
