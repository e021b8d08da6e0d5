"""Fault injection: every way a run can go wrong ends in a clear message or
the right behaviour, and nothing on disk is lost or overwritten.

Runs in-process where the point is what lands on disk, as subprocesses of
`python -m bayesncl_jax.main/evaluate` where the point is the message and
the exit status. One tiny NCL run (4 steps, checkpoints at 2 and 4) is
trained once and copied for each test; a JAX compilation cache shared by
the module makes every later in-process run skip compilation.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import types

import jax
from jax.experimental.compilation_cache import compilation_cache
import jax.numpy as jnp
import numpy as np
import pytest

from bayesncl_jax import cli
from bayesncl_jax import config_lib
from bayesncl_jax import evaluate
from bayesncl_jax import integrity
from bayesncl_jax import preflight
from bayesncl_jax import run_record
from bayesncl_jax import sharding
from bayesncl_jax import train

ROOT = pathlib.Path(__file__).resolve().parent.parent
FMNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(
    not FMNIST.exists(), reason="apt-get install -y dataset-fashion-mnist")

TINY = {"model.width": 4, "model.stage_sizes": (1,), "model.proj_hidden": 16,
        "model.proj_out": 16, "progress_bar": False, "optim.batch_size": 16,
        "optim.total_steps": 4, "log_every": 1, "ckpt_every": 2,
        "dataset.max_train_examples": 64, "dataset.image_size": 16,
        # The end-of-run evaluation reads the 64 training examples only.
        "dataset.eval_split": "train", "aug.color_jitter_prob": 0.0}


def tiny_config(**overrides):
  return config_lib.load_file(ROOT / "configs" / "fashion_mnist.py",
                              "method=ncl", {**TINY, **overrides})


def run(config, workdir, **kwargs):
  return train.train_and_evaluate(
      config, workdir, mesh=sharding.make_mesh(jax.devices()[:1]), **kwargs)


def cli_flags(overrides):
  out = []
  for key, value in {**TINY, **overrides}.items():
    if isinstance(value, tuple):
      value = "(" + ",".join(map(str, value)) + ("," if len(value) == 1
                                                 else "") + ")"
    out.append(f"--config.{key}={value}")
  return out


def run_cli(module, *args, env=None, timeout=300):
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         **(env or {})}
  env = {k: v for k, v in env.items() if v is not None}
  return subprocess.run([sys.executable, "-m", f"bayesncl_jax.{module}",
                         *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


def main_args(workdir, **overrides):
  return ["--config=configs/fashion_mnist.py:method=ncl",
          f"--workdir={workdir}", *cli_flags(overrides)]


def snapshot(folder) -> dict[str, bytes]:
  """Every file under `folder`, by relative path: to prove nothing changed."""
  folder = pathlib.Path(folder)
  return {str(p.relative_to(folder)): p.read_bytes()
          for p in sorted(folder.rglob("*")) if p.is_file()}


def read_jsonl(path):
  return [json.loads(line) for line in pathlib.Path(path).read_text()
          .splitlines()]


def assert_user_error(proc, *fragments):
  """Exit status 2, one message naming `fragments`, no traceback."""
  assert proc.returncode == cli.EXIT_USER_ERROR, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert "error: " in proc.stderr
  message = proc.stderr[proc.stderr.index("error: "):]
  flat = " ".join(message.split())
  for fragment in fragments:
    assert fragment in flat, (fragment, message)


@contextlib.contextmanager
def read_only(path):
  """Makes `path` (recursively) unwritable, even for root (chattr +i)."""
  path = str(path)
  subprocess.run(["chmod", "-R", "a-w", path], check=True)
  immutable = False
  try:
    if os.geteuid() == 0:
      if subprocess.run(["chattr", "-R", "+i", path],
                        capture_output=True).returncode != 0:
        pytest.skip("running as root on a file system without chattr +i: "
                    "cannot make a folder read-only")
      immutable = True
    yield
  finally:
    if immutable:
      subprocess.run(["chattr", "-R", "-i", path], check=True)
    subprocess.run(["chmod", "-R", "u+w", path], check=True)


# ----------------------------------------------------------------------------
# Fixtures.
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def shared_compilation_cache(tmp_path_factory):
  names = ("jax_compilation_cache_dir",
           "jax_persistent_cache_min_compile_time_secs")
  old = {n: getattr(jax.config, n) for n in names}
  compilation_cache.reset_cache()
  jax.config.update(names[0], str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update(names[1], 0.0)
  yield
  for name, value in old.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished tiny run: 4 steps, checkpoints 2 and 4 (with manifests)."""
  workdir = tmp_path_factory.mktemp("finished") / "run"
  summary = run(tiny_config(), workdir)
  assert summary["step"] == 4
  return workdir


@pytest.fixture
def stopped(finished, tmp_path):
  """The run killed after logging step 4, before checkpoint 4 committed:
  checkpoint 2 is the newest, metrics.jsonl holds rows 1-4."""
  workdir = tmp_path / "stopped"
  shutil.copytree(finished, workdir)
  shutil.rmtree(workdir / "checkpoints" / "4")
  (workdir / "checkpoints" / "4.manifest.json").unlink()
  (workdir / "summary.json").unlink()
  return workdir


# ----------------------------------------------------------------------------
# 1. Run identity.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [
    {"method": "cl"},                      # same parameter shapes
    {"seed": 1},
    {"optim.total_steps": 6},
    {"loss.temperature": 0.5, "log_every": 2},  # + a harmless one
])
@pytest.mark.slow
def test_resume_with_result_changing_config_is_refused(finished, tmp_path,
                                                       overrides):
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  before = snapshot(workdir)
  with pytest.raises(run_record.ConfigChangedError) as e:
    run(tiny_config(**overrides), workdir)
  message = str(e.value)
  for field, value in overrides.items():
    if run_record.is_harmless(field):
      assert f"Allowed, as they do not change the result: config.{field}" \
          in message
    else:
      assert f"config.{field}: " in message and repr(value) in message
  assert "new --workdir" in message and "--allow_config_change" in message
  assert "delete" not in message
  assert snapshot(workdir) == before  # nothing written, nothing lost


@pytest.mark.slow
def test_resume_refusal_on_the_command_line(finished, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  before = snapshot(workdir)
  # No JAX_PLATFORMS: JAX probes for accelerators, quietly.
  proc = run_cli("main", *main_args(workdir, seed=3),
                 env={"JAX_PLATFORMS": None})
  assert_user_error(proc, "config.seed: 0 -> 3", "--allow_config_change",
                    "new --workdir")
  assert "Unable to initialize backend" not in proc.stderr
  assert snapshot(workdir) == before


@pytest.mark.slow
def test_harmless_change_resumes_and_is_noted(stopped):
  initial = (stopped / "config_initial.json").read_text()
  ckpt2 = snapshot(stopped / "checkpoints" / "2")
  summary = run(tiny_config(log_every=2, ckpt_every=4,
                            **{"dataset.prefetch_buffer": 3}), stopped)
  assert summary["step"] == 4
  event = read_jsonl(stopped / "run_history.jsonl")[-2]
  assert event["event"] == "resume" and event["step"] == 2
  assert event["harmless"] == {"log_every": [1, 2], "ckpt_every": [2, 4],
                               "dataset.prefetch_buffer": [2, 3]}
  # Rows 3-4 of the killed segment were dropped: one row per logged step.
  assert [m["step"] for m in read_jsonl(stopped / "metrics.jsonl")] == [
      1, 2, 4]
  assert (stopped / "config_initial.json").read_text() == initial
  assert json.loads((stopped / "config.json").read_text())["log_every"] == 2
  assert snapshot(stopped / "checkpoints" / "2") == ckpt2
  # Training time continues the count of the first segment.
  first = integrity.read_manifest(stopped / "checkpoints", 2)
  assert summary["train_seconds"] == pytest.approx(
      first["train_seconds"] + summary["segment_seconds"])


@pytest.mark.slow
def test_allow_config_change_is_recorded(stopped):
  initial = (stopped / "config_initial.json").read_text()
  summary = run(tiny_config(seed=7), stopped, allow_config_change=True)
  assert summary["step"] == 4
  change = [e for e in read_jsonl(stopped / "run_history.jsonl")
            if e["event"] == "config_change"]
  assert len(change) == 1 and change[0]["step"] == 2
  assert change[0]["changes"] == {"seed": [0, 7]}
  assert (stopped / "config_initial.json").read_text() == initial
  assert json.loads(initial)["seed"] == 0
  assert json.loads((stopped / "config.json").read_text())["seed"] == 7


def test_config_compare_classifies_fields():
  base = tiny_config()
  diff = run_record.compare(base, tiny_config(**{
      "dataset.data_dir": "/elsewhere", "dataset.num_workers": 2,
      "gate.kl_weight": 1.0, "model.width": 8}))
  assert [c.field for c in diff.result] == ["gate.kl_weight", "model.width"]
  assert [c.field for c in diff.harmless] == ["dataset.data_dir",
                                              "dataset.num_workers"]
  # A field added to the code after the run: at its default it is no change.
  recorded = json.loads(base.to_json_best_effort())
  del recorded["gate"]["eval_mode"]
  assert not run_record.compare(recorded, base).result
  changed = tiny_config(**{"gate.eval_mode": "soft"})
  assert [c.field for c in run_record.compare(recorded, changed).result] == [
      "gate.eval_mode"]


# ----------------------------------------------------------------------------
# 2. Records: a finished run re-run, metrics rows after a crash.
# ----------------------------------------------------------------------------
@pytest.mark.slow
def test_rerun_of_finished_run_changes_nothing(finished, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  before = snapshot(workdir)
  proc = run_cli("main", *main_args(workdir, log_every=2))  # harmless
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "already finished its 4 steps; nothing was changed" in proc.stdout
  assert snapshot(workdir) == before  # summary.json byte-identical
  # The summary ends with the next commands for this workdir.
  assert f"python -m bayesncl_jax.evaluate --workdir={workdir}\n" in proc.stdout
  assert proc.stdout.rstrip().endswith(
      f"   tensorboard --logdir={workdir}/tensorboard")


@pytest.mark.slow
def test_killed_before_its_summary_gets_a_full_one(finished, tmp_path):
  """Killed between the last checkpoint and summary.json: the re-run trains
  nothing and writes the summary the finished run would have written."""
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  want = json.loads((workdir / "summary.json").read_text())
  (workdir / "summary.json").unlink()
  got = run(tiny_config(), workdir)
  assert got["segment_seconds"] < want["train_seconds"]
  for key in ("step", "train_loss", "train_nce", "train_online_acc",
              "test_online_acc", "test_sparsity"):
    assert got[key] == pytest.approx(want[key]), key
  last = read_jsonl(workdir / "metrics.jsonl")[-1]
  assert last["step"] == 4 and got["train_loss"] == last["loss"]
  assert got["train_seconds"] == pytest.approx(
      integrity.read_manifest(workdir / "checkpoints", 4)["train_seconds"]
      + got["segment_seconds"])
  assert json.loads((workdir / "summary.json").read_text()) == got


def test_truncate_metrics_keeps_one_row_per_step(tmp_path):
  path = tmp_path / "metrics.jsonl"
  rows = [{"step": s, "loss": float(s)} for s in (1, 2, 3, 4)]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows)
                  + '{"step": 5, "lo')  # torn by the kill
  assert run_record.truncate_metrics(path, 2) == 2
  assert read_jsonl(path) == rows[:2]
  # The torn line is kept aside, not dropped.
  kept = list(tmp_path.glob("metrics.jsonl.corrupt-*"))
  assert len(kept) == 1 and kept[0].read_text() == '{"step": 5, "lo\n'
  assert run_record.truncate_metrics(path, 2) == 0  # idempotent


# ----------------------------------------------------------------------------
# 3. Checkpoint integrity.
# ----------------------------------------------------------------------------
def _biggest_array_file(step_dir: pathlib.Path) -> pathlib.Path:
  """The largest file of array bytes (not metadata) of a checkpoint."""
  files = [p for p in (step_dir / "state").rglob("*")
           if p.is_file() and p.parent.name == "d"]
  return max(files, key=lambda p: p.stat().st_size)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_latest_checkpoint_falls_back(finished, tmp_path, damage):
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  (workdir / "summary.json").unlink()  # killed before the summary
  victim = _biggest_array_file(workdir / "checkpoints" / "4")
  data = bytearray(victim.read_bytes())
  if damage == "flip":  # 400 bytes inverted, same size
    mid = len(data) // 2
    data[mid:mid + 400] = bytes(b ^ 0xFF for b in data[mid:mid + 400])
  else:
    del data[len(data) // 3:]
  victim.write_bytes(bytes(data))
  damaged = snapshot(workdir / "checkpoints" / "4")
  ckpt2 = snapshot(workdir / "checkpoints" / "2")

  # Evaluating that checkpoint is refused, naming the file.
  rel = str(victim.relative_to(workdir / "checkpoints" / "4"))
  with pytest.raises(train.CheckpointError,
                     match="step 4 .* is corrupt: " + re.escape(rel)):
    evaluate.load_state(str(workdir), step=4,
                        mesh=sharding.make_mesh(jax.devices()[:1]))

  summary = run(tiny_config(), workdir)
  assert summary["step"] == 4
  # The damaged checkpoint was moved aside intact, not deleted ...
  moved = list((workdir / "corrupt_checkpoints").iterdir())
  folder = [p for p in moved if p.is_dir()]
  assert len(folder) == 1 and folder[0].name.startswith("4-")
  assert snapshot(folder[0]) == damaged
  # ... the run resumed from step 2, untouched, and redid steps 3-4.
  assert snapshot(workdir / "checkpoints" / "2") == ckpt2
  fallback = [e for e in read_jsonl(workdir / "run_history.jsonl")
              if e["event"] == "fallback"]
  assert len(fallback) == 1 and fallback[0]["step"] == 2
  assert "checkpoint 4 corrupt" in fallback[0]["report"][0]
  assert [m["step"] for m in read_jsonl(workdir / "metrics.jsonl")] == [
      1, 2, 3, 4]
  assert integrity.verify(workdir / "checkpoints", 4)[0] == "intact"


@pytest.mark.slow
def test_no_intact_checkpoint_changes_nothing(finished, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  (workdir / "summary.json").unlink()
  for step in (2, 4):
    victim = _biggest_array_file(workdir / "checkpoints" / str(step))
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
  before = snapshot(workdir)
  with pytest.raises(train.CheckpointError) as e:
    run(tiny_config(), workdir)
  message = str(e.value)
  assert "step 4: corrupt" in message and "step 2: corrupt" in message
  assert "Nothing was changed or deleted" in message
  assert snapshot(workdir) == before


@pytest.mark.slow
def test_disk_full_during_save_keeps_earlier_checkpoints(tmp_path,
                                                         monkeypatch):
  stopped = tmp_path / "run"  # a fresh run: checkpoint 2, then the disk fills
  real = train.save_checkpoint

  def save(mngr, state, data_iter, **kwargs):
    if int(state.step) == 4:
      raise OSError(errno.ENOSPC, "No space left on device")
    return real(mngr, state, data_iter, **kwargs)
  monkeypatch.setattr(train, "save_checkpoint", save)
  with pytest.raises(integrity.DiskFullError) as e:
    run(tiny_config(), stopped)
  message = cli.explain(e.value)
  assert message.startswith("The disk is full") and "\n" not in message
  assert "step 4" in message and "step(s) 2" in message
  assert "resumes from step 2" in message
  # Where, and how much space: the free space and the size of checkpoint 2.
  assert f"to {stopped / 'checkpoints'}. " in message
  size = sum(p.stat().st_size for p in (stopped / "checkpoints" / "2")
             .rglob("*") if p.is_file())
  assert re.search(r" [0-9.]+ MB are free there; one checkpoint takes "
                   rf"about {size / 1e6:.1f} MB \(step 2\)", message), message
  assert integrity.committed_steps(stopped / "checkpoints") == [2]
  assert integrity.verify(stopped / "checkpoints", 2)[0] == "intact"
  assert not (stopped / "summary.json").exists()


# ----------------------------------------------------------------------------
# 5. Validation before the first step / the first feature.
# ----------------------------------------------------------------------------
@pytest.mark.slow
def test_missing_test_split_fails_before_step_1(tmp_path):
  data = tmp_path / "fmnist_train_only"
  data.mkdir()
  for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
    (data / name).symlink_to(FMNIST / name)
  workdir = tmp_path / "run"
  with pytest.raises(train.datasets.DatasetNotFoundError) as e:
    run(tiny_config(**{"dataset.data_dir": str(data),
                       "dataset.eval_split": "test"}), workdir)
  message = cli.explain(e.value)
  assert message.startswith("Fashion-MNIST test split: IDX file(s) missing")
  assert "t10k-images-idx3-ubyte.gz" in message
  assert "t10k-labels-idx1-ubyte.gz" in message
  assert not workdir.exists()  # nothing trained, nothing written


@pytest.mark.slow
def test_read_only_workdir_fails_before_step_1(stopped):
  before = snapshot(stopped)
  with read_only(stopped):
    with pytest.raises(preflight.NotWritableError) as e:
      run(tiny_config(), stopped)
  message = cli.explain(e.value)
  assert message.startswith(f"The workdir {stopped} is not writable")
  assert "nothing was computed" in message and "--workdir" in message
  assert snapshot(stopped) == before


def test_output_under_a_file_is_reported(tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(preflight.NotWritableError, match="is a file"):
    preflight.check_writable(tmp_path / "file" / "run", "workdir",
                             "--workdir")
  preflight.check_writable(tmp_path / "new" / "run", "workdir", "--workdir")
  assert list(tmp_path.iterdir()) == [tmp_path / "file"]  # nothing created


@pytest.mark.slow
def test_evaluate_checks_before_computing(finished, tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  before = snapshot(workdir)
  computed = []
  monkeypatch.setattr(evaluate, "extract_features",
                      lambda *a, **k: computed.append(1))
  out = tmp_path / "out"
  out.mkdir()
  with read_only(out):
    with pytest.raises(preflight.NotWritableError,
                       match=f"evaluation output folder {out} is not "
                       "writable"):
      evaluate.evaluate(str(workdir), evaluate.EvalOptions(out_dir=str(out)))
  with pytest.raises(preflight.PreflightError, match="--protocols is empty"):
    evaluate.evaluate(str(workdir), evaluate.EvalOptions(protocols=()))
  assert not computed
  proc = run_cli("evaluate", f"--workdir={workdir}", "--protocols=linear,foo")
  assert_user_error(proc, "Unknown --protocols value(s) 'foo'",
                    "linear,knn,interp")
  assert snapshot(workdir) == before and not (workdir / "eval").exists()


# ----------------------------------------------------------------------------
# 6. Messages, not tracebacks.
# ----------------------------------------------------------------------------
@pytest.mark.slow
def test_config_mistakes_get_messages(tmp_path):
  workdir = tmp_path / "run"
  proc = run_cli("main", "--config=configs/fashion_mnist.py",
                 f"--workdir={workdir}", "--config.total_steps=20")
  assert_user_error(proc, "--config.total_steps (did you mean "
                    "config.optim.total_steps?)")
  proc = run_cli("main", "--config=configs/fashon_mnist.py",
                 f"--workdir={workdir}")
  assert_user_error(proc, "Config file 'configs/fashon_mnist.py' not found",
                    "fashion_mnist.py")
  assert not workdir.exists()


def test_verbose_shows_the_traceback(monkeypatch, capsys):
  error = OSError(errno.ENOSPC, "No space left on device", "/w/f")
  with pytest.raises(SystemExit) as e:
    cli._fail(cli.explain(error), error)
  assert e.value.code == cli.EXIT_USER_ERROR
  assert "error: The disk is full" in capsys.readouterr().err
  monkeypatch.setenv(cli.VERBOSE_ENV, "1")
  with pytest.raises(OSError):  # re-raised: the traceback is printed
    cli._fail(cli.explain(error), error)


def test_suggestions_and_os_error_messages():
  fields = cli.config_fields(tiny_config())
  assert cli.suggest_fields("total_steps", fields) == ["optim.total_steps"]
  assert cli.suggest_fields("model.widht", fields) == ["model.width"]
  assert cli.suggest_fields("zzz", fields) == []
  full = ValueError("RESOURCE_EXHAUSTED: Error writing local file "
                    "\"/w/checkpoints/3.orbax-checkpoint-tmp/x\": Failed to "
                    "write 13516 bytes to file 8: No space left on device "
                    "[os_error_code='28']")
  assert cli.explain(full).startswith("The disk is full")
  denied = PermissionError(errno.EACCES, "Permission denied", "/w/x")
  assert cli.explain(denied).startswith("Cannot access /w/x: Permission")
  assert cli.explain(RuntimeError("a bug")) is None  # bugs keep tracebacks


# ----------------------------------------------------------------------------
# The NaN guard.
# ----------------------------------------------------------------------------
def poison_params_at_step_2(monkeypatch, group: str) -> None:
  """The train step turns parameter group `group` to NaN before step 3."""
  real = train.make_train_step

  def poisoned(setup):
    step_fn = real(setup)

    def step(state, batch, rng):
      if int(state.step) == 2:
        params = dict(state.params)
        params[group] = jax.tree.map(lambda x: x * jnp.nan, params[group])
        state = state.replace(params=params)
      return step_fn(state, batch, rng)
    return step
  monkeypatch.setattr(train, "make_train_step", poisoned)


@pytest.mark.slow
def test_nan_at_a_known_step_after_a_checkpoint(tmp_path, monkeypatch):
  """The online classifier's weights become NaN before step 3."""
  poison_params_at_step_2(monkeypatch, "classifier")
  with pytest.raises(train.NonFiniteLossError) as e:
    run(tiny_config(), tmp_path)
  message = str(e.value)
  assert "the first non-finite step is step 3" in message
  assert "loss term(s) online_ce" in message
  assert "gradients of classifier;" in message
  assert "parameters after step 3 in classifier." in message
  assert f"newest checkpoint kept is step 2 ({tmp_path}/checkpoints/2)" \
      in message
  assert "--config.optim.classifier_lr" in message
  assert integrity.committed_steps(tmp_path / "checkpoints") == [2]
  assert integrity.verify(tmp_path / "checkpoints", 2)[0] == "intact"
  assert [m["step"] for m in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]
  setup = train.build(tiny_config(), sharding.make_mesh(jax.devices()[:1]))
  mngr = train.checkpoint_manager(tmp_path, tiny_config())
  state = train.restore_checkpoint(mngr, setup, None, restore_data=False)
  mngr.close()
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))


def test_nan_before_any_checkpoint_says_none_is_kept(tmp_path, monkeypatch):
  monkeypatch.setattr(train, "_nonfinite_groups", lambda tree: ["backbone"])
  pending = [{"loss": np.float32(1.0), "grad_norm": np.float32(1.0)},
             {"loss": np.float32(np.nan), "nce": np.float32(np.nan),
              "online_ce": np.float32(0.5), "grad_norm": np.float32(np.inf),
              "grad_norm/backbone": np.float32(np.inf),
              "grad_norm/classifier": np.float32(1.0)}]
  with pytest.raises(train.NonFiniteLossError) as e:
    train._check_finite(pending, 0, types.SimpleNamespace(params={}),
                        tiny_config(), lambda: [], str(tmp_path))
  message = str(e.value)
  assert "first non-finite step is step 2" in message
  assert "loss term(s) nce" in message and "gradients of backbone;" in message
  assert "No checkpoint was saved before it" in message
  assert "--config.optim.base_lr" in message


# ----------------------------------------------------------------------------
# 7. One process per workdir (workdir_lock), exit codes.
# ----------------------------------------------------------------------------
HOLD_SCRIPT = """
import sys, time
from bayesncl_jax import workdir_lock
how = workdir_lock.hold if sys.argv[1] == "workdir" else (
    lambda p, what: workdir_lock.hold_output(p, what))
with how(sys.argv[2], "holding for a test"):
  print("held", flush=True)
  time.sleep(600)
"""


@contextlib.contextmanager
def holder_process(kind, folder):
  """A second real process that holds the lock of `folder`."""
  proc = subprocess.Popen([sys.executable, "-c", HOLD_SCRIPT, kind,
                           str(folder)], cwd=ROOT, stdout=subprocess.PIPE,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
  try:
    assert proc.stdout.readline().strip() == "held"
    yield proc
  finally:
    if proc.poll() is None:
      proc.kill()
    proc.wait()


def test_second_main_on_a_workdir_is_refused(stopped):
  before = snapshot(stopped)
  with holder_process("workdir", stopped) as holder:
    proc = run_cli("main", *main_args(stopped))
    assert proc.returncode == cli.EXIT_LOCKED, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("error: ") == 1, proc.stderr
    flat = " ".join(proc.stderr.split())
    assert f"{stopped} is in use: pid {holder.pid} on host " in flat
    assert "holding for a test" in flat and "started 20" in flat
    lock_files = {".bayesncl.lock", ".bayesncl.lock.json"}
    assert {k: v for k, v in snapshot(stopped).items()
            if k not in lock_files} == before
  # A holder killed with SIGKILL leaves no lock behind (the OS releases it):
  # the next run resumes without any clean-up.
  assert holder.returncode == -9
  summary = run_cli("main", *main_args(stopped))
  assert summary.returncode == 0, summary.stderr[-3000:]
  assert not (stopped / ".bayesncl.lock").exists()
  assert not (stopped / ".bayesncl.lock.json").exists()


def test_second_evaluation_into_one_folder_is_refused(finished, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  with holder_process("output", workdir / "eval") as holder:
    proc = run_cli("evaluate", f"--workdir={workdir}", "--protocols=knn")
  assert proc.returncode == cli.EXIT_LOCKED, proc.stderr[-3000:]
  assert f"pid {holder.pid} on host" in " ".join(proc.stderr.split())
  assert not (workdir / "eval").exists()


def test_lock_of_a_new_workdir_leaves_nothing_when_refused(tmp_path):
  workdir = tmp_path / "new" / "run"
  proc = run_cli("main", *main_args(workdir, **{"optim.batch_size": 0}))
  assert proc.returncode == cli.EXIT_USER_ERROR, proc.stderr[-3000:]
  assert not workdir.exists()


def test_stale_remote_lock_is_reported_not_broken(monkeypatch):
  from bayesncl_jax import workdir_lock  # pylint: disable=g-import-not-at-top
  import socket  # pylint: disable=g-import-not-at-top
  dead = subprocess.run(["true"], check=True)
  del dead
  proc = subprocess.Popen(["true"])
  proc.wait()  # a pid that no longer runs
  here = {"host": socket.gethostname(), "pid": proc.pid, "started": "x"}
  assert "no longer runs on this host" in workdir_lock.stale_reason(here)
  alive = {**here, "pid": os.getpid()}
  assert workdir_lock.stale_reason(alive) is None
  import time  # pylint: disable=g-import-not-at-top
  other = {"host": "elsewhere", "pid": 1, "heartbeat_unix": time.time() - 100}
  assert workdir_lock.stale_reason(other, stale_after=1000) is None
  assert "100 s old" in workdir_lock.stale_reason(other, stale_after=50)
  message = workdir_lock.locked_message(
      "gs://b/run", "gs://b/run/.bayesncl.lock", here, "its process is gone",
      "gcloud storage rm gs://b/run/.bayesncl.lock")
  assert "not broken automatically" in message
  assert "gcloud storage rm gs://b/run/.bayesncl.lock" in message
  assert "--break_stale_lock" in message


@pytest.mark.parametrize("url", ["gs:///x", "gs://A_B/x", "gs://-b/x"])
def test_malformed_bucket_urls_are_refused_before_any_io(tmp_path, url):
  proc = run_cli("main", *main_args(url),
                 env={"STORAGE_EMULATOR_HOST": "http://127.0.0.1:9"})
  assert_user_error(proc, "is not a valid bucket path", "gs://BUCKET/DIR")
  assert proc.stderr.count("error: ") == 1
  proc = run_cli("evaluate", f"--workdir={url}")
  assert_user_error(proc, "is not a valid bucket path")


def test_bad_flag_value_is_a_usage_error(tmp_path):
  proc = run_cli("main", *main_args(tmp_path / "run"),
                 "--config.optim.total_steps=abc")
  assert_user_error(proc)
  assert "total_steps" in proc.stderr


# ----------------------------------------------------------------------------
# 8. The run's identity; its records.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [
    {"method": "cl"}, {"model.non_neg": "relu"}, {"dataset.name": "cifar10"},
    {"gate.type": "ste"}, {"model.backbone": "resnet50"}])
def test_identity_fields_never_change_on_resume(stopped, overrides):
  before = snapshot(stopped)
  recorded = json.loads((stopped / "config.json").read_text())
  changed = tiny_config(**overrides)
  diff = run_record.compare(recorded, changed)
  assert [c.field for c in diff.result] == list(overrides)
  with pytest.raises(run_record.ConfigChangedError) as e:
    run_record.RunRecord(stopped).check_config(changed, allow_change=True)
  message = " ".join(str(e.value).split())
  field = next(iter(overrides))
  assert f"config.{field}: " in message and "can never change" in message
  assert "--allow_config_change does not allow this" in message
  assert snapshot(stopped) == before


@pytest.mark.parametrize("damage", ["missing", "garbage", "a list"])
def test_config_guard_falls_back_to_config_initial(stopped, damage):
  path = stopped / "config.json"
  if damage == "missing":
    path.unlink()
  else:
    path.write_text("{not json" if damage == "garbage" else "[1, 2]")
  with pytest.raises(run_record.ConfigChangedError, match="config.seed: 0 -> 5"):
    run(tiny_config(seed=5), stopped)
  with pytest.raises(run_record.ConfigChangedError, match="config.method"):
    run(tiny_config(method="cl"), stopped, allow_config_change=True)
  # Both unusable: one message, nothing done.
  (stopped / "config_initial.json").write_text("")
  before = snapshot(stopped)
  with pytest.raises(run_record.ConfigChangedError) as e:
    run(tiny_config(), stopped)
  message = " ".join(str(e.value).split())
  assert "its recorded config cannot be read: config.json is" in message
  assert "config_initial.json is not valid JSON" in message
  assert snapshot(stopped) == before


def test_corrupt_record_lines_are_kept_not_dropped(stopped):
  metrics = stopped / "metrics.jsonl"
  rows = read_jsonl(metrics)
  lines = metrics.read_text().splitlines()
  # A line damaged in the middle (a disk error, a concurrent writer).
  lines[1] = lines[1][:10] + "\x00\x00" + lines[1][12:]
  metrics.write_text("\n".join(lines) + "\n")
  history = stopped / "run_history.jsonl"
  events = history.read_text()
  history.write_text(events + "garbage line\n")
  summary = run(tiny_config(), stopped)
  assert summary["step"] == 4
  kept = sorted(stopped.glob("metrics.jsonl.corrupt-*"))
  assert len(kept) == 1 and kept[0].read_text() == lines[1] + "\n"
  # Row 1 survives; row 2 was damaged (kept aside); 3-4 were redone.
  assert [m["step"] for m in read_jsonl(metrics)] == [1, 3, 4]
  assert read_jsonl(metrics)[0] == rows[0]
  assert (sorted(stopped.glob("run_history.jsonl.corrupt-*"))[0]
          .read_text() == "garbage line\n")
  assert history.read_text().startswith(events)
  assert [e["event"] for e in read_jsonl(history)][-2:] == ["resume", "end"]


@pytest.mark.parametrize("text", ["[]", '{"files": 3}',
                                  '{"files": {"a": {"size": "x"}}}', "7"])
def test_manifest_of_the_wrong_shape_is_corrupt(finished, tmp_path, text):
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  (workdir / "checkpoints" / "4.manifest.json").write_text(text)
  status, detail = integrity.verify(workdir / "checkpoints", 4)
  assert status == "corrupt" and "wrong shape" in detail
  assert integrity.prior_train_seconds(workdir / "checkpoints", 4) is None


def test_unsealed_checkpoint_needs_trust_unsealed(finished, tmp_path):
  """Killed between its save and its sealing: the checkpoint is refused
  without --trust_unsealed, restored and sealed with it."""
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  (workdir / "summary.json").unlink()
  manifest = workdir / "checkpoints" / "4.manifest.json"
  sealed = json.loads(manifest.read_text())
  manifest.unlink()
  before = snapshot(workdir)
  with pytest.raises(train.CheckpointError) as e:
    run(tiny_config(), workdir)
  message = " ".join(str(e.value).split())
  assert "step 4" in message and "no integrity manifest" in message
  assert "--trust_unsealed" in message and "the risk" in message
  assert "resume from step 2" in message
  assert snapshot(workdir) == before
  with pytest.raises(train.CheckpointError, match="--trust_unsealed"):
    evaluate.load_state(str(workdir), mesh=sharding.make_mesh(
        jax.devices()[:1]))
  summary = run(tiny_config(), workdir, trust_unsealed=True)
  assert summary["step"] == 4
  resealed = json.loads(manifest.read_text())
  assert resealed["files"] == sealed["files"] and resealed["trusted_unsealed"]
  # The training time came from Orbax's custom metadata of step 4.
  assert summary["train_seconds"] == pytest.approx(
      sealed["train_seconds"] + summary["segment_seconds"])


def test_unsealed_flipped_checkpoint_is_not_restored_silently(finished,
                                                              tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  (workdir / "summary.json").unlink()
  (workdir / "checkpoints" / "4.manifest.json").unlink()
  victim = _biggest_array_file(workdir / "checkpoints" / "4")
  data = bytearray(victim.read_bytes())
  mid = len(data) // 2
  data[mid:mid + 400] = bytes(b ^ 0xFF for b in data[mid:mid + 400])
  victim.write_bytes(bytes(data))
  with pytest.raises(train.CheckpointError, match="no integrity manifest"):
    run(tiny_config(), workdir)
  proc = run_cli("main", *main_args(workdir))
  assert_user_error(proc, "--trust_unsealed")


# ----------------------------------------------------------------------------
# 9. Evaluation output: all or nothing.
# ----------------------------------------------------------------------------
def test_interrupted_evaluation_leaves_the_previous_one(finished, tmp_path,
                                                        monkeypatch):
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  mesh = sharding.make_mesh(jax.devices()[:1])
  options = evaluate.EvalOptions(protocols=("knn",), max_examples=64)
  first = evaluate.evaluate(str(workdir), options, mesh=mesh)
  before = snapshot(workdir / "eval")
  assert "report.json" in before and first["step"] == 4
  real = evaluate.run_evaluators

  def interrupted(ctx, protocols):
    results = real(ctx, protocols)
    ctx.write_text("report.md", "half of a second evaluation")
    raise KeyboardInterrupt  # Ctrl-C (or a kill) mid-way
  monkeypatch.setattr(evaluate, "run_evaluators", interrupted)
  with pytest.raises(KeyboardInterrupt):
    evaluate.evaluate(str(workdir), dataclasses_replace(options, step=2),
                      mesh=mesh)
  assert snapshot(workdir / "eval") == before
  assert sorted(p.name for p in workdir.iterdir() if "eval" in p.name) == [
      "eval"]
  monkeypatch.setattr(evaluate, "run_evaluators", real)
  second = evaluate.evaluate(str(workdir), dataclasses_replace(options,
                                                               step=2),
                             mesh=mesh)
  assert second["step"] == 2
  assert json.loads((workdir / "eval" / "report.json").read_text())[
      "step"] == 2
  assert sorted(p.name for p in workdir.iterdir() if "eval" in p.name) == [
      "eval"]


def dataclasses_replace(obj, **changes):
  import dataclasses  # pylint: disable=g-import-not-at-top
  return dataclasses.replace(obj, **changes)


def test_batch_larger_than_the_dataset_is_a_config_error(tmp_path):
  workdir = tmp_path / "run"
  proc = run_cli("main", *main_args(workdir, **{
      "optim.batch_size": 128, "dataset.max_train_examples": 64}))
  assert_user_error(proc, "The training set has 64 examples, fewer than one "
                    "batch (config.optim.batch_size=128)")
  assert not workdir.exists()


def test_missing_local_dataset_names_the_package_and_data_dir(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  proc = run_cli("main", *main_args(tmp_path / "run", **{
      "dataset.data_dir": str(empty)}))
  assert proc.returncode == cli.EXIT_DATA_MISSING, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and proc.stderr.count("error:") == 1
  flat = " ".join(proc.stderr.split())
  assert "apt-get install dataset-fashion-mnist" in flat
  assert "--config.dataset.data_dir" in flat
  assert "TFDS said" not in flat and "already prepared" not in flat


# ----------------------------------------------------------------------------
# 10. NaN mid-run, then resume; a read-only workdir on the command line.
# ----------------------------------------------------------------------------
def test_nan_mid_run_then_resume_redoes_the_steps(finished, tmp_path,
                                                  monkeypatch):
  """A transient NaN at step 3 stops the run after checkpoint 2; the
  re-run resumes from 2 and ends where the uninterrupted run ended."""
  real = train.make_train_step
  poison_params_at_step_2(monkeypatch, "projector")
  workdir = tmp_path / "run"
  with pytest.raises(train.NonFiniteLossError):
    run(tiny_config(), workdir)
  assert integrity.committed_steps(workdir / "checkpoints") == [2]
  monkeypatch.setattr(train, "make_train_step", real)
  summary = run(tiny_config(), workdir)
  assert summary["step"] == 4
  rows = read_jsonl(workdir / "metrics.jsonl")
  want = read_jsonl(finished / "metrics.jsonl")
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  for got, ref in zip(rows, want):
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5), (got, ref)
  events = [e["event"] for e in read_jsonl(workdir / "run_history.jsonl")]
  assert events == ["start", "resume", "end"]


def test_read_only_workdir_on_the_command_line(stopped):
  before = snapshot(stopped)
  with read_only(stopped):
    proc = run_cli("main", *main_args(stopped))
  assert_user_error(proc, str(stopped))
  assert proc.stderr.count("error: ") == 1
  assert snapshot(stopped) == before


def test_a_committed_save_is_sealed_without_waiting_for_the_next(tmp_path):
  """Sealer.poll (after every step) seals a save as soon as it committed:
  a run SIGKILLed before its next save finds its newest checkpoint sealed.
  Its training time is in Orbax's custom metadata from the start."""
  config = tiny_config()
  setup = train.build(config, sharding.make_mesh(jax.devices()[:1]))
  state = train.init_state(setup, jax.random.key(0))
  mngr = train.checkpoint_manager(tmp_path, config)
  ckpt = tmp_path / "checkpoints"
  data_iter = types.SimpleNamespace(get_state=lambda: {"batches": 0})
  sealer = integrity.Sealer(mngr, tmp_path)
  with sealer.saving(0, 1.5):
    train.save_checkpoint(mngr, state, data_iter, train_seconds=1.5)
  mngr.wait_until_finished()  # committed in the background, not sealed
  assert integrity.verify(ckpt, 0)[0] == "unsealed"
  assert integrity.prior_train_seconds(ckpt, 0, mngr) == 1.5
  sealer.poll()
  assert integrity.verify(ckpt, 0)[0] == "intact"
  assert integrity.read_manifest(ckpt, 0)["train_seconds"] == 1.5
  sealer.finish()
  mngr.close()
  assert sorted(p.name for p in ckpt.iterdir()) == ["0", "0.manifest.json"]
