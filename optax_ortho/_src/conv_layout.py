"""Convolutions rewritten channels-last, the layout XLA:CPU runs fast in any branch.

The gradient of a convolution with respect to its kernel is itself a
convolution whose dimension numbers put the features where the batch was.
At the top level of a program XLA:CPU rewrites such a convolution into its
native channels-last form; inside a nested computation (a ``lax.cond``
branch, a loop body) it does not, and runs it through a generic loop nest
that is tens of times slower. Rewriting every convolution of a function's
jaxpr as transposes around a channels-last convolution gives the same
values and keeps the fast kernel wherever the function is called.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
from jax import lax
from jax.extend import core

_CONV = "conv_general_dilated"
# Calls whose body runs as it is: inlining them changes nothing but the
# program's nesting, so their convolutions can be rewritten too.
_INLINED_CALLS = ("pjit", "jit", "closed_call", "core_call")


def _channels_last(n: int) -> lax.ConvDimensionNumbers:
  spatial = tuple(range(1, n + 1))
  return lax.ConvDimensionNumbers(
      lhs_spec=(0, n + 1, *spatial), rhs_spec=(n + 1, n, *range(n)),
      out_spec=(0, n + 1, *spatial))


def _channels_last_conv(lhs: jax.Array, rhs: jax.Array, *,
                        dimension_numbers: lax.ConvDimensionNumbers, **params) -> jax.Array:
  """One convolution as transposes around its channels-last form (same values)."""
  lhs_batch, lhs_feature, *lhs_spatial = dimension_numbers.lhs_spec
  rhs_out, rhs_in, *rhs_spatial = dimension_numbers.rhs_spec
  out_batch, out_feature, *out_spatial = dimension_numbers.out_spec
  n = len(lhs_spatial)
  out = lax.conv_general_dilated_p.bind(
      lhs.transpose((lhs_batch, *lhs_spatial, lhs_feature)),
      rhs.transpose((*rhs_spatial, rhs_in, rhs_out)),
      dimension_numbers=_channels_last(n), **params)
  # `out` is (batch, spatial..., feature); put each axis back where the
  # original dimension numbers want it.
  inverse = [0] * (n + 2)
  for axis, where in enumerate((out_batch, *out_spatial, out_feature)):
    inverse[where] = axis
  return out.transpose(inverse)


def _eval(jaxpr: core.Jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
  env: dict[core.Var, Any] = {}

  def read(v):
    return v.val if isinstance(v, core.Literal) else env[v]

  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    if name == _CONV:
      outvals = [_channels_last_conv(*invals, **eqn.params)]
    elif name in _INLINED_CALLS and isinstance(eqn.params.get("jaxpr"), core.ClosedJaxpr):
      body = eqn.params["jaxpr"]
      outvals = _eval(body.jaxpr, body.consts, invals)
    elif name in _INLINED_CALLS and isinstance(eqn.params.get("call_jaxpr"), core.Jaxpr):
      outvals = _eval(eqn.params["call_jaxpr"], (), invals)
    else:
      with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
      outvals = list(out) if eqn.primitive.multiple_results else [out]
    for v, x in zip(eqn.outvars, outvals):
      if not isinstance(v, core.DropVar):
        env[v] = x
  return [read(v) for v in jaxpr.outvars]


def _convolutions(jaxpr: core.Jaxpr):
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == _CONV:
      yield eqn
    for sub in core.jaxprs_in_params(eqn.params):
      yield from _convolutions(sub)


def _is_channels_last(eqn: core.JaxprEqn) -> bool:
  dims = eqn.params["dimension_numbers"]
  return dims == _channels_last(len(dims.lhs_spec) - 2)


def channels_last_convolutions(fn: Callable[[], Any]) -> tuple[Callable[[], Any], bool]:
  """``fn`` with its convolutions channels-last, and whether none is left out.

  Convolutions inside loops, branches, ``remat`` and custom derivatives are
  left as they are; the flag says whether any convolution that is not
  channels-last remains, so the caller can avoid nesting the function.

  Args:
    fn: a function of no arguments (it may close over traced values).

  Returns:
    ``(rewritten, complete)``: ``rewritten()`` returns what ``fn()`` returns.
  """
  closed, shape = jax.make_jaxpr(fn, return_shape=True)()
  treedef = jax.tree.structure(shape)

  def rewritten():
    return jax.tree.unflatten(treedef, _eval(closed.jaxpr, closed.consts, ()))

  if not any(True for _ in _convolutions(closed.jaxpr)):
    return fn, True
  check = jax.make_jaxpr(rewritten)()
  complete = all(_is_channels_last(eqn) for eqn in _convolutions(check.jaxpr))
  return rewritten, complete
