r"""A BERT-family encoder (BERT, DistilBERT, MiniLM) in Flax linen, loaded from Hugging Face
checkpoint directories, as a jaxfl :class:`~jaxfl.models.Model`.

**Input convention.** A text example is one int array of static shape ``[R, L]`` (so text
batches are ``i32[B, R, L]`` and flow through :class:`jaxfl.data.FederatedData`, the client
scan and the evaluator like images do):

* ``x[:, 0]``: token ids, ``[CLS] ... [SEP]`` then padding, truncated/padded to ``L``;
* ``x[:, 1]``: attention mask, 1 for real tokens and 0 for padding;
* ``x[:, 2]`` (only with ``token_types=True``, for sentence pairs): segment ids 0/1.

:func:`tokenize` builds these from strings (``tokenize(...).stacked()``). Float arrays are
accepted and cast to int32 (ids below 2**24 are exact in float32).

**Architecture** (Devlin et al., 2019; the post-LN Transformer encoder): embeddings
:math:`e = \mathrm{LN}(W_{word}[t] + W_{pos}[p] + W_{type}[s])`; each layer computes

.. math::

  a = \mathrm{LN}(h + \mathrm{Attn}(h)), \qquad
  h' = \mathrm{LN}(a + W_2\,\mathrm{GELU}(W_1 a + b_1) + b_2),

with multi-head scaled dot-product attention whose padded keys get a score of
``finfo.min`` (zero probability), and the exact erf GELU unless the config says otherwise.
The sentence embedding is the sentence-transformers mean over real tokens
:math:`\sum_t m_t h_t / \max(\sum_t m_t, 10^{-9})` (or the ``[CLS]`` state), and the
classifier is one Dense layer on it. Dropout follows ``transformers`` and is active only with
``train=True`` (and an ``rng``).

Parity: on five sentences the encoder's last hidden states and the mean-pooled embedding of
all-MiniLM-L6-v2 equal ``transformers``' PyTorch ``BertModel`` within 1e-4
(``tests/models/bert_test.py``; fixture made by ``experiments/tools/make_bert_reference.py``).

References:
  Devlin, Chang, Lee, Toutanova, `BERT: Pre-training of Deep Bidirectional Transformers for
  Language Understanding <https://arxiv.org/abs/1810.04805>`_, 2019.
  Sanh, Debut, Chaumond, Wolf, `DistilBERT, a distilled version of BERT
  <https://arxiv.org/abs/1910.01108>`_, 2019.
  Reimers, Gurevych, `Sentence-BERT <https://arxiv.org/abs/1908.10084>`_, 2019.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxfl.models._hf_checkpoint import (
    BertConfig,
    load_bert_config,
    load_bert_params,
    load_tokenizer,
    minilm_checkpoint_dir,
)
from jaxfl.models._model import Model

POOLINGS = ("mean", "cls")


def _activation(name: str):
  if name == "gelu":
    return lambda x: jax.nn.gelu(x, approximate=False)
  if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
    return lambda x: jax.nn.gelu(x, approximate=True)
  if name == "relu":
    return jax.nn.relu
  if name in ("silu", "swish"):
    return jax.nn.silu
  raise ValueError(f"`hidden_act` {name!r} is not supported.")


def split_inputs(x: jax.typing.ArrayLike) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """Splits a text batch ``[B, R, L]`` into ``(ids, mask, token_types or None)``, int32.

  Raises:
    ValueError: ``x`` is not rank 3 with 2 or 3 rows per example (see the module docstring).
  """
  x = jnp.asarray(x)
  if x.ndim != 3 or x.shape[1] not in (2, 3):
    raise ValueError(f"Text inputs must have shape [batch, 2 or 3, length] (token ids, "
                     f"attention mask[, token types]), got {x.shape}.")
  x = x.astype(jnp.int32)
  return x[:, 0], x[:, 1], (x[:, 2] if x.shape[1] == 3 else None)


def mean_pool(hidden: jax.typing.ArrayLike, mask: jax.typing.ArrayLike) -> jax.Array:
  """Padding-aware mean over tokens (sentence-transformers' ``mean_tokens`` pooling).

  Args:
    hidden: f32[B, L, H] token states.
    mask: [B, L] attention mask (1 real, 0 padding).

  Returns:
    f32[B, H]: ``sum_t m_t h_t / max(sum_t m_t, 1e-9)``; zeros for an all-padding row.
  """
  hidden = jnp.asarray(hidden)
  m = jnp.asarray(mask).astype(hidden.dtype)
  total = jnp.sum(hidden * m[..., None], axis=1)
  count = jnp.maximum(jnp.sum(m, axis=1, keepdims=True), 1e-9)
  return total / count


class _Embeddings(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, ids, token_types, *, train: bool):
    c = self.config
    length = ids.shape[-1]
    if length > c.max_position_embeddings:
      raise ValueError(f"Sequence length {length} exceeds `max_position_embeddings` "
                       f"{c.max_position_embeddings} of the checkpoint; lower `max_length`.")
    init = nn.initializers.normal(0.02)
    h = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=init, name="word")(ids)
    pos = nn.Embed(c.max_position_embeddings, c.hidden_size, embedding_init=init,
                   name="position")(jnp.arange(length, dtype=jnp.int32))
    h = h + pos[None]
    if c.type_vocab_size:
      types = jnp.zeros_like(ids) if token_types is None else token_types
      h = h + nn.Embed(c.type_vocab_size, c.hidden_size, embedding_init=init,
                       name="token_type")(types)
    h = nn.LayerNorm(epsilon=c.layer_norm_eps, use_fast_variance=False, name="norm")(h)
    return nn.Dropout(c.hidden_dropout)(h, deterministic=not train)


class _Layer(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, h, mask, *, train: bool):
    c = self.config
    b, length, width = h.shape
    heads, head_dim = c.num_heads, c.hidden_size // c.num_heads
    dense = lambda n, name: nn.Dense(n, kernel_init=nn.initializers.normal(0.02), name=name)
    norm = lambda name: nn.LayerNorm(epsilon=c.layer_norm_eps, use_fast_variance=False,
                                     name=name)
    split = lambda t: t.reshape(b, length, heads, head_dim)
    q = split(dense(width, "query")(h))
    k = split(dense(width, "key")(h))
    v = split(dense(width, "value")(h))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim).astype(np.float32)
    keep = mask[:, None, None, :] > 0
    scores = jnp.where(keep, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = nn.Dropout(c.attention_dropout)(probs, deterministic=not train)
    ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, length, width)
    a = dense(width, "attention_out")(ctx)
    if c.model_type == "bert":  # DistilBERT has no dropout after its attention projection
      a = nn.Dropout(c.hidden_dropout)(a, deterministic=not train)
    a = norm("attention_norm")(h + a)
    f = _activation(c.hidden_act)(dense(c.intermediate_size, "intermediate")(a))
    f = dense(width, "output")(f)
    f = nn.Dropout(c.hidden_dropout)(f, deterministic=not train)
    return norm("output_norm")(a + f)


class BertEncoder(nn.Module):
  """The BERT / DistilBERT encoder: token ids and mask to last hidden states.

  Submodules are named ``embeddings`` and ``layer_<i>`` (the params layout of
  :func:`jaxfl.models.load_bert_params`), so each tensor is one jaxfl layer.

  Attributes:
    config: the architecture (:func:`jaxfl.models.load_bert_config`).
  """

  config: BertConfig

  @nn.compact
  def __call__(self, ids: jax.typing.ArrayLike, mask: jax.typing.ArrayLike,
               token_types: jax.typing.ArrayLike | None = None, *,
               train: bool = False) -> jax.Array:
    """Encodes a batch.

    Args:
      ids: i32[B, L] token ids.
      mask: [B, L] attention mask (1 real, 0 padding); padded keys are never attended to.
      token_types: optional i32[B, L] segment ids (default zeros; ignored by DistilBERT).
      train: enables dropout (needs a ``"dropout"`` rng).

    Returns:
      f32[B, L, H] last hidden states (padding positions hold values that mean the model
      attended from them; pooling ignores them).
    """
    ids = jnp.asarray(ids).astype(jnp.int32)
    mask = jnp.asarray(mask)
    if token_types is not None:
      token_types = jnp.asarray(token_types).astype(jnp.int32)
    h = _Embeddings(self.config, name="embeddings")(ids, token_types, train=train)
    for i in range(self.config.num_layers):
      h = _Layer(self.config, name=f"layer_{i}")(h, mask, train=train)
    return h


class BertClassifier(nn.Module):
  """Encoder, pooling and a Dense classification head: text inputs to logits.

  Params: ``{"encoder": <BertEncoder params>, "head": {"kernel": f32[H, K], "bias": f32[K]}}``.

  Attributes:
    config: the encoder's architecture.
    num_classes: K, number of logits.
    pooling: ``"mean"`` (padding-aware mean, sentence-transformers) or ``"cls"`` (the first
      token's state, as BERT/DistilBERT sequence classifiers read it; no pooler layer).
  """

  config: BertConfig
  num_classes: int
  pooling: str = "mean"

  @nn.compact
  def __call__(self, x: jax.typing.ArrayLike, train: bool = False) -> jax.Array:
    """``x``: ``[B, 2 | 3, L]`` (see the module docstring). Returns f32[B, K] logits."""
    ids, mask, types = split_inputs(x)
    h = BertEncoder(self.config, name="encoder")(ids, mask, types, train=train)
    if self.pooling == "mean":
      pooled = mean_pool(h, mask)
    elif self.pooling == "cls":
      pooled = h[:, 0]
    else:
      raise ValueError(f"`pooling` must be one of {list(POOLINGS)}, got {self.pooling!r}.")
    pooled = nn.Dropout(self.config.hidden_dropout)(pooled, deterministic=not train)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.02),
                    name="head")(pooled)


class Tokens(NamedTuple):
  """Tokenized texts with static shapes: each field is i32[N, L].

  Attributes:
    ids: token ids, ``[CLS] ... [SEP] [PAD]...``.
    mask: 1 for real tokens, 0 for padding.
    token_types: segment ids (1 on the second text of a pair).
  """

  ids: np.ndarray
  mask: np.ndarray
  token_types: np.ndarray

  def stacked(self, token_types: bool = False) -> np.ndarray:
    """The model input i32[N, 2, L] (ids, mask), or i32[N, 3, L] with ``token_types``."""
    rows = (self.ids, self.mask) + ((self.token_types,) if token_types else ())
    return np.stack(rows, axis=1).astype(np.int32)


def tokenize(tokenizer, texts: Sequence[str], max_length: int, *,
             pairs: Sequence[str] | None = None, pad_id: int | None = None) -> Tokens:
  """Tokenizes texts (or text pairs) to fixed-length int32 arrays.

  Texts longer than ``max_length`` tokens are truncated (keeping ``[SEP]``, longest text of a
  pair first), shorter ones padded on the right with ``pad_id``; the result is what
  ``transformers``' tokenizer gives with ``padding="max_length", truncation=True``. The
  tokenizer's own truncation/padding settings are restored afterwards.

  Args:
    tokenizer: a ``tokenizers.Tokenizer`` (:func:`jaxfl.models.load_tokenizer`).
    texts: N strings.
    max_length: L, tokens per example including ``[CLS]``/``[SEP]`` (>= 2 + 1 per pair).
    pairs: optional N second texts (sentence-pair tasks; segment id 1).
    pad_id: padding id (default: the tokenizer's ``[PAD]`` id, else 0).

  Returns:
    :class:`Tokens`.

  Raises:
    ValueError: bad ``max_length``, or ``pairs`` of another length than ``texts``.
  """
  if isinstance(texts, str):
    raise TypeError("`texts` must be a sequence of strings, got one string.")
  texts = list(texts)
  least = 3 if pairs is not None else 2
  if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < least:
    raise ValueError(f"`max_length` must be an int >= {least}, got {max_length!r}.")
  if pairs is not None:
    pairs = list(pairs)
    if len(pairs) != len(texts):
      raise ValueError(f"`pairs` has {len(pairs)} texts but `texts` has {len(texts)}.")
  if pad_id is None:
    pad_id = tokenizer.token_to_id("[PAD]")
    pad_id = 0 if pad_id is None else pad_id
  saved_trunc, saved_pad = tokenizer.truncation, tokenizer.padding
  tokenizer.enable_truncation(max_length)
  tokenizer.no_padding()
  try:
    inputs = texts if pairs is None else list(zip(texts, pairs, strict=True))
    encodings = tokenizer.encode_batch(inputs) if inputs else []
  finally:
    tokenizer.no_truncation()
    if saved_trunc:
      tokenizer.enable_truncation(**saved_trunc)
    if saved_pad:
      tokenizer.enable_padding(**saved_pad)
  n = len(texts)
  ids = np.full((n, max_length), pad_id, np.int32)
  mask = np.zeros((n, max_length), np.int32)
  types = np.zeros((n, max_length), np.int32)
  for i, e in enumerate(encodings):
    k = len(e.ids)
    ids[i, :k] = e.ids
    mask[i, :k] = e.attention_mask
    types[i, :k] = e.type_ids
  return Tokens(ids, mask, types)


def bert_model(config: BertConfig, encoder_params: dict[str, Any], num_classes: int, *,
               max_length: int = 128, pooling: str = "mean", token_types: bool = False,
               name: str = "bert") -> Model:
  """Wraps pretrained encoder params and a new head as a jaxfl :class:`Model`.

  ``init(key)`` returns fresh copies of the pretrained encoder params plus a head drawn from
  ``key`` (normal(0.02) kernel, zero bias, as ``transformers`` initialises classifiers) and
  an empty model state; ``apply(params, {}, x, train=, rng=)`` returns f32[B, K] logits
  (dropout is applied when ``train=True`` and an ``rng`` is given, as the client update
  does; without an ``rng`` the model runs deterministically).

  Args:
    config: the encoder's architecture.
    encoder_params: its params (:func:`jaxfl.models.load_bert_params`).
    num_classes: K.
    max_length: L, tokens per example (the model's ``input_shape`` is ``(2, L)``).
    pooling: ``"mean"`` or ``"cls"`` (see :class:`BertClassifier`).
    token_types: inputs carry a third row of segment ids (``input_shape`` ``(3, L)``).
    name: the model's name in logs.
  """
  if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
    raise ValueError(f"`num_classes` must be a positive int, got {num_classes!r}.")
  if pooling not in POOLINGS:
    raise ValueError(f"`pooling` must be one of {list(POOLINGS)}, got {pooling!r}.")
  least = 3 if token_types else 2
  if not isinstance(max_length, int) or isinstance(max_length, bool) or not (
      least <= max_length <= config.max_position_embeddings):
    raise ValueError(f"`max_length` must be an int in [{least}, "
                     f"{config.max_position_embeddings}] (the checkpoint's "
                     f"max_position_embeddings), got {max_length!r}.")
  module = BertClassifier(config, num_classes, pooling)
  input_shape = (3 if token_types else 2, max_length)
  encoder = jax.tree.map(lambda a: np.asarray(a, np.float32), encoder_params)

  def init(key):
    head = nn.Dense(num_classes, kernel_init=nn.initializers.normal(0.02)).init(
        key, jnp.zeros((1, config.hidden_size), jnp.float32))["params"]
    return {"encoder": jax.tree.map(jnp.array, encoder), "head": head}, {}

  def apply(params, model_state, x, *, train: bool, rng=None):
    rngs = {"dropout": rng} if rng is not None else {}
    logits = module.apply({"params": params}, x, train=train and rng is not None, rngs=rngs)
    return logits, model_state

  return Model(init, apply, name, input_shape)


def load_bert(checkpoint_dir: str | os.PathLike | None = None, num_classes: int = 2, *,
              max_length: int = 128, pooling: str = "mean", token_types: bool = False,
              dropout: float | None = None, seed: int = 0):
  """Loads a BERT / DistilBERT checkpoint directory as a jaxfl classifier.

  Args:
    checkpoint_dir: a Hugging Face-format directory (``config.json``, ``model.safetensors``,
      ``tokenizer.json`` or ``vocab.txt``); default all-MiniLM-L6-v2 from the ``text`` extra
      (:func:`jaxfl.models.minilm_checkpoint_dir`).
    num_classes: K, logits of the new classification head.
    max_length: L, tokens per example (static).
    pooling: ``"mean"`` (default; sentence-transformers) or ``"cls"``.
    token_types: feed segment ids as a third input row (sentence pairs).
    dropout: overrides the config's hidden and attention dropout rates (0.0 turns dropout
      off); None keeps the checkpoint's.
    seed: seeds the head of the returned ``params``.

  Returns:
    ``(model, params, tokenizer)``: the :class:`Model`, its params
    (``model.init(jax.random.key(seed))[0]``) and the ``tokenizers.Tokenizer``; make inputs
    with ``tokenize(tokenizer, texts, max_length).stacked()``.

  Example::

    model, params, tok = jaxfl.models.load_bert(num_classes=4, max_length=64)
    x = jaxfl.models.tokenize(tok, ["a quote", "another"], 64).stacked()  # i32[2, 2, 64]
    logits, _ = model.apply(params, {}, x, train=False)                    # f32[2, 4]
  """
  if checkpoint_dir is None:
    checkpoint_dir = minilm_checkpoint_dir()
  config = load_bert_config(checkpoint_dir)
  if dropout is not None:
    config = config._replace(hidden_dropout=float(dropout), attention_dropout=float(dropout))
    config.validate("`dropout`")
  tokenizer = load_tokenizer(checkpoint_dir)
  encoder = load_bert_params(checkpoint_dir, config)
  model = bert_model(config, encoder, num_classes, max_length=max_length, pooling=pooling,
                     token_types=token_types, name=Path(checkpoint_dir).name or "bert")
  params, _ = model.init(jax.random.key(seed))
  return model, params, tokenizer
