"""Figures of the evaluation: top-activation grids, histograms, curves.

Matplotlib through `Figure` objects, never pyplot and no `matplotlib.use`
(importing this module leaves a notebook's backend alone; savefig picks
the Agg canvas for PNG by itself): no display, no global figure state,
safe to call from tests and from several evaluations in one process. `path` may be local or gs:// (`paths`).
"""
from __future__ import annotations

from typing import Mapping, Sequence

from matplotlib.figure import Figure
import numpy as np

from bayesncl_jax import paths

# One colour per method, the same in every figure.
METHOD_COLORS = {"cl": "#7f7f7f", "ncl": "#1f77b4", "bayesncl": "#d62728"}


def _image_for_display(image: np.ndarray) -> tuple[np.ndarray, str | None]:
  """(H, W, C) uint8 -> what imshow wants: (H, W) + gray cmap for C = 1."""
  if image.ndim == 3 and image.shape[-1] == 1:
    return image[..., 0], "gray"
  return image, None


def row_purity(labels: np.ndarray) -> np.ndarray:
  """(R, k) labels -> (R,) share of the most frequent label in each row."""
  labels = np.asarray(labels)
  return np.asarray([np.bincount(row).max() / row.size for row in labels])


def top_activation_grid(images: np.ndarray, labels: np.ndarray,
                        dims: Sequence[int], class_names: Sequence[str],
                        path, title: str = "") -> None:
  """The papers' key figure: row r = the k images activating dims[r] most.

  images: (R, k, H, W, C) uint8, row r in descending activation of dims[r];
  labels: (R, k) ints. Each image is captioned with its class; each row with
  its dim and purity (share of its most frequent class): a class-consistent
  dim has a row of one class.
  """
  images = np.asarray(images)
  labels = np.asarray(labels)
  rows, cols = labels.shape
  purity = row_purity(labels)
  fig = Figure(figsize=(1.25 * cols + 1.4, 1.4 * rows + 0.6))
  axes = fig.subplots(rows, cols, squeeze=False)
  for r in range(rows):
    for c in range(cols):
      ax = axes[r, c]
      img, cmap = _image_for_display(images[r, c])
      ax.imshow(img, cmap=cmap, vmin=0, vmax=255)
      ax.set_xticks([])
      ax.set_yticks([])
      ax.set_title(class_names[int(labels[r, c])], fontsize=7, pad=2)
    axes[r, 0].set_ylabel(f"dim {int(dims[r])}\npurity {purity[r]:.0%}",
                          fontsize=8)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  paths.save_figure(fig, path, dpi=100)


def active_dims_histogram(counts: np.ndarray, feature_dim: int, path,
                          title: str = "") -> None:
  """Histogram of #active dims per sample (counts: (N,) ints in [0, D])."""
  counts = np.asarray(counts)
  fig = Figure(figsize=(5, 3.2))
  ax = fig.subplots()
  bins = np.arange(0, feature_dim + 2) - 0.5
  ax.hist(counts, bins=bins, color="#1f77b4")
  ax.axvline(float(np.mean(counts)), color="k", ls="--", lw=1,
             label=f"mean {np.mean(counts):.1f} of {feature_dim}")
  ax.set_xlabel("active projector dims per test sample")
  ax.set_ylabel("samples")
  ax.set_xlim(-0.5, feature_dim + 0.5)
  ax.legend(fontsize=8)
  if title:
    ax.set_title(title, fontsize=10)
  fig.tight_layout()
  paths.save_figure(fig, path, dpi=100)


def _plot_selection(ax, curves: Mapping[str, Sequence[Mapping[str, float]]],
                    key: str, ylabel: str) -> None:
  for name, curve in curves.items():
    ks = [p["k"] for p in curve]
    values = [p[key] for p in curve]
    ax.plot(ks, values, marker="o", label=name,
            color=METHOD_COLORS.get(name))
  ax.set_xscale("log", base=2)
  ax.set_xlabel("k most active projector dims (ranked on train split)")
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)


def selection_curve(curves: Mapping[str, Sequence[Mapping[str, float]]],
                    path, title: str = "") -> None:
  """Feature-selection curve(s): linear top-1 vs k; curves: name -> points.

  Each point is a dict with "k" and "linear_top1" (and, when present,
  "retrieval_precision_at_10", drawn in a second panel).
  """
  with_retrieval = all("retrieval_precision_at_10" in p
                       for c in curves.values() for p in c)
  fig = Figure(figsize=(10 if with_retrieval else 5, 3.4))
  axes = fig.subplots(1, 2 if with_retrieval else 1, squeeze=False)[0]
  _plot_selection(axes[0], curves, "linear_top1", "linear probe top-1 (test)")
  if with_retrieval:
    _plot_selection(axes[1], curves, "retrieval_precision_at_10",
                    "retrieval precision@10 (test)")
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  paths.save_figure(fig, path, dpi=100)


def _mosaic(images: np.ndarray, pad: int = 2) -> np.ndarray:
  """(R, k, H, W, C) uint8 -> one (R·(H+pad), k·(W+pad), C) image."""
  rows, cols, h, w, c = images.shape
  out = np.full((rows * (h + pad), cols * (w + pad), c), 255, np.uint8)
  for r in range(rows):
    for k in range(cols):
      out[r * (h + pad):r * (h + pad) + h,
          k * (w + pad):k * (w + pad) + w] = images[r, k]
  return out


def comparison_figure(reports: Mapping[str, Mapping[str, float]],
                      grids: Mapping[str, Mapping[str, np.ndarray]],
                      class_names: Sequence[str], path,
                      metrics: Sequence[tuple[str, str]],
                      title: str = "") -> None:
  """Methods side by side: metric bars, selection curves, top-activation grids.

  reports: method -> report.json dict; grids: method -> {"images" (R, k, H,
  W, C), "labels" (R, k), "dims" (R,)} (rows may be cut to a few dims);
  metrics: (report key, axis label) pairs for the bar panels.
  """
  names = list(reports)
  n_bars = len(metrics)
  fig = Figure(figsize=(max(12, 2.4 * n_bars), 11))
  rows = fig.add_gridspec(3, 1, height_ratios=(1, 1.1, 1.5))
  bar_axes = rows[0].subgridspec(1, n_bars).subplots(squeeze=False)[0]
  for ax, (key, label) in zip(bar_axes, metrics):
    values = [reports[m].get(key) for m in names]
    values = [np.nan if v is None else v for v in values]
    bars = ax.bar(names, values,
                  color=[METHOD_COLORS.get(m, "#333333") for m in names])
    ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_title(label, fontsize=9)
    ax.tick_params(labelsize=7)
  curves = {m: r["feature_selection"] for m, r in reports.items()
            if r.get("feature_selection")}
  if curves:
    curve_axes = rows[1].subgridspec(1, 2).subplots(squeeze=False)[0]
    _plot_selection(curve_axes[0], curves, "linear_top1",
                    "linear top-1 on top-k dims")
    if all("retrieval_precision_at_10" in p for c in curves.values()
           for p in c):
      _plot_selection(curve_axes[1], curves, "retrieval_precision_at_10",
                      "retrieval P@10 on top-k dims")
    else:
      curve_axes[1].set_visible(False)
  with_grid = [m for m in names if m in grids]
  if with_grid:
    grid_axes = rows[2].subgridspec(1, len(with_grid), wspace=0.3).subplots(
        squeeze=False)[0]
  for ax, m in zip(grid_axes if with_grid else [], with_grid):
    g = grids[m]
    labels = np.asarray(g["labels"])
    img, cmap = _image_for_display(_mosaic(np.asarray(g["images"])))
    ax.imshow(img, cmap=cmap, vmin=0, vmax=255)
    n_rows, k = labels.shape
    h = img.shape[0] / n_rows
    ax.set_yticks([(r + 0.5) * h for r in range(n_rows)])
    purity = row_purity(labels)
    ax.set_yticklabels(
        [f"dim {int(d)}: {p:.0%}\n{class_names[np.bincount(l).argmax()]}"
         for d, p, l in zip(g["dims"], purity, labels)], fontsize=7)
    ax.set_xticks([])
    ax.set_title(f"{m}: top-{k} test images of its most active dims",
                 fontsize=9)
  if title:
    fig.suptitle(title, fontsize=11)
  fig.tight_layout()
  paths.save_figure(fig, path, dpi=100)
