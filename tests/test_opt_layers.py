"""OPT Flax layers (linen and nnx): W = Q(R) V, fixed V, S-OPT, export."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_ortho
from optax_ortho import linen as ortho_nn
from optax_ortho import nnx as ortho_nnx

METHODS = ("cayley", "gram_schmidt", "householder", "lowdin", None)
X_DENSE = jax.random.normal(jax.random.key(1), (4, 12))
X_CONV = jax.random.normal(jax.random.key(2), (2, 6, 6, 3))


def _angles(kernel):
  w = kernel.reshape((-1, kernel.shape[-1]))
  w = w / jnp.linalg.norm(w, axis=0)
  return w.T @ w


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("stochastic", [None, 5])
def test_linen_dense_trains_r_only_and_keeps_angles(method, stochastic):
  layer = ortho_nn.OrthogonalDense(6, method=method, stochastic=stochastic,
                                   episode_length=10)
  variables = layer.init(jax.random.key(0), X_DENSE)
  assert set(variables) == {"params", ortho_nn.FIXED}
  assert set(variables["params"]) == {"R", "bias"}
  size = 12 if stochastic is None else stochastic
  assert variables["params"]["R"].shape == (size, size)
  fixed = variables[ortho_nn.FIXED]
  v0 = fixed["V"]
  # method None trains R directly: use stiefel_sgd on it.
  tx = optax_ortho.stiefel_sgd(0.05) if method is None else optax.sgd(0.05, 0.9)
  params = variables["params"]
  state = tx.init(params)

  @jax.jit
  def step(params, fixed, state, key):
    def loss(p):
      y, upd = layer.apply({"params": p, ortho_nn.FIXED: fixed}, X_DENSE,
                           rngs={ortho_nn.SOPT_RNG: key}, mutable=[ortho_nn.FIXED])
      return jnp.mean((y - 1.0) ** 2), upd[ortho_nn.FIXED]
    (value, fixed), g = jax.value_and_grad(loss, has_aux=True)(params)
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), fixed, state, value

  losses = []
  for i in range(30):
    params, fixed, state, value = step(params, fixed, state, jax.random.key(i))
    losses.append(float(value))
  assert losses[-1] < losses[0]
  if stochastic is None:
    np.testing.assert_array_equal(fixed["V"], v0)
  kernel = layer.apply({"params": params, ortho_nn.FIXED: fixed}, method="export")["kernel"]
  np.testing.assert_allclose(_angles(kernel), _angles(v0), atol=2e-5)
  np.testing.assert_allclose(optax_ortho.hyperspherical_energy(kernel),
                             optax_ortho.hyperspherical_energy(v0), rtol=1e-4)


@pytest.mark.parametrize(
    "stochastic", [None, pytest.param(7, marks=pytest.mark.slow)])
def test_linen_export_matches_plain_layers(stochastic):
  for layer, plain, x in (
      (ortho_nn.OrthogonalDense(6, stochastic=stochastic), nn.Dense(6), X_DENSE),
      (ortho_nn.OrthogonalConv(5, (3, 3), strides=2, stochastic=stochastic),
       nn.Conv(5, (3, 3), strides=2), X_CONV)):
    variables = layer.init(jax.random.key(0), x)
    # Move R away from the identity so the check means something.
    variables["params"]["R"] = variables["params"]["R"] + 0.3 * jax.random.normal(
        jax.random.key(4), variables["params"]["R"].shape)
    y = layer.apply(variables, x)
    y_plain = plain.apply({"params": layer.apply(variables, method="export")}, x)
    np.testing.assert_allclose(y, y_plain, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gram_schmidt", "householder"])
def test_sopt_episodes_fold_resample_and_restart(method):
  layer = ortho_nn.OrthogonalConv(4, (3, 3), stochastic=6, method=method,
                                  episode_length=3)
  variables = layer.init(jax.random.key(0), X_CONV)
  fixed = variables[ortho_nn.FIXED]
  # S-OPT starts at R = I: W = V.
  np.testing.assert_array_equal(variables["params"]["R"], jnp.eye(6))
  np.testing.assert_allclose(
      layer.apply(variables, method="export")["kernel"], fixed["V"], atol=1e-6)
  params = {"R": jax.random.normal(jax.random.key(5), (6, 6)),
            "bias": variables["params"]["bias"]}
  seen = []
  for i in range(7):
    y_before = layer.apply({"params": params, ortho_nn.FIXED: fixed}, X_CONV)
    y, upd = layer.apply({"params": params, ortho_nn.FIXED: fixed}, X_CONV,
                         rngs={"sopt": jax.random.key(9 + i)},
                         mutable=[ortho_nn.FIXED])
    # A fold never changes the layer's function.
    np.testing.assert_allclose(y, y_before, atol=1e-5)
    new = upd[ortho_nn.FIXED]
    changed = not np.array_equal(new["idx"], fixed["idx"])
    seen.append(changed)
    if changed:
      # Rotation folded into V and restarted at the identity: R0 = R.
      np.testing.assert_array_equal(new["R0"], params["R"])
    fixed = new
    # R keeps training between folds.
    params = dict(params, R=params["R"] + 0.1 * jax.random.normal(
        jax.random.key(20 + i), (6, 6)))
  # Resampled once per episode of 3 calls: at the 4th and 7th call.
  assert seen == [False, False, False, True, False, False, True]
  assert int(fixed["step"]) == 7


def test_unit_norm_and_options():
  layer = ortho_nn.OrthogonalDense(6, unit_norm=True)
  v = layer.init(jax.random.key(0), X_DENSE)[ortho_nn.FIXED]["V"]
  np.testing.assert_allclose(jnp.linalg.norm(v, axis=0), 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match="method='nope'"):
    ortho_nn.OrthogonalDense(6, method="nope").init(jax.random.key(0), X_DENSE)
  with pytest.raises(ValueError, match="stochastic"):
    ortho_nn.OrthogonalDense(6, stochastic=13).init(jax.random.key(0), X_DENSE)
  with pytest.raises(ValueError, match="episode_length"):
    ortho_nn.OrthogonalDense(6, stochastic=3, episode_length=0).init(
        jax.random.key(0), X_DENSE)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_authors_initialisations(method):
  x = jnp.ones((2, 3, 3, 16))
  for stochastic in (None, 20):
    variables = ortho_nn.OrthogonalConv(
        64, (3, 3), method=method, stochastic=stochastic).init(jax.random.key(0), x)
    r, v = variables["params"]["R"], variables[ortho_nn.FIXED]["V"]
    if method is None or stochastic is not None:
      np.testing.assert_array_equal(r, jnp.eye(r.shape[0]))
    else:
      # R ~ N(0, 1).
      assert abs(float(jnp.std(r)) - 1.0) < 0.02 and abs(float(jnp.mean(r))) < 0.02
    # V ~ N(0, 2 / fan_in), untruncated (some draws beyond 2 sigma).
    sigma = (2.0 / 144) ** 0.5
    assert abs(float(jnp.std(v)) / sigma - 1.0) < 0.03
    assert float(jnp.max(jnp.abs(v))) > 3.0 * sigma
  layer = ortho_nnx.OrthogonalLinear(12, 4, method=method, rngs=nnx.Rngs(0))
  if method is None:
    np.testing.assert_array_equal(layer.R[...], jnp.eye(12))
  else:
    assert float(jnp.std(layer.R[...])) > 0.7


def test_nnx_input_shape_error():
  layer = ortho_nnx.OrthogonalLinear(8, 4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"OrthogonalLinear.*8 features.*\(2, 5\)"):
    layer(jnp.ones((2, 5)))
  conv = ortho_nnx.OrthogonalConv(3, 4, (3, 3), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"OrthogonalConv.*3 features"):
    conv(jnp.ones((1, 5, 5, 2)))


def test_nnx_export_matches_plain_layers():
  conv = ortho_nnx.OrthogonalConv(3, 5, (3, 3), strides=2, rngs=nnx.Rngs(0))
  dense = ortho_nnx.OrthogonalLinear(12, 6, rngs=nnx.Rngs(1))
  for layer in (conv, dense):
    # Move R away from the identity so the check means something.
    layer.R[...] = layer.R[...] + 0.3 * jax.random.normal(
        jax.random.key(4), layer.R[...].shape)
  np.testing.assert_allclose(conv.to_conv()(X_CONV), conv(X_CONV), atol=1e-5)
  np.testing.assert_allclose(dense.to_linear()(X_DENSE), dense(X_DENSE), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("stochastic", [None, 4])
def test_nnx_layers_train_r_only(stochastic):
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.conv = ortho_nnx.OrthogonalConv(3, 4, (3, 3), stochastic=stochastic,
                                           episode_length=5, rngs=rngs)
      self.dense = ortho_nnx.OrthogonalLinear(4, 2, stochastic=stochastic and 3,
                                              episode_length=5, rngs=rngs)

    def __call__(self, x):
      return self.dense(jnp.mean(nnx.relu(self.conv(x)), axis=(1, 2)))

  model = Net(nnx.Rngs(0))
  v0 = model.dense.V[...].copy()
  energy0 = optax_ortho.hyperspherical_energy(model.conv.V[...])
  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  assert not jax.tree.leaves(nnx.state(opt.opt_state, ortho_nnx.OrthogonalFixed))

  @nnx.jit
  def step(model, opt):
    loss, g = nnx.value_and_grad(lambda m: jnp.mean((m(X_CONV) - 1.0) ** 2))(model)
    opt.update(model, g)
    return loss

  losses = [float(step(model, opt)) for _ in range(20)]
  assert losses[-1] < losses[0]
  if stochastic is None:
    np.testing.assert_array_equal(model.dense.V[...], v0)
  else:
    assert not np.array_equal(model.dense.V[...], v0)
  np.testing.assert_allclose(
      optax_ortho.hyperspherical_energy(model.conv.kernel()), energy0, rtol=1e-4)
  model.eval()
  y = model(X_CONV)
  np.testing.assert_allclose(y, model(X_CONV))  # eval: no resampling
  h = jnp.mean(nnx.relu(model.conv.to_conv()(X_CONV)), axis=(1, 2))
  np.testing.assert_allclose(model.dense.to_linear()(h), y, atol=1e-5)
