r"""`bayesncl_jax.main` that records which training examples it read (tests).

  python tests/multihost_worker.py --record_reads=DIR --config=... \
      --workdir=W [--coordinator_address=... --num_processes=2 --process_id=i]

Runs exactly `bayesncl_jax.main.main` (same flags, same `train.py`, same
input pipeline), except that every process writes the training-source
indices its pre-training iterator read to `DIR/process_{i}.json` at exit, to
check that the processes read disjoint examples.
"""
from __future__ import annotations

import atexit
import json
import os
import sys
import threading

# Run as a script: the repository root, not tests/, must be importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402

from bayesncl_jax import datasets  # noqa: E402
from bayesncl_jax import input_pipeline  # noqa: E402

FLAGS = flags.FLAGS


class RecordingSource:
  """A random-access source that remembers which indices were read.

  Grain prefetch threads call __getitem__ concurrently: hence the lock.
  """

  def __init__(self, source):
    self._source = source
    self._lock = threading.Lock()
    self.read: set[int] = set()

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    with self._lock:
      self.read.add(int(index))
    return self._source[index]


def _define_flags():
  """main's flags plus ours; only when run as a script, so that importing
  this module (tests do) defines no absl flags."""
  from bayesncl_jax import main as entry  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("record_reads", None, "Folder for the source indices "
                      "each process read (process_{i}.json).")
  return entry


def _install(entry, argv):
  """Swaps the iterator factory train.py calls, then runs main.main."""
  sources = []

  def wrap(source):
    sources.append(RecordingSource(source))
    return sources[-1]

  if FLAGS.record_reads:
    shipped = input_pipeline.create_pretrain_iterator

    def factory(config, **kwargs):
      source = datasets.get_source(config.dataset, config.dataset.train_split)
      return shipped(config, source=wrap(source), **kwargs)
    input_pipeline.create_pretrain_iterator = factory

    def dump():
      os.makedirs(FLAGS.record_reads, exist_ok=True)
      path = os.path.join(FLAGS.record_reads,
                          f"process_{jax.process_index()}.json")
      with open(path, "w") as f:
        json.dump(sorted(set().union(*(s.read for s in sources))), f)
    atexit.register(dump)
  entry.main(argv)


if __name__ == "__main__":
  _entry = _define_flags()
  app.run(lambda argv: _install(_entry, argv))
