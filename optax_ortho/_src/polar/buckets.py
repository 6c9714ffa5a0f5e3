"""Narrow matrices of many distinct shapes as a few zero-padded stacks.

XLA compiles a kernel (and XLA:CPU a solver call site) for every op of a
distinct shape, and jax traces every route once per shape: a model of a
hundred distinct layer shapes would compile a hundred Gram iterations and
SVD fallbacks. Float32 matrices of at most `ITER_MAX_N` columns are
therefore grouped by width, rounded up to a power of two from `MIN_WIDTH`
once there are more than `MAX_WIDTHS` distinct ones, and within a width by
rows, rounded up to a power of two (`rows_bucket`), and each such bucket is
zero-padded into one stack (`bucket`) and cut back after (`unbucket`).

Zero rows change neither the Gram matrix nor the singular values, and leave
the factor's other rows as they are. Zero columns add zero singular values:
the SVD drops them by its cutoff (`exact.svd_route_padded`), and the Gram
routes fill them with an identity block (`identity_padding`): functions of a
block-diagonal matrix are block-diagonal, so each matrix's own block of the
result is its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_ortho._src.polar import exact
from optax_ortho._src.polar.guard import Factors
from optax_ortho._src.polar.iterations import ITER_MAX_N
from optax_ortho._src.stacks import split_stack
from optax_ortho._src.stacks import stack_parts

# With few distinct narrow widths each keeps its own (the padding costs flops:
# up to 8x in an n^3 step at twice the width).
MAX_WIDTHS = 4
MIN_WIDTH = 8
# Where fewer stacks matter more than the padding's flops (the SVD fallback
# on CPU, every route on GPU/TPU), the matrices of one width and at most this
# many rows share one stack: a stack's route costs XLA:CPU about a quarter of
# a second of compile time, and a padded factor of so few rows stays within
# a millisecond or two. Taller ones keep a stack per power of two of rows,
# so that an embedding table pads no other matrix to its length.
SHARED_ROWS = 512

Groups = list[list[jax.Array]]


def narrow_widths(groups: Groups) -> tuple[dict[int, list[int]], bool]:
  """The narrow float32 groups' indices by width, and whether the widths are
  padded (more than `MAX_WIDTHS` distinct ones)."""
  narrow = [i for i, parts in enumerate(groups)
            if parts[0].shape[-1] <= ITER_MAX_N and parts[0].dtype == jnp.float32]
  padded = len({groups[i][0].shape[-1] for i in narrow}) > MAX_WIDTHS
  widths: dict[int, list[int]] = {}
  for i in narrow:
    n = groups[i][0].shape[-1]
    widths.setdefault(max(MIN_WIDTH, 1 << (n - 1).bit_length()) if padded else n,
                      []).append(i)
  return widths, padded


def rows_bucket(rows: int, shared: int = 1) -> int:
  """`rows` rounded up to a power of two, and to at least `shared`."""
  return max(shared, 1 << (rows - 1).bit_length())


def by_rows(keys: Sequence[int], rows: Sequence[int], shared: int = 1) -> list[list[int]]:
  """`keys` grouped by `rows_bucket` of their `rows`."""
  out: dict[int, list[int]] = {}
  for key, r in zip(keys, rows):
    out.setdefault(rows_bucket(r, shared), []).append(key)
  return list(out.values())


class Bucket(NamedTuple):
  """Groups of one width whose rows round up to the same power of two,
  zero-padded to (the most rows among them, the width) and stacked."""

  stack: jax.Array  # (k, rows, width)
  use_gram: jax.Array  # (k,) the flags
  cutoff: jax.Array  # (k,) each matrix's relative SVD cutoff, for its own shape
  cols: np.ndarray  # (k,) each matrix's own number of columns


def bucket(groups: Groups, use_gram: list[jax.Array], eps: list[float],
           width: int) -> Bucket:
  rows = max(parts[0].shape[-2] for parts in groups)
  parts = [x for grp in groups for x in grp]
  stack = stack_parts([
      jnp.pad(x, ((0, 0), (0, rows - x.shape[-2]), (0, width - x.shape[-1])))
      if x.shape[-2:] != (rows, width) else x for x in parts])
  cutoff = jnp.concatenate([
      jnp.full(x.shape[:1], exact.svd_cutoff(x.shape[-2], x.shape[-1], x.dtype, e), x.dtype)
      for grp, e in zip(groups, eps) for x in grp])
  cols = np.concatenate([np.full(x.shape[0], x.shape[-1], np.int32) for x in parts])
  return Bucket(stack, jnp.concatenate(use_gram), cutoff, cols)


def of_width(groups: Groups, use_gram: list[jax.Array], eps: list[float], idx: list[int],
             shared: int = 1) -> tuple[list[list[int]], list[Bucket]]:
  """The groups `idx` of one (padded) width as buckets by rows (`by_rows`):
  each bucket's group indices, and the bucket."""
  width = max(groups[i][0].shape[-1] for i in idx)
  members = by_rows(idx, [groups[i][0].shape[-2] for i in idx], shared)
  return members, [bucket([groups[i] for i in b], [use_gram[i] for i in b],
                          [eps[i] for i in b], width) for b in members]


def unbucket(found: Factors, groups: Groups) -> list[Factors]:
  """`found` on a bucket's stack, cut back into the groups' parts."""
  parts = [x for grp in groups for x in grp]
  q = iter(split_stack(found.q, [x.shape[0] for x in parts]))
  oks = split_stack(found.use_gram, [sum(x.shape[0] for x in grp) for grp in groups])
  return [Factors([next(q)[:, :x.shape[-2], :x.shape[-1]] for x in grp], ok)
          for grp, ok in zip(groups, oks)]


def identity_padding(cols: np.ndarray, width: int, dtype) -> jax.Array | None:
  """(k, width, width): ones on the diagonal past each matrix's own `cols`
  columns, zeros elsewhere; None when no matrix is padded."""
  padding = np.arange(width) >= cols[:, None]  # (k, width)
  if not padding.any():
    return None
  return jnp.eye(width, dtype=dtype) * jnp.asarray(padding, dtype)[:, None, :]
