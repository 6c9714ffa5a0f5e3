"""GAL: gradient adjustment learning (Luo, Wong, Kankanhalli, Zhao).

A small learned adjuster h adds a scaled vector to the gradient of the loss
with respect to the logits, per sample; a descent safeguard keeps the vanilla
gradient where the adjusted one would not decrease that sample's loss; the
parameter gradient is the back-propagation of the chosen logit gradients. The
adjuster lives in the optimizer state and is trained, inside ``update``, to
minimise the Taylor remainder of a small step along the adjusted gradient.
"""

from __future__ import annotations

import functools
import numbers
import warnings
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import Literal
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_ortho._src import checks

Safeguard = Literal["per_sample", "batch"]
_SAFEGUARDS = ("per_sample", "batch")

# Gauss-Legendre nodes and weights on [0, 1] for the integral form of the
# remainder; 3 nodes integrate polynomials of degree 5 exactly.
_GL_X, _GL_W = np.polynomial.legendre.leggauss(3)
_GL_T, _GL_W = (_GL_X + 1.0) / 2.0, _GL_W / 2.0
# A tentative loss difference counts as resolved by float32 arithmetic when it
# is at least this fraction of the losses themselves.
_RESOLVED = 1e-3

_GAL_ARGS = ("gal_logits", "gal_logits_grad", "gal_sample_loss", "gal_vjp")


class GalState(NamedTuple):
  """State of :func:`gal`.

  Attributes:
    count: number of ``update`` calls (drives a ``learning_rate`` schedule).
    adjuster_params: parameters of the adjuster MLP, flattened into one
      float32 vector (``jax.tree.leaves`` order of the Flax params dict:
      ``Dense_0`` bias, ``Dense_0`` kernel, ``Dense_1`` bias, ...).
    adjuster_opt_state: state of the adjuster's optimizer (on that vector).
    key: the PRNG key the adjuster was initialised from.
    accepted_fraction: fraction of the last batch whose adjusted gradient
      passed the safeguard.
    remainder: the adjuster's last training loss, mean of ``|r| / eta~^2``
      (last finite value).
    adjuster_layout: int32 ``[num_outputs, *hidden_sizes]``, the adjuster's
      widths: a state restored into a ``gal`` of another configuration is
      rejected with a message naming what differs.
    adjuster_resets: how often a non-finite adjuster (parameters or optimizer
      state, e.g. from a corrupted checkpoint) was re-initialised from ``key``.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
  adjuster_params: Any
  adjuster_opt_state: optax.OptState
  key: jax.Array
  accepted_fraction: jax.Array
  remainder: jax.Array
  adjuster_layout: jax.Array
  adjuster_resets: jax.Array


class _Adjuster(nn.Module):
  """Linear layers with no activation, as in the authors' code."""

  hidden_sizes: tuple[int, ...]
  num_outputs: int

  @nn.compact
  def __call__(self, z):
    for width in self.hidden_sizes:
      z = nn.Dense(width)(z)
    return nn.Dense(self.num_outputs)(z)


class _Config(NamedTuple):
  """What `gal`'s arguments fix: everything `update` needs besides its inputs."""

  num_outputs: int
  hidden_sizes: tuple[int, ...]
  learning_rate: optax.ScalarOrSchedule
  alpha: float
  beta: float
  safeguard: Safeguard
  axis_name: Any
  adjuster: _Adjuster
  adjuster_optimizer: optax.GradientTransformation
  flatten: Callable[[Any], jax.Array]
  unflatten: Callable[[jax.Array], Any]


def _flat_params(adjuster: nn.Module, num_outputs: int):
  """(tree -> flat vector, flat vector -> tree) for the adjuster's parameters.

  One flat vector is one leaf for the adjuster's optimizer and the finiteness
  check: a handful of fused ops instead of a handful per layer.
  """
  shapes = jax.eval_shape(lambda: adjuster.init(
      jax.random.PRNGKey(0), jnp.zeros((1, num_outputs), jnp.float32))["params"])
  leaves, treedef = jax.tree.flatten(shapes)
  sizes = [int(np.prod(x.shape)) for x in leaves]
  offsets = np.cumsum([0] + sizes)

  def flatten(tree):
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])

  def unflatten(flat):
    return jax.tree.unflatten(treedef, [
        flat[o:o + n].reshape(x.shape)
        for o, n, x in zip(offsets, sizes, leaves)])

  return flatten, unflatten


def _adjust(grad: jax.Array, v: jax.Array, alpha: jax.Array) -> jax.Array:
  """grad + alpha |grad| v / |v| per row; rows with v = 0 are left alone."""
  v_norm = optax.safe_norm(v, 0.0, axis=-1, keepdims=True)
  unit = v / jnp.where(v_norm > 0, v_norm, 1.0)
  return grad + alpha * jnp.linalg.norm(grad, axis=-1, keepdims=True) * unit


def _check_seed(seed: Any) -> None:
  # optax.inject_hyperparams hands numeric defaults over as arrays: an integer
  # array seed is fine, jax.random.PRNGKey traces.
  if (isinstance(seed, bool) or not isinstance(seed, (numbers.Integral, jax.Array))
      or not jnp.issubdtype(jnp.result_type(seed), jnp.integer)):
    raise ValueError(f"seed must be an int, got {seed!r}.")


def _check_args(num_outputs: int, args: dict[str, Any]) -> None:
  missing = [k for k in _GAL_ARGS if args[k] is None]
  if missing:
    raise TypeError(
        f"gal's update needs the keyword arguments {', '.join(_GAL_ARGS)};"
        f" missing: {', '.join(missing)}. Build them with `loss, grads, gal_args ="
        " optax_ortho.gal_value_and_grad(apply_fn, loss_fn)(params, x, y)` and pass"
        " them on: tx.update(grads, state, params, **gal_args); with a Flax linen"
        " TrainState optax_ortho.apply_gradients(state, grads, **gal_args) (Flax's"
        " own TrainState.apply_gradients does not hand them to the optimizer);"
        " with Flax nnx optimizer.update(model, grads, **gal_args) of an"
        " nnx.Optimizer."
    )
  logits, logits_grad = args["gal_logits"], args["gal_logits_grad"]
  if jnp.ndim(logits) != 2:
    raise ValueError(
        "gal_logits must have rank 2, (batch, num_outputs), got shape"
        f" {jnp.shape(logits)}."
    )
  if logits.shape[1] != num_outputs:
    raise ValueError(
        f"gal_logits has {logits.shape[1]} outputs (shape {logits.shape}) but"
        f" gal was built with num_outputs={num_outputs}."
    )
  if jnp.shape(logits_grad) != logits.shape:
    raise ValueError(
        f"gal_logits_grad must have the shape of gal_logits {logits.shape},"
        f" got {jnp.shape(logits_grad)}."
    )
  for name in ("gal_logits", "gal_logits_grad"):
    if not jnp.issubdtype(jnp.result_type(args[name]), jnp.floating):
      raise TypeError(
          f"{name} must have a floating dtype, got {jnp.result_type(args[name])}."
      )
  for name in ("gal_sample_loss", "gal_vjp"):
    if not callable(args[name]):
      raise TypeError(f"{name} must be callable, got {args[name]!r}.")


def _check_state(config: _Config, state: Any) -> None:
  """A GalState of this configuration, at trace time; names what differs."""
  if not isinstance(state, GalState):
    raise TypeError(
        "gal's update needs the GalState that gal(...).init returned (or its"
        f" restored copy), got {type(state).__name__}."
    )
  this = (f"gal(num_outputs={config.num_outputs},"
          f" hidden_sizes={config.hidden_sizes!r})")
  layers = jnp.shape(state.adjuster_layout)[0] - 1
  if layers != len(config.hidden_sizes):
    raise ValueError(
        f"The GalState comes from a gal of other hidden_sizes: its adjuster has"
        f" {layers} hidden layers, {this} has {len(config.hidden_sizes)}."
        f"{_layout_hint(state)} Build gal with the hyperparameters of the state"
        " (checkpoint) or start from a fresh init."
    )
  need = jax.eval_shape(lambda: _fresh_adjuster(config, jax.random.PRNGKey(0)))
  have = jnp.shape(state.adjuster_params)
  if have != need[0].shape:
    raise ValueError(
        f"The GalState comes from a gal of other hidden_sizes or num_outputs: its"
        f" adjuster_params has shape {have}, {this} needs {need[0].shape}."
        f"{_layout_hint(state)} Build gal with the hyperparameters of the state"
        " (checkpoint) or start from a fresh init."
    )
  checks.trees_match(state.adjuster_opt_state, need[1], "GalState.adjuster_opt_state",
                     f"the state of this gal's adjuster_optimizer ({this})")


def _layout_hint(state: GalState) -> str:
  """' It was built with num_outputs=..., hidden_sizes=(...).' where that can be read."""
  if isinstance(state.adjuster_layout, jax.core.Tracer):
    return ""
  widths = [int(w) for w in np.asarray(state.adjuster_layout)]
  return f" It was built with num_outputs={widths[0]}, hidden_sizes={tuple(widths[1:])!r}."


def _backprop(config: _Config, gal_vjp: Callable, chosen: jax.Array,
              logits: jax.Array, updates: Any) -> Any:
  """The parameter gradient of the chosen logit gradients, in `updates`' dtypes.

  With an `axis_name` it is averaged over the devices: the mean loss over the
  global batch is the mean of the devices' mean losses (equal shards).
  """
  new_updates = gal_vjp(chosen.astype(logits.dtype))
  checks.trees_match(new_updates, updates, "gal_vjp(logit gradients)", "updates")
  checks.float_leaves(new_updates, "gal_vjp(logit gradients)")
  new_updates = _mean_over_devices(config, logits, new_updates, gradients=True)
  return jax.tree.map(lambda n, u: n.astype(u.dtype), new_updates, updates)


def _varies(x: Any, axis_name: Any) -> bool:
  """Whether `x`'s type says it differs along `axis_name` (shard_map tracks it)."""
  aval = jax.typeof(x)
  varying = getattr(aval, "vma", None)
  if varying is None:
    varying = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
  varying = varying or frozenset()
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  return any(name in varying for name in names)


def _mean_over_devices(config: _Config, logits: jax.Array, tree: Any, *,
                       gradients: bool = False) -> Any:
  """The mean over the mapped axis of per-device values computed from `logits`.

  Under `shard_map` (which tracks what varies along an axis) a value that
  does not vary is the same on every device already, except a gradient with
  respect to a replicated input (the model's or the adjuster's parameters):
  AD has summed it over the axis, so it is divided by the axis size. Under
  `pmap` nothing is tracked and every value is per device.
  """
  axis = config.axis_name
  if axis is None:
    return tree
  tracked = _varies(logits, axis)

  def mean(x):
    if tracked and not _varies(x, axis):
      return x / jax.lax.psum(1, axis) if gradients else x
    return jax.lax.pmean(x, axis)

  return jax.tree.map(mean, tree)


def _remainder(sample_loss: Callable, z: jax.Array, l0: jax.Array,
               grad_l: jax.Array, g: jax.Array, eta: jax.Array):
  """(r / eta^2, l(z - eta g) - l(z)) per sample, each in its most accurate form.

  Where float32 resolves the loss difference (at least `_RESOLVED` of the
  losses) both come from it directly; elsewhere from Taylor's integral form,
  with no cancellation however small eta is. The gradient with respect to `g`
  treats the Hessian's evaluation points as fixed.
  """
  nodes = jnp.asarray(_GL_T, z.dtype)
  weights = jnp.asarray(_GL_W * (1.0 - _GL_T), z.dtype)

  def hvp(at, tangent):
    total = jax.grad(lambda zz: jnp.sum(sample_loss(zz)))
    return jax.jvp(total, (at,), (tangent,))[1]

  step = eta * g
  first = eta * jnp.sum(grad_l * g, axis=-1)
  # All nodes in one batched Hessian-vector product.
  points = z - nodes[:, None, None] * jax.lax.stop_gradient(step)
  curvature = jnp.sum(g * jax.vmap(hvp, (0, None))(points, g), axis=-1)
  r_integral = jnp.sum(weights[:, None] * curvature, axis=0)
  l1 = sample_loss(z - step)
  direct = l1 - l0
  resolved = jax.lax.stop_gradient(
      jnp.abs(direct) > _RESOLVED * jnp.maximum(jnp.abs(l0), jnp.abs(l1)))
  r_direct = (direct + first) / jnp.where(resolved, eta * eta, 1.0)
  r_scaled = jnp.where(resolved, r_direct, r_integral)
  change = jnp.where(resolved, direct, eta * eta * r_integral - first)
  return r_scaled, change


def _adjuster_objective(adjuster_params: jax.Array, config: _Config,
                        sample_loss: Callable, z: jax.Array, l0: jax.Array,
                        grad_l: jax.Array, alpha: jax.Array, eta: jax.Array):
  """The adjuster's loss, mean |r| / eta^2, with its proposal and the loss changes."""
  v = jnp.asarray(config.adjuster.apply({"params": config.unflatten(adjuster_params)}, z))
  r_scaled, change = _remainder(sample_loss, z, l0, grad_l, _adjust(grad_l, v, alpha), eta)
  return jnp.mean(jnp.abs(r_scaled)), (v, change)


def _accept(config: _Config, change: jax.Array) -> jax.Array:
  """Per sample, whether its adjusted gradient passes the safeguard.

  A NaN change compares False: that sample keeps its vanilla gradient.
  """
  if config.safeguard == "batch":
    # The (global) batch-mean loss does not grow: sum of per-sample changes <= 0.
    total = jnp.sum(change)
    if config.axis_name is not None:
      total = jax.lax.psum(total, config.axis_name)
    return jnp.broadcast_to(total <= 0, change.shape)
  return change <= 0


def _fresh_adjuster(config: _Config, key: jax.Array) -> tuple[jax.Array, optax.OptState]:
  """The adjuster's initial parameters (one flat vector) and optimizer state."""
  params = config.flatten(config.adjuster.init(
      key, jnp.zeros((1, config.num_outputs), jnp.float32))["params"])
  return params, config.adjuster_optimizer.init(params)


def _all_finite(tree: Any) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _heal(config: _Config, state: GalState) -> GalState:
  """Re-initialises a non-finite adjuster from its key, and counts it.

  A finite adjuster never turns non-finite here (bad steps are skipped), but a
  restored or edited state may: without this, every later step of it would be
  skipped and the safeguard would reject every adjusted gradient for good.
  """
  healthy = _all_finite((state.adjuster_params, state.adjuster_opt_state))
  # A cond, not a select: the initialisation runs only when it is needed.
  params, opt_state = jax.lax.cond(
      healthy, lambda: (state.adjuster_params, state.adjuster_opt_state),
      lambda: _fresh_adjuster(config, state.key))
  return state._replace(
      adjuster_params=params, adjuster_opt_state=opt_state,
      adjuster_resets=state.adjuster_resets + jnp.where(healthy, 0, 1).astype(jnp.int32),
  )


def _train_adjuster(config: _Config, state: GalState, logits: jax.Array,
                    adj_loss: jax.Array, adj_grads: jax.Array) -> GalState:
  """One step of the adjuster's optimizer; a non-finite step is skipped, not stored.

  With an `axis_name` the loss and its gradient are averaged over the devices
  first, so every device takes the same step and the adjusters stay equal.
  """
  adj_loss = _mean_over_devices(config, logits, adj_loss)
  adj_grads = _mean_over_devices(config, logits, adj_grads, gradients=True)
  adj_updates, adj_opt_state = config.adjuster_optimizer.update(
      adj_grads, state.adjuster_opt_state, state.adjuster_params)
  adj_params = optax.apply_updates(state.adjuster_params, adj_updates)
  finite = jnp.isfinite(adj_loss) & _all_finite((adj_params, adj_opt_state))

  def keep_finite(new, old):
    return optax.tree.where(finite, new, old)

  return state._replace(
      adjuster_params=keep_finite(adj_params, state.adjuster_params),
      adjuster_opt_state=keep_finite(adj_opt_state, state.adjuster_opt_state),
      remainder=jnp.where(finite, adj_loss.astype(jnp.float32), state.remainder),
  )


def _init(config: _Config, seed: Any, params: Any) -> GalState:
  del params
  key = jax.random.PRNGKey(seed)
  adjuster_params, adjuster_opt_state = _fresh_adjuster(config, key)
  return GalState(
      count=jnp.zeros([], jnp.int32),
      adjuster_params=adjuster_params,
      adjuster_opt_state=adjuster_opt_state,
      key=key,
      accepted_fraction=jnp.zeros([], jnp.float32),
      remainder=jnp.zeros([], jnp.float32),
      adjuster_layout=jnp.asarray((config.num_outputs, *config.hidden_sizes), jnp.int32),
      adjuster_resets=jnp.zeros([], jnp.int32),
  )


def _update(config: _Config, updates: Any, state: GalState, params: Any = None, *,
            gal_logits: Any = None, gal_logits_grad: Any = None,
            gal_sample_loss: Any = None, gal_vjp: Any = None,
            **extra_args: Any) -> tuple[Any, GalState]:
  del params, extra_args
  _check_state(config, state)
  _check_args(config.num_outputs, dict(
      gal_logits=gal_logits, gal_logits_grad=gal_logits_grad,
      gal_sample_loss=gal_sample_loss, gal_vjp=gal_vjp))
  checks.float_leaves(updates, "updates")
  count = optax.safe_increment(state.count)
  if gal_logits.shape[0] == 0:
    # An empty batch has nothing to adjust or to train the adjuster on: its
    # means would be NaN. Keep the state, count the step.
    return (_backprop(config, gal_vjp, gal_logits_grad, gal_logits, updates),
            state._replace(count=count))
  state = _heal(config, state)
  compute = jnp.promote_types(gal_logits.dtype, jnp.float32)
  lr = config.learning_rate
  lr = lr(state.count) if callable(lr) else lr
  eta = jnp.asarray(config.beta, compute) * jnp.asarray(lr, compute)
  alpha = jnp.asarray(config.alpha, compute)
  z = gal_logits.astype(compute)
  dz = gal_logits_grad.astype(compute)

  def sample_loss(zz):
    return gal_sample_loss(zz).astype(compute)

  l0, loss_vjp = jax.vjp(sample_loss, z)
  grad_l = loss_vjp(jnp.ones_like(l0))[0]  # per-sample gradients, row i
  (adj_loss, (v, change)), adj_grads = jax.value_and_grad(
      _adjuster_objective, has_aux=True)(
          state.adjuster_params, config, sample_loss, z, l0, grad_l, alpha, eta)
  accept = _accept(config, change)
  chosen = jnp.where(accept[:, None], _adjust(dz, v, alpha), dz)
  accepted = _mean_over_devices(config, z, jnp.mean(accept.astype(jnp.float32)))
  new_state = _train_adjuster(config, state, z, adj_loss, adj_grads)._replace(
      count=count, accepted_fraction=accepted)
  return _backprop(config, gal_vjp, chosen, gal_logits, updates), new_state


def gal(
    num_outputs: int,
    learning_rate: optax.ScalarOrSchedule,
    *,
    alpha: float = 1e-3,
    beta: float = 1e-3,
    hidden_sizes: Sequence[int] = (128, 4),
    adjuster_optimizer: optax.GradientTransformation | None = None,
    seed: int = 0,
    safeguard: Safeguard = "per_sample",
    axis_name: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Gradient adjustment learning: a learned, safeguarded logit-gradient adjustment.

  For each sample with logits :math:`z`, loss :math:`l` and vanilla logit
  gradient :math:`\nabla l = \partial l / \partial z`, the adjuster :math:`h`
  (linear layers over :math:`z`, no activation) proposes :math:`v = h(z)` and

  .. math::
    g = \nabla l + \alpha \, \|\nabla l\| \, v / \|v\|, \qquad
    \tilde\eta = \beta \cdot \mathrm{lr}.

  The sample keeps :math:`g` only where the tentative loss does not grow,
  :math:`l(z - \tilde\eta g) \le l(z)`; elsewhere it keeps :math:`\nabla l`.
  With ``safeguard="batch"`` the test is made once on the batch-mean loss, and
  the whole batch keeps :math:`g` or :math:`\nabla l`, as in the authors'
  released code (their ``gal_scale`` and ``gal_ratio`` are
  ``beta = gal_scale / batch_size`` and ``alpha = gal_ratio``).
  The parameter gradient is the back-propagation of the chosen logit
  gradients through ``gal_vjp`` (no second forward pass of the model). In the
  same call the adjuster takes one step of ``adjuster_optimizer`` on the mean
  of :math:`|r| / \tilde\eta^2` with the Taylor remainder

  .. math::
    r = l(z - \tilde\eta g) - l(z) + \tilde\eta \langle \nabla l, g \rangle
      = \tilde\eta^2 \int_0^1 (1 - t)\, g^\top \nabla^2 l(z - t\tilde\eta g)\,
        g \, dt.

  At the paper's step sizes (:math:`\tilde\eta \approx 10^{-6}`) the loss
  difference is far below float32 resolution, so where it is not resolved
  (smaller than 1e-3 of the losses) the remainder and the safeguard use the
  integral form (3-point Gauss-Legendre, Hessian-vector products); elsewhere
  the direct difference. Dividing by :math:`\tilde\eta^2` keeps the minimiser
  and gives the adjuster's Adam gradients above its epsilon.

  ``gal`` produces the gradient itself from its extra arguments: the values of
  the incoming ``updates`` are not used (only their structure and dtypes), so
  put it first in a chain, followed by the optimizer whose learning rate it is
  given. Its extra arguments come from :func:`gal_value_and_grad`.

  Under ``jax.pmap`` or ``shard_map`` each device sees its shard of the batch;
  with ``axis_name`` set to the mapped axis, GAL averages what it computes over
  that axis (the parameter gradient, the ``"batch"`` safeguard's loss change,
  the adjuster's loss and gradient, ``accepted_fraction``), so that every
  device returns the gradient of the global batch and keeps the same
  adjuster, as one device on that batch would. Under ``jax.jit`` with a batch
  sharded over devices (global arrays) leave it ``None``.

  With one output (``num_outputs=1``, a regression) GAL cannot learn:
  :math:`v / \|v\|` is :math:`\pm 1` and its derivative is 0, so the adjuster
  gets a zero gradient and the adjustment is a fixed rescaling of each
  sample's gradient by :math:`1 \pm \alpha`; ``gal`` warns.

  A state of another configuration (``num_outputs``, ``hidden_sizes``,
  ``adjuster_optimizer``) is rejected at trace time with a message naming it.
  An adjuster step that is not finite is skipped (the adjuster and its
  optimizer state are kept, as ``optax.apply_if_finite`` does), and an
  adjuster that is not finite on entry (a corrupted checkpoint) is
  re-initialised from ``key`` and counted in ``adjuster_resets``.

  Args:
    num_outputs: number of logits per sample (the adjuster's input and output).
    learning_rate: the learning rate of the optimizer that follows, a float or
      an optax schedule (evaluated at this transform's step count).
    alpha: size of the adjustment relative to the vanilla logit gradient;
      ``0`` reproduces the vanilla gradient exactly.
    beta: the tentative step is ``beta * learning_rate``.
    hidden_sizes: widths of the adjuster's hidden (linear) layers.
    adjuster_optimizer: optimizer of the adjuster; default
      ``optax.adam(1e-3)``.
    seed: seed of the adjuster's initial parameters (an int or an integer
      array).
    safeguard: ``"per_sample"`` (the paper): each sample tests its own loss;
      ``"batch"`` (the authors' code): one test on the batch-mean loss decides
      for the whole batch.
    axis_name: the name of the mapped axis that splits the batch under
      ``jax.pmap`` or ``shard_map`` (e.g. ``"batch"``), or ``None``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes the
    keyword arguments ``gal_logits``, ``gal_logits_grad``, ``gal_sample_loss``
    and ``gal_vjp``; its state is a :class:`GalState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_ortho
    >>> params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    >>> apply_fn = lambda p, x: x @ p["w"] + p["b"]
    >>> loss_fn = lambda z, y: optax.softmax_cross_entropy_with_integer_labels(
    ...     z, y).mean()
    >>> tx = optax.chain(optax_ortho.gal(3, 0.1), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> x, y = jnp.ones((8, 4)), jnp.arange(8) % 3
    >>> @jax.jit
    ... def step(params, state):
    ...   loss, grads, gal_args = optax_ortho.gal_value_and_grad(
    ...       apply_fn, loss_fn)(params, x, y)
    ...   updates, state = tx.update(grads, state, params, **gal_args)
    ...   return optax.apply_updates(params, updates), state, loss
    >>> params, state, loss = step(params, state)

  References:
    Luo, Wong, Kankanhalli, Zhao, `Learning to Minimize the Remainder in
    Supervised Learning <https://arxiv.org/abs/2201.09193>`_, IEEE TMM 2023.
  """
  checks.positive_int(num_outputs, "num_outputs", static_arg=True)
  hidden_sizes = tuple(hidden_sizes)
  for width in hidden_sizes:
    checks.positive_int(width, f"hidden_sizes entry (hidden_sizes={hidden_sizes!r})")
  checks.hyperparam(learning_rate, "learning_rate", "a finite number >= 0",
                    lambda v: v >= 0.0)
  checks.hyperparam(alpha, "alpha", "a finite number >= 0", lambda v: v >= 0.0,
                    schedule=False)
  checks.hyperparam(beta, "beta", "a finite number >= 0", lambda v: v >= 0.0,
                    schedule=False)
  if safeguard not in _SAFEGUARDS:
    raise ValueError(
        f"safeguard must be one of {_SAFEGUARDS}, got {safeguard!r}.")
  _check_seed(seed)
  if axis_name is not None and not isinstance(axis_name, (str, tuple)):
    raise TypeError(
        "axis_name must be None, a str or a tuple of str (the mapped axis of"
        f" jax.pmap or shard_map), got {axis_name!r}.")
  if num_outputs == 1:
    warnings.warn(
        "gal(num_outputs=1): with one output v/|v| is +-1 and its derivative 0,"
        " so the adjuster cannot learn and the adjustment is a fixed rescaling"
        " of each sample's gradient by 1 +- alpha.", UserWarning, stacklevel=2)
  if adjuster_optimizer is None:
    adjuster_optimizer = optax.adam(1e-3)
  elif not isinstance(adjuster_optimizer, optax.GradientTransformation):
    raise TypeError(
        "adjuster_optimizer must be an optax.GradientTransformation or None,"
        f" got {adjuster_optimizer!r}."
    )
  adjuster = _Adjuster(hidden_sizes, num_outputs)
  flatten, unflatten = _flat_params(adjuster, num_outputs)
  config = _Config(num_outputs, hidden_sizes, learning_rate, alpha, beta, safeguard,
                   axis_name, adjuster, adjuster_optimizer, flatten, unflatten)
  return optax.GradientTransformationExtraArgs(
      functools.partial(_init, config, seed), functools.partial(_update, config))


def _first_cotangent(vjp_fn: Callable, cotangent: jax.Array) -> Any:
  return vjp_fn(cotangent)[0]


def _sample_losses(loss_fn: Callable, y: Any, logits: jax.Array) -> jax.Array:
  """`loss_fn` on each sample alone: one loss per row of `logits`."""
  def one(zi, yi):
    return loss_fn(zi[None], jax.tree.map(lambda a: a[None], yi))
  return jax.vmap(one)(logits, y)


def gal_value_and_grad(
    apply_fn: Callable[[Any, Any], Any],
    loss_fn: Callable[[jax.Array, Any], jax.Array],
    has_aux: bool = False,
) -> Callable[[Any, Any, Any], tuple[Any, Any, dict[str, Any]]]:
  """Loss, gradients and :func:`gal`'s extra arguments from one forward pass.

  ``apply_fn(params, x)`` returns logits of shape ``(batch, num_outputs)``
  (with ``has_aux=True``, a pair ``(logits, aux)``: new BatchNorm statistics,
  say); ``loss_fn(logits, y)`` returns the scalar **mean** loss over the
  batch, and must also work on one sample (``logits[i:i+1]``, ``y[i:i+1]``):
  GAL evaluates it per sample, so every leaf of ``y`` needs the batch as its
  leading axis. A sequence model flattens its tokens into the batch axis:
  logits ``(batch * length, vocab)``, ``y`` ``(batch * length,)``.

  The returned ``gal_args`` are a pytree of arrays (``gal_sample_loss`` and
  ``gal_vjp`` are ``jax.tree_util.Partial`` over arrays): they may be
  returned from one jitted function (the gradient step) and passed to another
  (the update step).

  Args:
    apply_fn: the model, ``(params, x) -> logits`` (or ``(logits, aux)``).
    loss_fn: ``(logits, y) -> scalar`` mean loss.
    has_aux: whether ``apply_fn`` returns ``(logits, aux)``.

  Returns:
    A function ``(params, x, y) -> (loss, grads, gal_args)`` (with
    ``has_aux=True``, ``((loss, aux), grads, gal_args)``, nested as
    ``jax.value_and_grad(..., has_aux=True)`` nests it): the loss, its
    (vanilla) gradient with respect to ``params``, and the keyword arguments
    of ``gal``'s ``update``. Under ``jax.jit`` the vanilla backward pass is
    removed as dead code when only ``gal``'s output is used.

  Example:
    >>> import jax.numpy as jnp, optax, optax_ortho
    >>> apply_fn = lambda p, x: x @ p
    >>> loss_fn = lambda z, y: optax.softmax_cross_entropy_with_integer_labels(
    ...     z, y).mean()
    >>> loss, grads, gal_args = optax_ortho.gal_value_and_grad(
    ...     apply_fn, loss_fn)(jnp.zeros((4, 3)), jnp.ones((2, 4)), jnp.array([0, 2]))
    >>> sorted(gal_args)
    ['gal_logits', 'gal_logits_grad', 'gal_sample_loss', 'gal_vjp']
  """
  checks.boolean(has_aux, "has_aux")
  # Built once, so that the Partials' static part is the same object on every
  # call: an update step jitted apart from the gradient step compiles once.
  sample_losses = functools.partial(_sample_losses, loss_fn)

  def value_and_grad(params, x, y):
    out = jax.vjp(lambda p: apply_fn(p, x), params, has_aux=has_aux)
    logits, vjp_fn = out[0], out[1]
    if jnp.ndim(logits) != 2:
      raise ValueError(
          "apply_fn must return logits of rank 2, (batch, num_outputs), got"
          f" shape {jnp.shape(logits)}."
          + (" With has_aux=True it returns (logits, aux)." if has_aux else "")
      )
    loss, loss_vjp = jax.vjp(lambda z: loss_fn(z, y), logits)
    if jnp.ndim(loss) != 0:
      raise ValueError(
          "gal_value_and_grad: loss_fn(logits, y) must return the scalar mean loss"
          f" over the batch, got shape {jnp.shape(loss)} (a per-sample loss?"
          " return its mean; GAL evaluates loss_fn on single samples itself)."
      )
    logits_grad = loss_vjp(jnp.ones_like(loss))[0]
    gal_args = {
        "gal_logits": logits,
        "gal_logits_grad": logits_grad,
        "gal_sample_loss": jax.tree_util.Partial(sample_losses, y),
        "gal_vjp": jax.tree_util.Partial(_first_cotangent, vjp_fn),
    }
    grads = vjp_fn(logits_grad)[0]
    if has_aux:
      return (loss, out[2]), grads, gal_args
    return loss, grads, gal_args

  return value_and_grad
