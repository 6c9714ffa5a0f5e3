"""gradient_norm_penalty: the two-point formula, SAM at alpha = 1, contract."""

import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, strategies as st

import optax_ortho
from tests.contract import ContractCase, contract_suite

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
  loss = lambda p: _loss(jax.tree.map(lambda x: x.astype(jnp.float32), p))
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
  grad_fn = lambda p: jax.grad(loss_fn, has_aux=True)(p, batch_stats, x, y)[0]
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
