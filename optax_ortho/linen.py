"""OPT layers for Flax linen: W = Q(R) V with V fixed and random (Liu et al.).

`V` lives in the ``"fixed"`` collection, not in ``"params"``, so an optimizer
over ``variables["params"]`` trains only ``R`` (and the bias). Pass the whole
``variables`` dict to ``apply``. Defaults follow the authors' code
(wy1iu/OPT): ``V ~ N(0, 2/fan_in)``, ``R ~ N(0, 1)`` for the orthogonal maps
and ``R = I`` for OGD (``method=None``) and S-OPT; add their L2 of 5e-4 on
``R`` with ``optax.add_decayed_weights(5e-4)`` in the optimizer.

With ``stochastic=k`` (S-OPT) every call that has an ``"sopt"`` rng and
``mutable=["fixed"]`` is a training step; steps run in episodes of
``episode_length`` (default 750, as in ``sopt_gs/train.py``): ``k`` sampled
coordinates are rotated during an episode, and at its end the rotation is
folded into ``V``, new coordinates are drawn and the rotation restarts at the
identity. Thread the returned ``"fixed"`` collection like ``batch_stats``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from optax_ortho import linen as ortho_nn
  >>> layer = ortho_nn.OrthogonalDense(4)
  >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 8)))
  >>> sorted(variables), sorted(variables["params"])
  (['fixed', 'params'], ['R', 'bias'])
  >>> y = layer.apply(variables, jnp.ones((2, 8)))
  >>> dense = layer.apply(variables, method="export")  # params of nn.Dense(4)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from optax_ortho._src import opt_layers as core

FIXED = core.FIXED
"""The variable collection of `V`, `idx`, `R0` and `step` (``"fixed"``)."""
SOPT_RNG = core.SOPT_RNG
"""The rng name of S-OPT's training steps (``"sopt"``)."""

__all__ = ["FIXED", "SOPT_RNG", "OrthogonalConv", "OrthogonalDense"]


def _parts(mdl, shape: Sequence[int]):
  """(R, V, idx, R0, bias) of an OPT layer, creating its variables."""
  fan_in = math.prod(shape[:-1])
  core.check_options(mdl.method, mdl.stochastic, fan_in, mdl.episode_length)
  kernel_init = mdl.kernel_init or core.default_kernel_init()
  v = mdl.variable(FIXED, "V", lambda: core.init_fixed(
      mdl.make_rng("params"), shape, kernel_init, mdl.unit_norm,
      mdl.param_dtype))
  size = fan_in if mdl.stochastic is None else mdl.stochastic
  r_init = mdl.r_init or core.default_r_init(mdl.method, mdl.stochastic)
  r = mdl.param("R", r_init, (size, size), mdl.param_dtype)
  bias = mdl.param("bias", mdl.bias_init, (shape[-1],), mdl.param_dtype
                   ) if mdl.use_bias else None
  if mdl.stochastic is None:
    return r, v.value, None, None, bias
  idx = mdl.variable(FIXED, "idx", lambda: core.sample_dims(
      mdl.make_rng("params"), fan_in, size))
  r0 = mdl.variable(FIXED, "R0", lambda: jax.lax.stop_gradient(r))
  step = mdl.variable(FIXED, "step", lambda: jnp.zeros((), jnp.int32))
  if (mdl.is_mutable_collection(FIXED) and mdl.has_rng(SOPT_RNG)
      and not mdl.is_initializing()):
    v.value, idx.value, r0.value, step.value = core.sopt_advance(
        r, mdl.method, v.value, idx.value, r0.value, step.value,
        mdl.make_rng(SOPT_RNG), mdl.episode_length)
  return r, v.value, idx.value, r0.value, bias


def _export(mdl) -> dict:
  params, fixed = mdl.variables["params"], mdl.variables[FIXED]
  w = core.kernel(params["R"], mdl.method, fixed["V"], fixed.get("idx"), fixed.get("R0"))
  out = {"kernel": w.astype(mdl.param_dtype)}
  if mdl.use_bias:
    out["bias"] = params["bias"]
  return out


class OrthogonalDense(nn.Module):
  """Dense layer with kernel W = Q(R) V (OPT, Liu et al., CVPR 2021).

  ``V`` (``(in, features)``, drawn by ``kernel_init``) is fixed in the
  ``"fixed"`` collection; ``R`` (``(in, in)``, or ``(k, k)`` with
  ``stochastic=k``) is trained.

  Attributes:
    features: output size.
    method: the orthogonal map (see :func:`optax_ortho.orthogonal_map`), or
      ``None`` to use ``R`` itself as ``Q`` and keep it orthogonal with
      :func:`optax_ortho.stiefel_sgd` (the paper's OGD).
    unit_norm: normalise the neurons (columns of ``V``) to unit norm.
    stochastic: S-OPT: rotate only this many sampled input coordinates.
    episode_length: S-OPT training calls per episode (the authors' 750).
    r_init: initializer of ``R``; ``None``: the authors' (``N(0, 1)`` for a
      map, the identity for ``method=None`` and for S-OPT).
    kernel_init: initializer of ``V``; ``None``: the authors'
      ``N(0, 2/fan_in)``, untruncated.
    use_bias, bias_init, dtype, param_dtype: as ``nn.Dense``.
  """

  features: int
  method: str | None = "cayley"
  unit_norm: bool = False
  stochastic: int | None = None
  episode_length: int = core.EPISODE_LENGTH
  r_init: Any = None
  use_bias: bool = True
  kernel_init: Any = None
  bias_init: Any = nn.initializers.zeros_init()
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    r, v, idx, r0, bias = _parts(self, (x.shape[-1], self.features))
    y = core.dense(x, r, self.method, v, idx, r0, self.dtype)
    return core.add_bias(y, bias)

  def export(self) -> dict:
    """Parameters of an ``nn.Dense(features)`` computing the same function."""
    return _export(self)


class OrthogonalConv(nn.Module):
  """Convolution with kernel W = Q(R) V (OPT), channels last.

  The neurons are the ``features`` filters, vectors of size
  ``prod(kernel_size) * in``; ``R`` is square of that size (or ``stochastic``).
  ``method``, ``unit_norm``, ``stochastic``, ``episode_length``, ``r_init``,
  ``use_bias``, ``kernel_init``, ``bias_init``, ``dtype`` and ``param_dtype``
  are as in `OrthogonalDense`.

  Attributes:
    features: number of filters.
    kernel_size: spatial window, e.g. ``(3, 3)``.
    strides: an int or one int per spatial axis.
    padding: ``"SAME"``, ``"VALID"`` or one ``(low, high)`` pair per axis.
  """

  features: int
  kernel_size: Sequence[int]
  strides: int | Sequence[int] = 1
  padding: Any = "SAME"
  method: str | None = "cayley"
  unit_norm: bool = False
  stochastic: int | None = None
  episode_length: int = core.EPISODE_LENGTH
  r_init: Any = None
  use_bias: bool = True
  kernel_init: Any = None
  bias_init: Any = nn.initializers.zeros_init()
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = tuple(self.kernel_size) + (x.shape[-1], self.features)
    r, v, idx, r0, bias = _parts(self, shape)
    w = core.kernel(r, self.method, v, idx, r0)
    return core.add_bias(core.conv(x, w, self.strides, self.padding, self.dtype),
                         bias)

  def export(self) -> dict:
    """Parameters of an ``nn.Conv`` with the same features and window."""
    return _export(self)
