"""flax_dimension_numbers: attention kernels viewed as the torch Linear matrices."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from optax.contrib import MuonDimensionNumbers as DN

import optax_ortho

QKV_VIEW = DN(reduction_axis=(0,), output_axis=(1, 2))
OUT_VIEW = DN(reduction_axis=(0, 1), output_axis=2)  # = the default view
DEFAULT_2D = DN(reduction_axis=(0,), output_axis=1)
DEFAULT_3D = DN(reduction_axis=(0, 1), output_axis=2)


class _LinenNet(nn.Module):
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(6, (3,), use_bias=self.use_bias)(x)
    x = nn.MultiHeadDotProductAttention(
        num_heads=2, qkv_features=8, use_bias=self.use_bias)(x)
    x = nn.SelfAttention(num_heads=4, qkv_features=8, use_bias=self.use_bias)(x)
    x = nn.DenseGeneral((3, 4), use_bias=self.use_bias)(x)      # in -> (3, 4)
    x = nn.DenseGeneral(5, axis=(-2, -1), use_bias=self.use_bias)(x)  # (3, 4) -> 5
    return nn.Dense(2, use_bias=self.use_bias)(x)


class _NnxNet(nnx.Module):

  def __init__(self, rngs):
    self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=6, qkv_features=8,
                                       decode=False, rngs=rngs)
    self.up = nnx.LinearGeneral(6, (3, 4), rngs=rngs)
    self.down = nnx.LinearGeneral((3, 4), 5, axis=(-2, -1), rngs=rngs)
    self.head = nnx.Linear(5, 2, rngs=rngs)

  def __call__(self, x):
    return self.head(self.down(self.up(self.attn(x))))


def _linen_params(use_bias=True):
  return _LinenNet(use_bias).init(jax.random.key(0), jnp.ones((1, 5, 6)))["params"]


def _random_like(tree, seed=1):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(
      treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def _views_by_path(dims):
  flat = jax.tree_util.tree_flatten_with_path(
      dims, is_leaf=lambda x: x is None or isinstance(x, DN))[0]
  return {jax.tree_util.keystr(p): d for p, d in flat}


def _torch_linear_polar(kernel, n_in_axes):
  """The authors' recipe: a torch Linear weight (out, in), SVD polar factor.

  Real gradients of attention are often rank-deficient (here the value and
  output projections); there the pseudo-polar factor (singular values below
  the library's relative cutoff dropped) is the library's documented choice,
  so the reference drops them too. On full-rank matrices it is U V^T.
  """
  k = np.asarray(kernel, np.float64)
  w = k.reshape(int(np.prod(k.shape[:n_in_axes])), -1).T  # (out, in)
  u, s, vt = np.linalg.svd(w, full_matrices=False)
  keep = s > s[0] * max(w.shape) * np.finfo(np.float32).eps
  return ((u[:, keep] @ vt[keep]).T).reshape(k.shape)


@pytest.mark.slow
def test_linen_views():
  views = _views_by_path(optax_ortho.flax_dimension_numbers(_linen_params()))
  for attn in ("MultiHeadDotProductAttention_0", "SelfAttention_0"):
    for name in ("query", "key", "value"):
      assert views[f"['{attn}']['{name}']['kernel']"] == QKV_VIEW
      assert views[f"['{attn}']['{name}']['bias']"] is None
    assert views[f"['{attn}']['out']['kernel']"] == OUT_VIEW
  assert views["['DenseGeneral_0']['kernel']"] == QKV_VIEW       # (6, 3, 4)
  assert views["['DenseGeneral_1']['kernel']"] == DEFAULT_3D  # (3, 4, 5)
  assert views["['Dense_0']['kernel']"] == DEFAULT_2D
  assert views["['Conv_0']['kernel']"] == DEFAULT_3D  # (3, 6, 6): width, in, out


def test_linen_attention_without_bias_still_recognised():
  views = _views_by_path(optax_ortho.flax_dimension_numbers(_linen_params(False)))
  assert views["['MultiHeadDotProductAttention_0']['query']['kernel']"] == QKV_VIEW
  assert views["['SelfAttention_0']['out']['kernel']"] == OUT_VIEW
  # A bare DenseGeneral without a bias: its shape alone is ambiguous -> default.
  assert views["['DenseGeneral_0']['kernel']"] == DEFAULT_3D
  assert views["['Conv_0']['kernel']"] == DEFAULT_3D


def test_a_module_named_key_outside_attention_gets_the_default():
  params = {"key": {"kernel": jnp.ones((3, 4, 5))}, "other": {"kernel": jnp.ones((2, 2))}}
  views = _views_by_path(optax_ortho.flax_dimension_numbers(params))
  assert views["['key']['kernel']"] == DEFAULT_3D


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.slow  # 10-50 s on 2 cores; CI runs it (python -m pytest -m slow)
def test_linen_equals_torch_linear_reshape(use_bias):
  params = _linen_params(use_bias)
  grads = _random_like(params)
  tx = optax_ortho.orthonormalize(
      "svd", dimension_numbers=optax_ortho.flax_dimension_numbers)
  out, _ = jax.jit(tx.update)(grads, tx.init(params))
  for attn in ("MultiHeadDotProductAttention_0", "SelfAttention_0"):
    for name, n_in in (("query", 1), ("key", 1), ("value", 1), ("out", 2)):
      got = out[attn][name]["kernel"]
      want = _torch_linear_polar(grads[attn][name]["kernel"], n_in)
      np.testing.assert_allclose(got, want, atol=2e-5)
  # Dense and Conv: unchanged from the default view.
  tx_default = optax_ortho.orthonormalize("svd")
  ref, _ = jax.jit(tx_default.update)(grads, tx_default.init(params))
  for name in ("Dense_0", "Conv_0"):
    np.testing.assert_array_equal(out[name]["kernel"], ref[name]["kernel"])


@pytest.mark.slow  # 10-50 s on 2 cores; CI runs it (python -m pytest -m slow)
def test_default_view_mixes_heads():
  """The reason for the helper: the default view orthonormalises other matrices."""
  params = _linen_params()
  grads = _random_like(params)
  k = grads["MultiHeadDotProductAttention_0"]["query"]["kernel"]  # (6, 2, 4)
  tx = optax_ortho.orthonormalize("svd")
  out, _ = tx.update(grads, tx.init(params))
  default = out["MultiHeadDotProductAttention_0"]["query"]["kernel"]
  torch_like = _torch_linear_polar(k, 1)
  rel = np.linalg.norm(default - torch_like) / np.linalg.norm(torch_like)
  assert rel > 0.3, rel


def _nnx_state():
  model = _NnxNet(nnx.Rngs(0))
  return model, nnx.state(model, nnx.Param)


def test_nnx_views():
  _, params = _nnx_state()
  views = _views_by_path(optax_ortho.flax_dimension_numbers(params))
  for name in ("query", "key", "value"):
    assert views[f"['attn']['{name}']['kernel'].value"] == QKV_VIEW
  assert views["['attn']['out']['kernel'].value"] == OUT_VIEW
  assert views["['up']['kernel'].value"] == QKV_VIEW
  assert views["['down']['kernel'].value"] == DEFAULT_3D
  assert views["['head']['kernel'].value"] == DEFAULT_2D
  assert views["['head']['bias'].value"] is None


@pytest.mark.slow  # 10-50 s on 2 cores; CI runs it (python -m pytest -m slow)
def test_nnx_equals_torch_linear_reshape_in_a_training_step():
  model, params = _nnx_state()
  x = jax.random.normal(jax.random.key(2), (2, 5, 6))

  def loss_fn(model):
    return jnp.sum(jnp.sin(model(x)))

  grads = nnx.grad(loss_fn)(model)
  tx = optax_ortho.orthogonal_sgd(
      1.0, momentum=0.0, weight_decay=0.0,
      dimension_numbers=optax_ortho.flax_dimension_numbers)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  for name, n_in in (("query", 1), ("key", 1), ("value", 1), ("out", 2)):
    got = -updates["attn"][name]["kernel"][...]
    want = _torch_linear_polar(grads["attn"][name]["kernel"][...], n_in)
    np.testing.assert_allclose(got, want, atol=2e-5)
  got = -updates["up"]["kernel"][...]
  np.testing.assert_allclose(got, _torch_linear_polar(grads["up"]["kernel"][...], 1),
                             atol=2e-5)
  # The optimizer applies to the model.
  optimizer = nnx.Optimizer(
      model, optax_ortho.orthogonal_adam(
          1e-3, dimension_numbers=optax_ortho.flax_dimension_numbers),
      wrt=nnx.Param)
  before = loss_fn(model)
  for _ in range(3):
    optimizer.update(model, nnx.grad(loss_fn)(model))
  assert loss_fn(model) < before


@pytest.mark.slow
def test_matches_optax_muon_dimension_numbers_contract():
  params = _linen_params()
  dims = optax_ortho.flax_dimension_numbers(params)
  assert jax.tree.structure(dims, is_leaf=lambda x: x is None or isinstance(x, DN)) \
      == jax.tree.structure(params)
  # Passing the resolved pytree equals passing the callable.
  grads = _random_like(params, seed=3)
  a, _ = optax_ortho.orthonormalize("svd", dimension_numbers=dims).update(grads, None)
  tx = optax_ortho.orthonormalize(
      "svd", dimension_numbers=optax_ortho.flax_dimension_numbers)
  b, _ = tx.update(grads, tx.init(params))
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.slow  # 10-50 s on 2 cores; CI runs it (python -m pytest -m slow)
def test_adam_chain_with_optax():
  params = _linen_params()
  tx = optax.chain(
      optax_ortho.orthonormalize(
          "auto", dimension_numbers=optax_ortho.flax_dimension_numbers),
      optax.sgd(0.1, momentum=0.9))
  state = tx.init(params)
  updates, _ = jax.jit(tx.update)(_random_like(params), state, params)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
