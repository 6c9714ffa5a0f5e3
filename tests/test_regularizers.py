"""optax_ortho.regularizers: L2-SP, feature distillation, PGD."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from optax_ortho import regularizers


def test_l2_sp_source_and_new_leaves():
  source = {"body": {"w": jnp.ones((2, 2))}}
  params = {"body": {"w": jnp.full((2, 2), 3.0)}, "head": jnp.array([1.0, 2.0])}
  # 0.5 * (alpha * 4 * 2^2 + beta * 5)
  assert float(regularizers.l2_sp(params, source)) == pytest.approx(0.5 * (16 + 5))
  assert float(regularizers.l2_sp(params, source, alpha=2.0, beta=0.0)) == pytest.approx(16)
  g = jax.grad(regularizers.l2_sp)(params, source)
  np.testing.assert_allclose(g["body"]["w"], 2.0 * jnp.ones((2, 2)))
  np.testing.assert_allclose(g["head"], params["head"])


def test_l2_sp_bf16_and_shape_mismatch():
  params = {"w": jnp.ones(3, jnp.bfloat16)}
  assert regularizers.l2_sp(params, {"w": jnp.zeros(3)}).dtype == jnp.float32
  with pytest.raises(ValueError, match=r"\['w'\].*shape"):
    regularizers.l2_sp(params, {"w": jnp.zeros(4)})


def test_feature_distillation_value_and_teacher_is_constant():
  s = {"a": jnp.ones((2, 3)), "b": jnp.zeros((2, 4, 4))}
  t = {"a": jnp.zeros((2, 3)), "b": jnp.ones((2, 4, 4))}
  # 0.5 * (6 / 2 + 32 / 2)
  assert float(regularizers.feature_distillation(s, t)) == pytest.approx(9.5)
  g_t = jax.grad(regularizers.feature_distillation, argnums=1)(s, t)
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g_t))
  with pytest.raises(ValueError, match="shape"):
    regularizers.feature_distillation(jnp.ones((2, 3)), jnp.ones((2, 4)))


def _linear_loss(w, x, y):
  return jnp.mean(jax.nn.softplus(-(x @ w) * y))


@pytest.mark.slow
@given(st.integers(0, 1000), st.floats(0.01, 0.5), st.integers(0, 5))
def test_pgd_stays_in_ball_and_increases_loss(seed, eps, steps):
  rng = np.random.default_rng(seed)
  w = jnp.asarray(rng.standard_normal(4), jnp.float32)
  x = jnp.asarray(rng.uniform(0, 1, (6, 4)), jnp.float32)
  y = jnp.asarray(rng.choice([-1.0, 1.0], 6), jnp.float32)
  x_adv = regularizers.pgd_perturb(_linear_loss, w, x, y, epsilon=eps,
                                   step_size=eps / 2, num_steps=steps,
                                   key=None, clip_min=0.0, clip_max=1.0)
  assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
  assert float(jnp.abs(x_adv - x).max()) <= eps + 1e-6
  assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
  # A linear model: every signed step raises the loss (or leaves it).
  assert float(_linear_loss(w, x_adv, y)) >= float(_linear_loss(w, x, y)) - 1e-6


def test_pgd_random_start_jit_and_adversarial_gradient():
  w, x, y = jnp.ones(4), jnp.zeros((3, 4)), jnp.ones(3)
  f = jax.jit(lambda w, k: regularizers.adversarial(
      _linear_loss, w, x, y, epsilon=0.1, step_size=0.05, num_steps=3, key=k))
  a = f(w, jax.random.key(0))
  b = f(w, jax.random.key(1))
  assert np.isfinite(float(a)) and float(a) > float(_linear_loss(w, x, y))
  assert float(a) != float(b)
  g = jax.grad(lambda w: regularizers.adversarial(
      _linear_loss, w, x, y, epsilon=0.1, step_size=0.05, num_steps=2, key=None))(w)
  assert np.isfinite(np.asarray(g)).all()


def test_pgd_bad_arguments():
  w, x, y = jnp.ones(2), jnp.zeros((1, 2)), jnp.ones(1)
  with pytest.raises(ValueError, match="epsilon.*-0.1"):
    regularizers.pgd_perturb(_linear_loss, w, x, y, epsilon=-0.1,
                             step_size=0.1, num_steps=1, key=None)
  with pytest.raises(ValueError, match="num_steps"):
    regularizers.pgd_perturb(_linear_loss, w, x, y, epsilon=0.1,
                             step_size=0.1, num_steps=1.5, key=None)
  with pytest.raises(TypeError, match="floating"):
    regularizers.pgd_perturb(_linear_loss, w, jnp.zeros((1, 2), jnp.int32), y,
                             epsilon=0.1, step_size=0.1, num_steps=1, key=None)
