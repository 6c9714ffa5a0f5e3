"""value_and_grads equals two jax.grad calls and runs one forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

import optax_ortho


def _mlp_losses(params, x, source):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  out = h @ params["w2"]
  task = jnp.mean((out - 1.0) ** 2)
  return task, optax_ortho.regularizers.l2_sp(params, source) + jnp.mean(h ** 2)


def _problem(seed):
  rng = np.random.default_rng(seed)
  params = {"w1": rng.standard_normal((4, 5)), "b1": rng.standard_normal(5),
            "w2": rng.standard_normal((5, 2))}
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  source = jax.tree.map(lambda a: a + 0.1, params)
  del source["w2"]
  return params, jnp.asarray(rng.standard_normal((3, 4)), jnp.float32), source


@given(st.integers(0, 2**31 - 1), st.booleans())
@pytest.mark.slow  # hypothesis over shapes: about 40 s on a loaded 2-core machine
def test_equals_two_separate_grads(seed, jit):
  params, x, source = _problem(seed)
  vg = optax_ortho.value_and_grads(_mlp_losses)
  if jit:
    vg = jax.jit(vg)
  (task, reg), (g_task, g_reg) = vg(params, x, source)
  want_task = jax.grad(lambda p: _mlp_losses(p, x, source)[0])(params)
  want_reg = jax.grad(lambda p: _mlp_losses(p, x, source)[1])(params)
  want = _mlp_losses(params, x, source)
  np.testing.assert_allclose(task, want[0], rtol=1e-6)
  np.testing.assert_allclose(reg, want[1], rtol=1e-6)
  for got, ref in ((g_task, want_task), (g_reg, want_reg)):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 got, ref)


def test_argnums_tuple_and_has_aux():
  def fn(a, b, c):
    return (jnp.sum(a * b), jnp.sum(a ** 2) + c), {"note": a.sum()}
  a, b = jnp.arange(3.0), jnp.ones(3)
  ((task, reg), aux), (g_task, g_reg) = optax_ortho.value_and_grads(
      fn, argnums=(0, 1), has_aux=True)(a, b, 2.0)
  assert float(task) == 3.0 and float(reg) == 7.0 and float(aux["note"]) == 3.0
  np.testing.assert_allclose(g_task[0], b)
  np.testing.assert_allclose(g_task[1], a)
  np.testing.assert_allclose(g_reg[0], 2 * a)
  np.testing.assert_allclose(g_reg[1], jnp.zeros(3))


def test_list_output_and_negative_argnums():
  fn = lambda c, w: [jnp.sum(w * c), jnp.sum(w ** 2)]
  (task, reg), (gt, gr) = optax_ortho.value_and_grads(fn, argnums=-1)(
      2.0, jnp.ones(2))
  np.testing.assert_allclose(gt, [2.0, 2.0])
  np.testing.assert_allclose(gr, [2.0, 2.0])


def _count(jaxpr, name):
  return sum(eqn.primitive.name == name for eqn in jaxpr.eqns)


def test_one_forward_pass_and_no_wasted_backward():
  """As many matmuls as jax.value_and_grad of the sum: the forward is shared,
  and the regulariser's pullback (it depends on the parameters alone) skips
  the network."""
  params, x, source = _problem(0)

  def fn(p):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return jnp.mean((h @ p["w2"] - 1.0) ** 2), optax_ortho.regularizers.l2_sp(p, source)

  ours = jax.make_jaxpr(optax_ortho.value_and_grads(fn))(params)
  plain = jax.make_jaxpr(jax.value_and_grad(lambda p: sum(fn(p))))(params)
  assert _count(ours.jaxpr, "dot_general") == _count(plain.jaxpr, "dot_general")
  assert _count(ours.jaxpr, "tanh") == 1


@pytest.mark.slow
def test_dense_zero_fallback_gives_same_result(monkeypatch):
  """If jax stops exposing symbolic zeros, dense zeros give the same values."""
  from optax_ortho._src import value_and_grads as vg_lib
  params, x, source = _problem(1)
  want = optax_ortho.value_and_grads(_mlp_losses)(params, x, source)
  monkeypatch.setattr(vg_lib, "_Zero", None)
  got = optax_ortho.value_and_grads(_mlp_losses)(params, x, source)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)


def test_bad_outputs_and_argnums():
  with pytest.raises(TypeError, match="pair"):
    optax_ortho.value_and_grads(lambda w: jnp.sum(w))(jnp.ones(2))
  with pytest.raises(TypeError, match="regularizer_loss.*scalar"):
    optax_ortho.value_and_grads(lambda w: (jnp.sum(w), w))(jnp.ones(2))
  with pytest.raises(TypeError, match="argnums"):
    optax_ortho.value_and_grads(lambda w: (w, w), argnums="w")
  with pytest.raises(ValueError, match="argnums 3"):
    optax_ortho.value_and_grads(lambda w: (w, w), argnums=3)(1.0)
