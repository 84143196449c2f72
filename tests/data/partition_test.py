"""Partitioners, the federated dataset type, offline sources and the LMLS index files."""

import os

import numpy as np
import pytest

import jaxfl

LABELS = np.repeat(np.arange(10), 60)
SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data",
                      "lmls_partitions")


def _check_partition(parts, n):
  allidx = np.concatenate(parts)
  assert len(allidx) == n and len(np.unique(allidx)) == n  # disjoint and complete


@pytest.mark.parametrize("part", [jaxfl.data.iid(), jaxfl.data.dirichlet(0.3, min_size=2),
                                  jaxfl.data.shards(2), jaxfl.data.quantity_skew(0.5, 2)])
def test_partitions_are_disjoint_complete_and_seeded(part):
  a = part(LABELS, 20, np.random.default_rng(1))
  b = part(LABELS, 20, np.random.default_rng(1))
  c = part(LABELS, 20, np.random.default_rng(2))
  _check_partition(a, len(LABELS))
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))
  assert min(len(p) for p in a) >= 1


def test_dirichlet_alpha_controls_label_skew():
  def classes_per_client(alpha):
    parts = jaxfl.data.dirichlet(alpha)(LABELS, 20, np.random.default_rng(0))
    return np.mean([len(np.unique(LABELS[p])) for p in parts])
  assert classes_per_client(0.05) < classes_per_client(1.0) < classes_per_client(100.0)
  assert classes_per_client(100.0) > 9


def test_dirichlet_min_size_is_respected():
  parts = jaxfl.data.dirichlet(1.0, min_size=10)(LABELS, 30, np.random.default_rng(0))
  assert min(len(p) for p in parts) >= 10
  with pytest.raises(ValueError, match="min_size"):
    jaxfl.data.dirichlet(0.01, min_size=19, max_tries=20)(LABELS, 30, np.random.default_rng(0))


def test_shards_give_at_most_two_labels_per_client():
  parts = jaxfl.data.shards(2)(LABELS, 30, np.random.default_rng(0))
  assert max(len(np.unique(LABELS[p])) for p in parts) <= 2


def test_federated_data_padding_masks_and_report():
  ds = jaxfl.data.ArrayDataset("t", np.arange(12, dtype=np.float32)[:, None],
                               np.arange(12, dtype=np.int32) % 3, np.zeros((2, 1), np.float32),
                               np.zeros(2, np.int32), 3)
  fd = jaxfl.data.from_client_indices(ds, [np.array([0, 1, 2, 3, 4]), np.array([7]),
                                           np.array([9, 11])])
  assert fd.client_indices.shape == (3, 5) and fd.client_sizes.tolist() == [5, 1, 2]
  x, y, mask = fd.client_arrays([1, 2])
  assert x.shape == (2, 5, 1) and mask.tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]
  assert x[1, :2, 0].tolist() == [9.0, 11.0]
  rep = fd.report()
  assert rep["sizes"] == [5, 1, 2] and rep["num_train"] == 8
  assert rep["label_counts"][2] == [1, 0, 1]  # labels 0 (9) and 2 (11)


def test_digits_is_real_and_stratified():
  d = jaxfl.data.load_digits()
  assert d.x_train.shape[1:] == (8, 8, 1) and len(d.x_train) + len(d.x_test) == 1797
  assert 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0
  assert set(np.unique(d.y_test)) == set(range(10))


def test_load_digits_federated():
  fd = jaxfl.data.load("digits", 50, jaxfl.data.dirichlet(0.5), seed=3)
  assert fd.num_clients == 50 and fd.client_sizes.sum() == len(fd.y)


def test_synthetic_heterogeneity():
  iid = jaxfl.data.synthetic(0, 0, num_clients=10, iid=True, seed=0)
  het = jaxfl.data.synthetic(1, 1, num_clients=10, seed=0)
  assert iid.x.shape[1] == 60 and het.num_classes == 10
  def client_means(fd):
    return np.stack([fd.x[fd.client_indices[i, : fd.client_sizes[i]]].mean(0)
                     for i in range(fd.num_clients)])
  assert client_means(het).std(0).mean() > 2 * client_means(iid).std(0).mean()


@pytest.mark.skipif(not os.path.exists("/usr/share/datasets/fashion-mnist"),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_idx_reader():
  d = jaxfl.data.load_fashion_mnist()
  assert d.x_train.shape == (60000, 28, 28, 1) and d.x_test.shape == (10000, 28, 28, 1)
  assert np.bincount(d.y_train).tolist() == [6000] * 10


def test_idx_reader_rejects_truncated_file(tmp_path):
  import gzip
  p = tmp_path / "train-images-idx3-ubyte.gz"
  with gzip.open(p, "wb") as f:
    f.write((0x803).to_bytes(4, "big") + (2).to_bytes(4, "big") + (2).to_bytes(4, "big")
            + (2).to_bytes(4, "big") + bytes(3))
  with pytest.raises(ValueError, match="payload"):
    jaxfl.data._sources._read_idx(str(p))


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/data absent")
def test_lmls_index_files_reader():
  part = jaxfl.data.from_index_files(SHARED, "cifar10")
  labels = np.zeros(50000, np.int32)
  parts = part(labels, 128, None)
  _check_partition(parts, 50000)  # the authors' split covers CIFAR-10's train set exactly
  sizes = sorted(len(p) for p in parts)
  assert sizes[0] == 10 and sizes[-1] == 1070  # min/max stated in ALGORITHMS.md §0
  with pytest.raises(ValueError, match="num_clients"):
    part(labels, 100, None)
  with pytest.raises(ValueError, match="dataset has"):
    part(labels[:100], 128, None)


def test_index_files_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="directory"):
    jaxfl.data.from_index_files(str(tmp_path / "nope"), "x")
  (tmp_path / "a_0.txt").write_text("0\n2\n")
  (tmp_path / "a_1.txt").write_text("1\n")
  parts = jaxfl.data.from_index_files(str(tmp_path), "a")(np.zeros(3), 2, None)
  assert [p.tolist() for p in parts] == [[0, 2], [1]]
  with pytest.raises(FileNotFoundError, match="b_0"):
    jaxfl.data.from_index_files(str(tmp_path), "b")(np.zeros(3), 2, None)
