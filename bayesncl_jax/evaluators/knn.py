"""Protocol `knn`: weighted kNN classification on the backbone features h.

Queries are the test split's h, the neighbour pool is the train split's h
(cosine similarity, votes weighted exp(s / T); `metrics.knn_accuracy`).
"""
from __future__ import annotations

from typing import Any

from bayesncl_jax import metrics
from bayesncl_jax.evaluators import base


class KnnEvaluator(base.Evaluator):
  """knn_top1 / knn_top5 of test queries against the train pool."""
  name = "knn"

  def run(self, ctx: base.Context) -> dict[str, Any]:
    tr, te = ctx.train, ctx.test
    knn = metrics.knn_accuracy(tr["h"], tr["label"], te["h"], te["label"],
                               ctx.num_classes, k=self.options.knn_k,
                               temperature=self.options.knn_temperature)
    return {"knn_top1": knn["top1"], "knn_top5": knn["top5"]}

  def describe(self, ctx):
    return {"k": self.options.knn_k,
            "temperature": self.options.knn_temperature,
            "features": "h", "similarity": "cosine",
            "pool": "train split", "queries": "test split"}
