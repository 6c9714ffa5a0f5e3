"""The examples run end to end at tiny size."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples"))

import argparse  # noqa: E402

import compare  # noqa: E402
import defaults  # noqa: E402
import opt  # noqa: E402
import pytest  # noqa: E402
import train_common  # noqa: E402
import transfer  # noqa: E402


def test_compare_tiny(tmp_path, capsys):
  rows = compare.main(["--methods", "sgd", "orthogonal_sgd", "--seeds", "1",
                       "--steps", "6", "--eval-every", "3", "--out", str(tmp_path)])
  assert {r["method"] for r in rows} == {"sgd", "orthogonal_sgd"}
  # stdout is not a terminal here: tqdm's bar is off, a line per run instead.
  out = capsys.readouterr().out
  assert "[1/2] sgd seed 0: test accuracy" in out
  assert "[2/2] orthogonal_sgd seed 0: test accuracy" in out
  assert all(r["time_per_step"] > 0 and r["wall_time_per_step"] > 0 for r in rows)
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


def test_step_timing_takes_every_method_in_a_new_random_order_and_the_minimum():
  calls = []
  steppers = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
  times = compare.interleaved_step_times(steppers, rounds=6, steps=2)
  assert set(times) == set("abcd")
  assert all(0 <= t["cpu"] and 0 <= t["wall"] for t in times.values())
  rounds = [calls[i:i + 12] for i in range(0, len(calls), 12)]
  assert len(rounds) == 6 and all(sorted(r) == sorted(3 * "abcd") for r in rounds)
  orders = {tuple(dict.fromkeys(r)) for r in rounds}
  assert len(orders) > 1


def _parsers():
  captured = {}

  def capture(self, argv=None, namespace=None):
    captured["parser"] = self
    raise SystemExit(0)

  parsers = {"train_common": train_common.parser("train")}
  for name, main in (("compare", compare.main), ("opt", opt.main),
                     ("transfer", transfer.main)):
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(argparse.ArgumentParser, "parse_args", capture)
      with pytest.raises(SystemExit):
        main([])
    parsers[name] = captured.pop("parser")
  return parsers


@pytest.mark.parametrize("name, parser", list(_parsers().items()))
def test_help_shows_every_default_and_never_none(name, parser):
  text = parser.format_help()
  assert "(default: None)" not in text, name
  for action in parser._actions:
    if action.dest == "help":
      continue
    shown = parser._get_formatter()._get_help_string(action) or ""
    assert "default" in shown, (name, action.dest)


def test_the_training_scripts_take_their_rates_from_the_table():
  p = train_common.parser("train")
  assert train_common.parse(p, []).lr == defaults.LEARNING_RATE["orthogonal_sgd"] == 0.005
  for name in train_common.OPTIMIZERS:
    assert train_common.parse(p, ["--optimizer", name]).lr == defaults.LEARNING_RATE[name]
  assert train_common.parse(p, ["--lr", "0.3"]).lr == 0.3
  args = train_common.parse(p, ["--optimizer", "sgd", "--cosine"])
  assert train_common.describe(args) == (
      "sgd (learning rate 0.05, cosine decay over 300 steps)")


def test_every_compare_method_has_a_learning_rate_in_the_table():
  families = {name.partition("[")[0] for name in compare.METHODS}
  assert families <= set(defaults.LEARNING_RATE)
  assert compare.panels(["sgd", "orthogonal_sgd", "sgd_l2", "grod_l2", "adam"]) == {
      "orthogonal_sgd": ["sgd", "orthogonal_sgd"],
      "L2: sum or GrOD": ["sgd", "sgd_l2", "grod_l2"],
      "adam": ["adam"]}
