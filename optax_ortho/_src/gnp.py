"""Gradient norm penalty: a two-point gradient, with SAM as its alpha = 1 case."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_ortho._src import polar as polar_lib

# params -> grads, or params -> (grads, aux) with `has_aux=True`.
GradFn = Callable[[Any], Any]


class GradientNormPenaltyState(NamedTuple):
  """State of :func:`gradient_norm_penalty`.

  Attributes:
    count: number of updates so far; the step of the ``alpha`` and ``radius``
      schedules.
  """

  count: jax.Array


def _check_hyperparam(value: Any, name: str, accepted: str, ok) -> None:
  if callable(value) or isinstance(value, jax.Array):
    return  # a schedule, or a value injected by optax.inject_hyperparams
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(
        f"{name} must be a float or an optax schedule, got {value!r}"
        f" of type {type(value).__name__}."
    )
  if not ok(float(value)):
    raise ValueError(f"{name} must be {accepted}, got {value!r}.")


def _compute_dtype(x: jax.Array):
  return jnp.promote_types(x.dtype, jnp.float32)


def _global_norm(tree: Any) -> jax.Array:
  # Summed in float32 (at least) so bfloat16 gradients do not lose the norm.
  return optax.tree.norm(
      jax.tree.map(lambda x: x.astype(_compute_dtype(x)), tree))


def _check_structure(tree: Any, ref: Any, what: str, hint: str = "") -> None:
  if jax.tree.structure(tree) != jax.tree.structure(ref):
    raise ValueError(
        f"{what} must have the structure of the gradients"
        f" {jax.tree.structure(ref)}, got {jax.tree.structure(tree)}.{hint}"
    )


def gradient_norm_penalty(
    alpha: optax.ScalarOrSchedule = 0.8,
    radius: optax.ScalarOrSchedule = 0.05,
    *,
    eps: float = 1e-12,
    has_aux: bool = False,
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

  Args:
    alpha: weight :math:`\alpha \ge 0` of the perturbed gradient: a float or an
      optax schedule. The paper's default 0.8; 1 is SAM.
    radius: finite-difference step :math:`r \ge 0`: a float or an optax
      schedule. The paper uses 0.1 on CIFAR and 0.05 on ImageNet.
    eps: lower bound on :math:`\|g_1\|` in the normalisation, so a tiny
      gradient gives a perturbation of norm at most ``radius``.
    has_aux: whether ``grad_fn`` returns ``(grads, aux)``; ``aux`` is dropped.

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
  _check_hyperparam(alpha, "alpha", "a finite number >= 0",
                    lambda v: 0.0 <= v < float("inf"))
  _check_hyperparam(radius, "radius", "a finite number >= 0",
                    lambda v: 0.0 <= v < float("inf"))
  _check_hyperparam(eps, "eps", "a finite number > 0",
                    lambda v: 0.0 < v < float("inf"))
  if not isinstance(has_aux, bool):
    raise TypeError(
        f"has_aux must be a Python bool (True or False), got {has_aux!r}."
    )
  # A constant alpha = 0 needs no second gradient: skip its cost entirely.
  skip_second_pass = (
      isinstance(alpha, numbers.Real) and not isinstance(alpha, bool)
      and float(alpha) == 0.0
  )

  def init_fn(params):
    del params
    return GradientNormPenaltyState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, *, grad_fn: GradFn | None = None,
                **extra_args):
    del extra_args  # meant for other transforms of the chain
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
    for path, x in jax.tree_util.tree_flatten_with_path(updates)[0]:
      polar_lib.check_float(x, f"gradient leaf {jax.tree_util.keystr(path)}")
    _check_structure(params, updates, "params")

    count_inc = optax.safe_increment(state.count)
    new_state = GradientNormPenaltyState(count=count_inc)
    if skip_second_pass:
      return updates, new_state

    a = alpha(state.count) if callable(alpha) else alpha
    r = radius(state.count) if callable(radius) else radius
    norm = _global_norm(updates)
    # A non-finite g1 would spread NaN into every parameter through the
    # perturbation; evaluated at params instead, g2 stays finite and only the
    # non-finite leaves of g1 make the output non-finite.
    finite = jnp.isfinite(norm)
    scale = r / jnp.maximum(norm, eps)

    def perturb(p, g):
      dtype = _compute_dtype(p)
      moved = p.astype(dtype) + scale * g.astype(dtype)
      return jnp.where(finite, moved, p.astype(dtype)).astype(p.dtype)

    perturbed = jax.tree.map(perturb, params, updates)
    g2 = grad_fn(perturbed)
    if has_aux:
      if not (isinstance(g2, (tuple, list)) and len(g2) == 2):
        raise ValueError(
            "with has_aux=True, grad_fn must return a pair (grads, aux), got"
            f" {type(g2).__name__}."
        )
      g2 = g2[0]  # aux (e.g. BatchNorm statistics of the perturbed pass) dropped
    _check_structure(
        g2, updates, "grad_fn(params)",
        "" if has_aux else " If grad_fn returns (grads, aux), pass has_aux=True.")

    def mix(g1, g2):
      dtype = _compute_dtype(g1)
      # (1 - a) g1 + a g2, not g1 + a (g2 - g1): exact at a = 0 and at a = 1.
      return ((1.0 - a) * g1.astype(dtype)
              + a * g2.astype(dtype)).astype(g1.dtype)

    return jax.tree.map(mix, updates, g2), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
