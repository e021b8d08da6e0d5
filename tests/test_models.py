"""Model pieces: non-negativity maps, gates, encoder shapes, gradient flow."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from bayesncl_jax import models

X = jnp.array([-2.0, -0.5, -1e-3, 0.0, 0.3, 1.7])


def _gelu_np(x):
  return x * 0.5 * (1 + special.erf(x / math.sqrt(2)))


def _gelu_grad_np(x):
  return 0.5 * (1 + special.erf(x / math.sqrt(2))) + x * np.exp(
      -x * x / 2) / math.sqrt(2 * math.pi)


@pytest.mark.parametrize("kind,fn", [
    ("none", lambda x: x),
    ("relu", lambda x: np.maximum(x, 0)),
    ("rep_relu", lambda x: np.maximum(x, 0)),
    ("gelu", _gelu_np),
    ("sigmoid", lambda x: 1 / (1 + np.exp(-x))),
    ("softplus", lambda x: np.log1p(np.exp(x))),
    ("exp", np.exp),
    ("leaky_relu", lambda x: np.where(x > 0, x, 0.01 * x)),
])
def test_non_negative_values(kind, fn):
  np.testing.assert_allclose(models.non_negative(X, kind),
                             fn(np.asarray(X, np.float64)), rtol=1e-5,
                             atol=1e-7)


def test_rep_relu_has_relu_value_and_gelu_gradient():
  np.testing.assert_array_equal(models.rep_relu(X), jax.nn.relu(X))
  grad = jax.vmap(jax.grad(models.rep_relu))(X)
  np.testing.assert_allclose(grad, _gelu_grad_np(np.asarray(X, np.float64)),
                             rtol=1e-5, atol=1e-7)
  # ...which is not ReLU's gradient: negatives still get a signal.
  assert abs(float(grad[1])) > 0.05


def test_non_negative_unknown_kind():
  with pytest.raises(ValueError, match="allowed"):
    models.non_negative(X, "abs")


def test_l2_normalize_values_and_zero_row():
  z = jnp.array([[3., 4.], [0., 0.]])
  np.testing.assert_allclose(models.l2_normalize(z), [[0.6, 0.8], [0, 0]])
  g = jax.grad(lambda z: models.l2_normalize(z).sum())(z)
  # Row 0: (I - ẑẑᵀ)·1 / ||z|| with ẑ = (0.6, 0.8), ||z|| = 5.
  np.testing.assert_allclose(g[0], [(1 - 0.6 * 1.4) / 5, (1 - 0.8 * 1.4) / 5],
                             rtol=1e-6)
  # A zero row (and one inside the eps-ball) gets no gradient, not 1/eps.
  np.testing.assert_array_equal(g[1], [0.0, 0.0])
  tiny = jnp.array([[1e-20, 0.0]])
  np.testing.assert_array_equal(
      jax.grad(lambda z: models.l2_normalize(z).sum())(tiny), [[0.0, 0.0]])
  # Just outside the ball the true (large) gradient is kept.
  small = jnp.array([[1e-6, 0.0], [0.0, 1e-6]])
  g_small = jax.grad(lambda z: models.l2_normalize(z)[:, 1].sum())(small)
  np.testing.assert_allclose(g_small, [[0.0, 1e6], [0.0, 0.0]], rtol=1e-5,
                             atol=1e-6)


def test_ste_gate_value_and_straight_through_gradient():
  a = jnp.array([[-1.0, 0.2, 3.0]])
  tau = 0.5
  mask, p = models.gate_mask(a, gate_type="ste", temperature=tau,
                             threshold=0.5, train=True)
  want_p = 1 / (1 + np.exp(-np.asarray(a) / tau))
  np.testing.assert_allclose(p, want_p, rtol=1e-6)
  np.testing.assert_array_equal(mask, [[0., 1., 1.]])
  # d mask / d a == d p / d a = p(1-p)/τ (straight-through).
  g = jax.grad(lambda a: models.gate_mask(
      a, gate_type="ste", temperature=tau, threshold=0.5, train=True)[0].sum()
               )(a)
  np.testing.assert_allclose(g, want_p * (1 - want_p) / tau, rtol=1e-5)


def _sigmoid(x):
  return 1 / (1 + np.exp(-np.asarray(x, np.float64)))


def test_gumbel_sigmoid_gate_is_binary_concrete_with_logistic_noise():
  a = jnp.linspace(-2, 2, 7)[None]
  rng = jax.random.key(5)
  mask, p = models.gate_mask(a, gate_type="gumbel_sigmoid", temperature=0.7,
                             threshold=0.3, train=True, rng=rng)
  # The same draw as the model's: u ~ U(eps, 1 - eps) from `rng`.
  u = np.asarray(jax.random.uniform(rng, a.shape, minval=1e-6,
                                    maxval=1 - 1e-6), np.float64)
  p_noisy = _sigmoid((np.asarray(a) + np.log(u) - np.log(1 - u)) / 0.7)
  np.testing.assert_array_equal(mask, (p_noisy > 0.3).astype(np.float32))
  # The KL's p is the deterministic one, not the noisy one.
  np.testing.assert_allclose(p, _sigmoid(np.asarray(a) / 0.7), rtol=1e-6)
  # Straight-through on p~: d mask / d a = p~(1 - p~) / τ.
  g = jax.grad(lambda a: models.gate_mask(
      a, gate_type="gumbel_sigmoid", temperature=0.7, threshold=0.3,
      train=True, rng=rng)[0].sum())(a)
  np.testing.assert_allclose(g, p_noisy * (1 - p_noisy) / 0.7, rtol=1e-4)


def test_gumbel_authors_gate_matches_their_formula():
  a = jnp.linspace(-2, 2, 7)[None]
  rng = jax.random.key(5)
  mask, p = models.gate_mask(a, gate_type="gumbel_authors", temperature=0.7,
                             threshold=0.3, train=True, rng=rng)
  u = np.asarray(jax.random.uniform(rng, a.shape), np.float64)
  g = -np.log(-np.log(u + 1e-4) + 1e-4)
  p_noisy = _sigmoid((np.asarray(a) + g) / 0.7)
  np.testing.assert_array_equal(mask, (p_noisy > 0.3).astype(np.float32))
  np.testing.assert_allclose(p, _sigmoid(np.asarray(a) / 0.7), rtol=1e-6)


@pytest.mark.parametrize("gate_type", ["gumbel_sigmoid", "gumbel_authors"])
def test_noisy_gates_need_an_rng(gate_type):
  with pytest.raises(ValueError, match="needs an rng"):
    models.gate_mask(jnp.zeros((1, 3)), gate_type=gate_type, temperature=1.0,
                     threshold=0.5, train=True)


N_DRAWS = 20_000


def _open_rate(gate_type, a, temperature=1.0, seed=0):
  logits = jnp.full((N_DRAWS,), a, jnp.float32)
  mask, _ = models.gate_mask(logits, gate_type=gate_type,
                             temperature=temperature, threshold=0.5,
                             train=True, rng=jax.random.key(seed))
  return float(jnp.mean(mask))


def _within_4_se(rate, want):
  se = math.sqrt(want * (1 - want) / N_DRAWS)
  return abs(rate - want) < 4 * se


@pytest.mark.parametrize("a", [0.0, -0.3, 1.5])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_gumbel_sigmoid_training_open_rate_is_sigmoid_a(a, temperature):
  """20k draws: open with probability sigmoid(a) = the p of KL and eval."""
  rate = _open_rate("gumbel_sigmoid", a, temperature)
  assert _within_4_se(rate, float(_sigmoid(a))), (rate, _sigmoid(a))
  # ...and measurably not the authors' rate 1 - exp(-e^a).
  assert not _within_4_se(rate, 1 - math.exp(-math.exp(a)))


@pytest.mark.parametrize("a", [0.0, -0.3])
def test_gumbel_authors_training_open_rate_is_their_defect(a):
  """One Gumbel sample opens with 1 - exp(-e^a): 0.632 at a = 0, 0.524 at
  a = -0.3, where the evaluation gate (p = sigmoid(a) < 0.5) is closed."""
  rate = _open_rate("gumbel_authors", a)
  want = 1 - math.exp(-math.exp(a))
  assert _within_4_se(rate, want), (rate, want)
  assert not _within_4_se(rate, float(_sigmoid(a)))
  closed, _ = models.gate_mask(jnp.full((1,), a), gate_type="gumbel_authors",
                               temperature=1.0, threshold=0.5, train=False)
  assert float(closed[0]) == (1.0 if a > 0 else 0.0)


def test_soft_training_gate_is_p_with_its_gradient():
  a = jnp.array([[-1.0, 0.2, 3.0]])
  tau = 0.5
  want_p = _sigmoid(np.asarray(a) / tau)
  for gate_type in models.GATE_TYPES:  # soft ignores the gate type
    mask, p = models.gate_mask(a, gate_type=gate_type, temperature=tau,
                               threshold=0.5, train=True, train_mode="soft",
                               rng=jax.random.key(0))
    np.testing.assert_allclose(mask, want_p, rtol=1e-6)
    np.testing.assert_allclose(p, want_p, rtol=1e-6)
  g = jax.grad(lambda a: models.gate_mask(
      a, gate_type="ste", temperature=tau, threshold=0.5, train=True,
      train_mode="soft")[0].sum())(a)
  np.testing.assert_allclose(g, want_p * (1 - want_p) / tau, rtol=1e-4)
  with pytest.raises(ValueError, match="train_mode='dropout'"):
    models.gate_mask(a, gate_type="ste", temperature=tau, threshold=0.5,
                     train=True, train_mode="dropout")


def test_top_k_mask_keeps_k_largest_positive_entries():
  z = jnp.array([[0.0, 3.0, 1.0, 2.0, 0.5],
                 [1.0, 1.0, 1.0, 0.0, 0.0],    # ties: the lower indices win
                 [0.0, 0.0, 0.0, 0.0, 0.2],    # fewer than k positive
                 [0.0, 0.0, 0.0, 0.0, 0.0],    # none positive
                 [-1.0, -0.5, 0.3, -2.0, 0.0]])  # negatives are never kept
  np.testing.assert_array_equal(models.top_k_mask(z, 2),
                                [[0, 1, 0, 1, 0], [1, 1, 0, 0, 0],
                                 [0, 0, 0, 0, 1], [0, 0, 0, 0, 0],
                                 [0, 0, 1, 0, 0]])
  positives = np.array([4, 3, 1, 0, 1])
  for k in range(1, 6):
    np.testing.assert_array_equal(models.top_k_mask(z, k).sum(-1),
                                  np.minimum(k, positives))
    np.testing.assert_array_equal(models.top_k_short_rows(z, k),
                                  (positives < k).astype(np.float32))
  # Gradient reaches the kept entries only (value-weighted sum so that each
  # kept entry gets a distinct non-zero gradient).
  w = jnp.arange(1.0, 6.0)
  g = jax.grad(lambda z: jnp.sum(z * models.top_k_mask(z, 2) * w))(z)
  np.testing.assert_array_equal(g, models.top_k_mask(z, 2) * w)
  with pytest.raises(ValueError, match="top_k=6 must be in 1..5"):
    models.top_k_mask(z, 6)


def _head_with_output(pre, non_neg, top_k):
  """A tiny NCL+TopK model whose projector outputs `pre` for any h (last
  Dense: zero kernel, bias = pre), and its variables."""
  model = _tiny("ncl_topk", non_neg=non_neg, top_k=top_k)
  x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3))
  variables = model.init(jax.random.key(1), x, train=False)
  params = jax.tree.map(lambda a: a, variables["params"])
  last = params["projector"]["Dense_1"]
  last["kernel"] = jnp.zeros_like(last["kernel"])
  last["bias"] = jnp.asarray(pre, jnp.float32)
  h = jnp.ones((1, 8))
  return model, params, h


def _topk_expected(pre, keep, w, non_neg):
  """Hand formula: z = v / ||v||, v = σ+(pre) ⊙ keep; the gradient of
  L = w·z w.r.t. pre is keep ⊙ σ+'(pre) ⊙ (w − z (z·w)) / ||v||."""
  pre, keep, w = (np.asarray(a, np.float64) for a in (pre, keep, w))
  v = np.maximum(pre, 0) * keep
  norm = np.linalg.norm(v)
  z = v / norm
  slope = (_gelu_grad_np(pre) if non_neg == "rep_relu"
           else (pre > 0).astype(np.float64))
  return z, keep * slope * (w - z * (z @ w)) / norm


@pytest.mark.parametrize("non_neg", ["rep_relu", "relu"])
@pytest.mark.parametrize("pre,top_k,keep", [
    # 2 positive entries, k = 3: only those two are kept; the zero (dim 1)
    # and the negatives never are, whatever their index.
    ([-1.0, 0.0, 0.5, -0.2, 2.0, -3.0, -0.1, -0.4], 3,
     [0, 0, 1, 0, 1, 0, 0, 0]),
    # 1 positive entry, k = 4.
    ([-0.3, -1.0, -0.5, 0.0, -2.0, 0.7, -0.6, -0.2], 4,
     [0, 0, 0, 0, 0, 1, 0, 0]),
    # Ties among positives at the k-th place: the lower index wins (k = 2
    # keeps dim 3 (the largest) and dim 0, the first of the three 0.5s).
    ([0.5, -1.0, 0.5, 2.0, 0.5, -0.2, 0.0, -0.3], 2,
     [1, 0, 0, 1, 0, 0, 0, 0]),
])
def test_ncl_topk_short_rows_value_and_gradient_of_every_dim(
    non_neg, pre, top_k, keep):
  model, params, h = _head_with_output(pre, non_neg, top_k)
  w = jnp.arange(1.0, 9.0)

  def loss(bias):
    p = {**params, "projector": {**params["projector"], "Dense_1": {
        "kernel": params["projector"]["Dense_1"]["kernel"], "bias": bias}}}
    out = model.apply({"params": p}, h, train=True, method="project")
    return jnp.sum(out["z"][0] * w), out

  (_, out), grad = jax.value_and_grad(loss, has_aux=True)(
      params["projector"]["Dense_1"]["bias"])
  want_z, want_grad = _topk_expected(pre, keep, w, non_neg)
  np.testing.assert_allclose(out["z"][0], want_z, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)
  # No dim outside the kept set has a gradient path.
  assert np.all(np.asarray(grad)[np.asarray(keep) == 0] == 0)
  positives = int(np.sum(np.asarray(pre) > 0))
  assert float(out["topk_short"][0]) == float(positives < top_k)


def test_eval_gate_uses_trained_temperature_and_threshold_no_noise():
  a = jnp.array([[0.1, 0.4, 2.0]])
  # τ = 0.5, threshold 0.6: p = sigmoid(2a) = (0.550, 0.690, 0.982).
  for gate_type in models.GATE_TYPES:
    hard, _ = models.gate_mask(a, gate_type=gate_type, temperature=0.5,
                               threshold=0.6, train=False)
    np.testing.assert_array_equal(hard, [[0., 1., 1.]])
  soft, p = models.gate_mask(a, gate_type="ste", temperature=0.5,
                             threshold=0.6, train=False, eval_mode="soft")
  np.testing.assert_allclose(soft, 1 / (1 + np.exp(-2 * np.asarray(a))),
                             rtol=1e-6)


def test_gate_temperature_must_be_positive():
  with pytest.raises(ValueError, match="temperature must be > 0"):
    models.gate_mask(jnp.zeros((1, 2)), gate_type="ste", temperature=0.0,
                     threshold=0.5, train=True)


def _param_count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name,stem,size,expected", [
    # Standard ResNet parameter counts without the fc layer (torchvision:
    # resnet18 11,689,512 - fc 513,000; resnet50 25,557,032 - fc 2,049,000);
    # the CIFAR stem's 3x3 conv has 1,728 weights instead of 9,408.
    ("resnet18", "imagenet", 224, 11_176_512),
    ("resnet18", "cifar", 32, 11_176_512 - 9408 + 1728),
    ("resnet50", "imagenet", 224, 23_508_032),
])
@pytest.mark.slow
def test_resnet_parameter_counts_and_feature_dims(name, stem, size, expected):
  net = models.ResNet(name, 64, stem)
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: net.init(jax.random.key(0), x,
                                                train=False), x)
  assert _param_count(variables["params"]) == expected
  out = jax.eval_shape(lambda v, x: net.apply(v, x, train=False), variables,
                       x)
  assert out.shape == (2, net.feature_dim)
  assert net.feature_dim == {"resnet18": 512, "resnet50": 2048}[name]


def _tiny(method, **kw):
  return models.ContrastiveModel(
      method=method, num_classes=3, width=4, stage_sizes=(1, 1),
      proj_hidden=16, proj_out=8, **kw)


@pytest.mark.parametrize("method", ["cl", "ncl", "ncl_topk", "bayesncl"])
def test_model_outputs(method):
  model = _tiny(method, non_neg="relu", top_k=3)
  x = jax.random.uniform(jax.random.key(0), (6, 8, 8, 3))
  variables = model.init(jax.random.key(1), x, train=False)
  assert set(variables) == {"params", "batch_stats"}
  assert ("gate_head" in variables["params"]) == (method == "bayesncl")
  out, _ = model.apply(variables, x, train=True,
                       gate_rng=jax.random.key(2), mutable=["batch_stats"])
  chex.assert_shape(out["z"], (6, 8))
  chex.assert_shape(out["h"], (6, 8))  # width 4, 2 stages -> 8
  chex.assert_shape(out["logits"], (6, 3))
  norms = np.linalg.norm(np.asarray(out["z"]), axis=1)
  assert np.all((np.abs(norms - 1) < 1e-5) | (norms == 0))
  if method == "cl":
    assert np.any(np.asarray(out["z"]) < 0)  # signed SimCLR features
  else:
    assert np.all(np.asarray(out["z"]) >= 0)


@pytest.mark.slow
def test_gate_gives_backbone_no_gradient_and_classifier_none():
  model = _tiny("bayesncl", non_neg="relu", gate_type="ste")
  x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 3))
  variables = model.init(jax.random.key(1), x, train=False)

  def grads_of(fn):
    def loss(params):
      out, _ = model.apply({**variables, "params": params}, x, train=True,
                           mutable=["batch_stats"])
      return fn(out)
    return jax.grad(loss)(variables["params"])

  # A loss on the gate probabilities alone trains only the gate head.
  g = grads_of(lambda o: jnp.sum(o["gate_probs"] ** 2))
  assert _nonzero(g["gate_head"])
  for k in ("backbone", "projector", "classifier"):
    assert not _nonzero(g[k]), k
  # The online classifier's loss never reaches the backbone.
  g = grads_of(lambda o: jnp.sum(o["logits"] ** 2))
  assert _nonzero(g["classifier"]) and not _nonzero(g["backbone"])
  # The contrastive features do train the backbone.
  g = grads_of(lambda o: jnp.sum(o["z"] * jnp.arange(8.)))
  assert _nonzero(g["backbone"]) and _nonzero(g["projector"])


def _dense(x, params):
  return np.asarray(x, np.float64) @ np.asarray(params["kernel"], np.float64
                                                 ) + np.asarray(params["bias"])


def _l2n(x):
  n = np.linalg.norm(x, axis=-1, keepdims=True)
  return x / np.maximum(n, 1e-12)


def _relu(x):
  return np.maximum(x, 0)


def _train_forward(model, variables, x, **kw):
  out, _ = model.apply(variables, x, train=True, mutable=["batch_stats"],
                       **kw)
  return out


@pytest.mark.parametrize("train", [True, False])
def test_ncl_topk_keeps_k_largest_then_normalises(train):
  model = _tiny("ncl_topk", non_neg="relu", top_k=3)
  x = jax.random.uniform(jax.random.key(0), (6, 8, 8, 3))
  variables = model.init(jax.random.key(1), x, train=False)
  out, _ = model.apply(variables, x, train=train, mutable=["batch_stats"])
  proj = variables["params"]["projector"]
  zp = _relu(_dense(_relu(_dense(out["h"], proj["Dense_0"])), proj["Dense_1"]))
  keep = np.argsort(-zp, axis=1, kind="stable")[:, :3]
  want = np.zeros_like(zp)
  np.put_along_axis(want, keep, np.take_along_axis(zp, keep, 1), 1)
  np.testing.assert_allclose(out["z"], _l2n(want), rtol=1e-4, atol=1e-6)
  assert np.all((np.asarray(out["z"]) > 0).sum(1) <= 3)
  assert "gate_mask" not in out and "gate_head" not in variables["params"]


def test_ncl_topk_gradient_skips_dropped_entries():
  """Through the model's own head: for one row, d loss / d (projector output
  bias) is d loss / d (projector output), zero on the dropped entries."""
  model = _tiny("ncl_topk", non_neg="relu", top_k=2)
  x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 3))
  variables = model.init(jax.random.key(1), x, train=False)
  h = _train_forward(model, variables, x)["h"][:1]

  def loss(params):
    out = model.apply({"params": params}, h, train=True, method="project")
    return jnp.sum(out["z"] * jnp.arange(1.0, 9.0))
  g = np.asarray(jax.grad(loss)(variables["params"])
                 ["projector"]["Dense_1"]["bias"])
  zp = model.apply(variables, h, method=lambda m, h: m.projector(h))[0]
  kept = np.asarray(models.top_k_mask(jax.nn.relu(zp), 2)).astype(bool)
  assert kept.sum() == 2
  assert np.all(g[~kept] == 0)
  assert np.all(g[kept & (np.asarray(zp) > 0)] != 0)


def test_soft_gating_trains_with_z_times_p():
  model = _tiny("bayesncl", non_neg="relu", gate_train_mode="soft",
                gate_temperature=0.7)
  x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 3))
  variables = model.init(jax.random.key(1), x, train=False)
  out = _train_forward(model, variables, x)
  params = variables["params"]
  proj, gate = params["projector"], params["gate_head"]
  zp = _l2n(_relu(_dense(_relu(_dense(out["h"], proj["Dense_0"])),
                         proj["Dense_1"])))
  p = _sigmoid(_dense(_relu(_dense(out["h"], gate["Dense_0"])),
                      gate["Dense_1"]) / 0.7)
  np.testing.assert_allclose(out["gate_mask"], p, rtol=1e-4)
  np.testing.assert_allclose(out["z"], _l2n(zp * p), rtol=1e-4, atol=1e-6)
  # Evaluation keeps the hard gate (gate_eval_mode="hard").
  ev = model.apply(variables, x, train=False)
  assert set(np.unique(np.asarray(ev["gate_mask"]))) <= {0.0, 1.0}


@pytest.mark.parametrize("isolate", [True, False])
def test_gate_isolation_controls_backbone_gradient(isolate):
  """Isolated: a loss on the gate alone reaches only the gate head; not
  isolated: it trains the backbone too (and still not the projector)."""
  model = _tiny("bayesncl", non_neg="relu", gate_type="ste",
                gate_isolate=isolate)
  x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 3))
  variables = model.init(jax.random.key(1), x, train=False)

  def loss(params):
    out = _train_forward(model, {**variables, "params": params}, x)
    return jnp.sum(out["gate_probs"] ** 2)
  g = jax.grad(loss)(variables["params"])
  assert _nonzero(g["gate_head"])
  assert _nonzero(g["backbone"]) == (not isolate)
  assert not _nonzero(g["projector"]) and not _nonzero(g["classifier"])


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_gate_head_depth(depth):
  model = _tiny("bayesncl", gate_depth=depth)
  x = jnp.ones((2, 8, 8, 3))
  params = model.init(jax.random.key(0), x, train=False)["params"]
  gate = params["gate_head"]
  assert sorted(gate) == [f"Dense_{i}" for i in range(depth)]
  shapes = [gate[f"Dense_{i}"]["kernel"].shape for i in range(depth)]
  # h has 8 dims (width 4, 2 stages), hidden 16, out 8.
  want = {1: [(8, 8)], 2: [(8, 16), (16, 8)],
          3: [(8, 16), (16, 16), (16, 8)]}[depth]
  assert shapes == want
  assert sorted(params["projector"]) == ["Dense_0", "Dense_1"]
  # The forward pass is the stack of Dense layers with ReLU between.
  h = model.apply({"params": params, "batch_stats": model.init(
      jax.random.key(0), x, train=False)["batch_stats"]}, x, train=False)["h"]
  a = np.asarray(h, np.float64)
  for i in range(depth):
    a = _dense(a, gate[f"Dense_{i}"])
    if i < depth - 1:
      a = _relu(a)
  ev = model.apply({"params": params, "batch_stats": model.init(
      jax.random.key(0), x, train=False)["batch_stats"]}, x, train=False)
  np.testing.assert_allclose(ev["gate_probs"], _sigmoid(a), rtol=1e-4)


def _nonzero(tree):
  return any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(tree))


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  model = _tiny("bayesncl", dtype=jnp.bfloat16)
  x = jnp.ones((2, 8, 8, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  assert all(v.dtype == jnp.float32
             for v in jax.tree.leaves(variables["params"]))
  out = model.apply(variables, x, train=False)
  assert out["z"].dtype == jnp.float32 and out["h"].dtype == jnp.float32


def test_config_and_model_agree_on_gate_names():
  from bayesncl_jax import config_lib  # pylint: disable=g-import-not-at-top
  assert config_lib.GATE_TYPES == models.GATE_TYPES
  assert config_lib.GATE_MODES == models.GATE_MODES


# ----------------------------------------------------------------------------
# Initialisation schemes and the CIFAR stem's padding (docs/method.md §10).
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def init_params():
  """Params of a width-64 model under both schemes (big enough for stats)."""
  out = {}
  for scheme in ("torch", "flax"):
    model = models.ContrastiveModel(
        method="bayesncl", num_classes=10, width=64, stage_sizes=(1,),
        proj_hidden=512, proj_out=256, init_scheme=scheme)
    out[scheme] = jax.jit(lambda k, m=model: m.init(
        k, jnp.zeros((2, 8, 8, 3)), train=False))(jax.random.key(0))["params"]
  return out


@pytest.mark.slow
def test_torch_init_matches_pytorch(init_params):
  p = init_params["torch"]
  # Conv: kaiming-normal, fan_out = out_channels * 3 * 3, std sqrt(2/fan_out).
  for kernel in (p["backbone"]["stem_conv"]["kernel"],
                 p["backbone"]["BasicBlock_0"]["Conv_1"]["kernel"]):
    kernel = np.asarray(kernel)
    fan_out = kernel.shape[-1] * kernel.shape[0] * kernel.shape[1]
    np.testing.assert_allclose(kernel.std(), math.sqrt(2 / fan_out),
                               rtol=0.05)
    assert abs(kernel.mean()) < 0.1 * kernel.std()
  # BatchNorm: scale 1 and bias 0 everywhere, the block's last BN included.
  for name in ("stem_bn",):
    np.testing.assert_array_equal(p["backbone"][name]["scale"], 1.0)
  for name in ("BatchNorm_0", "BatchNorm_1"):
    np.testing.assert_array_equal(p["backbone"]["BasicBlock_0"][name]["scale"],
                                  1.0)
    np.testing.assert_array_equal(p["backbone"]["BasicBlock_0"][name]["bias"],
                                  0.0)
  # Linear: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  for dense in (p["projector"]["Dense_0"], p["projector"]["Dense_1"],
                p["gate_head"]["Dense_0"], p["classifier"]):
    w, b = np.asarray(dense["kernel"]), np.asarray(dense["bias"])
    bound = 1 / math.sqrt(w.shape[0])
    assert np.abs(w).max() <= bound and np.abs(b).max() <= bound
    assert np.abs(w).max() > 0.99 * bound
    if b.size >= 256:  # P(max |b| < 0.8 bound) = 0.8^256: never by chance.
      assert np.abs(b).max() > 0.8 * bound
      np.testing.assert_allclose(b.std(), bound / math.sqrt(3), rtol=0.15)
    np.testing.assert_allclose(w.std(), bound / math.sqrt(3), rtol=0.05)


@pytest.mark.slow
def test_flax_init_zero_inits_last_bn_and_bias(init_params):
  p = init_params["flax"]
  block = p["backbone"]["BasicBlock_0"]
  np.testing.assert_array_equal(block["BatchNorm_1"]["scale"], 0.0)
  np.testing.assert_array_equal(block["BatchNorm_0"]["scale"], 1.0)
  w = np.asarray(p["projector"]["Dense_0"]["kernel"])
  np.testing.assert_array_equal(p["projector"]["Dense_0"]["bias"], 0.0)
  np.testing.assert_allclose(w.std(), 1 / math.sqrt(w.shape[0]), rtol=0.05)
  # The convs are kaiming-normal under both schemes.
  np.testing.assert_allclose(np.asarray(block["Conv_1"]["kernel"]).std(),
                             math.sqrt(2 / (64 * 9)), rtol=0.05)


def test_unknown_init_scheme():
  with pytest.raises(ValueError, match="init_scheme='xavier'"):
    models.ResNet(init_scheme="xavier").init(
        jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)


@pytest.mark.parametrize("padding,size", [(2, 34), (1, 32), (0, 30)])
def test_cifar_stem_padding_sets_the_map_size(padding, size):
  net = models.ResNet("resnet18", 4, "cifar", (1, 1), stem_padding=padding)
  variables = jax.eval_shape(lambda: net.init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False,
      capture_intermediates=True))
  stem = variables["intermediates"]["stem_conv"]["__call__"][0]
  assert stem.shape == (1, size, size, 4)
  # The stride-2 stage halves it, rounding up (torch: (n + 2 - 3) // 2 + 1).
  block = variables["intermediates"]["BasicBlock_1"]["__call__"][0]
  assert block.shape == (1, (size - 1) // 2 + 1, (size - 1) // 2 + 1, 8)
