"""orthonormalize: matrix views, batching, bad input, degenerate gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from optax.contrib import MuonDimensionNumbers as DN

import optax_ortho
from optax_ortho import testing

METHODS = ("svd", "gram", "auto", "newton_schulz", "polar_express")


def _update(tx, grads):
  out, _ = jax.jit(tx.update)(grads, tx.init(grads))
  return out


def _flax_like(rng, dtype=np.float32):
  return {
      "conv": {"kernel": rng.standard_normal((3, 3, 4, 8)).astype(dtype),
               "bias": rng.standard_normal(8).astype(dtype)},
      "dense": {"kernel": rng.standard_normal((72, 10)).astype(dtype),
                "bias": rng.standard_normal(10).astype(dtype)},
      "bn": {"scale": rng.standard_normal(8).astype(dtype)},
  }


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_default_view_matches_polar_of_reshaped_kernel(method):
  grads = _flax_like(np.random.default_rng(0))
  out = _update(optax_ortho.orthonormalize(method), grads)
  conv = grads["conv"]["kernel"]
  np.testing.assert_allclose(
      out["conv"]["kernel"],
      optax_ortho.polar(conv.reshape(36, 8), method=method).reshape(conv.shape),
      atol=1e-5)
  for leaf in ("conv", "dense"):
    np.testing.assert_array_equal(out[leaf]["bias"], grads[leaf]["bias"])
  np.testing.assert_array_equal(out["bn"]["scale"], grads["bn"]["scale"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ("svd", "auto"))
@given(tree=testing.gradient_trees())
def test_every_matrix_leaf_is_its_pseudo_polar_factor(method, tree):
  out = _update(optax_ortho.orthonormalize(method), tree)
  for k, g in tree.items():
    assert out[k].shape == g.shape and out[k].dtype == g.dtype
    if g.ndim < 2:
      np.testing.assert_array_equal(out[k], g)
    else:
      m = g.reshape(-1, g.shape[-1])
      testing.assert_pseudo_polar(m, np.asarray(out[k]).reshape(m.shape), atol=1e-4)


def test_same_shapes_share_one_decomposition():
  rng = np.random.default_rng(0)
  # Three (6, 4) views (one of them transposed) and one (5, 3): two groups.
  grads = {"a": rng.standard_normal((6, 4)), "b": rng.standard_normal((2, 3, 4)),
           "c": rng.standard_normal((4, 6)), "d": rng.standard_normal((5, 3))}
  grads = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grads)
  # Counted in the program lowered for this CPU: the jaxpr holds each call
  # twice, once per platform branch of `jax.lax.platform_dependent`.
  for method, call in (("svd", "@lapack_sgesdd"), ("gram", "@lapack_ssyevd")):
    tx = optax_ortho.orthonormalize(method)
    text = jax.jit(tx.update).lower(grads, tx.init(grads)).as_text()
    assert text.count(call) == 2, (method, text.count(call))


@pytest.mark.slow
def test_newton_schulz_equals_muon_on_conv_kernels():
  grads = _flax_like(np.random.default_rng(1))
  matrices = {"conv": grads["conv"]["kernel"], "dense": grads["dense"]["kernel"]}
  dims = {"conv": DN((0, 1, 2), 3), "dense": DN(0, 1)}
  muon = optax.contrib.scale_by_muon(beta=0.0, nesterov=False,
                                     weight_dimension_numbers=dims)
  ref, _ = muon.update(matrices, muon.init(matrices))
  out = _update(optax_ortho.orthonormalize("newton_schulz"), matrices)
  for k in matrices:
    np.testing.assert_allclose(out[k], ref[k], atol=2e-5, rtol=1e-4)


@pytest.mark.slow
def test_dimension_numbers_tree_callable_and_skip():
  rng = np.random.default_rng(2)
  g = {"w": jnp.asarray(rng.standard_normal((3, 5, 4)), jnp.float32),
       "v": jnp.asarray(rng.standard_normal((6, 2)), jnp.float32)}
  # Axis 0 is a batch of three (5, 4) matrices; "v" is skipped.
  dims = {"w": DN(reduction_axis=1, output_axis=2), "v": None}
  out = _update(optax_ortho.orthonormalize("svd", dimension_numbers=dims), g)
  np.testing.assert_allclose(out["w"], optax_ortho.polar(g["w"]), atol=1e-5)
  np.testing.assert_array_equal(out["v"], g["v"])
  out2 = _update(optax_ortho.orthonormalize("svd", dimension_numbers=lambda t: dims), g)
  np.testing.assert_array_equal(out2["w"], out["w"])
  # Reduction over the LAST axis: the transpose of the default view.
  out3 = _update(optax_ortho.orthonormalize(
      "svd", dimension_numbers={"w": None, "v": DN(1, 0)}), g)
  np.testing.assert_allclose(out3["v"], optax_ortho.polar(g["v"]), atol=1e-5)


def test_bad_arguments_fail_at_trace_time():
  g = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
  with pytest.raises(ValueError, match=r"method='qr'.*newton_schulz"):
    optax_ortho.orthonormalize("qr")
  with pytest.raises(ValueError, match="ns_steps"):
    optax_ortho.orthonormalize("newton_schulz", ns_steps=0)
  with pytest.raises(ValueError, match="eps"):
    optax_ortho.orthonormalize(eps=-1.0)
  tx = optax_ortho.orthonormalize()
  with pytest.raises(TypeError, match=r"\['w'\].*floating"):
    jax.jit(tx.update)({"w": jnp.ones((4, 3), jnp.int32), "b": g["b"]},
                       tx.init(g))
  bad = optax_ortho.orthonormalize(dimension_numbers={"w": DN(0, 1)})
  with pytest.raises(ValueError, match=r"\['b'\]"):
    bad.update(g, bad.init(g))
  bad = optax_ortho.orthonormalize(dimension_numbers={"w": DN(0, 1), "b": DN(0, 1)})
  with pytest.raises(ValueError, match=r"\['b'\].*no matrix view"):
    bad.update(g, bad.init(g))
  bad = optax_ortho.orthonormalize(dimension_numbers={"w": DN(0, 0), "b": None})
  with pytest.raises(ValueError, match=r"\['w'\].*disjoint"):
    bad.update(g, bad.init(g))
  bad = optax_ortho.orthonormalize(dimension_numbers={"w": DN(0, 5), "b": None})
  with pytest.raises(ValueError, match=r"\['w'\].*out of range"):
    bad.update(g, bad.init(g))


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_zero_rank_deficient_and_nan_leaves(method):
  rng = np.random.default_rng(3)
  good = rng.standard_normal((12, 4)).astype(np.float32)
  rank1 = np.outer(rng.standard_normal(12), rng.standard_normal(4)).astype(np.float32)
  nan = good.copy()
  nan[0, 0] = np.nan
  grads = {"good": good, "rank1": rank1, "zero": np.zeros((12, 4), np.float32),
           "nan": nan, "bias": np.ones(4, np.float32)}
  out = _update(optax_ortho.orthonormalize(method), grads)
  np.testing.assert_array_equal(out["zero"], 0.0)
  assert np.isnan(np.asarray(out["nan"])).any()
  for k in ("good", "rank1", "zero", "bias"):
    assert np.isfinite(np.asarray(out[k])).all(), k
  clean = _update(optax_ortho.orthonormalize(method),
                  {k: v for k, v in grads.items() if k != "nan"})
  np.testing.assert_allclose(out["good"], clean["good"], atol=1e-5)
  if method in ("svd", "auto", "gram"):
    testing.assert_unit_singular_values(out["rank1"], 1, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_bfloat16_in_bfloat16_out(method):
  grads = _flax_like(np.random.default_rng(4))
  out32 = _update(optax_ortho.orthonormalize(method), grads)
  out16 = _update(optax_ortho.orthonormalize(method),
                  jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), grads))
  for a, b in zip(jax.tree.leaves(out32), jax.tree.leaves(out16)):
    assert b.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(b, np.float32), a, atol=0.05)


@pytest.mark.slow
def test_aliases_orthonormalise_before_momentum_and_decay():
  rng = np.random.default_rng(5)
  params = {"w": jnp.asarray(rng.standard_normal((6, 3)), jnp.float32)}
  grads = {"w": jnp.asarray(rng.standard_normal((6, 3)), jnp.float32)}
  tx = optax_ortho.orthogonal_sgd(0.1, momentum=0.9, weight_decay=0.01, method="svd")
  upd, _ = tx.update(grads, tx.init(params), params)
  expected = -0.1 * (optax_ortho.polar(grads["w"]) + 0.01 * params["w"])
  np.testing.assert_allclose(upd["w"], expected, atol=1e-6)
  tx = optax_ortho.orthogonal_adam(0.1, method="svd")
  upd, _ = tx.update(grads, tx.init(params), params)
  ref = optax.adam(0.1)
  ref_upd, _ = ref.update({"w": optax_ortho.polar(grads["w"])}, ref.init(params))
  np.testing.assert_allclose(upd["w"], ref_upd["w"], atol=1e-6)


def _low_rank_tree(rng, head_rank=3):
  return {
      "head": jnp.asarray(rng.standard_normal((32, head_rank))
                          @ rng.standard_normal((head_rank, 10)), jnp.float32),
      "tall": jnp.asarray(rng.standard_normal((3, 3, 8, 8)), jnp.float32),
      "bias": jnp.ones(8),
  }


@pytest.mark.slow
def test_auto_is_the_default_and_remembers_routes():
  rng = np.random.default_rng(5)
  grads = _low_rank_tree(rng)
  tx = optax_ortho.orthonormalize()
  state = tx.init(grads)
  assert isinstance(state, optax_ortho.OrthonormalizeState)
  assert state.use_gram.shape == (2,) and bool(state.use_gram.all())
  update = jax.jit(tx.update)
  ref = optax_ortho.orthonormalize("svd").update(grads, None)[0]
  out, state = update(grads, state)
  # Sorted leaves: head (rank 3, fails the Gram check), tall (72 x 8, passes).
  np.testing.assert_array_equal(state.use_gram, [False, True])
  for k in grads:
    np.testing.assert_allclose(out[k], ref[k], atol=2e-5)
  out2, state2 = update(grads, state)  # the head now goes straight to the SVD
  np.testing.assert_array_equal(state2.use_gram, [False, True])
  for k in grads:
    np.testing.assert_allclose(out2[k], ref[k], atol=2e-5)
  # A well-conditioned head sends it back to the Gram route for the next step.
  better = dict(grads, head=jnp.asarray(rng.standard_normal((32, 10)), jnp.float32))
  out3, state3 = update(better, state2)
  np.testing.assert_array_equal(state3.use_gram, [True, True])
  ref3 = optax_ortho.orthonormalize("svd").update(better, None)[0]
  np.testing.assert_allclose(out3["head"], ref3["head"], atol=2e-5)


def test_auto_state_must_match_the_gradients():
  rng = np.random.default_rng(6)
  grads = _low_rank_tree(rng)
  tx = optax_ortho.orthonormalize("auto")
  with pytest.raises(ValueError, match="state does not match"):
    tx.update(grads, tx.init({"w": jnp.ones((4, 3))}))


@pytest.mark.parametrize("state", [None, optax.EmptyState(), (jnp.ones(2, bool),)])
def test_auto_names_the_state_it_expects(state):
  tx = optax_ortho.orthonormalize("auto")
  with pytest.raises(TypeError, match="OrthonormalizeState"):
    tx.update({"w": jnp.ones((4, 3))}, state)


@pytest.mark.parametrize("make, stored", [
    (lambda: optax_ortho.orthogonal_adam(1e-3), (1, 4)),
    (lambda: optax_ortho.orthogonal_adam(1e-3), (8, 6)),
    (lambda: optax_ortho.orthogonal_sgd(0.005, momentum=0.9), (1, 4)),
])
def test_restored_moments_of_another_shape_name_their_leaf(make, stored):
  # A checkpoint of another model restored into this one: optax would
  # broadcast a (1, 4) moment into the (8, 4) update, or fail in `add`
  # without naming the leaf.
  params = {"b": jnp.zeros(4), "w": jnp.ones((8, 4))}
  tx = make()
  state = jax.tree.map(
      lambda x: jnp.ones(stored, x.dtype) if jnp.shape(x) == (8, 4) else x,
      tx.init(params))
  grads = {"b": jnp.ones(4), "w": jnp.eye(8, 4)}
  with pytest.raises(ValueError, match=r"\['w'\] has shape .*but updates\['w'\]"):
    tx.update(grads, state, params)
  tx.update(grads, tx.init(params), params)  # the matching state passes


def test_eager_auto_compiles_once(caplog):
  # Called outside jit, "auto" reuses its compiled routes: a second call
  # with the same shapes compiles nothing.
  jax.clear_caches()
  tx = optax_ortho.orthonormalize("auto")
  grads = {"w": jnp.arange(15.0).reshape(5, 3), "v": jnp.eye(9, 3) + 1.0}
  state = tx.init(grads)
  with jax.log_compiles(), caplog.at_level("WARNING", logger="jax"):
    tx.update(grads, state)
    first = sum("Compiling" in r.getMessage() for r in caplog.records)
    caplog.clear()
    out, _ = tx.update(grads, state)
    second = sum("Compiling" in r.getMessage() for r in caplog.records)
  assert first > 0  # the counter sees compilations
  assert second == 0, caplog.records
  testing.assert_pseudo_polar(grads["w"], out["w"])


def test_auto_non_finite_matrix_keeps_its_flag():
  rng = np.random.default_rng(7)
  grads = _low_rank_tree(rng)
  grads["tall"] = grads["tall"].at[0, 0, 0, 0].set(jnp.inf)
  tx = optax_ortho.orthonormalize()
  out, state = jax.jit(tx.update)(grads, tx.init(grads))
  assert not bool(jnp.isfinite(out["tall"]).any())
  assert bool(jnp.isfinite(out["head"]).all())
  np.testing.assert_array_equal(state.use_gram, [False, True])


@pytest.mark.slow
def test_auto_layers_mode_carries_the_routes():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  rng = np.random.default_rng(8)
  grads = _low_rank_tree(rng)
  grads["more"] = jnp.asarray(rng.standard_normal((5, 72, 8)), jnp.float32)
  mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  rep = optax_ortho.orthonormalize()
  lay = optax_ortho.orthonormalize(parallel="layers", mesh=mesh)
  out_r, st_r = jax.jit(rep.update)(grads, rep.init(grads))
  out_l, st_l = jax.jit(lay.update)(grads, lay.init(grads))
  np.testing.assert_array_equal(st_l.use_gram, st_r.use_gram)
  assert not bool(st_l.use_gram[0])  # the low-rank head
  for k in grads:
    np.testing.assert_allclose(out_l[k], out_r[k], atol=2e-5)
