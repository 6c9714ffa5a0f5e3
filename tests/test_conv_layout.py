"""Convolutions rewritten channels-last keep their values, in and out of branches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_ortho._src.conv_layout import channels_last_convolutions

_CASES = {
    "nhwc": ((2, 6, 6, 4), (3, 3, 4, 5), dict(dimension_numbers=("NHWC", "HWIO", "NHWC"))),
    "nchw_strided": ((2, 4, 7, 7), (5, 4, 3, 3),
                     dict(window_strides=(2, 2), dimension_numbers=("NCHW", "OIHW", "NCHW"))),
    "dilated": ((2, 8, 8, 3), (3, 3, 3, 2),
                dict(rhs_dilation=(2, 2), dimension_numbers=("NHWC", "HWIO", "NHWC"))),
    "grouped": ((2, 6, 6, 4), (3, 3, 2, 6),
                dict(feature_group_count=2, dimension_numbers=("NHWC", "HWIO", "NHWC"))),
    "1d": ((2, 9, 3), (4, 3, 5), dict(dimension_numbers=("NWC", "WIO", "NWC"))),
    "3d": ((1, 4, 4, 4, 2), (2, 2, 2, 2, 3),
           dict(dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))),
}


@pytest.mark.parametrize("case", sorted(_CASES))
def test_gradients_equal_the_original_and_every_convolution_is_channels_last(case):
  x_shape, w_shape, kw = _CASES[case]
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)
  kw = {"window_strides": (1,) * (len(x_shape) - 2), "padding": "SAME", **kw}

  def loss(w, x):
    return jnp.sum(jnp.tanh(jax.lax.conv_general_dilated(x, w, **kw)) ** 2)

  def grads():
    return jax.grad(loss, argnums=(0, 1))(w, x)

  rewritten, complete = channels_last_convolutions(grads)
  assert complete
  in_branch = jax.jit(lambda p: jax.lax.cond(p, rewritten, lambda: (w * 0, x * 0)))
  for got, want in zip(in_branch(True), grads()):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  text = str(jax.make_jaxpr(rewritten)())
  assert text.count("conv_general_dilated") == 3  # forward, and the two gradients


def test_a_function_without_convolutions_is_returned_as_it_is():
  def fn():
    return jnp.ones(3) * 2

  assert channels_last_convolutions(fn) == (fn, True)


def test_convolutions_it_cannot_reach_are_reported():
  x, w = jnp.ones((1, 5, 5, 1)), jnp.ones((3, 3, 1, 1))

  def loss(w):
    conv = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(jnp.tanh(conv))

  rewritten, complete = channels_last_convolutions(lambda: jax.grad(jax.checkpoint(loss))(w))
  assert not complete
  np.testing.assert_allclose(rewritten(), jax.grad(loss)(w), rtol=1e-6)
