"""Flax training programs as users write them, with every transform plugged in.

A linen CNN with BatchNorm and Dropout in a `TrainState`, the same in nnx with
`nnx.Optimizer`, a `pmap` ResNet-style step with cross-device BatchNorm, and a
jit-sharded Transformer with attention: a few steps lower the loss, BatchNorm
statistics move, and 8 devices give what 1 device gives on the same global
batch.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import jax_utils
from flax import nnx
from flax.training import train_state
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_ortho
from optax_ortho import linen as ortho_nn
from optax_ortho import nnx as ortho_nnx

# Each test compiles a few training steps: seconds to tens of seconds on 2 cores.
pytestmark = pytest.mark.slow

NUM_CLASSES = 3
# Every transform, by the name the tests use; "opt" and "ogd" train the OPT
# layers (Cayley map + SGD; R itself on the Stiefel manifold + stiefel_sgd).
NAMES = ("orthonormalize", "orthogonal_sgd", "orthogonal_adam", "grod", "gnp", "gal",
         "opt", "ogd")
DATA_PARALLEL_NAMES = NAMES[:6] + ("stiefel_sgd",)


def _tx(name, axis_name=None):
  by_axis = {} if axis_name is None else {"axis_name": axis_name}
  return {
      "orthonormalize": lambda: optax.chain(optax_ortho.orthonormalize(),
                                            optax.sgd(0.02, momentum=0.9)),
      "orthogonal_sgd": lambda: optax_ortho.orthogonal_sgd(0.02, momentum=0.9),
      "orthogonal_adam": lambda: optax_ortho.orthogonal_adam(1e-2),
      "grod": lambda: optax.chain(optax_ortho.grod(1e-3), optax.sgd(0.1, momentum=0.9)),
      "gnp": lambda: optax.chain(
          optax_ortho.gradient_norm_penalty(0.8, 0.05, has_aux=True, **by_axis),
          optax.sgd(0.1, momentum=0.9)),
      # SGD, not Adam: Adam turns the rounding of a near-zero gradient entry
      # into a step of +-lr, and the 8-device and 1-device runs would part.
      "gal": lambda: optax.chain(optax_ortho.gal(NUM_CLASSES, 0.1, alpha=0.1, **by_axis),
                                 optax.sgd(0.1, momentum=0.9)),
      "opt": lambda: optax.sgd(0.5, momentum=0.9),
      "ogd": lambda: optax_ortho.stiefel_sgd(0.1),
      "stiefel_sgd": lambda: optax_ortho.stiefel_sgd(0.05),
  }[name]()


def _ce(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _images(n=16):
  x = jax.random.normal(jax.random.key(0), (n, 6, 6, 2))
  y = (x[:, :3].mean((1, 2, 3)) > 0).astype(jnp.int32) + (x[:, 3:].mean((1, 2, 3)) > 0)
  return x, y


def _conv(name, features):
  # No bias before BatchNorm, as in Flax's ResNet: its gradient is zero up to
  # rounding, which Adam would turn into steps of +-lr that differ between the
  # 8-device and the 1-device run.
  if name in ("opt", "ogd"):
    return ortho_nn.OrthogonalConv(features, (3, 3), use_bias=False,
                                   method="cayley" if name == "opt" else None)
  return nn.Conv(features, (3, 3), use_bias=False)


def _dense(name, features):
  if name in ("opt", "ogd"):
    return ortho_nn.OrthogonalDense(features, method="cayley" if name == "opt" else None)
  return nn.Dense(features)


class _CNN(nn.Module):
  name_: str
  axis_name: str | None = None
  residual: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    def norm(x):
      return nn.BatchNorm(use_running_average=not train, momentum=0.8,
                          axis_name=self.axis_name)(x)
    x = nn.relu(norm(_conv(self.name_, 4)(x)))
    if self.residual:  # a ResNet block
      h = nn.relu(norm(_conv(self.name_, 4)(x)))
      x = nn.relu(x + norm(_conv(self.name_, 4)(h)))
    if not self.residual:  # the ResNet has no dropout: then 8 devices equal 1
      x = nn.Dropout(0.1, deterministic=not train)(x)
    return _dense(self.name_, NUM_CLASSES)(x.mean(axis=(1, 2)))


class _TrainState(train_state.TrainState):
  batch_stats: dict
  fixed: dict


def _linen_state(model, x, name):
  variables = model.init(jax.random.key(1), x, train=False)
  return _TrainState.create(
      apply_fn=model.apply, params=variables["params"], tx=_tx(name, model.axis_name),
      batch_stats=variables["batch_stats"], fixed=variables.get("fixed", {}))


def _linen_step(name, axis_name=None):
  """A linen train step, with `name`'s extra arguments; pmean-ed under `axis_name`."""

  def step(state, x, y):
    key = jax.random.fold_in(jax.random.key(2), state.step)

    def apply_fn(params, x):
      logits, mutated = state.apply_fn(
          {"params": params, "batch_stats": state.batch_stats, "fixed": state.fixed}, x,
          train=True, rngs={"dropout": key}, mutable=["batch_stats"])
      return logits, mutated["batch_stats"]

    def loss_fn(params):
      logits, stats = apply_fn(params, x)
      return _ce(logits, y), stats

    extra = {}
    if name == "gal":
      (loss, stats), grads, extra = optax_ortho.gal_value_and_grad(
          apply_fn, _ce, has_aux=True)(state.params, x, y)
    elif name == "grod":
      def losses(params):
        loss, stats = loss_fn(params)
        return (loss, 0.5 * optax.tree.norm(params, squared=True)), stats
      ((loss, _), stats), (grads, reg_grads) = optax_ortho.value_and_grads(
          losses, has_aux=True)(state.params)
      extra = {"regularizer_grads": reg_grads}
    else:
      (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
      if name == "gnp":
        extra = {"grad_fn": jax.grad(loss_fn, has_aux=True)}
    if axis_name is not None:
      grads, loss = jax.lax.pmean((grads, loss), axis_name)
    state = optax_ortho.apply_gradients(state, grads, batch_stats=stats, **extra)
    return state, loss

  return step


def _eval_loss(state, x, y):
  logits = state.apply_fn(
      {"params": state.params, "batch_stats": state.batch_stats, "fixed": state.fixed}, x,
      train=False)
  return _ce(logits, y)


def _stats_moved(new, old):
  return all(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old)))


@pytest.mark.parametrize("name", NAMES)
def test_linen_cnn_with_batchnorm_and_dropout(name):
  x, y = _images()
  state = _linen_state(_CNN(name), x, name)
  step = jax.jit(_linen_step(name))
  first = _eval_loss(state, x, y)
  new = state
  for _ in range(6):
    new, loss = step(new, x, y)
  assert np.isfinite(loss)
  assert int(new.step) == 6
  assert _eval_loss(new, x, y) < first
  assert _stats_moved(new.batch_stats, state.batch_stats)


class _NnxCNN(nnx.Module):

  def __init__(self, name, rngs):
    if name in ("opt", "ogd"):
      method = "cayley" if name == "opt" else None
      self.conv = ortho_nnx.OrthogonalConv(2, 4, (3, 3), method=method, rngs=rngs)
      self.head = ortho_nnx.OrthogonalLinear(4, NUM_CLASSES, method=method, rngs=rngs)
    else:
      self.conv = nnx.Conv(2, 4, (3, 3), rngs=rngs)
      self.head = nnx.Linear(4, NUM_CLASSES, rngs=rngs)
    self.bn = nnx.BatchNorm(4, momentum=0.8, rngs=rngs)
    self.dropout = nnx.Dropout(0.1, rngs=rngs)

  def __call__(self, x):
    x = self.dropout(nnx.relu(self.bn(self.conv(x))))
    return self.head(x.mean(axis=(1, 2)))


@nnx.jit(static_argnames="name")
def _nnx_step(model, optimizer, x, y, name):
  # Pure arrays of everything but the parameters, from before this step: a
  # copy merged from them sees the same statistics and dropout mask.
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  rest = nnx.as_pure(rest)

  def apply_fn(params, x):  # -> (logits, the copy's new non-parameter state)
    copy = nnx.merge(graphdef, params, rest)
    return copy(x), nnx.as_pure(nnx.split(copy, nnx.Param, ...)[2])

  def loss_fn(params):
    logits, new_rest = apply_fn(params, x)
    return _ce(logits, y), new_rest

  extra = {}
  if name == "gal":
    (loss, new_rest), grads, extra = optax_ortho.gal_value_and_grad(
        apply_fn, _ce, has_aux=True)(params, x, y)
    vjp = extra["gal_vjp"]
    extra["gal_vjp"] = lambda ct: nnx.as_pure(vjp(ct))
    nnx.update(model, new_rest)
  elif name == "grod":
    def losses(params):
      loss, new_rest = loss_fn(params)
      return (loss, 0.5 * optax.tree.norm(params, squared=True)), new_rest
    ((loss, _), new_rest), (grads, reg_grads) = optax_ortho.value_and_grads(
        losses, has_aux=True)(params)
    extra = {"regularizer_grads": nnx.as_pure(reg_grads)}
    nnx.update(model, new_rest)
  else:
    loss, grads = nnx.value_and_grad(lambda model: _ce(model(x), y))(model)
    if name == "gnp":
      extra = {"grad_fn": jax.grad(loss_fn, has_aux=True)}
  optimizer.update(model, grads, **extra)
  return loss


@nnx.jit
def _nnx_eval_loss(model, x, y):
  model.eval()
  loss = _ce(model(x), y)
  model.train()
  return loss


@pytest.mark.parametrize("name", NAMES)
def test_nnx_cnn_with_batchnorm_dropout_and_optimizer(name):
  x, y = _images()
  model = _NnxCNN(name, nnx.Rngs(1))
  optimizer = nnx.Optimizer(model, _tx(name), wrt=nnx.Param)
  mean = np.array(model.bn.mean[...])
  first = _nnx_eval_loss(model, x, y)
  for _ in range(6):
    loss = _nnx_step(model, optimizer, x, y, name)
  assert np.isfinite(loss)
  assert int(optimizer.step[...]) == 6
  assert _nnx_eval_loss(model, x, y) < first
  assert not np.allclose(model.bn.mean[...], mean)


def _assert_close(a, b, rtol=2e-4, atol=2e-5):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(u, v, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", DATA_PARALLEL_NAMES)
def test_pmap_resnet_with_cross_device_batchnorm(name):
  x, y = _images()
  model = _CNN(name, axis_name="batch", residual=True)
  state = _linen_state(model, x, name)

  def train(devices, steps=4):
    n = len(devices)
    p_step = jax.pmap(_linen_step(name, "batch"), axis_name="batch", devices=devices)
    replicated = jax_utils.replicate(state, devices)
    shards = x.reshape(n, -1, *x.shape[1:]), y.reshape(n, -1)
    for _ in range(steps):
      replicated, loss = p_step(replicated, *shards)
    return jax.tree.map(lambda a: a[0], replicated), loss[0]

  assert jax.local_device_count() == 8
  many, loss = train(jax.local_devices())
  one, _ = train(jax.local_devices()[:1])
  _assert_close((many.params, many.batch_stats, many.opt_state),
                (one.params, one.batch_stats, one.opt_state))
  assert _stats_moved(many.batch_stats, state.batch_stats)
  assert _eval_loss(many, x, y) < _eval_loss(state, x, y)


class _Transformer(nn.Module):
  """Token classifier: embedding, one pre-norm attention + MLP block, mean pool."""

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(12, 8)(tokens)
    x = x + self.param("pos", nn.initializers.normal(0.02), x.shape[1:])
    # No attention biases: the key bias's gradient is zero up to rounding, and
    # orthonormalising it (the default view of a 2-D leaf) or Adam would turn
    # that noise into steps of size lr.
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, use_bias=False)(h)
    h = nn.Dense(8)(nn.relu(nn.Dense(16)(nn.LayerNorm()(x))))
    return nn.Dense(NUM_CLASSES)((x + h).mean(axis=1))


@pytest.mark.parametrize("name", DATA_PARALLEL_NAMES)
def test_jit_sharded_transformer(name):
  tokens = jax.random.randint(jax.random.key(0), (16, 6), 0, 12)
  y = (tokens[:, 0] % NUM_CLASSES).astype(jnp.int32)
  model = _Transformer()
  params = model.init(jax.random.key(1), tokens)["params"]
  tx = _tx(name)
  if name in ("orthonormalize",):
    tx = optax.chain(optax_ortho.orthonormalize(
        dimension_numbers=optax_ortho.flax_dimension_numbers), optax.sgd(0.02, momentum=0.9))

  @jax.jit
  def step(params, opt_state, tokens, y):
    def loss_fn(params):
      return _ce(model.apply({"params": params}, tokens), y)
    extra = {}
    if name == "gal":
      loss, grads, extra = optax_ortho.gal_value_and_grad(
          lambda p, t: model.apply({"params": p}, t), _ce)(params, tokens, y)
    elif name == "grod":
      (loss, _), (grads, reg_grads) = optax_ortho.value_and_grads(
          lambda p: (loss_fn(p), 0.5 * optax.tree.norm(p, squared=True)))(params)
      extra = {"regularizer_grads": reg_grads}
    else:
      loss, grads = jax.value_and_grad(loss_fn)(params)
      if name == "gnp":
        extra = {"grad_fn": lambda p: (jax.grad(loss_fn)(p), None)}
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), opt_state, loss

  def train(params, tokens, y, steps=4):
    opt_state = tx.init(params)
    for _ in range(steps):
      params, opt_state, loss = step(params, opt_state, tokens, y)
    return params, opt_state, loss

  # Auto axes, as a `jax.sharding.Mesh` has: nn.Embed's gather cannot infer its
  # output sharding on an Explicit batch axis.
  mesh = jax.make_mesh((8,), ("batch",), axis_types=(AxisType.Auto,))
  batch = NamedSharding(mesh, P("batch"))
  replicated = jax.device_put(params, NamedSharding(mesh, P()))
  many = train(replicated, jax.device_put(tokens, batch), jax.device_put(y, batch))
  one = train(params, tokens, y)
  assert many[0]["Dense_2"]["kernel"].sharding.num_devices == 8
  # Sums in another order: polar factors amplify that rounding through the
  # small singular values of a gradient, to ~5e-4 after 4 steps here.
  _assert_close(many[:2], one[:2], rtol=2e-3, atol=2e-3)
  def loss_of(params):
    return _ce(model.apply({"params": params}, tokens), y)
  assert loss_of(one[0]) < loss_of(params)
