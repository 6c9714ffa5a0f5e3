"""The `"auto"` contract: exact, with a route per matrix kept from step to step.

Each matrix carries a flag, `use_gram`: try the Gram route (checked: its
float32 error grows like eps * cond^2, so it is kept only for cond <= 10)
before the SVD. On CPU a square-ish matrix tries `exact.split_route`
instead, kept where at most a quarter of its singular values lie below the
largest / 10. A route returns the factors and the flags for the next call
(`Factors`): a matrix that passed the check keeps the Gram route; one that
took the SVD goes back to it when its singular values say it would pass.
Gradients change slowly from step to step, so a low-rank or ill-conditioned
layer pays for one SVD per step, not for an `eigh` and then an SVD.
Non-finite matrices come out NaN and keep their flag.

The platform is chosen here, once: `cpu.route_groups` on CPU,
`batched.route_groups` on GPU and TPU. The branch is resolved when the
program is lowered for its platform, so the CPU program never contains a
batched solver call.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from optax_ortho._src.polar import batched
from optax_ortho._src.polar import cpu
from optax_ortho._src.polar.derivative import polar_jvp
from optax_ortho._src.polar.guard import Factors
from optax_ortho._src.polar.guard import default_eps
from optax_ortho._src.stacks import split_stack
from optax_ortho._src.stacks import stack_parts


def auto_polar_groups(groups: list[list[jax.Array]], use_gram: list[jax.Array],
                      eps: float | None = None) -> list[Factors]:
  """`"auto"` for groups of same-shaped float (b_i, m, n) parts, m >= n.

  Group g is the stack `concatenate(groups[g])`, with flags `use_gram[g]`;
  every part must be non-empty. Returns one `Factors` per group, its factors
  one per part. The parts are stacked only where a route needs it.

  Called outside jit (as the docstring examples do), it runs one cached
  jitted program: the routes' `cond`s would otherwise be traced and compiled
  anew at every call.
  """
  if not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((groups, use_gram))):
    return _eager(groups, use_gram, eps=eps)
  return _routes(groups, use_gram, eps)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _routes(groups: list[list[jax.Array]], use_gram: list[jax.Array],
            eps: float | None) -> list[Factors]:
  eps_of = [default_eps(*parts[0].shape[-2:]) if eps is None else eps
            for parts in groups]
  return jax.lax.platform_dependent(
      groups, use_gram, cpu=functools.partial(cpu.route_groups, eps=eps_of),
      default=functools.partial(batched.route_groups, eps=eps_of))


@_routes.defjvp
def _routes_jvp(eps, primals, tangents):
  groups, use_gram = primals
  found = _routes(groups, use_gram, eps)
  d_q = []
  for parts, d_parts, f in zip(groups, tangents[0], found):
    d_q.append(split_stack(polar_jvp(stack_parts(parts), stack_parts(f.q),
                                     stack_parts(d_parts)),
                           [x.shape[0] for x in parts]))
  no_tangent = [np.zeros(f.use_gram.shape, jax.dtypes.float0) for f in found]
  return found, [Factors(d, z) for d, z in zip(d_q, no_tangent)]


_eager = jax.jit(_routes, static_argnames="eps")


def auto_polar_stack(a: jax.Array, use_gram: jax.Array,
                     eps: float | None = None) -> Factors:
  """`"auto"` on one (k, m, n) stack, m >= n, with its (k,) flags."""
  if a.size == 0:
    return Factors(a, use_gram)
  (q,), ok = auto_polar_groups([[a]], [use_gram], eps)[0]
  return Factors(q, ok)
