"""The config schema shared by every config file, and its validation.

Every file in `configs/` starts from `base_config()` and overrides fields.
`validate(config)` is called before anything is compiled: a wrong value fails
with a message naming the field, the value and what is allowed.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any

import ml_collections

METHODS = ("cl", "ncl", "bayesncl")
NON_NEG = ("none", "relu", "rep_relu", "gelu", "sigmoid", "softplus", "exp",
           "leaky_relu")
GATE_TYPES = ("ste", "gumbel_sigmoid")
GATE_EVAL_MODES = ("hard", "soft")
BACKBONES = ("resnet18", "resnet50")
STEMS = ("cifar", "imagenet")
DTYPES = ("float32", "bfloat16")
CROP_ON = ("host", "device")
DATASETS = ("fashion_mnist", "cifar10", "cifar100", "imagenet100",
            "fashion_mnist_backgrounds")


def base_config() -> ml_collections.ConfigDict:
  """All fields with the authors' CIFAR defaults (METHOD.md §2-4)."""
  c = ml_collections.ConfigDict()
  c.method = "bayesncl"  # cl | ncl | bayesncl
  c.seed = 0

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "cifar10"
  c.dataset.data_dir = ""  # TFDS data dir / IDX folder; "" = library default.
  c.dataset.image_size = 32  # crop size of the pre-training views.
  c.dataset.num_classes = 10
  c.dataset.train_split = "train"
  c.dataset.eval_split = "test"
  c.dataset.max_train_examples = -1  # > 0: use only the first n (smoke runs).
  c.dataset.num_workers = 0  # Grain worker processes for decode + crops.
  c.dataset.prefetch_buffer = 2
  # Per-channel mean / std of the dataset in [0, 1] units.
  c.dataset.mean = (0.4914, 0.4822, 0.4465)
  c.dataset.std = (0.2470, 0.2435, 0.2616)

  # SimCLR augmentations (METHOD.md §4). Host: crops + flips. Device: the rest.
  c.aug = ml_collections.ConfigDict()
  c.aug.crop_scale = (0.08, 1.0)
  c.aug.hflip_prob = 0.5
  # Who cuts and resizes the crops: "host" (PIL) or "device" (in the step;
  # the host sends the image once on a canvas_size^2 canvas, 0 = image_size).
  c.aug.crop_on = "host"
  c.aug.canvas_size = 0
  c.aug.color_jitter_prob = 0.8
  c.aug.brightness = 0.8
  c.aug.contrast = 0.8
  c.aug.saturation = 0.8
  c.aug.hue = 0.2
  c.aug.grayscale_prob = 0.2
  c.aug.blur_prob = 0.0  # authors: off on CIFAR, 0.5 on ImageNet-100.
  c.aug.blur_sigma = (0.1, 2.0)
  c.aug.solarize_prob = 0.0

  c.model = ml_collections.ConfigDict()
  c.model.backbone = "resnet18"
  c.model.width = 64  # channels of the first stage (64 = standard ResNet).
  c.model.stem = "cifar"  # cifar: 3x3/1, no max-pool; imagenet: 7x7/2 + pool.
  # Blocks per stage; () = the standard depth of `backbone`. A small variant
  # of the same code for tests and CPU demos, e.g. (1, 1) with width 16.
  c.model.stage_sizes = ()
  c.model.proj_hidden = 2048
  c.model.proj_out = 256
  c.model.non_neg = "rep_relu"  # ignored (forced "none") for method=cl.
  c.model.dtype = "float32"  # compute dtype; params are always float32.

  c.gate = ml_collections.ConfigDict()  # used by method=bayesncl only.
  c.gate.type = "gumbel_sigmoid"  # ste (authors) | gumbel_sigmoid
  c.gate.temperature = 1.0  # must be > 0.
  c.gate.threshold = 0.5
  c.gate.prior_prob = 0.8
  c.gate.kl_weight = 3e-5
  c.gate.lr = 0.1  # not batch-scaled.
  c.gate.eval_mode = "hard"  # hard: 1[p > threshold]; soft: z * p.

  c.loss = ml_collections.ConfigDict()
  c.loss.temperature = 0.2

  c.optim = ml_collections.ConfigDict()
  c.optim.batch_size = 256  # global batch (images; 2x views).
  c.optim.base_lr = 0.4  # lr = base_lr * batch_size / 256.
  c.optim.weight_decay = 1e-4
  c.optim.momentum = 0.9
  c.optim.trust_coefficient = 0.02
  c.optim.clip_lr = True
  c.optim.classifier_lr = 0.1  # batch-scaled, no weight decay.
  c.optim.epochs = 200
  c.optim.total_steps = -1  # > 0 overrides epochs (smoke runs).
  c.optim.warmup_epochs = 10
  c.optim.warmup_start_lr = 3e-5

  c.log_every = 50
  c.ckpt_every = 1000
  c.keep_ckpts = 3
  c.progress_bar = True
  return c


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses a config argument like "method=ncl,runlocal" (big_vision style).

  Keys must be among `defaults`; values are cast to the default's type; a
  bare key sets a bool to True.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    if key not in defaults:
      raise ConfigError(f"Unknown config argument {key!r} in {arg!r}; known: "
                        f"{', '.join(sorted(defaults))}.")
    kind = type(defaults[key])
    if kind is bool:
      out[key] = (value.lower() in ("1", "true", "yes")) if eq else True
    else:
      out[key] = kind(value)
  return out


def from_dict(d: dict) -> ml_collections.ConfigDict:
  """Rebuilds a config saved as JSON (lists become tuples again)."""
  def convert(v):
    if isinstance(v, dict):
      return ml_collections.ConfigDict({k: convert(x) for k, x in v.items()})
    if isinstance(v, list):
      return tuple(convert(x) for x in v)
    return v
  return convert(d)


def load_file(path: str | os.PathLike, arg: str | None = None,
              overrides: dict[str, Any] | None = None
              ) -> ml_collections.ConfigDict:
  """`get_config(arg)` of the config file at `path`, then dotted overrides.

  The programmatic twin of `--config=path:arg --config.a.b=value` (tests,
  benchmarks): `overrides` maps "a.b" to a value of the field's type.
  """
  spec = importlib.util.spec_from_file_location(
      os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  if overrides:
    config.update_from_flattened_dict(dict(overrides))
  return config


class ConfigError(ValueError):
  """A config field holds a value that cannot work."""


def _choice(config, path: str, allowed):
  value = config
  for part in path.split("."):
    value = value[part]
  if value not in allowed:
    raise ConfigError(
        f"config.{path}={value!r} is not supported; allowed values: "
        f"{', '.join(map(repr, allowed))}. Fix it in the config file or with "
        f"--config.{path}=...")


def _positive(config, path: str, strict: bool = True):
  value = config
  for part in path.split("."):
    value = value[part]
  if value is None or (value <= 0 if strict else value < 0):
    raise ConfigError(
        f"config.{path}={value!r} must be {'>' if strict else '>='} 0. Fix it "
        f"in the config file or with --config.{path}=...")


def _probability(config, path: str):
  value = config
  for part in path.split("."):
    value = value[part]
  if not 0.0 <= value <= 1.0:
    raise ConfigError(f"config.{path}={value!r} must be a probability in "
                      f"[0, 1]. Fix it with --config.{path}=...")


def validate(config, num_devices: int | None = None) -> None:
  """Raises ConfigError naming the first bad field. Call before compiling."""
  _choice(config, "method", METHODS)
  _choice(config, "model.non_neg", NON_NEG)
  _choice(config, "model.backbone", BACKBONES)
  _choice(config, "model.stem", STEMS)
  _choice(config, "model.dtype", DTYPES)
  _choice(config, "dataset.name", DATASETS)
  _choice(config, "gate.type", GATE_TYPES)
  _choice(config, "gate.eval_mode", GATE_EVAL_MODES)
  _choice(config, "aug.crop_on", CROP_ON)
  _positive(config, "aug.canvas_size", strict=False)
  for path in ("gate.temperature", "loss.temperature", "optim.batch_size",
               "model.width", "model.proj_hidden",
               "model.proj_out", "dataset.image_size", "dataset.num_classes",
               "log_every", "ckpt_every", "keep_ckpts"):
    _positive(config, path)
  # base_lr = 0 freezes backbone and projector: the random-encoder baseline
  # (the online classifier still trains at classifier_lr).
  for path in ("optim.base_lr", "optim.weight_decay", "optim.epochs", "optim.warmup_epochs",
               "gate.kl_weight", "gate.lr", "optim.classifier_lr",
               "dataset.num_workers"):
    _positive(config, path, strict=False)
  for path in ("gate.threshold", "aug.hflip_prob", "aug.color_jitter_prob",
               "aug.grayscale_prob", "aug.blur_prob", "aug.solarize_prob",
               "optim.momentum"):
    _probability(config, path)
  if not 0.0 < config.gate.prior_prob < 1.0:
    raise ConfigError(f"config.gate.prior_prob={config.gate.prior_prob!r} "
                      "must be strictly between 0 and 1.")
  lo, hi = config.aug.crop_scale
  if not 0.0 < lo <= hi <= 1.0:
    raise ConfigError(f"config.aug.crop_scale={tuple(config.aug.crop_scale)}"
                      " must satisfy 0 < min <= max <= 1.")
  if config.optim.total_steps <= 0 and config.optim.epochs <= 0:
    raise ConfigError("Either config.optim.epochs or config.optim.total_steps"
                      " must be > 0: there is nothing to train.")
  if any(int(n) <= 0 for n in config.model.stage_sizes):
    raise ConfigError(f"config.model.stage_sizes={tuple(config.model.stage_sizes)}"
                      " must hold positive block counts (or be () for the "
                      "standard depth).")
  if len(config.dataset.mean) != len(config.dataset.std):
    raise ConfigError("config.dataset.mean and config.dataset.std must have "
                      "one entry per image channel each.")
  if any(s <= 0 for s in config.dataset.std):
    raise ConfigError(f"config.dataset.std={tuple(config.dataset.std)} must "
                      "be > 0 in every channel.")
  if num_devices is not None and config.optim.batch_size % num_devices:
    raise ConfigError(
        f"config.optim.batch_size={config.optim.batch_size} is not divisible "
        f"by the {num_devices} devices the batch is sharded over; use a "
        f"multiple of {num_devices}, e.g. --config.optim.batch_size="
        f"{max(num_devices, config.optim.batch_size // num_devices * num_devices)}")
