"""examples/train_linen.py, train_nnx.py and models.py at tiny size."""

import os
import sys

import jax
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples"))

import models  # noqa: E402
import train_linen  # noqa: E402
import train_nnx  # noqa: E402

TINY = ["--batch-size", "16", "--eval-every", "100", "--max-test", "64"]


def assert_trees_close(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  assert len(leaves_a) > 0
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6)


def linen_tree(result):
  return train_linen.checkpoint_tree(result["state"])


def nnx_tree(result):
  return {"model": nnx.to_pure_dict(nnx.state(result["model"])),
          "optimizer": nnx.to_pure_dict(nnx.state(result["optimizer"]))}


@pytest.mark.slow  # train, checkpoint, restore: 20-35 s per API on a loaded machine
@pytest.mark.parametrize("script,tree", [(train_linen, linen_tree),
                                         (train_nnx, nnx_tree)])
def test_resume_gives_the_identical_next_step(script, tree, tmp_path):
  """N steps, checkpoint, restore, 1 more == N + 1 steps without stopping.

  With BatchNorm statistics, SGD momentum, orthonormalize and the gradient
  norm penalty's counter all in the state.
  """
  flags = TINY + ["--model", "cnn_bn", "--optimizer", "gnp_orthogonal_sgd"]
  straight = script.main(flags + ["--steps", "4"])
  ckpt = ["--checkpoint-dir", str(tmp_path / "ckpt")]
  first = script.main(flags + ckpt + ["--steps", "3"])
  resumed = script.main(flags + ckpt + ["--steps", "4"])
  assert os.listdir(tmp_path / "ckpt") and sorted(os.listdir(tmp_path / "ckpt")) == ["3", "4"]
  assert_trees_close(tree(resumed), tree(straight))
  # The resumed run really started from the checkpoint: it took one step.
  assert resumed["history"]["step"] == [4]
  with pytest.raises(AssertionError):
    assert_trees_close(tree(first), tree(straight))


@pytest.mark.slow
def test_linen_gnp_perturbed_pass_leaves_batch_stats_alone():
  """Statistics after a GNP step == after a plain step: the unperturbed pass's."""
  flags = TINY + ["--model", "cnn_bn", "--steps", "1"]
  gnp = train_linen.main(flags + ["--optimizer", "gnp"])["state"]
  plain = train_linen.main(flags + ["--optimizer", "sgd"])["state"]
  assert_trees_close(gnp.batch_stats, plain.batch_stats)
  initial = train_linen.main(flags + ["--optimizer", "sgd", "--steps", "0"])["state"]
  with pytest.raises(AssertionError):  # and they did move
    assert_trees_close(gnp.batch_stats, initial.batch_stats)


@pytest.mark.slow
def test_nnx_gnp_perturbed_pass_leaves_batch_stats_alone():
  flags = TINY + ["--model", "cnn_bn", "--steps", "1"]
  stats = [nnx.to_pure_dict(nnx.state(
      train_nnx.main(flags + ["--optimizer", opt])["model"], nnx.BatchStat))
      for opt in ("gnp", "sgd")]
  assert_trees_close(*stats)


@pytest.mark.slow
@pytest.mark.parametrize("script", [train_linen, train_nnx])
def test_digits_learns(script):
  result = script.main(["--steps", "40", "--batch-size", "32",
                        "--eval-every", "20"])
  acc = result["test_accuracy"]
  assert acc > 0.8, acc  # chance is 0.1
  assert result["history"]["step"] == [20, 40]


@pytest.mark.slow
@pytest.mark.parametrize("script", [train_linen, train_nnx])
def test_diabetes_regression(script):
  result = script.main(["--dataset", "diabetes", "--optimizer", "orthogonal_adam",
                        "--steps", "30", "--eval-every", "30"])
  assert 0.0 < result["test_mse"] < 1.0  # better than predicting the mean


@pytest.mark.slow  # ResNet-20 compiles: about 50 s per API on a loaded machine
@pytest.mark.parametrize("script", [train_linen, train_nnx])
def test_cifar10_resnet20_with_mock_data(script):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=8):
    result = script.main(["--dataset", "cifar10", "--steps", "2",
                          "--batch-size", "4", "--eval-every", "2",
                          "--optimizer", "orthogonal_sgd"])
  assert 0.0 <= result["test_accuracy"] <= 1.0


def test_missing_data_set_exits_with_the_message(tmp_path, capsys):
  with pytest.raises(SystemExit) as info:
    train_linen.main(["--dataset", "mnist", "--data-dir", str(tmp_path)])
  msg = str(info.value.code)
  assert msg.startswith("error: ") and "tfds build mnist" in msg


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(models.LINEN))
def test_linen_and_nnx_models_match_in_size(name):
  x = np.ones((2, 32, 32, 3), np.float32)
  variables = models.LINEN[name](10).init(jax.random.key(0), x)
  nnx_model = models.NNX[name]((32, 32, 3), 10, rngs=nnx.Rngs(0))

  def size(tree):
    return sum(a.size for a in jax.tree.leaves(tree))

  assert size(variables["params"]) == size(nnx.state(nnx_model, nnx.Param))
  assert nnx_model(x).shape == (2, 10)
  if name == "resnet20":
    assert 0.26e6 < size(variables["params"]) < 0.28e6  # He et al.: 0.27M
