"""One OpenBLAS thread wherever this project starts a process (docs/decisions.md, "Platform hazards").

jaxlib's CPU LAPACK kernels run on scipy's OpenBLAS; its spinning thread pool
fights XLA's threads, so the tests, examples and benchmarks ask for one thread
before numpy and jax load OpenBLAS. These tests check that the setting takes
effect: every OpenBLAS pool of the process reports one thread.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

threadpoolctl = pytest.importorskip("threadpoolctl")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _openblas_threads():
  return [p["num_threads"] for p in threadpoolctl.threadpool_info()
          if p["internal_api"] == "openblas"]


def test_the_test_process_runs_one_openblas_thread():
  # A LAPACK call loads scipy's OpenBLAS if nothing has yet.
  jax.block_until_ready(jax.jit(jnp.linalg.svd)(jnp.eye(4)))
  threads = _openblas_threads()
  assert threads and set(threads) == {1}, threads


PROBE = """
import sys
sys.path.insert(0, {examples!r})
import compare  # its first lines set the thread count
import jax, jax.numpy as jnp, threadpoolctl
jax.block_until_ready(jax.jit(jnp.linalg.svd)(jnp.eye(4)))
print(sorted({{p["num_threads"] for p in threadpoolctl.threadpool_info()
              if p["internal_api"] == "openblas"}}))
"""


@pytest.mark.slow  # a fresh process importing jax: 10-30 s
def test_an_example_sets_one_thread_in_a_fresh_process():
  env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
  code = PROBE.format(examples=os.path.join(ROOT, "examples"))
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                       text=True, timeout=300, check=True).stdout
  assert out.strip().splitlines()[-1] == "[1]", out


@pytest.mark.slow
def test_without_the_setting_openblas_uses_more_threads():
  """The check above can fail: a bare process here has a multi-thread pool."""
  if (os.cpu_count() or 1) < 2:
    pytest.skip("OpenBLAS starts one thread on a one-core machine anyway")
  env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
  code = ("import jax, jax.numpy as jnp, threadpoolctl\n"
          "jax.block_until_ready(jax.jit(jnp.linalg.svd)(jnp.eye(4)))\n"
          "print(max(p['num_threads'] for p in threadpoolctl.threadpool_info()"
          " if p['internal_api'] == 'openblas'))")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                       text=True, timeout=300, check=True).stdout
  assert int(out.strip().splitlines()[-1]) > 1, out
