"""Real TFDS datasets without TensorFlow (array_record via ``tfds.data_source``).

The only module of jaxfl that imports ``tensorflow_datasets``, and only inside functions,
so ``import jaxfl`` works where TF/TFDS are absent (e.g. the GPU image).

Preparing a dataset needs TensorFlow once, on a machine with internet::

    pip install 'jaxfl[tfds]' tensorflow-cpu
    python -c "import tensorflow_datasets as tfds; \
      tfds.builder('cifar10', data_dir='~/tfds', file_format='array_record').download_and_prepare()"

Reading it afterwards needs neither TensorFlow nor network.
"""

from __future__ import annotations

import os

import numpy as np

from jaxfl.data._sources import ArrayDataset

# dataset -> (image key, label key, number of classes)
IMAGE_DATASETS = {
    "mnist": ("image", "label", 10),
    "fashion_mnist": ("image", "label", 10),
    "cifar10": ("image", "label", 10),
    "cifar100": ("image", "label", 100),
    "emnist/byclass": ("image", "label", 62),
    "emnist/balanced": ("image", "label", 47),
}


def prepare_command(name: str, data_dir: str) -> str:
  return (f"python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', "
          f"data_dir='{data_dir}', file_format='array_record').download_and_prepare()\" "
          "(needs `pip install tensorflow-cpu tensorflow-datasets` and internet, once)")


def _import_tfds():
  try:
    import importlib_resources  # noqa: F401  (tfds 4.9.10 imports it undeclared)
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError("TFDS loaders need `pip install 'jaxfl[tfds]'` "
                      "(tensorflow-datasets, pillow, importlib_resources).") from e
  return tfds


def tfds_source(name: str, split: str, data_dir: str | None):
  """Opens an array_record TFDS split as a random-access source, with a clear error."""
  tfds = _import_tfds()
  if data_dir is None:
    data_dir = os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))
  data_dir = os.path.expanduser(data_dir)
  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  try:
    return builder.as_data_source(split=split)
  except Exception as e:  # TFDS raises KeyError/NotImplementedError/AssertionError when absent
    raise FileNotFoundError(
        f"TFDS dataset {name!r} (split {split!r}) is not prepared as array_record in "
        f"data_dir={data_dir!r}. Prepare it once with: {prepare_command(name, data_dir)}"
    ) from e


def _to_arrays(src, image_key: str, label_key: str, limit: int | None):
  n = len(src) if limit is None else min(limit, len(src))
  if n == 0:
    raise FileNotFoundError("The TFDS split is empty (not prepared?).")
  first = src[0]
  x = np.zeros((n,) + np.asarray(first[image_key]).shape, np.float32)
  y = np.zeros((n,), np.int32)
  for i in range(n):  # src[i] works for real and mocked sources alike
    row = first if i == 0 else src[i]
    x[i] = np.asarray(row[image_key], np.float32)
    y[i] = int(row[label_key])
  return x / 255.0, y


def load_tfds(name: str, data_dir: str | None = None, train_split: str = "train",
              test_split: str = "test", limit: int | None = None,
              cache_dir: str | None = None) -> ArrayDataset:
  """Loads an image-classification TFDS dataset as arrays (no TensorFlow needed).

  Args:
    name: one of ``IMAGE_DATASETS`` (mnist, fashion_mnist, cifar10, cifar100, emnist/...).
    data_dir: where ``download_and_prepare`` wrote it (default ``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``).
    limit: read at most this many examples per split (quick runs).
    cache_dir: if given, decoded arrays are cached there as ``.npz`` for fast reloads
      (and for machines without TFDS).
  Raises:
    ValueError: unknown ``name``.
    FileNotFoundError: the dataset is not prepared in ``data_dir``; the message gives the
      command that prepares it.
  """
  if name not in IMAGE_DATASETS:
    raise ValueError(f"Unknown TFDS image dataset {name!r}; expected one of "
                     f"{sorted(IMAGE_DATASETS)}.")
  cache = None
  if cache_dir:
    cache = os.path.join(cache_dir, f"{name.replace('/', '_')}_{limit or 'all'}.npz")
    if os.path.exists(cache):
      z = np.load(cache)
      return ArrayDataset(name, z["x_train"], z["y_train"], z["x_test"], z["y_test"],
                          IMAGE_DATASETS[name][2])
  image_key, label_key, num_classes = IMAGE_DATASETS[name]
  xtr, ytr = _to_arrays(tfds_source(name, train_split, data_dir), image_key, label_key, limit)
  xte, yte = _to_arrays(tfds_source(name, test_split, data_dir), image_key, label_key, limit)
  if cache:
    os.makedirs(cache_dir, exist_ok=True)
    np.savez(cache, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
  return ArrayDataset(name, xtr, ytr, xte, yte, num_classes)
