"""Benchmark: peak host memory of one round vs cohort size, with and without chunked cohorts.

Issue 6, item 2 ("Chunked cohorts"): cohort 5,000 should run in < 8 GB with chunking; without
chunking, say where it fails. For every (cohort, mode, chunk) one round runs in a fresh
subprocess; the parent polls the child's RSS (a watchdog; ``RLIMIT_AS`` is useless with XLA,
which reserves far more address space than it touches) and kills it past ``--limit-gb`` or
``--timeout``. Modes:

  stream   clients_per_chunk=C, stream_aggregate=True  (sums weighted updates chunk by chunk)
  chunked  clients_per_chunk=C, stream_aggregate=False (lax.scan over chunks, updates stacked)
  full     clients_per_chunk=None                      (the whole cohort vmapped at once)

Recorded per cell: peak RSS of the child (``ru_maxrss`` from ``wait4``, also for a killed
child) and the same minus a baseline child that only imports JAX/jaxfl and puts the data on
device; the peak during compilation and during the round (``VmHWM``, reset in between via
``/proc/self/clear_refs``); XLA's ``compiled.memory_analysis()`` (argument/output/temp/alias
bytes); compile and round wall time.

Workload: ``bench_round.py``'s ``digits`` (small_cnn with patch convolutions, FedAvg, batch 32,
5 local steps). The digits training set has 1,438 examples, too few for a 5,000-client
partition, so the population is resampled: ``num_clients = cohort`` clients, each holding
``--examples-per-client`` (default 14, the mean of digits over 100 clients) distinct digits
examples drawn independently per client (clients overlap). Memory of the round depends on the
shapes only (model, batch, steps, cohort), not on which examples a client holds.

  python experiments/bench_memory.py --json experiments/results/bench_memory.json \\
      --md experiments/results/bench_memory.md
  python experiments/bench_memory.py --cohorts 1000 --modes stream --chunk 1 4 16 64 256
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import command_line, md_table, timed, write_json, write_text  # noqa: E402
from bench_round import WORKLOADS  # noqa: E402

MODES = ("stream", "chunked", "full")
GB = 1024 ** 3


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--cohorts", type=int, nargs="+", default=[100, 1000, 5000])
  p.add_argument("--chunk", type=int, nargs="+", default=[10],
                 help="clients per chunk of the chunked modes (several values: a sweep)")
  p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
  p.add_argument("--limit-gb", type=float, default=12.0,
                 help="watchdog: kill the child past this RSS")
  p.add_argument("--timeout", type=float, default=180.0, help="seconds per cell (compile + round)")
  p.add_argument("--min-free-gb", type=float, default=1.5,
                 help="watchdog: also kill the child if the host's MemAvailable drops below this")
  p.add_argument("--rounds", type=int, default=1,
                 help="rounds per cell (same executable); round s = the fastest")
  p.add_argument("--examples-per-client", type=int, default=14)
  p.add_argument("--poll", type=float, default=0.02, help="watchdog poll interval (s)")
  p.add_argument("--json", default=None, help="write all rows here")
  p.add_argument("--md", default=None, help="write the Markdown table here")
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  p.add_argument("--out", default=None, help=argparse.SUPPRESS)
  return p.parse_args(argv)


# --------------------------------------------------------------------------------- child side


def _status_kb(field, pid="self"):
  with open(f"/proc/{pid}/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  return 0


def _reset_hwm():
  """Resets VmHWM (peak RSS) of this process; False where the kernel does not allow it."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def population(num_clients, per_client, seed=0):
  """``num_clients`` clients of ``per_client`` distinct digits examples each (resampled)."""
  import numpy as np

  import jaxfl

  ds = jaxfl.data.load_digits()
  rng = np.random.default_rng(seed)
  n = len(ds.y_train)
  parts = [np.sort(rng.choice(n, per_client, replace=False)) for _ in range(num_clients)]
  return jaxfl.data.from_client_indices(ds, parts, f"resampled({per_client})")


def child(cfg, out_path):
  """One cell in this (fresh) process; progress goes to ``out_path`` as JSON lines."""
  out = open(out_path, "a")

  def emit(**kw):
    out.write(json.dumps(kw) + "\n")
    out.flush()

  t0 = time.perf_counter()
  import jax
  import numpy as np

  import jaxfl
  from jaxfl.data import device_data
  from jaxfl.round import build_round

  data = population(cfg["cohort"], cfg["examples_per_client"])
  dd = device_data(data)
  jax.block_until_ready(dd)
  emit(stage="setup", setup_s=time.perf_counter() - t0, hwm_setup_kb=_status_kb("VmHWM"),
       rss_setup_kb=_status_kb("VmRSS"))
  if cfg["mode"] == "baseline":
    return

  _, _, _, model_name, batch, steps, epochs = WORKLOADS["digits"]
  model = jaxfl.models.get_model(model_name, data.example_shape, data.num_classes)
  algo = jaxfl.algorithms.fedavg(client_lr=0.05, batch_size=batch, local_steps=steps,
                                 local_epochs=epochs)
  chunk = None if cfg["mode"] == "full" else cfg["chunk"]
  rnd = build_round(algo, model, num_clients=data.num_clients,
                    max_client_size=data.max_client_size, clients_per_round=cfg["cohort"],
                    clients_per_chunk=chunk, stream_aggregate=cfg["mode"] == "stream")
  state = rnd.init(jax.random.key(0))
  key = jax.random.key(1)
  reset_ok = _reset_hwm()
  compiled, compile_s = timed(lambda: rnd.step.lower(state, dd, key).compile())
  mem = {}
  try:
    ma = compiled.memory_analysis()
    for k in ("argument", "output", "temp", "alias", "generated_code"):
      mem[f"xla_{k}_bytes"] = int(getattr(ma, f"{k}_size_in_bytes"))
  except Exception as e:  # not every backend implements it
    mem["xla_error"] = repr(e)
  emit(stage="compiled", compile_s=compile_s, hwm_compile_kb=_status_kb("VmHWM"),
       rss_compiled_kb=_status_kb("VmRSS"), hwm_reset=reset_ok,
       padded_cohort=rnd.padded_cohort_size,
       num_params=int(jaxfl.tree.num_params(state.params)), **mem)
  _reset_hwm()
  times, cpu = [], []
  for r in range(cfg["rounds"]):
    c = time.process_time()
    (state, metrics), t = timed(lambda: compiled(state, dd, jax.random.fold_in(key, r)))
    times.append(t)
    cpu.append(time.process_time() - c)
  emit(stage="done", round_s=min(times), round_times_s=times, round_cpu_s=min(cpu),
       round_cpu_times_s=cpu, hwm_round_kb=_status_kb("VmHWM"),
       rss_after_round_kb=_status_kb("VmRSS"), train_loss=float(metrics["train_loss"]),
       participants=float(metrics["participants"]),
       finite=bool(np.all([np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params)])))


# -------------------------------------------------------------------------------- parent side


def _mem_available_kb():
  return _status_like("/proc/meminfo", "MemAvailable")


def _status_like(path, field):
  with open(path) as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  return 0


def run_cell(cfg, args):
  """Runs one cell in a fresh subprocess under the watchdog; returns the merged row."""
  with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
    path = f.name
  cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(cfg), "--out", path]
  limit_kb = args.limit_gb * GB / 1024
  load_start = os.getloadavg()[0]
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  max_rss_kb, failure, rusage, status = 0, None, None, None
  while True:
    pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
    if pid:
      break
    try:
      rss = _status_kb("VmRSS", proc.pid)
    except (FileNotFoundError, ProcessLookupError):
      rss = 0
    max_rss_kb = max(max_rss_kb, rss)
    if failure is None:
      if rss > limit_kb:
        failure = f"OOM: RSS > {args.limit_gb:g} GB limit"
      elif time.perf_counter() - t0 > args.timeout:
        failure = f"timeout > {args.timeout:g} s"
      elif _mem_available_kb() < args.min_free_gb * GB / 1024:
        failure = f"host MemAvailable < {args.min_free_gb:g} GB (RSS {rss / 2**20:.1f} GB)"
      if failure:
        os.kill(proc.pid, signal.SIGKILL)
    time.sleep(args.poll)
  proc.returncode = os.waitstatus_to_exitcode(status)
  stderr = proc.stderr.read()
  proc.stderr.close()
  wall = time.perf_counter() - t0
  stages = {}
  with open(path) as f:
    for line in f:
      rec = json.loads(line)
      stages[rec.pop("stage")] = rec
  os.unlink(path)
  if failure is None and proc.returncode != 0:
    last = [ln for ln in stderr.strip().splitlines() if ln.strip()][-1:] or [""]
    failure = f"exit {proc.returncode}: {last[0][:200]}"
  row = dict(cfg)
  row.update({
      "load_avg_1min_at_start": load_start, "load_avg_1min_at_end": os.getloadavg()[0],
      "ok": failure is None and ("done" in stages or cfg["mode"] == "baseline"),
      "failure": failure, "wall_s": wall,
      "peak_rss_bytes": rusage.ru_maxrss * 1024,  # Linux: KiB
      "watchdog_max_rss_bytes": max_rss_kb * 1024,
      "reached": list(stages),
  })
  for st in stages.values():
    for k, v in st.items():
      row[k.replace("_kb", "_bytes") if k.endswith("_kb") else k] = (
          v * 1024 if k.endswith("_kb") else v)
  return row


def fmt_gb(b):
  return "" if b is None else f"{b / GB:.2f}"


def table(rows, baseline):
  cols = ["cohort", "mode", "chunk", "status", "peak RSS GB", "net GB", "compile peak GB",
          "round peak GB", "round growth GB", "XLA temp GB", "XLA args+out GB", "compile s",
          "round s", "round CPU s", "load"]
  table_rows = []
  for r in rows:
    status = "ok" if r["ok"] else f"failed: {r['failure']}"
    if not r["ok"] and "compiled" in r["reached"]:
      status += " (compiled; died in the round)"
    elif not r["ok"]:
      status += f" (reached: {', '.join(r['reached']) or 'nothing'})"
    xla_io = (r["xla_argument_bytes"] + r["xla_output_bytes"] - r["xla_alias_bytes"]
              if "xla_argument_bytes" in r else None)
    table_rows.append([r["cohort"], r["mode"], "-" if r["mode"] == "full" else r["chunk"], status,
                       fmt_gb(r["peak_rss_bytes"]), fmt_gb(r["peak_rss_bytes"] - baseline),
                       fmt_gb(r.get("hwm_compile_bytes")), fmt_gb(r.get("hwm_round_bytes")),
                       fmt_gb(r["hwm_round_bytes"] - r["rss_compiled_bytes"])
                       if "hwm_round_bytes" in r else "",
                       fmt_gb(r.get("xla_temp_bytes")), fmt_gb(xla_io),
                       f"{r['compile_s']:.1f}" if "compile_s" in r else "",
                       f"{r['round_s']:.2f}" if "round_s" in r else "",
                       f"{r['round_cpu_s']:.2f}" if "round_cpu_s" in r else "",
                       f"{r['load_avg_1min_at_start']:.1f}"])
  return md_table(cols, table_rows)


def main():
  args = parse()
  if args.child:
    child(json.loads(args.child), args.out)
    return None
  t_start = time.perf_counter()
  base_cfg = {"examples_per_client": args.examples_per_client, "rounds": args.rounds}
  cells = []
  for cohort in args.cohorts:
    for mode in args.modes:
      for chunk in ([None] if mode == "full" else args.chunk):
        cells.append(dict(base_cfg, cohort=cohort, mode=mode, chunk=chunk))
  # Baseline: imports + the largest population on device, nothing built.
  base = run_cell(dict(base_cfg, cohort=max(args.cohorts), mode="baseline", chunk=None), args)
  baseline = base["peak_rss_bytes"]
  print(f"baseline (import jax + jaxfl, {max(args.cohorts)}-client population on device): "
        f"{baseline / GB:.2f} GB", flush=True)
  rows = []
  for cfg in cells:
    row = run_cell(cfg, args)
    row["net_peak_rss_bytes"] = row["peak_rss_bytes"] - baseline
    rows.append(row)
    print(f"  cohort={cfg['cohort']} mode={cfg['mode']} chunk={cfg['chunk']}: "
          f"{'ok' if row['ok'] else row['failure']}, peak {row['peak_rss_bytes'] / GB:.2f} GB, "
          f"{row['wall_s']:.1f} s", flush=True)
  md = table(rows, baseline)
  import jax

  meta = {
      "workload": "digits (bench_round.py): small_cnn (conv_impl auto), fedavg, batch 32, 5 local steps",
      "population": f"num_clients = cohort, {args.examples_per_client} resampled digits examples "
                    "per client",
      "baseline_peak_rss_bytes": baseline, "limit_gb": args.limit_gb, "timeout_s": args.timeout,
      "command": command_line(__file__),
      "total_s": time.perf_counter() - t_start, "jax_version": jax.__version__,
      "machine": f"{platform.machine()} {os.cpu_count()} cores, "
                 f"{_status_like('/proc/meminfo', 'MemTotal') / 2**20:.0f} GB RAM",
      "max_rss_self_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
  }
  header = (f"Peak host memory of one round ({meta['workload']}; {meta['population']}). "
            f"Baseline (import + data on device) {baseline / GB:.2f} GB; "
            "net = peak - baseline; GB = 2^30 bytes. "
            f"Watchdog limit {args.limit_gb:g} GB, timeout {args.timeout:g} s per cell; "
            f"round s = fastest of {args.rounds} round(s) (wall), round CPU s = its process CPU "
            "time (all threads; less sensitive to other work); load = host 1-min load average "
            "when the cell started (2 cores; > 1 means other work competed). "
            f"{meta['machine']}, jax {meta['jax_version']}.\n\n"
            f"`{meta['command']}`\n\n")
  print()
  print(header + md)
  if args.json:
    write_json(args.json, {"meta": meta, "baseline": base, "rows": rows})
  if args.md:
    write_text(args.md, header + md + "\n")
  return rows


if __name__ == "__main__":
  main()
