"""Protocol `grids`: the papers' top-activation pictures.

For the most active test dims, the test images that activate each most,
captioned with their classes (top_activations.png, and the arrays in
top_activations.npz); `top_activation_purity` is the mean share of the most
frequent class in each row. Rankings are by value, not |z|: dims by
Σ_n max(z_nd, 0), images by the largest z_nd. For the non-negative NCL /
BayesNCL features this is the same as |z|; a signed CL dim shows its
positive end instead of a mix of both ends.
"""
from __future__ import annotations

from typing import Any

from absl import logging
import numpy as np

from bayesncl_jax import datasets
from bayesncl_jax import input_pipeline
from bayesncl_jax import metrics
from bayesncl_jax import plots
from bayesncl_jax.evaluators import base


def top_activation_examples(config, split: str, feats: dict[str, np.ndarray],
                            n_dims: int, k: int) -> dict[str, np.ndarray]:
  """Images of the k samples activating each of the n_dims top dims most.

  Dims ranked by Σ_n max(z_nd, 0) over `feats` (only dims some sample
  activates), samples by the largest z_nd; images re-read from the source
  by index and preprocessed as in extraction. Returns {"dims": (R,), "indices": (R, k) source indices,
  "labels": (R, k), "images": (R, k, S, S, C) uint8}, R <= n_dims.
  """
  z = feats["z"]
  n_dims = int(min(n_dims, metrics.active_dims(z)))
  k = int(min(k, z.shape[0]))
  if n_dims < 1:
    raise base.EvaluationError("No projector dim is active on the test "
                               "split: there is nothing to draw.")
  dims = metrics.most_active_dims(z, n_dims, rank_by="value")
  rows = metrics.top_activating_indices(z, dims, k, rank_by="value")
  source = datasets.get_source(config.dataset, split)
  element = input_pipeline.EvalExample(
      source, 0, 1, config.dataset.image_size,
      center_crop=config.dataset.name == "imagenet100")
  indices = feats["index"][rows]
  images = np.stack([np.stack([element.map(int(i))["image"] for i in row])
                     for row in indices])
  return {"dims": np.asarray(dims), "indices": indices,
          "labels": feats["label"][rows], "images": images}


class PicturesEvaluator(base.Evaluator):
  """top_activations.png / .npz and top_activation_purity."""
  name = "grids"

  def run(self, ctx: base.Context) -> dict[str, Any]:
    te = ctx.test
    if metrics.active_dims(te["z"]) < 1:
      # Every gate closed / every unit dead: report the rest, draw nothing.
      logging.warning("No projector dim is active on the test split: no "
                      "top-activation grid.")
      return {}
    grid = top_activation_examples(ctx.config, ctx.config.dataset.eval_split,
                                   te, self.options.grid_dims,
                                   self.options.grid_images)
    ctx.save_npz("top_activations.npz", **grid)
    ctx.save_figure("top_activations.png",
                    lambda path: plots.top_activation_grid(
                        grid["images"], grid["labels"], grid["dims"],
                        ctx.class_names, path,
                        f"{ctx.title}: test images activating each of the "
                        "most active dims most"))
    return {"top_activation_purity": float(
        np.mean(plots.row_purity(grid["labels"])))}

  def describe(self, ctx):
    return {"dims": self.options.grid_dims,
            "images_per_dim": self.options.grid_images,
            "dim_ranking": "sum of max(z, 0) over the test split",
            "image_ranking": "largest z (by value) in the dim"}
