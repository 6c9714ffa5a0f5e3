"""Task and regulariser gradients from one forward pass (for GrOD)."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

try:  # A symbolic zero cotangent lets the backward pass skip dead branches.
  from jax.interpreters import ad as _ad

  _Zero: Any = _ad.Zero
except (ImportError, AttributeError):  # pragma: no cover - depends on jax
  _Zero = None


def _zero_cotangent(x: jax.Array):
  """A symbolic zero cotangent for `x`, or a dense one if jax has none.

  With an instantiated zero the pullback would run the task's whole backward
  pass again just to multiply it by zero (XLA does not fold `x * 0` for
  floats); a symbolic zero lets `jax.vjp` skip it, so the regulariser's
  gradient costs only the backward pass of the regulariser.
  """
  if _Zero is not None:
    try:
      return _Zero(jax.typeof(x).to_ct_aval())
    except AttributeError:  # pragma: no cover - depends on jax
      pass
  return jnp.zeros_like(x)


def _is_scalar_pair(x: Any) -> bool:
  return (isinstance(x, (tuple, list)) and len(x) == 2
          and all(jnp.shape(v) == () for v in jax.tree.leaves(x))
          and len(jax.tree.leaves(x)) == 2)


def _check_losses(out: Any, has_aux: bool) -> None:
  hint = ""
  if (not has_aux and isinstance(out, (tuple, list)) and len(out) == 2
      and _is_scalar_pair(out[0])):
    hint = (" fn seems to return ((task_loss, regularizer_loss), aux): pass"
            " has_aux=True.")
  elif has_aux and not isinstance(out, (tuple, list)):
    # fn returned (task_loss, regularizer_loss): vjp took task_loss for the
    # output and regularizer_loss for aux.
    hint = (" With has_aux=True, fn must return ((task_loss,"
            " regularizer_loss), aux); if it returns (task_loss,"
            " regularizer_loss) only, pass has_aux=False.")
  if not (isinstance(out, (tuple, list)) and len(out) == 2):
    raise TypeError(
        "value_and_grads needs fn to return a pair (task_loss,"
        f" regularizer_loss) of scalars, got {type(out).__name__}"
        f" {jax.tree.map(jnp.shape, out)!r} (with has_aux=True: ((task_loss,"
        f" regularizer_loss), aux)).{hint}"
    )
  for name, x in zip(("task_loss", "regularizer_loss"), out):
    if (isinstance(x, (tuple, list, dict)) or jnp.shape(x) != ()
        or not jnp.issubdtype(jnp.result_type(x), jnp.floating)):
      raise TypeError(
          f"value_and_grads: fn's {name} must be a real floating scalar, got"
          f" {jax.tree.map(lambda v: (jnp.shape(v), jnp.result_type(v)), x)!r}"
          f".{hint}"
      )


def value_and_grads(
    fn: Callable[..., Any],
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
) -> Callable[..., Any]:
  """Both gradients of ``fn -> (task_loss, regularizer_loss)``, one forward pass.

  Like ``jax.value_and_grad``, for a function with two scalar outputs: one
  ``jax.vjp`` (one forward pass, whose activations both gradients share) and
  two pullbacks, with cotangents ``(1, 0)`` and ``(0, 1)``. The zero is
  symbolic, so the regulariser's pullback only runs through the part of the
  graph the regulariser depends on: for L2-SP (a function of the parameters
  alone) its gradient is nearly free, and the whole call costs about what
  ``jax.value_and_grad`` of the regularised sum costs.

  Args:
    fn: ``fn(*args, **kwargs) -> (task_loss, regularizer_loss)``, or
      ``((task_loss, regularizer_loss), aux)`` when ``has_aux``.
    argnums: which positional argument(s) to differentiate, as in
      ``jax.grad``.
    has_aux: whether ``fn`` returns auxiliary data.

  Returns:
    A function with ``fn``'s signature returning
    ``((task_loss, regularizer_loss), (task_grads, regularizer_grads))``, or
    ``(((task_loss, regularizer_loss), aux), (task_grads,
    regularizer_grads))`` when ``has_aux``. With a tuple ``argnums`` each
    gradient is a tuple, one entry per argument.

  Example:
    >>> import jax.numpy as jnp, optax_ortho
    >>> def losses(w, x):
    ...   task = jnp.sum((x @ w - 1.0) ** 2)
    ...   return task, 0.5 * jnp.sum(w ** 2)
    >>> w, x = jnp.ones(3), jnp.eye(3)
    >>> (task, reg), (g_task, g_reg) = optax_ortho.value_and_grads(losses)(w, x)
    >>> print(task, reg)
    0.0 1.5
    >>> print(g_task)
    [0. 0. 0.]
    >>> print(g_reg)
    [1. 1. 1.]
  """
  int_argnums = isinstance(argnums, int)
  nums: tuple[Any, ...] = ((argnums,) if isinstance(argnums, int)
                           else tuple(argnums))
  if not nums or not all(isinstance(i, int) and not isinstance(i, bool)
                         for i in nums):
    raise TypeError(
        f"argnums must be an int or a non-empty sequence of ints, got {argnums!r}."
    )

  def wrapped(*args, **kwargs):
    for i in nums:
      if not -len(args) <= i < len(args):
        raise ValueError(
            f"argnums {argnums!r} refers to positional argument {i}, but the"
            f" function was called with {len(args)} positional arguments."
        )
    pos = [i % len(args) for i in nums]

    def partial_fn(*diff_args):
      full = list(args)
      for i, a in zip(pos, diff_args):
        full[i] = a
      return fn(*full, **kwargs)

    primals = [args[i] for i in pos]
    if has_aux:
      out, pullback, aux = jax.vjp(partial_fn, *primals, has_aux=True)
    else:
      out, pullback = jax.vjp(partial_fn, *primals)
    _check_losses(out, has_aux)
    task, reg = out
    pair = type(out)  # the pullback wants fn's own container (tuple or list)
    g_task = pullback(pair((jnp.ones_like(task), _zero_cotangent(reg))))
    g_reg = pullback(pair((_zero_cotangent(task), jnp.ones_like(reg))))
    if int_argnums:
      g_task, g_reg = g_task[0], g_reg[0]
    losses = (task, reg)
    return ((losses, aux) if has_aux else losses), (g_task, g_reg)

  return wrapped
