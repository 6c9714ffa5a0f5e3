"""SGD with momentum on the Stiefel manifold through the Cayley transform."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_ortho._src import checks
from optax_ortho._src import matrix_view as mv
from optax_ortho._src.stacks import group_matrices
from optax_ortho._src.stacks import mm
from optax_ortho._src.stacks import mT
from optax_ortho._src.stacks import split_stack
from optax_ortho._src.stacks import stack_parts


class StiefelSGDState(NamedTuple):
  """State of :func:`stiefel_sgd`.

  Attributes:
    count: number of updates so far (drives the learning-rate schedule).
    momentum: one float32 (or wider) buffer per parameter; on the manifold it
      is the momentum projected onto the tangent space, as in Li et al.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
  momentum: Any


def default_mask(params: Any) -> Any:
  """True for every 2-D leaf with rows >= cols (a tall or square matrix)."""
  return jax.tree.map(lambda p: p.ndim == 2 and p.shape[0] >= p.shape[1], params)


def _resolve_mask(updates, mask) -> list[bool]:
  tree = default_mask(updates) if mask is None else (
      mask(updates) if callable(mask) else mask)
  if not checks.same_structure(tree, updates):
    raise ValueError(
        "mask must be a pytree of bools with the structure of the parameters"
        f" (or a callable returning one); got {jax.tree.structure(tree)} for"
        f" parameters {jax.tree.structure(updates)}."
    )
  out = []
  for (path, x), m in zip(jax.tree_util.tree_flatten_with_path(updates)[0],
                          jax.tree.leaves(tree)):
    if not isinstance(m, (bool, jnp.bool_)):
      raise TypeError(
          f"mask leaf at {jax.tree_util.keystr(path)} must be a Python bool,"
          f" got {m!r}.")
    # An empty leaf passes through (zero update) whatever its shape.
    if m and (x.ndim < 2 or (
        x.size and x.shape[-1] > math.prod(x.shape[:-1]))):
      raise ValueError(
          f"mask selects the leaf {jax.tree_util.keystr(path)} of shape"
          f" {x.shape} for the Stiefel manifold, which needs a matrix view"
          " (prod(shape[:-1]), shape[-1]) with rows >= cols (ndim >= 2).")
    out.append(bool(m))
  return out


def _full_polar(x: jax.Array) -> jax.Array:
  """U V^T of each (n, p) matrix of a finite stack, one SVD per matrix.

  Unlike the pseudo-polar factor of `orthonormalize`, the null directions of
  a rank-deficient (or zero) matrix are filled from the SVD's own basis: the
  result is always a point of the manifold, one of the closest to `x`.
  """
  def one(a):
    u, _, vt = jnp.linalg.svd(a, full_matrices=False)
    return mm(u, vt)
  return checks.per_matrix(one, x)


def _project_or_correct(x: jax.Array, tol: float) -> jax.Array:
  """A finite (k, n, p) stack brought back onto the manifold.

  Near it (max |X^T X - I| <= tol) one Newton-Schulz step X (3I - X^T X) / 2
  squares the error. Farther (a random initialisation, a zero or
  rank-deficient matrix), the stack is replaced by closest orthonormal
  matrices, polar factors with the null directions filled; that SVD runs only
  on such a step.
  """
  p = x.shape[-1]
  eye = jnp.eye(p, dtype=x.dtype)
  gram = mm(mT(x), x)
  off = jnp.max(jnp.abs(gram - eye))
  return jax.lax.cond(
      off > tol,
      lambda: _full_polar(x),
      lambda: mm(x, 1.5 * eye - 0.5 * gram),
  )


# Fixed random +-1 vectors that probe X^T X - I; a few suffice (see below).
_PROBES = 4


def _gram_error_estimate(x: jax.Array) -> jax.Array:
  """Per matrix of a (k, n, p) stack, an estimate of max_i |row i of X^T X - I|.

  For a random +-1 vector v, E[(E v)_i^2] = |row i of E|^2 (Hutchinson), so
  the mean over a few fixed such vectors estimates every row norm of
  E = X^T X - I, an upper bound of its largest entry; a single large entry
  (a broken column) is found exactly. Two products with p x 4 probes,
  against the p x p Gram matrix's n p^2.
  """
  p = x.shape[-1]
  v = jnp.asarray(
      np.random.default_rng(0).choice([-1.0, 1.0], size=(p, _PROBES)), x.dtype)
  res = mm(mT(x), mm(x, v)) - v
  return jnp.sqrt(jnp.max(jnp.mean(res * res, axis=-1), axis=-1))


def _onto_manifold(x: jax.Array, tol: float) -> jax.Array:
  """A finite (k, n, p) stack as it should enter a step: on the manifold.

  The Cayley step keeps X^T X, so a stack already on the manifold is left as
  it is: its Gram error, estimated with fixed probes, is at most
  eps (4 + sqrt(n)), two to four times what float32 rounding leaves in the
  n-term sums of X^T X after a Newton-Schulz step. Rounding then accumulates
  over steps until the estimate passes that bound, and `_project_or_correct`
  (a Newton-Schulz step, or the polar factor when far) sets it back; its
  Gram matrix is computed only then.
  """
  n = x.shape[-2]
  bound = float(jnp.finfo(x.dtype).eps) * (4 + math.sqrt(n))
  return jax.lax.cond(
      jnp.any(_gram_error_estimate(x) > bound),
      lambda: _project_or_correct(x, tol),
      lambda: x,
  )


# Below a|W|_F <= 1 (always, with the step clamp) the Cayley solve runs on
# matrix products only; a larger step (clamp_step=False) takes the LU path.
# The truncated series' relative error bound is kept below eps / 8 (2^-26 in
# float32), under the unit roundoff.
_RHO_MAX = 1.0 / 17.0


def _series_solve(y: jax.Array, b: jax.Array, beta: jax.Array,
                  yb: jax.Array | None = None) -> jax.Array:
  """(I + Y)^{-1} B by matrix products, for Y like h W, |hW|_2^2 <= beta <= 1/8.

  Y is either h W (W skew, n x n) or the 2p x 2p matrix V^T U of a factored
  h W = U V^T, with B = V^T b; every polynomial in Y then acts on B as the same
  polynomial in h W acts on b (push-through: Y^k V^T = V^T (hW)^k), so the
  bounds below, derived for the skew h W, hold for both.
  (I + Y)^{-1} = (I - Y^2)^{-1} (I - Y), and for skew h W the matrix
  S = I - (hW)^2 = I + h^2 W^T W is symmetric with eigenvalues in
  [1, 1 + beta]. With c = 2 / (2 + beta), Z = I - cS has eigenvalues in
  [-rho, rho], rho = beta / (2 + beta) <= 1/17, so S^{-1} = c sum_k Z^k, and
  its first N terms, summed by Horner's rule (one product with Z per term),
  leave a relative error below rho^N / (1 - rho). Terms are added while that
  bound exceeds eps / 8 (per stack: the largest beta decides): in float32
  N = 7 at the bound and N = 2 or 3 for the usual small steps (float64: 14).

  `yb`, if given, is Y B (when the caller has it already).

  Reference: the Neumann series, Golub & Van Loan, Matrix Computations
  (4th ed., 2013), section 2.3.
  """
  eye = jnp.eye(y.shape[-1], dtype=y.dtype)
  y2 = mm(y, y)
  # A tighter bound where the spectrum is spread: the eigenvalues of Y^2 are
  # those of (hW)^2, -mu^2 twice for each pair +-i mu of hW, so
  # |hW|_2^2 = max mu^2 <= |Y^2|_F / sqrt(2) (Schur: |A|_F^2 >= sum |lambda|^2).
  beta = jnp.minimum(beta, jnp.sqrt(jnp.sum(y2 * y2, axis=(-2, -1)) / 2))
  c = (2.0 / (2.0 + beta))[:, None, None]
  z = (1.0 - c) * eye + c * y2
  r0 = b - (mm(y, b) if yb is None else yb)
  rho = jnp.max(beta / (2.0 + beta))
  tol = float(jnp.finfo(y.dtype).eps) / 8
  # rho <= 1/17 bounds the number of terms; one switch on the number needed
  # (not a while loop, which would not be reverse-differentiable).
  max_terms = math.ceil(math.log(tol) / math.log(_RHO_MAX))
  terms = jnp.int32(2) + sum(
      (rho ** k > tol).astype(jnp.int32) for k in range(2, max_terms))

  def horner(n):
    def run(r0):
      r = r0
      for _ in range(n - 1):
        r = r0 + mm(z, r)
      return r
    return run

  r = jax.lax.switch(terms - 2, [horner(n) for n in range(2, max_terms + 1)], r0)
  return c * r


def _lu_solve(y: jax.Array, b: jax.Array) -> jax.Array:
  """(I + Y)^{-1} B by LU: one unbatched call per matrix on CPU (`checks.per_matrix`)."""
  eye = jnp.eye(y.shape[-1], dtype=y.dtype)
  return checks.per_matrix(
      lambda args: jnp.linalg.solve(eye + args[0], args[1]), (y, b))


def _half_step(lr: jax.Array, w_sq: jax.Array, clamp: bool
               ) -> tuple[jax.Array, jax.Array]:
  """h = a / 2 and the bound beta >= |hW|_2^2 of each matrix's step.

  a = min(lr, 1 / (|W|_F + 1e-8)) with the clamp (Li et al.'s, and the OPT
  authors'), else lr; `w_sq` is |W|_F^2 per matrix. The eigenvalues of a skew
  W come in pairs, so |hW|_2^2 <= h^2 |W|_F^2 / 2.
  """
  a = jnp.broadcast_to(lr, w_sq.shape).astype(w_sq.dtype)
  w_norm = jnp.sqrt(jnp.maximum(w_sq, 0.0))
  if clamp:
    a = jnp.minimum(a, 1.0 / (w_norm + 1e-8))
  h = 0.5 * a
  return h, 0.5 * jnp.square(h * w_norm)


def _solve(y: jax.Array, b: jax.Array, beta: jax.Array, clamp: bool, solver: str,
           yb: jax.Array | None = None) -> jax.Array:
  """(I + Y)^{-1} B by the series where it is exact (always under the clamp),
  else by LU; `solver="lu"` forces LU, `"series"` the series."""
  if solver == "lu":
    return _lu_solve(y, b)
  if solver == "series" or clamp:
    return _series_solve(y, b, beta, yb)
  # 1/8 (a|W|_F <= 1) with a margin for the rounding of |W|_F.
  return jax.lax.cond(jnp.all(beta <= 0.125 * (1 + 1e-4)),
                      lambda: _series_solve(y, b, beta, yb),
                      lambda: _lu_solve(y, b))


def _square_step(x: jax.Array, m: jax.Array, lr: jax.Array, clamp: bool,
                 solver: str) -> tuple[jax.Array, jax.Array]:
  """The Cayley step of square (orthogonal) matrices, in their own frame.

  W = X Omega X^T with Omega = skew(X^T M), so |W|_F = |Omega|_F, the tangent
  is X Omega and the step X (I + h Omega)^{-1} (I - h Omega)
  = 2 X (I + h Omega)^{-1} - X: three n x n products fewer than with W.
  """
  xtm = mm(mT(x), m)
  omega = 0.5 * (xtm - mT(xtm))
  tangent = mm(x, omega)
  h, beta = _half_step(lr, jnp.sum(omega * omega, axis=(-2, -1)), clamp)
  hb = h[:, None, None]
  # X (I + h Omega)^{-1} = ((I - h Omega)^{-1} X^T)^T; -h Omega X^T = h T^T.
  sol = _solve(-hb * omega, mT(x), beta, clamp, solver, yb=hb * mT(tangent))
  return 2.0 * mT(sol) - x, tangent


def _tangent_parts(x: jax.Array, m: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The tangent momentum M - X sym(X^T M), and P with W = P X^T - X P^T.

  P is M - X (X^T M + sym(X^T M)) / 2 rather than Li et al.'s
  M - X (X^T M) / 2: the same W for any X (it only drops X sym X^T, a
  symmetric term) but no symmetric part in X^T P, so |P|_F <= |W|_F / sqrt(2)
  on the manifold and |W|_F^2 has no cancellation.
  """
  xtm = mm(mT(x), m)
  sym = 0.5 * (xtm + mT(xtm))
  return m - mm(x, sym), m - mm(x, 0.5 * (xtm + sym))


def _direct_step(x: jax.Array, m: jax.Array, lr: jax.Array, clamp: bool,
                 solver: str) -> tuple[jax.Array, jax.Array]:
  """The Cayley step (I + hW)^{-1} (I - hW) X = 2 (I + hW)^{-1} X - X of an
  (n, p) stack with n <= 2p, through the n x n skew W."""
  tangent, pm = _tangent_parts(x, m)
  pxt = mm(pm, mT(x))
  w = pxt - mT(pxt)
  h, beta = _half_step(lr, jnp.sum(w * w, axis=(-2, -1)), clamp)
  sol = _solve(h[:, None, None] * w, x, beta, clamp, solver)
  return 2.0 * sol - x, tangent


def _factored_step(x: jax.Array, m: jax.Array, lr: jax.Array, clamp: bool,
                   solver: str) -> tuple[jax.Array, jax.Array]:
  """The Cayley step of an (n, p) stack with n > 2p, through a 2p x 2p system.

  h W = U V^T with U = [hP, X], V = [X, -hP] (Wen & Yin 2013), so
  (I + hW)^{-1} X = X - U (I + V^T U)^{-1} V^T X, and every block of V^T U and
  V^T X is one of the p x p matrices X^T X, X^T P, P^T P.
  """
  p = x.shape[-1]
  tangent, pm = _tangent_parts(x, m)
  xtp = mm(mT(x), pm)
  ptp = mm(mT(pm), pm)
  gram = mm(mT(x), x)
  # |U V^T|_F^2 = sum((U^T U) * (V^T V)) for U = [P, X], V = [X, -P].
  w_sq = 2.0 * (jnp.sum(ptp * gram, axis=(-2, -1))
                - jnp.sum(xtp * mT(xtp), axis=(-2, -1)))
  h, beta = _half_step(lr, w_sq, clamp)
  hb = h[:, None, None]
  y = jnp.concatenate([
      jnp.concatenate([hb * xtp, gram], axis=-1),
      jnp.concatenate([-hb * hb * ptp, -hb * mT(xtp)], axis=-1)], axis=-2)
  b = jnp.concatenate([gram, -hb * mT(xtp)], axis=-2)
  sol = _solve(y, b, beta, clamp, solver)
  return x - 2.0 * (mm(hb * pm, sol[:, :p]) + mm(x, sol[:, p:])), tangent


def _cayley_step(x: jax.Array, m: jax.Array, lr: jax.Array, clamp: bool,
                 solver: str = "auto") -> tuple[jax.Array, jax.Array]:
  """One Cayley SGD step (Li et al. 2020, Alg. 2) on a (k, n, p) stack.

  Returns the new iterate and the tangent momentum W X = M - X sym(X^T M),
  where W = P X^T - X P^T is the skew matrix of the momentum M. The new
  iterate is the exact Cayley transform (I + a/2 W)^{-1} (I - a/2 W) X, which
  keeps X^T X, with the step a of `_half_step`. Li et al. approximate the
  transform with a fixed-point iteration; it is solved exactly here, in one of
  three forms by shape: square, n x n (n <= 2p), or rank-2p (n > 2p).

  The system is solved by `_series_solve` (matrix products only) whenever
  a |W|_F <= 1, where that is exact to float32 precision: always with the
  clamp, since |W|_2 <= |W|_F / sqrt(2) for a skew W gives |hW|_2^2 <= 1/8;
  otherwise by LU (`solver="lu"` forces it, `"series"` forbids it).
  """
  n, p = x.shape[-2:]
  step = _square_step if n == p else _direct_step if n <= 2 * p else _factored_step
  return step(x, m, lr, clamp, solver)


def stiefel_sgd(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float = 0.9,
    *,
    mask: Any | Callable[[Any], Any] | None = None,
    projection_tol: float = 0.1,
    clamp_step: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""SGD with momentum on the Stiefel manifold via the Cayley transform.

  The orthogonality-preserving gradient descent (OGD) of OPT: Cayley SGD with
  momentum of Li, Li and Todorovic (2020). A selected parameter
  :math:`X \in \mathbb{R}^{n \times p}` (its columns, the neurons of a Flax
  kernel, orthonormal: :math:`X^\top X = I`) is updated as

  .. math::

     M &\leftarrow \beta M + G, \quad
     W = \hat W - \hat W^\top, \quad \hat W = M X^\top - \tfrac12 X X^\top M X^\top,
     \\
     M &\leftarrow W X \quad \text{(tangent momentum)}, \quad
     X \leftarrow (I + \tfrac{a}{2} W)^{-1} (I - \tfrac{a}{2} W) X,

  which keeps :math:`X^\top X = I`. The step is clamped as in Li et al.'s
  Algorithm 2 and the OPT authors' OGD optimizer (wy1iu/OPT,
  `opt_ogd/architecture.py`): $a = \min(\eta, 1/(\|W\|_F + 10^{-8}))$ per
  matrix, so one step never rotates by much more than a radian however large
  the momentum; `clamp_step=False` gives $a = \eta$. The Cayley transform is
  computed exactly (not by Li et al.'s two fixed-point iterations, which
  differ from it by $O(a^3 \|W\|^3)$), through a :math:`2p \times 2p`
  system when :math:`n > 2p`. Under the clamp ($a \|W\|_F \le 1$) that system
  is solved to float32 precision by matrix products alone (a Neumann series in
  $a^2 W^\top W / 4$, whose eigenvalues are at most $1/8$ there), with no LAPACK
  call; an unclamped step beyond that bound uses an LU solve. Other parameters
  get plain SGD with momentum,
  ``M <- beta M + G; X <- X - lr M`` (``optax.sgd``).

  Parameters off the manifold: a selected parameter with
  :math:`\max|X^\top X - I| >` ``projection_tol`` (e.g. a random
  initialisation) is first replaced by its closest orthonormal matrix, its
  polar factor, and the step is taken from there (the returned update contains
  that jump); one that is closer but off by more than float32 rounding is
  pulled back by a Newton-Schulz step :math:`X(3I - X^\top X)/2` that squares
  the error. The Cayley step itself keeps :math:`X^\top X`, so the full check
  (the Gram matrix) runs only when a few fixed random probes of
  :math:`X^\top X - I` (two thin products) find such an error. So iterates
  stay orthonormal to float32 precision over any number of steps, and a
  ``jax.nn.initializers.orthogonal()`` initialisation avoids the jump. A zero
  or rank-deficient selected parameter is projected the same way, its null
  directions filled from the SVD's basis, so it lands on the manifold and
  moves from there (it is never left stuck while its momentum grows).

  A selected leaf of more than two axes is viewed as the matrix
  ``(prod(shape[:-1]), shape[-1])`` (a conv kernel's neurons). Momentum
  buffers are kept in float32 (or wider). Updates of the selected leaves have
  the parameters' dtypes (a float32 parameter with bfloat16 gradients stays on
  the manifold to float32 precision); the others have the gradients' dtypes.
  A non-finite gradient or parameter gives a NaN update for that leaf and
  leaves its momentum unchanged; such a matrix never reaches a LAPACK kernel.
  An empty leaf (a zero-size axis) gets a zero update. Updates, params and
  state must have the same tree structure and shapes (a ValueError names the
  first leaf that differs).

  Args:
    learning_rate: a float or an optax schedule.
    momentum: momentum decay :math:`\beta`.
    mask: which parameters live on the manifold: a pytree of Python bools with
      the parameters' structure, or a callable from parameters to one. Default:
      every 2-D leaf with rows >= cols.
    projection_tol: how far from the manifold (max entry of
      :math:`|X^\top X - I|`) a parameter is projected rather than corrected.
    clamp_step: clamp the step to $1/(\|W\|_F + 10^{-8})$ (the authors'
      Cayley SGD); `False` takes the full learning rate.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``
    and ignores extra keyword arguments.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_ortho
    >>> params = {"w": jax.nn.initializers.orthogonal()(jax.random.key(0), (6, 3)),
    ...           "b": jnp.zeros(3)}
    >>> tx = optax_ortho.stiefel_sgd(0.1)
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.ones((6, 3)), "b": jnp.ones(3)}
    >>> updates, state = jax.jit(tx.update)(grads, state, params)
    >>> w = optax.apply_updates(params, updates)["w"]
    >>> bool(jnp.allclose(w.T @ w, jnp.eye(3), atol=1e-5))
    True

  References:
    Li, Li, Todorovic, `Efficient Riemannian optimization on the Stiefel
    manifold via the Cayley transform <https://arxiv.org/abs/2002.01113>`_,
    ICLR 2020.

    Liu et al., `Orthogonal Over-Parameterized Training
    <https://arxiv.org/abs/2004.04690>`_, CVPR 2021.

    Wen, Yin, A feasible method for optimization with orthogonality
    constraints, Math. Program. 142, 2013.
  """
  checks.hyperparam(learning_rate, "learning_rate", ">= 0", lambda v: v >= 0)
  checks.hyperparam(momentum, "momentum", "in [0, 1)",
                    lambda v: 0.0 <= v < 1.0, schedule=False)
  checks.hyperparam(projection_tol, "projection_tol", "> 0", lambda v: v > 0,
                    schedule=False)
  checks.boolean(clamp_step, "clamp_step")

  def init_fn(params):
    return StiefelSGDState(
        count=jnp.zeros([], jnp.int32),
        momentum=jax.tree.map(
            lambda p: jnp.zeros_like(
                p, dtype=jnp.promote_types(p.dtype, jnp.float32)), params),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _check_update_args(updates, state, params)
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    grads, treedef = jax.tree.flatten(updates)
    xs = treedef.flatten_up_to(params)
    old_m = treedef.flatten_up_to(state.momentum)
    new_m = [momentum * m + g.astype(m.dtype) for m, g in zip(old_m, grads)]
    out, new_m = _manifold_updates(
        grads, xs, new_m, old_m, _resolve_mask(updates, mask), lr,
        projection_tol, clamp_step)
    return jax.tree.unflatten(treedef, out), StiefelSGDState(
        count=optax.safe_increment(state.count),
        momentum=jax.tree.unflatten(treedef, _finite_or_old(new_m, old_m)),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_update_args(updates: Any, state: StiefelSGDState, params: Any) -> None:
  if params is None:
    raise ValueError(
        "stiefel_sgd needs the current parameters: call update(updates,"
        " state, params).")
  if not isinstance(state, StiefelSGDState):
    raise TypeError(
        "state must be the StiefelSGDState returned by stiefel_sgd's init,"
        f" got {type(state).__name__}.")
  checks.float_leaves(updates, "updates")
  checks.trees_match(params, updates, "params", "updates")
  checks.trees_match(state.momentum, updates, "state.momentum", "updates")


def _manifold_updates(
    grads: list[jax.Array], xs: list[jax.Array], new_m: list[jax.Array],
    old_m: list[jax.Array], selected: list[bool], lr: Any,
    projection_tol: float, clamp: bool,
) -> tuple[list[jax.Array], list[jax.Array]]:
  """Every leaf's update and new momentum: SGD for the leaves off the mask, a
  Cayley step per stack of same-shaped selected matrices for the others."""
  out = [(-lr * m).astype(g.dtype) if not sel else jnp.zeros_like(g)
         for g, m, sel in zip(grads, new_m, selected)]
  new_m = list(new_m)
  dims = [mv.default_dimension_numbers(x) if sel else None
          for x, sel in zip(xs, selected)]
  groups, views = group_matrices(xs, dims)
  for (_, _, compute), idx in groups.items():
    x = stack_parts([mv.to_stack(xs[i], views[i], compute) for i in idx])
    m = stack_parts([mv.to_stack(new_m[i], views[i], compute) for i in idx])
    delta, tangent = _stack_step(x, m, jnp.asarray(lr, compute),
                                 projection_tol, clamp)
    sizes = [views[i].batch for i in idx]
    for i, d, t in zip(idx, split_stack(delta, sizes), split_stack(tangent, sizes)):
      # In the parameter's dtype: a bfloat16 update of a float32 parameter
      # would be rounded off the manifold.
      out[i] = mv.from_stack(d, views[i], xs[i])
      new_m[i] = mv.from_stack(t, views[i], old_m[i])
  return out, new_m


def _stack_step(x: jax.Array, m: jax.Array, lr: jax.Array, projection_tol: float,
                clamp: bool) -> tuple[jax.Array, jax.Array]:
  """The update and the tangent momentum of a (k, n, p) stack; NaN for every
  matrix whose parameter or momentum is not finite (zeroed before any LAPACK
  call)."""
  x0, ok_x = checks.lapack_input(x)
  m0, ok_m = checks.lapack_input(m)
  ok = ok_x & ok_m
  x_new, tangent = _cayley_step(_onto_manifold(x0, projection_tol), m0, lr, clamp)
  return checks.poison(x_new - x0, ok), checks.poison(tangent, ok)


def _finite_or_old(new_m: list[jax.Array], old_m: list[jax.Array]) -> list[jax.Array]:
  """A non-finite gradient must not poison later steps through the momentum."""
  return [jnp.where(jnp.all(jnp.isfinite(n)), n, o) for n, o in zip(new_m, old_m)]
