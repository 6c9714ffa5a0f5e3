"""Matrix views of Flax kernels: attention heads stay whole, as in a torch Linear."""

from __future__ import annotations

from typing import Any

import jax
from jax import tree_util
from optax.contrib import MuonDimensionNumbers

from optax_ortho._src import matrix_view

# Attention projections of linen's MultiHeadDotProductAttention (and its
# subclasses MultiHeadAttention, SelfAttention) and of nnx.MultiHeadAttention.
_QKV = ("query", "key", "value")
_OUT = "out"


def _name(key: Any) -> str | int | None:
  if isinstance(key, tree_util.DictKey):
    return key.key
  if isinstance(key, tree_util.GetAttrKey):
    return key.name
  if isinstance(key, tree_util.SequenceKey):
    return key.idx
  if isinstance(key, tree_util.FlattenedIndexKey):
    return key.key
  return None


def _module_path(path: tuple[Any, ...]) -> tuple[Any, ...]:
  """Names along a leaf's path, without nnx's trailing ``.value`` of a Param."""
  names = tuple(_name(k) for k in path)
  while names and names[-1] in ("value", "raw_value") and len(names) > 1:
    names = names[:-1]
  return names


def _kernel_view(kernel_shape: tuple[int, ...], bias_shape: tuple[int, ...] | None,
                 module: Any, attention: bool) -> MuonDimensionNumbers | None:
  """The view of one ``kernel``; None means: use the default view."""
  ndim = len(kernel_shape)
  if ndim < 3:
    return None
  # DenseGeneral / LinearGeneral: the bias has the shape of the features, the
  # trailing axes of the kernel; every other axis is an input axis.
  if (bias_shape is not None and 0 < len(bias_shape) < ndim
      and kernel_shape[ndim - len(bias_shape):] == bias_shape):
    nf = len(bias_shape)
    if nf == 1:
      return None  # one feature axis: the default view (Dense, Conv)
    return MuonDimensionNumbers(reduction_axis=tuple(range(ndim - nf)),
                                output_axis=tuple(range(ndim - nf, ndim)))
  # Without a bias only attention's own layout is known: q, k, v kernels are
  # (in, heads, head_dim), the output projection (heads, head_dim, out).
  if attention and ndim == 3 and module in _QKV:
    return MuonDimensionNumbers(reduction_axis=(0,), output_axis=(1, 2))
  if attention and ndim == 3 and module == _OUT:
    return MuonDimensionNumbers(reduction_axis=(0, 1), output_axis=2)
  return None


def flax_dimension_numbers(grads: Any) -> Any:
  r"""Matrix views of Flax kernels in which attention heads are not mixed.

  Pass it as ``dimension_numbers=`` to :func:`optax_ortho.orthonormalize`,
  :func:`optax_ortho.orthogonal_sgd` or :func:`optax_ortho.orthogonal_adam`.
  It maps the gradients (a linen params dict or an nnx ``State`` of
  ``nnx.Param``) to a pytree like them of ``optax.contrib.MuonDimensionNumbers``
  (or ``None`` for leaves that pass through), recognising each leaf from its
  parameter path:

  - the query, key and value kernels of linen ``MultiHeadDotProductAttention``
    (``MultiHeadAttention``, ``SelfAttention``) and nnx ``MultiHeadAttention``,
    of shape ``(in, heads, head_dim)``, are viewed as one
    `in x (heads * head_dim)` matrix, and the output projection
    ``(heads, head_dim, out)`` as one `(heads * head_dim) x out` matrix: the
    matrix a torch ``nn.Linear`` holds (transposed), which is what the
    authors of orthonormalised gradients orthonormalise;
  - linen ``DenseGeneral`` and nnx ``LinearGeneral`` kernels with a bias: the
    trailing axes with the bias's shape are the output (feature) axes, all
    others the input (reduction) axes;
  - every ``bias`` passes through unchanged, also the 2-D ``(heads, head_dim)``
    biases of attention (1-D in torch), which the default view would treat as
    matrices;
  - everything else gets the default view (last axis = components, ``ndim <
    2`` passes through), which for ``Dense``/``Linear`` and ``Conv`` kernels is
    the same matrix.

  The default view of a 3-D kernel flattens `in x heads` into the rows and
  keeps only `head_dim` as the columns, which orthonormalises another matrix:
  on random gradients of `(64, 8, 8)` kernels it differs from the torch-Linear
  result by 0.72 (relative Frobenius norm). A ``DenseGeneral`` without a bias and not inside
  an attention module cannot be told apart from its shape; it gets the
  default view (give an explicit ``MuonDimensionNumbers`` for it if needed).
  ``DenseGeneral`` with ``batch_dims`` is not recognised either.

  Args:
    grads: the gradients (or the parameters: only paths and shapes are read).

  Returns:
    A pytree with the structure of ``grads`` whose leaves are
    ``MuonDimensionNumbers`` or ``None`` (default view of that leaf).

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax_ortho
    >>> attn = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
    >>> params = attn.init(jax.random.key(0), jnp.ones((1, 3, 6)))["params"]
    >>> dims = optax_ortho.flax_dimension_numbers(params)
    >>> query, out = dims["query"], dims["out"]
    >>> query["kernel"]
    MuonDimensionNumbers(reduction_axis=(0,), output_axis=(1, 2))
    >>> out["kernel"]
    MuonDimensionNumbers(reduction_axis=(0, 1), output_axis=2)
    >>> tx = optax_ortho.orthonormalize(
    ...     "svd", dimension_numbers=optax_ortho.flax_dimension_numbers)
    >>> grads = jax.tree.map(
    ...     lambda p: jax.random.normal(jax.random.key(1), p.shape), params)
    >>> updates, _ = tx.update(grads, tx.init(params))
    >>> query = updates["query"]
    >>> q = query["kernel"].reshape(6, 8)  # (in, heads * head_dim)
    >>> bool(jnp.allclose(q @ q.T, jnp.eye(6), atol=1e-5))
    True
  """
  flat, treedef = tree_util.tree_flatten_with_path(grads)
  paths = [_module_path(p) for p, _ in flat]
  shapes = {p: tuple(jax.numpy.shape(x)) for p, (_, x) in zip(paths, flat)}
  # Children of each module, to recognise an attention module by its parts.
  children: dict[tuple[Any, ...], set[Any]] = {}
  for p in paths:
    for i in range(1, len(p)):
      children.setdefault(p[:i - 1], set()).add(p[i - 1])

  dims: list[MuonDimensionNumbers | None] = []
  for p, (_, x) in zip(paths, flat):
    view = None
    if len(p) >= 2 and p[-1] == "kernel":
      module, parent = p[-2], p[:-2]
      siblings = children.get(parent, set())
      attention = _OUT in siblings and bool(siblings & set(_QKV))
      view = _kernel_view(tuple(jax.numpy.shape(x)),
                          shapes.get(p[:-1] + ("bias",)), module, attention)
    elif p and p[-1] == "bias":
      # A multi-axis bias, (heads, head_dim) in attention, is a vector to
      # torch (its Linear bias is 1-D), so it passes through like one.
      dims.append(None)
      continue
    dims.append(view if view is not None
                else matrix_view.default_dimension_numbers(x))
  return tree_util.tree_unflatten(treedef, dims)
