"""The math shared by OPT's Flax layers (`optax_ortho.linen`, `optax_ortho.nnx`).

A layer's kernel is W = Q(R) V: V (kernel-shaped, viewed as (fan_in, neurons))
is fixed and random, R is trained, Q = orthogonal_map(R) rotates every neuron
the same way, so angles between neurons (and the hyperspherical energy) stay
those of V.

Initialisations are the authors' (wy1iu/OPT): V ~ N(0, 2 / fan_in), not
truncated (`get_fix_filter`); R ~ N(0, 1) (`get_rotation`) for the maps, R = I
for OGD (method None, R trained by `stiefel_sgd`) and for S-OPT. Their L2 of
5e-4 on R is a loss term, not part of the layer: add it in the optimizer
(`optax.add_decayed_weights(5e-4)` before `optax.sgd(lr, 0.9)` gives the same
gradient).

Stochastic OPT (S-OPT, `sopt_gs/train.py`) rotates only `size` sampled
coordinates (rows of V): W = V with rows idx replaced by Q(R - R0 + I) V[idx].
Training runs in episodes of `episode_length` calls: at the end of an episode
the rotation is folded into V (V[idx] <- Q V[idx]), new coordinates are drawn
and the rotation restarts at the identity. The authors re-initialise R to I;
here R0 <- R is stored instead, so R - R0 + I = I again without the layer
writing to a parameter that belongs to the optimizer (same forward map and
same gradient; only a weight decay on R differs, pulling R towards 0 rather
than R - R0 + I towards 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import cast

import jax
import jax.numpy as jnp

from optax_ortho._src import cayley_solve
from optax_ortho._src import orthogonal_map as omap
from optax_ortho._src.stacks import HIGHEST

FIXED = "fixed"
SOPT_RNG = "sopt"
EPISODE_LENGTH = 750


def check_options(method: str | None, stochastic: int | None, fan_in: int,
                  episode_length: int = EPISODE_LENGTH) -> None:
  if method is not None:
    omap.check_map_method(method)
  if stochastic is not None and (
      isinstance(stochastic, bool) or not isinstance(stochastic, int)
      or not 1 <= stochastic <= fan_in):
    raise ValueError(
        f"stochastic must be None or an int in [1, fan_in={fan_in}] (the number"
        f" of coordinates S-OPT rotates), got {stochastic!r}.")
  if isinstance(episode_length, bool) or not isinstance(episode_length, int) or (
      episode_length < 1):
    raise ValueError(
        f"episode_length must be an int >= 1 (S-OPT training calls per"
        f" episode), got {episode_length!r}.")


def default_kernel_init() -> Callable:
  """The authors' V: N(0, 2 / fan_in), untruncated."""
  return jax.nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def identity_init(key, shape, dtype=jnp.float32) -> jax.Array:
  del key
  return jnp.eye(shape[-1], dtype=dtype)


def default_r_init(method: str | None, stochastic: int | None) -> Callable:
  """The authors' R: N(0, 1) for the maps; the identity for OGD and S-OPT."""
  if method is None or stochastic is not None:
    return identity_init
  return jax.nn.initializers.normal(1.0)


def init_fixed(key, shape: Sequence[int], init: Callable, unit_norm: bool,
               dtype) -> jax.Array:
  v = init(key, tuple(shape), dtype)
  if unit_norm:
    m = v.reshape((-1, shape[-1])).astype(jnp.float32)
    m = m / jnp.maximum(jnp.linalg.norm(m, axis=0, keepdims=True), 1e-12)
    v = m.reshape(shape).astype(dtype)
  return v


def rotation(r: jax.Array, method: str | None) -> jax.Array:
  """Q(R); with method None, R itself (kept orthogonal by `stiefel_sgd`)."""
  r = r.astype(jnp.promote_types(r.dtype, jnp.float32))
  if method is None:
    return r
  omap.check_map_method(method)
  return omap.orthogonal_map(r, method=cast(omap.OrthogonalMapMethod, method))


def sopt_rotation(r, r0, method) -> jax.Array:
  """S-OPT's rotation Q(R - R0 + I) (R R0^T for OGD): I when an episode starts."""
  r = r.astype(jnp.promote_types(r.dtype, jnp.float32))
  r0 = jax.lax.stop_gradient(r0).astype(r.dtype)
  if method is None:
    # OGD keeps R itself orthogonal (stiefel_sgd): the rotation since the
    # episode began is R R0^T.
    return jnp.matmul(r, r0.T, precision=HIGHEST)
  eye = jnp.eye(r.shape[-1], dtype=r.dtype)
  q = rotation(r - r0 + eye, method)
  if method == "householder" and r.shape[-1] % 2 == 0:
    # Its Q(I) is diag(1, ..., 1, -1) for even n: undo it so the episode
    # starts at the identity, as with the other maps.
    q = q.at[:, -1].multiply(-1.0)
  return q


def sample_dims(key, fan_in: int, size: int) -> jax.Array:
  return jax.random.permutation(key, fan_in)[:size].astype(jnp.int32)


def _matrix(v: jax.Array) -> jax.Array:
  return v.reshape((-1, v.shape[-1])).astype(jnp.promote_types(v.dtype, jnp.float32))


def kernel(r, method, v, idx=None, r0=None) -> jax.Array:
  """W = Q(R) V (or its S-OPT form), in float32 and in V's kernel shape."""
  vm = jax.lax.stop_gradient(_matrix(v))
  if idx is None:
    if method == "cayley":
      w = cayley_solve.cayley_times(r, vm)
    else:
      w = jnp.matmul(rotation(r, method), vm, precision=HIGHEST)
  else:
    if method == "cayley":
      r = r.astype(jnp.promote_types(r.dtype, jnp.float32))
      eff = r - jax.lax.stop_gradient(r0).astype(r.dtype) + jnp.eye(
          r.shape[-1], dtype=r.dtype)
      sub_v = cayley_solve.cayley_times(eff, vm[idx])
    else:
      sub_v = jnp.matmul(sopt_rotation(r, r0, method), vm[idx],
                         precision=HIGHEST)
    w = vm.at[idx].set(sub_v)
  return w.reshape(v.shape)


def sopt_advance(r, method, v, idx, r0, step, key, episode_length: int):
  """One S-OPT training call: (V, idx, R0, step) to use for it.

  At the first call after `episode_length` calls (the end of an episode) the
  current rotation is folded into V, new coordinates are drawn and R0 <- R, so
  W is unchanged by it and the rotation restarts at the identity.
  """
  def fold():
    new_v = jax.lax.stop_gradient(kernel(r, method, v, idx, r0)).astype(v.dtype)
    new_idx = sample_dims(key, math.prod(v.shape[:-1]), idx.shape[0])
    return new_v, new_idx, jax.lax.stop_gradient(r).astype(r0.dtype)

  boundary = (step > 0) & (step % episode_length == 0)
  v, idx, r0 = jax.lax.cond(boundary, fold, lambda: (v, idx, r0))
  return v, idx, r0, step + 1


def _rotate_rows(x: jax.Array, r: jax.Array, method: str | None) -> jax.Array:
  """x @ Q(R) for a (batch, d) x. For Cayley, Q is never formed: with the
  skew S = triu(R) - triu(R)^T, x Q = 2 x (I - S)^{-1} - x, one solve with
  `batch` right-hand sides (`cayley_solve.solve`)."""
  if method != "cayley":
    return jnp.matmul(x, rotation(r, method).astype(x.dtype))
  return cayley_solve.cayley_times(r, x, rows=True).astype(x.dtype)


def dense(x: jax.Array, r, method, v, idx=None, r0=None, dtype=None):
  """x @ W, as (x @ Q) @ V when that is cheaper than forming W = Q V."""
  dtype = dtype or jnp.result_type(x, jnp.float32)
  batch = math.prod(x.shape[:-1])
  if idx is None and batch < v.shape[-1]:
    x2 = x.astype(dtype).reshape((batch, x.shape[-1]))
    xq = _rotate_rows(x2, r, method).reshape(x.shape)
    return jnp.matmul(xq, jax.lax.stop_gradient(v).astype(dtype))
  w = kernel(r, method, v, idx, r0)
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


def check_input(x: jax.Array, expected: int, name: str) -> None:
  """The input's last axis must be the layer's in_features."""
  if x.ndim < 1 or x.shape[-1] != expected:
    raise ValueError(
        f"{name}: input x must have {expected} features on its last axis"
        f" (in_features), got shape {x.shape}.")
