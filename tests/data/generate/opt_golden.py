"""Golden numbers from the OPT authors' released code (wy1iu/OPT).

Runs their functions in place; nothing of theirs is copied here. Usage, in a
scratch venv with tensorflow-cpu (see tests/data/README.md):

  python tests/data/generate/opt_golden.py /path/to/wy1iu/OPT tests/data

Their files are TensorFlow 1 code (`import tensorflow as tf`, then
`tf.matrix_band_part`, `tf.get_variable`, ...). Each one is imported from the
given checkout with `tensorflow` bound to `tf.compat.v1` and v2 behaviour
disabled, which is how TF 2 runs TF 1 graphs.
"""

import importlib.util
import os
import sys

import numpy as np
import tensorflow as real_tf

tf = real_tf.compat.v1
tf.disable_v2_behavior()
# Submodules their opt_ogd file imports, loaded from the real package first.
import tensorflow.python.framework.ops  # noqa: E402,F401
import tensorflow.python.ops.control_flow_ops  # noqa: E402,F401
import tensorflow.python.ops.math_ops  # noqa: E402,F401
import tensorflow.python.ops.state_ops  # noqa: E402,F401
import tensorflow.python.training.optimizer  # noqa: E402,F401


def load(repo, sub):
  """Imports <repo>/<sub>/architecture.py with `tensorflow` -> tf.compat.v1."""
  path = os.path.join(repo, sub, "architecture.py")
  spec = importlib.util.spec_from_file_location(f"opt_{sub}_architecture", path)
  mod = importlib.util.module_from_spec(spec)
  saved = sys.modules["tensorflow"]
  sys.modules["tensorflow"] = tf
  try:
    spec.loader.exec_module(mod)
  finally:
    sys.modules["tensorflow"] = saved
  return mod


def map_and_grad(fn, r, g):
  """Q = fn(R) and dR = d sum(Q * G) / dR in a TF1 graph, float32."""
  with tf.Graph().as_default():
    r_t = tf.constant(r, tf.float32)
    q = fn(r_t)
    dr = tf.gradients(tf.reduce_sum(q * tf.constant(g, tf.float32)), r_t)[0]
    with tf.Session() as sess:
      return sess.run([q, dr])


def or_penalty(arch, r):
  with tf.Graph().as_default():
    r_t = tf.constant(r, tf.float32)
    arch.VGG().add_orthogonal_constraint(r_t, r.shape[0])
    loss = tf.get_collection("orth_constraint")[0]
    dr = tf.gradients(loss, r_t)[0]
    with tf.Session() as sess:
      return sess.run([loss, dr])


def ogd_steps(arch, x0, grads, lr):
  """Their OGD optimizer (opt_ogd), one apply_gradients per gradient."""
  out = {"w": [], "momentum": [], "skew": []}
  with tf.Graph().as_default():
    var = tf.Variable(x0.astype(np.float32), name="rotation")
    g = tf.placeholder(tf.float32, x0.shape)
    lr_t = tf.placeholder(tf.float32, [])
    opt = arch.OGD(lr_t)
    step = opt.apply_gradients([(g, var)])
    mk, wk = opt.get_slot(var, "momentum"), opt.get_slot(var, "auxiliary")
    with tf.Session() as sess:
      sess.run(tf.global_variables_initializer())
      for gk in grads:
        sess.run(step, {g: gk, lr_t: lr})
        w, m, s = sess.run([var, mk, wk])
        out["w"].append(w)
        out["momentum"].append(m)
        out["skew"].append(s)
  return {k: np.stack(v) for k, v in out.items()}


def main(repo, out_dir):
  rng = np.random.default_rng(20211)
  n = 6
  r = rng.standard_normal((n, n)).astype(np.float32)
  g = rng.standard_normal((n, n)).astype(np.float32)
  eye = np.eye(n, dtype=np.float32)
  res = {"R": r, "G": g}

  cp = load(repo, "opt_cp").VGG()
  gs = load(repo, "opt_gs").VGG()
  hr = load(repo, "opt_hr").VGG()
  ls = load(repo, "opt_ls").VGG()
  for name, fn in [("cayley", cp.cayley), ("gram_schmidt", gs.tf_gram_schmidt),
                   ("householder", hr.householder), ("lowdin", ls.symmetric)]:
    res[f"{name}_Q"], res[f"{name}_dR"] = map_and_grad(fn, r, g)
    if name in ("cayley", "gram_schmidt"):
      res[f"{name}_Q_at_I"], res[f"{name}_dR_at_I"] = map_and_grad(fn, eye, g)
  res["or_loss"], res["or_dR"] = or_penalty(load(repo, "opt_or"), r)
  np.savez(os.path.join(out_dir, "opt_maps.npz"), **res)

  ogd = load(repo, "opt_ogd")
  res = {}
  for case, shape, lr, gscale in [("square_noclamp", (6, 6), 0.02, 1.0),
                                  ("square_clamp", (6, 6), 0.5, 1.0)]:
    # Square only: their "auxiliary" slot has the variable's shape but holds
    # the n x n skew matrix, so a tall variable fails at graph build.
    x0 = np.linalg.qr(rng.standard_normal(shape))[0].astype(np.float32)
    grads = (gscale * rng.standard_normal((2,) + shape)).astype(np.float32)
    o = ogd_steps(ogd, x0, grads, lr)
    res[f"{case}_X0"] = x0
    res[f"{case}_G"] = grads
    res[f"{case}_lr"] = np.float32(lr)
    res[f"{case}_X"] = o["w"]
    res[f"{case}_M"] = o["momentum"]
    res[f"{case}_skew"] = o["skew"]
    norms = np.linalg.norm(o["skew"], axis=(1, 2))
    res[f"{case}_step"] = np.minimum(lr, 1.0 / (norms + 1e-8)).astype(np.float32)
  np.savez(os.path.join(out_dir, "opt_ogd.npz"), **res)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
