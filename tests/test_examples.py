"""The examples run end to end at tiny size."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples"))

import compare  # noqa: E402
import pytest  # noqa: E402


def test_compare_tiny(tmp_path):
  rows = compare.main(["--methods", "sgd", "orthogonal_sgd", "--seeds", "1",
                       "--steps", "6", "--eval-every", "3", "--out", str(tmp_path)])
  assert {r["method"] for r in rows} == {"sgd", "orthogonal_sgd"}
  for name in ("curves.png", "time_per_step.png", "results.json"):
    assert (tmp_path / name).stat().st_size > 0
  with open(tmp_path / "results.json") as f:
    data = json.load(f)
  assert len(data["runs"]) == 2
  assert all(0.0 <= r["final_test_accuracy"] <= 1.0 for r in data["runs"])


def test_every_method_gets_its_own_colour_and_line_style():
  styles = compare.line_styles(list(compare.METHODS) + ["new_method", "another"])
  pairs = [(s["color"], str(s["linestyle"])) for s in styles.values()]
  assert len(set(pairs)) == len(pairs) == len(compare.METHODS) + 2
  assert styles["sgd"]["color"] != styles["sgd_l2"]["color"]


def test_short_runs_do_not_overwrite_the_full_run():
  assert compare.parse_args([]).out == "out"
  assert compare.parse_args(["--all"]).out == "out"
  short = compare.parse_args(["--methods", "sgd", "orthogonal_sgd", "--seeds", "1"])
  assert short.out == os.path.join("out", "sgd-orthogonal_sgd_seeds1")
  assert compare.parse_args(["--methods", "orthogonal_sgd[svd]"]).out == os.path.join(
      "out", "orthogonal_sgd_svd")
  assert compare.parse_args(["--out", "mine"]).out == "mine"


def test_help_shows_defaults(capsys):
  with pytest.raises(SystemExit):
    compare.parse_args(["--help"])
  out = capsys.readouterr().out
  assert "(default: 300)" in out and "(default: 3)" in out
