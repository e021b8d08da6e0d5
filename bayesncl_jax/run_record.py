"""A run's record: the config it was started with, its history, its rows.

A workdir holds one experiment. Resuming it under a config that changes
the result (another method, seed, KL weight, schedule, ...) would train
one run's state under another run's name, so it is refused unless the user
asks for it with --allow_config_change, which records the change. Fields
that cannot change the result (logging and checkpoint cadence, data
loading, the data path) may differ freely; the difference is noted.

Files in the workdir (written by process 0):
  config_initial.json  the config of the first segment; never rewritten.
  config.json          the config of the latest segment (what `evaluate`
                       reads), rewritten only after the check passed.
  run_history.jsonl    one event per line: start, resume (with harmless
                       differences), config_change (allowed, with the
                       fields), restart (no checkpoint was kept), fallback
                       (a corrupt checkpoint skipped), end.
  metrics.jsonl        one row per logged step: rows after the restored
                       step (logged before a crash) are dropped on resume.
  summary.json         the end-of-run summary; a finished run re-run is
                       left alone.
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

from absl import logging
from etils import epath
from flax import traverse_util
import jax

from bayesncl_jax import atomic
from bayesncl_jax import config_lib

# Fields that never change what is trained: how often things are logged or
# saved, how many checkpoints are kept, how the data is loaded and where it
# is read from (the same dataset; a moved copy must hold the same files).
HARMLESS_FIELDS = frozenset({
    "log_every", "ckpt_every", "keep_ckpts", "progress_bar",
    "profile_steps", "peak_tflops",
    "dataset.num_workers", "dataset.prefetch_buffer", "dataset.data_dir",
})

# Fields that say what experiment a workdir holds: never changed on resume,
# not even with --allow_config_change (a run labelled ncl whose first steps
# were trained as cl is no run of either method).
IDENTITY_FIELDS = frozenset({
    "method", "dataset.name", "model.backbone", "model.stem", "model.width",
    "model.stage_sizes", "model.proj_hidden", "model.proj_out",
    "model.non_neg", "gate.type",
})

CONFIG = "config.json"
CONFIG_INITIAL = "config_initial.json"
HISTORY = "run_history.jsonl"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"

_MISSING = "<absent>"


class ConfigChangedError(ValueError):
  """Resuming would continue a run under a config that changes its result."""


@dataclasses.dataclass(frozen=True)
class Change:
  field: str
  recorded: Any
  current: Any

  def __str__(self):
    return f"config.{self.field}: {_short(self.recorded)} -> " \
           f"{_short(self.current)}"


@dataclasses.dataclass
class ConfigDiff:
  result: list[Change]      # change what is trained
  harmless: list[Change]    # cadence, loading, paths
  notes: list[str]

  def as_json(self) -> dict[str, Any]:
    return {c.field: [c.recorded, c.current]
            for c in self.result + self.harmless}


def _short(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + "..."


def _plain(config) -> dict[str, Any]:
  """The config as saved in config.json (tuples become lists)."""
  if isinstance(config, dict):
    return json.loads(json.dumps(config))
  return json.loads(config.to_json_best_effort())


def flatten(tree: dict[str, Any]) -> dict[str, Any]:
  """{"a.b.c": leaf} of a nested dict."""
  return traverse_util.flatten_dict(tree, sep=".")


def is_harmless(field: str) -> bool:
  return field in HARMLESS_FIELDS


def compare(recorded, current) -> ConfigDiff:
  """Field-by-field difference of two configs (ConfigDicts or plain dicts).

  A field the recorded config lacks (added to the code later) counts as
  unchanged when it holds the code's default, since that default is what
  the older code did; otherwise it changes the result.
  """
  old, new = flatten(_plain(recorded)), flatten(_plain(current))
  defaults = flatten(_plain(config_lib.base_config()))
  diff = ConfigDiff([], [], [])
  for field in sorted(set(old) | set(new)):
    if field not in new:
      diff.notes.append(f"config.{field} is in the run's record but no "
                        "longer in the code; ignored.")
      continue
    if field not in old:
      if field in defaults and new[field] == defaults[field]:
        diff.notes.append(f"config.{field} (not in the run's record) is at "
                          "its default.")
        continue
      change = Change(field, _MISSING, new[field])
    elif old[field] == new[field]:
      continue
    else:
      change = Change(field, old[field], new[field])
    (diff.harmless if is_harmless(field) else diff.result).append(change)
  return diff


def _now() -> str:
  return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class RunRecord:
  """The record of the run in `workdir` (read by all processes)."""

  def __init__(self, workdir):
    self.workdir = epath.Path(workdir)
    self._writer = jax.process_index() == 0

  # -- reading ---------------------------------------------------------------
  def _json(self, name: str) -> dict[str, Any] | None:
    path = self.workdir / name
    if not path.exists():
      return None
    try:
      return json.loads(path.read_text())
    except ValueError as e:
      logging.warning("%s is not valid JSON (%s); ignoring it.", path, e)
      return None

  def recorded_config(self) -> dict[str, Any] | None:
    return self._json(CONFIG)

  def summary(self) -> dict[str, Any] | None:
    return self._json(SUMMARY)

  def has_trained_state(self) -> bool:
    """Checkpoints (committed step folders) or a summary exist."""
    from bayesncl_jax import integrity  # pylint: disable=g-import-not-at-top
    if integrity.committed_steps(self.workdir / "checkpoints"):
      return True
    return (self.workdir / SUMMARY).exists()

  # -- the checks ------------------------------------------------------------
  def _config_file(self, name: str) -> tuple[dict[str, Any] | None,
                                               str | None]:
    """(the config in `name`, None) or (None, why it is unusable)."""
    path = self.workdir / name
    if not path.exists():
      return None, "missing"
    try:
      value = json.loads(path.read_text())
    except (ValueError, OSError) as e:
      return None, f"not valid JSON ({e})"
    if not isinstance(value, dict) or not isinstance(value.get("method"),
                                                     str):
      return None, "not a config (a JSON object with a method)"
    return value, None

  def _reference_config(self) -> dict[str, Any] | None:
    """config.json, else config_initial.json; None for a new workdir.

    Raises ConfigChangedError when the workdir holds a trained state but
    neither file is usable: nothing to compare the config with.
    """
    latest, why = self._config_file(CONFIG)
    if latest is not None:
      return latest
    initial, why_initial = self._config_file(CONFIG_INITIAL)
    if initial is not None:
      if why != "missing" or self.has_trained_state():
        logging.warning("%s is %s; comparing the config with %s instead.",
                        self.workdir / CONFIG, why, CONFIG_INITIAL)
      return initial
    if not self.has_trained_state():
      return None
    raise ConfigChangedError(
        f"{self.workdir} holds a trained run, but its recorded config "
        f"cannot be read: {CONFIG} is {why} and {CONFIG_INITIAL} is "
        f"{why_initial}. Without it a resume cannot be checked against the "
        "config the run was trained with, so nothing was done. Restore "
        f"{self.workdir / CONFIG} from a copy (or write the run's config "
        "there), or start in a new --workdir.")

  def check_config(self, config, *, allow_change: bool = False
                   ) -> ConfigDiff | None:
    """Compares `config` with the recorded one; refuses a silent change.

    Returns None for a new workdir, else the difference. Raises
    ConfigChangedError when a field that changes the result differs, a
    trained state exists and `allow_change` is False, and always when an
    identity field (IDENTITY_FIELDS) differs.
    """
    recorded = self._reference_config()
    if recorded is None:
      return None
    diff = compare(recorded, config)
    identity = [c for c in diff.result if c.field in IDENTITY_FIELDS]
    if identity and self.has_trained_state():
      lines = "\n".join(f"  {c}" for c in identity)
      raise ConfigChangedError(
          f"{self.workdir} holds a run of another experiment. These fields "
          f"say what the run is and can never change on resume (recorded -> "
          f"now):\n{lines}\n--allow_config_change does not allow this: the "
          "run would carry one method's (or model's, or dataset's) name with "
          "another's first steps. Start this config in a new --workdir.")
    if diff.result and not allow_change and self.has_trained_state():
      lines = "\n".join(f"  {c}" for c in diff.result)
      harmless = ""
      if diff.harmless:
        harmless = ("\n(Allowed, as they do not change the result: "
                    + "; ".join(map(str, diff.harmless)) + ".)")
      raise ConfigChangedError(
          f"{self.workdir} holds a run trained with another config. These "
          f"fields change the result (recorded -> now):\n{lines}\n"
          "Resuming would continue that run under the new values and mix "
          "two experiments in one record. Either start this config in a new "
          "--workdir, or, to continue the run with the new values on "
          "purpose (e.g. to train it longer), re-run with "
          "--allow_config_change: the change is recorded in "
          f"{self.workdir / HISTORY}.{harmless}")
    for note in diff.notes:
      logging.info("%s", note)
    return diff

  def finished_summary(self, total_steps: int) -> dict[str, Any] | None:
    """The summary of a run that already trained all `total_steps`."""
    summary = self.summary()
    if (summary and not summary.get("preempted")
        and summary.get("step") == total_steps):
      return summary
    return None

  def logged_row(self, step: int) -> dict[str, float]:
    """The metrics row logged at `step` ({} if none), without "step".

    A run resumed at its last step (killed between its final checkpoint and
    its summary) trains nothing; its summary reports this row.
    """
    path = self.workdir / METRICS
    if step <= 0 or not path.exists():
      return {}
    for line in reversed(path.read_text().splitlines()):
      try:
        row = json.loads(line)
      except ValueError:
        continue
      if isinstance(row, dict) and row.get("step") == step:
        return {k: v for k, v in row.items() if k != "step"}
    return {}

  # -- writing (process 0) ---------------------------------------------------
  def _append(self, event: dict[str, Any]):
    if not self._writer:
      return
    path = self.workdir / HISTORY
    good = read_jsonl_lines(path, keep_corrupt=True)
    atomic.write_text(path, "".join(line + "\n" for line in good)
                      + json.dumps({"time": _now(), **event}) + "\n")

  def begin(self, config, *, step: int, diff: ConfigDiff | None,
            resumed: bool, fallback: list[str] = ()) -> None:
    """Records a segment's start; drops metrics rows after `step`."""
    if not self._writer:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    text = config.to_json_best_effort(indent=2)
    if not (self.workdir / CONFIG_INITIAL).exists():
      # Older workdirs: the config they recorded last is the best record
      # of how they started.
      old, _ = self._config_file(CONFIG)
      initial = ((self.workdir / CONFIG).read_text()
                 if old is not None and resumed else text)
      atomic.write_text(self.workdir / CONFIG_INITIAL, initial)
    if fallback:
      self._append({"event": "fallback", "step": step,
                    "report": list(fallback)})
    if diff is not None and diff.result:
      kind = "config_change" if resumed else "restart"
      self._append({"event": kind, "step": step,
                    "changes": {c.field: [c.recorded, c.current]
                                for c in diff.result},
                    "harmless": {c.field: [c.recorded, c.current]
                                 for c in diff.harmless}})
    else:
      event = {"event": "resume" if resumed else "start", "step": step}
      if diff is not None and diff.harmless:
        event["harmless"] = {c.field: [c.recorded, c.current]
                             for c in diff.harmless}
        logging.info("Resuming with harmless config differences: %s",
                     "; ".join(map(str, diff.harmless)))
      self._append(event)
    atomic.write_text(self.workdir / CONFIG, text)
    truncate_metrics(self.workdir / METRICS, step)

  def end(self, summary: dict[str, Any]) -> None:
    self._append({"event": "end", "step": summary.get("step"),
                  "preempted": summary.get("preempted", False),
                  "train_seconds": summary.get("train_seconds")})


def read_jsonl_lines(path, *, keep_corrupt: bool = False) -> list[str]:
  """The lines of a JSON-lines record that hold a JSON object.

  With `keep_corrupt`, the other lines (a torn last line of a killed
  writer, a line damaged by a disk error or a concurrent writer) are kept
  in `<file>.corrupt-<time>` with a one-line warning, so that rewriting the
  file never silently drops them.
  """
  path = epath.Path(path)
  if not path.exists():
    return []
  good, bad = [], []
  for line in path.read_text().splitlines():
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except ValueError:
      row = None
    (good if isinstance(row, dict) else bad).append(line)
  if bad and keep_corrupt:
    kept = path.parent / f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
    old = kept.read_text() if kept.exists() else ""
    atomic.write_text(kept, old + "".join(line + "\n" for line in bad))
    logging.warning("%s: %d line(s) are not JSON records; kept in %s, the "
                    "%d good line(s) stay.", path, len(bad), kept, len(good))
  return good


def truncate_metrics(path, step: int) -> int:
  """Keeps the rows of steps <= `step` (those a resume does not redo).

  Rows after the restored checkpoint were logged by a segment that died
  before its next checkpoint; the resumed run logs those steps again.
  Lines that are no JSON record (a torn last line of a killed run, a
  damaged line) are moved to `<file>.corrupt-<time>` (`read_jsonl_lines`),
  never dropped. Returns the number of rows dropped.
  """
  path = epath.Path(path)
  if not path.exists():
    return 0
  lines = path.read_text().splitlines()
  good = read_jsonl_lines(path, keep_corrupt=True)
  kept = [line for line in good
          if not isinstance(json.loads(line).get("step", 0), (int, float))
          or json.loads(line).get("step", 0) <= step]
  dropped = len(good) - len(kept)
  if len(kept) != len([line for line in lines if line.strip()]):
    atomic.write_text(path, "".join(line + "\n" for line in kept))
  if dropped:
    logging.info("Dropped %d rows after step %d from %s (they are logged "
                 "again by this segment).", dropped, step, path)
  return dropped
