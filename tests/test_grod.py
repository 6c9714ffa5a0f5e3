"""GrOD: the formula, its invariant, errors, and the shared contract suite."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, strategies as st

import optax_ortho
from tests.contract import ContractCase, contract_suite

# ------------------------------------------------------------ contract


def _l2_to_zero(loss_fn, params, grads):
  del loss_fn, grads
  return {"regularizer_grads": params}


def _l2_to_anchor(loss_fn, params, grads):
  del loss_fn, grads
  return {"regularizer_grads": jax.tree.map(lambda p: p - jnp.ones_like(p), params)}


def _clipped_sgd():
  # The suite's default SGD diverges on Rosenbrock for any transform that keeps
  # the raw gradient's scale (plain SGD itself gives NaN there): GrOD does, so
  # its cases clip the global norm before the same SGD.
  return optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.sgd(optax.cosine_decay_schedule(0.05, 300), momentum=0.9))


CASES = [
    ContractCase(
        name="grod[global]",
        make=optax_ortho.grod,
        hyperparams={"regularizer_weight": 0.5},
        extra_args=_l2_to_zero,
        optimizer=_clipped_sgd,
    ),
    ContractCase(
        name="grod[per_leaf]",
        make=lambda regularizer_weight: optax_ortho.grod(
            regularizer_weight, granularity="per_leaf"),
        hyperparams={"regularizer_weight": 0.5},
        extra_args=_l2_to_anchor,
        optimizer=_clipped_sgd,
    ),
]

test_contract = contract_suite(CASES)

# ------------------------------------------------------------ reference


def reference(gj, go, lam, granularity):
  """NumPy float64 GrOD on lists of arrays."""
  gj = [np.asarray(x, np.float64) for x in gj]
  go = [np.asarray(x, np.float64) for x in go]

  def one(gjs, gos):
    ip = sum(float(np.sum(a * b)) for a, b in zip(gjs, gos))
    nsq = sum(float(np.sum(a * a)) for a in gjs)
    if ip >= 0 or nsq == 0:
      return [a + lam * b for a, b in zip(gjs, gos)]
    return [a + lam * (b - ip / nsq * a) for a, b in zip(gjs, gos)]

  if granularity == "global":
    return one(gj, go)
  return [one([a], [b])[0] for a, b in zip(gj, go)]


SHAPES = [(3, 4), (5,), (2, 2, 3), ()]


@st.composite
def grad_pairs(draw):
  """Random gradient pytrees (task, regulariser) over several leaf shapes.

  `mode` controls the sign of <gJ, gO>: random, forced conflict (gO pushed
  against gJ) or forced agreement; magnitudes span many orders.
  """
  seed = draw(st.integers(0, 2**31 - 1))
  mode = draw(st.sampled_from(["random", "conflict", "agree"]))
  log_scale_j = draw(st.floats(-6, 6))
  log_scale_o = draw(st.floats(-6, 6))
  rng = np.random.default_rng(seed)
  gj = [rng.standard_normal(s) * 10.0**log_scale_j for s in SHAPES]
  go = [rng.standard_normal(s) * 10.0**log_scale_o for s in SHAPES]
  if mode != "random":
    sign = -1.0 if mode == "conflict" else 1.0
    norm_j = np.sqrt(sum(np.sum(a * a) for a in gj))
    norm_o = np.sqrt(sum(np.sum(b * b) for b in go))
    go = [b + sign * 2.0 * norm_o / norm_j * a for a, b in zip(gj, go)]
  gj = {f"l{i}": jnp.asarray(a, jnp.float32) for i, a in enumerate(gj)}
  go = {f"l{i}": jnp.asarray(b, jnp.float32) for i, b in enumerate(go)}
  return gj, go


def _apply(gj, go, lam, granularity):
  tx = optax_ortho.grod(lam, granularity=granularity)
  out, state = jax.jit(tx.update)(gj, tx.init(gj), regularizer_grads=go)
  return out, state


def _leaves64(tree):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


@pytest.mark.slow
@given(grad_pairs(), st.floats(0.0, 10.0), st.sampled_from(["global", "per_leaf"]))
def test_matches_numpy_reference(pair, lam, granularity):
  gj, go = pair
  out, _ = _apply(gj, go, lam, granularity)
  ref = reference(jax.tree.leaves(gj), jax.tree.leaves(go), lam, granularity)
  for got, want, a, b in zip(_leaves64(out), ref, _leaves64(gj), _leaves64(go)):
    # Relative to the size of the terms that are summed.
    tol = 1e-5 * (np.abs(a).max(initial=0) + lam * np.abs(b).max(initial=0)) + 1e-30
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=tol)


@pytest.mark.slow
@given(grad_pairs(), st.floats(0.0, 10.0), st.sampled_from(["global", "per_leaf"]))
def test_invariant_descent(pair, lam, granularity):
  """<d, gJ> >= |gJ|^2 (per leaf for per_leaf), up to float32 rounding."""
  gj, go = pair
  out, _ = _apply(gj, go, lam, granularity)
  d, a, b = _leaves64(out), _leaves64(gj), _leaves64(go)
  groups = [list(range(len(a)))] if granularity == "global" else [[i] for i in range(len(a))]
  for g in groups:
    inner = sum(np.sum(d[i] * a[i]) for i in g)
    nsq = sum(np.sum(a[i] * a[i]) for i in g)
    norm_j = np.sqrt(nsq)
    norm_o = np.sqrt(sum(np.sum(b[i] * b[i]) for i in g))
    slack = 1e-5 * (nsq + lam * norm_j * norm_o)
    assert inner >= nsq - slack, (inner, nsq, slack)


@pytest.mark.slow
@given(grad_pairs(), st.sampled_from(["global", "per_leaf"]))
def test_zero_weight_gives_task_gradient(pair, granularity):
  gj, go = pair
  out, _ = _apply(gj, go, 0.0, granularity)
  for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(gj)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("granularity", ["global", "per_leaf"])
def test_zero_task_gradient_gives_weighted_regularizer(granularity):
  gj = {"a": jnp.zeros((3, 2)), "b": jnp.zeros(4)}
  go = {"a": -jnp.ones((3, 2)), "b": jnp.arange(4.0)}
  out, state = _apply(gj, go, 0.3, granularity)
  for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(go)):
    np.testing.assert_allclose(got, 0.3 * want, rtol=1e-6)
    assert np.isfinite(np.asarray(got)).all()
  assert not any(bool(c) for c in jax.tree.leaves(state.conflict))


def test_conflict_projects_and_is_recorded():
  gj = {"w": jnp.array([-1.0, 0.0])}
  go = {"w": jnp.array([1.0, 2.0])}
  out, state = _apply(gj, go, 1.0, "global")
  # rtol: d is rounded towards gJ by a few roundings of the projection.
  np.testing.assert_allclose(out["w"], [-1.0, 2.0], rtol=1e-5)
  assert bool(state.conflict)
  out, state = _apply(gj, {"w": jnp.array([-1.0, 2.0])}, 1.0, "global")
  np.testing.assert_allclose(out["w"], [-2.0, 2.0], rtol=1e-5)
  assert not bool(state.conflict)


def test_per_leaf_decides_each_leaf_alone():
  # Globally no conflict (<gJ, gO> = -1 + 3 > 0), but leaf "a" conflicts.
  gj = {"a": jnp.array([1.0, 0.0]), "b": jnp.array([1.0])}
  go = {"a": jnp.array([-1.0, 1.0]), "b": jnp.array([3.0])}
  glob, _ = _apply(gj, go, 1.0, "global")
  leaf, state = _apply(gj, go, 1.0, "per_leaf")
  np.testing.assert_allclose(glob["a"], [0.0, 1.0])
  np.testing.assert_allclose(leaf["a"], [1.0, 1.0], rtol=1e-5)  # a few roundings
  np.testing.assert_allclose(leaf["b"], [4.0])
  assert bool(state.conflict["a"]) and not bool(state.conflict["b"])


@pytest.mark.parametrize("granularity", ["global", "per_leaf"])
def test_extreme_magnitudes_no_overflow_or_underflow(granularity):
  """|gJ|^2 under- or overflows float32: the rescaled branch takes over."""
  for scale in (1e-30, 1e30):
    gj = {"w": jnp.array([-scale, 0.0]), "v": jnp.array([scale])}
    go = {"w": jnp.array([1.0, 2.0]), "v": jnp.array([-1.0])}
    out, state = _apply(gj, go, 1.0, granularity)
    # The projection errs towards gJ by a few roundings of |gO| (here ~1).
    np.testing.assert_allclose(out["w"], [-scale, 2.0], rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(out["v"], [scale], rtol=1e-6, atol=1e-5)
    for k in gj:
      d, a = np.asarray(out[k], np.float64), np.asarray(gj[k], np.float64)
      assert d @ a >= a @ a
    assert all(bool(c) for c in jax.tree.leaves(state.conflict))


def test_non_finite_leaf_does_not_spread_or_poison_state():
  gj = {"a": jnp.array([jnp.nan, 1.0]), "b": jnp.array([-1.0, 0.0])}
  go = {"a": jnp.array([1.0, 1.0]), "b": jnp.array([1.0, 2.0])}
  out, state = _apply(gj, go, 1.0, "global")
  assert not np.isfinite(np.asarray(out["a"])).all()
  assert np.isfinite(np.asarray(out["b"])).all()
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))


@given(log_ratio=st.floats(-30.0, 37.0), seed=st.integers(0, 2**31 - 1),
       lam=st.sampled_from([1.0, 0.3, 1e-3]),
       mode=st.sampled_from(["conflict", "random", "nearly_orthogonal"]),
       granularity=st.sampled_from(["global", "per_leaf"]),
       dtype=st.sampled_from(["float32", "bfloat16"]))
def test_descent_at_every_ratio(log_ratio, seed, lam, mode, granularity, dtype):
  """<d, gJ> >= |gJ|^2, in exact arithmetic on the output, at any |gO| / |gJ|."""
  rng = np.random.default_rng(seed)
  shapes = [(16, 8), (7,)]
  gj = [rng.standard_normal(sh) for sh in shapes]
  go = [rng.standard_normal(sh) for sh in shapes]
  if mode != "random":
    # Pull gO against gJ: a conflict whose projection cancels most of gO's
    # part along gJ (nearly orthogonal: <gJ, gO> just below 0).
    k = -2.0 if mode == "conflict" else -1e-7
    nj, no = (np.sqrt(sum(np.sum(x * x) for x in t)) for t in (gj, go))
    go = [b + k * no / nj * a for a, b in zip(gj, go)]
  ratio = 10.0 ** log_ratio
  big = np.sqrt(sum(np.sum(x * x) for x in go))
  go = [b / big * ratio for b in go]
  cast = lambda xs: {f"l{i}": jnp.asarray(x, dtype) for i, x in enumerate(xs)}
  gj_t, go_t = cast(gj), cast(go)
  out, _ = _apply(gj_t, go_t, lam, granularity)
  d, a = _leaves64(out), _leaves64(gj_t)
  assert all(np.isfinite(x).all() for x in d)
  groups = [[0, 1]] if granularity == "global" else [[0], [1]]
  for g in groups:
    inner = sum(np.sum(d[i] * a[i]) for i in g)
    nsq = sum(np.sum(a[i] * a[i]) for i in g)
    # Only the rounding of gJ's own part may take something off |gJ|^2.
    assert inner >= nsq * (1 - 4 * float(jnp.finfo(dtype).eps)), (inner / nsq, ratio)


def test_large_ratios_keep_the_task_component():
  rng = np.random.default_rng(0)
  gj = rng.standard_normal(64)
  go = rng.standard_normal(64)
  go = go - 2.0 * (go @ gj) / (gj @ gj) * gj - gj  # <gJ, gO> < 0
  for ratio in (1e6, 1e7, 1e30):
    go_r = go / np.linalg.norm(go) * ratio * np.linalg.norm(gj)
    out, _ = _apply({"w": jnp.asarray(gj, jnp.float32)},
                    {"w": jnp.asarray(go_r, jnp.float32)}, 1.0, "global")
    d = np.asarray(out["w"], np.float64)
    gj32 = np.asarray(jnp.asarray(gj, jnp.float32), np.float64)
    assert d @ gj32 >= (1 - 1e-6) * (gj32 @ gj32), (ratio, d @ gj32 / (gj32 @ gj32))


def test_schedule_uses_step_count():
  tx = optax_ortho.grod(optax.linear_schedule(0.0, 1.0, 1))
  gj, go = {"w": jnp.ones(2)}, {"w": jnp.ones(2)}
  state = tx.init(gj)
  out0, state = tx.update(gj, state, regularizer_grads=go)
  out1, state = tx.update(gj, state, regularizer_grads=go)
  np.testing.assert_allclose(out0["w"], [1.0, 1.0])
  np.testing.assert_allclose(out1["w"], [2.0, 2.0])


def test_ignores_other_extra_args_in_chain():
  tx = optax.chain(optax_ortho.grod(1.0), optax.sgd(1.0))
  gj, go = {"w": jnp.ones(2)}, {"w": jnp.ones(2)}
  out, _ = tx.update(gj, tx.init(gj), gj, regularizer_grads=go, grad_fn=None)
  np.testing.assert_allclose(out["w"], [-2.0, -2.0])


# ------------------------------------------------------------ errors


def test_missing_regularizer_grads_is_type_error():
  tx = optax_ortho.grod()
  g = {"w": jnp.ones(2)}
  with pytest.raises(TypeError, match="regularizer_grads"):
    tx.update(g, tx.init(g))


def test_mismatched_structure_names_path():
  tx = optax_ortho.grod()
  g = {"a": jnp.ones(2), "b": jnp.ones(3)}
  with pytest.raises(ValueError, match=r"\['b'\]"):
    tx.update(g, tx.init(g), regularizer_grads={"a": jnp.ones(2), "c": jnp.ones(3)})
  with pytest.raises(ValueError, match=r"\['b'\].*shape"):
    tx.update(g, tx.init(g), regularizer_grads={"a": jnp.ones(2), "b": jnp.ones(4)})
  with pytest.raises(ValueError, match="no further leaf"):
    tx.update(g, tx.init(g), regularizer_grads={"a": jnp.ones(2)})


def test_state_checked_against_the_gradients():
  g = {"a": jnp.ones(2), "b": jnp.ones(3)}
  per_leaf = optax_ortho.grod(granularity="per_leaf")
  with pytest.raises(TypeError, match="GrodState"):
    per_leaf.update(g, optax.EmptyState(), regularizer_grads=g)
  with pytest.raises(ValueError, match=r"state\.conflict.*\['b'\]"):
    per_leaf.update(g, per_leaf.init({"a": jnp.ones(2), "c": jnp.ones(3)}), regularizer_grads=g)
  with pytest.raises(ValueError, match="granularity"):
    per_leaf.update(g, optax_ortho.grod().init(g), regularizer_grads=g)
  with pytest.raises(ValueError, match="granularity"):
    optax_ortho.grod().update(g, per_leaf.init(g), regularizer_grads=g)


def test_bad_hyperparameters():
  with pytest.raises(ValueError, match="granularity.*'layer'"):
    optax_ortho.grod(granularity="layer")
  with pytest.raises(ValueError, match="regularizer_weight.*-1"):
    optax_ortho.grod(-1.0)
  with pytest.raises(TypeError, match="regularizer_weight"):
    optax_ortho.grod("big")


def test_integer_gradients_rejected():
  tx = optax_ortho.grod()
  g = {"w": jnp.ones(2, jnp.int32)}
  with pytest.raises(TypeError, match="floating"):
    tx.update(g, tx.init(g), regularizer_grads=g)
