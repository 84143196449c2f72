"""The real TFDS loader code path, under tfds.testing.mock_data (never downloads)."""

import sys

import numpy as np
import pytest

import jaxfl

tfds = pytest.importorskip("tensorflow_datasets")


@pytest.mark.parametrize("name,shape,classes", [("cifar10", (32, 32, 3), 10),
                                                ("mnist", (28, 28, 1), 10)])
def test_tfds_loader_under_mock(tmp_path, name, shape, classes):
  with tfds.testing.mock_data(num_examples=12):
    ds = jaxfl.data.load_tfds(name, data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"))
  assert ds.x_train.shape == (12,) + shape and ds.num_classes == classes
  assert ds.x_train.dtype == np.float32 and 0 <= ds.x_train.min() and ds.x_train.max() <= 1
  assert ((0 <= ds.y_train) & (ds.y_train < classes)).all()
  cached = jaxfl.data.load_tfds(name, data_dir="/nonexistent", cache_dir=str(tmp_path / "cache"))
  np.testing.assert_array_equal(cached.x_train, ds.x_train)  # served from the npz cache


def test_tfds_through_load_and_partition(tmp_path):
  with tfds.testing.mock_data(num_examples=40):
    fd = jaxfl.data.load("tfds:cifar10", 4, jaxfl.data.iid(), data_dir=str(tmp_path))
  assert fd.num_clients == 4 and fd.example_shape == (32, 32, 3)


def test_missing_tfds_data_gives_one_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    jaxfl.data.load_tfds("cifar10", data_dir=str(tmp_path))
  msg = str(e.value)
  assert "cifar10" in msg and str(tmp_path) in msg and "download_and_prepare" in msg


def test_unknown_tfds_dataset():
  with pytest.raises(ValueError, match="Unknown TFDS"):
    jaxfl.data.load_tfds("imagenet_v9")


def test_import_jaxfl_does_not_import_tensorflow():
  import subprocess
  code = "import sys, jaxfl; print(any(m.startswith(('tensorflow', 'tensorflow_datasets')) " \
         "for m in sys.modules))"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"
