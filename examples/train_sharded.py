"""Data + model parallel training of a Flax MLP with optax-ortho on a device mesh.

    python examples/train_sharded.py                          # 8 virtual CPU devices
    python examples/train_sharded.py --method gradient_norm_penalty
    python examples/train_sharded.py --polar newton_schulz --parallel replicated
    python examples/train_sharded.py --axis-types auto --mesh 4 2

The same script runs unchanged on a TPU pod slice or a multi-GPU host: there
`jax.devices()` are the accelerators (the CPU device count set below only
affects the CPU backend); on several hosts add `--distributed`, which calls
`jax.distributed.initialize()` (see docs/tpu_pods.md).

The mesh has axes ("data", "model"). The batch is split over "data"; the
hidden layers are tensor-parallel over "model" (the first kernel split by its
output columns, the second by its input rows, Megatron style); optimizer
state follows the parameters. Digits (scikit-learn's 8x8 images, no
download) is the data set.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax

# Before JAX starts: 8 CPU devices when no accelerator is there. Harmless on
# TPU/GPU, and a no-op if the backend already started with this value.
if jax.config.jax_num_cpu_devices != 8:
  try:
    jax.config.update("jax_num_cpu_devices", 8)
  except RuntimeError:  # the backend is up already (e.g. imported by a test)
    pass

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import optax_ortho  # noqa: E402

# ----------------------------------------------------------------- model


def constrain(x: jax.Array, spec: P) -> jax.Array:
  """Sets an activation's sharding on the current mesh (a no-op without one)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  if AxisType.Explicit in mesh.axis_types:
    return jax.sharding.reshard(x, spec)
  return jax.lax.with_sharding_constraint(x, spec)


class MLP(nn.Module):
  """Two tensor-parallel hidden layers and a replicated head."""

  hidden: int = 256
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.hidden, name="up")(x))  # columns over "model"
    # Gathered before the row-parallel layer: under Explicit axes a
    # contraction over a dimension sharded on both sides is ambiguous.
    x = constrain(x, P("data", None))
    x = nn.relu(nn.Dense(self.hidden, name="down")(x))  # rows over "model"
    return nn.Dense(self.num_classes, name="head")(x)


# Partition specs of the parameters, by layer: the mesh choice in one place.
PARAM_SPECS = {
    "up": {"kernel": P(None, "model"), "bias": P("model")},
    "down": {"kernel": P("model", None), "bias": P()},
    "head": {"kernel": P(), "bias": P()},
}


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


# --------------------------------------------------------------- methods

LR = 0.05


def _plain(loss_fn, params, x, y):
  loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
  return loss, grads, {}


def _with_grad_fn(loss_fn, params, x, y):
  loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
  return loss, grads, {"grad_fn": jax.grad(lambda p: loss_fn(p, x, y))}


def make_method(args, model, loss_fn):
  """(transform, grads(params, x, y) -> (loss, grads, extra update kwargs))."""
  sgd = optax.sgd(LR, momentum=0.9)
  if args.method == "sgd":
    return sgd, lambda p, x, y: _plain(loss_fn, p, x, y)
  if args.method == "orthonormalize":
    return optax.chain(
        optax_ortho.orthonormalize(args.polar, parallel=args.parallel), sgd
    ), lambda p, x, y: _plain(loss_fn, p, x, y)
  if args.method == "gradient_norm_penalty":
    return optax.chain(
        optax_ortho.gradient_norm_penalty(alpha=0.8, radius=0.05), sgd
    ), lambda p, x, y: _with_grad_fn(loss_fn, p, x, y)
  # Every other method registered in examples/compare.py, with its own
  # hyperparameters and extra arguments (e.g. methods added later).
  import compare

  method = compare.METHODS[args.method]
  ctx = compare.Context(model=model, apply_fn=model.apply, loss_fn=loss_fn)
  return method.make(), lambda p, x, y: method.grads(ctx, p, x, y)


def method_names() -> list[str]:
  names = ["sgd", "orthonormalize", "gradient_norm_penalty"]
  try:
    import compare
  except ImportError:  # compare.py needs the examples extras
    return names
  return names + sorted(set(compare.METHODS) - set(names))


# -------------------------------------------------------------- training


def load_data(seed=0):
  from sklearn.datasets import load_digits

  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  perm = np.random.default_rng(seed).permutation(len(x))
  n_test = len(x) // 4
  return (x[perm[n_test:]], y[perm[n_test:]]), (x[perm[:n_test]], y[perm[:n_test]])


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--method", default="orthonormalize", choices=method_names())
  parser.add_argument("--polar", default="svd",
                      choices=["svd", "gram", "auto", "newton_schulz", "polar_express"],
                      help="polar method of --method orthonormalize")
  parser.add_argument("--parallel", default="layers", choices=["replicated", "layers"],
                      help="orthonormalize: replicate every polar factor, or"
                      " compute each once on one device")
  parser.add_argument("--mesh", type=int, nargs=2, default=None,
                      metavar=("DATA", "MODEL"),
                      help="mesh shape; default (n/4, 4) on n >= 4 devices")
  parser.add_argument("--axis-types", default="explicit", choices=["explicit", "auto"])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--hidden", type=int, default=256)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--distributed", action="store_true",
                      help="call jax.distributed.initialize() (multi-host)")
  args = parser.parse_args(argv)
  if args.distributed:
    jax.distributed.initialize()

  n = jax.device_count()
  shape = tuple(args.mesh) if args.mesh else ((n // 4, 4) if n >= 4 else (n, 1))
  axis_type = AxisType.Explicit if args.axis_types == "explicit" else AxisType.Auto
  mesh = jax.make_mesh(shape, ("data", "model"), axis_types=(axis_type,) * 2)
  if args.batch_size % shape[0] or args.hidden % shape[1]:
    parser.error(f"--batch-size must divide by {shape[0]} and --hidden by {shape[1]}")

  (x_train, y_train), (x_test, y_test) = load_data(args.seed)
  model = MLP(hidden=args.hidden)

  def loss_fn(params, x, y):
    return cross_entropy(model.apply(params, x), y)

  tx, grads_fn = make_method(args, model, loss_fn)

  with jax.set_mesh(mesh):
    batch_sharding = NamedSharding(mesh, P("data"))
    param_shardings = {"params": jax.tree.map(
        lambda s: NamedSharding(mesh, s), PARAM_SPECS)}
    params = jax.jit(model.init, out_shardings=param_shardings)(
        jax.random.key(args.seed), jnp.zeros((shape[0], x_train.shape[1])))
    opt_state = jax.jit(tx.init)(params)
    state_shardings = jax.tree.map(lambda a: a.sharding, opt_state)

    # Shardings pinned on the way out, so that every step sees the same input
    # shardings (no recompilation under Auto axes) and the buffers are reused.
    def step(params, opt_state, x, y):
      loss, grads, extra = grads_fn(params, x, y)
      updates, opt_state = tx.update(grads, opt_state, params, **extra)
      return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(step, out_shardings=(param_shardings, state_shardings, None),
                   donate_argnums=(0, 1))
    predict = jax.jit(lambda p, x: jnp.argmax(model.apply(p, x), -1))

    rng = np.random.default_rng(args.seed)
    times, losses = [], []
    for i in range(args.steps):
      idx = rng.integers(0, len(x_train), args.batch_size)
      x = jax.device_put(x_train[idx], batch_sharding)
      y = jax.device_put(y_train[idx], batch_sharding)
      t0 = time.perf_counter()
      params, opt_state, loss = step(params, opt_state, x, y)
      losses.append(float(loss))
      if i:  # the first step compiles
        times.append(time.perf_counter() - t0)
    n_eval = len(x_test) - len(x_test) % shape[0]
    pred = predict(params, jax.device_put(x_test[:n_eval], batch_sharding))
    accuracy = float(np.mean(np.asarray(pred) == y_test[:n_eval]))
    kept = all(a.sharding.is_equivalent_to(s, a.ndim) for a, s in zip(
        jax.tree.leaves(params), jax.tree.leaves(param_shardings)))

  result = {
      "method": args.method, "polar": args.polar, "parallel": args.parallel,
      "mesh": dict(zip(("data", "model"), shape)), "axis_types": args.axis_types,
      "devices": n, "platform": jax.devices()[0].platform,
      "first_loss": losses[0], "final_loss": float(np.mean(losses[-10:])),
      "test_accuracy": accuracy,
      "ms_per_step": 1e3 * float(np.median(times)) if times else float("nan"),
      "param_shardings_kept": kept,
  }
  print(f"{n} {result['platform']} devices, mesh {result['mesh']}"
        f" ({args.axis_types} axes), method {args.method}"
        + (f" [{args.polar}, {args.parallel}]" if args.method == "orthonormalize" else ""))
  print(f"loss {result['first_loss']:.3f} -> {result['final_loss']:.3f},"
        f" test accuracy {accuracy:.4f}, {result['ms_per_step']:.2f} ms/step")
  return result


if __name__ == "__main__":
  main()
