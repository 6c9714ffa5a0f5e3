"""OPT layers for Flax NNX: W = Q(R) V with V fixed and random (Liu et al.).

``V`` is an :class:`OrthogonalFixed` variable, not an ``nnx.Param``, so
``nnx.Optimizer(model, tx, wrt=nnx.Param)`` trains only ``R`` (and the bias).
With ``stochastic=k`` (S-OPT) each call in training mode (``deterministic``
false, as after ``model.train()``) folds the current rotation into ``V`` and
samples ``k`` new coordinates to rotate, drawing from the ``"sopt"`` stream of
the layer's ``rngs`` (or ``"default"``); ``model.eval()`` freezes them.

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

_default_kernel_init = nnx.initializers.lecun_normal()


class OrthogonalFixed(nnx.Variable):
  """The fixed random neurons (and S-OPT state) of an OPT layer; not a Param."""


def _const(value):
  return lambda key, shape, dtype=None: jnp.asarray(value, dtype)


class _OPT(nnx.Module):
  """Variables and forward pass shared by the OPT layers."""

  def _setup(self, shape, *, method, unit_norm, stochastic, use_bias,
             kernel_init, bias_init, dtype, param_dtype, deterministic, rngs):
    fan_in = math.prod(shape[:-1])
    core.check_options(method, stochastic, fan_in)
    self.method, self.stochastic, self.dtype = method, stochastic, dtype
    self.deterministic = deterministic
    self.V = OrthogonalFixed(core.init_fixed(
        rngs.params(), shape, kernel_init, unit_norm, param_dtype))
    size = fan_in if stochastic is None else stochastic
    self.R = nnx.Param(core.init_r(None, (size, size), param_dtype))
    self.bias = nnx.Param(bias_init(rngs.params(), (shape[-1],), param_dtype)
                          ) if use_bias else nnx.data(None)
    if stochastic is None:
      self.idx = self.Q_ref = self.rngs = nnx.data(None)
    else:
      self.idx = OrthogonalFixed(
          core.sample_dims(rngs.params(), fan_in, stochastic))
      self.Q_ref = OrthogonalFixed(core.rotation(self.R[...], method))
      self.rngs = rngs[core.SOPT_RNG].fork()

  def _parts(self, deterministic: bool | None):
    r = self.R[...]
    if self.stochastic is None:
      return r, self.V[...], None, None
    deterministic = self.deterministic if deterministic is None else deterministic
    if not deterministic:
      v, idx, ref = core.resample(
          r, self.method, self.V[...], self.idx[...], self.Q_ref[...],
          self.rngs())
      self.V[...], self.idx[...], self.Q_ref[...] = v, idx, ref
    return r, self.V[...], self.idx[...], self.Q_ref[...]

  def kernel(self) -> jax.Array:
    """The current W = Q(R) V, in V's kernel shape."""
    idx = None if self.idx is None else self.idx[...]
    ref = None if self.Q_ref is None else self.Q_ref[...]
    return core.kernel(self.R[...], self.method, self.V[...], idx, ref).astype(self.V[...].dtype)

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
    deterministic: freeze the S-OPT coordinates (set by ``.eval()``).

  ``use_bias``, ``kernel_init`` (which draws ``V``), ``bias_init``, ``dtype``,
  ``param_dtype`` and ``rngs`` are as in ``nnx.Linear``.
  """

  def __init__(self, in_features: int, out_features: int, *,
               method: str | None = "cayley", unit_norm: bool = False,
               stochastic: int | None = None, deterministic: bool = False,
               use_bias: bool = True, kernel_init: Any = _default_kernel_init,
               bias_init: Any = nnx.initializers.zeros_init(),
               dtype: Any = None, param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    self.in_features, self.out_features = in_features, out_features
    self._setup((in_features, out_features), method=method,
                unit_norm=unit_norm, stochastic=stochastic, use_bias=use_bias,
                kernel_init=kernel_init, bias_init=bias_init, dtype=dtype,
                param_dtype=param_dtype, deterministic=deterministic, rngs=rngs)

  def __call__(self, x: jax.Array, *, deterministic: bool | None = None):
    r, v, idx, ref = self._parts(deterministic)
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

  ``method``, ``unit_norm``, ``stochastic``, ``deterministic``, ``use_bias``,
  ``kernel_init``, ``bias_init``, ``dtype``, ``param_dtype`` and ``rngs`` are as
  in :class:`OrthogonalLinear`.
  """

  def __init__(self, in_features: int, out_features: int,
               kernel_size: Sequence[int], *,
               strides: int | Sequence[int] = 1, padding: Any = "SAME",
               method: str | None = "cayley", unit_norm: bool = False,
               stochastic: int | None = None, deterministic: bool = False,
               use_bias: bool = True, kernel_init: Any = _default_kernel_init,
               bias_init: Any = nnx.initializers.zeros_init(),
               dtype: Any = None, param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    self.in_features, self.out_features = in_features, out_features
    self.kernel_size = tuple(kernel_size)
    self.strides, self.padding = strides, padding
    self._setup(self.kernel_size + (in_features, out_features), method=method,
                unit_norm=unit_norm, stochastic=stochastic, use_bias=use_bias,
                kernel_init=kernel_init, bias_init=bias_init, dtype=dtype,
                param_dtype=param_dtype, deterministic=deterministic, rngs=rngs)

  def __call__(self, x: jax.Array, *, deterministic: bool | None = None):
    r, v, idx, ref = self._parts(deterministic)
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
