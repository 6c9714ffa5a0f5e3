"""Orthonormalised gradients: each layer's gradient matrix replaced by U V^T."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_ortho._src import checks
from optax_ortho._src import layer_parallel
from optax_ortho._src import matrix_view as mv
from optax_ortho._src import polar as polar_lib
from optax_ortho._src.stacks import group_matrices
from optax_ortho._src.stacks import split_stack
from optax_ortho._src.stacks import stack_parts


def _check_eps(eps: Any) -> None:
  if eps is not None:
    checks.hyperparam(eps, "eps", "in [0, 1) or None", lambda v: 0.0 <= v < 1.0)


def _alias(
    inner: optax.GradientTransformationExtraArgs, *, float16_moments: bool
) -> optax.GradientTransformationExtraArgs:
  """`inner` with its inputs checked, optionally run in float32 on float16 leaves.

  Checked at trace time: every gradient leaf is a float array, and `params`
  (when given) has the structure and shapes of the gradients, so a mismatch
  names its leaf instead of surfacing as a broadcasting error.

  ``float16_moments``: Adam's second moment squares the update. An
  orthonormalised float16 update has entries near 1/sqrt(n), whose squares
  times (1 - b2) fall below float16's smallest subnormal (6e-8) and flush to
  zero, and Adam's eps (1e-8) is zero in float16 as well: the first step
  divided by zero (inf). So float16 leaves are computed, and their moments
  kept, in float32; the updates keep the leaves' dtype. bfloat16 has
  float32's exponent range and keeps its dtype, as in `optax.adam`.
  """

  def up(tree):
    if not float16_moments:
      return tree
    return jax.tree.map(
        lambda x: x.astype(jnp.float32) if x.dtype == jnp.float16 else x, tree)

  def init_fn(params):
    return inner.init(up(params))

  def update_fn(updates, state, params=None, **extra_args):
    checks.float_leaves(updates, "updates")
    if params is not None:
      checks.trees_match(params, updates, "params", "updates")
    _check_moments(state, updates)
    new, state = inner.update(
        up(updates), state, None if params is None else up(params),
        **extra_args)
    return jax.tree.map(lambda u, g: u.astype(g.dtype), new, updates), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_moments(state: Any, updates: Any) -> None:
  """Every part of `state` with the gradients' tree (optax's moments, a
  momentum trace) has their shapes: a state restored for other parameters
  fails naming its leaf instead of broadcasting."""
  if jax.tree_util.treedef_is_leaf(jax.tree.structure(updates)):
    return
  parts = jax.tree_util.tree_flatten_with_path(
      state, is_leaf=lambda x: checks.same_structure(x, updates))[0]
  for path, part in parts:
    if checks.same_structure(part, updates):
      checks.trees_match(part, updates, f"state{jax.tree_util.keystr(path)}",
                         "updates")


class OrthonormalizeState(NamedTuple):
  """State of `orthonormalize("auto")`.

  Attributes:
    use_gram: one flag per gradient matrix (in the order of the shape groups):
      try the Gram route first at the next step. Set from this step's
      eigenvalues or singular values.
  """

  use_gram: jax.Array


def _split_flags(use_gram: jax.Array, sizes: list[int]) -> list[jax.Array]:
  if use_gram.shape != (sum(sizes),):
    raise ValueError(
        "orthonormalize('auto') state does not match the gradients: the state"
        f" holds {use_gram.shape} flags, the gradients have {sum(sizes)}"
        " matrices (was init called with parameters of another structure?)."
    )
  return split_stack(use_gram, sizes) if sizes else []


def _like(x: jax.Array, ref: jax.Array) -> jax.Array:
  """`x` with `ref`'s sharding where a mesh is set, so the state type is stable."""
  sharding = getattr(jax.typeof(ref), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if sharding is None or mesh is None or mesh.empty or not any(
      t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    return x
  # The sharding itself, not its bare spec: it carries the mesh, so this works
  # without a `jax.set_mesh` context (arrays placed with `jax.device_put`).
  return jax.sharding.reshard(x, sharding)


def _auto_factors(parts, use_gram, eps, parallel, mesh):
  """`"auto"`'s factors (one list of parts per group) and next flags."""
  if parallel == "layers" and layer_parallel.spread_devices(
      [x for p in parts for x in p], mesh) > 1:
    qs, use_gram = layer_parallel.polar_groups(
        [stack_parts(p) for p in parts], "auto", eps=eps, ns_steps=1, mesh=mesh,
        use_gram=use_gram)
    return [split_stack(q, [x.shape[0] for x in p]) for q, p in zip(qs, parts)], use_gram
  # The parts themselves, not their stack: the CPU route stacks them as its
  # routes need (narrow ones zero-padded). ("layers" on one device is this
  # replicated computation, exactly.)
  found = polar_lib.auto_polar_groups(parts, use_gram, eps) if parts else []
  return [f.q for f in found], [f.use_gram for f in found]


def _factors(parts, method, eps, ns_steps, parallel, mesh):
  """The factors of a stateless method, one list of parts per group."""
  stacks = [stack_parts(p) for p in parts]
  if parallel == "layers":
    qs, _ = layer_parallel.polar_groups(
        stacks, method, eps=eps, ns_steps=ns_steps, mesh=mesh)
  else:
    qs = [polar_lib.polar_stack(a, method, eps=eps, ns_steps=ns_steps) for a in stacks]
  return [split_stack(q, [x.shape[0] for x in p]) for q, p in zip(qs, parts)]


def orthonormalize(
    method: polar_lib.PolarMethod = "auto",
    *,
    dimension_numbers: Any | Callable[[Any], Any] | None = None,
    eps: float | None = None,
    ns_steps: int = 5,
    parallel: layer_parallel.Parallel = "replicated",
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
) -> optax.GradientTransformation:
  r"""Replaces each layer's gradient matrix by its polar factor :math:`U V^\top`.

  A leaf of shape ``(..., out)`` is viewed as a matrix with the last axis as
  components and every other axis flattened into the reduction axis (Flax
  ``Dense`` kernels ``(in, out)`` and ``Conv`` kernels ``(kh, kw, in, out)``).
  Leaves with ``ndim < 2`` (biases, norm scales) pass through unchanged. Its
  gradient :math:`G = U \Sigma V^\top` becomes :math:`U V^\top`: every singular
  value is set to one (zero ones stay zero), so every direction of the layer
  moves at the same rate.

  Matrices of the same shape, across leaves, are stacked and orthonormalised in
  one batched call, so the cost grows with the number of distinct shapes, not
  of layers. Computation is in float32; each leaf keeps its dtype.

  A matrix with an `Inf` or `NaN` entry comes back all NaN without reaching
  a LAPACK call; the other matrices and leaves are unaffected. Empty and
  `None` leaves pass through (`docs/reliability.md`).

  Apply it to the raw gradient, before momentum and weight decay, as the paper
  does (or use :func:`orthogonal_sgd` / :func:`orthogonal_adam`).

  Args:
    method: how to compute the polar factor: `"auto"` (exact, the fastest
      exact route per matrix, remembered in the state), `"svd"`, `"gram"`,
      `"newton_schulz"` or `"polar_express"` (see `optax_ortho.polar`).
    dimension_numbers: ``None`` for the default view; or a pytree matching the
      gradients, or a callable from gradients to such a pytree, whose leaves
      are ``optax.contrib.MuonDimensionNumbers`` (axes of the matrix view; other
      axes are batch axes) or ``None`` (pass the leaf through).
    eps: relative singular-value cutoff of the exact methods: singular values
      at or below ``eps`` times the largest count as zero. Default
      ``max(rows, cols) * finfo(float32).eps``.
    ns_steps: iterations of ``"newton_schulz"`` and ``"polar_express"``.
    parallel: ``"replicated"`` (every device computes every polar factor) or
      ``"layers"`` (on a mesh, each factor computed once, on one device, and
      brought back to every device: the same numbers for about ``1/D`` of the
      work per device).
    mesh: for ``parallel="layers"``, the mesh to spread over; default the
      mesh set with ``jax.set_mesh``, else the mesh of Explicit-sharded
      gradients.

  Returns:
    An ``optax.GradientTransformation``; its state is `OrthonormalizeState`
    (one route flag per gradient matrix) for `"auto"`, empty otherwise.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import optax_ortho
    >>> params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    >>> tx = optax.chain(optax_ortho.orthonormalize(), optax.sgd(0.005, momentum=0.9))
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.arange(12.0).reshape(4, 3), "b": jnp.ones(3)}
    >>> updates, state = jax.jit(tx.update)(grads, state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Tuddenham, Prügel-Bennett, Hare, `Orthogonalising gradients to speed up
    neural network optimisation <https://arxiv.org/abs/2202.07052>`_, 2022.
  """
  polar_lib.check_method(method)
  checks.positive_int(ns_steps, "ns_steps", static_arg=True)
  _check_eps(eps)
  layer_parallel.check_parallel(parallel, mesh)

  stateful = method == "auto"

  def init_fn(params):
    if not stateful:
      return optax.EmptyState()
    leaves = jax.tree.leaves(params)
    groups, views = group_matrices(leaves, mv.resolve_dimension_numbers(
        params, dimension_numbers))
    total = sum(views[i].batch for idx in groups.values() for i in idx)
    # Every matrix tries the Gram route first; the first step corrects this.
    return OrthonormalizeState(use_gram=jnp.ones((total,), bool))

  def update_fn(updates, state, params=None):
    del params
    checks.float_leaves(updates, "updates")
    leaves, treedef = jax.tree.flatten(updates)
    groups, views = group_matrices(
        leaves, mv.resolve_dimension_numbers(updates, dimension_numbers))
    parts = [[mv.to_stack(leaves[i], views[i], compute) for i in idx]
             for (_, _, compute), idx in groups.items()]
    if stateful and not isinstance(state, OrthonormalizeState):
      raise TypeError(
          "orthonormalize('auto').update expects the OrthonormalizeState that"
          f" its init returns (tx.init(params)), got {type(state).__name__}:"
          f" {state!r:.200}.")
    if stateful:
      use_gram = _split_flags(state.use_gram,
                              [sum(x.shape[0] for x in p) for p in parts])
      qs, use_gram = _auto_factors(parts, use_gram, eps, parallel, mesh)
      state = OrthonormalizeState(use_gram=_like(
          jnp.concatenate(use_gram) if use_gram else state.use_gram, state.use_gram))
    else:
      qs = _factors(parts, method, eps, ns_steps, parallel, mesh)
    out = list(leaves)
    for idx, q in zip(groups.values(), qs):
      for i, qi in zip(idx, q):
        out[i] = mv.from_stack(qi, views[i], leaves[i])
    return jax.tree.unflatten(treedef, out), state

  return optax.GradientTransformation(init_fn, update_fn)


def _check_lr(learning_rate: Any) -> None:
  checks.hyperparam(learning_rate, "learning_rate",
                    "> 0 (or an optax schedule)", lambda v: v > 0.0)


def _check_decay(weight_decay: Any) -> None:
  checks.hyperparam(weight_decay, "weight_decay", ">= 0 and finite",
                    lambda v: v >= 0.0, schedule=False)


def orthogonal_sgd(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float | None = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    *,
    method: polar_lib.PolarMethod = "auto",
    dimension_numbers: Any | Callable[[Any], Any] | None = None,
) -> optax.GradientTransformation:
  """SGD with momentum on orthonormalised gradients (Tuddenham et al.).

  The raw gradient is orthonormalised first, then weight decay is added
  (``weight_decay * params``, PyTorch's coupled form) and momentum applied:
  ``chain(orthonormalize(method), add_decayed_weights(weight_decay),
  sgd(learning_rate, momentum, nesterov))``.

  Python-number hyperparameters are checked when the optimizer is built
  (`ValueError`/`TypeError` naming the argument, its range and the value).

  Args:
    learning_rate: a float > 0 or an optax schedule.
    momentum: momentum decay in [0, 1); ``0`` or ``None`` for plain SGD.
    nesterov: Nesterov momentum (a bool).
    weight_decay: coupled L2 weight decay, >= 0.
    method: polar method (default ``"auto"``: exact, fastest route per matrix).
    dimension_numbers: see :func:`orthonormalize`.

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_ortho
    >>> params = {"w": jnp.ones((4, 3))}
    >>> tx = optax_ortho.orthogonal_sgd(0.005, momentum=0.9)
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.eye(4, 3)}, state, params)
  """
  _check_lr(learning_rate)
  if momentum is not None:  # optax.sgd's None: no momentum state
    checks.hyperparam(momentum, "momentum", "in [0, 1) or None",
                      lambda v: 0.0 <= v < 1.0, schedule=False)
  checks.boolean(nesterov, "nesterov")
  _check_decay(weight_decay)
  polar_lib.check_method(method)
  return _alias(optax.chain(
      orthonormalize(method, dimension_numbers=dimension_numbers),
      optax.add_decayed_weights(weight_decay),
      optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
  ), float16_moments=False)


def orthogonal_adam(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    method: polar_lib.PolarMethod = "auto",
    dimension_numbers: Any | Callable[[Any], Any] | None = None,
) -> optax.GradientTransformation:
  """Adam on orthonormalised gradients (Tuddenham et al.).

  ``chain(orthonormalize(method), add_decayed_weights(weight_decay),
  adam(learning_rate, b1, b2, eps))``: the decay is added to the
  orthonormalised gradient before Adam's moments (PyTorch's
  ``Adam(weight_decay=...)``). For decoupled decay chain ``orthonormalize``
  with ``optax.adamw`` instead.

  float16 leaves are computed, and their moments kept, in float32: Adam's
  second moment of an orthonormalised float16 update underflows to zero in
  float16 and the first step would be `inf` (see `docs/reliability.md`). The
  updates keep the leaves' dtype; bfloat16 moments stay bfloat16, as in
  `optax.adam`. Python-number hyperparameters are checked when the optimizer
  is built.

  Args:
    learning_rate: a float > 0 or an optax schedule.
    b1: first-moment decay, in [0, 1).
    b2: second-moment decay, in [0, 1).
    eps: Adam's denominator epsilon, >= 0.
    weight_decay: coupled L2 weight decay, >= 0.
    method: polar method (default ``"auto"``).
    dimension_numbers: see :func:`orthonormalize`.

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import jax.numpy as jnp, optax_ortho
    >>> params = {"w": jnp.ones((4, 3))}
    >>> tx = optax_ortho.orthogonal_adam(1e-3)
    >>> updates, state = tx.update({"w": jnp.eye(4, 3)}, tx.init(params), params)
  """
  _check_lr(learning_rate)
  for value, name in ((b1, "b1"), (b2, "b2")):
    checks.hyperparam(value, name, "in [0, 1)", lambda v: 0.0 <= v < 1.0,
                      schedule=False)
  checks.hyperparam(eps, "eps", ">= 0", lambda v: v >= 0.0, schedule=False)
  _check_decay(weight_decay)
  polar_lib.check_method(method)
  return _alias(optax.chain(
      orthonormalize(method, dimension_numbers=dimension_numbers),
      optax.add_decayed_weights(weight_decay),
      optax.adam(learning_rate, b1=b1, b2=b2, eps=eps),
  ), float16_moments=True)
