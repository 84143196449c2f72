"""Client samplers: multi-metric activation and Power-of-choice against NumPy references."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_data, xla_env

import jaxfl
from jaxfl import sampling


def _np_sets(loss, norm, m, b):
  """S_L (top m+b loss) and S_N (m lowest norm inside S_L), NumPy, no ties."""
  s_l = np.argsort(loss)[len(loss) - m - b:]
  s_n = s_l[np.argsort(norm[s_l])[:m]]
  return set(s_l.tolist()), set(s_n.tolist())


def _state_with(s, loss, norm, m):
  st = s.init(len(loss), m)
  return st._replace(loss=jnp.asarray(loss, jnp.float32), grad_norm=jnp.asarray(norm, jnp.float32))


def _draws(s, st, n, m, count, seed=0):
  sel = jax.jit(jax.vmap(lambda k: s.select(k, st, 0, num_clients=n, cohort_size=m)))
  return np.asarray(sel(jax.random.split(jax.random.key(seed), count)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multi_metric_with_a_huge_ratio_activates_exactly_the_numpy_s_n(seed):
  rng = np.random.default_rng(seed)
  n, m, b = 40, 6, 4
  loss, norm = rng.permutation(n) + rng.random(n), rng.random(n)
  s = sampling.multi_metric(b, 1e9)
  st = _state_with(s, loss, norm, m)
  _, s_n = _np_sets(loss, norm, m, b)
  for row in _draws(s, st, n, m, 20, seed):
    assert set(row.tolist()) == s_n


def test_multi_metric_inclusion_frequencies_match_numpy_successive_sampling():
  rng = np.random.default_rng(7)
  n, m, b, r = 12, 3, 2, 4.0
  loss, norm = rng.permutation(n).astype(float), rng.random(n)
  s_l, s_n = _np_sets(loss, norm, m, b)
  w = np.array([(r if i in s_l else 1.0) * (r if i in s_n else 1.0) for i in range(n)])
  ref = np.zeros(n)
  for _ in range(20000):
    ref[rng.choice(n, m, replace=False, p=w / w.sum())] += 1
  s = sampling.multi_metric(b, r)
  got = np.bincount(_draws(s, _state_with(s, loss, norm, m), n, m, 20000).ravel(), minlength=n)
  np.testing.assert_allclose(got / 20000, ref / 20000, atol=0.02)


def test_multi_metric_paper_setting_has_about_013_activations_outside_s_n():
  """N=128, m=32, b=8, r=256: expected sum_j 2136/(65536 j + 2136) ~ 0.13 outside S_N and
  ~0.005 outside S_L per round (NEXT_METHODS.md A.2): a frequency test."""
  rng = np.random.default_rng(3)
  n, m, b = 128, 32, 8
  loss, norm = rng.random(n), rng.random(n)
  s_l, s_n = _np_sets(loss, norm, m, b)
  s = sampling.multi_metric(b, 256.0)
  draws = _draws(s, _state_with(s, loss, norm, m), n, m, 4000)
  outside_n = np.mean([len(set(r.tolist()) - s_n) for r in draws])
  outside_l = np.mean([len(set(r.tolist()) - s_l) for r in draws])
  expected = sum(2136 / (65536 * j + 2136) for j in range(1, 33))
  assert abs(expected - 0.13) < 0.01
  assert abs(outside_n - expected) < 0.03, outside_n
  assert outside_l < 0.02, outside_l


def test_index_tie_break_reproduces_the_reference_start_order():
  """All losses +inf and norms 0: the reference's argsort puts ids 88..127 in S_L and
  88..119 in S_N (NEXT_METHODS.md A.2); with a huge ratio that is the first cohort."""
  s = sampling.multi_metric(8, 1e9, tie_break="index")
  st = s.init(128, 32)
  ids = np.asarray(s.select(jax.random.key(0), st, 0, num_clients=128, cohort_size=32))
  assert sorted(ids.tolist()) == list(range(88, 120))
  # the default random tie-break spreads the first cohorts over the population
  r = sampling.multi_metric(8, 1e9)
  st = r.init(128, 32)
  first = set(np.asarray(r.select(jax.random.key(0), st, 0, num_clients=128,
                                  cohort_size=32)).tolist())
  assert first != set(range(88, 120))


def test_update_overwrites_only_activated_participants():
  s = sampling.multi_metric(2, 256.0)
  st = s.init(10, 3)
  ids = jnp.array([4, 7, 1], jnp.int32)
  metrics = sampling.ClientMetrics(jnp.array([0.5, 0.6, 0.7]), jnp.array([1.0, 2.0, 3.0]),
                                   jnp.ones(3), jnp.ones(3), jnp.array([1.0, 0.0, 1.0]))
  new = jax.jit(s.update)(st, ids, metrics)
  loss = np.asarray(new.loss)
  assert loss[4] == np.float32(0.5) and loss[1] == np.float32(0.7)
  assert np.isinf(loss[7]) and np.sum(np.isfinite(loss)) == 2  # 7 was quarantined
  np.testing.assert_array_equal(np.asarray(new.participation),
                                [0, 1, 0, 0, 1, 0, 0, 0, 0, 0])
  assert float(s.metrics(new)["unseen_clients"]) == 8


def test_ablations_loss_only_and_norm_only():
  rng = np.random.default_rng(1)
  n, m, b = 30, 5, 3
  loss, norm = rng.permutation(n).astype(float), rng.random(n)
  s_l, _ = _np_sets(loss, norm, m, b)
  lo = sampling.multi_metric(b, 1e9, mode="loss")
  for row in _draws(lo, _state_with(lo, loss, norm, m), n, m, 50):
    assert set(row.tolist()) <= s_l
  no = sampling.multi_metric(b, mode="norm")
  for row in _draws(no, _state_with(no, loss, norm, m), n, m, 5):
    assert set(row.tolist()) == set(np.argsort(norm)[:m].tolist())
  with pytest.raises(ValueError, match="mode"):
    sampling.multi_metric(mode="grad")
  with pytest.raises(ValueError, match="extra"):
    sampling.multi_metric(8).init(20, 16)


def test_power_of_choice_keeps_the_highest_loss_candidates():
  s = sampling.power_of_choice(6)
  st = s.init(20, 3)
  sizes = jnp.arange(1.0, 21.0)
  loss = lambda ids, key: ids.astype(jnp.float32)  # loss = id: the top ids win
  for k in range(10):
    key = jax.random.key(k)
    ids = np.asarray(s.select(key, st, 0, num_clients=20, cohort_size=3, client_sizes=sizes,
                              client_loss=loss))
    k_cand, _ = jax.random.split(key)
    cand = np.asarray(jax.random.choice(k_cand, 20, (6,), replace=False, p=sizes / sizes.sum()))
    assert sorted(ids.tolist()) == sorted(cand)[-3:]
  with pytest.raises(ValueError, match="candidates"):
    s.init(20, 7)


def _simulate(sampler, **kw):
  data = tiny_data(num_clients=12, seed=3)
  model = jaxfl.models.mlp((5,), 3, hidden=(6,))
  algo = jaxfl.algorithms.fedavg(client_lr=0.1, local_steps=2, batch_size=3,
                                 weighting="uniform")._replace(sampler=sampler)
  return jaxfl.simulate(algo, model, data, rounds=6, clients_per_round=3, progress=False,
                        eval_every=6, **kw)


@pytest.mark.parametrize("name", ["multi_metric", "power_of_choice"])
def test_samplers_in_the_round_resume_exactly_and_compile_once(name, tmp_path):
  make = {"multi_metric": lambda: sampling.multi_metric(2, 256.0),
          "power_of_choice": lambda: sampling.power_of_choice(5)}[name]
  full = _simulate(make())
  part = jaxfl.simulate  # first 3 rounds, checkpoint, then resume to 6
  data = tiny_data(num_clients=12, seed=3)
  model = jaxfl.models.mlp((5,), 3, hidden=(6,))
  algo = jaxfl.algorithms.fedavg(client_lr=0.1, local_steps=2, batch_size=3,
                                 weighting="uniform")._replace(sampler=make())
  kw = dict(clients_per_round=3, progress=False, eval_every=6, checkpoint_dir=str(tmp_path))
  part(algo, model, data, rounds=3, **kw)
  resumed = part(algo, model, data, rounds=6, **kw)
  jax.tree.map(np.testing.assert_array_equal, full.state.sampler_state,
               resumed.state.sampler_state)
  jax.tree.map(np.testing.assert_array_equal, full.state.params, resumed.state.params)
  assert [h["sampler/unseen_clients"] for h in full.history] == [
      h["sampler/unseen_clients"] for h in resumed.history]
  unseen = [h["sampler/unseen_clients"] for h in full.history]
  assert unseen == sorted(unseen, reverse=True) and unseen[0] == 9


SHARDED = textwrap.dedent("""
    import jax, numpy as np, sys
    sys.path.insert(0, sys.argv[1])
    from conftest import tiny_data
    import jaxfl
    data = tiny_data(num_clients=12, seed=3)
    model = jaxfl.models.mlp((5,), 3, hidden=(6,))
    for sampler in (jaxfl.sampling.multi_metric(2, 256.0), jaxfl.sampling.power_of_choice(5)):
      algo = jaxfl.algorithms.fedavg(client_lr=0.1, local_steps=2, batch_size=3,
                                     weighting="uniform")._replace(sampler=sampler)
      res = [jaxfl.simulate(algo, model, data, rounds=5, clients_per_round=3, progress=False,
                            eval_every=5, devices=jax.devices()[:n], clients_per_chunk=c)
             for n, c in ((1, None), (2, "auto"), (2, 1))]
      for r in res[1:]:
        np.testing.assert_array_equal(res[0].state.cohort, r.state.cohort)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     res[0].state.params, r.state.params)
    print("SAMPLERS_SHARDED_OK")
""")


def test_samplers_on_two_devices_and_chunked_equal_one_device():
  env = xla_env(2)
  proc = subprocess.run([sys.executable, "-c", SHARDED, os.path.dirname(__file__)], env=env,
                        capture_output=True, text=True, timeout=900)
  assert "SAMPLERS_SHARDED_OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
