"""Tests for the fortunes topic-classification source (jaxfl/data/_fortunes.py).

The fixture ``tests/fixtures/fortunes/`` has the package's file format with synthetic quotes:
``alpha`` (13 distinct cat quotes, one overstruck, one repeated with other whitespace, one shared
with ``beta``), ``beta`` (12 ship quotes + the shared one), ``gamma.u8`` (12 UTF-8 number quotes)
next to a plain ``gamma`` that must be ignored, ``tiny`` (2 quotes) and a binary ``alpha.dat``.
Expected values are derived here from the fixture's text, independently of the module.
"""

import hashlib
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxfl
from jaxfl.data import _fortunes

tokenizers = pytest.importorskip("tokenizers")

FIXTURE = pathlib.Path(__file__).parents[1] / "fixtures" / "fortunes"
TOPICS = ("alpha", "beta", "gamma")
SHARED = "Everything is better with a good story."


def raw_quotes(name):
  text = (FIXTURE / name).read_text(encoding="utf-8")
  return [q.strip("\n") for q in text.split("\n%\n") if q.strip()]


def word_tokenizer(texts):
  """A WordLevel tokenizer over the words of ``texts``: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3."""
  from tokenizers import models, pre_tokenizers, processors

  words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]+", t)})
  vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
  vocab.update({w: i + 4 for i, w in enumerate(words)})
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  return tok, vocab


def ref_ids(text, vocab, length):
  ids = [2] + [vocab.get(w, 1) for w in re.findall(r"\w+|[^\w\s]+", text)] + [3]
  ids = ids[:length - 1] + [3] if len(ids) > length else ids  # truncation keeps [SEP]
  return ids + [0] * (length - len(ids)), [1] * len(ids) + [0] * (length - len(ids))


def ref_in_test(text, seed, fraction):
  h = hashlib.sha256(f"{seed}:{' '.join(text.split())}".encode()).digest()
  return int.from_bytes(h[:8], "big") / 2.0 ** 64 < fraction


def test_read_cleans_dedups_and_prefers_u8():
  assert jaxfl.data.fortune_topics(FIXTURE) == {"alpha": 14, "beta": 13, "gamma": 12, "tiny": 2}
  got = jaxfl.data.read_fortunes(FIXTURE, TOPICS, min_quotes=5)
  assert list(got) == list(TOPICS)
  alpha = raw_quotes("alpha")
  want_alpha = [q.replace("_\b", "") for q in alpha[:13]]  # file order; overstrike removed
  assert got["alpha"] == want_alpha and "Bold cats climb the tall tree." in got["alpha"]
  assert got["beta"] == raw_quotes("beta")[:12]  # the quote shared with alpha is dropped
  assert all(SHARED not in qs for qs in got.values())
  assert got["gamma"] == raw_quotes("gamma.u8")  # .u8 wins over the plain file
  assert any("café" in q for q in got["gamma"])
  # Without beta the shared quote has one owner and stays.
  assert SHARED in jaxfl.data.read_fortunes(FIXTURE, ("alpha", "gamma"), min_quotes=5)["alpha"]


def test_hashed_split_is_deterministic_and_matches_reference():
  t = jaxfl.data.fortunes_text(FIXTURE, TOPICS, test_fraction=0.3, seed=0, min_quotes=5)
  per = jaxfl.data.read_fortunes(FIXTURE, TOPICS, min_quotes=5)
  want_tr, want_te = [], []
  for label, topic in enumerate(TOPICS):
    for q in per[topic]:
      (want_te if ref_in_test(q, 0, 0.3) else want_tr).append((q, label))
  assert list(zip(t.train_texts, t.y_train.tolist())) == want_tr
  assert list(zip(t.test_texts, t.y_test.tolist())) == want_te
  assert t.y_train.dtype == np.int32 and t.topics == TOPICS
  assert t.counts == {"alpha": 13, "beta": 12, "gamma": 12}
  again = jaxfl.data.fortunes_text(FIXTURE, TOPICS, test_fraction=0.3, seed=0, min_quotes=5)
  assert again.test_texts == t.test_texts
  other = jaxfl.data.fortunes_text(FIXTURE, TOPICS, test_fraction=0.3, seed=1, min_quotes=5)
  assert other.test_texts != t.test_texts
  # A quote's split does not depend on the other topics loaded.
  two = jaxfl.data.fortunes_text(FIXTURE, ("gamma", "alpha"), test_fraction=0.3, seed=0,
                                 min_quotes=5)
  assert {q for q in two.test_texts if q != SHARED} <= set(t.test_texts)


def test_tokenize_matches_reference_and_leaves_tokenizer_alone(tmp_path):
  texts = raw_quotes("alpha")[:4] + ["cat " * 30]
  tok, vocab = word_tokenizer(texts)
  before = tok.to_str()
  x = jaxfl.data.tokenize_texts(texts, tok, max_length=12)
  assert x.shape == (5, 2, 12) and x.dtype == np.int32
  for row, text in zip(x, texts):
    ids, mask = ref_ids(text, vocab, 12)
    np.testing.assert_array_equal(row[0], ids)
    np.testing.assert_array_equal(row[1], mask)
  assert x[-1, 1].all() and x[-1, 0, -1] == 3  # truncated, [SEP] kept
  assert tok.to_str() == before and tok.padding is None
  tok.save(str(tmp_path / "tokenizer.json"))
  for path in (tmp_path / "tokenizer.json", str(tmp_path)):
    np.testing.assert_array_equal(jaxfl.data.tokenize_texts(texts, path, max_length=12), x)
  assert jaxfl.data.tokenize_texts([], tok, 8).shape == (0, 2, 8)


def test_pack_unpack_numpy_and_jit():
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 30522, size=(3, 4, 7)).astype(np.int32)
  mask = (rng.random((3, 4, 7)) < 0.7).astype(np.int32)
  x = jaxfl.data.pack_tokens(ids, mask)
  assert x.shape == (3, 4, 2, 7) and x.dtype == np.int32
  i2, m2 = jaxfl.data.unpack_tokens(x)
  np.testing.assert_array_equal(i2, ids)
  np.testing.assert_array_equal(m2, mask)
  # Under jit, and from the float32 copy jaxfl.data.federate makes (exact below 2**24).
  ji, jm = jax.jit(jaxfl.data.unpack_tokens)(jnp.asarray(x, jnp.float32))
  assert ji.dtype == jnp.int32
  np.testing.assert_array_equal(ji, ids)
  np.testing.assert_array_equal(jm, mask)
  with pytest.raises(ValueError, match="2, L"):
    jaxfl.data.unpack_tokens(ids)


@pytest.mark.parametrize("partition", [jaxfl.data.iid(), jaxfl.data.dirichlet(0.5)],
                         ids=["iid", "dirichlet"])
def test_load_and_partition_over_clients(partition):
  text = jaxfl.data.fortunes_text(FIXTURE, TOPICS, test_fraction=0.3, min_quotes=5)
  tok, _ = word_tokenizer(text.train_texts + text.test_texts)
  ds = jaxfl.data.load_fortunes(tok, FIXTURE, TOPICS, max_length=16, test_fraction=0.3,
                                min_quotes=5)
  assert ds.name == "fortunes" and ds.num_classes == 3
  assert ds.x_train.shape == (len(text.train_texts), 2, 16) and ds.x_train.dtype == np.int32
  np.testing.assert_array_equal(ds.y_train, text.y_train)
  np.testing.assert_array_equal(ds.x_test, jaxfl.data.tokenize_texts(text.test_texts, tok, 16))
  fed = jaxfl.data.federate_tokens(ds, 4, partition, seed=0)
  assert fed.x.dtype == np.int32 and fed.x_test.dtype == np.int32
  assert fed.example_shape == (2, 16) and fed.num_clients == 4
  owned = np.concatenate([fed.client_indices[i, :s] for i, s in enumerate(fed.client_sizes)])
  np.testing.assert_array_equal(np.sort(owned), np.arange(len(ds.y_train)))  # a partition
  assert fed.label_counts().sum() == len(ds.y_train)
  jaxfl.data.validate(fed)
  xs, ys, m = fed.client_arrays([0, 1])
  assert xs.shape == (2, fed.max_client_size, 2, 16) and xs.dtype == np.int32
  # The generic federate gives the same partition, with x as (exact) float32.
  plain = jaxfl.data.federate(ds, 4, partition, seed=0)
  np.testing.assert_array_equal(plain.client_indices, fed.client_indices)
  np.testing.assert_array_equal(plain.x.astype(np.int32), fed.x)


def test_load_by_name_equals_load_then_federate():
  text = jaxfl.data.fortunes_text(FIXTURE, TOPICS, test_fraction=0.3, min_quotes=5)
  tok, _ = word_tokenizer(text.train_texts + text.test_texts)
  fed = jaxfl.data.load("fortunes", 3, jaxfl.data.dirichlet(0.5), seed=1, data_dir=FIXTURE,
                        tokenizer=tok, topics=TOPICS, max_length=12, test_fraction=0.3,
                        min_quotes=5)
  ds = jaxfl.data.load_fortunes(tok, FIXTURE, TOPICS, max_length=12, test_fraction=0.3,
                                seed=1, min_quotes=5)
  want = jaxfl.data.federate_tokens(ds, 3, jaxfl.data.dirichlet(0.5), seed=1)
  assert fed.x.dtype == np.int32 and fed.example_shape == (2, 12)
  np.testing.assert_array_equal(fed.x, want.x)
  np.testing.assert_array_equal(fed.y_test, want.y_test)
  np.testing.assert_array_equal(fed.client_indices, want.client_indices)


def test_errors_name_the_argument(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"`data_dir`.*apt-get install fortunes"):
    jaxfl.data.read_fortunes(tmp_path / "missing", TOPICS)
  with pytest.raises(ValueError, match=r"`topics` \['nope'\].*available: \['alpha'"):
    jaxfl.data.read_fortunes(FIXTURE, ("alpha", "nope"), min_quotes=1)
  with pytest.raises(ValueError, match=r"`topics` \['tiny'\] have too few.*`min_quotes`=5"):
    jaxfl.data.read_fortunes(FIXTURE, ("alpha", "tiny"), min_quotes=5)
  with pytest.raises(ValueError, match="at least two"):
    jaxfl.data.read_fortunes(FIXTURE, ("alpha",), min_quotes=1)
  with pytest.raises(ValueError, match="repeats"):
    jaxfl.data.read_fortunes(FIXTURE, ("alpha", "alpha"), min_quotes=1)
  with pytest.raises(TypeError, match="topics"):
    jaxfl.data.read_fortunes(FIXTURE, "alpha", min_quotes=1)
  with pytest.raises(ValueError, match=r"`min_quotes` \[.*\]|too few"):
    jaxfl.data.read_fortunes(FIXTURE, TOPICS)  # default 500
  with pytest.raises(ValueError, match="test_fraction"):
    jaxfl.data.fortunes_text(FIXTURE, TOPICS, test_fraction=1.0, min_quotes=5)
  with pytest.raises(ValueError, match="no test quote"):
    jaxfl.data.fortunes_text(FIXTURE, ("alpha", "tiny"), test_fraction=0.01, min_quotes=2)
  with pytest.raises(TypeError, match="`tokenizer`"):
    jaxfl.data.tokenize_texts(["a"], object(), 8)
  with pytest.raises(FileNotFoundError, match="`tokenizer`"):
    jaxfl.data.tokenize_texts(["a"], tmp_path, 8)
  with pytest.raises(ValueError, match="max_length"):
    jaxfl.data.tokenize_texts(["a"], word_tokenizer(["a"])[0], 1)
  x = jaxfl.data.tokenize_texts(["a"], word_tokenizer(["a"])[0], 4)
  bad = jaxfl.data.ArrayDataset("f", x.astype(np.float32), np.zeros(1, np.int32), x,
                                np.zeros(1, np.int32), 1)
  with pytest.raises(ValueError, match="x_train"):
    jaxfl.data.federate_tokens(bad, 1)


@pytest.mark.skipif(not os.path.isdir(_fortunes.FORTUNES_DIR),
                    reason="Debian package `fortunes` not installed (apt-get install fortunes)")
def test_real_fortunes_default_topics():
  counts = jaxfl.data.fortune_topics()
  assert all(counts[t] >= 500 for t in jaxfl.data.FORTUNE_TOPICS), counts
  t = jaxfl.data.fortunes_text()
  assert len(jaxfl.data.FORTUNE_TOPICS) >= 6 and t.topics == jaxfl.data.FORTUNE_TOPICS
  assert all(n >= 500 for n in t.counts.values()), t.counts
  n = len(t.train_texts) + len(t.test_texts)
  assert n == sum(t.counts.values())
  frac = np.bincount(t.y_test, minlength=6) / np.asarray(list(t.counts.values()))
  assert np.all(np.abs(frac - 0.2) < 0.05), frac
  assert not set(t.train_texts) & set(t.test_texts)
  tok, _ = word_tokenizer(t.train_texts[:200])
  x = jaxfl.data.tokenize_texts(t.train_texts[:50], tok, 64)
  assert x.shape == (50, 2, 64) and np.all(x[:, 1, 0] == 1)
