"""examples/train_sharded.py across processes: jax.distributed on localhost.

Two processes of 4 CPU devices each (gloo collectives) train the tiny MLP and
must print, on both processes, exactly the losses and test accuracy of one
process of 8 devices; a run stopped after a checkpoint and resumed in new
processes takes exactly the steps of the uninterrupted run. What goes wrong on
a pod: SIGTERM to one process stops both after the same step, saved; both skip
a truncated last step together; processes given different seeds stop before
training; a process started without its peer names it within --init-timeout.

The one-process reference also runs through `jax.distributed` (one process,
gloo collectives): the row-parallel layer sums 4 partial products over
"model", and XLA's in-process all-reduce adds them in another order than gloo
does, so a plain one-process run agrees with both to float32 rounding only
(checked too).

Each launch runs this file as a script (`worker` below), which calls
`train_sharded.main` once per configuration in one `jax.distributed` session,
so the runtime starts once per launch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

TINY = ["--steps", "6", "--hidden", "16", "--batch-size", "16", "--log-every", "1"]
MODES = ("layers", "replicated")
CHECKPOINT_STEP = 3
# Per launch, from its start; the machine may be loaded. Two launches run one
# after the other, within pytest-timeout's 600 s.
TIMEOUT_S = 240
MARK = "RESULTS "


def worker(spec: str) -> None:
  """Runs train_sharded.main for every configuration; prints the results."""
  import train_sharded

  spec = json.loads(spec)
  results = [train_sharded.main(spec["cluster"] + run) for run in spec["runs"]]
  keep = ("losses", "test_accuracy", "start_step", "end_step", "preempted",
          "processes", "process_index", "devices", "mesh")
  print(MARK + json.dumps([{k: r[k] for k in keep} for r in results]), flush=True)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


class Launch:
  """`num_processes` workers of `local_devices` CPU devices each."""

  def __init__(self, num_processes: int, local_devices: int, runs, tmp: str,
               per_process=None):
    port = free_port()
    self.deadline = time.monotonic() + TIMEOUT_S
    env = dict(os.environ, JAX_PLATFORMS="cpu", OPENBLAS_NUM_THREADS="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    self.procs, self.files = [], []
    for i in range(num_processes):
      spec = {"cluster": ["--coordinator-address", f"localhost:{port}",
                          "--num-processes", str(num_processes), "--process-id",
                          str(i), "--local-devices", str(local_devices)],
              "runs": [run + (per_process[i] if per_process else []) for run in runs]}
      out = tempfile.TemporaryFile("w+", dir=tmp)
      self.files.append(out)
      self.procs.append(subprocess.Popen(
          [sys.executable, os.path.abspath(__file__), json.dumps(spec)],
          stdout=out, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env))

  def output(self, i: int) -> str:
    """What process `i` printed so far."""
    self.files[i].seek(0)
    return self.files[i].read()

  def outputs(self) -> list[str]:
    """Waits for every process (killed at the deadline); their outputs."""
    try:
      for p in self.procs:
        p.wait(timeout=max(0.0, self.deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      for p in self.procs:
        p.kill()
    return [self.output(i) for i in range(len(self.procs))]

  def results(self):
    """Per process: (its results, its printed lines without timings)."""
    outputs = self.outputs()
    for i, (p, text) in enumerate(zip(self.procs, outputs)):
      assert p.returncode == 0, (
          f"process {i} exited with {p.returncode} (timeout {TIMEOUT_S} s"
          f" if negative):\n{text[-4000:]}")
    per_process = []
    for text in outputs:
      lines = text.splitlines()
      results = json.loads(next(ln for ln in lines if ln.startswith(MARK))[len(MARK):])
      printed = [ln for ln in lines if ln.startswith(("step ", "loss ", "8 cpu"))]
      per_process.append((results, printed))
    return per_process


if __name__ == "__main__":
  worker(sys.argv[1])
  sys.exit(0)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("orbax.checkpoint")
pytest.importorskip("sklearn")

# Every test here shares two 2-process launches (about a minute on 2 cores).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Every launch, started together where they do not depend on each other."""
  tmp = str(tmp_path_factory.mktemp("distributed"))
  ckpt = os.path.join(tmp, "ckpt")
  full = [TINY + ["--parallel", m] for m in MODES]
  # Stopped after the checkpoint at step 3 ("killed"), then resumed.
  stopped = TINY + ["--parallel", "layers", "--steps", str(CHECKPOINT_STEP),
                    "--checkpoint-dir", ckpt]
  resumed = TINY + ["--parallel", "layers", "--checkpoint-dir", ckpt]
  one = Launch(1, 8, full, tmp)
  two = Launch(2, 4, full + [stopped], tmp)
  two_results = two.results()
  # Step 3 only, for a resume by one process (the relaunch below adds step 6).
  shutil.copytree(ckpt, ckpt + "-copy")
  again = Launch(2, 4, [resumed], tmp)
  return {"one": one.results(), "two": two_results, "resumed": again.results(),
          "ckpt": ckpt}


@pytest.mark.parametrize("mode", MODES)
def test_two_processes_print_what_one_process_prints(runs, mode):
  k = MODES.index(mode)
  [(ref, ref_printed)] = runs["one"]
  assert ref[k]["processes"] == 1 and ref[k]["devices"] == 8
  assert ref[k]["mesh"] == {"data": 2, "model": 4}
  for i, (res, _) in enumerate(runs["two"]):
    assert res[k]["processes"] == 2 and res[k]["process_index"] == i
    assert res[k]["devices"] == 8 and res[k]["mesh"] == ref[k]["mesh"]
    assert res[k]["losses"] == ref[k]["losses"], (i, mode)
    assert res[k]["test_accuracy"] == ref[k]["test_accuracy"], (i, mode)
  # Every process printed the same lines, which are the reference's.
  per_run = 6 + 2  # the step lines, the header, the summary
  block = slice(k * per_run, (k + 1) * per_run)
  expected = [ln.replace("in 1 process(es)", "in 2 process(es)")
              for ln in ref_printed[block]]
  for _, printed in runs["two"]:
    assert printed[block] == expected
  assert ref[k]["losses"][-1] < ref[k]["losses"][0]


def test_resume_from_checkpoint_takes_the_same_steps(runs):
  layers = MODES.index("layers")
  [(ref, _)] = runs["one"]
  full = ref[layers]
  for i, (res, _) in enumerate(runs["two"]):
    assert res[len(MODES)]["losses"] == full["losses"][:CHECKPOINT_STEP], i
  for i, (res, _) in enumerate(runs["resumed"]):
    [r] = res
    assert r["start_step"] == CHECKPOINT_STEP
    assert r["losses"] == full["losses"][CHECKPOINT_STEP:], i
    assert r["test_accuracy"] == full["test_accuracy"], i
  # Each process wrote its own shards.
  saved = os.listdir(os.path.join(runs["ckpt"], str(CHECKPOINT_STEP), "default"))
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(saved), saved


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (conftest.py)")
def test_plain_one_process_run_agrees_to_rounding(runs):
  import train_sharded

  [(ref, _)] = runs["one"]
  layers = MODES.index("layers")
  plain = train_sharded.main(TINY + ["--parallel", "layers"])
  assert plain["processes"] == 1
  np.testing.assert_allclose(plain["losses"], ref[layers]["losses"], rtol=1e-5)
  assert abs(plain["test_accuracy"] - ref[layers]["test_accuracy"]) <= 2 / 448


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (conftest.py)")
def test_one_process_resumes_a_two_process_checkpoint(runs):
  import train_sharded

  [(ref, _)] = runs["one"]
  layers = MODES.index("layers")
  r = train_sharded.main(TINY + ["--parallel", "layers", "--checkpoint-dir",
                                 runs["ckpt"] + "-copy"])
  assert r["processes"] == 1 and r["start_step"] == CHECKPOINT_STEP
  # Plain collectives here: equal to rounding (see the module docstring).
  np.testing.assert_allclose(r["losses"], ref[layers]["losses"][CHECKPOINT_STEP:],
                             rtol=1e-5)


# ------------------------------------------------- what goes wrong on a pod


def test_processes_given_different_seeds_stop_with_a_clear_message(tmp_path):
  # Each would draw its own batches and the run would finish "fine".
  launch = Launch(2, 4, [TINY], str(tmp_path),
                  per_process=[["--seed", "0"], ["--seed", "1"]])
  for i, (p, text) in enumerate(zip(launch.procs, launch.outputs())):
    assert p.returncode == 1, text[-3000:]
    assert "started with different --seed;" in text, text[-3000:]
    assert f"Process {i} has --seed {i}." in text, text[-3000:]
    assert "step 1 " not in text


def alone(process_id: int, tmp: str) -> tuple[subprocess.Popen, str, float]:
  """Process `process_id` of 2 started without the other one."""
  address = f"localhost:{free_port()}"
  out = tempfile.TemporaryFile("w+", dir=tmp)
  env = dict(os.environ, JAX_PLATFORMS="cpu", OPENBLAS_NUM_THREADS="1")
  proc = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "examples", "train_sharded.py"),
       "--coordinator-address", address, "--num-processes", "2", "--process-id",
       str(process_id), "--local-devices", "4", "--init-timeout", "3"],
      stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
  proc.out = out
  return proc, address, time.monotonic()


def test_a_missing_peer_is_named_within_the_init_timeout(tmp_path):
  # jax alone: 300 s of silence, then an abort blaming a task that "died".
  launches = {i: alone(i, str(tmp_path)) for i in (0, 1)}
  for i, (proc, address, started) in launches.items():
    proc.wait(timeout=TIMEOUT_S)
    took = time.monotonic() - started
    proc.out.seek(0)
    text = proc.out.read()
    assert proc.returncode == 1, text[-3000:]
    assert "DEADLINE_EXCEEDED" not in text and "died" not in text, text[-3000:]
    if i == 0:  # the coordinator: the others did not come
      assert (f"error: process 0 of 2: process 1 did not connect to the"
              f" coordinator at {address}, which this process runs, within 3 s"
              ) in text, text
    else:  # nobody serves the coordinator: process 0 is missing
      assert (f"error: process 1 of 2: nothing answered at {address} within 3 s:"
              " process 0, which runs the coordinator there, was not started") in text, text
    assert "--num-processes 2 and its own --process-id" in text
    assert took < 120, took  # jax's start-up on a loaded machine, plus 3 s


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (conftest.py)")
def test_sigterm_to_one_process_stops_every_process_at_one_step(tmp_path):
  import train_sharded

  ckpt = str(tmp_path / "ckpt")
  run = ["--steps", "200", "--hidden", "16", "--batch-size", "16", "--log-every", "1",
         "--checkpoint-dir", ckpt, "--checkpoint-every", "0"]
  launch = Launch(2, 4, [run], str(tmp_path))
  while not re.search(r"^step 20 ", launch.output(1), re.M):
    assert time.monotonic() < launch.deadline and launch.procs[1].poll() is None, (
        launch.output(1)[-3000:])
    time.sleep(0.2)
  launch.procs[1].send_signal(signal.SIGTERM)  # process 0 gets nothing
  [(r0, _), (r1, _)] = launch.results()
  assert r0[0]["preempted"] and r1[0]["preempted"]
  stopped = r0[0]["end_step"]
  assert r1[0]["end_step"] == stopped and 20 <= stopped < 200
  assert r0[0]["losses"] == r1[0]["losses"] and len(r0[0]["losses"]) == stopped
  assert sorted(os.listdir(ckpt)) == [str(stopped), "settings.json"]  # saved; the lock released
  resumed = train_sharded.main(run[:1] + [str(stopped + 2)] + run[2:])
  assert resumed["start_step"] == stopped and len(resumed["losses"]) == 2


def test_two_processes_fall_back_from_a_truncated_step_together(runs, tmp_path):
  from tests.test_train_sharded import corrupt

  ckpt = str(tmp_path / "ckpt")
  shutil.copytree(runs["ckpt"], ckpt)  # steps 3 and 6
  corrupt(os.path.join(ckpt, "6"))
  launch = Launch(2, 4, [TINY + ["--parallel", "layers", "--checkpoint-dir", ckpt]],
                  str(tmp_path))
  [(ref, _)] = runs["one"]
  full = ref[MODES.index("layers")]
  for i, (res, _) in enumerate(launch.results()):
    [r] = res
    assert r["start_step"] == 3, i
    assert r["losses"] == full["losses"][3:], i
    text = launch.output(i)
    assert f"checkpoint step 6 in {ckpt} does not restore" in text, text[-3000:]
    assert "resuming from step 3" in text
  assert any(n.startswith("6.unrestorable.") for n in os.listdir(ckpt))
