"""The common interface of the evaluation protocols.

Each protocol is one `Evaluator` subclass in its own module, built from the
`EvalOptions`; `run(ctx)` returns a flat dict of report entries (metric name
-> value) and writes its own files through the `Context`. `describe()`
returns the settings that make its numbers reproducible; they go to
`report["protocol"][name]`. `bayesncl_jax.evaluate` only builds the context,
runs the requested evaluators in a fixed order and writes the report.

The `Context` extracts features lazily, once per split, and caches them: a
protocol that needs the train split's features asks for them, and the next
protocol gets the same arrays. Tests build a context from features directly
(`Context(config, features={...})`), with no model at all.
"""
from __future__ import annotations

import abc
import dataclasses
import io
import time
from typing import Any, Callable, ClassVar

import jax
import ml_collections
import numpy as np
from etils import epath

from bayesncl_jax import config_lib
from bayesncl_jax import datasets
from bayesncl_jax.evaluators import linear_probe

CLASS_NAMES = {
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog",
                "frog", "horse", "ship", "truck"),
}
# The backgrounds testbed keeps Fashion-MNIST's classes.
CLASS_NAMES["fashion_mnist_backgrounds"] = CLASS_NAMES["fashion_mnist"]


# What is kept of the train split's features (the test split keeps all);
# z_pregate (BayesNCL) is what the mechanism protocol chooses its dims on.
TRAIN_FEATURE_KEYS = ("h", "z", "z_raw", "z_pregate")


class EvaluationError(RuntimeError):
  """The workdir cannot be evaluated (no checkpoint, unknown step, ...)."""


# Protocols run by default (fine-tuning trains the whole network: asked
# for by name). `mechanism` reports nothing on datasets without a nuisance
# label.
DEFAULT_PROTOCOLS = ("linear", "knn", "interp", "retrieval",
                     "feature_selection", "grids", "mechanism")
# Older names still accepted on the command line.
PROTOCOL_ALIASES = {"selection": "feature_selection"}


@dataclasses.dataclass(frozen=True)
class EvalOptions:
  """What to evaluate and how; the defaults are the documented protocol.

  Fields left None are taken from the run's `config.eval` (see
  `config_lib.base_config`; configs saved before it existed get its
  defaults) by `resolve`.

  max_examples > 0 keeps only the first max_examples of each split (smoke
  runs; also the training set of the augmented probe and fine-tuning).
  linear_probe: "features" (a probe on h extracted once) or "augmented"
  (crop + flip every epoch through the frozen backbone). probe: optimiser
  and schedule of the linear probe, the feature-selection probes and
  fine-tuning. consistency_top_k = None: the papers' class consistency over
  all activating samples of a dim (§5); an int restricts it to each dim's
  top_k samples by |f|. value_top_k: k of the top-k-by-value consistency
  reported beside it. selection_ks = None: 1, 2, 4, … below D, then D.
  save_features: write eval/features.npz.
  """
  step: int | None = None
  protocols: tuple[str, ...] = DEFAULT_PROTOCOLS
  batch_size: int = 512
  max_examples: int = -1
  linear_probe: str | None = None
  probe: linear_probe.ProbeConfig | None = None
  crop_scale: tuple[float, float] | None = None
  finetune_epochs: int | None = None
  knn_k: int = 20
  knn_temperature: float = 0.07
  consistency_top_k: int | None = None
  value_top_k: int | None = None
  selection_rule: str | None = None
  selection_ks: tuple[int, ...] | None = None
  nuisance_purity_factor: float | None = None
  grid_dims: int = 10
  grid_images: int = 10
  save_features: bool = False
  out_dir: str | None = None  # default: workdir/eval

  def resolve(self, config) -> EvalOptions:
    """A copy with every None taken from config.eval, protocols checked."""
    e = eval_settings(config)
    protocols = tuple(PROTOCOL_ALIASES.get(p, p) for p in self.protocols)
    probe = self.probe or linear_probe.ProbeConfig(
        epochs=int(e.probe_epochs), batch_size=int(e.probe_batch_size),
        lr=float(e.probe_lr), momentum=float(e.probe_momentum),
        weight_decay=float(e.probe_weight_decay),
        standardize=bool(e.probe_standardize),
        optimizer=str(e.probe_optimizer), schedule=str(e.probe_schedule),
        warmup_epochs=float(e.probe_warmup_epochs),
        decay_epochs=tuple(int(x) for x in e.probe_decay_epochs))
    linear_mode = self.linear_probe or str(e.linear_probe)
    if linear_mode not in LINEAR_PROBES:
      raise ValueError(f"linear_probe must be one of {LINEAR_PROBES}, got "
                       f"{linear_mode!r}")
    rule = self.selection_rule or str(e.selection_rule)
    if rule not in SELECTION_RULES:
      raise ValueError(f"selection_rule must be one of {SELECTION_RULES}, "
                       f"got {rule!r}")
    return dataclasses.replace(
        self, protocols=protocols, probe=probe, linear_probe=linear_mode,
        crop_scale=tuple(self.crop_scale or e.crop_scale),
        finetune_epochs=int(self.finetune_epochs or e.finetune_epochs),
        value_top_k=int(self.value_top_k or e.value_top_k),
        selection_rule=rule,
        nuisance_purity_factor=float(self.nuisance_purity_factor
                                     or e.nuisance_purity_factor))


LINEAR_PROBES = config_lib.LINEAR_PROBES
SELECTION_RULES = config_lib.SELECTION_RULES


def eval_settings(config) -> ml_collections.ConfigDict:
  """config.eval over the base defaults (old saved configs have no eval)."""
  settings = config_lib.base_config().eval
  if "eval" in config:
    settings.update(config.eval.to_dict())
  return settings


def class_names(config) -> tuple[str, ...]:
  """Human-readable class names of config.dataset (label i -> names[i])."""
  name = config.dataset.name
  if name in CLASS_NAMES:
    return CLASS_NAMES[name]
  if name == "imagenet100":
    return tuple(datasets.imagenet100_classes())
  return tuple(str(i) for i in range(config.dataset.num_classes))


class Context:
  """A checkpoint under evaluation: its config, features and output folder.

  Args:
    config: the run's config.
    out_dir: folder (local or gs://) the evaluators write to.
    options: the evaluation options.
    setup, state: the built run and its restored state; only needed when a
      split's features are not given.
    features: split name -> features, as `features.extract_features`
      returns them; splits not given are extracted on first use.
    title: what the figures' titles say after the method (e.g. "step 300").
  """

  def __init__(self, config: ml_collections.ConfigDict, out_dir,
               options: EvalOptions = EvalOptions(), *, setup=None,
               state=None, features: dict[str, dict] | None = None,
               title: str = ""):
    self.config = config
    self.title = f"{config.method}, {title}" if title else config.method
    self.options = options
    self.out_dir = epath.Path(out_dir)
    self.setup = setup
    self.state = state
    self.num_classes = int(config.dataset.num_classes)
    self.class_names = class_names(config)
    self.seconds: dict[str, float] = {}
    self.files: list[str] = []
    # Per-dim arrays (D,) the evaluators compute; written to dims.npz.
    self.dim_arrays: dict[str, np.ndarray] = {}
    self._features = dict(features or {})
    self._feature_fn = None

  # -- features --------------------------------------------------------------
  def features(self, split: str) -> dict[str, np.ndarray]:
    """Features of `split` (extracted on first use, then cached)."""
    if split not in self._features:
      if self.setup is None or self.state is None:
        raise EvaluationError(f"No features of split {split!r} were given "
                              "and there is no model to extract them with.")
      from bayesncl_jax.evaluators import features as features_lib  # pylint: disable=g-import-not-at-top
      t = time.time()
      if self._feature_fn is None:
        self._feature_fn = features_lib.make_feature_fn(self.setup)
      # The train split feeds probes, kNN and rankings: the per-dim gate
      # arrays are only read on the test split (host memory: N x D each).
      keys = (TRAIN_FEATURE_KEYS if split == self.config.dataset.train_split
              else None)
      self._features[split] = features_lib.extract_features(
          self.setup, self.state, split, self.options.batch_size,
          self.options.max_examples, self._feature_fn, keys=keys)
      self.seconds["features"] = (self.seconds.get("features", 0.0)
                                  + time.time() - t)
    return self._features[split]

  @property
  def train(self) -> dict[str, np.ndarray]:
    return self.features(self.config.dataset.train_split)

  @property
  def test(self) -> dict[str, np.ndarray]:
    return self.features(self.config.dataset.eval_split)

  def has_features(self, split: str) -> bool:
    return split in self._features

  # -- outputs ---------------------------------------------------------------
  @property
  def is_writer(self) -> bool:
    """Only process 0 writes files (every process computes the metrics)."""
    return jax.process_index() == 0

  def path(self, name: str) -> epath.Path:
    """out_dir / name, with out_dir created."""
    self.out_dir.mkdir(parents=True, exist_ok=True)
    return self.out_dir / name

  def _record(self, name: str) -> bool:
    """Lists name in files (on every process); True on the writer."""
    if name not in self.files:
      self.files.append(name)
    return self.is_writer

  def write_text(self, name: str, text: str) -> None:
    if self.is_writer:
      self.path(name).write_text(text)

  def save_npz(self, name: str, **arrays) -> None:
    """np.savez_compressed into out_dir / name (through epath: gs:// too)."""
    if self._record(name):
      buffer = io.BytesIO()
      np.savez_compressed(buffer, **arrays)
      self.path(name).write_bytes(buffer.getvalue())

  def save_figure(self, name: str, draw: Callable[[epath.Path], None]
                  ) -> None:
    """draw(path) writes a figure to path (a `plots` function)."""
    if self._record(name):
      draw(self.path(name))


class Evaluator(abc.ABC):
  """One protocol. Subclasses set `name` and implement `run`."""
  name: ClassVar[str]

  def __init__(self, options: EvalOptions):
    self.options = options

  @abc.abstractmethod
  def run(self, ctx: Context) -> dict[str, Any]:
    """Computes the protocol's metrics, writes its files; returns metrics."""

  def describe(self, ctx: Context) -> dict[str, Any]:
    """The settings the numbers depend on (report["protocol"][name])."""
    del ctx
    return {}
