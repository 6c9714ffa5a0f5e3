"""Orthonormalised gradients: each layer's gradient matrix replaced by U V^T."""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_ortho._src import layer_parallel
from optax_ortho._src import matrix_view as mv
from optax_ortho._src import polar as polar_lib


def _check_gradients(updates: Any) -> None:
  for path, x in jax.tree_util.tree_flatten_with_path(updates)[0]:
    polar_lib.check_float(x, f"gradient leaf {jax.tree_util.keystr(path)}")


class OrthonormalizeState(NamedTuple):
  """State of `orthonormalize("auto")`.

  Attributes:
    use_gram: one flag per gradient matrix (in the order of the shape groups):
      try the Gram route first at the next step. Set from this step's
      eigenvalues or singular values.
  """

  use_gram: jax.Array


def _group(leaves, dims):
  """Same-shaped matrices grouped: {(rows, cols, compute dtype): leaf indices}."""
  views: dict[int, mv.MatrixView] = {}
  groups: dict[tuple[int, int, Any], list[int]] = collections.defaultdict(list)
  for i, (x, d) in enumerate(zip(leaves, dims)):
    if d is None or x.size == 0:
      continue
    views[i] = mv.matrix_view(x, d)
    compute = jnp.promote_types(x.dtype, jnp.float32)
    groups[(views[i].rows, views[i].cols, compute)].append(i)
  return groups, views


def _split_flags(use_gram: jax.Array, sizes: list[int]) -> list[jax.Array]:
  if use_gram.shape != (sum(sizes),):
    raise ValueError(
        "orthonormalize('auto') state does not match the gradients: the state"
        f" holds {use_gram.shape} flags, the gradients have {sum(sizes)}"
        " matrices (was init called with parameters of another structure?)."
    )
  bounds = list(itertools.accumulate(sizes))[:-1]
  return list(jnp.split(use_gram, bounds)) if sizes else []


def _like(x: jax.Array, ref: jax.Array) -> jax.Array:
  """`x` with `ref`'s sharding where a mesh is set, so the state type is stable."""
  sharding = getattr(jax.typeof(ref), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if sharding is None or mesh is None or mesh.empty or not any(
      t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    return x
  return jax.sharding.reshard(x, sharding.spec)


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

  Apply it to the raw gradient, before momentum and weight decay, as the paper
  does (or use :func:`orthogonal_sgd` / :func:`orthogonal_adam`).

  Args:
    method: how to compute the polar factor; see `optax_ortho.polar`. The
      default `"auto"` is exact and the fastest exact route per matrix: the
      Gram route (one `eigh` of the smaller Gram matrix) where it is exact,
      the SVD elsewhere, remembered from step to step in the state (a matrix
      whose Gram route failed the check goes straight to the SVD at the next
      step, and back when its singular values allow), so it is never slower
      than `"svd"` beyond one extra `eigh` when a matrix's conditioning
      changes.
    dimension_numbers: ``None`` for the default view; or a pytree matching the
      gradients, or a callable from gradients to such a pytree, whose leaves
      are ``optax.contrib.MuonDimensionNumbers`` (axes of the matrix view; other
      axes are batch axes) or ``None`` (pass the leaf through).
    eps: relative singular-value cutoff of the exact methods: singular values
      at or below ``eps`` times the largest count as zero. Default
      ``max(rows, cols) * finfo(float32).eps``.
    ns_steps: iterations of ``"newton_schulz"`` and ``"polar_express"``.
    parallel: ``"replicated"``: every device computes every polar factor.
      ``"layers"``: on a mesh, every matrix is assigned to one device
      (largest first onto the least loaded device, across all shape groups),
      each factor is computed once and brought back to every device (see
      ``docs/tpu_pods.md``); same numbers, each device does about ``1/D``
      of the decomposition work. Without a mesh it is the replicated mode.
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
    >>> tx = optax.chain(optax_ortho.orthonormalize(), optax.sgd(0.1, momentum=0.9))
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.arange(12.0).reshape(4, 3), "b": jnp.ones(3)}
    >>> updates, state = jax.jit(tx.update)(grads, state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Tuddenham, Prügel-Bennett, Hare, `Orthogonalising gradients to speed up
    neural network optimisation <https://arxiv.org/abs/2202.07052>`_, 2022.
  """
  polar_lib.check_method(method)
  if not isinstance(ns_steps, int) or isinstance(ns_steps, bool) or ns_steps < 1:
    raise ValueError(
        f"ns_steps must be a positive Python int, got {ns_steps!r} (with"
        " optax.inject_hyperparams, pass static_args=('ns_steps',))."
    )
  if isinstance(eps, (int, float)) and not 0.0 <= eps < 1.0:
    raise ValueError(f"eps must be in [0, 1) or None, got {eps!r}.")
  layer_parallel.check_parallel(parallel, mesh)

  stateful = method == "auto"

  def init_fn(params):
    if not stateful:
      return optax.EmptyState()
    leaves = jax.tree.leaves(params)
    groups, views = _group(leaves, mv.resolve_dimension_numbers(
        params, dimension_numbers))
    total = sum(views[i].batch for idx in groups.values() for i in idx)
    # Every matrix tries the Gram route first; the first step corrects this.
    return OrthonormalizeState(use_gram=jnp.ones((total,), bool))

  def update_fn(updates, state, params=None):
    del params
    _check_gradients(updates)
    leaves, treedef = jax.tree.flatten(updates)
    dims = mv.resolve_dimension_numbers(updates, dimension_numbers)
    groups, views = _group(leaves, dims)

    stacks = []
    for (_, _, compute), idx in groups.items():
      parts = [mv.to_stack(leaves[i], views[i], compute) for i in idx]
      stacks.append(jnp.concatenate(parts) if len(parts) > 1 else parts[0])
    flags = None
    if stateful:
      flags = _split_flags(state.use_gram, [a.shape[0] for a in stacks])
    if parallel == "layers":
      qs, flags = layer_parallel.polar_groups(
          stacks, method, eps=eps, ns_steps=ns_steps, mesh=mesh, flags=flags)
    elif flags is not None:
      qs, flags = map(list, zip(*[
          polar_lib.auto_polar_stack(a, f, eps) for a, f in zip(stacks, flags)
      ])) if stacks else ([], [])
    else:
      qs = [polar_lib.polar_stack(a, method, eps=eps, ns_steps=ns_steps)
            for a in stacks]

    out = list(leaves)
    for idx, q in zip(groups.values(), qs):
      start = 0
      for i in idx:
        k = views[i].batch
        out[i] = mv.from_stack(q[start:start + k], views[i], leaves[i])
        start += k
    if stateful:
      new = (jnp.concatenate(flags) if flags else state.use_gram)
      state = OrthonormalizeState(use_gram=_like(new, state.use_gram))
    return jax.tree.unflatten(treedef, out), state

  return optax.GradientTransformation(init_fn, update_fn)


def orthogonal_sgd(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float = 0.9,
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

  Args:
    learning_rate: a float or an optax schedule.
    momentum: momentum decay; ``0`` for plain SGD.
    nesterov: Nesterov momentum.
    weight_decay: coupled L2 weight decay.
    method: polar method (default ``"auto"``: exact, fastest route per matrix).
    dimension_numbers: see :func:`orthonormalize`.

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_ortho
    >>> params = {"w": jnp.ones((4, 3))}
    >>> tx = optax_ortho.orthogonal_sgd(0.1, momentum=0.9)
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.eye(4, 3)}, state, params)
  """
  return optax.chain(
      orthonormalize(method, dimension_numbers=dimension_numbers),
      optax.add_decayed_weights(weight_decay),
      optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
  )


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

  Args:
    learning_rate: a float or an optax schedule.
    b1: first-moment decay.
    b2: second-moment decay.
    eps: Adam's denominator epsilon.
    weight_decay: coupled L2 weight decay.
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
  return optax.chain(
      orthonormalize(method, dimension_numbers=dimension_numbers),
      optax.add_decayed_weights(weight_decay),
      optax.adam(learning_rate, b1=b1, b2=b2, eps=eps),
  )
