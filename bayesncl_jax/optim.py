"""LARS with clipped trust ratio, parameter groups and the warmup-cosine lr.

This reproduces the optimiser of the authors' solo-learn code (docs/method.md §3):
the torch `LARS` class with `clip_lr=True, exclude_bias_n_norm=True`, stepped
once per batch with pl_bolts' `LinearWarmupCosineAnnealingLR`.

Per parameter leaf `p` with raw gradient `g`, group weight decay `wd`, group
learning rate `lr_t` at step `t`, trust coefficient `eta` and `eps`:

    if p is not excluded and ||p|| > 0 and ||g|| > 0:
      r = eta * ||p|| / (||g|| + wd * ||p|| + eps)
      if clip_lr: r = min(r / lr_t, 1)
      d = (g + wd * p) * r
    else:
      d = g                               # excluded leaf, or a zero norm
    buf = momentum * buf + d              # buf starts at 0
    p <- p - lr_t * buf

Excluded leaves are biases, normalisation scales and any leaf with ndim <= 1:
they get neither the trust ratio nor weight decay, i.e. plain momentum SGD.

The momentum buffer holds *unscaled* directions and the current lr multiplies
the whole buffer (PyTorch SGD order). `optax.lars` instead accumulates
`lr_t * d`, which only agrees with this when the lr is constant.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bayesncl_jax import config_lib

# Top-level parameter collections -> optimiser parameter group.
_GROUP_OF_COLLECTION = {
    "backbone": "main",
    "projector": "main",
    "gate_head": "gate_head",
    "classifier": "classifier",
}
# Leaf names that are never adapted or decayed, whatever their shape.
_EXCLUDED_LEAF_NAMES = ("bias", "scale")
# solo-learn's LARS default; not a config field because nobody tunes it.
LARS_EPS = 1e-8


def num_train_steps(config, num_train_examples: int) -> tuple[int, int, int]:
  """Returns `(total_steps, warmup_steps, steps_per_epoch)`.

  steps_per_epoch = num_train_examples // batch_size (the last partial batch
  is dropped). total_steps = config.optim.total_steps when > 0, otherwise
  epochs * steps_per_epoch. warmup_steps = warmup_epochs * steps_per_epoch;
  when total_steps overrides epochs, warmup keeps its fraction of the
  schedule, round_half_up(total * warmup_epochs / epochs) (0 if epochs == 0).
  warmup_steps is capped at total_steps.

  Args:
    config: the experiment config (reads `config.optim.*`).
    num_train_examples: examples in the training split actually used.

  Raises:
    config_lib.ConfigError (a ValueError): fewer examples than one batch,
    or nothing to train.
  """
  optim = config.optim
  steps_per_epoch = int(num_train_examples) // int(optim.batch_size)
  if steps_per_epoch == 0:
    raise config_lib.ConfigError(
        f"The training set has {num_train_examples} examples, fewer than one "
        f"batch (config.optim.batch_size={optim.batch_size}); with the last "
        "partial batch dropped there is no training step. Use a smaller "
        "--config.optim.batch_size or more data (dataset.max_train_examples).")
  if optim.total_steps > 0:
    total_steps = int(optim.total_steps)
    if optim.epochs > 0:
      # Half-up rather than Python's banker's rounding: predictable by hand.
      warmup_steps = int(
          math.floor(total_steps * optim.warmup_epochs / optim.epochs + 0.5))
    else:
      warmup_steps = 0
  else:
    total_steps = int(optim.epochs) * steps_per_epoch
    warmup_steps = int(round(optim.warmup_epochs * steps_per_epoch))
  if total_steps <= 0:
    raise config_lib.ConfigError(
        f"config.optim.epochs={optim.epochs} and config.optim.total_steps="
        f"{optim.total_steps} give 0 training steps; set one of them > 0.")
  return total_steps, min(warmup_steps, total_steps), steps_per_epoch


def learning_rate_schedule(peak_lr: float, total_steps: int,
                           warmup_steps: int,
                           warmup_start_lr: float) -> optax.Schedule:
  """Per-step linear warmup then cosine annealing to 0.

      lr(t) = s + (peak - s) * t / W                     for t < W
      lr(t) = peak * (1 + cos(pi * (t - W) / (T - W))) / 2  for W <= t <= T
      lr(t) = 0                                          for t >= T

  with s = warmup_start_lr, W = warmup_steps, T = total_steps. This is
  pl_bolts' LinearWarmupCosineAnnealingLR stepped per batch, except that the
  warmup reaches the peak at t = W (pl_bolts divides by W - 1 and reaches it
  one step earlier); the difference is one warmup step.

  Args:
    peak_lr: lr at the end of warmup.
    total_steps: T > 0, the step at which the lr reaches 0.
    warmup_steps: 0 <= W <= T.
    warmup_start_lr: lr at step 0 (ignored when W == 0).
  """
  if total_steps <= 0 or not 0 <= warmup_steps <= total_steps:
    raise ValueError(f"Need 0 <= warmup_steps ({warmup_steps}) <= total_steps"
                     f" ({total_steps}) and total_steps > 0.")

  def warmup(step):
    # Written out rather than optax.linear_schedule, whose float32
    # (start - peak) + peak form misses warmup_start_lr at step 0 by ~1e-8.
    frac = jnp.minimum(step, warmup_steps) / max(warmup_steps, 1)
    return warmup_start_lr + (peak_lr - warmup_start_lr) * frac

  if warmup_steps == total_steps:
    # optax's cosine rejects 0 decay steps; a cosine over 0 steps is just 0.
    decay = optax.constant_schedule(0.0)
  else:
    decay = optax.cosine_decay_schedule(
        init_value=peak_lr, decay_steps=total_steps - warmup_steps, alpha=0.0)
  return optax.join_schedules([warmup, decay], [warmup_steps])


class ScaleByClippedTrustRatioState(NamedTuple):
  """Step count, to evaluate the lr schedule at the current step."""
  count: jax.Array


def scale_by_clipped_trust_ratio(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float,
    trust_coefficient: float,
    eps: float = LARS_EPS,
    clip_lr: bool = True,
) -> optax.GradientTransformation:
  """solo-learn's LARS direction `d` from the raw gradient `g` (module doc).

      r = eta * ||p|| / (||g|| + wd * ||p|| + eps)
      r = min(r / lr_t, 1)   if clip_lr
      d = (g + wd * p) * r   if ||p|| > 0 and ||g|| > 0, else d = g

  The zero-norm case keeps torch's behaviour: no weight decay either (optax's
  `scale_by_trust_ratio` would return g + wd * p). Must see the raw gradient,
  so it goes first in the chain; `lr_t = learning_rate(count)` with its own
  count, in step with the `scale_by_learning_rate` later in the chain. With
  lr_t == 0 torch's `min(r / 0, 1)` is 1, and so is ours.

  Args:
    learning_rate: the group's lr, a float or a schedule of the step.
    weight_decay: wd, decoupled into the direction as in torch.
    trust_coefficient: eta.
    eps: added to the denominator of r.
    clip_lr: whether to clip the effective LARS lr at the group's lr.
  """

  def init_fn(params):
    del params
    return ScaleByClippedTrustRatioState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("scale_by_clipped_trust_ratio needs params: call "
                       "update(grads, state, params).")
    lr = learning_rate(state.count) if callable(learning_rate) else (
        learning_rate)
    lr = jnp.asarray(lr, jnp.float32)

    def direction(g, p):
      p_norm = jnp.sqrt(jnp.sum(jnp.square(p.astype(jnp.float32))))
      g_norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
      ratio = trust_coefficient * p_norm / (
          g_norm + weight_decay * p_norm + eps)
      if clip_lr:
        ratio = jnp.where(lr > 0, jnp.minimum(ratio / lr, 1.0), 1.0)
      adapted = (g + weight_decay * p) * ratio.astype(g.dtype)
      return jnp.where((p_norm > 0) & (g_norm > 0), adapted, g)

    updates = jax.tree.map(direction, updates, params)
    return updates, ScaleByClippedTrustRatioState(
        count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def _leaf_name(path) -> str:
  last = path[-1]
  return str(getattr(last, "key", getattr(last, "name", last)))


def lars_mask(params) -> optax.Params:
  """True on leaves that get the trust ratio and weight decay.

  False on biases, normalisation scales and any leaf with ndim <= 1.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, p: (p.ndim > 1
                       and _leaf_name(path) not in _EXCLUDED_LEAF_NAMES),
      params)


def lars(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float,
    momentum: float = 0.9,
    trust_coefficient: float = 0.02,
    eps: float = LARS_EPS,
    clip_lr: bool = True,
    mask: optax.Params | Callable[[optax.Params], optax.Params] = lars_mask,
) -> optax.GradientTransformation:
  """One parameter group of solo-learn's torch LARS (module doc for the math).

      d = lars_direction(g, p) on `mask` leaves, g elsewhere
      buf = momentum * buf + d;  update = -lr_t * buf

  Args:
    learning_rate: float or schedule of the step.
    weight_decay: wd on the masked-in leaves.
    momentum: heavy-ball momentum (no dampening, no Nesterov).
    trust_coefficient: eta.
    eps: added to the trust ratio's denominator.
    clip_lr: clip the LARS lr at lr_t.
    mask: pytree (or function of params) of bools, True where LARS applies.
  """
  return optax.chain(
      optax.masked(
          scale_by_clipped_trust_ratio(learning_rate, weight_decay,
                                       trust_coefficient, eps, clip_lr),
          mask),
      optax.trace(decay=momentum, nesterov=False),
      optax.scale_by_learning_rate(learning_rate),
  )


def param_group_labels(params) -> optax.Params:
  """Labels each leaf with its group: main | gate_head | classifier."""

  def label(path, _):
    top = _leaf_name(path[:1])
    if top not in _GROUP_OF_COLLECTION:
      raise ValueError(
          f"Parameter collection {top!r} has no optimiser group; expected top-"
          f"level keys among {sorted(_GROUP_OF_COLLECTION)}.")
    return _GROUP_OF_COLLECTION[top]

  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(
    config, params, total_steps: int, warmup_steps: int
) -> tuple[optax.GradientTransformation, dict[str, optax.Schedule]]:
  """LARS over the parameter groups of docs/method.md §3.

  Peak lrs, B = config.optim.batch_size:
    main (backbone + projector): base_lr * B / 256, wd = weight_decay
    gate_head:                   config.gate.lr (not scaled), wd = weight_decay
    classifier:                  classifier_lr * B / 256, wd = 0
  Each group follows `learning_rate_schedule` to its own peak, from the same
  absolute warmup_start_lr (as pl_bolts does for every torch param group).

  Args:
    config: the experiment config.
    params: the `params` collection (or its shapes); only its tree is read.
    total_steps: from `num_train_steps`.
    warmup_steps: from `num_train_steps`.

  Returns:
    `(tx, schedules)`: the transformation and {group: lr schedule} for the
    groups present in `params` (the trainer logs `schedules["main"]`).
  """
  optim = config.optim
  batch_scale = optim.batch_size / 256.0
  group_hparams = {
      "main": (optim.base_lr * batch_scale, optim.weight_decay),
      "gate_head": (config.gate.lr, optim.weight_decay),
      "classifier": (optim.classifier_lr * batch_scale, 0.0),
  }
  present = set(jax.tree.leaves(param_group_labels(params)))
  schedules, transforms = {}, {}
  for group in sorted(present):
    peak_lr, weight_decay = group_hparams[group]
    schedules[group] = learning_rate_schedule(
        peak_lr, total_steps, warmup_steps, optim.warmup_start_lr)
    transforms[group] = lars(
        schedules[group], weight_decay, momentum=optim.momentum,
        trust_coefficient=optim.trust_coefficient, clip_lr=optim.clip_lr)
  return optax.multi_transform(transforms, param_group_labels), schedules
