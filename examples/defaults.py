"""The examples' per-method defaults, in one table.

Every program in examples/ (compare.py, train_linen.py, train_nnx.py, opt.py,
transfer.py) takes its learning rates and method settings from here, and
docs/getting_started.md prints the same table (tests/test_docs.py checks that
the two agree). The rates were chosen on the main job (compare.py: digits CNN,
300 steps, batch 64); docs/getting_started.md has the runs behind them.
"""

from __future__ import annotations

import argparse

# The base optimizers: SGD with this momentum, or Adam.
MOMENTUM = 0.9

# Learning rate per method (the name a script's --optimizer / --methods takes).
# An orthonormalised update has every singular value 1, far larger than a raw
# gradient's: with SGD it takes a tenth of plain SGD's rate; Adam's
# per-coordinate scaling makes it keep Adam's.
LEARNING_RATE: dict[str, float] = {
    "sgd": 0.05,
    "adam": 3e-3,
    "orthogonal_sgd": 0.005,
    "orthogonal_adam": 3e-3,
    "sgd_l2": 0.05,
    "grod_l2": 0.05,
    "gnp": 0.05,
    "gnp_orthogonal_sgd": 0.005,
    "sam": 0.05,
    "gal": 3e-3,
    # OPT layers with the Cayley map from the authors' R ~ N(0, 1): the large
    # random skew matrix damps the gradient through (I + A)^{-1}.
    "opt_sgd": 1.0,
    "stiefel_sgd": 0.05,
    # examples/transfer.py: fine-tuning a pre-trained CNN on a few images per
    # class, with or without GrOD.
    "fine_tune": 0.02,
}

# The other settings of the methods.
L2_WEIGHT = 1e-3  # sgd_l2 / grod_l2: L2 weight decay, summed or by GrOD
GNP_ALPHA, GNP_RADIUS = 0.8, 0.05  # gradient_norm_penalty (and SAM's radius)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """`--help` with every default; an option whose help explains its default
  (default None, e.g. "per optimizer") is left as written."""

  def _get_help_string(self, action: argparse.Action) -> str | None:
    if action.default is None or "default" in (action.help or ""):
      return action.help
    return super()._get_help_string(action)
