"""Explicit-axis sharding: where optax's Muon fails, orthonormalize works."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from optax.contrib import MuonDimensionNumbers as DN

import optax_ortho

needs_8 = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices (conftest.py)")

# A conv kernel sharded on two of its reduction axes (kernel height, input
# channels) over a 2 x 4 mesh of Explicit axes, jax.make_mesh's default.
_SHAPE, _SPEC = (2, 3, 8, 8), P("data", None, "model", None)
_DIMS = {"conv": DN(reduction_axis=(0, 1, 2), output_axis=3)}


def _sharded_conv():
  mesh = jax.make_mesh((2, 4), ("data", "model"),
                       axis_types=(AxisType.Explicit,) * 2)
  g = jnp.asarray(np.random.default_rng(0).standard_normal(_SHAPE), jnp.float32)
  return mesh, {"conv": g}, {"conv": jax.device_put(g, NamedSharding(mesh, _SPEC))}


@needs_8
def test_optax_muon_raises_sharding_type_error_under_explicit_axes():
  mesh, _, sharded = _sharded_conv()
  tx = optax.contrib.scale_by_muon(weight_dimension_numbers=_DIMS)
  with jax.set_mesh(mesh):
    state = jax.jit(tx.init)(sharded)
    with pytest.raises(Exception, match="out_sharding") as info:
      jax.jit(tx.update)(sharded, state, sharded)
  # jax keeps the class private (jax._src.core); match it by name.
  assert type(info.value).__name__ == "ShardingTypeError"


@pytest.mark.slow
@needs_8
@pytest.mark.parametrize("parallel", ["replicated", "layers"])
def test_orthonormalize_newton_schulz_works_where_muon_fails(parallel):
  mesh, grads, sharded = _sharded_conv()
  # Muon's own iteration on the unsharded kernel is the reference.
  muon = optax.contrib.scale_by_muon(
      weight_dimension_numbers=_DIMS, beta=0.0, nesterov=False,
      adaptive=False)
  # Its shape scale sqrt(max(1, cols / rows)) is 1 for this (48, 8) view.
  ref = muon.update(grads, muon.init(grads), grads)[0]["conv"]
  tx = optax_ortho.orthonormalize("newton_schulz", parallel=parallel)
  with jax.set_mesh(mesh):
    out, _ = jax.jit(tx.update)(sharded, tx.init(sharded))
  assert jax.typeof(out["conv"]).sharding.spec == _SPEC
  np.testing.assert_allclose(out["conv"], ref, atol=1e-4)


@pytest.mark.slow
@needs_8
@pytest.mark.parametrize("parallel", ["replicated", "layers"])
@pytest.mark.parametrize(
    "method", ["svd", "gram", "auto", "newton_schulz", "polar_express"])
def test_sharded_without_mesh_context(method, parallel):
  # jax.make_mesh's Explicit axes, device_put, a bare jit: no jax.set_mesh.
  # The mesh comes from the arrays' own shardings.
  _, grads, sharded = _sharded_conv()
  tx = optax_ortho.orthonormalize(method, parallel=parallel)
  out, _ = jax.jit(tx.update)(sharded, tx.init(sharded))
  ref, _ = tx.update(grads, tx.init(grads))
  assert out["conv"].sharding == sharded["conv"].sharding
  assert jax.typeof(out["conv"]).sharding.spec == _SPEC
  np.testing.assert_allclose(out["conv"], ref["conv"], atol=2e-5)
