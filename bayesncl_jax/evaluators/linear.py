"""Protocol `linear`: a linear probe on the frozen backbone features h.

The probe is trained on the train split's h and tested on the test split's
h (METHOD.md §5: h, not z; backbone in eval mode), with the settings of
`EvalOptions.probe` (`linear_probe.ProbeConfig`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from bayesncl_jax.evaluators import base
from bayesncl_jax.evaluators import linear_probe


class LinearEvaluator(base.Evaluator):
  """linear_top1 / linear_top5 on the test split, linear_train_top1."""
  name = "linear"

  def run(self, ctx: base.Context) -> dict[str, Any]:
    tr, te = ctx.train, ctx.test
    acc = linear_probe.linear_eval(tr["h"], tr["label"], te["h"], te["label"],
                                   ctx.num_classes, self.options.probe)
    return {"linear_top1": acc["top1"], "linear_top5": acc["top5"],
            "linear_train_top1": acc["train_top1"]}

  def describe(self, ctx):
    return {"features": "h (backbone, eval mode)",
            **dataclasses.asdict(self.options.probe)}
