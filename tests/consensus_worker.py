r"""One process of a multi-host restore decision (tests/test_multihost.py).

  python tests/consensus_worker.py ADDRESS NUM_PROCESSES PROCESS_ID CKPT_DIR OUT

Joins a CPU job (jax.distributed, gloo), then runs exactly the restore
decision of `train.train_and_evaluate` — `integrity.agreed_latest_step`,
then `integrity.restore_newest_intact` — over the step folders of CKPT_DIR
(each process may be given its own, to simulate hosts that see different
checkpoints). A step "restores" to the text of its `value` file. Writes
{"step", "value"} or {"error", "message"} to OUT.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from bayesncl_jax import integrity  # noqa: E402


class StepFolders:
  """The part of orbax's CheckpointManager the restore decision reads."""

  def __init__(self, directory):
    self.directory = directory

  def all_steps(self):
    return integrity.committed_steps(self.directory)

  def latest_step(self):
    steps = self.all_steps()
    return steps[-1] if steps else None

  def reload(self):
    pass


def main(address, num_processes, process_id, ckpt_dir, out):
  jax.distributed.initialize(address, int(num_processes), int(process_id),
                             initialization_timeout=60)
  mngr = StepFolders(ckpt_dir)
  try:
    if integrity.agreed_latest_step(mngr) is None:
      result = {"step": None}
    else:
      value, step, _ = integrity.restore_newest_intact(
          mngr, os.path.dirname(ckpt_dir),
          lambda s: (integrity.step_dir(ckpt_dir, s) / "value").read_text())
      result = {"step": step, "value": value}
  except integrity.CheckpointError as e:
    result = {"error": type(e).__name__, "message": str(e)}
  with open(out, "w") as f:
    json.dump(result, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(*sys.argv[1:])
