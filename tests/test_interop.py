"""The checkpoint converter: names, layouts, architecture, CLI, bad input.

Reference models are `torch_reference.ResNet` / `SoloModel`: torchvision's
module names and init, solo-learn's head names.
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bayesncl_jax import augment  # noqa: E402
from bayesncl_jax import config_lib  # noqa: E402
from bayesncl_jax import convert  # noqa: E402
from bayesncl_jax import datasets  # noqa: E402
from bayesncl_jax import evaluate  # noqa: E402
from bayesncl_jax import input_pipeline  # noqa: E402
from bayesncl_jax import models  # noqa: E402
from bayesncl_jax import sharding  # noqa: E402
from bayesncl_jax import train  # noqa: E402
from bayesncl_jax.interop import torch_checkpoint as tc  # noqa: E402

import torch_reference as tr  # noqa: E402  pylint: disable=g-bad-import-order

ROOT = pathlib.Path(__file__).resolve().parent.parent
FMNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not FMNIST.exists(), reason="apt-get install -y dataset-fashion-mnist")
TOL = 1e-4


def rel_diff(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _randomise_bn(model, seed=0):
  """Non-trivial BN affine parameters and running statistics."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        n = m.num_features
        m.weight.copy_(1 + 0.2 * torch.randn(n, generator=g))
        m.bias.copy_(0.1 * torch.randn(n, generator=g))
        m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
        m.running_var.copy_(0.5 + torch.rand(n, generator=g))
        m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,),
                                                      generator=g)))


def _numpy_state(state_dict):
  return {k: v.detach().numpy().copy() for k, v in state_dict.items()}


def _fmnist_config(**overrides):
  base = {"model.width": 4, "model.stage_sizes": (1,),
          "model.proj_hidden": 32, "model.proj_out": 16,
          "optim.batch_size": 32, "dataset.max_train_examples": 256,
          "progress_bar": False, "log_every": 1, "ckpt_every": 1}
  return config_lib.load_file(ROOT / "configs" / "fashion_mnist.py",
                              "method=ncl", {**base, **overrides})


def _one_device_mesh():
  # Orbax saves an array replicated over 8 devices in 8 slices, with an
  # eager slice op each: seconds for a ResNet-18. The importer runs on
  # whatever devices it is given; one is enough here.
  return sharding.make_mesh(jax.devices()[:1])


def _target(config):
  model = models.model_from_config(config)
  s, c = config.dataset.image_size, len(config.dataset.mean)
  return model, jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((2, s, s, c)), train=False))


def _run_cli(*args, timeout=300):
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  return subprocess.run([sys.executable, "-m", "bayesncl_jax.convert", *args],
                        cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)


# ----------------------------------------------------------------------------
# Names, layouts, architecture inference.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("block,layers,cifar,channels,heads", [
    ("basic", (2, 2, 2, 2), True, 3, "gate"),       # ResNet-18, BayesNCL
    ("bottleneck", (3, 4, 6, 3), False, 3, "none"),  # ResNet-50 .pth
    ("basic", (3, 4, 6, 3), True, 1, "ncl"),         # ResNet-34 layout
])
def test_architecture_is_inferred_and_names_round_trip(block, layers, cifar,
                                                       channels, heads):
  torch.manual_seed(0)
  backbone = tr.ResNet(block, layers, width=4, in_channels=channels,
                       cifar=cifar)
  _randomise_bn(backbone)
  if heads == "none":  # a torchvision state_dict, with its ImageNet fc.
    sd = backbone.state_dict()
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(1000, 64), torch.zeros(1000)
    ckpt = tc.from_object(sd)
    assert ckpt.kind == "torchvision" and ckpt.dropped == ["fc.weight",
                                                           "fc.bias"]
  else:
    sd = tr.SoloModel(backbone, 24, 12, 7, gate=heads == "gate").state_dict()
    ckpt = tc.from_object({"state_dict": sd, "epoch": 3})
    assert ckpt.kind == "solo-learn" and ckpt.extra == {"epoch": 3}
  arch = tc.infer_architecture(ckpt)
  expansion = 4 if block == "bottleneck" else 1
  assert arch.backbone == ("resnet50" if block == "bottleneck"
                           else "resnet18")
  assert arch.stage_sizes == layers and arch.width == 4
  assert arch.stem == ("cifar" if cifar else "imagenet")
  assert arch.in_channels == channels
  assert arch.feature_dim == 4 * 8 * expansion
  if heads == "none":
    assert (arch.proj_hidden, arch.num_classes, arch.gate_layers) == (
        None, None, 0)
  else:
    assert (arch.proj_hidden, arch.proj_out, arch.num_classes) == (24, 12, 7)
    assert arch.gate_layers == (2 if heads == "gate" else 0)

  # The Flax model the config describes has exactly these tensors.
  config = config_lib.base_config()
  config.method = "bayesncl" if heads == "gate" else "ncl"
  config.dataset.num_classes = 7
  config.dataset.mean, config.dataset.std = (0.5,) * channels, (0.5,) * (
      channels)
  convert.configure(config, arch, ckpt)
  config_lib.validate(config)
  _, target = _target(config)
  params, stats, _ = tc.to_flax(ckpt, arch, target)
  # Layouts: conv OIHW -> HWIO, Linear (out, in) -> (in, out).
  w = ckpt.groups["backbone"]["layer2.0.conv2.weight"]
  k = params["backbone"][("BottleneckBlock_" if expansion == 4 else
                          "BasicBlock_") + str(layers[0])]["Conv_1"]["kernel"]
  assert k[2, 0, 1, 3] == w[3, 1, 2, 0]
  if heads != "none":
    assert params["projector"]["Dense_1"]["kernel"][5, 2] == (
        ckpt.groups["projector"]["2.weight"][2, 5])
  # Every leaf of the Flax model is filled (heads absent from a .pth are
  # left to the importer's fresh init).
  for coll, tree in (("params", params), ("batch_stats", stats)):
    want = {jax.tree_util.keystr(p) for p, _ in
            jax.tree_util.tree_leaves_with_path(target[coll])
            if heads != "none" or p[0].key == "backbone"}
    got = {jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_leaves_with_path(tree)}
    assert got == want, coll

  # Back to torch: the same names, bit for bit, counters included.
  counts = tc.num_batches_tracked(ckpt, arch)
  back = tc.to_torch(arch, params, stats, counts, solo_names=heads != "none")
  original = {k: v.numpy() for k, v in sd.items() if not k.startswith("fc.")}
  assert list(back) == list(original)  # torch's order too
  for name, value in back.items():
    assert value.dtype == original[name].dtype, name
    np.testing.assert_array_equal(value, original[name], err_msg=name)


@pytest.mark.slow
def test_imagenet_stem_bottleneck_forward_matches_torch():
  """Eval-mode forward of a ResNet-50-style net: stride-2 3x3 convs pad
  (1, 1) as torch does, the 7x7 stem and the max-pool too."""
  torch.manual_seed(1)
  net = tr.ResNet("bottleneck", (1, 2), width=4, in_channels=3, cifar=False)
  _randomise_bn(net)
  net.eval()
  ckpt = tc.from_object(net.state_dict())
  arch = tc.infer_architecture(ckpt)
  jnet = models.ResNet(arch.backbone, arch.width, arch.stem,
                       arch.stage_sizes)
  x = np.random.default_rng(0).normal(size=(4, 30, 30, 3)).astype(np.float32)
  target = jax.eval_shape(lambda: jnet.init(jax.random.key(0), x,
                                            train=False))
  params, stats, _ = tc.to_flax(
      ckpt, arch, {"params": {"backbone": target["params"]},
                   "batch_stats": {"backbone": target["batch_stats"]}})
  h = jnet.apply({"params": params["backbone"],
                  "batch_stats": stats["backbone"]}, x, train=False)
  with torch.no_grad():
    want = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  diff = rel_diff(h, want)
  print(f"\nImageNet stem + bottlenecks, eval mode: max relative difference "
        f"of features JAX vs torch = {diff:.2e}")
  assert diff < TOL


# ----------------------------------------------------------------------------
# Bad input: one clear message each, nothing written.
# ----------------------------------------------------------------------------
def _tiny_solo_state(channels=1, classes=10):
  torch.manual_seed(0)
  return tr.SoloModel(tr.ResNet("basic", (1,), 4, channels), 32, 16, classes,
                      gate=False).state_dict()


def _assert_nothing_written(tmp_path, workdir):
  assert not workdir.exists()
  assert not [p for p in tmp_path.iterdir() if ".importing-" in p.name]


@pytest.mark.parametrize("edit,match", [
    (lambda sd: sd.pop("backbone.layer1.0.bn2.running_var"),
     r"missing \(1\):\n    backbone.layer1.0.bn2.running_var"),
    (lambda sd: sd.update({"backbone.layer1.0.extra.weight": torch.zeros(3),
                           "momentum_backbone.conv1.weight": torch.zeros(3)}),
     r"unexpected \(2\):\n    backbone.layer1.0.extra.weight\n    "
     r"momentum_backbone.conv1.weight"),
    (lambda sd: sd.update({"projector.2.bias": torch.zeros(15),
                           "backbone.layer1.0.conv2.weight":
                               torch.zeros(4, 4, 5, 5)}),
     r"wrong shape \(2\):\n    backbone.layer1.0.conv2.weight: \(4, 4, 5, 5\)"
     r" in the checkpoint, \(4, 4, 3, 3\) expected\n    projector.2.bias: "
     r"\(15,\) in the checkpoint, \(16,\) expected"),
    (lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("backbone.")],
     r"no backbone.conv1.weight, so this is not a torchvision-style ResNet"),
], ids=["missing", "unexpected", "wrong_shape", "no_backbone"])
def test_bad_tensors_are_listed_and_nothing_is_written(edit, match,
                                                        tmp_path):
  sd = _tiny_solo_state()
  edit(sd)
  path = tmp_path / "bad.ckpt"
  torch.save({"state_dict": sd}, path)
  workdir = tmp_path / "wd"
  with pytest.raises(tc.TensorMismatchError, match=match):
    convert.import_checkpoint(str(path), str(workdir), _fmnist_config(),
                              log=lambda _: None)
  _assert_nothing_written(tmp_path, workdir)


def test_config_conflicts_are_explained(tmp_path):
  path = tmp_path / "ncl.ckpt"
  torch.save({"state_dict": _tiny_solo_state()}, path)
  cases = [(_fmnist_config(), {"method": "bayesncl"}, "no gating_head"),
           (_fmnist_config(), {"dataset.num_classes": 7},
            "classifier has 10 classes but config.dataset.num_classes=7"),
           (_fmnist_config(), {"dataset.mean": (0.5, 0.5, 0.5),
                               "dataset.std": (0.5, 0.5, 0.5)},
            "stem takes 1 input channel")]
  for config, overrides, match in cases:
    config.update_from_flattened_dict(overrides)
    with pytest.raises(tc.InteropError, match=match):
      convert.import_checkpoint(str(path), str(tmp_path / "wd"), config,
                                log=lambda _: None)
  # An occupied workdir is refused before anything is converted.
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "keep.txt").write_text("mine")
  with pytest.raises(tc.InteropError, match="exists and is not empty"):
    convert.import_checkpoint(str(path), str(tmp_path / "full"),
                              _fmnist_config(), log=lambda _: None)
  assert os.listdir(tmp_path / "full") == ["keep.txt"]


def test_not_a_torch_file_is_one_clear_error(tmp_path):
  for name, content in (("notes.ckpt", b"just some text\n"),
                        ("empty.pth", b"")):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(tc.NotATorchFileError, match="is not a PyTorch "
                       "checkpoint"):
      tc.read_checkpoint(str(path))
  np.save(tmp_path / "array.npy", np.zeros(3))
  with pytest.raises(tc.NotATorchFileError):
    tc.read_checkpoint(str(tmp_path / "array.npy"))
  with pytest.raises(tc.InteropError, match="No such checkpoint file"):
    tc.read_checkpoint(str(tmp_path / "absent.ckpt"))
  workdir = tmp_path / "wd"
  with pytest.raises(tc.NotATorchFileError):
    convert.import_checkpoint(str(tmp_path / "notes.ckpt"), str(workdir),
                              _fmnist_config(), log=lambda _: None)
  _assert_nothing_written(tmp_path, workdir)


# ----------------------------------------------------------------------------
# End to end: the authors' .ckpt -> CLI -> evaluate report -> more training.
# ----------------------------------------------------------------------------
@pytest.mark.slow
@needs_fmnist
def test_authors_style_ckpt_imports_with_the_cli_and_evaluates(tmp_path):
  # Written the way Lightning does: weights under "state_dict", beside the
  # run's bookkeeping and hyper_parameters (here an argparse.Namespace,
  # which torch's safe loader refuses).
  sd = _tiny_solo_state()
  path = tmp_path / "simclr-ncl-epoch=199.ckpt"
  torch.save({"epoch": 199, "global_step": 39000,
              "pytorch-lightning_version": "2.0.0", "state_dict": sd,
              "hyper_parameters": argparse.Namespace(method="ncl"),
              "optimizer_states": [], "lr_schedulers": []}, path)
  workdir = tmp_path / "imported"
  args = [f"--from_torch={path}", f"--workdir={workdir}",
          "--config=configs/fashion_mnist.py:method=ncl",
          "--config.dataset.max_train_examples=256",
          "--config.optim.batch_size=32"]
  proc = _run_cli(*args)
  assert proc.returncode == 2 and "--allow_pickle" in proc.stderr, (
      proc.stderr[-2000:])
  assert "argparse.Namespace" in proc.stderr
  _assert_nothing_written(tmp_path, workdir)

  proc = _run_cli(*args, "--allow_pickle")
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert "stages (1,), width 4, 1 input channel(s), features 4" in out
  assert "stem padding 2 (from the config: torch checkpoints do not record" \
      in out
  assert "method       ncl (from the config)" in out
  assert sorted(p.name for p in workdir.iterdir()) == [
      "checkpoints", "config.json", "imported_from.json"]

  # bayesncl_jax.evaluate reads it like one of our runs.
  options = evaluate.EvalOptions(
      protocols=("knn", "interp"), max_examples=128, batch_size=64,
      out_dir=str(tmp_path / "eval"))
  report = evaluate.evaluate(str(workdir), options)
  assert json.loads((tmp_path / "eval" / "report.json").read_text()) == (
      report)
  assert report["method"] == "ncl" and report["step"] == 0
  for key in ("knn_top1", "sparsity", "active_dims", "semantic_consistency"):
    assert np.isfinite(report[key]), key
  assert (tmp_path / "eval" / "report.md").stat().st_size > 0

  # bayesncl_jax.main resumes from it: the same restore of state and data
  # position that train_and_evaluate does before its loop.
  config = train.load_config(str(workdir))
  setup = train.build(config)
  mngr = train.checkpoint_manager(str(workdir), config)
  data_iter = input_pipeline.create_pretrain_iterator(config)
  try:
    state = train.restore_checkpoint(mngr, setup, data_iter)
    assert data_iter.get_state()["next_batch"] == 0
    assert next(data_iter)["view1"].shape == (32, 28, 28, 1)
  finally:
    data_iter.close()
    mngr.close()
  assert int(state.step) == 0
  np.testing.assert_array_equal(
      state.params["backbone"]["stem_conv"]["kernel"],
      sd["backbone.conv1.weight"].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      state.batch_stats["backbone"]["BasicBlock_0"]["BatchNorm_1"]["var"],
      sd["backbone.layer1.0.bn2.running_var"].numpy())


# ----------------------------------------------------------------------------
# Real Fashion-MNIST: features equal torch's, export unchanged.
# ----------------------------------------------------------------------------
def _fmnist_images(split, n):
  config = _fmnist_config()
  source = datasets.get_source(config.dataset, split)
  return np.stack([source[i]["image"] for i in range(n)])


@pytest.mark.slow
@needs_fmnist
def test_fashion_mnist_features_match_torch_and_export_round_trips(tmp_path):
  config = _fmnist_config(**{"model.stage_sizes": ()})  # full ResNet-18.
  mean, std = config.dataset.mean, config.dataset.std
  torch.manual_seed(3)
  ref = tr.SoloModel(tr.ResNet("basic", (2, 2, 2, 2), width=8,
                               in_channels=1, cifar=True, stem_padding=2),
                     32, 16, 10, gate=False)
  # Realistic BN statistics: a few training-mode passes over real images.
  train_x = np.asarray(augment.normalize(_fmnist_images("train", 192), mean,
                                         std))
  ref.train()
  with torch.no_grad():
    for batch in np.split(train_x, 3):
      ref.backbone(torch.from_numpy(batch.transpose(0, 3, 1, 2).copy()))
  ref.eval()
  original = _numpy_state(ref.state_dict())
  path = tmp_path / "resnet18_fmnist.ckpt"
  torch.save({"state_dict": ref.state_dict()}, path)

  workdir = tmp_path / "wd"
  lines = []
  record = convert.import_checkpoint(str(path), str(workdir), config,
                                     log=lines.append,
                                     mesh=_one_device_mesh())
  assert record["architecture"]["stage_sizes"] == [2, 2, 2, 2]
  assert any("ResNet-18" in line for line in lines)
  assert record["num_batches_tracked"]["layer4.1.bn2"] == 3

  # Backbone features of real test images, through evaluate's extraction.
  setup, state = evaluate.load_state(str(workdir))
  assert setup.config.model.stage_sizes == ()
  n = 64
  feats = evaluate.extract_features(setup, state, "test", batch_size=64,
                                    max_examples=n)
  test_x = augment.normalize(_fmnist_images("test", n), mean, std)
  with torch.no_grad():
    want = ref.backbone(torch.from_numpy(
        np.asarray(test_x).transpose(0, 3, 1, 2).copy())).numpy()
  diff = rel_diff(feats["h"], want)
  print(f"\nFashion-MNIST test images, ResNet-18 width 8: max relative "
        f"difference of backbone features JAX vs torch = {diff:.2e}")
  assert diff < TOL

  # Export: the original tensors, bit for bit, counters included.
  out = tmp_path / "out" / "exported.ckpt"
  convert.export_checkpoint(str(workdir), str(out), log=lambda _: None)
  exported = torch.load(out, weights_only=True)
  assert exported["global_step"] == 0
  assert exported[convert.EXPORT_KEY]["stem_padding"] == 2
  got = _numpy_state(exported["state_dict"])
  assert list(got) == list(original)
  for name in original:
    assert got[name].dtype == original[name].dtype, name
    np.testing.assert_array_equal(got[name], original[name], err_msg=name)
  backbone = _numpy_state(torch.load(convert.backbone_path(str(out)),
                                     weights_only=True))
  fresh = tr.ResNet("basic", (2, 2, 2, 2), 8, 1, cifar=True)
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in
                         backbone.items()})  # strict: names all match.

  # ... and importing the export gives the same state, bit for bit.
  again = tmp_path / "wd_again"
  convert.import_checkpoint(str(out), str(again), config, log=lambda _: None,
                            mesh=_one_device_mesh())
  _, _, params1, stats1 = convert.restore_trees(str(workdir))
  _, _, params2, stats2 = convert.restore_trees(str(again))
  for a, b in ((params1, params2), (stats1, stats2)):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(x, y)


@needs_fmnist
def test_export_of_a_corrupted_checkpoint_is_refused(tmp_path):
  # pylint: disable-next=g-import-not-at-top
  from test_faults import run, tiny_config
  workdir = tmp_path / "run"
  run(tiny_config(**{"optim.total_steps": 2}), workdir)
  step_dir = workdir / "checkpoints" / "2"
  assert (workdir / "checkpoints" / "2.manifest.json").exists()   # sealed
  # The export of the intact checkpoint works ...
  convert.export_checkpoint(str(workdir), str(tmp_path / "ok.ckpt"),
                            log=lambda _: None)
  # ... 64 bytes of its largest array file inverted (same size) make it
  # refused with the integrity check's message, nothing written.
  victim = max((p for p in (step_dir / "state").rglob("*")
                if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)
  data = bytearray(victim.read_bytes())
  mid = len(data) // 2
  data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
  victim.write_bytes(bytes(data))
  rel = str(victim.relative_to(step_dir))
  with pytest.raises(train.CheckpointError,
                     match=f"step 2 .* is corrupt: {rel}.*nothing was "
                           "exported"):
    convert.export_checkpoint(str(workdir), str(tmp_path / "bad.ckpt"))
  proc = subprocess.run(
      [sys.executable, "-m", "bayesncl_jax.convert",
       f"--to_torch={tmp_path / 'bad.ckpt'}", f"--workdir={workdir}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2, proc.stderr
  assert "is corrupt" in proc.stderr and "Traceback" not in proc.stderr
  assert not (tmp_path / "bad.ckpt").exists()
