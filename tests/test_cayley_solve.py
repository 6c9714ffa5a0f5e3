"""cayley_solve: solves with I - S (S skew) by a pivot-free blocked inverse."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from optax_ortho._src import cayley_solve


def _skew(n, scale, seed):
  r = scale * jax.random.normal(jax.random.key(seed), (n, n))
  upper = jnp.triu(r)
  return upper - upper.T


def _reference(s, b, rows):
  m = np.eye(s.shape[0]) - np.asarray(s, np.float64)
  b = np.asarray(b, np.float64)
  return np.linalg.solve(m.T, b.T).T if rows else np.linalg.solve(m, b)


# Sizes on both sides of the leaf (64) and of the LU / inverse switch
# (k = n / 16), odd splits included.
@pytest.mark.slow
@settings(max_examples=14)
@given(n=st.sampled_from([1, 5, 64, 65, 97, 130, 256]),
       k=st.sampled_from([1, 7, 16, 64, 130]),
       rows=st.booleans(), scale=st.sampled_from([1e-3, 1.0, 30.0]),
       seed=st.integers(0, 999))
def test_solve_matches_float64(n, k, rows, scale, seed):
  s = _skew(n, scale, seed)
  shape = (k, n) if rows else (n, k)
  b = jax.random.normal(jax.random.key(seed + 1), shape)
  z = cayley_solve.solve(s, b, rows=rows)
  assert z.shape == b.shape and z.dtype == b.dtype
  ref = _reference(s, b, rows)
  # |(I - S)^{-1}| <= 1, so the error is relative to |b|, scaled by cond(I - S).
  cond = 1.0 + float(np.linalg.norm(np.asarray(s), 2))
  err = np.abs(np.asarray(z) - ref).max() / np.abs(np.asarray(b)).max()
  assert err < 2e-6 * cond * n ** 0.5, err


@pytest.mark.slow
@pytest.mark.parametrize("n", [65, 200, 256])
def test_inverse_of_unit_skew_and_of_positive_real_matrices(n):
  # I - S, and a general M with symmetric part >= I (I + P P^T + skew): the
  # class the pivot-free recursion is stable for.
  s = _skew(n, 1.0, 0)
  p = jax.random.normal(jax.random.key(1), (n, n)) / n ** 0.5
  for m in (jnp.eye(n) - s, jnp.eye(n) + p @ p.T + s):
    m_inv = cayley_solve.unit_symmetric_inverse(m)
    cond = float(np.linalg.cond(np.asarray(m, np.float64)))
    assert float(jnp.abs(m_inv @ m - jnp.eye(n)).max()) < 1e-6 * cond * n ** 0.5
    # |M^{-1}| <= 1 for a symmetric part >= I.
    assert float(jnp.linalg.norm(m_inv, 2)) <= 1.0 + 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("rows", [False, True])
@pytest.mark.parametrize("n,k", [(130, 40), (130, 4)])  # inverse, LU
def test_gradients_equal_the_lu_solves(n, k, rows):
  s0 = _skew(n, 1.0, 2)
  b0 = jax.random.normal(jax.random.key(3), (k, n) if rows else (n, k))
  w = jax.random.normal(jax.random.key(4), b0.shape)

  def lu(s, b):
    m = jnp.eye(n) - s
    return jnp.linalg.solve(m.T, b.T).T if rows else jnp.linalg.solve(m, b)

  def loss(fn):
    return lambda s, b: jnp.sum(w * jnp.sin(fn(s, b)))

  ours = jax.jit(jax.grad(loss(lambda s, b: cayley_solve.solve(s, b, rows=rows)),
                          (0, 1)))(s0, b0)
  ref = jax.grad(loss(lu), (0, 1))(s0, b0)
  for a, r in zip(ours, ref):
    np.testing.assert_allclose(a, r, atol=2e-5 * float(jnp.abs(r).max()))


def test_empty_and_leaf_sized():
  assert cayley_solve.solve(jnp.zeros((0, 0)), jnp.zeros((0, 3))).shape == (0, 3)
  assert cayley_solve.solve(jnp.zeros((4, 4)), jnp.zeros((4, 0))).shape == (4, 0)
  s = _skew(3, 1.0, 5)
  b = jnp.ones((3, 2))
  np.testing.assert_allclose(cayley_solve.solve(s, b), _reference(s, b, False),
                             atol=1e-6)


def test_no_recompilation_and_no_pivoting_loop_beyond_the_leaves():
  # One LAPACK inverse per leaf (256 = four leaves of 64), no LU of the whole
  # matrix: the solve runs at matrix-product speed.
  s = _skew(256, 1.0, 6)
  b = jnp.ones((256, 128))
  fn = jax.jit(cayley_solve.solve)
  hlo = fn.lower(s, b).compile().as_text()
  getrf = [line for line in hlo.splitlines()
           if 'custom_call_target="lapack_sgetrf' in line]
  assert len(getrf) == 4 and all("f32[64,64]" in g for g in getrf), getrf
  assert "lapack_strsm" in hlo  # the leaves' inverses, 64 x 64 only
  fn(s, b)
  fn(s + 1.0, b + 1.0)
  assert fn._cache_size() == 1
