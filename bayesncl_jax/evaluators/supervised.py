"""Supervised training through the network on augmented images.

Two protocols train on labels with the images themselves rather than on
features extracted once:

  augmented linear probe (`linear` with linear_probe = augmented): a linear
    head on h = backbone(x) of a fresh random resized crop + horizontal flip
    of every training image in every epoch; the backbone is frozen and in
    eval mode (BatchNorm running statistics), as solo-learn's probe trains.
  fine-tuning (`finetune`, docs/method.md §9): backbone + linear head trained end
    to end on the same augmented images; BatchNorm in training mode, its
    running statistics updated as in pre-training.

Both use the probe's optimiser (`linear_probe.make_optimizer`: SGD or LARS
with its schedule), a head initialised at zero, and one global data order
that does not depend on the number of processes: epoch e visits the
training examples in the permutation `default_rng([seed, e])`, cut into
global batches of B (the last partial batch dropped); process p reads rows
[p·b, (p+1)·b) of each (b = B / P), and example q of epoch e gets its crop
from `default_rng([seed, e, q])`. The images are decoded and cropped on
the host (Grain, `config.dataset.num_workers` processes); normalisation
runs on the device.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bayesncl_jax import augment
from bayesncl_jax import datasets
from bayesncl_jax import input_pipeline
from bayesncl_jax import sharding
from bayesncl_jax import train
from bayesncl_jax.evaluators import features as features_lib
from bayesncl_jax.evaluators import linear_probe

HFLIP_PROB = 0.5


class AugmentedExample(grain.transforms.Map):
  """Local position t -> this process's augmented example at t.

  With b local rows per batch and K = steps_per_epoch: epoch e = t // (K·b),
  step k, row j; the global position in the epoch is q = k·B + p·b + j and
  the example is permutation_e[q] (module docstring).
  """

  def __init__(self, source, num_examples: int, global_batch: int,
               process_index: int, process_count: int, steps_per_epoch: int,
               image_size: int, crop_scale: tuple[float, float], seed: int,
               hflip_prob: float = HFLIP_PROB):
    self.source = source
    self.num_examples = int(num_examples)
    self.global_batch = int(global_batch)
    self.local_batch = self.global_batch // int(process_count)
    self.offset = int(process_index) * self.local_batch
    self.steps_per_epoch = int(steps_per_epoch)
    self.image_size = int(image_size)
    self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
    self.seed = int(seed)
    self.hflip_prob = float(hflip_prob)
    self._epoch, self._perm = None, None

  def permutation(self, epoch: int) -> np.ndarray:
    if epoch != self._epoch:
      self._perm = np.random.default_rng([self.seed, epoch]).permutation(
          self.num_examples)
      self._epoch = epoch
    return self._perm

  def global_position(self, t: int) -> tuple[int, int]:
    """(epoch, position q in that epoch's permutation) of local position t."""
    epoch, r = divmod(int(t), self.steps_per_epoch * self.local_batch)
    k, j = divmod(r, self.local_batch)
    return epoch, k * self.global_batch + self.offset + j

  def map(self, t: int) -> dict[str, Any]:
    epoch, q = self.global_position(t)
    example = self.source[int(self.permutation(epoch)[q])]
    image = np.asarray(example["image"], np.uint8)
    rng = np.random.default_rng([self.seed, epoch, q])
    box = input_pipeline.random_resized_crop_params(
        image.shape[0], image.shape[1], self.crop_scale,
        input_pipeline.CROP_RATIO, rng)
    view = input_pipeline.resize_bicubic(image, self.image_size,
                                         self.image_size, box)
    if rng.random() < self.hflip_prob:
      view = view[:, ::-1]
    return {"image": np.ascontiguousarray(view),
            "label": np.int32(example["label"])}


def _global_batch(batch_size: int, num_examples: int, mesh) -> int:
  """batch_size clipped to the data, rounded down to a multiple of devices."""
  batch = min(int(batch_size), int(num_examples)) // mesh.size * mesh.size
  if batch < mesh.size:
    raise ValueError(f"{num_examples} training examples are fewer than the "
                     f"{mesh.size} devices the batch is split over.")
  return batch


def augmented_batches(config, *, num_examples: int, global_batch: int,
                      epochs: int, crop_scale, seed: int,
                      process_index: int | None = None,
                      process_count: int | None = None):
  """Iterator of this process's batches {"image", "label"} for all epochs.

  Reads the first `num_examples` examples of the train split; yields
  epochs · ⌊num_examples / global_batch⌋ batches of global_batch / P rows.
  """
  p = jax.process_index() if process_index is None else process_index
  n_proc = jax.process_count() if process_count is None else process_count
  source = datasets.get_source(config.dataset, config.dataset.train_split)
  steps = num_examples // global_batch
  element = AugmentedExample(source, num_examples, global_batch, p, n_proc,
                             steps, config.dataset.image_size, crop_scale,
                             seed)
  local = element.local_batch
  ds = (grain.MapDataset.range(epochs * steps * local).map(element)
        .batch(local, drop_remainder=True))
  buffer = max(0, int(config.dataset.prefetch_buffer))
  ids = ds.to_iter_dataset(grain.ReadOptions(num_threads=buffer,
                                             prefetch_buffer_size=buffer))
  if config.dataset.num_workers > 0:
    ids = ids.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=int(config.dataset.num_workers),
        per_worker_buffer_size=max(1, buffer)))
  return iter(ids)


def encode(module, x, train):
  """`model.apply(..., method=encode)`: the backbone alone, h = f(x)."""
  return module.encoder(x, train=train)


@dataclasses.dataclass
class SupervisedResult:
  """What training left: the head, and the (fine-tuned) model variables."""
  head: dict[str, jax.Array]        # {"w": (d_h, C), "b": (C,)}
  params: Any                       # the model's params (backbone updated
  batch_stats: Any                  # and BN statistics, when fine-tuned)
  last_epoch_loss: float
  steps: int
  global_batch: int


def make_train_step(setup: train.Setup, tx: optax.GradientTransformation,
                    finetune: bool):
  """Jitted `(trainable, opt_state, params, batch_stats, batch) -> (...)`.

  trainable = {"head": {"w", "b"}} (+ "backbone" params when finetune).
  Returns (trainable, opt_state, batch_stats, loss).
  """
  config, model = setup.config, setup.model
  mean, std = tuple(config.dataset.mean), tuple(config.dataset.std)
  dtype = train.compute_dtype(config)

  def step(trainable, opt_state, params, batch_stats, batch):
    x = augment.normalize(batch["image"], mean, std, dtype)

    def loss_fn(trainable):
      if finetune:
        variables = {"params": {**params, "backbone": trainable["backbone"]},
                     "batch_stats": batch_stats}
        h, new_vars = model.apply(variables, x, train=True, method=encode,
                                  mutable=["batch_stats"])
        new_stats = {**batch_stats, **new_vars["batch_stats"]}
      else:
        h = jax.lax.stop_gradient(model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=False,
            method=encode))
        new_stats = batch_stats
      head = trainable["head"]
      logits = jnp.matmul(h.astype(jnp.float32), head["w"],
                          precision=jax.lax.Precision.HIGHEST) + head["b"]
      loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
          logits, batch["label"]))
      return loss, new_stats

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return (optax.apply_updates(trainable, updates), opt_state, new_stats,
            loss)

  rep = sharding.replicated(setup.mesh)
  return jax.jit(step,
                 in_shardings=(rep, rep, rep, rep,
                               sharding.batch_sharding(setup.mesh)),
                 out_shardings=rep, donate_argnums=(0, 1))


def train_supervised(setup: train.Setup, state, probe: linear_probe.ProbeConfig,
                     *, epochs: int, finetune: bool,
                     crop_scale=(0.08, 1.0), max_examples: int = -1
                     ) -> SupervisedResult:
  """Trains a linear head (and, with finetune, the backbone) on labels.

  probe: optimiser, lr schedule, batch size and seed (its `epochs` and
  `standardize` are not used: `epochs` is given, images are not
  standardised). max_examples > 0: only the first max_examples training
  examples. `state` needs `params` and `batch_stats`.
  """
  config, mesh = setup.config, setup.mesh
  n = datasets.num_examples(config.dataset, config.dataset.train_split)
  if max_examples > 0:
    n = min(n, int(max_examples))
  batch = _global_batch(probe.batch_size, n, mesh)
  steps_per_epoch = n // batch
  schedule_config = dataclasses.replace(probe, epochs=int(epochs),
                                      warmup_epochs=min(probe.warmup_epochs,
                                                        epochs))
  tx = linear_probe.make_optimizer(schedule_config, steps_per_epoch)
  params = jax.device_get(state.params)
  batch_stats = jax.device_get(state.batch_stats)
  # The head's input size: one abstract forward of the encoder.
  h_shape = jax.eval_shape(
      functools.partial(setup.model.apply, method=encode, train=False),
      {"params": params, "batch_stats": batch_stats},
      jnp.zeros((1, *setup.image_shape), jnp.float32))
  num_classes = int(config.dataset.num_classes)
  trainable = {"head": {"w": jnp.zeros((h_shape.shape[-1], num_classes),
                                       jnp.float32),
                        "b": jnp.zeros((num_classes,), jnp.float32)}}
  if finetune:
    trainable["backbone"] = params["backbone"]
  rep = sharding.replicated(mesh)
  trainable = jax.device_put(trainable, rep)
  opt_state = jax.device_put(tx.init(trainable), rep)
  params_dev = jax.device_put(params, rep)
  stats_dev = jax.device_put(batch_stats, rep)
  step_fn = make_train_step(setup, tx, finetune)
  it = augmented_batches(config, num_examples=n, global_batch=batch,
                         epochs=epochs, crop_scale=crop_scale,
                         seed=probe.seed)
  losses = []
  total = epochs * steps_per_epoch
  for i, local in enumerate(it):
    trainable, opt_state, stats_dev, loss = step_fn(
        trainable, opt_state, params_dev, stats_dev,
        sharding.make_global_batch(local, mesh))
    if i >= total - steps_per_epoch:
      losses.append(loss)
  del it
  trainable = jax.device_get(trainable)
  final_params = dict(params)
  if finetune:
    final_params["backbone"] = trainable["backbone"]
  return SupervisedResult(
      head=trainable["head"], params=final_params,
      batch_stats=jax.device_get(stats_dev),
      last_epoch_loss=float(np.mean(jax.device_get(losses))),
      steps=total, global_batch=batch)


def classifier_logits(setup: train.Setup, result: SupervisedResult,
                      split: str, batch_size: int = 512,
                      max_examples: int = -1) -> dict[str, np.ndarray]:
  """{"logits": (N, C), "label": (N,), "index": (N,)} of `split`, eval mode.

  The trained head on backbone(x) with the result's (fine-tuned) variables,
  through the same sharded extraction as the features.
  """
  config, model = setup.config, setup.model
  mean, std = tuple(config.dataset.mean), tuple(config.dataset.std)
  dtype = train.compute_dtype(config)
  head = result.head

  def forward(params, batch_stats, batch):
    x = augment.normalize(batch["image"], mean, std, dtype)
    h = model.apply({"params": params, "batch_stats": batch_stats}, x,
                    train=False, method=encode).astype(jnp.float32)
    logits = jnp.matmul(h, head["w"],
                        precision=jax.lax.Precision.HIGHEST) + head["b"]
    return {"logits": logits, "label": batch["label"], "mask": batch["mask"],
            "index": batch["index"]}

  rep = sharding.replicated(setup.mesh)
  fn = jax.jit(forward, in_shardings=(rep, rep,
                                      sharding.batch_sharding(setup.mesh)),
               out_shardings=rep)
  variables = _Variables(result.params, result.batch_stats)
  out = features_lib.extract_features(setup, variables, split, batch_size,
                                      max_examples, fn, keys=("logits",),
                                      with_nuisance=False)
  return out


@dataclasses.dataclass
class _Variables:
  params: Any
  batch_stats: Any


def top_k_accuracy(logits: np.ndarray, labels: np.ndarray
                   ) -> dict[str, float]:
  """{"top1", "top5"}; top5 is top-min(5, C). Ties go to lower class ids."""
  logits = np.asarray(logits)
  ranked = np.argsort(-logits, axis=1, kind="stable")
  top_n = min(5, logits.shape[1])
  labels = np.asarray(labels)
  return {"top1": float(np.mean(ranked[:, 0] == labels)),
          "top5": float(np.mean(np.any(ranked[:, :top_n] == labels[:, None],
                                       axis=1)))}
