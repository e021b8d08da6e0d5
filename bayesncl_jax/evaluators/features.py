"""Feature extraction: one jitted eval-mode forward per batch, sharded.

Eval mode means BatchNorm running statistics, no augmentation and, for
BayesNCL, the gate without noise at the *trained* temperature and threshold
(`config.gate.eval_mode`). The batch is sharded over the mesh exactly as in
training; every real example of the split is returned once, in dataset
order, padding removed.
"""
from __future__ import annotations

import math

import jax
import numpy as np

from bayesncl_jax import augment
from bayesncl_jax import input_pipeline
from bayesncl_jax import sharding
from bayesncl_jax import train


def make_feature_fn(setup: train.Setup):
  """Jitted `(params, batch_stats, batch) -> features`, batch over `data`.

  batch: {"image": uint8 (B, S, S, C), "label", "mask", "index": (B,)}
  sharded over the mesh. Returns replicated {"h": (B, d_h), "z": (B, D),
  "label", "mask", "index"[, "gate_mask": (B, D)]}: replicated outputs are
  addressable on every host, so each process can read the whole batch.
  """
  config, model = setup.config, setup.model
  mean, std = tuple(config.dataset.mean), tuple(config.dataset.std)
  dtype = train.compute_dtype(config)

  def forward(params, batch_stats, batch):
    x = augment.normalize(batch["image"], mean, std, dtype)
    out = model.apply({"params": params, "batch_stats": batch_stats}, x,
                      train=False)
    feats = {"h": out["h"], "z": out["z"], "label": batch["label"],
             "mask": batch["mask"], "index": batch["index"]}
    if "gate_mask" in out:
      feats["gate_mask"] = out["gate_mask"]
    return feats

  rep = sharding.replicated(setup.mesh)
  return jax.jit(forward,
                 in_shardings=(rep, rep, sharding.batch_sharding(setup.mesh)),
                 out_shardings=rep)


def global_eval_batch(batch_size: int, mesh) -> int:
  """A multiple of the device count (the batch is split over devices), and
  so of the process count, close to batch_size."""
  return max(mesh.size, batch_size // mesh.size * mesh.size)


def extract_features(setup: train.Setup, state, split: str,
                     batch_size: int = 512, max_examples: int = -1,
                     feature_fn=None) -> dict[str, np.ndarray]:
  """Eval-mode features of `split`, each real example exactly once.

  Returns host arrays, padding removed: h (N, d_h), z (N, D), label (N,),
  index (N,) (the example's index in `datasets.get_source(split)`) and for
  BayesNCL gate_mask (N, D). max_examples > 0 stops after the batches that
  cover that many examples and keeps the first max_examples rows.
  `state` needs `params` and `batch_stats`.
  """
  mesh = setup.mesh
  batch_size = global_eval_batch(batch_size, mesh)
  feature_fn = feature_fn or make_feature_fn(setup)
  n_batches = input_pipeline.num_eval_batches(setup.config, split, batch_size)
  if max_examples > 0:
    n_batches = min(n_batches, math.ceil(max_examples / batch_size))
  p, n_proc = jax.process_index(), jax.process_count()
  local = batch_size // n_proc
  it = input_pipeline.create_eval_iterator(setup.config, split, batch_size)
  chunks = []
  for b, batch in zip(range(n_batches), it):
    # Process p's position j of batch b is its example p + (b·local + j)·P
    # (EvalExample's striding); the index travels with the row.
    batch["index"] = (p + (b * local + np.arange(local)) * n_proc).astype(
        np.int32)
    out = feature_fn(state.params, state.batch_stats,
                     sharding.make_global_batch(batch, mesh))
    chunks.append(jax.device_get(out))
  del it
  feats = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
  keep = feats.pop("mask").astype(bool)
  feats = {k: v[keep] for k, v in feats.items()}
  if max_examples > 0:
    feats = {k: v[:max_examples] for k, v in feats.items()}
  return feats
