"""Gradient norm penalty: a two-point gradient, with SAM as its alpha = 1 case."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_ortho._src import checks

# params -> grads, or params -> (grads, aux) with `has_aux=True`.
GradFn = Callable[[Any], Any]


class GradientNormPenaltyState(NamedTuple):
  """State of :func:`gradient_norm_penalty`.

  Attributes:
    count: number of updates so far; the step of the ``alpha`` and ``radius``
      schedules.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax


def _compute_dtype(x: jax.Array):
  return jnp.promote_types(x.dtype, jnp.float32)


def _scaled_norm(tree: Any) -> tuple[jax.Array, jax.Array]:
  """(m, n) with m = max|g| (1 where that is 0 or not finite) and n = |g / m|.

  The global norm is m * n. Squaring g / m instead of g keeps the sum of
  squares in range: a float32 gradient of 1e20 has a finite norm whose square
  (1e40) is not, and a tiny one a norm whose square underflows to zero. Summed
  in float32 (at least) so bfloat16 gradients do not lose the norm.
  """
  leaves = [x.astype(_compute_dtype(x)) for x in jax.tree.leaves(tree)]
  acc = jnp.result_type(jnp.float32, *leaves)  # float64 stays float64
  m = jnp.max(jnp.stack([jnp.max(jnp.abs(x), initial=0.0).astype(acc)
                         for x in leaves]))
  safe_m = jnp.where(jnp.isfinite(m) & (m > 0), m, jnp.ones_like(m))
  n = optax.tree.norm([x / safe_m.astype(x.dtype) for x in leaves])
  # A NaN or Inf leaf: make n non-finite so the caller sees it.
  n = jnp.where(jnp.isfinite(m), n, m)
  return safe_m, n.astype(acc)


def _unit(g1: Any, eps: float) -> tuple[Any, jax.Array]:
  """(g1 / max(|g1|, eps) in the compute dtype, whether |g1| is finite).

  Computed as (g1 / m) / max(n, eps / m), never squaring g1.
  """
  m, n = _scaled_norm(g1)
  inv = 1.0 / jnp.maximum(n, eps / m)

  def unit(g):
    dtype = _compute_dtype(g)
    return (g.astype(dtype) / m.astype(dtype)) * inv.astype(dtype)

  return jax.tree.map(unit, g1), jnp.isfinite(n)


def _perturb(params: Any, unit: Any, radius: jax.Array, finite: jax.Array) -> Any:
  """params + radius * unit, or params where |g1| is not finite.

  A non-finite g1 would spread NaN into every parameter through the
  perturbation; evaluated at params instead, g2 stays finite and only the
  non-finite leaves of g1 make the output non-finite.
  """
  def perturb(p, u):
    dtype = _compute_dtype(p)
    moved = p.astype(dtype) + radius * u.astype(dtype)
    return jnp.where(finite, moved, p.astype(dtype)).astype(p.dtype)

  return jax.tree.map(perturb, params, unit)


def _second_gradient(grad_fn: GradFn, perturbed: Any, updates: Any, has_aux: bool) -> Any:
  """grad_fn(perturbed), its aux dropped, checked against `updates`."""
  g2 = grad_fn(perturbed)
  if has_aux:
    if not (isinstance(g2, (tuple, list)) and len(g2) == 2):
      raise ValueError(
          "with has_aux=True, grad_fn must return a pair (grads, aux), got"
          f" {type(g2).__name__}."
      )
    g2 = g2[0]  # aux (e.g. BatchNorm statistics of the perturbed pass) dropped
  try:
    checks.trees_match(g2, updates, "grad_fn(params)", "updates")
  except ValueError as err:
    if has_aux:
      raise
    raise ValueError(
        f"{err} If grad_fn returns (grads, aux), pass has_aux=True.") from None
  checks.float_leaves(g2, "grad_fn(params)")
  return g2


def _mix(g1: Any, g2: Any, alpha: jax.Array, out_like: Any) -> Any:
  """(1 - alpha) g1 + alpha g2 per leaf, in the dtype of `out_like`.

  Not g1 + alpha (g2 - g1): this form is exact at alpha = 0 and at alpha = 1.
  """
  def mix(a, b, like):
    dtype = _compute_dtype(a)
    return ((1.0 - alpha) * a.astype(dtype) + alpha * b.astype(dtype)).astype(like.dtype)

  return jax.tree.map(mix, g1, g2, out_like)


def _check_update_args(updates: Any, params: Any, grad_fn: Any) -> None:
  if params is None:
    raise ValueError(
        "gradient_norm_penalty needs params: call update(updates, state,"
        " params, grad_fn=...), params=None is not accepted."
    )
  if grad_fn is None:
    raise ValueError(
        "gradient_norm_penalty needs the keyword argument grad_fn: a"
        " function params -> gradient of the loss on the current batch,"
        " got None."
    )
  if not callable(grad_fn):
    raise TypeError(
        f"grad_fn must be callable (params -> grads), got {grad_fn!r} of"
        f" type {type(grad_fn).__name__}."
    )
  checks.float_leaves(updates, "updates")
  checks.trees_match(params, updates, "params", "updates")


def gradient_norm_penalty(
    alpha: optax.ScalarOrSchedule = 0.8,
    radius: optax.ScalarOrSchedule = 0.05,
    *,
    eps: float = 1e-12,
    has_aux: bool = False,
    normalize_g1: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Gradient of the loss plus a penalty on its gradient norm (Zhao et al.).

  Minimising :math:`L(\theta) + \lambda \|\nabla L(\theta)\|` needs the gradient
  :math:`g + \lambda H g / \|g\|` (:math:`g = \nabla L`, :math:`H` the Hessian).
  The Hessian-vector product is taken by a finite difference along
  :math:`g / \|g\|` with step ``radius`` :math:`r`; with
  :math:`\alpha = \lambda / r` the gradient becomes

  .. math::

    g_1 = \nabla L(\theta), \quad
    g_2 = \nabla L\!\left(\theta + r \frac{g_1}{\|g_1\|}\right), \quad
    \text{out} = (1 - \alpha)\, g_1 + \alpha\, g_2,

  where :math:`\|\cdot\|` is the global norm over the whole pytree.
  :math:`\alpha = 0` returns :math:`g_1` unchanged and :math:`\alpha = 1` is
  SAM's gradient (Foret et al.), as ``optax.contrib.sam`` computes it with
  ``opaque_mode=True``.

  ``updates`` is :math:`g_1`; ``update`` evaluates :math:`g_2` by calling the
  keyword argument ``grad_fn(params)``, which must compute the gradient of the
  same loss on the same batch as :math:`g_1`. Put the transform first in a
  chain, on the raw gradient, and the optimizer after it.

  Models with BatchNorm: pass ``has_aux=True`` and a ``grad_fn`` that returns
  ``(grads, aux)`` (``jax.grad(loss_fn, has_aux=True)`` with Flax's
  ``mutable=["batch_stats"]``); ``aux``, the statistics of the perturbed pass,
  is discarded, so only the unperturbed pass updates the running statistics.

  A zero gradient gives no perturbation (:math:`g_2` is the gradient at
  ``params``); so does a non-finite :math:`\|g_1\|`, so a NaN leaf of
  :math:`g_1` gives NaN in that leaf of the output, not in every leaf. The
  state is a step counter, which a NaN step cannot poison. Computation is in
  float32 (at least); each leaf of the output keeps the dtype of ``updates``.
  The norm is taken on $g_1 / \max|g_1|$, so gradients near the ends of
  the float range (a norm of 1e20 whose square overflows float32) are still
  perturbed correctly.

  ``normalize_g1=True`` reproduces the authors' released code (their default
  ``norm_perturbations=True``), which mixes the *normalised* first gradient:
  $\text{out} = (1 - \alpha) g_1 / \|g_1\| + \alpha g_2$. It equals the
  paper's formula only at $\alpha = 1$; the default (``False``) is the paper's
  formula (docs/differences.md).

  Args:
    alpha: weight :math:`\alpha \ge 0` of the perturbed gradient: a float or an
      optax schedule. The paper's default 0.8; 1 is SAM.
    radius: finite-difference step :math:`r \ge 0`: a float or an optax
      schedule. The paper uses 0.1 on CIFAR and 0.05 on ImageNet.
    eps: lower bound on :math:`\|g_1\|` in the normalisation, so a tiny
      gradient gives a perturbation of norm at most ``radius``.
    has_aux: whether ``grad_fn`` returns ``(grads, aux)``; ``aux`` is dropped.
    normalize_g1: mix $g_1 / \|g_1\|$ instead of $g_1$, as the authors' code
      does; a zero $g_1$ then contributes zero.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``params`` and the keyword-only ``grad_fn``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import optax_ortho
    >>> def loss_fn(params, x, y):
    ...   return jnp.mean((jnp.tanh(x @ params["w"]) - y) ** 2)
    >>> x, y = jnp.ones((8, 3)), jnp.zeros((8, 2))
    >>> params = {"w": 0.5 * jnp.ones((3, 2))}
    >>> tx = optax.chain(optax_ortho.gradient_norm_penalty(alpha=0.8, radius=0.05),
    ...                  optax.sgd(0.1, momentum=0.9))
    >>> state = tx.init(params)
    >>> @jax.jit
    ... def step(params, state, x, y):
    ...   grads = jax.grad(loss_fn)(params, x, y)
    ...   grad_fn = jax.grad(lambda p: loss_fn(p, x, y))
    ...   updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
    ...   return optax.apply_updates(params, updates), state
    >>> params, state = step(params, state, x, y)
    >>> bool(loss_fn(params, x, y) < loss_fn({"w": 0.5 * jnp.ones((3, 2))}, x, y))
    True

  References:
    Zhao, Zhang, Hu, `Penalizing Gradient Norm for Efficiently Improving
    Generalization in Deep Learning <https://arxiv.org/abs/2202.03599>`_,
    ICML 2022.

    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021.
  """
  checks.hyperparam(alpha, "alpha", "a finite number >= 0",
                    lambda v: v >= 0.0)
  checks.hyperparam(radius, "radius", "a finite number >= 0",
                    lambda v: v >= 0.0)
  checks.hyperparam(eps, "eps", "a finite number > 0", lambda v: v > 0.0,
                    schedule=False)
  checks.boolean(has_aux, "has_aux")
  checks.boolean(normalize_g1, "normalize_g1")
  # A constant alpha = 0 needs no second gradient: skip its cost entirely.
  skip_second_pass = (
      isinstance(alpha, numbers.Real) and not isinstance(alpha, bool)
      and float(alpha) == 0.0 and not normalize_g1
  )

  def init_fn(params):
    del params
    return GradientNormPenaltyState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, *, grad_fn: GradFn | None = None,
                **extra_args):
    del extra_args  # meant for other transforms of the chain
    _check_update_args(updates, params, grad_fn)
    new_state = GradientNormPenaltyState(count=optax.safe_increment(state.count))
    if skip_second_pass or not jax.tree.leaves(updates):
      return updates, new_state
    a = alpha(state.count) if callable(alpha) else alpha
    r = radius(state.count) if callable(radius) else radius
    unit, finite = _unit(updates, eps)
    g2 = _second_gradient(grad_fn, _perturb(params, unit, r, finite), updates, has_aux)
    if normalize_g1:
      # Non-finite g1: keep it as is, so its NaN stays in its own leaves.
      g1 = jax.tree.map(
          lambda u, g: jnp.where(finite, u, g.astype(u.dtype)), unit, updates)
    else:
      g1 = updates
    return _mix(g1, g2, a, updates), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
