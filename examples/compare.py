"""Compare optimizers on a small Flax CNN (the README's main job).

Runs on scikit-learn's embedded `digits` data set (8x8 images, no download):

    python examples/compare.py                       # every registered method, 3 seeds
    python examples/compare.py --methods sgd orthogonal_sgd --seeds 1 --steps 100

Prints a table (final test accuracy, steps to 95 % test accuracy, time per step
relative to the plain optimizer of the same family) and writes training curves
(`curves.png`: one row of panels per family of methods, with its baseline: test
accuracy, training loss, gradient norm), the time ratios (`time_per_step.png`)
and the raw numbers (`results.json`) into `--out` (default `out/` for the full
run, a sub-folder of `out/` named after the arguments for any other, e.g.
`out/sgd-orthogonal_sgd_seeds1`).

Time per step is measured after training, so that every method meets the same
load: `--timing-rounds` rounds in which every method, in a random order, takes
5 steps; a method's time is the process's CPU time (all its threads) per step,
the minimum over the rounds. CPU time counts the work done, not the time spent
waiting for a core that another program holds, and the minimum drops the
rounds that a burst of load slowed down: two methods doing the same work read
the same even on a busy machine. The wall-clock minimum is in `results.json`.

Methods live in a registry (`METHODS`): a method is a transform factory plus,
where the transform needs more than the gradient (a `grad_fn`, a second
gradient, logits), a function that produces those extra arguments. Learning
rates and the other settings come from examples/defaults.py.
"""

from __future__ import annotations

import os

# One OpenBLAS thread, set before numpy and jax load it: jaxlib's CPU LAPACK
# kernels call scipy's OpenBLAS, whose spinning thread pool fights XLA's
# threads (SVDs 10-200x slower on a busy CPU; docs/getting_started.md).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import dataclasses
import functools
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import optax_ortho  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import defaults  # noqa: E402
import models  # noqa: E402

# ----------------------------------------------------------------- data


def load_digits_split(seed: int = 0, test_fraction: float = 0.25):
  """Digits as NHWC float32 images in [0, 1], split into train and test."""
  digits = load_digits()
  x = (digits.images.astype(np.float32) / 16.0)[..., None]
  y = digits.target.astype(np.int32)
  perm = np.random.default_rng(seed).permutation(len(x))
  n_test = int(len(x) * test_fraction)
  test, train = perm[:n_test], perm[n_test:]
  return (x[train], y[train]), (x[test], y[test])


# ----------------------------------------------------------------- model


# The small CNN lives in examples/models.py (shared with the training loops).
CNN = models.CNN


class OPTCNN(nn.Module):
  """The same CNN with OPT layers: every kernel is Q(R) V, V fixed (Liu et al.)."""

  num_classes: int = 10
  method: str = "cayley"

  @nn.compact
  def __call__(self, x):
    from optax_ortho import linen as ortho_nn
    m = self.method
    x = nn.relu(ortho_nn.OrthogonalConv(16, (3, 3), method=m)(x))
    x = nn.relu(ortho_nn.OrthogonalConv(32, (3, 3), strides=2, method=m)(x))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(ortho_nn.OrthogonalDense(64, method=m)(x))
    return ortho_nn.OrthogonalDense(self.num_classes, method=m)(x)


def trainable_only(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` on the "params" collection; every other collection stays as it is."""
  return optax.multi_transform(
      {"train": tx, "frozen": optax.set_to_zero()},
      lambda variables: {k: jax.tree.map(
          lambda _, k=k: "train" if k == "params" else "frozen", v)
          for k, v in variables.items()})


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


# -------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class Context:
  """What a method may need to build its extra `update` arguments."""

  model: nn.Module
  apply_fn: Callable[[Any, jax.Array], jax.Array]  # (params, x) -> logits
  loss_fn: Callable[[Any, jax.Array, jax.Array], jax.Array]  # (params, x, y)


# (ctx, params, x, y) -> (loss, grads, extra keyword arguments of update)
GradFn = Callable[[Context, Any, jax.Array, jax.Array], tuple[jax.Array, Any, dict]]


def plain_grads(ctx: Context, params, x, y):
  loss, grads = jax.value_and_grad(ctx.loss_fn)(params, x, y)
  return loss, grads, {}


@dataclasses.dataclass(frozen=True)
class Method:
  """A named optimizer: `make()` builds it; `grads` computes its inputs."""

  make: Callable[[], optax.GradientTransformation]
  baseline: str  # the plain method its time per step is compared with
  grads: GradFn = plain_grads
  description: str = ""
  model: Callable[[], nn.Module] = CNN  # builds the network it trains
  # The row of curves.png it is drawn in (with its baseline); default: its
  # name up to a "[variant]".
  panel: str | None = None


METHODS: dict[str, Method] = {}


def register(name: str, method: Method) -> None:
  if name in METHODS:
    raise ValueError(f"method {name!r} is registered twice")
  METHODS[name] = method


LR = defaults.LEARNING_RATE
MOMENTUM = defaults.MOMENTUM

register("sgd", Method(lambda: optax.sgd(LR["sgd"], momentum=MOMENTUM), "sgd",
                       description=f"SGD with momentum {MOMENTUM}"))
register("orthogonal_sgd", Method(
    lambda: optax_ortho.orthogonal_sgd(LR["orthogonal_sgd"], momentum=MOMENTUM), "sgd",
    description="orthonormalised gradients (auto polar) + SGD momentum"))
for _polar in ("svd", "newton_schulz", "polar_express"):
  register(f"orthogonal_sgd[{_polar}]", Method(
      lambda m=_polar: optax_ortho.orthogonal_sgd(LR["orthogonal_sgd"],
                                                momentum=MOMENTUM, method=m),
      "sgd", description=f"orthonormalised gradients ({_polar}) + SGD momentum"))
register("adam", Method(lambda: optax.adam(LR["adam"]), "adam", description="Adam"))
register("orthogonal_adam", Method(
    lambda: optax_ortho.orthogonal_adam(LR["orthogonal_adam"]), "adam",
    description="orthonormalised gradients (auto polar) + Adam"))
for _polar in ("svd", "newton_schulz", "polar_express"):
  register(f"orthogonal_adam[{_polar}]", Method(
      lambda m=_polar: optax_ortho.orthogonal_adam(LR["orthogonal_adam"], method=m),
      "adam", description=f"orthonormalised gradients ({_polar}) + Adam"))

# GrOD with the regulariser every from-scratch run has: L2 weight decay, whose
# gradient is the parameters. Its transfer setting is examples/transfer.py.
L2_WEIGHT = defaults.L2_WEIGHT


def l2_grads(ctx: Context, params, x, y):
  loss, grads = jax.value_and_grad(ctx.loss_fn)(params, x, y)
  return loss, grads, {"regularizer_grads": params}


register("sgd_l2", Method(
    lambda: optax.chain(optax.add_decayed_weights(L2_WEIGHT),
                        optax.sgd(LR["sgd_l2"], momentum=MOMENTUM)), "sgd",
    description=f"SGD momentum + L2 {L2_WEIGHT} (gradient sum)", panel="L2: sum or GrOD"))
register("grod_l2", Method(
    lambda: optax.chain(optax_ortho.grod(L2_WEIGHT),
                        optax.sgd(LR["grod_l2"], momentum=MOMENTUM)),
    "sgd", grads=l2_grads,
    description=f"SGD momentum + L2 {L2_WEIGHT} combined by GrOD", panel="L2: sum or GrOD"))

GNP_ALPHA, GNP_RADIUS = defaults.GNP_ALPHA, defaults.GNP_RADIUS


def gnp_grads(ctx: Context, params, x, y):
  """`grad_fn(params)` for gradient_norm_penalty: the same loss and batch."""
  loss, grads = jax.value_and_grad(ctx.loss_fn)(params, x, y)
  return loss, grads, {"grad_fn": jax.grad(lambda p: ctx.loss_fn(p, x, y))}


def sam_grads(ctx: Context, params, x, y):
  """`grad_fn(params, step)` for optax.contrib.sam in opaque mode."""
  loss, grads = jax.value_and_grad(ctx.loss_fn)(params, x, y)
  return loss, grads, {"grad_fn": jax.grad(lambda p, _: ctx.loss_fn(p, x, y))}


register("gnp", Method(
    lambda: optax.chain(
        optax_ortho.gradient_norm_penalty(GNP_ALPHA, GNP_RADIUS),
        optax.sgd(LR["gnp"], momentum=MOMENTUM)),
    "sgd", grads=gnp_grads,
    description=f"gradient norm penalty (alpha {GNP_ALPHA}, radius {GNP_RADIUS})"
                " + SGD momentum", panel="gradient norm penalty and SAM"))
register("gnp[refresh5]", Method(
    lambda: optax.chain(
        optax_ortho.gradient_norm_penalty(GNP_ALPHA, GNP_RADIUS, refresh_every=5),
        optax.sgd(LR["gnp"], momentum=MOMENTUM)),
    "sgd", grads=gnp_grads,
    description=f"gradient norm penalty (alpha {GNP_ALPHA}, radius {GNP_RADIUS}), second"
                " gradient every 5th step + SGD momentum", panel="gradient norm penalty and SAM"))
register("sam", Method(
    lambda: optax.contrib.sam(
        optax.sgd(LR["sam"], momentum=MOMENTUM),
        optax.chain(optax.contrib.normalize(), optax.sgd(GNP_RADIUS)),
        sync_period=2, opaque_mode=True),
    "sgd", grads=sam_grads,
    description=f"optax.contrib.sam (radius {GNP_RADIUS}, opaque) + SGD momentum",
    panel="gradient norm penalty and SAM"))


def gal_grads(ctx: Context, params, x, y):
  """Loss, vanilla gradient and gal's extra arguments from one forward pass."""
  return optax_ortho.gal_value_and_grad(ctx.apply_fn, cross_entropy)(params, x, y)


register("gal", Method(
    lambda: optax.chain(optax_ortho.gal(10, LR["gal"]), optax.adam(LR["gal"])),
    "adam", grads=gal_grads,
    description="GAL (adjuster 128-4, alpha = beta = 1e-3) + Adam"))
register("opt_sgd", Method(
    lambda: trainable_only(optax.sgd(LR["opt_sgd"], momentum=MOMENTUM)), "sgd",
    model=OPTCNN, panel="OPT",
    description=f"OPT CNN (Cayley, fixed random V) + SGD momentum (lr {LR['opt_sgd']})"))


def stiefel_mask(variables):
  """True for the OPT layers' R (= Q with method=None), moved on the manifold."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: jax.tree_util.keystr(path).endswith("['R']"), variables)


register("stiefel_sgd", Method(
    lambda: trainable_only(optax_ortho.stiefel_sgd(LR["stiefel_sgd"], momentum=MOMENTUM,
                                                   mask=stiefel_mask)),
    "sgd", model=functools.partial(OPTCNN, method=None), panel="OPT",
    description="OPT CNN, Q trained directly by Stiefel SGD (OGD)"))

DEFAULT_METHODS = tuple(METHODS)

# --------------------------------------------------------------- training


def accuracy(apply_fn, params, x, y, batch=512):
  correct = 0
  for i in range(0, len(x), batch):
    logits = apply_fn(params, x[i:i + batch])
    correct += int((jnp.argmax(logits, -1) == y[i:i + batch]).sum())
  return correct / len(x)


def train(name: str, seed: int, steps: int, batch_size: int, eval_every: int,
          data, progress=None) -> tuple[dict, Callable[[], None]]:
  """One training run, and a function that times one more step of it."""
  (x_train, y_train), (x_test, y_test) = data
  method = METHODS[name]
  model = method.model()
  apply_fn = jax.jit(model.apply)
  ctx = Context(model=model, apply_fn=model.apply,
                loss_fn=lambda p, x, y: cross_entropy(model.apply(p, x), y))
  tx = method.make()
  params = model.init(jax.random.key(seed), x_train[:1])
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    loss, grads, extra = method.grads(ctx, params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    # Global norm of the batch loss gradient at params, for every method.
    return optax.apply_updates(params, updates), opt_state, loss, optax.tree.norm(grads)

  rng = np.random.default_rng(seed)
  history = {"step": [], "train_loss": [], "test_accuracy": [], "grad_norm": []}
  step_times, window_norms = [], []
  for i in range(1, steps + 1):
    idx = rng.integers(0, len(x_train), batch_size)
    t0 = time.process_time()
    params, opt_state, loss, grad_norm = step(
        params, opt_state, x_train[idx], y_train[idx])
    loss = float(loss)  # waits for the step
    if i > 1:  # the first step compiles
      step_times.append(time.process_time() - t0)
    window_norms.append(float(grad_norm))
    if i % eval_every == 0 or i == steps:
      history["step"].append(i)
      history["train_loss"].append(loss)
      history["test_accuracy"].append(accuracy(apply_fn, params, x_test, y_test))
      # Mean over the steps since the last evaluation: one batch is noisy.
      history["grad_norm"].append(float(np.mean(window_norms)))
      window_norms = []
    if progress is not None:
      progress.update(1)
  reached = [s for s, a in zip(history["step"], history["test_accuracy"]) if a >= 0.95]
  xb, yb = x_train[:batch_size], y_train[:batch_size]

  # The timed steps go on from the last state: a method whose steps differ
  # by count (gnp[refresh5]) is timed over its whole cycle, not one step of it.
  timed = [params, opt_state]

  def one_step():
    timed[:2] = jax.block_until_ready(step(timed[0], timed[1], xb, yb))[:2]

  return {
      "method": name, "seed": seed, "history": history,
      "final_test_accuracy": history["test_accuracy"][-1],
      "steps_to_95": reached[0] if reached else None,
      "time_per_step": float(np.median(step_times)) if step_times else float("nan"),
  }, one_step


def interleaved_step_times(steppers: dict[str, Callable[[], None]], rounds: int,
                           steps: int = 5, seed: int = 0) -> dict[str, dict[str, float]]:
  """CPU and wall time per step of every method: the minimum over `rounds`.

  The runs themselves go one method after another, so a change of load
  between them (another job starting) would show as a speed difference; here
  every round times every method, in a new random order, so all meet the same
  load. The process's CPU time (`time.process_time`, all threads) counts the
  work a step does, not the time it waits for a core held by another program;
  the minimum over rounds drops the rounds that contention slowed anyway.
  """
  cpu: dict[str, list[float]] = {name: [] for name in steppers}
  wall: dict[str, list[float]] = {name: [] for name in steppers}
  order = list(steppers)
  rng = np.random.default_rng(seed)
  for _ in range(rounds):
    for i in rng.permutation(len(order)):
      name = order[i]
      steppers[name]()  # a warm start: caches and thread pools of this method
      c0, w0 = time.process_time(), time.perf_counter()
      for _ in range(steps):
        steppers[name]()
      cpu[name].append((time.process_time() - c0) / steps)
      wall[name].append((time.perf_counter() - w0) / steps)
  return {name: {"cpu": float(np.min(cpu[name])), "wall": float(np.min(wall[name]))}
          for name in order}


def summarise(runs: list[dict],
              step_times: dict[str, dict[str, float]] | None = None) -> list[dict]:
  by_method: dict[str, list[dict]] = {}
  for r in runs:
    by_method.setdefault(r["method"], []).append(r)
  rows = []
  for name, rs in by_method.items():
    acc = np.array([r["final_test_accuracy"] for r in rs])
    t95 = [r["steps_to_95"] for r in rs]
    timed = step_times.get(name) if step_times else None
    tps = (timed["cpu"] if timed
           else float(np.median([r["time_per_step"] for r in rs])))
    rows.append({"method": name, "acc_mean": float(acc.mean()),
                 "acc_std": float(acc.std()), "steps_to_95": t95,
                 "time_per_step": tps,
                 "wall_time_per_step": timed["wall"] if timed else None})
  times = {r["method"]: r["time_per_step"] for r in rows}
  for r in rows:
    base = METHODS[r["method"]].baseline
    r["time_ratio"] = r["time_per_step"] / times[base] if base in times else None
  return rows


def format_table(rows: list[dict]) -> str:
  lines = [f"{'method':<32} {'test acc':>15} {'steps to 95%':>18} "
           f"{'cpu ms/step':>11} {'x baseline':>10}"]
  for r in rows:
    t95 = ",".join("-" if s is None else str(s) for s in r["steps_to_95"])
    ratio = "-" if r["time_ratio"] is None else f"{r['time_ratio']:.2f}"
    lines.append(
        f"{r['method']:<32} {r['acc_mean']:>8.4f}+-{r['acc_std']:.4f} "
        f"{t95:>18} {1e3 * r['time_per_step']:>11.2f} {ratio:>10}")
  return "\n".join(lines)


FAMILY_COLORS = {  # one colour per family, one line style per variant
    "sgd": "tab:blue", "orthogonal_sgd": "tab:orange", "adam": "tab:green",
    "orthogonal_adam": "tab:red", "sgd_l2": "tab:purple", "grod_l2": "tab:brown",
    "gnp": "tab:pink", "sam": "tab:gray", "gal": "tab:olive", "opt_sgd": "tab:cyan",
    "stiefel_sgd": "black",
}
VARIANT_STYLES = {"": "-", "svd": "--", "newton_schulz": ":", "polar_express": "-."}


def line_styles(names: list[str]) -> dict[str, dict]:
  """A distinct (colour, line style) for every method: colour by family, style by variant."""
  styles: dict[str, dict] = {}
  spare = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple",
           "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan"]
  used: set[tuple[str, str]] = set()
  for name in dict.fromkeys(names):
    family, _, variant = name.partition("[")
    variant = variant.rstrip("]")
    color = FAMILY_COLORS.get(family)
    linestyle = VARIANT_STYLES.get(variant, (0, (5, 1, 1, 1)))
    if color is None or (color, str(linestyle)) in used:
      # An unregistered family: the first colour/style pair not taken yet.
      color, linestyle = next(
          (c, ls) for ls in ("-", "--", ":", "-.") for c in spare
          if (c, ls) not in used)
    used.add((color, str(linestyle)))
    styles[name] = {"color": color, "linestyle": linestyle}
  return styles


def panels(names: list[str]) -> dict[str, list[str]]:
  """The rows of curves.png: every family of methods with its baseline.

  A method's family is its `panel`, or its name up to a "[variant]"; a
  baseline that no method of the run is compared with gets a row of its own.
  """
  names = [n for n in METHODS if n in names]  # the registry's order
  groups: dict[str, list[str]] = {}
  for name in names:
    method = METHODS[name]
    if method.baseline == name:
      continue
    members = groups.setdefault(method.panel or name.partition("[")[0], [])
    if method.baseline in names and method.baseline not in members:
      members.insert(0, method.baseline)
    members.append(name)
  shown = {n for members in groups.values() for n in members}
  for name in names:
    if name not in shown:
      groups[name] = [name]
  return groups


CURVES = (("test_accuracy", "test accuracy", "linear"),
          ("train_loss", "training loss (batch)", "log"),
          ("grad_norm", "global norm of the batch gradient", "log"))


def plot(runs: list[dict], rows: list[dict], out: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(dict.fromkeys(r["method"] for r in runs))
  styles = line_styles(names)
  groups = panels(names)
  seeds = len({r["seed"] for r in runs})
  # The differences that matter are between 0.95 and 0.99: zoom in when every
  # run ends above 0.9 (the early steps leave the panel at the bottom).
  zoom = min(r["final_test_accuracy"] for r in runs) >= 0.9
  fig, axes = plt.subplots(len(groups), len(CURVES), sharex=True, squeeze=False,
                           figsize=(15, 3.0 * len(groups) + 0.6))
  for row, (title, members) in zip(axes, groups.items()):
    for name in members:
      histories = [r["history"] for r in runs if r["method"] == name]
      steps = histories[0]["step"]
      for ax, (key, _, _) in zip(row, CURVES):
        values = np.array([h[key] for h in histories])
        ax.plot(steps, values.mean(0), label=name, **styles[name])
        if len(histories) > 1:
          ax.fill_between(steps, values.min(0), values.max(0), linewidth=0,
                          color=styles[name]["color"], alpha=0.12)
    for ax, (_, label, scale) in zip(row, CURVES):
      ax.set(ylabel=label, yscale=scale)
      ax.grid(alpha=0.3)
    if zoom:
      row[0].set_ylim(0.9, 1.0)
    row[0].set_title(title, loc="left", fontsize=10, fontweight="bold")
    # Outside the panels: the legend never covers a curve.
    row[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8,
                   frameon=False)
  for ax in axes[-1]:
    ax.set_xlabel("step")
  band = f"mean of {seeds} seeds, band = min..max" if seeds > 1 else "one seed"
  fig.suptitle(f"digits CNN: {band}" + ("; test accuracy from 0.9" if zoom else ""))
  fig.tight_layout()
  fig.savefig(os.path.join(out, "curves.png"), dpi=100, bbox_inches="tight")
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.6))
  ratios = [1.0 if r["time_ratio"] is None else r["time_ratio"] for r in rows]
  ax.barh([r["method"] for r in rows], ratios,
          color=[styles[r["method"]]["color"] for r in rows])
  for i, ratio in enumerate(ratios):
    ax.text(ratio, i, f" {ratio:.2f}", va="center", fontsize=8)
  # A linear axis from 0: bar lengths compare as the ratios do.
  ax.axvline(1.0, color="black", linewidth=0.8)
  ax.set_xlim(0, 1.12 * max(ratios))
  ax.set(xlabel="CPU time per step / the baseline's (sgd or adam; minimum over rounds)",
         title="time per step relative to the plain optimizer")
  ax.invert_yaxis()
  fig.tight_layout()
  fig.savefig(os.path.join(out, "time_per_step.png"), dpi=100)
  plt.close(fig)


def default_out(args: argparse.Namespace) -> str:
  """`out` for the full default run; `out/<methods>_<non-default args>` otherwise."""
  parts = []
  if not args.all and list(args.methods) != list(DEFAULT_METHODS):
    parts.append("-".join(m.replace("[", "_").replace("]", "") for m in args.methods))
  for name, default in (("seeds", 3), ("steps", 300), ("batch_size", 64)):
    if getattr(args, name) != default:
      parts.append(f"{name.replace('_', '')}{getattr(args, name)}")
  return os.path.join("out", "_".join(parts)) if parts else "out"


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=defaults.HelpFormatter)
  parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                      choices=sorted(METHODS), metavar="METHOD",
                      help=f"any of: {', '.join(sorted(METHODS))} (default: every one)")
  parser.add_argument("--all", action="store_true",
                      help="run every method; the same as the default --methods")
  parser.add_argument("--seeds", type=int, default=3, help="seeds per method")
  parser.add_argument("--steps", type=int, default=300, help="training steps per run")
  parser.add_argument("--batch-size", type=int, default=64, help="training batch size")
  parser.add_argument("--eval-every", type=int, default=10,
                      help="steps between test-accuracy evaluations")
  parser.add_argument("--timing-rounds", type=int, default=30,
                      help="after training, rounds of 5 steps of every method in a"
                           " random order; a method's time per step is its minimum"
                           " CPU time over the rounds (0: the median CPU time of"
                           " its training steps instead)")
  parser.add_argument("--out", default=None,
                      help="output folder (default: out/ for the full default run,"
                           " else a folder named after the arguments, e.g."
                           " out/sgd-orthogonal_sgd_seeds1, so a short run never"
                           " overwrites the full one)")
  args = parser.parse_args(argv)
  if args.out is None:
    args.out = default_out(args)
  return args


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  names = list(METHODS) if args.all else list(dict.fromkeys(args.methods))
  # Time per step is reported relative to each method's plain baseline.
  names += [b for b in dict.fromkeys(METHODS[n].baseline for n in names)
            if b not in names]
  os.makedirs(args.out, exist_ok=True)

  data = load_digits_split()
  runs, steppers = [], {}
  total, start = len(names) * args.seeds, time.perf_counter()
  with tqdm(total=total * args.steps, desc="training",
            unit="step", disable=None) as progress:
    for name in names:
      for seed in range(args.seeds):
        progress.set_postfix_str(f"{name} seed {seed}")
        run, one_step = train(name, seed, args.steps, args.batch_size,
                              args.eval_every, data, progress)
        runs.append(run)
        steppers.setdefault(name, one_step)
        if progress.disable:  # not a terminal (a log file): a line per run
          print(f"[{len(runs)}/{total}] {name} seed {seed}: test accuracy"
                f" {run['final_test_accuracy']:.4f}"
                f" ({time.perf_counter() - start:.0f} s)", flush=True)
  step_times = None
  if args.timing_rounds > 0:
    print(f"timing: {args.timing_rounds} rounds of every method in a random order",
          flush=True)
    step_times = interleaved_step_times(steppers, args.timing_rounds)
  rows = summarise(runs, step_times)
  print(format_table(rows))
  plot(runs, rows, args.out)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump({"args": vars(args), "summary": rows, "runs": runs}, f, indent=1)
  print(f"wrote {args.out}/curves.png, time_per_step.png, results.json")
  return rows


if __name__ == "__main__":
  main()
