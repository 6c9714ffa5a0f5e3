"""examples/opt.py and the opt_sgd entry of examples/compare.py at tiny size."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "examples"))

import compare  # noqa: E402
import opt  # noqa: E402


@pytest.mark.slow  # about 30 s on a loaded 2-core machine
def test_opt_example_keeps_energy_of_opt_layers(tmp_path):
  runs = opt.main(["--steps", "2", "--energy-every", "1", "--batch-size", "8",
                   "--out", str(tmp_path)])
  assert {r["variant"] for r in runs} == {"plain", "opt_cayley", "opt_ogd"}
  for r in runs:
    energy = r["history"]["energy"]
    assert len(energy) == 3 and set(energy[0]) == {
        "Conv_0", "Conv_1", "Dense_0", "Dense_1"}
    if r["variant"] != "plain":
      for layer in energy[0]:
        np.testing.assert_allclose(energy[-1][layer], energy[0][layer], rtol=1e-4)
  assert (tmp_path / "energy.png").exists()
  assert (tmp_path / "opt_results.json").exists()


@pytest.mark.slow
def test_compare_runs_the_opt_cnn(tmp_path):
  assert compare.METHODS["opt_sgd"].model is compare.OPTCNN
  assert compare.METHODS["sgd"].model is compare.CNN
  rows = compare.main(["--methods", "sgd", "opt_sgd", "--seeds", "1", "--steps",
                       "3", "--eval-every", "3", "--out", str(tmp_path)])
  assert {r["method"] for r in rows} == {"sgd", "opt_sgd"}
