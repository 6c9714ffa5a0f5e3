"""examples/transfer.py runs end to end at tiny size."""

import os
import sys

import pytest

# About 40 s on a loaded 2-core machine: GrOD itself is tested in test_grod.py.
pytestmark = pytest.mark.slow

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples"))

import transfer  # noqa: E402


def test_transfer_tiny(tmp_path):
  rows = transfer.main(["--seeds", "1", "--steps", "3", "--pretrain-steps", "3",
                        "--eval-every", "2", "--shots", "2", "--out", str(tmp_path),
                        "--methods", "fine_tune", "l2_sp+grod", "distill+grod"])
  assert [r["method"] for r in rows] == ["fine_tune", "l2_sp+grod", "distill+grod"]
  for r in rows:
    assert 0.0 <= r["test_accuracy"] <= 1.0
    assert 0.0 <= r["conflict_fraction"] <= 1.0
  assert (tmp_path / "transfer_curves.png").stat().st_size > 0
  assert (tmp_path / "transfer_results.json").stat().st_size > 0
