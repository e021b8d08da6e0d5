"""Shared command-line conveniences of the entry points."""
import logging as py_logging

from absl import logging


class _QuietLibraries(py_logging.Filter):
  """Drops INFO chatter of Orbax/Grain/TFDS; their warnings still show."""
  _NOISY = ("/orbax/", "/grain/", "/tensorflow_datasets/", "/etils/")

  def filter(self, record):
    return record.levelno >= py_logging.WARNING or not any(
        part in record.pathname for part in self._NOISY)


def quiet_library_logs() -> None:
  """Keeps the console readable (progress bar, our own logs) at INFO."""
  if logging.get_verbosity() <= logging.INFO:
    logging.get_absl_handler().addFilter(_QuietLibraries())
