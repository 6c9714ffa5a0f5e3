"""stiefel_sgd: the shared contract, manifold invariants, orthogonal Procrustes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import optax_ortho
from tests import contract
from tests.contract import ContractCase
from tests.contract import contract_suite

CASE = ContractCase(
    name="stiefel_sgd",
    make=optax_ortho.stiefel_sgd,
    hyperparams={"learning_rate": 0.05, "momentum": 0.9},
    optimizer=None,
    skip={"rosenbrock": "the default mask puts the (4, 2) Rosenbrock matrix on"
          " the Stiefel manifold, where its minimum (all ones) is not; the"
          " unconstrained path is checked by test_rosenbrock_unmasked"},
)

test_contract = contract_suite([CASE])


def test_rosenbrock_unmasked():
  def no_manifold(p):
    return jax.tree.map(lambda _: False, p)
  contract.check_rosenbrock(ContractCase(
      name="stiefel_sgd[mask=none]",
      make=functools.partial(optax_ortho.stiefel_sgd, mask=no_manifold),
      hyperparams={"learning_rate": 1e-3, "momentum": 0.9}, optimizer=None,
      steps=2000))


def _orthonormal(key, n, p):
  return jax.nn.initializers.orthogonal()(key, (n, p))


def _run(tx, loss, params, steps):
  def step(_, carry):
    params, state = carry
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(lambda p: jax.lax.fori_loop(0, steps, step, (p, tx.init(p))))(
      params)


def _ortho_error(x):
  x = x.reshape((-1, x.shape[-1])).astype(jnp.float32)
  return float(jnp.abs(x.T @ x - jnp.eye(x.shape[-1])).max())


@pytest.mark.slow  # about 40 s on a loaded 2-core machine
@settings(max_examples=6)
@given(n=st.integers(1, 12), p_frac=st.floats(0.1, 1.0), seed=st.integers(0, 99))
def test_iterates_stay_on_manifold(n, p_frac, seed):
  p = max(1, int(n * p_frac))
  k1, k2 = jax.random.split(jax.random.key(seed))
  target = jax.random.normal(k2, (n, p))
  def loss(w):
    return jnp.sum(jnp.sin(3.0 * w["w"] - target)) + jnp.sum(w["b"] ** 2)
  params = {"w": _orthonormal(k1, n, p), "b": jnp.ones(3)}
  params, _ = _run(optax_ortho.stiefel_sgd(0.1, 0.9), loss, params, 30)
  assert _ortho_error(params["w"]) < 1e-5


@pytest.mark.slow  # 3000 steps: about 25 s on a loaded 2-core machine
def test_thousands_of_steps_stay_orthonormal():
  keys = jax.random.split(jax.random.key(0), 3)
  params = {"tall": _orthonormal(keys[0], 32, 8),
            "square": _orthonormal(keys[1], 16, 16),
            "conv": _orthonormal(keys[2], 18, 4).reshape(3, 3, 2, 4)}
  mask = {"tall": True, "square": True, "conv": True}
  def loss(w):
    return sum(jnp.sum(jnp.cos(5.0 * x)) for x in jax.tree.leaves(w))
  params, _ = _run(optax_ortho.stiefel_sgd(0.05, 0.9, mask=mask), loss, params,
                   3000)
  for x in jax.tree.leaves(params):
    assert _ortho_error(x) < 2e-6


@pytest.mark.slow
def test_random_init_is_projected_then_stays():
  x = jax.random.normal(jax.random.key(1), (10, 4)) * 3.0
  tx = optax_ortho.stiefel_sgd(0.0, 0.9)  # lr 0: only the projection moves it
  updates, _ = tx.update(jnp.zeros_like(x), tx.init(x), x)
  np.testing.assert_allclose(x + updates, optax_ortho.polar(x), atol=1e-5)
  # A small drift is corrected without changing the point much.
  q = optax_ortho.polar(x) * (1 + 1e-3)
  updates, _ = tx.update(jnp.zeros_like(q), tx.init(q), q)
  assert _ortho_error(q + updates) < 1e-5


@pytest.mark.slow  # about 100 s on a loaded 2-core machine
@settings(max_examples=6)
@given(n=st.integers(2, 8), extra=st.integers(0, 4), seed=st.integers(0, 99))
def test_procrustes_reaches_optimum(n, extra, seed):
  """min over X^T X = I of |X A - B|^2 has the optimum polar(B A^T)."""
  p = max(1, n - extra)
  ka, kb, kx = jax.random.split(jax.random.key(seed), 3)
  a = jax.random.normal(ka, (p, 2 * n))
  b = jax.random.normal(kb, (n, 2 * n))
  def loss(x):
    return jnp.sum(jnp.square(x @ a - b))
  x_star = optax_ortho.polar(b @ a.T)
  x0 = _orthonormal(kx, n, p)
  if n == p and jnp.linalg.det(x0) * jnp.linalg.det(x_star) < 0:
    # O(n) has two components and a continuous path stays in one.
    x0 = x0.at[:, 0].multiply(-1.0)
  tx = optax_ortho.stiefel_sgd(optax.cosine_decay_schedule(0.01, 1500), 0.9)
  x, _ = _run(tx, loss, x0, 1500)
  best, final = float(loss(x_star)), float(loss(x))
  assert final <= best + 0.01 * abs(best) + 1e-4, (best, final)
  assert _ortho_error(x) < 1e-5


@pytest.mark.slow
def test_nan_gradient_does_not_poison_state():
  params = {"w": _orthonormal(jax.random.key(0), 6, 3), "b": jnp.ones(3)}
  tx = optax_ortho.stiefel_sgd(0.1, 0.9)
  state = tx.init(params)
  grads = {"w": jnp.full((6, 3), jnp.nan), "b": jnp.ones(3)}
  updates, state = jax.jit(tx.update)(grads, state, params)
  assert not bool(jnp.isfinite(updates["w"]).all())
  assert bool(jnp.isfinite(updates["b"]).all())
  assert all(bool(jnp.isfinite(m).all()) for m in jax.tree.leaves(state))
  grads = {"w": jnp.ones((6, 3)), "b": jnp.ones(3)}
  updates, state = jax.jit(tx.update)(grads, state, params)
  assert bool(jnp.isfinite(updates["w"]).all())


def test_bad_input():
  with pytest.raises(ValueError, match="momentum"):
    optax_ortho.stiefel_sgd(0.1, momentum=1.5)
  tx = optax_ortho.stiefel_sgd(0.1, mask={"w": True})
  w = jnp.ones((2, 5))
  with pytest.raises(ValueError, match=r"\['w'\].*rows >= cols"):
    tx.update({"w": w}, tx.init({"w": w}), {"w": w})
  with pytest.raises(ValueError, match="structure"):
    tx.update({"w": w, "v": w}, tx.init({"w": w, "v": w}), {"w": w, "v": w})
  with pytest.raises(ValueError, match="params"):
    tx.update({"w": w}, tx.init({"w": w}))


def _authors_skew(x, m):
  # opt_ogd/architecture.py: their momentum is -M; W = What - What^T.
  mk = -m
  wk = mk @ x.T - 0.5 * x @ ((x.T @ mk) @ x.T)
  return wk - wk.T


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(8, 3), (5, 4)])  # rank-2p and direct solve
@pytest.mark.parametrize("scale", [0.1, 100.0])
def test_step_clamp_is_the_authors(shape, scale):
  x = np.asarray(_orthonormal(jax.random.key(0), *shape), np.float64)
  g = scale * np.asarray(jax.random.normal(jax.random.key(1), shape), np.float64)
  lr = 0.5
  w = _authors_skew(x, g)
  for clamp in (True, False):
    a = min(lr, 1.0 / (np.linalg.norm(w) + 1e-8)) if clamp else lr
    eye = np.eye(shape[0])
    # Exact Cayley step along their W (their momentum is -M, hence the signs).
    expected = np.linalg.solve(eye - 0.5 * a * w, (eye + 0.5 * a * w) @ x)
    tx = optax_ortho.stiefel_sgd(lr, 0.9, clamp_step=clamp)
    xj = jnp.asarray(x, jnp.float32)
    u, _ = tx.update(jnp.asarray(g, jnp.float32), tx.init(xj), xj)
    np.testing.assert_allclose(xj + u, expected, atol=2e-5)
  with pytest.raises(TypeError, match="clamp_step"):
    optax_ortho.stiefel_sgd(0.1, clamp_step=1)
