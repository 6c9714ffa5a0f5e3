"""examples/train_sharded.py runs at tiny size on the 8 virtual CPU devices."""

import math
import os
import sys

import jax
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples"))

import train_sharded  # noqa: E402

needs_8 = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices (conftest.py)")

TINY = ["--steps", "4", "--hidden", "16", "--batch-size", "16"]


@needs_8
@pytest.mark.parametrize("flags", [
    ["--method", "orthonormalize", "--parallel", "layers"],
    ["--method", "gradient_norm_penalty", "--mesh", "4", "2",
     "--axis-types", "auto"],
], ids=["orthonormalize-layers-explicit", "gnp-auto-4x2"])
@pytest.mark.slow  # 13 s per case on a loaded 2-core machine
def test_train_sharded_tiny(flags):
  r = train_sharded.main(TINY + flags)
  assert r["devices"] == 8 and math.prod(r["mesh"].values()) == 8
  assert math.isfinite(r["final_loss"]) and r["final_loss"] < r["first_loss"]
  assert 0.0 <= r["test_accuracy"] <= 1.0
  # The step's pinned output shardings keep the tensor-parallel layout.
  assert r["param_shardings_kept"]
