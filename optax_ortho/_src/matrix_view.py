"""How a gradient leaf is viewed as a stack of matrices, and put back.

The view follows `optax.contrib.MuonDimensionNumbers`: the reduction axes become
the rows, the output axes the columns, every other axis a batch of matrices.
Under a mesh with `AxisType.Explicit` axes a reshape that merges a sharded axis
needs its output sharding spelled out, so a leaf is first made replicated and
its sharding restored at the end (docs/architecture.md, "Platform hazards").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple
from typing import TypeAlias

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
from optax.contrib import MuonDimensionNumbers

DimNums: TypeAlias = MuonDimensionNumbers | None


def default_dimension_numbers(x: jax.Array) -> DimNums:
  """Last axis = components (Flax kernels), all others = reduction; < 2-D: skip."""
  if x.ndim < 2:
    return None
  return MuonDimensionNumbers(
      reduction_axis=tuple(range(x.ndim - 1)), output_axis=x.ndim - 1
  )


def _is_dim_leaf(x: Any) -> bool:
  return x is None or isinstance(x, MuonDimensionNumbers)


def _axes(axes: Sequence[int] | int, ndim: int, what: str, path: str) -> tuple[int, ...]:
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  for ax in axes:
    if not -ndim <= ax < ndim:
      raise ValueError(
          f"dimension_numbers at {path}: {what} {ax} is out of range for a"
          f" leaf of ndim {ndim}."
      )
  return tuple(ax % ndim for ax in axes)


def resolve_dimension_numbers(
    updates: Any,
    dimension_numbers: Any | Callable[[Any], Any] | None,
) -> list[DimNums]:
  """One `MuonDimensionNumbers` (or None = pass through) per leaf of `updates`."""
  leaves_with_path = jax.tree_util.tree_flatten_with_path(updates)[0]
  if dimension_numbers is None:
    return [default_dimension_numbers(x) for _, x in leaves_with_path]
  if callable(dimension_numbers) and not _is_dim_leaf(dimension_numbers):
    dimension_numbers = dimension_numbers(updates)
  if _is_dim_leaf(dimension_numbers):
    dims = [dimension_numbers] * len(leaves_with_path)
  else:
    dim_leaves = jax.tree_util.tree_flatten_with_path(
        dimension_numbers, is_leaf=_is_dim_leaf
    )[0]
    upd_paths = [p for p, _ in leaves_with_path]
    dim_paths = [p for p, _ in dim_leaves]
    if upd_paths != dim_paths:
      for i in range(max(len(upd_paths), len(dim_paths))):
        a = upd_paths[i] if i < len(upd_paths) else None
        b = dim_paths[i] if i < len(dim_paths) else None
        if a != b:
          first = a if a is not None else b
          assert first is not None  # i < max(len) so one of them exists
          where = jax.tree_util.keystr(first)
          raise ValueError(
              "dimension_numbers does not match the structure of the"
              f" gradients: first difference at leaf {where} (gradients have"
              f" {'no such leaf' if a is None else jax.tree_util.keystr(a)},"
              " dimension_numbers have"
              f" {'no such leaf' if b is None else jax.tree_util.keystr(b)})."
          )
    dims = [d for _, d in dim_leaves]
    for d in dims:
      if not _is_dim_leaf(d):
        raise TypeError(
            "dimension_numbers leaves must be MuonDimensionNumbers or None,"
            f" got {d!r}."
        )
  for (path, x), d in zip(leaves_with_path, dims):
    if not isinstance(d, MuonDimensionNumbers):
      continue
    where = jax.tree_util.keystr(path)
    if x.ndim < 2:
      raise ValueError(
          f"dimension_numbers at {where}: a leaf of shape {x.shape} has no"
          " matrix view; use None to pass it through."
      )
    red = _axes(d.reduction_axis, x.ndim, "reduction_axis", where)
    out = _axes(d.output_axis, x.ndim, "output_axis", where)
    if set(red) & set(out) or not red or not out:
      raise ValueError(
          f"dimension_numbers at {where}: reduction_axis {red} and output_axis"
          f" {out} must be non-empty and disjoint."
      )
  return dims


class MatrixView(NamedTuple):
  """Static recipe to turn one leaf into a (k, rows, cols) stack with rows >= cols."""

  perm: tuple[int, ...]
  inv_perm: tuple[int, ...]
  permuted_shape: tuple[int, ...]
  batch: int
  reduction: int
  output: int

  @property
  def transposed(self) -> bool:
    return self.reduction < self.output

  @property
  def rows(self) -> int:
    return max(self.reduction, self.output)

  @property
  def cols(self) -> int:
    return min(self.reduction, self.output)


def matrix_view(x: jax.Array, d: MuonDimensionNumbers) -> MatrixView:
  red = _axes(d.reduction_axis, x.ndim, "reduction_axis", "")
  out = _axes(d.output_axis, x.ndim, "output_axis", "")
  batch_axes = tuple(a for a in range(x.ndim) if a not in red and a not in out)
  perm = batch_axes + red + out
  inv_perm = tuple(sorted(range(x.ndim), key=perm.__getitem__))
  permuted_shape = tuple(x.shape[a] for a in perm)
  p = math.prod(x.shape[a] for a in red)
  n = math.prod(x.shape[a] for a in out)
  b = math.prod(x.shape[a] for a in batch_axes)
  return MatrixView(perm, inv_perm, permuted_shape, b, p, n)


def _explicit_sharding(x: jax.Array) -> NamedSharding | None:
  """The leaf's sharding when it is sharded over Explicit mesh axes.

  The sharding carries its own mesh, so resharding to it (or to the same mesh
  with another spec) works without a `jax.set_mesh` context: the common way
  to shard is `jax.device_put(x, NamedSharding(mesh, spec))` and a bare
  `jax.jit`, where a bare `PartitionSpec` would be refused.
  """
  sharding = jax.typeof(x).sharding
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or mesh.empty:
    return None
  explicit = {
      name
      for name, kind in zip(mesh.axis_names, mesh.axis_types)
      if kind == AxisType.Explicit
  }
  spec = sharding.spec
  used: set[str] = set()
  for entry in spec:
    if entry is None:
      continue
    used.update((entry,) if isinstance(entry, str) else entry)
  return sharding if used & explicit else None


def to_stack(x: jax.Array, view: MatrixView, dtype) -> jax.Array:
  sharding = _explicit_sharding(x)
  if sharding is not None:
    x = jax.sharding.reshard(x, NamedSharding(sharding.mesh, PartitionSpec()))
  m = x.transpose(view.perm).astype(dtype)
  m = m.reshape((view.batch, view.reduction, view.output))
  return jnp.swapaxes(m, -1, -2) if view.transposed else m


def from_stack(q: jax.Array, view: MatrixView, like: jax.Array) -> jax.Array:
  if view.transposed:
    q = jnp.swapaxes(q, -1, -2)
  out = q.reshape(view.permuted_shape).transpose(view.inv_perm).astype(like.dtype)
  sharding = _explicit_sharding(like)
  if sharding is not None:
    out = jax.sharding.reshard(out, sharding)
  return out
