"""Protocol `finetune`: backbone + linear head trained end to end on labels.

NCL's third protocol (docs/method.md §9): the pre-trained backbone and a linear
head (initialised at zero) are trained with cross-entropy on the train
split's labels, random resized crop + horizontal flip drawn every epoch,
BatchNorm in training mode; `finetune_epochs` epochs (30 by default) with
the linear probe's optimiser and schedule (`EvalOptions.probe`). The
fine-tuned network is then tested on the test split in eval mode:
finetune_top1 / finetune_top5. Not run by default (it trains the whole
network): `--protocols=finetune`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from bayesncl_jax.evaluators import base
from bayesncl_jax.evaluators import supervised


class FinetuneEvaluator(base.Evaluator):
  """finetune_top1 / finetune_top5 of the fine-tuned network."""
  name = "finetune"

  def run(self, ctx: base.Context) -> dict[str, Any]:
    options = self.options
    result = supervised.train_supervised(
        ctx.setup, ctx.state, options.probe, epochs=options.finetune_epochs,
        finetune=True, crop_scale=options.crop_scale,
        max_examples=options.max_examples)
    out = supervised.classifier_logits(
        ctx.setup, result, ctx.config.dataset.eval_split,
        options.batch_size, options.max_examples)
    acc = supervised.top_k_accuracy(out["logits"], out["label"])
    return {"finetune_top1": acc["top1"], "finetune_top5": acc["top5"],
            "finetune_train_loss": result.last_epoch_loss}

  def describe(self, ctx):
    options = self.options
    probe = dataclasses.asdict(options.probe)
    probe.pop("standardize")
    return {**probe, "epochs": options.finetune_epochs,
            "crop_scale": list(options.crop_scale),
            "hflip_prob": supervised.HFLIP_PROB,
            "trained": "backbone + linear head (BatchNorm in training mode)",
            "evaluated": "test split, eval mode"}
