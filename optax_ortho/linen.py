"""OPT layers for Flax linen: W = Q(R) V with V fixed and random (Liu et al.).

`V` lives in the ``"fixed"`` collection, not in ``"params"``, so an optimizer
over ``variables["params"]`` trains only ``R`` (and the bias). Pass the whole
``variables`` dict to ``apply``. With ``stochastic=k`` (S-OPT) a call that has
an ``"sopt"`` rng and ``mutable=["fixed"]`` first folds the current rotation
into ``V`` and samples ``k`` new coordinates to rotate; thread the returned
``"fixed"`` collection like ``batch_stats``.

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
SOPT_RNG = core.SOPT_RNG

__all__ = ["FIXED", "SOPT_RNG", "OrthogonalConv", "OrthogonalDense"]


def _parts(mdl, shape: Sequence[int]):
  """(R, V, idx, Q_ref, bias) of an OPT layer, creating its variables."""
  fan_in = math.prod(shape[:-1])
  core.check_options(mdl.method, mdl.stochastic, fan_in)
  v = mdl.variable(FIXED, "V", lambda: core.init_fixed(
      mdl.make_rng("params"), shape, mdl.kernel_init, mdl.unit_norm,
      mdl.param_dtype))
  size = fan_in if mdl.stochastic is None else mdl.stochastic
  r = mdl.param("R", core.init_r, (size, size), mdl.param_dtype)
  bias = mdl.param("bias", mdl.bias_init, (shape[-1],), mdl.param_dtype
                   ) if mdl.use_bias else None
  if mdl.stochastic is None:
    return r, v.value, None, None, bias
  idx = mdl.variable(FIXED, "idx", lambda: core.sample_dims(
      mdl.make_rng("params"), fan_in, size))
  q_ref = mdl.variable(FIXED, "Q_ref", lambda: jax.lax.stop_gradient(
      core.rotation(r, mdl.method)))
  if (mdl.is_mutable_collection(FIXED) and mdl.has_rng(SOPT_RNG)
      and not mdl.is_initializing()):
    v.value, idx.value, q_ref.value = core.resample(
        r, mdl.method, v.value, idx.value, q_ref.value, mdl.make_rng(SOPT_RNG))
  return r, v.value, idx.value, q_ref.value, bias


def _export(mdl) -> dict:
  params, fixed = mdl.variables["params"], mdl.variables[FIXED]
  w = core.kernel(params["R"], mdl.method, fixed["V"], fixed.get("idx"), fixed.get("Q_ref"))
  out = {"kernel": w.astype(mdl.param_dtype)}
  if mdl.use_bias:
    out["bias"] = params["bias"]
  return out


class OrthogonalDense(nn.Module):
  """Dense layer with kernel W = Q(R) V (OPT, Liu et al., CVPR 2021).

  ``V`` (``(in, features)``, drawn by ``kernel_init``) is fixed in the
  ``"fixed"`` collection; ``R`` (``(in, in)``, or ``(k, k)`` with
  ``stochastic=k``) starts at the identity and is trained.

  Attributes:
    features: output size.
    method: the orthogonal map (see :func:`optax_ortho.orthogonal_map`), or
      ``None`` to use ``R`` itself as ``Q`` and keep it orthogonal with
      :func:`optax_ortho.stiefel_sgd` (the paper's OGD).
    unit_norm: normalise the neurons (columns of ``V``) to unit norm.
    stochastic: S-OPT: rotate only this many sampled input coordinates.
    use_bias, kernel_init, bias_init, dtype, param_dtype: as ``nn.Dense``
      (``kernel_init`` draws ``V``).
  """

  features: int
  method: str | None = "cayley"
  unit_norm: bool = False
  stochastic: int | None = None
  use_bias: bool = True
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    r, v, idx, q_ref, bias = _parts(self, (x.shape[-1], self.features))
    y = core.dense(x, r, self.method, v, idx, q_ref, self.dtype)
    return core.add_bias(y, bias)

  def export(self) -> dict:
    """Parameters of an ``nn.Dense(features)`` computing the same function."""
    return _export(self)


class OrthogonalConv(nn.Module):
  """Convolution with kernel W = Q(R) V (OPT), channels last.

  The neurons are the ``features`` filters, vectors of size
  ``prod(kernel_size) * in``; ``R`` is square of that size (or ``stochastic``).
  ``method``, ``unit_norm``, ``stochastic``, ``use_bias``, ``kernel_init``,
  ``bias_init``, ``dtype`` and ``param_dtype`` are as in :class:`OrthogonalDense`.

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
  use_bias: bool = True
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = tuple(self.kernel_size) + (x.shape[-1], self.features)
    r, v, idx, q_ref, bias = _parts(self, shape)
    w = core.kernel(r, self.method, v, idx, q_ref)
    return core.add_bias(core.conv(x, w, self.strides, self.padding, self.dtype),
                         bias)

  def export(self) -> dict:
    """Parameters of an ``nn.Conv`` with the same features and window."""
    return _export(self)
