"""orthogonal_map, orthogonality_penalty, hyperspherical_energy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import optax_ortho
from optax_ortho._src.orthogonal_map import MAP_METHODS

methods = st.sampled_from(MAP_METHODS)


def _err(q):
  eye = jnp.eye(q.shape[-1])
  return float(jnp.abs(jnp.swapaxes(q, -1, -2) @ q - eye).max())


@pytest.mark.slow
@settings(max_examples=12)
@given(method=methods, n=st.sampled_from([1, 2, 3, 7, 16, 33]), batch=st.sampled_from([(), (3,), (2, 2)]),
       scale=st.sampled_from([1e-3, 1.0, 30.0]), seed=st.integers(0, 999))
def test_orthogonal_for_every_method_and_shape(method, n, batch, scale, seed):
  r = scale * jax.random.normal(jax.random.key(seed), batch + (n, n))
  q = optax_ortho.orthogonal_map(r, method=method)
  assert q.shape == r.shape and q.dtype == r.dtype
  assert _err(q) < 5e-6 * max(1, n) ** 0.5


@pytest.mark.slow
@pytest.mark.parametrize("method", MAP_METHODS)
def test_large_and_identity_and_jit(method):
  r = jax.random.normal(jax.random.key(0), (256, 256))
  assert _err(jax.jit(lambda r: optax_ortho.orthogonal_map(r, method=method))(r)) < 2e-5
  q = optax_ortho.orthogonal_map(jnp.eye(5), method=method)
  np.testing.assert_allclose(q, jnp.eye(5), atol=1e-6)
  q4 = optax_ortho.orthogonal_map(jnp.eye(4), method=method)
  # The authors' Householder QR has det (-1)^(n-1): its limit at I flips the last axis.
  expected = jnp.diag(jnp.array([1.0, 1.0, 1.0, -1.0])) if method == "householder" else jnp.eye(4)
  np.testing.assert_allclose(q4, expected, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("method", MAP_METHODS)
def test_differentiable_at_identity_and_random(method):
  w = jax.random.normal(jax.random.key(1), (6, 6))
  def loss(r):
    return jnp.sum(optax_ortho.orthogonal_map(r, method=method) * w)
  for r in (jnp.eye(6), jax.random.normal(jax.random.key(2), (6, 6))):
    g = jax.grad(loss)(r)
    assert bool(jnp.isfinite(g).all())
    # The gradient matches central finite differences along a random direction.
    d = jax.random.normal(jax.random.key(3), (6, 6))
    fd = (loss(r + 1e-2 * d) - loss(r - 1e-2 * d)) / 2e-2
    np.testing.assert_allclose(jnp.sum(g * d), fd, rtol=2e-2, atol=2e-2)


def test_bfloat16_kept():
  r = jax.random.normal(jax.random.key(0), (4, 4), jnp.bfloat16)
  assert optax_ortho.orthogonal_map(r).dtype == jnp.bfloat16


def test_bad_input():
  with pytest.raises(ValueError, match="'qr'.*cayley"):
    optax_ortho.orthogonal_map(jnp.eye(3), method="qr")
  with pytest.raises(ValueError, match="square"):
    optax_ortho.orthogonal_map(jnp.ones((3, 2)))
  with pytest.raises(TypeError, match="floating"):
    optax_ortho.orthogonal_map(jnp.eye(3, dtype=jnp.int32))
  with pytest.raises(ValueError, match="power"):
    optax_ortho.hyperspherical_energy(jnp.ones((3, 2)), power=-1.0)
  with pytest.raises(ValueError, match="convention"):
    optax_ortho.hyperspherical_energy(jnp.ones((3, 2)), convention="tf")
  # One neuron: no pairs, energy 0.
  assert float(optax_ortho.hyperspherical_energy(jnp.ones((3, 1)))) == 0.0


@pytest.mark.slow
@given(shape=st.sampled_from([(8, 5), (16, 16), (3, 3, 2, 6), (4, 12)]),
       power=st.sampled_from([0.0, 1.0, 2.0]), seed=st.integers(0, 999))
def test_energy_rotation_invariant(shape, power, seed):
  kw, kq = jax.random.split(jax.random.key(seed))
  w = jax.random.normal(kw, shape)
  fan_in = int(np.prod(shape[:-1]))
  q = optax_ortho.orthogonal_map(jax.random.normal(kq, (fan_in, fan_in)),
                                 method="lowdin")
  rotated = (q @ w.reshape(fan_in, -1)).reshape(shape)
  e = optax_ortho.hyperspherical_energy(w, power=power)
  e_rot = optax_ortho.hyperspherical_energy(rotated, power=power)
  np.testing.assert_allclose(e, e_rot, rtol=1e-4, atol=1e-5)
  # ... and to rescaling single neurons, but not to moving one neuron.
  scaled = w * jnp.linspace(0.5, 2.0, shape[-1])
  np.testing.assert_allclose(
      optax_ortho.hyperspherical_energy(scaled, power=power), e, rtol=1e-4,
      atol=1e-5)


@pytest.mark.slow
def test_energy_values():
  # Two antipodal unit neurons: distance 2, f_1 = 1/2 and f_0 = -log 2.
  w = jnp.array([[1.0, -1.0], [0.0, 0.0]])
  np.testing.assert_allclose(optax_ortho.hyperspherical_energy(w), 0.5)
  np.testing.assert_allclose(
      optax_ortho.hyperspherical_energy(w, power=0.0), -np.log(2.0), rtol=1e-6)
  # Orthonormal neurons beat clustered ones.
  clustered = jnp.array([[1.0, 0.9, 0.8], [0.0, 0.1, 0.2], [0.0, 0.0, 0.1]])
  assert optax_ortho.hyperspherical_energy(jnp.eye(3)) < (
      optax_ortho.hyperspherical_energy(clustered))
  # Duplicate neurons: large but finite.
  assert bool(jnp.isfinite(optax_ortho.hyperspherical_energy(jnp.ones((3, 4)))))


@pytest.mark.slow
def test_orthogonality_penalty():
  assert float(optax_ortho.orthogonality_penalty(jnp.eye(4, 3))) == 0.0
  w = jnp.diag(jnp.array([2.0, 1.0]))
  # W W^T - I = diag(3, 0).
  np.testing.assert_allclose(optax_ortho.orthogonality_penalty(w), 3.0)
  conv = jax.nn.initializers.orthogonal()(jax.random.key(0), (18, 5))
  np.testing.assert_allclose(
      optax_ortho.orthogonality_penalty(conv.reshape(3, 3, 2, 5)), 0.0, atol=1e-5)
  g = jax.grad(optax_ortho.orthogonality_penalty)(jnp.ones((4, 3)))
  assert bool(jnp.isfinite(g).all())


def _householder_reference(r):
  """The authors' loop (opt_hr) in NumPy, float64: Q = H_1 ... H_{n-1}."""
  r = np.array(r, np.float64)
  n = r.shape[0]
  q = np.eye(n)
  for k in range(n - 1):
    x = r[k:, k]
    u = x.copy()
    u[0] -= np.linalg.norm(x)
    v = u / np.linalg.norm(u)
    h = np.eye(n)
    h[k:, k:] -= 2.0 * np.outer(v, v)
    r = h @ r
    q = q @ h.T
  return q


def _gram_schmidt_rows(r):
  r = np.array(r, np.float64)
  basis = [r[0] / np.linalg.norm(r[0])]
  for v in r[1:]:
    w = v - sum((v @ b) * b for b in basis)
    basis.append(w / np.linalg.norm(w))
  return np.stack(basis)


def _cayley_triu(r):
  r = np.array(r, np.float64)
  s = np.triu(r) - np.triu(r).T
  eye = np.eye(r.shape[0])
  return (eye + s) @ np.linalg.inv(eye - s)


@pytest.mark.slow
@settings(max_examples=10)
@given(n=st.sampled_from([1, 2, 3, 5, 8]), seed=st.integers(0, 999))
def test_maps_are_the_authors_maps(n, seed):
  r = jax.random.normal(jax.random.key(seed), (n, n))
  for method, ref in (("householder", _householder_reference),
                      ("gram_schmidt", _gram_schmidt_rows),
                      ("cayley", _cayley_triu)):
    np.testing.assert_allclose(
        optax_ortho.orthogonal_map(r, method=method), ref(r), atol=2e-4,
        err_msg=method)


def test_cayley_gradient_lives_on_the_strict_upper_triangle():
  r = jax.random.normal(jax.random.key(0), (5, 5))
  g = jax.random.normal(jax.random.key(1), (5, 5))
  dr = jax.grad(lambda r: jnp.sum(optax_ortho.orthogonal_map(r) * g))(r)
  np.testing.assert_array_equal(jnp.tril(dr), 0.0)
  # At R = I (S = 0, Q = I + 2S + ...): dR = 2 (G - G^T) on the strict upper part.
  dr_i = jax.grad(lambda r: jnp.sum(optax_ortho.orthogonal_map(r) * g))(jnp.eye(5))
  np.testing.assert_allclose(dr_i, 2.0 * jnp.triu(g - g.T, 1), atol=1e-6)


@pytest.mark.slow
def test_householder_limit_where_the_authors_divide_by_zero():
  # Upper-triangular R (I included): their |u| = 0. The limit along R + tI.
  for n in (2, 3, 4):
    upper = jnp.triu(jax.random.normal(jax.random.key(n), (n, n)), 1)
    expected = jnp.diag(jnp.array([1.0] * (n - 1) + [(-1.0) ** (n - 1)]))
    for r in (upper, jnp.eye(n), upper + jnp.eye(n)):
      q = optax_ortho.orthogonal_map(r, method="householder")
      np.testing.assert_allclose(q, expected, atol=1e-6)
      # At a singular R the map is discontinuous: the limit is along R + tI.
      near = optax_ortho.orthogonal_map(r + 1e-3 * jnp.eye(n), method="householder")
      np.testing.assert_allclose(near, q, atol=1e-5)
    # A derivative at I, and it is finite.
    g = jax.grad(lambda r: jnp.sum(optax_ortho.orthogonal_map(
        r, method="householder")))(jnp.eye(n))
    assert bool(jnp.isfinite(g).all())


@pytest.mark.slow
def test_energy_authors_convention():
  w = jax.random.normal(jax.random.key(0), (6, 5))
  unit = w / jnp.sqrt(jnp.sum(w * w, 0) + 1e-4)
  d2 = 2.0 - 2.0 * unit.T @ unit
  iu = np.triu_indices(5, 1)
  for power, f in ((0.0, -jnp.log(d2)), (1.0, d2 ** -0.5), (2.0, 1.0 / d2)):
    np.testing.assert_allclose(
        optax_ortho.hyperspherical_energy(w, power=power, convention="authors"),
        jnp.mean(f[iu]), rtol=1e-5)
  # s = 0: theirs is -log(d^2), twice the paper's log(1/d) (up to their 1e-4).
  np.testing.assert_allclose(
      optax_ortho.hyperspherical_energy(w, power=0.0, convention="authors"),
      2.0 * optax_ortho.hyperspherical_energy(w, power=0.0), rtol=1e-3)


@pytest.mark.slow
def test_energy_zero_neuron_value_and_gradient_finite():
  w = jnp.concatenate([jax.random.normal(jax.random.key(0), (4, 3)),
                       jnp.zeros((4, 1))], axis=1)
  for power in (0.0, 1.0, 2.0):
    e, g = jax.value_and_grad(functools.partial(
        optax_ortho.hyperspherical_energy, power=power))(w)
    assert bool(jnp.isfinite(e)) and bool(jnp.isfinite(g).all())
    # The zero neuron sits at the origin: distance 1 to every unit neuron.
    others = optax_ortho.hyperspherical_energy(w[:, :3], power=power)
    # 6 of the 12 ordered pairs have distance 1: f_s(1) = 1, f_0(1) = 0.
    expected = (6 * others + 6 * (1.0 if power > 0 else 0.0)) / 12
    np.testing.assert_allclose(e, expected, rtol=1e-5)
