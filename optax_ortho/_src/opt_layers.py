"""The math shared by OPT's Flax layers (`optax_ortho.linen`, `optax_ortho.nnx`).

A layer's kernel is W = Q(R) V: V (kernel-shaped, viewed as (fan_in, neurons))
is fixed and random, R is trained, Q = orthogonal_map(R) rotates every neuron
the same way, so angles between neurons (and the hyperspherical energy) stay
those of V.

Stochastic OPT (S-OPT) rotates only `size` sampled coordinates of the neurons:
W = V with rows idx replaced by (Q(R) Q_ref^T) V[idx]. A resample folds the
current rotation into V, draws new coordinates and sets Q_ref = Q(R), so W is
unchanged by it and R keeps training on the new coordinates from a rotation
that starts at the identity (the merge-and-restart of the paper, without
touching R, which belongs to the optimizer).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from optax_ortho._src import orthogonal_map as omap

_HIGHEST = jax.lax.Precision.HIGHEST

FIXED = "fixed"
SOPT_RNG = "sopt"


def check_options(method: str | None, stochastic: int | None, fan_in: int) -> None:
  if method is not None:
    omap.check_map_method(method)
  if stochastic is not None and (
      not isinstance(stochastic, int) or not 1 <= stochastic <= fan_in):
    raise ValueError(
        f"stochastic must be None or an int in [1, fan_in={fan_in}] (the number"
        f" of coordinates S-OPT rotates), got {stochastic!r}.")


def init_fixed(key, shape: Sequence[int], init: Callable, unit_norm: bool,
               dtype) -> jax.Array:
  v = init(key, tuple(shape), dtype)
  if unit_norm:
    m = v.reshape((-1, shape[-1])).astype(jnp.float32)
    m = m / jnp.maximum(jnp.linalg.norm(m, axis=0, keepdims=True), 1e-12)
    v = m.reshape(shape).astype(dtype)
  return v


def init_r(key, shape, dtype=jnp.float32) -> jax.Array:
  """Identity: Q(I) = I for every map but "householder" (Q = -I)."""
  del key
  return jnp.eye(shape[-1], dtype=dtype)


def rotation(r: jax.Array, method: str | None) -> jax.Array:
  """Q(R); with method None, R itself (kept orthogonal by `stiefel_sgd`)."""
  r = r.astype(jnp.promote_types(r.dtype, jnp.float32))
  return r if method is None else omap.orthogonal_map(r, method=method)


def sample_dims(key, fan_in: int, size: int) -> jax.Array:
  return jax.random.permutation(key, fan_in)[:size].astype(jnp.int32)


def _matrix(v: jax.Array) -> jax.Array:
  return v.reshape((-1, v.shape[-1])).astype(jnp.promote_types(v.dtype, jnp.float32))


def kernel(r, method, v, idx=None, q_ref=None) -> jax.Array:
  """W = Q(R) V (or its S-OPT form), in float32 and in V's kernel shape."""
  q = rotation(r, method)
  vm = jax.lax.stop_gradient(_matrix(v))
  if idx is None:
    w = jnp.matmul(q, vm, precision=_HIGHEST)
  else:
    sub = jnp.matmul(q, jax.lax.stop_gradient(q_ref).T, precision=_HIGHEST)
    w = vm.at[idx].set(jnp.matmul(sub, vm[idx], precision=_HIGHEST))
  return w.reshape(v.shape)


def resample(r, method, v, idx, q_ref, key):
  """S-OPT: fold the current rotation into V and draw new coordinates."""
  new_v = jax.lax.stop_gradient(kernel(r, method, v, idx, q_ref)).astype(v.dtype)
  new_idx = sample_dims(key, math.prod(v.shape[:-1]), idx.shape[0])
  q = jax.lax.stop_gradient(rotation(r, method))
  return new_v, new_idx, q.astype(q_ref.dtype)


def _rotate_rows(x: jax.Array, r: jax.Array, method: str | None) -> jax.Array:
  """x @ Q(R) for a (batch, d) x. For Cayley, Q is never formed:
  x Q = 2 x (I - A)^{-1} - x = 2 [(I + A)^{-1} x^T]^T - x, one LU and
  triangular solves with `batch` right-hand sides instead of d."""
  if method != "cayley":
    return jnp.matmul(x, rotation(r, method).astype(x.dtype))
  r = r.astype(jnp.promote_types(r.dtype, jnp.float32))
  a = 0.5 * (r - r.T)
  z = jnp.linalg.solve(jnp.eye(a.shape[0], dtype=a.dtype) + a,
                       x.astype(a.dtype).T).T
  return (2.0 * z - x).astype(x.dtype)


def dense(x: jax.Array, r, method, v, idx=None, q_ref=None, dtype=None):
  """x @ W, as (x @ Q) @ V when that is cheaper than forming W = Q V."""
  dtype = dtype or jnp.result_type(x, jnp.float32)
  batch = math.prod(x.shape[:-1])
  if idx is None and batch < v.shape[-1]:
    x2 = x.astype(dtype).reshape((batch, x.shape[-1]))
    xq = _rotate_rows(x2, r, method).reshape(x.shape)
    return jnp.matmul(xq, jax.lax.stop_gradient(v).astype(dtype))
  w = kernel(r, method, v, idx, q_ref)
  return jnp.matmul(x.astype(dtype), w.astype(dtype))


def conv(x: jax.Array, w: jax.Array, strides, padding, dtype=None) -> jax.Array:
  """N-d convolution of a channels-last input with an (..., in, out) kernel."""
  dtype = dtype or jnp.result_type(x, jnp.float32)
  n = w.ndim - 2
  strides = (strides,) * n if isinstance(strides, int) else tuple(strides)
  spatial = tuple(range(1, n + 1))
  dn = jax.lax.ConvDimensionNumbers(
      lhs_spec=(0, n + 1) + spatial,
      rhs_spec=(n + 1, n) + tuple(range(n)),
      out_spec=(0, n + 1) + spatial)
  return jax.lax.conv_general_dilated(
      x.astype(dtype), w.astype(dtype), strides, padding, dimension_numbers=dn)


def add_bias(y: jax.Array, bias: Any) -> jax.Array:
  return y if bias is None else y + bias.astype(y.dtype)
