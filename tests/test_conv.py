"""bayesncl_jax.conv: the CPU backward formulations equal XLA's gradients."""
import logging
from unittest import mock

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bayesncl_jax import config_lib
from bayesncl_jax import conv
from bayesncl_jax import datasets
from bayesncl_jax import models
from bayesncl_jax import sharding
from bayesncl_jax import train

NHWC = ("NHWC", "HWIO", "NHWC")

# (x shape, kernel, stride, padding) of every kind of convolution the
# encoders run (test_cases_cover_every_model_convolution checks the list),
# at small sizes; odd and even maps for the strided ones.
CASES = [
    # cifar stems: 3x3/1, stem_padding 2, 1 and 0; 1 and 3 channels; 8 and
    # 16 outputs (auto: XLA's dw below 16, per_tap from 16).
    ((2, 9, 9, 3), (3, 3, 3, 16), 1, 2),
    ((2, 9, 9, 1), (3, 3, 1, 8), 1, 2),
    ((2, 8, 8, 3), (3, 3, 3, 8), 1, 1),
    ((2, 8, 8, 3), (3, 3, 3, 16), 1, 0),
    # imagenet stem 7x7/2 pad 3.
    ((2, 12, 12, 3), (7, 7, 3, 8), 2, 3),
    ((2, 11, 11, 3), (7, 7, 3, 8), 2, 3),
    # 3x3/1 and 3x3/2 pad 1 of the blocks.
    ((2, 6, 6, 8), (3, 3, 8, 8), 1, 1),
    ((2, 8, 8, 8), (3, 3, 8, 16), 2, 1),
    ((2, 7, 7, 8), (3, 3, 8, 16), 2, 1),
    # 1x1 shortcuts (stride 2) and bottleneck 1x1 (stride 1).
    ((2, 8, 8, 8), (1, 1, 8, 16), 2, 0),
    ((2, 7, 7, 8), (1, 1, 8, 16), 2, 0),
    ((2, 5, 5, 8), (1, 1, 8, 32), 1, 0),
]
IMPLS = ("auto", "per_tap", "im2col")


def _reference(x, w, stride, pad):
  return jax.lax.conv_general_dilated(x, w, (stride, stride),
                                      [(pad, pad), (pad, pad)],
                                      dimension_numbers=NHWC)


def _ours(impl):
  def f(x, w, stride, pad):
    return conv.conv_general_dilated(x, w, (stride, stride),
                                     [(pad, pad), (pad, pad)],
                                     dimension_numbers=NHWC, impl=impl)
  return f


def _value_and_grads(fn, x, w, dy, stride, pad):
  y, vjp = jax.vjp(lambda x, w: fn(x, w, stride, pad), x, w)
  return (y, *vjp(dy))


def _data(x_shape, w_shape, stride, pad, dtype=jnp.float32):
  kx, kw, ky = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, x_shape).astype(dtype)
  w = jax.random.normal(kw, w_shape).astype(dtype)
  y = _reference(x, w, stride, pad)
  return x, w, jax.random.normal(ky, y.shape).astype(dtype)


def _rel(a, b):
  """max |a - b| / max |b|."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / np.max(np.abs(b))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}/{c[2]}"
                         f"p{c[3]}")
def test_value_dx_dw_equal_xla_float32(case, impl):
  x_shape, w_shape, stride, pad = case
  x, w, dy = _data(*case)
  want = _value_and_grads(_reference, x, w, dy, stride, pad)
  got = jax.jit(_value_and_grads, static_argnums=(0, 4, 5))(
      _ours(impl), x, w, dy, stride, pad)
  for name, g, r in zip(("y", "dx", "dw"), got, want):
    assert g.shape == r.shape and g.dtype == r.dtype, name
    assert _rel(g, r) <= 1e-5, (name, _rel(g, r))


@pytest.mark.parametrize("impl", ["per_tap", "im2col"])
@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[8], CASES[9]],
                         ids=["stem", "imagenet_stem", "3x3s2", "1x1s2"])
def test_bfloat16_within_bf16_rounding(case, impl):
  """bf16 operands: the result is within a few bf16 ulps of the float32
  gradient of the same (bf16-rounded) numbers, as XLA's own bf16 is."""
  x_shape, w_shape, stride, pad = case
  x, w, dy = _data(*case, dtype=jnp.bfloat16)
  exact = _value_and_grads(_reference, *(a.astype(jnp.float32)
                                         for a in (x, w, dy)), stride, pad)
  xla = _value_and_grads(_reference, x, w, dy, stride, pad)
  got = _value_and_grads(_ours(impl), x, w, dy, stride, pad)
  for name, g, e, r in zip(("y", "dx", "dw"), got, exact, xla):
    assert g.dtype == jnp.bfloat16, name
    # 2^-8 is one bf16 ulp relative to the largest entry.
    assert _rel(g, e) <= 2 ** -7, (name, _rel(g, e), _rel(r, e))


def _conv_signatures(module, x):
  """{(kernel hw, strides, padding)} of the conv_general_dilated calls."""
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), x,
                                                 train=False))
  jaxpr = jax.make_jaxpr(lambda v: module.apply(
      v, x, train=True, mutable=["batch_stats"]))(variables)
  return {(eqn.invars[1].aval.shape[:2], tuple(eqn.params["window_strides"]),
           tuple(map(tuple, eqn.params["padding"])))
          for eqn in jaxpr.jaxpr.eqns
          if eqn.primitive.name == "conv_general_dilated"}


def test_cases_cover_every_model_convolution():
  used = set()
  for backbone in ("resnet18", "resnet50"):
    for stem, pads in (("cifar", (0, 1, 2)), ("imagenet", (2,))):
      for pad in pads:
        net = models.ResNet(backbone, 4, stem, (1, 1), stem_padding=pad,
                            conv_impl="xla")
        used |= _conv_signatures(net, jnp.zeros((2, 16, 16, 3)))
  covered = {(w[:2], (s, s), ((p, p), (p, p))) for _, w, s, p in CASES}
  assert used <= covered, used - covered


def test_auto_rule_on_the_models_shapes():
  # ResNet-18 cifar stem and the 1x1 shortcuts get the custom formulations;
  # the wide 3x3 layers and the width-8 stem keep XLA's dw.
  assert conv.choose((64, 32, 32, 3), (3, 3, 3, 64), (1, 1)) == (
      "per_tap", "im2col")
  assert conv.choose((256, 28, 28, 1), (3, 3, 1, 8), (1, 1)) == (
      "xla", "im2col")
  assert conv.choose((64, 34, 34, 64), (1, 1, 64, 128), (2, 2)) == (
      "im2col", "im2col")
  assert conv.choose((64, 34, 34, 64), (3, 3, 64, 64), (1, 1)) == (
      "xla", "xla")
  assert conv.choose((8, 224, 224, 3), (7, 7, 3, 64), (2, 2)) == (
      "xla", "xla")


def _grad_jaxpr(impl):
  net = models.ResNet("resnet18", 16, "cifar", (1, 1), conv_impl=impl)
  x = jnp.zeros((2, 8, 8, 3))
  variables = net.init(jax.random.key(0), x, train=False)

  def loss(params):
    y, _ = net.apply({**variables, "params": params}, x, train=True,
                     mutable=["batch_stats"])
    return jnp.sum(y)
  return str(jax.make_jaxpr(jax.grad(loss))(variables["params"]))


def test_custom_gradient_used_on_cpu():
  assert jax.default_backend() == "cpu"
  assert "custom_vjp_call" in _grad_jaxpr("auto")
  assert "custom_vjp_call" not in _grad_jaxpr("xla")


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_not_cpu_is_exactly_xla(backend):
  """On GPU/TPU every impl traces to the program of nn.Conv's own call."""
  xla = _grad_jaxpr("xla")
  with mock.patch.object(conv, "_backend", return_value=backend):
    for impl in ("auto", "per_tap", "im2col"):
      assert _grad_jaxpr(impl) == xla, impl
  plain = nn.Conv(4, (3, 3), padding=[(1, 1), (1, 1)], use_bias=False)
  ours = nn.Conv(4, (3, 3), padding=[(1, 1), (1, 1)], use_bias=False,
                 conv_general_dilated=conv.conv_fn("auto"))
  x = jnp.ones((1, 5, 5, 2))
  v = plain.init(jax.random.key(0), x)
  with mock.patch.object(conv, "_backend", return_value=backend):
    assert str(jax.make_jaxpr(jax.grad(
        lambda v: ours.apply(v, x).sum()))(v)) == str(jax.make_jaxpr(
            jax.grad(lambda v: plain.apply(v, x).sum()))(v))


def test_params_identical_to_nn_conv():
  """Same names, shapes and initial values as with XLA's nn.Conv path."""
  variables = {}
  for impl in ("xla", "auto"):
    model = models.ContrastiveModel(method="ncl", width=4, stage_sizes=(1, 1),
                                    proj_hidden=8, proj_out=4,
                                    conv_impl=impl)
    variables[impl] = model.init(jax.random.key(0), jnp.zeros((2, 8, 8, 3)),
                                 train=False)
  chex.assert_trees_all_equal(variables["auto"], variables["xla"])
  backbone = variables["auto"]["params"]["backbone"]
  assert backbone["stem_conv"]["kernel"].shape == (3, 3, 3, 4)  # HWIO
  assert backbone["BasicBlock_1"]["proj_conv"]["kernel"].shape == (
      1, 1, 4, 8)


def test_unservable_convolution_falls_back_to_xla_and_logs_once(caplog):
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))
  w = jax.random.normal(jax.random.key(1), (3, 3, 2, 4))  # 2 groups.
  conv._logged_fallbacks.clear()

  def f(x, w):
    return conv.conv_general_dilated(x, w, (1, 1), [(1, 1), (1, 1)],
                                     dimension_numbers=NHWC,
                                     feature_group_count=2, impl="per_tap")

  def ref(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), [(1, 1), (1, 1)],
                                        dimension_numbers=NHWC,
                                        feature_group_count=2)
  with caplog.at_level(logging.WARNING):
    for _ in range(2):
      got = jax.grad(lambda x, w: f(x, w).sum(), (0, 1))(x, w)
  want = jax.grad(lambda x, w: ref(x, w).sum(), (0, 1))(x, w)
  chex.assert_trees_all_close(got, want, rtol=1e-6)
  msgs = [r.getMessage() for r in caplog.records
          if "using XLA's convolution" in r.getMessage()]
  assert len(msgs) == 1 and "grouped convolution" in msgs[0], msgs


def _step_config(impl):
  c = config_lib.base_config()
  c.method = "ncl"
  c.dataset.name = "cifar10"
  c.dataset.image_size = 8
  c.model.width = 16  # a stem with 16 outputs: auto's per_tap dw.
  c.model.stage_sizes = (1, 1)  # a strided 3x3 and a 1x1 shortcut.
  c.model.proj_hidden = 32
  c.model.proj_out = 16
  c.model.conv_impl = impl
  c.aug.blur_prob = 0.0
  c.optim.batch_size = 16
  c.optim.total_steps = 10
  return c


@pytest.mark.parametrize("n_devices", [1, 8])
def test_train_step_auto_equals_xla(n_devices):
  if jax.device_count() < n_devices:
    pytest.skip(f"needs {n_devices} simulated devices")
  mesh = sharding.make_mesh(jax.devices()[:n_devices])
  rs = np.random.default_rng(0)
  batch = {"view1": rs.integers(0, 256, (16, 8, 8, 3), np.uint8),
           "view2": rs.integers(0, 256, (16, 8, 8, 3), np.uint8),
           "label": rs.integers(0, 10, (16,)).astype(np.int32)}
  results = {}
  for impl in ("xla", "auto"):
    with mock.patch.object(datasets, "num_examples", return_value=1000):
      setup = train.build(_step_config(impl), mesh)
    state = train.init_state(setup, jax.random.key(0))
    step = train.make_train_step(setup)
    state, metrics = step(state, sharding.make_global_batch(batch, mesh),
                          jax.random.key(1))
    results[impl] = jax.device_get((state, metrics))
  (s_x, m_x), (s_a, m_a) = results["xla"], results["auto"]
  chex.assert_trees_all_close(m_a, m_x, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(s_a.params, s_x.params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(s_a.batch_stats, s_x.batch_stats, rtol=1e-5,
                              atol=1e-6)
  # The step changed the parameters, so equal parameters mean equal grads.
  assert not np.allclose(s_a.params["backbone"]["stem_conv"]["kernel"],
                         jax.device_get(train.init_state(
                             setup, jax.random.key(0)).params)["backbone"][
                                 "stem_conv"]["kernel"])


def test_unknown_conv_impl_refused_before_building():
  config = _step_config("cudnn")
  with mock.patch.object(models, "model_from_config",
                         side_effect=AssertionError("built")):
    with pytest.raises(config_lib.ConfigError,
                       match=r"config\.model\.conv_impl='cudnn' .*'auto', "
                             r"'xla', 'per_tap', 'im2col'"):
      train.build(config, sharding.make_mesh(jax.devices()[:1]))


def test_config_choices_match_the_module():
  assert config_lib.CONV_IMPLS == conv.CONV_IMPLS
  with pytest.raises(ValueError, match="Unknown conv_impl='nope'"):
    conv.conv_fn("nope")
