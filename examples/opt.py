"""OPT on digits: hyperspherical energy of every layer over training.

    python examples/opt.py                 # plain CNN vs OPT (Cayley) vs OPT-OGD
    python examples/opt.py --steps 50 --out /tmp/opt

Trains examples/compare.py's CNN three ways with SGD + momentum: plainly, with
OPT layers (W = Q(R) V, V fixed, Q by the Cayley map), and with OPT layers whose
Q is trained directly on the orthogonal group by `optax_ortho.stiefel_sgd` (the
paper's OGD), at the learning rates of examples/defaults.py (sgd, opt_sgd,
stiefel_sgd: 0.05, 1.0, 0.05). Records the hyperspherical energy of each layer's neurons every
`--energy-every` steps, prints a table and writes `energy.png` and
`opt_results.json` into `--out`. OPT's point (Liu et al., CVPR 2021): the
energy of its layers stays at the value of the random initialisation, which is
close to minimal, whereas plain training moves it.
"""

from __future__ import annotations

import os

# One OpenBLAS thread, set before numpy and jax load it: jaxlib's CPU LAPACK
# kernels call scipy's OpenBLAS, whose spinning thread pool fights XLA's
# threads (SVDs 10-200x slower on a busy CPU; docs/getting_started.md).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import functools
import json
import sys

import jax
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402
import defaults  # noqa: E402

import optax_ortho  # noqa: E402  (compare puts the repository on sys.path)
from optax_ortho import linen as ortho_nn  # noqa: E402

LR, MOMENTUM = defaults.LEARNING_RATE, defaults.MOMENTUM

VARIANTS = {
    "plain": (compare.CNN, lambda: optax.sgd(LR["sgd"], momentum=MOMENTUM)),
    "opt_cayley": (lambda: compare.OPTCNN(method="cayley"),
                   lambda: compare.trainable_only(
                       optax.sgd(LR["opt_sgd"], momentum=MOMENTUM))),
    # R is Q itself, an orthogonal matrix moved along the manifold.
    "opt_ogd": (lambda: compare.OPTCNN(method=None),
                lambda: compare.trainable_only(optax_ortho.stiefel_sgd(
                    LR["stiefel_sgd"], momentum=MOMENTUM,
                    mask=compare.stiefel_mask))),
}


def layer_kernels(variables, method) -> dict[str, jax.Array]:
  """Each layer's effective kernel W, by layer name (Conv_0, ..., Dense_1)."""
  out = {}
  for name, p in variables["params"].items():
    if "kernel" in p:
      out[name] = p["kernel"]
    else:  # W = Q(R) V, with the neurons of V as columns
      v = variables[ortho_nn.FIXED][name]["V"]
      q = p["R"] if method is None else optax_ortho.orthogonal_map(
          p["R"], method=method)
      out[name.removeprefix("Orthogonal")] = (
          q @ v.reshape((-1, v.shape[-1]))).reshape(v.shape)
  return out


@functools.partial(jax.jit, static_argnums=1)
def _energies(variables, method):
  return {k: optax_ortho.hyperspherical_energy(w)
          for k, w in layer_kernels(variables, method).items()}


def energies(variables, method) -> dict[str, float]:
  return {k: float(e) for k, e in _energies(variables, method).items()}


def run(name, steps, batch_size, energy_every, data, seed=0) -> dict:
  (x_train, y_train), (x_test, y_test) = data
  make_model, make_tx = VARIANTS[name]
  model, tx = make_model(), make_tx()
  method = getattr(model, "method", None)
  variables = model.init(jax.random.key(seed), x_train[:1])
  opt_state = tx.init(variables)

  @jax.jit
  def step(variables, opt_state, x, y):
    def loss_fn(v):
      return compare.cross_entropy(model.apply(v, x), y)

    loss, grads = jax.value_and_grad(loss_fn)(variables)
    updates, opt_state = tx.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  history = {"step": [0], "energy": [energies(variables, method)]}
  for i in range(1, steps + 1):
    idx = rng.integers(0, len(x_train), batch_size)
    variables, opt_state, loss = step(variables, opt_state, x_train[idx],
                                      y_train[idx])
    if i % energy_every == 0 or i == steps:
      history["step"].append(i)
      history["energy"].append(energies(variables, method))
  acc = compare.accuracy(jax.jit(model.apply), variables, x_test, y_test)
  return {"variant": name, "history": history, "final_loss": float(loss),
          "test_accuracy": acc}


def plot(runs, out):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  layers = list(runs[0]["history"]["energy"][0])
  fig, axes = plt.subplots(1, len(layers), figsize=(4 * len(layers), 3.5))
  # Changes since initialisation: the variants start from different random
  # kernels, so absolute energies differ by their draw.
  for ax, layer in zip(np.atleast_1d(axes), layers):
    for i, r in enumerate(runs):
      h = r["history"]
      e0 = h["energy"][0][layer]
      ax.plot(h["step"], [e[layer] - e0 for e in h["energy"]],
              label=r["variant"], linestyle=("-", "--", ":")[i % 3])
    ax.set(title=f"layer {layer}", xlabel="step",
           ylabel="hyperspherical energy - initial")
  np.atleast_1d(axes)[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "energy.png"), dpi=120)
  plt.close(fig)


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=defaults.HelpFormatter)
  parser.add_argument("--variants", nargs="+", default=list(VARIANTS),
                      choices=list(VARIANTS), help="networks and optimizers to train")
  parser.add_argument("--steps", type=int, default=300, help="training steps")
  parser.add_argument("--batch-size", type=int, default=64, help="training batch size")
  parser.add_argument("--energy-every", type=int, default=20,
                      help="steps between energy measurements")
  parser.add_argument("--out", default="out", help="output folder")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  data = compare.load_digits_split()
  runs = [run(v, args.steps, args.batch_size, args.energy_every, data)
          for v in args.variants]
  print(f"{'variant':<12} {'test acc':>8}  energy per layer: start -> end")
  for r in runs:
    first, last = r["history"]["energy"][0], r["history"]["energy"][-1]
    layers = "  ".join(f"{k}: {first[k]:.4f}->{last[k]:.4f}" for k in first)
    print(f"{r['variant']:<12} {r['test_accuracy']:>8.4f}  {layers}")
  plot(runs, args.out)
  with open(os.path.join(args.out, "opt_results.json"), "w") as f:
    json.dump({"args": vars(args), "runs": runs}, f, indent=1)
  print(f"wrote {args.out}/energy.png, opt_results.json")
  return runs


if __name__ == "__main__":
  main()
