"""Golden numbers from the MHE authors' released code (wy1iu/MHE).

Runs their functions in place; nothing of theirs is copied here. Usage, in a
scratch venv with tensorflow-cpu (see tests/data/README.md):

  python tests/data/generate/mhe_golden.py /path/to/wy1iu/MHE tests/data

`code/architecture.py` is TF 1 code; it is imported with `tensorflow` bound to
`tf.compat.v1` and v2 behaviour disabled.
"""

import importlib.util
import os
import sys

import numpy as np
import tensorflow as real_tf

tf = real_tf.compat.v1
tf.disable_v2_behavior()


def load(repo):
  path = os.path.join(repo, "code", "architecture.py")
  spec = importlib.util.spec_from_file_location("mhe_architecture", path)
  mod = importlib.util.module_from_spec(spec)
  saved = sys.modules["tensorflow"]
  sys.modules["tensorflow"] = tf
  try:
    spec.loader.exec_module(mod)
  finally:
    sys.modules["tensorflow"] = saved
  return mod


def energy(arch, w, power, model="mhe", final=False):
  """Their per-layer thomson loss for kernel w and its gradient w.r.t. w."""
  with tf.Graph().as_default():
    w_t = tf.constant(w, tf.float32)
    vgg = arch.VGG()
    if final:
      vgg._add_thomson_constraint_final(w_t, w.shape[-1], power)
      loss = tf.get_collection("thomson_final")[0]
    else:
      vgg._add_thomson_constraint(w_t, w.shape[-1], model, power)
      loss = tf.get_collection("thomson_loss")[0]
    dw = tf.gradients(loss, w_t)[0]
    with tf.Session() as sess:
      return sess.run([loss, dw])


def main(repo, out_dir):
  arch = load(repo)
  rng = np.random.default_rng(2018)
  w = rng.standard_normal((8, 5)).astype(np.float32)
  res = {"W": w}
  for p in ["0", "1", "2", "a0", "a1", "a2"]:
    res[f"mhe_s{p}"], res[f"mhe_s{p}_dW"] = energy(arch, w, p)
    res[f"final_s{p}"], res[f"final_s{p}_dW"] = energy(arch, w, p, final=True)
  for p in ["0", "1", "2"]:
    res[f"half_mhe_s{p}"], res[f"half_mhe_s{p}_dW"] = energy(
        arch, w, p, model="half_mhe")
  np.savez(os.path.join(out_dir, "mhe_energy.npz"), **res)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
