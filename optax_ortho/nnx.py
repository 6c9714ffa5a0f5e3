"""OPT layers for Flax NNX: W = Q(R) V with V fixed and random (Liu et al.).

``V`` is an :class:`OrthogonalFixed` variable, not an ``nnx.Param``, so
``nnx.Optimizer(model, tx, wrt=nnx.Param)`` trains only ``R`` (and the bias).
Defaults follow the authors' code (wy1iu/OPT): ``V ~ N(0, 2/fan_in)``,
``R ~ N(0, 1)`` for the orthogonal maps and ``R = I`` for OGD
(``method=None``) and S-OPT; add their L2 of 5e-4 on ``R`` with
``optax.add_decayed_weights(5e-4)`` in the optimizer.

With ``stochastic=k`` (S-OPT) each call in training mode (``deterministic``
false, as after ``model.train()``) is a training step; steps run in episodes of
``episode_length`` (default 750, as in ``sopt_gs/train.py``): ``k`` sampled
coordinates are rotated during an episode, and at its end the rotation is
folded into ``V``, new coordinates are drawn (from the ``"sopt"`` stream of
the layer's ``rngs``, or ``"default"``) and the rotation restarts at the
identity. ``model.eval()`` freezes them.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from optax_ortho import nnx as ortho_nnx
  >>> layer = ortho_nnx.OrthogonalLinear(8, 4, rngs=nnx.Rngs(0))
  >>> y = layer(jnp.ones((2, 8)))
  >>> sorted(nnx.state(layer, nnx.Param))
  ['R', 'bias']
  >>> plain = layer.to_linear()  # an nnx.Linear with the same kernel
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from optax_ortho._src import opt_layers as core

__all__ = ["OrthogonalConv", "OrthogonalFixed", "OrthogonalLinear"]



class OrthogonalFixed(nnx.Variable):
  """The fixed random neurons (and S-OPT state) of an OPT layer; not a Param."""


def _const(value):
  return lambda key, shape, dtype=None: jnp.asarray(value, dtype)


class _OPT(nnx.Module):
  """Variables and forward pass shared by the OPT layers."""

  in_features: int

  def _setup(self, shape, *, method, unit_norm, stochastic, episode_length,
             r_init, use_bias, kernel_init, bias_init, dtype, param_dtype,
             deterministic, rngs):
    fan_in = math.prod(shape[:-1])
    core.check_options(method, stochastic, fan_in, episode_length)
    self.method, self.stochastic, self.dtype = method, stochastic, dtype
    self.episode_length = episode_length
    self.deterministic = deterministic
    kernel_init = kernel_init or core.default_kernel_init()
    self.V = OrthogonalFixed(core.init_fixed(
        rngs.params(), shape, kernel_init, unit_norm, param_dtype))
    size = fan_in if stochastic is None else stochastic
    r_init = r_init or core.default_r_init(method, stochastic)
    self.R = nnx.Param(r_init(rngs.params(), (size, size), param_dtype))
    self.bias = nnx.Param(bias_init(rngs.params(), (shape[-1],), param_dtype)
                          ) if use_bias else nnx.data(None)
    if stochastic is None:
      self.idx = self.R0 = self.step = self.rngs = nnx.data(None)
    else:
      self.idx = OrthogonalFixed(
          core.sample_dims(rngs.params(), fan_in, stochastic))
      self.R0 = OrthogonalFixed(self.R[...])
      self.step = OrthogonalFixed(jnp.zeros((), jnp.int32))
      self.rngs = rngs[core.SOPT_RNG].fork()

  def _parts(self, x, deterministic: bool | None):
    core.check_input(x, self.in_features, type(self).__name__)
    r = self.R[...]
    if self.stochastic is None:
      return r, self.V[...], None, None
    deterministic = self.deterministic if deterministic is None else deterministic
    if not deterministic:
      v, idx, r0, step = core.sopt_advance(
          r, self.method, self.V[...], self.idx[...], self.R0[...],
          self.step[...], self.rngs(), self.episode_length)
      self.V[...], self.idx[...], self.R0[...], self.step[...] = v, idx, r0, step
    return r, self.V[...], self.idx[...], self.R0[...]

  def kernel(self) -> jax.Array:
    """The current W = Q(R) V, in V's kernel shape."""
    idx = None if self.idx is None else self.idx[...]
    r0 = None if self.R0 is None else self.R0[...]
    return core.kernel(self.R[...], self.method, self.V[...], idx, r0).astype(self.V[...].dtype)

  def _bias(self):
    return None if self.bias is None else self.bias[...]


class OrthogonalLinear(_OPT):
  """Linear layer with kernel W = Q(R) V (OPT, Liu et al., CVPR 2021).

  Args:
    in_features: input size.
    out_features: output size (the number of neurons).
    method: the orthogonal map (see :func:`optax_ortho.orthogonal_map`), or
      ``None`` to use ``R`` itself as ``Q`` and keep it orthogonal with
      :func:`optax_ortho.stiefel_sgd` (the paper's OGD).
    unit_norm: normalise the neurons (columns of ``V``) to unit norm.
    stochastic: S-OPT: rotate only this many sampled input coordinates.
    episode_length: S-OPT training calls per episode (the authors' 750).
    deterministic: freeze the S-OPT coordinates (set by ``.eval()``).
    r_init: initializer of ``R``; ``None``: the authors' (``N(0, 1)`` for a
      map, the identity for ``method=None`` and for S-OPT).
    kernel_init: initializer of ``V``; ``None``: the authors'
      ``N(0, 2/fan_in)``, untruncated.

  ``use_bias``, ``bias_init``, ``dtype``, ``param_dtype`` and ``rngs`` are as
  in ``nnx.Linear``.
  """

  def __init__(self, in_features: int, out_features: int, *,
               method: str | None = "cayley", unit_norm: bool = False,
               stochastic: int | None = None,
               episode_length: int = core.EPISODE_LENGTH,
               deterministic: bool = False, r_init: Any = None,
               use_bias: bool = True, kernel_init: Any = None,
               bias_init: Any = nnx.initializers.zeros_init(),
               dtype: Any = None, param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    self.in_features, self.out_features = in_features, out_features
    self._setup((in_features, out_features), method=method,
                unit_norm=unit_norm, stochastic=stochastic,
                episode_length=episode_length, r_init=r_init, use_bias=use_bias,
                kernel_init=kernel_init, bias_init=bias_init, dtype=dtype,
                param_dtype=param_dtype, deterministic=deterministic, rngs=rngs)

  def __call__(self, x: jax.Array, *, deterministic: bool | None = None):
    r, v, idx, ref = self._parts(x, deterministic)
    return core.add_bias(core.dense(x, r, self.method, v, idx, ref, self.dtype),
                         self._bias())

  def to_linear(self) -> nnx.Linear:
    """A plain ``nnx.Linear`` with the current kernel and bias (for inference)."""
    bias = self._bias()
    return nnx.Linear(
        self.in_features, self.out_features, use_bias=bias is not None,
        kernel_init=_const(self.kernel()),
        bias_init=_const(0.0 if bias is None else bias),
        dtype=self.dtype, param_dtype=self.V[...].dtype, rngs=nnx.Rngs(0))


class OrthogonalConv(_OPT):
  """Convolution with kernel W = Q(R) V (OPT), channels last.

  The neurons are the ``out_features`` filters, vectors of size
  ``prod(kernel_size) * in_features``; ``R`` is square of that size (or
  ``stochastic``).

  Args:
    in_features: input channels.
    out_features: number of filters.
    kernel_size: spatial window, e.g. ``(3, 3)``.
    strides: an int or one int per spatial axis.
    padding: ``"SAME"``, ``"VALID"`` or one ``(low, high)`` pair per axis.

  ``method``, ``unit_norm``, ``stochastic``, ``episode_length``,
  ``deterministic``, ``r_init``, ``use_bias``, ``kernel_init``, ``bias_init``,
  ``dtype``, ``param_dtype`` and ``rngs`` are as in `OrthogonalLinear`.
  """

  def __init__(self, in_features: int, out_features: int,
               kernel_size: Sequence[int], *,
               strides: int | Sequence[int] = 1, padding: Any = "SAME",
               method: str | None = "cayley", unit_norm: bool = False,
               stochastic: int | None = None,
               episode_length: int = core.EPISODE_LENGTH,
               deterministic: bool = False, r_init: Any = None,
               use_bias: bool = True, kernel_init: Any = None,
               bias_init: Any = nnx.initializers.zeros_init(),
               dtype: Any = None, param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    self.in_features, self.out_features = in_features, out_features
    self.kernel_size = tuple(kernel_size)
    self.strides, self.padding = strides, padding
    self._setup(self.kernel_size + (in_features, out_features), method=method,
                unit_norm=unit_norm, stochastic=stochastic,
                episode_length=episode_length, r_init=r_init, use_bias=use_bias,
                kernel_init=kernel_init, bias_init=bias_init, dtype=dtype,
                param_dtype=param_dtype, deterministic=deterministic, rngs=rngs)

  def __call__(self, x: jax.Array, *, deterministic: bool | None = None):
    r, v, idx, ref = self._parts(x, deterministic)
    w = core.kernel(r, self.method, v, idx, ref)
    y = core.conv(x, w, self.strides, self.padding, self.dtype)
    return core.add_bias(y, self._bias())

  def to_conv(self) -> nnx.Conv:
    """A plain ``nnx.Conv`` with the current kernel and bias (for inference)."""
    bias = self._bias()
    return nnx.Conv(
        self.in_features, self.out_features, self.kernel_size,
        strides=self.strides, padding=self.padding, use_bias=bias is not None,
        kernel_init=_const(self.kernel()),
        bias_init=_const(0.0 if bias is None else bias),
        dtype=self.dtype, param_dtype=self.V[...].dtype, rngs=nnx.Rngs(0))
