"""Orthogonal maps and neuron-diversity measures of OPT (Liu et al., CVPR 2021).

`orthogonal_map` turns an unconstrained square matrix into an orthogonal one;
`orthogonality_penalty` and `hyperspherical_energy` measure a layer's neurons.
The maps are those of the authors' released code (wy1iu/OPT). Every LAPACK
call (solve, QR, SVD) on CPU runs on one finite matrix at a time, never as a
batched kernel (docs/architecture.md, "Platform hazards"); on GPU and TPU a stack is one
batched call (`checks.per_matrix`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp

from optax_ortho._src import cayley_solve
from optax_ortho._src import checks
from optax_ortho._src.stacks import mm

OrthogonalMapMethod = Literal["cayley", "gram_schmidt", "householder", "lowdin"]
MAP_METHODS: tuple[str, ...] = ("cayley", "gram_schmidt", "householder", "lowdin")

def _cayley(r: jax.Array) -> jax.Array:
  # The authors' map (wy1iu/OPT, opt_cp): S = triu(R) - triu(R)^T, so only the
  # strict upper triangle of R matters (the diagonal cancels) and dR is
  # G_S - G_S^T there, zero elsewhere. Q = (I + S)(I - S)^{-1} equals
  # (I - S)^{-1}(I + S) (the factors commute); I - S has singular values >= 1,
  # so the solve is always well conditioned (and needs no pivoting).
  s = cayley_solve.skew(r)
  return cayley_solve.solve(s, jnp.eye(r.shape[-1], dtype=r.dtype) + s)


def _positive_qr(r: jax.Array) -> jax.Array:
  # Q of R = Q T with diag(T) >= 0: unique and continuous for a non-singular R,
  # and the Q that Gram-Schmidt produces.
  q, t = jnp.linalg.qr(r)
  sign = jnp.where(jnp.diagonal(t) < 0, -1.0, 1.0).astype(r.dtype)
  return q * sign


def _gram_schmidt(r: jax.Array) -> jax.Array:
  # The authors' `tf_gram_schmidt` (opt_gs) orthonormalises the ROWS of R:
  # R = L Q with L lower triangular, diag(L) > 0, i.e. Q^T is the positive QR
  # factor of R^T. Householder QR computes it without the loss of
  # orthogonality of classical Gram-Schmidt; Q and dQ/dR are the same.
  return _positive_qr(r.T).T


def _householder(r: jax.Array) -> jax.Array:
  # The authors' Householder QR (opt_hr): reflections H_k about
  # u = x - |x| e_1 for the columns x = R[k:, k], k < n - 1, so Q = H_1...H_{n-1}
  # has det (-1)^(n-1) and Q^T R has a non-negative diagonal except its last
  # entry. That Q is the positive QR factor with its last column times
  # s = (-1)^(n-1) det(Q+). Theirs divides by |u| = 0 (NaN) when a column is
  # already a multiple of e_1 (R = I, triangular R); this form is the limit
  # there (along R + tI, t -> 0+), and equal to theirs everywhere else.
  n = r.shape[-1]
  q = _positive_qr(r)
  det = jnp.linalg.det(jax.lax.stop_gradient(q))
  s = jnp.where(det < 0, -1.0, 1.0).astype(r.dtype) * (-1.0) ** (n - 1)
  return q.at[:, -1].multiply(s)


@jax.custom_jvp
def _lowdin(r: jax.Array) -> jax.Array:
  u, _, vt = jnp.linalg.svd(r)
  return mm(u, vt)


@_lowdin.defjvp
def _lowdin_jvp(primals, tangents):
  # For R = U S V^T and Q = U V^T: dQ = U [(C - C^T) / (s_i + s_j)] V^T with
  # C = U^T dR V. Unlike the SVD's own derivative it has no 1/(s_i - s_j)
  # term, so it is finite at repeated singular values (R = I included).
  (r,), (dr,) = primals, tangents
  u, s, vt = jnp.linalg.svd(r)
  q = mm(u, vt)
  c = mm(mm(u.T, dr), vt.T)
  denom = s[:, None] + s[None, :]
  omega = (c - c.T) / jnp.where(denom > 0, denom, 1.0)
  return q, mm(mm(u, omega), vt)


_MAPS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "cayley": _cayley,
    "gram_schmidt": _gram_schmidt,
    "householder": _householder,
    "lowdin": _lowdin,
}


def check_map_method(method: str) -> None:
  if method not in MAP_METHODS:
    raise ValueError(
        f"method={method!r} is not an orthogonal map; expected one of"
        f" {MAP_METHODS}."
    )


def orthogonal_map(
    r: jax.Array, *, method: OrthogonalMapMethod = "cayley"
) -> jax.Array:
  r"""Maps an unconstrained square matrix (or a batch) to an orthogonal one.

  The maps OPT learns its orthogonal transformations with, exactly as in the
  authors' released code (wy1iu/OPT), value and derivative:

  * `"cayley"` (`opt_cp`): $Q = (I + S)(I - S)^{-1}$ with
    $S = \operatorname{triu}(R) - \operatorname{triu}(R)^\top$: only the strict
    upper triangle of $R$ is used, and $\partial L / \partial R$ is
    $G_S - G_S^\top$ there and zero on and below the diagonal. Covers the
    rotations without eigenvalue $-1$; $R = I$ (any lower-triangular $R$)
    gives $I$.
  * `"gram_schmidt"` (`opt_gs`, `tf_gram_schmidt`): Gram-Schmidt on the ROWS
    of $R$, i.e. $R = L Q$ with $L$ lower triangular and
    $\operatorname{diag}(L) > 0$ (computed by a Householder QR of $R^\top$, which stays orthogonal
    where classical Gram-Schmidt loses it). $R = I$ gives $I$.
  * `"householder"` (`opt_hr`): their Householder QR of $R$, $Q = H_1 \cdots
    H_{n-1}$ with $H_k$ the reflection that maps column $k$ of the partly
    reduced $R$ onto $+\|x\| e_k$. $\det Q = (-1)^{n-1}$. Their code is NaN
    when a column is already on $e_k$ (for $R = I$ and any upper-triangular
    $R$); here it is the limit along $R + tI$, $t \to 0^+$:
    $R = I$ gives $\operatorname{diag}(1, \dots, 1, (-1)^{n-1})$.
  * `"lowdin"` (`opt_ls`): symmetric orthogonalisation $U V^\top$ for $R = U
    \Sigma V^\top$, the orthogonal matrix closest to $R$. Its derivative is
    implemented in closed form, finite at repeated singular values (such as
    $R = I$).

  All are differentiable and jittable. `"gram_schmidt"` and `"householder"`
  need a non-singular $R$ for a derivative (they are discontinuous at singular
  $R$); their value is orthogonal for every finite $R$. Computation is in
  float32 (or higher); the result has the input's dtype. A matrix with a NaN or
  Inf gives a NaN matrix (and no other matrix of the batch is affected); it
  never reaches a LAPACK kernel.

  Args:
    r: array of shape `(..., n, n)`.
    method: `"cayley"`, `"gram_schmidt"`, `"householder"` or `"lowdin"`.

  Returns:
    An orthogonal matrix (or batch) of the shape and dtype of `r`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import optax_ortho
    >>> r = jax.random.normal(jax.random.key(0), (4, 4))
    >>> q = optax_ortho.orthogonal_map(r, method="householder")
    >>> bool(jnp.allclose(q.T @ q, jnp.eye(4), atol=1e-5))
    True

  References:
    Liu, Lin, Liu, Rehg, Paull, Xiong, Song, Weller, [Orthogonal
    Over-Parameterized Training](https://arxiv.org/abs/2004.04690), CVPR 2021;
    code: <https://github.com/wy1iu/OPT>.
  """
  check_map_method(method)
  checks.float_leaves(r, "r")
  if r.ndim < 2 or r.shape[-1] != r.shape[-2]:
    raise ValueError(
        f"r must be a square matrix or a batch of them (..., n, n), got shape"
        f" {r.shape}."
    )
  n = r.shape[-1]
  if r.size == 0:
    return r
  compute = jnp.promote_types(r.dtype, jnp.float32)
  # A non-finite matrix must not reach LAPACK (jaxlib's CPU kernels can spin
  # forever on an Inf): it is zeroed there and its result replaced by NaN.
  a, ok = checks.lapack_input(r.astype(compute).reshape((-1, n, n)))
  fn = _MAPS[method]
  q = checks.per_matrix(fn, a)
  return checks.poison(q, ok).reshape(r.shape).astype(r.dtype)


def neuron_matrix(kernel: jax.Array, name: str = "kernel") -> jax.Array:
  """(fan_in, neurons) float32 view of a Flax kernel: last axis = neurons."""
  checks.float_leaves(kernel, name)
  if kernel.ndim < 2:
    raise ValueError(
        f"{name} must have ndim >= 2 (..., neurons), got shape {kernel.shape}."
    )
  compute = jnp.promote_types(kernel.dtype, jnp.float32)
  # Not reshape(-1, ...): that divides by zero for a kernel with no neurons.
  rows = math.prod(kernel.shape[:-1])
  return kernel.astype(compute).reshape((rows, kernel.shape[-1]))


def orthogonality_penalty(kernel: jax.Array) -> jax.Array:
  r"""The OR regulariser :math:`\|W W^\top - I\|_F` of a layer's neurons.

  :math:`W` is the (neurons, fan-in) weight matrix: the transpose of the Flax
  kernel viewed as ``(fan_in, neurons)`` (the last axis holds the neurons, all
  others are flattened, as for :func:`hyperspherical_energy`). The penalty is
  zero exactly when the neurons are orthonormal, which needs
  ``neurons <= fan_in``. Not squared: add ``penalty ** 2`` for the squared form.
  It equals the authors' OR penalty (wy1iu/OPT, `opt_or`,
  `add_orthogonal_constraint`) applied to their (neurons, fan-in) matrix; its
  gradient at the minimum is 0 (theirs is NaN there). A kernel with no neurons
  gives 0.

  Args:
    kernel: a Flax ``Dense`` kernel ``(in, out)``, ``Conv`` kernel
      ``(..., in, out)``, or any array with ``ndim >= 2``.

  Returns:
    A float32 scalar.

  Example:
    >>> import jax.numpy as jnp, optax_ortho
    >>> float(optax_ortho.orthogonality_penalty(jnp.eye(3)))
    0.0
  """
  n = neuron_matrix(kernel)
  gram = mm(n.T, n)
  sq = jnp.sum(jnp.square(gram - jnp.eye(gram.shape[0], dtype=gram.dtype)))
  # Gradient 0 (not NaN) at the minimum, where the norm is not differentiable.
  return jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)


def hyperspherical_energy(
    kernel: jax.Array,
    *,
    power: float = 1.0,
    eps: float = 1e-6,
    convention: Literal["paper", "authors"] = "paper",
) -> jax.Array:
  r"""Mean pairwise hyperspherical energy of a layer's neurons.

  The neurons are the kernel's last axis (Flax layout: a `Dense` kernel
  `(in, out)` has `out` neurons in $\mathbb{R}^{in}$, a conv kernel
  `(kh, kw, in, out)` has `out` neurons in $\mathbb{R}^{kh\,kw\,in}$).
  With $\hat w_i = w_i / \|w_i\|$, the energy is

  $$E_s = \frac{1}{N(N-1)} \sum_{i \ne j} f_s(\|\hat w_i - \hat w_j\|),
  \quad f_s(z) = z^{-s} \; (s > 0), \quad f_0(z) = \log(1/z),$$

  the MHE energy of Liu et al. (2018) divided by the number of ordered pairs so
  that layers of different widths compare. Lower means more diverse neurons.
  It depends only on the angles between neurons, so it is invariant to any
  rotation or reflection applied to all neurons together, which is why OPT
  (`W = Q V`, `Q` orthogonal) keeps it at its random-initialisation value.

  With `convention="paper"` (the default) distances are floored at `eps`
  (two identical neurons give a large, finite energy) and a neuron of norm
  below `eps` is treated as the origin; value and gradient are finite for
  every finite kernel, zero neurons included. `convention="authors"`
  reproduces the released code (wy1iu/MHE, `code/architecture.py`,
  `_add_thomson_constraint`, powers 0, 1, 2): neuron norms
  $\sqrt{\|w\|^2 + 10^{-4}}$, squared distances $2 - 2\cos$ with no floor,
  and for $s = 0$ the energy $-\log(d^2) = 2\log(1/d)$, twice the paper's;
  `eps` is then unused. A kernel with fewer than two neurons (or no entries)
  has no pairs: its energy is 0.

  Args:
    kernel: array with `ndim >= 2`.
    power: $s \ge 0$.
    eps: floor on pairwise distances and neuron norms (`"paper"` only).
    convention: `"paper"` or `"authors"` (see above).

  Returns:
    A float32 scalar.

  Example:
    >>> import jax, jax.numpy as jnp, optax_ortho
    >>> w = jax.random.normal(jax.random.key(0), (16, 8))
    >>> q = optax_ortho.orthogonal_map(jax.random.normal(jax.random.key(1), (16, 16)))
    >>> e, e_rot = optax_ortho.hyperspherical_energy(w), optax_ortho.hyperspherical_energy(q @ w)
    >>> bool(jnp.allclose(e, e_rot, rtol=1e-4))
    True

  References:
    Liu, Lin, Liu, Liu, Yu, Dai, Song, [Learning towards Minimum Hyperspherical
    Energy](https://arxiv.org/abs/1805.09298), NeurIPS 2018; code:
    <https://github.com/wy1iu/MHE>.
  """
  checks.hyperparam(power, "power", ">= 0", lambda v: v >= 0, schedule=False)
  checks.hyperparam(eps, "eps", "> 0", lambda v: v > 0, schedule=False)
  if convention not in ("paper", "authors"):
    raise ValueError(
        f"convention must be 'paper' or 'authors', got {convention!r}.")
  n = neuron_matrix(kernel)
  num = n.shape[1]
  if num < 2 or n.size == 0:
    return jnp.zeros((), n.dtype)
  off = 1.0 - jnp.eye(num, dtype=n.dtype)
  sq_norm = jnp.sum(n * n, axis=0, keepdims=True)
  if convention == "authors":
    unit = n / jnp.sqrt(sq_norm + 1e-4)
    # Their diagonal gets +1 before the log/power; it is masked out anyway.
    d2 = 2.0 - 2.0 * mm(unit.T, unit) + (1.0 - off)
    f = -jnp.log(d2) if power == 0 else d2 ** (-0.5 * float(power))
    return jnp.sum(f * off) / (num * (num - 1))
  # sqrt only above eps^2: the derivative of |w| at w = 0 is NaN.
  big = sq_norm > eps * eps
  norms = jnp.sqrt(jnp.where(big, sq_norm, eps * eps))
  unit = jnp.where(big, n / norms, 0.0)
  sq = jnp.sum(unit * unit, axis=0)
  # |a - b|^2 = |a|^2 + |b|^2 - 2 a.b; floored so the sqrt and power stay
  # finite, and the diagonal (d = 0) replaced before the sqrt for its gradient.
  d2 = sq[:, None] + sq[None, :] - 2.0 * mm(unit.T, unit)
  d2 = jnp.where(off > 0, jnp.maximum(d2, eps * eps), 1.0)
  dist = jnp.sqrt(d2)
  f = -jnp.log(dist) if power == 0 else dist ** (-float(power))
  return jnp.sum(f * off) / (num * (num - 1))
