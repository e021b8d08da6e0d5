"""Checks that run before any expensive work.

A run that trains for hours and then fails on a missing test split or a
read-only folder wastes the hours. `check_training` (before the first
step) and `check_evaluation` (before the first feature is computed) make
sure that every split the command will read exists and is readable, that
every folder it will write is writable and that the config validates.
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

from etils import epath

from bayesncl_jax import config_lib
from bayesncl_jax import datasets


class PreflightError(ValueError):
  """The command cannot succeed as asked; nothing was computed yet."""


class NotWritableError(PreflightError, PermissionError):
  """An output folder cannot be written."""


def check_writable(path, what: str, flag: str) -> None:
  """Raises NotWritableError unless files can be created in `path`.

  A folder that does not exist yet is checked at its nearest existing
  parent (nothing is created): that is where it will be made.
  """
  path = epath.Path(path)
  target = path
  # Object stores (gs://) have no folders to walk up: probe in place.
  while ("://" not in os.fspath(path) and not target.exists()
         and target.parent != target):
    target = target.parent
  if target.exists() and not target.is_dir():
    raise NotWritableError(
        f"The {what} {path} cannot be created: {target} is a file, not a "
        f"folder. Choose another {flag}.")
  probe = target / f".bayesncl_write_test.{os.getpid()}"
  try:
    probe.write_text("")
    probe.unlink()
  except Exception as e:  # OSError locally; storage clients raise others.
    reason = getattr(e, "strerror", None) or f"{type(e).__name__}: {e}"
    raise NotWritableError(
        f"The {what} {path} is not writable ({reason} in {target}); "
        "nothing was computed. Make it writable, or choose another "
        f"{flag}.") from e


def check_splits(dataset_config, splits: Iterable[str], purpose: str) -> None:
  """Opens every split and reads its first and last example.

  Raises datasets.DatasetNotFoundError (files missing; its message says how
  to get them) or PreflightError (present but unreadable).
  """
  for split in dict.fromkeys(splits):
    try:
      source = datasets.get_source(dataset_config, split)
      n = len(source)
      if n == 0:
        raise ValueError("it holds no examples")
      source[0]
      source[n - 1]
    except datasets.DatasetNotFoundError:
      raise
    except (ValueError, OSError, KeyError, IndexError) as e:
      raise PreflightError(
          f"The {split!r} split of {dataset_config.name} (needed {purpose}) "
          f"cannot be read: {e}. Nothing was computed; fix or re-create the "
          "data (see the dataset's section of the README).") from e


def check_training(config, workdir) -> None:
  """Before the first training step: config, splits, workdir."""
  config_lib.validate(config)
  check_splits(config.dataset,
               (config.dataset.train_split, config.dataset.eval_split),
               "for training and the end-of-run evaluation")
  check_writable(workdir, "workdir", "--workdir")


def check_evaluation(workdir, config, protocols: Sequence[str],
                     known: Sequence[str], needs_train: Sequence[str],
                     out_dir=None) -> None:
  """Before the first feature: protocols, config, splits, output folder."""
  unknown = [p for p in protocols if p not in known]
  if unknown or not protocols:
    raise PreflightError(
        f"Unknown --protocols value(s) {', '.join(map(repr, unknown))}; "
        f"choose from {','.join(known)} (e.g. --protocols=linear,knn)."
        if unknown else f"--protocols is empty; choose from "
        f"{','.join(known)}.")
  config_lib.validate(config)
  splits = [config.dataset.eval_split]
  if set(protocols) & set(needs_train):
    splits.insert(0, config.dataset.train_split)
  check_splits(config.dataset, splits, "by the evaluation")
  out = out_dir or epath.Path(workdir) / "eval"
  check_writable(out, "evaluation output folder", "--out_dir")
