"""tests/isolated.py: a hang fails with the output so far and ends the
processes the script started; a failure shows the traceback."""

import os
import time

import pytest

from tests.isolated import run_isolated

# Starts a grandchild that would sleep for 5 minutes, prints its pid, hangs.
HANGS_WITH_A_CHILD = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
print("grandchild", child.pid, flush=True)
time.sleep(300)
"""


def alive(pid: int) -> bool:
  """Running (a zombie waiting for its reaper counts as ended)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


@pytest.mark.slow
def test_a_hang_fails_and_ends_the_process_group():
  with pytest.raises(AssertionError, match="hung") as e:
    run_isolated(HANGS_WITH_A_CHILD, timeout=5)
  pid = int(str(e.value).split("grandchild")[1].split()[0])
  deadline = time.monotonic() + 10
  while alive(pid) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not alive(pid), f"the script's child {pid} outlived the timeout"


@pytest.mark.slow
def test_a_failure_shows_the_traceback():
  with pytest.raises(AssertionError, match="ZeroDivisionError"):
    run_isolated("1 / 0", timeout=60)


@pytest.mark.slow
def test_the_child_imports_this_checkout():
  out = run_isolated("import optax_ortho; print(optax_ortho.__file__)", timeout=60)
  assert out.startswith(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
