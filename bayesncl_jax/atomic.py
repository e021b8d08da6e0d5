"""One atomic write for every record and manifest: readers see the old
file or the new one, never a torn one, also after a crash or power loss.

Local: the bytes go to a temporary file in the same folder, which is
fsync'ed, renamed over the target (`os.replace`, atomic on POSIX) and the
folder fsync'ed so the rename itself is durable; the temporary file is
removed if anything fails. gs://: one upload, which replaces the object
atomically (Cloud Storage never shows a partial object).
"""
from __future__ import annotations

import contextlib
import os
import uuid

from etils import epath


def _is_remote(path: str) -> bool:
  return path.startswith("gs://")


def _fsync_dir(folder: str) -> None:
  # Some file systems cannot open or fsync a folder; the rename happened.
  with contextlib.suppress(OSError):
    fd = os.open(folder, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


def write_bytes(path, data: bytes) -> None:
  """Replaces `path` (local or gs://) with `data` atomically and durably."""
  text = os.fspath(path)
  if _is_remote(text):
    epath.Path(text).write_bytes(data)
    return
  with writing(text) as f:
    f.write(data)


def write_text(path, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def writing(path, mode: str = "wb"):
  """A file object whose content replaces `path` atomically on success
  (for writers that stream, e.g. `np.save`); local paths only."""
  text = os.fspath(path)
  folder = os.path.dirname(text) or "."
  tmp = os.path.join(folder, f".{os.path.basename(text)}.{os.getpid()}."
                     f"{uuid.uuid4().hex[:8]}.tmp")
  try:
    with open(tmp, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, text)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise
  _fsync_dir(folder)
