"""The driver: determinism, checkpoint/resume, input validation, NaN policy, accuracy."""

import numpy as np
import pytest
from conftest import tiny_data

import jaxfl


def _algo(**kw):
  return jaxfl.algorithms.fedavg(client_lr=0.1, local_steps=2, batch_size=4, **kw)


def _sim(data, model, **kw):
  kw.setdefault("rounds", 4)
  kw.setdefault("clients_per_round", 3)
  return jaxfl.simulate(kw.pop("algo", _algo()), model, data, progress=False, **kw)


def test_same_seed_bit_identical_different_seed_differs(data, model):
  a = _sim(data, model, seed=3)
  b = _sim(data, model, seed=3)
  c = _sim(data, model, seed=4)
  assert a.history == b.history
  import jax
  jax.tree.map(lambda u, v: np.testing.assert_array_equal(u, v), a.state.params, b.state.params)
  assert a.history != c.history


def test_rerunning_the_same_algorithm_and_model_compiles_nothing(data, model):
  """A notebook re-running a cell (same algorithm and model objects, new seed or rounds)
  reuses the compiled round; the result equals a run built from scratch, bit for bit."""
  import jax

  algo = _algo()
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, _, **kw: compiles.append(1) if "backend_compile" in event else None)
  _sim(data, model, algo=algo, seed=3)
  assert compiles  # the first run compiled its round
  del compiles[:]
  again = _sim(data, model, algo=algo, seed=5, rounds=6)
  assert not compiles, len(compiles)
  fresh = _sim(data, model, seed=5, rounds=6)  # a new algorithm object: built anew
  assert again.history == fresh.history
  jax.tree.map(np.testing.assert_array_equal, again.state.params, fresh.state.params)


def test_different_seed_gives_different_cohorts(data, model):
  import jax

  from jaxfl.data import device_data
  from jaxfl.round import build_round
  rnd = build_round(_algo(), model, num_clients=data.num_clients,
                    max_client_size=data.max_client_size, clients_per_round=3, donate=False)
  st = rnd.init(jax.random.key(0))
  cohorts = {tuple(sorted(np.asarray(rnd.step(st, device_data(data), jax.random.key(s))[0].cohort)))
             for s in range(8)}
  assert len(cohorts) > 1


def test_checkpoint_resume_equals_uninterrupted(tmp_path, data, model):
  algo = jaxfl.algorithms.fedadam(client_lr=0.1, local_steps=2, batch_size=4)
  full = _sim(data, model, algo=algo, rounds=6, seed=1, eval_every=2)
  _sim(data, model, algo=algo, rounds=4, seed=1, eval_every=2, checkpoint_dir=str(tmp_path))
  resumed = _sim(data, model, algo=algo, rounds=6, seed=1, eval_every=2,
                 checkpoint_dir=str(tmp_path))
  assert resumed.history == full.history
  import jax
  jax.tree.map(lambda u, v: np.testing.assert_array_equal(np.asarray(u), np.asarray(v)),
               full.state.opt_state, resumed.state.opt_state)


def test_outputs_written(tmp_path, data, model):
  res = _sim(data, model, output_dir=str(tmp_path), eval_every=2)
  import json
  hist = json.load(open(tmp_path / "history.json"))
  assert hist == res.history
  assert (tmp_path / "history.csv").read_text().splitlines()[0].startswith("round,")
  summary = json.load(open(tmp_path / "summary.json"))
  assert summary["rel_uplink_cost"] == 1.0 and summary["rounds"] == 4
  assert 0.0 <= summary["final_acc"] <= 1.0


def test_result_displays_as_a_table_and_plots_in_one_call(data, model):
  matplotlib = pytest.importorskip("matplotlib")
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  a = _sim(data, model, eval_every=2)
  b = _sim(data, model, eval_every=1, algo=_algo(server_lr=0.5))
  table = a._repr_html_()
  assert table.startswith("<table>") and "fedavg" in table
  assert f"{a.summary['final_acc']:.4f}" in table
  ax = a.plot()
  assert b.plot(ax=ax, label="b") is ax  # several runs on one figure
  (xa, ya), (xb, _) = [line.get_data() for line in ax.get_lines()]
  assert list(xa) == [2, 4] and list(xb) == [1, 2, 3, 4]
  assert list(ya) == [h["test_accuracy"] for h in a.history if "test_accuracy" in h]
  ax2 = a.plot(x="uplink_bytes")
  xs = ax2.get_lines()[0].get_xdata()
  np.testing.assert_allclose(xs[-1], a.summary["uplink_bytes"] / 1e6)
  with pytest.raises(ValueError, match="`x`"):
    a.plot(x="time")
  plt.close("all")
  pretty = pytest.importorskip("IPython.lib.pretty")
  text = pretty.pretty(a)  # IPython's text form: short, not the whole state
  assert text.startswith("SimulationResult(method='fedavg'") and len(text) < 300

def test_nan_policy_raise(model):
  data = tiny_data(num_clients=3, sizes=[3, 3, 3])
  x = data.x.copy()
  x[:] = np.nan
  with pytest.raises(ValueError, match=r"`data.x`\[0\] has non-finite"):
    _sim(data._replace(x=x), model, clients_per_round=2)  # refused unless injected on purpose
  with pytest.raises(jaxfl.NonFiniteUpdateError, match="non-finite"):
    _sim(data._replace(x=x), model, clients_per_round=2, nan_policy="raise", check_data=False)
  res = _sim(data._replace(x=x), model, clients_per_round=2, nan_policy="drop", rounds=2,
             check_data=False)
  assert res.summary["nonfinite_clients"] == 4
  assert jaxfl.tree.all_finite(res.state.params)


def test_next_round_is_dispatched_before_a_rounds_metrics_are_read(data, model, monkeypatch,
                                                                   tmp_path):
  """The driver keeps the devices busy: round r + 1 is in flight when round r's metrics reach
  the host, except where it must read first (a checkpoint round, the last round); the history
  equals reading every round at once, which the determinism and golden tests pin."""
  import jax

  from jaxfl import simulation

  dispatched, read_after = [], []
  real_build, real_get = simulation.build_round, jax.device_get

  def counting_build(*a, **kw):
    rnd = real_build(*a, **kw)

    def step(*args):
      dispatched.append(1)
      return rnd.step(*args)

    return rnd._replace(step=step)

  def get(x):
    if isinstance(x, dict) and "train_loss" in x:  # a round's metrics
      read_after.append(len(dispatched))
    return real_get(x)

  monkeypatch.setattr(simulation, "build_round", counting_build)
  monkeypatch.setattr(jax, "device_get", get)
  res = _sim(data, model, rounds=5, seed=3, checkpoint_dir=str(tmp_path), checkpoint_every=3)
  # round r (1-based) read after r + 1 dispatches, but round 3 (checkpoint) and 5 (last)
  assert read_after == [2, 3, 3, 5, 5]
  assert [h["round"] for h in res.history] == [1, 2, 3, 4, 5]


BAD = [
    (lambda d, m: jaxfl.algorithms.get_algorithm("fedsgdx"), ValueError, "algorithm"),
    (lambda d, m: jaxfl.data.load("cifar1000", 10), ValueError, "dataset"),
    (lambda d, m: jaxfl.models.get_model("vgg", (8, 8, 1), 10), ValueError, "model"),
    (lambda d, m: _sim(d, m, clients_per_round=d.num_clients + 1), ValueError,
     "clients_per_round"),
    (lambda d, m: jaxfl.data.dirichlet(0.0), ValueError, "alpha"),
    (lambda d, m: jaxfl.data.dirichlet(-1.0), ValueError, "alpha"),
    (lambda d, m: jaxfl.data.from_client_indices(
        jaxfl.data.ArrayDataset("t", d.x, d.y, d.x_test, d.y_test, 3),
        [np.arange(3), np.array([], int)]), ValueError, "no examples"),
    (lambda d, m: _sim(d, jaxfl.models.mlp((9,), 3)), ValueError, "shape"),
    (lambda d, m: _sim(d, m, rounds=-1), ValueError, "rounds"),
    (lambda d, m: jaxfl.data.load_fashion_mnist("/nonexistent_dir"), FileNotFoundError,
     "data_dir"),
    (lambda d, m: jaxfl.data.load("digits", 0), ValueError, "num_clients"),
    (lambda d, m: jaxfl.algorithms.fedavg(batch_size=0), None, None),  # checked when used
    (lambda d, m: _sim(d, m, algo=jaxfl.algorithms.fedavg(batch_size=0)), ValueError,
     "batch_size"),
    (lambda d, m: _sim(d, m, algo=jaxfl.algorithms.fedavg(local_steps=0)), ValueError,
     "local_steps"),
    (lambda d, m: _sim(d, m, nan_policy="ignore"), ValueError, "nan_policy"),
    (lambda d, m: _sim(d, m, algo=jaxfl.algorithms.fedavg(weighting="size")), ValueError,
     "weighting"),
    (lambda d, m: _sim(d, m, eval_every=-2), ValueError, "eval_every"),
    (lambda d, m: jaxfl.data.federate(
        jaxfl.data.ArrayDataset("t", d.x, d.y[:-1], d.x_test, d.y_test, 3), 2,
        jaxfl.data.iid()), ValueError, "y_train"),
    (lambda d, m: jaxfl.data.load("digits", 5000), ValueError, "num_clients"),
    (lambda d, m: jaxfl.data.load_tfds("cifar10", data_dir="/nonexistent_tfds"),
     FileNotFoundError, "data_dir"),
    (lambda d, m: _sim(d, m, algo="fedavg"), TypeError, "algorithm"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_input_raises_clear_error_before_compile(case, data, model, monkeypatch):
  fn, exc, match = BAD[case]
  if exc is None:
    fn(data, model)  # construction is lazy; the next case checks the use
    return
  import jax
  compiled = []
  monkeypatch.setattr(jax, "jit", lambda *a, **k: compiled.append(1) or (lambda *x, **y: None))
  with pytest.raises(exc, match=match):
    fn(data, model)
  assert not compiled, "error raised only after building the jitted round"


@pytest.mark.slow
def test_fedavg_digits_reaches_90_percent_in_100_rounds():
  data = jaxfl.data.load("digits", 100, jaxfl.data.dirichlet(0.5), seed=0)
  model = jaxfl.models.small_cnn(data.example_shape, 10)
  res = jaxfl.simulate(jaxfl.algorithms.fedavg(client_lr=0.05, local_steps=5, batch_size=32),
                       model, data, rounds=100, clients_per_round=10, seed=0, eval_every=10,
                       progress=False)
  assert res.summary["final_acc"] >= 0.90, res.summary
