"""Feature extraction: one jitted eval-mode forward per batch, sharded.

Eval mode means BatchNorm running statistics, no augmentation and, for
BayesNCL, the gate without noise at the *trained* temperature and threshold
(`config.gate.eval_mode`). The batch is sharded over the mesh exactly as in
training; every real example of the split is returned once, in dataset
order, padding removed.

The features of one example (D = projector output dims):
  h          (d_h,) backbone output (pooled, eval-mode BatchNorm).
  z          (D,)   the final features: normalised, non-negative (NCL,
                    BayesNCL) and gated (BayesNCL) — what the method trains
                    with and the interpretability metrics read.
  z_raw      (D,)   the projector's output before σ+ (NCL's feature
                    selection ranks and probes these).
  z_pregate  (D,)   BayesNCL: normalize(σ+(z_raw)), z before the gate.
  gate_probs (D,)   BayesNCL: p = sigmoid(a / τ_gate) of the eval gate.
  gate_mask  (D,)   BayesNCL: the mask applied (1[p > threshold], or p with
                    gate.eval_mode = soft).
  label, index      class label; index of the example in the split's source.
  nuisance_<name>   for datasets with nuisance labels (e.g. the background),
                    read from the source by index.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np

from bayesncl_jax import augment
from bayesncl_jax import datasets
from bayesncl_jax import input_pipeline
from bayesncl_jax import models
from bayesncl_jax import sharding
from bayesncl_jax import train

NUISANCE_PREFIX = "nuisance_"


def nuisance_names(config) -> tuple[str, ...]:
  """Keys of the nuisance labels the dataset's examples carry, or ().

  From `datasets.nuisance_labels(config.dataset)` (e.g. ("background",) for
  fashion_mnist_backgrounds).
  """
  return tuple(datasets.nuisance_labels(config.dataset))


def nuisance_labels(config, split: str, index: np.ndarray,
                    names: Sequence[str]) -> dict[str, np.ndarray]:
  """{nuisance_<name>: (N,) int32} read from the split's source by index."""
  if not names:
    return {}
  source = datasets.get_source(config.dataset, split)
  examples = [source[int(i)] for i in index]
  out = {}
  for name in names:
    try:
      out[NUISANCE_PREFIX + name] = np.asarray(
          [int(e[name]) for e in examples], np.int32)
    except KeyError:
      raise ValueError(
          f"Dataset {config.dataset.name!r} declares the nuisance label "
          f"{name!r}, but its {split!r} examples have no such key (keys: "
          f"{sorted(examples[0])}).") from None
  return out


def make_feature_fn(setup: train.Setup):
  """Jitted `(params, batch_stats, batch) -> features`, batch over `data`.

  batch: {"image": uint8 (B, S, S, C), "label", "mask", "index": (B,)}
  sharded over the mesh. Returns replicated {"h", "z", "z_raw", "label",
  "mask", "index"[, "z_pregate", "gate_probs", "gate_mask"]} (module
  docstring); replicated outputs are addressable on every host, so each
  process can read the whole batch.
  """
  config, model = setup.config, setup.model
  mean, std = tuple(config.dataset.mean), tuple(config.dataset.std)
  dtype = train.compute_dtype(config)

  def forward(params, batch_stats, batch):
    variables = {"params": params, "batch_stats": batch_stats}
    x = augment.normalize(batch["image"], mean, std, dtype)
    out = model.apply(variables, x, train=False)
    z_raw = model.apply(variables, out["h"],
                        method=lambda m, h: m.projector(h)).astype(
                            jax.numpy.float32)
    feats = {"h": out["h"], "z": out["z"], "z_raw": z_raw,
             "label": batch["label"], "mask": batch["mask"],
             "index": batch["index"]}
    if "gate_mask" in out:
      feats["z_pregate"] = models.l2_normalize(
          models.non_negative(z_raw, config.model.non_neg))
      feats["gate_probs"] = out["gate_probs"]
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
                     feature_fn=None, keys: Sequence[str] | None = None,
                     with_nuisance: bool = True) -> dict[str, np.ndarray]:
  """Eval-mode features of `split`, each real example exactly once.

  Returns host arrays, padding removed, in dataset order: h (N, d_h), z,
  z_raw (N, D), label (N,), index (N,) (the example's index in
  `datasets.get_source(split)`), for BayesNCL z_pregate, gate_probs and
  gate_mask (N, D), and the dataset's nuisance labels (module docstring).
  keys: keep only these (label and index are always kept; host memory is
  N × the kept dims). max_examples > 0 stops after the batches that cover
  that many examples and keeps the first max_examples rows. `state` needs
  `params` and `batch_stats`; feature_fn (default `make_feature_fn`) may be
  any jitted function of (params, batch_stats, batch) that returns
  "label", "mask" and "index" with its outputs.
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
    if keys is not None:
      out = {k: v for k, v in out.items()
             if k in keys or k in ("label", "index", "mask")}
    chunks.append(jax.device_get(out))
  del it
  feats = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
  keep = feats.pop("mask").astype(bool)
  feats = {k: v[keep] for k, v in feats.items()}
  if max_examples > 0:
    feats = {k: v[:max_examples] for k, v in feats.items()}
  if with_nuisance:
    feats.update(nuisance_labels(setup.config, split, feats["index"],
                                 nuisance_names(setup.config)))
  return feats


def features_npz(train: dict[str, np.ndarray], test: dict[str, np.ndarray]
                 ) -> dict[str, np.ndarray]:
  """The arrays of eval/features.npz (`--save_features`), dataset order.

  train_h, train_z, train_labels, test_h, test_z, test_labels (h: backbone
  features (N, d_h); z: the final normalised, non-negative, gated features
  (N, D); labels: (N,) class ids); with a gate also test_gate_probs and
  test_gate_mask (N, D: the eval-mode gate per sample and dim); with
  nuisance labels also train_<name>, test_<name> (e.g. test_background).
  """
  out = {}
  for split, feats in (("train", train), ("test", test)):
    out[f"{split}_h"] = feats["h"]
    out[f"{split}_z"] = feats["z"]
    out[f"{split}_labels"] = feats["label"]
    for key, value in feats.items():
      if key.startswith(NUISANCE_PREFIX):
        out[f"{split}_{key[len(NUISANCE_PREFIX):]}"] = value
  for key in ("gate_probs", "gate_mask"):
    if key in test:
      out[f"test_{key}"] = test[key]
  return out
