"""Protocol `linear`: a linear probe on the frozen backbone features h.

docs/method.md §5: h, not z; backbone in eval mode; top-1/top-5 on the test
split. Two ways, chosen by `EvalOptions.linear_probe` (config
`eval.linear_probe`):

  features   the train split's h extracted once, un-augmented; the probe is
             then one jitted loop over those features (`linear_probe`) —
             seconds, the Fashion-MNIST demo's default.
  augmented  a random resized crop + flip of every training image in every
             epoch through the frozen backbone (`supervised`), as
             solo-learn's probe trains — the papers' recipe, the CIFAR and
             ImageNet-100 default; `epochs` passes through the backbone.

Either way the head is tested on the test split's h (eval-mode
preprocessing: the image as is, or ImageNet's resize + centre crop) and
linear_train_top1 is its accuracy on the un-augmented train split's h.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from bayesncl_jax.evaluators import base
from bayesncl_jax.evaluators import linear_probe
from bayesncl_jax.evaluators import supervised


class LinearEvaluator(base.Evaluator):
  """linear_top1 / linear_top5 on the test split, linear_train_top1."""
  name = "linear"

  def run(self, ctx: base.Context) -> dict[str, Any]:
    options = self.options
    tr, te = ctx.train, ctx.test
    if options.linear_probe == "features":
      acc = linear_probe.linear_eval(tr["h"], tr["label"], te["h"],
                                     te["label"], ctx.num_classes,
                                     options.probe)
      return {"linear_top1": acc["top1"], "linear_top5": acc["top5"],
              "linear_train_top1": acc["train_top1"]}
    result = supervised.train_supervised(
        ctx.setup, ctx.state, options.probe, epochs=options.probe.epochs,
        finetune=False, crop_scale=options.crop_scale,
        max_examples=options.max_examples)
    d = te["h"].shape[1]
    probe = linear_probe.LinearProbe(jnp.zeros((d,)), jnp.ones((d,)),
                                     result.head["w"], result.head["b"])
    test = linear_probe.probe_accuracy(probe, te["h"], te["label"])
    train = linear_probe.probe_accuracy(probe, tr["h"], tr["label"])
    return {"linear_top1": test["top1"], "linear_top5": test["top5"],
            "linear_train_top1": train["top1"]}

  def describe(self, ctx):
    options = self.options
    out = {"mode": options.linear_probe,
           "features": "h (backbone, eval mode)",
           **dataclasses.asdict(options.probe)}
    if options.linear_probe == "augmented":
      out.update(standardize=False, crop_scale=list(options.crop_scale),
                 hflip_prob=supervised.HFLIP_PROB,
                 augmentation="random resized crop + horizontal flip, "
                 "drawn anew every epoch")
    return out
