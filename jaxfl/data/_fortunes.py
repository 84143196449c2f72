r"""Topic classification on the quotes of Debian's ``fortunes`` package (offline text task).

``apt-get install fortunes`` puts one plain-text file per topic in ``/usr/share/games/fortunes``
(strfile format: quotes separated by lines holding only ``%``; the ``.dat`` files are strfile
indexes and are ignored). In fortunes 1:1.99.1 every ``<topic>.u8`` is a symlink to
``<topic>``, i.e. the text files are already UTF-8; the reader takes ``<topic>.u8`` where it
exists and ``<topic>`` otherwise, and decodes UTF-8 (undecodable bytes replaced).

The label of a quote is the file it comes from. Default topics (:data:`FORTUNE_TOPICS`, the
six files with >= 500 quotes whose subjects overlap least; counted after the cleaning below,
fortunes 1:1.99.1-7.3)::

    computers 1050   definitions 1203   people 1246
    politics   702   science      624   songs-poems 712       (5,537 quotes)

(raw counts per file: 1051, 1203, 1251, 703, 625, 720; the difference is repeated texts). With
``test_fraction=0.2``, ``seed=0``: 4,442 training and 1,095 test quotes, 18.5%-22.1% of each
topic in the test set.

Other files with >= 500 quotes (``cookie``, ``knghtbrd``, ``men-women``, ``miscellaneous``,
``platitudes``, ``work``, ``zippy``) can be passed as ``topics=``; ``cookie`` and
``miscellaneous`` are grab-bags that overlap every other topic.

Cleaning: overstrike sequences (``c\b``: a character then a backspace, used for bold and
underline) are removed, surrounding blank lines are stripped; a text that appears more than once
within a topic is kept once, and a text that appears in more than one of the chosen topics is
dropped (its label would be ambiguous). Texts are compared after collapsing whitespace.

Train/test split: **hashed, not stratified**. A quote is in the test set iff the first 8 bytes
of the SHA-256 of ``f"{seed}:{text}"`` (``text`` with whitespace runs collapsed to one space),
read as a fraction of :math:`2^{64}`, are below ``test_fraction``. The split of a
quote therefore never depends on which other quotes or topics were loaded (adding a topic or a
package update adding quotes moves nothing), and is the same on every machine. With >= 500
quotes per topic the per-topic test fraction is within a few points of ``test_fraction``.

Text inputs in jaxfl (the convention models must follow)
-------------------------------------------------------
A batch of tokenized texts is **one** int32 array ``x`` of shape ``[N, 2, L]``:

* ``x[:, 0, :]`` token ids (``i32``, padded with the tokenizer's pad id, e.g. 0 = ``[PAD]``
  for BERT), the sequence starting with the tokenizer's own special tokens (``[CLS] ... [SEP]``
  for BERT) and truncated to ``L`` tokens;
* ``x[:, 1, :]`` the attention mask (``1`` for real tokens, ``0`` for padding).

One array, because everything in jaxfl moves examples as a single ``x`` with a leading example
axis (:class:`jaxfl.data.ArrayDataset`, :class:`jaxfl.data.FederatedData`, the round's
``data.x[rows]`` gathers, :class:`jaxfl.data.DeviceData`, the evaluation batches); shapes are
static. :func:`pack_tokens` builds it from ``(ids, mask)`` and :func:`unpack_tokens` splits it
back (NumPy or JAX arrays, any leading batch axes, usable under ``jit``)::

    def apply(params, model_state, x, train=False, rng=None):
      ids, mask = jaxfl.data.unpack_tokens(x)        # i32[B, L], i32[B, L]
      ...

``unpack_tokens`` casts to int32, so a model also accepts ``x`` as float (jaxfl's
:func:`jaxfl.data.validate` checks a model with float zeros of the example shape, and
:func:`jaxfl.data.federate` stores ``x`` as float32, which is exact for ids below :math:`2^{24}`);
:func:`federate_tokens` keeps the int32 dtype. The example shape is ``(2, L)``.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any, NamedTuple

import numpy as np

from jaxfl.data._federated import FederatedData, federate
from jaxfl.data._partition import Partitioner, dirichlet
from jaxfl.data._sources import ArrayDataset

FORTUNES_DIR = "/usr/share/games/fortunes"
FORTUNE_TOPICS = ("computers", "definitions", "people", "politics", "science", "songs-poems")

__all__ = ["FORTUNES_DIR", "FORTUNE_TOPICS", "FortunesText", "federate_tokens", "fortune_topics",
           "fortunes_text", "load_fortunes", "pack_tokens", "read_fortunes", "tokenize_texts",
           "unpack_tokens"]

_SEPARATOR = re.compile(r"^%[ \t\r]*$", re.MULTILINE)
_OVERSTRIKE = re.compile(r".\x08", re.DOTALL)
_INSTALL = "`apt-get install fortunes` (Debian/Ubuntu)"


class FortunesText(NamedTuple):
  """The fortunes task as raw texts (before tokenization).

  Attributes:
    train_texts: list of quotes in the training split.
    y_train: i32[n_train] topic ids (index into ``topics``).
    test_texts: list of quotes in the test split.
    y_test: i32[n_test].
    topics: the topic names, in label order.
    counts: quotes per topic after cleaning (train + test).
  """

  train_texts: list[str]
  y_train: np.ndarray
  test_texts: list[str]
  y_test: np.ndarray
  topics: tuple[str, ...]
  counts: dict[str, int]


def _resolve_dir(data_dir: str | os.PathLike | None) -> str:
  data_dir = os.fspath(data_dir) if data_dir is not None else os.environ.get(
      "JAXFL_FORTUNES_DIR", FORTUNES_DIR)
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(
        f"`data_dir`={data_dir!r} (the fortunes directory) does not exist. Install the quotes "
        f"with {_INSTALL}, or pass data_dir= (or set $JAXFL_FORTUNES_DIR) to a folder of "
        "fortune files.")
  return data_dir


def _topic_files(data_dir: str) -> dict[str, str]:
  """topic -> path of its text file (``<topic>.u8`` preferred), for every topic in the folder."""
  names = sorted(os.listdir(data_dir))
  out = {}
  for name in names:
    if name.startswith(".") or name.endswith(".dat"):
      continue
    topic = name[:-3] if name.endswith(".u8") else name
    path = os.path.join(data_dir, name)
    if not os.path.isfile(path):
      continue
    if name.endswith(".u8") or topic not in out:  # .u8 wins over the plain file
      out[topic] = path
  return out


def _clean(quote: str) -> str:
  return _OVERSTRIKE.sub("", quote).strip("\n").rstrip()


def _key(text: str) -> str:
  return " ".join(text.split())


def _read_file(path: str) -> list[str]:
  with open(path, encoding="utf-8", errors="replace") as f:
    raw = f.read()
  quotes = [_clean(q) for q in _SEPARATOR.split(raw)]
  return [q for q in quotes if q.strip()]


def fortune_topics(data_dir: str | os.PathLike | None = None) -> dict[str, int]:
  """Every topic in the fortunes folder with its number of (cleaned, de-duplicated) quotes.

  Args:
    data_dir: the folder; default ``$JAXFL_FORTUNES_DIR`` or ``/usr/share/games/fortunes``.
  """
  data_dir = _resolve_dir(data_dir)
  counts = {}
  for topic, path in _topic_files(data_dir).items():
    counts[topic] = len({_key(q) for q in _read_file(path)})
  return counts


def read_fortunes(data_dir: str | os.PathLike | None = None,
                  topics: tuple[str, ...] | list[str] = FORTUNE_TOPICS, *,
                  min_quotes: int = 500) -> dict[str, list[str]]:
  """The cleaned quotes of each topic (see the module docstring for the cleaning rules).

  Args:
    data_dir: the fortunes folder; default ``$JAXFL_FORTUNES_DIR`` or
      ``/usr/share/games/fortunes``.
    topics: topic (file) names, at least two, no repeats.
    min_quotes: every topic must keep at least this many quotes after cleaning.

  Returns:
    ``{topic: [quote, ...]}`` in the order of ``topics``; quotes in file order.

  Raises:
    FileNotFoundError: if ``data_dir`` does not exist (install with ``apt-get install
      fortunes``).
    ValueError: for an unknown or repeated topic, fewer than two topics, or a topic with fewer
      than ``min_quotes`` quotes.
  """
  if isinstance(topics, str):
    raise TypeError(f"`topics` must be a sequence of topic names, got the string {topics!r}.")
  topics = tuple(topics)
  if len(topics) < 2:
    raise ValueError(f"`topics` needs at least two topics to classify, got {list(topics)}.")
  if len(set(topics)) != len(topics):
    raise ValueError(f"`topics` has repeats: {list(topics)}.")
  if not isinstance(min_quotes, int | np.integer) or min_quotes < 1:
    raise ValueError(f"`min_quotes` must be a positive int, got {min_quotes!r}.")
  data_dir = _resolve_dir(data_dir)
  files = _topic_files(data_dir)
  unknown = [t for t in topics if t not in files]
  if unknown:
    raise ValueError(f"`topics` {unknown} not found in data_dir={data_dir!r}; available: "
                     f"{sorted(files)}.")
  per_topic = {}
  for t in topics:
    seen, kept = set(), []
    for q in _read_file(files[t]):
      k = _key(q)
      if k not in seen:
        seen.add(k)
        kept.append(q)
    per_topic[t] = kept
  # A text in two of the chosen topics has no single label: drop every copy.
  owners: dict[str, int] = {}
  for t in topics:
    for q in per_topic[t]:
      owners[_key(q)] = owners.get(_key(q), 0) + 1
  per_topic = {t: [q for q in qs if owners[_key(q)] == 1] for t, qs in per_topic.items()}
  few = {t: len(qs) for t, qs in per_topic.items() if len(qs) < min_quotes}
  if few:
    raise ValueError(f"`topics` {sorted(few)} have too few quotes ({few}) for "
                     f"`min_quotes`={min_quotes} in data_dir={data_dir!r}; choose other topics "
                     "(see jaxfl.data.fortune_topics()) or lower min_quotes.")
  return per_topic


def _in_test(text: str, seed: int, test_fraction: float) -> bool:
  digest = hashlib.sha256(f"{seed}:{_key(text)}".encode()).digest()
  return int.from_bytes(digest[:8], "big") < test_fraction * 2.0 ** 64


def fortunes_text(data_dir: str | os.PathLike | None = None,
                  topics: tuple[str, ...] | list[str] = FORTUNE_TOPICS, *,
                  test_fraction: float = 0.2, seed: int = 0,
                  min_quotes: int = 500) -> FortunesText:
  """The fortunes topic task as texts with a hashed train/test split (see the module docstring).

  Args:
    data_dir, topics, min_quotes: as in :func:`read_fortunes`.
    test_fraction: expected fraction of quotes in the test set, in (0, 1).
    seed: salt of the split hash (another seed gives another split).

  Returns:
    A :class:`FortunesText`; within each split, examples are ordered by topic, then file order.

  Raises:
    ValueError: as :func:`read_fortunes`, for ``test_fraction`` outside (0, 1), or if a topic
      ends up with no training or no test quote.
  """
  if not 0.0 < float(test_fraction) < 1.0:
    raise ValueError(f"`test_fraction` must be in (0, 1), got {test_fraction!r}.")
  per_topic = read_fortunes(data_dir, topics, min_quotes=min_quotes)
  tr, ytr, te, yte = [], [], [], []
  for label, (topic, quotes) in enumerate(per_topic.items()):
    test = [_in_test(q, int(seed), float(test_fraction)) for q in quotes]
    if all(test) or not any(test):
      raise ValueError(f"Topic {topic!r} has {len(quotes)} quotes and "
                       f"{'no training' if all(test) else 'no test'} quote at "
                       f"`test_fraction`={test_fraction}, `seed`={seed}; use more quotes or "
                       "another test_fraction/seed.")
    for q, t in zip(quotes, test):
      (te if t else tr).append(q)
      (yte if t else ytr).append(label)
  return FortunesText(tr, np.asarray(ytr, np.int32), te, np.asarray(yte, np.int32),
                      tuple(per_topic), {t: len(q) for t, q in per_topic.items()})


def _as_tokenizer(tokenizer: Any):
  try:
    import tokenizers
  except ImportError as e:
    raise ImportError("Tokenizing texts needs the `tokenizers` package: pip install tokenizers"
                      ) from e
  if isinstance(tokenizer, str | os.PathLike):
    path = os.fspath(tokenizer)
    if os.path.isdir(path):
      path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"`tokenizer`: no tokenizer.json at {path!r}.")
    return tokenizers.Tokenizer.from_file(path)
  if isinstance(tokenizer, tokenizers.Tokenizer):
    return tokenizers.Tokenizer.from_str(tokenizer.to_str())  # never change the caller's object
  raise TypeError("`tokenizer` must be a tokenizers.Tokenizer, a path to a tokenizer.json or a "
                  f"folder holding one, got {type(tokenizer).__name__}.")


def tokenize_texts(texts: list[str], tokenizer: Any, max_length: int = 64,
                   pad_id: int | None = None) -> np.ndarray:
  """Tokenizes texts into jaxfl's text input, ``i32[N, 2, max_length]`` (ids, attention mask).

  Args:
    texts: the strings.
    tokenizer: a ``tokenizers.Tokenizer`` (copied, not modified) or the path of a
      ``tokenizer.json`` (or of a folder holding one), e.g. from a Hugging Face checkpoint.
      Its post-processor adds the special tokens (``[CLS] ... [SEP]`` for BERT).
    max_length: L, the fixed sequence length (truncate longer, pad shorter), >= 2.
    pad_id: id of the padding token; default the tokenizer's own padding id, else the id of
      ``[PAD]``, ``<pad>`` or ``<PAD>``, else 0.

  Returns:
    ``x`` with ``x[:, 0]`` the token ids and ``x[:, 1]`` the attention mask (1 real, 0 pad).
  """
  if not isinstance(max_length, int | np.integer) or max_length < 2:
    raise ValueError(f"`max_length` must be an int >= 2, got {max_length!r}.")
  if isinstance(texts, str):
    raise TypeError("`texts` must be a list of strings, got one string.")
  texts = list(texts)
  tok = _as_tokenizer(tokenizer)
  pad_token = None
  if pad_id is None and tok.padding is not None:
    pad_id, pad_token = tok.padding["pad_id"], tok.padding["pad_token"]
  if pad_id is None:
    for cand in ("[PAD]", "<pad>", "<PAD>"):
      if tok.token_to_id(cand) is not None:
        pad_id, pad_token = tok.token_to_id(cand), cand
        break
  pad_id = 0 if pad_id is None else int(pad_id)
  pad_token = pad_token or tok.id_to_token(pad_id) or "[PAD]"
  tok.enable_truncation(int(max_length))
  tok.enable_padding(length=int(max_length), pad_id=pad_id, pad_token=pad_token)
  x = np.zeros((len(texts), 2, int(max_length)), np.int32)
  if texts:
    enc = tok.encode_batch(texts)
    x[:, 0] = np.asarray([e.ids for e in enc], np.int32)
    x[:, 1] = np.asarray([e.attention_mask for e in enc], np.int32)
  return x


def pack_tokens(ids, mask):
  """``(ids[..., L], mask[..., L]) -> x[..., 2, L]`` int32 (NumPy in, NumPy out; JAX likewise)."""
  if ids.shape != mask.shape:
    raise ValueError(f"`ids` {ids.shape} and `mask` {mask.shape} must have the same shape.")
  xp = np if isinstance(ids, np.ndarray) and isinstance(mask, np.ndarray) else _jnp()
  return xp.stack([ids.astype(np.int32), mask.astype(np.int32)], axis=-2)


def unpack_tokens(x):
  """``x[..., 2, L] -> (ids i32[..., L], mask i32[..., L])``; works under ``jit``."""
  if x.ndim < 2 or x.shape[-2] != 2:
    raise ValueError(f"text input `x` must have shape [..., 2, L] (ids, mask), got {x.shape}.")
  return x[..., 0, :].astype(np.int32), x[..., 1, :].astype(np.int32)


def _jnp():
  import jax.numpy as jnp

  return jnp


def load_fortunes(tokenizer: Any, data_dir: str | os.PathLike | None = None,
                  topics: tuple[str, ...] | list[str] = FORTUNE_TOPICS, *,
                  max_length: int = 64, test_fraction: float = 0.2, seed: int = 0,
                  min_quotes: int = 500) -> ArrayDataset:
  """The fortunes topic task, tokenized, as a centralized :class:`jaxfl.data.ArrayDataset`.

  Partition it like any other source, e.g. ``federate_tokens(ds, 20, dirichlet(0.5))`` or
  ``jaxfl.data.federate(ds, 20, jaxfl.data.iid())`` (Dirichlet over topics: the labels are the
  topics).

  Args:
    tokenizer: as in :func:`tokenize_texts`.
    data_dir, topics, test_fraction, seed, min_quotes: as in :func:`fortunes_text`.
    max_length: sequence length L (at 64, 82% of the default topics' training quotes fit
      whole with MiniLM's WordPiece tokenizer; 92% at 128).

  Returns:
    ``ArrayDataset("fortunes", x_train i32[n, 2, L], y_train i32[n], x_test, y_test,
    len(topics))``; the text input convention is in the module docstring.
  """
  text = fortunes_text(data_dir, topics, test_fraction=test_fraction, seed=seed,
                       min_quotes=min_quotes)
  x_tr = tokenize_texts(text.train_texts, tokenizer, max_length)
  x_te = tokenize_texts(text.test_texts, tokenizer, max_length)
  return ArrayDataset("fortunes", x_tr, text.y_train, x_te, text.y_test, len(text.topics))


def federate_tokens(ds: ArrayDataset, num_clients: int, partition: Partitioner | None = None,
                    seed: int = 0) -> FederatedData:
  """:func:`jaxfl.data.federate` that keeps integer token inputs as int32 (not float32).

  Args:
    ds: a dataset of token inputs (e.g. from :func:`load_fortunes`).
    num_clients: N.
    partition: a partitioner (default ``dirichlet(0.5)`` over the labels, here the topics).
    seed: seed of the partition.
  """
  for name in ("x_train", "x_test"):
    arr = np.asarray(getattr(ds, name))
    if not np.issubdtype(arr.dtype, np.integer):
      raise ValueError(f"`ds.{name}` must hold integer token inputs, got {arr.dtype}; use "
                       "jaxfl.data.federate for other data.")
  fed = federate(ds, num_clients, partition or dirichlet(0.5), seed)
  return fed._replace(x=np.asarray(ds.x_train, np.int32), x_test=np.asarray(ds.x_test, np.int32))
