"""Protocol `retrieval`: cosine precision@10 on the test split's z.

Each test sample queries the other test samples (itself excluded); the
score is the share of its 10 nearest neighbours (cosine) with its class.
All-zero rows (every gate closed, or every unit off) have no direction:
they are neither queries nor neighbours, and their number is reported
(retrieval_zero_rows; retrieval_queries are the rest).
"""
from __future__ import annotations

from typing import Any

from bayesncl_jax import metrics
from bayesncl_jax.evaluators import base


class RetrievalEvaluator(base.Evaluator):
  """retrieval_precision_at_10 on the test split's z, zero rows counted."""
  name = "retrieval"

  def run(self, ctx: base.Context) -> dict[str, Any]:
    te = ctx.test
    k = min(10, te["z"].shape[0] - 1)
    if k < 1:
      return {"retrieval_precision_at_10": float("nan")}
    out = metrics.retrieval_report(te["z"], te["label"], k=k)
    return {"retrieval_precision_at_10": out["precision"],
            "retrieval_zero_rows": out["zero_rows"],
            "retrieval_queries": out["queries"]}

  def describe(self, ctx):
    return {"features": "z of the test split", "similarity": "cosine",
            "k": 10, "query_excluded": True,
            "all_zero_rows": "excluded as queries and as neighbours, counted"}
