"""The training system end to end: configs, real data, resume, guards."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from bayesncl_jax import config_lib
from bayesncl_jax import input_pipeline
from bayesncl_jax import integrity
from bayesncl_jax import run_record
from bayesncl_jax import sharding
from bayesncl_jax import train

ROOT = pathlib.Path(__file__).resolve().parent.parent
FMNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not FMNIST.exists(), reason="apt-get install -y dataset-fashion-mnist")

# Tiny model: same code as the real one, fast on a CPU.
TINY = {"model.width": 4, "model.stage_sizes": (1,), "model.proj_hidden": 32,
        "model.proj_out": 16, "progress_bar": False}


def load_config(name, arg=None, **overrides):
  return config_lib.load_file(ROOT / "configs" / f"{name}.py", arg,
                              {**TINY, **overrides})


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def cli_args(overrides):
  args = []
  for key, value in {**TINY, **overrides}.items():
    if isinstance(value, tuple):
      value = "(" + ",".join(map(str, value)) + ("," if len(value) == 1
                                                 else "") + ")"
    args.append(f"--config.{key}={value}")
  return args


def run_main(workdir, overrides, *, extra=(), check=True, timeout=600):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, "-m", "bayesncl_jax.main",
         "--config=configs/fashion_mnist.py", f"--workdir={workdir}",
         *cli_args(overrides), *extra]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
  return proc


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cifar10", "cifar100", "imagenet100"])
def test_config_runs_two_steps_on_mock_data(name, tmp_path):
  config = load_config(
      name, "method=bayesncl", **{
          "optim.total_steps": 2, "optim.batch_size": 8, "log_every": 1,
          "dataset.num_workers": 0, "dataset.image_size": 32,
          "dataset.data_dir": str(tmp_path / "data"),
          "model.dtype": "float32"})
  (tmp_path / "data").mkdir()  # exists but holds no converted ImageNet-100
  mesh = sharding.make_mesh(jax.devices()[:1])
  with tfds.testing.mock_data(num_examples=400 if name == "imagenet100"
                              else 32):
    summary = train.train_and_evaluate(config, tmp_path / "run", mesh=mesh)
  assert summary["step"] == 2
  assert np.isfinite(summary["train_loss"])
  assert 0.0 <= summary["test_online_acc"] <= 1.0
  assert len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 2


@pytest.mark.slow
@needs_fmnist
@pytest.mark.parametrize("method", ["cl", "ncl"])
def test_fashion_mnist_config_runs_each_method(method, tmp_path):
  config = load_config("fashion_mnist", f"method={method}", **{
      "optim.total_steps": 2, "optim.batch_size": 16, "log_every": 1,
      "dataset.max_train_examples": 64})
  summary = train.train_and_evaluate(
      config, tmp_path, mesh=sharding.make_mesh(jax.devices()[:1]))
  assert summary["method"] == method and summary["step"] == 2
  assert ("train_kl" in summary) is False


@pytest.mark.slow
@needs_fmnist
@pytest.mark.parametrize("arg", [
    "method=ncl_topk,top_k=3",
    "method=bayesncl,soft_gate,no_isolation,gate_depth=1"])
def test_variants_train_and_report_online_stats(arg, tmp_path):
  """The online statistics of train.py hold for the §7 variants too."""
  config = load_config("fashion_mnist", arg, **{
      "optim.total_steps": 2, "optim.batch_size": 16, "log_every": 1,
      "dataset.max_train_examples": 64})
  summary = train.train_and_evaluate(
      config, tmp_path, mesh=sharding.make_mesh(jax.devices()[:1]))
  assert summary["step"] == 2 and np.isfinite(summary["train_loss"])
  if config.method == "ncl_topk":
    # At most 3 of the 16 dims are non-zero in training and evaluation.
    assert summary["train_sparsity"] >= 1 - 3 / 16
    assert summary["test_sparsity"] >= 1 - 3 / 16
    assert "train_gate_open_rate" not in summary
    # The share of rows short of k positive entries, in every logged row.
    logged = read_jsonl(tmp_path / "metrics.jsonl")
    assert all(0.0 <= m["topk_short_row_frac"] <= 1.0 for m in logged)
    assert summary["train_topk_short_row_frac"] == logged[-1][
        "topk_short_row_frac"]
  else:
    # Soft gating: the training "open rate" is the mean p, in (0, 1).
    assert 0.0 < summary["train_gate_open_rate"] < 1.0
    assert 0.0 <= summary["test_gate_open_rate"] <= 1.0
    assert np.isfinite(summary["train_kl"])


@needs_fmnist
def test_topk_short_row_frac_counts_rows_short_of_k_positives():
  """The training step's topk_short_row_frac against the projector output
  recomputed from h: the share of the 2N rows with < k positive entries."""
  k = 8  # of 16 dims: at initialisation some rows are short, some not.
  config = load_config("fashion_mnist", f"method=ncl_topk,top_k={k}",
                       **{"optim.batch_size": 16, "optim.total_steps": 1})
  setup = train.build(config, sharding.make_mesh(jax.devices()[:1]))
  state = train.init_state(setup, jax.random.key(0))
  update = train.make_update_fn(config, setup.model, setup.tx)
  views = jax.random.normal(jax.random.key(1), (2, 16, *setup.image_shape))
  labels = jax.numpy.zeros(16, jax.numpy.int32)
  _, _, extras = update(state, views[0], views[1], labels, None)
  h = extras["outputs"]["h"]  # the projector does not change h

  def projector_out(params):
    return np.asarray(setup.model.apply({"params": params}, h,
                                        method=lambda m, h: m.projector(h)))
  # At initialisation every row has the same sign pattern (the output bias
  # dominates): centre each output dim on its median so rows differ.
  params = state.params
  dense = params["projector"]["Dense_1"]
  dense["bias"] = dense["bias"] - np.median(projector_out(params), axis=0)
  state = state.replace(params=params)
  _, metrics, _ = update(state, views[0], views[1], labels, None)
  short = np.sum(projector_out(state.params) > 0, axis=1) < k
  assert 0 < short.sum() < short.size  # both kinds of row occur
  assert float(metrics["topk_short_row_frac"]) == pytest.approx(short.mean())


@pytest.mark.slow
@needs_fmnist
def test_real_fashion_mnist_learns_checkpoints_and_resumes(tmp_path):
  overrides = {"optim.total_steps": 40, "optim.batch_size": 64,
               "log_every": 5, "ckpt_every": 20,
               "dataset.max_train_examples": 2048}
  config = load_config("fashion_mnist", **overrides)
  mesh = sharding.make_mesh(jax.devices()[:1])
  config.optim.total_steps = 20  # first leg stops at 20 ...
  config.optim.epochs = 0  # (total_steps drives the schedule)
  config.optim.warmup_epochs = 0
  first = train.train_and_evaluate(config, tmp_path, mesh=mesh)
  assert first["step"] == 20
  assert integrity.committed_steps(tmp_path / "checkpoints") == [20]
  config.optim.total_steps = 40  # ... the second resumes there (a longer
  # schedule changes the result: allowed explicitly, and recorded).
  second = train.train_and_evaluate(config, tmp_path, mesh=mesh,
                                    allow_config_change=True)
  assert second["step"] == 40
  logged = read_jsonl(tmp_path / "metrics.jsonl")
  assert [m["step"] for m in logged] == list(range(5, 45, 5))
  losses = [m["loss"] for m in logged]
  assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.05, losses
  assert set(logged[0]) >= {"loss", "nce", "kl", "online_acc",
                            "gate_open_rate", "sparsity", "lr",
                            "images_per_sec", "grad_norm"}
  assert (tmp_path / "tensorboard").is_dir()
  assert json.load(open(tmp_path / "summary.json"))["step"] == 40


def _equal_params(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@needs_fmnist
def test_relative_workdir_trains_and_checkpoints(tmp_path):
  """--workdir=run from another folder: Orbax needs an absolute checkpoint
  directory, so a relative workdir used to die at the first save."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  overrides = {"optim.total_steps": 2, "optim.batch_size": 16,
               "ckpt_every": 1, "dataset.max_train_examples": 64}
  proc = subprocess.run(
      [sys.executable, "-m", "bayesncl_jax.main",
       f"--config={ROOT / 'configs' / 'fashion_mnist.py'}", "--workdir=run",
       *cli_args(overrides)], cwd=tmp_path, env=env, capture_output=True,
      text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert integrity.committed_steps(tmp_path / "run" / "checkpoints")[-1] == 2
  assert (tmp_path / "run" / "summary.json").exists()


@pytest.mark.slow
@needs_fmnist
def test_sigkill_resume_is_bitwise_identical(tmp_path):
  # Killed after step k, whose rows are logged, but the newest checkpoint is
  # k - 1: the resumed run logs step k again and must not duplicate its row.
  k = 3
  overrides = {"optim.total_steps": 2 * k, "optim.batch_size": 16,
               "log_every": 1, "ckpt_every": k - 1,
               "dataset.max_train_examples": 256}
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  run_main(straight, overrides)
  proc = run_main(killed, overrides, extra=[f"--debug_kill_after_step={k}"],
                  check=False)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  assert not (killed / "summary.json").exists()
  assert [m["step"] for m in read_jsonl(killed / "metrics.jsonl")] == list(
      range(1, k + 1))
  run_main(killed, overrides)  # resumes from step k - 1
  # Same batches and augmentations: identical losses at every step ...
  a, b = read_jsonl(straight / "metrics.jsonl"), read_jsonl(
      killed / "metrics.jsonl")
  assert [m["step"] for m in b] == list(range(1, 2 * k + 1))
  for ma, mb in zip(a, b):
    assert ma["loss"] == mb["loss"] and ma["nce"] == mb["nce"], (ma, mb)
  # ... and bitwise identical final parameters.
  config = load_config("fashion_mnist", **overrides)
  mesh = sharding.make_mesh(jax.devices()[:1])
  setup = train.build(config, mesh)
  states = []
  for wd in (straight, killed):
    mngr = train.checkpoint_manager(wd, config)
    assert mngr.latest_step() == 2 * k
    states.append(train.restore_checkpoint(mngr, setup, None,
                                           restore_data=False))
    mngr.close()
  _equal_params(states[0].params, states[1].params)
  _equal_params(states[0].opt_state, states[1].opt_state)


def _python_pids_under(workdir) -> list[int]:
  """Processes whose command line names `workdir` (Linux /proc)."""
  pids = []
  for proc_dir in pathlib.Path("/proc").iterdir():
    if proc_dir.name.isdigit():
      try:
        cmdline = (proc_dir / "cmdline").read_bytes()
      except OSError:
        continue
      if f"--workdir={workdir}".encode() in cmdline and b"python" in cmdline:
        pids.append(int(proc_dir.name))
  return pids


@pytest.mark.slow
@needs_fmnist
@pytest.mark.parametrize("how, signum", [
    ("main", signal.SIGTERM), ("main", signal.SIGHUP),
    ("gpu_train.sh --eval", signal.SIGTERM)],
    ids=["SIGTERM-main", "SIGHUP-main", "SIGTERM-wrapper"])
def test_sigterm_saves_and_exits_with_the_preemption_code(tmp_path, how,
                                                          signum):
  """SIGTERM or SIGHUP (a Spot/maintenance shutdown, a closed terminal or
  tmux) to main, or SIGTERM to the pid of the launch wrapper only: a
  checkpoint, exit 143, no evaluation and no process left behind."""
  overrides = {"optim.total_steps": 100000, "optim.batch_size": 16,
               "log_every": 1, "ckpt_every": 100000,
               "dataset.max_train_examples": 256}
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "JAX_PLATFORMS": "cpu"}
  args = ["--config=configs/fashion_mnist.py", f"--workdir={tmp_path}",
          *cli_args(overrides)]
  if how == "main":
    cmd = [sys.executable, "-m", "bayesncl_jax.main", *args]
  else:
    cmd = ["bash", str(ROOT / "launch" / "gpu_train.sh"), *args,
           f"--python={sys.executable}", "--eval"]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 300
  while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    assert time.time() < deadline, "training never started"
    time.sleep(0.5)
  proc.send_signal(signum)
  try:
    _, stderr = proc.communicate(timeout=120)
  finally:
    leftover = _python_pids_under(tmp_path)
    for pid in leftover:  # a failed test leaves no training behind
      os.kill(pid, signal.SIGKILL)
  # Saved, then the distinct "preempted" status: not a completed run.
  assert proc.returncode == train.PREEMPTED_EXIT_CODE == 143, stderr[-3000:]
  steps = integrity.committed_steps(tmp_path / "checkpoints")
  assert len(steps) == 1 and 2 <= steps[0] < 100000
  assert "SIGTERM received" in stderr
  assert ("SIGHUP received" in stderr) == (signum == signal.SIGHUP)
  assert "bayesncl_jax.evaluate" not in stderr
  assert leftover == []


@pytest.mark.slow
@needs_fmnist
def test_corrupt_or_incompatible_checkpoint_is_a_clear_error(tmp_path):
  overrides = {"optim.total_steps": 2, "optim.batch_size": 16,
               "log_every": 1, "ckpt_every": 2,
               "dataset.max_train_examples": 64}
  mesh = sharding.make_mesh(jax.devices()[:1])
  train.train_and_evaluate(load_config("fashion_mnist", **overrides),
                           tmp_path, mesh=mesh)
  # A different model width is another experiment: refused even when the
  # config change is allowed (run_record.IDENTITY_FIELDS).
  wider = load_config("fashion_mnist", **{**overrides,
                                          "optim.total_steps": 4,
                                          "model.width": 8})
  with pytest.raises(run_record.ConfigChangedError,
                     match="config.model.width: 4 -> 8"):
    train.train_and_evaluate(wider, tmp_path, mesh=mesh,
                             allow_config_change=True)
  # Another gate-head depth cannot be restored into, even when the config
  # change is allowed: no silent fresh start, no advice to delete anything.
  deeper = load_config("fashion_mnist", **{**overrides,
                                           "optim.total_steps": 4,
                                           "gate.depth": 1})
  with pytest.raises(train.CheckpointError,
                     match="intact .* does not fit this config") as e:
    train.train_and_evaluate(deeper, tmp_path, mesh=mesh,
                             allow_config_change=True)
  assert "delete" not in str(e.value)

  # The data position: one JSON; grain's older per-process files also
  # restore; an unreadable one is a CheckpointError.
  config = load_config("fashion_mnist", **overrides)
  setup = train.build(config, mesh)
  data_dir = tmp_path / "checkpoints" / "2" / "data"

  def restored_position():
    mngr = train.checkpoint_manager(tmp_path, config)
    it = input_pipeline.create_pretrain_iterator(config, process_index=0,
                                                 process_count=1)
    try:
      # Without its manifest (below) the checkpoint needs trust_unsealed.
      train.restore_checkpoint(mngr, setup, it, trust_unsealed=True)
      return it.get_state()["next_batch"]
    finally:
      it.close()
      mngr.close()

  assert restored_position() == 2
  # Legacy data files predate checkpoint manifests.
  (tmp_path / "checkpoints" / "2.manifest.json").unlink()
  saved = (data_dir / "metadata").read_text()
  (data_dir / "metadata").unlink()
  for i in range(2):
    (data_dir / f"process_{i}-of-2.json").write_text(
        json.dumps({**json.loads(saved), "next_batch": 7}))
  assert restored_position() == 7
  for path in data_dir.iterdir():
    path.unlink()
  (data_dir / "metadata").write_text("{not json")
  with pytest.raises(train.CheckpointError, match="corrupt"):
    restored_position()
  (data_dir / "metadata").write_text(saved)

  # Truncate every array file of the checkpoint.
  for path in (tmp_path / "checkpoints").rglob("*"):
    if path.is_file() and "state" in str(path) and path.stat().st_size > 0:
      path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
  config = load_config("fashion_mnist", **{**overrides,
                                           "optim.total_steps": 4})
  with pytest.raises(train.CheckpointError,
                     match="no integrity manifest .* --trust_unsealed"):
    train.train_and_evaluate(config, tmp_path, mesh=mesh,
                             allow_config_change=True)
  with pytest.raises(train.CheckpointError,
                     match="No checkpoint .* can be restored"):
    train.train_and_evaluate(config, tmp_path, mesh=mesh,
                             allow_config_change=True, trust_unsealed=True)


@pytest.mark.slow
@needs_fmnist
def test_train_step_on_8_devices_equals_1_device():
  if jax.device_count() < 8:
    pytest.skip("needs 8 simulated devices")
  config = load_config("fashion_mnist", **{"optim.batch_size": 16,
                                           "dataset.max_train_examples": 64})
  rng = np.random.default_rng(0)
  batch = {"view1": rng.integers(0, 256, (16, 28, 28, 1), np.uint8),
           "view2": rng.integers(0, 256, (16, 28, 28, 1), np.uint8),
           "label": rng.integers(0, 10, (16,)).astype(np.int32)}
  results = []
  for n in (1, 8):
    setup = train.build(config, sharding.make_mesh(jax.devices()[:n]))
    state = train.init_state(setup, jax.random.key(0))
    step = train.make_train_step(setup)
    for _ in range(2):
      state, metrics = step(state, sharding.make_global_batch(
          batch, setup.mesh), jax.random.key(1))
    results.append((jax.device_get(state), jax.device_get(metrics)))
  (s1, m1), (s8, m8) = results
  chex.assert_trees_all_close(m1, m8, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(s1.params, s8.params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(s1.batch_stats, s8.batch_stats, rtol=1e-5,
                              atol=1e-6)


def test_invalid_config_fails_before_compiling(tmp_path):
  config = load_config("fashion_mnist", **{"optim.batch_size": 12})
  with pytest.raises(config_lib.ConfigError, match="not divisible by the 8"):
    train.build(config, sharding.make_mesh(jax.devices()[:8]))


@needs_fmnist
@pytest.mark.parametrize("processes, local_devices", [(16, 4), (16, 8),
                                                      (2, 1)])
def test_online_eval_batches_fill_every_local_device(monkeypatch, processes,
                                                     local_devices):
  """16 hosts with 4 or 8 devices each: every process reads 512 / 16 = 32
  rows per batch (a multiple of its devices), not 512 / 16 / 16 = 2."""
  config = load_config("fashion_mnist", **{"dataset.eval_split": "test"})
  for index in (0, processes - 1):
    monkeypatch.setattr(jax, "process_count", lambda: processes)
    monkeypatch.setattr(jax, "process_index", lambda i=index: i)
    it = train.online_eval_iterator(config, processes * local_devices, 512)
    batch = next(it)
    assert batch["image"].shape[0] == 512 // processes
    assert batch["image"].shape[0] % local_devices == 0
    del it
