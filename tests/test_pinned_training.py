"""Pins what the train step does with its randomness, its KL and its gate.

The other training tests check losses and resume on real runs, but they pass
with one PRNG key reused at every step, with half the KL weight (λ = 3e-5 is
~1e-5 of the loss, below their tolerances) and with a gate open rate taken
from the probabilities instead of the sampled mask. These tests run the real
jitted step (`train.make_train_step`) on a tiny model and watch, from inside
the compiled step, what it feeds the network: the augmented views (the output
of `augment.augment_batch`) and the Gumbel noise of the gate (the output of
`models.gumbel_sigmoid_probs`). The watched functions are wrapped, not
replaced: each wrapper calls the real function and hands a copy of its output
to the host with `jax.debug.callback`.
"""
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bayesncl_jax import augment
from bayesncl_jax import config_lib
from bayesncl_jax import losses
from bayesncl_jax import models
from bayesncl_jax import sharding
from bayesncl_jax import train

ROOT = pathlib.Path(__file__).resolve().parent.parent
FMNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not FMNIST.exists(), reason="apt-get install -y dataset-fashion-mnist")

BATCH, SIZE = 8, 16
KL_WEIGHT = 0.5          # large: λ·KL is ~1/5 of the loss, not ~1e-5.
GATE_TEMPERATURE = 0.5
GATE_THRESHOLD = 0.7     # not 0.5: the mask is not `probs > 0.5`.


def _config():
  return config_lib.load_file(ROOT / "configs" / "fashion_mnist.py",
                              "method=bayesncl", {
      "model.width": 4, "model.stage_sizes": (1,), "model.proj_hidden": 16,
      "model.proj_out": 8, "progress_bar": False,
      "optim.batch_size": BATCH, "dataset.max_train_examples": 64,
      "dataset.image_size": SIZE, "gate.type": "gumbel_sigmoid",
      "gate.temperature": GATE_TEMPERATURE,
      "gate.threshold": GATE_THRESHOLD, "gate.kl_weight": KL_WEIGHT,
      # Every image gets brightness/contrast jitter: the views are random.
      "aug.color_jitter_prob": 1.0, "aug.saturation": 0.0, "aug.hue": 0.0})


class _Recorder:
  """Wraps a function so that each call, inside jit, reports its output.

  Outputs are tagged by the order of the calls when the step is traced
  (view 1 is augmented before view 2), so the order in which the host
  receives them does not matter.
  """

  def __init__(self, fn, tags, what):
    self.fn, self.tags, self.what = fn, tags, what
    self.calls = 0
    self.current = None

  def __call__(self, *args, **kwargs):
    out = self.fn(*args, **kwargs)
    tag = self.tags[self.calls % len(self.tags)]
    self.calls += 1
    payload = self.what(args, out)

    def report(*values, tag=tag):
      self.current[tag] = tuple(np.asarray(v) for v in values)
    jax.debug.callback(report, *payload)
    return out


@pytest.fixture(scope="module")
def steps():
  """Steps 0 and 1 on the same uint8 batch, then step 1 again from a copy.

  Returns {"config", "records": [step0, step1, step1_resumed],
  "metrics": [...]}; each record maps "view1", "view2" to the augmented
  views and "gate" to (gate logits, noisy gate probabilities).
  """
  if not FMNIST.exists():
    pytest.skip("apt-get install -y dataset-fashion-mnist")
  config = _config()
  mesh = sharding.make_mesh(jax.devices()[:1])
  views = _Recorder(augment.augment_batch, ("view1", "view2"),
                    lambda args, out: (out,))
  # One gate call per view (config.model.bn_views="separate", the default).
  noise = _Recorder(models.gumbel_sigmoid_probs, ("gate1", "gate2"),
                    lambda args, out: (args[1], out))
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(augment, "augment_batch", views)
    mp.setattr(models, "gumbel_sigmoid_probs", noise)
    # gate_mask looks the noisy gate up in this table, filled at import.
    mp.setitem(models._NOISY_GATES, "gumbel_sigmoid", noise)  # pylint: disable=protected-access
    setup = train.build(config, mesh)
    state = train.init_state(setup, jax.random.key(0))
    step = train.make_train_step(setup)
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (BATCH, SIZE, SIZE, 1), np.uint8)
    # Both views get the SAME crops: any difference between the augmented
    # views comes from the device-side augmentation keys.
    batch = sharding.make_global_batch(
        {"view1": crops, "view2": crops.copy(),
         "label": (np.arange(BATCH) % 10).astype(np.int32)}, mesh)
    key = jax.random.key(1)
    records, metrics = [], []

    def run(state):
      views.current = noise.current = record = {}
      state, m = step(state, batch, key)
      jax.block_until_ready(m)
      jax.effects_barrier()
      # Both views' gate calls, rows in the order of the 2B-row batch.
      calls = [record.pop(t) for t in ("gate1", "gate2") if t in record]
      record["gate"] = tuple(np.concatenate(parts) for parts in zip(*calls))
      records.append(record)
      metrics.append(jax.device_get(m))
      return state

    state1 = run(state)                       # step 0
    saved = jax.device_get(state1)            # the "checkpoint" of step 1
    run(state1)                               # step 1
    restored = jax.device_put(saved, setup.state_sharding)
    run(restored)                             # step 1, resumed
  assert int(saved.step) == 1
  return {"config": config, "records": records, "metrics": metrics}


def _gumbel_noise(record):
  """g of the noisy probabilities sigmoid((a + g) / τ) of one step."""
  logits, noisy = record["gate"]
  p = np.clip(noisy.astype(np.float64), 1e-12, 1 - 1e-12)
  return np.log(p / (1 - p)) * GATE_TEMPERATURE - logits


@pytest.mark.slow
@needs_fmnist
def test_consecutive_steps_draw_new_augmentations_and_gate_noise(steps):
  step0, step1, _ = steps["records"]
  for view in ("view1", "view2"):
    a, b = step0[view][0], step1[view][0]
    assert a.shape == (BATCH, SIZE, SIZE, 1)
    # Every image is re-augmented: no image keeps its step-0 view.
    per_image = np.abs(a - b).reshape(BATCH, -1).max(axis=1)
    assert np.all(per_image > 1e-3), (view, per_image)
  g0, g1 = _gumbel_noise(step0), _gumbel_noise(step1)
  assert g0.shape == (2 * BATCH, 8)
  # Fresh noise for (nearly) every gate; one reused key gives g0 == g1.
  assert np.mean(np.abs(g0 - g1) > 1e-3) > 0.9


@pytest.mark.slow
@needs_fmnist
def test_the_two_views_of_an_image_get_different_augmentations(steps):
  for record in steps["records"][:2]:
    v1, v2 = record["view1"][0], record["view2"][0]
    per_image = np.abs(v1 - v2).reshape(BATCH, -1).max(axis=1)
    assert np.all(per_image > 1e-3), per_image


@pytest.mark.slow
@needs_fmnist
def test_a_resumed_step_redraws_exactly_the_same_randomness(steps):
  _, step1, resumed = steps["records"]
  for tag in ("view1", "view2", "gate"):
    for a, b in zip(step1[tag], resumed[tag]):
      np.testing.assert_array_equal(a, b, err_msg=tag)
  m1, m1_resumed = steps["metrics"][1:]
  assert m1.keys() == m1_resumed.keys()
  for k in m1:
    np.testing.assert_array_equal(m1[k], m1_resumed[k], err_msg=k)


@pytest.mark.slow
@needs_fmnist
def test_step_loss_holds_the_kl_term_at_its_weight(steps):
  for m in steps["metrics"]:
    kl_term = float(m["loss"]) - float(m["nce"]) - float(m["online_ce"])
    assert float(m["kl"]) > 0.1
    # λ·KL is ~0.5 here; float32 rounding of a loss of ~5 is ~1e-6.
    np.testing.assert_allclose(kl_term, KL_WEIGHT * float(m["kl"]),
                               rtol=0, atol=1e-5)


@pytest.mark.slow
@needs_fmnist
def test_step_gate_open_rate_is_the_sampled_mask(steps):
  for record, m in zip(steps["records"], steps["metrics"]):
    logits, noisy = record["gate"]
    sampled = np.mean(noisy > GATE_THRESHOLD)
    np.testing.assert_allclose(m["gate_open_rate"], sampled, rtol=0,
                               atol=1e-7)
    # The test can fail: the deterministic gate and a 0.5 threshold differ.
    deterministic = 1 / (1 + np.exp(-logits.astype(np.float64)
                                    / GATE_TEMPERATURE))
    # (At least one of the 2·8·8 gates differs in each case.)
    for other in (deterministic > GATE_THRESHOLD, noisy > 0.5,
                  deterministic > 0.5):
      assert abs(sampled - np.mean(other)) > 1 / 256


# ----------------------------------------------------------------------------
# The loss function itself, at the configs' λ and at the threshold.
# ----------------------------------------------------------------------------
def _outputs(rng, n=4, d=6, c=3):
  z = models.l2_normalize(jnp.asarray(rng.normal(size=(2 * n, d)),
                                      jnp.float32))
  probs = jnp.asarray(rng.uniform(0.05, 0.95, (2 * n, d)), jnp.float32)
  return {"z": z, "logits": jnp.asarray(rng.normal(size=(2 * n, c)),
                                        jnp.float32),
          "gate_probs": probs,
          "gate_mask": jnp.asarray(rng.uniform(size=(2 * n, d)) < 0.3,
                                   jnp.float32)}


def test_kl_term_at_the_default_weight_to_absolute_precision():
  """At λ = 3e-5 the KL term is ~1e-4 of a loss of ~4: checked to 2e-6."""
  rng = np.random.default_rng(0)
  out = _outputs(rng)
  labels = jnp.array([0, 1, 2, 1])
  lam = config_lib.base_config().gate.kl_weight
  assert lam == 3e-5
  loss, m = losses.total_loss(out, labels, method="bayesncl", temperature=0.2,
                              kl_weight=lam, prior_prob=0.8)
  kl = float(losses.bernoulli_kl(out["gate_probs"], 0.8))
  assert lam * kl > 5e-5   # half of it is far above float32 rounding (~5e-7)
  np.testing.assert_allclose(float(loss) - float(m["nce"])
                             - float(m["online_ce"]), lam * kl, rtol=0,
                             atol=2e-6)
  np.testing.assert_allclose(m["kl"], kl, rtol=1e-6)


def test_gate_open_rate_counts_the_sampled_mask_not_the_probabilities():
  rng = np.random.default_rng(1)
  out = _outputs(rng)
  _, m = losses.total_loss(out, jnp.array([0, 1, 2, 1]), method="bayesncl",
                           temperature=0.2, kl_weight=3e-5, prior_prob=0.8)
  want = float(np.mean(np.asarray(out["gate_mask"])))
  np.testing.assert_allclose(m["gate_open_rate"], want, rtol=1e-6)
  assert abs(want - float(np.mean(np.asarray(out["gate_probs"]) > 0.5))
             ) > 0.1


def test_training_sparsity_uses_the_1e_5_threshold():
  # Rows of z with entries at 1e-4 (active) and 1e-6 (zero).
  z = jnp.array([[1e-4, 1e-6, 0.0, 1.0],
                 [1e-6, 1e-6, 1e-6, 1e-6],
                 [1e-4, -1e-4, 1e-4, 1e-4],
                 [0.0, 0.5, 0.0, -1e-6]], jnp.float32)
  out = {"z": z, "logits": jnp.zeros((4, 3))}
  _, m = losses.total_loss(out, jnp.array([0, 1]), method="ncl",
                           temperature=0.2)
  # Zeros: 2 + 4 + 0 + 3 of 16.
  np.testing.assert_allclose(m["sparsity"], 9 / 16, rtol=1e-6)
  assert losses.ZERO_TOL == 1e-5
