"""Layer-parallel polar factors: each matrix decomposed once, on one device.

In the replicated mode every device computes every polar factor. Here the
matrices of all groups (``(k, m, n)`` stacks of same-shaped gradient
matrices) are scheduled onto the devices of the mesh at trace time, largest
first onto the least loaded device (LPT), weighted by the cost of a thin
SVD. Inside one ``jax.shard_map`` each device runs the branch of a
``lax.switch`` that decomposes only its own matrices; the results come back
to every device by an all-gather of per-device blocks (groups spread over
the mesh) or a psum of zero-filled stacks (groups smaller than the mesh),
and the caller restores each leaf's sharding. This is the "assign whole
matrices to devices" scheme of distributed Muon and Dion, with the groups
balanced against each other: a model whose groups each hold one matrix
still spreads over the devices, and no device decomposes padding.

Only jax's sharding API and collectives move data: ``jax.sharding.reshard``
on meshes with Explicit axes, ``jax.lax.with_sharding_constraint`` on Auto
ones, and ``all_gather`` / ``psum`` in a ``jax.shard_map``. Every slot of a
psum is written by exactly one device and is zero on the others, so the sum
is exact and a NaN stays in its matrix.
"""

from __future__ import annotations

import functools
import heapq
import math
from collections.abc import Sequence
from typing import Literal
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from optax_ortho._src import polar as polar_lib

Parallel = Literal["replicated", "layers"]
PARALLEL_MODES: tuple[str, ...] = ("replicated", "layers")

Mesh = jax.sharding.Mesh | jax.sharding.AbstractMesh


def check_parallel(parallel: str, mesh: Mesh | None) -> None:
  if parallel not in PARALLEL_MODES:
    raise ValueError(
        f"parallel={parallel!r} is not a parallel mode; expected one of"
        f" {PARALLEL_MODES}."
    )
  if mesh is not None and not isinstance(
      mesh, (jax.sharding.Mesh, jax.sharding.AbstractMesh)
  ):
    raise TypeError(
        "mesh must be a jax.sharding.Mesh, a jax.sharding.AbstractMesh or"
        f" None, got {mesh!r} of type {type(mesh).__name__}."
    )


def _mesh_of(leaves: Sequence[jax.Array], mesh: Mesh | None) -> Mesh | None:
  """The mesh to spread over: given, set by `jax.set_mesh`, or the leaves'."""
  if mesh is not None:
    return mesh
  context = jax.sharding.get_abstract_mesh()
  if not context.empty:
    return context
  for x in leaves:
    found = getattr(jax.typeof(x).sharding, "mesh", None)
    if found is not None and not found.empty:
      return found
  return None


def _free_axes(mesh: Mesh) -> tuple[str, ...]:
  # Axes already Manual (inside a user's shard_map) cannot be split again.
  return tuple(
      name
      for name, kind in zip(mesh.axis_names, mesh.axis_types)
      if kind != AxisType.Manual
  )


def spread_devices(leaves: Sequence[jax.Array], mesh: Mesh | None) -> int:
  """How many devices `polar_groups` spreads these matrices over; 1 means
  the replicated computation."""
  mesh = _mesh_of(leaves, mesh)
  if mesh is None:
    return 1
  return math.prod(mesh.shape[a] for a in _free_axes(mesh))


def _constrain(x: jax.Array, mesh: Mesh, spec: PartitionSpec) -> jax.Array:
  if any(kind == AxisType.Explicit for kind in mesh.axis_types):
    return jax.sharding.reshard(x, NamedSharding(mesh, spec))
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def matrix_cost(m: int, n: int) -> int:
  """Textbook flops of a thin SVD of an m x n matrix, m >= n: the LPT weight."""
  return 6 * m * n * n + 20 * n**3


def schedule(
    shapes: Sequence[tuple[int, int, int]], devices: int
) -> list[dict[int, tuple[int, ...]]]:
  """Assigns every matrix of the ``(k, m, n)`` groups to one device.

  Longest processing time first: matrices in decreasing cost, each onto the
  device with the least work so far (ties to the lower index). Within a
  group of ``k`` equal matrices this is round robin, ``ceil(k / D)`` at
  most per device; across groups the loads stay within one matrix of even.

  Returns, per device, ``{group: indices}`` of the matrices it decomposes.
  """
  items = sorted(
      ((g, i) for g, (k, _, _) in enumerate(shapes) for i in range(k)),
      key=lambda gi: -matrix_cost(*shapes[gi[0]][1:]),
  )
  loads = [(0, d) for d in range(devices)]
  heapq.heapify(loads)
  owned: list[dict[int, list[int]]] = [{} for _ in range(devices)]
  for g, i in items:
    load, d = heapq.heappop(loads)
    owned[d].setdefault(g, []).append(i)
    heapq.heappush(loads, (load + matrix_cost(*shapes[g][1:]), d))
  return [{g: tuple(sorted(i)) for g, i in sorted(o.items())} for o in owned]


class _Flagged(NamedTuple):
  """A stack with its `"auto"` route flags, which travel with their matrices.

  The flags go as int32: the collectives that bring results back (psum)
  do not take bools.
  """

  a: jax.Array
  use_gram: jax.Array


def _polar(a: jax.Array | _Flagged, method: str, eps: float | None,
           ns_steps: int) -> jax.Array | _Flagged:
  if isinstance(a, _Flagged):
    q, f = polar_lib.auto_polar_stack(a.a, a.use_gram.astype(bool), eps)
    return _Flagged(q, f.astype(jnp.int32))
  return polar_lib.polar_stack(a, method, eps=eps, ns_steps=ns_steps)


def polar_groups(
    stacks: Sequence[jax.Array],
    method: str,
    *,
    eps: float | None,
    ns_steps: int,
    mesh: Mesh | None = None,
    use_gram: Sequence[jax.Array] | None = None,
) -> tuple[list[jax.Array], list[jax.Array] | None]:
  """Polar factors of float32 stacks ``(k, m, n)``, m >= n, spread over a mesh.

  Returns replicated stacks of the input shapes (and, with `use_gram`, the
  next route flags of `"auto"`). With no mesh, or a mesh of one device, this
  is exactly the replicated computation.

  Args:
    stacks: one stack per group of same-shaped matrices.
    method: a polar method of :func:`optax_ortho.polar`.
    eps: relative singular-value cutoff (None: the default).
    ns_steps: iterations of the iterative methods.
    mesh: the mesh to spread over; None: the mesh set by ``jax.set_mesh``, or
      else the mesh of the stacks' Explicit sharding.
    use_gram: for `"auto"`, the route flags ``(k,)`` of each stack
      (`polar_lib.auto_polar_stack`); they travel with their matrices.
  """
  items: list = list(stacks)
  if use_gram is not None:
    items = [_Flagged(a, f.astype(jnp.int32)) for a, f in zip(stacks, use_gram)]
  polar = functools.partial(_polar, method=method, eps=eps, ns_steps=ns_steps)
  devices = spread_devices(stacks, mesh)
  mesh = _mesh_of(stacks, mesh)
  if devices == 1 or not items or mesh is None:
    return _unpack([polar(a) for a in items])
  return _unpack(_spread(items, polar, mesh, devices))


def _unpack(outs: list) -> tuple[list[jax.Array], list[jax.Array] | None]:
  if outs and isinstance(outs[0], _Flagged):
    return [o.a for o in outs], [o.use_gram.astype(bool) for o in outs]
  return outs, None


def _spread(stacks: list, polar, mesh: Mesh, devices: int) -> list:
  """`polar` of every stack, each matrix on the device `schedule` gives it,
  in one `shard_map`; the results replicated on every device."""
  tmap = jax.tree.map
  axes = _free_axes(mesh)

  def rows_of(a):
    return jax.tree.leaves(a)[0].shape[0]

  plan = schedule([jax.tree.leaves(a)[0].shape for a in stacks], devices)
  # How each group's results travel back. A device's block holds the most
  # matrices any device got of that group; all-gathering the blocks moves
  # about the group's bytes when it spreads evenly. A group with fewer
  # matrices than devices would gather mostly padding: there a psum of
  # zero-filled stacks (each slot written by one device) moves fewer bytes.
  block = [max(len(own.get(g, ())) for own in plan)
           for g in range(len(stacks))]
  gathered = [devices * b < 2 * rows_of(a) for b, a in zip(block, stacks)]

  def make_branch(own):
    def branch(full):
      out = []
      for g, a in enumerate(full):
        rows = np.asarray(own.get(g, ()), np.int32)
        if gathered[g]:
          buf = tmap(lambda x, g=g: jnp.zeros((block[g],) + x.shape[1:],
                                              x.dtype), a)
          if rows.size:
            buf = tmap(lambda b, q, r=rows: b.at[: r.size].set(q), buf,
                       polar(tmap(lambda x, r=rows: x[r], a)))
        elif rows.size == rows_of(a):  # this device holds the whole group
          buf = polar(a)
        else:
          buf = tmap(jnp.zeros_like, a)
          if rows.size:
            buf = tmap(lambda b, q, r=rows: b.at[r].set(q), buf,
                       polar(tmap(lambda x, r=rows: x[r], a)))
        out.append(buf)
      return out

    return branch

  # Devices with the same work (e.g. the idle ones) share one branch.
  branches_of: dict[tuple, int] = {}
  for own in plan:
    branches_of.setdefault(tuple(own.items()), len(branches_of))
  branch_table = np.array([branches_of[tuple(o.items())] for o in plan])
  branches = [make_branch(dict(own)) for own in branches_of]

  # Row of matrix i of a gathered group in the all-gather: device d's block
  # starts at d * block.
  where = [np.zeros(rows_of(a), np.int32) for a in stacks]
  for d, own in enumerate(plan):
    for g, idx in own.items():
      where[g][list(idx)] = d * block[g] + np.arange(len(idx))

  def own_matrices(full):
    # Every device holds every (replicated) stack and selects its matrices
    # locally: the only communication is bringing the results back.
    me = jnp.asarray(branch_table)[jax.lax.axis_index(axes)]
    if len(branches) > 1:
      out = jax.lax.switch(me, branches, full)
    else:
      out = branches[0](full)
    return [
        tmap(lambda q, g=g: jax.lax.all_gather(
            q, axes, tiled=True, to="invarying")[where[g]], q)
        if gathered[g] else tmap(lambda q: jax.lax.psum(q, axes), q)
        for g, q in enumerate(out)
    ]

  replicated = tmap(lambda a: _constrain(a, mesh, PartitionSpec()), stacks)
  specs = tmap(lambda _: PartitionSpec(), stacks)
  return jax.shard_map(
      own_matrices,
      mesh=mesh,
      in_specs=(specs,),
      out_specs=specs,
      axis_names=frozenset(axes),
  )(replicated)
