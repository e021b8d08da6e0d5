r"""`bayesncl_jax.main` with a process-count-independent data order (tests).

  python tests/multihost_worker.py --data_order=global --config=... \
      --workdir=W [--coordinator_address=... --num_processes=2 --process_id=i]

Runs exactly `bayesncl_jax.main.main` (same flags, same `train.py`), except
that with `--data_order=global` the pre-training iterator is replaced by
`global_order_pretrain_iterator`: why — the shipped pipeline gives process p
the shard `source[p::P]` shuffled with a per-process seed, so the *global*
batch of step t depends on the number of processes P and a 1-process run
cannot be compared number for number with a 2-process one. Here the global
stream is one shuffle of the whole source (seed `config.seed`), cut into
global batches of B; process p reads only its contiguous rows
`[p*b, (p+1)*b)` (b = B/P) of every global batch, so the processes still read
disjoint examples, and the crops of element g depend on g alone. That is the
change input_pipeline.py would need for results independent of P.

`--record_reads=DIR` (with `--data_order=global`) makes every process write
the training-source indices it read to `DIR/process_{i}.json` at exit, to
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
import grain  # noqa: E402
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


class _RowsOfGlobalBatches(grain.transforms.Map):
  """Local position j -> element of the global stream this process owns.

  Local batch k of process p is rows [p*b, (p+1)*b) of global batch k.
  """

  def __init__(self, elements, process_index, local_batch, global_batch):
    self.elements = elements
    self.offset = process_index * local_batch
    self.local_batch = local_batch
    self.global_batch = global_batch

  def map(self, position):
    k, row = divmod(int(position), self.local_batch)
    return self.elements[k * self.global_batch + self.offset + row]


def global_order_pretrain_iterator(config, *, process_index=None,
                                   process_count=None, source_wrapper=None):
  """Like `input_pipeline.create_pretrain_iterator`, order independent of P.

  Same elements (two views of a random resized crop + flip, batches of
  `optim.batch_size // P`), but global batch t holds the same images with the
  same crops for every process count P (module docstring).
  """
  process_index = (jax.process_index() if process_index is None
                   else process_index)
  process_count = (jax.process_count() if process_count is None
                   else process_count)
  global_batch = config.optim.batch_size
  local_batch = global_batch // process_count
  source = datasets.get_source(config.dataset, config.dataset.train_split)
  if source_wrapper is not None:
    source = source_wrapper(source)
  elements = (grain.MapDataset.source(source).seed(config.seed).shuffle()
              .repeat(None)
              .random_map(input_pipeline.TwoViews(
                  config.dataset.image_size, config.aug.crop_scale,
                  config.aug.hflip_prob)))
  # As many local positions as whole global batches the endless stream has.
  num_local = len(elements) // global_batch * local_batch
  batches = (grain.MapDataset.range(num_local)
             .map(_RowsOfGlobalBatches(elements, process_index, local_batch,
                                       global_batch))
             .batch(local_batch, drop_remainder=True))
  # Nothing process-specific: the saved position is the global batch count.
  identity = {"order": "global", "seed": int(config.seed),
              "global_batch_size": global_batch,
              "num_examples": len(source),
              "image_size": int(config.dataset.image_size)}
  return input_pipeline.PretrainIterator(batches, config, identity)


def _define_flags():
  """main's flags plus ours; only when run as a script, so that importing
  this module (tests do) defines no absl flags."""
  from bayesncl_jax import main as entry  # pylint: disable=g-import-not-at-top
  flags.DEFINE_enum("data_order", "per_process", ["per_process", "global"],
                    "per_process: the shipped pipeline; global: one global "
                    "order, contiguous rows per process.")
  flags.DEFINE_string("record_reads", None, "Folder for the source indices "
                      "each process read (process_{i}.json).")
  return entry


def _install(entry, argv):
  """Swaps the iterator factory train.py calls, then runs main.main."""
  sources = []

  def wrap(source):
    sources.append(RecordingSource(source))
    return sources[-1]

  if FLAGS.data_order == "global":
    def factory(config, **kwargs):
      return global_order_pretrain_iterator(
          config, source_wrapper=wrap if FLAGS.record_reads else None,
          **kwargs)
    input_pipeline.create_pretrain_iterator = factory
  if FLAGS.record_reads:
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
