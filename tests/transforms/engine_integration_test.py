"""Transforms inside the federated round: mL-BFGS as client and server optimizer, GEM masks
as an uplink transform with sparse accounting."""

import jax
import numpy as np
import optax
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
