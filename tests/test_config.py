"""Config files load, parse their argument, and bad values fail clearly."""
import pathlib

import pytest

from bayesncl_jax import config_lib

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"
CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.py"))


def load(name, arg=None):
  return config_lib.load_file(CONFIG_DIR / f"{name}.py", arg)


def test_all_four_configs_exist():
  assert set(CONFIGS) == {"fashion_mnist", "cifar10", "cifar100",
                          "imagenet100", "fashion_mnist_backgrounds"}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("method", config_lib.METHODS)
def test_configs_are_valid_for_every_method(name, method):
  config = load(name, f"method={method}")
  assert config.method == method
  config_lib.validate(config, num_devices=8)
  doc = (CONFIG_DIR / f"{name}.py").read_text()
  assert "python -m bayesncl_jax.main --config=configs/" in doc


def test_authors_hyperparameters():
  c10, in100 = load("cifar10"), load("imagenet100")
  assert (c10.optim.base_lr, c10.optim.batch_size, c10.optim.epochs) == (
      0.4, 256, 200)
  assert (c10.model.proj_hidden, c10.model.proj_out, c10.model.non_neg) == (
      2048, 256, "rep_relu")
  assert (in100.optim.base_lr, in100.optim.batch_size, in100.optim.epochs) == (
      0.3, 128, 100)
  assert (in100.model.proj_hidden, in100.model.proj_out,
          in100.model.non_neg, in100.model.stem) == (16384, 2048, "relu",
                                                     "imagenet")
  for c in (c10, in100):
    # docs/method.md §10 / solo-learn: CIFAR stem pads 2, torchvision/PyTorch init,
    # BatchNorm over each view's batch.
    assert (c.model.stem_padding, c.model.init, c.model.bn_views) == (
        2, "torch", "separate")
    assert c.loss.temperature == 0.2
    assert (c.gate.prior_prob, c.gate.kl_weight, c.gate.lr) == (0.8, 3e-5,
                                                                0.1)
    assert (c.optim.trust_coefficient, c.optim.weight_decay,
            c.optim.momentum) == (0.02, 1e-4, 0.9)


def test_unknown_config_argument():
  with pytest.raises(config_lib.ConfigError, match="Unknown config argument"):
    load("cifar10", "methd=cl")


@pytest.mark.parametrize("field,value,match", [
    ("method", "simclr", "config.method='simclr'.*'cl', 'ncl', 'ncl_topk', "
     "'bayesncl'"),
    ("model.non_neg", "abs", "config.model.non_neg='abs'.*'rep_relu'"),
    ("gate.type", "concrete", "config.gate.type='concrete'.*'ste'"),
    ("gate.temperature", 0.0, "config.gate.temperature=0.0 must be > 0"),
    ("loss.temperature", -0.1, "config.loss.temperature=-0.1 must be > 0"),
    ("gate.prior_prob", 1.0, "config.gate.prior_prob=1.0 must be strictly"),
    ("aug.grayscale_prob", 1.5, "config.aug.grayscale_prob=1.5 must be a "
     "probability"),
    ("aug.crop_scale", (0.5, 0.2), "config.aug.crop_scale"),
    ("model.dtype", "float16", "config.model.dtype='float16'"),
    ("dataset.name", "mnist", "config.dataset.name='mnist'"),
    ("model.stage_sizes", (1, 0), "config.model.stage_sizes"),
    ("model.stem_padding", 3, r"config.model.stem_padding=3 .*0, 1, 2"),
    ("model.init", "xavier", "config.model.init='xavier'.*'torch', 'flax'"),
    ("model.bn_views", "both", "config.model.bn_views='both'.*'separate', "
     "'joint'"),
    ("model.conv_impl", "cudnn", "config.model.conv_impl='cudnn'.*'auto', "
     "'xla', 'per_tap', 'im2col'"),
])
def test_bad_values_name_field_and_fix(field, value, match):
  config = config_lib.base_config()
  *parents, leaf = field.split(".")
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(config)


def test_batch_not_divisible_by_devices():
  config = config_lib.base_config()
  config.optim.batch_size = 100
  with pytest.raises(config_lib.ConfigError,
                     match="batch_size=100 is not divisible by the 8 devices"
                     ".*batch_size=96"):
    config_lib.validate(config, num_devices=8)
  config_lib.validate(config, num_devices=4)


def test_json_round_trip():
  config = load("fashion_mnist", "method=ncl")
  again = config_lib.from_dict(config.to_dict())
  assert again.to_dict() == config.to_dict()
  assert isinstance(again.dataset.mean, tuple)


@pytest.mark.parametrize("name", CONFIGS)
def test_variant_arguments_set_their_fields(name):
  base = load(name)
  assert (base.gate.type, base.gate.train_mode, base.gate.isolate,
          base.gate.depth) == ("gumbel_sigmoid", "hard", True, 2)
  c = load(name, "method=bayesncl,gate=ste,soft_gate,no_isolation,"
           "gate_depth=3")
  assert (c.method, c.gate.type, c.gate.train_mode, c.gate.isolate,
          c.gate.depth) == ("bayesncl", "ste", "soft", False, 3)
  assert c.gate.eval_mode == "hard"  # the authors' evaluation thresholds.
  config_lib.validate(c, num_devices=8)
  c = load(name, "method=ncl_topk,top_k=5")
  assert (c.method, c.model.top_k) == ("ncl_topk", 5)
  config_lib.validate(c, num_devices=8)
  # The file's own k is a valid default (proj_out / 8).
  assert base.model.top_k == base.model.proj_out // 8
  for gate in config_lib.GATE_TYPES:
    c = load(name, f"gate={gate}")
    assert c.gate.type == gate
    config_lib.validate(c, num_devices=8)


@pytest.mark.parametrize("arg,match", [
    ("gate_depth=two", "gate_depth='two' must be of type int"),
    ("soft_gate=maybe", "soft_gate='maybe' must be a boolean"),
    ("gates=ste", "Unknown config argument 'gates'"),
])
def test_bad_variant_arguments(arg, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    load("fashion_mnist", arg)


def test_bad_variant_values_fail_validation():
  with pytest.raises(config_lib.ConfigError,
                     match="config.gate.type='gumbel'.*'gumbel_authors'"):
    config_lib.validate(load("fashion_mnist", "gate=gumbel"))
  with pytest.raises(config_lib.ConfigError,
                     match="config.method='topk'.*'ncl_topk'"):
    config_lib.validate(load("fashion_mnist", "method=topk"))


@pytest.mark.parametrize("field,value,match", [
    ("gate.train_mode", "sampled", "config.gate.train_mode='sampled'.*'soft'"),
    ("gate.depth", 0, "config.gate.depth=0 must be an integer >= 1"),
])
def test_bad_gate_ablation_values(field, value, match):
  config = config_lib.base_config()
  config.gate[field.split(".")[1]] = value
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(config)


@pytest.mark.parametrize("k", [0, 65])
def test_top_k_is_checked_for_ncl_topk_only(k):
  config = load("fashion_mnist", "method=ncl_topk")  # proj_out 64
  config.model.top_k = k
  with pytest.raises(config_lib.ConfigError,
                     match=f"config.model.top_k={k} must be an integer in "
                     "1..64"):
    config_lib.validate(config)
  config.method = "ncl"  # the field is not read by other methods.
  config_lib.validate(config)


def test_config_saved_before_new_fields_loads_with_defaults():
  old = load("fashion_mnist", "gate=ste").to_dict()
  for field in ("train_mode", "isolate", "depth"):
    del old["gate"][field]
  del old["model"]["top_k"]
  again = config_lib.from_dict(old)
  assert (again.gate.train_mode, again.gate.isolate, again.gate.depth,
          again.model.top_k) == ("hard", True, 2, 32)
  assert again.gate.type == "ste" and again.model.proj_out == 64  # kept
  config_lib.validate(again)
