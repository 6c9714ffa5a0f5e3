"""orthonormalize(parallel="layers"): same numbers as the replicated mode, a balanced share of the work."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from optax.contrib import MuonDimensionNumbers as DN

import optax_ortho
from optax_ortho._src import layer_parallel
from tests import harness

METHODS = ("svd", "gram", "auto", "newton_schulz", "polar_express")

needs_8 = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices (conftest.py)")


def _grads(seed=0):
  """Groups of 10, 3 and 1 matrices (more and fewer than 8 devices), a wide
  kernel, a conv sharded on its reduction axes and a bias."""
  rng = np.random.default_rng(seed)
  shapes = {f"block{i}": (8, 4) for i in range(10)}
  shapes |= {"wide": (4, 16), "conv": (2, 3, 8, 8), "conv_b": (1, 6, 8, 8),
             "dense": (48, 8), "bias": (8,)}
  return {k: jnp.asarray(rng.standard_normal(s), jnp.float32)
          for k, s in shapes.items()}


def _specs(grads):
  specs = {k: P("data", "model") for k in grads if k.startswith("block")}
  specs |= {"wide": P(None, "model"), "conv": P("data", None, "model", None),
            "conv_b": P(None, "data", "model", None), "dense": P("model", None),
            "bias": P("model")}
  return specs


def _mesh(axis_type):
  return jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)


def _update(tx, grads):
  return jax.jit(tx.update)(grads, tx.init(grads))[0]


@needs_8
@pytest.mark.slow  # 8 cases of 12-24 s each on a loaded 2-core machine
@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto],
                         ids=["explicit", "auto"])
@pytest.mark.parametrize("method", METHODS)
def test_layers_equal_replicated_on_a_mesh(method, axis_type):
  grads = _grads()
  ref = _update(optax_ortho.orthonormalize(method), grads)
  mesh = _mesh(axis_type)
  specs = _specs(grads)
  with jax.set_mesh(mesh):
    sharded = {k: jax.device_put(v, NamedSharding(mesh, specs[k]))
               for k, v in grads.items()}
    out = _update(optax_ortho.orthonormalize(method, parallel="layers"), sharded)
  # "auto" takes the Gram or the SVD route per matrix; both are exact to
  # ~1e-6, and the iterative methods' stacks are batched differently here.
  atol = 2e-6 if method in ("svd", "gram") else 2e-5
  for k in grads:
    np.testing.assert_allclose(out[k], ref[k], atol=atol, err_msg=k)
    if axis_type == AxisType.Explicit:
      assert jax.typeof(out[k]).sharding.spec == specs[k], k
  np.testing.assert_array_equal(out["bias"], grads["bias"])


@pytest.mark.slow
@needs_8
@pytest.mark.parametrize("method", ["svd", "newton_schulz"])
def test_nan_stays_in_its_matrix_on_a_mesh(method):
  """Both ways back (all-gather of blocks, psum of zero-filled stacks) keep a
  NaN where it was: no slot is summed with another device's result."""
  grads = _grads(6)
  ref = _update(optax_ortho.orthonormalize(method), grads)
  grads["block3"] = grads["block3"].at[0, 0].set(jnp.nan)  # gathered group
  grads["dense"] = grads["dense"].at[1, 1].set(jnp.nan)  # psum group
  mesh = _mesh(AxisType.Explicit)
  with jax.set_mesh(mesh):
    sharded = {k: jax.device_put(v, NamedSharding(mesh, s))
               for (k, v), s in zip(grads.items(), _specs(grads).values())}
    out = _update(optax_ortho.orthonormalize(method, parallel="layers"), sharded)
  for k in grads:
    if k in ("block3", "dense"):
      assert np.isnan(out[k]).all(), k
    else:
      np.testing.assert_allclose(out[k], ref[k], atol=2e-5, err_msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_without_mesh_layers_is_the_replicated_mode(method):
  grads = _grads(1)
  ref = _update(optax_ortho.orthonormalize(method), grads)
  out = _update(optax_ortho.orthonormalize(method, parallel="layers"), grads)
  for k in grads:
    np.testing.assert_array_equal(out[k], ref[k], err_msg=k)


def test_one_device_mesh_is_the_replicated_mode():
  grads = _grads(2)
  mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Explicit,),
                       devices=jax.devices()[:1])
  ref = _update(optax_ortho.orthonormalize("svd"), grads)
  with jax.set_mesh(mesh):
    out = _update(optax_ortho.orthonormalize("svd", parallel="layers"), grads)
  for k in grads:
    np.testing.assert_array_equal(out[k], ref[k], err_msg=k)


@pytest.mark.slow
@needs_8
def test_mesh_argument_without_set_mesh():
  """Auto-sharded jit with in_shardings and no `jax.set_mesh`: pass `mesh`."""
  grads = _grads(3)
  mesh = _mesh(AxisType.Auto)
  specs = _specs(grads)
  shardings = {k: NamedSharding(mesh, specs[k]) for k in grads}
  tx = optax_ortho.orthonormalize("svd", parallel="layers", mesh=mesh)
  step = jax.jit(lambda g: tx.update(g, tx.init(g))[0],
                 in_shardings=(shardings,), out_shardings=shardings)
  out = step(grads)
  assert "shard_map" in str(jax.make_jaxpr(step)(grads))
  ref = _update(optax_ortho.orthonormalize("svd"), grads)
  for k in grads:
    np.testing.assert_allclose(out[k], ref[k], atol=2e-6, err_msg=k)
    assert out[k].sharding.is_equivalent_to(shardings[k], out[k].ndim)


@pytest.mark.slow
@needs_8
@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto],
                         ids=["explicit", "auto"])
def test_inside_a_users_shard_map_spreads_over_the_free_axes(axis_type):
  """Under a shard_map over "data" (a manual axis), only "model" is free."""
  grads = _grads(7)
  ref = _update(optax_ortho.orthonormalize("svd"), grads)
  tx = optax_ortho.orthonormalize("svd", parallel="layers")
  with jax.set_mesh(_mesh(axis_type)):
    step = jax.jit(jax.shard_map(lambda g: tx.update(g, None)[0],
                                 in_specs=P(), out_specs=P(),
                                 axis_names={"data"}))
    out = step(grads)
  for k in grads:
    np.testing.assert_allclose(out[k], ref[k], atol=2e-6, err_msg=k)


@needs_8
def test_batch_axes_of_dimension_numbers_are_spread_too():
  rng = np.random.default_rng(4)
  g = {"heads": jnp.asarray(rng.standard_normal((8, 6, 4)), jnp.float32)}
  dims = {"heads": DN(reduction_axis=1, output_axis=2)}
  ref = _update(optax_ortho.orthonormalize("svd", dimension_numbers=dims), g)
  mesh = _mesh(AxisType.Explicit)
  with jax.set_mesh(mesh):
    sg = {"heads": jax.device_put(g["heads"], NamedSharding(mesh, P("model")))}
    out = _update(optax_ortho.orthonormalize(
        "svd", dimension_numbers=dims, parallel="layers"), sg)
  np.testing.assert_allclose(out["heads"], ref["heads"], atol=2e-6)


@needs_8
def test_no_matrix_leaves_on_a_mesh():
  mesh = _mesh(AxisType.Explicit)
  with jax.set_mesh(mesh):
    g = {"bias": jax.device_put(jnp.arange(8.0), NamedSharding(mesh, P("model")))}
    out = _update(optax_ortho.orthonormalize(parallel="layers"), g)
  np.testing.assert_array_equal(out["bias"], np.arange(8.0))


@needs_8
def test_each_device_decomposes_its_share_of_the_work():
  grads = _grads(5)
  # Groups after the view: 10 x (8, 4), 1 x (16, 4), 3 x (48, 8) -> 14 SVDs
  # replicated. Scheduled largest first: the three (48, 8) matrices get a
  # device each, the other 11 share the remaining five devices, so the
  # busiest device by flops holds one (48, 8) and the busiest by count three
  # (8, 4) matrices.
  mesh = _mesh(AxisType.Explicit)
  with jax.set_mesh(mesh):
    sharded = {k: jax.device_put(v, NamedSharding(mesh, s))
               for (k, v), s in zip(grads.items(), _specs(grads).values())}
    work = {}
    for parallel in ("replicated", "layers"):
      tx = optax_ortho.orthonormalize("svd", parallel=parallel)
      jaxpr = jax.make_jaxpr(lambda g, tx=tx: tx.update(g, None)[0])(sharded)
      work[parallel] = harness.decompositions_per_device(jaxpr)
      assert ("shard_map" in str(jaxpr)) == (parallel == "layers")
  cost = layer_parallel.matrix_cost
  assert work["replicated"] == (
      14, 10 * cost(8, 4) + cost(16, 4) + 3 * cost(48, 8))
  assert work["layers"] == (3, cost(48, 8))
  assert layer_parallel.spread_devices(list(sharded.values()), None) == 8


@pytest.mark.parametrize("shapes,devices,expected", [
    # One group of 10 on 4 devices: round robin, ceil(10/4) = 3 at most.
    ([(10, 8, 4)], 4, [{0: (0, 4, 8)}, {0: (1, 5, 9)}, {0: (2, 6)}, {0: (3, 7)}]),
    # Single-matrix groups go to different devices, none is padded.
    ([(1, 8, 8), (1, 16, 8), (1, 4, 4)], 4, [{1: (0,)}, {0: (0,)}, {2: (0,)}, {}]),
])
def test_schedule_balances_groups_against_each_other(shapes, devices, expected):
  assert layer_parallel.schedule(shapes, devices) == expected


@settings(deadline=None)
@given(st.lists(st.tuples(st.integers(1, 6), st.integers(1, 32),
                          st.integers(1, 32)), min_size=1, max_size=6),
       st.integers(1, 16))
def test_schedule_assigns_every_matrix_once_within_one_matrix_of_even(
    groups, devices):
  shapes = [(k, max(m, n), min(m, n)) for k, m, n in groups]
  plan = layer_parallel.schedule(shapes, devices)
  assert len(plan) == devices
  owned = sorted((g, i) for own in plan for g, idx in own.items() for i in idx)
  assert owned == [(g, i) for g, (k, _, _) in enumerate(shapes) for i in range(k)]
  cost = [layer_parallel.matrix_cost(m, n) for _, m, n in shapes]
  loads = [sum(cost[g] * len(idx) for g, idx in own.items()) for own in plan]
  # LPT's guarantee: the busiest device exceeds the least busy by at most
  # the largest matrix.
  assert max(loads) - min(loads) <= max(cost)


def test_bad_parallel_and_mesh_fail_naming_the_value():
  with pytest.raises(ValueError, match=r"parallel='rows'.*'replicated', 'layers'"):
    optax_ortho.orthonormalize(parallel="rows")
  with pytest.raises(TypeError, match=r"mesh must be a jax.sharding.Mesh.*'data'"):
    optax_ortho.orthonormalize(parallel="layers", mesh="data")
