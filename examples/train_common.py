"""What examples/train_linen.py and examples/train_nnx.py share.

Command-line flags, the optimizers (`optax.chain`s of the library's
transforms), the data, the loss, and orbax checkpointing.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data  # noqa: E402
import defaults  # noqa: E402
import models  # noqa: E402

import optax_ortho  # noqa: E402

# Optimizers: which library transforms go in front of the base optimizer.
# "gnp" needs a second gradient (grad_fn); the loops build it.
OPTIMIZERS = {
    "sgd": ((), "sgd"),
    "adam": ((), "adam"),
    "orthogonal_sgd": (("orthonormalize",), "sgd"),
    "orthogonal_adam": (("orthonormalize",), "adam"),
    "gnp": (("gnp",), "sgd"),
    "gnp_orthogonal_sgd": (("gnp", "orthonormalize"), "sgd"),
}


def parser(description: str) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=description,
                              formatter_class=defaults.HelpFormatter)
  p.add_argument("--dataset", default="digits", choices=data.NAMES, help="data set")
  p.add_argument("--data-dir", default=None,
                 help="TFDS data directory (default: $TFDS_DATA_DIR or"
                      " ~/tensorflow_datasets)")
  p.add_argument("--model", default=None, choices=sorted(models.LINEN),
                 help="network (default: mlp for diabetes, resnet20 for cifar10,"
                      " cnn_bn otherwise)")
  p.add_argument("--optimizer", default="orthogonal_sgd",
                 choices=sorted(OPTIMIZERS),
                 help="library transforms in front of SGD (momentum) or Adam")
  p.add_argument("--polar-method", default="auto",
                 choices=["auto", "svd", "gram", "newton_schulz", "polar_express"],
                 help="orthonormalize's method")
  rates = ", ".join(f"{name} {defaults.LEARNING_RATE[name]:g}" for name in OPTIMIZERS)
  p.add_argument("--lr", type=float, default=None,
                 help=f"learning rate (default: per optimizer, from"
                      f" examples/defaults.py: {rates})")
  p.add_argument("--momentum", type=float, default=defaults.MOMENTUM,
                 help="SGD's momentum (0: none)")
  p.add_argument("--weight-decay", type=float, default=0.0,
                 help="decoupled weight decay added to the update")
  p.add_argument("--cosine", action="store_true",
                 help="cosine decay of the learning rate to 0 over --steps")
  p.add_argument("--gnp-alpha", type=float, default=defaults.GNP_ALPHA,
                 help="gradient_norm_penalty's alpha (1: SAM)")
  p.add_argument("--gnp-radius", type=float, default=defaults.GNP_RADIUS,
                 help="gradient_norm_penalty's radius")
  p.add_argument("--steps", type=int, default=300, help="training steps")
  p.add_argument("--batch-size", type=int, default=64, help="training batch size")
  p.add_argument("--seed", type=int, default=0, help="initialisation and batch order")
  p.add_argument("--eval-every", type=int, default=50,
                 help="steps between test evaluations")
  p.add_argument("--augment", action=argparse.BooleanOptionalAction,
                 default=None, help="random crops and flips (default: on for"
                 " cifar10)")
  p.add_argument("--max-train", type=int, default=None,
                 help="use only the first N training examples (default: all)")
  p.add_argument("--max-test", type=int, default=None,
                 help="use only the first N test examples (default: all)")
  p.add_argument("--checkpoint-dir", default=None,
                 help="save params + optimizer state here with orbax, and"
                      " resume from the latest checkpoint found there"
                      " (default: no checkpoints)")
  p.add_argument("--checkpoint-every", type=int, default=0,
                 help="also save every N steps (0: only at the end)")
  return p


def parse(p: argparse.ArgumentParser, argv) -> argparse.Namespace:
  args = p.parse_args(argv)
  args.model = args.model or models.default_model(args.dataset)
  if args.augment is None:
    args.augment = args.dataset == "cifar10"
  if args.lr is None:
    args.lr = defaults.LEARNING_RATE[args.optimizer]
  return args


def describe(args) -> str:
  """The optimizer and the learning rate it uses, for the scripts' output."""
  schedule = f", cosine decay over {args.steps} steps" if args.cosine else ""
  return f"{args.optimizer} (learning rate {args.lr:g}{schedule})"


def make_optimizer(args, *, gnp_has_aux: bool) -> optax.GradientTransformation:
  """The chain: [gnp] -> [orthonormalize] -> [weight decay] -> SGD or Adam.

  Both library transforms act on the raw gradient, as in their papers: the
  penalty first (it needs the loss gradient itself), then the polar factor.
  """
  front, base = OPTIMIZERS[args.optimizer]
  lr = (optax.cosine_decay_schedule(args.lr, args.steps) if args.cosine
        else args.lr)
  chain = []
  if "gnp" in front:
    chain.append(optax_ortho.gradient_norm_penalty(
        args.gnp_alpha, args.gnp_radius, has_aux=gnp_has_aux))
  if "orthonormalize" in front:
    chain.append(optax_ortho.orthonormalize(args.polar_method))
  if args.weight_decay:
    chain.append(optax.add_decayed_weights(args.weight_decay))
  chain.append(optax.sgd(lr, momentum=args.momentum or None) if base == "sgd"
               else optax.adam(lr))
  return optax.chain(*chain)


def needs_grad_fn(args) -> bool:
  return "gnp" in OPTIMIZERS[args.optimizer][0]


def load_data(args) -> data.Dataset:
  """The data set, or exit with the one-paragraph message if it is missing."""
  try:
    return data.load(args.dataset, data_dir=args.data_dir, seed=args.seed,
                     max_train=args.max_train, max_test=args.max_test)
  except data.DataNotFoundError as e:
    raise SystemExit(f"error: {e}") from None


def num_outputs(ds: data.Dataset) -> int:
  return ds.num_classes if ds.is_classification else 1


def task_loss(ds: data.Dataset):
  """(outputs, targets) -> mean loss: cross-entropy, or squared error."""
  if ds.is_classification:
    return lambda logits, y: optax.softmax_cross_entropy_with_integer_labels(
        logits, y).mean()
  return lambda out, y: jnp.mean((out[:, 0] - y) ** 2)


def metric(ds: data.Dataset, outputs, targets) -> float:
  """Test accuracy (classification) or test mean squared error (regression)."""
  if ds.is_classification:
    return float((jnp.argmax(outputs, -1) == targets).mean())
  return float(jnp.mean((outputs[:, 0] - targets) ** 2))


def metric_name(ds: data.Dataset) -> str:
  return "test_accuracy" if ds.is_classification else "test_mse"


def checkpoint_manager(args):
  """An orbax CheckpointManager for --checkpoint-dir, or None."""
  if not args.checkpoint_dir:
    return None
  import orbax.checkpoint as ocp
  path = args.checkpoint_dir
  if "://" not in path:  # a bucket (gs://...) is not a local path
    path = os.path.abspath(path)
  return ocp.CheckpointManager(
      path, options=ocp.CheckpointManagerOptions(max_to_keep=2))


def save(manager, step: int, tree) -> None:
  import orbax.checkpoint as ocp
  manager.save(step, args=ocp.args.StandardSave(tree))


def restore_latest(manager, target):
  """The latest checkpoint restored into `target`'s structure, or None."""
  import orbax.checkpoint as ocp
  if manager is None or manager.latest_step() is None:
    return None
  return manager.restore(manager.latest_step(),
                         args=ocp.args.StandardRestore(target))
