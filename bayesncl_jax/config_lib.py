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

from bayesncl_jax import backgrounds

METHODS = ("cl", "ncl", "ncl_topk", "bayesncl")
NON_NEG = ("none", "relu", "rep_relu", "gelu", "sigmoid", "softplus", "exp",
           "leaky_relu")
GATE_TYPES = ("ste", "gumbel_sigmoid", "gumbel_authors")
GATE_MODES = ("hard", "soft")
BACKBONES = ("resnet18", "resnet50")
STEMS = ("cifar", "imagenet")
STEM_PADDINGS = (0, 1, 2)
INITS = ("torch", "flax")
BN_VIEWS = ("separate", "joint")
DTYPES = ("float32", "bfloat16")
CONV_IMPLS = ("auto", "xla", "per_tap", "im2col")  # == conv.CONV_IMPLS
CROP_ON = ("host", "device")
DATASETS = ("fashion_mnist", "cifar10", "cifar100", "imagenet100",
            "fashion_mnist_backgrounds")
LINEAR_PROBES = ("features", "augmented")
PROBE_OPTIMIZERS = ("sgd", "lars")
PROBE_SCHEDULES = ("cosine", "warmup_cosine", "step", "constant")
SELECTION_RULES = ("ncl", "gated_z")


def base_config() -> ml_collections.ConfigDict:
  """All fields with the authors' CIFAR defaults (docs/method.md §2-4)."""
  c = ml_collections.ConfigDict()
  c.method = "bayesncl"  # cl | ncl | ncl_topk | bayesncl
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

  # SimCLR augmentations (docs/method.md §4). Host: crops + flips. Device: the rest.
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
  # Zero padding of the cifar stem's 3x3 conv: the authors' 2 (34x34 maps
  # from 32x32 images) or 1 (size kept). The imagenet stem always pads 3.
  c.model.stem_padding = 2
  # torch: torchvision/PyTorch init (conv kaiming-normal fan_out, BN scale 1,
  # Linear weight and bias ~ U(±1/sqrt(fan_in))), as the authors' code;
  # flax: Flax defaults (LeCun-normal Dense, zero bias) and the last BN scale
  # of each residual block at 0.
  c.model.init = "torch"
  # BatchNorm batch in training: separate = each view's batch on its own,
  # running statistics updated once per view (solo-learn, the authors);
  # joint = both views in one batch of 2N rows (SimCLR's TensorFlow code).
  c.model.bn_views = "separate"
  # Blocks per stage; () = the standard depth of `backbone`. A small variant
  # of the same code for tests and CPU demos, e.g. (1, 1) with width 16.
  c.model.stage_sizes = ()
  c.model.proj_hidden = 2048
  c.model.proj_out = 256
  # method=ncl_topk: entries of σ+(z) kept per sample, 1..proj_out. Our
  # choice (proj_out / 8); the paper's k was not in the material we had.
  c.model.top_k = 32
  c.model.non_neg = "rep_relu"  # ignored (forced "none") for method=cl.
  c.model.dtype = "float32"  # compute dtype; params are always float32.
  # The encoders' convolution gradients on the CPU backend (bayesncl_jax/
  # conv.py): auto = the formulation bench/conv_grad.py measured fastest per
  # shape; xla = XLA's own; per_tap / im2col force one formulation. Other
  # backends (GPU, TPU) always use XLA's convolution, whatever this says.
  c.model.conv_impl = "auto"

  c.gate = ml_collections.ConfigDict()  # used by method=bayesncl only.
  # ste (authors' default, the paper's headline) | gumbel_sigmoid (binary
  # Concrete, logistic noise) | gumbel_authors (their single-Gumbel formula,
  # kept only to reproduce their runs: it opens with prob 1 - exp(-e^a)).
  c.gate.type = "gumbel_sigmoid"
  c.gate.temperature = 1.0  # must be > 0.
  c.gate.threshold = 0.5
  c.gate.prior_prob = 0.8
  c.gate.kl_weight = 3e-5
  c.gate.lr = 0.1  # not batch-scaled.
  c.gate.eval_mode = "hard"  # hard: 1[p > threshold]; soft: z * p.
  # Ablations (docs/method.md §7): train with z * p ("soft") instead of the
  # sampled hard gate; gate head on stop_gradient(h) (isolate=True) or on h;
  # number of Dense layers of the gate head (2 = shaped like the projector).
  c.gate.train_mode = "hard"
  c.gate.isolate = True
  c.gate.depth = 2

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
  # "START:END": a jax.profiler trace of steps START..END-1 into
  # <workdir>/tensorboard (TensorBoard's profile plugin); "" = none.
  c.profile_steps = ""
  # Per-device peak TFLOP/s for the logged MFU; 0 = the table in
  # bayesncl_jax/throughput.py (TPU v4/v5e/v5p/v6e, A100/H100/H200).
  c.peak_tflops = 0.0

  # Offline evaluation (`bayesncl_jax.evaluate`; its flags override these).
  # Defaults: the project's fast probe (the Fashion-MNIST demo); the CIFAR
  # and ImageNet-100 configs set the papers' recipes (docs/method.md §5, §9).
  c.eval = ml_collections.ConfigDict()
  # features: a probe on h extracted once; augmented: random resized crop
  # + flip every epoch through the frozen backbone (solo-learn's probe).
  c.eval.linear_probe = "features"
  c.eval.probe_epochs = 50
  c.eval.probe_batch_size = 256
  c.eval.probe_optimizer = "sgd"  # sgd | lars (eta 0.02, clip_lr)
  c.eval.probe_lr = 0.1  # as given, not batch-scaled.
  c.eval.probe_momentum = 0.9
  c.eval.probe_weight_decay = 0.0
  c.eval.probe_schedule = "cosine"  # cosine | warmup_cosine | step | constant
  c.eval.probe_warmup_epochs = 0.0  # warmup_cosine only.
  c.eval.probe_decay_epochs = ()  # step only: lr x 0.1 at these epochs.
  c.eval.probe_standardize = True  # features probe: train mean/std scaling.
  c.eval.crop_scale = (0.08, 1.0)  # augmented probe and fine-tuning.
  c.eval.finetune_epochs = 30  # fine-tuning: the probe's optimiser.
  c.eval.selection_rule = "ncl"  # ncl (docs/method.md §9) | gated_z
  c.eval.value_top_k = 100  # top-k-by-value class consistency.
  # A dim is a nuisance (e.g. background) dim when its nuisance purity
  # exceeds its class purity and this factor x chance (1 / #values).
  c.eval.nuisance_purity_factor = 1.5
  return c


def use_papers_eval_recipe(c: ml_collections.ConfigDict, recipe: str) -> None:
  """Sets config.eval to the NCL authors' linear-probe recipe (docs/method.md §5).

  Both recipes train the probe on the frozen backbone with random resized
  crops (scale 0.08-1) and flips drawn every epoch, on raw (unstandardised)
  h, batch 256, 50 epochs; fine-tuning (§9) uses the same optimiser for 30.
    "cifar": LARS lr 0.4, weight decay 1e-4, eta 0.02, clip_lr, biases
      excluded; 10 warmup epochs from 3e-5, then cosine (the authors' CIFAR
      linear and fine-tuning configs; §5 itself only says 50 epochs).
    "imagenet100": SGD lr 1.0, momentum 0.9, weight decay 0; the authors'
      step schedule decays at epochs 60 and 80, i.e. never within 50
      epochs, so the lr is 1.0 throughout.
  solo-learn scales these lrs by batch / 256, which is 1 at batch 256.
  """
  e = c.eval
  e.linear_probe = "augmented"
  e.probe_epochs = 50
  e.probe_batch_size = 256
  e.probe_standardize = False
  e.probe_momentum = 0.9
  e.crop_scale = (0.08, 1.0)
  e.finetune_epochs = 30
  if recipe == "cifar":
    e.probe_optimizer = "lars"
    e.probe_lr = 0.4
    e.probe_weight_decay = 1e-4
    e.probe_schedule = "warmup_cosine"
    e.probe_warmup_epochs = 10.0
  elif recipe == "imagenet100":
    e.probe_optimizer = "sgd"
    e.probe_lr = 1.0
    e.probe_weight_decay = 0.0
    e.probe_schedule = "step"
    e.probe_decay_epochs = (60, 80)
  else:
    raise ValueError(f"Unknown eval recipe {recipe!r}: cifar | imagenet100")


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
      if eq and value.lower() not in _BOOL_WORDS:
        raise ConfigError(f"Config argument {key}={value!r} must be a "
                          f"boolean ({', '.join(_BOOL_WORDS)}; or just "
                          f"{key!r} for true).")
      out[key] = _BOOL_WORDS[value.lower()] if eq else True
    else:
      try:
        out[key] = kind(value)
      except ValueError:
        raise ConfigError(f"Config argument {key}={value!r} must be of type "
                          f"{kind.__name__} (default {defaults[key]!r})."
                          ) from None
  return out


_BOOL_WORDS = {"1": True, "true": True, "yes": True,
               "0": False, "false": False, "no": False}

# The config argument of every file in configs/ that selects a variant of
# docs/method.md §2 and §7: method, gate type and the paper's ablations.
VARIANT_ARGS = dict(method="bayesncl", gate="gumbel_sigmoid", top_k=32,
                    soft_gate=False, no_isolation=False, gate_depth=2)


def variant_args(**overrides) -> dict[str, Any]:
  """VARIANT_ARGS with a config file's own defaults (e.g. its top_k)."""
  unknown = set(overrides) - set(VARIANT_ARGS)
  if unknown:
    raise ValueError(f"Not variant arguments: {sorted(unknown)}")
  return {**VARIANT_ARGS, **overrides}


def apply_variant(config: ml_collections.ConfigDict,
                  arg: ml_collections.ConfigDict) -> None:
  """Sets the fields a parsed variant argument names (see VARIANT_ARGS).

    method=cl|ncl|ncl_topk|bayesncl   config.method
    gate=ste|gumbel_sigmoid|gumbel_authors  config.gate.type
    top_k=K                           config.model.top_k (method=ncl_topk)
    soft_gate                         config.gate.train_mode = "soft"
                                      (evaluation keeps gate.eval_mode, hard
                                      by default: the authors' evaluation
                                      always thresholds the gate)
    no_isolation                      config.gate.isolate = False
    gate_depth=N                      config.gate.depth
  """
  config.method = arg.method
  config.gate.type = arg.gate
  config.model.top_k = arg.top_k
  config.gate.train_mode = "soft" if arg.soft_gate else "hard"
  config.gate.isolate = not arg.no_isolation
  config.gate.depth = arg.gate_depth


def from_dict(d: dict) -> ml_collections.ConfigDict:
  """Rebuilds a config saved as JSON (lists become tuples again).

  Fields the JSON lacks (added to `base_config()` after the run was saved,
  e.g. gate.train_mode) take their defaults, so older workdirs still load.
  """
  def convert(v):
    if isinstance(v, dict):
      return ml_collections.ConfigDict({k: convert(x) for k, x in v.items()})
    if isinstance(v, list):
      return tuple(convert(x) for x in v)
    return v

  def fill_missing(config, defaults):
    for k, v in defaults.items():
      if k not in config:
        config[k] = v
      elif isinstance(v, ml_collections.ConfigDict) and isinstance(
          config[k], ml_collections.ConfigDict):
        fill_missing(config[k], v)

  config = convert(d)
  fill_missing(config, base_config())
  return config


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


def parse_profile_steps(spec: str) -> tuple[int, int] | None:
  """"START:END" -> (START, END) with 0 <= START < END; "" -> None."""
  if not spec:
    return None
  start, sep, end = str(spec).partition(":")
  try:
    if not sep:
      raise ValueError(spec)
    start_i, end_i = int(start), int(end)
  except ValueError:
    raise ConfigError(
        f"config.profile_steps={spec!r} must be START:END, two step numbers "
        "(e.g. --config.profile_steps=10:15 traces steps 10 to 14)") from None
  if not 0 <= start_i < end_i:
    raise ConfigError(f"config.profile_steps={spec!r}: expected 0 <= START < "
                     "END (e.g. --config.profile_steps=10:15)")
  return start_i, end_i


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
  _choice(config, "model.stem_padding", STEM_PADDINGS)
  _choice(config, "model.init", INITS)
  _choice(config, "model.bn_views", BN_VIEWS)
  _choice(config, "model.dtype", DTYPES)
  _choice(config, "model.conv_impl", CONV_IMPLS)
  _choice(config, "dataset.name", DATASETS)
  if "background_mode" in config.dataset:
    _choice(config, "dataset.background_mode", backgrounds.BACKGROUND_MODES)
  _choice(config, "gate.type", GATE_TYPES)
  _choice(config, "gate.eval_mode", GATE_MODES)
  _choice(config, "gate.train_mode", GATE_MODES)
  _choice(config, "gate.isolate", (True, False))
  if not (isinstance(config.gate.depth, int) and config.gate.depth >= 1):
    raise ConfigError(
        f"config.gate.depth={config.gate.depth!r} must be an integer >= 1 "
        "(Dense layers of the gate head; the paper ablates 1, 2, 3). Fix it "
        "with --config.gate.depth=2 or the config argument gate_depth=2.")
  if config.method == "ncl_topk" and not (
      isinstance(config.model.top_k, int)
      and 1 <= config.model.top_k <= config.model.proj_out):
    raise ConfigError(
        f"config.model.top_k={config.model.top_k!r} must be an integer in "
        f"1..{config.model.proj_out} (config.model.proj_out) for "
        "method='ncl_topk'. Fix it with --config.model.top_k=K or the config "
        "argument top_k=K.")
  _choice(config, "aug.crop_on", CROP_ON)
  parse_profile_steps(config.get("profile_steps", ""))
  _positive(config, "peak_tflops", strict=False)
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
  if "eval" in config:
    _validate_eval(config)
  if num_devices is not None and config.optim.batch_size % num_devices:
    raise ConfigError(
        f"config.optim.batch_size={config.optim.batch_size} is not divisible "
        f"by the {num_devices} devices the batch is sharded over; use a "
        f"multiple of {num_devices}, e.g. --config.optim.batch_size="
        f"{max(num_devices, config.optim.batch_size // num_devices * num_devices)}")


def _validate_eval(config) -> None:
  """The config.eval fields (configs saved before they existed have none)."""
  _choice(config, "eval.linear_probe", LINEAR_PROBES)
  _choice(config, "eval.probe_optimizer", PROBE_OPTIMIZERS)
  _choice(config, "eval.probe_schedule", PROBE_SCHEDULES)
  _choice(config, "eval.selection_rule", SELECTION_RULES)
  for path in ("eval.probe_epochs", "eval.probe_batch_size", "eval.probe_lr",
               "eval.finetune_epochs", "eval.value_top_k",
               "eval.nuisance_purity_factor"):
    _positive(config, path)
  for path in ("eval.probe_weight_decay", "eval.probe_warmup_epochs"):
    _positive(config, path, strict=False)
  _probability(config, "eval.probe_momentum")
  lo, hi = config.eval.crop_scale
  if not 0.0 < lo <= hi <= 1.0:
    raise ConfigError(f"config.eval.crop_scale={tuple(config.eval.crop_scale)}"
                      " must satisfy 0 < min <= max <= 1.")
  if config.eval.probe_warmup_epochs > config.eval.probe_epochs:
    raise ConfigError(
        f"config.eval.probe_warmup_epochs={config.eval.probe_warmup_epochs} "
        f"exceeds config.eval.probe_epochs={config.eval.probe_epochs}.")
