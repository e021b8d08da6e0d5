"""One path layer for every file the project reads or writes: local or gs://.

Every user path (workdir, data_dir, eval output, figures) goes through these
helpers, built on `etils.epath`; `gs://` paths use gcsfs (a runtime
dependency), so a run on a Cloud TPU VM writes its checkpoints, metrics,
TensorBoard events, config, summary and evaluation report to the bucket. No
`os.makedirs`/`open` on a user path: on `gs://b/r` those silently create a
local folder `./gs:/b/r`.

Object stores have no append and no directories:

* `Appender` (metrics.jsonl) keeps the file's text and rewrites the object
  at a flush; local files are appended to. Cloud Storage allows about one
  write per second to one object, so on gs:// a flush uploads only if
  `REMOTE_FLUSH_SECONDS` passed since the last upload, unless forced (the
  training loop forces one with every checkpoint and at the end).
* `tensorboard_writer` writes TensorBoard event files with tensorboardX's
  public `EventsWriter` to a local file; on gs:// that file is uploaded
  whole through this layer at the flushes (as tensorboardX's own cloud
  writers rewrite the object).
* `ensure_dir` creates local folders; for `gs://` it only checks that the
  bucket exists (a missing bucket is an error, never created implicitly).

Under a GCS emulator (`STORAGE_EMULATOR_HOST` set, the tests) gcsfs's
experimental zonal/hierarchical-bucket support is switched off unless the
user chose otherwise (`GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`): it asks the
Storage Control gRPC API, which an emulator does not serve, about every
bucket and waits about a minute for each answer.
"""
from __future__ import annotations

import functools
import io
import json
import os
import re
import shutil
import tempfile
import time
from typing import Any

from etils import epath

if os.environ.get("STORAGE_EMULATOR_HOST"):
  os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

REMOTE_SCHEMES = ("gs://",)
# Least seconds between two uploads of one growing gs:// file (Appender,
# TensorBoard events) unless a flush is forced.
REMOTE_FLUSH_SECONDS = 5.0

PathLike = str | os.PathLike
# Cloud Storage bucket names (cloud.google.com/storage/docs/buckets#naming).
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")


class PathError(ValueError):
  """A user path that cannot be used; the message says how to fix it."""


def check(path: PathLike) -> str:
  """`path` as a string, refusing mangled URLs such as `gs:/bucket`.

  `pathlib.Path("gs://b/r")` and `os.path.normpath` turn `gs://` into
  `gs:/`, which every local API then treats as a folder named `gs:`.
  """
  text = os.fspath(path)
  if text.startswith("gs:") and not text.startswith("gs://"):
    raise PathError(f"{text!r} is not a valid bucket path: write "
                    f"gs://BUCKET/DIR (two slashes).")
  if text.startswith("gs://") and len(text.rstrip("/")) <= len("gs://"):
    raise PathError(f"{text!r} names no bucket: write gs://BUCKET/DIR.")
  if text.startswith("gs://"):
    bucket = text[len("gs://"):].split("/", 1)[0]
    if not _BUCKET_NAME.fullmatch(bucket):
      raise PathError(
          f"{text!r} is not a valid bucket path: {bucket!r} is not a bucket "
          "name (3-222 characters: lower-case letters, digits, '-', '_', "
          "'.'; starting and ending with a letter or digit). Write "
          "gs://BUCKET/DIR.")
  return text


def is_remote(path: PathLike) -> bool:
  """True for object-store URLs (gs://...)."""
  return check(path).startswith(REMOTE_SCHEMES)


def as_path(path: PathLike) -> epath.Path:
  """An `epath.Path` for a local path or a gs:// URL."""
  return epath.Path(check(path))


def join(base: PathLike, *parts: str) -> str:
  """`base/part/...` as a string; keeps `gs://` intact."""
  return str(as_path(base).joinpath(*parts))


def exists(path: PathLike) -> bool:
  return as_path(path).exists()


def isdir(path: PathLike) -> bool:
  return as_path(path).is_dir()


def listdir(path: PathLike) -> list[str]:
  """Names (not paths) of the entries of folder `path`, sorted."""
  return sorted(p.name for p in as_path(path).iterdir())


@functools.lru_cache(maxsize=64)
def _bucket_exists(bucket: str) -> bool:
  return epath.Path(f"gs://{bucket}").exists()


def user_cache_dir() -> str:
  """The user's cache folder of this project: `$BAYESNCL_CACHE_DIR`, else
  `$XDG_CACHE_HOME/bayesncl_jax` (default `~/.cache/bayesncl_jax`).

  Dataset caches and JAX's persistent compilation cache live under it.
  """
  return os.environ.get(
      "BAYESNCL_CACHE_DIR",
      os.path.join(os.environ.get("XDG_CACHE_HOME",
                                  os.path.expanduser("~/.cache")),
                   "bayesncl_jax"))


def bucket_of(path: PathLike) -> str:
  return check(path)[len("gs://"):].split("/", 1)[0]


def ensure_dir(path: PathLike) -> str:
  """Creates a local folder (and parents); for gs:// checks the bucket.

  Raises PathError when the bucket does not exist or cannot be reached.
  """
  text = check(path)
  if not is_remote(text):
    os.makedirs(text, exist_ok=True)
    return text
  bucket = bucket_of(text)
  try:
    found = _bucket_exists(bucket)
  except Exception as e:  # auth, network: gcsfs raises many types.
    raise PathError(
        f"Cannot reach gs://{bucket} for {text}: {type(e).__name__}: {e}\n"
        "Check the credentials (on a TPU VM: the VM's service account needs "
        "Storage access; elsewhere: gcloud auth application-default login) "
        "and the bucket name.") from e
  if not found:
    _bucket_exists.cache_clear()
    raise PathError(
        f"The bucket gs://{bucket} of {text} does not exist (or this account "
        f"cannot see it). Create it first: gcloud storage buckets create "
        f"gs://{bucket} --location=REGION (the TPU's region).")
  return text


def read_bytes(path: PathLike) -> bytes:
  return as_path(path).read_bytes()


def read_text(path: PathLike) -> str:
  return as_path(path).read_text()


def read_json(path: PathLike) -> Any:
  return json.loads(read_text(path))


def write_bytes(path: PathLike, data: bytes) -> None:
  """Writes `data` at once: readers see the old or the new file, never half.

  Local: a temporary file renamed over the target. gs://: one upload, which
  replaces the object atomically.
  """
  from bayesncl_jax import atomic  # pylint: disable=g-import-not-at-top
  atomic.write_bytes(check(path), data)


def write_text(path: PathLike, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, obj: Any, indent: int | None = 2) -> None:
  write_text(path, json.dumps(obj, indent=indent))


def open_file(path: PathLike, mode: str = "rb"):
  """A file object for reading (`r`, `rb`) or writing (`w`, `wb`).

  No append mode: object stores have none (gcsfs would silently overwrite);
  use `Appender`.
  """
  if "a" in mode or "+" in mode:
    raise ValueError(f"mode {mode!r}: use paths.Appender to append.")
  return as_path(path).open(mode)


def save_npz(path: PathLike, **arrays) -> None:
  """`np.savez_compressed` to a local or gs:// path."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  np.savez_compressed(buffer, **arrays)
  write_bytes(path, buffer.getvalue())


def save_figure(fig, path: PathLike, **kwargs) -> None:
  """`fig.savefig` to a local or gs:// path (format from the extension)."""
  text = check(path)
  fmt = os.path.splitext(text)[1].lstrip(".") or "png"
  buffer = io.BytesIO()
  fig.savefig(buffer, format=fmt, **kwargs)
  write_bytes(text, buffer.getvalue())


def upload_dir(local: PathLike, dest: PathLike,
               names: list[str] | None = None) -> None:
  """Copies the files `names` (default: all files) of folder `local` to
  `dest` (a local folder or gs:// prefix)."""
  local = os.fspath(local)
  ensure_dir(dest)
  if names is None:
    names = sorted(n for n in os.listdir(local)
                   if os.path.isfile(os.path.join(local, n)))
  for name in names:
    with open(os.path.join(local, name), "rb") as src, \
        as_path(join(dest, name)).open("wb") as dst:
      shutil.copyfileobj(src, dst, 16 << 20)


class Appender:
  """A text file that grows by `write` + `flush` (metrics.jsonl).

  Local: an ordinary file opened for appending. gs://: the object's existing
  text is read once; each `flush` rewrites the object with all of it, since
  objects cannot be appended to. A few hundred kB of metrics per run keeps
  that cheap.
  """

  def __init__(self, path: PathLike):
    self.path = check(path)
    self._remote = is_remote(self.path)
    if self._remote:
      p = epath.Path(self.path)
      self._text = p.read_text() if p.exists() else ""
      self._dirty = False
      self._uploaded_at = -float("inf")
      self._file = None
    else:
      self._file = open(self.path, "a", encoding="utf-8")

  def write(self, text: str) -> None:
    if self._remote:
      self._text += text
      self._dirty = True
    else:
      self._file.write(text)

  def flush(self, force: bool = False) -> None:
    """Local: flushes. gs://: uploads if forced or REMOTE_FLUSH_SECONDS
    passed since the last upload."""
    if self._remote:
      now = time.monotonic()
      if self._dirty and (
          force or now - self._uploaded_at >= REMOTE_FLUSH_SECONDS):
        epath.Path(self.path).write_text(self._text)
        self._dirty = False
        self._uploaded_at = now
    else:
      self._file.flush()

  def close(self) -> None:
    self.flush(force=True)
    if self._file is not None:
      self._file.close()
      self._file = None


class TensorBoardWriter:
  """Scalars to a TensorBoard event file in a local or gs:// folder.

  Synchronous, unlike tensorboardX's `SummaryWriter` (whose `flush` does not
  wait for the events still queued for its writer thread): after a local
  `flush`, or a forced one on gs://, every scalar added is in the file, so a
  run killed right after a checkpoint loses none. One new event file per
  writer, as TensorBoard expects.

  Only tensorboardX's public `EventsWriter` (write_event, flush, close) is
  used, always on a local file: for a gs:// logdir the file lives in a
  temporary folder and each upload copies it whole to the bucket through
  this module (fsspec), at most once per REMOTE_FLUSH_SECONDS unless
  forced. tensorboardX's own gs:// writer is left alone (it needs a
  `google.cloud.storage.Client`, a project to bill, and uploads again from
  `__del__` at interpreter exit).
  """

  def __init__(self, logdir: PathLike, purge_step: int | None = None):
    """purge_step: TensorBoard hides the events of steps >= it (a resume)."""
    # pylint: disable=g-import-not-at-top
    from tensorboardX.proto import event_pb2
    from tensorboardX.event_file_writer import EventsWriter
    # pylint: enable=g-import-not-at-top
    self.logdir = ensure_dir(logdir)
    self._remote = is_remote(self.logdir)
    self._uploaded_size = 0
    self._uploaded_at = -float("inf")
    if self._remote:
      self._local_dir = tempfile.mkdtemp(prefix="bayesncl_tensorboard_")
      self._events = EventsWriter(os.path.join(self._local_dir, "events"))
      # The one file EventsWriter created; the bucket gets its name.
      [name] = os.listdir(self._local_dir)
      self._local_file = os.path.join(self._local_dir, name)
      self.path = join(self.logdir, name)
    else:
      self._local_dir = None
      self._events = EventsWriter(join(self.logdir, "events"))
    if purge_step is not None:  # what tensorboardX's SummaryWriter writes.
      self._events.write_event(event_pb2.Event(
          wall_time=time.time(), step=int(purge_step),
          session_log=event_pb2.SessionLog(
              status=event_pb2.SessionLog.START)))

  def add_scalar(self, tag: str, value: float, step: int) -> None:
    # pylint: disable=g-import-not-at-top
    from tensorboardX import summary
    from tensorboardX.proto import event_pb2
    # pylint: enable=g-import-not-at-top
    self._events.write_event(event_pb2.Event(
        wall_time=time.time(), step=int(step),
        summary=summary.scalar(tag, float(value))))

  def flush(self, force: bool = False) -> None:
    """Local: to disk. gs://: uploaded if forced or REMOTE_FLUSH_SECONDS
    passed since the last upload."""
    self._events.flush()
    if not self._remote:
      return
    now = time.monotonic()
    size = os.path.getsize(self._local_file)
    if size != self._uploaded_size and (
        force or now - self._uploaded_at >= REMOTE_FLUSH_SECONDS):
      with open(self._local_file, "rb") as f:
        data = f.read()
      epath.Path(self.path).write_bytes(data)
      self._uploaded_size = len(data)
      self._uploaded_at = now

  def close(self) -> None:
    if self._events is None:
      return
    self._events.flush()
    if self._remote:
      self.flush(force=True)
    self._events.close()
    self._events = None
    if self._local_dir is not None:
      shutil.rmtree(self._local_dir, ignore_errors=True)


def tensorboard_writer(logdir: PathLike, purge_step: int | None = None
                       ) -> TensorBoardWriter:
  """A `TensorBoardWriter` (add_scalar, flush, close) for `logdir`."""
  return TensorBoardWriter(logdir, purge_step)
