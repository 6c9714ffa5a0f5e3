"""Fault injection: orthonormalised gradients (polar, orthonormalize, aliases).

The fault table of docs/reliability.md for `polar` (every method),
`orthonormalize` (every method, both `parallel` modes) and the aliases
`orthogonal_sgd` / `orthogonal_adam`: non-finite entries at several positions
(the first row hangs jaxlib's CPU SVD, so those cases run in ONE subprocess
with a timeout), empty leaves, float16 / bfloat16 / float64, extreme scales,
rank at `eps=0`, odd and mismatched pytrees, bad hyperparameters, and arrays
sharded without a mesh context. `optax.apply_if_finite` around every
transform is a check of the shared contract (tests/contract.py).
"""

import collections
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from optax.contrib import MuonDimensionNumbers as DN

import optax_ortho
from optax_ortho import testing
from tests.isolated import run_isolated

METHODS = ("svd", "gram", "auto", "newton_schulz", "polar_express")
EXACT = ("svd", "gram", "auto")
PARALLEL = ("replicated", "layers")

# ---------------------------------------------------------- non-finite input

NONFINITE_SCRIPT = textwrap.dedent("""
    import time
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import numpy as np
    from hypothesis import given, settings
    from jax.sharding import NamedSharding, PartitionSpec as P
    import optax_ortho
    from optax_ortho import testing

    METHODS = ("svd", "gram", "auto", "newton_schulz", "polar_express")
    rng = np.random.default_rng(0)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)
    # "w" and "v" share a shape, so they are orthonormalised in one stack.
    clean = {"w": f32(6, 4), "v": f32(6, 4), "conv": f32(3, 3, 2, 4),
             "b": f32(4)}
    specs = {"w": P("data", "model"), "v": P(None, "model"),
             "conv": P(None, None, None, "model"), "b": P("model")}
    mesh = jax.make_mesh((2, 4), ("data", "model"))

    def shard(tree):  # device_put, no jax.set_mesh: the common usage
      return {k: jax.device_put(v, NamedSharding(mesh, specs[k]))
              for k, v in tree.items()}

    def faults(shape):
      pos = testing.fault_positions(shape)
      mid = pos[-1]
      return ([(p, np.inf) for p in pos] + [(pos[0], -np.inf), (mid, -np.inf),
              (pos[0], np.nan), (mid, np.nan)])

    runs = 0

    def check_tree(name, fn, sharded):
      global runs
      ref = jax.tree.map(np.asarray, fn(clean))
      for pos, val in faults((6, 4)):
        bad = dict(clean, w=testing.with_fault(clean["w"], pos, val))
        out = fn(shard(bad) if sharded else bad)
        out = jax.tree.map(np.asarray, out)
        assert np.isnan(out["w"]).all(), (name, pos, val, out["w"])
        for k in ("v", "conv", "b"):
          np.testing.assert_allclose(out[k], ref[k], atol=1e-6,
                                     err_msg=f"{name} {pos} {val} {k}")
        runs += 1

    times, start = {}, time.time()
    for method in METHODS:
      polar = jax.jit(lambda x, m=method: optax_ortho.polar(x, method=m))
      for shape in ((3, 6, 4), (3, 4, 6)):  # tall and wide
        stack = rng.standard_normal(shape).astype(np.float32)
        ref = np.asarray(polar(stack))
        for pos, val in faults(shape[1:]):
          out = np.asarray(polar(testing.with_fault(stack, (1,) + pos, val)))
          assert np.isnan(out[1]).all(), (method, shape, pos, val)
          np.testing.assert_allclose(out[[0, 2]], ref[[0, 2]], atol=1e-6)
          runs += 1
      one = polar(np.full((1, 1), np.inf, np.float32))  # a lone 1 x 1 Inf
      assert np.isnan(np.asarray(one)).all(), method
      times[method] = time.time() - start
      start = time.time()
      for parallel in ("replicated", "layers"):
        tx = optax_ortho.orthonormalize(method, parallel=parallel)
        update = jax.jit(lambda g, tx=tx: tx.update(g, tx.init(g))[0])
        check_tree(f"orthonormalize[{method},{parallel}]", update,
                   sharded=parallel == "layers")

    for name, tx in (("orthogonal_sgd", optax_ortho.orthogonal_sgd(0.1)),
                     ("orthogonal_adam", optax_ortho.orthogonal_adam(0.1))):
      state = tx.init(clean)
      update = jax.jit(lambda g, tx=tx, state=state: tx.update(g, state, clean))
      check_tree(name, lambda g, update=update: update(g)[0], sharded=False)
      # The optimizer's state stays finite outside the bad leaf.
      _, new_state = update(dict(clean, w=testing.with_fault(
          clean["w"], (0, 0), np.inf)))
      for path, x in jax.tree_util.tree_flatten_with_path(new_state)[0]:
        if "'w'" not in jax.tree_util.keystr(path):
          assert np.isfinite(np.asarray(x)).all(), (name, path)

    times["aliases"] = time.time() - start
    start = time.time()
    # Anywhere in any matrix of a stack, every method: NaN there only.
    polars = [jax.jit(lambda x, m=m: optax_ortho.polar(x, method=m))
              for m in METHODS]

    @settings(max_examples=15, deadline=None, derandomize=True)
    @given(testing.faulty_stacks(shape=(3, 5, 4)))
    def prop(case):
      global runs
      stack, bad = case
      for polar in polars:
        out = np.asarray(polar(stack))
        assert np.isnan(out[bad]).all(), stack
        assert np.isfinite(np.delete(out, bad, axis=0)).all(), stack
        runs += 1

    prop()
    times["hypothesis"] = time.time() - start
    print({k: round(v, 1) for k, v in times.items()})
    print("cases", runs)
""")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_nonfinite_never_hangs_and_stays_in_its_matrix():
  # Inf at [0, 0], the rest of the first row, the last row and the middle,
  # -Inf and NaN: every polar method, orthonormalize in both modes, aliases.
  # One subprocess for all cases (compilations dominate); ~60 s when idle.
  out = run_isolated(NONFINITE_SCRIPT, timeout=800)
  assert int(out.split()[-1]) >= 250, out  # 198 table cases + hypothesis


# ------------------------------------------------------------- empty leaves

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0), (0, 3, 4), (2, 0, 3),
                                   (2, 3, 0)])
def test_polar_of_empty_is_empty(method, shape):
  x = jnp.zeros(shape, jnp.bfloat16)
  out = optax_ortho.polar(x, method=method)
  assert out.shape == shape and out.dtype == jnp.bfloat16


def _empty_tree():
  return {"e1": jnp.zeros((0, 5)), "e2": jnp.zeros((5, 0)),
          "e3": jnp.zeros((0, 0)), "conv": jnp.zeros((3, 3, 0, 4)),
          "b": jnp.zeros((0,)), "none": None, "w": jnp.eye(4, 3) * 2.0}


@pytest.mark.slow
@pytest.mark.parametrize("parallel", PARALLEL)
@pytest.mark.parametrize("method", ["svd", "newton_schulz"])
def test_orthonormalize_passes_empty_leaves(method, parallel):
  tx = optax_ortho.orthonormalize(method, parallel=parallel)
  tree = _empty_tree()
  out, _ = jax.jit(tx.update)(tree, tx.init(tree))
  assert jax.tree.structure(out) == jax.tree.structure(tree)
  for k in ("e1", "e2", "e3", "conv", "b"):
    assert out[k].shape == tree[k].shape
  assert out["none"] is None
  alone, _ = tx.update({"w": tree["w"]}, tx.init(None))
  np.testing.assert_allclose(out["w"], alone["w"], atol=1e-6)
  for empty in ({}, [], (), None):
    res, _ = tx.update(empty, tx.init(empty))
    assert res == empty


@pytest.mark.parametrize("make", [optax_ortho.orthogonal_sgd,
                                  optax_ortho.orthogonal_adam])
def test_aliases_pass_empty_leaves(make):
  tx = make(0.1)
  tree = _empty_tree()
  state = tx.init(tree)
  out, state = jax.jit(tx.update)(tree, state, tree)
  assert out["e1"].shape == (0, 5) and out["none"] is None
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state))


# ------------------------------------------------------------------- dtypes

@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_polar_keeps_low_precision_dtypes(method, dtype):
  a = np.random.default_rng(0).standard_normal((2, 8, 5)).astype(np.float32)
  a = np.asarray(jnp.asarray(a, dtype), np.float32)  # representable input
  out = optax_ortho.polar(jnp.asarray(a, dtype), method=method)
  assert out.dtype == dtype
  ref = optax_ortho.polar(jnp.asarray(a), method=method)
  # Only the final rounding to `dtype` differs from the float32 computation.
  np.testing.assert_allclose(np.asarray(out, np.float32), ref,
                             atol=2 * float(jnp.finfo(dtype).eps))


@pytest.mark.slow
def test_orthogonal_adam_float16_first_step_is_finite():
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.standard_normal((64, 64)), jnp.float16)}
  grads = {"w": jnp.asarray(rng.standard_normal((64, 64)), jnp.float16)}
  # The root cause: Adam's nu in float16 flushes the squared orthonormalised
  # update to zero, and eps=1e-8 is zero in float16 too: 0/0 or x/0.
  q = optax_ortho.polar(grads["w"])
  assert int(jnp.sum((1 - 0.999) * jnp.square(q) == 0)) > 0
  naive = optax.chain(optax_ortho.orthonormalize("auto"), optax.adam(1e-3))
  assert int(jnp.isinf(naive.update(grads, naive.init(params), params)[0]["w"]
                       ).sum()) > 0
  tx = optax_ortho.orthogonal_adam(1e-3)
  state = tx.init(params)
  step = jax.jit(tx.update)
  for _ in range(3):
    updates, state = step(grads, state, params)
    assert updates["w"].dtype == jnp.float16
    assert bool(jnp.isfinite(updates["w"]).all())
  # Same as the float32 computation, rounded once to float16.
  p32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
  g32 = jax.tree.map(lambda x: x.astype(jnp.float32), grads)
  ref = tx.update(g32, tx.init(p32), p32)[0]["w"]
  first = tx.update(grads, tx.init(params), params)[0]["w"]
  np.testing.assert_allclose(np.asarray(first, np.float32), ref, rtol=2e-3,
                             atol=1e-6)
  # The moments are float32; bfloat16 keeps optax.adam's bfloat16 moments
  # ("auto"'s per-matrix route flags are bools).
  def moment_dtypes(state):
    return {x.dtype for x in jax.tree.leaves(state)
            if x.ndim and jnp.issubdtype(x.dtype, jnp.floating)}
  assert moment_dtypes(tx.init(params)) == {jnp.dtype(jnp.float32)}
  pb = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  assert moment_dtypes(tx.init(pb)) == {jnp.dtype(jnp.bfloat16)}


X64_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    assert jax.config.jax_enable_x64
    import optax_ortho
    from optax_ortho import testing
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 9, 5))
    for method in ("svd", "gram", "auto", "newton_schulz", "polar_express"):
      q = optax_ortho.polar(jnp.asarray(a), method=method)
      assert q.dtype == jnp.float64, (method, q.dtype)
      if method in ("svd", "gram", "auto"):
        # float64 all through: far below float32's 1e-7.
        np.testing.assert_allclose(q, testing.polar_reference(a), atol=1e-10)
      for parallel in ("replicated", "layers"):
        tx = optax_ortho.orthonormalize(method, parallel=parallel)
        w = {"w": jnp.asarray(a[0])}
        out, _ = jax.jit(tx.update)(w, tx.init(w))
        assert out["w"].dtype == jnp.float64
    params = {"w": jnp.asarray(a[0]), "b": jnp.zeros(5)}
    for tx in (optax_ortho.orthogonal_sgd(0.1), optax_ortho.orthogonal_adam(0.1)):
      state = tx.init(params)
      u, state = jax.jit(tx.update)(params, state, params)
      assert {x.dtype for x in jax.tree.leaves(u)} == {jnp.dtype("float64")}
      assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state))
    print("x64 ok")
""")


@pytest.mark.slow
def test_float64_keeps_its_dtype_and_precision():
  out = run_isolated(X64_SCRIPT, timeout=300,
                             env={"JAX_ENABLE_X64": "1"})
  assert "x64 ok" in out


# ------------------------------------------------------------------- scales

_BASE = np.random.default_rng(3).standard_normal((7, 4)).astype(np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
@given(exponent=st.integers(-36, 37))
def test_polar_is_scale_free(method, exponent):
  # Entries up to 1e+-37 (float32's normal range): squaring them for the
  # Gram matrix or a norm used to give NaN or zero outside about 1e+-19.
  # (At 1e-37 the smallest entries of _BASE, 0.024, become subnormal and XLA
  # flushes them to zero: another matrix, so that scale is not in the range.)
  scale = np.float32(10.0**exponent)
  out = np.asarray(optax_ortho.polar(_BASE * scale, method=method))
  ref = np.asarray(optax_ortho.polar(_BASE, method=method))
  # The iterative methods amplify the rounding of the scaled input a little
  # (their Gram-space form on tall matrices: measured at most 2e-5 over the
  # range for polar_express, 4e-7 for newton_schulz).
  np.testing.assert_allclose(out, ref, atol=2e-6 if method in EXACT else 3e-5)
  if method in EXACT:
    testing.assert_pseudo_polar(_BASE, out, atol=2e-6)


@pytest.mark.parametrize("method", METHODS)
def test_polar_of_zero_and_subnormal_is_finite(method):
  for scale in (0.0, 1e-44):
    out = optax_ortho.polar(jnp.asarray(_BASE * np.float32(scale)),
                            method=method)
    assert bool(jnp.isfinite(out).all()), (method, scale)


@pytest.mark.slow
@pytest.mark.parametrize("method", EXACT)
@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("eps", [0.0, None])
def test_eps_zero_keeps_the_rank(method, rank, eps):
  rng = np.random.default_rng(rank)
  a = (rng.standard_normal((40, rank)) @ rng.standard_normal((rank, 12))
       ).astype(np.float32)
  q = optax_ortho.polar(jnp.asarray(a), method=method, eps=eps)
  testing.assert_unit_singular_values(q, rank=rank, atol=1e-4)


# ----------------------------------------------------- pytrees and dtypes

Pair = collections.namedtuple("Pair", "w b")


@pytest.mark.parametrize("tree", [
    [jnp.ones((4, 3)), jnp.ones(3)],
    (jnp.ones((4, 3)), jnp.ones(3)),
    Pair(jnp.ones((4, 3)), jnp.ones(3)),
    {"a": {"b": [jnp.ones((4, 3)), None]}, "c": jnp.ones(3)},
], ids=["list", "tuple", "namedtuple", "nested"])
def test_odd_pytrees_keep_their_structure(tree):
  tx = optax_ortho.orthonormalize()
  out, _ = tx.update(tree, tx.init(tree))
  assert jax.tree.structure(out) == jax.tree.structure(tree)


@pytest.mark.parametrize("make", [
    lambda: optax_ortho.orthonormalize(),
    lambda: optax_ortho.orthonormalize(parallel="layers"),
    lambda: optax_ortho.orthogonal_sgd(0.1),
    lambda: optax_ortho.orthogonal_adam(0.1),
])
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.complex64, jnp.bool_])
def test_non_float_leaf_names_its_key_path(make, dtype):
  tx = make()
  good = {"layer": {"w": jnp.ones((4, 3)), "k": jnp.ones((4, 3))}}
  state = tx.init(good)
  bad = {"layer": {"w": jnp.ones((4, 3)), "k": jnp.ones((4, 3), dtype)}}
  with pytest.raises(TypeError, match=r"updates\['layer'\]\['k'\].*"
                     + jnp.dtype(dtype).name):
    tx.update(bad, state, good)


@pytest.mark.parametrize(("kwargs", "exc", "words"), [
    ({"eps": -0.1}, ValueError, ["eps", "[0, 1)", "-0.1"]),
    ({"eps": float("nan")}, ValueError, ["eps", "nan"]),
    ({"eps": "0"}, TypeError, ["eps", "'0'"]),
    ({"ns_steps": 0}, ValueError, ["ns_steps", "0"]),
    ({"ns_steps": True}, ValueError, ["ns_steps", "True"]),
    ({"method": "qr"}, ValueError, ["method", "'qr'"]),
])
def test_polar_bad_arguments(kwargs, exc, words):
  with pytest.raises(exc) as info:
    optax_ortho.polar(jnp.ones((3, 2)), **kwargs)
  for word in words:
    assert word in str(info.value), (word, str(info.value))


def test_polar_rejects_non_float_and_vectors():
  with pytest.raises(TypeError, match="x.*int32"):
    optax_ortho.polar(jnp.ones((3, 2), jnp.int32))
  with pytest.raises(ValueError, match=r"ndim >= 2.*\(3,\)"):
    optax_ortho.polar(jnp.ones(3))


def test_mismatched_dimension_numbers_name_the_leaf():
  tx = optax_ortho.orthonormalize(dimension_numbers={"a": DN(), "z": None})
  with pytest.raises(ValueError, match=r"\['b'\]"):
    tx.update({"a": jnp.ones((3, 2)), "b": jnp.ones((3, 2))}, None)


@pytest.mark.parametrize("make", [optax_ortho.orthogonal_sgd,
                                  optax_ortho.orthogonal_adam])
def test_alias_params_mismatch_names_the_leaf(make):
  tx = make(0.1, weight_decay=0.1)
  params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"params\['w'\].*\(4, 2\).*\(4, 3\)"):
    tx.update(params, state, {"w": jnp.ones((4, 2)), "b": jnp.ones(3)})
  with pytest.raises(ValueError, match="structure"):
    tx.update(params, state, [jnp.ones((4, 3)), jnp.ones(3)])


# --------------------------------------------------------- hyperparameters

BAD_HYPERPARAMS = [
    # (factory, kwargs, exception, words the message must contain)
    (optax_ortho.orthogonal_sgd, {"learning_rate": -0.1}, ValueError,
     ["learning_rate", "> 0", "-0.1"]),
    (optax_ortho.orthogonal_sgd, {"learning_rate": 0.0}, ValueError,
     ["learning_rate", "0.0"]),
    (optax_ortho.orthogonal_sgd, {"learning_rate": float("nan")}, ValueError,
     ["learning_rate", "nan"]),
    (optax_ortho.orthogonal_sgd, {"learning_rate": "0.1"}, TypeError,
     ["learning_rate", "'0.1'", "str"]),
    (optax_ortho.orthogonal_sgd, {"learning_rate": 0.1, "momentum": -0.5},
     ValueError, ["momentum", "[0, 1)", "-0.5"]),
    (optax_ortho.orthogonal_sgd, {"learning_rate": 0.1, "momentum": 1.0},
     ValueError, ["momentum", "1.0"]),
    (optax_ortho.orthogonal_sgd, {"learning_rate": 0.1, "nesterov": 1},
     TypeError, ["nesterov", "bool", "1"]),
    (optax_ortho.orthogonal_sgd, {"learning_rate": 0.1, "weight_decay": -1e-4},
     ValueError, ["weight_decay", ">= 0", "-0.0001"]),
    (optax_ortho.orthogonal_sgd, {"learning_rate": 0.1,
                                  "weight_decay": float("inf")},
     ValueError, ["weight_decay", "inf"]),
    (optax_ortho.orthogonal_sgd, {"learning_rate": 0.1, "method": "qr"},
     ValueError, ["method", "'qr'", "svd"]),
    (optax_ortho.orthogonal_adam, {"learning_rate": -1.0}, ValueError,
     ["learning_rate", "-1.0"]),
    (optax_ortho.orthogonal_adam, {"learning_rate": 0.1, "b1": 1.0},
     ValueError, ["b1", "[0, 1)", "1.0"]),
    (optax_ortho.orthogonal_adam, {"learning_rate": 0.1, "b2": -0.1},
     ValueError, ["b2", "[0, 1)", "-0.1"]),
    (optax_ortho.orthogonal_adam, {"learning_rate": 0.1, "eps": -1e-8},
     ValueError, ["eps", ">= 0", "-1e-08"]),
    (optax_ortho.orthogonal_adam, {"learning_rate": 0.1, "weight_decay": -1.0},
     ValueError, ["weight_decay", "-1.0"]),
    (optax_ortho.orthogonal_adam, {"learning_rate": 0.1, "b1": None},
     TypeError, ["b1", "None"]),
    (optax_ortho.orthonormalize, {"eps": -1e-3}, ValueError,
     ["eps", "[0, 1)", "-0.001"]),
    (optax_ortho.orthonormalize, {"eps": "small"}, TypeError, ["eps", "'small'"]),
    (optax_ortho.orthonormalize, {"ns_steps": 0}, ValueError, ["ns_steps", "0"]),
    (optax_ortho.orthonormalize, {"parallel": "data"}, ValueError,
     ["parallel", "'data'", "layers"]),
    (optax_ortho.orthonormalize, {"method": "eig"}, ValueError,
     ["method", "'eig'"]),
]


@pytest.mark.parametrize(("make", "kwargs", "exc", "words"), BAD_HYPERPARAMS,
                         ids=[f"{m.__name__}-{next(iter(k.items()))}"
                              if len(k) == 1 else
                              f"{m.__name__}-{list(k.items())[-1]}"
                              for m, k, _, _ in BAD_HYPERPARAMS])
def test_bad_hyperparameters_name_argument_and_value(make, kwargs, exc, words):
  with pytest.raises(exc) as info:
    make(**kwargs)
  for word in words:
    assert word in str(info.value), (word, str(info.value))


@pytest.mark.slow
@pytest.mark.parametrize("make", [optax_ortho.orthogonal_sgd,
                                  optax_ortho.orthogonal_adam])
def test_good_hyperparameters_still_accepted(make):
  # Schedules, injected arrays, momentum=None (optax.sgd's "no momentum").
  params = {"w": jnp.ones((4, 3))}
  for tx in (make(optax.linear_schedule(0.1, 0.0, 10)),
             optax.inject_hyperparams(make)(learning_rate=0.1),
             make(0.1, weight_decay=0)):
    out, _ = tx.update(params, tx.init(params), params)
    assert bool(jnp.isfinite(out["w"]).all())
  if make is optax_ortho.orthogonal_sgd:
    tx = make(0.1, momentum=None)
    assert tx.update(params, tx.init(params), params)[0]["w"].shape == (4, 3)


# ------------------------------------------------- sharded without a mesh

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")


def _sharded_tree():
  mesh = jax.make_mesh((2, 4), ("data", "model"))  # Explicit axes
  rng = np.random.default_rng(0)
  tree = {"dense": rng.standard_normal((8, 16)), "conv": rng.standard_normal(
      (2, 3, 8, 8)), "bias": rng.standard_normal(16)}
  tree = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
  specs = {"dense": P("data", "model"), "conv": P("data", None, "model", None),
           "bias": P("model")}
  sharded = {k: jax.device_put(v, NamedSharding(mesh, specs[k]))
             for k, v in tree.items()}
  return tree, sharded


@pytest.mark.slow
@needs_8
@pytest.mark.parametrize("make", [
    *[lambda m=m: optax_ortho.orthonormalize(m, parallel="layers")
      for m in METHODS],
    lambda: optax_ortho.orthogonal_sgd(0.1),
    lambda: optax_ortho.orthogonal_adam(0.1),
    lambda: optax_ortho.stiefel_sgd(0.1),
], ids=[f"orthonormalize[{m},layers]" for m in METHODS]
    + ["orthogonal_sgd", "orthogonal_adam", "stiefel_sgd"])
def test_sharded_without_mesh_context(make):
  # Replicated-mode orthonormalize: tests/test_sharding.py, and every
  # contract case's "sharded_no_mesh" check.
  tree, sharded = _sharded_tree()
  tx = make()
  out, _ = jax.jit(tx.update)(sharded, tx.init(sharded), sharded)
  ref, _ = tx.update(tree, tx.init(tree), tree)
  for k in tree:
    assert out[k].sharding == sharded[k].sharding, (k, out[k].sharding)
    np.testing.assert_allclose(out[k], ref[k], atol=2e-5)
