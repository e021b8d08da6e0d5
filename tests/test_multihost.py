"""Scale-out: multi-process runs, elastic restore, start-up time-outs.

Every job is real subprocesses of `python -m bayesncl_jax.main` (or
tests/multihost_worker.py, which is main recording the training examples
each process read) on simulated CPU devices; processes of one job talk through
jax.distributed + gloo on 127.0.0.1. Every wait has a time-out, so a hang
fails the test instead of blocking CI.

Tiny model (width 4, one stage), 6 steps of global batch 16, 256 training
examples; `eval_split=train` so the end-of-run evaluation reads only those
256.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import numpy as np
import portpicker
import pytest

from bayesncl_jax import augment
from bayesncl_jax import config_lib
from bayesncl_jax import datasets
from bayesncl_jax import input_pipeline
from bayesncl_jax import integrity
from bayesncl_jax import run_record
from bayesncl_jax import sharding
from bayesncl_jax import train

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "multihost_worker.py"
TOTAL_STEPS, CKPT_STEP = 6, 3
TINY = [
    "--config=configs/fashion_mnist.py",
    f"--config.optim.total_steps={TOTAL_STEPS}",
    "--config.optim.batch_size=16",
    "--config.dataset.max_train_examples=256",
    "--config.dataset.eval_split=train",
    "--config.model.width=4",
    "--config.model.stage_sizes=(1,)",
    "--config.model.proj_hidden=16",
    "--config.model.proj_out=32",
    # Colour jitter is a third of the step's compile time; grayscale (kept)
    # already exercises per-example device-side randomness across shards.
    "--config.aug.color_jitter_prob=0",
    "--config.log_every=1",
    f"--config.ckpt_every={CKPT_STEP}",
    "--config.progress_bar=False",
]
# Generous for 2 shared CPU cores; a healthy tiny job takes 20-40 s.
JOB_TIMEOUT_S = 240
# Metrics that are timings, not results.
TIMING_KEYS = ("images_per_sec", "step_ms", "input_ms", "compute_ms", "mfu")


# ----------------------------------------------------------------------------
# Launching jobs.
# ----------------------------------------------------------------------------
class Job:
  """One training job: `processes` subprocesses, `devices` CPU devices each."""

  def __init__(self, workdir: Path | str, *, devices: int, processes: int = 1,
               args=(), worker: bool = False, timeout: int = 120,
               only=None, cache: Path | None = None, logs: Path | None = None,
               program=None):
    """Starts the processes (`only`: just these process ids).

    `cache`: a JAX persistent compilation cache shared by the jobs of this
    test module; jobs with the same device layout then compile once.
    `logs`: where the logs go (`logs.p{i}.log`), default next to
    `workdir`; needed when the workdir is a gs:// URL.
    `program`: what runs before `--workdir` (default: main, or the worker,
    with the TINY config), e.g. ["-m", "bayesncl_jax.evaluate"].
    """
    self.workdir = workdir
    only = range(processes) if only is None else only
    base = workdir if logs is None else logs
    self.logs = [base.with_name(f"{base.name}.p{i}.log") for i in only]
    env = dict(os.environ)
    env.update(
        # LLVM -O0: a third of the compile time, and every job of a
        # comparison compiles the same way.
        XLA_FLAGS=(f"--xla_force_host_platform_device_count={devices} "
                   "--xla_backend_optimization_level=0"),
        JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
        PYTHONUNBUFFERED="1")
    if cache is not None:
      env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    if program is None:
      program = ([str(WORKER)] if worker
                 else ["-m", "bayesncl_jax.main"]) + TINY
    common = [sys.executable, *program, f"--workdir={workdir}", *args]
    if processes > 1:
      address = f"127.0.0.1:{portpicker.pick_unused_port()}"
      self.address = address
      per_process = [[f"--coordinator_address={address}",
                      f"--num_processes={processes}", f"--process_id={i}",
                      f"--distributed_timeout={timeout}"]
                     for i in only]
    else:
      per_process = [[]]
    self.procs = []
    for cmd, log in zip(per_process, self.logs):
      with open(log, "w") as f:
        self.procs.append(subprocess.Popen(
            common + cmd, cwd=REPO, env=env, stdout=f,
            stderr=subprocess.STDOUT))

  def wait(self, deadline: float | None = None) -> list[int]:
    """Exit codes; kills this job's processes if `deadline` passes."""
    if deadline is None:
      deadline = time.monotonic() + JOB_TIMEOUT_S
    codes = []
    for proc in self.procs:
      try:
        codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
      except subprocess.TimeoutExpired:
        for p in self.procs:
          p.kill()
          p.wait()
        pytest.fail(f"Job in {self.workdir} hung (> {JOB_TIMEOUT_S}s):\n"
                    + self.output())
    return codes

  def output(self, index: int | None = None) -> str:
    """All logs, or that of the `index`-th started process."""
    logs = self.logs if index is None else [self.logs[index]]
    return "\n".join(f"--- {log.name}\n{log.read_text()}" for log in logs)

  def tail(self) -> str:
    return "\n".join(f"--- {log.name}\n...{log.read_text()[-3000:]}"
                     for log in self.logs)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("jax_compilation_cache")


def run_jobs(*jobs: Job) -> None:
  """Waits for jobs started together; fails unless every process exited 0."""
  deadline = time.monotonic() + JOB_TIMEOUT_S
  for job in jobs:
    codes = job.wait(deadline)
    assert codes == [0] * len(codes), f"exit codes {codes}\n{job.tail()}"


def read_metrics(workdir: Path) -> list[dict]:
  with open(workdir / "metrics.jsonl") as f:
    return [json.loads(line) for line in f]


def restored_state(workdir: Path, step: int):
  """The TrainState saved at `step`, restored onto 1 device of this process.

  Also exercises restoring into a sharding that differs from the writer's.
  """
  config = train.load_config(workdir)
  setup = train.build(config, sharding.make_mesh(jax.devices()[:1]))
  mngr = train.checkpoint_manager(workdir, config)
  try:
    state = train.restore_checkpoint(mngr, setup, None, step=step,
                                     restore_data=False)
  finally:
    mngr.close()
  return jax.device_get(state)


def copy_checkpoint(src: Path, dst: Path, step: int) -> None:
  """A fresh workdir holding `src`'s checkpoint of `step`, its integrity
  manifest and the run's recorded configs (what an interrupted run leaves;
  a resume refuses a run without them).

  The checkpoint an interrupted run leaves at `step` is the one the
  uninterrupted run wrote at `step` (the loop is deterministic), so this is
  the interruption without running the first half twice.
  """
  shutil.copytree(src / "checkpoints" / str(step),
                  dst / "checkpoints" / str(step))
  manifest = f"{step}{integrity.MANIFEST_SUFFIX}"
  shutil.copy2(src / "checkpoints" / manifest, dst / "checkpoints" / manifest)
  for name in (run_record.CONFIG_INITIAL, run_record.CONFIG):
    shutil.copy2(src / name, dst / name)


def results(metrics: list[dict]) -> list[dict]:
  return [{k: v for k, v in m.items() if k not in TIMING_KEYS}
          for m in metrics]


def assert_metrics_close(got, want, rtol, atol=0.0):
  assert [m["step"] for m in got] == [m["step"] for m in want]
  for g, w in zip(results(got), results(want)):
    assert g.keys() == w.keys()
    for key in w:
      np.testing.assert_allclose(g[key], w[key], rtol=rtol, atol=atol,
                                 err_msg=f"step {w['step']} {key}")


# ----------------------------------------------------------------------------
# 1. Two processes x 2 devices == one process x 4 devices.
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scaled(tmp_path_factory, cache):
  """1x4 and 2x2 runs of the shipped pipeline, in parallel.

  Also continues the 2-process run's step-3 checkpoint on 1 process x 4
  devices (a pod resized between runs).
  """
  root = tmp_path_factory.mktemp("scaled")
  one = Job(root / "one_x4", devices=4, cache=cache)
  two = Job(root / "two_x2", devices=2, processes=2, worker=True, cache=cache,
            args=[f"--record_reads={root / 'reads'}"])
  run_jobs(one, two)
  copy_checkpoint(two.workdir, root / "two_then_one", CKPT_STEP)
  resumed = Job(root / "two_then_one", devices=4, cache=cache)
  run_jobs(resumed)
  return {"one": one, "two": two, "resumed": resumed,
          "reads": root / "reads"}


@pytest.mark.slow
def test_two_processes_match_one_process(scaled):
  """Same global batches and config: same loss curve, same parameters.

  Exact equality is not promised: the gradient all-reduce, BatchNorm
  statistics and the NT-Xent all-gather sum the same float32 numbers over
  4 devices in both jobs, but in-process vs gloo reductions may order them
  differently (~1 ulp), which a few LARS steps may amplify. 1e-5 relative is
  ~100 ulp and far below any real difference (a different batch changes the
  loss by ~1e-1).
  """
  one = read_metrics(scaled["one"].workdir)
  two = read_metrics(scaled["two"].workdir)
  assert [m["step"] for m in one] == list(range(1, TOTAL_STEPS + 1))
  assert_metrics_close(two, one, rtol=1e-5, atol=1e-7)
  # The test can fail: successive global batches differ by far more.
  losses = [m["loss"] for m in one]
  assert np.min(np.abs(np.diff(losses))) > 1e-3, losses
  chex.assert_trees_all_close(
      restored_state(scaled["two"].workdir, TOTAL_STEPS),
      restored_state(scaled["one"].workdir, TOTAL_STEPS),
      rtol=1e-5, atol=1e-6)
  s_one = json.loads((scaled["one"].workdir / "summary.json").read_text())
  s_two = json.loads((scaled["two"].workdir / "summary.json").read_text())
  for key in ("test_online_acc", "test_sparsity", "test_gate_open_rate"):
    np.testing.assert_allclose(s_two[key], s_one[key], rtol=1e-5, err_msg=key)


@pytest.mark.slow
def test_only_process_zero_writes_but_all_checkpoint(scaled):
  two = scaled["two"]
  # Both processes appending would give every step twice.
  steps = [m["step"] for m in read_metrics(two.workdir)]
  assert steps == list(range(1, TOTAL_STEPS + 1))
  assert (two.workdir / "summary.json").exists()
  assert "run summary" in two.output(0)
  assert "run summary" not in two.output(1)
  for step in (CKPT_STEP, TOTAL_STEPS):
    # The data position is global: one JSON, written once.
    data = two.workdir / "checkpoints" / str(step) / "data"
    names = sorted(p.name for p in data.iterdir())
    assert "metadata" in names and not any(
        n.startswith("process_") for n in names), names
    assert json.loads((data / "metadata").read_text())["next_batch"] == step
  for i in range(2):
    assert "JAX process %d/2, 2 local / 4 global devices" % i in (
        two.output(i)), two.tail()


@pytest.mark.slow
def test_processes_read_disjoint_examples(scaled):
  reads = [set(json.loads((scaled["reads"] / f"process_{i}.json")
                          .read_text())) for i in range(2)]
  # Each consumed at least its 8 rows x 6 steps (more with prefetch).
  assert all(len(r) >= 8 * TOTAL_STEPS for r in reads), [len(r) for r in reads]
  assert not reads[0] & reads[1]


@pytest.mark.slow
def test_two_process_checkpoint_resumes_on_one_process(scaled):
  """Pod resized: 2 processes' step-3 checkpoint, continued by 1 process.

  Steps 4-6 equal those of the uninterrupted 1-process run: the state and
  the global data position both carry over.
  """
  want = read_metrics(scaled["one"].workdir)[CKPT_STEP:]
  assert_metrics_close(read_metrics(scaled["resumed"].workdir), want,
                       rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------
# 1b. Multi-process evaluation == one process == a direct computation.
# ----------------------------------------------------------------------------
# kNN over all 256 examples with equal votes (T huge): every query is given
# the majority class of the pool (and the 5 most frequent classes), so top-1
# and top-5 are known from the labels alone, and only if --knn_k and
# --knn_temperature reach the classifier.
EVAL_ARGS = ["--protocols=knn,interp,grids", "--knn_k=256",
             "--knn_temperature=1e6",
             # 256 examples in batches of 48 (24 per process): padded.
             "--batch_size=48", "--grid_dims=3", "--grid_images=4"]


@pytest.fixture(scope="module")
def evaluated(scaled, cache):
  """`bayesncl_jax.evaluate` on the 2-process run's final checkpoint, by
  1 process x 4 devices and by 2 processes x 2 devices, in parallel."""
  src = scaled["two"].workdir
  jobs = {}
  for name, devices, processes in (("one", 4, 1), ("two", 2, 2)):
    workdir = src.with_name(f"eval_{name}")
    shutil.copytree(src, workdir)
    jobs[name] = Job(workdir, devices=devices, processes=processes,
                     cache=cache, program=["-m", "bayesncl_jax.evaluate"],
                     args=EVAL_ARGS)
  run_jobs(*jobs.values())
  return {name: job.workdir / "eval" for name, job in jobs.items()}


def _direct_forward(workdir: Path):
  """Eval-mode outputs of the final state on the 256 examples, 1 device."""
  config = train.load_config(workdir)
  setup = train.build(config, sharding.make_mesh(jax.devices()[:1]))
  state = restored_state(workdir, TOTAL_STEPS)
  source = datasets.get_source(config.dataset, config.dataset.eval_split)
  images = np.stack([source[i]["image"] for i in range(len(source))])
  labels = np.array([source[i]["label"] for i in range(len(source))])
  x = augment.normalize(images, config.dataset.mean, config.dataset.std)
  out = jax.jit(lambda v, x: setup.model.apply(v, x, train=False))(
      {"params": state.params, "batch_stats": state.batch_stats}, x)
  return jax.device_get(out), labels


@pytest.mark.slow
def test_two_process_online_eval_equals_a_direct_computation(scaled):
  """summary.json of the 2-process run vs a plain forward of its state.

  The end-of-run evaluation reads 256 examples in a global batch of 512
  (128 real + 128 padding rows per process).
  """
  workdir = scaled["two"].workdir
  summary = json.loads((workdir / "summary.json").read_text())
  out, labels = _direct_forward(workdir)
  assert labels.size == 256
  want = {"test_online_acc": np.mean(np.argmax(out["logits"], -1) == labels),
          "test_sparsity": np.mean(np.abs(out["z"]) <= 1e-5),
          "test_gate_open_rate": np.mean(out["gate_mask"])}
  for key, value in want.items():
    np.testing.assert_allclose(summary[key], value, rtol=0, atol=1e-6,
                               err_msg=key)


@pytest.mark.slow
def test_two_process_evaluation_equals_one_process(evaluated):
  """Each process extracts its strided share; together, the 1-process set."""
  one, two = ({k: v for k, v in json.loads((evaluated[name] / "report.json")
                                          .read_text()).items()
               if k not in ("seconds", "protocol")} for name in ("one", "two"))
  assert one["num_test_examples"] == two["num_test_examples"] == 256
  assert one.keys() == two.keys()
  for key, value in one.items():
    if isinstance(value, float):
      np.testing.assert_allclose(two[key], value, rtol=1e-5, err_msg=key)
    else:
      assert two[key] == value, key
  grids = [np.load(evaluated[name] / "top_activations.npz")
           for name in ("one", "two")]
  for key in ("dims", "indices", "labels", "images"):
    np.testing.assert_array_equal(grids[1][key], grids[0][key], err_msg=key)


@pytest.mark.slow
def test_evaluate_flags_reach_the_knn_classifier(evaluated, scaled):
  config = train.load_config(scaled["two"].workdir)
  source = datasets.get_source(config.dataset, config.dataset.eval_split)
  labels = np.array([source[i]["label"] for i in range(len(source))])
  counts = np.sort(np.bincount(labels, minlength=10))[::-1]
  assert counts[0] > counts[1]            # one majority class: 30 of 256.
  for name in ("one", "two"):
    report = json.loads((evaluated[name] / "report.json").read_text())
    assert report["knn_top1"] == pytest.approx(counts[0] / 256), name
    # Top-5: the 5 most frequent classes, whichever of equally frequent
    # ones wins the 5th place.
    assert report["knn_top5"] == pytest.approx(np.sum(counts[:5]) / 256), name


# ----------------------------------------------------------------------------
# 2. Elastic restore: 8 devices -> 4 and 1 devices.
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def elastic(tmp_path_factory, cache):
  """An uninterrupted 8-device run; its step-3 checkpoint resumed on 4, 1."""
  root = tmp_path_factory.mktemp("elastic")
  full = Job(root / "full_x8", devices=8, cache=cache)
  run_jobs(full)
  resumed = {}
  for devices in (4, 1):
    copy_checkpoint(full.workdir, root / f"resumed_x{devices}", CKPT_STEP)
    resumed[devices] = Job(root / f"resumed_x{devices}", devices=devices,
                           cache=cache)
  run_jobs(*resumed.values())
  return full, resumed


@pytest.mark.slow
@pytest.mark.parametrize("devices", [4, 1])
def test_resume_on_fewer_devices_sees_the_same_data(elastic, devices):
  """Steps 4-6 after the restore == steps 4-6 of the uninterrupted run.

  The state is restored into the new (4- or 1-device) sharding and the Grain
  iterator continues at batch 3: a restarted iterator (batches 0-2) or a
  skipped batch would change the loss by ~1e-1 (checked below), while 8 vs
  4 vs 1 devices only reorder float32 sums (BatchNorm statistics, gradient
  all-reduce): 1e-5 relative, ~100 ulp.
  """
  full, resumed = elastic
  job = resumed[devices]
  assert f"Resumed from {job.workdir / 'checkpoints'} at step {CKPT_STEP}" \
      in job.output(), job.tail()
  assert f"JAX process 0/1, {devices} local / {devices} global" in (
      job.output())
  want = read_metrics(full.workdir)
  got = read_metrics(job.workdir)
  assert [m["step"] for m in got] == list(range(CKPT_STEP + 1,
                                                TOTAL_STEPS + 1))
  assert_metrics_close(got, want[CKPT_STEP:], rtol=1e-5, atol=1e-7)
  losses = [m["loss"] for m in want]
  assert np.min(np.abs(np.diff(losses))) > 1e-3, losses
  chex.assert_trees_all_close(restored_state(job.workdir, TOTAL_STEPS),
                              restored_state(full.workdir, TOTAL_STEPS),
                              rtol=1e-5, atol=1e-6)
  data = job.workdir / "checkpoints" / str(TOTAL_STEPS) / "data"
  state = json.loads((data / "metadata").read_text())
  assert state["next_batch"] == TOTAL_STEPS


# ----------------------------------------------------------------------------
# 3. A peer that never starts: a clear error, not a hang or a crash.
# ----------------------------------------------------------------------------
@pytest.mark.slow
def test_missing_peer_fails_with_a_clear_timeout_error(tmp_path):
  """--distributed_timeout=10 with one or more processes never started.

  Before distributed.rendezvous, XLA's coordination client aborted the
  process (SIGABRT, "another task died ... DEADLINE_EXCEEDED") instead of
  raising; now every started process exits 1 naming who is missing.
  """
  timeout = 10
  lone_worker = Job(tmp_path / "lone_worker", devices=1, processes=2,
                    only=[1], timeout=timeout)
  lone_coordinator = Job(tmp_path / "lone_coordinator", devices=1,
                         processes=2, only=[0], timeout=timeout)
  two_of_three = Job(tmp_path / "two_of_three", devices=1, processes=3,
                     only=[0, 1], timeout=timeout)
  jobs = (lone_worker, lone_coordinator, two_of_three)
  start = time.monotonic()
  codes = [job.wait(start + timeout + 60) for job in jobs]
  assert codes == [[1], [1], [1, 1]], [job.tail() for job in jobs]
  port = lone_coordinator.address.rpartition(":")[2]
  expected = [
      (lone_worker, 0, "Process 1 of 2 timed out after 10s: the coordinator,"
       f" process 0, never answered at {lone_worker.address}"),
      (lone_coordinator, 0, f"Process 0 of 2 (the coordinator, port {port})"
       " timed out after 10s: process(es) 1 never joined"),
      (two_of_three, 0, "Process 0 of 3 (the coordinator, port "
       f"{two_of_three.address.rpartition(':')[2]}) timed out after 10s: "
       "process(es) 2 never joined"),
      (two_of_three, 1, "Process 1 of 3 timed out after 10s: process(es) 2 "
       f"never joined the coordinator at {two_of_three.address}"),
  ]
  for job, index, message in expected:
    out = job.output(index)
    assert "RendezvousError: " + message in out, out[-3000:]
    assert "Fatal Python error" not in out and "Aborted" not in out
  # Within the time-out, not at some later watchdog.
  assert time.monotonic() - start < timeout + 45


# ----------------------------------------------------------------------------
# The shipped pipeline: the same global batches for any process count.
# ----------------------------------------------------------------------------
def _import_worker():
  """tests/multihost_worker.py as a module (it defines no flags on import)."""
  spec = importlib.util.spec_from_file_location("multihost_worker", WORKER)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _tiny_config():
  return config_lib.load_file(REPO / "configs" / "fashion_mnist.py", None, {
      "optim.batch_size": 16, "dataset.max_train_examples": 256})


def test_global_batches_do_not_depend_on_process_count():
  """Rows of P processes, stacked, == the 1-process batch; reads disjoint.

  Six steps of 16 out of 256 examples; the processes of one run read
  disjoint examples (only their own rows are decoded).
  """
  recording_source = _import_worker().RecordingSource
  config = _tiny_config()
  source = input_pipeline.datasets.get_source(config.dataset, "train")
  steps = 6
  batches, reads = {}, {}
  for count in (1, 2, 4):
    for index in range(count):
      recorder = recording_source(source)
      it = input_pipeline.create_pretrain_iterator(
          config, process_index=index, process_count=count, source=recorder)
      batches[index, count] = [next(it) for _ in range(steps)]
      it.close()
      reads[index, count] = recorder.read
      assert batches[index, count][0]["view1"].shape[0] == 16 // count
  for step in range(steps):
    one = batches[0, 1][step]
    for count in (2, 4):
      for key in one:
        stacked = np.concatenate([batches[i, count][step][key]
                                  for i in range(count)])
        np.testing.assert_array_equal(stacked, one[key],
                                      err_msg=f"{count} {step} {key}")
  # The test can fail: successive batches differ.
  assert not np.array_equal(batches[0, 1][0]["view1"],
                            batches[0, 1][1]["view1"])
  for count in (2, 4):
    sets = [reads[i, count] for i in range(count)]
    assert all(len(r) >= steps * 16 // count for r in sets)
    for i in range(count):
      for j in range(i + 1, count):
        assert not sets[i] & sets[j], (count, i, j)


# ----------------------------------------------------------------------------
# Restore: process 0 decides the step, every host checks it.
# ----------------------------------------------------------------------------
CONSENSUS_WORKER = REPO / "tests" / "consensus_worker.py"


def _step_folders(ckpt_dir: Path, steps, corrupt=()):
  """Committed, sealed step folders holding `value` = "state of step N"."""
  from bayesncl_jax import integrity  # pylint: disable=g-import-not-at-top
  for step in steps:
    (ckpt_dir / str(step)).mkdir(parents=True)
    (ckpt_dir / str(step) / "value").write_text(f"state of step {step}")
    integrity.write_manifest(ckpt_dir, step)
    if step in corrupt:  # changed after sealing: same size, other bytes
      (ckpt_dir / str(step) / "value").write_text(f"state of step {step}"
                                                  .upper())


@pytest.mark.parametrize("views, expected", [
    # Process 1 has not seen step 6 yet (a lagging listing, a local disk).
    ({0: [3, 6], 1: [3]}, "missing"),
    # Process 1's copy of step 6 differs from what was sealed.
    ({0: [3, 6], 1: [3, 6]}, "corrupt"),
    # Process 1 sees a newer step than process 0: process 0's choice wins.
    ({0: [3], 1: [3, 6]}, 3),
    # Process 0 sees none: it must not start fresh while process 1 resumes.
    ({0: [], 1: [3]}, "none"),
], ids=["missing-on-1", "corrupt-on-1", "newer-on-1", "none-on-0"])
def test_hosts_restore_the_step_process_0_chose_or_stop_together(
    tmp_path, views, expected):
  """Two processes, each looking at its own checkpoint folder: both
  restore the same step, or both stop with the same one message naming
  every process, its newest step and what it sees of the chosen one."""
  address = f"127.0.0.1:{portpicker.pick_unused_port()}"
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  procs, outs = [], []
  for i, steps in views.items():
    ckpt_dir = tmp_path / f"host{i}" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    _step_folders(ckpt_dir, steps,
                  corrupt=[6] if expected == "corrupt" and i == 1 else [])
    outs.append(tmp_path / f"out{i}.json")
    procs.append(subprocess.Popen(
        [sys.executable, str(CONSENSUS_WORKER), address, str(len(views)),
         str(i), str(ckpt_dir), str(outs[-1])], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  logs = []
  for proc in procs:
    try:
      logs.append(proc.communicate(timeout=JOB_TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      pytest.fail("the restore decision hung")
  assert [p.returncode for p in procs] == [0, 0], logs
  results = [json.loads(out.read_text()) for out in outs]
  if isinstance(expected, int):
    assert results == [{"step": expected,
                        "value": f"state of step {expected}"}] * 2
    return
  # One message, the same on every process (but for the folder each was
  # given here).
  results[1]["message"] = results[1]["message"].replace("host1", "host0")
  assert results[0] == results[1], results
  assert results[0]["error"] == "HostsDisagreeError"
  message = results[0]["message"]
  assert message.startswith("The hosts disagree on the checkpoint to restore")
  if expected == "none":
    assert "process 0 sees no checkpoint" in message
    assert "process 0: newest checkpoint none" in message
    assert "process 1: newest checkpoint step 3" in message
  else:
    assert "process 0 chose step 6" in message
    assert "process 0: newest checkpoint step 6; step 6 is intact there" in (
        message)
    newest_1 = 3 if expected == "missing" else 6
    assert (f"process 1: newest checkpoint step {newest_1}; step 6 is "
            f"{expected} there") in message
  assert "Nothing was restored" in message and "gs://" in message
