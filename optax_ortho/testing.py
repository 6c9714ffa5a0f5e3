"""Hypothesis strategies and invariant checks for orthogonality-based optimizers.

Public so that users can property-test their own pipelines the way we test ours.
It imports hypothesis, which the library does not need: install it with the
``testing`` extra, ``pip install "optax-ortho[testing]"``.

    from hypothesis import given
    from optax_ortho import testing

    @given(testing.matrices(rank_deficient=True))
    def test_my_update(a):
      testing.assert_pseudo_polar(a, my_polar(a))

Strategies draw shapes and a seed, and build arrays with NumPy, so examples are
cheap and shrink towards small shapes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st

# ------------------------------------------------------------ strategies


@st.composite
def matrices(
    draw: st.DrawFn,
    *,
    min_side: int = 1,
    max_side: int = 12,
    rank_deficient: bool | None = None,
    max_condition: float | None = None,
    dtype: Any = np.float32,
) -> np.ndarray:
  """Real (m, n) matrices.

  Args:
    draw: supplied by hypothesis.
    min_side: smallest number of rows or columns.
    max_side: largest number of rows or columns.
    rank_deficient: True: rank strictly between 0 and min(m, n) (needs
      min(m, n) >= 2); False: full rank; None: either.
    max_condition: if set (full-rank matrices only), singular values are drawn
      in [1 / max_condition, 1].
    dtype: NumPy dtype of the result.

  Example:
    >>> from hypothesis import given, settings
    >>> import optax_ortho
    >>> from optax_ortho import testing
    >>> @settings(max_examples=5, deadline=None)
    ... @given(testing.matrices(rank_deficient=False, max_condition=10.0))
    ... def check(a):
    ...   testing.assert_orthonormal(optax_ortho.polar(a), atol=1e-4)
    >>> check()
  """
  m = draw(st.integers(min_side, max_side))
  n = draw(st.integers(min_side, max_side))
  seed = draw(st.integers(0, 2**32 - 1))
  rng = np.random.default_rng(seed)
  k = min(m, n)
  if rank_deficient is None:
    rank_deficient = k >= 2 and draw(st.booleans())
  if rank_deficient:
    if k < 2:
      m, n, k = max(m, 2), max(n, 2), 2
    rank = draw(st.integers(1, k - 1))
  else:
    rank = k
  u, _ = np.linalg.qr(rng.standard_normal((m, rank)))
  v, _ = np.linalg.qr(rng.standard_normal((n, rank)))
  if max_condition is not None and not rank_deficient:
    s = np.exp(rng.uniform(-np.log(max_condition), 0.0, rank))
    s[0] = 1.0
  else:
    s = rng.uniform(0.5, 2.0, rank)
  scale = 10.0 ** draw(st.integers(-3, 3))
  return ((u * s) @ v.T * scale).astype(dtype)


LAYER_KINDS = ("dense", "conv", "bias", "embedding", "square")


@st.composite
def layer_shapes(
    draw: st.DrawFn, *, kinds: tuple[str, ...] = LAYER_KINDS
) -> tuple[int, ...]:
  """Flax-layout parameter shapes: Dense (in, out), Conv (kh, kw, in, out), ...

  Example:
    >>> from hypothesis import given
    >>> from optax_ortho import testing
    >>> @given(testing.layer_shapes(kinds=("dense", "conv")))
    ... def check(shape):
    ...   assert len(shape) in (2, 4)
    >>> check()
  """
  kind = draw(st.sampled_from(kinds))
  ch = st.sampled_from((1, 2, 3, 4, 8, 16))
  if kind == "dense":
    return (draw(ch), draw(ch))
  if kind == "conv":
    k = draw(st.sampled_from((1, 3)))
    return (k, k, draw(ch), draw(ch))
  if kind == "bias":
    return (draw(ch),)
  if kind == "embedding":
    return (draw(st.sampled_from((32, 64))), draw(ch))
  d = draw(ch)
  return (d, d)


@st.composite
def gradient_trees(
    draw: st.DrawFn,
    *,
    min_leaves: int = 1,
    max_leaves: int = 6,
    rank_deficient: bool | None = None,
    dtype: Any = np.float32,
) -> dict[str, np.ndarray]:
  """Gradient pytrees (flat dicts) of realistic layer shapes.

  Shapes repeat often (as in a ResNet), so batching by shape is exercised.
  With `rank_deficient=True` every matrix leaf has rank 1 (or is zero for a
  1 x 1 view); None mixes full-rank, rank-one and zero leaves.

  Example:
    >>> import numpy as np
    >>> from hypothesis import given, settings
    >>> import optax_ortho
    >>> from optax_ortho import testing
    >>> tx = optax_ortho.orthonormalize("newton_schulz")
    >>> @settings(max_examples=5, deadline=None)
    ... @given(testing.gradient_trees(max_leaves=3))
    ... def check(grads):
    ...   updates, _ = tx.update(grads, tx.init(grads))
    ...   assert all(np.isfinite(u).all() for u in updates.values())
    >>> check()
  """
  n = draw(st.integers(min_leaves, max_leaves))
  shapes = draw(st.lists(layer_shapes(), min_size=1, max_size=3))
  seed = draw(st.integers(0, 2**32 - 1))
  rng = np.random.default_rng(seed)
  tree = {}
  for i in range(n):
    shape = shapes[i % len(shapes)]
    g = rng.standard_normal(shape)
    kind = "full"
    if len(shape) >= 2:
      if rank_deficient:
        kind = "rank1"
      elif rank_deficient is None:
        kind = draw(st.sampled_from(("full", "full", "rank1", "zero")))
    if kind == "rank1":
      flat = g.reshape(-1, shape[-1])
      g = np.outer(flat[:, 0], flat[0]).reshape(shape)
    elif kind == "zero":
      g = np.zeros(shape)
    tree[f"layer{i}"] = g.astype(dtype)
  return tree


# ------------------------------------------------------- model pytrees


def resnet20_shapes() -> dict[str, tuple[int, ...]]:
  """Parameter shapes of ResNet-20 for CIFAR in Flax layout (conv kernels HWIO).

  A 3x3x3x16 stem, 18 3x3 convolutions of 16/32/64 channels, two 1x1
  projections, two BatchNorm vectors per block and a 64x10 head: the pytree on
  which batched LAPACK hung (docs/architecture.md), and the benchmarks' small model.

  Example:
    >>> from optax_ortho import testing
    >>> shapes = testing.resnet20_shapes()
    >>> shapes["stem"], shapes["s1b0proj"], shapes["head"]
    ((3, 3, 3, 16), (1, 1, 16, 32), (64, 10))
  """
  shapes: dict[str, tuple[int, ...]] = {"stem": (3, 3, 3, 16)}
  cin = 16
  for stage, cout in enumerate((16, 32, 64)):
    for block in range(3):
      shapes[f"s{stage}b{block}c1"] = (3, 3, cin, cout)
      shapes[f"s{stage}b{block}c2"] = (3, 3, cout, cout)
      if cin != cout:
        shapes[f"s{stage}b{block}proj"] = (1, 1, cin, cout)
      shapes[f"s{stage}b{block}bn1"] = (cout,)
      shapes[f"s{stage}b{block}bn2"] = (cout,)
      cin = cout
  shapes["head"] = (64, 10)
  shapes["head_bias"] = (10,)
  return shapes


def transformer_shapes(d: int = 512, layers: int = 4,
                       vocab: int = 4096) -> dict[str, tuple[int, ...]]:
  """Parameter shapes of a transformer: embedding, qkv, out, MLP, layer norms.

  Example:
    >>> from optax_ortho import testing
    >>> shapes = testing.transformer_shapes(d=64, layers=2, vocab=128)
    >>> shapes["embedding"], shapes["l0_qkv"], shapes["l1_down"]
    ((128, 64), (64, 192), (256, 64))
  """
  shapes: dict[str, tuple[int, ...]] = {"embedding": (vocab, d)}
  for i in range(layers):
    shapes[f"l{i}_qkv"] = (d, 3 * d)
    shapes[f"l{i}_out"] = (d, d)
    shapes[f"l{i}_up"] = (d, 4 * d)
    shapes[f"l{i}_down"] = (4 * d, d)
    shapes[f"l{i}_ln1"] = (d,)
    shapes[f"l{i}_ln2"] = (d,)
  return shapes


# ---------------------------------------------------------------- checks


def polar_reference(a: Any, eps: float | None = None) -> np.ndarray:
  """Pseudo-polar factor U_r V_r^T in float64 NumPy (leading axes = batch).

  Example:
    >>> import numpy as np
    >>> from optax_ortho import testing
    >>> testing.polar_reference(np.array([[3.0, 0.0], [0.0, 0.0]]))
    array([[1., 0.],
           [0., 0.]])
  """
  a = np.asarray(a, np.float64)
  u, s, vt = np.linalg.svd(a, full_matrices=False)
  if eps is None:
    eps = max(a.shape[-2:]) * float(np.finfo(np.float32).eps)
  keep = s > eps * s[..., :1]
  return (u * keep[..., None, :]) @ vt


def assert_orthonormal(q: Any, atol: float = 1e-5) -> None:
  """Columns (tall) or rows (wide) of each matrix are orthonormal.

  Example:
    >>> import numpy as np
    >>> from optax_ortho import testing
    >>> testing.assert_orthonormal(np.eye(3)[:, :2])
  """
  q = np.asarray(q, np.float64)
  if q.shape[-2] < q.shape[-1]:
    q = np.swapaxes(q, -1, -2)
  gram = np.swapaxes(q, -1, -2) @ q
  np.testing.assert_allclose(gram, np.broadcast_to(np.eye(q.shape[-1]), gram.shape),
                             atol=atol)


def assert_unit_singular_values(q: Any, rank: int, atol: float = 1e-4) -> None:
  """Exactly `rank` singular values equal one, the rest zero.

  Example:
    >>> import numpy as np
    >>> from optax_ortho import testing
    >>> testing.assert_unit_singular_values(np.diag([1.0, -1.0, 0.0]), rank=2)
  """
  s = np.linalg.svd(np.asarray(q, np.float64), compute_uv=False)
  expected = np.zeros_like(s)
  expected[..., :rank] = 1.0
  np.testing.assert_allclose(s, expected, atol=atol)


def assert_pseudo_polar(a: Any, q: Any, atol: float = 1e-4) -> None:
  """`q` is the pseudo-polar factor of `a` (float64 SVD reference).

  Example:
    >>> import numpy as np
    >>> from optax_ortho import testing
    >>> testing.assert_pseudo_polar(np.diag([2.0, 0.5]), np.eye(2))
  """
  np.testing.assert_allclose(np.asarray(q, np.float64), polar_reference(a),
                             atol=atol)


# ------------------------------------------------------------ fault injection

# Non-finite values a gradient picks up on an fp16/bf16 overflow or a 0/0.
NONFINITE: tuple[float, ...] = (float("inf"), float("-inf"), float("nan"))


def fault_positions(shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
  """Where to put a non-finite entry in a matrix (or a stack of them).

  The first entry ``[0, 0]`` (an ``Inf`` in the first row makes jaxlib's CPU
  SVD spin forever), the end of the first row, the start of the last row, the
  last entry and the middle; leading axes are indexed 0. Duplicates (small
  shapes) are dropped.

  Example:
    >>> from optax_ortho import testing
    >>> testing.fault_positions((3, 2))
    ((0, 0), (0, 1), (2, 0), (2, 1), (1, 1))
  """
  m, n = shape[-2:]
  lead = (0,) * (len(shape) - 2)
  spots = ((0, 0), (0, n - 1), (m - 1, 0), (m - 1, n - 1), (m // 2, n // 2))
  return tuple(dict.fromkeys(lead + s for s in spots))


def with_fault(a: Any, position: tuple[int, ...], value: float) -> np.ndarray:
  """A copy of `a` (as NumPy) with `value` written at `position`.

  Example:
    >>> import numpy as np
    >>> from optax_ortho import testing
    >>> testing.with_fault(np.zeros((2, 2), np.float32), (0, 0), np.inf)[0]
    array([inf,  0.], dtype=float32)
  """
  out = np.array(a, copy=True)
  out[position] = value
  return out


@st.composite
def faulty_stacks(
    draw: st.DrawFn,
    *,
    min_side: int = 1,
    max_side: int = 6,
    max_batch: int = 3,
    first_row: bool | None = None,
    shape: tuple[int, int, int] | None = None,
    dtype: Any = np.float32,
) -> tuple[np.ndarray, int]:
  """A ``(k, m, n)`` stack with one non-finite entry, and the bad matrix's index.

  Args:
    draw: supplied by hypothesis.
    min_side: smallest number of rows or columns.
    max_side: largest number of rows or columns.
    max_batch: largest number of matrices ``k``.
    first_row: True: the bad entry is in the first row (the CPU SVD hang);
      False: elsewhere if there is another row; None: anywhere.
    shape: a fixed ``(k, m, n)`` instead of drawn sides and batch (one
      compilation for a jitted function under test).
    dtype: NumPy dtype of the result.

  Example:
    >>> import numpy as np
    >>> from hypothesis import given
    >>> from optax_ortho import testing
    >>> @given(testing.faulty_stacks())
    ... def check(case):
    ...   stack, bad = case
    ...   assert not np.isfinite(stack[bad]).all()
    >>> check()
  """
  if shape is None:
    m = draw(st.integers(min_side, max_side))
    n = draw(st.integers(min_side, max_side))
    k = draw(st.integers(1, max_batch))
  else:
    k, m, n = shape
  seed = draw(st.integers(0, 2**32 - 1))
  stack = np.random.default_rng(seed).standard_normal((k, m, n)).astype(dtype)
  bad = draw(st.integers(0, k - 1))
  if first_row is None:
    row = draw(st.integers(0, m - 1))
  elif first_row or m == 1:
    row = 0
  else:
    row = draw(st.integers(1, m - 1))
  col = draw(st.integers(0, n - 1))
  stack[bad, row, col] = draw(st.sampled_from(NONFINITE))
  return stack, bad
