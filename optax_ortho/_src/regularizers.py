"""The regularisers GrOD is evaluated with: L2-SP, feature distillation, PGD.

Each returns an unweighted scalar loss; the weight is GrOD's
``regularizer_weight`` (or the ``lambda`` of a plain regularised sum).
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from optax_ortho._src import checks


def _f32(x: jax.Array) -> jax.Array:
  return jnp.asarray(x).astype(jnp.promote_types(jnp.result_type(x), jnp.float32))


def l2_sp(
    params: Any,
    source_params: Any,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
) -> jax.Array:
  r"""L2-SP: squared distance to the pre-trained (source) weights.

  .. math::

    \Omega(w) = \frac{\alpha}{2} \|w_S - w_S^0\|^2 + \frac{\beta}{2} \|w_{\bar S}\|^2

  where :math:`w_S` are the leaves of ``params`` whose path also exists in
  ``source_params`` (:math:`w_S^0` their pre-trained values) and
  :math:`w_{\bar S}` the others, such as a new classification head, which get
  plain L2 as in L2-SP. To treat a layer as new (e.g. a head of a different
  size), leave it out of ``source_params``. The gradient of the source part
  is :math:`\alpha (w_S - w_S^0)`. The source is a constant (no gradient).

  Args:
    params: the parameters being fine-tuned.
    source_params: the pre-trained parameters, a pytree whose leaves are
      matched to those of ``params`` by path (``jax.tree_util.keystr``).
    alpha: weight of the distance to the source weights.
    beta: weight of the plain L2 on leaves absent from the source.

  Returns:
    A float32 scalar.

  Raises:
    ValueError: a leaf present in both has different shapes there, or
      ``alpha``/``beta`` is negative or not finite.
    TypeError: a leaf is not a real floating array.

  Example:
    >>> import jax.numpy as jnp, optax_ortho
    >>> source = {"body": jnp.ones(3)}
    >>> params = {"body": jnp.array([1.0, 2.0, 3.0]), "head": jnp.ones(2)}
    >>> print(optax_ortho.regularizers.l2_sp(params, source))
    3.5

  References:
    Li, Grandvalet, Davoine, `Explicit inductive bias for transfer learning
    with convolutional networks <https://arxiv.org/abs/1802.01483>`_, ICML
    2018.
  """
  checks.hyperparam(alpha, "alpha", "a finite float >= 0", lambda v: v >= 0.0,
                    schedule=False)
  checks.hyperparam(beta, "beta", "a finite float >= 0", lambda v: v >= 0.0,
                    schedule=False)
  checks.float_leaves(params, "params")
  checks.float_leaves(source_params, "source_params")
  source = {
      jax.tree_util.keystr(path): leaf
      for path, leaf in jax.tree_util.tree_flatten_with_path(source_params)[0]
  }
  near, far = [], []
  for path, w in jax.tree_util.tree_flatten_with_path(params)[0]:
    key = jax.tree_util.keystr(path)
    if key not in source:
      far.append(jnp.sum(jnp.square(_f32(w))))
      continue
    w0 = source[key]
    if jnp.shape(w0) != jnp.shape(w):
      raise ValueError(
          f"l2_sp: source_params{key} has shape {jnp.shape(w0)} but"
          f" params{key} has shape {jnp.shape(w)}; leave a re-sized layer out"
          " of source_params to regularise it as a new layer (plain L2)."
      )
    w0 = jax.lax.stop_gradient(_f32(w0))
    near.append(jnp.sum(jnp.square(_f32(w) - w0)))
  zero = jnp.zeros([], jnp.float32)
  return 0.5 * (alpha * sum(near, zero) + beta * sum(far, zero))


def feature_distillation(student_features: Any, teacher_features: Any) -> jax.Array:
  r"""Squared distance between the student's and the teacher's feature maps.

  .. math::

    \Omega = \frac{1}{2N} \sum_{\text{maps } j} \sum_{n=1}^N
      \|F_j(x_n; w) - F_j(x_n; w^0)\|^2

  for pytrees of feature maps whose leading axis is the batch (size
  :math:`N`): a per-example sum of squares, averaged over the batch (DELTA's
  feature-map distance without attention weights). The teacher is a constant
  (``stop_gradient``).

  Args:
    student_features: an array or pytree of arrays ``(batch, ...)``.
    teacher_features: the same structure and shapes, e.g. from the
      pre-trained network on the same inputs.

  Returns:
    A float32 scalar.

  Example:
    >>> import jax.numpy as jnp, optax_ortho
    >>> student = jnp.ones((2, 4, 4, 3))
    >>> teacher = jnp.zeros((2, 4, 4, 3))
    >>> print(optax_ortho.regularizers.feature_distillation(student, teacher))
    24.0

  References:
    Li, Xiong, Wang, et al., `DELTA: DEep Learning Transfer using Feature Map
    with Attention for Convolutional Networks <https://arxiv.org/abs/1901.09229>`_,
    ICLR 2019.
  """
  checks.trees_match(teacher_features, student_features, "teacher_features",
                     "student_features")
  checks.float_leaves(student_features, "student_features")
  checks.float_leaves(teacher_features, "teacher_features")
  total = jnp.zeros([], jnp.float32)
  pairs = zip(jax.tree_util.tree_flatten_with_path(student_features)[0],
              jax.tree.leaves(teacher_features))
  for (path, s), t in pairs:
    if jnp.ndim(s) < 1:
      raise ValueError(
          f"feature_distillation: student_features{jax.tree_util.keystr(path)}"
          f" has shape {jnp.shape(s)}; feature maps need the batch as leading"
          " axis."
      )
    if s.shape[0] == 0:
      continue  # an empty batch adds nothing (not 0 / 0)
    diff = _f32(s) - jax.lax.stop_gradient(_f32(t))
    total = total + jnp.sum(jnp.square(diff)) / s.shape[0]
  return 0.5 * total


def _check_nonneg(name: str, value: Any) -> None:
  checks.hyperparam(value, name, "a finite float >= 0", lambda v: v >= 0.0,
                    schedule=False)


def _check_bound(name: str, value: Any) -> None:
  if value is None or isinstance(value, (jax.Array, jax.core.Tracer)):
    return
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"{name} must be a float or None, got {value!r}.")
  if value != value:
    raise ValueError(f"{name} must not be NaN, got {value!r}.")


@functools.partial(jax.jit, static_argnames=("loss_fn", "num_steps"))
def _pgd(loss_fn, params, x, y, epsilon, step_size, num_steps, key,
         clip_min, clip_max):
  grad_x = jax.grad(loss_fn, argnums=1)
  params = jax.lax.stop_gradient(params)
  x = jax.lax.stop_gradient(x)
  compute = jnp.promote_types(x.dtype, jnp.float32)
  x32 = x.astype(compute)
  lo = jnp.clip(x32 - epsilon, clip_min, clip_max)
  hi = jnp.clip(x32 + epsilon, clip_min, clip_max)
  if key is None:
    start = x32
  else:
    start = x32 + jax.random.uniform(key, x.shape, compute, -epsilon, epsilon)
  start = jnp.clip(start, lo, hi)

  def body(_, x_adv):
    g = grad_x(params, x_adv.astype(x.dtype), y)
    return jnp.clip(x_adv + step_size * jnp.sign(g.astype(compute)), lo, hi)

  return jax.lax.fori_loop(0, num_steps, body, start).astype(x.dtype)


def pgd_perturb(
    loss_fn: Callable[[Any, jax.Array, Any], jax.Array],
    params: Any,
    x: jax.Array,
    y: Any,
    *,
    epsilon: float | jax.Array,
    step_size: float | jax.Array,
    num_steps: int,
    key: jax.Array | None,
    clip_min: float | None = None,
    clip_max: float | None = None,
) -> jax.Array:
  r"""Projected gradient ascent on the inputs in an L-infinity ball (PGD).

  Starting from ``x`` plus uniform noise in :math:`[-\epsilon, \epsilon]`
  (no noise when ``key`` is ``None``), takes ``num_steps`` steps
  :math:`x \leftarrow \Pi(x + \text{step\_size}\,\mathrm{sign}(\nabla_x
  \ell))`, where :math:`\Pi` clips to :math:`\|x - x_0\|_\infty \le
  \epsilon` (and to ``[clip_min, clip_max]`` when given). Runs as one jitted
  ``lax.fori_loop``; the result carries no gradient to ``params`` or ``x``.

  Args:
    loss_fn: ``loss_fn(params, x, y) -> scalar``; must be hashable (it is a
      static argument of the jitted loop: define it once, not per step).
    params: model parameters (held fixed).
    x: clean inputs.
    y: labels (anything ``loss_fn`` accepts).
    epsilon: radius of the L-infinity ball.
    step_size: size of each signed-gradient step.
    num_steps: number of ascent steps (a Python int >= 0).
    key: PRNG key for the random start, or ``None`` to start at ``x``.
    clip_min: lower bound of valid inputs, or ``None``.
    clip_max: upper bound of valid inputs, or ``None``.

  Returns:
    Adversarial inputs of ``x``'s shape and dtype.

  Example:
    >>> import jax, jax.numpy as jnp, optax_ortho
    >>> def loss_fn(w, x, y):
    ...   return jnp.mean((x @ w - y) ** 2)
    >>> w, x, y = jnp.ones(3), jnp.full((2, 3), 0.1), jnp.zeros(2)
    >>> x_adv = optax_ortho.regularizers.pgd_perturb(
    ...     loss_fn, w, x, y, epsilon=0.1, step_size=0.05, num_steps=3,
    ...     key=jax.random.key(0))
    >>> print(float(jnp.abs(x_adv - x).max()) <= 0.1 + 1e-7)
    True

  References:
    Madry, Makelov, Schmidt, Tsipras, Vladu, `Towards deep learning models
    resistant to adversarial attacks <https://arxiv.org/abs/1706.06083>`_,
    ICLR 2018.
  """
  if not callable(loss_fn):
    raise TypeError(
        f"loss_fn must be callable (params, x, y) -> scalar, got {loss_fn!r}.")
  _check_nonneg("epsilon", epsilon)
  _check_nonneg("step_size", step_size)
  _check_bound("clip_min", clip_min)
  _check_bound("clip_max", clip_max)
  if (isinstance(clip_min, numbers.Real) and isinstance(clip_max, numbers.Real)
      and clip_min > clip_max):
    raise ValueError(
        f"clip_min must be <= clip_max, got clip_min={clip_min!r} and"
        f" clip_max={clip_max!r}.")
  if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
    raise ValueError(f"num_steps must be a Python int >= 0, got {num_steps!r}.")
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise TypeError(f"x must have a real floating dtype, got {jnp.result_type(x)}.")
  return _pgd(loss_fn, params, jnp.asarray(x), y, epsilon, step_size,
              num_steps, key, clip_min, clip_max)


def adversarial(
    loss_fn: Callable[[Any, jax.Array, Any], jax.Array],
    params: Any,
    x: jax.Array,
    y: Any,
    *,
    epsilon: float | jax.Array,
    step_size: float | jax.Array,
    num_steps: int,
    key: jax.Array | None,
    clip_min: float | None = None,
    clip_max: float | None = None,
) -> jax.Array:
  r"""The adversarial regulariser: the loss on PGD-perturbed inputs.

  :math:`\Omega(w) = \ell(w, \tilde x, y)` with :math:`\tilde x` =
  :func:`pgd_perturb` (held fixed: the gradient flows through ``params``
  only, as in PGD adversarial training). With GrOD, the clean loss is the
  task and this is the regulariser.

  Args:
    loss_fn: ``loss_fn(params, x, y) -> scalar`` (hashable; see
      :func:`pgd_perturb`).
    params: model parameters.
    x: clean inputs.
    y: labels.
    epsilon: see :func:`pgd_perturb`.
    step_size: see :func:`pgd_perturb`.
    num_steps: see :func:`pgd_perturb`.
    key: see :func:`pgd_perturb`.
    clip_min: see :func:`pgd_perturb`.
    clip_max: see :func:`pgd_perturb`.

  Returns:
    A scalar: ``loss_fn(params, x_adv, y)``.

  Example:
    >>> import jax, jax.numpy as jnp, optax_ortho
    >>> def loss_fn(w, x, y):
    ...   return jnp.mean((x @ w - y) ** 2)
    >>> w, x, y = jnp.ones(3), jnp.full((2, 3), 0.1), jnp.zeros(2)
    >>> reg = optax_ortho.regularizers.adversarial(
    ...     loss_fn, w, x, y, epsilon=0.1, step_size=0.1, num_steps=1, key=None)
    >>> print(round(float(reg), 4))  # x moved to 0.2: (3 * 0.2) ** 2
    0.36
  """
  x_adv = pgd_perturb(loss_fn, params, x, y, epsilon=epsilon,
                      step_size=step_size, num_steps=num_steps, key=key,
                      clip_min=clip_min, clip_max=clip_max)
  return loss_fn(params, x_adv, y)
