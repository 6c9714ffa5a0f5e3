"""Gradient norm penalty: a two-point gradient, with SAM as its alpha = 1 case."""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable
from collections.abc import Hashable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_ortho._src import checks
from optax_ortho._src import conv_layout

# params -> grads, or params -> (grads, aux) with `has_aux=True`.
GradFn = Callable[[Any], Any]
# A mapped axis of pmap or shard_map, or several.
AxisName = Hashable


class GradientNormPenaltyState(NamedTuple):
  r"""State of :func:`gradient_norm_penalty`.

  Attributes:
    count: number of updates so far; the step of the ``alpha`` and ``radius``
      schedules and of the ``refresh_every`` cycle.
    orthogonal: with ``refresh_every > 1``, the part of the last exact
      :math:`(g_2 - g_1) / r` orthogonal to :math:`g_1`, a pytree like the
      parameters (float32 at least); ``()`` otherwise.
    parallel: with ``refresh_every > 1``, the scalar
      :math:`\langle g_2 - g_1, g_1 / \|g_1\| \rangle / r` of the last exact
      step; ``()`` otherwise.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
  orthogonal: Any = ()
  parallel: Any = ()


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


def _perturb(params: Any, unit: Any, radius: float | jax.Array, finite: jax.Array) -> Any:
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


def _mean_over(tree: Any, axis_name: AxisName | None) -> Any:
  """The mean over the devices of `axis_name` (pmap, shard_map); `tree` without one."""
  return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def _in_compute_dtype(tree: Any, like: Any) -> Any:
  return jax.tree.map(lambda g, u: g.astype(_compute_dtype(u)), tree, like)


def _zeroed(unit: Any, finite: jax.Array) -> Any:
  return jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), unit)


def _split_difference(g1: Any, g2: Any, unit: Any, finite: jax.Array,
                      radius: jax.Array) -> tuple[Any, jax.Array]:
  """(w, s) with (g2 - g1) / radius = s * unit + w and w orthogonal to unit.

  To first order g2 - g1 = radius * H unit (H the Hessian), so both parts are
  independent of radius and of |g1|: a reused step rescales them by its own
  radius only. radius = 0 (g2 = g1) keeps nothing.
  """
  r = jnp.asarray(radius, jnp.float32)
  inv_r = jnp.where(r > 0, 1.0 / jnp.where(r > 0, r, 1.0), 0.0)
  u = _zeroed(unit, finite)
  d = jax.tree.map(lambda a, b: (b - a.astype(b.dtype)) * inv_r.astype(b.dtype), g1, g2)
  # Sums of products, not vdot: a contraction over a sharded axis of an
  # Explicit mesh would need its output sharding spelled out.
  s = sum((jnp.sum(x * y) for x, y in zip(jax.tree.leaves(d), jax.tree.leaves(u))),
          jnp.zeros([], jnp.float32))
  w = jax.tree.map(lambda x, y: x - s.astype(x.dtype) * y, d, u)
  return w, s


def _reused_second_gradient(g1: Any, unit: Any, finite: jax.Array, radius: jax.Array,
                            state: GradientNormPenaltyState) -> Any:
  """g1 + radius * (parallel * unit + orthogonal): g2 from the last exact step.

  A non-finite g1 has no direction: its NaN then stays in its own leaves.
  """
  def reuse(g, u, w):
    dtype = _compute_dtype(g)
    s = state.parallel.astype(dtype)
    return g.astype(dtype) + radius * (s * u.astype(dtype) + w.astype(dtype))

  return jax.tree.map(reuse, g1, _zeroed(unit, finite), state.orthogonal)


def _kept_if_finite(new: Any, old: Any) -> Any:
  """`new` in the dtypes of `old` if all of it is finite, else `old`: the state stays finite."""
  ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(new)]))
  return jax.tree.map(lambda n, o: jnp.where(ok, n.astype(o.dtype), o), new, old)


def _refresh_or_reuse(refresh_now: jax.Array, refresh: Callable, reuse: Callable) -> Any:
  """`lax.cond(refresh_now, refresh, reuse)`, its convolutions kept fast on CPU.

  XLA's CPU backend runs a kernel-gradient convolution inside a conditional
  branch through a generic loop nest, far slower than the skipped pass
  saves; in channels-last form it keeps its fast kernel. On CPU the refresh
  branch is therefore rewritten channels-last, and where a convolution
  cannot be (inside a loop, ``remat`` or a custom derivative) both branches
  are computed and the result selected. GPU and TPU run the branch as it is.
  """
  def branch(pred, refresh=refresh):
    return jax.lax.cond(pred, refresh, reuse)

  def select(pred):
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), refresh(), reuse())

  channels_last, complete = conv_layout.channels_last_convolutions(refresh)
  cpu = functools.partial(branch, refresh=channels_last) if complete else select
  return jax.lax.platform_dependent(refresh_now, cpu=cpu, default=branch)


def _check_update_args(updates: Any, params: Any, grad_fn: Any,
                       perturbed_grads: Any) -> None:
  if params is None:
    raise ValueError(
        "gradient_norm_penalty needs params: call update(updates, state,"
        " params, grad_fn=...), params=None is not accepted."
    )
  if grad_fn is None and perturbed_grads is None:
    raise ValueError(
        "gradient_norm_penalty needs the keyword argument grad_fn (a function"
        " params -> gradient of the loss on the current batch) or"
        " perturbed_grads (that gradient at gnp_perturbed_params(...)), got"
        " neither. With a Flax linen TrainState call"
        " optax_ortho.apply_gradients(state, grads, grad_fn=grad_fn): Flax's"
        " own state.apply_gradients(grads=..., grad_fn=...) treats keywords"
        " as fields of the state and does not pass them to the optimizer."
        " With nnx call optimizer.update(model, grads, grad_fn=grad_fn)."
    )
  if grad_fn is not None and perturbed_grads is not None:
    raise ValueError(
        "gradient_norm_penalty takes grad_fn or perturbed_grads, not both.")
  if grad_fn is not None and not callable(grad_fn):
    raise TypeError(
        f"grad_fn must be callable (params -> grads), got {grad_fn!r} of"
        f" type {type(grad_fn).__name__}; pass precomputed gradients as"
        " perturbed_grads."
    )
  checks.float_leaves(updates, "updates")
  checks.trees_match(params, updates, "params", "updates")
  if perturbed_grads is not None:
    checks.trees_match(perturbed_grads, updates, "perturbed_grads", "updates")
    checks.float_leaves(perturbed_grads, "perturbed_grads")


def _check_state(state: Any, updates: Any, buffered: bool) -> None:
  if not isinstance(state, GradientNormPenaltyState):
    raise TypeError(
        "gradient_norm_penalty's update needs the GradientNormPenaltyState its"
        f" init returned, got {type(state).__name__}."
    )
  holds = bool(jax.tree.leaves(state.parallel))
  if holds != buffered:
    raise ValueError(
        "the state of gradient_norm_penalty "
        + ("holds a stored direction (it was made with refresh_every > 1) but"
           " this transform has refresh_every=1." if holds else
           "holds no stored direction (it was made with refresh_every=1) but"
           " this transform has refresh_every > 1.")
    )
  if buffered:
    checks.trees_match(state.orthogonal, updates, "state.orthogonal", "updates")


def gnp_perturbed_params(grads: Any, params: Any, radius: float | jax.Array, *,
                         eps: float = 1e-12) -> Any:
  r"""Where ``gradient_norm_penalty`` takes its second gradient: :math:`\theta + r g / \|g\|`.

  For programs whose gradient step and update step are separate jitted
  functions: the gradient step computes ``grads`` and the gradient at this
  point, and passes that gradient (an array pytree, not a function) to the
  update as ``perturbed_grads``. A zero or non-finite ``grads`` gives
  ``params`` unchanged. Under ``pmap``/``shard_map`` pass the gradient averaged
  over the devices (the global :math:`g`).

  Args:
    grads: the gradient :math:`g` of the loss at ``params`` (the ``updates``
      the transform will receive).
    params: the parameters.
    radius: the transform's ``radius`` :math:`r` at this step (evaluate a
      schedule at the step yourself).
    eps: the transform's ``eps``.

  Returns:
    A pytree like ``params``, in its dtypes.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_ortho
    >>> def loss_fn(params, x):
    ...   return jnp.sum((x @ params["w"]) ** 2)
    >>> params, x = {"w": jnp.ones((3, 2))}, jnp.ones((4, 3))
    >>> tx = optax.chain(optax_ortho.gradient_norm_penalty(0.8, 0.05), optax.sgd(0.01))
    >>> state = tx.init(params)
    >>> @jax.jit
    ... def gradient_step(params, x):
    ...   grads = jax.grad(loss_fn)(params, x)
    ...   at = optax_ortho.gnp_perturbed_params(grads, params, 0.05)
    ...   return grads, jax.grad(loss_fn)(at, x)
    >>> @jax.jit
    ... def update_step(params, state, grads, perturbed_grads):
    ...   updates, state = tx.update(grads, state, params, perturbed_grads=perturbed_grads)
    ...   return optax.apply_updates(params, updates), state
    >>> new_params, state = update_step(params, state, *gradient_step(params, x))
    >>> bool(loss_fn(new_params, x) < loss_fn(params, x))
    True
  """
  checks.float_leaves(grads, "grads")
  checks.trees_match(params, grads, "params", "grads")
  checks.hyperparam(radius, "radius", "a finite number >= 0", lambda v: v >= 0.0,
                    schedule=False)
  if not jax.tree.leaves(grads):
    return params
  unit, finite = _unit(grads, eps)
  return _perturb(params, unit, radius, finite)


def gradient_norm_penalty(
    alpha: optax.ScalarOrSchedule = 0.8,
    radius: optax.ScalarOrSchedule = 0.05,
    *,
    eps: float = 1e-12,
    has_aux: bool = False,
    normalize_g1: bool = False,
    refresh_every: int = 1,
    axis_name: AxisName | None = None,
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

  Split steps: when the gradient step and the update step are separate jitted
  functions, compute :math:`g_2` in the gradient step at
  :func:`gnp_perturbed_params` and pass it as ``perturbed_grads`` (an array
  pytree) instead of ``grad_fn``.

  Data parallel: under ``pmap`` or ``shard_map`` pass ``axis_name``; the second
  gradient, computed on each device's shard of the batch, is then averaged
  over that axis, so 8 devices give what 1 device gives on the global batch.
  ``updates`` must already be the averaged gradient (as every data-parallel
  program hands the optimizer): the perturbation follows it. Under ``jit``
  with sharded global arrays nothing is needed.

  ``refresh_every=k`` (LookSAM, Liu et al.): steps 0, k, 2k, ... compute
  :math:`g_2` and are exact; they store the part of :math:`(g_2 - g_1) / r`
  orthogonal to :math:`g_1` (one parameter-sized buffer) and its component
  along :math:`g_1 / \|g_1\|` (a scalar). The steps between call no
  ``grad_fn`` and use :math:`g_2 \approx g_1 + r_t (s\, g_1 / \|g_1\| + w)`
  with the current :math:`g_1` and radius: about one forward-backward pass per
  step instead of two (docs/methods/gnp.md derives it). The branch is chosen
  inside the jitted step by ``lax.cond``.

  A zero gradient gives no perturbation (:math:`g_2` is the gradient at
  ``params``); so does a non-finite :math:`\|g_1\|`, so a NaN leaf of
  :math:`g_1` gives NaN in that leaf of the output, not in every leaf. The
  state (a step counter, and the stored direction, kept when a step is not
  finite) cannot be poisoned by a NaN step. Computation is in
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
    refresh_every: compute :math:`g_2` every this many steps (a positive
      int); 1 computes it at every step. LookSAM uses 5. Under
      ``optax.inject_hyperparams`` it is a hyperparameter of the state (and the
      state keeps the buffer) unless listed in ``static_args``.
    axis_name: the ``pmap``/``shard_map`` axis (or axes) over which the second
      gradient is averaged; None when there is none (one device, or ``jit``
      with sharded arrays).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``params`` and the keyword-only ``grad_fn`` (or ``perturbed_grads``).

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

    Liu et al., `Towards Efficient and Scalable Sharpness-Aware Minimization
    <https://arxiv.org/abs/2203.02714>`_, CVPR 2022 (LookSAM).
  """
  checks.hyperparam(alpha, "alpha", "a finite number >= 0",
                    lambda v: v >= 0.0)
  checks.hyperparam(radius, "radius", "a finite number >= 0",
                    lambda v: v >= 0.0)
  checks.hyperparam(eps, "eps", "a finite number > 0", lambda v: v > 0.0,
                    schedule=False)
  checks.boolean(has_aux, "has_aux")
  checks.boolean(normalize_g1, "normalize_g1")
  if isinstance(refresh_every, (jax.Array, jax.core.Tracer)):
    # Injected by optax.inject_hyperparams: the period is read at run time,
    # so the state keeps the buffer whatever its value.
    if not jnp.issubdtype(refresh_every.dtype, jnp.integer) or refresh_every.shape:
      raise TypeError(
          f"refresh_every must be a positive int, got an array of {refresh_every.dtype}"
          f"{list(refresh_every.shape)}.")
  else:
    checks.positive_int(refresh_every, "refresh_every")
  buffered = not (isinstance(refresh_every, int) and refresh_every == 1)
  if axis_name is not None and not isinstance(axis_name, Hashable):
    raise TypeError(
        f"axis_name must be None or the name of a pmap/shard_map axis, got {axis_name!r}.")
  # A constant alpha = 0 needs no second gradient: skip its cost entirely.
  skip_second_pass = (
      isinstance(alpha, numbers.Real) and not isinstance(alpha, bool)
      and float(alpha) == 0.0 and not normalize_g1
  )

  def init_fn(params):
    count = jnp.zeros([], jnp.int32)
    if not buffered:
      return GradientNormPenaltyState(count=count)
    orthogonal = jax.tree.map(lambda p: jnp.zeros_like(p, _compute_dtype(p)), params)
    return GradientNormPenaltyState(count, orthogonal, jnp.zeros([], jnp.float32))

  def update_fn(updates, state, params=None, *, grad_fn: GradFn | None = None,
                perturbed_grads: Any = None, **extra_args):
    del extra_args  # meant for other transforms of the chain
    _check_update_args(updates, params, grad_fn, perturbed_grads)
    _check_state(state, updates, buffered)
    new_state = state._replace(count=optax.safe_increment(state.count))
    if skip_second_pass or not jax.tree.leaves(updates):
      return updates, new_state
    a = alpha(state.count) if callable(alpha) else alpha
    r = radius(state.count) if callable(radius) else radius

    # Each branch computes its own direction and mix, so the one that runs
    # is a single fused pass over the gradients and nothing is materialised
    # for the other.
    def mixed(g2, unit, finite):
      if normalize_g1:
        # Non-finite g1: keep it as is, so its NaN stays in its own leaves.
        g1 = jax.tree.map(
            lambda u, g: jnp.where(finite, u, g.astype(u.dtype)), unit, updates)
      else:
        g1 = updates
      return _mix(g1, g2, a, updates)

    def exact_second_gradient(unit, finite):
      if perturbed_grads is None:
        g2 = _second_gradient(grad_fn, _perturb(params, unit, r, finite), updates, has_aux)
      else:
        g2 = perturbed_grads
      return _in_compute_dtype(_mean_over(g2, axis_name), updates)

    def refresh():
      unit, finite = _unit(updates, eps)
      g2 = exact_second_gradient(unit, finite)
      if not buffered:
        return mixed(g2, unit, finite), ()
      stored = _split_difference(updates, g2, unit, finite, r)
      return mixed(g2, unit, finite), _kept_if_finite(stored, (state.orthogonal, state.parallel))

    def reuse():
      unit, finite = _unit(updates, eps)
      g2 = _reused_second_gradient(updates, unit, finite, r, state)
      return mixed(g2, unit, finite), (state.orthogonal, state.parallel)

    if not buffered:
      return refresh()[0], new_state
    out, (orthogonal, parallel) = _refresh_or_reuse(
        state.count % jnp.maximum(refresh_every, 1) == 0, refresh, reuse)
    return out, new_state._replace(orthogonal=orthogonal, parallel=parallel)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
