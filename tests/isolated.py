"""`run_isolated`: a Python script in a fresh interpreter, with a timeout that
ends it and everything it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_isolated(
    script: str,
    *,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
) -> str:
  """Runs a Python `script` in a fresh interpreter; a hang fails, not blocks.

  For anything that could hang (a LAPACK call on non-finite input) or needs a
  fresh process (``JAX_ENABLE_X64``, a device count). The child imports this
  checkout's `optax_ortho`, runs with ``OPENBLAS_NUM_THREADS=1`` (OpenBLAS
  threads spin against XLA's) in a session of its own, and after `timeout`
  seconds its whole process group is killed: processes the script started
  (workers, a `jax.distributed` peer) end with it. Batch many cases into one
  script: each interpreter pays jax's start-up.

  Args:
    script: Python source; it fails by raising (non-zero exit).
    timeout: seconds before the child counts as hung and is killed.
    env: extra environment variables for the child.

  Returns:
    The child's standard output.

  Raises:
    AssertionError: the child hung (no exit within `timeout`) or failed;
      the message holds the tail of its output.

  Example:
    >>> from tests.isolated import run_isolated
    >>> run_isolated("print(1 + 1)", timeout=60)
    '2\\n'
  """
  child_env = dict(os.environ)
  child_env["PYTHONPATH"] = os.pathsep.join(
      p for p in (ROOT, child_env.get("PYTHONPATH")) if p)
  child_env.setdefault("OPENBLAS_NUM_THREADS", "1")
  child_env.update(env or {})
  with subprocess.Popen(
      [sys.executable, "-c", script], stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True, env=child_env,
      start_new_session=True) as child:
    try:
      out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      # The group id is the child's pid (a new session); its descendants
      # inherit the group unless they start sessions of their own.
      os.killpg(child.pid, signal.SIGKILL)
      out, _ = child.communicate()
      raise AssertionError(
          f"the script hung: no exit within {timeout} s (killed with its"
          f" process group). Last output:\n{out[-2000:]}") from None
  if child.returncode != 0:
    raise AssertionError(
        f"the script failed (exit code {child.returncode}):\n"
        f"{out[-1000:]}\n{err[-3000:]}")
  return out
