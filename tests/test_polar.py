"""Properties of optax_ortho.polar for every method."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import optax_ortho
from optax_ortho import testing
from optax_ortho._src import polar as polar_lib
from optax_ortho._src.polar import batched
from optax_ortho._src.polar import cpu
from optax_ortho._src.polar import exact
from optax_ortho._src.polar import guard
from optax_ortho._src.polar import iterations

EXACT = ("svd", "gram", "auto")
ITERATIVE = ("newton_schulz", "polar_express")

_jit_polar = jax.jit(optax_ortho.polar, static_argnames=("method", "ns_steps"))


def _well_conditioned():
  return testing.matrices(rank_deficient=False, max_condition=5.0)


@pytest.mark.parametrize("method", EXACT)
@given(a=_well_conditioned())
def test_orthonormal_and_equal_to_reference(method, a):
  q = _jit_polar(a, method=method)
  testing.assert_orthonormal(q, atol=1e-5)
  testing.assert_pseudo_polar(a, q, atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method", EXACT)
@given(a=_well_conditioned(), c=st.floats(1e-3, 1e3))
def test_idempotent_and_scale_invariant(method, a, c):
  q = _jit_polar(a, method=method)
  np.testing.assert_allclose(_jit_polar(q, method=method), q, atol=2e-5)
  np.testing.assert_allclose(_jit_polar(jnp.asarray(a) * c, method=method), q,
                             atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method", EXACT)
@given(a=_well_conditioned(), seed=st.integers(0, 2**31))
def test_right_orthogonal_equivariance(method, a, seed):
  r, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((a.shape[1],) * 2))
  r = r.astype(np.float32)
  np.testing.assert_allclose(_jit_polar(a @ r, method=method),
                             _jit_polar(a, method=method) @ r, atol=5e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method", ("svd", "auto"))
@given(a=testing.matrices(rank_deficient=True))
def test_rank_deficient_gives_pseudo_polar(method, a):
  q = _jit_polar(a, method=method)
  s = np.linalg.svd(a.astype(np.float64), compute_uv=False)
  rank = int((s > max(a.shape) * np.finfo(np.float32).eps * s[0]).sum())
  testing.assert_unit_singular_values(q, rank, atol=1e-4)
  testing.assert_pseudo_polar(a, q, atol=1e-4)
  assert np.isfinite(np.asarray(q)).all()


def test_gram_rank_deficient_gives_pseudo_polar():
  # The Gram route resolves singular values only down to sqrt(n eps) of the
  # largest; exactly rank-deficient inputs are well inside that.
  rng = np.random.default_rng(0)
  a = (rng.standard_normal((20, 3)) @ rng.standard_normal((3, 8))).astype(np.float32)
  q = _jit_polar(a, method="gram")
  testing.assert_unit_singular_values(q, 3, atol=1e-4)
  testing.assert_pseudo_polar(a, q, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("method", EXACT + ITERATIVE)
@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (4, 4), (2, 6, 2)])
def test_zero_gives_zero(method, shape):
  q = _jit_polar(jnp.zeros(shape), method=method)
  assert q.shape == shape
  np.testing.assert_array_equal(q, 0.0)


def test_auto_falls_back_to_svd_when_ill_conditioned():
  rng = np.random.default_rng(0)
  u, _ = np.linalg.qr(rng.standard_normal((40, 8)))
  v, _ = np.linalg.qr(rng.standard_normal((8, 8)))
  a = ((u * np.logspace(0, -3, 8)) @ v.T).astype(np.float32)  # cond 1e3
  np.testing.assert_allclose(_jit_polar(a, method="auto"),
                             _jit_polar(a, method="svd"), atol=2e-5)
  testing.assert_pseudo_polar(a, _jit_polar(a, method="auto"), atol=2e-5)


def test_auto_mixed_stack_falls_back_per_matrix():
  rng = np.random.default_rng(1)
  good = rng.standard_normal((40, 8))
  u, _ = np.linalg.qr(rng.standard_normal((40, 8)))
  bad = (u * np.logspace(0, -4, 8)) @ np.linalg.qr(rng.standard_normal((8, 8)))[0]
  rank2 = rng.standard_normal((40, 2)) @ rng.standard_normal((2, 8))
  stack = np.stack([good, bad, rank2, np.zeros((40, 8))]).astype(np.float32)
  q = _jit_polar(stack, method="auto")
  np.testing.assert_allclose(q, _jit_polar(stack, method="svd"), atol=2e-5)
  testing.assert_unit_singular_values(q[2], 2)
  np.testing.assert_array_equal(q[3], 0.0)


def _with_singular_values(m, s, seed):
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.standard_normal((m, len(s))))
  v, _ = np.linalg.qr(rng.standard_normal((len(s), len(s))))
  return ((u * s) @ v.T).astype(np.float32)


_jit_auto_stack = jax.jit(polar_lib.auto_polar_stack)


@pytest.mark.parametrize("n", [10, 16, 64])
@pytest.mark.parametrize("cond", [1.0, 4.0, 10.0])
def test_auto_gram_iteration_is_exact(n, cond):
  # `"auto"` on CPU: narrow float32 matrices flagged for the Gram route take
  # the LAPACK-free iteration; it must pass its check up to cond 10 (so the
  # SVD's flag, set at cond <= 10, never sends a matrix back to a route that
  # fails) and be as exact as the SVD.
  a = np.stack([_with_singular_values(4 * n, np.geomspace(1, 1 / cond, n), i)
                for i in range(3)])
  q, flags = _jit_auto_stack(jnp.asarray(a), jnp.ones(3, bool))
  np.testing.assert_array_equal(flags, True)
  ref = testing.polar_reference(a)
  err = np.linalg.norm(np.asarray(q, np.float64) - ref) / np.linalg.norm(ref)
  assert err < 3e-6, err
  q_iter, ok = jax.jit(iterations.gram_iterate)(guard.unit_scale(a))
  np.testing.assert_array_equal(ok, True)
  np.testing.assert_allclose(q_iter, q, atol=1e-6)


def test_auto_gram_iteration_rejects_ill_conditioned_and_rank_deficient():
  # The iteration's check is what makes it exact: a matrix whose smallest
  # singular values it has not brought to one (cond 30, cond 1e4, rank 3,
  # zero) fails it and gets the SVD's pseudo-polar factor, with the flag off.
  n = 16
  ill = _with_singular_values(64, np.r_[np.ones(n - 1), 1 / 30], 0)
  worse = _with_singular_values(64, np.geomspace(1, 1e-4, n), 1)
  rank3 = _with_singular_values(64, np.r_[np.ones(3), np.zeros(n - 3)], 2)
  good = _with_singular_values(64, np.geomspace(1, 0.5, n), 3)
  a = np.stack([ill, worse, rank3, np.zeros((64, n), np.float32), good])
  _, ok = jax.jit(iterations.gram_iterate)(guard.unit_scale(a))
  np.testing.assert_array_equal(ok, [False, False, False, False, True])
  q, flags = _jit_auto_stack(jnp.asarray(a), jnp.ones(5, bool))
  np.testing.assert_array_equal(flags, [False, False, False, False, True])
  np.testing.assert_allclose(q, _jit_polar(a, method="svd"), atol=2e-5)
  testing.assert_unit_singular_values(q[2], 3)
  np.testing.assert_array_equal(q[3], 0.0)
  # A flag that is off skips the iteration: the SVD, the same factor.
  q_off, flags_off = _jit_auto_stack(jnp.asarray(a), jnp.zeros(5, bool))
  np.testing.assert_allclose(q_off, q, atol=2e-5)
  np.testing.assert_array_equal(flags_off, [False, False, False, False, True])


@jax.jit
def _jit_auto_parts(parts, flags):
  return polar_lib.auto_polar_groups([parts], [flags])[0]


def _general_route(parts, flags):
  # The stacked route of wider matrices: guarded, one `eigh` per flagged
  # matrix, the SVD where its check fails.
  a = jnp.concatenate(parts)
  return guard.guarded_auto(cpu._eigh_then_svd, a, flags,
                            polar_lib.default_eps(*a.shape[-2:]))


@pytest.mark.parametrize("case", [
    "clean", "tiny", "huge", "below_lean_range", "above_lean_range",
    "one_ill_conditioned", "one_rank_deficient", "nan", "inf", "zero",
    "flag_off"])
def test_auto_lean_route_equals_the_general_route(case):
  # On CPU a float32 group of at most 64 columns takes the checked Gram
  # iteration (`cpu._iterate`): the parts are zero-padded into stacks, and
  # the guards (finite, scale) are read off the Gram matrices' diagonals.
  # Whatever the input, it must give the factors and flags of the stacked
  # route (stacked, zeroed, unit-scaled, SVD where the check fails).
  n = 16
  mats = [_with_singular_values(48, np.geomspace(1, 1 / c, n), i)
          for i, c in enumerate((2.0, 5.0, 8.0, 3.0))]
  flags = np.ones(4, bool)
  scale = {"tiny": 1e-30, "huge": 1e30, "below_lean_range": 2.0**-75,
           "above_lean_range": 2.0**65}.get(case, 1.0)
  mats = [m * np.float32(scale) for m in mats]
  if case == "one_ill_conditioned":
    mats[2] = _with_singular_values(48, np.r_[np.ones(n - 1), 1 / 30], 7)
  elif case == "one_rank_deficient":
    mats[1] = _with_singular_values(48, np.r_[np.ones(4), np.zeros(n - 4)], 8)
  elif case == "nan":
    mats[1][3, 5] = np.nan
  elif case == "inf":
    mats[3][0, 0] = np.inf
  elif case == "zero":
    mats[0][:] = 0.0
  elif case == "flag_off":
    flags[2] = False
  stack = np.stack(mats).astype(np.float32)
  parts = [jnp.asarray(stack[:1]), jnp.asarray(stack[1:3]), jnp.asarray(stack[3:])]
  q, new_flags = _jit_auto_parts(parts, jnp.asarray(flags))
  q_ref, flags_ref = jax.jit(_general_route)(parts, jnp.asarray(flags))
  np.testing.assert_array_equal(new_flags, flags_ref)
  q = np.concatenate([np.asarray(x) for x in q])
  np.testing.assert_array_equal(np.isnan(q), np.isnan(np.asarray(q_ref)))
  np.testing.assert_allclose(q, q_ref, atol=2e-5)
  finite = np.all(np.isfinite(stack), axis=(1, 2))
  ref = testing.polar_reference(np.where(finite[:, None, None], stack, 0.0))
  np.testing.assert_allclose(q[finite], ref[finite], atol=2e-5)
  assert np.all(np.isnan(q[~finite]))


@pytest.mark.parametrize("bad", [None, "ill", "nan", "flag_off"])
def test_auto_groups_of_one_width_share_the_iteration(bad):
  # Shape groups of one width (48x16, 144x16, a wide 16x32 seen as 32x16)
  # share one iteration on CPU; one bad matrix in one group sends only that
  # group to the general route, and every group gets the factors and flags it
  # would get alone.
  n = 16
  shapes = [(48, 2), (144, 3), (32, 1)]
  groups, flags = [], []
  for gi, (m, k) in enumerate(shapes):
    mats = np.stack([_with_singular_values(m, np.geomspace(1, 0.2, n), 10 * gi + j)
                     for j in range(k)])
    groups.append([jnp.asarray(mats[:1]), jnp.asarray(mats[1:])] if k > 1
                  else [jnp.asarray(mats)])
    flags.append(np.ones(k, bool))
  if bad == "ill":
    groups[1][1] = groups[1][1].at[0].set(
        _with_singular_values(144, np.r_[np.ones(n - 1), 1 / 30], 99))
  elif bad == "nan":
    groups[1][1] = groups[1][1].at[1, 0, 0].set(np.nan)
  elif bad == "flag_off":
    flags[1][2] = False
  flags = [jnp.asarray(f) for f in flags]
  together = jax.jit(polar_lib.auto_polar_groups)(groups, flags)
  for grp, f, (q, new) in zip(groups, flags, together):
    q_alone, new_alone = _jit_auto_parts(grp, f)
    np.testing.assert_array_equal(new, new_alone)
    for x, y in zip(q, q_alone):
      np.testing.assert_allclose(x, y, atol=2e-5)
    a = np.concatenate([np.asarray(x) for x in grp])
    finite = np.all(np.isfinite(a), axis=(1, 2))
    ref = testing.polar_reference(np.where(finite[:, None, None], a, 0.0))
    q = np.concatenate([np.asarray(x) for x in q])
    np.testing.assert_allclose(q[finite], ref[finite], atol=2e-5)
    assert np.all(np.isnan(q[~finite]))


@pytest.mark.parametrize("n, dtype", [(72, np.float32), (8, np.float64)])
@pytest.mark.parametrize("flags", [(1, 1, 1, 1), (0, 0, 0, 0), (1, 0, 1, 0)])
def test_auto_eigh_route_every_flag_pattern(n, dtype, flags):
  # Wider than the iteration's limit, or float64: one `eigh` per flagged
  # matrix, made without a `cond` when every flag of the stack is set
  # (`cpu._masked_map`), then the SVD for those that failed the check or
  # were not flagged. The factor and the new flags never depend on the path.
  good = _with_singular_values(3 * n, np.geomspace(1, 0.3, n), 0)
  ill = _with_singular_values(3 * n, np.geomspace(1, 1e-3, n), 1)
  rank2 = _with_singular_values(3 * n, np.r_[1.0, 0.5, np.zeros(n - 2)], 2)
  good2 = _with_singular_values(3 * n, np.geomspace(1, 0.5, n), 3)
  with jax.enable_x64(dtype == np.float64):
    a = jnp.asarray(np.stack([good, ill, rank2, good2]).astype(dtype))
    q, new_flags = _jit_auto_stack(a, jnp.asarray(flags, bool))
    q_svd = _jit_polar(a, method="svd")
  np.testing.assert_array_equal(new_flags, [True, False, False, True])
  np.testing.assert_allclose(q, q_svd, atol=2e-5)
  testing.assert_unit_singular_values(q[2], 2)


@pytest.mark.parametrize("m, n, dtype", [(96, 96, np.float32), (120, 96, np.float32),
                                         (8, 8, np.float64)])
@pytest.mark.parametrize("flags", [(1,) * 7, (0,) * 7, (1, 0, 1, 0, 1, 0, 1)])
def test_auto_split_route_on_square_matrices(m, n, dtype, flags):
  # Square-ish matrices wider than the iteration's limit, or float64, take
  # `exact.split_route`: exact where at most a quarter of the singular values
  # lie below the largest / 10, whatever the condition number (Gaussian,
  # 1e4, rank-deficient, values under the cutoff); a matrix with more, a zero
  # and a non-finite one take the SVD or come out NaN. Factor and flags do not
  # depend on the flags that came in, as from one step to the next.
  k = n // 4
  rng = np.random.default_rng(0)
  gauss = rng.standard_normal((m, n))
  ill = _with_singular_values(m, np.r_[np.geomspace(1, 0.2, n - k), np.geomspace(1e-2, 1e-4, k)], 1)
  rank = _with_singular_values(m, np.r_[np.ones(n - k // 2), np.zeros(k // 2)], 2)
  cut = _with_singular_values(m, np.r_[np.ones(n - k), np.full(k, 1e-7)], 3)
  many = _with_singular_values(m, np.geomspace(1, 1e-3, n), 4)
  nan = gauss.copy()
  nan[1, 2] = np.nan
  a = np.stack([gauss, ill, rank, cut, many, np.zeros((m, n)), nan]).astype(dtype)
  with jax.enable_x64(dtype == np.float64):
    q, new_flags = _jit_auto_stack(jnp.asarray(a), jnp.asarray(flags, bool))
    q_svd = _jit_polar(a, method="svd")
  s_gauss = np.linalg.svd(gauss, compute_uv=False)
  gauss_ok = bool(s_gauss[n - 1 - k] * 10 >= s_gauss[0])  # at n = 96: about 12 below
  np.testing.assert_array_equal(new_flags[:6], [gauss_ok, True, True, True, False, False])
  assert new_flags[6] == bool(flags[6])  # a non-finite matrix keeps its flag
  assert np.all(np.isnan(q[6]))
  ref = testing.polar_reference(np.where(np.isfinite(a), a, 0.0)[:6])
  err = np.abs(np.asarray(q[:6], np.float64) - ref).max(axis=(1, 2))
  err_svd = np.abs(np.asarray(q_svd[:6], np.float64) - ref).max(axis=(1, 2))
  assert np.all(err <= np.maximum(2 * err_svd, 1e-6)), (err, err_svd)
  testing.assert_unit_singular_values(q[2], n - k // 2)
  testing.assert_unit_singular_values(q[3], n - k)
  np.testing.assert_array_equal(q[5], 0.0)


@pytest.mark.slow  # hypothesis, one compile per shape: about 80 s on a loaded machine
@given(a=testing.matrices(min_side=2, rank_deficient=False, max_condition=5.0))
def test_newton_schulz_equals_muon(a):
  q = _jit_polar(a, method="newton_schulz")
  muon = optax.contrib.scale_by_muon(
      beta=0.0, nesterov=False,
      weight_dimension_numbers={"w": optax.contrib.MuonDimensionNumbers(0, 1)})
  ref, _ = muon.update({"w": jnp.asarray(a)}, muon.init({"w": jnp.asarray(a)}))
  np.testing.assert_allclose(q, ref["w"], atol=2e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("method", ITERATIVE)
@given(a=testing.matrices(min_side=2, rank_deficient=False, max_condition=20.0))
def test_iterative_singular_values_near_one(method, a):
  s = np.linalg.svd(np.asarray(_jit_polar(a, method=method), np.float64),
                    compute_uv=False)
  # Muon's iteration lands in about [0.7, 1.2]; Polar Express closer to 1.
  lo, hi = (0.6, 1.25) if method == "newton_schulz" else (0.85, 1.15)
  assert lo <= s.min() and s.max() <= hi, s


def test_polar_express_converges_with_more_steps():
  a = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
  err = np.abs(_jit_polar(a, method="polar_express", ns_steps=10)
               - testing.polar_reference(a)).max()
  assert err < 1e-3, err


@pytest.mark.slow
@pytest.mark.parametrize("method", EXACT + ITERATIVE)
def test_batch_axes_and_dtypes(method):
  rng = np.random.default_rng(0)
  a = rng.standard_normal((2, 3, 9, 4)).astype(np.float32)
  q = _jit_polar(a, method=method)
  for idx in np.ndindex(2, 3):
    np.testing.assert_allclose(q[idx], _jit_polar(a[idx], method=method), atol=1e-5)
  qb = _jit_polar(jnp.asarray(a, jnp.bfloat16), method=method)
  assert qb.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(qb, np.float32), q, atol=0.02)


def test_float64_input_computed_in_float64():
  with jax.enable_x64(True):
    a = np.random.default_rng(0).standard_normal((30, 10))
    q = optax_ortho.polar(jnp.asarray(a), method="svd")
    assert q.dtype == jnp.float64
    testing.assert_pseudo_polar(a, q, atol=1e-10)


def test_bad_input():
  with pytest.raises(ValueError, match=r"method='qr'.*'svd'.*'auto'"):
    optax_ortho.polar(jnp.ones((3, 2)), method="qr")
  with pytest.raises(TypeError, match="floating"):
    optax_ortho.polar(jnp.ones((3, 2), jnp.int32))
  with pytest.raises(ValueError, match="ndim >= 2"):
    optax_ortho.polar(jnp.ones(3))
  with pytest.raises(ValueError, match="ns_steps"):
    optax_ortho.polar(jnp.ones((3, 2)), ns_steps=0)
  with pytest.raises(ValueError, match="eps"):
    optax_ortho.polar(jnp.ones((3, 2)), eps=2.0)


@pytest.mark.slow
def test_nan_matrix_stays_in_its_slot():
  a = np.random.default_rng(0).standard_normal((3, 6, 4)).astype(np.float32)
  a[1, 2, 3] = np.nan
  for method in EXACT + ITERATIVE:
    q = np.asarray(_jit_polar(a, method=method))
    assert np.isnan(q[1]).any(), method
    assert np.isfinite(q[[0, 2]]).all(), method


def _grad_cases():
  rng = np.random.default_rng(11)
  full = rng.standard_normal((6, 4)).astype(np.float32)
  rank1 = np.outer(rng.standard_normal(6), rng.standard_normal(4)).astype(np.float32)
  return {"zero": np.zeros((6, 4), np.float32), "rank1": rank1, "full": full,
          "wide": full.T.copy()}


@pytest.mark.parametrize("method", EXACT + ITERATIVE)
def test_gradients_are_finite(method):
  # jax.grad through the factor (meta-learning): differentiating the SVD or
  # eigh divides by differences of equal singular values (0 / 0 on a zero
  # or rank-1 matrix); the polar derivative drops the dropped directions.
  tx = optax_ortho.orthonormalize(method)
  w = jnp.asarray(np.random.default_rng(12).standard_normal((6, 4)), jnp.float32)

  @jax.jit
  def grads(x):
    wx = w if x.shape == w.shape else w.T
    g = jax.grad(lambda x: jnp.sum(optax_ortho.polar(x, method=method) * wx))(x)
    state = tx.init({"k": x})
    g_tx = jax.grad(lambda x: jnp.sum(tx.update({"k": x}, state)[0]["k"] * wx))(x)
    return g, g_tx

  for case, a in _grad_cases().items():
    g, g_tx = grads(jnp.asarray(a))
    assert np.all(np.isfinite(g)) and np.all(np.isfinite(g_tx)), case
    if case == "zero":
      np.testing.assert_array_equal(g, 0.0)
      np.testing.assert_array_equal(g_tx, 0.0)
    if method in EXACT:
      np.testing.assert_allclose(g_tx, g, atol=1e-4, err_msg=case)


@pytest.mark.slow
@pytest.mark.parametrize("method", EXACT)
@pytest.mark.parametrize("case", ["full", "wide"])
def test_exact_gradient_equals_finite_differences(method, case):
  a = _grad_cases()[case].astype(np.float64)
  rng = np.random.default_rng(13)
  w, d = rng.standard_normal(a.shape), rng.standard_normal(a.shape)
  with jax.enable_x64(True):
    def loss(x):
      return jnp.sum(optax_ortho.polar(x, method=method) * w)

    step = 1e-5
    fd = (loss(a + step * d) - loss(a - step * d)) / (2 * step)
    np.testing.assert_allclose(jnp.sum(jax.grad(loss)(jnp.asarray(a)) * d), fd, rtol=1e-5)


def _iterate_alone(groups, flags):
  # `cpu._iterate` on the groups' matrices, each zero-padded to the widest.
  width = max(g[0].shape[-1] for g in groups)
  stacks = [jnp.pad(g[0], ((0, 0), (0, 0), (0, width - g[0].shape[-1]))) for g in groups]
  cols = [np.array([g[0].shape[-1]]) for g in groups]
  return jax.jit(functools.partial(cpu._iterate, cols=cols))(stacks, flags)


def test_auto_narrow_widths_share_a_padded_iteration():
  # Widths 5 and 7 iterate with 8, 9 and 13 with 16, their Gram matrices
  # padded with an identity block: the factors and flags are those each
  # matrix has alone (the SVD's, its flag set up to cond 10).
  groups, flags, mats = [], [], []
  for gi, (n, cond) in enumerate([(5, 4.0), (7, 30.0), (8, 2.0), (9, 8.0), (13, 3.0)]):
    a = _with_singular_values(3 * n, np.geomspace(1, 1 / cond, n), 40 + gi)[None]
    groups.append([jnp.asarray(a)])
    flags.append(jnp.ones(1, bool))
    mats.append(a)
  found = jax.jit(polar_lib.auto_polar_groups)(groups, flags)
  for a, (q, _) in zip(mats, found):
    np.testing.assert_allclose(q[0], testing.polar_reference(a), atol=2e-5)
  np.testing.assert_array_equal([bool(f.use_gram[0]) for f in found],
                                [True, False, True, True, True])
  # And the iteration itself accepts the padded well-conditioned ones.
  widths8 = _iterate_alone(groups[:3], flags[:3])
  np.testing.assert_array_equal([bool(f.use_gram[0]) for f in widths8], [True, False, True])
  widths16 = _iterate_alone(groups[3:], flags[3:])
  np.testing.assert_array_equal([bool(f.use_gram[0]) for f in widths16], [True, True])


def test_auto_svd_fallback_of_distinct_shapes_shares_a_padded_call():
  # Five narrow widths (more than `buckets.MAX_WIDTHS`) share a padded width of
  # 8; their unflagged matrices of 20 to 30 rows take the SVD at one padded
  # call site (rows up to 32): the factors are each one's own pseudo-polar
  # factor, the flags read each one's own singular values.
  mats = [_with_singular_values(20, np.r_[1.0, 0.5, np.zeros(3)], 50)[None],
          _with_singular_values(24, np.geomspace(1, 1 / 3, 7), 51)[None],
          _with_singular_values(30, np.geomspace(1, 1 / 30, 6), 52)[None],
          _with_singular_values(18, np.geomspace(1, 1 / 2, 4), 53)[None],
          _with_singular_values(28, np.geomspace(1, 1 / 5, 8), 54)[None]]
  args = ([[jnp.asarray(a)] for a in mats], [jnp.zeros(1, bool)] * len(mats))
  found = jax.jit(polar_lib.auto_polar_groups)(*args)
  for a, (q, _) in zip(mats, found):
    np.testing.assert_allclose(q[0], testing.polar_reference(a), atol=2e-5)
  testing.assert_unit_singular_values(found[0].q[0][0], 2)
  np.testing.assert_array_equal([bool(f.use_gram[0]) for f in found],
                                [False, True, False, True, True])
  text = jax.jit(polar_lib.auto_polar_groups).lower(*args).as_text()
  assert text.count("lapack_sgesdd") == 1, text.count("lapack_sgesdd")


def test_auto_padded_stacks_keep_each_matrix_alone():
  # Distinct narrow shapes share zero-padded stacks (more widths than
  # `buckets.MAX_WIDTHS`, rows of one power of two, two parts in a group): a
  # non-finite, a zero, a rank-deficient and an ill-conditioned matrix among
  # them give each one's own factor and flag, as each has alone.
  shapes = [(20, 5), (24, 7), (30, 6), (18, 4), (28, 8), (17, 3)]
  mats = [_with_singular_values(m, np.geomspace(1, 1 / 3, n), 60 + i)
          for i, (m, n) in enumerate(shapes)]
  mats[1][2, 3] = np.nan
  mats[2] = np.zeros_like(mats[2])
  mats[3] = _with_singular_values(18, np.r_[1.0, 0.5, 0.0, 0.0], 70)
  mats[4] = _with_singular_values(28, np.geomspace(1, 1 / 40, 8), 71)
  groups = [[jnp.asarray(a)[None]] for a in mats]
  groups[5] = [groups[5][0], -groups[5][0]]
  flags = [jnp.array([True] * len(g)) for g in groups]
  flags[4] = jnp.zeros(1, bool)
  found = jax.jit(polar_lib.auto_polar_groups)(groups, flags)
  for g, f, (q, ok) in zip(groups, flags, found):
    alone = _jit_auto_parts(g, f)
    for qi, qa in zip(q, alone.q):
      np.testing.assert_allclose(qi, qa, atol=2e-6)
    np.testing.assert_array_equal(ok, alone.use_gram)


def test_gpu_padded_gram_route_is_each_matrix_own():
  # On GPU and TPU, many distinct narrow shapes are zero-padded into stacks
  # too (`batched.padded_gram_route`): the identity block in the padding's
  # Gram matrix must leave each matrix's factor and the cond <= 10 check as
  # they are unpadded. (One matrix per program: batched LAPACK on CPU.)
  cases = {"well": _with_singular_values(20, np.geomspace(1, 1 / 3, 5), 80),
           "one_column": _with_singular_values(9, np.r_[2.0], 81),
           "cond40": _with_singular_values(28, np.geomspace(1, 1 / 40, 6), 82),
           "rank2": _with_singular_values(18, np.r_[1.0, 0.5, 0.0, 0.0], 83),
           "zero": np.zeros((12, 7), np.float32)}
  width = 8
  for name, a in cases.items():
    m, n = a.shape
    padded = jnp.pad(jnp.asarray(a), ((0, 32 - m), (0, width - n)))[None]
    q, ok = jax.jit(functools.partial(batched.padded_gram_route, cols=np.array([n])))(padded)
    ref_q, ref_ok = jax.jit(exact.gram_route)(jnp.asarray(a)[None])
    assert bool(ok[0]) == bool(ref_ok[0]), name
    np.testing.assert_array_equal(q[0, m:], 0.0)
    np.testing.assert_allclose(q[0, :, n:], 0.0, atol=1e-6)
    if ref_ok[0]:
      np.testing.assert_allclose(q[0, :m, :n], polar_lib.polar(jnp.asarray(a)), atol=2e-6)
