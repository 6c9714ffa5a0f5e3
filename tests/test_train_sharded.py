"""examples/train_sharded.py runs at tiny size on the 8 virtual CPU devices; its
flags are checked; a run stopped by SIGTERM, or resumed from a truncated last
checkpoint, takes the steps of the uninterrupted run; a checkpoint directory
in use is refused (multi-process runs: tests/test_distributed.py)."""

import glob
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "examples")
sys.path.insert(0, EXAMPLES)

import long_runs  # noqa: E402
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


# ------------------------------------------------------------ the command line


def test_help_states_every_default():
  parser = train_sharded.make_parser()
  text = parser.format_help()
  blocks = {b.split()[0]: " ".join(b.split()) for b in re.split(r"\n  (?=--)", text)}
  defaults = vars(parser.parse_args([]))
  for dest, value in defaults.items():
    flag = "--" + dest.replace("_", "-")
    if value is None or value is False:  # said in words, or a switch
      continue
    assert f"(default: {value}" in blocks[flag], (flag, blocks[flag])
  assert defaults["polar"] == "auto"  # the library's default
  assert "(default: 8;" in blocks["--local-devices"]


def test_checkpoints_are_periodic_by_default():
  args = train_sharded.make_parser().parse_args(["--checkpoint-dir", "d"])
  assert args.checkpoint_every == 100


@pytest.mark.parametrize("flags, message", [
    (["--checkpoint-every", "-1"], "--checkpoint-every must be >= 0, got -1"),
    (["--init-timeout", "0"], "--init-timeout must be >= 1, got 0"),
], ids=["checkpoint-every", "init-timeout"])
def test_long_run_flags_are_checked(flags, message, capsys):
  with pytest.raises(SystemExit):
    train_sharded.main(flags)
  assert message in capsys.readouterr().err


# ------------------------------------------------------------------ long runs

LONG = ["--steps", "500", "--hidden", "16", "--batch-size", "16"]


@pytest.fixture(scope="module")
def uninterrupted():
  """The 500 steps without a stop: what every resumed run must reproduce."""
  return train_sharded.main(LONG)


def corrupt(step_dir: str) -> None:
  """Truncates the data files of a saved step (a full disk, a killed copy)."""
  # Every one: which of them a restore reads depends on orbax's merge.
  files = glob.glob(os.path.join(step_dir, "default", "**", "d", "*"), recursive=True)
  assert files, step_dir
  for name in files:
    with open(name, "r+b") as f:
      f.truncate(16)


@needs_8
@pytest.mark.slow
def test_sigterm_saves_and_the_rerun_resumes(uninterrupted, tmp_path):
  # What a TPU VM or SLURM sends before taking the machine; no periodic
  # checkpoint, so the one found is the one written on SIGTERM.
  ckpt = str(tmp_path / "ckpt")
  cmd = [sys.executable, os.path.join(EXAMPLES, "train_sharded.py"), *LONG,
         "--log-every", "1", "--checkpoint-dir", ckpt, "--checkpoint-every", "0"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", OPENBLAS_NUM_THREADS="1")
  with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True, env=env, start_new_session=True) as proc:
    try:
      lines = []
      for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 20 "):
          proc.send_signal(signal.SIGTERM)
      proc.wait(timeout=120)
    finally:
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
  text = "".join(lines)
  assert proc.returncode == long_runs.PREEMPTED_EXIT_CODE, text[-3000:]
  stopped = int(re.search(r"preempted \(SIGTERM\) after step (\d+)", text)[1])
  assert 20 <= stopped < 500, text[-3000:]
  assert sorted(os.listdir(ckpt)) == [str(stopped), "settings.json"]
  # Printed as float32 exactly: the steps before the signal are the reference's.
  printed = re.findall(r"^step (\d+) loss (\S+)$", text, re.M)
  assert printed == [(str(i + 1), f"{x:.9g}") for i, x in
                     enumerate(uninterrupted["losses"][:stopped])]
  resumed = train_sharded.main(LONG + ["--checkpoint-dir", ckpt])
  assert resumed["start_step"] == stopped and not resumed["preempted"]
  assert resumed["losses"] == uninterrupted["losses"][stopped:]
  assert resumed["test_accuracy"] == uninterrupted["test_accuracy"]


@needs_8
@pytest.mark.slow
# tensorstore's reader of a broken file leaves an event loop callback behind.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_truncated_last_checkpoint_falls_back_and_says_so(
    uninterrupted, tmp_path, capsys):
  ckpt = str(tmp_path / "ckpt")
  first = LONG + ["--checkpoint-dir", ckpt, "--checkpoint-every", "3"]
  train_sharded.main(first[:1] + ["4"] + first[2:])  # saves steps 3 and 4
  corrupt(os.path.join(ckpt, "4"))
  capsys.readouterr()
  r = train_sharded.main(first[:1] + ["6"] + first[2:])
  err = capsys.readouterr().err
  assert r["start_step"] == 3
  assert r["losses"] == uninterrupted["losses"][3:6]
  assert "checkpoint step 4" in err and "does not restore" in err, err
  assert "resuming from step 3" in err, err
  # Kept for inspection, out of the way of the new step 4 (and 6).
  names = os.listdir(ckpt)
  assert any(n.startswith("4.unrestorable") for n in names), names
  assert "6" in names and "job.lock" not in names  # the lock is released
  # Nothing restores: stop rather than start again from step 0.
  for step in ("3", "6"):
    if os.path.isdir(os.path.join(ckpt, step)):
      corrupt(os.path.join(ckpt, step))
  with pytest.raises(SystemExit, match="no checkpoint in .* restores"):
    train_sharded.main(first[:1] + ["8"] + first[2:])


def test_a_directory_in_use_is_refused(tmp_path):
  ckpt = str(tmp_path / "ckpt")
  lock = long_runs.DirectoryLock(ckpt)
  assert lock.acquire() is None
  try:
    with pytest.raises(SystemExit, match=f"in use by another job: pid {os.getpid()}"):
      train_sharded.main(LONG + ["--checkpoint-dir", ckpt])
  finally:
    lock.release()
  assert not os.path.exists(os.path.join(ckpt, "job.lock"))


def write_lock(directory, host: str, pid: int, age_s: float = 0.0) -> str:
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, long_runs.DirectoryLock.NAME)
  with open(path, "w") as f:
    json.dump({"host": host, "pid": pid, "started": "then", "command": "train"}, f)
  past = time.time() - age_s
  os.utime(path, (past, past))
  return path


def test_a_lock_of_an_ended_process_is_taken_over(tmp_path):
  gone = subprocess.Popen(["true"])
  gone.wait()
  write_lock(tmp_path, socket.gethostname(), gone.pid)
  lock = long_runs.DirectoryLock(str(tmp_path))
  warning = lock.acquire()
  try:
    assert f"stale lock {tmp_path}" in warning and f"process {gone.pid}" in warning
    assert lock.holder()["pid"] == os.getpid()
  finally:
    lock.release()


def test_a_lock_of_another_host_is_stale_only_without_heartbeat(tmp_path):
  write_lock(tmp_path, "elsewhere", 1, age_s=10)
  with pytest.raises(long_runs.DirectoryLockedError,
                     match="pid 1 on host elsewhere, started then, alive 10 s ago"):
    long_runs.DirectoryLock(str(tmp_path)).acquire()
  write_lock(tmp_path, "elsewhere", 1, age_s=700)
  lock = long_runs.DirectoryLock(str(tmp_path), stale_after=600)
  assert "no heartbeat for 700 s" in lock.acquire()
  lock.release()


def test_the_lock_holder_renews_its_heartbeat(tmp_path):
  lock = long_runs.DirectoryLock(str(tmp_path), heartbeat=0.05)
  lock.acquire()
  try:
    past = time.time() - 1000
    os.utime(lock.path, (past, past))
    deadline = time.monotonic() + 10
    while lock.holder()["age_s"] > 100 and time.monotonic() < deadline:
      time.sleep(0.05)
    assert lock.holder()["age_s"] < 100
  finally:
    lock.release()
  assert lock.holder() is None


def test_a_resume_with_other_settings_names_them(tmp_path):
  ckpt = str(tmp_path / "ckpt")
  first = {"--method": "orthonormalize", "--polar": "auto", "--hidden": 16, "--seed": 0}
  long_runs.check_checkpoint_settings(ckpt, first)
  long_runs.check_checkpoint_settings(ckpt, first)  # the same: accepted
  with pytest.raises(SystemExit, match=(
      f"checkpoints in {ckpt} were written with --hidden 16; this run has"
      " --hidden 32. Resume with the same settings")):
    train_sharded.main(LONG[:2] + ["--hidden", "32", "--seed", "0",
                                   "--checkpoint-dir", ckpt])
  assert not os.path.exists(os.path.join(ckpt, "job.lock"))  # released


def test_a_damaged_lock_is_taken_over(tmp_path):
  (tmp_path / long_runs.DirectoryLock.NAME).write_text("{trunc")
  lock = long_runs.DirectoryLock(str(tmp_path))
  assert "the file is not a lock" in lock.acquire()
  lock.release()
  assert os.listdir(tmp_path) == []  # no draft left behind either
