"""Pins the activity threshold (|f| > 1e-5) in every metric that uses it.

The hand-value tests in test_metrics.py place their small entries at 5e-6
and 0, so the threshold could move anywhere in (5e-6, 1) unnoticed. Here one
dim holds only entries at 1e-4 (ten times above the threshold: active) and
one only entries at 1e-6 (ten times below: zero), and every statistic is
checked by hand with the default threshold; moving it by a factor of 10
either way changes each value.
"""
import math

import numpy as np
import pytest

from bayesncl_jax import metrics

ABOVE, BELOW = 1e-4, 1e-6
# dim 0: only 1e-4 entries (samples 0, 2); dim 1: only 1e-6 (samples 0, 1);
# dim 2: 0.5 on samples 0, 1, 3; dim 3: 1.0 on samples 1, 2; dim 4: zero.
F = np.array([[ABOVE, BELOW, 0.5, 0.0, 0.0],
              [0.0, BELOW, 0.5, 1.0, 0.0],
              [ABOVE, 0.0, 0.0, 1.0, 0.0],
              [0.0, 0.0, 0.5, 0.0, 0.0]], np.float32)
LABELS = np.array([0, 0, 1, 1])
# The active dims are 0, 2, 3, with these label sets (by sample):
#   dim 0: {0, 1}; dim 2: {0, 0, 1}; dim 3: {0, 1}.


def _entropy(p):
  return -sum(x * math.log(x) for x in p if x > 0)


def test_threshold_constant():
  assert metrics.ZERO_TOL == 1e-5


def test_counts_at_the_threshold():
  assert metrics.active_dims(F) == 3.0
  np.testing.assert_array_equal(metrics.active_dims_per_sample(F),
                                [2, 2, 2, 1])
  assert metrics.sparsity(F) == pytest.approx(13 / 20)


def test_signed_entries_count_by_magnitude_at_the_threshold():
  np.testing.assert_array_equal(metrics.active_dims_per_sample(-F),
                                [2, 2, 2, 1])
  assert metrics.sparsity(-F) == pytest.approx(13 / 20)


def test_semantic_consistency_at_the_threshold():
  # dim 0: 1/2, dim 2: 2/3, dim 3: 1/2.
  assert metrics.semantic_consistency(F, LABELS) == pytest.approx(
      (1 / 2 + 2 / 3 + 1 / 2) / 3)
  # Top-2 samples per dim, kept only if active. dim 2's ties (0.5 on
  # samples 0, 1, 3) go to the lower indices 0, 1: purity 1.
  assert metrics.semantic_consistency(F, LABELS, top_k=2) == pytest.approx(
      (1 / 2 + 1 + 1 / 2) / 3)


@pytest.mark.parametrize("variant", ["frequency", "sum", "mean"])
def test_semantic_entropy_at_the_threshold(variant):
  # Each class has 2 samples and dims 0, 3 have equal entries within a dim,
  # so all three variants give (ln 2 + H(2/3, 1/3) + ln 2) / 3 here.
  want = (2 * math.log(2) + _entropy([2 / 3, 1 / 3])) / 3
  assert metrics.semantic_entropy(F, LABELS, variant=variant) == (
      pytest.approx(want, rel=1e-5))


def test_orthogonality_at_the_threshold():
  # Unit columns: dim 0 (1,0,1,0)/√2, dim 2 (1,1,0,1)/√3,
  # dim 3 (0,1,1,0)/√2.
  # |cos|: (0,2) 1/√6, (0,3) 1/2, (2,3) 1/√6.
  want = (2 / math.sqrt(6) + 1 / 2) / 3
  assert metrics.orthogonality(F) == pytest.approx(want, rel=1e-5)


def test_report_uses_the_threshold():
  report = metrics.interpretability_report(F, LABELS, 2)
  assert report["active_dims"] == 3.0
  assert report["sparsity"] == pytest.approx(13 / 20)
  assert report["semantic_consistency"] == pytest.approx(5 / 9)
  assert report["orthogonality"] == pytest.approx(
      (2 / math.sqrt(6) + 1 / 2) / 3, rel=1e-5)
