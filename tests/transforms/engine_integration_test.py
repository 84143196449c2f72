"""Transforms inside the federated round: mL-BFGS as client and server optimizer, GEM masks
as an uplink transform with sparse accounting."""

import jax
import numpy as np
import optax
import pytest
from conftest import tiny_data, tiny_model

import jaxfl
from jaxfl.client import LocalTraining


def test_mlbfgs_as_client_and_server_optimizer():
  data, model = tiny_data(num_clients=5, seed=4), tiny_model()
  client = LocalTraining(jaxfl.transforms.mlbfgs(0.05, update_every=2, history=3), batch_size=4,
                         local_steps=6)
  algo = jaxfl.Algorithm("mlbfgs_client", client, optax.sgd(1.0))
  res = jaxfl.simulate(algo, model, data, rounds=2, clients_per_round=3, progress=False)
  assert jaxfl.tree.all_finite(res.state.params) and res.history[-1]["update_norm"] > 0
  server = jaxfl.algorithms.fedopt(jaxfl.transforms.mlbfgs(0.5, update_every=1, history=2),
                                   client_lr=0.1, local_steps=2, batch_size=4)
  res2 = jaxfl.simulate(server, model, data, rounds=4, clients_per_round=3, progress=False)
  assert jaxfl.tree.all_finite(res2.state.params)


def test_masked_uplink_sends_only_mask_and_ledger_counts_nonzeros():
  data, model = tiny_data(num_clients=5, seed=1), tiny_model()
  params, _ = model.init(jax.random.key(0))
  mask = jax.tree.map(lambda p: np.arange(p.size).reshape(p.shape) % 4 == 0, params)
  algo = jaxfl.algorithms.fedavg(client_lr=0.1, local_steps=2, batch_size=4,
                                 uplink=jaxfl.transforms.masked_uplink(mask))
  algo = algo._replace(ledger=jaxfl.comm.sparse_ledger())
  res = jaxfl.simulate(algo, model, data, rounds=1, clients_per_round=3, progress=False,
                       init_params=params)
  moved = jax.tree.map(lambda a, b: np.asarray(a) != np.asarray(b), res.state.params, params)
  jax.tree.map(lambda m, k: np.testing.assert_array_equal(m & ~k, False), moved, mask)
  n_mask = sum(int(np.sum(m)) for m in jax.tree.leaves(mask))
  assert 0 < res.history[0]["uplink_elements"] <= 3 * n_mask
  assert res.history[0]["rel_uplink"] <= n_mask / jaxfl.tree.num_params(params) + 1e-6


def test_shared_mask_ledger_counts_the_masks_ones_without_indices():
  """A mask both sides know: each client's sent leaves cost exactly the mask's ones, half the
  bytes of the index + value ledger for the same run."""
  data, model = tiny_data(num_clients=5, seed=1), tiny_model()
  params, _ = model.init(jax.random.key(0))
  rng = np.random.default_rng(3)
  mask = jax.tree.map(lambda p: rng.random(p.shape) < 0.3, params)
  n_mask = sum(int(np.sum(m)) for m in jax.tree.leaves(mask))
  algo = jaxfl.algorithms.fedavg(client_lr=0.1, local_steps=2, batch_size=4,
                                 uplink=jaxfl.transforms.masked_uplink(mask))
  runs = {}
  for name, ledger in (("shared", jaxfl.comm.shared_mask_ledger(mask)),
                       ("sparse", jaxfl.comm.sparse_ledger())):
    runs[name] = jaxfl.simulate(algo._replace(ledger=ledger), model, data, rounds=2,
                                clients_per_round=3, progress=False, init_params=params)
  for h in runs["shared"].history:
    assert h["uplink_elements"] == 3 * n_mask
    assert h["uplink_bytes"] == 4 * 3 * n_mask  # float32 values only
  # the index + value ledger pays two words per non-zero entry: at most twice (a masked entry
  # whose gradient stayed zero, e.g. behind a dead ReLU, is not sent there), and more than once
  # as long as over half of the masked entries move
  for a, b in zip(runs["shared"].history, runs["sparse"].history):
    assert a["uplink_bytes"] < b["uplink_bytes"] <= 2 * a["uplink_bytes"]
  with pytest.raises(ValueError, match="`mask`"):
    jaxfl.comm.shared_mask_ledger(None)
