"""Losses against hand-computed values and a naive independent formula."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bayesncl_jax import losses
from bayesncl_jax import models


def naive_nt_xent(z, t):
  """Direct transcription of docs/method.md §2.5 with explicit loops (float64)."""
  z = np.asarray(z, np.float64)
  n2 = len(z)
  total = 0.0
  for i in range(n2):
    j = (i + n2 // 2) % n2
    num = math.exp(z[i] @ z[j] / t)
    den = sum(math.exp(z[i] @ z[k] / t) for k in range(n2) if k != i)
    total += -math.log(num / den)
  return total / n2


def test_nt_xent_hand_value_orthogonal_views():
  # Views e1, e2 | e1, e2: row 0's positive (row 2) has s=1, its two
  # negatives s=0, so l = log(e^{1/T} + 2) - 1/T; every row is alike.
  t = 0.2
  z = jnp.array([[1., 0.], [0., 1.], [1., 0.], [0., 1.]])
  expected = math.log(math.exp(1 / t) + 2) - 1 / t
  # float32 cancellation in (log-sum-exp - 1/T) limits the relative error.
  np.testing.assert_allclose(losses.nt_xent_loss(z, t), expected, atol=1e-6)


def test_nt_xent_single_pair_is_zero():
  # N = 1: the positive is the only other row, so p = 1 and the loss is 0.
  z = jnp.array([[0.6, 0.8], [1.0, 0.0]])
  np.testing.assert_allclose(losses.nt_xent_loss(z, 0.5), 0.0, atol=1e-6)


@pytest.mark.parametrize("t", [0.07, 0.2, 1.0])
def test_nt_xent_matches_naive_loops(t):
  z = jax.random.normal(jax.random.key(0), (12, 5))
  z = models.l2_normalize(z)
  np.testing.assert_allclose(losses.nt_xent_loss(z, t), naive_nt_xent(z, t),
                             rtol=1e-5)


def test_nt_xent_is_stable_where_exp_overflows():
  # s/T = 1e4: exp overflows float32; the log-sum-exp form must not.
  z = jnp.array([[100., 0.], [0., 100.], [100., 0.], [0., 100.]])
  loss = losses.nt_xent_loss(z, 1.0)
  assert np.isfinite(loss)
  # Positive dominates: log(e^a + 2) - a -> 0 for a = 1e4.
  np.testing.assert_allclose(loss, 0.0, atol=1e-5)


def test_nt_xent_all_zero_rows_no_nan_in_value_or_gradient():
  # All gates closed for image 0: its rows normalise to zero.
  raw = jnp.array([[0., 0., 0.], [1., 2., 0.], [0., 0., 0.], [1., 1., 1.]])
  fn = lambda r: losses.nt_xent_loss(models.l2_normalize(r), 0.2)
  loss, grad = jax.value_and_grad(fn)(raw)
  assert np.isfinite(loss)
  assert np.all(np.isfinite(grad))
  # Rows 0 and 2 have s = 0 against everything: l = log(2N - 1) = log 3.
  z = models.l2_normalize(raw)
  s = np.asarray(z @ z.T) / 0.2
  row1 = math.log(math.exp(s[1, 0]) + math.exp(s[1, 2]) + math.exp(s[1, 3])
                  ) - s[1, 3]
  row3 = math.log(math.exp(s[3, 0]) + math.exp(s[3, 1]) + math.exp(s[3, 2])
                  ) - s[3, 1]
  np.testing.assert_allclose(loss, (2 * math.log(3) + row1 + row3) / 4,
                             rtol=1e-6)


def test_nt_xent_bfloat16_input_computes_in_float32():
  z = models.l2_normalize(jax.random.normal(jax.random.key(1), (8, 4)))
  loss_bf16 = losses.nt_xent_loss(z.astype(jnp.bfloat16), 0.2)
  assert loss_bf16.dtype == jnp.float32
  np.testing.assert_allclose(
      loss_bf16, naive_nt_xent(z.astype(jnp.bfloat16).astype(jnp.float32),
                               0.2), rtol=1e-5)


def test_nt_xent_rejects_odd_rows():
  with pytest.raises(ValueError, match="even number of rows"):
    losses.nt_xent_loss(jnp.ones((3, 2)), 0.2)


def test_bernoulli_kl_hand_values():
  p, pi = 0.5, 0.8
  per_dim = p * math.log(p / pi) + (1 - p) * math.log((1 - p) / (1 - pi))
  probs = jnp.full((3, 4), p)  # sum over 4 dims, mean over 3 rows
  np.testing.assert_allclose(losses.bernoulli_kl(probs, pi), 4 * per_dim,
                             rtol=1e-6)
  # Mean over the batch: rows with different p average.
  q = 0.9
  per_dim_q = q * math.log(q / pi) + (1 - q) * math.log((1 - q) / (1 - pi))
  probs = jnp.array([[p, p], [q, q]])
  np.testing.assert_allclose(losses.bernoulli_kl(probs, pi),
                             (2 * per_dim + 2 * per_dim_q) / 2, rtol=1e-6)
  # KL to itself is zero.
  np.testing.assert_allclose(losses.bernoulli_kl(jnp.full((2, 5), pi), pi),
                             0.0, atol=1e-7)


def test_bernoulli_kl_clamps_saturated_gates_and_prior():
  # p = 0 is clamped to 0.01 and pi = 1.0 to 0.99.
  c = 0.01
  expected = c * math.log(c / 0.99) + (1 - c) * math.log((1 - c) / c)
  np.testing.assert_allclose(losses.bernoulli_kl(jnp.zeros((1, 1)), 1.0),
                             expected, rtol=1e-6)
  g = jax.grad(lambda p: losses.bernoulli_kl(p, 0.8))(jnp.array([[0., 1.]]))
  assert np.all(np.isfinite(g))


def test_total_loss_composition_per_method():
  key = jax.random.key(2)
  n, d, c = 4, 6, 3
  z = models.l2_normalize(jax.random.normal(key, (2 * n, d)))
  logits = jax.random.normal(jax.random.key(3), (2 * n, c))
  labels = jnp.array([0, 1, 2, 1])
  probs = jax.nn.sigmoid(jax.random.normal(jax.random.key(4), (2 * n, d)))
  outputs = {"z": z, "logits": logits, "gate_probs": probs,
             "gate_mask": (probs > 0.5).astype(jnp.float32)}
  nce = naive_nt_xent(z, 0.2)
  lg = np.asarray(logits, np.float64)
  y = np.concatenate([labels, labels])
  ce = np.mean(np.log(np.exp(lg).sum(1)) - lg[np.arange(2 * n), y])
  kl = float(losses.bernoulli_kl(probs, 0.8))
  for method, want in (("cl", nce + ce), ("ncl", nce + ce),
                       ("ncl_topk", nce + ce),
                       ("bayesncl", nce + ce + 3e-5 * kl)):
    loss, metrics = losses.total_loss(outputs, labels, method=method,
                                      temperature=0.2, kl_weight=3e-5,
                                      prior_prob=0.8)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["online_ce"], ce, rtol=1e-5)
    assert ("kl" in metrics) == (method == "bayesncl")
  np.testing.assert_allclose(metrics["gate_open_rate"],
                             np.mean(np.asarray(probs) > 0.5))
  # Straight-through masks (0/1 up to rounding) and soft gating (mask = p):
  # the open rate is the mean of the applied mask, as in evaluation.
  ste = jax.lax.stop_gradient((probs > 0.5) - probs) + probs
  for mask, want in ((ste, np.mean(np.asarray(probs) > 0.5)),
                     (probs, np.mean(np.asarray(probs)))):
    _, metrics = losses.total_loss({**outputs, "gate_mask": mask}, labels,
                                   method="bayesncl", temperature=0.2)
    np.testing.assert_allclose(metrics["gate_open_rate"], want, rtol=1e-6)


def test_topk_short_row_frac_is_the_share_of_short_rows():
  """NCL+TopK's "topk_short" output (1 = the row had fewer than k positive
  entries of σ+(z)) is logged as its mean; other methods log nothing."""
  z = models.l2_normalize(jnp.ones((4, 3)))
  outputs = {"z": z, "logits": jnp.zeros((4, 2))}
  labels = jnp.array([0, 1])
  _, metrics = losses.total_loss(
      {**outputs, "topk_short": jnp.array([1.0, 0.0, 0.0, 1.0])}, labels,
      method="ncl_topk", temperature=0.2)
  assert float(metrics["topk_short_row_frac"]) == 0.5
  _, metrics = losses.total_loss(outputs, labels, method="ncl",
                                 temperature=0.2)
  assert "topk_short_row_frac" not in metrics
