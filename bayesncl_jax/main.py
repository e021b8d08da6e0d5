r"""Pre-training entry point.

  python -m bayesncl_jax.main --config=configs/fashion_mnist.py --workdir=DIR

Any config field can be overridden (`--config.optim.total_steps=100`) and
`configs/<name>.py:method=cl|ncl|bayesncl` selects the method. A workdir that
holds a checkpoint is resumed automatically, under the config it was started
with: a change that alters the result is refused unless
--allow_config_change (recorded in WORKDIR/run_history.jsonl). Re-running a
finished run changes nothing. Errors a user can fix end in a message and
exit status 2 (--verbose shows the traceback).

Multi-process: on Cloud TPU pods every worker runs the same command and JAX
finds its peers itself; on GPU clusters pass --coordinator_address,
--num_processes and --process_id (or set the JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID environment variables).

--workdir may be a local folder or gs://BUCKET/DIR (checkpoints, metrics,
TensorBoard, config and summary all go there).

One run per workdir: process 0 holds `WORKDIR/.bayesncl.lock`
(`workdir_lock`) while it runs; a second run on the same workdir stops at
once with a message naming the holder.

Exit status (`cli`, README "Exit status"): 0 when the run is complete; 2
for a usage or config error; 3 when the data is missing; 4 when another
process holds the workdir; 143 (`train.PREEMPTED_EXIT_CODE`) when a SIGTERM
(preemption notice) stopped it after saving a checkpoint — rerun the same
command to resume; 1 on internal errors (a bug; the traceback is printed).
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
from bayesncl_jax import workdir_lock

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/fashion_mnist.py:method=ncl.",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and summaries go "
                    "here (local path or gs:// bucket).")
flags.DEFINE_integer("debug_kill_after_step", None, "Fault injection for "
                     "resume tests: SIGKILL the process right after the "
                     "checkpoint of this step is written.")
flags.DEFINE_bool("allow_config_change", False, "Resume a run under a config "
                  "that changes its result (e.g. more steps); the change is "
                  "recorded in WORKDIR/run_history.jsonl.")
flags.DEFINE_bool("trust_unsealed", False, "Restore a checkpoint that has no "
                  "integrity manifest (its save was not sealed); it is sealed "
                  "if its values are finite.")
flags.DEFINE_bool("break_stale_lock", False, "Break the workdir's lock if "
                  "it is stale (its process is gone); see workdir_lock.")
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
  workdir = paths.check(FLAGS.workdir)  # gs:///x: refused before any I/O
  if paths.is_remote(workdir):
    paths.ensure_dir(workdir)  # the bucket exists (before its lock object)
  with workdir_lock.hold(workdir, "training",
                         break_stale=FLAGS.break_stale_lock,
                         enabled=jax.process_index() == 0):
    summary = train.train_and_evaluate(
        FLAGS.config, workdir,
        kill_after_step=FLAGS.debug_kill_after_step,
        allow_config_change=FLAGS.allow_config_change,
        trust_unsealed=FLAGS.trust_unsealed)
  if jax.process_index() == 0:
    if summary.get("already_finished"):
      print(f"{FLAGS.workdir} already finished its {summary['step']} steps; "
            "nothing was changed (to train it longer, raise "
            "--config.optim.total_steps with --allow_config_change).",
            flush=True)
    print(train.format_summary(summary, FLAGS.workdir), flush=True)
  if summary.get("preempted"):
    logging.warning("Preempted at step %d; the checkpoint is saved. Rerun the "
                    "same command to resume.", summary["step"])
    sys.exit(train.PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
  cli.run(main, config_flag="config")
