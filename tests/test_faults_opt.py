"""Fault injection for OPT's entry points: orthogonal_map,
orthogonality_penalty, hyperspherical_energy, stiefel_sgd and the linen / nnx
OPT layers.

Every case that could hang (a non-finite matrix near LAPACK) runs in ONE
subprocess with a timeout, so a hang fails the test instead of blocking CI.
"""

import json
import os
import subprocess
import sys
import textwrap

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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("cayley", "gram_schmidt", "householder", "lowdin")

_HANG_SCRIPT = textwrap.dedent('''
    import json, sys
    import jax, jax.numpy as jnp, optax
    import optax_ortho
    from optax_ortho import linen as ortho_nn
    out = {}
    base = jax.random.normal(jax.random.key(0), (3, 5, 5))
    for pos in [(0, 0), (0, 3), (2, 1), (4, 4)]:
      for bad in (jnp.inf, -jnp.inf, jnp.nan):
        r = base.at[1, pos[0], pos[1]].set(bad)
        for m in %(methods)r:
          q = jax.jit(lambda r: optax_ortho.orthogonal_map(r, method=m))(r)
          out[f"map/{m}/{pos}/{bad}"] = [bool(jnp.isnan(q[1]).all()),
                                        bool(jnp.isfinite(q[0]).all() & jnp.isfinite(q[2]).all())]
    # stiefel_sgd: Inf in the params (first row) and in the gradient.
    tx = optax_ortho.stiefel_sgd(0.1)
    x = jax.nn.initializers.orthogonal()(jax.random.key(1), (6, 3))
    for where in ("params", "grads"):
      p = {"a": x, "b": x + 0.0}
      g = {"a": jnp.ones((6, 3)), "b": jnp.ones((6, 3))}
      (p if where == "params" else g)["a"] = x.at[0, 0].set(jnp.inf)
      state = tx.init(p)
      u, state = jax.jit(tx.update)(g, state, p)
      out[f"stiefel/{where}"] = [bool(jnp.isnan(u["a"]).all()),
                                 bool(jnp.isfinite(u["b"]).all()),
                                 all(bool(jnp.isfinite(l).all()) for l in jax.tree.leaves(state))]
    # OPT layers with an Inf in R: the small-batch Cayley path solves with R.
    for batch in (2, 64):
      layer = ortho_nn.OrthogonalDense(8)
      v = layer.init(jax.random.key(0), jnp.ones((batch, 6)))
      v["params"]["R"] = v["params"]["R"].at[0, 1].set(jnp.inf)
      for m in %(methods)r:
        y = jax.jit(ortho_nn.OrthogonalDense(8, method=m).apply)(v, jnp.ones((batch, 6)))
        out[f"dense/{m}/{batch}"] = [bool(jnp.isnan(y).all()), True]
    print(json.dumps(out))
''') % {"methods": METHODS}


@pytest.mark.slow  # 10-50 s on 2 cores; CI runs it (python -m pytest -m slow)
def test_non_finite_never_hangs_and_stays_in_its_matrix():
  env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONPATH=ROOT)
  try:
    proc = subprocess.run([sys.executable, "-c", _HANG_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=240, cwd=ROOT)
  except subprocess.TimeoutExpired:
    pytest.fail("a non-finite input hung an OPT entry point (timeout 240 s)")
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(proc.stdout.strip().splitlines()[-1])
  assert len(results) == 4 * 3 * 4 + 2 + 2 * 4
  bad = {k: v for k, v in results.items() if not all(v)}
  assert not bad, bad


# Empty leaves.

@pytest.mark.parametrize("shape", [(5, 0), (0, 5), (3, 3, 0, 4), (0, 0)])
def test_empty_kernels_give_zero(shape):
  w = jnp.zeros(shape)
  e = optax_ortho.hyperspherical_energy(w)
  assert e.shape == () and float(e) == 0.0
  g = jax.grad(optax_ortho.hyperspherical_energy)(w)
  assert g.shape == shape


def test_orthogonality_penalty_empty_and_no_neurons():
  assert float(optax_ortho.orthogonality_penalty(jnp.zeros((5, 0)))) == 0.0
  # Zero neurons are not orthonormal: |0 - I| = sqrt(n).
  np.testing.assert_allclose(optax_ortho.orthogonality_penalty(jnp.zeros((0, 4))), 2.0)
  # The gradient at the minimum is 0, not NaN.
  g = jax.grad(optax_ortho.orthogonality_penalty)(jnp.eye(4, 3))
  np.testing.assert_array_equal(g, 0.0)


@pytest.mark.parametrize("shape", [(0, 0), (2, 0, 0)])
def test_orthogonal_map_empty(shape):
  assert optax_ortho.orthogonal_map(jnp.zeros(shape)).shape == shape


def test_stiefel_empty_leaf_passes_through():
  params = {"e": jnp.zeros((5, 0)), "w": jnp.eye(4, 2), "c": jnp.zeros((0, 3, 2))}
  tx = optax_ortho.stiefel_sgd(0.1, mask={"e": True, "w": True, "c": True})
  state = tx.init(params)
  u, state = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state, params)
  assert u["e"].shape == (5, 0) and u["c"].shape == (0, 3, 2)
  assert bool(jnp.isfinite(u["w"]).all())


# Silent wrong results.

@pytest.mark.slow
def test_energy_zero_neuron_gradient_finite():
  w = jnp.zeros((4, 3)).at[:, 0].set(1.0).at[:, 1].set(jnp.arange(4.0))
  for power in (0.0, 1.0, 2.0):
    for convention in ("paper", "authors"):
      def f(w, power=power, convention=convention):
        return optax_ortho.hyperspherical_energy(w, power=power, convention=convention)
      e, g = jax.value_and_grad(f)(w)
      assert bool(jnp.isfinite(e)) and bool(jnp.isfinite(g).all()), (power, convention)


@pytest.mark.parametrize("kind", ["zero", "rank1"])
@pytest.mark.slow  # 10-50 s on 2 cores; CI runs it (python -m pytest -m slow)
def test_stiefel_zero_and_rank_deficient_leaves_move_onto_the_manifold(kind):
  x = jnp.zeros((6, 3)) if kind == "zero" else jnp.ones((6, 3))
  target = jax.random.normal(jax.random.key(0), (6, 3))

  def loss(x):
    return jnp.sum((x - target) ** 2)

  tx = optax_ortho.stiefel_sgd(0.05, 0.9)
  state = tx.init(x)
  losses, moms = [], []
  for _ in range(40):
    u, state = tx.update(jax.grad(loss)(x), state, x)
    x = x + u
    losses.append(float(loss(x)))
    moms.append(float(jnp.abs(state.momentum).max()))
  np.testing.assert_allclose(x.T @ x, jnp.eye(3), atol=1e-5)
  assert losses[-1] < losses[0]  # it moves towards the target
  # Momentum stays bounded by |g| / (1 - beta).
  assert max(moms) < 10 * float(jnp.abs(jax.grad(loss)(x)).max()) + 50


# Errors that say what is wrong.

def test_stiefel_shape_mismatches_name_the_leaf():
  tx = optax_ortho.stiefel_sgd(0.1)
  p = {"a": jnp.eye(4, 2), "b": {"w": jnp.eye(3, 3)}}
  state = tx.init(p)
  g = {"a": jnp.ones((4, 2)), "b": {"w": jnp.ones((3, 2))}}
  with pytest.raises(ValueError, match=r"\['b'\]\['w'\].*\(3, 3\).*\(3, 2\)"):
    tx.update(g, state, p)
  bad_state = state._replace(momentum={"a": jnp.ones((4, 3)), "b": {"w": jnp.ones((3, 3))}})
  g = jax.tree.map(jnp.ones_like, p)
  with pytest.raises(ValueError, match=r"state.momentum\['a'\].*\(4, 3\)"):
    tx.update(g, bad_state, p)
  with pytest.raises(ValueError, match="structure"):
    tx.update(g, state, {"a": p["a"]})
  with pytest.raises(TypeError, match=r"updates\['a'\].*floating"):
    tx.update({"a": jnp.ones((4, 2), jnp.int32), "b": g["b"]}, state, p)


@pytest.mark.slow
def test_nnx_layer_input_mismatch():
  layer = ortho_nnx.OrthogonalConv(3, 4, (3, 3), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"OrthogonalConv.*3 features.*\(1, 5, 5, 2\)"):
    layer(jnp.ones((1, 5, 5, 2)))


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"learning_rate": -0.1}, ValueError, "learning_rate"),
    ({"learning_rate": float("nan")}, ValueError, "learning_rate"),
    ({"learning_rate": "0.1"}, TypeError, "learning_rate"),
    ({"momentum": 1.0}, ValueError, "momentum"),
    ({"momentum": -0.5}, ValueError, "momentum"),
    ({"momentum": True}, TypeError, "momentum"),
    ({"projection_tol": 0.0}, ValueError, "projection_tol"),
    ({"clamp_step": "yes"}, TypeError, "clamp_step"),
])
def test_stiefel_hyperparameters(kwargs, exc, match):
  kwargs = {"learning_rate": 0.1, **kwargs}
  with pytest.raises(exc, match=match):
    optax_ortho.stiefel_sgd(**kwargs)


@pytest.mark.slow
def test_stiefel_schedule_and_inject_hyperparams_still_work():
  tx = optax.inject_hyperparams(optax_ortho.stiefel_sgd)(learning_rate=0.1)
  x = jnp.eye(4, 2)
  u, _ = tx.update(jnp.ones((4, 2)), tx.init(x), x)
  assert bool(jnp.isfinite(u).all())
  optax_ortho.stiefel_sgd(optax.constant_schedule(0.1))


@pytest.mark.parametrize("kwargs,match", [
    ({"power": -1.0}, "power"), ({"power": float("inf")}, "power"),
    ({"power": "1"}, "power"), ({"eps": 0.0}, "eps"),
    ({"convention": "tf"}, "convention")])
def test_energy_hyperparameters(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    optax_ortho.hyperspherical_energy(jnp.ones((3, 2)), **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    ({"stochastic": True}, "stochastic"), ({"stochastic": 0}, "stochastic"),
    ({"stochastic": 3, "episode_length": 0}, "episode_length"),
    ({"stochastic": 3, "episode_length": 2.5}, "episode_length"),
    ({"method": "qr"}, "method")])
def test_layer_options(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ortho_nn.OrthogonalDense(4, **kwargs).init(jax.random.key(0), jnp.ones((2, 6)))
  with pytest.raises(ValueError, match=match):
    ortho_nnx.OrthogonalLinear(6, 4, rngs=nnx.Rngs(0), **kwargs)


# Dtypes.

@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.slow  # 10-50 s on 2 cores; CI runs it (python -m pytest -m slow)
def test_low_precision_kept(dtype):
  r = jax.random.normal(jax.random.key(0), (5, 5)).astype(dtype)
  for m in METHODS:
    assert optax_ortho.orthogonal_map(r, method=m).dtype == dtype
  assert optax_ortho.hyperspherical_energy(r).dtype == jnp.float32
  x = jnp.eye(5, 3, dtype=dtype)
  tx = optax_ortho.stiefel_sgd(0.1)
  u, state = tx.update(jnp.ones((5, 3), dtype), tx.init(x), x)
  assert u.dtype == dtype and state.momentum.dtype == jnp.float32
  assert bool(jnp.isfinite(u).all())
  layer = ortho_nn.OrthogonalDense(4, param_dtype=dtype, dtype=dtype)
  v = layer.init(jax.random.key(0), jnp.ones((2, 6), dtype))
  assert layer.apply(v, jnp.ones((2, 6), dtype)).dtype == dtype


@pytest.mark.slow  # 10-50 s on 2 cores; CI runs it (python -m pytest -m slow)
def test_float64_kept():
  with jax.enable_x64(True):
    r = jax.random.normal(jax.random.key(0), (5, 5), jnp.float64)
    for m in METHODS:
      q = optax_ortho.orthogonal_map(r, method=m)
      assert q.dtype == jnp.float64
      np.testing.assert_allclose(q.T @ q, np.eye(5), atol=1e-12)
    x = jnp.eye(5, 3, dtype=jnp.float64)
    tx = optax_ortho.stiefel_sgd(0.1)
    u, state = tx.update(jnp.ones((5, 3), jnp.float64), tx.init(x), x)
    assert u.dtype == jnp.float64 and state.momentum.dtype == jnp.float64
    assert optax_ortho.hyperspherical_energy(r).dtype == jnp.float64
    layer = ortho_nn.OrthogonalDense(4, param_dtype=jnp.float64)
    v = layer.init(jax.random.key(0), jnp.ones((2, 6), jnp.float64))
    assert v["params"]["R"].dtype == jnp.float64
    assert isinstance(layer, nn.Module)
