"""Multi-process start-up: `jax.distributed.initialize` with clear errors.

Single process (a laptop, one GPU host driving all its GPUs): nothing to do.
Cloud TPU pod: every worker runs the same command; JAX detects the pod.
GPU clusters: --coordinator_address=host:port --num_processes=N
--process_id=i on every process (or the JAX_* environment variables).
"""
from __future__ import annotations

import os

from absl import flags
from absl import logging
import jax

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0, for multi-process runs "
                      "outside Cloud TPU.")
  flags.DEFINE_integer("num_processes", None, "Total number of processes.")
  flags.DEFINE_integer("process_id", None, "This process's index.")
  flags.DEFINE_integer("distributed_timeout", 300,
                       "Seconds to wait for all processes to join.")
  flags.DEFINE_bool("distributed", None,
                    "Force (True) or skip (False) jax.distributed "
                    "initialisation; default: on when multi-process "
                    "settings or a TPU pod are detected.")


def _on_tpu_pod() -> bool:
  # TPU VM workers of a multi-host slice get these from the runtime.
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h]) > 1


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None, *, timeout: int = 300,
               force: bool | None = None) -> bool:
  """Joins the multi-process runtime when there is one; returns whether.

  A process that cannot reach the others within `timeout` seconds raises a
  RuntimeError that says which settings to check, instead of hanging.
  """
  coordinator_address = coordinator_address or os.environ.get(
      "JAX_COORDINATOR_ADDRESS")
  if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
    num_processes = int(os.environ["JAX_NUM_PROCESSES"])
  if process_id is None and "JAX_PROCESS_ID" in os.environ:
    process_id = int(os.environ["JAX_PROCESS_ID"])
  explicit = [coordinator_address, num_processes, process_id]
  if force is None:
    force = any(v is not None for v in explicit) or _on_tpu_pod()
  if not force:
    return False
  if any(v is not None for v in explicit) and any(v is None for v in explicit):
    raise ValueError(
        "Multi-process runs need all of --coordinator_address, "
        "--num_processes and --process_id (got "
        f"coordinator_address={coordinator_address}, "
        f"num_processes={num_processes}, process_id={process_id}).")
  if num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id} must be in "
                     f"[0, {num_processes}).")
  logging.info("jax.distributed.initialize(%s, %s, %s)", coordinator_address,
               num_processes, process_id)
  try:
    jax.distributed.initialize(coordinator_address, num_processes,
                               process_id, initialization_timeout=timeout)
  except Exception as e:  # the runtime raises XlaRuntimeError & co.
    raise RuntimeError(
        f"Process {process_id} could not join the multi-process run at "
        f"{coordinator_address or 'the auto-detected coordinator'} within "
        f"{timeout}s ({type(e).__name__}: {e}). Did you start the same "
        f"command on all {num_processes or 'pod'} hosts/processes (on TPU "
        "pods: --worker=all), with the same --coordinator_address and "
        "--num_processes, and is the coordinator's port reachable?") from e
  return True


def initialize_from_flags() -> bool:
  return initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                    FLAGS.process_id, timeout=FLAGS.distributed_timeout,
                    force=FLAGS.distributed)
