"""Grain input pipelines: two augmented views for pre-training, plain eval.

The host decodes images and draws the random-resized-crop boxes and flips
(docs/method.md §4). `config.aug.crop_on` says who cuts and resizes the views:
"host" (PIL bicubic, here) or "device" (`augment.crop_views`, inside the
jitted step; the host only pads the decoded image onto a fixed canvas).
Colour jitter, grayscale, blur and solarisation always run on the
accelerator.

Pre-training batches (per process, `b = config.optim.batch_size //
process_count`; rows `[p*b, (p+1)*b)` of one global stream that does not
depend on the process count), host crops::

  {"view1": uint8 (b, S, S, C), "view2": uint8 (b, S, S, C),
   "label": int32 (b,)}

device crops (K = `config.aug.canvas_size`, or S when 0)::

  {"canvas": uint8 (b, K, K, C), "hw": int32 (b, 2) true image size,
   "boxes": int32 (b, 2, 4) (top, left, height, width) per view,
   "flips": bool (b, 2), "label": int32 (b,)}

Both use the same boxes and flips from the same random numbers, so with the
same seed they give the same views up to resampling rounding.

Eval batches (per process, `b = batch_size // process_count`)::

  {"image": uint8 (b, S, S, C), "label": int32 (b,), "mask": bool (b,)}

Checkpointing the pre-training iterator (a `grain.DatasetIterator`)::

  state = it.get_state()          # small JSON-serialisable dict
  it = create_pretrain_iterator(config)
  it.set_state(state)             # next batches = those after the save

The state is the number of global batches consumed (the same on every
process), so `train.py` stores it once per checkpoint and it restores with
any `config.dataset.num_workers` and any number of processes.
"""
from __future__ import annotations

import math
from typing import Any

from absl import logging
import grain
import jax
import numpy as np
from PIL import Image

from bayesncl_jax import config_lib
from bayesncl_jax import datasets

# torchvision RandomResizedCrop defaults.
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
# ImageNet eval: resize the shorter side to S / 0.875, centre crop S.
EVAL_CROP_FRACTION = 0.875


# ----------------------------------------------------------------------------
# Pure image ops (numpy in, numpy out).
# ----------------------------------------------------------------------------


def random_resized_crop_params(
    height: int, width: int, scale: tuple[float, float],
    ratio: tuple[float, float], rng: np.random.Generator,
) -> tuple[int, int, int, int]:
  """Crop box `(top, left, h, w)` with torchvision RandomResizedCrop semantics.

  Ten tries of: area fraction ~ U(scale), log aspect ratio (w/h) ~
  U(log ratio), accepted if the box fits. Otherwise a centre crop of the whole
  image with its aspect ratio clamped into `ratio`.
  """
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def _to_pil(image: np.ndarray) -> Image.Image:
  if image.ndim == 3 and image.shape[-1] == 1:
    return Image.fromarray(image[..., 0], mode="L")
  if image.ndim == 3 and image.shape[-1] == 3:
    return Image.fromarray(image, mode="RGB")
  raise ValueError(f"Expected a uint8 (H, W, 1|3) image, got {image.shape}.")


def _from_pil(pil: Image.Image, channels: int) -> np.ndarray:
  array = np.asarray(pil, dtype=np.uint8)
  return array[..., None] if channels == 1 else array


def _crop_resize(pil: Image.Image, out_h: int, out_w: int,
                 box: tuple[int, int, int, int] | None = None) -> Image.Image:
  """Bicubic resize of `pil` (or of its `(top, left, h, w)` box) to out."""
  pil_box = None
  if box is not None:
    top, left, h, w = box
    pil_box = (left, top, left + w, top + h)
  # PIL crops and resizes in one pass (with antialiasing when shrinking,
  # as torchvision's PIL backend does).
  return pil.resize((out_w, out_h), Image.BICUBIC, box=pil_box)


def resize_bicubic(image: np.ndarray, out_h: int, out_w: int,
                   box: tuple[int, int, int, int] | None = None) -> np.ndarray:
  """Bicubic resize of `image` (or of its `(top, left, h, w)` box) to out."""
  return _from_pil(_crop_resize(_to_pil(image), out_h, out_w, box),
                   image.shape[-1])


def center_crop_resize(image: np.ndarray, size: int,
                       crop_fraction: float = EVAL_CROP_FRACTION) -> np.ndarray:
  """Resize the shorter side to round(size / crop_fraction), centre crop."""
  height, width = image.shape[:2]
  shorter = int(round(size / crop_fraction))
  factor = shorter / min(height, width)
  new_h = max(size, int(round(height * factor)))
  new_w = max(size, int(round(width * factor)))
  resized = resize_bicubic(image, new_h, new_w)
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return resized[top:top + size, left:left + size]


# ----------------------------------------------------------------------------
# Grain transforms (picklable: they travel to the worker processes).
# ----------------------------------------------------------------------------


def draw_view_params(height: int, width: int, crop_scale, hflip_prob: float,
                     rng: np.random.Generator
                     ) -> tuple[tuple[int, int, int, int], bool]:
  """One view's crop box `(top, left, h, w)` and flip, in this order.

  The one sampler of both crop paths: with the same generator state they
  draw the same box and flip.
  """
  box = random_resized_crop_params(height, width, crop_scale, CROP_RATIO, rng)
  return box, bool(rng.random() < hflip_prob)


class TwoViews(grain.transforms.RandomMap):
  """Two independent random-resized-crop + flip views of one example."""

  def __init__(self, image_size: int, crop_scale: tuple[float, float],
               hflip_prob: float):
    self.image_size = int(image_size)
    self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
    self.hflip_prob = float(hflip_prob)

  def _view(self, pil: Image.Image, channels: int,
            rng: np.random.Generator) -> np.ndarray:
    box, flip = draw_view_params(pil.height, pil.width, self.crop_scale,
                                 self.hflip_prob, rng)
    view = _crop_resize(pil, self.image_size, self.image_size, box)
    if flip:
      # In PIL: a numpy [:, ::-1] copy costs ~0.2 ms at 224 px, 10x this.
      view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _from_pil(view, channels)

  def random_map(self, element: dict[str, Any],
                 rng: np.random.Generator) -> dict[str, Any]:
    image = np.asarray(element["image"], dtype=np.uint8)
    pil = _to_pil(image)  # once for both views
    channels = image.shape[-1]
    return {"view1": self._view(pil, channels, rng),
            "view2": self._view(pil, channels, rng),
            "label": np.int32(element["label"])}


class TwoBoxes(grain.transforms.RandomMap):
  """The host half of device crops, per example: the image, two boxes, flips.

  Returns {"image": uint8 (h, w, C), "hw", "boxes", "flips", "label"}.
  Images larger than the K x K canvas (K = canvas_size) are first shrunk
  (PIL bicubic, aspect kept) to fit, and their boxes drawn on the shrunk
  image. Boxes and flips are drawn by `draw_view_params` in the order of
  `TwoViews` (box 1, flip 1, box 2, flip 2), so both paths draw the same
  crops from the same random numbers. `ragged_batch` batches the images at
  their own sizes (worker processes send only their pixels), `CanvasBatch`
  places them on one zeroed canvas array in the main process, and
  `augment.crop_views` cuts the views on the device.
  """

  def __init__(self, canvas_size: int, crop_scale: tuple[float, float],
               hflip_prob: float):
    self.canvas_size = int(canvas_size)
    self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
    self.hflip_prob = float(hflip_prob)

  def fit(self, image: np.ndarray) -> np.ndarray:
    """`image`, shrunk to fit the canvas if it does not."""
    height, width = image.shape[:2]
    k = self.canvas_size
    if height <= k and width <= k:
      return image
    factor = k / max(height, width)
    return resize_bicubic(image, min(k, max(1, round(height * factor))),
                          min(k, max(1, round(width * factor))))

  def random_map(self, element: dict[str, Any],
                 rng: np.random.Generator) -> dict[str, Any]:
    image = self.fit(np.asarray(element["image"], dtype=np.uint8))
    height, width = image.shape[:2]
    boxes, flips = zip(*(draw_view_params(height, width, self.crop_scale,
                                          self.hflip_prob, rng)
                         for _ in range(2)))
    return {"image": image, "hw": np.asarray((height, width), np.int32),
            "boxes": np.asarray(boxes, np.int32),
            "flips": np.asarray(flips, np.bool_),
            "label": np.int32(element["label"])}


def ragged_batch(elements) -> dict[str, Any]:
  """Grain `batch_fn` of device crops: `TwoBoxes` examples -> one batch.

  The images keep their own sizes (a list), so worker processes send only
  their pixels to the main process, where `CanvasBatch` pads them; the
  other fields are stacked.
  """
  out = {"images": [element["image"] for element in elements]}
  for key in ("hw", "boxes", "flips", "label"):
    out[key] = np.stack([element[key] for element in elements])
  return out


class CanvasBatch(grain.transforms.Map):
  """A `ragged_batch` -> the device-crop batch, in the main process.

  The images go into the top-left corners of one zeroed (b, K, K, C) uint8
  array (the padding is never read by `augment.crop_views`, whose weights
  stop at the true height/width): one copy of each image's pixels.
  """

  def __init__(self, canvas_size: int):
    self.canvas_size = int(canvas_size)

  def map(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
    k = self.canvas_size
    images = batch["images"]
    channels = images[0].shape[-1]
    canvas = np.zeros((len(images), k, k, channels), np.uint8)
    for i, image in enumerate(images):
      canvas[i, :image.shape[0], :image.shape[1]] = image
    return {"canvas": canvas, **{key: value for key, value in batch.items()
                                 if key != "images"}}


def two_view_transform(config) -> grain.transforms.RandomMap:
  """`TwoViews` or `TwoBoxes`, as `config.aug.crop_on` says."""
  crop_on = config.aug.get("crop_on", "host")
  if crop_on == "host":
    return TwoViews(config.dataset.image_size, config.aug.crop_scale,
                    config.aug.hflip_prob)
  if crop_on == "device":
    return TwoBoxes(canvas_size(config), config.aug.crop_scale,
                    config.aug.hflip_prob)
  raise ValueError(f"config.aug.crop_on={crop_on!r}; expected one of "
                   f"{config_lib.CROP_ON}.")


def canvas_size(config) -> int:
  """Side of the device-crop canvas: aug.canvas_size, or S when 0."""
  return int(config.aug.get("canvas_size", 0)) or int(
      config.dataset.image_size)


class EvalExample(grain.transforms.Map):
  """Index -> preprocessed example of this process's shard, or padding.

  Process p owns the global indices p, p + P, p + 2P, ...; positions past its
  shard are zero images with label 0 and mask False, so every process yields
  the same number of full batches.
  """

  def __init__(self, source, process_index: int, process_count: int,
               image_size: int, center_crop: bool):
    self.source = source
    self.process_index = process_index
    self.process_count = process_count
    self.image_size = int(image_size)
    self.center_crop = center_crop
    self._channels = None

  def _preprocess(self, image: np.ndarray) -> np.ndarray:
    size = self.image_size
    if self.center_crop:
      return center_crop_resize(image, size)
    if image.shape[:2] == (size, size):
      return image
    return resize_bicubic(image, size, size)

  def map(self, position: int) -> dict[str, Any]:
    index = self.process_index + int(position) * self.process_count
    if index < len(self.source):
      example = self.source[index]
      image = self._preprocess(np.asarray(example["image"], dtype=np.uint8))
      return {"image": np.ascontiguousarray(image),
              "label": np.int32(example["label"]), "mask": np.bool_(True)}
    if self._channels is None:
      self._channels = np.asarray(self.source[0]["image"]).shape[-1]
    return {"image": np.zeros((self.image_size, self.image_size,
                               self._channels), np.uint8),
            "label": np.int32(0), "mask": np.bool_(False)}


# ----------------------------------------------------------------------------
# Iterators.
# ----------------------------------------------------------------------------


def _process_index_count(process_index, process_count) -> tuple[int, int]:
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in "
                     f"[0, process_count={process_count}).")
  return int(process_index), int(process_count)


def _read_options(config) -> grain.ReadOptions:
  buffer = max(0, int(config.dataset.prefetch_buffer))
  # Threads compute whole batches; more threads than buffered batches would
  # sit idle (Grain warns about it).
  return grain.ReadOptions(num_threads=buffer, prefetch_buffer_size=buffer)


def _to_iter_dataset(ds: grain.MapDataset, config,
                     finish: grain.transforms.Map | None = None
                     ) -> grain.IterDataset:
  """Threads (and worker processes) for `ds`; `finish` in this process."""
  ids = ds.to_iter_dataset(_read_options(config))
  if config.dataset.num_workers > 0:
    # Worker w computes batches w, w + W, ...; the main process interleaves
    # them round-robin, so the order does not depend on the worker count.
    ids = ids.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=int(config.dataset.num_workers),
        per_worker_buffer_size=max(1, int(config.dataset.prefetch_buffer))))
  if finish is not None:
    ids = ids.map(finish)
  return ids


class PretrainIterator(grain.DatasetIterator):
  """Endless iterator over pre-training batches; checkpointable.

  The state is the number of batches consumed (plus what identifies the
  stream, checked on restore). `set_state` rebuilds the Grain pipeline
  starting at that batch: batch k is a pure function of (seed, k), so a
  restored iterator yields exactly the batches the saved one would have, with
  any number of workers.
  """

  def __init__(self, batches: grain.MapDataset, config,
               identity: dict[str, Any],
               finish: grain.transforms.Map | None = None):
    super().__init__()
    self._batches = batches
    self._finish = finish
    self._config = config
    self._identity = dict(identity)
    self._next_batch = 0
    self._iterator = None

  def _inner(self):
    if self._iterator is None:
      ds = self._batches
      if self._next_batch:
        ds = ds.slice(slice(self._next_batch, None))
      self._iterator = iter(_to_iter_dataset(ds, self._config,
                                             self._finish))
    return self._iterator

  def __next__(self) -> dict[str, np.ndarray]:
    self._assert_not_closed()
    batch = next(self._inner())
    self._next_batch += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"next_batch": self._next_batch, **self._identity}

  def set_state(self, state: dict[str, Any]) -> None:
    changed = {k: (state.get(k), v) for k, v in self._identity.items()
               if state.get(k) != v}
    if changed:
      # Allowed (e.g. resuming on another number of hosts), but the data
      # stream is then not the one the checkpointed run would have seen.
      logging.warning("Restoring the input iterator with different settings "
                      "(saved, now): %s. The batch count is kept; the exact "
                      "data order is not.", changed)
    self._close_inner()
    self._next_batch = int(state["next_batch"])

  def start_prefetch(self) -> None:
    self._inner().start_prefetch()

  def _close_inner(self) -> None:
    if self._iterator is not None:
      self._iterator.close()
      self._iterator = None

  def close(self) -> None:
    self._close_inner()
    super().close()

  def __str__(self) -> str:
    return f"PretrainIterator(next_batch={self._next_batch}, {self._identity})"


class _RowsOfGlobalBatches(grain.transforms.Map):
  """Local position j -> the element of the global stream this process owns.

  Local batch k of process p is rows `[p*b, (p+1)*b)` of global batch k
  (b = local batch, B = global batch).
  """

  def __init__(self, elements: grain.MapDataset, process_index: int,
               local_batch: int, global_batch: int):
    self.elements = elements
    self.offset = process_index * local_batch
    self.local_batch = local_batch
    self.global_batch = global_batch

  def map(self, position: int) -> dict[str, Any]:
    k, row = divmod(int(position), self.local_batch)
    return self.elements[k * self.global_batch + self.offset + row]


def create_pretrain_iterator(config, *, process_index: int | None = None,
                             process_count: int | None = None,
                             source=None) -> PretrainIterator:
  """Endless iterator of two-view batches; this process's rows of each batch.

  One global stream, the same for any number of processes P: the training
  source shuffled with `config.seed` (a new permutation every epoch), each
  element given its two views with crops and flips that depend on its global
  position alone, cut into global batches of `config.optim.batch_size` B
  (the last partial batch of an epoch runs into the next epoch). Process p
  reads only rows `[p*b, (p+1)*b)` of every global batch, b = B / P, so the
  processes read disjoint examples and the global batch of step t holds the
  same images with the same crops whether the run uses 1 host or 64. The
  iterator state is therefore the global batch count alone, and a checkpoint
  resumes on any number of processes with the data position kept.

  Args:
    config: the full config (reads `seed`, `dataset.*`, `aug.crop_scale`,
      `aug.hflip_prob`, `aug.crop_on`, `aug.canvas_size`,
      `optim.batch_size`).
    process_index: this process; default `jax.process_index()`.
    process_count: number of processes; default `jax.process_count()`.
    source: random-access source to read instead of the configured training
      split (tests and benchmarks).

  Returns:
    A `PretrainIterator`; call `close()` when done (it owns worker processes).
  """
  process_index, process_count = _process_index_count(process_index,
                                                      process_count)
  global_batch = config.optim.batch_size
  if global_batch % process_count:
    raise ValueError(f"config.optim.batch_size={global_batch} is not "
                     f"divisible by the {process_count} processes.")
  local_batch = global_batch // process_count
  if source is None:
    source = datasets.get_source(config.dataset, config.dataset.train_split)
  if len(source) < global_batch:
    raise ValueError(f"The training split holds {len(source)} examples, "
                     f"fewer than one batch of {global_batch} "
                     "(config.optim.batch_size): lower the batch size or "
                     "raise config.dataset.max_train_examples.")
  elements = (grain.MapDataset.source(source).seed(int(config.seed))
              .shuffle()
              # Endless; each epoch gets its own permutation and crops.
              .repeat(None)
              .random_map(two_view_transform(config)))
  # As many local positions as the endless stream has whole global batches.
  num_local = len(elements) // global_batch * local_batch
  device_crops = config.aug.get("crop_on", "host") == "device"
  batch_fn = ragged_batch if device_crops else None
  batches = (grain.MapDataset.range(num_local)
             .map(_RowsOfGlobalBatches(elements, process_index, local_batch,
                                       global_batch))
             .batch(local_batch, drop_remainder=True, batch_fn=batch_fn))
  # Nothing process-specific: the position is the global batch count.
  identity = {"order": "global", "seed": int(config.seed),
              "global_batch_size": global_batch,
              "num_examples": len(source),
              "image_size": int(config.dataset.image_size)}
  return PretrainIterator(
      batches, config, identity,
      finish=CanvasBatch(canvas_size(config)) if device_crops else None)


def num_eval_batches(config, split: str, batch_size: int, *,
                     process_count: int | None = None) -> int:
  """Batches every process yields for `split` (the same on all processes)."""
  _, process_count = _process_index_count(0, process_count)
  local_batch = _local_eval_batch(batch_size, process_count)
  n = datasets.num_examples(config.dataset, split)
  return math.ceil(math.ceil(n / process_count) / local_batch)


def _local_eval_batch(batch_size: int, process_count: int) -> int:
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(f"Eval batch_size={batch_size} must be a positive "
                     f"multiple of the {process_count} processes.")
  return batch_size // process_count


def create_eval_iterator(config, split: str, batch_size: int, *,
                         process_index: int | None = None,
                         process_count: int | None = None):
  """Finite iterator over `split`, each example exactly once across processes.

  Deterministic order, no augmentation. Images are brought to
  `config.dataset.image_size` S: ImageNet-100 by resizing the shorter side to
  round(S / 0.875) and centre-cropping; other datasets are kept as they are
  when already S x S, else resized (bicubic) to S x S.

  Args:
    config: the full config.
    split: split name, e.g. `config.dataset.eval_split`.
    batch_size: GLOBAL batch size; each process yields
      `batch_size // process_count` examples per batch.
    process_index: this process; default `jax.process_index()`.
    process_count: number of processes; default `jax.process_count()`.

  Returns:
    A Grain iterator of `num_eval_batches(...)` batches `{"image", "label",
    "mask"}`; padding examples (only in the last batches) have mask False.
  """
  process_index, process_count = _process_index_count(process_index,
                                                      process_count)
  local_batch = _local_eval_batch(batch_size, process_count)
  source = datasets.get_source(config.dataset, split)
  n_batches = math.ceil(math.ceil(len(source) / process_count) / local_batch)
  element = EvalExample(source, process_index, process_count,
                        config.dataset.image_size,
                        center_crop=config.dataset.name == "imagenet100")
  ds = (grain.MapDataset.range(n_batches * local_batch).map(element)
        .batch(local_batch, drop_remainder=True))
  return iter(_to_iter_dataset(ds, config))
