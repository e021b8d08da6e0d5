r"""Pre-training entry point.

  python -m bayesncl_jax.main --config=configs/fashion_mnist.py --workdir=DIR

Any config field can be overridden (`--config.optim.total_steps=100`) and
`configs/<name>.py:method=cl|ncl|bayesncl` selects the method. A workdir that
holds a checkpoint is resumed automatically.

Multi-process: on Cloud TPU pods every worker runs the same command and JAX
finds its peers itself; on GPU clusters pass --coordinator_address,
--num_processes and --process_id (or set the JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID environment variables).

--workdir may be a local folder or gs://BUCKET/DIR (checkpoints, metrics,
TensorBoard, config and summary all go there).

Exit status: 0 when the run is complete; 143 (`train.PREEMPTED_EXIT_CODE`)
when a SIGTERM (preemption notice) stopped it after saving a checkpoint —
rerun the same command to resume; 1 on errors.
"""
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from bayesncl_jax import cli
from bayesncl_jax import distributed
from bayesncl_jax import paths
from bayesncl_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/fashion_mnist.py:method=ncl.",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and summaries go "
                    "here (local path or gs:// bucket).")
flags.DEFINE_integer("debug_kill_after_step", None, "Fault injection for "
                     "resume tests: SIGKILL the process right after the "
                     "checkpoint of this step is written.")
distributed.define_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.quiet_library_logs()
  distributed.initialize_from_flags()
  logging.info("JAX process %d/%d, %d local / %d global devices (%s).",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  try:
    summary = train.train_and_evaluate(
        FLAGS.config, FLAGS.workdir,
        kill_after_step=FLAGS.debug_kill_after_step)
  except paths.PathError as e:  # a bad --workdir / data_dir: no traceback.
    logging.error("%s", e)
    sys.exit(f"error: {e}")
  if jax.process_index() == 0:
    print(train.format_summary(summary, FLAGS.workdir), flush=True)
  if summary["preempted"]:
    logging.warning("Preempted at step %d; the checkpoint is saved. Rerun the "
                    "same command to resume.", summary["step"])
    sys.exit(train.PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
  app.run(main)
