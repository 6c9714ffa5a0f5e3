"""examples/data.py: embedded sets, TFDS sets without TensorFlow, batching."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples"))

import data  # noqa: E402

tfds = pytest.importorskip("tensorflow_datasets")


def test_digits_matches_compare_split():
  import compare
  ds = data.load("digits")
  (x_train, y_train), (x_test, y_test) = compare.load_digits_split()
  np.testing.assert_array_equal(ds.x_train, x_train)
  np.testing.assert_array_equal(ds.y_test, y_test)
  assert ds.x_train.shape[1:] == (8, 8, 1) and ds.num_classes == 10
  assert len(ds.x_train) + len(ds.x_test) == 1797


def test_diabetes_is_regression():
  ds = data.load("diabetes", max_train=50)
  assert not ds.is_classification and ds.x_train.shape == (50, 10)
  x = ds.normalize(data.load("diabetes").x_train)
  np.testing.assert_allclose(x.mean(0), 0, atol=1e-5)
  assert ds.y_train.dtype == np.float32


@pytest.mark.parametrize("name,shape", [
    ("mnist", (28, 28, 1)), ("fashion_mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_sets_with_mock_data(name, shape):
  with tfds.testing.mock_data(num_examples=12):
    ds = data.load(name, max_test=5)
  assert ds.x_train.shape == (12,) + shape and ds.x_train.dtype == np.uint8
  assert ds.x_test.shape == (5,) + shape
  assert ds.y_train.dtype == np.int32 and ds.num_classes == 10
  assert ((0 <= ds.y_train) & (ds.y_train < 10)).all()
  x, y = data.batch(ds, 4, seed=0, step=0)
  assert x.dtype == np.float32 and x.shape == (4,) + shape and y.shape == (4,)


def test_reads_a_prepared_array_record_set_without_mocks(tmp_path):
  """The real path: ArrayRecord files on disk, read back bit for bit."""
  import PIL.Image
  from tensorflow_datasets.image_classification import mnist as mnist_lib

  rng = np.random.default_rng(0)
  images = {s: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
            for s, n in (("train", 7), ("test", 3))}

  class FakeMnist(mnist_lib.MNIST, skip_registration=True):
    name = "mnist"  # writes where tfds.data_source("mnist") reads

    def _split_generators(self, dl_manager):
      return {s: self._generate_examples(s) for s in images}

    def _generate_examples(self, split):
      for i, img in enumerate(images[split]):
        # A PIL image is encoded with PIL: no TensorFlow needed to write.
        yield i, {"image": PIL.Image.fromarray(img), "label": i % 10}

  FakeMnist(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  ds = data.load("mnist", data_dir=str(tmp_path))
  order = np.argsort(ds.y_train)  # TFDS shuffles examples when writing
  np.testing.assert_array_equal(ds.x_train[order, ..., 0], images["train"])
  np.testing.assert_array_equal(np.sort(ds.y_test), np.arange(3))


def test_missing_data_set_gives_a_clear_message(tmp_path):
  with pytest.raises(data.DataNotFoundError) as info:
    data.load("cifar10", data_dir=str(tmp_path))
  msg = str(info.value)
  assert str(tmp_path) in msg and "tfds build cifar10" in msg
  assert "--file_format=array_record" in msg and "\n" not in msg


def test_unknown_name():
  with pytest.raises(ValueError, match="imagenet"):
    data.load("imagenet")


def test_batches_are_epochs_and_depend_only_on_seed_and_step():
  n, bs = 10, 3
  seen = np.concatenate([data.batch_indices(n, bs, 0, s) for s in range(3)])
  assert len(set(seen)) == 9  # one epoch: no repeats
  np.testing.assert_array_equal(data.batch_indices(n, bs, 0, 4),
                                data.batch_indices(n, bs, 0, 4))
  assert not np.array_equal(data.batch_indices(n, bs, 0, 3),
                            data.batch_indices(n, bs, 1, 3))


def test_augment_crops_and_flips():
  x = np.arange(2 * 5 * 5 * 1, dtype=np.uint8).reshape(2, 5, 5, 1) + 1
  out = data.augment(x, seed=0, step=0, pad=0)  # no padding: only flips
  for a, b in zip(out, x):
    assert np.array_equal(a, b) or np.array_equal(a, b[:, ::-1])
  out = data.augment(x, seed=3, step=1, pad=2)
  assert out.shape == x.shape
  np.testing.assert_array_equal(out, data.augment(x, seed=3, step=1, pad=2))


def test_missing_data_set_in_the_default_directory(tmp_path, monkeypatch):
  """data_dir=None: TFDS falls back to its own metadata, whose splits are empty."""
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  with pytest.raises(data.DataNotFoundError) as info:
    data.load("mnist")
  assert "tfds build mnist" in str(info.value)


@pytest.mark.slow  # a fresh process importing jax and tfds: 20-40 s
def test_training_script_without_data_dir_prints_one_paragraph(tmp_path):
  """`train_linen.py --dataset mnist` with nothing prepared: the message, no traceback."""
  import subprocess
  env = dict(os.environ, TFDS_DATA_DIR=str(tmp_path), HOME=str(tmp_path))
  script = os.path.join(os.path.dirname(data.__file__), "train_linen.py")
  proc = subprocess.run([sys.executable, script, "--dataset", "mnist", "--steps", "1"],
                        capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr and "KeyError" not in proc.stderr
  assert "tfds build mnist" in proc.stderr
