"""Tests for bayesncl_jax.metrics: hand-computed cases, naive loop references,
chunking invariance, edge cases and one ImageNet-100-sized smoke run."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from bayesncl_jax import metrics

LN2 = math.log(2.0)


def _entropy(*probs):
  return -sum(p * math.log(p) for p in probs if p > 0)


# ----------------------------------------------------------------------------
# Naive references: explicit Python loops, float64, written independently of
# the vectorised code.
# ----------------------------------------------------------------------------
def _naive_consistency(f, labels, top_k=None, eps=1e-5):
  scores = []
  for d in range(f.shape[1]):
    column = np.abs(f[:, d])
    if top_k is None:
      chosen = [n for n in range(len(column)) if column[n] > eps]
    else:
      order = sorted(range(len(column)), key=lambda n: -column[n])[:top_k]
      chosen = [n for n in order if column[n] > eps]
    if not chosen:
      continue
    counts = {}
    for n in chosen:
      counts[labels[n]] = counts.get(labels[n], 0) + 1
    scores.append(max(counts.values()) / len(chosen))
  return sum(scores) / len(scores)


def _naive_entropy(f, labels, num_classes, variant, eps=1e-5):
  entropies = []
  for d in range(f.shape[1]):
    mass = [0.0] * num_classes
    for n in range(f.shape[0]):
      a = abs(f[n, d])
      if a > eps:
        mass[labels[n]] += 1.0 if variant == "frequency" else a
    if variant == "mean":
      for c in range(num_classes):
        size = sum(1 for y in labels if y == c)
        mass[c] = mass[c] / size if size else 0.0
    total = sum(mass)
    if total == 0:
      continue
    entropies.append(_entropy(*[m / total for m in mass]))
  return sum(entropies) / len(entropies)


def _naive_orthogonality(f, eps=1e-5):
  active = [d for d in range(f.shape[1]) if np.max(np.abs(f[:, d])) > eps]
  values = []
  for i in active:
    for j in active:
      if i != j:
        a, b = f[:, i].astype(np.float64), f[:, j].astype(np.float64)
        values.append(abs(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b)))
  return sum(values) / len(values)


def _cosine_rows(x):
  x = x.astype(np.float64)
  norm = np.linalg.norm(x, axis=1, keepdims=True)
  return x / np.where(norm > 0, norm, 1.0)


def _naive_retrieval(f, labels, k):
  """All-zero rows are neither queries nor neighbours."""
  x = _cosine_rows(f)
  live = [n for n in range(len(x)) if np.any(np.abs(f[n]) > 1e-5)]
  precisions = []
  for q in live:
    others = [n for n in live if n != q]
    # Stable sort: equal similarities keep index order.
    ranked = sorted(others, key=lambda n: -float(x[q] @ x[n]))[:k]
    precisions.append(sum(labels[n] == labels[q] for n in ranked) / k)
  return float(np.mean(precisions))


def _naive_knn(train_f, train_labels, test_f, test_labels, num_classes, k,
               temperature):
  tr, te = _cosine_rows(train_f), _cosine_rows(test_f)
  top1 = top5 = 0
  for q in range(len(te)):
    sims = [float(te[q] @ tr[n]) for n in range(len(tr))]
    neighbours = sorted(range(len(tr)), key=lambda n: -sims[n])[:k]
    votes = [0.0] * num_classes
    for n in neighbours:
      votes[train_labels[n]] += math.exp(sims[n] / temperature)
    ranked = sorted(range(num_classes), key=lambda c: -votes[c])
    top1 += ranked[0] == test_labels[q]
    top5 += test_labels[q] in ranked[:min(5, num_classes)]
  return top1 / len(te), top5 / len(te)


def _sparse_random(rng, n, d, density, signed=False):
  values = rng.random((n, d)) if not signed else rng.normal(size=(n, d))
  return np.where(rng.random((n, d)) < density, values, 0.0).astype(np.float32)


# ----------------------------------------------------------------------------
# Hand-computed cases.
# ----------------------------------------------------------------------------
def test_sparsity_and_active_dims_by_hand():
  # Zeros at (0,0), (1,0), (1,1), (2,2) [5e-6 <= eps], (3,0): 5 of 12.
  f = np.array([[0., 1., 2.],
                [0., 0., 3.],
                [4., -5., 5e-6],
                [0., 6., 7.]])
  assert metrics.sparsity(f) == pytest.approx(5 / 12)
  assert metrics.active_dims(f) == 3.0
  np.testing.assert_array_equal(metrics.active_dims_per_sample(f),
                                [2, 1, 2, 2])
  # Column 2 only holds entries <= eps, column 0 is exactly zero.
  g = np.array([[0., 1., 5e-6],
                [0., 0., -5e-6],
                [0., -2., 0.]])
  assert metrics.active_dims(g) == 1.0
  np.testing.assert_array_equal(metrics.active_dims_per_sample(g), [1, 0, 1])
  assert metrics.sparsity(g) == pytest.approx(7 / 9)
  # A larger eps switches the 1 off too.
  assert metrics.active_dims(g, eps=1.5) == 1.0
  assert metrics.sparsity(g, eps=1.5) == pytest.approx(8 / 9)
  # |f| == eps counts as zero (0.5 is exact in float32).
  edge = np.array([[0.5, -0.5, 1.0], [0.25, 0.0, 0.0]])
  assert metrics.sparsity(edge, eps=0.5) == pytest.approx(5 / 6)
  assert metrics.active_dims(edge, eps=0.5) == 1.0
  np.testing.assert_array_equal(
      metrics.active_dims_per_sample(edge, eps=0.5), [1, 0])


# labels [0, 0, 1, 1]. dim 0 is active on samples 0, 1, 2 (labels 0, 0, 1),
# dim 1 on samples 2, 3 (labels 1, 1), dim 2 never.
_CONS_F = np.array([[0.1, 0.0, 0.0],
                    [0.2, 0.0, 0.0],
                    [0.9, 0.5, 0.0],
                    [0.0, 0.3, 0.0]])
_CONS_LABELS = np.array([0, 0, 1, 1])


def test_semantic_consistency_by_hand():
  # dim 0: 2/3, dim 1: 1, dim 2 inactive -> (2/3 + 1) / 2.
  assert metrics.semantic_consistency(_CONS_F, _CONS_LABELS) == pytest.approx(
      5 / 6)
  # A single dim active on labels [0, 0, 1].
  assert metrics.semantic_consistency(
      _CONS_F[:, :1], _CONS_LABELS, num_classes=2) == pytest.approx(2 / 3)


@pytest.mark.parametrize("top_k, expected", [
    (1, 1.0),        # dim 0: {2} -> 1; dim 1: {2} -> 1.
    (2, 0.75),       # dim 0: {2 (lab 1), 1 (lab 0)} -> 1/2; dim 1: {2, 3} -> 1.
    (3, 5 / 6),      # dim 0: {2, 1, 0} -> 2/3; dim 1: 3rd is 0 -> {2, 3} -> 1.
    (100, 5 / 6),    # clipped to N: the full variant.
])
def test_semantic_consistency_top_k_by_hand(top_k, expected):
  assert metrics.semantic_consistency(
      _CONS_F, _CONS_LABELS, top_k=top_k) == pytest.approx(expected)


def test_semantic_entropy_by_hand():
  # labels [0, 0, 0, 1] (class sizes 3 and 1).
  labels = np.array([0, 0, 0, 1])
  f = np.array([[3., 1., 0.],
                [0., 1., 0.],
                [0., 1., 0.],
                [1., 0., 0.]])
  # dim 0 frequency (1, 1) -> ln 2; sum (3, 1); mean (3/3, 1/1) -> ln 2.
  # dim 1: one class -> 0 in every variant. dim 2: inactive.
  assert metrics.semantic_entropy(f, labels) == pytest.approx(LN2 / 2)
  assert metrics.semantic_entropy(f, labels, variant="sum") == pytest.approx(
      _entropy(0.75, 0.25) / 2)
  assert metrics.semantic_entropy(f, labels, variant="mean") == pytest.approx(
      LN2 / 2)
  # Only dim 0: exactly the (1/2, 1/2) split.
  assert metrics.semantic_entropy(f[:, :1], labels) == pytest.approx(LN2)
  # An empty class (num_classes=3, nobody has label 2) changes nothing.
  assert metrics.semantic_entropy(
      f, labels, num_classes=3, variant="mean") == pytest.approx(LN2 / 2)
  with pytest.raises(ValueError, match="variant"):
    metrics.semantic_entropy(f, labels, variant="median")


def test_effective_rank_by_hand():
  # Singular values (3, 1): p = (3/4, 1/4).
  h = _entropy(0.75, 0.25)
  for f in (np.diag([3., 1.]),
            np.array([[3., 0., 0., 0.], [0., -1., 0., 0.]]),   # wide
            np.array([[0., 3.], [1., 0.], [0., 0.]])):           # tall
    out = metrics.effective_rank(f)
    assert out["singular_value_entropy"] == pytest.approx(h, rel=1e-5)
    assert out["effective_rank"] == pytest.approx(math.exp(h), rel=1e-5)
  # Singular values (1, 1, 0): ln 2 and exactly 2.
  out = metrics.effective_rank(np.eye(4, 3) * np.array([1., 1., 0.]))
  assert out["effective_rank"] == pytest.approx(2.0, rel=1e-5)
  # Rank one: 1.
  rank_one = np.outer([1., 2., 3.], [1., -1.])
  assert metrics.effective_rank(rank_one)["effective_rank"] == pytest.approx(
      1.0, abs=1e-4)


def test_orthogonality_by_hand():
  # Columns (1, 0) and (0.6, 0.8): cosine 0.6.
  f = np.array([[1., 0.6], [0., 0.8]])
  assert metrics.orthogonality(f) == pytest.approx(0.6)
  # Column scale, a sign flip and an inactive column change nothing.
  g = np.array([[2., -1.8, 0.], [0., 2.4, 0.]])
  assert metrics.orthogonality(g) == pytest.approx(0.6)
  # e1, e2, (e1 + e2)/sqrt(2): off-diagonal |C| = 0, 1/√2, 1/√2 (twice each).
  h = np.array([[1., 0., 1.], [0., 1., 1.]])
  assert metrics.orthogonality(h) == pytest.approx(2 / 3 / math.sqrt(2))
  assert metrics.orthogonality(np.eye(5)) == pytest.approx(0.0)


def _points_on_circle(degrees):
  t = np.deg2rad(np.asarray(degrees, np.float64))
  return np.stack([np.cos(t), np.sin(t)], axis=1)


# Angles 0, 10, 30, 80, 90 degrees; labels 0, 0, 1, 1, 1.
_RET_F = _points_on_circle([0, 10, 30, 80, 90])
_RET_LABELS = np.array([0, 0, 1, 1, 1])


def test_retrieval_precision_by_hand():
  # k=1 nearest: 0->1 ok, 1->0 ok, 2(30°)->1(10°) wrong, 3->4 ok, 4->3 ok.
  assert metrics.retrieval_precision_at_k(
      _RET_F, _RET_LABELS, k=1) == pytest.approx(0.8)
  # k=2: 0:{1,2} 1/2; 1:{0,2} 1/2; 2:{1,0} 0; 3:{4,2} 1; 4:{3,2} 1 -> 3/5.
  assert metrics.retrieval_precision_at_k(
      _RET_F, _RET_LABELS, k=2) == pytest.approx(0.6)
  # Cosine: positive row scales change nothing.
  scaled = _RET_F * np.array([[1.], [7.], [0.1], [3.], [2.]])
  assert metrics.retrieval_precision_at_k(
      scaled, _RET_LABELS, k=2) == pytest.approx(0.6)


def test_retrieval_top_dims_by_hand():
  labels = np.array([0, 0, 0, 1, 1, 1])
  # dims 0/1 (sums 9, 9) carry the class, dim 2 (sum 8) links samples 2, 3.
  f = np.array([[3., 0., 0.],
                [3., 0., 0.],
                [3., 0., 4.],
                [0., 3., 4.],
                [0., 3., 0.],
                [0., 3., 0.]])
  # All dims: cos(2, 3) = 16/25 > cos(2, 0) = 9/15, so 2 and 3 retrieve each
  # other (wrong); the 4 other queries are right.
  assert metrics.retrieval_precision_at_k(f, labels, k=1) == pytest.approx(
      4 / 6)
  np.testing.assert_array_equal(metrics.most_active_dims(f, 2), [0, 1])
  assert metrics.retrieval_precision_at_k(
      f, labels, k=1, top_dims=2) == pytest.approx(1.0)


def test_knn_temperature_weighting_by_hand():
  # Query at 0°: one class-0 neighbour at cosine 1, two class-1 neighbours
  # at cosine 0.5 (±60°).
  train = _points_on_circle([0, 60, -60])
  train_labels = np.array([0, 1, 1])
  test, test_labels = _points_on_circle([0]), np.array([0])
  # T = 0.07: e^{1/0.07} > 2 e^{0.5/0.07} -> class 0 (majority vote says 1).
  out = metrics.knn_accuracy(train, train_labels, test, test_labels,
                             num_classes=2, k=3, temperature=0.07)
  assert out == {"top1": 1.0, "top5": 1.0}
  # T = 100: e^{0.01} < 2 e^{0.005} -> class 1; top-5 clipped to 2 classes.
  out = metrics.knn_accuracy(train, train_labels, test, test_labels,
                             num_classes=2, k=3, temperature=100.0)
  assert out == {"top1": 0.0, "top5": 1.0}
  # k=1 (and k > N_train clipped to 3 gives the T=0.07 answer again).
  assert metrics.knn_accuracy(train, train_labels, test, test_labels, 2,
                              k=1)["top1"] == 1.0
  assert metrics.knn_accuracy(train, train_labels, test, test_labels, 2,
                              k=50, temperature=0.07)["top1"] == 1.0


def test_knn_top5_by_hand():
  # 7 classes; a query at 0°; train sample of class c at angle 10·c degrees,
  # so votes fall with c. Labels 0..4 are in the top 5, 5 and 6 are not.
  train = _points_on_circle([0, 10, 20, 30, 40, 50, 60])
  train_labels = np.arange(7)
  test = _points_on_circle([0, 0, 0, 0])
  test_labels = np.array([0, 4, 5, 6])
  out = metrics.knn_accuracy(train, train_labels, test, test_labels,
                             num_classes=7, k=7)
  assert out["top1"] == pytest.approx(1 / 4)
  assert out["top5"] == pytest.approx(2 / 4)


def test_top_activating_and_most_active_by_hand():
  f = np.array([[0.0, 5.0, 1.0],
                [3.0, 0.0, 1.5],
                [1.0, 2.0, 0.5],
                [2.0, 4.0, 0.0]])
  np.testing.assert_array_equal(
      metrics.top_activating_indices(f, [1, 0], k=3),
      [[0, 3, 2], [1, 3, 2]])
  # Column sums 6, 11, 3.
  np.testing.assert_array_equal(metrics.most_active_dims(f, 3), [1, 0, 2])
  np.testing.assert_array_equal(metrics.most_active_dims(f, 1), [1])
  assert metrics.top_activating_indices(f, [2], k=1).shape == (1, 1)


# ----------------------------------------------------------------------------
# Against the naive references on random data.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("signed", [False, True])
def test_metrics_match_naive_references(signed):
  rng = np.random.default_rng(0 if signed else 1)
  n, d, c = 40, 12, 4
  f = _sparse_random(rng, n, d, density=0.3, signed=signed)
  f[:, 3] = 0.0                     # an inactive dim
  f[5, 7] = 3e-6                    # an entry below eps
  labels = rng.integers(0, c, size=n)
  assert metrics.active_dims(f) == float(
      sum(np.max(np.abs(f[:, j])) > 1e-5 for j in range(d)))
  assert metrics.sparsity(f) == pytest.approx(
      np.count_nonzero(np.abs(f) <= 1e-5) / f.size)
  assert metrics.semantic_consistency(f, labels, c) == pytest.approx(
      _naive_consistency(f, labels), rel=1e-6)
  for top_k in (1, 3, 8):
    assert metrics.semantic_consistency(
        f, labels, c, top_k=top_k) == pytest.approx(
            _naive_consistency(f, labels, top_k=top_k), rel=1e-6)
  for variant in ("frequency", "sum", "mean"):
    assert metrics.semantic_entropy(
        f, labels, c, variant=variant) == pytest.approx(
            _naive_entropy(f, labels, c, variant), rel=1e-5)
  s = np.linalg.svd(f.astype(np.float64), compute_uv=False)
  p = s / s.sum()
  h = -np.sum(p[p > 0] * np.log(p[p > 0]))
  rank = metrics.effective_rank(f)
  assert rank["singular_value_entropy"] == pytest.approx(h, rel=1e-5)
  assert rank["effective_rank"] == pytest.approx(np.exp(h), rel=1e-5)
  assert rank["effective_rank"] == pytest.approx(
      metrics.effective_rank(f.T)["effective_rank"], rel=1e-5)
  assert metrics.orthogonality(f) == pytest.approx(_naive_orthogonality(f),
                                                   rel=1e-5)
  # top_activating_indices / most_active_dims against a sort.
  np.testing.assert_array_equal(
      metrics.most_active_dims(f, 5),
      np.argsort(-np.abs(f).sum(0), kind="stable")[:5])
  order = np.argsort(-np.abs(f[:, [0, 2]]).T, axis=1, kind="stable")[:, :4]
  np.testing.assert_array_equal(
      metrics.top_activating_indices(f, [0, 2], 4), order)
  # jax input gives the same as numpy input.
  assert metrics.semantic_consistency(jnp.asarray(f), jnp.asarray(labels),
                                      c) == metrics.semantic_consistency(
                                          f, labels, c)


def test_retrieval_matches_naive_and_is_chunk_invariant():
  rng = np.random.default_rng(2)
  n, d = 23, 6
  f = _sparse_random(rng, n, d, density=0.6)
  f[4] = 0.0                                     # an all-zero row
  labels = rng.integers(0, 3, size=n)
  # Each (k, chunk) pair compiles anew: all chunk sizes for one k only.
  for k, chunks in ((5, (1, 4, 7, n, 100)), (1, (7,))):  # 4, 7 ∤ 23
    expected = _naive_retrieval(f, labels, k)
    for chunk in chunks:
      got = metrics.retrieval_precision_at_k(f, labels, k=k, chunk_size=chunk)
      assert np.isfinite(got)
      assert got == pytest.approx(expected, abs=1e-6), (k, chunk)
  dims = metrics.most_active_dims(f, 3)
  assert metrics.retrieval_precision_at_k(
      f, labels, k=3, top_dims=3, chunk_size=5) == pytest.approx(
          _naive_retrieval(f[:, dims], labels, 3), abs=1e-6)


def test_knn_matches_naive_and_is_chunk_invariant():
  rng = np.random.default_rng(3)
  c = 6
  centres = rng.normal(size=(c, 8))
  train_labels = rng.integers(0, c, size=60)
  test_labels = rng.integers(0, c, size=19)
  train = centres[train_labels] + 1.5 * rng.normal(size=(60, 8))
  test = centres[test_labels] + 1.5 * rng.normal(size=(19, 8))
  test[2] = 0.0                                  # an all-zero query
  for k, temperature, chunks in ((5, 0.07, (1, 4, 19, 64)),  # 4 ∤ 19
                                 (20, 0.5, (4,))):
    top1, top5 = _naive_knn(train, train_labels, test, test_labels, c, k,
                            temperature)
    assert 0.0 < top1 < top5 <= 1.0     # a non-degenerate reference
    for chunk in chunks:
      out = metrics.knn_accuracy(train, train_labels, test, test_labels, c,
                                 k=k, temperature=temperature,
                                 chunk_size=chunk)
      assert out["top1"] == pytest.approx(top1), (k, chunk)
      assert out["top5"] == pytest.approx(top5), (k, chunk)


# ----------------------------------------------------------------------------
# Edge cases and validation.
# ----------------------------------------------------------------------------
def test_no_active_dims_gives_nan_not_a_crash():
  f = np.zeros((6, 4))
  f[0, 0] = 1e-6
  labels = np.array([0, 1, 0, 1, 0, 1])
  assert metrics.active_dims(f) == 0.0
  assert metrics.sparsity(f) == 1.0
  assert math.isnan(metrics.semantic_consistency(f, labels))
  assert math.isnan(metrics.semantic_consistency(f, labels, top_k=2))
  for variant in ("frequency", "sum", "mean"):
    assert math.isnan(metrics.semantic_entropy(f, labels, variant=variant))
  assert math.isnan(metrics.orthogonality(f))
  assert math.isnan(metrics.effective_rank(np.zeros((3, 2)))["effective_rank"])
  # All rows are zero: no retrieval query is left (NaN, counted), and kNN
  # stays finite.
  ret = metrics.retrieval_report(f, labels, k=2)
  assert math.isnan(ret["precision"]) and ret["zero_rows"] == 6
  out = metrics.knn_accuracy(f, labels, f, labels, num_classes=2, k=3)
  assert np.isfinite(out["top1"]) and np.isfinite(out["top5"])
  report = metrics.interpretability_report(f, labels, num_classes=2)
  assert report["active_dims"] == 0.0
  # One active dim: consistency is defined, orthogonality (no pair) is not.
  f[:, 1] = [1., 1., 0., 0., 0., 0.]
  assert metrics.semantic_consistency(f, labels) == pytest.approx(0.5)
  assert math.isnan(metrics.orthogonality(f))


def test_validation_errors():
  f = np.ones((4, 3))
  labels = np.array([0, 1, 0, 1])
  with pytest.raises(ValueError, match="2-D"):
    metrics.sparsity(np.ones(5))
  with pytest.raises(ValueError, match="2-D"):
    metrics.active_dims(np.ones((2, 3, 4)))
  with pytest.raises(ValueError, match="length 4"):
    metrics.semantic_consistency(f, labels[:3])
  with pytest.raises(ValueError, match="1-D"):
    metrics.semantic_entropy(f, labels[:, None])
  with pytest.raises(ValueError, match="integers"):
    metrics.semantic_consistency(f, labels.astype(np.float32))
  with pytest.raises(ValueError, match=r"\[0, 2\)"):
    metrics.semantic_consistency(f, np.array([0, 1, 2, 1]), num_classes=2)
  with pytest.raises(ValueError, match="top_k"):
    metrics.semantic_consistency(f, labels, top_k=0)
  with pytest.raises(ValueError, match="k=4"):
    metrics.retrieval_precision_at_k(f, labels, k=4)
  with pytest.raises(ValueError, match="same number of dims"):
    metrics.knn_accuracy(f, labels, np.ones((2, 5)), labels[:2], 2)
  with pytest.raises(ValueError, match="temperature"):
    metrics.knn_accuracy(f, labels, f, labels, 2, temperature=0.0)
  with pytest.raises(ValueError, match="exceeds"):
    metrics.most_active_dims(f, 4)
  with pytest.raises(ValueError, match="dims"):
    metrics.top_activating_indices(f, [3], 2)


def test_report_keys_and_values_small():
  rng = np.random.default_rng(4)
  f = _sparse_random(rng, 30, 10, density=0.4)
  labels = rng.integers(0, 3, size=30)
  report = metrics.interpretability_report(f, labels, num_classes=3, top_k=5)
  assert set(report) == {
      "active_dims", "sparsity", "semantic_consistency", "semantic_entropy",
      "semantic_entropy_sum", "semantic_entropy_mean", "effective_rank",
      "singular_value_entropy", "orthogonality", "retrieval_precision_at_10"}
  assert all(isinstance(v, float) for v in report.values())
  assert report["semantic_consistency"] == metrics.semantic_consistency(
      f, labels, 3, top_k=5)
  assert report["semantic_entropy_mean"] == metrics.semantic_entropy(
      f, labels, 3, variant="mean")
  assert report["retrieval_precision_at_10"] == pytest.approx(
      _naive_retrieval(f, labels, 10), abs=1e-6)
  with_dims = metrics.interpretability_report(f, labels, 3,
                                              retrieval_top_dims=4)
  assert with_dims["retrieval_precision_at_10"] == pytest.approx(
      _naive_retrieval(f[:, metrics.most_active_dims(f, 4)], labels, 10),
      abs=1e-6)


@pytest.mark.slow
def test_report_runs_at_imagenet100_size():
  rng = np.random.default_rng(5)
  n, d, c = 5000, 2048, 100
  mask = rng.random((n, d), dtype=np.float32) < 0.05
  f = np.where(mask, rng.random((n, d), dtype=np.float32), np.float32(0))
  labels = rng.integers(0, c, size=n)
  report = metrics.interpretability_report(f, labels, num_classes=c)
  assert all(np.isfinite(v) for v in report.values()), report
  assert report["sparsity"] == pytest.approx(0.95, abs=0.01)
  assert report["active_dims"] == float(d)


# ----------------------------------------------------------------------------
# Value rankings, support, purity, disentanglement, all-zero retrieval rows.
# ----------------------------------------------------------------------------
def test_top_k_consistency_by_value_on_signed_features():
  # Dim 0: large positive values on class 0, large negative ones on class 1:
  # by |f| its top 4 mix both classes, by value they are all class 0.
  f = np.array([[5., 1.], [4., 1.], [-6., 1.], [-5., 1.], [0.5, -1.],
                [0.2, 2.]])
  labels = np.array([0, 0, 1, 1, 1, 0])
  # dim 0 top-2 by value {0, 1} -> 1.0; dim 1 top-2 by value: 5 (2.), then
  # the tie 0..3 (1.) resolved to the lowest index 0 -> {5, 0} both class 0.
  assert metrics.semantic_consistency(
      f, labels, 2, top_k=2, rank_by="value") == pytest.approx(1.0)
  # by magnitude dim 0 takes {2 (6), 0 (5)} -> 0.5; dim 1 takes {5, 0} -> 1.
  assert metrics.semantic_consistency(
      f, labels, 2, top_k=2, rank_by="magnitude") == pytest.approx(0.75)
  np.testing.assert_array_equal(metrics.top_activating_indices(
      f, [0], 3, rank_by="value"), [[0, 1, 4]])
  np.testing.assert_array_equal(metrics.top_activating_indices(
      f, [0], 3), [[2, 0, 3]])
  # Σ max(f, 0): dim 0 9.7, dim 1 6; Σ |f|: dim 0 20.7 too. A dim whose mass
  # is negative ranks last by value.
  g = np.stack([f[:, 0], -np.abs(f[:, 0]) * 2, f[:, 1]], axis=1)
  np.testing.assert_array_equal(metrics.most_active_dims(g, 3, "value"),
                                [0, 2, 1])
  np.testing.assert_array_equal(metrics.most_active_dims(g, 3), [1, 0, 2])
  with pytest.raises(ValueError, match="rank_by"):
    metrics.most_active_dims(g, 1, "abs")


def test_purity_support_and_top_k_consistency_against_numpy():
  rng = np.random.default_rng(7)
  n, d, c = 60, 9, 4
  f = rng.normal(size=(n, d))
  f[rng.random((n, d)) < 0.6] = 0.0        # sparse, signed
  f[:, 8] = 0.0                            # a dead dim
  labels = rng.integers(0, c, n)
  support = (np.abs(f) > metrics.ZERO_TOL).sum(0)
  np.testing.assert_array_equal(metrics.dim_support(f), support)
  purity = np.full(d, np.nan)
  top = np.full(d, np.nan)
  k = 7
  for j in range(d):
    act = np.abs(f[:, j]) > metrics.ZERO_TOL
    if act.any():
      purity[j] = np.bincount(labels[act], minlength=c).max() / act.sum()
    order = np.argsort(-f[:, j], kind="stable")[:k]
    order = order[f[order, j] > metrics.ZERO_TOL]
    if order.size:
      top[j] = np.bincount(labels[order], minlength=c).max() / order.size
  np.testing.assert_allclose(metrics.dim_purity(f, labels, c), purity)
  np.testing.assert_allclose(
      metrics.dim_purity(f, labels, c, top_k=k, rank_by="value"), top)
  assert metrics.semantic_consistency(f, labels, c) == pytest.approx(
      np.nanmean(purity))
  assert metrics.semantic_consistency(
      f, labels, c, top_k=k, rank_by="value") == pytest.approx(
          np.nanmean(top))


def test_disentanglement_by_hand_and_against_numpy():
  # Dims 0 and 1 sum to 12 and 11, dim 2 to 3 (dropped). cos(0, 1) = 0.6.
  f = np.zeros((25, 3))
  f[:4, 0] = 3.0                    # column (3,3,3,3,0,...)
  f[:, 1] = 0.0
  f[:4, 1] = [2.75, 2.75, 0., 0.]
  f[4:8, 1] = [2.75, 2.75, 0., 0.]
  f[10, 2] = 3.0
  col0, col1 = f[:, 0] / np.linalg.norm(f[:, 0]), f[:, 1] / np.linalg.norm(
      f[:, 1])
  cos = float(col0 @ col1)
  assert cos == pytest.approx(0.5)
  out = metrics.disentanglement(f)
  assert out["disentanglement_dims"] == 2
  # |C − I| = [[0, .5], [.5, 0]]: median of (0, .5, .5, 0) = 0.25.
  assert out["disentanglement"] == pytest.approx(0.25)
  rng = np.random.default_rng(3)
  g = np.maximum(rng.normal(size=(200, 12)), 0.0)
  g[:, 5] *= 0.01                              # sum < 10: dropped
  keep = g.sum(0) > 10
  cols = g[:, keep] / np.linalg.norm(g[:, keep], axis=0)
  want = np.median(np.abs(cols.T @ cols - np.eye(keep.sum())))
  got = metrics.disentanglement(g)
  assert got["disentanglement_dims"] == 11
  assert got["disentanglement"] == pytest.approx(want, rel=1e-6)
  assert math.isnan(metrics.disentanglement(g * 0)["disentanglement"])


def test_retrieval_excludes_and_counts_all_zero_rows():
  # Rows 0-3 at 0, 10, 170, 180 degrees (labels 0, 0, 1, 1); rows 4, 5 all
  # zero (label 0). With cosine 0 to everything, the zero rows would beat
  # the opposite points (cosine < 0) as neighbours.
  f = np.zeros((6, 2))
  f[:4] = _points_on_circle([0, 10, 170, 180])
  labels = np.array([0, 0, 1, 1, 0, 0])
  out = metrics.retrieval_report(f, labels, k=1)
  assert out == {"precision": pytest.approx(1.0), "zero_rows": 2,
                 "queries": 4}
  # k=3: each query sees exactly the 3 other non-zero rows, one of its
  # class: 1/3 (with the zero rows as neighbours it would be 2/3).
  assert metrics.retrieval_precision_at_k(f, labels, k=3) == pytest.approx(
      1 / 3)
  # Fewer than k + 1 non-zero rows left: NaN, not a made-up number.
  assert math.isnan(metrics.retrieval_precision_at_k(f, labels, k=4))
