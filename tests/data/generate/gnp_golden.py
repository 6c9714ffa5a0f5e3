"""Golden numbers from the GNP authors' released code (zhaoyang-0204/gnp).

Runs their `training/training_core.py` `train_step` in place; nothing of
theirs is copied here. Usage (scratch venv with jax 0.10.2, flax 0.12.8,
optax 0.2.8, ml_collections, tensorflow-cpu; see tests/data/README.md):

  python tests/data/generate/gnp_golden.py /path/to/zhaoyang-0204/gnp tests/data

Calling-side adaptations only: the checkout is made importable as package
`gnp` through a symlink; `jax.tree_map` / `jax.tree_leaves` (removed from jax)
are aliased to `jax.tree.map` / `jax.tree.leaves`; `gnp.ds_pipeline.get_dataset`
(datasets, unused by `train_step`) is replaced by an empty module; their
absl `FLAGS.config` is defined with `ml_collections.config_flags` from their
own `config/base_config.py` `get_basic_config()`; `pmean(..., 'batch')` runs
under `jax.vmap(axis_name='batch')` over one replica; the optimizer update
`tx_update` hands back the gradient it receives.
"""

import os
import sys
import tempfile
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from ml_collections import config_flags

jax.config.update("jax_enable_x64", False)
jax.tree_map = jax.tree.map
jax.tree_leaves = jax.tree.leaves


def import_gnp(repo):
  root = tempfile.mkdtemp()
  os.symlink(os.path.abspath(repo), os.path.join(root, "gnp"))
  sys.path.insert(0, root)
  stub = types.ModuleType("gnp.ds_pipeline.get_dataset")
  # Only used in type annotations of functions train_step does not call.
  stub.dataset_source = types.SimpleNamespace(DatasetSource=object)
  sys.modules["gnp.ds_pipeline.get_dataset"] = stub
  from gnp.config import base_config
  from gnp.training import training_core
  return base_config, training_core


def apply_fn(variables, inputs, train, rngs, mutable):
  """A 2-layer tanh MLP (ours, the model their train_step is given)."""
  del train, rngs, mutable
  p = variables["params"]
  h = jnp.tanh(inputs @ p["w1"] + p["b1"])
  return h @ p["w2"] + p["b2"], {}


def main(repo, out_dir):
  base_config, training_core = import_gnp(repo)
  config = base_config.get_basic_config().unlock()
  config.has_true_gradient = False
  config.gradient_clipping = 1e6  # their clip must be > 0; this one never acts
  config_flags.DEFINE_config_dict("config", config)
  flags.FLAGS(["gnp_golden"])

  rng = np.random.default_rng(2022)
  params = {
      "w1": rng.standard_normal((4, 5)).astype(np.float32) * 2.0,
      "b1": rng.standard_normal((5,)).astype(np.float32) * 0.1,
      "w2": rng.standard_normal((5, 3)).astype(np.float32) * 2.0,
      "b2": rng.standard_normal((3,)).astype(np.float32) * 0.1,
  }
  x = rng.standard_normal((8, 4)).astype(np.float32)
  labels = rng.integers(0, 3, size=8)
  onehot = np.eye(3, dtype=np.float32)[labels]

  opt_state = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1).init(
      params)

  def tx_update(grad, state, params):
    del state, params
    return jax.tree.map(jnp.zeros_like, grad), grad

  def gradient(r, alpha, norm_perturbations):
    flags.FLAGS.config.gnp.alpha = alpha
    flags.FLAGS.config.gnp.norm_perturbations = norm_perturbations

    def step(batch):
      grad, _, _, _ = training_core.train_step(
          opt_state, {"params": params}, batch, jax.random.key(0),
          lambda v, s: v, 0.0, r, apply_fn, tx_update)
      return grad

    batch = {"image": x[None], "label": onehot[None]}
    out = jax.vmap(step, axis_name="batch")(batch)
    return {k: np.asarray(v[0]) for k, v in out.items()}

  res = {"x": x, "labels": labels.astype(np.int32), "onehot": onehot,
         "radius": np.float32(0.05)}
  for k, v in params.items():
    res[f"params_{k}"] = v
  for k, v in gradient(0.0, 0.8, True).items():
    res[f"g1_{k}"] = v
  for alpha, tag in [(0.8, "a08"), (1.0, "a1")]:
    for norm, ntag in [(True, "norm"), (False, "raw")]:
      for k, v in gradient(0.05, alpha, norm).items():
        res[f"{tag}_{ntag}_{k}"] = v
  np.savez(os.path.join(out_dir, "gnp_gradient.npz"), **res)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
