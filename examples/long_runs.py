"""What a training run that lasts days on many processes needs around its loop.

`examples/train_sharded.py` uses all of it; docs/long_runs.md shows the
pattern for a loop of one's own.

- `start_distributed`: `jax.distributed.initialize` with a deadline that says
  which process did not arrive and what to check.
- `check_same_config`: every process was started with the same settings.
- `DirectoryLock`: one job at a time writes a checkpoint directory.
- `check_checkpoint_settings`: a resume has the settings its checkpoints had.
- `restore_newest`: the newest checkpoint that restores; a broken one is
  skipped, said, and kept aside.
- `Preemption`: SIGTERM (a Spot VM being reclaimed, SLURM's warning before the
  time limit) sets a flag; every process sees it at the same step.

Every function that talks to the other processes is a collective: all
processes call it at the same point of the program.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
import zlib
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

# What a process ended by SIGTERM reports (128 + 15): a wrapper script or the
# scheduler tells "preempted, rerun me" from "done" (0).
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


def any_process(flag: bool) -> bool:
  """True on every process if `flag` is True on any (a collective)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


# ----------------------------------------------------------- start-up


def _reachable(address: str, timeout: float) -> bool:
  """Whether something accepts TCP connections at HOST:PORT within `timeout`."""
  host, port = address.rsplit(":", 1)
  deadline = time.monotonic() + timeout
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
        return True
    except OSError:
      if time.monotonic() >= deadline:
        return False
      time.sleep(0.5)


def start_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    initialization_timeout: int = 300,
    heartbeat_timeout: int = 100,
) -> None:
  """`jax.distributed.initialize`, ending with a clear message if a peer is missing.

  jax waits `initialization_timeout` seconds for every process to connect to
  the coordinator (process 0), then aborts from C++ with a message that
  blames "another task" that "died", whichever process is missing. Here a
  watchdog ends the process a little earlier with one that names the
  coordinator's address, the process that is missing where it can be known
  (a process other than 0 that cannot reach the coordinator: process 0), and
  what to check. `heartbeat_timeout` is how long the others wait for a
  process that stops answering (killed, hung machine) before they abort.
  Without arguments the cluster is detected (Cloud TPU, SLURM, Open MPI).
  """
  where = (f"process {process_id} of {num_processes}" if process_id is not None
           else "this process")
  address = coordinator_address or "the detected coordinator address"
  if coordinator_address:
    check = (f"check that all {num_processes} processes were started, each with"
             f" --coordinator-address {address}, --num-processes {num_processes}"
             " and its own --process-id, and that the address is reachable from"
             " every host (firewall, host name, interface)")
  else:
    check = ("check that every host of the job started this command (a worker"
             " that failed to start, a slice or an allocation not fully up)")

  def fail(message: str) -> None:
    print(f"error: {where}: {message}; {check}.", file=sys.stderr, flush=True)
    os._exit(1)  # jax's own abort would follow and blame a dead task

  if coordinator_address and process_id not in (None, 0):
    # Process 0 serves the coordinator: nothing to wait for there means
    # process 0 is the one missing.
    if not _reachable(coordinator_address, initialization_timeout):
      fail(f"nothing answered at {coordinator_address} within"
           f" {initialization_timeout} s: process 0, which runs the coordinator"
           " there, was not started or is not reachable")
  if process_id == 0 and num_processes:
    others = ("process 1" if num_processes == 2
              else f"not all of processes 1 to {num_processes - 1}")
    late = (f"{others} did not connect to the coordinator at {address}, which"
            " this process runs,")
  else:
    late = f"not every process connected to the coordinator at {address}"
  watchdog = threading.Timer(initialization_timeout, fail, args=(
      f"{late} within {initialization_timeout} s",))
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(
        coordinator_address, num_processes, process_id,
        # The watchdog speaks first.
        initialization_timeout=initialization_timeout + 30,
        heartbeat_timeout_seconds=heartbeat_timeout)
  finally:
    watchdog.cancel()


def _digest(value: Any) -> np.int32:
  """A 32-bit digest of `value`'s repr, as int32 (what jax all-gathers)."""
  return np.uint32(zlib.crc32(repr(value).encode())).view(np.int32)


def check_same_config(config: dict[str, Any]) -> None:
  """Exits on every process if the processes were given different `config`s.

  `config` holds what must be shared (seed, model, data, steps, ...): with
  another seed on one process, each would draw other batches and the run
  would still finish. Compares digests across processes (one tiny collective;
  a second when they differ) and names each key that differs, with this
  process's value.
  """
  if jax.process_count() == 1:
    return
  names = sorted(config)
  overall = np.array([_digest(names), _digest([config[k] for k in names])])
  everyone = multihost_utils.process_allgather(overall)
  if (everyone == everyone[0]).all():
    return
  if (everyone[:, 0] == everyone[0, 0]).all():  # the same keys: which differ?
    per_key = multihost_utils.process_allgather(
        np.array([_digest(config[k]) for k in names]))
    differ = [k for j, k in enumerate(names) if (per_key[:, j] != per_key[0, j]).any()]
  else:
    differ = ["the set of settings (another version of the program?)"]
  mine = ", ".join(f"{k} {config[k]!r}" for k in differ if k in config)
  raise SystemExit(
      f"error: the processes were started with different {', '.join(differ)};"
      " every process must get the same settings (only its process id"
      f" differs). Process {jax.process_index()} has {mine or 'other keys'}.")


# -------------------------------------------------------- checkpoints


class DirectoryLockedError(RuntimeError):
  """Another job holds the checkpoint directory."""


class DirectoryLock:
  """One job at a time in a checkpoint directory: a lock file and a heartbeat.

  `acquire` creates `<directory>/job.lock` (host, pid, start time, command)
  or raises `DirectoryLockedError` naming the job that holds it. A lock is
  stale, and taken over with a warning, when its process is gone (same host)
  or its heartbeat (the file's modification time, renewed every
  `heartbeat` seconds by a thread) is older than `stale_after` seconds (a
  crashed job on another host). Local and mounted file systems only: a bucket
  (``gs://``) has no exclusive create. Call it on one process of a job.
  """

  NAME = "job.lock"

  def __init__(self, directory: str, *, stale_after: float = 600.0,
               heartbeat: float = 30.0):
    self.path = os.path.join(directory, self.NAME)
    self.stale_after = stale_after
    self.heartbeat = heartbeat
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def holder(self) -> dict[str, Any] | None:
    """The lock's contents, with its heartbeat age in seconds; None if free."""
    try:
      with open(self.path) as f:
        info = json.load(f)
      info["age_s"] = time.time() - os.stat(self.path).st_mtime
    except FileNotFoundError:
      return None
    except (OSError, ValueError):  # damaged: nobody can hold it
      return {"host": "?", "pid": "?", "age_s": float("inf"), "damaged": True}
    return info

  def stale_reason(self, info: dict[str, Any]) -> str | None:
    """Why the lock `info` can be taken over, or None while its job lives."""
    if info.get("damaged"):
      return "the file is not a lock"
    if info["age_s"] > self.stale_after:
      return f"no heartbeat for {info['age_s']:.0f} s (> {self.stale_after:.0f} s)"
    if info.get("host") == socket.gethostname():
      try:
        os.kill(int(info["pid"]), 0)
      except ProcessLookupError:
        return f"process {info['pid']} on this host has ended"
      except PermissionError:  # alive, another user's
        pass
    return None

  def acquire(self) -> str | None:
    """Takes the lock; returns a warning if a stale lock was taken over."""
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    warning = None
    info = self.holder()
    if info is not None:
      reason = self.stale_reason(info)
      if reason is None:
        raise DirectoryLockedError(
            f"{os.path.dirname(self.path)} is in use by another job: pid"
            f" {info.get('pid')} on host {info.get('host')}, started"
            f" {info.get('started')}, alive {info['age_s']:.0f} s ago"
            f" ({info.get('command', '')}). Two jobs in one checkpoint directory"
            " overwrite each other's steps: give this job another directory,"
            f" or stop that job (or, if it is gone, delete {self.path}).")
      warning = (f"warning: taking over the stale lock {self.path} of pid"
                 f" {info.get('pid')} on host {info.get('host')}: {reason}")
      os.unlink(self.path)
    # Written in full, then linked into place: link fails if the name exists
    # (local file systems and NFS alike), so nobody reads half a lock.
    draft = f"{self.path}.{socket.gethostname()}.{os.getpid()}"
    with open(draft, "w") as f:
      json.dump({"host": socket.gethostname(), "pid": os.getpid(),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                 "command": " ".join(sys.argv)}, f)
    try:
      os.link(draft, self.path)
    except FileExistsError:  # another job took it over just now
      return self.acquire()
    finally:
      os.unlink(draft)
    self._stop.clear()
    self._thread = threading.Thread(target=self._beat, daemon=True)
    self._thread.start()
    return warning

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat):
      try:
        os.utime(self.path)
      except FileNotFoundError:
        return

  def release(self) -> None:
    """Stops the heartbeat and deletes the lock file if it is still ours."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    info = self.holder()
    if info is not None and info.get("pid") == os.getpid() and (
        info.get("host") == socket.gethostname()):
      os.unlink(self.path)


def check_checkpoint_settings(directory: str, settings: dict[str, Any]) -> None:
  """Exits if `directory`'s checkpoints were written with other `settings`.

  `settings` holds what the saved state depends on (the model, the
  optimizer, the data split), as JSON values. The first run writes them to
  ``<directory>/settings.json``; a later one with a difference stops with the
  names and both values, instead of failing inside orbax with a tree dump or,
  worse, restoring state of the same shapes into another run.
  """
  from etils import epath

  path = epath.Path(directory) / "settings.json"
  if path.exists():
    saved = json.loads(path.read_text())
    differ = [k for k in sorted(set(saved) | set(settings))
              if saved.get(k) != settings.get(k)]
    if differ:
      raise SystemExit(
          f"error: the checkpoints in {directory} were written with "
          + ", ".join(f"{k} {saved.get(k)!r}" for k in differ) + "; this run has "
          + ", ".join(f"{k} {settings.get(k)!r}" for k in differ) + ". Resume with"
          " the same settings, or give this run another checkpoint directory.")
  elif jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1, sort_keys=True))


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0][:300] if text else ''}"


def restore_newest(manager, target, log=print):
  """(step, restored) for the newest step of an orbax `manager` that restores.

  A step that fails to restore on any process (a file truncated by a full
  disk or a killed copy) is skipped on all of them; each skipped step and
  its error are logged, and the step's directory is renamed
  ``<step>.unrestorable`` so that saving that step again works and the broken
  files stay for inspection. (None, None) when there is no checkpoint; an
  exit when there are some and none restores (a checkpoint of another model:
  never start over silently).
  """
  import orbax.checkpoint as ocp

  steps = sorted(manager.all_steps(), reverse=True)
  skipped = []
  for step in steps:
    try:
      restored, error = manager.restore(step, args=ocp.args.StandardRestore(target)), None
    except Exception as e:  # orbax / tensorstore raise plain Exceptions
      restored, error = None, e
    if not any_process(error is not None):
      break
    skipped.append((step, _first_line(error) if error else "failed on another process"))
  else:
    if not steps:
      return None, None
    raise SystemExit(
        f"error: no checkpoint in {manager.directory} restores into this model"
        " (steps " + ", ".join(f"{s}: {e}" for s, e in skipped) + "). Was it"
        " written with other settings? Use another --checkpoint-dir to start"
        " afresh.")
  for bad, why in skipped:
    aside = f"{bad}.unrestorable.{int(time.time())}"
    log(f"warning: checkpoint step {bad} in {manager.directory} does not restore"
        f" ({why}); skipped, kept as {aside}; resuming from step {step}")
    if jax.process_index() == 0:
      (manager.directory / str(bad)).rename(manager.directory / aside)
  if skipped:
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("restore_newest: renamed")
    manager.reload()
  return step, restored


# ----------------------------------------------------------- preemption


class Preemption:
  """SIGTERM sets a flag; `reached()` is True on every process at once.

  A Spot or preemptible cloud VM (TPU VMs included) about to be reclaimed,
  SLURM at the time limit (earlier with ``--signal=TERM@120``) and Kubernetes
  send SIGTERM, then after a grace period SIGKILL. Use it as a context manager around the loop (it restores
  the previous handlers on exit) and call `reached()` once per step on every
  process: it all-gathers the flags (a tiny collective), so every process
  stops at the same step, however many got the signal, and saves it.
  """

  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
    self.signals = signals
    self.received: int | None = None
    self._previous: dict[int, Any] = {}

  def _handle(self, signum, frame) -> None:
    del frame
    self.received = signum

  def __enter__(self) -> Preemption:
    for s in self.signals:
      self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous.clear()

  def reached(self) -> bool:
    """Whether any process got a signal (a collective: all processes call it)."""
    return any_process(self.received is not None)
