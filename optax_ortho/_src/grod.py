"""GrOD: drop the regulariser's component that conflicts with the task gradient."""

from __future__ import annotations

from typing import Any
from typing import Literal
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_ortho._src import checks

Granularity = Literal["global", "per_leaf"]
_GRANULARITIES = ("global", "per_leaf")


class GrodState(NamedTuple):
  """State of :func:`grod`.

  Attributes:
    count: number of updates so far (drives a scheduled ``regularizer_weight``).
    conflict: whether the last update found ``<gJ, gO> < 0`` and projected
      (a scalar for ``granularity="global"``, a pytree of scalars like the
      parameters for ``"per_leaf"``). Non-finite inputs count as no conflict,
      so the state stays finite.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
  conflict: Any


def _compute_dtype(gj: jax.Array, go: jax.Array):
  return jnp.promote_types(jnp.promote_types(gj.dtype, go.dtype), jnp.float32)


def _max_abs(x: jax.Array, dtype) -> jax.Array:
  return jnp.max(jnp.abs(x.astype(dtype)), initial=0.0)


def _safe_scale(max_abs: jax.Array) -> jax.Array:
  ok = jnp.isfinite(max_abs) & (max_abs > 0)
  return jnp.where(ok, max_abs, jnp.ones_like(max_abs))


def _group_sums(values: list[jax.Array], per_leaf: bool) -> list[jax.Array]:
  return values if per_leaf else [sum(values[1:], values[0])]


def _inner_products(gjs, gos, per_leaf: bool):
  """Per group (each leaf, or the whole tree): (scale, |u|^2, <u, gO>, sum |u gO|), u = gJ/scale.

  The common case computes the sums on gJ itself (scale 1). When |gJ|^2
  leaves [2^-60, 2^60] (tiny or huge gradients, or gJ = 0) or a sum is not
  finite, a `lax.cond` recomputes everything on u = gJ / max|gJ|, where
  |u|^2 is in [1, size] whenever gJ != 0, so the projection neither
  underflows nor overflows in float32 (it is scale invariant). The rescaled
  branch only runs in that rare case, so GrOD costs one pass over the
  gradients for the sums and one for the output. sum |u gO| bounds the
  rounding error of <u, gO>.

  Both branches of the `lax.cond` return the tree's common compute dtype (at
  least float32; float64 when any leaf is float64), so they always agree.
  """
  acc = jnp.result_type(jnp.float32, *[
      _compute_dtype(gj, go) for gj, go in zip(gjs, gos)])

  def sums(scales):
    uu, uo, ua = [], [], []
    for gj, go, sc in zip(gjs, gos, scales):
      c = _compute_dtype(gj, go)
      u = gj.astype(c) / sc.astype(c)
      uu.append(jnp.sum(u * u).astype(acc))
      uo.append(jnp.sum(u * go.astype(c)).astype(acc))
      ua.append(jnp.sum(jnp.abs(u * go.astype(c))).astype(acc))
    return (_group_sums(uu, per_leaf), _group_sums(uo, per_leaf),
            _group_sums(ua, per_leaf))

  def expand(group_values):
    return group_values if per_leaf else group_values * len(gjs)

  uu, uo, ua = sums([jnp.ones([], acc)] * len(gjs))
  ok = jnp.all(jnp.stack([
      jnp.isfinite(a) & jnp.isfinite(b) & jnp.isfinite(c) & (a >= 2.0**-60) & (a <= 2.0**60)
      for a, b, c in zip(uu, uo, ua)]))

  def direct():
    return [jnp.ones([], acc)] * len(uu), uu, uo, ua

  def rescaled():
    m = [_max_abs(g, acc) for g in gjs]
    scales = [_safe_scale(x) for x in _group_max(m, per_leaf)]
    return (scales, *sums(expand(scales)))

  scales, uu, uo, ua = jax.lax.cond(ok, direct, rescaled)
  return expand(scales), uu, uo, ua


def _group_max(values: list[jax.Array], per_leaf: bool) -> list[jax.Array]:
  return values if per_leaf else [jnp.max(jnp.stack(values))]


def _group_sizes(leaves: list[jax.Array], per_leaf: bool) -> list[int]:
  sizes = [x.size for x in leaves]
  return sizes if per_leaf else [sum(sizes)]


def _conflict_and_coef(uu: jax.Array, uo: jax.Array, ua: jax.Array, size: int,
                       out_eps: float):
  """(conflict, k): d = gJ + lam (gO - k u); k = 0 without a conflict.

  Rounding is accounted for, so that <d, gJ> >= |gJ|^2 holds for the d that
  is returned, at every ratio |gO| / |gJ| (the error of each element of d,
  about eps |lam gO_i|, summed against gJ, exceeds |gJ|^2 once the ratio
  nears 1 / eps). `slack` bounds two things, both in units of ua = sum |u gO|:
  the rounding of the sum <u, gO> (reductions typically err by about
  sqrt(size) roundings of ua; a wide margin is kept), and the rounding of the
  elements of d in the output's precision, measured against u. The
  projection runs unless <u, gO> >= slack, and k = (<u, gO> - slack) / |u|^2,
  so it errs towards gJ by at most a few roundings of |gO|. NaN or inf sums
  count as "no conflict": the projection is then skipped, so a non-finite
  leaf stays confined to itself (global mode).
  """
  sum_slack = 2.0 * (size ** 0.5 + 2.0) * jnp.finfo(ua.dtype).eps * ua
  slack = sum_slack + 4.0 * out_eps * (ua + jnp.abs(uo) + sum_slack)
  finite = jnp.isfinite(uo) & jnp.isfinite(uu) & jnp.isfinite(ua)
  conflict = (uo < slack) & (uu > 0) & finite
  coef = jnp.where(conflict, (uo - slack) / jnp.where(conflict, uu, 1.0), 0.0)
  return conflict, coef


def _direction(gj, go, scale, coef, lam):
  c = _compute_dtype(gj, go)
  gj32 = gj.astype(c)
  reg = go.astype(c) - coef.astype(c) * (gj32 / scale.astype(c))
  return (gj32 + lam.astype(c) * reg).astype(gj.dtype)


def _check_update_args(updates: Any, regularizer_grads: Any) -> None:
  if regularizer_grads is None:
    raise TypeError(
        "grod's update needs the keyword argument regularizer_grads: the"
        " unweighted gradient of the regulariser, a pytree like updates,"
        " e.g. tx.update(task_grads, state, params,"
        " regularizer_grads=reg_grads) with (task_grads, reg_grads) from"
        " optax_ortho.value_and_grads. With a Flax linen TrainState call"
        " optax_ortho.apply_gradients(state, grads, regularizer_grads=...):"
        " Flax's own state.apply_gradients(grads=..., regularizer_grads=...)"
        " treats keywords as fields of the state and does not pass them to"
        " the optimizer. With nnx call optimizer.update(model, grads,"
        " regularizer_grads=...)."
    )
  checks.trees_match(regularizer_grads, updates, "regularizer_grads", "updates")
  checks.float_leaves(updates, "updates")
  checks.float_leaves(regularizer_grads, "regularizer_grads")


def _check_state(state: Any, updates: Any, granularity: Granularity) -> None:
  if not isinstance(state, GrodState):
    raise TypeError(f"grod's update needs the GrodState its init returned, got"
                    f" {type(state).__name__}.")
  one_flag = jax.tree_util.treedef_is_leaf(jax.tree.structure(state.conflict))
  one_leaf = jax.tree_util.treedef_is_leaf(jax.tree.structure(updates))
  if granularity == "global" and not one_flag or (
      granularity == "per_leaf" and one_flag and not one_leaf):
    made = "global" if one_flag else "per_leaf"
    raise ValueError(
        f"the state of grod was made with granularity={made!r}, this transform"
        f" has granularity={granularity!r}.")
  if granularity == "per_leaf":
    checks.trees_match(state.conflict, updates, "state.conflict", "updates", shapes=False)


def grod(
    regularizer_weight: optax.ScalarOrSchedule = 1.0,
    *,
    granularity: Granularity = "global",
) -> optax.GradientTransformationExtraArgs:
  r"""Gradient orthogonal decomposition of a regularised objective (GrOD).

  For an objective :math:`J(w) + \lambda\,\Omega(w)` with task gradient
  :math:`g_J` (the ``updates``) and regulariser gradient :math:`g_\Omega` (the
  keyword argument ``regularizer_grads``, *unweighted*), the update direction is

  .. math::

    d = \begin{cases}
      g_J + \lambda g_\Omega & \langle g_J, g_\Omega\rangle \ge 0 \\
      g_J + \lambda \left(g_\Omega - \frac{\langle g_J, g_\Omega\rangle}
        {\|g_J\|^2} g_J\right) & \text{otherwise,}
    \end{cases}

  so when the regulariser pulls against the task it only moves the parameters
  orthogonally to :math:`g_J`, and :math:`\langle d, g_J\rangle \ge
  \|g_J\|^2` always holds: a step along ``-d`` never decreases the task loss
  less, to first order, than a plain step on the task alone. :math:`g_J = 0`
  gives :math:`d = \lambda g_\Omega`.

  Place it first in a chain, on raw gradients:
  ``optax.chain(grod(lam), optax.sgd(lr, momentum=0.9))``. Compute both
  gradients in one forward pass with :func:`optax_ortho.value_and_grads`.

  Args:
    regularizer_weight: :math:`\lambda \ge 0`, a float or an optax schedule
      of the step count.
    granularity: ``"global"``: inner products over the whole pytree, as in the
      paper; ``"per_leaf"``: every leaf (layer) decides on its own, and the
      invariant holds per leaf.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` requires the
    keyword argument ``regularizer_grads`` (a pytree like ``updates``) and
    ignores other extra arguments.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_ortho
    >>> source = {"w": jnp.array([1.0, 0.0])}
    >>> params = {"w": jnp.array([2.0, 2.0])}
    >>> def losses(p):
    ...   task = 0.5 * jnp.sum((p["w"] - jnp.array([3.0, 2.0])) ** 2)
    ...   return task, optax_ortho.regularizers.l2_sp(p, source)
    >>> (task, reg), (g_task, g_reg) = optax_ortho.value_and_grads(losses)(params)
    >>> tx = optax.chain(optax_ortho.grod(1.0), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(g_task, state, params, regularizer_grads=g_reg)
    >>> params = optax.apply_updates(params, updates)
    >>> print(params["w"].round(4))
    [2.1 1.8]

  References:
    Xiong, Wan, et al., `GrOD: Deep Learning with Gradients Orthogonal
    Decomposition for Knowledge Transfer, Distillation, and Adversarial
    Training <https://doi.org/10.1145/3530836>`_, ACM TKDD 2022.
  """
  if granularity not in _GRANULARITIES:
    raise ValueError(
        f"granularity must be one of {_GRANULARITIES}, got {granularity!r}."
    )
  checks.hyperparam(
      regularizer_weight, "regularizer_weight",
      "a finite float >= 0 (a negative weight breaks the descent guarantee"
      " <d, gJ> >= |gJ|^2)", lambda v: v >= 0.0)

  def init_fn(params):
    count = jnp.zeros([], jnp.int32)
    if granularity == "global":
      return GrodState(count, jnp.zeros([], jnp.bool_))
    return GrodState(count, jax.tree.map(lambda _: jnp.zeros([], jnp.bool_), params))

  def update_fn(updates, state, params=None, *, regularizer_grads=None,
                **extra_args):
    del params, extra_args
    _check_update_args(updates, regularizer_grads)
    _check_state(state, updates, granularity)
    lam = (regularizer_weight(state.count) if callable(regularizer_weight)
           else regularizer_weight)
    lam = jnp.asarray(lam, jnp.float32)

    leaves_j, treedef = jax.tree.flatten(updates)
    leaves_o = treedef.flatten_up_to(regularizer_grads)
    count = optax.safe_increment(state.count)
    if not leaves_j:
      return updates, GrodState(count, state.conflict)
    per_leaf = granularity == "per_leaf"
    scales, uu, uo, ua = _inner_products(leaves_j, leaves_o, per_leaf)
    out_eps = max(float(jnp.finfo(x.dtype).eps) for x in leaves_j)
    flags, coefs = zip(*[_conflict_and_coef(*sums, size, out_eps) for *sums, size in
                         zip(uu, uo, ua, _group_sizes(leaves_j, per_leaf))])
    if not per_leaf:
      flags, coefs = flags * len(leaves_j), coefs * len(leaves_j)
    new = [_direction(gj, go, sc, cf, lam) for gj, go, sc, cf
           in zip(leaves_j, leaves_o, scales, coefs)]
    conflict = (jax.tree.unflatten(treedef, list(flags)) if per_leaf
                else flags[0])
    return jax.tree.unflatten(treedef, new), GrodState(count, conflict)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
