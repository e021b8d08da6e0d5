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
import shlex
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
from bayesncl_jax import integrity
from bayesncl_jax import losses
from bayesncl_jax import models
from bayesncl_jax import optim
from bayesncl_jax import paths
from bayesncl_jax import preflight
from bayesncl_jax import run_record
from bayesncl_jax import sharding
from bayesncl_jax import throughput


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


class NonFiniteLossError(FloatingPointError):
  """The loss or the gradients became NaN/Inf."""


CheckpointError = integrity.CheckpointError


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


def forward_views(model, params, batch_stats, view1, view2, *,
                  bn_views: str, gate_rng: jax.Array | None = None):
  """Training-mode forward of both views: (outputs, new batch_stats).

  The outputs hold the 2N rows [view 1 of every image; view 2 of every
  image]. `bn_views="separate"` runs the model once per view, as solo-learn
  does: BatchNorm normalises each view's batch on its own and the running
  statistics are updated twice, view 1 then view 2; the gate noise of view v
  is drawn from `fold_in(gate_rng, v)`. `"joint"` runs one batch of 2N rows
  (SimCLR's TensorFlow code) with `gate_rng` itself.
  """
  if bn_views == "joint":
    out, new_vars = model.apply(
        {"params": params, "batch_stats": batch_stats},
        jnp.concatenate([view1, view2]), train=True, gate_rng=gate_rng,
        mutable=["batch_stats"])
    return out, new_vars["batch_stats"]
  if bn_views != "separate":
    raise ValueError(f"Unknown bn_views={bn_views!r}: separate | joint")
  outs = []
  for v, view in enumerate((view1, view2)):
    rng = None if gate_rng is None else jax.random.fold_in(gate_rng, v)
    out, new_vars = model.apply(
        {"params": params, "batch_stats": batch_stats}, view, train=True,
        gate_rng=rng, mutable=["batch_stats"])
    batch_stats = new_vars["batch_stats"]
    outs.append(out)
  return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), *outs), (
      batch_stats)


def make_update_fn(config, model, tx, row_sharding=None):
  """`(state, view1, view2, labels, gate_rng) -> (state, metrics, extras)`.

  The training step after augmentation: forward (`forward_views`), loss,
  gradients, optimiser update. view1, view2: (N, S, S, C) normalised
  float views; labels: (N,). extras = {"grads", "outputs"} for tests that
  compare a step with another implementation (unused outputs cost nothing
  under jit).
  """

  def update(state: TrainState, view1, view2, labels, gate_rng):
    def loss_fn(params):
      out, batch_stats = forward_views(
          model, params, state.batch_stats, view1, view2,
          bn_views=config.model.bn_views, gate_rng=gate_rng)
      loss, metrics = losses.total_loss(
          out, labels, method=config.method,
          temperature=config.loss.temperature,
          kl_weight=config.gate.kl_weight, prior_prob=config.gate.prior_prob,
          row_sharding=row_sharding)
      return loss, (metrics, batch_stats, out)

    (_, (metrics, batch_stats, out)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = _tree_norm(grads)
    for group, sub in grads.items():  # backbone, projector, ...: NaN guard.
      metrics[f"grad_norm/{group}"] = _tree_norm(sub)
    metrics["param_norm"] = _tree_norm(params)
    new_state = TrainState(step=state.step + 1, params=params,
                           batch_stats=batch_stats, opt_state=opt_state)
    return new_state, metrics, {"grads": grads, "outputs": out}

  return update


def make_train_step(setup: Setup):
  """Returns the jitted step `(state, batch, rng) -> (state, metrics)`.

  batch: {"view1", "view2": uint8 (B, S, S, C), "label": int32 (B,)}, or
  the device-crop batch of `input_pipeline` (canvas + boxes; the views are
  cut here by `augment.views_of_batch`), sharded over `data`. The RNG of
  step t is fold_in(rng, t), so a resumed run draws the same augmentations
  and gate noise as an uninterrupted one.
  Augmentation, then `make_update_fn`.
  """
  config, model, tx, mesh = setup.config, setup.model, setup.tx, setup.mesh
  mean, std = tuple(config.dataset.mean), tuple(config.dataset.std)
  dtype = compute_dtype(config)
  main_lr = setup.schedules["main"]
  update = make_update_fn(config, model, tx, sharding.rows_sharding(mesh))

  def step_fn(state: TrainState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    rng_v1, rng_v2, rng_gate = jax.random.split(rng, 3)
    view1, view2 = augment.views_of_batch(batch, config.dataset.image_size)
    view1 = augment.augment_batch(rng_v1, view1, config.aug, mean, std, dtype)
    view2 = augment.augment_batch(rng_v2, view2, config.aug, mean, std, dtype)
    new_state, metrics, _ = update(state, view1, view2, batch["label"],
                                   rng_gate)
    metrics["lr"] = main_lr(state.step)
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
  ckpt_dir = paths.as_path(workdir) / "checkpoints"
  if not paths.is_remote(workdir):
    # Orbax refuses a relative directory at the first save.
    ckpt_dir = epath.Path(os.path.abspath(ckpt_dir))
  return ocp.CheckpointManager(ckpt_dir, options=options,
                               item_names=("state", "data"))


def save_checkpoint(mngr, state: TrainState, data_iter, *, force=False,
                    train_seconds: float | None = None):
  """Saves the state and the data position (one small JSON, process 0).

  `train_seconds` (training time up to this step) goes into the step's
  Orbax custom metadata, committed atomically with the step.
  """
  step = int(jax.device_get(state.step))
  custom = ({} if train_seconds is None
            else {"train_seconds": float(train_seconds)})
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data_iter.get_state())), force=force,
      custom_metadata=custom)


def restore_checkpoint(mngr, setup: Setup, data_iter, step=None,
                       restore_data=True, verify=True,
                       trust_unsealed=False) -> TrainState:
  """Restores the state (into the current sharding) and the data position.

  The data position is the global batch count, so a checkpoint written by
  any number of processes and devices resumes on any other. With `verify`,
  the files are first checked against the checkpoint's manifest
  (`integrity`).

  Any failure — changed bytes, a truncated file, a config whose shapes
  differ — becomes a CheckpointError naming the directory and what to do;
  never a silent fresh start over the user's run.
  """
  ckpt_dir = epath.Path(mngr.directory)
  if step is None:
    committed = integrity.committed_steps(ckpt_dir)
    step = committed[-1] if committed else mngr.latest_step()
  if verify:
    status, detail = integrity.verify(ckpt_dir, step)
    if status == "unsealed" and not trust_unsealed:
      raise CheckpointError(integrity.unsealed_message(
          ckpt_dir, step, [s for s in integrity.committed_steps(ckpt_dir)
                           if s < step]))
    if status == "corrupt":
      others = [s for s in mngr.all_steps() if s != step]
      raise CheckpointError(
          f"The checkpoint of step {step} in {ckpt_dir} is corrupt: {detail}"
          ". Its files changed after it was saved; nothing was restored. "
          + (f"Other checkpoints: steps {sorted(others)} (evaluate one with "
             "--step=N; a training run falls back to the newest intact one "
             "by itself)." if others else "It is the only checkpoint."))
  target = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      setup.abstract_state, setup.state_sharding)
  items = {"state": ocp.args.StandardRestore(target)}
  # Checkpoints written with grain.checkpoint.CheckpointSave (before the data
  # position became global) hold one identical process_i-of-N.json each.
  legacy = sorted((ckpt_dir / str(step) / "data")
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
        f"Could not restore the checkpoint of step {step} in {ckpt_dir}: "
        f"{type(e).__name__}: {e}\nEither it does not fit this config (other "
        "model sizes, method or optimizer than the run was trained with: "
        f"use its config, {ckpt_dir.parent / 'config.json'}, or a new "
        "--workdir for a new config) or it is corrupt.") from e
  return restored["state"]


# ----------------------------------------------------------------------------
# Metrics output.
# ----------------------------------------------------------------------------
class MetricWriter:
  """metrics.jsonl + TensorBoard event files, from process 0 only.

  Local or gs:// (`paths`): on a bucket both files are uploaded whole, at
  most every `paths.REMOTE_FLUSH_SECONDS` and with every checkpoint.
  """

  def __init__(self, workdir, purge_step: int | None = None):
    """purge_step: TensorBoard hides events of steps >= it (a resume)."""
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    paths.ensure_dir(workdir)
    self._jsonl = paths.Appender(paths.join(workdir, "metrics.jsonl"))
    self._tb = paths.tensorboard_writer(paths.join(workdir, "tensorboard"),
                                        purge_step=purge_step)

  def write(self, step: int, scalars: dict[str, float], durable=False):
    """Logs `scalars`; `durable`: on gs:// upload now (checkpoint steps),
    otherwise at most every `paths.REMOTE_FLUSH_SECONDS`."""
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self._jsonl.flush(force=durable)
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, step)
    self._tb.flush(force=durable)

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def _mean_metrics(pending: list[dict[str, jax.Array]]) -> dict[str, float]:
  host = jax.device_get(pending)
  return {k: float(np.mean([m[k] for m in host])) for k in host[0]}


_LOSS_TERMS = ("nce", "online_ce", "kl")


def _nonfinite_groups(tree) -> list[str]:
  """Top-level parameter groups (backbone, projector, ...) holding NaN/Inf."""
  host = jax.device_get(tree)
  return [k for k, v in host.items()
          if not all(np.all(np.isfinite(x)) for x in jax.tree.leaves(v))]


def _check_finite(pending, first_step: int, state: TrainState, config,
                  kept_steps: Callable[[], list[int]], ckpt_dir: str):
  """Raises NonFiniteLossError naming the first step whose loss/grads are bad.

  `pending` holds the metrics of steps first_step + 1, first_step + 2, ...;
  `state` is the state after the last of them. The message names the step,
  the loss terms and the parameter groups (gradients at that step,
  parameters now) that are not finite, and the checkpoint kept.
  """
  host = jax.device_get([(m["loss"], m["grad_norm"]) for m in pending])
  for i, (loss, gnorm) in enumerate(host):
    if np.isfinite(loss) and np.isfinite(gnorm):
      continue
    m = jax.device_get(pending[i])
    bad_step = first_step + i + 1
    terms = [t for t in _LOSS_TERMS if t in m and not np.isfinite(m[t])]
    grad_groups = [k.split("/", 1)[1] for k in sorted(m)
                   if k.startswith("grad_norm/") and not np.isfinite(m[k])]
    param_groups = _nonfinite_groups(state.params)
    last = first_step + len(host)
    what = (f"loss term(s) {', '.join(terms)} (total loss {m['loss']})"
            if terms else f"the total loss ({m['loss']})" if not
            np.isfinite(m["loss"]) else "no loss term (the loss is finite)")
    lines = [f"Training diverged: the first non-finite step is step "
             f"{bad_step}. Non-finite: {what}; gradients of "
             f"{', '.join(grad_groups) or 'no parameter group'}; parameters "
             f"after step {last} in "
             f"{', '.join(param_groups) or 'no parameter group'}."]
    kept = [s for s in kept_steps() if s < bad_step]
    if kept:
      lines.append(f"The newest checkpoint kept is step {kept[-1]} "
                   f"({ckpt_dir}/{kept[-1]}); nothing after step "
                   f"{bad_step - 1} was saved.")
    else:
      lines.append("No checkpoint was saved before it (config.ckpt_every="
                   f"{config.ckpt_every}): a re-run starts from step 0.")
    fixes = []
    if "kl" in terms:
      fixes.append("the gate's KL term: check --config.gate.prior_prob / "
                   "gate.temperature / gate.kl_weight")
    if set(grad_groups) & {"backbone", "projector", "gate_head"}:
      fixes.append(f"a lower learning rate (--config.optim.base_lr, now "
                   f"{config.optim.base_lr}) or a longer warm-up")
    if "classifier" in grad_groups or "online_ce" in terms:
      fixes.append("a lower online-classifier rate (--config.optim."
                   f"classifier_lr, now {config.optim.classifier_lr})")
    if config.model.dtype != "float32":
      fixes.append("--config.model.dtype=float32")
    fixes.append("checking the input data")
    lines.append("Try " + "; ".join(fixes) + ". A changed learning rate "
                 "on a resumed run needs --allow_config_change (recorded) or "
                 "a new --workdir.")
    raise NonFiniteLossError(" ".join(lines))


def load_config(workdir) -> ml_collections.ConfigDict:
  """The config a run in `workdir` (local or gs://) was trained with."""
  path = paths.join(workdir, "config.json")
  if not paths.exists(path):
    raise FileNotFoundError(f"No config.json in {workdir}: is it the workdir "
                            "of a bayesncl_jax.main run?")
  return config_lib.from_dict(paths.read_json(path))


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


def online_eval_iterator(config, num_devices: int, batch_size: int):
  """The test split in global batches of `batch_size`, rounded down to a
  multiple of the `num_devices` devices of the mesh (at least one row each).
  Each process reads batch_size / process_count of every batch."""
  batch_size = max(num_devices, batch_size // num_devices * num_devices)
  return input_pipeline.create_eval_iterator(
      config, config.dataset.eval_split, batch_size)


def online_eval(setup: Setup, state: TrainState, batch_size: int = 512
                ) -> dict[str, float]:
  """Test-split online linear accuracy, feature sparsity, gate open rate."""
  step = make_eval_step(setup)
  it = online_eval_iterator(setup.config, setup.mesh.size, batch_size)
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
# Exit status of a run stopped by a preemption notice (SIGTERM) after saving
# its checkpoint: 128 + SIGTERM, the status shells report for a job ended by
# SIGTERM, so `main && evaluate` does not evaluate an unfinished run and a
# scheduler sees that the job did not complete. Rerunning resumes it.
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM  # 143


# Signals that mean "the machine is going away": SIGTERM (a scheduler, a
# supervisor, systemd stopping everything at a Spot preemption's or a
# maintenance event's ACPI shutdown) and SIGHUP (the terminal or the tmux
# server holding the run goes, which it does when systemd stops it at
# shutdown). Both save and exit with PREEMPTED_EXIT_CODE.
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class _Preemption:
  """A preemption notice (SIGTERM or SIGHUP), as a step at which to save
  and stop.

  One process: a Python SIGTERM handler sets a flag the loop checks after
  every step. Several processes (a pod): a host that gets SIGTERM must not
  stop alone — the checkpoint is a collective save, and the other hosts
  would wait for it forever. JAX's preemption service (started by
  `jax.distributed.initialize`, it catches SIGTERM itself) tells every
  process the same step, the one after the furthest any of them has reached,
  through `reached_preemption_sync_point`, which Orbax's
  `CheckpointManager.reached_preemption` calls; no Python SIGTERM handler
  is installed then, since it would replace the service's. SIGHUP, which
  the service does not watch, is turned into a SIGTERM to this process, so
  that it reaches the service (or, on one process, the same handler).
  """

  def __init__(self, mngr):
    self._mngr = mngr
    self._multi = jax.process_count() > 1
    self.requested = False
    self._previous = {}

  def __enter__(self):
    handlers = {signal.SIGHUP: self._hangup}
    if not self._multi:
      handlers[signal.SIGTERM] = self._handle
    for signum, handler in handlers.items():
      try:
        self._previous[signum] = signal.signal(signum, handler)
      except ValueError:  # not the main thread: preemption handling is off.
        pass
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and exiting.")
    self.requested = True

  def _hangup(self, signum, frame):
    del signum, frame
    logging.warning("SIGHUP received (the terminal or tmux session is "
                    "going away): handled as SIGTERM.")
    os.kill(os.getpid(), signal.SIGTERM)

  def reached(self, step: int) -> bool:
    """Whether to save and stop after `step`; call it after every step."""
    if not self._multi:
      return self.requested
    if self._mngr.reached_preemption(step):
      logging.warning("Preemption notice (SIGTERM) on the pod: all %d "
                      "processes save step %d and exit.",
                      jax.process_count(), step)
      self.requested = True
    return self.requested

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)


def _progress(total, initial, enabled):
  if not enabled or jax.process_index() != 0:
    return None
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
              smoothing=0.1)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       *, mesh=None, kill_after_step: int | None = None,
                       allow_config_change: bool = False,
                       trust_unsealed: bool = False) -> dict[str, Any]:
  """Pre-trains (resuming from `workdir` if it holds a checkpoint).

  Returns the final summary: last logged training metrics, test-split
  online accuracy/sparsity, steps, throughput, training time summed over
  the run's segments. A run that already finished is not touched: its
  summary comes back with "already_finished": True.

  A workdir keeps one run (`run_record`): resuming under a config that
  changes the result raises ConfigChangedError unless
  `allow_config_change`, which records the change. Before the first step
  the data splits and the workdir are checked (`preflight`); the newest
  intact checkpoint is restored (`integrity`).

  `kill_after_step` is fault injection for the resume tests: SIGKILL this
  process once the checkpoint of that step is on disk, as a preempted
  machine would die.
  """
  setup = build(config, mesh)
  mesh = setup.mesh
  workdir = paths.check(workdir)
  if paths.is_remote(workdir):
    paths.ensure_dir(workdir)  # the bucket must exist; writes nothing
  total = setup.total_steps
  record = run_record.RunRecord(workdir)
  diff = record.check_config(config, allow_change=allow_config_change)
  finished = record.finished_summary(total)
  if finished is not None:
    logging.info("%s already finished at step %d; nothing to do.", workdir,
                 total)
    return {**finished, "already_finished": True}
  preflight.check_training(config, workdir)
  paths.ensure_dir(workdir)  # after the checks: a failed start writes nothing
  mngr = checkpoint_manager(workdir, config)
  data_iter = input_pipeline.create_pretrain_iterator(config)
  rng = jax.random.key(config.seed)
  rng_init, rng_train = jax.random.split(rng)

  fallback, prior_seconds = [], 0.0
  if integrity.agreed_latest_step(mngr) is not None:
    state, restored_step, fallback = integrity.restore_newest_intact(
        mngr, workdir, lambda s: restore_checkpoint(mngr, setup, data_iter,
                                                    step=s, verify=False),
        trust_unsealed=trust_unsealed)
    prior_seconds = integrity.prior_train_seconds(
        mngr.directory, restored_step, mngr) or 0.0
    logging.info("Resumed from %s at step %d.", mngr.directory,
                 int(state.step))
  else:
    state = init_state(setup, rng_init)
  start = int(jax.device_get(state.step))
  record.begin(config, step=start, diff=diff, resumed=start > 0,
               fallback=fallback)
  train_step = make_train_step(setup)
  writer = MetricWriter(workdir, purge_step=start + 1)
  sealer = integrity.Sealer(mngr, workdir)
  bar = _progress(total, start, config.progress_bar)
  global_batch = config.optim.batch_size
  pending, pending_start = [], start
  last_scalars: dict[str, float] = record.logged_row(start)
  profiler = throughput.Profiler(config.profile_steps,
                                 paths.join(workdir, "tensorboard"))
  peak = throughput.peak_tflops(mesh.devices.flat[0].device_kind,
                                config.peak_tflops)
  flops_per_step, input_seconds = None, 0.0
  t_start = t_log = time.time()
  preempted = False
  try:
    with _Preemption(mngr) as preemption:
      for step in range(start, total):
        t_input = time.time()
        batch = sharding.make_global_batch(next(data_iter), mesh)
        input_seconds += time.time() - t_input
        if step == start and peak is not None:
          # XLA's FLOP count of one device's step (compiled once: the
          # call below reuses the executable).
          flops_per_step = throughput.compiled_flops(
              train_step.lower(state, batch, rng_train).compile())
        profiler.before_step(step)
        state, metrics = train_step(state, batch, rng_train)
        profiler.after_step(step, metrics)
        pending.append(metrics)
        done = step + 1
        log_now = done % config.log_every == 0 or done == total
        ckpt_now = done % config.ckpt_every == 0 or done == total
        preempted = preemption.reached(done)
        if log_now or ckpt_now or preempted:
          _check_finite(pending, pending_start, state, config,
                        lambda: _kept_steps(sealer), mngr.directory)
          now = time.time()
          scalars = _mean_metrics(pending)
          interval = max(now - t_log, 1e-9)
          scalars["images_per_sec"] = global_batch * len(pending) / interval
          scalars["step_ms"] = 1000 * interval / len(pending)
          scalars["input_ms"] = 1000 * input_seconds / len(pending)
          scalars["compute_ms"] = scalars["step_ms"] - scalars["input_ms"]
          utilisation = throughput.mfu(flops_per_step,
                                       interval / len(pending), peak)
          if utilisation is not None:
            scalars["mfu"] = utilisation
          input_seconds = 0.0
          scalars["epoch"] = done / setup.steps_per_epoch
          # Metrics up to a checkpoint reach the bucket with it.
          writer.write(done, scalars, durable=ckpt_now or preempted)
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
          seconds = prior_seconds + time.time() - t_start
          with sealer.saving(done, seconds):
            save_checkpoint(mngr, state, data_iter, force=preempted,
                            train_seconds=seconds)
        sealer.poll()
        if kill_after_step == done:
          sealer.finish()
          os.kill(os.getpid(), signal.SIGKILL)
        if preempted:
          break
  except BaseException:
    sealer.finish_quietly()
    raise
  finally:
    profiler.close()
    if bar is not None:
      bar.close()
    writer.close()
  sealer.finish()
  elapsed = time.time() - t_start
  summary = {"method": config.method, "step": int(jax.device_get(state.step)),
             "total_steps": total, "preempted": preempted,
             "train_seconds": prior_seconds + elapsed,
             "segment_seconds": elapsed,
             **{f"train_{k}": v for k, v in last_scalars.items()}}
  if not preempted:
    summary.update(online_eval(setup, state))
  del data_iter
  mngr.close()
  if jax.process_index() == 0:
    paths.write_json(paths.join(workdir, "summary.json"), summary)
  record.end(summary)
  return summary


def _kept_steps(sealer) -> list[int]:
  sealer.finish_quietly()
  return integrity.committed_steps(sealer.ckpt_dir)


def format_summary(summary: dict[str, Any], workdir: str | None = None
                   ) -> str:
  """The one-screen end-of-run summary (and, given `workdir`, next steps)."""
  keys = [("method", "method"), ("step", "steps"),
          ("train_seconds", "train time (s)"),
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
  if summary.get("preempted"):
    lines.append(f" preempted at step {summary.get('step')}: re-run the same "
                 "command to resume.")
  elif workdir is not None:
    wd = shlex.quote(os.fspath(workdir))
    tb = shlex.quote(paths.join(workdir, "tensorboard"))
    # The explorer site is a local folder, also for a gs:// workdir.
    site = shlex.quote("explorer" if paths.is_remote(workdir)
                       else paths.join(workdir, "explorer"))
    lines += [" Next: evaluate the representation, browse its features, "
              "look at the curves:",
              f"   python -m bayesncl_jax.evaluate --workdir={wd}",
              f"   python -m bayesncl_jax.explore --workdir={wd} --out={site}",
              f"   (then open {site}/index.html in a browser)",
              f"   tensorboard --logdir={tb}"]
  return "\n".join(lines)


__all__ = ["PREEMPTED_EXIT_CODE", "TrainState", "build", "init_state", "make_train_step",
           "make_update_fn", "forward_views",
           "train_and_evaluate", "restore_checkpoint", "load_config",
           "NonFiniteLossError", "CheckpointError"]
