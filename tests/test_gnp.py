"""gradient_norm_penalty: the two-point formula, SAM at alpha = 1, contract."""

import functools
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import optax_ortho
from optax_ortho._src.gnp import gnp_perturbed_params
from tests.contract import ContractCase
from tests.contract import contract_suite

gnp = optax_ortho.gradient_norm_penalty

# ------------------------------------------------------------------ problem
# A quadratic plus a non-linear term with a gradient known in closed form:
# L(w, b) = 0.5 w.A w + c.w + sum(sin(b)) + 0.25 |b|^4, two leaves.

_RNG = np.random.default_rng(0)
_M = _RNG.standard_normal((6, 6))
_A = _M @ _M.T / 6 + np.eye(6)  # symmetric positive definite
_C = _RNG.standard_normal(6)


def _loss(params):
  w, b = params["w"].reshape(-1), params["b"]
  quad = 0.5 * w @ (jnp.asarray(_A, jnp.float32) @ w) + jnp.asarray(_C, jnp.float32) @ w
  return quad + jnp.sum(jnp.sin(b)) + 0.25 * jnp.sum(b * b) ** 2


def _grad_closed_form(w, b):
  """Analytic gradient in float64 numpy."""
  gw = (_A @ w.reshape(-1) + _C).reshape(w.shape)
  gb = np.cos(b) + np.sum(b * b) * b
  return gw, gb


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.standard_normal((2, 3)), jnp.float32),
          "b": jnp.asarray(rng.standard_normal(4), jnp.float32)}


def _apply(tx, params, updates=None, **kw):
  grads = jax.grad(_loss)(params) if updates is None else updates
  out, _ = tx.update(grads, tx.init(params), params,
                     grad_fn=jax.grad(_loss), **kw)
  return out


@pytest.mark.parametrize("alpha,radius",
                         [(0.0, 0.05), (0.3, 0.1), (0.8, 0.05), (1.0, 0.2),
                          (1.5, 0.5)])
def test_matches_closed_form_two_point_formula(alpha, radius):
  params = _params()
  out = jax.jit(lambda p: _apply(gnp(alpha, radius), p))(params)

  w, b = (np.asarray(params[k], np.float64) for k in ("w", "b"))
  g1w, g1b = _grad_closed_form(w, b)
  norm = np.sqrt(np.sum(g1w ** 2) + np.sum(g1b ** 2))  # global, both leaves
  g2w, g2b = _grad_closed_form(w + radius * g1w / norm, b + radius * g1b / norm)
  np.testing.assert_allclose(out["w"], (1 - alpha) * g1w + alpha * g2w,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["b"], (1 - alpha) * g1b + alpha * g2b,
                             rtol=1e-5, atol=1e-5)


_injected = optax.inject_hyperparams(gnp)


@jax.jit
def _injected_out(params, alpha, radius):
  tx = _injected(alpha=0.8, radius=0.05)
  state = tx.init(params)
  state.hyperparams["alpha"] = alpha
  state.hyperparams["radius"] = radius
  out, _ = tx.update(jax.grad(_loss)(params), state, params,
                     grad_fn=jax.grad(_loss))
  return out


@given(a1=st.floats(0.0, 2.0), a2=st.floats(0.0, 2.0), t=st.floats(0.0, 1.0),
       radius=st.floats(0.0, 0.5), seed=st.integers(0, 2 ** 16))
def test_affine_in_alpha(a1, a2, t, radius, seed):
  params = _params(seed)
  mixed = _injected_out(params, t * a1 + (1 - t) * a2, radius)
  o1, o2 = _injected_out(params, a1, radius), _injected_out(params, a2, radius)
  for k in params:
    np.testing.assert_allclose(mixed[k], t * o1[k] + (1 - t) * o2[k],
                               rtol=1e-4, atol=1e-4)


def test_alpha_zero_returns_g1_exactly():
  params = _params()
  g1 = jax.grad(_loss)(params)
  for out in (_apply(gnp(0.0, 0.1), params),  # static: no second pass
              _injected_out(params, 0.0, 0.1)):  # traced alpha
    for k in params:
      np.testing.assert_array_equal(out[k], g1[k])


def test_alpha_zero_static_does_not_call_grad_fn():
  params = _params()
  g1 = jax.grad(_loss)(params)
  tx = gnp(alpha=0.0)

  def grad_fn(p):
    raise AssertionError("grad_fn called")

  out, _ = tx.update(g1, tx.init(params), params, grad_fn=grad_fn)
  assert out is g1


def test_alpha_one_equals_optax_sam_opaque():
  radius, lr = 0.1, 0.05
  ours = optax.chain(gnp(alpha=1.0, radius=radius), optax.sgd(lr, momentum=0.9))
  sam = optax.contrib.sam(
      optax.sgd(lr, momentum=0.9),
      optax.chain(optax.contrib.normalize(), optax.sgd(radius)),
      sync_period=2, opaque_mode=True)

  def run(tx, grad_fn):
    params = _params(3)
    state = tx.init(params)
    step_updates = []
    for _ in range(5):
      grads = jax.grad(_loss)(params)
      updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
      params = optax.apply_updates(params, updates)
      step_updates.append(updates)
    return params, step_updates

  p_ours, u_ours = run(ours, jax.grad(_loss))
  p_sam, u_sam = run(sam, jax.grad(lambda p, _: _loss(p)))
  for a, b in zip(u_ours, u_sam):
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7)
  for k in p_ours:
    np.testing.assert_allclose(p_ours[k], p_sam[k], rtol=1e-5, atol=1e-6)


def test_zero_gradient_is_safe():
  params = _params()
  zeros = jax.tree.map(jnp.zeros_like, params)
  out = jax.jit(lambda p, g: _apply(gnp(0.8, 0.1), p, g))(params, zeros)
  g_at_params = jax.grad(_loss)(params)
  for k in params:
    assert bool(jnp.isfinite(out[k]).all())
    # g1 = 0: no perturbation, so g2 is the gradient at params.
    np.testing.assert_allclose(out[k], 0.8 * g_at_params[k], rtol=1e-6)


def test_tiny_gradient_perturbation_bounded_by_radius():
  params = _params()
  tiny = jax.tree.map(lambda p: jnp.full_like(p, 1e-30), params)
  seen = []

  def grad_fn(p):
    seen.append(p)
    return jax.grad(_loss)(p)

  tx = gnp(0.8, 0.1)
  out, _ = tx.update(tiny, tx.init(params), params, grad_fn=grad_fn)
  step = optax.tree.norm(jax.tree.map(jnp.subtract, seen[0], params))
  assert float(step) <= 0.1 * (1 + 1e-5)
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(out))


def test_nan_in_one_leaf_stays_in_that_leaf():
  params = _params()
  g1 = jax.grad(_loss)(params)
  g1["b"] = g1["b"].at[0].set(jnp.nan)
  tx = gnp(0.8, 0.1)
  out, state = jax.jit(
      lambda g, s, p: tx.update(g, s, p, grad_fn=jax.grad(_loss)))(
          g1, tx.init(params), params)
  assert bool(jnp.isnan(out["b"][0]))
  assert bool(jnp.isfinite(out["b"][1:]).all())
  assert bool(jnp.isfinite(out["w"]).all())
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state))


def test_schedules_follow_the_step_count():
  params = _params()
  g1 = jax.grad(_loss)(params)
  alpha = optax.linear_schedule(0.0, 1.0, transition_steps=2)
  radius = optax.linear_schedule(0.1, 0.3, transition_steps=2)
  tx = gnp(alpha, radius)
  state = tx.init(params)
  outs = []
  for _ in range(3):
    out, state = tx.update(g1, state, params, grad_fn=jax.grad(_loss))
    outs.append(out)
  assert int(state.count) == 3
  injected = optax.inject_hyperparams(gnp)(alpha=alpha, radius=radius)
  injected_state = injected.init(params)
  for step, out in enumerate(outs):
    ref = _apply(gnp(float(alpha(step)), float(radius(step))), params)
    inj, injected_state = injected.update(g1, injected_state, params,
                                          grad_fn=jax.grad(_loss))
    for k in params:
      np.testing.assert_allclose(out[k], ref[k], rtol=1e-6, atol=1e-7)
      np.testing.assert_allclose(inj[k], ref[k], rtol=1e-6, atol=1e-7)


def test_inject_hyperparams_keeps_has_aux_static():
  params = _params()
  g1 = jax.grad(_loss)(params)
  tx = optax.inject_hyperparams(gnp)(alpha=0.5, radius=0.1, has_aux=True)
  aux_fn = jax.grad(lambda p: (_loss(p), {"stats": jnp.ones(2)}), has_aux=True)
  out, _ = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=aux_fn))(
      g1, tx.init(params), params)
  ref = _apply(gnp(0.5, 0.1), params)
  for k in params:
    np.testing.assert_allclose(out[k], ref[k], rtol=1e-6, atol=1e-7)


def test_ignores_extra_args_of_other_transforms():
  params = _params()
  ref = _apply(gnp(), params)
  out = _apply(gnp(), params, regularizer_grads=params, logits=jnp.ones(3))
  for k in params:
    np.testing.assert_array_equal(out[k], ref[k])


def test_bfloat16_in_bfloat16_out():
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _params())
  def loss(p):
    return _loss(jax.tree.map(lambda x: x.astype(jnp.float32), p))
  grads = jax.grad(loss)(params)
  tx = gnp()
  out, _ = tx.update(grads, tx.init(params), params, grad_fn=jax.grad(loss))
  assert all(o.dtype == jnp.bfloat16 for o in jax.tree.leaves(out))


# ------------------------------------------------------------------ errors


def test_missing_params_or_grad_fn():
  params = _params()
  g1 = jax.grad(_loss)(params)
  tx = gnp()
  state = tx.init(params)
  with pytest.raises(ValueError, match="needs params"):
    tx.update(g1, state, None, grad_fn=jax.grad(_loss))
  with pytest.raises(ValueError, match="grad_fn"):
    tx.update(g1, state, params)
  with pytest.raises(TypeError, match="grad_fn must be callable"):
    tx.update(g1, state, params, grad_fn=g1)


def test_mismatched_structures():
  params = _params()
  g1 = jax.grad(_loss)(params)
  tx = gnp()
  state = tx.init(params)
  with pytest.raises(ValueError, match="params must have the structure"):
    tx.update(g1, state, {"w": params["w"]}, grad_fn=jax.grad(_loss))
  aux_fn = jax.grad(lambda p: (_loss(p), 1.0), has_aux=True)
  with pytest.raises(ValueError, match="has_aux=True"):
    tx.update(g1, state, params, grad_fn=aux_fn)
  with pytest.raises(ValueError, match=r"pair \(grads, aux\)"):
    gnp(has_aux=True).update(g1, state, params, grad_fn=jax.grad(_loss))
  with pytest.raises(TypeError, match="floating"):
    tx.update({"w": jnp.ones(3, jnp.int32)}, state, {"w": jnp.ones(3)},
              grad_fn=jax.grad(_loss))


@pytest.mark.parametrize("kwargs,error,match", [
    ({"alpha": -0.1}, ValueError, "alpha must be a finite number >= 0, got -0.1"),
    ({"alpha": float("nan")}, ValueError, "alpha"),
    ({"alpha": "0.8"}, TypeError, "alpha must be a float or an optax schedule"),
    ({"radius": -1.0}, ValueError, "radius must be a finite number >= 0"),
    ({"radius": True}, TypeError, "radius"),
    ({"eps": 0.0}, ValueError, "eps must be a finite number > 0, got 0.0"),
    ({"has_aux": 1}, TypeError, "has_aux must be a bool"),
])
def test_bad_hyperparameters(kwargs, error, match):
  with pytest.raises(error, match=match):
    gnp(**kwargs)


@pytest.mark.parametrize("bad,error,match", [
    (0, ValueError, "refresh_every must be a positive Python int, got 0"),
    (2.0, ValueError, "refresh_every"),
    (jnp.ones(2, jnp.int32), TypeError, "refresh_every must be a positive int"),
    (jnp.float32(2.0), TypeError, "refresh_every"),
])
def test_bad_refresh_every(bad, error, match):
  with pytest.raises(error, match=match):
    gnp(refresh_every=bad)


def test_missing_grad_fn_names_where_to_pass_it():
  params = _params()
  g1 = jax.grad(_loss)(params)
  tx = gnp()
  with pytest.raises(ValueError, match=r"optax_ortho\.apply_gradients") as err:
    tx.update(g1, tx.init(params), params)
  assert "optimizer.update(model, grads, grad_fn=grad_fn)" in str(err.value)
  with pytest.raises(ValueError, match="not both"):
    tx.update(g1, tx.init(params), params, grad_fn=jax.grad(_loss), perturbed_grads=g1)
  with pytest.raises(ValueError, match=r"perturbed_grads\['w'\] has shape"):
    tx.update(g1, tx.init(params), params, perturbed_grads={"b": g1["b"], "w": g1["b"]})


def test_state_checked_against_the_gradients():
  params = _params()
  g1 = jax.grad(_loss)(params)
  with pytest.raises(TypeError, match="GradientNormPenaltyState"):
    gnp().update(g1, optax.EmptyState(), params, grad_fn=jax.grad(_loss))
  with pytest.raises(ValueError, match="made with refresh_every=1"):
    gnp(refresh_every=3).update(g1, gnp().init(params), params, grad_fn=jax.grad(_loss))
  with pytest.raises(ValueError, match="made with refresh_every > 1"):
    gnp().update(g1, gnp(refresh_every=3).init(params), params, grad_fn=jax.grad(_loss))
  tx = gnp(refresh_every=3)
  other = tx.init({"w": jnp.ones((2, 4)), "b": params["b"]})
  with pytest.raises(ValueError, match=r"state\.orthogonal\['w'\] has shape \(2, 4\)"):
    tx.update(g1, other, params, grad_fn=jax.grad(_loss))


# ------------------------------------------------------------ refresh_every


def _counting_grad_fn(calls):
  def grad_fn(p):
    jax.debug.callback(lambda: calls.append(1))
    return jax.grad(_loss)(p)
  return grad_fn


def test_refresh_steps_are_exact_and_reused_steps_are_not():
  k, steps = 3, 7
  tx, exact_tx = gnp(0.8, 0.1, refresh_every=k), gnp(0.8, 0.1)
  calls = []
  step = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=_counting_grad_fn(calls)))
  params, state = _params(1), tx.init(_params(1))
  for i in range(steps):
    g1 = jax.grad(_loss)(params)
    out, state = step(g1, state, params)
    jax.effects_barrier()
    exact = _apply(exact_tx, params)
    close = all(np.allclose(out[n], exact[n], rtol=1e-5, atol=1e-6) for n in params)
    assert close == (i % k == 0), i
    params = jax.tree.map(lambda p, u: p - 0.05 * u, params, out)
  assert len(calls) == len(range(0, steps, k))
  assert step._cache_size() == 1  # one trace, the branch chosen at run time


def _conv_loss(p):
  x = jnp.arange(25.0).reshape(1, 1, 5, 5) / 25.0
  return jnp.sum(jnp.tanh(jax.lax.conv(x, p["k"], (1, 1), "SAME")) ** 2)


def test_convolution_branch_skips_the_second_gradient_on_cpu_too():
  # A kernel-gradient convolution inside a conditional branch is rewritten
  # channels-last on CPU (XLA:CPU runs the other layouts slowly there): the
  # second gradient runs on refresh steps only, with the branch's values.
  params = {"k": jnp.asarray(np.random.default_rng(0).standard_normal((1, 1, 3, 3)),
                             jnp.float32)}
  calls = []

  def grad_fn(p):
    jax.debug.callback(lambda: calls.append(1))
    return jax.grad(_conv_loss)(p)

  tx = gnp(0.8, 0.1, refresh_every=3)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=grad_fn))
  state = tx.init(params)
  for i in range(4):
    out, state = step(jax.grad(_conv_loss)(params), state, params)
    exact, _ = gnp(0.8, 0.1).update(jax.grad(_conv_loss)(params), gnp().init(params), params,
                                    grad_fn=jax.grad(_conv_loss))
    # Refresh steps (0 and 3) are exact; reused ones follow the stored direction.
    assert np.allclose(out["k"], exact["k"], rtol=1e-5, atol=1e-6) == (i % 3 == 0), i
    params = jax.tree.map(lambda p, u: p - 0.1 * u, params, out)
  jax.effects_barrier()
  assert len(calls) == 2


def _remat_conv_loss(p):
  return jax.checkpoint(_conv_loss)(p)


@pytest.mark.parametrize("loss", [_conv_loss, _remat_conv_loss])
def test_every_platform_branches_unless_a_convolution_stays_nested_on_cpu(loss):
  """A conditional holds the second gradient on every platform.

  On CPU a convolution the rewrite cannot reach (here inside ``remat``)
  makes it compute both branches and select instead.
  """
  params = {"k": jnp.ones((1, 1, 3, 3))}

  def cases(tx, platform):
    def update(g, s, p):
      return tx.update(g, s, p, grad_fn=jax.grad(loss))
    args = (jax.grad(loss)(params), tx.init(params), params)
    exported = jax.export.export(jax.jit(update), platforms=(platform,))(*args)
    return exported.mlir_module().count("stablehlo.case")

  cpu = cases(gnp(refresh_every=3), "cpu")
  for platform in ("cuda", "tpu"):
    assert cases(gnp(refresh_every=3), platform) == cpu + (1 if loss is _remat_conv_loss else 0)
  assert cpu >= 1
  assert cases(gnp(), "cuda") == 0


def test_reuse_is_exact_on_a_quadratic_along_the_same_direction():
  # L = 0.5 w.A w: g2 - g1 = r A u exactly, so a reused step whose g1 has the
  # refresh step's direction (another norm) equals the exact two-point step.
  def loss(p):
    w = p["w"].reshape(-1)
    return 0.5 * w @ (jnp.asarray(_A, jnp.float32) @ w) + 0.1 * jnp.sum(p["b"] ** 2)
  params = _params(2)
  g1 = jax.grad(loss)(params)
  radius = optax.linear_schedule(0.1, 0.3, transition_steps=1)  # reuse uses its own radius
  tx = gnp(0.7, radius, refresh_every=2)
  _, state = tx.update(g1, tx.init(params), params, grad_fn=jax.grad(loss))
  far = jax.tree.map(lambda p: 3.0 * p, params)  # the gradient scales by 3
  g_far = jax.grad(loss)(far)
  reused, _ = tx.update(g_far, state, far, grad_fn=jax.grad(loss))
  exact, _ = gnp(0.7, 0.3).update(g_far, gnp().init(far), far, grad_fn=jax.grad(loss))
  for n in params:
    np.testing.assert_allclose(reused[n], exact[n], rtol=1e-5, atol=1e-5)


def test_reuse_keeps_the_orthogonal_part_and_follows_the_new_gradient():
  params = _params(4)
  tx = gnp(1.0, 0.2, refresh_every=2)
  g1 = jax.grad(_loss)(params)
  _, state = tx.update(g1, tx.init(params), params, grad_fn=jax.grad(_loss))
  w = state.orthogonal
  unit = jax.tree.map(lambda g: g / optax.tree.norm(g1), g1)
  assert abs(float(optax.tree.vdot(w, unit))) < 1e-5 * float(optax.tree.norm(w))
  g_new = jax.tree.map(lambda g: g + 1.0, g1)
  out, state2 = tx.update(g_new, state, params, grad_fn=jax.grad(_loss))
  u_new = jax.tree.map(lambda g: g / optax.tree.norm(g_new), g_new)
  ref = jax.tree.map(lambda g, u, o: g + 0.2 * (state.parallel * u + o), g_new, u_new, w)
  for n in params:
    np.testing.assert_allclose(out[n], ref[n], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(state2.orthogonal[n], w[n])


def test_refresh_with_non_finite_second_gradient_keeps_the_stored_direction():
  params = _params()
  g1 = jax.grad(_loss)(params)
  tx = gnp(0.8, 0.1, refresh_every=2)
  _, state = tx.update(g1, tx.init(params), params, grad_fn=jax.grad(_loss))
  _, state = tx.update(g1, state, params, grad_fn=jax.grad(_loss))
  def nan_fn(p):
    return jax.tree.map(lambda g: g * jnp.nan, jax.grad(_loss)(p))
  out, state3 = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=nan_fn))(g1, state, params)
  assert not bool(jnp.isfinite(out["w"]).any())
  for a, b in zip(jax.tree.leaves(state3[1:]), jax.tree.leaves(state[1:])):
    np.testing.assert_array_equal(a, b)
  # A NaN leaf of g1 in a reused step stays in that leaf.
  g_nan = dict(g1, b=g1["b"].at[0].set(jnp.nan))
  out, state4 = tx.update(g_nan, state3, params, grad_fn=jax.grad(_loss))
  assert bool(jnp.isnan(out["b"][0])) and bool(jnp.isfinite(out["b"][1:]).all())
  assert bool(jnp.isfinite(out["w"]).all())
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state4))


def test_refresh_every_under_inject_hyperparams_and_normalize_g1():
  params = _params()
  ref_tx = gnp(0.6, 0.1, refresh_every=2, normalize_g1=True)
  static = optax.inject_hyperparams(gnp, static_args=("refresh_every",))(
      alpha=0.6, radius=0.1, refresh_every=2, normalize_g1=True)
  dynamic = optax.inject_hyperparams(gnp)(alpha=0.6, radius=0.1, refresh_every=2,
                                          normalize_g1=True)
  states = [tx.init(params) for tx in (ref_tx, static, dynamic)]
  for _ in range(3):
    g1 = jax.grad(_loss)(params)
    outs = []
    for i, tx in enumerate((ref_tx, static, dynamic)):
      out, states[i] = jax.jit(
          lambda g, s, p, tx=tx: tx.update(g, s, p, grad_fn=jax.grad(_loss)))(
              g1, states[i], params)
      outs.append(out)
    for out in outs[1:]:
      for n in params:
        np.testing.assert_allclose(out[n], outs[0][n], rtol=1e-6, atol=1e-7)
    params = jax.tree.map(lambda p, u: p - 0.1 * u, params, outs[0])


def test_has_aux_with_refresh_every():
  params = _params()
  aux_fn = jax.grad(lambda p: (_loss(p), {"stats": jnp.ones(2)}), has_aux=True)
  a, b = gnp(0.5, 0.1, refresh_every=2, has_aux=True), gnp(0.5, 0.1, refresh_every=2)
  sa, sb = a.init(params), b.init(params)
  for _ in range(3):
    g1 = jax.grad(_loss)(params)
    oa, sa = jax.jit(lambda g, s, p: a.update(g, s, p, grad_fn=aux_fn))(g1, sa, params)
    ob, sb = b.update(g1, sb, params, grad_fn=jax.grad(_loss))
    for n in params:
      np.testing.assert_allclose(oa[n], ob[n], rtol=1e-6, atol=1e-7)
    params = jax.tree.map(lambda p, u: p - 0.1 * u, params, oa)


# ---------------------------------------------------------- split steps


def test_perturbed_grads_equal_grad_fn():
  params = _params()
  tx = gnp(0.8, 0.1, refresh_every=2)
  s1 = s2 = tx.init(params)
  for _ in range(3):
    g1 = jax.grad(_loss)(params)
    g2 = jax.jit(jax.grad(_loss))(gnp_perturbed_params(g1, params, 0.1))
    o1, s1 = tx.update(g1, s1, params, grad_fn=jax.grad(_loss))
    o2, s2 = jax.jit(lambda g, s, p, q: tx.update(g, s, p, perturbed_grads=q))(
        g1, s2, params, g2)
    for n in params:
      np.testing.assert_allclose(o2[n], o1[n], rtol=1e-6, atol=1e-7)
    params = jax.tree.map(lambda p, u: p - 0.1 * u, params, o1)


def test_perturbed_params_zero_and_non_finite_gradient():
  params = _params()
  zeros = jax.tree.map(jnp.zeros_like, params)
  for g in (zeros, dict(zeros, b=zeros["b"].at[0].set(jnp.inf))):
    out = gnp_perturbed_params(g, params, 0.5)
    for n in params:
      np.testing.assert_array_equal(out[n], params[n])
  with pytest.raises(ValueError, match="radius"):
    gnp_perturbed_params(params, params, -1.0)


# ---------------------------------------------------------- data parallel

_X = jnp.asarray(np.random.default_rng(5).standard_normal((16, 3)), jnp.float32)
_Y = jnp.asarray(np.random.default_rng(6).standard_normal((16, 2)), jnp.float32)


def _batch_loss(params, x, y):
  h = jnp.tanh(x @ params["w"].T)  # w: (2, 3)
  return jnp.mean((h + params["b"][:2] - y) ** 2)


def _global_run(tx, steps=3):
  params, state = _params(), tx.init(_params())
  for _ in range(steps):
    grads = jax.grad(_batch_loss)(params, _X, _Y)
    grad_fn = jax.grad(lambda p: _batch_loss(p, _X, _Y))
    updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
    params = optax.apply_updates(params, updates)
  return params


def _device_step(tx, axis_name):
  def step(params, state, x, y):
    grads = jax.lax.pmean(jax.grad(_batch_loss)(params, x, y), axis_name)
    grad_fn = jax.grad(lambda p: _batch_loss(p, x, y))
    updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state
  return step


@pytest.mark.parametrize("refresh_every", [1, 2])
def test_pmap_eight_devices_equal_one(refresh_every):
  n = 8
  assert jax.device_count() >= n
  def make(axis):
    return optax.chain(
        gnp(0.8, 0.1, refresh_every=refresh_every, axis_name=axis), optax.sgd(0.1))
  ref = _global_run(make(None))
  results = {}
  for axis in ("batch", None):
    tx = make(axis)
    step = jax.pmap(_device_step(tx, "batch"), axis_name="batch")
    def replicate(t):
      return jax.tree.map(lambda a: jnp.stack([a] * n), t)
    params, state = replicate(_params()), replicate(tx.init(_params()))
    x, y = _X.reshape(n, -1, 3), _Y.reshape(n, -1, 2)
    for _ in range(3):
      params, state = step(params, state, x, y)
    results[axis] = jax.tree.map(lambda a: a[0], params)
  for k in ref:
    np.testing.assert_allclose(results["batch"][k], ref[k], rtol=1e-5, atol=1e-6)
  # Without the axis name each device perturbs with its own shard's g2.
  assert any(not np.allclose(results[None][k], ref[k], rtol=1e-5, atol=1e-6) for k in ref)


@pytest.mark.parametrize("check_vma", [False, True])
def test_shard_map_eight_devices_equal_one(check_vma):
  from jax.sharding import AxisType  # pylint: disable=import-outside-toplevel
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel
  mesh = jax.make_mesh((8,), ("batch",), axis_types=(AxisType.Auto,))
  tx = optax.chain(gnp(0.8, 0.1, refresh_every=2, axis_name="batch"), optax.sgd(0.1))
  ref = _global_run(optax.chain(gnp(0.8, 0.1, refresh_every=2), optax.sgd(0.1)))
  if check_vma:
    # With replication checked, the gradient of the global mean loss
    # (pmean of the shard's) arrives reduced: averaging again changes nothing.
    def step_fn(params, state, x, y):
      def loss(p):
        return jax.lax.pmean(_batch_loss(p, x, y), "batch")
      updates, state = tx.update(jax.grad(loss)(params), state, params, grad_fn=jax.grad(loss))
      return optax.apply_updates(params, updates), state
  else:
    step_fn = _device_step(tx, "batch")
  step = jax.jit(jax.shard_map(step_fn, mesh=mesh, check_vma=check_vma,
                               in_specs=(P(), P(), P("batch"), P("batch")),
                               out_specs=(P(), P())))
  params, state = _params(), tx.init(_params())
  for _ in range(3):
    params, state = step(params, state, _X, _Y)
  for k in ref:
    np.testing.assert_allclose(params[k], ref[k], rtol=1e-5, atol=1e-6)


def test_jit_with_sharded_global_batch_needs_no_axis_name():
  from jax.sharding import AxisType  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding  # pylint: disable=import-outside-toplevel
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel
  mesh = jax.make_mesh((8,), ("batch",), axis_types=(AxisType.Auto,))
  tx = optax.chain(gnp(0.8, 0.1, refresh_every=2), optax.sgd(0.1))
  ref = _global_run(tx)

  @jax.jit
  def step(params, state, x, y):
    grads = jax.grad(_batch_loss)(params, x, y)
    updates, state = tx.update(grads, state, params,
                               grad_fn=jax.grad(lambda p: _batch_loss(p, x, y)))
    return optax.apply_updates(params, updates), state

  batch = NamedSharding(mesh, P("batch"))
  x, y = jax.device_put(_X, batch), jax.device_put(_Y, batch)
  params, state = _params(), tx.init(_params())
  for _ in range(3):
    params, state = step(params, state, x, y)
  for k in ref:
    np.testing.assert_allclose(params[k], ref[k], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- BatchNorm


class _BNNet(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(8)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(3)(nn.relu(x))


@pytest.mark.slow
def test_batchnorm_perturbed_pass_discards_statistics():
  model = _BNNet()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((16, 5)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 16), jnp.int32)
  variables = model.init(jax.random.key(0), x, train=False)
  params, batch_stats = variables["params"], variables["batch_stats"]

  def loss_fn(params, batch_stats, x, y):
    logits, mutated = model.apply(
        {"params": params, "batch_stats": batch_stats}, x, train=True,
        mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, mutated["batch_stats"]

  radius = 0.5
  tx = optax.chain(gnp(alpha=0.8, radius=radius, has_aux=True), optax.sgd(0.1))
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, batch_stats, opt_state, x, y):
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats, x, y)
    # The perturbed pass sees the same batch and the same running statistics;
    # the statistics it returns (the aux) are dropped by the transform.
    grad_fn = jax.grad(lambda p: loss_fn(p, batch_stats, x, y), has_aux=True)
    updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), new_stats, opt_state, updates

  new_params, new_stats, _, updates = train_step(
      params, batch_stats, opt_state, x, y)

  # Running statistics come from the unperturbed pass only...
  _, unperturbed_stats = loss_fn(params, batch_stats, x, y)
  grads = jax.grad(loss_fn, has_aux=True)(params, batch_stats, x, y)[0]
  norm = optax.tree.norm(grads)
  perturbed = jax.tree.map(lambda p, g: p + radius * g / norm, params, grads)
  _, perturbed_stats = loss_fn(perturbed, batch_stats, x, y)
  jax.tree.map(np.testing.assert_array_equal, new_stats, unperturbed_stats)
  # ...which is a real difference: the perturbed pass moves the statistics.
  assert any(not np.allclose(a, b) for a, b in zip(
      jax.tree.leaves(perturbed_stats), jax.tree.leaves(unperturbed_stats)))

  # has_aux=True equals dropping the aux by hand.
  tx_plain = optax.chain(gnp(alpha=0.8, radius=radius), optax.sgd(0.1))
  def grad_fn(p):
    return jax.grad(loss_fn, has_aux=True)(p, batch_stats, x, y)[0]
  ref, _ = tx_plain.update(grads, tx_plain.init(params), params, grad_fn=grad_fn)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               updates, ref)
  assert all(bool(jnp.isfinite(p).all()) for p in jax.tree.leaves(new_params))


# ----------------------------------------------------------------- contract


def _grad_fn_args(loss_fn, params, grads):
  del params, grads
  return {"grad_fn": jax.grad(loss_fn)}


def _adam():
  # The default follower, SGD(0.05, momentum 0.9), suits unit-scale updates;
  # this transform keeps the gradient's scale, which reaches ~1e3 on the
  # Rosenbrock problem, where that SGD diverges with or without the penalty.
  return optax.adam(optax.cosine_decay_schedule(0.05, 300))


test_contract = contract_suite([
    ContractCase(
        name="gradient_norm_penalty[refresh_every=3]",
        make=functools.partial(gnp, refresh_every=3),
        hyperparams={"alpha": 0.8, "radius": 0.05},
        extra_args=_grad_fn_args,
        optimizer=_adam,
    ),
    ContractCase(
        name="gradient_norm_penalty",
        make=gnp,
        hyperparams={"alpha": 0.8, "radius": 0.05},
        extra_args=_grad_fn_args,
        optimizer=_adam,
    ),
    ContractCase(
        name="gradient_norm_penalty[sam]",
        make=gnp,
        hyperparams={"alpha": 1.0, "radius": 0.05},
        extra_args=_grad_fn_args,
        optimizer=_adam,
    ),
])


# ------------------------------------------------------------------ example


@pytest.mark.slow
def test_compare_example_runs_gnp_and_sam(tmp_path):
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
  try:
    import compare  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  rows = compare.main(["--methods", "sgd", "gnp", "sam", "--seeds", "1",
                       "--steps", "4", "--eval-every", "2", "--batch-size", "16",
                       "--out", str(tmp_path)])
  assert [r["method"] for r in rows] == ["sgd", "gnp", "sam"]
  assert (tmp_path / "curves.png").exists()
  runs = json.loads((tmp_path / "results.json").read_text())["runs"]
  for run in runs:
    norms = run["history"]["grad_norm"]
    assert len(norms) == len(run["history"]["step"]) == 2
    assert all(np.isfinite(norms))
