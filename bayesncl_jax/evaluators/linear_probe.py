"""Offline linear probe: a softmax classifier trained on frozen features.

The features are extracted once (see `evaluate.extract_features`); the probe
then never touches the network again, so a 50-epoch probe over 60k features
is one jitted call of a few seconds instead of 50 passes through a ResNet.

Defaults (the project's fast probe, used by the Fashion-MNIST demo): SGD
with momentum 0.9, no weight decay, a cosine-decayed learning rate,
mini-batches of `batch_size` drawn from a fresh permutation every epoch.
Unlike the authors' probe the features are *standardised* by default with
the train split's per-dim mean and standard deviation: SGD's stable
learning rate then does not depend on the feature scale, which differs by
orders of magnitude between `h` (pooled ReLU maps) and a few selected dims
of the unit-norm `z`; one learning rate serves every protocol. The test
features are standardised with the *train* statistics, so nothing about the
test split leaks into the probe.

The papers' recipes (docs/method.md §5, set by the CIFAR and ImageNet-100
configs) are other values of the same `ProbeConfig`: raw features, LARS or
SGD, warmup-cosine or step schedules. `make_optimizer` builds the optax
transformation for any of them; the augmented probe and fine-tuning
(`supervised.py`) use it too.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bayesncl_jax import optim

__all__ = ["ProbeConfig", "LinearProbe", "train_linear_probe",
           "probe_accuracy", "linear_eval", "make_optimizer", "learning_rate"]

# A dim whose train-split std is below this is constant (e.g. a dead ReLU
# dim of z): it is centred but not scaled, instead of divided by ~0.
_MIN_STD = 1e-6


OPTIMIZERS = ("sgd", "lars")
SCHEDULES = ("cosine", "warmup_cosine", "step", "constant")


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
  """Hyper-parameters of the linear probe (and of fine-tuning).

  optimizer: "sgd" (heavy-ball momentum, PyTorch order; weight decay added
    to the gradient of the weights W, not the bias) or "lars" (solo-learn's
    LARS, `optim.lars`: trust coefficient, clip_lr, bias excluded).
  schedule, per step (T = epochs · steps per epoch):
    "cosine"        lr → 0 by a cosine over T;
    "warmup_cosine" linear warmup from warmup_start_lr over warmup_epochs,
                    then cosine to 0 (`optim.learning_rate_schedule`);
    "step"          lr × 0.1 at each epoch in decay_epochs;
    "constant"      lr throughout.
  lr is used as given (no batch-size scaling). standardize: see the module
  docstring (pre-extracted features only; the augmented probe and
  fine-tuning see images).
  """
  epochs: int = 50
  batch_size: int = 256
  lr: float = 0.1
  momentum: float = 0.9
  weight_decay: float = 0.0
  standardize: bool = True
  seed: int = 0
  optimizer: str = "sgd"
  schedule: str = "cosine"
  warmup_epochs: float = 0.0
  decay_epochs: tuple[int, ...] = ()
  warmup_start_lr: float = 3e-5
  trust_coefficient: float = 0.02
  clip_lr: bool = True

  def __post_init__(self):
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"probe optimizer must be one of {OPTIMIZERS}, got "
                       f"{self.optimizer!r}")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"probe schedule must be one of {SCHEDULES}, got "
                       f"{self.schedule!r}")
    if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
      raise ValueError(f"probe epochs, batch_size and lr must be positive: "
                       f"{self}")
    if not 0 <= self.warmup_epochs <= self.epochs:
      raise ValueError(f"probe warmup_epochs={self.warmup_epochs} must lie "
                       f"in [0, epochs={self.epochs}]")
    object.__setattr__(self, "decay_epochs",
                       tuple(int(e) for e in self.decay_epochs))


def learning_rate(config: ProbeConfig, steps_per_epoch: int
                  ) -> optax.Schedule:
  """The per-step lr schedule of `config` (see ProbeConfig)."""
  total = config.epochs * steps_per_epoch
  if config.schedule == "cosine":
    return optax.cosine_decay_schedule(config.lr, total)
  if config.schedule == "warmup_cosine":
    warmup = min(int(round(config.warmup_epochs * steps_per_epoch)), total)
    return optim.learning_rate_schedule(config.lr, total, warmup,
                                        config.warmup_start_lr)
  if config.schedule == "step":
    return optax.piecewise_constant_schedule(
        config.lr, {e * steps_per_epoch: 0.1 for e in config.decay_epochs})
  return optax.constant_schedule(config.lr)


def _weights_only(params):
  """True on weight matrices (ndim > 1), False on biases."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(config: ProbeConfig, steps_per_epoch: int
                   ) -> optax.GradientTransformation:
  """The optax transformation of `config` (SGD or LARS with its schedule).

  Works on any parameter tree (a probe's {"w", "b"} or a backbone + head):
  weight decay and the LARS trust ratio apply to leaves with ndim > 1 that
  are not named bias/scale (`optim.lars_mask`).
  """
  schedule = learning_rate(config, steps_per_epoch)
  if config.optimizer == "lars":
    return optim.lars(schedule, config.weight_decay, config.momentum,
                      config.trust_coefficient, clip_lr=config.clip_lr)
  return optax.chain(
      optax.masked(optax.add_decayed_weights(config.weight_decay),
                   optim.lars_mask),
      optax.trace(decay=config.momentum, nesterov=False),
      optax.scale_by_learning_rate(schedule))


@flax.struct.dataclass
class LinearProbe:
  """logits = ((x − mean) / std) W + b.

  mean, std: (D,) (zeros / ones without standardisation); w: (D, C); b: (C,).
  """
  mean: jax.Array
  std: jax.Array
  w: jax.Array
  b: jax.Array

  def logits(self, x: jax.Array) -> jax.Array:
    return _logits(self.w, self.b, (x - self.mean) / self.std)


def _logits(w, b, x):
  return jnp.matmul(x, w, precision=jax.lax.Precision.HIGHEST) + b


def _loss(params, x, y):
  """mean_n CE(softmax(x_n W + b), y_n) (weight decay is the optimizer's)."""
  logits = _logits(params["w"], params["b"], x)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


@functools.partial(jax.jit, static_argnames=("num_classes", "config",
                                             "batch_size"))
def _train(x, y, rng, *, num_classes, config, batch_size):
  """All epochs in one compiled loop: fori_loop(epochs) ∘ scan(batches).

  x: (N, D) standardised features, y: (N,) int labels. Each epoch draws a
  permutation and keeps its first ⌊N / B⌋·B indices: the dropped remainder
  changes every epoch, so every sample is seen, and all steps have the
  same shape (one trace). Returns (params, mean loss of the last epoch).
  """
  n, d = x.shape
  steps_per_epoch = n // batch_size
  tx = make_optimizer(config, steps_per_epoch)
  params = {"w": jnp.zeros((d, num_classes), jnp.float32),
            "b": jnp.zeros((num_classes,), jnp.float32)}
  grad_fn = jax.value_and_grad(_loss)

  def step(carry, idx):
    params, opt_state = carry
    loss, grads = grad_fn(params, x[idx], y[idx])
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  def epoch(i, carry):
    params, opt_state, _ = carry
    perm = jax.random.permutation(jax.random.fold_in(rng, i), n)
    batches = perm[:steps_per_epoch * batch_size].reshape(steps_per_epoch,
                                                          batch_size)
    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state),
                                               batches)
    return params, opt_state, jnp.mean(losses)

  params, _, last_loss = jax.lax.fori_loop(
      0, config.epochs, epoch, (params, tx.init(params), jnp.float32(0.0)))
  return params, last_loss


def _as_xy(x: Any, y: Any, name: str) -> tuple[jax.Array, jax.Array]:
  x = np.asarray(x, np.float32)
  y = np.asarray(y)
  if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
    raise ValueError(f"{name}: features must be (N, D) and labels (N,), got "
                     f"{x.shape} and {y.shape}")
  if x.shape[0] < 1 or x.shape[1] < 1:
    raise ValueError(f"{name}: need at least one sample and one dim, got "
                     f"{x.shape}")
  if not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"{name}: labels must be integers, got {y.dtype}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name}: features contain NaN or Inf")
  return jnp.asarray(x), jnp.asarray(y, jnp.int32)


def train_linear_probe(x, y, num_classes: int,
                       config: ProbeConfig = ProbeConfig()
                       ) -> tuple[LinearProbe, float]:
  """Trains a softmax probe on features x (N, D) with labels y (N,).

  Returns (probe, mean cross-entropy of the last epoch). The batch size is
  clipped to N, so tiny feature sets still get ⌊N/B⌋ >= 1 steps per epoch.
  """
  x, y = _as_xy(x, y, "train")
  if int(y.min()) < 0 or int(y.max()) >= num_classes:
    raise ValueError(f"labels must lie in [0, {num_classes})")
  if config.standardize:
    mean = jnp.mean(x, axis=0)
    std = jnp.std(x, axis=0)
    std = jnp.where(std < _MIN_STD, 1.0, std)
  else:
    mean = jnp.zeros((x.shape[1],), jnp.float32)
    std = jnp.ones((x.shape[1],), jnp.float32)
  params, last_loss = _train(
      (x - mean) / std, y, jax.random.key(config.seed),
      num_classes=int(num_classes), config=config,
      batch_size=int(min(config.batch_size, x.shape[0])))
  return LinearProbe(mean, std, params["w"], params["b"]), float(last_loss)


@functools.partial(jax.jit, static_argnames=("top_n",))
def _accuracy(probe: LinearProbe, x, y, top_n):
  """(top-1, top-n) hit rates; ties in the logits go to lower class ids."""
  _, ranked = jax.lax.top_k(probe.logits(x), top_n)        # (N, top_n)
  return (jnp.mean(ranked[:, 0] == y),
          jnp.mean(jnp.any(ranked == y[:, None], axis=1)))


def probe_accuracy(probe: LinearProbe, x, y) -> dict[str, float]:
  """{"top1", "top5"} of the probe on features x (N, D), labels y (N,).

  top5 is the top-min(5, C) accuracy (C = number of classes).
  """
  x, y = _as_xy(x, y, "eval")
  top1, top5 = _accuracy(probe, x, y, min(5, probe.w.shape[1]))
  return {"top1": float(top1), "top5": float(top5)}


def linear_eval(train_x, train_y, test_x, test_y, num_classes: int,
                config: ProbeConfig = ProbeConfig()) -> dict[str, float]:
  """Train on (train_x, train_y), report test top-1/top-5 and train top-1."""
  probe, last_loss = train_linear_probe(train_x, train_y, num_classes, config)
  test = probe_accuracy(probe, test_x, test_y)
  train = probe_accuracy(probe, train_x, train_y)
  return {"top1": test["top1"], "top5": test["top5"],
          "train_top1": train["top1"], "final_train_loss": last_loss}
