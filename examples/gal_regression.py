"""GAL on scikit-learn's diabetes regression: the paper's Table V row.

Luo et al. report, for a 64-32 MLP trained with Adam, with and without GAL
(adjuster 128-4, alpha = beta = 1e-3), over 5 seeds:

    MAE 44.38 +- 0.78 -> 41.62 +- 0.30,  R^2 0.382 -> 0.433,  t-test p < 1e-4.

This script runs the same protocol (data embedded in scikit-learn, no
download) and prints the table next to the paper's numbers:

    python examples/gal_regression.py                  # 5 seeds, 20 epochs
    python examples/gal_regression.py --seeds 2 --epochs 5 --out /tmp/gal

Choices the paper leaves open (docs/methods/gal.md explains them): one fixed
80/20 train/test split (seeds change the initialisation and the batch order,
shared by both methods), features and target standardised with training
statistics (metrics in the original units), batch 32, Adam lr 1e-3, metrics
after the last epoch (no early stopping). Writes `gal_regression.png` (test MAE
per epoch and final metrics) and `gal_regression.json` into `--out`.

With one output GAL cannot learn (v/|v| is +-1, its derivative 0; `gal` warns):
the adjustment is a fixed rescaling of each sample's gradient by 1 +- alpha.
`benchmarks/gal_diabetes.py` measures the effect with paired seeds, confidence
intervals and a random-sign control.
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

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import stats
from sklearn.datasets import load_diabetes

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import optax_ortho  # noqa: E402

PAPER = {
    "baseline": {"mae": (44.38, 0.78), "r2": (0.382, None)},
    "gal": {"mae": (41.62, 0.30), "r2": (0.433, None)},
}


def load_split(test_fraction: float = 0.2, split_seed: int = 0):
  """Diabetes, standardised with training statistics; y also returned raw."""
  x, y = load_diabetes(return_X_y=True, scaled=False)
  x, y = x.astype(np.float32), y.astype(np.float32)
  perm = np.random.default_rng(split_seed).permutation(len(x))
  n_test = int(round(len(x) * test_fraction))
  test, train = perm[:n_test], perm[n_test:]
  mu, sd = x[train].mean(0), x[train].std(0)
  y_mu, y_sd = y[train].mean(), y[train].std()
  xs = (x - mu) / sd
  return {
      "x_train": xs[train], "y_train": (y[train] - y_mu) / y_sd,
      "x_test": xs[test], "y_test_raw": y[test], "y_mean": y_mu, "y_std": y_sd,
  }


class MLP(nn.Module):
  """The paper's regression MLP: 64-32 hidden units, ReLU, one output."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(64)(x))
    x = nn.relu(nn.Dense(32)(x))
    return nn.Dense(1)(x)


def mse_loss(pred, y):
  return jnp.mean(jnp.square(pred[:, 0] - y))


def train(method: str, data: dict, seeds: int, epochs: int, batch_size: int,
          lr: float, alpha: float, beta: float):
  """Trains `seeds` models at once (vmap); returns test predictions and curves."""
  model = MLP()
  x_train, y_train = jnp.asarray(data["x_train"]), jnp.asarray(data["y_train"])
  x_test = jnp.asarray(data["x_test"])
  y_test = jnp.asarray(data["y_test_raw"])
  n_batches = len(x_train) // batch_size
  value_and_grad = optax_ortho.gal_value_and_grad(model.apply, mse_loss)

  def run(seed):
    key = jax.random.key(seed)
    params = model.init(key, x_train[:1])
    if method == "gal":
      tx = optax.chain(
          optax_ortho.gal(1, lr, alpha=alpha, beta=beta, hidden_sizes=(128, 4),
                          seed=seed),
          optax.adam(lr))
    else:
      tx = optax.adam(lr)
    state = tx.init(params)

    def step(carry, idx):
      params, state = carry
      x, y = x_train[idx], y_train[idx]
      if method == "gal":
        loss, grads, gal_args = value_and_grad(params, x, y)
      else:
        loss, grads = jax.value_and_grad(
            lambda p: mse_loss(model.apply(p, x), y))(params)
        gal_args = {}
      updates, state = tx.update(grads, state, params, **gal_args)
      accepted = state[0].accepted_fraction if method == "gal" else jnp.nan
      return (optax.apply_updates(params, updates), state), (loss, accepted)

    def epoch(carry, epoch_key):
      perm = jax.random.permutation(epoch_key, len(x_train))
      idx = perm[:n_batches * batch_size].reshape(n_batches, batch_size)
      carry, (losses, accepted) = jax.lax.scan(step, carry, idx)
      pred = model.apply(carry[0], x_test)[:, 0] * data["y_std"] + data["y_mean"]
      return carry, (losses.mean(), jnp.mean(jnp.abs(pred - y_test)),
                     accepted.mean())

    keys = jax.random.split(jax.random.fold_in(key, 1), epochs)
    (params, _), (train_loss, test_mae, accepted) = jax.lax.scan(
        epoch, (params, state), keys)
    pred = model.apply(params, x_test)[:, 0] * data["y_std"] + data["y_mean"]
    return pred, train_loss, test_mae, accepted

  pred, train_loss, test_mae, accepted = jax.jit(jax.vmap(run))(
      jnp.arange(seeds))
  return {"pred": np.asarray(pred), "train_loss": np.asarray(train_loss),
          "test_mae": np.asarray(test_mae), "accepted": np.asarray(accepted)}


def metrics(pred: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
  """MAE, MSE and R^2 per seed (rows of `pred`)."""
  err = pred - y[None]
  ss_tot = np.sum(np.square(y - y.mean()))
  return {"mae": np.abs(err).mean(1), "mse": np.square(err).mean(1),
          "r2": 1.0 - np.square(err).sum(1) / ss_tot}


def format_table(results: dict, tests: dict) -> str:
  lines = [f"{'':<10} {'MAE':>16} {'MSE':>20} {'R^2':>16}   paper MAE / R^2"]
  for name in ("baseline", "gal"):
    m = results[name]
    cells = [f"{m[k].mean():>9.3f} +- {m[k].std(ddof=1) if len(m[k]) > 1 else 0.0:<5.3f}"
             for k in ("mae", "mse", "r2")]
    pm, pr = PAPER[name]["mae"], PAPER[name]["r2"][0]
    lines.append(f"{name:<10} {cells[0]:>16} {cells[1]:>20} {cells[2]:>16}"
                 f"   {pm[0]:.2f} +- {pm[1]:.2f} / {pr:.3f}")
  lines.append("two-sample t-test, GAL vs baseline (p):  " + ",  ".join(
      f"{k.upper() if k != 'r2' else 'R^2'} {tests[k]:.3g}" for k in ("mae", "mse", "r2"))
      + "   (paper: p < 1e-4)")
  return "\n".join(lines)


def plot(runs: dict, results: dict, out: str) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.ticker import MaxNLocator

  fig, axes = plt.subplots(1, 3, figsize=(14, 4))
  for i, name in enumerate(("baseline", "gal")):
    curve = runs[name]["test_mae"]
    epochs = np.arange(1, curve.shape[1] + 1)
    axes[0].plot(epochs, curve.mean(0), color=f"C{i}", label=name)
    axes[0].fill_between(epochs, curve.min(0), curve.max(0), color=f"C{i}",
                         alpha=0.2)
  axes[0].set(xlabel="epoch", ylabel="test MAE", title="diabetes: test MAE "
              "(mean, min-max over seeds)")
  axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
  axes[0].legend(loc="upper right")
  for j, (key, label) in enumerate((("mae", "test MAE"), ("r2", "test R^2"))):
    ax = axes[1 + j]
    for i, name in enumerate(("baseline", "gal")):
      vals = results[name][key]
      ax.scatter(np.full(len(vals), i), vals, color=f"C{i}", alpha=0.7,
                 label="seeds" if i == 0 else None)
      ax.errorbar(i + 0.15, vals.mean(), yerr=vals.std(), fmt="o", color="k",
                  label="mean +- std" if i == 0 else None)
      ax.scatter(i + 0.3, PAPER[name][key][0], marker="*", s=120, color="C3",
                 label="paper" if i == 0 else None)
    ax.set(xticks=[0, 1], xticklabels=["baseline", "GAL"], xlim=(-0.5, 2.2), ylabel=label,
           title=f"final {label} per seed")
    ax.legend(loc="center right", fontsize="small")
  fig.tight_layout()
  path = os.path.join(out, "gal_regression.png")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--epochs", type=int, default=20)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--alpha", type=float, default=1e-3)
  parser.add_argument("--beta", type=float, default=1e-3)
  parser.add_argument("--out", default="out")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)

  data = load_split()
  runs = {name: train(name, data, args.seeds, args.epochs, args.batch_size,
                      args.lr, args.alpha, args.beta)
          for name in ("baseline", "gal")}
  results = {name: metrics(r["pred"], data["y_test_raw"]) for name, r in runs.items()}
  tests = {k: float(stats.ttest_ind(results["gal"][k], results["baseline"][k]).pvalue)
           if args.seeds > 1 else float("nan") for k in ("mae", "mse", "r2")}
  print(format_table(results, tests))
  accepted = float(np.mean(runs["gal"]["accepted"]))
  print(f"GAL safeguard: adjusted logit gradient used for {100 * accepted:.2f} %"
        " of the samples")
  png = plot(runs, results, args.out)
  summary = {
      "args": vars(args),
      "results": {n: {k: v.tolist() for k, v in m.items()} for n, m in results.items()},
      "t_test_p": tests, "gal_accepted_fraction": accepted, "paper": PAPER,
  }
  with open(os.path.join(args.out, "gal_regression.json"), "w") as f:
    json.dump(summary, f, indent=1)
  print(f"wrote {png} and {args.out}/gal_regression.json")
  return summary


if __name__ == "__main__":
  main()
