"""experiments/gem_glue.py reads GLUE from a prepared TFDS data_dir: tested on a TFDS-format fixture.

The fixture is a real prepared TFDS dataset (``dataset_info.json``, ``features.json`` and
array_record shards under ``<data_dir>/glue/<task>/<version>/``), written here offline with
TFDS's own serializer and array_record writer (no TensorFlow, no network), so the script's
``tfds.data_source(..., download=False)`` path runs exactly as on a user's prepared copy.
(``tests/transforms/gem_test.py`` also runs the script under ``tfds.testing.mock_data``.)
"""

import importlib.util
import json
import os
import pathlib
import sys

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
pytest.importorskip("array_record")

ROOT = pathlib.Path(__file__).parents[1]

SST2 = {"train": [("a fine and moving film", 1), ("dull , long and loud", 0),
                  ("great fun for everyone", 1), ("a waste of two hours", 0),
                  ("sharp writing", 1), ("nothing works here", 0)],
        "validation": [("bad", 0), ("good", 1), ("truly great", 1)]}
MRPC = {"train": [("He left .", "He went away .", 1), ("It rained .", "It was sunny .", 0)],
        "validation": [("Cats purr .", "Cats make a purring sound .", 1)]}


def write_glue_fixture(data_dir, task, rows):
  """Prepares glue/<task> in ``data_dir`` from ``{split: [(fields..., label), ...]}``."""
  from tensorflow_datasets.core import file_adapters, naming
  from tensorflow_datasets.core import splits as splits_lib
  from tensorflow_datasets.text import glue  # noqa: F401  (registers the builder)

  builder = tfds.builder(f"glue/{task}", data_dir=str(data_dir), file_format="array_record")
  fields = [k for k in builder.info.features if k not in ("idx", "label")]
  os.makedirs(builder.data_dir, exist_ok=True)
  infos = []
  for split, examples in rows.items():
    template = naming.ShardedFileTemplate(data_dir=builder.data_dir, dataset_name="glue",
                                          split=split, filetype_suffix="array_record")
    path = template.sharded_filepath(shard_index=0, num_shards=1)
    serialized = []
    for i, (*texts, label) in enumerate(examples):
      ex = dict(zip(sorted(fields), texts), label=label, idx=i)
      serialized.append((i, builder.info.features.serialize_example(ex)))
    file_adapters.ArrayRecordFileAdapter.write_examples(path, serialized)
    infos.append(splits_lib.SplitInfo(name=split, shard_lengths=[len(examples)],
                                      num_bytes=os.path.getsize(path),
                                      filename_template=template))
  builder.info.set_splits(splits_lib.SplitDict(infos))
  builder.info.set_file_format("array_record")
  builder.info.write_to_directory(builder.data_dir)
  return builder.data_dir


@pytest.fixture(scope="module")
def gem_glue():
  path = ROOT / "experiments" / "gem_glue.py"
  spec = importlib.util.spec_from_file_location("gem_glue", path)
  mod = importlib.util.module_from_spec(spec)
  sys.modules["gem_glue"] = mod  # flax dataclasses look their module up in sys.modules
  spec.loader.exec_module(mod)
  return mod


def test_load_glue_reads_a_prepared_tfds_copy(tmp_path, gem_glue):
  write_glue_fixture(tmp_path, "sst2", SST2)
  write_glue_fixture(tmp_path, "mrpc", MRPC)
  for split in ("train", "validation"):
    texts, labels = gem_glue.load_glue("sst2", split, str(tmp_path))
    assert texts == [s for s, _ in SST2[split]]
    np.testing.assert_array_equal(labels, [y for _, y in SST2[split]])
  texts, labels = gem_glue.load_glue("sst2", "train", str(tmp_path), limit=2)
  assert len(texts) == 2 and labels.tolist() == [1, 0]
  # Two-sentence tasks join the fields (in GLUE's order) with " [SEP] ".
  texts, labels = gem_glue.load_glue("mrpc", "train", str(tmp_path))
  assert texts == [f"{a} [SEP] {b}" for a, b, _ in MRPC["train"]]
  assert labels.tolist() == [1, 0]
  ids, mask = gem_glue.hash_tokenize(texts, max_len=8)
  assert ids.shape == (2, 8) and ids.dtype == np.int32 and mask[:, 0].all()


def test_missing_prepared_copy_fails_loudly(tmp_path, gem_glue):
  with pytest.raises(Exception, match="sst2|not found|No such"):
    gem_glue.load_glue("sst2", "train", str(tmp_path / "empty"))


@pytest.mark.slow  # ~30 s on 2 cores: compiles the stand-in encoder, masks and a step
def test_gem_glue_runs_end_to_end_on_the_fixture(tmp_path, gem_glue):
  data = tmp_path / "tfds"
  write_glue_fixture(data, "sst2", SST2)
  out = gem_glue.main(["--task", "sst2", "--data-dir", str(data), "--steps", "1", "--batch",
                       "2", "--calib-batches", "1", "--max-len", "8", "--method", "gem",
                       "--budget", "0.01", "--out-dir", str(tmp_path / "out")])
  assert out["task"] == "glue/sst2" and out["mock"] == 0
  assert 0.0 <= out["eval_acc"] <= 1.0 and np.isfinite(out["final_loss"])
  assert out["tuned_incl_head"] > 0
  written = json.load(open(tmp_path / "out" / "gem_glue.json"))
  assert written["eval_acc"] == out["eval_acc"]
