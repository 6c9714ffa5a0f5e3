"""Step time of Flax's MNIST training program with orthonormalize and GNP, as ratios.

    python benchmarks/flax_programs.py [--batch-size 128] [--rounds 20] [--out FILE]

The program is Flax's linen MNIST example (Conv 32 - Conv 64 - Dense 256 -
Dense 10, average pooling; a `TrainState`, one jitted step) with BatchNorm
after each convolution, a `batch_stats` field and dropout before the head,
as users extend it. Its own optimizer, SGD with momentum, is the baseline;
`orthonormalize()` in front of it and `gradient_norm_penalty` (two forward
and backward passes) are measured in the same process, on the same batch,
interleaved round by round, so the machine's load affects all of them alike.
The ratios are medians over rounds of (step time / baseline step time).
"""

from __future__ import annotations

import os

# One OpenBLAS thread, before numpy and jax load it (docs/getting_started.md).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import platform
import time

import flax.linen as nn
import jax
import numpy as np
import optax
from flax.training import train_state

import optax_ortho


class CNN(nn.Module):
  """Flax's MNIST CNN with BatchNorm and dropout."""

  @nn.compact
  def __call__(self, x, train: bool):
    for features in (32, 64):
      x = nn.Conv(features, (3, 3))(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      x = nn.avg_pool(nn.relu(x), (2, 2), strides=(2, 2))
    x = nn.relu(nn.Dense(256)(x.reshape(x.shape[0], -1)))
    x = nn.Dropout(0.1, deterministic=not train)(x)
    return nn.Dense(10)(x)


class TrainState(train_state.TrainState):
  batch_stats: dict


def make_step(with_grad_fn: bool):
  @jax.jit
  def step(state, x, y):
    key = jax.random.fold_in(jax.random.key(0), state.step)

    def loss_fn(params):
      logits, updates = state.apply_fn(
          {"params": params, "batch_stats": state.batch_stats}, x, train=True,
          rngs={"dropout": key}, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    extra = {"grad_fn": jax.grad(loss_fn, has_aux=True)} if with_grad_fn else {}
    return optax_ortho.apply_gradients(state, grads, batch_stats=batch_stats, **extra), loss

  return step


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--rounds", type=int, default=20)
  parser.add_argument("--steps", type=int, default=5, help="steps per round")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__),
                                                    "flax_programs.json"))
  args = parser.parse_args(argv)
  load_before = os.getloadavg()[0]

  x = jax.random.normal(jax.random.key(1), (args.batch_size, 28, 28, 1))
  y = jax.random.randint(jax.random.key(2), (args.batch_size,), 0, 10)
  model = CNN()
  variables = model.init(jax.random.key(3), x, train=False)
  sgd = optax.sgd(0.05, momentum=0.9)
  chains = {
      "sgd (the example's own)": (sgd, False),
      "orthonormalize + sgd": (
          optax.chain(optax_ortho.orthonormalize(), optax.sgd(0.005, momentum=0.9)), False),
      "gradient_norm_penalty + sgd": (
          optax.chain(optax_ortho.gradient_norm_penalty(0.8, 0.05, has_aux=True), sgd), True),
  }
  runs = {}
  for name, (tx, with_grad_fn) in chains.items():
    state = TrainState.create(apply_fn=model.apply, params=variables["params"],
                              batch_stats=variables["batch_stats"], tx=tx)
    step = make_step(with_grad_fn)
    state, loss = step(state, x, y)  # compile
    jax.block_until_ready(loss)
    runs[name] = [step, state, []]

  for _ in range(args.rounds):
    for run in runs.values():
      step, state, times = run
      start = time.perf_counter()
      for _ in range(args.steps):
        state, loss = step(state, x, y)
      jax.block_until_ready((state, loss))
      times.append((time.perf_counter() - start) / args.steps)
      run[1] = state

  base = np.array(next(iter(runs.values()))[2])
  result = {
      "program": "Flax linen MNIST CNN + BatchNorm + dropout, TrainState(batch_stats)",
      "batch_size": args.batch_size,
      "rounds": args.rounds,
      "steps_per_round": args.steps,
      "platform": f"{jax.devices()[0].platform}, {platform.processor() or platform.machine()},"
                  f" {os.cpu_count()} cores",
      "loadavg_before": load_before,
      "step_ms": {k: round(float(np.median(v[2])) * 1e3, 2) for k, v in runs.items()},
      "ratio_to_own_optimizer": {
          k: round(float(np.median(np.array(v[2]) / base)), 3) for k, v in runs.items()},
  }
  result["loadavg_after"] = os.getloadavg()[0]
  print(json.dumps(result, indent=2))
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  main()
