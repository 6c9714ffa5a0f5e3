"""Regression test for the batched-LAPACK hang (docs/architecture.md, "Platform hazards").

jaxlib 0.10.2's batched CPU SVD hung forever on a ResNet-20 gradient pytree on
2-core machines. The transform runs in a subprocess with a timeout, so a hang
fails this test instead of stalling the suite.
"""

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    import optax_ortho
    from optax_ortho.testing import resnet20_shapes

    rng = np.random.default_rng(0)
    # A list with 1-D leaves interleaved, as in the reproduction.
    tree = [jnp.asarray(rng.standard_normal(s), jnp.float32)
            for s in resnet20_shapes().values()]
    for method in ("svd", "gram", "auto", "newton_schulz", "polar_express"):
      tx = optax_ortho.orthonormalize(method)
      update = jax.jit(tx.update)
      for _ in range(3):
        out, _ = update(tree, tx.init(tree))
        jax.block_until_ready(out)
      assert all(bool(jnp.isfinite(x).all()) for x in out), method
    # Wide stacks: unrolled per-matrix eigh and SVD calls that XLA runs
    # concurrently (checks.lapack_map), flags all set, none set and mixed.
    from optax_ortho.testing import transformer_shapes
    wide = {k: jnp.asarray(rng.standard_normal(s), jnp.float32)
            for k, s in transformer_shapes(d=96, layers=4, vocab=384).items()}
    wide["l0_out"] = wide["l0_out"].at[:, 1:].set(0.0)  # rank 1: takes the SVD
    for method in ("svd", "auto"):
      tx = optax_ortho.orthonormalize(method)
      update, state = jax.jit(tx.update), tx.init(wide)
      for _ in range(3):
        out, state = update(wide, state)
        jax.block_until_ready(out)
      assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(out)), method
    print("finished")
""")


@pytest.mark.slow  # a ResNet-20 update in a fresh process: 30-130 s
@pytest.mark.timeout(300)
def test_resnet20_pytree_does_not_hang():
  try:
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True,
                            text=True, timeout=180)
  except subprocess.TimeoutExpired:
    pytest.fail("orthonormalize hung on the ResNet-20 pytree (batched LAPACK?)")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "finished" in result.stdout
