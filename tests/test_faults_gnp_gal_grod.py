"""Fault injection for gradient_norm_penalty, gal, grod, value_and_grads, regularizers.

Every bad input gets a correct result or a ValueError/TypeError that
names the leaf (or the argument); non-finite input stays in its own leaf and
the state stays finite; float16/bfloat16/float64 keep their dtype; empty leaves
pass through.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ortho
from optax_ortho import regularizers

gnp = optax_ortho.gradient_norm_penalty


def _finite_tree(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(jnp.result_type(x), jnp.inexact))


# ------------------------------------------------------------------ gradient_norm_penalty

def _gnp_update(tx, grads, params, grad_fn):
  return tx.update(grads, tx.init(params), params, grad_fn=grad_fn)


@pytest.mark.parametrize("scale", [1e20, 1e-30, 1e-42])
@pytest.mark.parametrize("normalize_g1", [False, True])
def test_gnp_perturbation_at_extreme_gradient_norms(scale, normalize_g1):
  """grad_fn = identity returns the perturbed point, so alpha = 1 shows it."""
  g64 = np.array([[3.0, -4.0], [12.0, 0.0]]) * scale  # |g| = 13 * scale
  grads = {"w": jnp.asarray(g64, jnp.float32)}
  params = {"w": jnp.ones((2, 2), jnp.float32)}
  radius, eps = 0.5, 1e-12
  tx = gnp(alpha=1.0, radius=radius, eps=eps, normalize_g1=normalize_g1)
  out, state = jax.jit(tx.update, static_argnames="grad_fn")(
      grads, tx.init(params), params, grad_fn=lambda p: p)
  g32 = np.asarray(grads["w"], np.float64)  # what float32 holds (1e-42 is subnormal)
  norm = np.linalg.norm(g32)
  want = 1.0 + radius * g32 / max(norm, eps)
  np.testing.assert_allclose(out["w"], want, rtol=1e-5)
  assert int(state.count) == 1


def test_gnp_normalize_g1_mixes_the_unit_gradient():
  grads = {"w": jnp.array([3.0, 4.0]), "b": jnp.array([0.0])}
  params = {"w": jnp.zeros(2), "b": jnp.zeros(1)}
  tx = gnp(alpha=0.25, radius=0.0, normalize_g1=True)  # r = 0: g2 = grad_fn(params)
  out, _ = _gnp_update(tx, grads, params, lambda p: jax.tree.map(jnp.ones_like, p))
  np.testing.assert_allclose(out["w"], 0.75 * np.array([0.6, 0.8]) + 0.25, rtol=1e-6)
  np.testing.assert_allclose(out["b"], [0.25], rtol=1e-6)
  # alpha = 0 with normalize_g1: the unit gradient itself (no shortcut to g1).
  tx0 = gnp(alpha=0.0, normalize_g1=True)
  out0, _ = _gnp_update(tx0, grads, params, lambda p: p)
  np.testing.assert_allclose(out0["w"], [0.6, 0.8], rtol=1e-6)


def test_gnp_zero_gradient_with_normalize_g1_is_safe():
  grads = {"w": jnp.zeros(3)}
  params = {"w": jnp.ones(3)}
  out, _ = _gnp_update(gnp(0.8, 0.1, normalize_g1=True), grads, params,
                       lambda p: jax.tree.map(jnp.ones_like, p))
  np.testing.assert_allclose(out["w"], 0.8 * np.ones(3), rtol=1e-6)


def test_gnp_grad_fn_broadcastable_wrong_shape_names_the_leaf():
  params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
  grads = jax.tree.map(jnp.ones_like, params)

  def bad_grad_fn(p):
    return {"w": jnp.ones((1, 2)), "b": p["b"]}  # broadcasts against (3, 2)

  with pytest.raises(ValueError, match=r"grad_fn\(params\)\['w'\] has shape \(1, 2\)"):
    _gnp_update(gnp(), grads, params, bad_grad_fn)


def test_gnp_grad_fn_returning_aux_without_has_aux_hints():
  params = {"w": jnp.ones(2)}
  with pytest.raises(ValueError, match="has_aux=True"):
    _gnp_update(gnp(), params, params, lambda p: (p, {"stats": jnp.ones(2)}))


def test_gnp_params_shape_mismatch_names_the_leaf():
  grads = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
  params = {"w": jnp.ones((3, 2)), "b": jnp.ones(1)}
  with pytest.raises(ValueError, match=r"params\['b'\] has shape \(1,\)"):
    gnp().update(grads, gnp().init(params), params, grad_fn=lambda p: p)


def test_gnp_params_container_mismatch():
  grads = [jnp.ones(2), jnp.ones(3)]
  with pytest.raises(ValueError, match="structure"):
    gnp().update(grads, gnp().init(grads), tuple(grads), grad_fn=lambda p: p)


@pytest.mark.parametrize("normalize_g1", [False, True])
def test_gnp_nan_stays_in_its_leaf(normalize_g1):
  params = {"w": jnp.ones(3), "b": jnp.ones(2)}
  grads = {"w": jnp.array([1.0, jnp.nan, 2.0]), "b": jnp.array([1.0, 2.0])}
  tx = gnp(0.8, 0.1, normalize_g1=normalize_g1)
  out, state = jax.jit(tx.update, static_argnames="grad_fn")(
      grads, tx.init(params), params, grad_fn=lambda p: jax.tree.map(jnp.sin, p))
  assert bool(jnp.all(jnp.isfinite(out["b"])))
  assert bool(jnp.isnan(out["w"][1]))
  assert _finite_tree(state)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_gnp_low_precision_keeps_dtype(dtype):
  params = {"w": jnp.ones((3, 2), dtype)}
  grads = {"w": jnp.full((3, 2), 0.5, dtype)}
  out, _ = _gnp_update(gnp(normalize_g1=True), grads, params, lambda p: p)
  assert out["w"].dtype == dtype
  assert _finite_tree(out)


def test_gnp_float64_keeps_dtype():
  with jax.enable_x64(True):
    params = {"w": jnp.ones((3, 2), jnp.float64)}
    grads = {"w": jnp.full((3, 2), 1e200, jnp.float64)}
    out, _ = _gnp_update(gnp(alpha=1.0, radius=0.1), grads, params, lambda p: p)
    assert out["w"].dtype == jnp.float64
    np.testing.assert_allclose(out["w"], 1.0 + 0.1 / np.sqrt(6.0), rtol=1e-12)


def test_gnp_empty_leaves_pass_through():
  params = {"w": jnp.ones((0, 3)), "b": jnp.ones(2)}
  grads = {"w": jnp.ones((0, 3)), "b": jnp.array([3.0, 4.0])}
  out, _ = _gnp_update(gnp(1.0, 0.5), grads, params, lambda p: p)
  assert out["w"].shape == (0, 3)
  np.testing.assert_allclose(out["b"], 1.0 + 0.5 * np.array([0.6, 0.8]), rtol=1e-6)
  out, _ = _gnp_update(gnp(), {}, {}, lambda p: p)
  assert out == {}


@pytest.mark.parametrize("kwargs,error,match", [
    ({"alpha": -0.1}, ValueError, "alpha"),
    ({"alpha": float("nan")}, ValueError, "alpha"),
    ({"radius": float("inf")}, ValueError, "radius"),
    ({"radius": "0.1"}, TypeError, "radius"),
    ({"eps": -1.0}, ValueError, "eps"),
    ({"normalize_g1": 1}, TypeError, "normalize_g1"),
    ({"normalize_g1": None}, TypeError, "normalize_g1"),
])
def test_gnp_bad_hyperparameters(kwargs, error, match):
  with pytest.raises(error, match=match):
    gnp(**kwargs)


def test_gnp_int_gradient_names_the_leaf():
  params = {"w": jnp.ones(2), "n": jnp.ones(2, jnp.int32)}
  with pytest.raises(TypeError, match=r"updates\['n'\]"):
    _gnp_update(gnp(), params, params, lambda p: p)


# ------------------------------------------------------------------ gal

def _gal_step(tx, params, x, y, state=None, safeguard_args=None):
  def apply_fn(p, xx):
    return xx @ p["w"] + p["b"]

  def loss_fn(z, yy):
    return optax.softmax_cross_entropy_with_integer_labels(z, yy).mean()

  _, grads, gal_args = optax_ortho.gal_value_and_grad(apply_fn, loss_fn)(params, x, y)
  if safeguard_args:
    gal_args.update(safeguard_args)
  state = tx.init(params) if state is None else state
  return tx.update(grads, state, params, **gal_args)


def _gal_params(dtype=jnp.float32):
  return {"w": jnp.full((4, 3), 0.1, dtype), "b": jnp.zeros(3, dtype)}


@pytest.mark.slow
def test_gal_empty_batch_keeps_the_state():
  tx = optax_ortho.gal(3, 0.1, alpha=0.1, beta=0.1, hidden_sizes=(8,))
  params = _gal_params()
  state0 = tx.init(params)
  out, state = _gal_step(tx, params, jnp.ones((0, 4)), jnp.zeros((0,), jnp.int32),
                         state0)
  assert _finite_tree(state)
  assert int(state.count) == 1
  np.testing.assert_array_equal(state.adjuster_params, state0.adjuster_params)
  assert float(state.accepted_fraction) == float(state0.accepted_fraction)
  jax.tree.map(lambda o, p: np.testing.assert_array_equal(o, jnp.zeros_like(p)),
               out, params)


@pytest.mark.slow  # 10-50 s on 2 cores; CI runs it (python -m pytest -m slow)
def test_gal_vjp_wrong_shape_names_the_leaf():
  tx = optax_ortho.gal(3, 0.1, hidden_sizes=(8,))
  params = _gal_params()

  def bad_vjp(ct):
    return {"w": jnp.ones((1, 3)), "b": jnp.ones(3)}

  with pytest.raises(ValueError, match=r"gal_vjp\(logit gradients\)\['w'\] has shape \(1, 3\)"):
    _gal_step(tx, params, jnp.ones((2, 4)), jnp.array([0, 1]),
              safeguard_args={"gal_vjp": bad_vjp})


@pytest.mark.slow
def test_gal_vjp_wrong_structure():
  tx = optax_ortho.gal(3, 0.1, hidden_sizes=(8,))
  with pytest.raises(ValueError, match="structure"):
    _gal_step(tx, _gal_params(), jnp.ones((2, 4)), jnp.array([0, 1]),
              safeguard_args={"gal_vjp": lambda ct: [jnp.ones((4, 3)), jnp.ones(3)]})


@pytest.mark.slow
@pytest.mark.parametrize("safeguard", ["per_sample", "batch"])
def test_gal_nan_sample_keeps_state_finite(safeguard):
  tx = optax_ortho.gal(3, 0.1, alpha=0.1, beta=0.1, hidden_sizes=(8,),
                       safeguard=safeguard)
  x = jnp.ones((3, 4)).at[1, 0].set(jnp.nan)
  out, state = _gal_step(tx, _gal_params(), x, jnp.array([0, 1, 2]))
  assert _finite_tree(state)
  assert not _finite_tree(out)  # the NaN sample's gradient is NaN, as vanilla


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_gal_low_precision_keeps_dtype(dtype):
  tx = optax_ortho.gal(3, 0.1, alpha=0.1, beta=0.1, hidden_sizes=(8,))
  out, state = _gal_step(tx, _gal_params(dtype), jnp.ones((2, 4), dtype),
                         jnp.array([0, 1]))
  assert all(x.dtype == dtype for x in jax.tree.leaves(out))
  assert _finite_tree(out) and _finite_tree(state)


@pytest.mark.slow  # 10-50 s on 2 cores; CI runs it (python -m pytest -m slow)
def test_gal_float64_keeps_dtype():
  with jax.enable_x64(True):
    tx = optax_ortho.gal(3, 0.1, alpha=0.1, beta=0.1, hidden_sizes=(8,))
    out, state = _gal_step(tx, _gal_params(jnp.float64), jnp.ones((2, 4), jnp.float64),
                           jnp.array([0, 1]))
    assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(out))
    assert _finite_tree(state)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"alpha": -1.0}, ValueError, "alpha"),
    ({"alpha": float("nan")}, ValueError, "alpha"),
    ({"beta": float("inf")}, ValueError, "beta"),
    ({"beta": "1e-3"}, TypeError, "beta"),
    ({"learning_rate": float("nan")}, ValueError, "learning_rate"),
    ({"learning_rate": -0.1}, ValueError, "learning_rate"),
    ({"safeguard": "sample"}, ValueError, "safeguard"),
])
def test_gal_bad_hyperparameters(kwargs, error, match):
  args = {"learning_rate": 0.1, **kwargs}
  with pytest.raises(error, match=match):
    optax_ortho.gal(3, **args)


# ------------------------------------------------------------------ grod

def test_grod_float64_jit():
  with jax.enable_x64(True):
    for granularity in ("global", "per_leaf"):
      tx = optax_ortho.grod(0.5, granularity=granularity)
      gj = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([1e-200, 0.0])}
      go = {"a": jnp.array([-1.0, 0.5]), "b": jnp.array([-1.0, 1.0])}
      out, state = jax.jit(lambda g, o, s, tx=tx: tx.update(g, s, regularizer_grads=o))(
          gj, go, tx.init(gj))
      assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(out))
      d = np.concatenate([np.asarray(out[k]) for k in "ab"])
      g = np.concatenate([np.asarray(gj[k]) for k in "ab"])
      assert d @ g >= g @ g * (1 - 1e-12)


def test_grod_tuple_for_list():
  gj = [jnp.ones(2), jnp.ones(3)]
  tx = optax_ortho.grod()
  with pytest.raises(ValueError, match=r"regularizer_grads must have the pytree structure of updates.*\(\*, \*\)"):
    tx.update(gj, tx.init(gj), regularizer_grads=tuple(gj))


def test_grod_shape_mismatch_names_the_leaf():
  gj = {"enc": {"w": jnp.ones((2, 3))}}
  go = {"enc": {"w": jnp.ones((3, 2))}}
  tx = optax_ortho.grod()
  with pytest.raises(ValueError, match=r"regularizer_grads\['enc'\]\['w'\] has shape \(3, 2\)"):
    tx.update(gj, tx.init(gj), regularizer_grads=go)


def test_grod_missing_leaf_names_it():
  gj = {"a": jnp.ones(2), "b": jnp.ones(2)}
  tx = optax_ortho.grod()
  with pytest.raises(ValueError, match=r"\['b'\]"):
    tx.update(gj, tx.init(gj), regularizer_grads={"a": jnp.ones(2)})


def test_grod_int_leaf_names_it():
  gj = {"a": jnp.ones(2), "n": jnp.ones(2, jnp.int32)}
  tx = optax_ortho.grod()
  with pytest.raises(TypeError, match=r"\['n'\]"):
    tx.update(gj, tx.init(gj), regularizer_grads=gj)


def test_grod_nan_stays_in_its_leaf_per_leaf():
  tx = optax_ortho.grod(1.0, granularity="per_leaf")
  gj = {"a": jnp.array([1.0, jnp.nan]), "b": jnp.array([1.0, 0.0])}
  go = {"a": jnp.array([1.0, 1.0]), "b": jnp.array([-1.0, 1.0])}
  out, state = jax.jit(tx.update)(gj, tx.init(gj), None, regularizer_grads=go)
  # projected: <gJ, gO> < 0 (towards gJ by a few roundings)
  np.testing.assert_allclose(out["b"], [1.0, 1.0], rtol=1e-5)
  assert not _finite_tree(out["a"])
  assert bool(state.conflict["b"]) and not bool(state.conflict["a"])


def test_grod_nan_in_global_mode_does_not_spread():
  tx = optax_ortho.grod(1.0)
  gj = {"a": jnp.array([1.0, jnp.nan]), "b": jnp.array([1.0, 0.0])}
  go = {"a": jnp.array([1.0, 1.0]), "b": jnp.array([-1.0, 1.0])}
  out, _ = tx.update(gj, tx.init(gj), regularizer_grads=go)
  assert _finite_tree(out["b"])


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_grod_low_precision_keeps_dtype(dtype):
  tx = optax_ortho.grod(1.0)
  gj = {"a": jnp.array([1e-3, 2e-3], dtype)}
  go = {"a": jnp.array([-1.0, 0.5], dtype)}
  out, _ = tx.update(gj, tx.init(gj), regularizer_grads=go)
  assert out["a"].dtype == dtype
  assert _finite_tree(out)
  d, g = np.asarray(out["a"], np.float64), np.asarray(gj["a"], np.float64)
  assert d @ g >= 0.95 * (g @ g)


def test_grod_empty_leaves():
  tx = optax_ortho.grod(1.0)
  gj = {"e": jnp.ones((0, 3)), "a": jnp.array([1.0, 0.0])}
  go = {"e": jnp.ones((0, 3)), "a": jnp.array([-1.0, 1.0])}
  out, _ = tx.update(gj, tx.init(gj), regularizer_grads=go)
  assert out["e"].shape == (0, 3)
  np.testing.assert_allclose(out["a"], [1.0, 1.0], rtol=1e-5)


@pytest.mark.parametrize("weight,error", [
    (-1.0, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
    ("1", TypeError), (True, TypeError)])
def test_grod_bad_weight(weight, error):
  with pytest.raises(error, match="regularizer_weight"):
    optax_ortho.grod(weight)


# ------------------------------------------------------------------ value_and_grads

def test_value_and_grads_aux_without_has_aux_hints():
  def fn(w):
    return (jnp.sum(w ** 2), jnp.sum(w)), {"acc": jnp.ones(())}

  with pytest.raises(TypeError, match="pass has_aux=True"):
    optax_ortho.value_and_grads(fn)(jnp.ones(3))


def test_value_and_grads_has_aux_on_a_plain_pair_hints():
  def fn(w):
    return jnp.sum(w ** 2), jnp.sum(w)

  with pytest.raises(TypeError, match="pass has_aux=False"):
    optax_ortho.value_and_grads(fn, has_aux=True)(jnp.ones(3))


# ------------------------------------------------------------------ regularizers

def test_l2_sp_nan_gradient_stays_in_its_leaf():
  params = {"a": jnp.array([1.0, jnp.nan]), "b": jnp.array([2.0]), "head": jnp.ones(2)}
  source = {"a": jnp.zeros(2), "b": jnp.zeros(1)}
  g = jax.grad(regularizers.l2_sp)(params, source)
  np.testing.assert_allclose(g["b"], [2.0])
  np.testing.assert_allclose(g["head"], [1.0, 1.0])
  assert bool(jnp.isnan(g["a"][1]))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_l2_sp_low_precision(dtype):
  params = {"a": jnp.full(3, 2.0, dtype)}
  loss = regularizers.l2_sp(params, {"a": jnp.ones(3, dtype)})
  assert loss.dtype == jnp.float32 and float(loss) == 1.5
  assert jax.grad(regularizers.l2_sp)(params, {"a": jnp.ones(3, dtype)})["a"].dtype == dtype


def test_l2_sp_empty_leaf_and_bad_input():
  params = {"e": jnp.ones((0, 2)), "a": jnp.ones(1)}
  assert float(regularizers.l2_sp(params, params)) == 0.0
  with pytest.raises(ValueError, match="alpha"):
    regularizers.l2_sp(params, params, alpha=-1.0)
  with pytest.raises(ValueError, match="beta"):
    regularizers.l2_sp(params, params, beta=float("nan"))
  with pytest.raises(TypeError, match=r"params\['n'\]"):
    regularizers.l2_sp({"n": jnp.ones(2, jnp.int32)}, {})
  with pytest.raises(ValueError, match=r"\['a'\]"):
    regularizers.l2_sp(params, {"a": jnp.ones(2)})


def test_feature_distillation_faults():
  s = {"f1": jnp.ones((0, 4)), "f2": jnp.ones((2, 3))}
  t = {"f1": jnp.ones((0, 4)), "f2": jnp.zeros((2, 3))}
  loss = regularizers.feature_distillation(s, t)
  assert float(loss) == 0.5 * 3.0  # the empty batch adds 0, not NaN
  with pytest.raises(ValueError, match=r"teacher_features\['f2'\] has shape \(2, 4\)"):
    regularizers.feature_distillation(s, {"f1": jnp.ones((0, 4)), "f2": jnp.zeros((2, 4))})
  with pytest.raises(TypeError, match=r"student_features\['f2'\]"):
    regularizers.feature_distillation({"f1": s["f1"], "f2": jnp.ones((2, 3), jnp.int32)}, t)
  with pytest.raises(ValueError, match="leading"):
    regularizers.feature_distillation(jnp.ones(()), jnp.ones(()))
  g = jax.grad(regularizers.feature_distillation)(
      {"a": jnp.array([[jnp.nan, 1.0]]), "b": jnp.ones((1, 2))},
      {"a": jnp.zeros((1, 2)), "b": jnp.zeros((1, 2))})
  np.testing.assert_allclose(g["b"], [[1.0, 1.0]])
  assert bool(jnp.isnan(g["a"][0, 0]))


def _pgd_loss(w, x, y):
  return jnp.mean((x @ w - y) ** 2)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"epsilon": -0.1}, ValueError, "epsilon"),
    ({"epsilon": float("nan")}, ValueError, "epsilon"),
    ({"step_size": float("inf")}, ValueError, "step_size"),
    ({"step_size": "0.1"}, TypeError, "step_size"),
    ({"num_steps": -1}, ValueError, "num_steps"),
    ({"num_steps": 2.0}, ValueError, "num_steps"),
    ({"clip_min": 1.0, "clip_max": 0.0}, ValueError, "clip_min"),
    ({"clip_min": float("nan")}, ValueError, "clip_min"),
    ({"clip_max": "1"}, TypeError, "clip_max"),
])
def test_pgd_bad_hyperparameters(kwargs, error, match):
  args = {"epsilon": 0.1, "step_size": 0.05, "num_steps": 2, "key": None, **kwargs}
  with pytest.raises(error, match=match):
    regularizers.pgd_perturb(_pgd_loss, jnp.ones(3), jnp.ones((2, 3)), jnp.zeros(2), **args)
  with pytest.raises(error, match=match):
    regularizers.adversarial(_pgd_loss, jnp.ones(3), jnp.ones((2, 3)), jnp.zeros(2), **args)


@pytest.mark.slow
def test_pgd_faults():
  w, y = jnp.ones(3), jnp.zeros(2)
  args = {"epsilon": 0.1, "step_size": 0.05, "num_steps": 2, "key": jax.random.key(0)}
  with pytest.raises(TypeError, match="loss_fn"):
    regularizers.pgd_perturb(None, w, jnp.ones((2, 3)), y, **args)
  with pytest.raises(TypeError, match="x must have a real floating dtype"):
    regularizers.pgd_perturb(_pgd_loss, w, jnp.ones((2, 3), jnp.int32), y, **args)
  empty = regularizers.pgd_perturb(_pgd_loss, w, jnp.ones((0, 3)), jnp.zeros(0), **args)
  assert empty.shape == (0, 3)
  for dtype in (jnp.float16, jnp.bfloat16):
    x_adv = regularizers.pgd_perturb(_pgd_loss, w, jnp.ones((2, 3), dtype), y, **args)
    assert x_adv.dtype == dtype and _finite_tree(x_adv)
  # A NaN input element stays NaN and the other sample is still perturbed.
  x = jnp.ones((2, 3)).at[0, 0].set(jnp.nan)

  def per_sample_loss(w, x, y):
    return jnp.sum((x @ w - y) ** 2)

  x_adv = regularizers.pgd_perturb(per_sample_loss, w, x, y, **args)
  assert bool(jnp.isnan(x_adv[0, 0]))
  assert _finite_tree(x_adv[1]) and float(jnp.abs(x_adv[1] - 1.0).max()) <= 0.1 + 1e-6


def test_grod_nested_tuple_for_list_names_the_container():
  gj = {"enc": [jnp.ones(2), jnp.ones(3)]}
  tx = optax_ortho.grod()
  with pytest.raises(ValueError, match=r"At \['enc'\]: list expected, got tuple"):
    tx.update(gj, tx.init(gj), regularizer_grads={"enc": tuple(gj["enc"])})
