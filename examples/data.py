"""Data sets for the examples: embedded scikit-learn sets and TFDS image sets.

`load(name)` returns a `Dataset` held in memory as NumPy arrays:

- `digits` (default) and `diabetes` come with scikit-learn: no download.
- `mnist`, `fashion_mnist` and `cifar10` are read with `tfds.data_source`
  (random access to ArrayRecord files) WITHOUT TensorFlow. They must already
  be prepared, in the ArrayRecord format, under the TFDS data directory
  (`--data-dir`, else `$TFDS_DATA_DIR`, else `~/tensorflow_datasets`): this
  code never downloads. Preparing needs TensorFlow, once, on a machine with
  internet:

      pip install tensorflow tensorflow-datasets
      tfds build mnist --file_format=array_record --data_dir=DIR

  then copy `DIR/mnist` into the data directory of the training machine.

Batching is plain NumPy (`batch_indices`, `augment`): these sets fit in memory,
and the batch of step `i` is a function of `(seed, i)` alone, so a run resumed
from a checkpoint at step `i` sees exactly the batches the uninterrupted run
would have seen.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

EMBEDDED = ("digits", "diabetes")
TFDS = ("mnist", "fashion_mnist", "cifar10")
NAMES = EMBEDDED + TFDS

# Per-channel mean and standard deviation of the training images, in the units
# of the stored uint8 pixels (CIFAR-10's are the usual published values).
_TFDS_STATS = {
    "mnist": ((0.0,), (255.0,)),
    "fashion_mnist": ((0.0,), (255.0,)),
    "cifar10": ((125.3, 123.0, 113.9), (63.0, 62.1, 66.7)),
}


class DataNotFoundError(FileNotFoundError):
  """A TFDS data set is not prepared (as ArrayRecord) in the data directory."""


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A data set in memory.

  Images are NHWC, stored as loaded (uint8 pixels for TFDS sets, float32 for
  the embedded ones); `normalize` turns a batch into float32 model inputs.
  `num_classes` is 0 for a regression set (`diabetes`: float32 targets).
  """

  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  mean: np.ndarray
  std: np.ndarray

  @property
  def is_classification(self) -> bool:
    return self.num_classes > 0

  def normalize(self, x: np.ndarray) -> np.ndarray:
    return ((x.astype(np.float32) - self.mean) / self.std).astype(np.float32)


def load(name: str = "digits", *, data_dir: str | None = None, seed: int = 0,
         max_train: int | None = None, max_test: int | None = None) -> Dataset:
  """Loads data set `name` (one of `NAMES`) into memory.

  Args:
    name: `digits`, `diabetes`, `mnist`, `fashion_mnist` or `cifar10`.
    data_dir: TFDS data directory (default: TFDS's, `$TFDS_DATA_DIR` or
      `~/tensorflow_datasets`); unused by the embedded sets.
    seed: the train/test split of the embedded sets (TFDS sets have theirs).
    max_train, max_test: read at most this many examples (the first ones).

  Raises:
    DataNotFoundError: a TFDS set is not prepared in `data_dir`; its message
      says how to prepare it.
  """
  if name == "digits":
    ds = _digits(seed)
  elif name == "diabetes":
    ds = _diabetes(seed)
  elif name in TFDS:
    return _tfds(name, data_dir, max_train, max_test)
  else:
    raise ValueError(f"unknown data set {name!r}; expected one of {NAMES}")
  return dataclasses.replace(
      ds, x_train=ds.x_train[:max_train], y_train=ds.y_train[:max_train],
      x_test=ds.x_test[:max_test], y_test=ds.y_test[:max_test])


def _split(n: int, seed: int, test_fraction: float):
  # Same split as examples/compare.py's load_digits_split.
  perm = np.random.default_rng(seed).permutation(n)
  n_test = int(n * test_fraction)
  return perm[n_test:], perm[:n_test]


def _digits(seed: int) -> Dataset:
  from sklearn.datasets import load_digits
  digits = load_digits()
  x = (digits.images.astype(np.float32) / 16.0)[..., None]
  y = digits.target.astype(np.int32)
  train, test = _split(len(x), seed, 0.25)
  return Dataset("digits", x[train], y[train], x[test], y[test], 10,
                 np.zeros(1, np.float32), np.ones(1, np.float32))


def _diabetes(seed: int) -> Dataset:
  from sklearn.datasets import load_diabetes
  x, y = load_diabetes(return_X_y=True)
  x, y = x.astype(np.float32), y.astype(np.float32)
  train, test = _split(len(x), seed, 0.25)
  # Targets standardised with training statistics, so a loss near 1 means
  # "no better than the mean".
  mu, sigma = y[train].mean(), y[train].std()
  y = (y - mu) / sigma
  return Dataset("diabetes", x[train], y[train], x[test], y[test], 0,
                 x[train].mean(0), x[train].std(0))


def default_data_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser(
      "~/tensorflow_datasets")


def missing_message(name: str, data_dir: str | None) -> str:
  """The one-paragraph explanation shown when `name` is not available."""
  where = data_dir or default_data_dir()
  return (
      f"The data set {name!r} is not available in the TFDS data directory"
      f" {where!r} (prepared in the ArrayRecord format). This program never"
      " downloads: prepare the data set once on a machine with internet and"
      " TensorFlow, with `pip install tensorflow tensorflow-datasets` then"
      f" `tfds build {name} --file_format=array_record --data_dir=DIR`, copy"
      f" the folder DIR/{name} to {where}/{name} here (or point --data-dir, or"
      " $TFDS_DATA_DIR, at DIR), and run again. The embedded data sets"
      f" {EMBEDDED} need no download."
  )


def _data_sources(name: str, data_dir: str | None):
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise DataNotFoundError(
        f"Loading {name!r} needs tensorflow-datasets and array-record:"
        " `pip install -e \".[datasets]\"`. " + missing_message(name, data_dir)
    ) from e
  try:
    return tfds.data_source(name, split=["train", "test"], data_dir=data_dir,
                            download=False)
  # A missing data set shows up as any of these, depending on what is there:
  # nothing (NotImplementedError: "TFRECORD is not supported"), a data set
  # prepared as TFRecord (same), a partial folder (FileNotFoundError,
  # AssertionError), and with data_dir=None, TFDS's own metadata of a set that
  # was never generated (KeyError: "`splits` is empty").
  except (NotImplementedError, FileNotFoundError, AssertionError, KeyError,
          tfds.core.registered.DatasetNotFoundError) as e:
    raise DataNotFoundError(missing_message(name, data_dir)) from e


def _read(source, limit: int | None):
  from tqdm.auto import tqdm
  n = len(source) if limit is None else min(limit, len(source))
  images = np.empty((n,) + source[0]["image"].shape, np.uint8)
  labels = np.empty((n,), np.int32)
  for i in tqdm(range(n), desc="reading", unit="ex", disable=None, leave=False):
    example = source[i]
    images[i], labels[i] = example["image"], example["label"]
  return images, labels


def _tfds(name: str, data_dir: str | None, max_train: int | None,
          max_test: int | None) -> Dataset:
  train, test = _data_sources(name, data_dir)
  x_train, y_train = _read(train, max_train)
  x_test, y_test = _read(test, max_test)
  mean, std = _TFDS_STATS[name]
  return Dataset(name, x_train, y_train, x_test, y_test, 10,
                 np.asarray(mean, np.float32), np.asarray(std, np.float32))


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """Indices of the batch of `step` (0-based): epochs of shuffled data.

  A function of its arguments only, so resuming at any step is exact. The
  last `n % batch_size` examples of each epoch's permutation are skipped.
  """
  if not 0 < batch_size <= n:
    raise ValueError(f"batch_size must be in [1, {n}], got {batch_size}")
  per_epoch = n // batch_size
  epoch, k = divmod(step, per_epoch)
  perm = np.random.default_rng([seed, epoch]).permutation(n)
  return perm[k * batch_size:(k + 1) * batch_size]


def augment(x: np.ndarray, seed: int, step: int, pad: int = 4) -> np.ndarray:
  """Random crops (after `pad` pixels of zero padding) and horizontal flips.

  The standard CIFAR-10 augmentation of the ResNet paper; deterministic in
  `(seed, step)`.
  """
  rng = np.random.default_rng([seed, step, 1])
  n, h, w, _ = x.shape
  padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  dy, dx = rng.integers(0, 2 * pad + 1, (2, n))
  rows = dy[:, None] + np.arange(h)
  cols = dx[:, None] + np.arange(w)
  out = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
  flip = rng.random(n) < 0.5
  out[flip] = out[flip, :, ::-1]
  return out


def batch(ds: Dataset, batch_size: int, seed: int, step: int,
          augment_images: bool = False):
  """The normalised training batch `(x, y)` of `step`."""
  idx = batch_indices(len(ds.x_train), batch_size, seed, step)
  x = ds.x_train[idx]
  if augment_images:
    x = augment(x, seed, step)
  return ds.normalize(x), ds.y_train[idx]
