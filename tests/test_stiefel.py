"""stiefel_sgd: the shared contract, manifold invariants, orthogonal Procrustes."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import optax_ortho
from optax_ortho._src import stiefel
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


@pytest.mark.slow
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


@pytest.mark.slow  # 3000 steps
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


@pytest.mark.slow
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


def _cayley_reference(x, m, lr, clamp):
  """The exact Cayley step in float64 (W from the raw momentum, as Li et al.)."""
  x, m = np.asarray(x, np.float64), np.asarray(m, np.float64)
  p = m - 0.5 * x @ (x.T @ m)
  w = p @ x.T - x @ p.T
  a = min(lr, 1.0 / (np.linalg.norm(w) + 1e-8)) if clamp else lr
  eye = np.eye(x.shape[0])
  return np.linalg.solve(eye + 0.5 * a * w, (eye - 0.5 * a * w) @ x)


def _step(x, m, lr, clamp, solver):
  fn = jax.jit(lambda x, m: stiefel._cayley_step(
      x[None], m[None], jnp.float32(lr), clamp, solver)[0][0])
  return np.asarray(fn(x, m))


# (6, 6), (5, 4): the n x n system; (9, 3): the rank-2p form.
@pytest.mark.parametrize("shape", [(6, 6), (5, 4), (9, 3)])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_series_solve_matches_lu(shape, scale):
  """The product-only solve agrees with the LU one and with float64."""
  x = _orthonormal(jax.random.key(0), *shape)
  m = scale * jax.random.normal(jax.random.key(1), shape)
  ref = _cayley_reference(x, m, 0.5, True)
  series = _step(x, m, 0.5, True, "series")
  lu = _step(x, m, 0.5, True, "lu")
  np.testing.assert_allclose(series, ref, atol=1e-6)
  np.testing.assert_allclose(series, lu, atol=1e-6)
  np.testing.assert_allclose(series.T @ series, np.eye(shape[1]), atol=1e-6)


@pytest.mark.parametrize("lr", [1e-3, 10.0])  # series, then LU (a |W|_F > 1)
def test_unclamped_step_picks_an_exact_solver(lr):
  x = _orthonormal(jax.random.key(0), 9, 3)
  m = jax.random.normal(jax.random.key(1), (9, 3))
  ref = _cayley_reference(x, m, lr, False)
  np.testing.assert_allclose(_step(x, m, lr, False, "auto"), ref, atol=2e-6)


def _lapack_calls(fn, *args):
  return set(re.findall(r"custom_call @(\w+)", jax.jit(fn).lower(*args).as_text()))


def test_default_step_has_no_lapack_call():
  """Under the clamp the step is matrix products only: the one LAPACK call
  left is the SVD of the projection onto the manifold (a lax.cond branch that
  runs only when a parameter is far from it)."""
  x = _orthonormal(jax.random.key(0), 8, 3)
  tx = optax_ortho.stiefel_sgd(0.1)
  assert _lapack_calls(tx.update, x, tx.init(x), x) == {"lapack_sgesdd_ffi"}
  tx = optax_ortho.stiefel_sgd(0.1, clamp_step=False)  # LU kept for big steps
  assert "lapack_sgetrf_ffi" in _lapack_calls(tx.update, x, tx.init(x), x)


@pytest.mark.slow  # a compile per shape
@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 10), p_frac=st.floats(0.1, 1.0),
       log_scale=st.floats(-4.0, 4.0), lr=st.floats(1e-3, 2.0),
       clamp=st.booleans(), seed=st.integers(0, 99))
def test_cayley_step_is_exact(n, p_frac, log_scale, lr, clamp, seed):
  """Any momentum scale, either solver: the float64 Cayley step, orthonormal."""
  p = max(1, int(n * p_frac))
  k1, k2 = jax.random.split(jax.random.key(seed))
  x = _orthonormal(k1, n, p)
  m = 10.0 ** log_scale * jax.random.normal(k2, (n, p))
  ref = _cayley_reference(x, m, lr, clamp)
  out = _step(x, m, lr, clamp, "auto")
  np.testing.assert_allclose(out, ref, atol=5e-6)
  np.testing.assert_allclose(out.T @ out, np.eye(p), atol=5e-6)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(5, 5), (9, 3)])
def test_series_solve_is_exact_in_float64(shape):
  """The series takes as many terms as float64 needs (14 at the bound)."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    x = np.linalg.qr(rng.standard_normal((shape[0], shape[0])))[0][:, :shape[1]]
    m = 1e3 * rng.standard_normal(shape)  # the clamp binds: the worst case
    out = stiefel._cayley_step(jnp.asarray(x)[None], jnp.asarray(m)[None],
                               jnp.float64(0.5), True, "series")[0][0]
    assert out.dtype == jnp.float64
    np.testing.assert_allclose(out, _cayley_reference(x, m, 0.5, True),
                               atol=1e-13)


def test_bfloat16_gradients_keep_float32_params_on_manifold():
  """The update of a float32 parameter is float32 whatever the gradients'
  dtype: a bfloat16 update would be rounded off the manifold at every step."""
  keys = jax.random.split(jax.random.key(0), 3)
  params = {"tall": _orthonormal(keys[0], 12, 4), "square": _orthonormal(keys[1], 6, 6),
            "b": jnp.ones(4)}
  target = jax.random.normal(keys[2], (12, 4))
  def loss(w):
    return (jnp.sum(jnp.sin(3.0 * w["tall"] - target)) + jnp.sum(jnp.cos(w["square"]))
            + jnp.sum(w["b"] ** 2))
  tx = optax_ortho.stiefel_sgd(0.05, 0.9)

  def run(grad_dtype):
    def step(_, carry):
      p, state = carry
      g = jax.tree.map(lambda x: x.astype(grad_dtype), jax.grad(loss)(p))
      updates, state = tx.update(g, state, p)
      return optax.apply_updates(p, updates), state
    return jax.jit(lambda p: jax.lax.fori_loop(0, 50, step, (p, tx.init(p))))(params)[0]

  out = run(jnp.bfloat16)
  assert out["tall"].dtype == out["square"].dtype == jnp.float32
  updates, _ = tx.update(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params),
                         tx.init(params), params)
  assert updates["tall"].dtype == jnp.float32
  assert updates["b"].dtype == jnp.bfloat16  # off the manifold: as optax.sgd
  reference = run(jnp.float32)
  for k in ("tall", "square"):
    assert _ortho_error(out[k]) < 1e-6, (k, _ortho_error(out[k]))
    assert _ortho_error(out[k]) < 4 * max(_ortho_error(reference[k]), 1e-7)


def test_state_is_checked_against_the_gradients():
  w = {"w": _orthonormal(jax.random.key(0), 8, 4)}
  tx = optax_ortho.stiefel_sgd(0.1)
  with pytest.raises(TypeError, match="StiefelSGDState"):
    tx.update(w, None, w)
  with pytest.raises(TypeError, match="StiefelSGDState"):
    tx.update(w, optax.sgd(0.1, momentum=0.9).init(w), w)
  # A momentum of another shape, e.g. restored from another model, is not
  # broadcast: the error names the leaf and both shapes.
  state = tx.init(w)._replace(momentum={"w": jnp.zeros((1, 4))})
  with pytest.raises(ValueError, match=r"state\.momentum\['w'\].*\(1, 4\).*\(8, 4\)"):
    tx.update(w, state, w)
  state = tx.init(w)._replace(momentum={"v": jnp.zeros((8, 4))})
  with pytest.raises(ValueError, match="state.momentum.*'w'"):
    tx.update(w, state, w)


@pytest.mark.parametrize("shape", [(6, 6), (9, 3), (40, 4)])
def test_a_drifted_column_is_corrected(shape):
  """The manifold check before a step is by probes, not the full Gram matrix:
  one column off by 1e-5 (a single pair of entries of X^T X - I) is still
  found and corrected, so the step leaves X orthonormal."""
  x = _orthonormal(jax.random.key(0), *shape)
  x = x.at[:, -1].multiply(1 + 1e-5)
  assert _ortho_error(x) > 1e-5
  tx = optax_ortho.stiefel_sgd(0.05)
  g = jax.random.normal(jax.random.key(1), shape)
  updates, _ = jax.jit(tx.update)(g, tx.init(x), x)
  assert _ortho_error(x + updates) < 1e-6
