"""Step-time split, MFU and profiler capture (bayesncl_jax/throughput.py)."""
from __future__ import annotations

import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import pytest

from bayesncl_jax import config_lib
from bayesncl_jax import sharding
from bayesncl_jax import throughput
from bayesncl_jax import train

ROOT = pathlib.Path(__file__).resolve().parent.parent
FMNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not FMNIST.exists(), reason="apt-get install -y dataset-fashion-mnist")
TINY = {"model.width": 4, "model.stage_sizes": (1,), "model.proj_hidden": 32,
        "model.proj_out": 16, "progress_bar": False}


@pytest.mark.parametrize("kind, peak", [
    ("TPU v4", 275.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0),
    ("TPU v5p", 459.0), ("TPU v6 lite", 918.0), ("TPU v6e", 918.0),
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("cpu", None), ("Tesla T4", None)])
def test_peak_table(kind, peak):
  assert throughput.peak_tflops(kind) == peak
  assert throughput.peak_tflops(kind, override=12.5) == 12.5


def test_mfu_and_flop_count_by_hand():
  # 2e12 FLOPs in 0.5 s on a 10 TFLOP/s device: 4e12 / 1e13 = 0.4.
  assert throughput.mfu(2e12, 0.5, 10.0) == pytest.approx(0.4)
  assert throughput.mfu(2e12, 0.5, None) is None
  assert throughput.mfu(None, 0.5, 10.0) is None
  # A 64x64 @ 64x64 matmul: 64 * 64 * 64 multiply-adds = 2 * 64**3 FLOPs.
  x = jnp.ones((64, 64))
  compiled = jax.jit(lambda a: a @ a).lower(x).compile()
  assert throughput.compiled_flops(compiled) == 2 * 64 ** 3


@pytest.mark.parametrize("spec, message", [
    ("5", "must be START:END"), ("a:b", "must be START:END"),
    ("3:3", "0 <= START < END"), ("-1:2", "0 <= START < END")])
def test_bad_profile_steps_is_one_config_error(spec, message):
  config = config_lib.load_file(ROOT / "configs" / "fashion_mnist.py", None,
                                {"profile_steps": spec})
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config, num_devices=1)
  assert config_lib.parse_profile_steps("2:7") == (2, 7)
  assert config_lib.parse_profile_steps("") is None


def test_unwritable_profile_dir_is_one_warning(tmp_path, caplog):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  profiler = throughput.Profiler("0:2", str(blocker / "tensorboard"))
  with caplog.at_level(logging.WARNING):
    for step in range(4):  # the steps go on
      profiler.before_step(step)
      y = jnp.ones(3) * step
      profiler.after_step(step, y)
    profiler.close()
  warnings = [r for r in caplog.records if "Profiler" in r.getMessage()]
  assert len(warnings) == 1, warnings
  assert "training goes on" in warnings[0].getMessage()
  assert not profiler.written


@needs_fmnist
def test_training_logs_the_split_and_mfu_and_writes_a_trace(tmp_path):
  """6 steps logged every 2, steps 1..2 profiled, a made-up peak of 1
  GFLOP/s (CPU peaks are not in the table)."""
  config = config_lib.load_file(
      ROOT / "configs" / "fashion_mnist.py", None,
      {**TINY, "optim.total_steps": 6, "optim.batch_size": 16,
       "log_every": 2, "ckpt_every": 6, "dataset.max_train_examples": 64,
       "profile_steps": "1:3", "peak_tflops": 1e-3})
  mesh = sharding.make_mesh(jax.devices()[:1])
  train.train_and_evaluate(config, tmp_path, mesh=mesh)
  rows = [json.loads(line) for line in
          (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [2, 4, 6]
  flops = []
  for r in rows:
    assert r["step_ms"] > 0 and 0 <= r["input_ms"] <= r["step_ms"]
    assert r["compute_ms"] == pytest.approx(r["step_ms"] - r["input_ms"])
    assert r["images_per_sec"] == pytest.approx(16 / (r["step_ms"] / 1000))
    # mfu = flops / step_s / peak: the same FLOP count in every interval.
    flops.append(r["mfu"] * (r["step_ms"] / 1000) * 1e-3 * 1e12)
  assert flops[0] > 0 and flops == pytest.approx([flops[0]] * 3, rel=1e-6)
  traces = list((tmp_path / "tensorboard" / "plugins" / "profile").glob(
      "*/*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0
