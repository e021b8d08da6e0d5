"""Interpretability and retrieval metrics of features (docs/method.md §5).

All metrics take features `f` of shape (N, D) (N samples, D feature dims;
numpy or jax, cast to float32) and, where needed, integer `labels` of shape
(N,) in [0, num_classes). The public functions validate shapes on the host,
run a jitted core and return plain Python floats (or numpy arrays where
stated).

Conventions shared by every metric:
  * An entry is *active* when |f_nd| > eps (eps = 1e-5 by default, §5); an
    entry with |f_nd| <= eps counts as zero.
  * A dim is *active* when at least one sample activates it. Equivalently:
    its mean |f| over samples is non-zero after zeroing the entries <= eps —
    the "non-zero mean |f|" of §5, without the floating-point ambiguity.
  * The *activation* of sample n on dim d is |f_nd|. For the non-negative
    NCL / BayesNCL features this is f_nd itself; for signed CL features the
    magnitude is what makes "active", "largest activation" and class sums of
    activations well defined (a signed class sum could be negative).
  * Rankings ("the k samples that activate a dim most", "the most active
    dims") take `rank_by`: "magnitude" ranks by |f| (the papers' code),
    "value" by f itself. They agree on non-negative features; on signed
    (CL) features "magnitude" mixes a dim's two ends, "value" keeps its
    positive end, which is what a top-activation picture means.
  * Averages over active dims are NaN when there is no active dim (or, for
    orthogonality, fewer than two): the average over an empty set has no
    value, and NaN says so instead of faking a 0 that reads as a score.

Memory: nothing builds an N×N matrix. Pairwise metrics (retrieval, kNN) map
over chunks of queries with `lax.map(..., batch_size=chunk_size)`, so only
chunk_size × N similarities exist at a time; the per-dim metrics use D×C,
D×k and D×D arrays.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# An entry counts as zero (inactive) at or below this magnitude (§5).
ZERO_TOL = 1e-5

_HIGHEST = jax.lax.Precision.HIGHEST
_ENTROPY_VARIANTS = ("frequency", "sum", "mean")
RANK_BY = ("magnitude", "value")
# NCL's disentanglement keeps the dims whose test activations sum above this.
DISENTANGLEMENT_MIN_TOTAL = 10.0


# ----------------------------------------------------------------------------
# Host-side validation.
# ----------------------------------------------------------------------------
def _as_features(f: Any, name: str = "f") -> jax.Array:
  """Returns f as a float32 (N, D) jax array with N, D >= 1, or raises."""
  f = jnp.asarray(f)
  if f.ndim != 2:
    raise ValueError(f"{name} must be 2-D (samples, dims), got shape "
                     f"{f.shape}")
  if f.shape[0] < 1 or f.shape[1] < 1:
    raise ValueError(f"{name} must have at least one sample and one dim, got "
                     f"shape {f.shape}")
  return f.astype(jnp.float32)


def _as_labels(labels: Any, n: int, num_classes: int | None = None,
               name: str = "labels") -> tuple[jax.Array, int]:
  """Returns (int32 labels (n,), num_classes); checks shape, dtype, range.

  num_classes=None means max(labels) + 1.
  """
  lab = np.asarray(labels)
  if lab.ndim != 1 or lab.shape[0] != n:
    raise ValueError(f"{name} must be 1-D of length {n} (one per feature "
                     f"row), got shape {lab.shape}")
  if not np.issubdtype(lab.dtype, np.integer):
    raise ValueError(f"{name} must be integers, got dtype {lab.dtype}")
  if num_classes is None:
    num_classes = int(lab.max()) + 1
  num_classes = int(num_classes)
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}")
  if lab.min() < 0 or lab.max() >= num_classes:
    raise ValueError(f"{name} must lie in [0, {num_classes}), got values in "
                     f"[{lab.min()}, {lab.max()}]")
  return jnp.asarray(lab, jnp.int32), num_classes


def _check_rank_by(rank_by: str) -> str:
  if rank_by not in RANK_BY:
    raise ValueError(f"rank_by must be one of {RANK_BY}, got {rank_by!r}")
  return rank_by


def _ranking_scores(f: jax.Array, rank_by: str) -> jax.Array:
  """|f| or f: the quantity samples are ranked by within a dim."""
  return jnp.abs(f) if _check_rank_by(rank_by) == "magnitude" else f


def _check_positive_int(value: Any, name: str) -> int:
  if isinstance(value, bool) or int(value) != value or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")
  return int(value)


# ----------------------------------------------------------------------------
# Jitted cores.
# ----------------------------------------------------------------------------
def _mean_over_active(per_dim: jax.Array, active: jax.Array) -> jax.Array:
  """Mean of per_dim (D,) over the dims where active (D,) holds; NaN if none."""
  n_active = jnp.sum(active)
  total = jnp.sum(jnp.where(active, per_dim, 0.0))
  return jnp.where(n_active > 0, total / jnp.maximum(n_active, 1), jnp.nan)


@jax.jit
def _active_dims_core(f, eps):
  return jnp.sum(jnp.any(jnp.abs(f) > eps, axis=0))


@jax.jit
def _active_dims_per_sample_core(f, eps):
  return jnp.sum(jnp.abs(f) > eps, axis=1)


@jax.jit
def _sparsity_core(f, eps):
  return jnp.mean(jnp.abs(f) <= eps)


@functools.partial(jax.jit, static_argnames=("num_classes", "variant"))
def _class_mass(f, labels, eps, num_classes, variant):
  """Per-dim class mass M (D, C), see `semantic_entropy` for the variants.

  M = Wᵀ onehot(labels) with W (N, D) = 1[|f| > eps] ("frequency") or
  |f| 1[|f| > eps] ("sum", "mean"); "mean" then divides column c by the
  class size N_c (max(N_c, 1): an empty class has zero mass anyway). One
  (D×N)·(N×C) matmul instead of a loop over dims or classes.
  """
  a = jnp.abs(f)
  active = a > eps
  if variant == "frequency":
    w = active.astype(jnp.float32)
  else:
    w = jnp.where(active, a, 0.0)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  mass = jnp.matmul(w.T, onehot, precision=_HIGHEST)
  if variant == "mean":
    class_sizes = jnp.sum(onehot, axis=0)
    mass = mass / jnp.maximum(class_sizes, 1.0)[None, :]
  return mass


@functools.partial(jax.jit, static_argnames=("num_classes", "top_k",
                                             "by_value"))
def _top_k_class_counts(f, labels, eps, num_classes, top_k, by_value=False):
  """Class counts (D, C) among each dim's top_k activations that are > eps.

  lax.top_k on |f|ᵀ (or fᵀ with by_value) (D, N) gives each dim's top_k
  samples (D, top_k); their labels are scatter-added into a D×C table —
  O(D·top_k) memory, no D×k×C one-hot.
  """
  scores = f if by_value else jnp.abs(f)
  values, idx = jax.lax.top_k(scores.T, top_k)                # (D, top_k)
  selected = (values > eps).astype(jnp.float32)
  dims = jnp.broadcast_to(jnp.arange(f.shape[1])[:, None], idx.shape)
  counts = jnp.zeros((f.shape[1], num_classes), jnp.float32)
  return counts.at[dims, labels[idx]].add(selected)


@jax.jit
def _purity_from_counts(counts):
  """(D,) max_c counts_dc / Σ_c counts_dc, NaN where Σ_c counts_dc = 0."""
  totals = jnp.sum(counts, axis=1)
  active = totals > 0
  purity = jnp.max(counts, axis=1) / jnp.where(active, totals, 1.0)
  return jnp.where(active, purity, jnp.nan)


@jax.jit
def _consistency_from_counts(counts):
  """mean over active dims of max_c counts_dc / Σ_c counts_dc."""
  totals = jnp.sum(counts, axis=1)
  active = totals > 0
  purity = jnp.max(counts, axis=1) / jnp.where(active, totals, 1.0)
  return _mean_over_active(purity, active)


@jax.jit
def _entropy_from_mass(mass):
  """mean over active dims of H(p_d), p_dc = M_dc / Σ_c M_dc (natural log)."""
  totals = jnp.sum(mass, axis=1)
  active = totals > 0
  p = mass / jnp.where(active, totals, 1.0)[:, None]
  # entr(p) = -p log p with entr(0) = 0: empty classes contribute nothing.
  entropy = jnp.sum(jax.scipy.special.entr(p), axis=1)
  return _mean_over_active(entropy, active)


@jax.jit
def _singular_value_entropy_core(f):
  """H = -Σ p_i log p_i, p = s / Σ s, s the singular values of f; NaN if f=0.

  Singular values of f equal those of R in the QR factorisation of f (taken
  in the tall orientation); QR of the tall matrix then an SVD of the small
  square R is ~3× faster on CPU than a direct SVD of a 5000×2048 matrix.
  """
  tall = f if f.shape[0] >= f.shape[1] else f.T
  r = jnp.linalg.qr(tall, mode="r")
  s = jnp.linalg.svd(r, compute_uv=False)
  total = jnp.sum(s)
  p = s / jnp.where(total > 0, total, 1.0)
  entropy = jnp.sum(jax.scipy.special.entr(p))
  return jnp.where(total > 0, entropy, jnp.nan)


@jax.jit
def _orthogonality_core(f, eps):
  """mean_{i≠j active} |Ĉ_ij|, Ĉ = F̂ᵀF̂, F̂ the unit-norm active columns.

  Inactive columns stay in the D×D matrix (static shapes under jit) but are
  masked out of the average. NaN with fewer than two active dims (no
  off-diagonal pair).
  """
  active = jnp.any(jnp.abs(f) > eps, axis=0)                  # (D,)
  norms = jnp.linalg.norm(f, axis=0)
  f_hat = f / jnp.where(active, norms, 1.0)
  gram = jnp.matmul(f_hat.T, f_hat, precision=_HIGHEST)       # (D, D)
  d = f.shape[1]
  off_diagonal = ~jnp.eye(d, dtype=bool)
  pairs = active[:, None] & active[None, :] & off_diagonal
  n_active = jnp.sum(active)
  n_pairs = n_active * (n_active - 1)
  total = jnp.sum(jnp.where(pairs, jnp.abs(gram), 0.0))
  return jnp.where(n_pairs > 0, total / jnp.maximum(n_pairs, 1), jnp.nan)


def _l2_normalise_rows(x: jax.Array) -> jax.Array:
  """x / ||x|| per row; all-zero rows stay zero (cosine 0 to everything)."""
  norm = jnp.linalg.norm(x, axis=1, keepdims=True)
  return x / jnp.where(norm > 0, norm, 1.0)


@functools.partial(jax.jit, static_argnames=("k", "chunk_size"))
def _retrieval_core(f, labels, valid, k, chunk_size):
  """Mean over valid queries of (1/k) #{k nearest valid rows by cosine, self
  excluded, same label}.

  valid: (N,) bool; invalid rows are neither queries nor neighbours (the
  caller guarantees at least k + 1 valid rows). Maps over chunks of
  chunk_size queries: each chunk holds a (chunk_size, N) similarity block,
  never the full N×N matrix.
  """
  keys = _l2_normalise_rows(f)
  n = f.shape[0]

  def one_query(query):
    vector, label, index = query
    sim = jnp.matmul(keys, vector, precision=_HIGHEST)          # (N,)
    sim = jnp.where((jnp.arange(n) == index) | ~valid, -jnp.inf, sim)
    _, neighbours = jax.lax.top_k(sim, k)
    return jnp.mean(labels[neighbours] == label)

  precision = jax.lax.map(one_query, (keys, labels, jnp.arange(n)),
                          batch_size=chunk_size)
  return jnp.sum(jnp.where(valid, precision, 0.0)) / jnp.sum(valid)


@functools.partial(jax.jit,
                   static_argnames=("num_classes", "k", "top_n", "chunk_size"))
def _knn_core(train_f, train_labels, test_f, test_labels, temperature,
              num_classes, k, top_n, chunk_size):
  """Weighted kNN hits (top-1, top-n) averaged over test queries.

  Votes v_c = Σ_{j ∈ kNN(q)} 1[y_j = c] exp(s_qj / T). Weights are computed
  as exp((s_qj − max_j s_qj) / T): a per-query constant factor, so the same
  ranking of classes, without overflow at small T.
  """
  keys = _l2_normalise_rows(train_f)
  queries = _l2_normalise_rows(test_f)

  def one_query(query):
    vector, label = query
    sim = jnp.matmul(keys, vector, precision=_HIGHEST)          # (N_train,)
    top_sim, neighbours = jax.lax.top_k(sim, k)
    weights = jnp.exp((top_sim - top_sim[0]) / temperature)
    votes = jnp.zeros((num_classes,), jnp.float32).at[
        train_labels[neighbours]].add(weights)
    _, ranked = jax.lax.top_k(votes, top_n)
    return ranked[0] == label, jnp.any(ranked == label)

  hit1, hit_n = jax.lax.map(one_query, (queries, test_labels),
                            batch_size=chunk_size)
  return jnp.mean(hit1), jnp.mean(hit_n)


# ----------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------
def active_dims(f, eps: float = ZERO_TOL) -> float:
  """Number of dims d with max_n |f_nd| > eps.

  f: (N, D). Same as counting dims with a non-zero mean |f| once entries
  with |f| <= eps are zeroed (§5 "non-zero mean |f|").
  """
  return float(_active_dims_core(_as_features(f), eps))


def active_dims_per_sample(f, eps: float = ZERO_TOL) -> np.ndarray:
  """(N,) int array: #{d : |f_nd| > eps} for each sample n (for histograms)."""
  return np.asarray(_active_dims_per_sample_core(_as_features(f), eps))


def sparsity(f, eps: float = ZERO_TOL) -> float:
  """Fraction of the N·D entries of f with |f_nd| <= eps."""
  return float(_sparsity_core(_as_features(f), eps))


def semantic_consistency(f, labels, num_classes: int | None = None,
                         top_k: int | None = None,
                         eps: float = ZERO_TOL,
                         rank_by: str = "magnitude") -> float:
  """Class consistency of dims, in [0, 1] (report ×100 as in the papers).

  For each active dim d let S_d be its selected samples:
    top_k=None: S_d = {n : |f_nd| > eps};
    top_k=K:    the K samples with the largest |f_nd| (rank_by="magnitude")
                or the largest f_nd (rank_by="value"), keeping only those
                with |f_nd| > eps (resp. f_nd > eps); K is clipped to N.
  consistency_d = max_c #{n ∈ S_d : y_n = c} / |S_d|, averaged over the
  active dims (those with S_d non-empty). NaN if no dim is active.

  f: (N, D); labels: (N,) ints in [0, num_classes) (default max + 1).
  """
  counts = _dim_label_counts(f, labels, num_classes, top_k, eps, rank_by)
  return float(_consistency_from_counts(counts))


def _dim_label_counts(f, labels, num_classes, top_k, eps, rank_by):
  """(D, C) label counts over each dim's activating (or top-k) samples."""
  f = _as_features(f)
  labels, num_classes = _as_labels(labels, f.shape[0], num_classes)
  by_value = _check_rank_by(rank_by) == "value"
  if top_k is None:
    counts = _class_mass(f, labels, eps, num_classes, "frequency")
  else:
    top_k = min(_check_positive_int(top_k, "top_k"), f.shape[0])
    counts = _top_k_class_counts(f, labels, eps, num_classes, top_k,
                                 by_value)
  return counts


def dim_purity(f, labels, num_classes: int | None = None,
               top_k: int | None = None, eps: float = ZERO_TOL,
               rank_by: str = "magnitude") -> np.ndarray:
  """(D,) float array: each dim's purity, NaN for a dim with no sample.

  purity_d = max_c #{n ∈ S_d : y_n = c} / |S_d| with S_d as in
  `semantic_consistency` (whose value is the mean of the non-NaN entries).
  With `labels` a nuisance label (e.g. the background), the same formula
  gives the dim's nuisance purity.
  """
  counts = _dim_label_counts(f, labels, num_classes, top_k, eps, rank_by)
  return np.asarray(_purity_from_counts(counts))


def dim_support(f, eps: float = ZERO_TOL) -> np.ndarray:
  """(D,) int array: #{n : |f_nd| > eps}, how many samples activate dim d.

  The papers' consistency is an unweighted mean over active dims, so a dim
  with support 1 counts as much as one with support 1000 (and scores 1.0);
  the support says how much each dim's purity rests on.
  """
  f = _as_features(f)
  return np.asarray(jnp.sum(jnp.abs(f) > eps, axis=0))


def semantic_entropy(f, labels, num_classes: int | None = None,
                     variant: str = "frequency",
                     eps: float = ZERO_TOL) -> float:
  """Mean over active dims of the entropy (natural log, nats) of the label
  distribution of each dim's activations. Lower = more class-pure; the range
  is [0, ln C].

  With A_d = {n : |f_nd| > eps}, N_c the size of class c over all N samples:
    "frequency": M_dc = #{n ∈ A_d : y_n = c}
    "sum":       M_dc = Σ_{n ∈ A_d, y_n = c} |f_nd|
    "mean":      M_dc = (Σ_{n ∈ A_d, y_n = c} |f_nd|) / N_c   (0 if N_c = 0)
  p_dc = M_dc / Σ_c M_dc, H_d = -Σ_c p_dc ln p_dc (0 ln 0 = 0), averaged over
  active dims. NaN if no dim is active.

  f: (N, D); labels: (N,) ints in [0, num_classes) (default max + 1).
  """
  if variant not in _ENTROPY_VARIANTS:
    raise ValueError(f"variant must be one of {_ENTROPY_VARIANTS}, got "
                     f"{variant!r}")
  f = _as_features(f)
  labels, num_classes = _as_labels(labels, f.shape[0], num_classes)
  mass = _class_mass(f, labels, eps, num_classes, variant)
  return float(_entropy_from_mass(mass))


def effective_rank(f) -> dict[str, float]:
  """Effective rank of f (Roy & Vetterli, 2007).

  With s_1..s_r the singular values of f (r = min(N, D)) and
  p_i = s_i / Σ_j s_j (singular values, not their squares):
    singular_value_entropy H = -Σ_i p_i ln p_i   (nats; §5 "erank" entropy)
    effective_rank         = exp(H)              in [1, r].
  Both are NaN for an all-zero f (no singular-value distribution).

  Returns {"singular_value_entropy": H, "effective_rank": exp(H)}.
  """
  entropy = float(_singular_value_entropy_core(_as_features(f)))
  return {"singular_value_entropy": entropy,
          "effective_rank": float(np.exp(entropy))}


def orthogonality(f, eps: float = ZERO_TOL) -> float:
  """Mean |C − I| over the off-diagonal entries of the active dims' C.

  Keep the active dims (columns), L2-normalise each column (no centring):
  F̂ (N, D_a); C = F̂ᵀF̂ (D_a, D_a), C_ij the cosine between dims i and j.
  Returns (1 / (D_a (D_a − 1))) Σ_{i≠j} |C_ij|: 0 = mutually orthogonal
  dims, 1 = all dims parallel. A scalar (the authors returned the whole
  matrix — a defect, §5). NaN if D_a < 2 (no off-diagonal entry).
  """
  return float(_orthogonality_core(_as_features(f), eps))


def disentanglement(f, min_total: float = DISENTANGLEMENT_MIN_TOTAL
                    ) -> dict[str, float]:
  """NCL's disentanglement: median |F̂ᵀF̂ − I| over the kept dims.

  Kept dims: Σ_n f_nd > min_total (the summed activation, as NCL's eval;
  the threshold is absolute, so it depends on N). F̂ = the kept columns,
  each L2-normalised; the median runs over all D_k² entries of
  |F̂ᵀF̂ − I|, diagonal included (its entries are 0), as NCL's code does.
  0 = mutually orthogonal dims. NaN when no dim is kept.

  Returns {"disentanglement": median, "disentanglement_dims": D_k}.
  """
  f = np.asarray(_as_features(f), np.float64)
  keep = f.sum(axis=0) > min_total
  if not keep.any():
    return {"disentanglement": float("nan"), "disentanglement_dims": 0}
  cols = f[:, keep]
  cols = cols / np.linalg.norm(cols, axis=0, keepdims=True)
  err = np.abs(cols.T @ cols - np.eye(cols.shape[1]))
  return {"disentanglement": float(np.median(err)),
          "disentanglement_dims": int(keep.sum())}


def most_active_dims(f, n: int, rank_by: str = "magnitude") -> np.ndarray:
  """(n,) int array: the n dims with the largest activation sum, descending.

  The sum is Σ_samples |f_nd| (rank_by="magnitude") or Σ_samples
  max(f_nd, 0) (rank_by="value": a signed dim's positive end only).
  """
  f = _as_features(f)
  n = _check_positive_int(n, "n")
  if n > f.shape[1]:
    raise ValueError(f"n={n} exceeds the number of dims {f.shape[1]}")
  scores = (jnp.abs(f) if _check_rank_by(rank_by) == "magnitude"
            else jnp.maximum(f, 0.0))
  _, dims = jax.lax.top_k(jnp.sum(scores, axis=0), n)
  return np.asarray(dims)


def top_activating_indices(f, dims: Sequence[int], k: int,
                           rank_by: str = "magnitude") -> np.ndarray:
  """(len(dims), k) int array: per dim, the k samples that activate it most.

  "Most" = largest |f_nd| (rank_by="magnitude") or largest f_nd
  (rank_by="value"). Row i lists sample indices for dims[i] in descending
  activation — the top-activated image grids of §5.
  """
  f = _as_features(f)
  dims = np.asarray(dims, dtype=np.int64).reshape(-1)
  k = _check_positive_int(k, "k")
  if k > f.shape[0]:
    raise ValueError(f"k={k} exceeds the number of samples {f.shape[0]}")
  if dims.size and (dims.min() < 0 or dims.max() >= f.shape[1]):
    raise ValueError(f"dims must lie in [0, {f.shape[1]}), got {dims}")
  columns = _ranking_scores(f[:, jnp.asarray(dims)], rank_by).T  # (len, N)
  _, idx = jax.lax.top_k(columns, k)
  return np.asarray(idx)


def nonzero_rows(f, eps: float = ZERO_TOL) -> np.ndarray:
  """(N,) bool: rows with at least one entry |f_nd| > eps."""
  return np.asarray(jnp.any(jnp.abs(_as_features(f)) > eps, axis=1))


def retrieval_report(f, labels, k: int = 10, top_dims: int | None = None,
                     chunk_size: int = 1024,
                     eps: float = ZERO_TOL) -> dict[str, float]:
  """Cosine retrieval precision@k; all-zero rows excluded and counted.

  For each query n: its k nearest other samples by cosine similarity, and
  the fraction of them with label y_n; mean over the queries. With
  `top_dims` set, only the `top_dims` dims of `most_active_dims` are used.

  A row with no entry above eps (every gate closed, or none of the kept
  dims active) has no direction: its cosine to every sample is undefined,
  and a 0 would make all samples its tied "neighbours", resolved by index
  order. Such rows are therefore neither queries nor neighbours; their
  number is returned. precision is NaN when fewer than k + 1 rows remain.

  f: (N, D); labels: (N,) ints. Needs 1 <= k <= N − 1. Only
  chunk_size × N similarities are held at a time. Returns {"precision",
  "zero_rows", "queries"} (queries = N − zero_rows).
  """
  f = _as_features(f)
  labels, _ = _as_labels(labels, f.shape[0])
  k = _check_positive_int(k, "k")
  if k > f.shape[0] - 1:
    raise ValueError(f"k={k} needs at least k + 1 samples, got "
                     f"{f.shape[0]}")
  chunk_size = min(_check_positive_int(chunk_size, "chunk_size"), f.shape[0])
  if top_dims is not None:
    f = f[:, jnp.asarray(most_active_dims(f, top_dims))]
  valid = nonzero_rows(f, eps)
  n_valid = int(valid.sum())
  precision = (float(_retrieval_core(f, labels, jnp.asarray(valid), k,
                                     chunk_size))
               if n_valid >= k + 1 else float("nan"))
  return {"precision": precision, "zero_rows": int(f.shape[0] - n_valid),
          "queries": n_valid}


def retrieval_precision_at_k(f, labels, k: int = 10,
                             top_dims: int | None = None,
                             chunk_size: int = 1024) -> float:
  """`retrieval_report(...)["precision"]`: all-zero rows excluded."""
  return retrieval_report(f, labels, k, top_dims, chunk_size)["precision"]


def knn_accuracy(train_f, train_labels, test_f, test_labels,
                 num_classes: int, k: int = 20, temperature: float = 0.07,
                 chunk_size: int = 1024) -> dict[str, float]:
  """Temperature-weighted kNN classification (Wu et al. 2018; DINO).

  Cosine similarity s between each test feature and all train features; the
  k most similar train samples vote for their class with weight
  exp(s / temperature); predictions rank classes by total vote.
    top1 = fraction of test samples whose best class is right,
    top5 = fraction whose label is among the min(5, num_classes) best.
  k is clipped to the number of train samples. Ties go to lower class ids.

  train_f: (N_train, D), train_labels: (N_train,); test_f: (N_test, D),
  test_labels: (N_test,). Only chunk_size × N_train similarities are held at
  a time. Returns {"top1": float, "top5": float}.
  """
  train_f = _as_features(train_f, "train_f")
  test_f = _as_features(test_f, "test_f")
  if train_f.shape[1] != test_f.shape[1]:
    raise ValueError(f"train_f and test_f must have the same number of dims, "
                     f"got {train_f.shape} and {test_f.shape}")
  num_classes = _check_positive_int(num_classes, "num_classes")
  train_labels, _ = _as_labels(train_labels, train_f.shape[0], num_classes,
                               "train_labels")
  test_labels, _ = _as_labels(test_labels, test_f.shape[0], num_classes,
                              "test_labels")
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  k = min(_check_positive_int(k, "k"), train_f.shape[0])
  chunk_size = min(_check_positive_int(chunk_size, "chunk_size"),
                   test_f.shape[0])
  top1, top5 = _knn_core(train_f, train_labels, test_f, test_labels,
                         jnp.float32(temperature), num_classes, k,
                         min(5, num_classes), chunk_size)
  return {"top1": float(top1), "top5": float(top5)}


def interpretability_report(f, labels, num_classes: int,
                            top_k: int | None = None, *,
                            retrieval_top_dims: int | None = None
                            ) -> dict[str, float]:
  """All scalar §5 metrics of features f (N, D) with labels (N,).

  `top_k` goes to semantic_consistency; `retrieval_top_dims` to
  retrieval_precision_at_k (k = 10, clipped to N − 1). Keys: active_dims,
  sparsity, semantic_consistency, semantic_entropy (frequency),
  semantic_entropy_sum, semantic_entropy_mean, effective_rank,
  singular_value_entropy, orthogonality, retrieval_precision_at_10.
  """
  f = _as_features(f)
  labels, num_classes = _as_labels(labels, f.shape[0], num_classes)
  rank = effective_rank(f)
  retrieval_k = min(10, f.shape[0] - 1)
  return {
      "active_dims": active_dims(f),
      "sparsity": sparsity(f),
      "semantic_consistency": semantic_consistency(
          f, labels, num_classes, top_k=top_k),
      "semantic_entropy": semantic_entropy(f, labels, num_classes,
                                           "frequency"),
      "semantic_entropy_sum": semantic_entropy(f, labels, num_classes, "sum"),
      "semantic_entropy_mean": semantic_entropy(f, labels, num_classes,
                                                "mean"),
      "effective_rank": rank["effective_rank"],
      "singular_value_entropy": rank["singular_value_entropy"],
      "orthogonality": orthogonality(f),
      "retrieval_precision_at_10": (
          retrieval_precision_at_k(f, labels, retrieval_k,
                                   top_dims=retrieval_top_dims)
          if retrieval_k >= 1 else float("nan")),
  }
