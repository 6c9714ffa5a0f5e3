"""Test set-up: 8 virtual CPU devices and a bounded hypothesis profile."""

import os

# One OpenBLAS thread, before numpy and jax load it (subprocesses that tests
# start inherit it): jaxlib's CPU LAPACK kernels call scipy's OpenBLAS, whose
# spinning thread pool fights XLA's threads (docs/getting_started.md).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax

# Must run before JAX initialises its backends: multi-device tests need a mesh.
jax.config.update("jax_num_cpu_devices", 8)

from hypothesis import HealthCheck  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile(
    "ci",
    max_examples=15,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=50, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
