"""Pre-training: state, the jitted sharded step, the loop, checkpoints, logs.

The state is a plain pytree (`TrainState`), born sharded: its shapes come from
`jax.eval_shape` and `init` is jitted with `out_shardings`. The step is one
`jax.jit` with `NamedSharding`s and the state donated; the host only feeds
uint8 crops (or, with `aug.crop_on=device`, the image and the crop boxes),
all other augmentation happens inside the step.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from typing import Any, Callable

from absl import logging
import flax
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath

from bayesncl_jax import augment
from bayesncl_jax import config_lib
from bayesncl_jax import datasets
from bayesncl_jax import input_pipeline
from bayesncl_jax import losses
from bayesncl_jax import models
from bayesncl_jax import optim
from bayesncl_jax import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


class NonFiniteLossError(FloatingPointError):
  """The loss or the gradients became NaN/Inf."""


class CheckpointError(RuntimeError):
  """A checkpoint in the workdir cannot be restored into this run."""


@dataclasses.dataclass
class Setup:
  """Everything built from a config that the loop and evaluation share."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  model: models.ContrastiveModel
  tx: optax.GradientTransformation
  schedules: dict[str, Callable[[int], float]]
  total_steps: int
  warmup_steps: int
  steps_per_epoch: int
  num_train_examples: int
  image_shape: tuple[int, int, int]
  state_sharding: Any
  abstract_state: Any


def compute_dtype(config) -> jnp.dtype:
  return jnp.dtype(config.model.dtype)


def _init_fn(model, tx, image_shape):
  def init(rng):
    x = jnp.zeros((2, *image_shape), jnp.float32)
    variables = model.init(rng, x, train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables["batch_stats"],
                      opt_state=tx.init(params))
  return init


def build(config, mesh=None) -> Setup:
  """Validates the config and builds model, optimizer and state shardings."""
  mesh = mesh or sharding.make_mesh()
  config_lib.validate(config, num_devices=mesh.size)
  model = models.model_from_config(config)
  num_train = datasets.num_examples(config.dataset,
                                    config.dataset.train_split)
  total, warmup, steps_per_epoch = optim.num_train_steps(config, num_train)
  channels = len(config.dataset.mean)
  size = config.dataset.image_size
  image_shape = (size, size, channels)
  # Params shapes are needed by the optimizer's masks: get them abstractly.
  abstract_vars = jax.eval_shape(
      lambda r: model.init(r, jnp.zeros((2, *image_shape)), train=False),
      jax.random.key(0))
  tx, schedules = optim.make_optimizer(config, abstract_vars["params"],
                                       total, warmup)
  abstract_state = jax.eval_shape(_init_fn(model, tx, image_shape),
                                  jax.random.key(0))
  state_sharding = jax.tree.map(lambda _: sharding.replicated(mesh),
                                abstract_state)
  return Setup(config, mesh, model, tx, schedules, total, warmup,
               steps_per_epoch, num_train, image_shape, state_sharding,
               abstract_state)


def init_state(setup: Setup, rng: jax.Array) -> TrainState:
  """Initialises the state directly in its sharded layout."""
  init = jax.jit(_init_fn(setup.model, setup.tx, setup.image_shape),
                 out_shardings=setup.state_sharding)
  return init(rng)


def _tree_norm(tree) -> jax.Array:
  return optax.global_norm(tree)


def make_train_step(setup: Setup):
  """Returns the jitted step `(state, batch, rng) -> (state, metrics)`.

  batch: {"view1", "view2": uint8 (B, S, S, C), "label": int32 (B,)}, or
  the device-crop batch of `input_pipeline` (canvas + boxes; the views are
  cut here by `augment.views_of_batch`), sharded over `data`. The RNG of
  step t is fold_in(rng, t), so a resumed run draws the same augmentations
  and gate noise as an uninterrupted one.
  """
  config, model, tx, mesh = setup.config, setup.model, setup.tx, setup.mesh
  mean, std = tuple(config.dataset.mean), tuple(config.dataset.std)
  dtype = compute_dtype(config)
  main_lr = setup.schedules["main"]

  def step_fn(state: TrainState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    rng_v1, rng_v2, rng_gate = jax.random.split(rng, 3)
    view1, view2 = augment.views_of_batch(batch, config.dataset.image_size)
    views = jnp.concatenate([
        augment.augment_batch(rng_v1, view1, config.aug, mean, std, dtype),
        augment.augment_batch(rng_v2, view2, config.aug, mean, std, dtype)])

    def loss_fn(params):
      out, new_vars = model.apply(
          {"params": params, "batch_stats": state.batch_stats}, views,
          train=True, gate_rng=rng_gate, mutable=["batch_stats"])
      loss, metrics = losses.total_loss(
          out, batch["label"], method=config.method,
          temperature=config.loss.temperature,
          kl_weight=config.gate.kl_weight, prior_prob=config.gate.prior_prob,
          row_sharding=sharding.rows_sharding(mesh))
      return loss, (metrics, new_vars["batch_stats"])

    (_, (metrics, batch_stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = _tree_norm(grads)
    metrics["param_norm"] = _tree_norm(params)
    metrics["lr"] = main_lr(state.step)
    new_state = TrainState(step=state.step + 1, params=params,
                           batch_stats=batch_stats, opt_state=opt_state)
    return new_state, metrics

  rep = sharding.replicated(mesh)
  return jax.jit(step_fn,
                 in_shardings=(setup.state_sharding,
                               sharding.batch_sharding(mesh), rep),
                 out_shardings=(setup.state_sharding, rep),
                 donate_argnums=0)


# ----------------------------------------------------------------------------
# Checkpoints.
# ----------------------------------------------------------------------------
def checkpoint_manager(workdir, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_ckpts, create=True,
      enable_async_checkpointing=True)
  return ocp.CheckpointManager(epath.Path(workdir) / "checkpoints",
                               options=options,
                               item_names=("state", "data"))


def save_checkpoint(mngr, state: TrainState, data_iter, *, force=False):
  """Saves the state and the data position (one small JSON, process 0)."""
  step = int(jax.device_get(state.step))
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data_iter.get_state())), force=force)


def restore_checkpoint(mngr, setup: Setup, data_iter, step=None,
                       restore_data=True) -> TrainState:
  """Restores the state (into the current sharding) and the data position.

  The data position is the global batch count, so a checkpoint written by
  any number of processes and devices resumes on any other.

  Any failure — a truncated file, a config whose shapes differ — becomes a
  CheckpointError naming the directory and what to do; never a silent
  fresh start over the user's run.
  """
  step = mngr.latest_step() if step is None else step
  target = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      setup.abstract_state, setup.state_sharding)
  items = {"state": ocp.args.StandardRestore(target)}
  # Checkpoints written with grain.checkpoint.CheckpointSave (before the data
  # position became global) hold one identical process_i-of-N.json each.
  legacy = sorted((epath.Path(mngr.directory) / str(step) / "data")
                  .glob("process_*-of-*.json")) if restore_data else []
  if restore_data and not legacy:
    items["data"] = ocp.args.JsonRestore()
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(**items))
    if restore_data:
      data_iter.set_state(json.loads(legacy[0].read_text()) if legacy
                          else restored["data"])
  except Exception as e:  # Orbax raises many types; all mean the same here.
    raise CheckpointError(
        f"Could not restore the checkpoint at step {step} in "
        f"{mngr.directory}: {type(e).__name__}: {e}\n"
        "It is corrupt or was written by an incompatible config (model "
        "sizes, method, optimizer). Use a new --workdir, restore the "
        "original config, or delete that step's folder to fall back to an "
        "older checkpoint.") from e
  return restored["state"]


# ----------------------------------------------------------------------------
# Metrics output.
# ----------------------------------------------------------------------------
class MetricWriter:
  """metrics.jsonl + TensorBoard event files, from process 0 only."""

  def __init__(self, workdir):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict[str, float]):
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self._jsonl.flush()
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, step)
    self._tb.flush()

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def _mean_metrics(pending: list[dict[str, jax.Array]]) -> dict[str, float]:
  host = jax.device_get(pending)
  return {k: float(np.mean([m[k] for m in host])) for k in host[0]}


def _check_finite(pending, first_step: int):
  """Raises NonFiniteLossError at the first step whose loss/grads are bad."""
  host = jax.device_get([(m["loss"], m["grad_norm"]) for m in pending])
  for i, (loss, gnorm) in enumerate(host):
    if not (np.isfinite(loss) and np.isfinite(gnorm)):
      raise NonFiniteLossError(
          f"Non-finite loss ({loss}) or gradient norm ({gnorm}) at step "
          f"{first_step + i}. The run stopped; the last checkpoint saved "
          "before it is kept. Lower the learning rate "
          "(--config.optim.base_lr), check the input data, or use "
          "--config.model.dtype=float32.")


def save_config(workdir, config):
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))


def load_config(workdir) -> ml_collections.ConfigDict:
  """The config a run in `workdir` was trained with."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"No config.json in {workdir}: is it the workdir "
                            "of a bayesncl_jax.main run?")
  with open(path) as f:
    return config_lib.from_dict(json.load(f))


# ----------------------------------------------------------------------------
# Online evaluation on the test split (for the end-of-run summary).
# ----------------------------------------------------------------------------
def make_eval_step(setup: Setup):
  """Jitted eval-mode forward: online-classifier hits and feature stats."""
  config, model = setup.config, setup.model
  mean, std = tuple(config.dataset.mean), tuple(config.dataset.std)
  dtype = compute_dtype(config)

  def step(params, batch_stats, batch):
    x = augment.normalize(batch["image"], mean, std, dtype)
    out = model.apply({"params": params, "batch_stats": batch_stats}, x,
                      train=False)
    mask = batch["mask"].astype(jnp.float32)
    correct = (jnp.argmax(out["logits"], -1) == batch["label"])
    zero = (jnp.abs(out["z"]) <= losses.ZERO_TOL).astype(jnp.float32)
    res = {"correct": jnp.sum(correct * mask), "count": jnp.sum(mask),
           "zeros": jnp.sum(jnp.mean(zero, -1) * mask)}
    if "gate_mask" in out:
      res["open"] = jnp.sum(jnp.mean(out["gate_mask"], -1) * mask)
    return res

  mesh = setup.mesh
  rep = sharding.replicated(mesh)
  return jax.jit(step, in_shardings=(rep, rep, sharding.batch_sharding(mesh)),
                 out_shardings=rep)


def online_eval(setup: Setup, state: TrainState, batch_size: int = 512
                ) -> dict[str, float]:
  """Test-split online linear accuracy, feature sparsity, gate open rate."""
  config = setup.config
  batch_size = max(setup.mesh.size,
                   batch_size // setup.mesh.size * setup.mesh.size)
  step = make_eval_step(setup)
  it = input_pipeline.create_eval_iterator(
      config, config.dataset.eval_split, batch_size // jax.process_count())
  totals = None
  for batch in it:
    res = step(state.params, state.batch_stats,
               sharding.make_global_batch(batch, setup.mesh))
    totals = res if totals is None else jax.tree.map(jnp.add, totals, res)
  totals = jax.device_get(totals)
  n = max(float(totals["count"]), 1.0)
  out = {"test_online_acc": float(totals["correct"]) / n,
         "test_sparsity": float(totals["zeros"]) / n}
  if "open" in totals:
    out["test_gate_open_rate"] = float(totals["open"]) / n
  return out


# ----------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------
class _Preemption:
  """Turns SIGTERM into a flag the loop checks between steps."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: preemption handling is off.
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and exiting.")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _progress(total, initial, enabled):
  if not enabled or jax.process_index() != 0:
    return None
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
              smoothing=0.1)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       *, mesh=None, kill_after_step: int | None = None
                       ) -> dict[str, Any]:
  """Pre-trains (resuming from `workdir` if it holds a checkpoint).

  Returns the final summary: last logged training metrics, test-split
  online accuracy/sparsity, steps, throughput. `kill_after_step` is fault
  injection for the resume tests: SIGKILL this process once the checkpoint
  of that step is on disk, as a preempted machine would die.
  """
  setup = build(config, mesh)
  mesh = setup.mesh
  workdir = os.fspath(workdir)
  mngr = checkpoint_manager(workdir, config)
  data_iter = input_pipeline.create_pretrain_iterator(config)
  rng = jax.random.key(config.seed)
  rng_init, rng_train = jax.random.split(rng)

  if mngr.latest_step() is not None:
    state = restore_checkpoint(mngr, setup, data_iter)
    logging.info("Resumed from %s at step %d.", mngr.directory,
                 int(state.step))
  else:
    state = init_state(setup, rng_init)
  save_config(workdir, config)
  start = int(jax.device_get(state.step))
  total = setup.total_steps
  train_step = make_train_step(setup)
  writer = MetricWriter(workdir)
  bar = _progress(total, start, config.progress_bar)
  global_batch = config.optim.batch_size
  pending, pending_start = [], start
  last_scalars: dict[str, float] = {}
  t_start = t_log = time.time()
  preempted = False
  try:
    with _Preemption() as preemption:
      for step in range(start, total):
        batch = sharding.make_global_batch(next(data_iter), mesh)
        state, metrics = train_step(state, batch, rng_train)
        pending.append(metrics)
        done = step + 1
        log_now = done % config.log_every == 0 or done == total
        ckpt_now = done % config.ckpt_every == 0 or done == total
        preempted = preemption.requested
        if log_now or ckpt_now or preempted:
          _check_finite(pending, pending_start)
          now = time.time()
          scalars = _mean_metrics(pending)
          scalars["images_per_sec"] = global_batch * len(pending) / max(
              now - t_log, 1e-9)
          scalars["epoch"] = done / setup.steps_per_epoch
          writer.write(done, scalars)
          last_scalars = scalars
          if bar is not None:
            bar.update(len(pending))
            bar.set_postfix(loss=f"{scalars['loss']:.3f}",
                            nce=f"{scalars['nce']:.3f}",
                            acc=f"{scalars['online_acc']:.3f}",
                            img_s=f"{scalars['images_per_sec']:.0f}",
                            refresh=False)
          pending, pending_start, t_log = [], done, now
        if ckpt_now or preempted:
          save_checkpoint(mngr, state, data_iter, force=preempted)
        if kill_after_step == done:
          mngr.wait_until_finished()
          os.kill(os.getpid(), signal.SIGKILL)
        if preempted:
          break
  finally:
    mngr.wait_until_finished()
    if bar is not None:
      bar.close()
    writer.close()
  elapsed = time.time() - t_start
  summary = {"method": config.method, "step": int(jax.device_get(state.step)),
             "total_steps": total, "preempted": preempted,
             "train_seconds": elapsed,
             **{f"train_{k}": v for k, v in last_scalars.items()}}
  if not preempted:
    summary.update(online_eval(setup, state))
  del data_iter
  mngr.close()
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  return summary


def format_summary(summary: dict[str, Any]) -> str:
  """The one-screen end-of-run summary."""
  keys = [("method", "method"), ("step", "steps"),
          ("train_seconds", "wall time (s)"),
          ("train_loss", "train loss"), ("train_nce", "NT-Xent"),
          ("train_kl", "gate KL"), ("train_online_acc", "online acc (train)"),
          ("test_online_acc", "online linear acc (test)"),
          ("test_sparsity", "feature sparsity (test)"),
          ("test_gate_open_rate", "gate open rate (test)"),
          ("train_images_per_sec", "images/s (last interval)")]
  lines = ["", "=" * 44, " bayesncl_jax run summary", "=" * 44]
  for key, label in keys:
    if key in summary:
      v = summary[key]
      v = f"{v:.4f}" if isinstance(v, float) else str(v)
      lines.append(f" {label:<28}{v:>15}")
  lines.append("=" * 44)
  return "\n".join(lines)


__all__ = ["TrainState", "build", "init_state", "make_train_step",
           "train_and_evaluate", "restore_checkpoint", "load_config",
           "NonFiniteLossError", "CheckpointError"]
