"""Extra-argument transforms in Flax training loops: the documented recipes.

linen: `optax_ortho.apply_gradients(state, grads, **extra_args)` on a
`flax.training.train_state.TrainState`; nnx: `nnx.Optimizer.update(model,
grads, **extra_args)`. Each recipe runs real jitted training steps and must
give exactly what the bare `tx.update` + `optax.apply_updates` loop gives.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from flax.training import train_state

import optax_ortho

X = jax.random.normal(jax.random.key(0), (32, 6))
Y = (X[:, 0] > 0).astype(jnp.int32) + (X[:, 1] > 0).astype(jnp.int32)
STEPS = 5


def ce(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _tx(kind):
  if kind == "gnp":
    return optax.chain(optax_ortho.gradient_norm_penalty(0.8, 0.05),
                       optax.sgd(0.1, momentum=0.9))
  if kind == "grod":
    return optax.chain(optax_ortho.grod(1e-2), optax.sgd(0.1, momentum=0.9))
  if kind == "gal":
    return optax.chain(optax_ortho.gal(3, 1e-2), optax.adam(1e-2))
  # All three extra arguments in one chain, with orthonormalize in front of SGD.
  return optax.chain(optax_ortho.grod(1e-2), optax_ortho.gradient_norm_penalty(0.5, 0.05),
                     optax_ortho.orthonormalize(), optax.sgd(0.01, momentum=0.9))


# The chain of all three is the longest to compile: slow.
KINDS = ["gnp", "grod", "gal", pytest.param("chain", marks=pytest.mark.slow)]


# ------------------------------------------------------------------ linen


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.Dense(16)(x)))


def _linen_grads(kind, apply_fn, params, x, y):
  """(loss, grads, extra keyword arguments of update): the recipe of each transform."""
  def loss_fn(p):
    return ce(apply_fn({"params": p}, x), y)

  if kind == "gal":
    return optax_ortho.gal_value_and_grad(
        lambda p, x: apply_fn({"params": p}, x), ce)(params, x, y)

  def losses(p):
    return loss_fn(p), 0.5 * sum(jnp.sum(w ** 2) for w in jax.tree.leaves(p))

  (loss, _), (grads, reg_grads) = optax_ortho.value_and_grads(losses)(params)
  extra = {}
  if kind in ("grod", "chain"):
    extra["regularizer_grads"] = reg_grads
  if kind in ("gnp", "chain"):
    extra["grad_fn"] = jax.grad(loss_fn)
  return loss, grads, extra


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_linen_train_state_recipe(kind):
  model = MLP()
  params = model.init(jax.random.key(1), X)["params"]
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=_tx(kind))

  @jax.jit
  def train_step(state, x, y):
    loss, grads, extra = _linen_grads(kind, state.apply_fn, state.params, x, y)
    return optax_ortho.apply_gradients(state, grads, **extra), loss

  # The same steps without TrainState: the reference.
  tx = _tx(kind)
  ref_params, ref_opt = params, tx.init(params)

  @jax.jit
  def ref_step(params, opt_state, x, y):
    loss, grads, extra = _linen_grads(kind, model.apply, params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for _ in range(STEPS):
    state, loss = train_step(state, X, Y)
    ref_params, ref_opt, _ = ref_step(ref_params, ref_opt, X, Y)
    losses.append(float(loss))
  assert int(state.step) == STEPS
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               state.params, ref_params)
  assert losses[-1] < losses[0], losses


@pytest.mark.slow
def test_linen_subclass_keeps_its_fields():
  class BNState(train_state.TrainState):
    batch_stats: dict

  model = MLP()
  params = model.init(jax.random.key(1), X)["params"]
  state = BNState.create(apply_fn=model.apply, params=params, tx=_tx("gnp"),
                         batch_stats={"mean": jnp.ones(3)})
  grads = jax.grad(lambda p: ce(model.apply({"params": p}, X), Y))(params)
  new = optax_ortho.apply_gradients(
      state, grads, grad_fn=jax.grad(lambda p: ce(model.apply({"params": p}, X), Y)))
  assert isinstance(new, BNState) and int(new.step) == 1
  np.testing.assert_array_equal(new.batch_stats["mean"], jnp.ones(3))


def test_linen_missing_extra_argument_names_it():
  model = MLP()
  params = model.init(jax.random.key(1), X)["params"]
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=_tx("grod"))
  grads = jax.tree.map(jnp.ones_like, params)
  with pytest.raises(TypeError, match="regularizer_grads"):
    optax_ortho.apply_gradients(state, grads)


class _StatsState(train_state.TrainState):
  batch_stats: dict


def _stats_state(kind="gnp"):
  model = MLP()
  params = model.init(jax.random.key(1), X)["params"]
  state = _StatsState.create(apply_fn=model.apply, params=params, tx=_tx(kind),
                             batch_stats={"mean": jnp.zeros(3)})
  grad_fn = jax.grad(lambda p: ce(model.apply({"params": p}, X), Y))
  return state, grad_fn(params), grad_fn


def test_keyword_naming_a_field_replaces_it():
  state, grads, grad_fn = _stats_state()
  new = jax.jit(lambda s, g, b: optax_ortho.apply_gradients(s, g, grad_fn=grad_fn, batch_stats=b))(
      state, grads, {"mean": jnp.ones(3)})
  assert isinstance(new, _StatsState) and int(new.step) == 1
  np.testing.assert_array_equal(new.batch_stats["mean"], jnp.ones(3))
  # The same step without the field: the optimizer got the same arguments.
  kept = optax_ortho.apply_gradients(state, grads, grad_fn=grad_fn)
  np.testing.assert_array_equal(kept.batch_stats["mean"], jnp.zeros(3))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               new.params, kept.params)


def test_keyword_that_reaches_nothing_warns():
  state, grads, grad_fn = _stats_state()
  with pytest.warns(UserWarning, match=r"\['batch_stat'\] name no field of _StatsState"):
    new = optax_ortho.apply_gradients(state, grads, grad_fn=grad_fn, batch_stat={"mean": 1})
  np.testing.assert_array_equal(new.batch_stats["mean"], jnp.zeros(3))
  import warnings  # pylint: disable=import-outside-toplevel
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    optax_ortho.apply_gradients(state, grads, grad_fn=grad_fn, batch_stats=state.batch_stats)


@pytest.mark.parametrize("name", ["step", "params", "opt_state"])
def test_fields_computed_by_apply_gradients_are_refused(name):
  state, grads, grad_fn = _stats_state()
  with pytest.raises(ValueError, match=f"computes '{name}' itself"):
    optax_ortho.apply_gradients(state, grads, grad_fn=grad_fn, **{name: getattr(state, name)})


def test_flax_apply_gradients_error_points_to_ours():
  state, grads, grad_fn = _stats_state()
  # Flax's own method takes grad_fn as a field to replace: the optimizer
  # never sees it, and the message says what to call instead.
  with pytest.raises(ValueError, match=r"optax_ortho\.apply_gradients"):
    state.apply_gradients(grads=grads, grad_fn=grad_fn)
  grod_state = _StatsState.create(apply_fn=state.apply_fn, params=state.params,
                                  tx=_tx("grod"), batch_stats={})
  with pytest.raises(TypeError, match=r"optax_ortho\.apply_gradients"):
    grod_state.apply_gradients(grads=grads, regularizer_grads=grads)


def test_apply_gradients_rejects_a_non_state():
  with pytest.raises(TypeError, match="TrainState"):
    optax_ortho.apply_gradients({"params": 1}, {"params": 1})


# -------------------------------------------------------------------- nnx


class NnxMLP(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(6, 16, rngs=rngs)
    self.out = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))


def _nnx_step(kind):
  @nnx.jit
  def train_step(model, optimizer, x, y):
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)

    def loss_of_params(params):
      return ce(nnx.merge(graphdef, params, rest)(x), y)

    params = nnx.state(model, nnx.Param)
    if kind == "gal":
      def apply_fn(p, x):
        return nnx.merge(graphdef, p, rest)(x)
      loss, grads, extra = optax_ortho.gal_value_and_grad(apply_fn, ce)(params, x, y)
      # The optimizer hands tx.update plain arrays: so must gal_vjp.
      vjp = extra["gal_vjp"]
      extra["gal_vjp"] = lambda ct: nnx.as_pure(vjp(ct))
    else:
      def losses(p):
        return loss_of_params(p), 0.5 * sum(jnp.sum(w ** 2) for w in jax.tree.leaves(p))
      (loss, _), (grads, reg_grads) = optax_ortho.value_and_grads(losses)(params)
      extra = {}
      if kind in ("grod", "chain"):
        extra["regularizer_grads"] = reg_grads
      if kind in ("gnp", "chain"):
        extra["grad_fn"] = jax.grad(loss_of_params)
    optimizer.update(model, grads, **extra)
    return loss
  return train_step


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_nnx_optimizer_recipe(kind):
  model = NnxMLP(nnx.Rngs(1))
  optimizer = nnx.Optimizer(model, _tx(kind), wrt=nnx.Param)
  train_step = _nnx_step(kind)
  losses = [float(train_step(model, optimizer, X, Y)) for _ in range(STEPS)]
  assert losses[-1] < losses[0], losses

  # The same steps on the pure pytree of parameters: the reference.
  graphdef, params, rest = nnx.split(NnxMLP(nnx.Rngs(1)), nnx.Param, ...)
  params = nnx.as_pure(params)
  tx = _tx(kind)
  opt_state = tx.init(params)
  for _ in range(STEPS):
    def loss_of_params(p):
      return ce(nnx.merge(graphdef, p, rest)(X), Y)
    if kind == "gal":
      _, grads, extra = optax_ortho.gal_value_and_grad(
          lambda p, x: nnx.merge(graphdef, p, rest)(x), ce)(params, X, Y)
    else:
      grads = jax.grad(loss_of_params)(params)
      extra = {}
      if kind in ("grod", "chain"):
        extra["regularizer_grads"] = params
      if kind in ("gnp", "chain"):
        extra["grad_fn"] = jax.grad(loss_of_params)
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    params = optax.apply_updates(params, updates)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               nnx.as_pure(nnx.state(model, nnx.Param)), params)


# ------------------------------------------- nnx with BatchNorm and Dropout


class NnxBNDropout(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(6, 16, rngs=rngs)
    self.bn = nnx.BatchNorm(16, rngs=rngs)
    self.dropout = nnx.Dropout(0.2, rngs=rngs)
    self.out = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(self.dropout(nnx.relu(self.bn(self.hidden(x)))))


@nnx.jit
def _nnx_gnp_step(model, optimizer, x, y):
  # The documented recipe: pure arrays of all but the parameters, taken
  # before the step, so the perturbed pass runs on a copy and leaves the
  # model's BatchNorm statistics and dropout counter alone.
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  rest = nnx.as_pure(rest)

  def loss_fn(model):
    return ce(model(x), y)

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  grad_fn = jax.grad(lambda params: loss_fn(nnx.merge(graphdef, params, rest)))
  optimizer.update(model, grads, grad_fn=grad_fn)
  return loss


@nnx.jit
def _nnx_grod_step(model, optimizer, x, y):
  # Both losses from one pass on a copy built from pure arrays; the copy's
  # new BatchNorm statistics and dropout counter come back as aux.
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  rest = nnx.as_pure(rest)

  def losses(params):
    copy = nnx.merge(graphdef, params, rest)
    task = ce(copy(x), y)
    reg = 0.5 * sum(jnp.sum(w ** 2) for w in jax.tree.leaves(params))
    return (task, reg), nnx.as_pure(nnx.state(copy, nnx.Not(nnx.Param)))

  ((loss, _), new_rest), (g_task, g_reg) = optax_ortho.value_and_grads(
      losses, has_aux=True)(params)
  nnx.update(model, new_rest)  # the statistics and counters of this pass
  optimizer.update(model, g_task, regularizer_grads=g_reg)
  return loss


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gnp", "grod"])
def test_nnx_recipe_with_batchnorm_and_dropout(kind):
  model = NnxBNDropout(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, _tx(kind), wrt=nnx.Param)
  step = _nnx_gnp_step if kind == "gnp" else _nnx_grod_step
  stats0 = jax.tree.map(np.asarray, nnx.as_pure(nnx.state(model, nnx.BatchStat)))
  losses = [float(step(model, optimizer, X, Y)) for _ in range(8)]
  stats = nnx.as_pure(nnx.state(model, nnx.BatchStat))
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(stats),
                                                     jax.tree.leaves(stats0)))
  assert min(losses[-3:]) < losses[0], losses
  assert all(np.isfinite(losses))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(stats))
