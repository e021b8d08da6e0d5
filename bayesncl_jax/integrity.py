"""Checkpoint integrity: checksums, verification, fallback, full disks.

Orbax writes a checkpoint into a temporary folder and renames it when the
save commits, so a crash mid-save never leaves a half-written step folder.
It does not notice bytes that change afterwards (a bad disk, a careless
copy, a tool that edits files): such a checkpoint restores "successfully"
into garbage. So once a save has committed, process 0 writes a manifest
beside the step folder,

    checkpoints/<step>.manifest.json = {"step", "files": {relative path:
        {"size", "sha256"}}, "train_seconds"}

and a restore first checks the files against it. A manifest is written
when the next save starts (Orbax waits for the previous save there anyway)
or when the run ends, so the newest checkpoint of a killed run may have
none yet. Such an *unsealed* checkpoint (or one written before manifests
existed) cannot be checked: it is restored only with --trust_unsealed,
and sealed once it restored with finite values. A manifest of the wrong
JSON shape counts as corrupt. Manifests are written atomically
(`atomic`).

Committed steps are Orbax's own list (`ocp.utils.checkpoint_steps`): on
gs:// Orbax writes a step in place and marks it done with
`commit_success.txt`, so a folder name alone does not mean a finished save.

`train_seconds` is the training time up to that checkpoint, summed over
the run's segments: a resumed run continues the count from it. It is saved
in the step's Orbax custom metadata (atomically with the step) and copied
into the manifest; there is no side file to tear.

A corrupt checkpoint is never deleted. When an older intact one exists the
run resumes from it and the corrupt folder is moved to
`<workdir>/corrupt_checkpoints/` (Orbax could not save that step again
while its folder is in the way); when none is intact, nothing is changed
and the error says so.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import shutil
import time
from typing import Any, Iterable

from absl import logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from bayesncl_jax import atomic

MANIFEST_SUFFIX = ".manifest.json"
QUARANTINE_DIR = "corrupt_checkpoints"


class CheckpointError(RuntimeError):
  """A checkpoint in the workdir cannot be restored into this run."""


class DiskFullError(OSError):
  """No space left on the device while saving; earlier checkpoints kept."""


# ----------------------------------------------------------------------------
# Manifests.
# ----------------------------------------------------------------------------
def step_dir(ckpt_dir, step: int) -> epath.Path:
  return epath.Path(ckpt_dir) / str(step)


def manifest_path(ckpt_dir, step: int) -> epath.Path:
  return epath.Path(ckpt_dir) / f"{step}{MANIFEST_SUFFIX}"


def _files(folder: epath.Path) -> list[epath.Path]:
  out = []
  for path in folder.iterdir():  # (epath has no recursive glob on GCS)
    out += _files(path) if path.is_dir() else [path]
  return sorted(out, key=str)


def _sha256(path: epath.Path) -> str:
  with path.open("rb") as f:     # local or gs:// (fsspec files readinto)
    return hashlib.file_digest(f, "sha256").hexdigest()


def fingerprint(folder) -> dict[str, dict[str, Any]]:
  """{relative path: {"size", "sha256"}} of every file under `folder`."""
  folder = epath.Path(folder)
  out = {}
  for path in _files(folder):
    rel = str(path.relative_to(folder))
    out[rel] = {"size": path.stat().length, "sha256": _sha256(path)}
  return out


def write_manifest(ckpt_dir, step: int, **extra) -> epath.Path:
  """Checksums the committed step folder into `<step>.manifest.json`."""
  record = {"step": int(step), "files": fingerprint(step_dir(ckpt_dir, step)),
            "sealed": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}
  path = manifest_path(ckpt_dir, step)
  atomic.write_text(path, json.dumps(record, indent=1))
  return path


def _shape_problem(manifest: Any) -> str | None:
  """Why `manifest` is not a manifest (None if it has the right shape)."""
  if not isinstance(manifest, dict):
    return f"a JSON {type(manifest).__name__}, not an object"
  files = manifest.get("files")
  if files is None:
    return None
  if not isinstance(files, dict):
    return "its 'files' is not an object"
  for rel, want in files.items():
    if not (isinstance(want, dict) and isinstance(want.get("size"), int)
            and isinstance(want.get("sha256"), str)):
      return f"its entry for {rel!r} has no integer size and sha256 string"
  return None


def read_manifest(ckpt_dir, step: int) -> dict[str, Any] | None:
  path = manifest_path(ckpt_dir, step)
  if not path.exists():
    return None
  try:
    manifest = json.loads(path.read_text())
  except (ValueError, OSError) as e:
    return {"unreadable": f"{type(e).__name__}: {e}"}
  problem = _shape_problem(manifest)
  if problem:
    return {"unreadable": f"wrong shape: {problem}"}
  return manifest


def verify(ckpt_dir, step: int) -> tuple[str, str]:
  """("intact" | "unsealed" | "corrupt", detail) of checkpoint `step`.

  "unsealed": no manifest (written before manifests existed, or the run
  died before writing it); its bytes cannot be checked.
  """
  manifest = read_manifest(ckpt_dir, step)
  if manifest is None:
    return "unsealed", "no manifest"
  if "unreadable" in manifest:
    return "corrupt", f"its manifest is unreadable ({manifest['unreadable']})"
  if manifest.get("files") is None:
    return "unsealed", "saved, not yet checksummed"
  folder = step_dir(ckpt_dir, step)
  if not folder.exists():
    return "corrupt", f"{folder} is missing"
  expected = manifest.get("files", {})
  problems = []
  for rel, want in sorted(expected.items()):
    path = folder / rel
    if not path.exists():
      problems.append(f"{rel} is missing")
      continue
    size = path.stat().length
    if size != want["size"]:
      problems.append(f"{rel} has {size} bytes, {want['size']} when saved")
    elif _sha256(path) != want["sha256"]:
      problems.append(f"{rel} has other bytes than when saved (same size, "
                      "different SHA-256)")
  if problems:
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return "corrupt", "; ".join(problems[:3]) + more
  return "intact", f"{len(expected)} files match their SHA-256"


def committed_steps(ckpt_dir) -> list[int]:
  """Steps Orbax has committed, by Orbax's own test: locally a step folder
  without the temporary suffix, on gs:// one with its `commit_success.txt`
  (a step written in place whose save did not finish is not listed)."""
  ckpt_dir = epath.Path(ckpt_dir)
  if not ckpt_dir.exists():
    return []
  return sorted(s for s in ocp.utils.checkpoint_steps(ckpt_dir))


def prune_manifests(ckpt_dir) -> None:
  """Drops manifests of steps Orbax removed (keep_ckpts)."""
  ckpt_dir = epath.Path(ckpt_dir)
  present = set(committed_steps(ckpt_dir))
  for path in ckpt_dir.glob(f"*{MANIFEST_SUFFIX}"):
    step = path.name[:-len(MANIFEST_SUFFIX)]
    if step.isdigit() and int(step) not in present:
      path.unlink()


def quarantine(workdir, ckpt_dir, step: int) -> epath.Path:
  """Moves a corrupt step folder (and its manifest) out of Orbax's way."""
  dest_root = epath.Path(workdir) / QUARANTINE_DIR
  dest_root.mkdir(parents=True, exist_ok=True)
  dest = dest_root / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
  step_dir(ckpt_dir, step).rename(dest)
  manifest = manifest_path(ckpt_dir, step)
  if manifest.exists():
    manifest.rename(dest_root / (dest.name + MANIFEST_SUFFIX))
  return dest


# ----------------------------------------------------------------------------
# Disk full.
# ----------------------------------------------------------------------------
def _chain(exc: BaseException | None) -> Iterable[BaseException]:
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    yield exc
    exc = exc.__cause__ or exc.__context__


def is_disk_full(exc: BaseException) -> bool:
  """ENOSPC anywhere in the chain (Orbax/TensorStore wrap it in ValueError)."""
  for e in _chain(exc):
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    text = str(e)
    if ("No space left on device" in text or "os_error_code='28'" in text
        or "Disk quota exceeded" in text):
      return True
  return False


def _mb(n: float) -> str:
  return f"{n / 1e6:.1f} MB"


def space_note(folder, kept: list[int] = ()) -> str:
  """" N MB are free there; a checkpoint takes about M MB." (local only)."""
  text = str(folder)
  if text.startswith("gs://"):
    return ""
  probe = epath.Path(text)
  while not probe.exists() and probe.parent != probe:
    probe = probe.parent
  try:
    free = shutil.disk_usage(str(probe)).free
  except OSError:
    return ""
  note = f" {_mb(free)} are free there"
  if kept:
    size = sum(p.stat().length for p in _files(step_dir(folder, kept[-1])))
    note += (f"; one checkpoint takes about {_mb(size)} (step {kept[-1]}): "
             "free at least that much")
  return note + "."


def disk_full_message(ckpt_dir, step: int | None) -> str:
  kept = committed_steps(ckpt_dir)
  what = (f"the checkpoint of step {step}" if step is not None
          else "a checkpoint")
  if kept:
    after = (f"The checkpoints already saved (step(s) "
             f"{', '.join(map(str, kept))}) were not touched. ")
    resume = f"it resumes from step {kept[-1]}"
  else:
    after = "No earlier checkpoint exists. "
    resume = "it starts from step 0"
  return (f"The disk is full: no space left on the device while saving "
          f"{what} to {ckpt_dir}.{space_note(ckpt_dir, kept)} {after}"
          "Free space on that disk (or keep "
          "fewer checkpoints: --config.keep_ckpts=N is a harmless change) "
          f"and re-run the same command: {resume}.")


# ----------------------------------------------------------------------------
# Saving with manifests.
# ----------------------------------------------------------------------------
class Sealer:
  """Writes manifests for committed saves; turns ENOSPC into DiskFullError.

  Use `with sealer.saving(step, train_seconds): manager.save(...)` around
  every save and `finish()` after the last one.
  """

  def __init__(self, mngr, workdir):
    self.mngr = mngr
    self.workdir = workdir
    self.ckpt_dir = epath.Path(mngr.directory)
    self._pending: dict[int, float] = {}  # step -> train seconds
    self._writer = jax.process_index() == 0
    self._failed = False

  def _seal_committed(self):
    committed = set(committed_steps(self.ckpt_dir))
    for step in sorted(self._pending):
      if step in committed:
        if self._writer:
          write_manifest(self.ckpt_dir, step,
                         train_seconds=self._pending[step])
      del self._pending[step]
    if self._writer:
      prune_manifests(self.ckpt_dir)

  def _raise(self, e: Exception, step: int | None):
    self._failed = True
    if is_disk_full(e):
      raise DiskFullError(errno.ENOSPC,
                          disk_full_message(self.ckpt_dir, step)) from e
    raise e

  def _wait(self, step):
    try:
      self.mngr.wait_until_finished()
      self._seal_committed()
    except Exception as e:  # Orbax re-raises the save's failure here.
      self._raise(e, step)

  @contextlib.contextmanager
  def saving(self, step: int, train_seconds: float):
    previous = max(self._pending) if self._pending else None
    self._wait(previous)
    try:
      yield
      # The training time also travels in the step's Orbax custom metadata
      # (`save_checkpoint`), committed atomically with the step: a run
      # killed before sealing resumes the count from there.
      self._pending[int(step)] = float(train_seconds)
    except Exception as e:
      self._raise(e, step)

  def poll(self):
    """Seals the pending saves that have committed, without waiting (call
    it after every step): a run killed later (SIGKILL, OOM) then finds its
    newest checkpoint sealed, not only after the next save started."""
    if not self._pending or self._failed or not self._writer:
      return
    if self.mngr.is_saving_in_progress():
      return
    committed = set(committed_steps(self.ckpt_dir))
    for step in sorted(self._pending):
      if step in committed and not manifest_path(self.ckpt_dir,
                                                 step).exists():
        write_manifest(self.ckpt_dir, step,
                       train_seconds=self._pending.pop(step))

  def finish(self):
    """Waits for the last save; seals it. Raises DiskFullError on ENOSPC."""
    self._wait(max(self._pending) if self._pending else None)

  def finish_quietly(self):
    """`finish` while another error propagates: never masks it."""
    if self._failed:
      return
    try:
      self.finish()
    except Exception as e:  # pylint: disable=broad-except
      logging.error("While stopping: %s", e)


def prior_train_seconds(ckpt_dir, step: int, mngr=None) -> float | None:
  """Training time up to checkpoint `step`: from its manifest, else from
  the step's Orbax custom metadata (`mngr`)."""
  manifest = read_manifest(ckpt_dir, step)
  if manifest and isinstance(manifest.get("train_seconds"), (int, float)):
    return float(manifest["train_seconds"])
  if mngr is not None:
    try:
      custom = mngr.metadata(step).custom_metadata or {}
    except Exception:  # pylint: disable=broad-except
      custom = {}
    if isinstance(custom.get("train_seconds"), (int, float)):
      return float(custom["train_seconds"])
  return None


def all_finite(tree) -> bool:
  """Every floating-point value of `tree` is finite."""
  for leaf in jax.tree.leaves(jax.device_get(tree)):
    leaf = np.asarray(leaf)
    if leaf.dtype.kind == "f" and not np.all(np.isfinite(leaf)):
      return False
  return True


def unsealed_message(ckpt_dir, step: int, older: list[int]) -> str:
  fallback = (f" or move its folder {step_dir(ckpt_dir, step)} out of "
              f"{ckpt_dir} to resume from step {older[-1]}" if older else "")
  return (f"The checkpoint of step {step} in {ckpt_dir} has no integrity "
          "manifest (its save was interrupted before it was sealed, or it was "
          "written before manifests existed), so its bytes cannot be "
          "checked; nothing was restored. Re-run with --trust_unsealed to "
          "restore it anyway (the risk: a damaged file restores into wrong "
          "weights; only values that are not finite are caught, and a "
          "checkpoint that passes that check is then sealed)"
          f"{fallback}.")


# ----------------------------------------------------------------------------
# Restoring the newest intact checkpoint.
# ----------------------------------------------------------------------------
def restore_newest_intact(mngr, workdir, restore_fn, *,
                          trust_unsealed: bool = False):
  """Restores the newest checkpoint that is intact; reports the others.

  restore_fn(step) restores one step (raising CheckpointError on failure)
  and returns what to return. Checkpoints are tried newest first:
  * corrupt (files differ from the manifest): skipped;
  * intact but not restorable: the config does not fit the run (every
    checkpoint of the run has the same shapes), so CheckpointError at once;
  * unsealed and not restorable: damaged or another config; the next older
    one decides (if it restores, this one was damaged).
  Skipped checkpoints newer than the restored one are moved to
  `<workdir>/corrupt_checkpoints/`. If none can be restored, nothing is
  changed and CheckpointError lists what is wrong with each.

  Returns (restore_fn's result, step, [report lines]).
  """
  ckpt_dir = epath.Path(mngr.directory)
  bad: list[tuple[int, str]] = []
  # Only steps Orbax has committed. On several processes, process 0's
  # listing and verdicts decide; every host checks the step it is about to
  # restore (`_HostConsensus`).
  committed = set(committed_steps(ckpt_dir))
  consensus = _HostConsensus(
      ckpt_dir, [s for s in mngr.all_steps() if s in committed])
  for step in consensus.steps:
    status, detail = consensus.agree_status(step, verify(ckpt_dir, step))
    if status == "unsealed" and not trust_unsealed:
      raise CheckpointError(unsealed_message(
          ckpt_dir, step, [s for s in sorted(consensus.steps) if s < step]))
    if status == "corrupt":
      logging.warning("Checkpoint %d in %s is corrupt: %s", step, ckpt_dir,
                      detail)
      bad.append((step, f"corrupt: {detail}"))
      continue
    try:
      result = consensus.agree_restored(step, restore_fn)
    except CheckpointError as e:
      if status == "intact":
        raise CheckpointError(
            f"The checkpoint of step {step} in {ckpt_dir} is intact (its "
            f"files match their checksums) but does not fit this config: "
            f"{_cause(e)}\nThe run was trained with other model sizes, "
            "method or optimizer, and all its checkpoints share them. Run "
            f"with the run's own config ({epath.Path(workdir) / 'config.json'}"
            ") or start the new config in a new --workdir.") from e
      logging.warning("Checkpoint %d in %s could not be restored: %s", step,
                      ckpt_dir, _cause(e))
      bad.append((step, f"could not be restored: {_cause(e)}"))
      continue
    if status == "unsealed":
      if not all_finite(result):
        logging.warning("Checkpoint %d in %s (unsealed) holds values that "
                        "are not finite.", step, ckpt_dir)
        bad.append((step, "unsealed, with values that are not finite"))
        continue
      if jax.process_index() == 0:
        write_manifest(ckpt_dir, step, trusted_unsealed=True)
      logging.warning("Checkpoint %d in %s had no manifest; restored with "
                      "--trust_unsealed, its values are finite, now sealed.",
                      step, ckpt_dir)
    report = []
    for bad_step, why in bad:
      if jax.process_index() == 0:
        dest = quarantine(workdir, ckpt_dir, bad_step)
      else:
        dest = epath.Path(workdir) / QUARANTINE_DIR
      report.append(f"checkpoint {bad_step} {why}; moved to {dest} "
                    "(nothing deleted)")
    if bad:
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        multihost_utils.sync_global_devices("bayesncl_quarantine")
      mngr.reload()
      report.append(f"resumed from step {step}, the newest intact "
                    "checkpoint")
      for line in report:
        logging.warning("%s", line)
    return result, step, report
  listing = "\n".join(f"  step {s}: {why}" for s, why in bad)
  raise CheckpointError(
      f"No checkpoint in {ckpt_dir} can be restored:\n{listing}\nNothing was "
      "changed or deleted. If the config changed, run with the run's own "
      f"config ({epath.Path(workdir) / 'config.json'}). Otherwise the "
      "checkpoints are damaged: restore them from a copy, or start over in "
      "a new --workdir (or move the damaged step folders out of "
      f"{ckpt_dir} to restart this workdir from step 0).")


def _cause(e: BaseException) -> str:
  cause = e.__cause__ or e
  text = f"{type(cause).__name__}: {cause}"
  return text if len(text) < 600 else text[:600] + " ..."


# ----------------------------------------------------------------------------
# Several hosts: one decision, checked by every host.
# ----------------------------------------------------------------------------
_STATUS_CODES = {"intact": 0, "unsealed": 1, "corrupt": 2, "missing": 3}


def _broadcast_ints(values: list[int]) -> list[int]:
  """Process 0's list of ints, on every process."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  n = int(multihost_utils.broadcast_one_to_all(np.int32(len(values))))
  padded = np.full((max(n, 1),), -1, np.int32)
  mine = np.asarray(values[:n], np.int32)
  padded[:len(mine)] = mine
  return [int(v) for v in np.asarray(
      multihost_utils.broadcast_one_to_all(padded))[:n]]


def _allgather_ints(values: list[int]) -> np.ndarray:
  """(process_count, len(values)): every process's `values`."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(
      np.asarray(values, np.int32)))


def agreed_latest_step(mngr) -> int | None:
  """The newest committed step of process 0, on every process.

  Process 0 decides whether the run resumes at all; a host that sees
  checkpoints where process 0 sees none stops the run (HostsDisagreeError),
  instead of starting fresh over them while the others start fresh too.
  """
  steps = committed_steps(mngr.directory)
  latest = steps[-1] if steps else None
  if jax.process_count() == 1:
    return latest
  newest = [-1 if latest is None else int(latest)]
  views = _allgather_ints(newest)[:, 0]
  if views[0] < 0 and (views >= 0).any():
    raise HostsDisagreeError(_disagreement(
        epath.Path(mngr.directory), None,
        {i: (int(v), None) for i, v in enumerate(views)}))
  return None if views[0] < 0 else int(views[0])


class HostsDisagreeError(CheckpointError):
  """The processes of a multi-host run see different checkpoints."""


def _disagreement(ckpt_dir, step: int | None,
                  views: dict[int, tuple[int, str | None]]) -> str:
  """The one message: per process, its newest step and its view of `step`."""
  lines = []
  for i, (newest, seen) in sorted(views.items()):
    line = (f"  process {i}: newest checkpoint "
            + (f"step {newest}" if newest >= 0 else "none"))
    if seen is not None:
      line += f"; step {step} is {seen} there"
    lines.append(line)
  chose = (f"process 0 chose step {step}" if step is not None else
           "process 0 sees no checkpoint (it would start from step 0)")
  return (f"The hosts disagree on the checkpoint to restore from {ckpt_dir}: "
          f"{chose}, but\n" + "\n".join(lines) + "\nNothing was restored or "
          "changed. Every host must see the same workdir: a gs:// path or a "
          "file system shared by all hosts, not each host's own disk. If it "
          "is shared, a save was cut off or a listing lagged: re-run the "
          "same command once every host's job has stopped.")


class _HostConsensus:
  """The restore walk's decisions, made once for all processes.

  One process: every method is a pass-through. Several: the steps tried
  and their verdicts are process 0's; each host then verifies the step
  process 0 picked (its folder there, its checksums) and the restore's
  outcome is compared across hosts. A host that cannot use the step
  process 0 chose stops every host with one HostsDisagreeError naming
  each process, its newest step and what it sees of that step.
  """

  def __init__(self, ckpt_dir, steps):
    self.ckpt_dir = epath.Path(ckpt_dir)
    mine = sorted((int(s) for s in steps), reverse=True)
    self.multi = jax.process_count() > 1
    self.newest_here = mine[0] if mine else -1
    self.mine = set(mine)
    self.steps = _broadcast_ints(mine) if self.multi else mine

  def agree_status(self, step: int, verdict: tuple[str, str]
                   ) -> tuple[str, str]:
    """Process 0's verdict on `step`, once every host has checked it."""
    if not self.multi:
      return verdict
    status, detail = verdict
    if step not in self.mine:
      status, detail = "missing", f"{step_dir(self.ckpt_dir, step)} is absent"
    code = _STATUS_CODES[status]
    views = _allgather_ints([self.newest_here, code])
    if views[0, 1] == _STATUS_CODES["corrupt"]:
      return "corrupt", detail if jax.process_index() == 0 else (
          "corrupt on process 0")
    if (views[:, 1] >= _STATUS_CODES["corrupt"]).any():
      names = {v: k for k, v in _STATUS_CODES.items()}
      raise HostsDisagreeError(_disagreement(self.ckpt_dir, step, {
          i: (int(newest), names[int(c)]) for i, (newest, c)
          in enumerate(views)}))
    return ("intact" if views[0, 1] == 0 else "unsealed"), detail

  def agree_restored(self, step: int, restore_fn):
    """restore_fn(step) on every host; a failure on some hosts only stops
    all of them; a failure on every host is re-raised (CheckpointError)."""
    if not self.multi:
      return restore_fn(step)
    result, error = None, None
    try:
      result = restore_fn(step)
    except CheckpointError as e:
      error = e
    views = _allgather_ints([self.newest_here, int(error is not None)])
    failed = views[:, 1].astype(bool)
    if failed.all():
      raise error
    if failed.any():
      raise HostsDisagreeError(_disagreement(self.ckpt_dir, step, {
          i: (int(newest), "not restorable" if bad else "restored")
          for i, (newest, bad) in enumerate(views)})) from error
    return result
