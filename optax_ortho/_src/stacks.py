"""Stacks of matrices: the products, transposes and groupings every solver shares.

A pytree of gradient or parameter leaves is handled as stacks of same-shaped
matrices (k, m, n): `group_matrices` finds the groups, `stack_parts` and
`split_stack` join and cut them. Products run at HIGHEST precision because
orthogonality is checked to float32 rounding (TPUs default to bfloat16 passes).
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from optax_ortho._src import matrix_view as mv

HIGHEST = jax.lax.Precision.HIGHEST


def mT(x: jax.Array) -> jax.Array:  # noqa: N802 (numpy's name for it)
  """The transpose of each matrix of a stack (the last two axes swapped)."""
  return jnp.swapaxes(x, -1, -2)


def mm(a: jax.Array, b: jax.Array) -> jax.Array:
  """`a @ b` at HIGHEST precision."""
  if a.ndim == b.ndim == 3 and a.shape[0] == b.shape[0] == 1:
    # A stack of one as a plain matrix product: XLA:CPU rewrites a batched
    # product of batch one into loops it compiles anew for every shape (tens
    # of milliseconds each), where a matrix product is a library call.
    return jnp.matmul(a[0], b[0], precision=HIGHEST)[None]
  return jnp.matmul(a, b, precision=HIGHEST)


def stack_parts(parts: Sequence[jax.Array]) -> jax.Array:
  """The parts (b_i, ...) as one stack: `split_stack`'s inverse."""
  return jnp.concatenate(list(parts)) if len(parts) > 1 else parts[0]


def split_stack(x: jax.Array, sizes: Sequence[int]) -> list[jax.Array]:
  """The stack `x` cut along its first axis into parts of these sizes."""
  if len(sizes) == 1:
    return [x]
  return jnp.split(x, list(itertools.accumulate(sizes))[:-1])


def group_matrices(
    leaves: Sequence[jax.Array], dims: Sequence[Any]
) -> tuple[dict[tuple[int, int, Any], list[int]], dict[int, mv.MatrixView]]:
  """Leaves grouped by matrix shape: ({(rows, cols, compute dtype): indices}, views).

  `dims[i]` is leaf i's `MuonDimensionNumbers`; a leaf whose dims are None, or
  that is empty, is in no group. The compute dtype is the leaf's, at least
  float32.
  """
  views: dict[int, mv.MatrixView] = {}
  groups: dict[tuple[int, int, Any], list[int]] = collections.defaultdict(list)
  for i, (x, d) in enumerate(zip(leaves, dims)):
    if d is None or x.size == 0:
      continue
    views[i] = mv.matrix_view(x, d)
    compute = jnp.promote_types(x.dtype, jnp.float32)
    groups[(views[i].rows, views[i].cols, compute)].append(i)
  return groups, views


def gram(a: jax.Array) -> jax.Array:
  """The Gram matrix a^T a of each matrix of a stack."""
  return mm(mT(a), a)
