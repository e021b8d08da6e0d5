"""Device mesh and shardings: pure data parallelism over one axis, `data`.

Parameters and optimizer state are replicated; every batch-leading array is
split along `data`. `jax.jit` with these `NamedSharding`s is what used to be
called pjit; XLA inserts the collectives (BatchNorm statistics, gradient
all-reduce, the all-gather of z in the contrastive loss).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over `devices` (default: all devices of all processes).

  Built with `Mesh` directly: `jax.make_mesh` defaults to Explicit axes in
  this JAX, which reject `z @ z.T` on a batch-sharded `z`.
  """
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`; other axes whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def rows_sharding(mesh: Mesh) -> NamedSharding:
  """For 2-D (rows, cols) matrices: rows split, columns whole."""
  return NamedSharding(mesh, P(DATA_AXIS, None))


def make_global_batch(local_batch: Any, mesh: Mesh) -> Any:
  """Assembles this process's numpy batch into global sharded jax.Arrays.

  Each process passes only the rows it read (its shard of the data); the
  global batch has process_count × local rows.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x),
      local_batch)
