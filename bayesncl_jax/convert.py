r"""Checkpoints between the authors' PyTorch code (solo-learn) and this project.

Import a solo-learn/Lightning `.ckpt` or a torchvision ResNet `state_dict`
into a new workdir that `bayesncl_jax.evaluate` evaluates and
`bayesncl_jax.main` trains from:

  python -m bayesncl_jax.convert --from_torch=simclr.ckpt --workdir=DIR \
      --config=configs/cifar10.py:method=ncl

Export a workdir's checkpoint (latest, or --step) to a solo-learn-style
`.ckpt` plus a torchvision backbone `state_dict` beside it
(`PATH_backbone.pth`):

  python -m bayesncl_jax.convert --to_torch=out/model.ckpt --workdir=DIR

Import reads the architecture from the tensor shapes (depth, width, stem,
input channels, projector and gate sizes, classes) and prints it; the config
supplies everything shapes cannot tell: the dataset and evaluation settings,
CL vs NCL (`:method=`), the non-negativity, the gate type and the CIFAR
stem's padding (torch checkpoints do not record padding; the authors' CIFAR
stem pads 2, the config default). The imported state is step 0 with fresh
optimiser state: `main` on the workdir starts a new schedule from the
imported weights. Modules a backbone-only `.pth` lacks (projector, gate
head, classifier) are initialised from `config.seed` and listed.

Everything is written to a temporary folder beside DIR and renamed at the
end: a failed import leaves nothing behind. Bad input (not a torch file;
missing, unexpected or mis-shaped tensors; a config that contradicts the
checkpoint) prints one message and exits with status 2.

Needs PyTorch (`pip install .[torch]`). Checkpoints that hold pickled
Python objects besides tensors (Lightning's hyper_parameters) need
--allow_pickle, only for files you trust.
"""
from __future__ import annotations

import json
import os
import sys
import uuid
from typing import Any, Callable

from absl import app
from absl import flags
from flax import traverse_util
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from ml_collections import config_flags

from bayesncl_jax import cli
from bayesncl_jax import config_lib
from bayesncl_jax import input_pipeline
from bayesncl_jax import integrity
from bayesncl_jax import models
from bayesncl_jax import train
from bayesncl_jax.interop import torch_checkpoint as tc

PROVENANCE = "imported_from.json"
EXPORT_KEY = "bayesncl_jax"  # our metadata entry in an exported .ckpt


def _merge(fresh, loaded):
  """`fresh` with every leaf that `loaded` holds replaced."""
  have = traverse_util.flatten_dict(loaded or {})
  return traverse_util.unflatten_dict({
      path: have[path] if have.get(path) is not None else leaf
      for path, leaf in traverse_util.flatten_dict(fresh).items()})


def _plain(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def configure(config: ml_collections.ConfigDict, arch: tc.Architecture,
              ckpt: tc.TorchCheckpoint) -> list[str]:
  """Writes `arch` into `config` (unlocked); returns lines to print.

  Raises InteropError where the config contradicts the checkpoint in a way
  the checkpoint cannot decide (classes, input channels, a BayesNCL config
  for a checkpoint without gate).
  """
  m = config.model
  m.backbone = arch.backbone
  m.stage_sizes = () if arch.standard_depth else tuple(arch.stage_sizes)
  m.width = arch.width
  m.stem = arch.stem
  lines = []
  if arch.proj_hidden:
    m.proj_hidden, m.proj_out = arch.proj_hidden, arch.proj_out
  if arch.gate_layers:
    if arch.gate_layers != 2:
      raise tc.InteropError(
          f"The checkpoint's gate head has {arch.gate_layers} linear layers;"
          " this version of the model builds 2 (Linear -> ReLU -> Linear).")
    if (arch.gate_hidden, arch.gate_out) != (m.proj_hidden, m.proj_out):
      raise tc.InteropError(
          f"The gate head ({arch.feature_dim} -> {arch.gate_hidden} -> "
          f"{arch.gate_out}) and the projector ({arch.feature_dim} -> "
          f"{m.proj_hidden} -> {m.proj_out}) differ in shape; this model "
          "gives both the same MLP shape.")
    if config.method != "bayesncl":
      lines.append(f"method       bayesncl (the checkpoint has a gate head; "
                   f"the config said {config.method})")
    config.method = "bayesncl"
  elif config.method == "bayesncl" and "projector" in ckpt.groups:
    raise tc.InteropError(
        "The checkpoint has a projector but no gating_head: it is a CL or "
        "NCL checkpoint, and the tensors cannot tell which. Pass the method "
        "with the config, e.g. --config=configs/cifar10.py:method=ncl (or "
        ":method=cl).")
  else:
    lines.append(f"method       {config.method} (from the config)")
  if arch.num_classes and arch.num_classes != config.dataset.num_classes:
    raise tc.InteropError(
        f"The checkpoint's online classifier has {arch.num_classes} classes "
        f"but config.dataset.num_classes={config.dataset.num_classes} "
        f"({config.dataset.name}). Use the config of the dataset the "
        "checkpoint was trained on.")
  channels = len(config.dataset.mean)
  if arch.in_channels != channels:
    raise tc.InteropError(
        f"The checkpoint's stem takes {arch.in_channels} input channel(s) "
        f"but {config.dataset.name} images have {channels} "
        f"(config.dataset.mean has {channels} entries). Use the config of "
        "the dataset the checkpoint was trained on.")
  recorded = ckpt.extra.get(EXPORT_KEY, {})
  if arch.stem == "cifar":
    if isinstance(recorded, dict) and "stem_padding" in recorded:
      m.stem_padding = int(recorded["stem_padding"])
      lines.append(f"stem padding {m.stem_padding} (recorded in the "
                   "checkpoint by bayesncl_jax.convert)")
    else:
      lines.append(
          f"stem padding {m.stem_padding} (from the config: torch checkpoints"
          " do not record padding. The authors' CIFAR stem pads 2, the "
          "default; --config.model.stem_padding=1 for a stem that keeps the "
          "image size)")
  gate = (f", gate {config.gate.type}" if config.method == "bayesncl"
          else "")
  non_neg = m.non_neg if config.method != "cl" else "none"
  lines.append(f"non_neg      {non_neg}{gate} (from the config)")
  return lines


def _abstract_variables(config) -> dict[str, Any]:
  model = models.model_from_config(config)
  size = config.dataset.image_size
  shape = (2, size, size, len(config.dataset.mean))
  return jax.eval_shape(
      lambda r: model.init(r, jax.numpy.zeros(shape), train=False),
      jax.random.key(0))


def _new_workdir(workdir: str) -> tuple[epath.Path, epath.Path]:
  """(final path, empty temporary folder beside it)."""
  final = epath.Path(workdir)
  if final.exists() and any(final.iterdir()):
    raise tc.InteropError(
        f"--workdir={workdir} exists and is not empty; the importer writes a "
        "new workdir. Choose another path or delete that one.")
  tmp = final.parent / f".{final.name}.importing-{uuid.uuid4().hex[:8]}"
  tmp.mkdir(parents=True)
  return final, tmp


def _remove(path: epath.Path) -> None:
  if path.exists():
    path.rmtree()


def import_checkpoint(path: str, workdir: str,
                      config: ml_collections.ConfigDict, *,
                      allow_pickle: bool = False, mesh=None,
                      log: Callable[[str], None] = print) -> dict[str, Any]:
  """Converts the torch checkpoint at `path` into a new workdir.

  Returns the provenance record also written to DIR/imported_from.json.
  Raises tc.InteropError (and config_lib.ConfigError) with a message for
  the user; nothing is left in `workdir` then.
  """
  ckpt = tc.read_checkpoint(path, allow_pickle=allow_pickle)
  log(f"Read {ckpt.kind} checkpoint {path}: {ckpt.num_tensors} tensors.")
  arch = tc.infer_architecture(ckpt)
  config = ml_collections.ConfigDict(config.to_dict())
  lines = configure(config, arch, ckpt)
  config_lib.validate(config)
  log("Inferred from the tensor shapes:")
  for line in arch.describe():
    log(f"  {line}")
  log("Not stored in the checkpoint:")
  for line in lines:
    log(f"  {line}")
  abstract = _abstract_variables(config)
  loaded_params, loaded_stats, notes = tc.to_flax(ckpt, arch, abstract)
  fresh_groups = [g for g in ("projector", "gate_head", "classifier")
                  if g in abstract["params"] and g not in ckpt.groups]
  if fresh_groups:
    notes.append(f"initialised from config.seed={config.seed} (not in the "
                 f"checkpoint): {', '.join(fresh_groups)}")
  for note in notes:
    log(f"  {note}")

  final, tmp = _new_workdir(workdir)
  try:
    setup = train.build(config, mesh)
    params, stats = loaded_params, loaded_stats
    if fresh_groups:  # the model's own init for what the file lacks.
      rng_init, _ = jax.random.split(jax.random.key(config.seed))
      fresh = train.init_state(setup, rng_init)
      params = _merge(_plain(fresh.params), loaded_params)
      stats = _merge(_plain(fresh.batch_stats), loaded_stats)
    sharding = setup.state_sharding
    params = jax.device_put(params, sharding.params)
    state = train.TrainState(
        step=jax.device_put(np.zeros((), np.int32), sharding.step),
        params=params,
        batch_stats=jax.device_put(stats, sharding.batch_stats),
        opt_state=jax.device_put(setup.tx.init(params), sharding.opt_state))
    (tmp / "config.json").write_text(config.to_json_best_effort(indent=2))
    data_iter = input_pipeline.create_pretrain_iterator(config)
    mngr = train.checkpoint_manager(os.fspath(tmp), config)
    try:
      train.save_checkpoint(mngr, state, data_iter, force=True)
      mngr.wait_until_finished()
      # Sealed like a training checkpoint: evaluate and main verify it.
      integrity.write_manifest(mngr.directory, 0)
    finally:
      mngr.close()
      data_iter.close()
    record = {
        "source": os.path.abspath(path), "format": ckpt.kind,
        "architecture": {k: (list(v) if isinstance(v, tuple) else v)
                         for k, v in vars(arch).items()},
        "stem_padding": int(config.model.stem_padding),
        "initialised_fresh": fresh_groups, "dropped": ckpt.dropped,
        "num_batches_tracked": tc.num_batches_tracked(ckpt, arch),
        "step": 0,
    }
    (tmp / PROVENANCE).write_text(json.dumps(record, indent=2))
    if final.exists():
      final.rmdir()  # empty (checked above)
    tmp.rename(final)
  except BaseException:
    _remove(tmp)
    raise
  log(f"Wrote {workdir} (config.json, checkpoints/0, {PROVENANCE}). "
      f"Evaluate: python -m bayesncl_jax.evaluate --workdir={workdir}")
  return record


def restore_trees(workdir: str, step: int | None = None
                  ) -> tuple[ml_collections.ConfigDict, int, dict, dict]:
  """(config, step, params, batch_stats) as numpy, without the dataset.

  The checkpoint's files are first checked against its manifest
  (`integrity.verify`): a corrupt one raises CheckpointError, as a
  training or evaluation restore does, instead of exporting garbage.
  """
  config = train.load_config(workdir)
  ckpt_dir = epath.Path(workdir) / "checkpoints"
  if not ckpt_dir.exists():
    raise tc.InteropError(f"No checkpoints in {workdir} ({ckpt_dir} does not"
                          " exist).")
  mngr = ocp.CheckpointManager(
      ckpt_dir, item_handlers={"state": ocp.StandardCheckpointHandler(),
                               "data": ocp.JsonCheckpointHandler()})
  try:
    steps = sorted(mngr.all_steps())
    if not steps or (step is not None and step not in steps):
      raise tc.InteropError(
          f"No checkpoint of step {step if step is not None else '(any)'} in"
          f" {ckpt_dir}; available steps: {steps}.")
    step = steps[-1] if step is None else step
    status, detail = integrity.verify(ckpt_dir, step)
    if status == "corrupt":
      others = [s for s in steps if s != step]
      raise train.CheckpointError(
          f"The checkpoint of step {step} in {ckpt_dir} is corrupt: {detail}"
          ". Its files changed after it was saved; nothing was exported. "
          + (f"Other checkpoints: steps {others} (export one with "
             "--step=N)." if others else "It is the only checkpoint."))
    meta = mngr.item_metadata(step)["state"]
    meta = getattr(meta, "tree", meta)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        meta)
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target),
          data=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax raises many types; all mean the same here.
      raise tc.InteropError(
          f"Could not restore step {step} from {ckpt_dir}: "
          f"{type(e).__name__}: {e}") from e
  finally:
    mngr.close()
  state = restored["state"]
  return config, step, _plain(state["params"]), _plain(state["batch_stats"])


def backbone_path(path: str) -> str:
  """Where the torchvision backbone state_dict goes: PATH_backbone.pth."""
  root, _ = os.path.splitext(path)
  return f"{root}_backbone.pth"


def export_checkpoint(workdir: str, path: str, *, step: int | None = None,
                      log: Callable[[str], None] = print) -> tuple[str, str]:
  """Writes `path` (solo-learn .ckpt) and its `_backbone.pth`; returns both.

  BN num_batches_tracked: the imported values for an unchanged import (step
  0 of an imported workdir), else the number of BN updates of this run
  (2 per step with model.bn_views=separate, 1 with joint).
  """
  config, step, params, batch_stats = restore_trees(workdir, step)
  arch = tc.Architecture.from_config(config)
  provenance = epath.Path(workdir) / PROVENANCE
  counts: dict[str, int] | int
  if step == 0 and provenance.exists():
    counts = json.loads(provenance.read_text()).get("num_batches_tracked", {})
  else:
    counts = step * (2 if config.model.bn_views == "separate" else 1)
  full = tc.to_torch(arch, params, batch_stats, counts)
  backbone = tc.to_torch(arch, params, batch_stats, counts, solo_names=False)
  meta = {"stem_padding": int(config.model.stem_padding),
          "config": config.to_json_best_effort()}
  out_dir = os.path.dirname(os.path.abspath(path))
  os.makedirs(out_dir, exist_ok=True)
  written = []
  try:
    for target, tensors, kw in (
        (path, full, {"extra": {"global_step": int(step), EXPORT_KEY: meta}}),
        (backbone_path(path), backbone, {"state_dict_key": False})):
      tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
      written.append(tmp)
      tc.save(tensors, tmp, **kw)
      os.replace(tmp, target)
      written[-1] = None
  finally:
    for tmp in written:
      if tmp and os.path.exists(tmp):
        os.remove(tmp)
  log(f"Wrote {path} ({len(full)} tensors, solo-learn names, step {step}) "
      f"and {backbone_path(path)} (torchvision backbone state_dict, "
      f"{len(backbone)} tensors).")
  if arch.stem == "cifar":
    log(f"  torchvision needs the CIFAR stem: model.conv1 = nn.Conv2d("
        f"{arch.in_channels}, {arch.width}, 3, 1, {config.model.stem_padding}"
        ", bias=False); model.maxpool = nn.Identity(); model.fc = "
        "nn.Identity()")
  return path, backbone_path(path)


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------
FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("from_torch", None, "Import this .ckpt/.pth into "
                      "--workdir (a new folder).")
  flags.DEFINE_string("to_torch", None, "Export --workdir's checkpoint to "
                      "this .ckpt (and PATH_backbone.pth beside it).")
  flags.DEFINE_string("workdir", None, "The bayesncl_jax workdir.")
  config_flags.DEFINE_config_file(
      "config", None, "Import only: the config of the dataset and evaluation "
      "settings, e.g. configs/cifar10.py:method=ncl.", lock_config=False)
  flags.DEFINE_integer("step", None, "Export only: checkpoint step "
                       "(default: the latest).")
  flags.DEFINE_bool("allow_pickle", False, "Import only: let torch.load "
                    "unpickle Python objects besides tensors (Lightning "
                    "hyper_parameters). Only for files you trust.")
  flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.quiet_library_logs()
  try:
    if bool(FLAGS.from_torch) == bool(FLAGS.to_torch):
      raise tc.InteropError("Give exactly one of --from_torch=PATH (import) "
                            "and --to_torch=PATH (export).")
    if FLAGS.from_torch:
      if FLAGS.config is None:
        raise tc.InteropError(
            "Import needs --config (dataset and evaluation settings), e.g. "
            "--config=configs/cifar10.py:method=ncl.")
      import_checkpoint(FLAGS.from_torch, FLAGS.workdir, FLAGS.config,
                        allow_pickle=FLAGS.allow_pickle)
    else:
      export_checkpoint(FLAGS.workdir, FLAGS.to_torch, step=FLAGS.step)
  except (tc.InteropError, config_lib.ConfigError, FileNotFoundError,
          train.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(cli.EXIT_USER_ERROR)


if __name__ == "__main__":
  define_flags()
  cli.run(main, config_flag="config")
