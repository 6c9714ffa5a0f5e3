"""Transfer learning with GrOD on scikit-learn's digits (no download).

Pre-trains a small CNN on digits 0-4, then fine-tunes it on digits 5-9 from a
few labelled images per class, with a fresh classification head, comparing

  fine_tune           the task loss alone
  l2_sp               task + lambda * L2-SP            (a plain weighted sum)
  l2_sp+grod          task and L2-SP combined by GrOD  (same lambda)
  distill             task + mu * feature distillation (penultimate features
                      of the pre-trained network as the teacher)
  distill+grod        task and feature distillation combined by GrOD

over several seeds (each seed: its own pre-training, labelled subset and
head). Prints a table (test accuracy on the rest of digits 5-9, final task
loss, final regulariser values, fraction of steps where the two gradients
conflicted) and writes `transfer_curves.png` (task loss and both regularisers
over fine-tuning) and `transfer_results.json` into `--out`.

    python examples/transfer.py                    # 5 seeds, a minute or two
    python examples/transfer.py --seeds 1 --steps 20 --pretrain-steps 20
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
from sklearn.datasets import load_digits

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import optax_ortho  # noqa: E402
from optax_ortho import regularizers  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import defaults  # noqa: E402

METHODS = ("fine_tune", "l2_sp", "l2_sp+grod", "distill", "distill+grod")


class CNN(nn.Module):
  """compare.py's CNN, also returning its penultimate features."""

  num_classes: int = 5

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3), name="conv1")(x))
    x = nn.relu(nn.Conv(32, (3, 3), strides=(2, 2), name="conv2")(x))
    x = x.reshape((x.shape[0], -1))
    features = nn.relu(nn.Dense(64, name="dense")(x))
    return nn.Dense(self.num_classes, name="head")(features), features


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def load_tasks(seed: int, shots: int):
  """Source: all digits 0-4. Target: `shots` labelled images per digit 5-9 for
  training, the other images of 5-9 for testing. Labels of both are 0-4."""
  digits = load_digits()
  x = (digits.images.astype(np.float32) / 16.0)[..., None]
  y = digits.target.astype(np.int32)
  src = y < 5
  rng = np.random.default_rng(seed)
  train_idx = np.concatenate([
      rng.choice(np.flatnonzero(y == c), shots, replace=False) for c in range(5, 10)])
  test_mask = ~src
  test_mask[train_idx] = False
  return ((x[src], y[src]), (x[train_idx], y[train_idx] - 5),
          (x[test_mask], y[test_mask] - 5))


def pretrain(model, seed, source, steps, batch_size=64):
  x, y = source
  params = model.init(jax.random.key(seed), x[:1])
  tx = optax.adam(3e-3)
  state = tx.init(params)

  @jax.jit
  def step(params, state, xb, yb):
    loss, g = jax.value_and_grad(lambda p: cross_entropy(model.apply(p, xb)[0], yb))(params)
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state, loss

  rng = np.random.default_rng(seed)
  for _ in range(steps):
    idx = rng.integers(0, len(x), batch_size)
    params, state, _ = step(params, state, x[idx], y[idx])
  return params


def without_head(params):
  inner = {k: v for k, v in params["params"].items() if k != "head"}
  return {"params": inner}


def make_fine_tuner(model, method: str, lr: float, l2_sp_weight: float,
                    distill_weight: float):
  """A jitted step (params, opt_state, source, teacher, x, y) for `method`."""
  reg_kind = "distill" if method.startswith("distill") else "l2_sp"
  weight = distill_weight if reg_kind == "distill" else l2_sp_weight
  use_grod = method.endswith("+grod")
  sgd = optax.sgd(lr, momentum=defaults.MOMENTUM)
  tx = optax.chain(optax_ortho.grod(weight), sgd) if use_grod else sgd

  def losses(params, source, teacher, x, y):
    logits, features = model.apply(params, x)
    task = cross_entropy(logits, y)
    if reg_kind == "distill":
      return task, regularizers.feature_distillation(features, teacher)
    return task, regularizers.l2_sp(params, source)

  value_and_grads = optax_ortho.value_and_grads(losses)

  @jax.jit
  def step(params, opt_state, source, teacher, x, y):
    (task, reg), (g_task, g_reg) = value_and_grads(params, source, teacher, x, y)
    if use_grod:
      updates, opt_state = tx.update(g_task, opt_state, params,
                                     regularizer_grads=g_reg)
      conflict = opt_state[0].conflict
    else:
      w = 0.0 if method == "fine_tune" else weight
      g = jax.tree.map(lambda a, b: a + w * b, g_task, g_reg)
      updates, opt_state = tx.update(g, opt_state, params)
      # Would GrOD have projected here? Recorded for every method.
      conflict = optax.tree.vdot(g_task, g_reg) < 0
    return optax.apply_updates(params, updates), opt_state, task, conflict

  return tx, step


def make_evaluator(model):
  @jax.jit
  def evaluate(params, source, teacher, x, y, xt, yt):
    logits, features = model.apply(params, x)
    test_logits, _ = model.apply(params, xt)
    return {
        "task_loss": cross_entropy(logits, y),
        "l2_sp": regularizers.l2_sp(params, source),
        "distill": regularizers.feature_distillation(features, teacher),
        "test_accuracy": (jnp.argmax(test_logits, -1) == yt).mean(),
    }
  return evaluate


def run(args) -> list[dict]:
  model = CNN()
  apply = jax.jit(model.apply)
  evaluate = make_evaluator(model)
  steppers = {m: make_fine_tuner(model, m, args.lr, args.l2_sp_weight,
                                 args.distill_weight) for m in args.methods}
  runs = []
  for seed in range(args.seeds):
    src_data, train, test = load_tasks(seed, args.shots)
    pre = pretrain(model, seed, src_data, args.pretrain_steps)
    source = without_head(pre)  # the new head gets plain L2 (L2-SP's beta)
    x, y = train
    teacher = apply(pre, x)[1]
    head = model.init(jax.random.key(10_000 + seed), x[:1])["params"]["head"]
    start = {"params": {**pre["params"], "head": head}}
    for method in args.methods:
      tx, step = steppers[method]
      params, opt_state = start, tx.init(start)
      history = {k: [] for k in ("step", "task_loss", "l2_sp", "distill",
                                 "test_accuracy")}
      conflicts = []
      for i in range(args.steps + 1):
        if i % args.eval_every == 0 or i == args.steps:
          ev = evaluate(params, source, teacher, x, y, *test)
          history["step"].append(i)
          for k, v in ev.items():
            history[k].append(float(v))
        if i < args.steps:
          params, opt_state, _, conflict = step(params, opt_state, source,
                                                teacher, x, y)
          conflicts.append(bool(conflict))
      runs.append({"method": method, "seed": seed, "history": history,
                   "conflict_fraction": float(np.mean(conflicts)) if conflicts else 0.0,
                   **{f"final_{k}": v[-1] for k, v in history.items() if k != "step"}})
  return runs


def summarise(runs: list[dict], methods) -> list[dict]:
  rows = []
  for m in methods:
    rs = [r for r in runs if r["method"] == m]
    row = {"method": m}
    for k in ("test_accuracy", "task_loss", "l2_sp", "distill"):
      v = np.array([r[f"final_{k}"] for r in rs])
      row[k] = float(v.mean())
      row[f"{k}_std"] = float(v.std())
    row["conflict_fraction"] = float(np.mean([r["conflict_fraction"] for r in rs]))
    rows.append(row)
  return rows


def format_table(rows: list[dict]) -> str:
  lines = [f"{'method':<14} {'test acc':>15} {'task loss':>17} "
           f"{'L2-SP':>15} {'feat. dist.':>15} {'conflict':>8}"]
  for r in rows:
    lines.append(
        f"{r['method']:<14} {r['test_accuracy']:>7.4f}+-{r['test_accuracy_std']:.4f}"
        f" {r['task_loss']:>8.4f}+-{r['task_loss_std']:.4f}"
        f" {r['l2_sp']:>7.3f}+-{r['l2_sp_std']:.3f}"
        f" {r['distill']:>7.3f}+-{r['distill_std']:.3f}"
        f" {r['conflict_fraction']:>8.2f}")
  return "\n".join(lines)


def plot(runs: list[dict], methods, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = [("task_loss", "task loss (labelled 5-9)", "log"),
            ("l2_sp", "L2-SP regulariser", "linear"),
            ("distill", "feature distillation regulariser", "log"),
            ("test_accuracy", "test accuracy (other 5-9)", "linear")]
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
  for j, m in enumerate(methods):
    rs = [r for r in runs if r["method"] == m]
    steps = rs[0]["history"]["step"]
    for ax, (key, title, scale) in zip(axes, panels):
      v = np.array([r["history"][key] for r in rs])
      ax.plot(steps, v.mean(0), color=f"C{j}", label=m,
              linestyle="-" if m.endswith("grod") or m == "fine_tune" else "--")
      ax.fill_between(steps, v.min(0), v.max(0), color=f"C{j}", alpha=0.15)
      ax.set(xlabel="fine-tuning step", title=title, yscale=scale)
  axes[0].legend(fontsize=8)
  fig.suptitle("digits 0-4 -> 5-9: mean over seeds, band = min..max")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=defaults.HelpFormatter)
  parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                      help="fine-tuning methods to compare")
  parser.add_argument("--seeds", type=int, default=5, help="seeds per method")
  parser.add_argument("--shots", type=int, default=10,
                      help="labelled images per target class")
  parser.add_argument("--pretrain-steps", type=int, default=400,
                      help="pre-training steps on digits 0-4")
  parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps")
  parser.add_argument("--lr", type=float, default=defaults.LEARNING_RATE["fine_tune"],
                      help="fine-tuning learning rate (SGD, momentum"
                           f" {defaults.MOMENTUM})")
  parser.add_argument("--l2-sp-weight", type=float, default=0.1,
                      help="L2-SP's weight lambda")
  parser.add_argument("--distill-weight", type=float, default=0.1,
                      help="feature distillation's weight mu")
  parser.add_argument("--eval-every", type=int, default=10,
                      help="steps between test evaluations")
  parser.add_argument("--out", default="out", help="output folder")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)

  runs = run(args)
  rows = summarise(runs, args.methods)
  print(format_table(rows))
  plot(runs, args.methods, os.path.join(args.out, "transfer_curves.png"))
  with open(os.path.join(args.out, "transfer_results.json"), "w") as f:
    json.dump({"args": vars(args), "summary": rows, "runs": runs}, f, indent=1)
  print(f"wrote {args.out}/transfer_curves.png, transfer_results.json")
  return rows


if __name__ == "__main__":
  main()
