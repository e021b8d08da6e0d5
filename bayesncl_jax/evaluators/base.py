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

from bayesncl_jax import datasets
from bayesncl_jax.evaluators import linear_probe

CLASS_NAMES = {
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog",
                "frog", "horse", "ship", "truck"),
}


class EvaluationError(RuntimeError):
  """The workdir cannot be evaluated (no checkpoint, unknown step, ...)."""


@dataclasses.dataclass(frozen=True)
class EvalOptions:
  """What to evaluate and how; the defaults are the documented protocol.

  max_examples > 0 keeps only the first max_examples of each split (smoke
  runs). consistency_top_k = None: class consistency over all activating
  samples of a dim (§5); an int restricts it to each dim's top_k samples.
  selection_ks = None: 1, 2, 4, … below D, then D.
  """
  step: int | None = None
  protocols: tuple[str, ...] = ("linear", "knn", "interp", "selection",
                                "retrieval", "grids")
  batch_size: int = 512
  max_examples: int = -1
  probe: linear_probe.ProbeConfig = linear_probe.ProbeConfig()
  knn_k: int = 20
  knn_temperature: float = 0.07
  consistency_top_k: int | None = None
  selection_ks: tuple[int, ...] | None = None
  grid_dims: int = 10
  grid_images: int = 10
  out_dir: str | None = None  # default: workdir/eval


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
    # Results one evaluator leaves for a later one or for the report writer.
    self.shared: dict[str, Any] = {}
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
      self._features[split] = features_lib.extract_features(
          self.setup, self.state, split, self.options.batch_size,
          self.options.max_examples, self._feature_fn)
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
    """out_dir / name, with out_dir created; the name is listed in files."""
    self.out_dir.mkdir(parents=True, exist_ok=True)
    if name not in self.files:
      self.files.append(name)
    return self.out_dir / name

  def write_text(self, name: str, text: str) -> None:
    if self.is_writer:
      self.path(name).write_text(text)

  def save_npz(self, name: str, **arrays) -> None:
    """np.savez_compressed into out_dir / name (through epath: gs:// too)."""
    if self.is_writer:
      buffer = io.BytesIO()
      np.savez_compressed(buffer, **arrays)
      self.path(name).write_bytes(buffer.getvalue())

  def save_figure(self, name: str, draw: Callable[[epath.Path], None]
                  ) -> None:
    """draw(path) writes a figure to path (a `plots` function)."""
    if self.is_writer:
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
