"""Pins config -> model plumbing: every config field reaches the model.

The gate's temperature, threshold and eval mode are tested on the pure
function `models.gate_mask`; here they go in through a config, and the model
that `models.model_from_config` (what `train.build` uses) makes from it is
checked field by field and by what it computes.
"""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bayesncl_jax import config_lib
from bayesncl_jax import models
from bayesncl_jax import sharding
from bayesncl_jax import train

ROOT = pathlib.Path(__file__).resolve().parent.parent
FMNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")

# Every value differs from its default and from the other fields' values.
FIELDS = {
    "dataset.num_classes": 7, "model.backbone": "resnet50",
    "model.width": 4, "model.stem": "imagenet", "model.stage_sizes": (1, 2),
    "model.proj_hidden": 12, "model.proj_out": 6,
    "model.non_neg": "softplus", "model.dtype": "bfloat16",
    "gate.type": "ste", "gate.temperature": 0.3, "gate.threshold": 0.6,
    "gate.eval_mode": "soft",
}


def _config(method, **overrides):
  config = config_lib.base_config()
  config.method = method
  config.update_from_flattened_dict({**FIELDS, **overrides})
  return config


@pytest.mark.parametrize("method", ["cl", "ncl", "bayesncl"])
def test_model_from_config_copies_every_field(method):
  model = models.model_from_config(_config(method))
  assert isinstance(model, models.ContrastiveModel)
  assert (model.method, model.num_classes, model.backbone, model.width,
          model.stem, tuple(model.stage_sizes), model.proj_hidden,
          model.proj_out, model.non_neg, model.gate_type,
          model.gate_temperature, model.gate_threshold,
          model.gate_eval_mode, jnp.dtype(model.dtype)) == (
              method, 7, "resnet50", 4, "imagenet", (1, 2), 12, 6,
              "softplus", "ste", 0.3, 0.6, "soft", jnp.dtype("bfloat16"))
  # () = the backbone's standard depth; an explicit argument overrides.
  assert models.model_from_config(
      _config(method, **{"model.stage_sizes": ()})).stage_sizes is None
  assert tuple(models.model_from_config(_config(method), stage_sizes=(3,))
               .stage_sizes) == (3,)


@pytest.mark.skipif(not FMNIST.exists(),
                    reason="apt-get install -y dataset-fashion-mnist")
def test_train_build_uses_the_config_model():
  config = config_lib.load_file(ROOT / "configs" / "fashion_mnist.py",
                                "method=ncl", {"model.width": 4,
                                               "gate.temperature": 0.3})
  setup = train.build(config, sharding.make_mesh(jax.devices()[:1]))
  assert setup.model == models.model_from_config(config)


def _gate_config(eval_mode, gate_type="ste"):
  return _config("bayesncl", **{
      "model.backbone": "resnet18", "model.stem": "cifar",
      "model.stage_sizes": (1,), "model.proj_hidden": 16,
      "model.proj_out": 32, "model.non_neg": "relu",
      "model.dtype": "float32", "gate.type": gate_type,
      "gate.eval_mode": eval_mode})


def _run(config, train_mode):
  """(outputs, gate-head logits a) of the config's model on 16 images."""
  model = models.model_from_config(config)
  x = jax.random.normal(jax.random.key(0), (16, 8, 8, 1))
  variables = model.init(jax.random.key(1), x, train=False)
  out = model.apply(variables, x, train=train_mode,
                    mutable=["batch_stats"] if train_mode else False)
  out = out[0] if train_mode else out
  a = model.apply(variables, out["h"],
                  method=lambda m, h: m.gate_head(h))
  return jax.device_get(out), np.asarray(a, np.float64)


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


@pytest.mark.parametrize("train_mode", [False, True])
def test_config_gate_temperature_and_threshold_reach_the_model(train_mode):
  out, a = _run(_gate_config("hard"), train_mode)
  p = _sigmoid(a / 0.3)
  np.testing.assert_allclose(out["gate_probs"], p, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out["gate_mask"], p > 0.6)
  # The test can fail: τ = 1 and a threshold of 0.5 give other gates.
  assert np.any((p > 0.6) != (p > 0.5))
  assert np.any((_sigmoid(a) > 0.6) != (p > 0.6))
  # And the mask is what multiplies z.
  closed = out["gate_mask"] == 0
  assert np.all(out["z"][closed] == 0) and np.any(closed)


def test_config_soft_eval_mode_reaches_the_model():
  out, a = _run(_gate_config("soft"), train_mode=False)
  p = _sigmoid(a / 0.3)
  np.testing.assert_allclose(out["gate_mask"], p, rtol=1e-5, atol=1e-6)
  # Training is unaffected: the straight-through hard mask.
  out, a = _run(_gate_config("soft"), train_mode=True)
  np.testing.assert_array_equal(out["gate_mask"], _sigmoid(a / 0.3) > 0.6)
