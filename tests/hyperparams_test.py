"""Traced hyperparameters (jaxfl/hyperparams.py): new values, no recompilation, same results."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxfl
from jaxfl.hyperparams import injected_names, set_hyperparams, validate_hyperparams

RTOL = 1e-5  # a traced learning rate may fuse differently from a constant one (f32 order)


def _compile_counter():
  events = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, _, **kw: events.append(event) if "backend_compile" in event else None)
  return events


def _sim(data, model, algo, **kw):
  kw.setdefault("rounds", 3)
  kw.setdefault("clients_per_round", 3)
  return jaxfl.simulate(algo, model, data, progress=False, **kw)


def _close(a, b):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=RTOL, atol=1e-6), a, b)


def test_set_hyperparams_writes_every_injected_state_under_jit():
  tx = optax.chain(optax.inject_hyperparams(optax.add_decayed_weights)(weight_decay=0.1),
                   optax.clip_by_global_norm(1.0),
                   optax.inject_hyperparams(optax.sgd)(learning_rate=0.5, momentum=0.9))
  params = {"w": jnp.arange(3.0), "b": jnp.ones(())}
  state = tx.init(params)
  assert injected_names(state) == {"weight_decay", "learning_rate", "momentum"}

  @jax.jit
  def step(lr, wd):
    s = set_hyperparams(state, {"learning_rate": lr, "weight_decay": wd, "absent": 1.0})
    return tx.update(params, s, params)[0], s

  upd, s = step(jnp.float32(0.25), jnp.float32(0.0))
  assert float(s[2].hyperparams["learning_rate"]) == 0.25
  assert float(s[2].hyperparams["momentum"]) == pytest.approx(0.9)  # untouched
  assert float(s[0].hyperparams["weight_decay"]) == 0.0
  # against the same chain built with those values as constants
  ref = optax.chain(optax.add_decayed_weights(0.0), optax.clip_by_global_norm(1.0),
                    optax.sgd(0.25, momentum=0.9))
  want = ref.update(params, ref.init(params), params)[0]
  _close(upd, want)
  assert set_hyperparams(state, None) is state and set_hyperparams(state, {}) is state


def test_new_client_learning_rate_compiles_nothing_and_equals_a_fresh_build(data, model):
  algo = jaxfl.algorithms.fedavg(client_lr=0.1, local_steps=2, batch_size=4)
  events = _compile_counter()
  _sim(data, model, algo, seed=2, hyperparams={"client": {"learning_rate": 0.1}})
  assert events
  del events[:]
  runs = {lr: _sim(data, model, algo, seed=2, hyperparams={"client": {"learning_rate": lr}})
          for lr in (0.03, 0.3)}
  assert not events, events  # two new values, the same compiled round
  for lr, res in runs.items():  # equals the algorithm built with that rate as a constant
    fresh = _sim(data, model, jaxfl.algorithms.fedavg(client_lr=lr, local_steps=2, batch_size=4),
                 seed=2)
    _close(res.state.params, fresh.state.params)
    assert res.history[-1]["train_loss"] == pytest.approx(fresh.history[-1]["train_loss"],
                                                          rel=RTOL)
  a, b = (runs[lr].state.params for lr in (0.03, 0.3))
  assert not np.allclose(jax.tree.leaves(a)[0], jax.tree.leaves(b)[0])  # the value matters


def test_server_and_client_values_reach_both_optimizers(data, model):
  server = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2, b1=0.9)
  algo = jaxfl.algorithms.fedopt(server, client_lr=0.1, local_steps=2, batch_size=4)
  hp = {"server": {"learning_rate": 3e-2}, "client": {"learning_rate": 0.05}}
  res = _sim(data, model, algo, seed=1, hyperparams=hp)
  ref = jaxfl.algorithms.fedopt(optax.adam(3e-2, b1=0.9), client_lr=0.05, local_steps=2,
                                batch_size=4)
  _close(res.state.params, _sim(data, model, ref, seed=1).state.params)
  # the server state keeps the value it was given (a checkpoint resumes with it)
  assert float(res.state.opt_state.hyperparams["learning_rate"]) == pytest.approx(3e-2)


def test_hyperparams_in_a_view_context_and_a_custom_client_update(data, model):
  """The values travel in the client context, so a method's own client update (PriSM's
  contract) and a view's context keep working: FedProx's proximal optimizer is injected too."""
  algo = jaxfl.algorithms.fedprox(mu=0.1, client_lr=0.1, local_steps=2, batch_size=4)
  res = _sim(data, model, algo, seed=0, hyperparams={"client": {"learning_rate": 0.2}})
  fresh = _sim(data, model, jaxfl.algorithms.fedprox(mu=0.1, client_lr=0.2, local_steps=2,
                                                     batch_size=4), seed=0)
  _close(res.state.params, fresh.state.params)


@pytest.mark.parametrize("hp, match", [
    ({"clients": {"learning_rate": 0.1}}, "keys among"),
    ({"client": {"lr": 0.1}}, r"hyperparams\['client'\]\['lr'\].*holds \['learning_rate'"),
    ({"server": {"learning_rate": 0.1}}, "no optax.inject_hyperparams state"),
    ({"client": {"learning_rate": float("nan")}}, "finite number"),
    ({"client": {"learning_rate": "0.1"}}, "finite number"),
    ({"client": [0.1]}, "dict of name"),
])
def test_bad_hyperparams_raise_before_anything_compiles(hp, match, data, model, monkeypatch):
  algo = jaxfl.algorithms.fedavg(client_lr=0.1, local_steps=2, batch_size=4)
  compiled = []
  monkeypatch.setattr(jax, "jit", lambda *a, **k: compiled.append(1) or (lambda *x, **y: None))
  with pytest.raises((ValueError, TypeError), match=match):
    _sim(data, model, algo, hyperparams=hp)
  assert not compiled


def test_validate_returns_f32_values_for_both_sides(model):
  algo = jaxfl.algorithms.fedavg(client_lr=0.1, local_steps=2, batch_size=4)
  params = jax.eval_shape(model.init, jax.random.key(0))[0]
  out = validate_hyperparams({"client": {"learning_rate": 1}}, algo, params)
  assert out == {"client": {"learning_rate": np.float32(1.0)}, "server": {}}
  assert out["client"]["learning_rate"].dtype == np.float32
  assert validate_hyperparams(None, algo, params) is None


def test_checkpoint_resume_is_exact_and_refuses_other_values(data, model, tmp_path):
  algo = jaxfl.algorithms.fedavg(client_lr=0.1, local_steps=2, batch_size=4)
  hp = {"client": {"learning_rate": 0.07}}
  full = _sim(data, model, algo, rounds=4, seed=3, hyperparams=hp)
  _sim(data, model, algo, rounds=2, seed=3, hyperparams=hp, checkpoint_dir=str(tmp_path))
  resumed = _sim(data, model, algo, rounds=4, seed=3, hyperparams=hp,
                 checkpoint_dir=str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, resumed.state.params, full.state.params)
  with pytest.raises(ValueError, match="traced_hyperparameters.client.learning_rate"):
    _sim(data, model, algo, rounds=5, seed=3, hyperparams={"client": {"learning_rate": 0.2}},
         checkpoint_dir=str(tmp_path))
