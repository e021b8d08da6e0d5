"""Pins the end-of-run online evaluation (test_online_acc, test_sparsity,
test_gate_open_rate in summary.json) against direct computations.

Two angles:
  * `train.make_eval_step` on a hand-made batch through a stand-in model
    whose outputs are fixed tables (one row per example): hand values for
    the threshold (entries at 1e-4 vs 1e-6), the padding rows (mask False,
    built to be "correct", dense and fully open, so counting them shows) and
    the gate open rate (taken from the mask, not from the probabilities).
  * `train.online_eval` with the real tiny model on the 10,000 test images,
    evaluated in batches of 4096 (so the last batch is half padding), equal
    to a plain forward of the same parameters on the test split.
"""
import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bayesncl_jax import augment
from bayesncl_jax import config_lib
from bayesncl_jax import datasets
from bayesncl_jax import sharding
from bayesncl_jax import train

ROOT = pathlib.Path(__file__).resolve().parent.parent
FMNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(
    not FMNIST.exists(), reason="apt-get install -y dataset-fashion-mnist")

N_TEST, EVAL_BATCH = 10_000, 4096


def _config(method="bayesncl", **overrides):
  return config_lib.load_file(ROOT / "configs" / "fashion_mnist.py",
                              f"method={method}", {
      "model.width": 4, "model.stage_sizes": (1,), "model.proj_hidden": 16,
      "model.proj_out": 8, "progress_bar": False, "optim.batch_size": 16,
      "dataset.max_train_examples": 64, **overrides})


# ----------------------------------------------------------------------------
# The eval step on hand values.
# ----------------------------------------------------------------------------
E = 1e-6  # below the threshold: counts as zero.
A = 1e-4  # above it: active.
Z = np.array([[A, E, 0.0, 0.5],           # 2 zeros of 4
              [E, E, E, E],               # 4
              [A, -A, A, A],              # 0
              [1.0, 0.0, 0.0, 0.0],       # 3
              [0.5, 0.5, E, 0.0],         # 2
              [-E, 0.3, 0.3, 0.3],        # 1
              [1.0, 1.0, 1.0, 1.0],       # padding
              [1.0, 1.0, 1.0, 1.0]],      # padding
             np.float32)
LABELS = np.array([0, 1, 2, 0, 1, 2, 0, 0], np.int32)
PREDICTED = np.array([0, 0, 2, 1, 1, 0, 0, 0])   # right: rows 0, 2, 4, pads
GATE = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0],
                 [1, 1, 1, 1], [0, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]],
                np.float32)
MASK = np.array([True] * 6 + [False] * 2)


class _TableModel:
  """Stands in for the model: row r of the batch (an image filled with the
  value r) gets row r of each table. Only `apply` is used by the step."""

  def __init__(self, mean, std):
    self.mean, self.std = float(mean[0]), float(std[0])

  def apply(self, variables, x, train):
    del variables
    assert not train
    r = jnp.round((x[:, 0, 0, 0].astype(jnp.float32) * self.std + self.mean)
                  * 255.0).astype(jnp.int32)
    logits = jax.nn.one_hot(jnp.asarray(PREDICTED)[r], 3) * 5.0
    return {"z": jnp.asarray(Z)[r], "logits": logits,
            "h": jnp.zeros((x.shape[0], 2)),
            "gate_mask": jnp.asarray(GATE)[r],
            # Far from the mask: an open rate from these would read 0.9.
            "gate_probs": jnp.full((x.shape[0], 4), 0.9)}


def test_eval_step_counts_real_rows_at_the_threshold():
  config = _config()
  mesh = sharding.make_mesh(jax.devices()[:2])
  setup = train.build(config, mesh)
  setup = dataclasses.replace(
      setup, model=_TableModel(config.dataset.mean, config.dataset.std))
  step = train.make_eval_step(setup)
  images = np.broadcast_to(np.arange(8, dtype=np.uint8)[:, None, None, None],
                           (8, 28, 28, 1)).copy()
  batch = {"image": images, "label": LABELS, "mask": MASK}
  res = jax.device_get(step(None, None,
                            sharding.make_global_batch(batch, mesh)))
  assert float(res["count"]) == 6.0
  assert float(res["correct"]) == 3.0                     # rows 0, 2, 4
  # Zero fractions per real row: 2/4, 1, 0, 3/4, 2/4, 1/4.
  np.testing.assert_allclose(res["zeros"], 3.0, rtol=1e-6)
  # Open fractions per real row: 1/4, 1/2, 3/4, 0, 1, 1/4.
  np.testing.assert_allclose(res["open"], 2.75, rtol=1e-6)


# ----------------------------------------------------------------------------
# The whole online evaluation against a plain forward.
# ----------------------------------------------------------------------------
def _direct(setup, state, images, labels):
  """Per-example hits, zero entries and gate mask of a plain eval-mode
  forward (all images in one batch: no padding anywhere)."""
  x = augment.normalize(images, setup.config.dataset.mean,
                        setup.config.dataset.std)
  out = jax.jit(lambda v, x: setup.model.apply(v, x, train=False))(
      {"params": jax.device_get(state.params),
       "batch_stats": jax.device_get(state.batch_stats)}, x)
  out = jax.device_get(out)
  correct = np.argmax(out["logits"], -1) == labels
  zero = np.abs(out["z"]) <= 1e-5
  open_ = out.get("gate_mask")
  return correct, zero, open_


@pytest.mark.slow
def test_online_eval_equals_a_direct_computation():
  config = _config("bayesncl")
  assert config.dataset.eval_split == "test"
  mesh = sharding.make_mesh(jax.devices()[:2])
  setup = train.build(config, mesh)
  state = train.init_state(setup, jax.random.key(3))
  got = train.online_eval(setup, state, batch_size=EVAL_BATCH)

  # The test split (not the 64 training examples the run was limited to).
  source = datasets.get_source(config.dataset, "test")
  assert len(source) == N_TEST and N_TEST % EVAL_BATCH
  images = np.stack([source[i]["image"] for i in range(N_TEST)])
  labels = np.array([source[i]["label"] for i in range(N_TEST)])
  correct, zero, open_ = _direct(setup, state, images, labels)
  want = {"test_online_acc": np.mean(correct),
          "test_sparsity": np.mean(zero),
          "test_gate_open_rate": np.mean(open_)}
  assert set(got) == set(want)
  for key, value in want.items():
    np.testing.assert_allclose(got[key], value, rtol=0, atol=1e-6,
                               err_msg=key)

  # The test can fail: the 2288 padding rows (zero images) counted as
  # examples would move every value by more than the tolerance.
  n_pad = -N_TEST % EVAL_BATCH
  pad_correct, pad_zero, pad_open = _direct(
      setup, state, np.zeros((1, 28, 28, 1), np.uint8), np.zeros(1, int))
  padded = {"test_online_acc": np.sum(correct) + n_pad * pad_correct[0],
            "test_sparsity": (np.sum(np.mean(zero, 1))
                              + n_pad * np.mean(pad_zero)),
            "test_gate_open_rate": (np.sum(np.mean(open_, 1))
                                    + n_pad * np.mean(pad_open))}
  for key in ("test_sparsity", "test_gate_open_rate"):
    assert abs(padded[key] / (N_TEST + n_pad) - want[key]) > 1e-4, key
