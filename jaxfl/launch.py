"""Multi-process / multi-host runs: ``jax.distributed`` plus one ``("clients",)`` mesh.

jaxfl needs no RPC of its own: every process runs the same program (multi-controller JAX),
``jax.devices()`` lists the devices of all processes after :func:`initialize`, the round's
client axis is sharded over that global mesh, and XLA's collectives (NCCL on GPU, gloo over
TCP on CPU) carry the aggregation. Only process 0 prints progress and writes outputs.

Usage::

  # N processes on this machine over loopback (CPU: K devices each), e.g. for testing
  python -m jaxfl.launch --num-processes 2 --local-devices 1 -- run --rounds 10 --out out
  # one process per host, started by your scheduler (explicit or JAXFL_* env vars)
  python -m jaxfl.launch --coordinator host0:1234 --num-processes 4 --process-id $I -- run ...
  # SLURM / Open MPI / Cloud TPU: let jax.distributed detect the cluster
  srun python -m jaxfl.launch -- train.py --my-flag

The command after ``--`` is either ``jaxfl`` CLI arguments (``run ...``, optionally preceded
by ``jaxfl``), a Python script (``train.py args``) or ``-m module args``, run in this process
after initialization. From your own script call :func:`initialize` before any JAX
computation.
"""

from __future__ import annotations

import argparse
import os
import runpy
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from jaxfl.xla_options import ENV_HOST_CORES, host_cores

ENV_COORDINATOR = "JAXFL_COORDINATOR"
ENV_NUM_PROCESSES = "JAXFL_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXFL_PROCESS_ID"
ENV_LOCAL_DEVICES = "JAXFL_LOCAL_DEVICES"


def _env_int(name: str) -> int | None:
  v = os.environ.get(name)
  if v in (None, ""):
    return None
  try:
    return int(v)
  except ValueError:
    raise ValueError(f"Environment variable {name} must be an int, got {v!r}.") from None


def _check_coordinator(address: str, what: str = "`coordinator_address`") -> str:
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f"{what} must be HOST:PORT, got {address!r}.")
  return address


def _cpu_may_be_used() -> bool:
  import jax

  platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
  return not platforms or "cpu" in platforms.split(",")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_devices: int | None = None,
               **kwargs) -> None:
  """Joins this process to a multi-process JAX run (call before any JAX computation).

  Arguments left as None are read from ``JAXFL_COORDINATOR`` / ``JAXFL_NUM_PROCESSES`` /
  ``JAXFL_PROCESS_ID`` / ``JAXFL_LOCAL_DEVICES``; if none of the first three is set either,
  ``jax.distributed.initialize()`` detects the cluster itself (SLURM, Open MPI, Cloud TPU,
  ...). Afterwards ``jax.devices()`` are all processes' devices, so
  ``jaxfl.simulate(..., devices=None)`` shards the cohort over all of them.

  Args:
    coordinator_address: ``HOST:PORT`` of process 0's coordination service.
    num_processes: total number of processes.
    process_id: this process's index in ``[0, num_processes)``.
    local_devices: CPU devices of this process (``jax_num_cpu_devices``); ignored by
      GPU/TPU backends, which use their visible devices (``local_device_ids`` in
      ``kwargs`` restricts them).
    **kwargs: passed to ``jax.distributed.initialize`` (``local_device_ids``,
      ``initialization_timeout``, ...).
  """
  import jax

  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
  num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
  process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
  local_devices = local_devices if local_devices is not None else _env_int(ENV_LOCAL_DEVICES)
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"`num_processes` must be >= 1, got {num_processes!r}.")
  if process_id is not None:
    if num_processes is None or coordinator_address is None:
      raise ValueError("`process_id` needs `num_processes` and `coordinator_address` (or "
                       f"{ENV_NUM_PROCESSES} / {ENV_COORDINATOR}).")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"`process_id` must be in [0, {num_processes}), got {process_id!r}.")
  if coordinator_address is not None:
    _check_coordinator(coordinator_address)
  if local_devices is not None:
    if local_devices < 1:
      raise ValueError(f"`local_devices` must be >= 1, got {local_devices!r}.")
    jax.config.update("jax_num_cpu_devices", local_devices)
  if _cpu_may_be_used() and not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
    # Cross-process collectives on CPU (tests, CPU clusters); without them a CPU computation
    # spanning processes fails. Only read by the CPU client; an explicit choice (mpi) wins.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)


def is_primary() -> bool:
  """True in process 0 (the one that prints and writes outputs)."""
  import jax

  return jax.process_index() == 0


def free_port() -> int:
  """An unused TCP port on loopback (for a local coordinator)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_command(command: Sequence[str]) -> int:
  """Runs ``jaxfl`` CLI args, ``script.py args`` or ``-m module args`` in this process."""
  command = list(command)
  if command and command[0] == "jaxfl":
    command = command[1:]
  if not command:
    raise ValueError("No command given after `--`.")
  if command[0] == "-m":
    if len(command) < 2:
      raise ValueError("`-m` needs a module name.")
    sys.argv = command[1:]
    runpy.run_module(command[1], run_name="__main__", alter_sys=True)
    return 0
  if command[0].endswith(".py") or os.path.isfile(command[0]):
    sys.argv = command
    sys.path.insert(0, os.path.dirname(os.path.abspath(command[0])))
    runpy.run_path(command[0], run_name="__main__")
    return 0
  from jaxfl.cli import main

  return main(command)


def _pump(stream, out, prefix: str) -> None:
  for line in iter(stream.readline, ""):
    out.write(prefix + line)
    out.flush()
  stream.close()


def spawn_local(num_processes: int, command: Sequence[str], *,
                local_devices: int | None = None, coordinator: str | None = None,
                prefix_output: bool = True, env: dict | None = None) -> int:
  """Starts ``num_processes`` copies of ``command`` on this machine over loopback.

  Each child runs ``python -m jaxfl.launch -- command`` with the ``JAXFL_*`` variables set,
  ``JAXFL_HOST_CORES`` to its share of this host's cores unless already set.
  Returns 0 if all succeed, else the first non-zero exit status; when one child fails the
  others are stopped (they would otherwise wait in a collective for the dead peer).
  """
  coordinator = coordinator or f"127.0.0.1:{free_port()}"
  base = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
  procs, pumps = [], []
  for i in range(num_processes):
    child_env = dict(base, **{ENV_COORDINATOR: coordinator,
                              ENV_NUM_PROCESSES: str(num_processes), ENV_PROCESS_ID: str(i)})
    if local_devices is not None:
      child_env[ENV_LOCAL_DEVICES] = str(local_devices)
    # the children share this host's cores: each compiles for its share (jaxfl.xla_options)
    child_env.setdefault(ENV_HOST_CORES, str(max(1, host_cores() // num_processes)))
    p = subprocess.Popen([sys.executable, "-m", "jaxfl.launch", "--", *command], env=child_env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    procs.append(p)
    pre = f"[{i}] " if prefix_output else ""
    for stream, out in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
      t = threading.Thread(target=_pump, args=(stream, out, pre), daemon=True)
      t.start()
      pumps.append(t)
  rc = 0
  try:
    while any(p.poll() is None for p in procs):
      failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
      if failed:
        rc = failed[0]
        break
      time.sleep(0.1)
  except KeyboardInterrupt:
    rc = 130
  finally:
    for p in procs:
      if p.poll() is None:
        p.terminate()
    for p in procs:
      try:
        p.wait(timeout=10)
      except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    for t in pumps:
      t.join(timeout=5)
  if rc == 0:
    rc = next((p.returncode for p in procs if p.returncode != 0), 0)
  return rc


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m jaxfl.launch",
      description=("Run a jaxfl command on several JAX processes (jax.distributed). Without "
                   "--process-id (and no JAXFL_PROCESS_ID), --num-processes N starts N local "
                   "processes over loopback; with it, this process joins the run. With "
                   "neither, jax detects the cluster (SLURM, Open MPI, Cloud TPU)."),
      epilog=("command after --: jaxfl CLI args (run ...), script.py args, or -m module "
              "args. Example: python -m jaxfl.launch --num-processes 2 -- run --rounds 5"))
  p.add_argument("--num-processes", type=int, default=None, help="total processes N")
  p.add_argument("--coordinator", default=None,
                 help="HOST:PORT of process 0 (default for local spawn: a free loopback port)")
  p.add_argument("--process-id", type=int, default=None, help="this process's index in [0, N)")
  p.add_argument("--local-devices", type=int, default=None,
                 help="CPU devices per process (jax_num_cpu_devices)")
  p.add_argument("--no-prefix", action="store_true",
                 help="do not prefix spawned processes' output with [i]")
  p.add_argument("command", nargs=argparse.REMAINDER,
                 help="-- followed by jaxfl CLI args, script.py args or -m module args")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  command = list(args.command)
  if command[:1] == ["--"]:
    command = command[1:]
  if not command:
    parser.error("no command: give one after `--` (e.g. `-- run --rounds 5` or "
                 "`-- train.py`)")
  if args.num_processes is not None and args.num_processes < 1:
    parser.error(f"--num-processes must be >= 1, got {args.num_processes}")
  if args.local_devices is not None and args.local_devices < 1:
    parser.error(f"--local-devices must be >= 1, got {args.local_devices}")
  if args.coordinator is not None:
    try:
      _check_coordinator(args.coordinator, "--coordinator")
    except ValueError as e:
      parser.error(str(e))
  spawn = args.process_id is None and os.environ.get(ENV_PROCESS_ID) in (None, "")
  if spawn and args.num_processes is not None:
    if args.coordinator is not None:
      host = args.coordinator.rpartition(":")[0]
      if host not in ("127.0.0.1", "localhost", "::1", "[::1]"):
        parser.error("local spawn (no --process-id) runs on loopback; --coordinator must be "
                     f"127.0.0.1:PORT or localhost:PORT, got {args.coordinator!r}")
    return spawn_local(args.num_processes, command, local_devices=args.local_devices,
                       coordinator=args.coordinator, prefix_output=not args.no_prefix)
  if args.process_id is not None:
    n = args.num_processes if args.num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    if n is None:
      parser.error(f"--process-id needs --num-processes (or {ENV_NUM_PROCESSES})")
    if not 0 <= args.process_id < n:
      parser.error(f"--process-id must be in [0, {n}), got {args.process_id}")
    if args.coordinator is None and not os.environ.get(ENV_COORDINATOR):
      parser.error(f"--process-id needs --coordinator HOST:PORT (or {ENV_COORDINATOR})")
  try:
    initialize(args.coordinator, args.num_processes, args.process_id,
               local_devices=args.local_devices)
  except ValueError as e:
    parser.error(str(e))
  return run_command(command)


if __name__ == "__main__":
  sys.exit(main())
