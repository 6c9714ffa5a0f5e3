"""Input checks shared by every public entry point, and the guard in front of LAPACK.

The rule (docs/reliability.md): bad input fails at trace time with a ValueError or
TypeError that names the argument or the leaf's key path, what was expected and
what was given; inside jit nothing raises, and a non-finite matrix never reaches
a LAPACK call (jaxlib's CPU SVD spins forever on an Inf in the first row).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def is_traced_or_schedule(value: Any) -> bool:
  """A schedule, or a value injected by `optax.inject_hyperparams`: not checked."""
  return callable(value) or isinstance(value, (jax.Array, jax.core.Tracer))


def hyperparam(
    value: Any,
    name: str,
    accepted: str,
    ok: Callable[[float], bool],
    *,
    schedule: bool = True,
) -> None:
  """Validates a Python-number hyperparameter; schedules and arrays pass.

  Args:
    value: the hyperparameter as the user gave it.
    name: its argument name, for the message.
    accepted: the accepted range in words, e.g. ``"in [0, 1)"``.
    ok: predicate on ``float(value)``; NaN and Inf are rejected before it.
    schedule: whether an optax schedule (a callable) is accepted.
  """
  if schedule and is_traced_or_schedule(value):
    return
  if isinstance(value, (jax.Array, jax.core.Tracer)):
    return
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    kinds = "a float or an optax schedule" if schedule else "a float"
    raise TypeError(
        f"{name} must be {kinds} {accepted}, got {value!r} of type"
        f" {type(value).__name__}."
    )
  if not math.isfinite(float(value)) or not ok(float(value)):
    raise ValueError(f"{name} must be {accepted}, got {value!r}.")


def positive_int(value: Any, name: str, *, static_arg: bool = False) -> None:
  """Raises unless `value` is a Python int >= 1 (a bool is not an int here).

  Args:
    value: the argument as the user gave it.
    name: its argument name, for the message.
    static_arg: whether the message should say how to pass it through
      `optax.inject_hyperparams` (as a static argument): for arguments that
      fix shapes or loop counts.
  """
  if isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) >= 1:
    return
  hint = ""
  if static_arg:
    hint = (f" With optax.inject_hyperparams, pass it as a static argument:"
            f" static_args=({name!r},).")
  raise ValueError(f"{name} must be a positive Python int, got {value!r}.{hint}")


def boolean(value: Any, name: str) -> None:
  if not isinstance(value, bool):
    raise TypeError(f"{name} must be a bool (True or False), got {value!r}.")


def float_leaves(tree: Any, name: str) -> None:
  """Every leaf of `tree` has a real floating dtype."""
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
          f"{name}{jax.tree_util.keystr(path)} must have a real floating dtype"
          f" (float32, bfloat16, float16, float64), got {dtype}."
      )


def trees_match(tree: Any, ref: Any, name: str, ref_name: str, *, shapes: bool = True) -> None:
  """Raises ValueError naming the first leaf where `tree` differs from `ref`.

  Checks the structure (key paths and container types, so a tuple given for a
  list is caught) and, with ``shapes=True``, every leaf's shape.
  """
  a = jax.tree_util.tree_flatten_with_path(ref)[0]
  b = jax.tree_util.tree_flatten_with_path(tree)[0]
  for i in range(max(len(a), len(b))):
    pa = jax.tree_util.keystr(a[i][0]) if i < len(a) else None
    pb = jax.tree_util.keystr(b[i][0]) if i < len(b) else None
    if pa != pb:
      raise ValueError(
          f"{name} must have the structure of {ref_name}: first difference at"
          f" leaf {pa if pa is not None else pb}: {ref_name} has"
          f" {pa if pa is not None else 'no further leaf'}, {name} has"
          f" {pb if pb is not None else 'no further leaf'}."
      )
    if shapes and jnp.shape(a[i][1]) != jnp.shape(b[i][1]):
      raise ValueError(
          f"{name}{pa} has shape {jnp.shape(b[i][1])}, but {ref_name}{pa} has"
          f" shape {jnp.shape(a[i][1])}; they must be equal."
      )
  if not same_structure(ref, tree):
    where = _first_container_difference(tree, ref, [p for p, _ in a])
    raise ValueError(
        f"{name} must have the pytree structure of {ref_name}"
        f" {jax.tree.structure(ref)} (same container types), got"
        f" {jax.tree.structure(tree)}.{where}"
    )


def _child(node: Any, key: Any) -> Any:
  if isinstance(key, jax.tree_util.DictKey):
    return node[key.key]
  if isinstance(key, jax.tree_util.SequenceKey):
    return node[key.idx]
  if isinstance(key, jax.tree_util.GetAttrKey):
    return getattr(node, key.name)
  raise KeyError(key)


def _first_container_difference(tree: Any, ref: Any, paths: list) -> str:
  """' At <path>: ... is a tuple, ... a list.' for the first container that differs."""
  for path in paths:
    x, y = tree, ref
    for depth in range(len(path) + 1):
      if type(x) is not type(y):
        return (f" At {jax.tree_util.keystr(tuple(path[:depth])) or 'the root'}:"
                f" {type(y).__name__} expected, got {type(x).__name__}.")
      if depth == len(path):
        break
      try:
        x, y = _child(x, path[depth]), _child(y, path[depth])
      except (KeyError, IndexError, AttributeError, TypeError):
        break
  return ""


def same_structure(a: Any, b: Any) -> bool:
  """Whether two pytrees have the same treedef (container types included)."""
  # jax's stubs give PyTreeDef no comparison operators; the runtime has them.
  treedef: Any = jax.tree.structure(a)
  return bool(treedef == jax.tree.structure(b))


def finite_matrices(a: jax.Array) -> jax.Array:
  """Boolean of shape ``a.shape[:-2]``: whether each matrix is all finite."""
  return jnp.all(jnp.isfinite(a), axis=(-2, -1))


def lapack_input(a: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Zeros in place of every non-finite matrix of a stack, and the mask of good ones.

  Call it on whatever is about to reach a LAPACK kernel, and `poison` the
  result with the mask: the bad matrices come out NaN, the others untouched.
  """
  ok = finite_matrices(a)
  return jnp.where(ok[..., None, None], a, jnp.zeros((), a.dtype)), ok


def poison(out: jax.Array, ok: jax.Array) -> jax.Array:
  """NaN in every matrix of `out` whose input was not finite (`ok` False)."""
  ok = ok.reshape(ok.shape + (1,) * (out.ndim - ok.ndim))
  return jnp.where(ok, out, jnp.full((), jnp.nan, out.dtype))


# Matrices per unrolled block of `lapack_map`: enough for every core of a
# large host, few enough that a stack of hundreds compiles in seconds.
_LAPACK_UNROLL = 16
# Below this size (m n min(m, n), a multiple of one call's flops) a call
# takes microseconds, running calls concurrently gains nothing, and every
# unrolled call costs XLA:CPU about as much compile time as a big one: a
# long stack of such matrices is a loop with one call in its body.
_CONCURRENT_MIN_SIZE = 16**3


def lapack_map(fn: Callable, xs: Any) -> Any:
  """`fn` over the leading axis of `xs`, one unbatched LAPACK call per matrix.

  The CPU form of a per-matrix solver call (docs/architecture.md, "Platform
  hazards": jaxlib 0.10.2's batched CPU LAPACK kernels hung on 2 cores;
  unbatched calls never did, also 40 at once in 320 runs, nor in a loop). A
  stack of at most `_LAPACK_UNROLL` matrices is unrolled, so that XLA:CPU
  runs independent calls concurrently on its intra-op threads, where a
  `jax.lax.map` loop runs one at a time and jaxlib calls LAPACK with one
  BLAS thread each (four 512x512 SVDs took 0.56-0.63x the loop's time, eight
  `eigh`s 0.74x, on 2 cores). A longer stack is a loop over blocks of
  `_LAPACK_UNROLL` calls, or of one call for small matrices, so that a
  program's compile time does not grow with its number of matrices. Calls
  behind a runtime `cond` still run one at a time (see
  `polar.cpu._masked_map`).
  """
  first = jax.tree_util.tree_leaves(xs)[0]
  k = first.shape[0]
  if k == 1:  # a scan of length 1 still lowers to a loop
    out = fn(jax.tree.map(lambda x: x[0], xs))
    return jax.tree.map(lambda y: y[None], out)
  m, n = first.shape[-2:]
  small = m * n * min(m, n) < _CONCURRENT_MIN_SIZE
  unroll = k if k <= _LAPACK_UNROLL else (1 if small else _LAPACK_UNROLL)
  return jax.lax.scan(lambda carry, x: (carry, fn(x)), None, xs, unroll=unroll)[1]


def per_matrix(fn: Callable, x: Any) -> Any:
  """Applies a LAPACK-calling `fn` to each matrix of a (k, m, n) stack (or a
  tuple of stacks), with the lowering chosen per platform.

  On CPU one unbatched call per matrix (`lapack_map`, the hang workaround);
  elsewhere batched (`jax.vmap`: one solver call for the whole stack, no
  loop). The branch is resolved when the program is lowered for its
  platform, so a CPU program never holds the batched call.
  """
  return jax.lax.platform_dependent(
      x, cpu=lambda x: lapack_map(fn, x), default=jax.vmap(fn))
