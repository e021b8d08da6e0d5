"""One process at a time per workdir (and per output folder).

Two `main` runs on one workdir would both train and write checkpoints,
metrics and records, and one run would be silently lost; two evaluations
into one `eval/` would mix their reports. So every entry point that writes
holds a lock for as long as it writes:

* `main` holds `<workdir>/.bayesncl.lock`;
* `evaluate` and `explore --out` hold `hold_output(out)`, a lock beside
  the output folder (`<parent>/.<name>.bayesncl.lock`: the folder itself is
  replaced whole when the output is complete).

A second process gets `WorkdirLockedError` (exit status
`cli.EXIT_LOCKED`), whose message names the holder: host, pid, start time,
command.

Local folders: an OS lock (`filelock`, i.e. `flock`) on the lock file; the
holder is described in `<lock>.json`. The OS releases the lock when its
process dies, however it dies, so a killed run is resumed without any
clean-up, and a local lock is never stale.

gs:// folders: the lock is an object created with the precondition
`ifGenerationMatch=0` (gcsfs `mode="create"`), which the bucket grants to
one writer only; it holds the holder's description, and its heartbeat is
refreshed every `HEARTBEAT_SECONDS`. A process killed without clean-up
(SIGKILL, a lost VM) leaves it behind. It is then *stale* — its pid is dead
on this host, or its heartbeat is older than `stale_after` seconds
(`BAYESNCL_LOCK_STALE_SECONDS`, default 900) on another host — and is
reported with the command that removes it; it is never broken silently:
only `--break_stale_lock` breaks a stale lock (and says so in the log).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import sys
import threading
import time
from typing import Any, Iterator

from absl import logging
from etils import epath

LOCK_NAME = ".bayesncl.lock"
STALE_ENV = "BAYESNCL_LOCK_STALE_SECONDS"
DEFAULT_STALE_SECONDS = 900.0
HEARTBEAT_SECONDS = 60.0


class WorkdirLockedError(RuntimeError):
  """Another process holds the lock of the folder this command writes."""


def stale_after_seconds() -> float:
  try:
    return float(os.environ.get(STALE_ENV, DEFAULT_STALE_SECONDS))
  except ValueError:
    return DEFAULT_STALE_SECONDS


def _now_text(t: float) -> str:
  return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))


def _me(purpose: str) -> dict[str, Any]:
  now = time.time()
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "started": _now_text(now), "started_unix": now,
          "heartbeat_unix": now, "purpose": purpose,
          "command": " ".join([os.path.basename(sys.executable)]
                              + sys.argv)[:500]}


def pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by another user
    return True
  return True


def stale_reason(holder: dict[str, Any], stale_after: float | None = None
                 ) -> str | None:
  """Why the lock of `holder` is stale (None: it is held)."""
  stale_after = stale_after_seconds() if stale_after is None else stale_after
  if holder.get("host") == socket.gethostname():
    pid = holder.get("pid")
    if isinstance(pid, int) and not pid_alive(pid):
      return f"its process {pid} no longer runs on this host"
    return None
  beat = holder.get("heartbeat_unix", holder.get("started_unix"))
  if isinstance(beat, (int, float)):
    age = time.time() - beat
    if age > stale_after:
      return (f"its last heartbeat is {age:.0f} s old (more than {STALE_ENV}="
              f"{stale_after:.0f} s)")
  return None


def _describe(holder: dict[str, Any] | None) -> str:
  if not holder:
    return "another process (its description is unreadable)"
  return (f"pid {holder.get('pid')} on host {holder.get('host')}, started "
          f"{holder.get('started')} ({holder.get('purpose', '?')}: "
          f"{holder.get('command', '?')})")


def locked_message(folder: str, lock: str, holder, stale: str | None,
                   remove: str) -> str:
  if stale is None:
    return (f"{folder} is in use: {_describe(holder)} holds its lock {lock}. "
            "Two processes writing one folder would mix or lose their "
            "records. Wait for it to finish (or stop it), or use another "
            "folder.")
  return (f"{folder} is locked by a process that seems to be gone: "
          f"{_describe(holder)} holds its lock {lock}, and {stale}. It was "
          "not broken automatically. If no process uses the folder any "
          f"more, remove the lock ({remove}) or re-run with "
          "--break_stale_lock, then re-run the command.")


@dataclasses.dataclass
class _Local:
  folder: epath.Path
  lock_path: epath.Path

  @property
  def info_path(self) -> epath.Path:
    return self.lock_path.parent / (self.lock_path.name + ".json")

  def acquire(self, purpose: str, break_stale: bool):
    del break_stale  # an OS lock is released when its process dies
    import filelock  # pylint: disable=g-import-not-at-top
    self._lock = filelock.FileLock(os.fspath(self.lock_path), timeout=0)
    try:
      self._lock.acquire()
    except filelock.Timeout:
      holder = None
      with contextlib.suppress(OSError, ValueError):
        holder = json.loads(self.info_path.read_text())
      raise WorkdirLockedError(locked_message(
          str(self.folder), str(self.lock_path), holder, None, "")) from None
    if self.info_path.exists():
      with contextlib.suppress(OSError, ValueError):
        old = json.loads(self.info_path.read_text())
        logging.info("The previous holder of %s (%s) ended without "
                     "releasing it; the OS released its lock.",
                     self.lock_path, _describe(old))
    from bayesncl_jax import atomic  # pylint: disable=g-import-not-at-top
    atomic.write_text(self.info_path, json.dumps(_me(purpose), indent=1))

  def release(self):
    with contextlib.suppress(OSError):
      self.info_path.unlink()
    self._lock.release()
    with contextlib.suppress(OSError):
      os.unlink(os.fspath(self.lock_path))


@dataclasses.dataclass
class _Remote:
  folder: epath.Path
  lock_path: epath.Path

  def _fs(self):
    import gcsfs  # pylint: disable=g-import-not-at-top
    return gcsfs.GCSFileSystem()

  def _read(self):
    try:
      return json.loads(self._fs().cat_file(os.fspath(self.lock_path)))
    except FileNotFoundError:
      return None
    except ValueError:
      return {}

  def acquire(self, purpose: str, break_stale: bool):
    fs = self._fs()
    url = os.fspath(self.lock_path)
    self._me = _me(purpose)
    for _ in range(2):
      try:
        fs.pipe_file(url, json.dumps(self._me).encode(), mode="create")
        break
      except FileExistsError:
        holder = self._read()
        if holder is None:  # released meanwhile
          continue
        stale = stale_reason(holder) if holder else "it is unreadable"
        if stale and break_stale:
          logging.warning("Breaking the stale lock %s (--break_stale_lock): "
                          "%s; %s.", url, _describe(holder), stale)
          fs.rm_file(url)
          continue
        raise WorkdirLockedError(locked_message(
            str(self.folder), url, holder, stale,
            f"gcloud storage rm {url}")) from None
    else:
      raise WorkdirLockedError(f"Could not take the lock {url}: it was "
                               "taken and released repeatedly; re-run.")
    self._stop = threading.Event()
    self._beat = threading.Thread(target=self._heartbeat, daemon=True)
    self._beat.start()

  def _heartbeat(self):
    fs = self._fs()
    while not self._stop.wait(HEARTBEAT_SECONDS):
      self._me["heartbeat_unix"] = time.time()
      with contextlib.suppress(Exception):
        fs.pipe_file(os.fspath(self.lock_path), json.dumps(self._me).encode())

  def release(self):
    self._stop.set()
    self._beat.join(timeout=5)
    holder = self._read()
    if holder and holder.get("pid") == self._me["pid"] and \
        holder.get("host") == self._me["host"]:
      with contextlib.suppress(FileNotFoundError):
        self._fs().rm_file(os.fspath(self.lock_path))


def _backend(folder: epath.Path, lock_path: epath.Path):
  if os.fspath(folder).startswith("gs://"):
    return _Remote(folder, lock_path)
  return _Local(folder, lock_path)


@contextlib.contextmanager
def _hold(folder: epath.Path, lock_path: epath.Path, purpose: str,
          break_stale: bool, enabled: bool) -> Iterator[None]:
  if not enabled:
    yield
    return
  backend = _backend(folder, lock_path)
  backend.acquire(purpose, break_stale)
  try:
    yield
  finally:
    backend.release()


@contextlib.contextmanager
def hold(workdir, purpose: str = "training", *, break_stale: bool = False,
         enabled: bool = True) -> Iterator[None]:
  """Holds `<workdir>/.bayesncl.lock` (raises WorkdirLockedError if taken).

  A local workdir that does not exist is created for the lock and removed
  again on exit if nothing but the lock was written into it (a start that
  fails its checks leaves nothing behind). `enabled=False` (the processes
  other than 0 of a multi-process job: process 0 holds it for the job)
  does nothing.
  """
  folder = epath.Path(workdir)
  created = False
  if enabled and not os.fspath(folder).startswith("gs://") \
      and not folder.exists():
    folder.mkdir(parents=True)
    created = True
  try:
    with _hold(folder, folder / LOCK_NAME, purpose, break_stale, enabled):
      yield
  finally:
    if created and folder.exists() and not any(folder.iterdir()):
      folder.rmdir()


@contextlib.contextmanager
def hold_output(out_dir, purpose: str, *, break_stale: bool = False,
                enabled: bool = True) -> Iterator[None]:
  """Holds the lock of output folder `out_dir`, kept beside it
  (`<parent>/.<name>.bayesncl.lock`), since the folder itself is replaced
  whole when the output is complete. The explorer calls this with --out."""
  folder = epath.Path(out_dir)
  parent = folder.parent
  if enabled and not os.fspath(parent).startswith("gs://"):
    parent.mkdir(parents=True, exist_ok=True)
  with _hold(folder, parent / f".{folder.name}{LOCK_NAME}", purpose,
             break_stale, enabled):
    yield
