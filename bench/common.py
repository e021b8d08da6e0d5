"""Shared helpers of the benchmarks: timing, environment, JSON output.

Every benchmark prints, per measured configuration, one line `JSON {...}` (a
machine-readable record) and one readable line. The record always carries the
device kind, library versions, the command line and the load average, so a
number copied into RESULTS.md can be traced to the run that produced it.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

JSON_PREFIX = "JSON "


def set_host_device_count(n: int) -> None:
  """Asks XLA for `n` simulated CPU devices; call BEFORE importing jax.

  The flag is read once when the CPU backend starts, so it has to be in the
  environment before the first `import jax` of the process.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  parts = [p for p in flags.split()
           if not p.startswith("--xla_force_host_platform_device_count")]
  parts.append(f"--xla_force_host_platform_device_count={n}")
  os.environ["XLA_FLAGS"] = " ".join(parts)


def load_average() -> list[float] | None:
  """1/5/15-minute load average (the machine is shared: numbers need it)."""
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def environment() -> dict[str, Any]:
  """Device kind, versions, CPU count, load and the exact command."""
  env: dict[str, Any] = {
      "command": " ".join(["python"] + sys.argv),
      "python": platform.python_version(),
      "cpu_count": os.cpu_count(),
      "load_avg": load_average(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }
  if "jax" in sys.modules:
    import jax  # pylint: disable=g-import-not-at-top
    dev = jax.devices()[0]
    env.update(jax=jax.__version__, backend=jax.default_backend(),
               device_kind=dev.device_kind, num_devices=jax.device_count())
  if "torch" in sys.modules:
    env["torch"] = sys.modules["torch"].__version__
  return env


def emit(record: dict[str, Any], readable: str) -> None:
  """Prints the JSON record (with the environment) and a readable line."""
  full = {**record, "env": environment()}
  print(JSON_PREFIX + json.dumps(full, default=_jsonable), flush=True)
  print(readable, flush=True)


def _jsonable(x):
  try:
    return float(x)
  except (TypeError, ValueError):
    return str(x)


def parse_records(text: str) -> list[dict[str, Any]]:
  """The JSON records a benchmark printed (for tests and RESULTS tooling)."""
  return [json.loads(line[len(JSON_PREFIX):]) for line in text.splitlines()
          if line.startswith(JSON_PREFIX)]


def time_calls(fn: Callable[[], Any], *, warmup: int, steps: int,
               sync: Callable[[Any], Any]) -> dict[str, float]:
  """Median / min / mean wall time (and median CPU time) in ms of `fn()`.

  `sync(result)` must block until the work is done (block_until_ready for
  JAX, cuda.synchronize or nothing for eager CPU PyTorch): asynchronous
  dispatch would otherwise time only the launch. The median is reported
  because a shared machine produces occasional slow outliers.
  """
  for _ in range(warmup):
    sync(fn())
  times, cpu = [], []
  for _ in range(steps):
    t0, c0 = time.perf_counter(), time.process_time()
    sync(fn())
    times.append((time.perf_counter() - t0) * 1e3)
    cpu.append((time.process_time() - c0) * 1e3)
  # cpu_median_ms: process CPU time (user + system, all threads) per call —
  # what the call cost the machine, less sensitive to other users' load.
  return {"median_ms": statistics.median(times), "min_ms": min(times),
          "mean_ms": statistics.fmean(times),
          "cpu_median_ms": statistics.median(cpu), "timed_steps": steps}


def xla_cost(compiled) -> dict[str, float | None]:
  """FLOPs and bytes accessed from XLA's cost analysis (None if absent).

  `cost_analysis()` returns a dict in new JAX and a one-element list of
  dicts in older versions; some backends return nothing.
  """
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # backend-dependent.
    return {"flops": None, "bytes_accessed": None}
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost:
    return {"flops": None, "bytes_accessed": None}
  return {"flops": cost.get("flops"),
          "bytes_accessed": cost.get("bytes accessed")}


def xla_memory(compiled) -> dict[str, int | None]:
  """Per-device memory of a compiled executable, where the backend has it.

  peak_bytes = arguments + outputs + temporaries − aliased (donated) bytes,
  an upper bound of what one device holds during a call.
  """
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # backend-dependent.
    m = None
  if m is None:
    return {"temp_bytes": None, "argument_bytes": None, "output_bytes": None,
            "peak_bytes": None}
  temp = int(m.temp_size_in_bytes)
  arg = int(m.argument_size_in_bytes)
  out = int(m.output_size_in_bytes)
  alias = int(getattr(m, "alias_size_in_bytes", 0))
  return {"temp_bytes": temp, "argument_bytes": arg, "output_bytes": out,
          "peak_bytes": temp + arg + out - alias}


def mib(x: int | None) -> str:
  return "n/a" if x is None else f"{x / 2**20:.1f} MiB"


def synthetic_train_inputs(config, num_examples: int = 60_000):
  """(setup, state, batch, rng, mesh) for timing one config's train step.

  The model and optimizer are built as `train` builds them (the schedule
  sized for `num_examples` training images, without opening the dataset);
  the batch is random uint8 views and labels, sharded over all devices.
  """
  from unittest import mock  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from bayesncl_jax import datasets, sharding, train  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh()
  with mock.patch.object(datasets, "num_examples", return_value=num_examples):
    setup = train.build(config, mesh)
  state = train.init_state(setup, jax.random.key(0))
  b, s = config.optim.batch_size, config.dataset.image_size
  c = len(config.dataset.mean)
  rs = np.random.default_rng(0)
  batch = {"view1": rs.integers(0, 256, (b, s, s, c), dtype=np.uint8),
           "view2": rs.integers(0, 256, (b, s, s, c), dtype=np.uint8),
           "label": rs.integers(0, config.dataset.num_classes, (b,),
                                dtype=np.int32)}
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  return setup, state, batch, jax.random.key(1), mesh
