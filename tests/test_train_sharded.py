"""examples/train_sharded.py runs at tiny size on the 8 virtual CPU devices; its
cluster flags are checked (multi-process runs: tests/test_distributed.py)."""

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


@pytest.mark.parametrize("flags, message", [
    (["--num-processes", "2"], "need --coordinator-address"),
    (["--coordinator-address", "localhost:1", "--distributed"], "does not combine"),
    (["--coordinator-address", "localhost:1", "--num-processes", "2"],
     "needs --num-processes and --process-id"),
    (["--coordinator-address", "localhost:1", "--num-processes", "2",
      "--process-id", "2"], "--process-id must be in [0, 2), got 2"),
    (["--local-devices", "0"], "--local-devices must be >= 1, got 0"),
], ids=["no-coordinator", "both", "no-id", "id-range", "zero-devices"])
def test_cluster_flags_are_checked(flags, message, capsys):
  with pytest.raises(SystemExit):
    train_sharded.main(flags)
  assert message in capsys.readouterr().err


@needs_8
def test_local_devices_after_the_backend_started():
  # conftest.py started the CPU backend with 8 devices: 4 can no longer be had.
  with pytest.raises(SystemExit, match="already started with 8 devices"):
    train_sharded.main(["--local-devices", "4"])
