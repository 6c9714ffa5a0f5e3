"""gal and gal_value_and_grad: semantics, safeguard, adjuster state, contract."""

import functools
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

import optax_ortho
from tests.contract import ContractCase
from tests.contract import contract_suite


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


def _mlp_problem(dtype=jnp.float32, batch=12):
  import flax.linen as nn

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(5)(nn.tanh(nn.Dense(16)(x)))

  model = MLP()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, 7)), dtype)
  y = jnp.asarray(rng.integers(0, 5, batch))
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
  def row_loss(z):
    return loss_fn(from_rows(z))

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


# ------------------------------------------------------------ training loops


def _bn_problem():
  import flax.linen as nn

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
      h = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x))
      return nn.Dense(3)(nn.tanh(h))

  model = Net()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((16, 5)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 16))
  variables = model.init(jax.random.key(0), x)
  return model, variables, x, y


@pytest.mark.slow
def test_has_aux_returns_batch_stats_and_the_same_gradients():
  model, variables, x, y = _bn_problem()
  stats = variables["batch_stats"]

  def apply_aux(params, x):
    logits, new = model.apply({"params": params, "batch_stats": stats}, x,
                              mutable=["batch_stats"])
    return logits, new["batch_stats"]

  def apply_plain(params, x):
    return apply_aux(params, x)[0]

  (loss, new_stats), grads, args = optax_ortho.gal_value_and_grad(
      apply_aux, cross_entropy, has_aux=True)(variables["params"], x, y)
  loss0, grads0, args0 = optax_ortho.gal_value_and_grad(
      apply_plain, cross_entropy)(variables["params"], x, y)
  np.testing.assert_array_equal(loss, loss0)
  jax.tree.map(np.testing.assert_array_equal, grads, grads0)
  np.testing.assert_array_equal(args["gal_logits_grad"], args0["gal_logits_grad"])
  expected = apply_aux(variables["params"], x)[1]
  jax.tree.map(np.testing.assert_array_equal, new_stats, expected)
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new_stats, stats)
  assert min(jax.tree.leaves(moved)) > 0
  with pytest.raises(TypeError, match="has_aux"):
    optax_ortho.gal_value_and_grad(apply_plain, cross_entropy, has_aux=1)


def test_per_sample_loss_is_a_clear_error():
  def per_sample(z, y):
    return optax.softmax_cross_entropy_with_integer_labels(z, y)

  with pytest.raises(ValueError, match=r"gal_value_and_grad: loss_fn.*scalar mean.*\(4,\)"):
    optax_ortho.gal_value_and_grad(lambda p, x: p, per_sample)(
        jnp.zeros((4, 3)), None, jnp.zeros(4, jnp.int32))


def test_missing_arguments_say_how_to_pass_them():
  params = {"z": jnp.zeros((4, 3))}
  tx = optax_ortho.gal(3, 0.1)
  with pytest.raises(TypeError, match=r"optax_ortho\.apply_gradients.*nnx\.Optimizer"):
    tx.update(params, tx.init(params), params)


def test_num_outputs_one_warns():
  with pytest.warns(UserWarning, match=r"num_outputs=1.*cannot learn"):
    optax_ortho.gal(1, 0.1)


def test_inject_hyperparams_names_static_args():
  tx = optax.inject_hyperparams(optax_ortho.gal)(num_outputs=3, learning_rate=0.1)
  with pytest.raises(ValueError, match=r"static_args=\('num_outputs',\)"):
    tx.init({"z": jnp.zeros((4, 3))})


@pytest.mark.slow
def test_state_of_another_configuration_names_what_differs():
  params = {"z": jnp.zeros((4, 3))}
  args = optax_ortho.gal_value_and_grad(lambda p, x: p["z"], cross_entropy)(
      params, None, jnp.zeros(4, jnp.int32))[2]
  old = optax_ortho.gal(3, 0.1, hidden_sizes=(128, 4)).init(params)
  tx = optax_ortho.gal(3, 0.1, hidden_sizes=(64,))
  # Eagerly the message says what the state was built with; under jit, what
  # its shapes show.
  with pytest.raises(ValueError, match=r"hidden_sizes.*built with num_outputs=3,"
                     r" hidden_sizes=\(128, 4\)"):
    tx.update(params, old, params, **args)
  with pytest.raises(ValueError, match=r"other hidden_sizes: its adjuster has 2 hidden"
                     r" layers, gal\(num_outputs=3, hidden_sizes=\(64,\)\) has 1"):
    jax.jit(lambda s, a: tx.update(params, s, params, **a))(old, args)
  narrow = optax_ortho.gal(3, 0.1, hidden_sizes=(32,)).init(params)
  with pytest.raises(ValueError, match=r"hidden_sizes or num_outputs.*\(227,\).*\(451,\)"):
    jax.jit(lambda s, a: tx.update(params, s, params, **a))(narrow, args)
  sgd_state = optax_ortho.gal(3, 0.1, hidden_sizes=(64,),
                              adjuster_optimizer=optax.sgd(0.1)).init(params)
  with pytest.raises(ValueError, match="adjuster_opt_state.*adjuster_optimizer"):
    tx.update(params, sgd_state, params, **args)
  with pytest.raises(TypeError, match="GalState"):
    tx.update(params, None, params, **args)


def _run_steps(tx, steps, poison_at=None, poison=None):
  apply_fn, params, x, y = _mlp_problem()
  value_and_grad = optax_ortho.gal_value_and_grad(apply_fn, cross_entropy)

  @jax.jit
  def step(params, state):
    _, grads, gal_args = value_and_grad(params, x, y)
    updates, state = tx.update(grads, state, params, **gal_args)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  accepted = []
  for i in range(steps):
    if i == poison_at:
      state = poison(state)
    params, state = step(params, state)
    accepted.append(float(state.accepted_fraction))
  return state, np.array(accepted)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["params", "adam_mu"])
def test_poisoned_adjuster_recovers(where):
  tx = optax_ortho.gal(5, 0.1, alpha=0.1, beta=0.1, hidden_sizes=(8,))

  def poison(state):
    if where == "params":
      return state._replace(adjuster_params=state.adjuster_params.at[3].set(jnp.nan))
    adam = state.adjuster_opt_state[0]
    return state._replace(adjuster_opt_state=(
        adam._replace(mu=adam.mu.at[3].set(jnp.nan)),) + state.adjuster_opt_state[1:])

  clean, clean_accepted = _run_steps(tx, 50)
  # Poisoned at the start: re-initialised from its key, the run is the clean one.
  first, first_accepted = _run_steps(tx, 50, 0, poison)
  assert int(first.adjuster_resets) == 1 and int(clean.adjuster_resets) == 0
  np.testing.assert_array_equal(first.adjuster_params, clean.adjuster_params)
  np.testing.assert_array_equal(first_accepted, clean_accepted)
  # Poisoned after 10 steps: counted once, finite again, accepting again.
  late, late_accepted = _run_steps(tx, 50, 10, poison)
  assert int(late.adjuster_resets) == 1
  assert all(bool(jnp.all(jnp.isfinite(s))) for s in jax.tree.leaves(late))
  assert clean_accepted[-10:].mean() > 0.5
  assert late_accepted[-10:].mean() >= 0.8 * clean_accepted[-10:].mean()


@pytest.mark.slow
def test_split_gradient_and_update_steps_equal_one_step():
  apply_fn, params, x, y = _mlp_problem()
  tx = optax.chain(optax_ortho.gal(5, 0.1, alpha=0.1, beta=0.1, hidden_sizes=(8,)),
                   optax.sgd(0.1))
  value_and_grad = optax_ortho.gal_value_and_grad(apply_fn, cross_entropy)
  traces = []

  @jax.jit
  def fused(params, state):
    _, grads, gal_args = value_and_grad(params, x, y)
    updates, state = tx.update(grads, state, params, **gal_args)
    return optax.apply_updates(params, updates), state

  @jax.jit
  def gradient_step(params, x, y):
    return value_and_grad(params, x, y)

  @jax.jit
  def update_step(params, state, grads, gal_args):
    traces.append(1)
    updates, state = tx.update(grads, state, params, **gal_args)
    return optax.apply_updates(params, updates), state

  p1, s1 = params, tx.init(params)
  p2, s2 = params, tx.init(params)
  for _ in range(3):
    p1, s1 = fused(p1, s1)
    _, grads, gal_args = gradient_step(p2, x, y)
    p2, s2 = update_step(p2, s2, grads, gal_args)
  assert len(traces) == 1
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               (p1, s1), (p2, s2))


@pytest.mark.slow
def test_sequence_model_flattens_tokens_into_the_batch():
  batch, length, vocab = 3, 4, 6
  rng = np.random.default_rng(0)
  params = {"embed": jnp.asarray(rng.standard_normal((vocab, 8)), jnp.float32),
            "out": jnp.asarray(0.3 * rng.standard_normal((8, vocab)), jnp.float32)}
  tokens = jnp.asarray(rng.integers(0, vocab, (batch, length + 1)))
  mask = jnp.asarray([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], jnp.float32)

  def apply_fn(p, x):
    logits = jnp.tanh(p["embed"][x]) @ p["out"]          # (batch, length, vocab)
    return logits.reshape(-1, vocab)                      # tokens are the samples

  def loss_fn(logits, y):
    labels, weights = y
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)

  y = (tokens[:, 1:].reshape(-1), mask.reshape(-1))
  tx = optax_ortho.gal(vocab, 0.5, alpha=0.1, beta=0.1, hidden_sizes=(8,))
  vag = optax_ortho.gal_value_and_grad(apply_fn, loss_fn)

  @jax.jit
  def step(params, state):
    loss, grads, gal_args = vag(params, tokens[:, :-1], y)
    updates, state = tx.update(grads, state, params, **gal_args)
    return jax.tree.map(lambda p, u: p - 0.5 * u, params, updates), state, loss, grads

  state = tx.init(params)
  losses = []
  for _ in range(8):
    params, state, loss, grads = step(params, state)
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  assert float(state.accepted_fraction) > 0
  ref = jax.grad(lambda p: loss_fn(apply_fn(p, tokens[:, :-1]), y))(params)
  _, grads, _ = vag(params, tokens[:, :-1], y)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), grads, ref)


# ------------------------------------------------------------ data parallel

_DEVICES = 8


def _data_parallel_problem(safeguard, axis_name=None):
  apply_fn, params, x, y = _mlp_problem(batch=2 * _DEVICES)
  tx = optax.chain(
      optax_ortho.gal(5, 0.1, alpha=0.1, beta=0.1, hidden_sizes=(8,),
                      safeguard=safeguard, axis_name=axis_name),
      optax.sgd(0.1))
  value_and_grad = optax_ortho.gal_value_and_grad(apply_fn, cross_entropy)

  def step(params, state, x, y):
    _, grads, gal_args = value_and_grad(params, x, y)
    updates, state = tx.update(grads, state, params, **gal_args)
    return optax.apply_updates(params, updates), state

  return step, params, tx.init(params), x, y


def _run(step, params, state, x, y, steps=3):
  for _ in range(steps):
    params, state = step(params, state, x, y)
  return params, state


def _replicate(tree):
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (_DEVICES,) + a.shape), tree)


def _shards(a):
  return a.reshape((_DEVICES, -1) + a.shape[1:])


def _assert_same_run(got, ref):
  # The remainder's direct form, l(z - eta g) - l(z) + eta <dl, g>, cancels:
  # its float32 rounding, which differs with the batch's shape, is amplified.
  (got_params, (got_gal, got_sgd)), (ref_params, (ref_gal, ref_sgd)) = got, ref
  np.testing.assert_allclose(got_gal.remainder, ref_gal.remainder, rtol=1e-2)
  got = (got_params, got_gal._replace(remainder=0.0), got_sgd)
  ref = (ref_params, ref_gal._replace(remainder=0.0), ref_sgd)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6),
               got, ref)


@pytest.mark.slow
@pytest.mark.parametrize("safeguard", ["per_sample", "batch"])
def test_axis_name_makes_8_devices_equal_1_device(safeguard):
  if jax.device_count() < _DEVICES:
    pytest.skip("needs 8 devices (jax_num_cpu_devices=8 in conftest.py)")
  step, params, state, x, y = _data_parallel_problem(safeguard)
  ref = _run(jax.jit(step), params, state, x, y)
  assert 0 < float(ref[1][0].accepted_fraction)

  step, params, state, x, y = _data_parallel_problem(safeguard, axis_name="batch")
  pmapped = jax.pmap(step, axis_name="batch")
  got = _run(pmapped, _replicate(params), _replicate(state), _shards(x), _shards(y))
  for device in (0, _DEVICES - 1):
    _assert_same_run(jax.tree.map(lambda a, d=device: a[d], got), ref)

  mesh = jax.make_mesh((_DEVICES,), ("batch",), axis_types=(AxisType.Explicit,))
  P = PartitionSpec
  mapped = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P("batch"), P("batch")),
                                 out_specs=(P(), P())))
  batch, replicated = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())
  _assert_same_run(_run(mapped, jax.device_put(params, replicated),
                        jax.device_put(state, replicated),
                        jax.device_put(x, batch), jax.device_put(y, batch)), ref)


@pytest.mark.slow
def test_per_device_gal_without_axis_name_differs():
  """What axis_name fixes: without it each device adjusts on its own shard."""
  if jax.device_count() < _DEVICES:
    pytest.skip("needs 8 devices (jax_num_cpu_devices=8 in conftest.py)")
  step, params, state, x, y = _data_parallel_problem("per_sample")
  ref = _run(jax.jit(step), params, state, x, y)
  got = _run(jax.pmap(step, axis_name="batch"), _replicate(params), _replicate(state),
             _shards(x), _shards(y))
  first = jax.tree.map(lambda a: a[0], got)
  assert not np.allclose(first[1][0].adjuster_params, ref[1][0].adjuster_params, atol=1e-6)


@pytest.mark.slow
def test_jit_with_a_sharded_global_batch_needs_no_axis_name():
  if jax.device_count() < _DEVICES:
    pytest.skip("needs 8 devices (jax_num_cpu_devices=8 in conftest.py)")
  step, params, state, x, y = _data_parallel_problem("batch")
  ref = _run(jax.jit(step), params, state, x, y)
  mesh = jax.make_mesh((_DEVICES,), ("batch",), axis_types=(AxisType.Explicit,))
  batch = NamedSharding(mesh, PartitionSpec("batch"))
  xs, ys = jax.device_put(x, batch), jax.device_put(y, batch)
  replicated = NamedSharding(mesh, PartitionSpec())
  got = _run(jax.jit(step), jax.device_put(params, replicated),
             jax.device_put(state, replicated), xs, ys)
  _assert_same_run(got, ref)


# ------------------------------------------------------------------ nnx


def _pure_vjp(vjp, cotangent):
  from flax import nnx
  return nnx.as_pure(vjp(cotangent))


@pytest.mark.slow
def test_nnx_recipe_with_batchnorm_and_dropout():
  """The recipe of the GAL page: nnx.split, a pure copy of the other state."""
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.hidden = nnx.Linear(6, 16, rngs=rngs)
      self.norm = nnx.BatchNorm(16, rngs=rngs)
      self.drop = nnx.Dropout(0.2, rngs=rngs)
      self.out = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
      return self.out(self.drop(nnx.relu(self.norm(self.hidden(x)))))

  model = Net(nnx.Rngs(0))
  lr = 0.05
  tx = optax.chain(optax_ortho.gal(3, lr, alpha=0.1, beta=0.1, hidden_sizes=(8,)),
                   optax.adam(lr))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rest = nnx.as_pure(rest)  # BatchStat, RNG counts: updated on a copy

    def apply_fn(params, x):
      copy = nnx.merge(graphdef, params, rest)
      return copy(x), nnx.as_pure(nnx.state(copy, nnx.Not(nnx.Param)))

    (loss, new_rest), grads, gal_args = optax_ortho.gal_value_and_grad(
        apply_fn, cross_entropy, has_aux=True)(params, x, y)
    nnx.update(model, new_rest)
    # nnx.Optimizer hands tx.update pure arrays; gal_vjp must return them too.
    gal_args["gal_vjp"] = jax.tree_util.Partial(_pure_vjp, gal_args["gal_vjp"])
    optimizer.update(model, grads, **gal_args)
    return loss

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((32, 6)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 32))
  mean0 = np.array(model.norm.mean[...])
  count0 = int(model.drop.rngs.count[...])
  losses = [float(train_step(model, optimizer, x, y)) for _ in range(15)]
  assert np.abs(np.array(model.norm.mean[...]) - mean0).max() > 0  # statistics move
  assert np.mean(losses[-3:]) < losses[0]
  gal_state = optimizer.opt_state[0]
  assert int(gal_state.count[...]) == 15
  assert float(gal_state.accepted_fraction[...]) > 0
  assert int(model.drop.rngs.count[...]) == count0 + 15  # a new dropout key per step


@pytest.mark.slow  # six small compiles: about a minute on a loaded machine
def test_diabetes_benchmark_runs_tiny(tmp_path):
  path = __import__("pathlib").Path(__file__).parent.parent / "benchmarks" / "gal_diabetes.py"
  import importlib.util
  spec = importlib.util.spec_from_file_location("_gal_diabetes", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  out = module.main(["--seeds", "2", "--epochs", "1", "--json", str(tmp_path / "d.json")])
  assert (tmp_path / "d.json").exists()
  for row in out["protocols"].values():
    low, high = row["gal_minus_baseline"]["ci95"]
    assert low <= row["gal_minus_baseline"]["mean"] <= high
    assert all(np.isfinite(v) for v in row["mae_mean"].values())


@pytest.mark.slow
def test_parameter_term_added_after_gal():
  """The GAL page's recipe: L2 on the parameters via add_decayed_weights after GAL."""
  apply_fn, params, x, y = _mlp_problem()
  weight = 0.1
  tx = optax.chain(optax_ortho.gal(5, 0.1, alpha=0.0, beta=0.1, hidden_sizes=(8,)),
                   optax.add_decayed_weights(weight))
  _, grads, gal_args = optax_ortho.gal_value_and_grad(apply_fn, cross_entropy)(params, x, y)
  updates, _ = jax.jit(lambda g, s, p, a: tx.update(g, s, p, **a))(
      grads, tx.init(params), params, gal_args)

  def total(p):
    l2 = sum(jnp.sum(w * w) for w in jax.tree.leaves(p))
    return cross_entropy(apply_fn(p, x), y) + 0.5 * weight * l2

  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               updates, jax.grad(total)(params))
