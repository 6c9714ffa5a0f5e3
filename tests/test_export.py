"""What a GPU or TPU would run, checked from this CPU with `jax.export`.

The updates are lowered for ("cuda",), ("rocm",) and ("tpu",) without a device
(docs/architecture.md, "Platform hazards"), and the StableHLO is read: on cuda/rocm the
exact and matmul-only methods must run one batched solver call per shape group
and no `while` loop (the CPU-only `jax.lax.map` workaround must not leak onto
accelerators); on tpu every method and transform must export.
"""

from __future__ import annotations

import collections
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from jax import export

import optax_ortho
from optax_ortho import linen as ortho_linen
from optax_ortho import nnx as ortho_nnx
from optax_ortho import testing

GPUS = ("cuda", "rocm")
PLATFORMS = GPUS + ("tpu",)
METHODS = ("svd", "gram", "auto", "newton_schulz", "polar_express")
# cuSOLVER / hipSOLVER targets of jnp.linalg.svd and eigh.
SVD_CALL = re.compile(r"(cu|hip)solver_gesvd")
EIGH_CALL = re.compile(r"(cu|hip)solver_(sy|he)ev")

_FUNC = re.compile(r"func\.func (?:public |private )?@([\w.$-]+)")


def program(fn, *args, platform: str) -> str:
  return export.export(jax.jit(fn), platforms=(platform,))(*args).mlir_module()


def structure(text: str) -> tuple[collections.Counter, int, int]:
  """(custom_call targets, while loops, solver calls inside a while), counted
  through the call graph from `main` (jax outlines repeated ops into private
  functions that are called more than once)."""
  starts = [(m.start(), m.group(1)) for m in _FUNC.finditer(text)]
  bodies = {
      name: text[s:(starts[i + 1][0] if i + 1 < len(starts) else len(text))]
      for i, (s, name) in enumerate(starts)
  }

  @functools.cache
  def count(name: str) -> tuple[tuple[tuple[str, int], ...], int, int]:
    body = bodies[name]
    calls = collections.Counter(re.findall(r"custom_call @(\w+)", body))
    whiles = body.count("stablehlo.while")
    in_loop = 0
    for callee in re.findall(r"call @([\w.$-]+)\(", body):
      if callee in bodies:
        sub, sub_whiles, sub_in_loop = count(callee)
        calls.update(dict(sub))
        whiles += sub_whiles
        in_loop += sub_in_loop
    # A solver call anywhere in a function that also holds a loop is
    # counted as possibly looped: strict, and exact for what jax emits.
    if body.count("stablehlo.while"):
      in_loop += sum(v for k, v in calls.items() if _is_solver(k))
    return tuple(sorted(calls.items())), whiles, in_loop

  calls, whiles, in_loop = count("main")
  return collections.Counter(dict(calls)), whiles, in_loop


def _is_solver(target: str) -> bool:
  return bool(SVD_CALL.search(target) or EIGH_CALL.search(target))


def _spec(shapes):
  return {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}


# Two shape groups (one of two matrices), a wide leaf and a bias.
SMALL = {"a": (3, 3, 4, 8), "b": (3, 3, 4, 8), "c": (8, 24), "bias": (8,)}


def _update(tx, tree):
  state = jax.eval_shape(tx.init, tree)
  return (lambda g, s: tx.update(g, s, g)), (tree, state)


def _groups(shapes):
  return len({(max(r, c), min(r, c)) for r, c in (
      (int(jnp.prod(jnp.array(s[:-1]))), s[-1]) for s in shapes.values()
      if len(s) >= 2)})


@pytest.mark.parametrize("platform", GPUS)
@pytest.mark.parametrize("method", METHODS)
def test_orthonormalize_gpu_is_batched(method, platform):
  tree = _spec(SMALL)
  fn, args = _update(optax_ortho.orthonormalize(method), tree)
  calls, whiles, in_loop = structure(program(fn, *args, platform=platform))
  assert whiles == 0 and in_loop == 0, (method, platform, whiles, calls)
  svd = sum(v for k, v in calls.items() if SVD_CALL.search(k))
  eigh = sum(v for k, v in calls.items() if EIGH_CALL.search(k))
  groups = _groups(SMALL)
  expected = {"svd": (groups, 0), "gram": (0, groups), "auto": (groups, groups),
              "newton_schulz": (0, 0), "polar_express": (0, 0)}[method]
  assert (svd, eigh) == expected, (method, platform, dict(calls))


@pytest.mark.slow
@pytest.mark.parametrize("method", ("svd", "gram", "auto"))
def test_resnet20_one_solver_call_per_group_on_cuda(method):
  shapes = testing.resnet20_shapes()
  fn, args = _update(optax_ortho.orthonormalize(method), _spec(shapes))
  calls, whiles, in_loop = structure(program(fn, *args, platform="cuda"))
  groups = _groups(shapes)
  assert groups == 9
  svd = sum(v for k, v in calls.items() if SVD_CALL.search(k))
  eigh = sum(v for k, v in calls.items() if EIGH_CALL.search(k))
  assert whiles == 0 and in_loop == 0
  assert svd == (0 if method == "gram" else groups), dict(calls)
  assert eigh == (0 if method == "svd" else groups), dict(calls)


def test_cpu_makes_unbatched_independent_lapack_calls():
  # The hang workaround: on CPU every LAPACK call is unbatched; a small stack's
  # calls are unrolled (no loop) so that XLA:CPU can run them concurrently.
  fn, args = _update(optax_ortho.orthonormalize("svd"), _spec(SMALL))
  text = jax.jit(fn).lower(*args).as_text()
  assert text.count("stablehlo.while") == 0
  assert 'num_batch_dims = "0"' in text and 'num_batch_dims = "1"' not in text


@pytest.mark.parametrize("method", METHODS)
def test_every_method_exports_for_tpu(method):
  fn, args = _update(optax_ortho.orthonormalize(method), _spec(SMALL))
  text = program(fn, *args, platform="tpu")
  calls, _, _ = structure(text)
  assert not any(_is_solver(k) for k in calls)  # no GPU solver leaks in
  if method in ("newton_schulz", "polar_express", "gram"):
    assert text.count("stablehlo.while") == 0, method


def test_multi_platform_export():
  fn, args = _update(optax_ortho.orthonormalize(), _spec(SMALL))
  exported = export.export(jax.jit(fn), platforms=PLATFORMS)(*args)
  assert exported.platforms == PLATFORMS


def _transform_cases():
  params = {"w": jax.ShapeDtypeStruct((12, 4), jnp.float32),
            "v": jax.ShapeDtypeStruct((12, 4), jnp.float32),
            "b": jax.ShapeDtypeStruct((4,), jnp.float32)}
  return {
      "orthogonal_sgd": (optax_ortho.orthogonal_sgd(0.1), params),
      "orthogonal_adam": (optax_ortho.orthogonal_adam(0.1), params),
      "stiefel_sgd": (optax_ortho.stiefel_sgd(0.1), params),
  }


@pytest.mark.slow
@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("name", ("orthogonal_sgd", "orthogonal_adam",
                                  "stiefel_sgd"))
def test_transforms_export(name, platform):
  tx, params = _transform_cases()[name]
  fn, args = _update(tx, params)
  calls, whiles, in_loop = structure(program(fn, *args, platform=platform))
  if platform in GPUS:
    assert whiles == 0 and in_loop == 0, dict(calls)


def _linen_step(layer, x_shape):
  x = jnp.zeros(x_shape)
  params = jax.eval_shape(layer.init, jax.random.key(0), x)

  def loss(p, x):
    return jnp.sum(layer.apply(p, x) ** 2)

  return jax.grad(loss), (params, jax.ShapeDtypeStruct(x_shape, jnp.float32))


@pytest.mark.slow
@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("method", ("cayley", "gram_schmidt", "householder",
                                    "lowdin"))
def test_linen_opt_layers_export(method, platform):
  dense, dense_args = _linen_step(ortho_linen.OrthogonalDense(6, method=method),
                                  (2, 5))
  conv, conv_args = _linen_step(
      ortho_linen.OrthogonalConv(4, (3, 3), method=method), (1, 6, 6, 2))
  for fn, args in ((dense, dense_args), (conv, conv_args)):
    structure(program(fn, *args, platform=platform))


@pytest.mark.parametrize("platform", PLATFORMS)
def test_nnx_opt_layer_exports(platform):
  model = ortho_nnx.OrthogonalLinear(5, 6, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)

  def loss(state, x):
    return jnp.sum(nnx.merge(graphdef, state)(x) ** 2)

  state_spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                            state)
  structure(program(jax.grad(loss), state_spec,
                    jax.ShapeDtypeStruct((2, 5), jnp.float32),
                    platform=platform))


def test_linen_opt_training_step_exports_for_cuda():
  # Forward, grad and the paper's optimizer in one step, as a user jits it.
  model = nn.Sequential([ortho_linen.OrthogonalDense(6), nn.relu, nn.Dense(2)])
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 5)))
  tx = optax.chain(optax_ortho.orthonormalize(), optax.sgd(0.1))
  opt_state = jax.eval_shape(tx.init, params)

  def step(params, opt_state, x):
    grads = jax.grad(lambda p: jnp.sum(model.apply(p, x) ** 2))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  calls, whiles, in_loop = structure(program(
      step, params, opt_state, jax.ShapeDtypeStruct((2, 5), jnp.float32),
      platform="cuda"))
  assert in_loop == 0, dict(calls)


@pytest.mark.slow
@pytest.mark.parametrize("platform", PLATFORMS)
def test_cayley_dense_blocked_inverse_exports(platform):
  # Width 130 > the 64-wide leaves, batch 16 >= 130 / 16: the Cayley solve
  # takes the blocked-inverse route (cayley_solve), whose leaves must lower
  # on accelerators too, and without a loop on GPUs.
  step, args = _linen_step(ortho_linen.OrthogonalDense(130), (16, 130))
  calls, whiles, in_loop = structure(program(step, *args, platform=platform))
  if platform in GPUS:
    assert whiles == 0 and in_loop == 0, dict(calls)
    assert sum(n for c, n in calls.items() if "getrf" in c) >= 2, dict(calls)


def test_many_distinct_narrow_shapes_share_padded_solver_calls_on_cuda():
  # Eight narrow widths (more than `buckets.MAX_WIDTHS`): on a GPU, as on
  # CPU, they are zero-padded into one stack per power of two of width (and
  # of rows, above `buckets.SHARED_ROWS`), each with one batched eigh and one
  # batched SVD, not one per shape.
  shapes = {f"w{i}": (8 + 5 * i, 3 + 5 * i) for i in range(8)}  # widths 3..38
  shapes["tall"] = (600, 5)
  fn, args = _update(optax_ortho.orthonormalize("auto"), _spec(shapes))
  calls, whiles, in_loop = structure(program(fn, *args, platform="cuda"))
  svd = sum(v for k, v in calls.items() if SVD_CALL.search(k))
  eigh = sum(v for k, v in calls.items() if EIGH_CALL.search(k))
  stacks = len({(max(8, 1 << (n - 1).bit_length()), max(512, 1 << (m - 1).bit_length()))
                for m, n in shapes.values()})
  assert stacks == 5
  assert stacks < len(shapes)
  assert whiles == 0 and in_loop == 0
  assert (svd, eigh) == (stacks, stacks), dict(calls)
