"""Runs against a real GCS API: every file of a run lands in the bucket.

A fake-gcs-server (tests/gcs_emulator.py) serves the GCS JSON API on
127.0.0.1; gcsfs (epath's gs://), TensorStore (Orbax's arrays) and
ArrayRecord's C++ reader all talk to it as they would to Google Cloud
Storage. The runs are real `python -m bayesncl_jax.main` / `.evaluate`
subprocesses on a tiny model:

* paths layer: read/write/append/figures/TensorBoard on gs://, clear errors;
* ImageNet-100 converted straight to the bucket and read back from it;
* pre-train to gs://bucket/..., SIGKILL, resume from the bucket bit for bit,
  evaluate from the bucket; training data read from the bucket too;
* two processes x one device: one checkpoint written to the bucket, and a
  SIGTERM to ONE process stops both at the same step, exit 143, and the
  resume is bit for bit the uninterrupted run.

Every test also checks that nothing was written to a local `./gs:` folder.
"""
from __future__ import annotations

import json
import os
import pathlib
import signal
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import jax
import numpy as np
import pytest

import gcs_emulator
from test_train import needs_fmnist, run_main
from test_datasets import _make_folder, _WNIDS, _config
import test_multihost
from bayesncl_jax import datasets
from bayesncl_jax import paths
from bayesncl_jax import prepare_imagenet100
from bayesncl_jax import sharding
from bayesncl_jax import train

ROOT = pathlib.Path(__file__).resolve().parent.parent
BUCKET = "bucket"
FMNIST = pathlib.Path(datasets.FASHION_MNIST_DEBIAN_DIR)


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
  """The emulator, its variables set in os.environ (subprocesses inherit
  them), and the bucket `bucket`."""
  log = tmp_path_factory.mktemp("gcs") / "fake-gcs-server.log"
  emulator = gcs_emulator.Emulator(log)
  previous = gcs_emulator.apply_env(emulator.env)
  try:
    emulator.create_bucket(BUCKET)
    yield emulator
  finally:
    gcs_emulator.restore_env(previous)
    emulator.stop()


@pytest.fixture
def prefix(gcs, request):
  """A fresh gs://bucket/<test>-<uid> folder; afterwards checks that no
  local ./gs: folder appeared (the failure mode of os.makedirs on a URL)."""
  name = f"{request.node.name}-{uuid.uuid4().hex[:6]}".replace("[", "_")
  yield f"gs://{BUCKET}/{name.replace(']', '')}"
  for where in (ROOT, pathlib.Path.cwd()):
    assert not (where / "gs:").exists(), f"local {where / 'gs:'} written"


def raw_object(gcs, url: str) -> bytes:
  """An object's bytes straight from the server (no client-side cache)."""
  bucket, name = url[len("gs://"):].split("/", 1)
  quoted = urllib.parse.quote(name, safe="")
  with urllib.request.urlopen(
      f"{gcs.url}/storage/v1/b/{bucket}/o/{quoted}?alt=media", timeout=10) as r:
    return r.read()


def objects(gcs, url: str) -> list[str]:
  """Object names under the gs:// prefix `url`, relative to it."""
  bucket, name = url[len("gs://"):].split("/", 1)
  return sorted(n[len(name) + 1:] for n in gcs.objects(bucket, name + "/"))


def read_events(data: bytes) -> list[tuple[int, str, float]]:
  """(step, tag, value) of the scalars in a TensorBoard event file.

  The TFRecord framing is parsed here: u64 length, u32 crc, payload, u32
  crc; the payload is an `Event` protobuf.
  """
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out, i = [], 0
  while i < len(data):
    (n,) = struct.unpack("<Q", data[i:i + 8])
    event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
    i += 12 + n + 4
    out += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
  return out


# ----------------------------------------------------------------------------
# The path layer.
# ----------------------------------------------------------------------------
def test_paths_on_the_bucket(gcs, prefix, tmp_path):
  run = paths.join(prefix, "run")
  assert run == f"{prefix}/run" and paths.is_remote(run)
  assert paths.ensure_dir(run) == run
  paths.write_json(paths.join(run, "config.json"), {"a": 1})
  assert paths.read_json(paths.join(run, "config.json")) == {"a": 1}
  assert paths.exists(paths.join(run, "config.json"))
  assert not paths.exists(paths.join(run, "nope.json"))

  # Append survives a new writer (a resumed run): GCS itself cannot append.
  log = paths.join(run, "metrics.jsonl")
  for lines in (["1\n", "2\n"], ["3\n"]):
    appender = paths.Appender(log)
    for line in lines:
      appender.write(line)
      appender.flush()
    appender.close()
  assert raw_object(gcs, log) == b"1\n2\n3\n"
  # At most one upload per REMOTE_FLUSH_SECONDS (GCS allows ~1 write/s to
  # an object) unless forced; close always uploads.
  throttled = paths.Appender(log)
  throttled._uploaded_at = time.monotonic()  # pylint: disable=protected-access
  throttled.write("4\n")
  throttled.flush()
  assert raw_object(gcs, log) == b"1\n2\n3\n"
  throttled.flush(force=True)
  assert raw_object(gcs, log) == b"1\n2\n3\n4\n"
  throttled.write("5\n")
  throttled.close()
  assert raw_object(gcs, log) == b"1\n2\n3\n4\n5\n"
  with pytest.raises(ValueError, match="Appender"):
    paths.open_file(log, "a")

  # Figures and arrays.
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(1, 1))
  fig.subplots().plot([0, 1])
  paths.save_figure(fig, paths.join(run, "eval", "plot.png"))
  assert raw_object(gcs, paths.join(run, "eval", "plot.png"))[:8] == (
      b"\x89PNG\r\n\x1a\n")
  paths.save_npz(paths.join(run, "a.npz"), x=np.arange(5))
  with np.load(paths.open_file(paths.join(run, "a.npz"))) as z:
    np.testing.assert_array_equal(z["x"], np.arange(5))

  # TensorBoard events through the same layer, readable by the format.
  writer = paths.tensorboard_writer(paths.join(run, "tensorboard"))
  for step in (1, 2):
    writer.add_scalar("loss", 1.0 / step, step)
    writer.flush(force=True)
  writer.close()
  [event_file] = paths.listdir(paths.join(run, "tensorboard"))
  assert "tfevents" in event_file
  events = read_events(raw_object(gcs, paths.join(run, "tensorboard",
                                                  event_file)))
  assert events == [(1, "loss", 1.0), (2, "loss", 0.5)]
  assert objects(gcs, run) == sorted(
      ["config.json", "metrics.jsonl", "eval/plot.png", "a.npz",
       f"tensorboard/{event_file}"])

  # Local paths take the same calls.
  local = tmp_path / "local"
  paths.ensure_dir(local)
  paths.write_text(local / "x.txt", "hi")
  assert (local / "x.txt").read_text() == "hi"

  # Clear errors: a missing bucket, a mangled URL.
  with pytest.raises(paths.PathError, match="gs://no-such-bucket of .* does "
                     "not exist.*gcloud storage buckets create"):
    paths.ensure_dir("gs://no-such-bucket/run")
  with pytest.raises(paths.PathError, match="two slashes"):
    paths.ensure_dir("gs:/bucket/run")


def test_tensorboard_events_reach_the_bucket_through_public_apis(gcs, prefix):
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  factories = dict(record_writer.REGISTERED_FACTORIES)
  logdir = paths.join(prefix, "tensorboard")
  writer = paths.tensorboard_writer(logdir, purge_step=7)
  # tensorboardX's own gs:// writer is not replaced for the process.
  assert record_writer.REGISTERED_FACTORIES == factories
  writer.add_scalar("loss", 0.25, 7)
  writer.flush(force=True)
  [event_file] = paths.listdir(logdir)
  url = paths.join(logdir, event_file)
  assert read_events(raw_object(gcs, url)) == [(7, "loss", 0.25)]
  # Unforced flushes within REMOTE_FLUSH_SECONDS of an upload upload
  # nothing; a forced one and close do.
  writer.add_scalar("loss", 0.5, 8)
  writer.flush()
  assert read_events(raw_object(gcs, url)) == [(7, "loss", 0.25)]
  writer.add_scalar("loss", 0.75, 9)
  writer.flush(force=True)
  assert read_events(raw_object(gcs, url))[-1] == (9, "loss", 0.75)
  writer.add_scalar("acc", 1.0, 10)
  local_dir = writer._local_dir  # pylint: disable=protected-access
  writer.close()
  assert read_events(raw_object(gcs, url)) == [
      (7, "loss", 0.25), (8, "loss", 0.5), (9, "loss", 0.75),
      (10, "acc", 1.0)]
  assert paths.listdir(logdir) == [event_file]
  assert not os.path.exists(local_dir)       # the local copy is cleaned up.




@pytest.mark.slow
def test_imagenet100_converted_to_and_read_from_the_bucket(gcs, prefix,
                                                           tmp_path):
  src = tmp_path / "src"
  _make_folder(src)
  out = paths.join(prefix, "imagenet100")
  meta = prepare_imagenet100.convert(str(src), out, classes=list(_WNIDS),
                                     examples_per_shard=5,
                                     staging_dir=str(tmp_path / "stage"))
  # Shards uploaded one by one and removed locally; metadata last.
  assert not list((tmp_path / "stage").rglob("*.array_record*"))
  assert objects(gcs, out) == sorted(
      meta["splits"]["train"]["files"] + meta["splits"]["val"]["files"]
      + [datasets.IMAGENET100_METADATA])
  local = tmp_path / "local"
  prepare_imagenet100.convert(str(src), str(local), classes=list(_WNIDS),
                              examples_per_shard=5)
  # ArrayRecord reads the gs:// shards itself; same records as locally.
  config, local_config = _config("imagenet100", out), _config("imagenet100",
                                                             local)
  assert datasets.num_classes(config.dataset) == 2
  for split in ("train", "val"):
    remote = datasets.get_source(config.dataset, split)
    here = datasets.get_source(local_config.dataset, split)
    assert isinstance(remote, datasets.ImageNet100ArrayRecordSource)
    assert len(remote) == len(here) == (12 if split == "train" else 4)
    for i in range(len(remote)):
      a, b = remote[i], here[i]
      assert a["label"] == b["label"]
      np.testing.assert_array_equal(a["image"], b["image"])
  with pytest.raises(ValueError, match="must be local"):
    prepare_imagenet100.convert(out, str(tmp_path / "x"))


# ----------------------------------------------------------------------------
# One process: pre-train, SIGKILL, resume, evaluate, all on the bucket.
# ----------------------------------------------------------------------------
@pytest.mark.slow
@needs_fmnist
def test_train_kill_resume_evaluate_on_the_bucket(gcs, prefix, tmp_path,
                                                  monkeypatch):
  # The three runs compile the same step: once, with a shared cache.
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "cache"))
  # The training data too come from the bucket.
  data_dir = paths.join(prefix, "fashion_mnist")
  paths.upload_dir(FMNIST, data_dir, sorted(
      n for n in os.listdir(FMNIST) if n.endswith("-ubyte.gz")))
  k = 3
  overrides = {"optim.total_steps": 2 * k, "optim.batch_size": 16,
               "log_every": 1, "ckpt_every": k, "dataset.data_dir": data_dir,
               "dataset.max_train_examples": 256, "dataset.eval_split": "train"}
  straight, killed = paths.join(prefix, "straight"), paths.join(prefix,
                                                                "killed")
  run_main(straight, overrides)
  proc = run_main(killed, overrides, extra=[f"--debug_kill_after_step={k}"],
                  check=False)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  assert objects(gcs, paths.join(killed, "checkpoints"))  # step k is there
  assert not paths.exists(paths.join(killed, "summary.json"))
  # The killed process left its lock object: reported, never broken
  # silently (workdir_lock); --break_stale_lock breaks it.
  refused = run_main(killed, overrides, check=False)
  assert refused.returncode == 4, refused.stderr[-3000:]
  assert "seems to be gone" in " ".join(refused.stderr.split())
  resumed = run_main(killed, overrides, extra=["--break_stale_lock"])
  assert f"Resumed from {killed}/checkpoints at step {k}" in resumed.stderr

  # The same losses at every step, the killed run's lines kept by the resume.
  a = [json.loads(l) for l in raw_object(gcs, paths.join(
      straight, "metrics.jsonl")).decode().splitlines()]
  b = [json.loads(l) for l in raw_object(gcs, paths.join(
      killed, "metrics.jsonl")).decode().splitlines()]
  assert [m["step"] for m in b] == list(range(1, 2 * k + 1))
  for ma, mb in zip(a, b):
    assert ma["loss"] == mb["loss"] and ma["nce"] == mb["nce"], (ma, mb)

  # Bitwise identical final state, restored in this process from the bucket.
  config = train.load_config(killed)
  setup = train.build(config, sharding.make_mesh(jax.devices()[:1]))
  states = []
  for wd in (straight, killed):
    mngr = train.checkpoint_manager(wd, config)
    assert mngr.all_steps() == [k, 2 * k]
    states.append(jax.device_get(train.restore_checkpoint(
        mngr, setup, None, restore_data=False)))
    mngr.close()
  for x, y in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
    np.testing.assert_array_equal(x, y)

  # TensorBoard: one event file per start, the scalars of metrics.jsonl.
  events = []
  for name in paths.listdir(paths.join(killed, "tensorboard")):
    events += read_events(raw_object(gcs, paths.join(killed, "tensorboard",
                                                     name)))
  assert len(paths.listdir(paths.join(killed, "tensorboard"))) == 2
  losses = sorted((s, v) for s, tag, v in events if tag == "loss")
  assert [s for s, _ in losses] == list(range(1, 2 * k + 1))
  np.testing.assert_allclose([v for _, v in losses],
                             [m["loss"] for m in b], rtol=1e-6)

  summary = json.loads(raw_object(gcs, paths.join(killed, "summary.json")))
  assert summary["step"] == 2 * k and not summary["preempted"]

  # Evaluate from the bucket (another process, config read from there);
  # the report and the pictures go to the bucket.
  proc = run_main_evaluate(killed)
  assert proc.returncode == 0, proc.stderr[-3000:]
  files = objects(gcs, paths.join(killed, "eval"))
  assert {"report.json", "report.md", "active_dims_hist.png",
          "top_activations.png", "top_activations.npz"} <= set(files), files
  report = json.loads(raw_object(gcs, paths.join(killed, "eval",
                                                 "report.json")))
  assert report["step"] == 2 * k and 0 <= report["linear_top1"] <= 1


def run_main_evaluate(workdir):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "JAX_PLATFORMS": "cpu"}
  return subprocess.run(
      [sys.executable, "-m", "bayesncl_jax.evaluate", f"--workdir={workdir}",
       "--protocols=linear,interp,grids", "--max_examples=256",
       "--linear_epochs=2", "--batch_size=64", "--grid_dims=2",
       "--grid_images=3"], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=600)


@pytest.mark.slow
def test_bad_workdir_fails_before_training(gcs):
  overrides = {"optim.total_steps": 2, "optim.batch_size": 16}
  proc = run_main("gs://no-such-bucket/run", overrides, check=False)
  assert proc.returncode != 0
  assert "The bucket gs://no-such-bucket of gs://no-such-bucket/run does not "\
      "exist" in proc.stderr
  assert not (ROOT / "gs:").exists()


# ----------------------------------------------------------------------------
# Two processes x one device (a pod in miniature), workdir on the bucket.
# ----------------------------------------------------------------------------
POD_STEPS = 40
POD_ARGS = [f"--config.optim.total_steps={POD_STEPS}",
            f"--config.ckpt_every={POD_STEPS}"]


def _pod_job(workdir, logs, cache):
  return test_multihost.Job(workdir, devices=1, processes=2, args=POD_ARGS,
                            cache=cache, logs=logs)


@pytest.fixture(scope="module")
def pod(gcs, tmp_path_factory):
  """An uninterrupted 2-process run; another one whose process 1 alone gets
  SIGTERM after its first logged step; then that one resumed."""
  root = tmp_path_factory.mktemp("pod")
  cache = root / "jax_cache"
  base = f"gs://{BUCKET}/pod-{uuid.uuid4().hex[:6]}"
  straight = _pod_job(f"{base}/straight", root / "straight", cache)
  preempted = _pod_job(f"{base}/preempted", root / "preempted", cache)
  metrics = f"{base}/preempted/metrics.jsonl"
  deadline = time.monotonic() + test_multihost.JOB_TIMEOUT_S
  while True:
    try:
      logged = raw_object(gcs, metrics).count(b"\n")
    except urllib.error.HTTPError:  # 404 until the first step is logged.
      logged = 0
    # The first logged step is uploaded at once (later ones at most every
    # paths.REMOTE_FLUSH_SECONDS): signal then, well before the last step.
    if logged >= 1:
      break
    if any(p.poll() is not None for p in preempted.procs) or (
        time.monotonic() > deadline):
      for job in (straight, preempted):
        for p in job.procs:
          p.kill()
      pytest.fail("the run ended or hung before it was signalled:\n"
                  + preempted.tail())
    time.sleep(0.2)
  preempted.procs[1].send_signal(signal.SIGTERM)
  codes = {"preempted": preempted.wait(), "straight": straight.wait()}
  # What the preempted run left, before the resume adds to it.
  left = {"steps": _steps_saved(gcs, preempted.workdir),
          "summary": json.loads(raw_object(gcs, paths.join(
              preempted.workdir, "summary.json")))}
  resumed = _pod_job(f"{base}/preempted", root / "resumed", cache)
  codes["resumed"] = resumed.wait()
  return {"base": base, "codes": codes, "straight": straight,
          "preempted": preempted, "resumed": resumed, "left": left}


def _steps_saved(gcs, workdir) -> list[int]:
  names = objects(gcs, paths.join(workdir, "checkpoints"))
  return sorted({int(n.split("/")[0]) for n in names
                 if n.split("/")[0].isdigit()})


def _metrics(gcs, workdir) -> list[dict]:
  return [json.loads(line) for line in raw_object(
      gcs, paths.join(workdir, "metrics.jsonl")).decode().splitlines()]


def _final_state(workdir):
  config = train.load_config(workdir)
  setup = train.build(config, sharding.make_mesh(jax.devices()[:1]))
  mngr = train.checkpoint_manager(workdir, config)
  try:
    return jax.device_get(train.restore_checkpoint(
        mngr, setup, None, step=POD_STEPS, restore_data=False))
  finally:
    mngr.close()


@pytest.mark.slow
@needs_fmnist
def test_two_processes_write_one_checkpoint_to_the_bucket(gcs, pod):
  job = pod["straight"]
  assert pod["codes"]["straight"] == [0, 0], job.tail()
  assert _steps_saved(gcs, job.workdir) == [POD_STEPS]
  files = objects(gcs, job.workdir)
  assert {"config.json", "metrics.jsonl", "summary.json"} <= set(files)
  assert any(f.startswith("tensorboard/") for f in files)
  # Process 0 alone logs; both wrote their shards of the one checkpoint.
  assert [m["step"] for m in _metrics(gcs, job.workdir)] == list(
      range(1, POD_STEPS + 1))
  assert "JAX process 1/2" in job.output(1)
  assert not (ROOT / "gs:").exists()


@pytest.mark.slow
@needs_fmnist
def test_sigterm_to_one_process_stops_the_pod_at_one_step(gcs, pod):
  """SIGTERM reaches process 1 only (as when one host of a slice gets the
  maintenance notice first); JAX's preemption service tells both processes
  the same step, both save it together and exit with 143."""
  job = pod["preempted"]
  assert pod["codes"]["preempted"] == [train.PREEMPTED_EXIT_CODE] * 2, (
      job.tail())
  said = []
  for i in range(2):
    out = job.output(i)
    marker = "processes save step "
    assert marker in out, out[-3000:]
    said.append(int(out.split(marker)[1].split()[0]))
  step = said[0]
  assert said == [step, step] and 1 <= step < POD_STEPS
  assert pod["left"]["steps"] == [step]
  summary = pod["left"]["summary"]
  assert summary["preempted"] and summary["step"] == step

  # Resumed from the bucket: bit for bit the uninterrupted run.
  resumed = pod["resumed"]
  assert pod["codes"]["resumed"] == [0, 0], resumed.tail()
  assert f"at step {step}" in resumed.output(0)
  want, got = _metrics(gcs, pod["straight"].workdir), _metrics(gcs,
                                                              job.workdir)
  assert [m["step"] for m in got] == list(range(1, POD_STEPS + 1))
  for a, b in zip(want, got):
    assert a["loss"] == b["loss"] and a["nce"] == b["nce"], (a, b)
  straight_state = _final_state(pod["straight"].workdir)
  resumed_state = _final_state(job.workdir)
  for x, y in zip(jax.tree.leaves(straight_state),
                  jax.tree.leaves(resumed_state)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_tfds_build_is_read_from_the_bucket(gcs, prefix, tmp_path):
  """A TFDS ArrayRecord build uploaded to the bucket is read from there
  (the CIFAR recipe of launch/README.md). TFDS's DummyDataset: integer
  features only, so it builds without TensorFlow."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  local = tmp_path / "tfds"
  tfds.testing.DummyDataset(data_dir=str(local)).download_and_prepare(
      file_format="array_record")
  version_dir = local / "dummy_dataset" / "1.0.0"
  remote = paths.join(prefix, "tfds")
  paths.upload_dir(version_dir, paths.join(remote, "dummy_dataset", "1.0.0"))
  source = datasets._tfds_data_source(  # pylint: disable=protected-access
      "dummy_dataset", "train", remote, how_to_get="")
  here = tfds.data_source("dummy_dataset", split="train",
                          data_dir=str(local))
  assert len(source) == len(here) == 3
  assert [source[i]["id"] for i in range(3)] == [here[i]["id"]
                                                 for i in range(3)]


# ----------------------------------------------------------------------------
# Orbax's commit marker; the workdir lock on the bucket.
# ----------------------------------------------------------------------------
@needs_fmnist
def test_uncommitted_step_on_the_bucket_is_not_used(gcs, prefix, tmp_path,
                                                     monkeypatch):
  """On gs:// Orbax writes a step in place and marks it done with
  commit_success.txt: a step without it (a save that did not finish) is
  not listed, restored, evaluated or resumed from."""
  from bayesncl_jax import evaluate  # pylint: disable=g-import-not-at-top
  from bayesncl_jax import integrity  # pylint: disable=g-import-not-at-top
  from bayesncl_jax import run_record  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "cache"))
  overrides = {"optim.total_steps": 4, "optim.batch_size": 16,
               "log_every": 1, "ckpt_every": 2,
               "dataset.max_train_examples": 64,
               "dataset.eval_split": "train"}
  workdir = paths.join(prefix, "run")
  run_main(workdir, overrides)
  ckpt = paths.join(workdir, "checkpoints")
  assert "4/commit_success.txt" in objects(gcs, ckpt)
  assert integrity.committed_steps(ckpt) == [2, 4]
  # Step 4's save "did not finish": no marker, no manifest, no summary.
  for name in ("checkpoints/4/commit_success.txt",
               "checkpoints/4.manifest.json", "summary.json"):
    paths.as_path(paths.join(workdir, name)).unlink()
  assert "4/_CHECKPOINT_METADATA" in objects(gcs, ckpt)  # half-written
  assert integrity.committed_steps(ckpt) == [2]
  assert run_record.RunRecord(workdir).has_trained_state()
  _, state = evaluate.load_state(workdir, mesh=sharding.make_mesh(
      jax.devices()[:1]))
  assert int(state.step) == 2
  assert not list(workdir_objects(gcs, workdir, ".bayesncl.lock"))
  # With no committed step left, the explorer finds no checkpoint either.
  from bayesncl_jax.explore import data as explore_data  # pylint: disable=g-import-not-at-top
  paths.as_path(paths.join(ckpt, "2", "commit_success.txt")).unlink()
  assert integrity.committed_steps(ckpt) == []
  with pytest.raises(explore_data.ExploreError, match="No checkpoint"):
    explore_data.check_workdir(workdir)


def workdir_objects(gcs, workdir, name):
  return [n for n in objects(gcs, workdir) if n == name]


def test_workdir_lock_on_the_bucket(gcs, prefix):
  import socket  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from bayesncl_jax import workdir_lock  # pylint: disable=g-import-not-at-top
  workdir = paths.join(prefix, "run")
  second = [sys.executable, "-c", (
      "import sys; from bayesncl_jax import workdir_lock as w\n"
      "try:\n  with w.hold(sys.argv[1], 'second'): print('held')\n"
      "except w.WorkdirLockedError as e: print('refused:', e)"), workdir]
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  with workdir_lock.hold(workdir, "first"):
    assert objects(gcs, workdir) == [".bayesncl.lock"]
    out = subprocess.run(second, cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120).stdout
    assert out.startswith(f"refused: {workdir} is in use: pid {os.getpid()} "
                          f"on host {socket.gethostname()}"), out
  assert objects(gcs, workdir) == []
  # A holder that died without releasing (SIGKILL): reported, not broken.
  dead = subprocess.Popen(["true"])
  dead.wait()
  paths.write_json(paths.join(workdir, ".bayesncl.lock"), {
      "host": socket.gethostname(), "pid": dead.pid, "started": "then",
      "purpose": "training", "command": "python -m bayesncl_jax.main"})
  out = subprocess.run(second, cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120).stdout
  flat = " ".join(out.split())
  assert "seems to be gone" in flat and "no longer runs on this host" in flat
  assert f"gcloud storage rm {workdir}/.bayesncl.lock" in flat
  assert objects(gcs, workdir) == [".bayesncl.lock"]  # still there
  with workdir_lock.hold(workdir, "third", break_stale=True):
    assert json.loads(raw_object(gcs, paths.join(
        workdir, ".bayesncl.lock")))["pid"] == os.getpid()
  assert objects(gcs, workdir) == []
