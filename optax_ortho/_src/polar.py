"""Polar factor U V^T of a matrix, or of a stack of matrices.

The solver lowering is chosen per platform with `jax.lax.platform_dependent`.
On CPU every LAPACK decomposition runs on ONE matrix at a time
(`checks.lapack_map`: unbatched calls, unrolled so that XLA runs independent
ones concurrently): jaxlib 0.10.2's batched CPU LAPACK kernels
(`ParallelBatchMap`) were seen to hang forever on 2-core machines when a jitted
program held several of them (see "Platform hazards" in DESIGN.md). On GPU and
TPU each stack of same-shaped matrices goes to ONE batched solver call
(cuSOLVER's batched kernels; TPU's batched HLO), with no loop around it. The
branch is resolved when the program is lowered for its platform, so the CPU
program never contains the batched call.
Matrix products, which do not go through LAPACK, stay batched everywhere, but
for `"auto"`'s CPU route of narrow matrices, which multiplies each leaf where
it lies and stacks only the small Gram matrices (`_auto_cpu_lean`).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from itertools import chain
from itertools import islice
from itertools import repeat
from typing import Literal

import jax
import jax.numpy as jnp

from optax_ortho._src import checks

PolarMethod = Literal["svd", "gram", "newton_schulz", "polar_express", "auto"]
METHODS: tuple[str, ...] = ("svd", "gram", "newton_schulz", "polar_express", "auto")

# optax.contrib.scale_by_muon's default quintic coefficients.
MUON_NS_COEFFS = (3.4445, -4.7750, 2.0315)
MUON_NS_EPS = 1e-8

# Amsel et al. 2025, Algorithm 1 (degree 5), with the paper's 1.01 safety factor
# on every polynomial but the last, which later steps repeat.
_PE_RAW = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
POLAR_EXPRESS_COEFFS = tuple(
    (a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in _PE_RAW[:-1]
) + (_PE_RAW[-1],)

# "auto" trusts the Gram route only where the matrix is this well conditioned:
# its float32 error grows like eps * cond^2, and cond <= 10 keeps it near 1e-6.
_GRAM_MAX_COND = 10.0
# "auto" only tries the Gram route on matrices at least this tall; square-ish
# gradients are usually ill conditioned and would pay for eigh and then SVD.
_GRAM_MIN_ASPECT = 1.5

_HIGHEST = jax.lax.Precision.HIGHEST


def default_eps(m: int, n: int) -> float:
  """Relative singular-value cutoff: numpy's matrix-rank default in float32."""
  return max(m, n) * float(jnp.finfo(jnp.float32).eps)


def noise_floor(m: int, n: int, dtype) -> float:
  """Smallest relative singular value told apart from rounding noise.

  A rank-r matrix rounded to ``dtype`` has spurious singular values of a few
  ``finfo(dtype).eps`` times the largest (measured on rank-1 float32 matrices
  of 4 x 3 to 1024 x 256: at most 3.2 eps). The exact methods drop singular
  values at or below ``max(eps, noise_floor)`` times the largest, so that
  ``eps=0`` keeps the rank instead of inflating rounding noise into unit
  directions.
  """
  return 4.0 * math.sqrt(max(m, n)) * float(jnp.finfo(dtype).eps)


def check_method(method: str) -> None:
  if method not in METHODS:
    raise ValueError(
        f"method={method!r} is not a polar method; expected one of {METHODS}."
    )


def _mT(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, -1, -2)


def _svd_factor(m: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
  """Pseudo-polar factor of one matrix by SVD, and its singular values."""
  u, s, vt = jnp.linalg.svd(m, full_matrices=False)
  floor = noise_floor(m.shape[0], m.shape[1], m.dtype)
  keep = s > jnp.maximum(eps, floor) * s[0]
  return jnp.matmul(u * keep, vt, precision=_HIGHEST), s


def _svd_one(m: jax.Array, eps: float) -> jax.Array:
  return _svd_factor(m, eps)[0]


def _svd_polar(a: jax.Array, eps: float) -> jax.Array:
  return checks.per_matrix(lambda m: _svd_one(m, eps), a)


def _gram_eig(a: jax.Array):
  # `a` comes from `polar_stack` scaled to max-abs 1, so squaring it can
  # neither overflow nor underflow to zero (it did outside about 1e+-19).
  gram = jnp.matmul(_mT(a), a, precision=_HIGHEST)
  return checks.per_matrix(jnp.linalg.eigh, gram)


def _gram_from_eig(a, w, v, wtol: float | jax.Array) -> jax.Array:
  """a (G^T G)^(-1/2) from the eigendecomposition of the Gram matrix."""
  w_max = w[..., -1:]
  keep = w > wtol * w_max
  inv_sqrt = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, w, 1.0)), 0.0)
  m = jnp.matmul(v * inv_sqrt[..., None, :], _mT(v), precision=_HIGHEST)
  return jnp.matmul(a, m, precision=_HIGHEST)


def _gram_polar(a: jax.Array, eps: float) -> jax.Array:
  w, v = _gram_eig(a)
  # Eigenvalues of the Gram matrix are squared singular values, and float32
  # eigh resolves them only to about n * eps * w_max: below that, drop them.
  wtol = jnp.maximum(
      jnp.square(eps), a.shape[-1] * float(jnp.finfo(a.dtype).eps))
  return _gram_from_eig(a, w, v, wtol)


def _gram_ok(w: jax.Array) -> jax.Array:
  """Whether the Gram route is exact enough, from the Gram eigenvalues (ascending)."""
  return (w[..., 0] * _GRAM_MAX_COND**2 >= w[..., -1]) & (w[..., -1] > 0)


def _svd_route(m: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
  """Exact polar factor of one matrix by SVD, and whether the Gram route would do."""
  q, s = _svd_factor(m, eps)
  return q, (s[-1] * _GRAM_MAX_COND >= s[0]) & (s[0] > 0)


def _svd_routes(a: jax.Array, use_gram: jax.Array, eps: float):
  """`_svd_route` of every matrix of the stack (CPU: unbatched calls)."""
  del use_gram
  return checks.lapack_map(lambda m: _svd_route(m, eps), a)


# Gram-space iteration of `"auto"` on CPU: the optimal odd quintics for
# singular values in [0.05, 1] (each step's minimax fit on the interval the
# previous step left, as in Amsel et al. 2025, without their safety factor:
# float32 here), which bring [0.05, 1] to 1 +- 7e-3 in three steps, then
# Newton-Schulz's quintic 15/8 x - 5/4 x^3 + 3/8 x^5, which maps 1 + e to
# 1 - 5/2 e^3 (7e-3 to 1e-6).
_ITER_COEFFS = (
    (6.752375313049097, -18.350969260850015, 13.263264908535787),
    (2.5378644936313997, -1.874676922197189, 0.4412803582183434),
    (1.9269785403021307, -1.3066162362881708, 0.3807051358773831),
    (1.875, -1.25, 0.375),
)
# Before the last step (the polish) the iterated Gram matrix G_K = I + E must
# have ||E^2||_F <= this. The polish maps a singular value 1 + e to
# 1 - 5/2 e^3 (to 1e-5 for |e| <= 0.05), so the Gram matrix after it would be
# the identity to (5/8) ||E^2||_F^(3/2) (Frobenius), at most 7.8e-5 here: as
# exact as the check of that matrix itself to 1e-4 that it replaces, which
# needed two more products. Rounding leaves about 3e-5 in ||E^2||_F at n = 64;
# the steps leave 1.6e-3 on a well-conditioned matrix, and a singular value
# below about 1/20 of the largest (so a condition number above about 20, and
# every rank-deficient matrix) fails it.
_ITER_TOL = 2.5e-3
# Widest matrices that iterate instead of calling `eigh`: 15 products of n x n
# matrices cost about one LAPACK `eigh` at n = 64 (measured on 2 cores: 13 us
# a product, 240 us an `eigh`), far less below, and more above (at n = 512 an
# `eigh` costs 8 products).
_ITER_MAX_N = 64


def _gram_steps(g: jax.Array, coeffs, mm: Callable, g2: jax.Array | None = None
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Odd quintic steps on the Gram matrix G = a^T a of a tall stack.

  With B_k = c0 I + c1 G_k + c2 G_k^2 the iterate a_k = a B_0 ... B_{k-1} has
  the Gram matrix G_{k+1} = G_k B_k^2 (all commute), so the steps need n x n
  products only. Returns the product P of the B_k (a @ P is the last
  iterate), and the Gram matrix G_K before the last step with its square
  (the last step's update of G is never needed). `g2`, if given, is G^2
  already.
  """
  eye = jnp.eye(g.shape[-1], dtype=g.dtype)
  p = None
  for i, (c0, c1, c2) in enumerate(coeffs):
    if i or g2 is None:
      g2 = mm(g, g)
    b = c0 * eye + c1 * g + c2 * g2
    p = b if p is None else mm(p, b)
    if i + 1 < len(coeffs):
      g = mm(g, mm(b, b))
  assert p is not None and g2 is not None, "coeffs must not be empty"
  return p, g, g2


def _mm(x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.matmul(x, y, precision=_HIGHEST)


def _gram(a: jax.Array) -> jax.Array:
  return jnp.matmul(_mT(a), a, precision=_HIGHEST)


def _gram_factor(g: jax.Array) -> tuple[jax.Array, jax.Array]:
  """P with a @ P the polar factor of a, from G = a^T a, and whether it converged.

  G is divided by s = ||G^2||_F^(1/2), an upper bound on its largest
  eigenvalue (at most n^(1/4) above it), so the scaled singular values lie in
  [1 / (cond n^(1/8)), 1]; the coefficients bring [0.05, 1] to 1 +- 1e-6 in
  four steps (every matrix of cond <= 11.9 at n = 64 passes, more where s is
  closer to the top eigenvalue). The check that the Gram matrix before the
  last step is close enough to the identity for that step to finish the job
  (`_ITER_TOL`) is what makes the result exact: a matrix that is
  rank-deficient or worse conditioned than the coefficients allow fails it
  (its singular values have not come near one).
  """
  g2 = _mm(g, g)
  s = jnp.sqrt(jnp.sqrt(jnp.sum(jnp.square(g2), axis=(-2, -1), keepdims=True)))
  live = s > 0
  s = jnp.where(live, s, jnp.ones((), g.dtype))
  p, gk, gk2 = _gram_steps(g / s, _ITER_COEFFS, _mm, g2=g2 / jnp.square(s))
  eye = jnp.eye(g.shape[-1], dtype=g.dtype)
  e2 = gk2 - 2.0 * gk + eye  # (G_K - I)^2
  dev = jnp.sqrt(jnp.sum(jnp.square(e2), axis=(-2, -1)))
  ok = live[..., 0, 0] & (dev <= _ITER_TOL)
  return p * jax.lax.rsqrt(s), ok


def _gram_iterate(a: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Exact polar factor of each well-conditioned matrix of a (k, m, n) stack
  by matrix products only, and whether it converged (`_gram_factor`).

  Every iterate is `a` times a polynomial in G = a^T a, as in `_ns_iterate`,
  so the iteration runs on n x n matrices. No LAPACK call, so the whole stack
  is one batch of products.
  """
  p, ok = _gram_factor(_gram(a))
  return _mm(a, p), ok


# The lean route takes a Gram matrix whose largest diagonal entry (the
# largest squared column norm) lies in this range as it is: then no product
# of the stack overflowed, and none lost bits to underflow at float32's
# precision (entries below 2^-60 |G| are rounding noise there anyway).
_LEAN_RANGE = (2.0**-60, 2.0**120)


def _auto_cpu_lean(groups: list[list[jax.Array]], flags: list[jax.Array],
                   eps: list[float]):
  """`"auto"` on CPU for groups of float32 (b_i, m_g, n) parts, one n <=
  `_ITER_MAX_N` for all: group g is the stack `concatenate(groups[g])`.

  The usual step (every flag set, every matrix finite and of moderate scale,
  every check passed) reads each part only in its Gram matrices G = a^T a and
  writes it only in a @ P: the parts are never stacked, only their n x n Gram
  matrices, across every group of this width, so one iteration serves them
  all; the finiteness guard and the scaling that a LAPACK call needs are
  read off G (an Inf or NaN in `a` puts one on G's diagonal; so does an
  overflow). Measured on ResNet-20's gradients (2 cores): stacking the
  kernels and unstacking the factors took 0.4 ms of a 1.2 ms tree, the
  max-abs, zeroing and scaling passes over a 5 x 576x64 stack a third of its
  step, and each shape group's iteration and `cond` cost more in per-op
  overhead than in arithmetic. One `cond` guards the whole width; when it
  fails, each group whose own matrices all passed still takes this route,
  and the others take the general one (`_auto_guarded`). A width whose flags
  are all off goes straight to the SVD.
  """
  counts = [sum(x.shape[0] for x in grp) for grp in groups]
  first = list(itertools.accumulate([0] + [len(grp) for grp in groups]))

  def general(i, grp):
    a = stack_parts(grp)
    q, f = _auto_guarded(_auto_cpu, a, flags[i], eps[i])
    return split_stack(q, [x.shape[0] for x in grp]), f

  def iterate(groups):
    parts = [x for grp in groups for x in grp]
    grams = [_gram(x) for x in parts]
    g = stack_parts(grams)
    d = jnp.max(jnp.diagonal(g, axis1=-2, axis2=-1), axis=-1)
    lo, hi = _LEAN_RANGE
    clean = jnp.concatenate(flags) & (d >= lo) & (d <= hi)  # False on NaN
    # The iteration runs whatever `clean` says (products only: no input can
    # hang it), so that one `cond` decides the route.
    scale = jnp.where(clean, d, jnp.ones((), d.dtype))[:, None, None]
    p, ok = _gram_factor(g / scale)
    ok = clean & ok
    p = split_stack(p * jax.lax.rsqrt(scale), [x.shape[0] for x in parts])
    oks = split_stack(ok, counts)

    def lean(i, grp):
      return [_mm(x, y) for x, y in zip(grp, p[first[i]:first[i + 1]])], oks[i]

    def all_lean(groups):
      return [lean(i, grp) for i, grp in enumerate(groups)]

    def each(groups):
      return [jax.lax.cond(jnp.all(oks[i]), functools.partial(lean, i),
                           functools.partial(general, i), grp)
              for i, grp in enumerate(groups)]

    if len(groups) == 1:
      return [jax.lax.cond(jnp.all(ok), functools.partial(lean, 0),
                           functools.partial(general, 0), groups[0])]
    return jax.lax.cond(jnp.all(ok), all_lean, each, groups)

  # A width whose flags are all off (low-rank or ill-conditioned layers)
  # goes straight to the SVD, with no other `cond` in its way: each costs
  # about as much as a small SVD on XLA:CPU.
  return jax.lax.cond(jnp.any(jnp.concatenate(flags)), iterate,
                      functools.partial(_svd_groups, flags=flags, eps=eps),
                      groups)


def _svd_groups(groups: list[list[jax.Array]], flags: list[jax.Array],
                eps: list[float]):
  """The SVD route (`_svd_route`) of every group, guarded, one unbatched
  call per matrix."""
  out = []
  for grp, f, e in zip(groups, flags, eps):
    a = stack_parts(grp)
    q, ok = _auto_guarded(_svd_routes, a, f, e)
    out.append((split_stack(q, [x.shape[0] for x in grp]), ok))
  return out


def stack_parts(parts: list[jax.Array]) -> jax.Array:
  """The parts (b_i, ...) as one stack: `split_stack`'s inverse."""
  return jnp.concatenate(parts) if len(parts) > 1 else parts[0]


def split_stack(x: jax.Array, sizes: list[int]) -> list[jax.Array]:
  """The stack `x` cut along its first axis into parts of these sizes."""
  if len(sizes) == 1:
    return [x]
  return jnp.split(x, list(itertools.accumulate(sizes))[:-1])


def _auto_guarded(route: Callable, a: jax.Array, use_gram: jax.Array,
                  eps: float) -> tuple[jax.Array, jax.Array]:
  """`route` on the stack with its non-finite matrices zeroed (they come out
  NaN and keep their flag) and every matrix at max-abs 1 (as in
  `polar_stack`: any finite scale, same factor)."""
  a, finite = checks.lapack_input(a)
  q, ok = route(_unit_scale(a), use_gram, eps)
  return checks.poison(q, finite), jnp.where(finite, ok, use_gram)


def _masked_map(fn: Callable, mask: jax.Array, a: jax.Array):
  """(q, ok) = `fn` on the matrices of the stack `a` whose `mask` is set, and
  (0, False) on the others, one unbatched LAPACK call per matrix.

  A `cond` per matrix runs its calls one at a time on XLA:CPU, where
  unconditional calls run concurrently (measured: four 512x512 SVDs behind
  runtime `cond`s 161 ms, unconditional 86 ms, on 2 cores). So a stack whose
  mask is all set, the usual case, makes the calls without a `cond`; one with
  some set pays the `cond`s; one with none makes no call.
  """
  k = a.shape[0]
  none = (jnp.zeros_like(a), jnp.zeros((k,), bool))

  def some(a):
    def one(args):
      x, m = args
      return jax.lax.cond(
          m, fn, lambda x: (jnp.zeros_like(x), jnp.bool_(False)), x)
    return checks.lapack_map(one, (a, mask))

  index = jnp.where(jnp.all(mask), 0, jnp.where(jnp.any(mask), 1, 2))
  return jax.lax.switch(
      index, [lambda a: checks.lapack_map(fn, a), some, lambda a: none], a)


def _auto_cpu(a: jax.Array, use_gram: jax.Array, eps: float):
  """Each matrix takes the route its flag says, and only those whose Gram
  check fails pay for the SVD as well.

  On float32 matrices of at most `_ITER_MAX_N` columns the Gram route is
  `_gram_iterate` on the whole stack (matrix products, batched); wider ones
  and float64 (the coefficients stop at float32's precision) take one `eigh`
  per matrix.
  """
  if a.shape[-1] <= _ITER_MAX_N and a.dtype == jnp.float32:
    k = a.shape[0]
    q, ok = jax.lax.cond(
        jnp.any(use_gram), _gram_iterate,
        lambda a: (jnp.zeros_like(a), jnp.zeros((k,), bool)), a)
    ok = ok & use_gram
  else:
    def by_gram(x):
      w, v = _gram_eig(x[None])
      return _gram_from_eig(x[None], w, v, 0.0)[0], _gram_ok(w)[0]

    q, ok = _masked_map(by_gram, use_gram, a)
  q_svd, ok_svd = _masked_map(lambda x: _svd_route(x, eps), ~ok, a)
  return jnp.where(ok[:, None, None], q, q_svd), ok | ok_svd


def _auto_batched(a: jax.Array, use_gram: jax.Array, eps: float):
  """The whole stack at once: at most one batched eigh and one batched SVD,
  each behind a real branch (`cond`, not a select): a stack whose flags say
  SVD never runs the eigh, and one that passes the Gram check never runs the
  SVD."""
  k = a.shape[0]

  def by_gram(a):
    w, v = _gram_eig(a)
    return _gram_from_eig(a, w, v, 0.0), _gram_ok(w)

  def no_gram(a):
    return jnp.zeros_like(a), jnp.zeros((k,), bool)

  q, ok = jax.lax.cond(jnp.all(use_gram), by_gram, no_gram, a)

  def by_svd(a):
    return jax.vmap(lambda x: _svd_route(x, eps))(a)

  def no_svd(a):
    return jnp.zeros_like(a), jnp.zeros((k,), bool)

  q_svd, ok_svd = jax.lax.cond(jnp.all(ok), no_svd, by_svd, a)
  return jnp.where(ok[:, None, None], q, q_svd), ok | ok_svd


def auto_polar_stack(
    a: jax.Array, use_gram: jax.Array, eps: float | None = None
) -> tuple[jax.Array, jax.Array]:
  """`"auto"` with a route per matrix: exact, and no slower than the SVD.

  `use_gram` (k,) bool says, per matrix of the (k, m, n) stack, to try the Gram
  route (one eigh of the n x n Gram matrix, checked: its float32 error grows
  like eps * cond^2, so it is kept only for cond <= 10; on CPU, for float32
  and n <= 64, `_gram_iterate` instead, checked by its convergence) before
  the SVD. Returns
  the polar factors and the flags for the next call: a matrix that passed the
  check keeps the Gram route; one that took the SVD goes back to the Gram route
  when its singular values say it would pass. Gradients change slowly from step
  to step, so a low-rank or ill-conditioned layer pays for one SVD per step,
  not for an eigh and then an SVD. Non-finite matrices come out NaN and keep
  their flag.
  """
  if a.size == 0:
    return a, use_gram
  q, ok = auto_polar_parts([a], use_gram, eps)
  return q[0], ok


def auto_polar_parts(
    parts: list[jax.Array], use_gram: jax.Array, eps: float | None = None
) -> tuple[list[jax.Array], jax.Array]:
  """`auto_polar_stack` of the stack `concatenate(parts)`, one result per
  part (each (b_i, m, n), non-empty, one dtype)."""
  (q, ok), = auto_polar_groups([parts], [use_gram], eps)
  return q, ok


def auto_polar_groups(
    groups: list[list[jax.Array]], flags: list[jax.Array],
    eps: float | None = None,
) -> list[tuple[list[jax.Array], jax.Array]]:
  """`auto_polar_parts` of every group (a list of same-shaped parts) with its
  flags, as (factors per part, new flags) per group.

  The parts are not stacked where the route does not need it: on CPU the
  float32 groups of each width n <= `_ITER_MAX_N` share one iteration and
  multiply each part by its own factor (`_auto_cpu_lean`).
  """
  out: list = [None] * len(groups)
  widths: dict[int, list[int]] = {}
  for i, parts in enumerate(groups):
    n = parts[0].shape[-1]
    if n <= _ITER_MAX_N and parts[0].dtype == jnp.float32:
      widths.setdefault(n, []).append(i)
    else:
      out[i] = _auto_stacked(parts, flags[i], eps)
  if not widths:
    return out
  sets = list(widths.values())
  sub = [[groups[i] for i in idx] for idx in sets]
  sub_flags = [[flags[i] for i in idx] for idx in sets]
  sub_eps = [[default_eps(*groups[i][0].shape[-2:]) if eps is None else eps
              for i in idx] for idx in sets]

  def cpu(sub, sub_flags):
    def lean(sub):
      return [_auto_cpu_lean(g, f, e) for g, f, e in zip(sub, sub_flags, sub_eps)]

    def svd(sub):
      return [_svd_groups(g, f, e) for g, f, e in zip(sub, sub_flags, sub_eps)]

    if len(sub) == 1:
      return lean(sub)
    # One `cond` for every width: a tree whose narrow layers all take the
    # SVD (the main job's CNN) pays one, not one per width.
    any_flag = jnp.any(jnp.concatenate([f for fs in sub_flags for f in fs]))
    return jax.lax.cond(any_flag, lean, svd, sub)

  def default(sub, sub_flags):
    return [[_auto_stacked(p, f, e, _auto_batched)
             for p, f, e in zip(g, fs, es)]
            for g, fs, es in zip(sub, sub_flags, sub_eps)]

  res = jax.lax.platform_dependent(sub, sub_flags, cpu=cpu, default=default)
  for idx, r in zip(sets, res):
    for i, ri in zip(idx, r):
      out[i] = ri
  return out


def _auto_stacked(parts: list[jax.Array], use_gram: jax.Array,
                  eps: float | None, route: Callable | None = None):
  """The general route on the stacked parts: `route` (default: per platform,
  `_auto_cpu` on CPU, `_auto_batched` elsewhere)."""
  m, n = parts[0].shape[-2:]
  eps = default_eps(m, n) if eps is None else eps
  sizes = [x.shape[0] for x in parts]

  def run(route):
    def go(parts, f):
      a = stack_parts(parts)
      q, ok = _auto_guarded(route, a, f, eps)
      return split_stack(q, sizes), ok
    return go

  if route is not None:
    return run(route)(parts, use_gram)
  return jax.lax.platform_dependent(
      parts, use_gram, cpu=run(_auto_cpu), default=run(_auto_batched))


def _auto_polar(a: jax.Array, eps: float) -> jax.Array:
  m, n = a.shape[-2:]
  if m < _GRAM_MIN_ASPECT * n:
    return _svd_polar(a, eps)
  return auto_polar_stack(a, jnp.ones(a.shape[:1], bool), eps)[0]


# Tall stacks at least this tall iterate in the n x n Gram space: fewer
# flops from m >= 2n on, and XLA's CPU products of a tall matrix by a small
# one are slow, so it pays from 1.5 on (measured 0.64x at 96 x 64, 0.22x at
# 2048 x 512 of the direct iteration's time).
_NS_GRAM_MIN_ASPECT = 1.5


def _ns_iterate(a: jax.Array, coeffs) -> jax.Array:
  """Odd quintic iteration on a tall stack, in Muon's wide orientation.

  Muon runs x <- c0 x + (c1 A + c2 A^2) x with A = x x^T on the wide matrix
  x = a^T; here the same step is written on a directly (A = a^T a), which is
  the transpose of Muon's iterate.

  Every iterate is a times a polynomial in G = a^T a, so for tall matrices
  the iteration runs on n x n matrices only (the same iterates in exact
  arithmetic): with B_k = c0 I + c1 G_k + c2 G_k^2, x_{k+1} = x_k B_k and
  G_{k+1} = B_k G_k B_k = G_k B_k^2 (all commute), and a is multiplied once
  by the product of the B_k at the end: 4 m n^2 + 34 n^3 flops for 5 steps
  instead of 20 m n^2 + 10 n^3.
  """
  m, n = a.shape[-2:]
  if m < _NS_GRAM_MIN_ASPECT * n:
    for c0, c1, c2 in coeffs:
      gram = _mT(a) @ a
      b = c1 * gram + c2 * (gram @ gram)
      a = c0 * a + a @ b
    return a
  if not coeffs:
    return a
  p, _, _ = _gram_steps(_mT(a) @ a, coeffs, jnp.matmul)
  return a @ p


def _newton_schulz_polar(a: jax.Array, steps: int) -> jax.Array:
  norm = jnp.linalg.norm(a, axis=(-2, -1), keepdims=True)
  return _ns_iterate(a / (norm + MUON_NS_EPS), (MUON_NS_COEFFS,) * steps)


def _polar_express_polar(a: jax.Array, steps: int) -> jax.Array:
  norm = jnp.linalg.norm(a, axis=(-2, -1), keepdims=True)
  coeffs = tuple(islice(chain(POLAR_EXPRESS_COEFFS, repeat(POLAR_EXPRESS_COEFFS[-1])), steps))
  return _ns_iterate(a / (norm * 1.01 + 1e-7), coeffs)


def _unit_scale(a: jax.Array) -> jax.Array:
  """Each matrix divided by its largest |entry| (zero matrices unchanged).

  The polar factor does not depend on a positive scale, and at max-abs 1 the
  Gram matrix of the exact methods and the Frobenius norm of the iterative
  ones neither overflow nor underflow, whatever the input's magnitude.
  """
  big = jnp.max(jnp.abs(a), axis=(-2, -1), keepdims=True)
  return a / jnp.where(big > 0, big, jnp.ones((), a.dtype))


def polar_stack(
    a: jax.Array,
    method: str,
    *,
    eps: float | None = None,
    ns_steps: int = 5,
) -> jax.Array:
  """Polar factor of a float32 stack (k, m, n) with m >= n; no validation.

  A matrix with a non-finite entry never reaches a LAPACK call (jaxlib's CPU
  SVD spins forever on an Inf in its first row): it is replaced by zeros
  before and comes out all NaN; the other matrices are unaffected.
  """
  m, n = a.shape[-2:]
  if a.size == 0:
    return a
  eps = default_eps(m, n) if eps is None else eps
  a, ok = checks.lapack_input(a)
  a = _unit_scale(a)
  if method == "svd":
    q = _svd_polar(a, eps)
  elif method == "gram":
    q = _gram_polar(a, eps)
  elif method == "auto":
    q = _auto_polar(a, eps)
  elif method == "newton_schulz":
    q = _newton_schulz_polar(a, ns_steps)
  else:
    q = _polar_express_polar(a, ns_steps)
  return checks.poison(q, ok)


def polar(
    x: jax.Array,
    *,
    method: PolarMethod = "svd",
    eps: float | None = None,
    ns_steps: int = 5,
) -> jax.Array:
  r"""Polar factor :math:`U V^\top` of a matrix or of a batch of matrices.

  For :math:`X = U \Sigma V^\top` (thin SVD) the polar factor is the closest
  matrix with orthonormal columns (or rows) to :math:`X`. Rank-deficient inputs
  give the pseudo-polar factor :math:`U_r V_r^\top`, keeping only singular
  values above ``eps`` times the largest; a zero matrix gives zero.

  Methods:

  * ``"svd"``: exact, from ``jnp.linalg.svd``.
  * ``"gram"``: exact for well-conditioned matrices, from ``eigh`` of the smaller
    Gram matrix :math:`X^\top X`; its float32 error grows like
    :math:`\epsilon\,\kappa(X)^2`, and singular values below about
    :math:`\sqrt{n \epsilon}` of the largest are dropped.
  * ``"newton_schulz"``: ``optax.contrib.scale_by_muon``'s quintic iteration
    (same coefficients, normalisation and step count). Approximate: singular
    values land in roughly [0.7, 1.2].
  * ``"polar_express"``: the optimal per-step polynomials of Amsel et al.
    (2025). Approximate: after 5 steps singular values lie within about
    [0.85, 1.15], and more steps converge to the exact factor.
  * ``"auto"``: exact, the fastest route per matrix: the Gram route for tall
    or wide matrices whose condition number it verifies at run time (falling
    back to SVD otherwise), SVD for square-ish ones. On CPU, float32 matrices
    of at most 64 columns (rows, if wide) take the Gram route without LAPACK:
    a quintic iteration on the Gram matrix, accepted only where it reaches
    the identity (condition number up to about 20). Inside `orthonormalize`
    the route of each matrix is kept in the state, so a matrix that needed
    the SVD last step goes straight to it.

  ``jax.scipy.linalg.polar`` (QDWH) is exact too, but measured here it was 2-4x
  slower than the SVD on CPU, so it is not used.

  Computation is in float32 (or the input's precision, if higher); the result
  has the input's dtype.

  Faults (`docs/reliability.md`): a matrix with an `Inf` or `NaN` entry never
  reaches a LAPACK call and comes out all NaN, the other matrices of the batch
  unaffected; every matrix is divided by its largest `|entry|` first, so any
  finite scale gives the same factor; the exact methods never keep a singular
  value at or below `4 sqrt(max(m, n)) finfo(dtype).eps` times the largest
  (rounding noise), even with `eps=0`; empty inputs are returned as they are.

  Args:
    x: array of shape ``(..., m, n)``.
    method: one of ``"svd"``, ``"gram"``, ``"newton_schulz"``,
      ``"polar_express"``, ``"auto"``.
    eps: relative singular-value cutoff of the exact methods; default
      ``max(m, n) * finfo(float32).eps``.
    ns_steps: number of iterations of the iterative methods.

  Returns:
    The polar factor, with the shape and dtype of ``x``.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_ortho
    >>> q = optax_ortho.polar(jnp.array([[3.0, 0.0], [4.0, 5.0], [0.0, 1.0]]))
    >>> bool(jnp.allclose(q.T @ q, jnp.eye(2), atol=1e-5))
    True

  References:
    Higham, *Functions of Matrices*, SIAM 2008, ch. 8.

    Amsel et al., `The Polar Express: Optimal Matrix Sign Methods and Their
    Application to the Muon Algorithm <https://arxiv.org/abs/2505.16932>`_, 2025.
  """
  check_method(method)
  checks.float_leaves(x, "x")
  if x.ndim < 2:
    raise ValueError(f"x must have ndim >= 2 (..., m, n), got shape {x.shape}.")
  if not isinstance(ns_steps, int) or isinstance(ns_steps, bool) or ns_steps < 1:
    raise ValueError(f"ns_steps must be a positive int, got {ns_steps!r}.")
  if eps is not None:
    checks.hyperparam(eps, "eps", "in [0, 1) or None",
                      lambda v: 0.0 <= v < 1.0, schedule=False)
  m, n = x.shape[-2:]
  batch = x.shape[:-2]
  if x.size == 0:  # an empty matrix, or an empty batch: nothing to factor
    return x
  compute = jnp.promote_types(x.dtype, jnp.float32)
  a = x.astype(compute).reshape((-1, m, n))
  wide = m < n
  if wide:
    a = _mT(a)
  q = polar_stack(a, method, eps=eps, ns_steps=ns_steps)
  if wide:
    q = _mT(q)
  return q.reshape(batch + (m, n)).astype(x.dtype)
