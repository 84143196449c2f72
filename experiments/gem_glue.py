"""GEM sparse fine-tuning of a Flax transformer on GLUE read through TFDS (array_record).

This is the documented path for users who have a pre-trained Flax transformer and a prepared
GLUE copy (``tfds build glue/sst2`` on a machine with internet, then copy ``data_dir``). Reading
uses ``tfds.data_source(..., download=False)``, which needs no TensorFlow. Nothing is downloaded.

Bring your own model as two things: a params pytree (plain nested dict, e.g. restored with
``flax.serialization.from_bytes`` or orbax) and ``apply_fn(params, token_ids, attention_mask) ->
logits``; plus your tokenizer as ``tokenize(texts) -> (ids i32[N, L], mask bool[N, L])``. The
script ships a tiny BERT-like linen encoder and a byte-hash tokenizer as stand-ins so the path
can be smoke-tested with random weights on mock data:

  python experiments/gem_glue.py --mock 64 --steps 3 --out-dir /tmp/gem_glue   # smoke, no data

Real use (after preparing GLUE in ``$DATA``)::

  python experiments/gem_glue.py --task sst2 --data-dir $DATA --params my_bert.msgpack \
      --method gem --budget 0.001 --steps 2000

``--params`` must match the stand-in encoder's structure unless you replace ``build_model``.
Leaves whose path contains ``--head`` (default ``classifier``) are trained fully and excluded
from the budget; every other kernel (``ndim >= 2``: attention/MLP matrices, embeddings) is
eligible, as in the GEM abstract's "0.1% of parameters" over the weight matrices [INFERRED].
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxfl.transforms import gem

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also when loaded by path
from _common import command_line, write_results  # noqa: E402

# Text fields and number of classes per GLUE task (TFDS feature names).
GLUE = {"cola": (("sentence",), 2), "sst2": (("sentence",), 2),
        "mrpc": (("sentence1", "sentence2"), 2), "qqp": (("question1", "question2"), 2),
        "stsb": (("sentence1", "sentence2"), 1), "mnli": (("premise", "hypothesis"), 3),
        "qnli": (("question", "sentence"), 2), "rte": (("sentence1", "sentence2"), 2),
        "wnli": (("sentence1", "sentence2"), 2)}
EVAL_SPLIT = {"mnli": "validation_matched"}


class Encoder(nn.Module):
  """Tiny BERT-like encoder classifier (stand-in for a user's pre-trained model)."""

  vocab: int = 4096
  dim: int = 64
  heads: int = 4
  layers: int = 2
  max_len: int = 64
  num_classes: int = 2

  @nn.compact
  def __call__(self, ids, mask):
    x = nn.Embed(self.vocab, self.dim, name="tok_embed")(ids)
    pos = self.param("pos_embed", nn.initializers.normal(0.02), (self.max_len, self.dim))
    x = x + pos[None, : ids.shape[1]]
    attn_mask = nn.make_attention_mask(mask, mask)
    for i in range(self.layers):
      h = nn.LayerNorm(name=f"ln_a{i}")(x)
      x = x + nn.MultiHeadDotProductAttention(self.heads, name=f"attn{i}")(h, h, mask=attn_mask)
      h = nn.LayerNorm(name=f"ln_m{i}")(x)
      x = x + nn.Dense(self.dim, name=f"mlp_out{i}")(
          nn.gelu(nn.Dense(4 * self.dim, name=f"mlp_in{i}")(h)))
    x = nn.LayerNorm(name="ln_f")(x)
    return nn.Dense(self.num_classes, name="classifier")(x[:, 0])


def hash_tokenize(texts, max_len=64, vocab=4096):
  """Stand-in tokenizer: [CLS]=1, words hashed into [2, vocab), padded with 0."""
  ids = np.zeros((len(texts), max_len), np.int32)
  for i, t in enumerate(texts):
    toks = [1] + [2 + zlib.crc32(w.encode()) % (vocab - 2) for w in t.lower().split()]
    toks = toks[:max_len]
    ids[i, :len(toks)] = toks
  return ids, ids > 0


def _text(x):
  return x.decode() if isinstance(x, bytes) else str(x)


def load_glue(task, split, data_dir, limit=None):
  """Reads a GLUE split with ``tfds.data_source`` (random access ``src[i]``; no TF, no download).

  Returns (texts, labels): texts are the task's fields joined with " [SEP] ".
  """
  import tensorflow_datasets as tfds
  from tensorflow_datasets.text import glue  # noqa: F401  (registers the builder)

  fields, _ = GLUE[task]
  src = tfds.data_source(f"glue/{task}", split=split, data_dir=data_dir, download=False)
  n = len(src) if limit is None else min(limit, len(src))
  rows = [src[i] for i in range(n)]
  texts = [" [SEP] ".join(_text(r[f]) for f in fields) for r in rows]
  labels = np.array([r["label"] for r in rows])
  return texts, labels


def build_model(args, num_classes):
  module = Encoder(max_len=args.max_len, num_classes=max(num_classes, 2))
  ids = jnp.ones((1, args.max_len), jnp.int32)
  params = module.init(jax.random.key(args.seed), ids, ids > 0)["params"]
  if args.params:
    from flax import serialization
    with open(args.params, "rb") as f:
      params = serialization.from_bytes(params, f.read())
  return params, lambda p, i, m: module.apply({"params": p}, i, m)


def run(args, command):
  t0 = time.time()
  fields, num_classes = GLUE[args.task]
  if num_classes == 1:
    raise ValueError("stsb (regression) is not supported by this script.")
  tr_texts, tr_y = load_glue(args.task, "train", args.data_dir, args.train_limit)
  ev_texts, ev_y = load_glue(args.task, EVAL_SPLIT.get(args.task, "validation"), args.data_dir,
                             args.eval_limit)
  tr_y, ev_y = tr_y % num_classes, ev_y % num_classes  # mock data draws labels at random
  tr_ids, tr_m = hash_tokenize(tr_texts, args.max_len)
  ev_ids, ev_m = hash_tokenize(ev_texts, args.max_len)
  params, apply_fn = build_model(args, num_classes)

  def loss_fn(p, batch):
    ids, m, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, ids, m), y).mean()

  rng = np.random.default_rng(args.seed)
  def sample(n):
    idx = rng.integers(0, len(tr_y), size=n)
    return jnp.asarray(tr_ids[idx]), jnp.asarray(tr_m[idx]), jnp.asarray(tr_y[idx])

  is_head = lambda name, x: args.head in name
  if args.method == "full":
    tx, mask = optax.adamw(args.lr), None
  else:
    calib = jax.tree.map(lambda *xs: jnp.stack(xs),
                         *[sample(args.batch) for _ in range(args.calib_batches)])
    grads = gem.calibration_gradients(loss_fn, params, calib)
    mask = gem.build_mask(args.method, params, args.budget, grads=grads,
                          key=jax.random.key(args.seed),
                          eligible=lambda n, x: np.ndim(x) >= 2 and not is_head(n, x),
                          always=is_head)
    tx = optax.chain(optax.adamw(args.lr), gem.gem_mask(mask))

  @jax.jit
  def step(p, s, batch):
    loss, g = jax.value_and_grad(loss_fn)(p, batch)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  p, s = params, tx.init(params)
  for _ in range(args.steps):
    p, s, loss = step(p, s, sample(args.batch))
  pred = jax.jit(lambda p, i, m: jnp.argmax(apply_fn(p, i, m), -1))
  preds = np.concatenate([np.asarray(pred(p, ev_ids[i:i + 256], ev_m[i:i + 256]))
                          for i in range(0, len(ev_y), 256)])
  out = {"task": f"glue/{args.task}", "method": args.method,
         "budget": 1.0 if mask is None else args.budget,
         "tuned_incl_head": None if mask is None else gem.mask_count(mask),
         "params": int(sum(np.size(x) for x in jax.tree.leaves(params))),
         "eval_acc": float(np.mean(preds == ev_y)), "final_loss": float(loss),
         "steps": args.steps, "mock": args.mock, "seconds": time.time() - t0,
         "command": command}
  write_results(args.out_dir, "gem_glue", command=command, data=out)
  print(json.dumps(out))
  return out


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--task", default="sst2", choices=sorted(GLUE))
  p.add_argument("--data-dir", default=None, help="TFDS data_dir holding prepared GLUE")
  p.add_argument("--params", default=None, help="flax.serialization msgpack of pre-trained params")
  p.add_argument("--head", default="classifier", help="substring of always-trained leaf paths")
  p.add_argument("--method", default="gem", choices=("full",) + gem.METHODS)
  p.add_argument("--budget", type=float, default=0.001)
  p.add_argument("--steps", type=int, default=1000)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--calib-batches", type=int, default=4)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--max-len", type=int, default=64)
  p.add_argument("--train-limit", type=int, default=None)
  p.add_argument("--eval-limit", type=int, default=None)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--mock", type=int, default=0,
                 help="K > 0: run on tfds.testing.mock_data(num_examples=K), random weights")
  p.add_argument("--out-dir", default="/tmp/gem_glue")
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  command = command_line(__file__, argv)
  if not args.mock:
    return run(args, command)
  import tensorflow_datasets as tfds
  # USE_CODE: generate examples from the builder's features (no metadata on disk); splits must
  # then be named explicitly, which load_glue does.
  with tfds.testing.mock_data(num_examples=args.mock, policy=tfds.testing.MockPolicy.USE_CODE):
    args.data_dir = args.data_dir or "/nonexistent-mock-data-dir"
    return run(args, command)


if __name__ == "__main__":
  main()
