"""Equivalence with the OPT and MHE authors' released code (golden numbers).

tests/data/opt_maps.npz, opt_ogd.npz and mhe_energy.npz hold inputs and
outputs of wy1iu/OPT and wy1iu/MHE run on fixed inputs (tests/data/README.md
names repository, commit, file and function). Tolerances are float32 level.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_ortho

DATA = pathlib.Path(__file__).parent / "data"


def _load(name):
  with np.load(DATA / name, allow_pickle=False) as d:
    return {k: d[k] for k in d.files}


MAPS = _load("opt_maps.npz")
OGD = _load("opt_ogd.npz")
MHE = _load("mhe_energy.npz")


def _map_and_vjp(r, g, method):
  def f(r):
    return jnp.sum(optax_ortho.orthogonal_map(r, method=method) * g)
  return optax_ortho.orthogonal_map(r, method=method), jax.grad(f)(r)


# Their Householder is NaN at R = I (our limit: test_orthogonal_map.py).
@pytest.mark.slow
@pytest.mark.parametrize("method,at", [
    ("cayley", ""), ("gram_schmidt", ""), ("householder", ""), ("lowdin", ""),
    ("cayley", "_at_I"), ("gram_schmidt", "_at_I")])
def test_orthogonal_map_value_and_gradient(method, at):
  r = jnp.eye(6) if at else jnp.asarray(MAPS["R"])
  q, dr = _map_and_vjp(r, jnp.asarray(MAPS["G"]), method)
  np.testing.assert_allclose(q, MAPS[f"{method}_Q{at}"], atol=2e-6)
  np.testing.assert_allclose(dr, MAPS[f"{method}_dR{at}"], atol=1e-5)


def test_or_penalty():
  # Their R R^T is our W^T W with the kernel W = R^T.
  r = jnp.asarray(MAPS["R"])
  loss, dr = jax.value_and_grad(lambda r: optax_ortho.orthogonality_penalty(r.T))(r)
  np.testing.assert_allclose(loss, MAPS["or_loss"], rtol=1e-6)
  np.testing.assert_allclose(dr, MAPS["or_dR"], atol=1e-5)


def _stiefel_steps(case, steps):
  x = jnp.asarray(OGD[f"{case}_X0"])
  lr = float(OGD[f"{case}_lr"])
  tx = optax_ortho.stiefel_sgd(lr, 0.9)
  state = tx.init(x)
  xs, ms = [], []
  for k in range(steps):
    u, state = tx.update(jnp.asarray(OGD[f"{case}_G"][k]), state, x)
    x = x + u
    xs.append(x)
    ms.append(state.momentum)
  return xs, ms


@pytest.mark.slow
def test_ogd_unclamped_matches_two_steps():
  # a = lr: their two fixed-point iterations equal the exact Cayley step to
  # float32 level here, so iterates and momentum match over both steps.
  xs, ms = _stiefel_steps("square_noclamp", 2)
  for k in range(2):
    np.testing.assert_allclose(xs[k], OGD["square_noclamp_X"][k], atol=2e-6)
    # Their momentum is minus ours.
    np.testing.assert_allclose(ms[k], -OGD["square_noclamp_M"][k], atol=2e-6)


def test_ogd_clamped_step_is_theirs():
  # The clamp is active (a = 1/|W| = 0.275 < lr = 0.5). Ours takes the exact
  # Cayley step of length a along their W; theirs approximates it by two
  # fixed-point iterations (off the manifold by 0.016), so compare with the
  # exact step built from THEIR skew matrix and THEIR a.
  x0 = np.asarray(OGD["square_clamp_X0"], np.float64)
  w = np.asarray(OGD["square_clamp_skew"][0], np.float64)
  a = float(OGD["square_clamp_step"][0])
  assert a < float(OGD["square_clamp_lr"])
  np.testing.assert_allclose(a, 1.0 / (np.linalg.norm(w) + 1e-8), rtol=1e-6)
  eye = np.eye(6)
  exact = np.linalg.solve(eye - 0.5 * a * w, (eye + 0.5 * a * w) @ x0)
  xs, ms = _stiefel_steps("square_clamp", 1)
  np.testing.assert_allclose(xs[0], exact, atol=5e-6)
  np.testing.assert_allclose(ms[0], -OGD["square_clamp_M"][0], atol=2e-6)
  # Their iterate is within O(a^3 |W|^3) of it.
  np.testing.assert_allclose(xs[0], OGD["square_clamp_X"][0], atol=2e-2)
  # Without the clamp the step is O(1) away from theirs.
  tx = optax_ortho.stiefel_sgd(float(OGD["square_clamp_lr"]), 0.9, clamp_step=False)
  xj = jnp.asarray(x0, jnp.float32)
  u, _ = tx.update(jnp.asarray(OGD["square_clamp_G"][0]), tx.init(xj), xj)
  assert float(jnp.abs(xj + u - exact).max()) > 0.1


@pytest.mark.slow
@pytest.mark.parametrize("power", [0, 1, 2])
def test_mhe_energy_authors_convention(power):
  w = jnp.asarray(MHE["W"])
  e, dw = jax.value_and_grad(lambda w: optax_ortho.hyperspherical_energy(
      w, power=float(power), convention="authors"))(w)
  np.testing.assert_allclose(e, MHE[f"mhe_s{power}"], rtol=2e-6)
  np.testing.assert_allclose(dw, MHE[f"mhe_s{power}_dW"], atol=2e-6, rtol=1e-4)


def test_mhe_energy_paper_convention_differs_as_documented():
  w = jnp.asarray(MHE["W"])
  # s = 0: theirs -log(d^2) is twice the paper's log(1/d).
  np.testing.assert_allclose(
      2.0 * optax_ortho.hyperspherical_energy(w, power=0.0), MHE["mhe_s0"], rtol=1e-4)
  for power in (1, 2):
    np.testing.assert_allclose(
        optax_ortho.hyperspherical_energy(w, power=float(power)),
        MHE[f"mhe_s{power}"], rtol=1e-4)
