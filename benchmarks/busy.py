"""`--load N` of the benchmarks: N busy Python processes for the timed part.

Speed ratios are reported idle and under a load of 4-8: a busy process per
extra unit of load, started here and always ended.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def busy_processes(n: int) -> Iterator[None]:
  """Runs `n` processes spinning in `while True: pass` for the block."""
  procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
           for _ in range(n)]
  try:
    yield
  finally:
    for p in procs:
      p.kill()
      p.wait()
