"""Losses as pure functions (docs/method.md §2.5-2.7).

Everything is computed in float32, whatever the model's compute dtype.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import optax

# docs/method.md §2.4: both p and the prior are clamped to [KL_CLAMP, 1 - KL_CLAMP].
KL_CLAMP = 1e-2
# An entry counts as zero (inactive) at or below this magnitude (§5).
ZERO_TOL = 1e-5


def nt_xent_loss(z: jax.Array, temperature: float, *,
                 row_sharding: jax.sharding.Sharding | None = None
                 ) -> jax.Array:
  """SimCLR's NT-Xent over all 2N rows of the (global) batch.

  z: (2N, D); rows i and i+N are the two views of image i. With s = z zᵀ / T,
    l_i = logsumexp_{k≠i} s_ik − s_{i,j(i)},   j(i) = (i + N) mod 2N,
  returned as the mean over the 2N rows. The log-sum-exp is the stable form
  of the authors' exp-sum (no overflow at small T); an all-zero row gives
  s_i· = 0 and a finite loss log(2N − 1).

  Sharding: under `jax.jit` with z row-sharded, pass `row_sharding`
  (NamedSharding(mesh, P('data', None))) so the similarity matrix is laid out
  by rows: each device holds its (2N/d) × 2N block — local rows against the
  all-gathered z — never the full (2N)² matrix.
  """
  z = z.astype(jnp.float32)
  n2 = z.shape[0]
  if n2 % 2:
    raise ValueError(f"nt_xent_loss needs an even number of rows (two views "
                     f"per image), got z of shape {z.shape}")
  sim = jnp.matmul(z, z.T, precision=jax.lax.Precision.HIGHEST) / temperature
  if row_sharding is not None:
    sim = jax.lax.with_sharding_constraint(sim, row_sharding)
  rows = jax.lax.broadcasted_iota(jnp.int32, sim.shape, 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, sim.shape, 1)
  positive = jnp.sum(jnp.where(cols == (rows + n2 // 2) % n2, sim, 0.0),
                     axis=1)
  log_denominator = jax.nn.logsumexp(
      jnp.where(rows == cols, -jnp.inf, sim), axis=1)
  return jnp.mean(log_denominator - positive)


def bernoulli_kl(probs: jax.Array, prior_prob: float,
                 clamp: float = KL_CLAMP) -> jax.Array:
  """KL(Bernoulli(p) || Bernoulli(π)), summed over dims, mean over the batch.

  probs: (B, D) gate probabilities. Both p and π are clamped to
  [clamp, 1 − clamp] first (docs/method.md §2.4), so the KL stays finite when a
  gate saturates.
  """
  p = jnp.clip(probs.astype(jnp.float32), clamp, 1.0 - clamp)
  pi = jnp.clip(jnp.float32(prior_prob), clamp, 1.0 - clamp)
  kl = p * jnp.log(p / pi) + (1.0 - p) * jnp.log((1.0 - p) / (1.0 - pi))
  return jnp.mean(jnp.sum(kl, axis=-1))


def classification_metrics(logits: jax.Array, labels: jax.Array
                           ) -> tuple[jax.Array, jax.Array]:
  """Mean softmax cross-entropy and top-1 accuracy (float32)."""
  logits = logits.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  acc = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
  return jnp.mean(ce), acc


def total_loss(outputs: Mapping[str, jax.Array], labels: jax.Array, *,
               method: str, temperature: float, kl_weight: float = 0.0,
               prior_prob: float = 0.5,
               row_sharding: jax.sharding.Sharding | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L = NCE + CE_online + λ_KL · KL (KL for method='bayesncl' only).

  outputs: the model's outputs on the 2N rows [view 1 of all images; view 2
  of all images]. labels: (N,) class labels, used only by the online
  classifier (whose input is stop_gradient(h), so it never trains the
  encoder). Returns the loss and float32 scalars to log; with an output
  "topk_short" (NCL+TopK) also topk_short_row_frac, its mean.
  """
  z = outputs["z"]
  nce = nt_xent_loss(z, temperature, row_sharding=row_sharding)
  ce, acc = classification_metrics(outputs["logits"],
                                   jnp.concatenate([labels, labels]))
  loss = nce + ce
  metrics = {"nce": nce, "online_ce": ce, "online_acc": acc,
             "sparsity": jnp.mean((jnp.abs(z) <= ZERO_TOL)
                                  .astype(jnp.float32))}
  if method == "bayesncl":
    kl = bernoulli_kl(outputs["gate_probs"], prior_prob)
    loss = loss + kl_weight * kl
    metrics["kl"] = kl
    # Mean of the applied mask: the share of open gates for a hard gate (its
    # straight-through value is 0/1 up to rounding), the mean p for soft
    # gating — the same reading as the evaluation's gate_open_rate.
    metrics["gate_open_rate"] = jnp.mean(
        jax.lax.stop_gradient(outputs["gate_mask"]).astype(jnp.float32))
  if "topk_short" in outputs:
    # NCL+TopK: the share of rows with fewer than k positive entries of
    # σ+(z), which keep fewer than k dims (models.top_k_mask).
    metrics["topk_short_row_frac"] = jnp.mean(
        outputs["topk_short"].astype(jnp.float32))
  metrics["loss"] = loss
  return loss, metrics
