"""gal and gal_value_and_grad: semantics, safeguard, adjuster state, contract."""

import functools
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, strategies as st
from jax.sharding import AxisType, NamedSharding, PartitionSpec

import optax_ortho
from tests.contract import ContractCase, contract_suite


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _ce64(z, y):
  """Per-sample cross-entropy in float64 numpy."""
  z = np.asarray(z, np.float64)
  m = z.max(-1, keepdims=True)
  lse = m[:, 0] + np.log(np.exp(z - m).sum(-1))
  return lse - z[np.arange(len(y)), y]


def _identity_step(tx, z, y):
  """One jitted update where the 'model' is the logits: params = {"z": z}."""

  @jax.jit
  def step(params, y):
    _, grads, gal_args = optax_ortho.gal_value_and_grad(
        lambda p, x: p["z"], cross_entropy)(params, None, y)
    updates, state = tx.update(grads, tx.init(params), params, **gal_args)
    return grads, updates, state

  return step({"z": z}, y)


# ---------------------------------------------------------------- semantics


def _mlp_problem(dtype=jnp.float32):
  import flax.linen as nn

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(5)(nn.tanh(nn.Dense(16)(x)))

  model = MLP()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((12, 7)), dtype)
  y = jnp.asarray(rng.integers(0, 5, 12))
  params = jax.tree.map(lambda p: p.astype(dtype),
                        model.init(jax.random.key(0), x))
  return model.apply, params, x, y


@pytest.mark.slow
def test_alpha_zero_is_vanilla_gradient():
  apply_fn, params, x, y = _mlp_problem()
  tx = optax_ortho.gal(5, 0.1, alpha=0.0, beta=0.5)
  value_and_grad = optax_ortho.gal_value_and_grad(apply_fn, cross_entropy)

  @jax.jit
  def step(params, state):
    loss, grads, gal_args = value_and_grad(params, x, y)
    updates, state = tx.update(grads, state, params, **gal_args)
    return loss, grads, updates

  loss, grads, updates = step(params, tx.init(params))
  ref_loss, ref_grads = jax.value_and_grad(
      lambda p: cross_entropy(apply_fn(p, x), y))(params)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               grads, ref_grads)
  # The chosen logit gradient is dz + 0 = dz, back-propagated by the same vjp.
  jax.tree.map(np.testing.assert_array_equal, updates, grads)


@pytest.mark.slow
def test_adjustment_has_relative_size_alpha():
  rng = np.random.default_rng(3)
  z = jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 4, 6))
  grads, updates, state = _identity_step(
      optax_ortho.gal(4, 1e-3, alpha=0.1), z, y)
  diff = np.linalg.norm(updates["z"] - grads["z"], axis=-1)
  norm = np.linalg.norm(grads["z"], axis=-1)
  accepted = diff > 0
  assert accepted.any()
  np.testing.assert_allclose(diff[accepted], 0.1 * norm[accepted], rtol=1e-4)
  np.testing.assert_allclose(state.accepted_fraction, accepted.mean())


# One compiled step for every example: shapes fixed, hyperparameters injected.
_B, _C = 6, 5
_PROPERTY_TX = optax.inject_hyperparams(optax_ortho.gal, static_args=("num_outputs",))(
    num_outputs=_C, learning_rate=1.0, alpha=1.0, beta=1.0, hidden_sizes=(8,))


@jax.jit
def _property_step(z, y, alpha, eta):
  params = {"z": z}
  state = _PROPERTY_TX.init(params)
  state.hyperparams["alpha"] = alpha
  state.hyperparams["learning_rate"] = eta
  _, grads, gal_args = optax_ortho.gal_value_and_grad(
      lambda p, x: p["z"], cross_entropy)(params, None, y)
  updates, _ = _PROPERTY_TX.update(grads, state, params, **gal_args)
  return grads["z"], updates["z"]


@pytest.mark.slow
@given(
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(0.1, 10.0),
    alpha=st.floats(0.2, 3.0),
    eta=st.floats(1e-3, 30.0),
)
def test_safeguard_never_accepts_a_larger_tentative_loss(seed, scale, alpha, eta):
  rng = np.random.default_rng(seed)
  z = jnp.asarray(scale * rng.standard_normal((_B, _C)), jnp.float32)
  y = rng.integers(0, _C, _B)
  g_vanilla, g_out = map(np.asarray, _property_step(
      z, jnp.asarray(y), jnp.float32(alpha), jnp.float32(eta)))
  accepted = np.any(g_out != g_vanilla, axis=-1)
  rejected = ~accepted
  np.testing.assert_array_equal(g_out[rejected], g_vanilla[rejected])
  # Per-sample gradient of the per-sample loss = batch * row of the mean's.
  g = _B * g_out.astype(np.float64)
  before = _ce64(z, y)
  after = _ce64(np.asarray(z, np.float64) - eta * g, y)
  tol = 1e-5 * (1.0 + np.abs(before))
  assert np.all(after[accepted] <= before[accepted] + tol[accepted]), (
      after - before)[accepted]


@pytest.mark.slow
def test_remainder_is_accurate_where_float32_cannot_resolve_it():
  # alpha = 0: g is the vanilla per-sample gradient and r has a closed form.
  rng = np.random.default_rng(1)
  z = jnp.asarray(rng.standard_normal((5, 4)), jnp.float32)
  y = rng.integers(0, 4, 5)
  eta = 1e-4
  tx = optax_ortho.gal(4, 1.0, alpha=0.0, beta=eta)
  _, _, state = _identity_step(tx, z, jnp.asarray(y))
  z64 = np.asarray(z, np.float64)
  p = np.exp(z64 - z64.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  g = p - np.eye(4)[y]
  r = _ce64(z64 - eta * g, y) - _ce64(z64, y) + eta * (g * g).sum(-1)
  expected = np.mean(np.abs(r)) / eta**2
  np.testing.assert_allclose(float(state.remainder), expected, rtol=1e-3)


def _train(tx, steps, nan_step=None):
  apply_fn, params, x, y = _mlp_problem()
  value_and_grad = optax_ortho.gal_value_and_grad(apply_fn, cross_entropy)
  traces = []

  @jax.jit
  def step(params, state, x):
    traces.append(1)
    loss, grads, gal_args = value_and_grad(params, x, y)
    updates, state = tx.update(grads, state, params, **gal_args)
    return optax.apply_updates(params, updates), state, loss

  state = tx.init(params)
  states = [state]
  for i in range(steps):
    xi = x.at[0, 0].set(jnp.nan) if i == nan_step else x
    new_params, state, _ = step(params, state, xi)
    if i != nan_step:
      params = new_params
    states.append(state)
  return states, traces


@pytest.mark.slow
def test_adjuster_trains_stays_finite_and_traces_once():
  tx = optax.chain(
      optax_ortho.gal(5, optax.linear_schedule(0.1, 0.01, 5), alpha=0.1,
                      beta=0.1, hidden_sizes=(8, 4)),
      optax.adam(1e-2))
  states, traces = _train(tx, 6)
  assert len(traces) == 1
  first, last = states[0][0], states[-1][0]
  assert int(last.count) == 6
  # Every adjuster layer (kernel and bias) has moved.
  assert first.adjuster_params.shape == (5 * 8 + 8 + 8 * 4 + 4 + 4 * 5 + 5,)
  moved = np.abs(np.asarray(last.adjuster_params - first.adjuster_params))
  # jax.tree order: per layer, bias then kernel.
  for start, stop in ((0, 8), (8, 48), (48, 52), (52, 84), (84, 89), (89, 109)):
    assert moved[start:stop].max() > 0, (start, stop)
  for leaf in jax.tree.leaves(last):
    assert bool(jnp.all(jnp.isfinite(leaf)))


@pytest.mark.slow
def test_non_finite_batch_does_not_poison_the_adjuster():
  tx = optax_ortho.gal(5, 0.1, alpha=0.1, beta=0.1, hidden_sizes=(8,))
  states, _ = _train(tx, 4, nan_step=1)
  # The NaN step leaves the adjuster where it was, later steps train it again.
  np.testing.assert_array_equal(states[1].adjuster_params,
                                states[2].adjuster_params)
  jax.tree.map(np.testing.assert_array_equal,
               states[1].adjuster_opt_state, states[2].adjuster_opt_state)
  for leaf in jax.tree.leaves(states[-1]):
    assert bool(jnp.all(jnp.isfinite(leaf)))
  assert float(jnp.abs(states[-1].adjuster_params
                       - states[2].adjuster_params).max()) > 0


@pytest.mark.slow
def test_bad_inputs_fail_at_trace_time():
  z = jnp.zeros((4, 3))
  params = {"z": z}
  args = optax_ortho.gal_value_and_grad(lambda p, x: p["z"], cross_entropy)(
      params, None, jnp.zeros(4, jnp.int32))[2]
  tx = optax_ortho.gal(3, 0.1)
  state = tx.init(params)
  with pytest.raises(ValueError, match="num_outputs=5"):
    optax_ortho.gal(5, 0.1).update(params, optax_ortho.gal(5, 0.1).init(params),
                                   params, **args)
  with pytest.raises(ValueError, match="rank 2"):
    tx.update(params, state, params, **{**args, "gal_logits": jnp.zeros((4, 3, 1))})
  with pytest.raises(ValueError, match="rank 2"):
    optax_ortho.gal_value_and_grad(lambda p, x: p["z"][None], cross_entropy)(
        params, None, jnp.zeros(4, jnp.int32))
  with pytest.raises(TypeError, match="gal_vjp"):
    tx.update(params, state, params)
  for kwargs in ({"alpha": -1.0}, {"beta": -0.5}, {"hidden_sizes": (4, 0)},
                 {"seed": 1.5}):
    with pytest.raises(ValueError):
      optax_ortho.gal(3, 0.1, **kwargs)
  with pytest.raises(ValueError, match="num_outputs"):
    optax_ortho.gal(0, 0.1)
  with pytest.raises(ValueError, match="learning_rate"):
    optax_ortho.gal(3, -0.1)
  with pytest.raises(TypeError, match="adjuster_optimizer"):
    optax_ortho.gal(3, 0.1, adjuster_optimizer="adam")


@pytest.mark.slow
def test_bfloat16_model_keeps_dtype():
  apply_fn, params, x, y = _mlp_problem(jnp.bfloat16)
  tx = optax_ortho.gal(5, 0.1, alpha=0.1, beta=0.1)

  @jax.jit
  def step(params, state):
    _, grads, gal_args = optax_ortho.gal_value_and_grad(
        apply_fn, cross_entropy)(params, x, y)
    return tx.update(grads, state, params, **gal_args)

  updates, state = step(params, tx.init(params))
  for u in jax.tree.leaves(updates):
    assert u.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(u)))
  assert all(bool(jnp.all(jnp.isfinite(s))) for s in jax.tree.leaves(state))


# ------------------------------------------------------------------ contract
#
# The contract's problems (parabola, Rosenbrock, mixed_params) have no logits.
# Their 'model' is the identity over the parameters: every leaf is flattened
# and the flat vector cut into rows of _ROW values, one row per 'sample'. All
# three losses are sums over elements (Rosenbrock over adjacent (x, y) pairs,
# which never straddle a row as _ROW is even), so a row's own loss is the total
# loss with only that row changed: exact per-sample loss differences, which is
# all GAL's safeguard and remainder use.

_ROW = 8


def _replicated(x):
  sharding = jax.typeof(x).sharding
  mesh = getattr(sharding, "mesh", None)
  if mesh is not None and not mesh.empty and AxisType.Explicit in mesh.axis_types:
    return jax.sharding.reshard(x, NamedSharding(mesh, PartitionSpec()))
  return x


def _rows_model(params):
  leaves, treedef = jax.tree.flatten(params)
  sizes = [x.size for x in leaves]
  n = sum(sizes)
  rows = math.ceil(n / _ROW)

  def to_rows(p):
    flat = jnp.concatenate([
        jnp.ravel(_replicated(x)).astype(jnp.float32) for x in jax.tree.leaves(p)])
    return jnp.pad(flat, (0, rows * _ROW - n)).reshape(rows, _ROW)

  def from_rows(z):
    flat = z.reshape(-1)[:n]
    out, start = [], 0
    for x, size in zip(leaves, sizes):
      out.append(flat[start:start + size].reshape(x.shape).astype(x.dtype))
      start += size
    return jax.tree.unflatten(treedef, out)

  return to_rows, from_rows


def gal_extra_args(loss_fn, params, grads):
  del grads
  to_rows, from_rows = _rows_model(params)
  logits, vjp_fn = jax.vjp(to_rows, params)
  row_loss = lambda z: loss_fn(from_rows(z))
  logits_grad = jax.grad(row_loss)(logits)

  def sample_loss(z):
    return jax.vmap(lambda i, zi: row_loss(logits.at[i].set(zi)))(
        jnp.arange(z.shape[0]), z)

  return {"gal_logits": logits, "gal_logits_grad": logits_grad,
          "gal_sample_loss": sample_loss, "gal_vjp": lambda ct: vjp_fn(ct)[0]}


CASES = [
    ContractCase(
        name="gal",
        make=functools.partial(optax_ortho.gal, _ROW, hidden_sizes=(16, 4)),
        hyperparams={"learning_rate": 0.05, "alpha": 0.1, "beta": 0.1},
        extra_args=gal_extra_args,
    ),
]

test_contract = contract_suite(CASES)


# ------------------------------------------------------------------ examples

def _load_example(name):
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).parent.parent / "examples" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"_example_{name}", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow  # an example end to end: about 25 s on a loaded machine
def test_gal_regression_example_runs_tiny(tmp_path):
  summary = _load_example("gal_regression").main(
      ["--seeds", "2", "--epochs", "2", "--out", str(tmp_path)])
  assert (tmp_path / "gal_regression.png").exists()
  assert (tmp_path / "gal_regression.json").exists()
  for name in ("baseline", "gal"):
    assert len(summary["results"][name]["mae"]) == 2
    assert all(np.isfinite(summary["results"][name]["r2"]))
  assert 0.0 <= summary["gal_accepted_fraction"] <= 1.0


@pytest.mark.slow  # compare.py end to end: about 25 s on a loaded machine
def test_compare_runs_gal_tiny(tmp_path):
  compare = _load_example("compare")
  rows = compare.main(["--methods", "adam", "gal", "--seeds", "1", "--steps", "3",
                       "--eval-every", "3", "--out", str(tmp_path)])
  assert {r["method"] for r in rows} == {"adam", "gal"}
  assert all(np.isfinite(r["acc_mean"]) for r in rows)
