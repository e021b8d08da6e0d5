"""Smoke tests of bench/: each benchmark runs in a tiny mode as a subprocess.

They check that the printed `JSON {...}` records parse and hold the expected
keys with positive numbers — not the speed, which depends on the machine.
The benchmarks run as subprocesses because they set XLA_FLAGS / read absl
flags themselves, as they do when run by hand.
"""
import importlib.util
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
HAS_TORCH = importlib.util.find_spec("torch") is not None

# ResNet-18's block and four stages, one block each, at width 8 with a small
# projector: the real code paths at a fraction of the compile time (compile
# time, not FLOPs, dominates a CPU smoke run).
TINY_MODEL = ["--backbones=resnet18", "--image_sizes=32", "--width=8",
              "--stage_sizes=1,1,1,1",
              "--proj_hidden=32", "--proj_out=16", "--batch_size=4",
              "--steps=2", "--warmup=1"]


def _run(script: str, *args: str, timeout: int = 600) -> list[dict]:
  env = dict(os.environ)
  # conftest asks for 8 simulated devices; the benchmarks choose their own.
  env.pop("XLA_FLAGS", None)
  env["JAX_PLATFORMS"] = "cpu"
  done = subprocess.run([sys.executable, str(BENCH / script), *args],
                        cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  records = [json.loads(line[len("JSON "):])
             for line in done.stdout.splitlines() if line.startswith("JSON ")]
  assert records, done.stdout
  for r in records:
    env_info = r["env"]
    assert env_info["command"].startswith("python ")
    assert env_info["jax"] and env_info["device_kind"]
  return records


def _positive(record: dict, *keys: str):
  for k in keys:
    assert isinstance(record[k], (int, float)) and record[k] > 0, (k, record)


@pytest.fixture(scope="module")
def step_records():
  """One run of step_throughput (with --torch eager if torch is there)."""
  extra = ["--torch", "--torch_variants=eager"] if HAS_TORCH else []
  return _run("step_throughput.py", "--methods=bayesncl", *TINY_MODEL,
              "--peak_flops=1e12", *extra)


@pytest.mark.slow
def test_step_throughput_jax(step_records):
  (r,) = [r for r in step_records if r["framework"] == "jax"]
  assert (r["method"], r["backbone"], r["image_size"], r["dtype"]) == (
      "bayesncl", "resnet18", 32, "float32")
  assert r["timed_steps"] == 2
  _positive(r, "images_per_sec_per_device", "median_ms", "compile_s",
            "flops_per_step_per_device", "peak_bytes", "temp_bytes")
  # MFU = model FLOPs per second / the --peak_flops given (1 TFLOP/s).
  assert r["mfu"] == pytest.approx(
      r["flops_per_step_per_device"] / (r["median_ms"] / 1e3) / 1e12)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed (it is a "
                    "benchmark-only dependency: pip install -r "
                    "requirements-bench.txt)")
def test_step_throughput_torch_eager(step_records):
  (r,) = [r for r in step_records if r["framework"] == "torch"]
  assert r["variant"] == "eager" and r["env"]["torch"]
  _positive(r, "images_per_sec_per_device", "median_ms",
            "jax_over_torch_throughput")


@pytest.mark.slow
def test_input_pipeline_bench():
  records = _run("input_pipeline_bench.py", "--num_images=10",
                 "--num_classes=2", "--jpeg_size=160x120", "--image_size=32",
                 "--batch_size=4", "--batches=4", "--workers=0,1",
                 "--resize_shorter=0,60", "--stage_images=4",
                 "--crop_on=host,device", "--canvas_size=160",
                 "--fashion_mnist=1", "--fashion_mnist_batch=8",
                 "--aug_batch=4", "--aug_steps=2", timeout=300)
  host = [r for r in records if r["bench"] == "host_pipeline"
          and r["dataset"] == "imagenet100"]
  assert [(r["resize_shorter"], r["crop_on"], r["workers"]) for r in host] == [
      (0, "host", 0), (0, "host", 1), (0, "device", 0), (0, "device", 1),
      (60, "host", 0), (60, "host", 1), (60, "device", 0), (60, "device", 1)]
  for r in host:
    _positive(r, "images_per_sec", "mean_jpeg_kib")
    assert r["canvas_size"] == (160 if r["crop_on"] == "device" else None)
  stages = [r for r in records if r["bench"] == "host_stages"]
  # The records really were pre-resized: 160x120 -> shorter side 60.
  assert [r["stored_hw"] for r in stages] == [[120, 160], [60, 80]]
  for r in stages:
    _positive(r, "decode_ms_per_image", "two_crops_ms_per_image",
              "boxes_ms_per_image")
  if os.path.exists("/usr/share/datasets/fashion-mnist"):
    small = [(r["crop_on"], r["workers"]) for r in records
             if r["bench"] == "host_pipeline"
             and r["dataset"] == "fashion_mnist"]
    assert small == [("host", 0), ("host", 1), ("device", 0), ("device", 1)]
  (crop,) = [r for r in records if r["bench"] == "device_crop"]
  _positive(crop, "ms_per_image", "flops_per_image")
  # At least the two matmuls per view: 2·S·Wc·Hc·C + 2·S·S·Hc·C.
  assert crop["flops_per_image"] >= 2 * 2 * 32 * 160 * 3 * (160 + 32)
  (aug,) = [r for r in records if r["bench"] == "device_augment"]
  _positive(aug, "ms_per_image", "median_ms")


@pytest.mark.slow
def test_loss_scaling():
  records = _run("loss_scaling.py", "--rows=32,64", "--dim=16",
                 "--devices=1,2", "--steps=2")
  assert sorted((r["num_devices"], r["rows"]) for r in records) == [
      (1, 32), (1, 64), (2, 32), (2, 64)]
  for r in records:
    assert r["env"]["num_devices"] == 2  # XLA_FLAGS set by the script.
    _positive(r, "temp_bytes", "median_ms", "full_sim_bytes")


@pytest.mark.slow
def test_conv_grad():
  # Every shape is listed; two (the stem and a 1x1 shortcut) are timed.
  args = ["--model=width8", "--rows=2", "--image_size=8", "--repeats=1",
          "--warmup=0", "--only=0,4"]
  if HAS_TORCH:
    args.append("--torch")
  records = _run("conv_grad.py", *args)
  (listed,) = [r for r in records if r["bench"] == "conv_grad_shapes"]
  # Width 8, stages (1, 1, 1), cifar stem padding 2: 8 px -> 10 -> 5 -> 3.
  assert [(r["x_shape"], r["w_shape"], r["strides"], r["padding"][0],
           r["uses"]) for r in listed["shapes"]] == [
              ([2, 8, 8, 3], [3, 3, 3, 8], [1, 1], [2, 2], 1),
              ([2, 10, 10, 8], [3, 3, 8, 8], [1, 1], [1, 1], 2),
              ([2, 10, 10, 8], [3, 3, 8, 16], [2, 2], [1, 1], 1),
              ([2, 5, 5, 16], [3, 3, 16, 16], [1, 1], [1, 1], 1),
              ([2, 10, 10, 8], [1, 1, 8, 16], [2, 2], [0, 0], 1),
              ([2, 5, 5, 16], [3, 3, 16, 32], [2, 2], [1, 1], 1),
              ([2, 3, 3, 32], [3, 3, 32, 32], [1, 1], [1, 1], 1),
              ([2, 5, 5, 16], [1, 1, 16, 32], [2, 2], [0, 0], 1)]
  layers = [r for r in records if r["bench"] == "conv_grad"]
  assert [r["index"] for r in layers] == [0, 4]
  from bayesncl_jax import conv  # pylint: disable=g-import-not-at-top
  for r in layers:
    assert set(r["timing"]) == {"fwd"} | {f"{g}_{i}" for g in ("dw", "dx")
                                          for i in conv.GRAD_IMPLS}
    for t in r["timing"].values():
      _positive(t, "ms")
    assert [r["auto"]["dw"], r["auto"]["dx"]] == list(conv.choose(
        tuple(r["x_shape"]), tuple(r["w_shape"]), tuple(r["strides"])))
    if HAS_TORCH:
      assert set(r["torch"]) == {"fwd", "dx", "dw"}
  (total,) = [r for r in records if r["bench"] == "conv_grad_total"]
  _positive(total, "fwd", "dw_xla", "dw_auto", "dx_xla", "dx_auto")
  assert total["dw_best"] <= min(total["dw_xla"], total["dw_auto"])

@pytest.mark.slow
def test_gate_cost():
  records = _run("gate_cost.py", "--variants=bayesncl_ste,ncl_topk",
                 "--rounds=2", "--steps_per_round=1", "--warmup=1",
                 "--config.model.width=4", "--config.model.stage_sizes=(1,)",
                 "--config.model.proj_hidden=16", "--config.model.proj_out=8",
                 "--config.model.top_k=2", "--config.optim.batch_size=4",
                 timeout=300)
  by = {r["variant"]: r for r in records}
  assert list(by) == ["ncl", "bayesncl_ste", "ncl_topk"]  # NCL added first.
  assert by["ncl"]["ratio_of_medians_to_ncl"] == 1.0
  for r in records:
    _positive(r, "median_ms", "paired_ratio_to_ncl_median", "gflop_per_step",
              "median_cpu_ms", "paired_cpu_ratio_to_ncl_median")
    assert r["rounds"] == 2 and r["global_batch"] == 4
    assert r["ratio_of_medians_to_ncl"] == pytest.approx(
        r["median_ms"] / by["ncl"]["median_ms"])
  # The gate head adds FLOPs; NCL+TopK's mask adds (almost) none.
  assert by["bayesncl_ste"]["gflop_per_step"] > by["ncl"]["gflop_per_step"]


def test_compare_methods_rewrites_markdown_from_json(tmp_path):
  """--from_json re-renders COMPARISON.md (the committed one comes from it)
  with the claims labelled as one seed's readings and the gate named."""
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copy(BENCH / "comparison.json", tmp_path / "comparison.json")
  done = subprocess.run(
      [sys.executable, str(BENCH / "compare_methods.py"),
       f"--from_json={tmp_path / 'comparison.json'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-3000:]
  md = (tmp_path / "COMPARISON.md").read_text()
  assert md == (BENCH / "COMPARISON.md").read_text()
  assert "## Single-seed readings of the papers' directional claims" in md
  assert "| claim | this seed | numbers |" in md
  assert "1/C by construction" in md
  assert "BayesNCL gate: `gumbel_sigmoid` as implemented when this ran" in md


@pytest.mark.slow
def test_gpu_sh_tiny(tmp_path):
  """bench/gpu.sh --tiny: the GPU suite at toy sizes on the CPU."""
  results = tmp_path / "RESULTS.md"
  results.write_text("# Benchmark results\n")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  done = subprocess.run(["bash", str(BENCH / "gpu.sh"), "--tiny",
                         f"--out={tmp_path / 'runs'}", f"--results={results}"],
                        cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=900)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  (path,) = (tmp_path / "runs").glob("gpu_*.json")
  run = json.loads(path.read_text())
  assert run["tiny"] and run["device"]["backend"] == "cpu"
  (jr,) = run["step"]
  assert (jr["framework"], jr["method"], jr["dtype"]) == ("jax", "bayesncl",
                                                          "bfloat16")
  _positive(jr, "images_per_sec_per_device", "flops_per_step_per_device")
  if HAS_TORCH:
    (tr,) = run["torch"]
    assert tr["variant"] == "eager"
    _positive(tr, "images_per_sec_per_device", "jax_over_torch_throughput")
  feed = {r["bench"]: r for r in run["feed"]}
  _positive(feed["feed_step"], "step_alone_images_per_sec",
            "fed_images_per_sec")
  smoke = feed["train_smoke"]
  assert smoke["all_finite"] and smoke["steps"] >= 3
  text = results.read_text()
  assert text.startswith("# Benchmark results\n")
  assert text.count("## GPU runs (`bench/gpu.sh`)") == 1
  assert ("| cpu (--tiny, CPU) | jax | jit/conv_impl=auto | bayesncl | 32 | "
          "bfloat16 |") in text
  assert "device crops, canvas 96 → 32 px" in text
  assert "training smoke" in text


@pytest.mark.skipif(shutil.which("nvidia-smi", path="/usr/bin:/bin")
                    is not None, reason="a GPU machine: gpu.sh would run")
def test_gpu_sh_refuses_without_a_gpu(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  env["PATH"] = "/usr/bin:/bin"  # no nvidia-smi
  done = subprocess.run(["bash", str(BENCH / "gpu.sh"),
                         f"--results={tmp_path / 'R.md'}"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 2 and "--tiny" in done.stderr
  assert not (tmp_path / "R.md").exists()


# ----------------------------------------------------------------------------
# bench/gpu_ledger.sh: the testbed ledger at ResNet-18 width on one GPU.
# ----------------------------------------------------------------------------
FMNIST_IDX = pathlib.Path("/usr/share/datasets/fashion-mnist")


def _bench_module(name: str):
  """bench/<name>.py imported as a module (bench/ is not a package)."""
  spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _gpu_ledger_module():
  return _bench_module("gpu_ledger")


def test_gpu_ledger_config_is_resnet18_at_five_epochs(tmp_path):
  """The full-size grid's config, parsed as `main` parses it: the testbed
  with configs/cifar10.py's ResNet-18, 5.0 epochs of 256, data carried."""
  from bayesncl_jax import config_lib  # pylint: disable=g-import-not-at-top
  from bayesncl_jax import models  # pylint: disable=g-import-not-at-top
  from bayesncl_jax import reproduce  # pylint: disable=g-import-not-at-top
  gl = _gpu_ledger_module()
  args = gl.parse_args([])
  argv = gl.reproduce_argv(args, "/data/fmnist", str(tmp_path))
  assert f"--steps={gl.DEFAULT_STEPS}" in argv
  assert "--variants=ncl,bayesncl_ste" in argv
  flags = [a for a in argv if a.startswith("--config.")]
  cifar = config_lib.load_file(ROOT / "configs" / "cifar10.py")
  for variant in gl.VARIANTS:
    c = reproduce.load_variant_config(gl.CONFIG, variant, 0, gl.DEFAULT_STEPS,
                                      flags)
    config_lib.validate(c)
    assert c.dataset.name == "fashion_mnist_backgrounds"
    for key in ("width", "stage_sizes", "proj_hidden", "proj_out", "stem",
                "backbone", "dtype"):
      assert c.model[key] == cifar.model[key], key
    stages = tuple(c.model.stage_sizes) or None
    assert models.ResNet(c.model.backbone, c.model.width,
                         stage_sizes=stages).feature_dim == 512
    assert (c.dataset.data_dir, c.aug.crop_on) == ("/data/fmnist", "device")
    assert c.optim.batch_size * c.optim.total_steps / 60_000 == pytest.approx(
        5.0, abs=0.01)
  assert c.method == "bayesncl" and c.gate.type == "ste"


def test_gpu_ledger_names_a_missing_package():
  gl = _gpu_ledger_module()
  gl.check_modules(("json",))
  with pytest.raises(gl.LedgerError, match="package 'no_such_pkg_23' is "
                     "missing.*pip download"):
    gl.check_modules(("no_such_pkg_23.sub",))


@pytest.mark.skipif(not FMNIST_IDX.exists(),
                    reason="apt-get install -y dataset-fashion-mnist")
def test_gpu_ledger_stage_copies_the_idx_files_it_then_reads(tmp_path,
                                                            monkeypatch):
  gl = _gpu_ledger_module()
  staged = tmp_path / "staged"
  monkeypatch.setattr(gl, "STAGED_DATA", str(staged))
  monkeypatch.setattr(gl, "DEBIAN_DATA", str(tmp_path / "no_debian"))
  with pytest.raises(gl.LedgerError, match="--stage"):
    gl.find_data(None)
  assert gl.stage(str(FMNIST_IDX)) == str(staged)
  for name in gl.IDX_FILES:
    assert (staged / name).read_bytes() == (FMNIST_IDX / name).read_bytes()
  assert gl.find_data(None) == str(staged)  # the staged copy comes first


def test_gpu_ledger_needs_the_data_and_a_gpu(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  done = subprocess.run(
      ["bash", str(BENCH / "gpu_ledger.sh"), "--tiny",
       f"--data={tmp_path / 'nothing'}"], cwd=ROOT, env=env,
      capture_output=True, text=True, timeout=120)
  assert done.returncode == 2
  assert "No Fashion-MNIST IDX files" in done.stderr
  assert "--stage" in done.stderr and "Traceback" not in done.stderr
  if shutil.which("nvidia-smi", path="/usr/bin:/bin") is None:
    env["PATH"] = "/usr/bin:/bin"
    done = subprocess.run(["bash", str(BENCH / "gpu_ledger.sh")], cwd=ROOT,
                          env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "--tiny" in done.stderr


@pytest.mark.skipif(not FMNIST_IDX.exists(),
                    reason="apt-get install -y dataset-fashion-mnist")
def test_gpu_ledger_sh_tiny(tmp_path):
  """bench/gpu_ledger.sh --tiny: the whole grid (train, evaluate, ledger) at
  toy sizes on the CPU, ledger and reports copied."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  ledger = tmp_path / "ledger"
  done = subprocess.run(
      ["bash", str(BENCH / "gpu_ledger.sh"), "--tiny",
       f"--out={tmp_path / 'grid'}", f"--ledger={ledger}",
       f"--data={FMNIST_IDX}"], cwd=ROOT, env=env, capture_output=True,
      text=True, timeout=900)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  assert sorted(p.name for p in ledger.iterdir()) == [
      "bayesncl_ste_seed0_report.json", "ledger.json", "ledger.md",
      "ledger.png", "ncl_seed0_report.json"]
  data = json.loads((ledger / "ledger.json").read_text())
  assert set(data["variants"]) >= {"ncl", "bayesncl_ste"}
  report = json.loads((ledger / "bayesncl_ste_seed0_report.json").read_text())
  assert report["step"] == 2
  assert report["protocol"]["mechanism"]["selection_split"] == "train"
  assert "gate_open_rate_background_dims_when_active" in report
  assert "--config.model.width=4" in (ledger / "ledger.md").read_text()


@pytest.mark.slow
def test_step_profile_times_the_pieces():
  # The cheap pieces (the whole step's compile is minutes on a loaded
  # 2-core machine); the step itself is timed by test_step_throughput_jax.
  records = _run("step_profile.py", "--batch_size=16", "--steps=1",
                 "--warmup=0", "--config=configs/fashion_mnist.py:method=ncl",
                 "--pieces=augment,forward,optimizer,loss", timeout=1200)
  assert [r["piece"] for r in records] == [
      "augment", "forward", "optimizer", "loss"]
  for r in records:
    _positive(r, "median_ms", "compile_s")
  by = {r["piece"]: r for r in records}
  # The network's forward does more work than the loss on its outputs.
  assert by["forward"]["flops"] > by["loss"]["flops"] > 0


# ----------------------------------------------------------------------------
# bench/learning_curve.py: the per-checkpoint table of a run.
# ----------------------------------------------------------------------------
def _learning_curve_module():
  return _bench_module("learning_curve")


def test_learning_curve_training_gate_rate_is_the_last_epochs_mean():
  lc = _learning_curve_module()
  rows = [{"step": s, "epoch": s / 4, "gate_open_rate": r}
          for s, r in [(2, 0.9), (4, 0.8), (6, 0.5), (8, 0.7), (10, 0.1)]]
  rows.insert(2, {"step": 5, "epoch": 1.25})  # a row without the gate
  # Checkpoint at step 8, 4 steps per epoch: the rows of steps 5..8.
  epoch, rate = lc.training_rates(rows, 8, 4.0)
  assert epoch == 2.0
  assert rate == pytest.approx((0.5 + 0.7) / 2)
  # No gate (NCL): no training rate.
  assert math.isnan(lc.training_rates([{"step": 4, "epoch": 1.0}], 4, 4.0)[1])


def test_learning_curve_names_stay_file_names_and_missing_cells_show():
  lc = _learning_curve_module()
  assert lc.run_name(pathlib.Path("/x/../a b<script>")) == "a_b_script_"
  assert lc.run_name(pathlib.Path("/x/..")) == "__"  # never a parent
  assert lc.run_name(pathlib.Path("/")) == "run"
  md = lc.table([{"run": "r", "method": "ncl", "step": 3, "epoch": 1.0,
                  "linear_top1": 0.5, "dims": "2 / 3",
                  "train_gate_open_rate": float("nan")}])
  row = md.splitlines()[2]
  assert row.startswith("| r | ncl | 3 | 1.0 | 0.500 |")
  assert row.count("—") == len(lc.COLUMNS) - 3
