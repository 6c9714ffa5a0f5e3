"""Benchmark: a gradient-norm-penalty training step against a plain one.

One process, one CNN (three convolutions and a dense layer on 32x32x3 images,
CIFAR-sized), four jitted training steps that all end in SGD with momentum:

- ``plain``:     one forward-backward pass;
- ``two_grads``: two forward-backward passes and nothing else (the floor of any
  two-point method);
- ``gnp``:       ``chain(gradient_norm_penalty(0.8, 0.05), sgd)``;
- ``gnp_refresh5``: the same with ``refresh_every=5`` (the second gradient on
  every fifth step, its stored direction reused between; timed over rounds of
  5 steps, so every round holds one exact step);
- ``sam``:       ``optax.contrib.sam(sgd, chain(normalize(), sgd(0.05)),
  opaque_mode=True)``, the same two passes as optax does them.

Runs are interleaved (every round times each step once, in a rotating order)
and the table reports medians over rounds of the per-round ratios, so drift of
a shared machine cancels; the quartiles show how noisy the machine was. XLA's
cost model of each compiled step (flops, bytes accessed) is printed as a
noise-free cross-check. Writes ``benchmarks/gnp.json``.

    python benchmarks/gnp.py               # 31 rounds
    python benchmarks/gnp.py --rounds 15 --batch-size 32
    python benchmarks/gnp.py --load 4      # with 4 busy processes
"""

from __future__ import annotations

import os

# One OpenBLAS thread, set before numpy and jax load it: jaxlib's CPU LAPACK
# kernels call scipy's OpenBLAS, whose spinning thread pool fights XLA's
# threads (SVDs 10-200x slower on a busy CPU; docs/getting_started.md).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from busy import busy_processes  # noqa: E402  (benchmarks/, the script's folder)

import optax_ortho  # noqa: E402

ALPHA, RADIUS, LR = 0.8, 0.05, 0.05
GOALS = {"gnp / plain": 2.05, "gnp / sam": 1.0, "gnp_refresh5 / plain": 1.25}


class CNN(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    x = nn.relu(nn.Conv(64, (3, 3), strides=(2, 2))(x))
    x = nn.relu(nn.Conv(64, (3, 3), strides=(2, 2))(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(10)(x)


class MLP(nn.Module):
  """A dense network on the same images: no convolution."""

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(512)(x))
    x = nn.relu(nn.Dense(512)(x))
    return nn.Dense(10)(x)


MODELS = {"cnn": CNN, "mlp": MLP}


def make_steps(model):
  def loss_fn(params, x, y):
    logits = model.apply(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def sgd():
    return optax.sgd(LR, momentum=0.9)

  txs = {
      "plain": sgd(),
      "two_grads": sgd(),
      "gnp": optax.chain(optax_ortho.gradient_norm_penalty(ALPHA, RADIUS), sgd()),
      "gnp_refresh5": optax.chain(
          optax_ortho.gradient_norm_penalty(ALPHA, RADIUS, refresh_every=5), sgd()),
      "sam": optax.contrib.sam(
          sgd(), optax.chain(optax.contrib.normalize(), optax.sgd(RADIUS)),
          sync_period=2, opaque_mode=True),
  }

  def step_fn(name):
    tx = txs[name]

    def step(params, state, x, y):
      grads = jax.grad(loss_fn)(params, x, y)
      if name == "plain":
        updates, state = tx.update(grads, state, params)
      elif name == "two_grads":
        # A second pass at other params, as the two-point methods do.
        shifted = jax.tree.map(lambda p, g: p + 1e-3 * g, params, grads)
        grads = jax.grad(loss_fn)(shifted, x, y)
        updates, state = tx.update(grads, state, params)
      elif name in ("gnp", "gnp_refresh5"):
        updates, state = tx.update(
            grads, state, params, grad_fn=jax.grad(lambda p: loss_fn(p, x, y)))
      else:
        updates, state = tx.update(
            grads, state, params,
            grad_fn=jax.grad(lambda p, _: loss_fn(p, x, y)))
      return optax.apply_updates(params, updates), state

    return jax.jit(step), tx

  return {name: step_fn(name) for name in txs}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rounds", type=int, default=31)
  parser.add_argument("--steps-per-round", type=int, default=5)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--model", choices=list(MODELS), default="cnn",
                      help="cnn: XLA's CPU backend runs a convolution inside lax.cond"
                           " (refresh_every's branch) far slower than outside it;"
                           " mlp: no convolution")
  parser.add_argument("--load", type=int, default=0,
                      help="busy processes to run alongside the timed rounds")
  parser.add_argument("--out", default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), "gnp.json"))
  args = parser.parse_args(argv)

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((args.batch_size, 32, 32, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, args.batch_size), jnp.int32)
  model = MODELS[args.model]()
  params0 = model.init(jax.random.key(0), x[:1])
  steps = make_steps(model)
  names = list(steps)

  carry, cost = {}, {}
  for name, (step, tx) in steps.items():  # compile and warm up
    analysis = step.lower(params0, tx.init(params0), x, y).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    cost[name] = {k: float(analysis.get(k, float("nan")))
                  for k in ("flops", "bytes accessed")}
    p, s = step(params0, tx.init(params0), x, y)
    jax.block_until_ready(p)
    carry[name] = (p, s)

  times = {name: [] for name in names}
  with busy_processes(args.load):
    loadavg_before = os.getloadavg()
    for r in range(args.rounds):
      order = names[r % len(names):] + names[:r % len(names)]
      for name in order:
        step, _ = steps[name]
        p, s = carry[name]
        t0 = time.perf_counter()
        for _ in range(args.steps_per_round):
          p, s = step(p, s, x, y)
        jax.block_until_ready(p)
        times[name].append((time.perf_counter() - t0) / args.steps_per_round)
        carry[name] = (p, s)
    loadavg_after = os.getloadavg()

  t = {k: np.asarray(v) for k, v in times.items()}
  pairs = [("two_grads", "plain"), ("gnp", "plain"), ("gnp_refresh5", "plain"),
           ("sam", "plain"),
           ("gnp", "sam"), ("gnp", "two_grads")]
  per_round = {f"{a} / {b}": t[a] / t[b] for a, b in pairs}
  ratios = {k: float(np.median(v)) for k, v in per_round.items()}
  quartiles = {k: [float(q) for q in np.percentile(v, [25, 75])]
               for k, v in per_round.items()}
  print(f"{'ratio (median of per-round ratios)':<24} {'median':>7}"
        f" {'quartiles':>15} {'goal':>8}")
  for k, v in ratios.items():
    goal = GOALS.get(k)
    q1, q3 = quartiles[k]
    print(f"{k:<24} {v:>7.3f} {f'{q1:.3f}-{q3:.3f}':>15}"
          f" {'' if goal is None else f'<= {goal}':>8}")
  # XLA's cost model of the compiled steps: noise-free, but not a timing.
  cost_ratios = {f"{a} / {b}": {k: cost[a][k] / cost[b][k] for k in cost[a]}
                 for a, b in pairs}
  print(f"{'XLA cost model':<24} {'flops':>7} {'bytes':>7}")
  for k, v in cost_ratios.items():
    print(f"{k:<24} {v['flops']:>7.4f} {v['bytes accessed']:>7.4f}")
  print(f"({args.rounds} rounds x {args.steps_per_round} steps, batch"
        f" {args.batch_size}, {jax.devices()[0].platform}; median ms/step: "
        + ", ".join(f"{k} {1e3 * np.median(v):.2f}" for k, v in t.items()) + ")")
  result = {
      "args": vars(args), "backend": jax.devices()[0].platform,
      "loadavg_before": loadavg_before, "loadavg_after": loadavg_after,
      "ratios": ratios, "ratio_quartiles": quartiles, "goals": GOALS,
      "cost_model": cost, "cost_model_ratios": cost_ratios,
      "median_seconds_per_step": {k: float(np.median(v)) for k, v in t.items()},
      "seconds_per_step": {k: v.tolist() for k, v in t.items()},
  }
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main()
