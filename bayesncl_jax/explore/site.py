"""Writes the explorer's static site for one or several evaluated runs.

Layout (one run; with several, each run's pages go under runs/<name>/ and
the site's index.html lists the runs and links compare.html):

  index.html          overview: method, config, report metrics, training
                      curves, active-dims histogram, feature-selection curve
  dims.html           every active dim, sortable and filterable by class
  dims/NNN.html       one page per active dim
  images/NNNNN.html   one page per test image shown anywhere in the site
                      (the dims' top and weak images and a per-class sample)
  img/NNNNN.png       thumbnails, shared by all runs (same test set)
  static/             explorer.css, explorer.js
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import pathlib
import re
import shutil
import time
from typing import Any, Sequence

from absl import logging
from markupsafe import Markup
import numpy as np
from PIL import Image

from bayesncl_jax import datasets
from bayesncl_jax import input_pipeline
from bayesncl_jax import metrics
from bayesncl_jax.explore import data
from bayesncl_jax.explore import html as H

# Marks a folder as an explorer site: only such a folder is replaced.
MARKER = ".bayesncl_explore"
STATIC_FILES = ("explorer.css", "explorer.js")
# Training curves drawn first when metrics.jsonl has them (the rest follow).
_CURVE_KEYS = ("loss", "nce", "kl", "online_acc", "gate_open_rate",
               "sparsity", "active_dims", "lr")
_NOT_CURVES = ("step", "epoch")
# Report keys that are bookkeeping, not metrics.
_REPORT_META = ("method", "step", "dataset", "num_train_examples",
                "num_test_examples", "backbone_dim", "feature_dim")
METHOD_COLORS = {"cl": "#7f7f7f", "ncl": "#1f77b4", "bayesncl": "#d62728"}


@dataclasses.dataclass(frozen=True)
class SiteOptions:
  """What the site shows; the defaults are the documented ones."""
  top_images: int = 25        # top-activating images per dim page
  weak_images: int = 10       # weakly activating images per dim page
  sample_per_class: int = 5   # test images per class given a page regardless
  neighbours: int = 8         # nearest neighbours on an image page
  dims_in_table: int = 16     # an image page's dims listed with details
  compare_images: int = 10    # shared test images on the compare page
  compare_dims: int = 6       # most active dims per run on the compare page
  compare_top: int = 8        # images per dim on the compare page
  thumb_size: int = 64        # thumbnails are at most this many pixels wide
  batch_size: int = 512       # feature extraction, if evaluate saved none
  seed: int = 0


ExploreError = data.ExploreError


# ----------------------------------------------------------------------------
# Thumbnails.
# ----------------------------------------------------------------------------
class ImageStore:
  """Test images as thumbnails packed into sprite sheets img/NNN.png.

  Images come from `datasets.get_source(config.dataset, eval_split)` in
  dataset order, preprocessed as feature extraction saw them
  (`input_pipeline.EvalExample`: resize / centre crop to image_size), then
  shrunk to at most thumb_size pixels. Only the requested rows are stored,
  COLS × COLS per sheet (a few dozen files instead of thousands of tiny
  ones); a thumbnail on a page is an <img> of its sheet, shifted inside a
  clipping <span>. Shared by every run of a site (same test images).

  Use: `request(rows)` for everything the pages will show, `finalize()`,
  then `tag(row, ...)` in the pages and `write(out)` once.
  """
  COLS = 16
  # Display sizes (CSS pixels) of the three thumbnail kinds; explorer.css
  # gives their sheets the width COLS * size.
  SIZES = {"th": 56, "lg": 224, "mi": 32}

  def __init__(self, config, thumb_size: int):
    self.config = config
    size = int(config.dataset.image_size)
    self.thumb = min(size, int(thumb_size))
    self._requested: set[int] = set()
    self.slot: dict[int, int] | None = None

  def request(self, rows) -> None:
    if self.slot is not None:
      raise RuntimeError("ImageStore.request after finalize")
    self._requested.update(int(r) for r in np.asarray(rows).reshape(-1))

  def finalize(self) -> None:
    self.slot = {r: i for i, r in enumerate(sorted(self._requested))}

  def __contains__(self, row) -> bool:
    return int(row) in self.slot

  def tag(self, row: int, root: str, kind: str = "th", title: str = ""
          ) -> Markup:
    """The HTML of test image `row` at display size SIZES[kind]."""
    row = int(row)
    sheet, slot = divmod(self.slot[row], self.COLS * self.COLS)
    r, c = divmod(slot, self.COLS)
    size = self.SIZES[kind]
    scale = size / self.thumb
    pixelated = " px" if scale >= 1 else ""
    title = Markup(' title="{}"').format(title) if title else ""
    # The sheet is COLS * size CSS pixels wide (explorer.css sets it).
    return Markup('<span class="{}{}"{}><img src="{}" alt="test image {}" '
                  'style="left:{:g}px;top:{:g}px"></span>').format(
                      kind, pixelated, title,
                      H.url(f"{root}img/{sheet:03d}.png"), row, -c * size,
                      -r * size)

  def write(self, out: pathlib.Path) -> int:
    """Writes the sprite sheets; returns the number of images in them."""
    folder = out / "img"
    folder.mkdir(parents=True, exist_ok=True)
    dataset = self.config.dataset
    source = datasets.get_source(dataset, dataset.eval_split)
    element = input_pipeline.EvalExample(
        source, 0, 1, dataset.image_size,
        center_crop=dataset.name == "imagenet100")
    rows = sorted(self.slot, key=self.slot.get)
    per_sheet, t = self.COLS * self.COLS, self.thumb
    for first in range(0, len(rows), per_sheet):
      chunk = rows[first:first + per_sheet]
      thumbs = []
      for row in chunk:
        image = np.asarray(element.map(row)["image"], np.uint8)
        if image.shape[0] != t or image.shape[1] != t:
          pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1
                                else image)
          pil = pil.resize((t, t), Image.Resampling.LANCZOS)
          image = np.asarray(pil).reshape(t, t, -1)
        thumbs.append(image)
      n_rows = -(-len(chunk) // self.COLS)
      sheet = np.zeros((n_rows * t, self.COLS * t, thumbs[0].shape[-1]),
                       np.uint8)
      for i, image in enumerate(thumbs):
        r, c = divmod(i, self.COLS)
        sheet[r * t:(r + 1) * t, c * t:(c + 1) * t] = image
      Image.fromarray(sheet[..., 0] if sheet.shape[-1] == 1 else sheet).save(
          folder / f"{first // per_sheet:03d}.png")
    return len(rows)


# ----------------------------------------------------------------------------
# One run.
# ----------------------------------------------------------------------------
def _config_summary(config, report) -> list[tuple[str, str]]:
  d, m, o = config.dataset, config.model, config.optim
  rows = [
      ("method", config.method),
      ("dataset", f"{d.name} ({d.eval_split}: {report['num_test_examples']} "
                  f"images, {d.num_classes} classes, {d.image_size} px)"),
      ("backbone", f"{m.backbone}, width {m.width}, stages "
                   f"{tuple(m.stage_sizes) or 'standard'}, {m.stem} stem"),
      ("projector", f"h {report.get('backbone_dim')} → {m.proj_hidden} → z "
                    f"{report.get('feature_dim')}"
                    + ("" if config.method == "cl"
                       else f", non-negativity {m.non_neg}")),
  ]
  if config.method == "bayesncl":
    g = config.gate
    rows.append(("gate", f"{g.type}, temperature {g.temperature}, threshold "
                         f"{g.threshold}, prior {g.prior_prob}, KL weight "
                         f"{g.kl_weight}, eval mode {g.eval_mode}"))
  rows += [
      ("training", f"{report['step']} steps of batch {o.batch_size}, base lr "
                   f"{o.base_lr}, seed {config.seed}"),
      ("augmentation", f"crop scale {tuple(config.aug.crop_scale)}, flip "
                       f"{config.aug.hflip_prob}, colour jitter "
                       f"{config.aug.color_jitter_prob}"),
  ]
  return rows


def report_rows(report: dict[str, Any]) -> list[tuple[str, str, Any, str]]:
  """(key, label, value, note) of the report's scalar metrics, in order.

  evaluate.REPORT_ROWS first (its labels and notes), then any other scalar
  the report holds (e.g. metrics added by later protocols).
  """
  from bayesncl_jax import evaluate  # pylint: disable=g-import-not-at-top
  rows, seen = [], set(_REPORT_META)
  # The rows of report.md, nuisance-label rows expanded.
  for key, label, note in evaluate._rows(report):  # pylint: disable=protected-access
    seen.add(key)
    if key in report:
      rows.append((key, label, report[key], note))
  for key, value in report.items():
    if key not in seen and isinstance(value, (int, float)) and not (
        isinstance(value, bool)):
      rows.append((key, key.replace("_", " "), value, ""))
  return rows


class RunSite:
  """The pages of one run, written under `base` (a folder of the site)."""

  def __init__(self, run: data.Run, out: pathlib.Path, base: str,
               images: ImageStore, options: SiteOptions,
               nav_extra: Sequence[tuple[str, str]] = ()):
    self.run, self.out, self.options, self.images = run, out, options, images
    self.base = base                              # "" or "runs/<name>/"
    self.depth = base.count("/")
    self.nav_extra = nav_extra
    f = run.features
    self.z, self.labels = f["z"], f["labels"]
    self.n, self.d = self.z.shape
    self.colors = H.class_colors(run.num_classes)
    self.stats = data.dim_stats(self.z, self.labels, run.num_classes,
                                f.get("gate_mask"),
                                run.report.get("top_k_consistency_k"))
    self.active = np.flatnonzero(self.stats["active"])
    # Dims in descending Σ|z| (metrics.most_active_dims), active ones only.
    self.ranking = data.most_active_dims(self.z)
    self.rank_of = {int(dim): r + 1 for r, dim in enumerate(self.ranking)}
    self.dim_digits = max(3, len(str(self.d - 1)))
    self.row_digits = max(5, len(str(self.n - 1)))
    self.top = dict(zip(self.active.tolist(), data.top_images(
        self.z, self.active, options.top_images)))
    self.weak = {int(dim): data.weak_images(self.z, dim, options.weak_images,
                                            options.seed)
                 for dim in self.active}
    self.sample = data.sample_images(self.labels, options.sample_per_class,
                                     run.num_classes, options.seed)
    shown = [self.sample] + list(self.top.values()) + list(self.weak.values())
    self.image_rows = np.unique(np.concatenate(shown)).astype(np.int64)
    self.has_page = set(int(r) for r in self.image_rows)
    self.neighbours = data.nearest_neighbours(self.z, self.image_rows,
                                              options.neighbours)
    images.request(self.image_rows)
    for nbrs, _ in self.neighbours:
      images.request(nbrs)
    self.closed = (data.closed_gates(f["gate_mask"],
                                     run.config.gate.eval_mode,
                                     run.config.gate.threshold)
                   if run.gated else None)
    self.pages = 0

  # --- paths (relative to the page being written) --------------------------
  def _root(self, sub: bool) -> str:
    return "../" * (self.depth + int(sub))

  def dim_file(self, dim: int) -> str:
    return f"dims/{int(dim):0{self.dim_digits}d}.html"

  def image_file(self, row: int) -> str:
    return f"images/{int(row):0{self.row_digits}d}.html"

  def dim_link(self, dim: int, sub: bool, text: str | None = None
               ) -> Markup:
    text = text if text is not None else str(int(dim))
    if not self.stats["active"][dim]:
      return Markup('<span class="note">{}</span>').format(text)
    return Markup('<a href="{}">{}</a>').format(
        H.url(("../" if sub else "") + self.dim_file(dim)), text)

  def class_name(self, c: int) -> str:
    return self.run.class_names[int(c)] if c >= 0 else "–"

  def figure(self, row: int, sub: bool, *caption: str) -> Markup:
    """A thumbnail (linking to the image's page if it has one); the
    caption's lines are text."""
    row = int(row)
    img = self.images.tag(row, self._root(sub))
    if row in self.has_page:
      page = ("../" if sub else "") + self.image_file(row)
      img = Markup('<a href="{}">{}</a>').format(H.url(page), img)
    return Markup("<figure>{}<figcaption>{}</figcaption></figure>").format(
        img, Markup("<br>").join(caption))

  def nav(self, sub: bool) -> list[tuple[str, str]]:
    up = "../" if sub else ""
    root = self._root(sub)
    extra = [(t, root + h) for t, h in self.nav_extra]
    label = f"{self.run.name}: " if self.nav_extra else ""
    return extra + [(f"{label}overview", up + "index.html"),
                    (f"{label}dimensions", up + "dims.html")]

  def write(self, rel: str, template: str, title: str, context: dict
            ) -> None:
    """Renders templates/`template` into `rel` (under this run's folder)."""
    sub = "/" in rel
    path = inside(self.out, self.base + rel)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(H.render(template, title=title, root=self._root(sub),
                             nav=self.nav(sub), **context) + "\n",
                    encoding="utf-8")
    self.pages += 1

  # --- pages ----------------------------------------------------------------
  def build(self) -> None:
    self.write("index.html", "overview.html", f"{self.run.name}: overview",
               self.overview())
    self.write("dims.html", "dims.html", f"{self.run.name}: dimensions",
               self.dims_table())
    for i, dim in enumerate(self.active):
      prev_dim = self.active[i - 1] if i > 0 else None
      next_dim = self.active[i + 1] if i + 1 < len(self.active) else None
      self.write(self.dim_file(dim), "dim.html",
                 f"{self.run.name}: dimension {dim}",
                 self.dim_page(int(dim), prev_dim, next_dim))
    for i, row in enumerate(self.image_rows):
      self.write(self.image_file(row), "image.html",
                 f"{self.run.name}: test image {row}",
                 self.image_page(int(row), *self.neighbours[i]))

  def overview(self) -> dict[str, Any]:
    run, report = self.run, self.run.report
    st = self.stats
    inactive = np.flatnonzero(~st["active"])
    inactive_note = ""
    if inactive.size and run.gated:
      shut = int(np.sum(st["gate_open_rate"][inactive] == 0))
      inactive_note = f" ({shut} of them with the gate closed on every image)"
    chips = []
    for dim in self.ranking:
      c = int(st["top_class"][dim])
      chips.append({"href": self.dim_file(dim), "dim": int(dim),
                    "top_class": self.class_name(c),
                    "consistency": H.fmt(st["consistency"][dim], 2),
                    "color": self.colors[c]})
    per_sample = metrics.active_dims_per_sample(self.z)
    hist = np.bincount(per_sample, minlength=self.d + 1)
    every = max(1, (self.d + 1) // 8)
    charts = [H.bar_chart(
        hist, [str(i) for i in range(self.d + 1)], width=460,
        title=f"active dims per test image (mean {per_sample.mean():.2f} "
              f"of {self.d})", xlabel="active dims", ylabel="images",
        label_every=every)]
    curve = report.get("feature_selection")
    if curve:
      ks = [p["k"] for p in curve]
      rule = report.get("feature_selection_rule")
      charts.append(H.line_chart(
          {"linear top-1": (ks, [p["linear_top1"] for p in curve])},
          width=320, title="feature selection: linear top-1 on top-k dims",
          xlabel=f"k (ranking rule: {rule})" if rule else "k", log2_x=True,
          markers=True))
      if "retrieval_precision_at_10" in curve[0]:
        charts.append(H.line_chart(
            {"P@10": (ks, [p["retrieval_precision_at_10"] for p in curve])},
            width=320, title="feature selection: retrieval P@10",
            xlabel="k", log2_x=True, markers=True))
    return {
        "workdir": run.workdir, "step": report["step"],
        "config_rows": _config_summary(run.config, report),
        "metric_rows": [(label, H.fmt_metric(v), note)
                        for _, label, v, note in report_rows(report)],
        "n_active": len(self.active), "d": self.d, "chips": chips,
        "inactive": [int(i) for i in inactive],
        "inactive_note": inactive_note,
        "nuisance_dims": [(nu.name, int(np.sum(nu.is_dim & st["active"])))
                          for nu in run.nuisances if nu.is_dim is not None],
        "sample_per_class": self.options.sample_per_class,
        "sample": [self.figure(r, False, self.class_name(self.labels[r]))
                   for r in self.sample],
        "curves": self.training_curves(), "charts": charts}

  def training_curves(self) -> list[Markup]:
    """One chart per metrics.jsonl key ([] without metrics.jsonl)."""
    history = self.run.history
    if not history:
      return []
    keys = [k for k in _CURVE_KEYS if k in history[-1]]
    keys += sorted(k for k in history[-1]
                   if k not in keys and k not in _NOT_CURVES
                   and isinstance(history[-1][k], (int, float)))
    charts = []
    for key in keys:
      pts = [(r["step"], r[key]) for r in history
             if isinstance(r.get(key), (int, float))]
      charts.append(H.line_chart({key: ([p[0] for p in pts],
                                        [p[1] for p in pts])},
                                 width=260, height=150, title=key,
                                 xlabel="step"))
    return charts

  def nuisance_dims(self) -> set[int]:
    """Active dims that the mechanism protocol found nuisance-pure."""
    out = set()
    for nu in self.run.nuisances:
      if nu.is_dim is not None:
        out |= {int(d) for d in self.active if nu.is_dim[d]}
    return out

  def dims_table(self) -> dict[str, Any]:
    st, run = self.stats, self.run
    with_top_k = "top_k_consistency" in st
    mech = [nu for nu in run.nuisances if nu.purity is not None]
    header = ["dim", "top class", "consistency"]
    if with_top_k:
      header.append("top-k consistency")
    header += ["activation rate", "mean |z| when active", "Σ|z| rank"]
    if run.gated:
      header.append("gate open rate")
    if mech:
      header.append("class purity (pre-gate)")
      header += [f"{nu.name} purity" for nu in mech]
    header.append("class distribution")
    marked = self.nuisance_dims()
    rows = []
    for dim in self.active:
      c = int(st["top_class"][dim])
      numbers = [st["consistency"][dim]]
      if with_top_k:
        numbers.append(st["top_k_consistency"][dim])
      numbers += [st["activation_rate"][dim], st["mean_activation"][dim]]
      # (numeric?, sort key, shown) per cell.
      cells = [(True, int(dim), self.dim_link(dim, False)),
               (False, self.class_name(c).lower(), self.class_name(c))]
      cells += [(True, H.sort_value(v), H.fmt(v, 3)) for v in numbers]
      rank = self.rank_of[int(dim)]
      cells.append((True, H.sort_value(rank), str(rank)))
      extra = []
      if run.gated:
        extra.append(st["gate_open_rate"][dim])
      if mech:
        extra.append(mech[0].class_purity[dim])
        extra += [nu.purity[dim] for nu in mech]
      cells += [(True, H.sort_value(v), H.fmt(v, 3)) for v in extra]
      rows.append({"cls": c, "bg": int(dim) in marked, "cells": cells,
                   "bar": H.class_bar(st["class_counts"][dim],
                                      run.class_names, self.colors)})
    return {"n_active": len(self.active), "d": self.d,
            "zero_tol": f"{metrics.ZERO_TOL:g}", "gated": run.gated,
            "mech": [nu.name for nu in mech],
            "top_k": (int(run.report["top_k_consistency_k"]) if with_top_k
                      else None),
            "dense": run.config.method == "cl",
            "class_names": run.class_names, "header": header, "rows": rows}

  def dim_page(self, dim: int, prev_dim, next_dim) -> dict[str, Any]:
    st, run = self.stats, self.run
    z = self.z[:, dim]
    c = int(st["top_class"][dim])
    n_on = int(np.sum(np.abs(z) > metrics.ZERO_TOL))
    note = Markup('{} <span class="note">({})</span>').format
    stats = [("top class", self.class_name(c)),
             ("class consistency", note(
                 H.fmt(st["consistency"][dim], 3), "share of the top class "
                 "among the images that activate it"))]
    if "top_k_consistency" in st:
      stats.append(("top-k consistency", note(
          H.fmt(st["top_k_consistency"][dim], 3),
          f"among its {int(run.report['top_k_consistency_k'])} largest "
          "values")))
    stats += [
        ("activation rate", f"{H.fmt(st['activation_rate'][dim], 3)} "
         f"({n_on} of {self.n} test images)"),
        ("mean |z| when active", H.fmt(st["mean_activation"][dim], 4)),
        ("max |z|", H.fmt(float(np.abs(z).max()), 4)),
        ("rank by Σ|z|", f"{self.rank_of[dim]} of {len(self.ranking)}")]
    if run.gated:
      stats.append(("gate open rate", H.fmt(st["gate_open_rate"][dim], 3)))
    for nu in run.nuisances:
      if nu.purity is not None:
        stats += [("class purity (pre-gate)", H.fmt(nu.class_purity[dim], 3)),
                  (f"{nu.name} purity (pre-gate)", H.fmt(nu.purity[dim], 3)),
                  (f"{nu.name} dim", "yes" if nu.is_dim[dim] else "no")]

    def figures(rows):
      return [self.figure(r, True, self.class_name(self.labels[r]),
                          H.fmt(float(z[r]), 3)) for r in rows]

    counts = st["class_counts"][dim]
    charts = [H.bar_chart(counts, self.run.class_names, self.colors,
                          width=420, title="class of the activating images",
                          ylabel="images")]
    hist, edges = data.activation_histogram(self.z, dim)
    charts.append(H.bar_chart(
        hist, [H.fmt(e, 2) for e in edges[:-1]], width=420,
        title="histogram of |z| over activating images", xlabel="|z|",
        ylabel="images", label_every=6,
        tooltips=[f"[{edges[i]:.3g}, {edges[i + 1]:.3g}): {int(h)}"
                  for i, h in enumerate(hist)]))
    for nu in run.nuisances:
      counts = data.class_counts(self.z[:, dim:dim + 1], nu.values,
                                 len(nu.value_names))[0]
      charts.append(H.bar_chart(
          counts, nu.value_names, width=420, ylabel="images",
          title=f"{nu.name} of the activating images"))
    if run.gated:
      mask = run.features["gate_mask"][:, dim]
      per_class = [float(mask[self.labels == k].mean())
                   if np.any(self.labels == k) else float("nan")
                   for k in range(run.num_classes)]
      charts.append(H.bar_chart(per_class, self.run.class_names,
                                self.colors, width=420,
                                title="gate open rate by class"))
    return {
        "prev_link": (self.dim_link(int(prev_dim), True, f"← dim {prev_dim}")
                      if prev_dim is not None else ""),
        "next_link": (self.dim_link(int(next_dim), True, f"dim {next_dim} →")
                      if next_dim is not None else ""),
        "stats": stats, "top": figures(self.top[dim]),
        "weak": figures(self.weak[dim]), "charts": charts}

  def image_page(self, row: int, nbrs, sims) -> dict[str, Any]:
    st, run = self.stats, self.run
    zr = self.z[row]
    dims = data.active_dims_of(zr)
    total = float(np.abs(zr).sum())
    shown = dims[:self.options.dims_in_table]
    rows = []
    for dim in shown:
      c = int(st["top_class"][dim])
      rows.append((self.dim_link(dim, True), H.fmt(float(zr[dim]), 4),
                   H.fmt(abs(float(zr[dim])) / total if total else 0.0, 3),
                   Markup('<span class="sw" style="background:{}"></span> {}'
                          ).format(self.colors[c], self.class_name(c)),
                   H.fmt(st["consistency"][dim], 3)))
    closed = None
    if self.closed is not None:
      probs = run.features.get("gate_probs")
      closed = [(self.dim_link(d, True),
                 H.fmt(float(probs[row, d]), 2) if probs is not None
                 else None) for d in np.flatnonzero(self.closed[row])]
    return {
        "big": self.images.tag(row, self._root(True), "lg"),
        "class_name": self.class_name(self.labels[row]),
        "nuisances": [(nu.name, nu.value_names[int(nu.values[row])])
                      for nu in run.nuisances],
        "row": row, "n_dims": int(dims.size), "d": self.d, "rows": rows,
        "rest": [(self.dim_link(d, True), H.fmt(float(zr[d]), 3))
                 for d in dims[shown.size:]],
        "closed": closed,
        "neighbours": [self.figure(r, True, self.class_name(self.labels[r]),
                                   f"cos {H.fmt(float(s), 3)}")
                       for r, s in zip(nbrs, sims)],
        "all_zero": not len(nbrs) and total == 0}


# ----------------------------------------------------------------------------
# Several runs.
# ----------------------------------------------------------------------------
def safe_name(text: str) -> str:
  """`text` as a file name of the site: letters, digits, '-' and '_' only.

  Run names come from workdirs other people made (config.json's method, the
  workdir's name): '../', '/', quotes and markup become '_', so a name can
  be neither a path out of --out nor markup.
  """
  name = re.sub(r"[^A-Za-z0-9_-]", "_", str(text))
  return name or "run"


def inside(out: pathlib.Path, rel: str) -> pathlib.Path:
  """out/rel, or ExploreError if it resolves outside `out` (a safeguard:
  every name in `rel` has been through safe_name)."""
  root = out.resolve()
  path = (out / rel).resolve()
  if not path.is_relative_to(root):
    raise ExploreError(f"Refusing to write {path}: outside --out={out}.")
  return path


def _run_names(runs_meta) -> list[str]:
  """Method names, made unique with the workdir's name where they repeat."""
  methods = [safe_name(config.method) for _, config, _ in runs_meta]
  names = []
  for (workdir, _, _), method in zip(runs_meta, methods):
    name = method
    if methods.count(method) > 1:
      base = workdir.rstrip("/").rsplit("/", 1)[-1]
      name = f"{method}_{safe_name(base)}"
    while name in names:
      name += "_"
    names.append(name)
  return names


def check_comparable(runs_meta) -> None:
  """Raises ExploreError unless all runs were evaluated on the same images."""
  def key(config, report):
    d = config.dataset
    return (d.name, d.eval_split, d.image_size, report["num_test_examples"])

  first_dir, first_cfg, first_rep = runs_meta[0]
  for workdir, config, report in runs_meta[1:]:
    if key(config, report) != key(first_cfg, first_rep):
      a, b = key(first_cfg, first_rep), key(config, report)
      raise ExploreError(
          "The runs to compare must be evaluated on the same test images: "
          f"{first_dir} has dataset {a[0]} ({a[1]} split, {a[2]} px, {a[3]} "
          f"evaluated examples), {workdir} has {b[0]} ({b[1]} split, {b[2]} "
          f"px, {b[3]} evaluated examples). Explore them separately, or "
          "evaluate runs on the same dataset with the same --max_examples.")


class Compare:
  """The landing page and compare.html of a multi-run site."""

  def __init__(self, sites: Sequence[RunSite], out: pathlib.Path,
               images: ImageStore, options: SiteOptions):
    self.sites, self.out, self.images, self.options = (
        sites, out, images, options)
    self.nav = [("all runs", "index.html"), ("compare", "compare.html")] + [
        (s.run.name, s.base + "index.html") for s in sites]
    first = sites[0]
    # One image per class (as many as fit in compare_images).
    per_class = max(1, -(-options.compare_images // first.run.num_classes))
    self.rows = data.sample_images(first.labels, per_class,
                                   first.run.num_classes, options.seed + 1
                                   )[:options.compare_images]
    images.request(self.rows)

  def write(self, rel, template, title, context):
    inside(self.out, rel).write_text(
        H.render(template, title=title, root="", nav=self.nav, **context)
        + "\n", encoding="utf-8")

  def build(self) -> None:
    first = self.sites[0].run
    rows = []
    for s in self.sites:
      r = s.run.report
      rows.append((Markup('<a href="{}">{}</a>').format(
                       H.url(s.base + "index.html"), s.run.name),
                   s.run.config.method,
                   Markup("<code>{}</code>").format(s.run.workdir),
                   str(r["step"]), H.fmt(r.get("linear_top1")),
                   H.fmt(r.get("semantic_consistency")),
                   H.fmt(r.get("top_k_consistency")),
                   f"{len(s.active)} / {s.d}"))
    self.write("index.html", "runs.html", "Feature explorer: runs", {
        "n_runs": len(self.sites), "dataset": first.config.dataset.name,
        "n_test": first.report["num_test_examples"], "rows": rows})
    self.write("compare.html", "compare.html", "Compare runs",
               self.compare_body())

  def compare_body(self) -> dict[str, Any]:
    sites, opts = self.sites, self.options
    # Metrics side by side.
    labels = {}
    for s in sites:
      for key, label, _, note in report_rows(s.run.report):
        labels.setdefault(key, (label, note))
    metric_rows = [[label] + [H.fmt_metric(s.run.report.get(key))
                              for s in sites] + [note]
                   for key, (label, note) in labels.items()]
    curves = {s.run.name: s.run.report["feature_selection"] for s in sites
              if s.run.report.get("feature_selection")}
    colors = {s.run.name: METHOD_COLORS.get(s.run.config.method, "#333")
              for s in sites}
    charts = []
    if curves:
      charts.append(H.line_chart(
          {n: ([p["k"] for p in c], [p["linear_top1"] for p in c])
           for n, c in curves.items()}, colors, width=380,
          title="feature selection: linear top-1 on top-k dims",
          xlabel="k", log2_x=True, markers=True))
      if all("retrieval_precision_at_10" in c[0] for c in curves.values()):
        charts.append(H.line_chart(
            {n: ([p["k"] for p in c],
                 [p["retrieval_precision_at_10"] for p in c])
             for n, c in curves.items()}, colors, width=380,
            title="feature selection: retrieval P@10", xlabel="k",
            log2_x=True, markers=True))
    # Most active dims of each run.
    columns = []
    for s in sites:
      st, dims = s.stats, []
      for dim in s.ranking[:opts.compare_dims]:
        c = int(st["top_class"][dim])
        dims.append({"href": s.base + s.dim_file(dim), "dim": int(dim),
                     "top_class": s.class_name(c),
                     "consistency": H.fmt(st["consistency"][dim], 2),
                     "images": [self.mini(s, r) for r in s.top[int(dim)]
                                [:opts.compare_top]]})
      columns.append((s.run.name, dims))
    # The same test images through each run.
    labels0 = sites[0].labels
    image_rows = []
    for r in self.rows:
      cells = [Markup("{}<br>{}").format(self.images.tag(r, ""),
                                         sites[0].class_name(labels0[r]))]
      for s in sites:
        lines = []
        for dim in data.active_dims_of(s.z[r])[:3]:
          lines.append(Markup('<a href="{}">dim {}</a> {} {}').format(
              H.url(s.base + s.dim_file(dim)), dim,
              H.fmt(float(s.z[r, dim]), 3),
              Markup("").join(self.mini(s, q) for q in s.top[int(dim)][:5])))
        cells.append(Markup("<br>").join(lines) or "no active dim")
      image_rows.append(cells)
    return {"run_names": [s.run.name for s in sites],
            "metric_rows": metric_rows, "charts": charts,
            "n_dims": opts.compare_dims, "n_top": opts.compare_top,
            "columns": columns, "n_images": len(self.rows),
            "image_rows": image_rows}

  def mini(self, site: RunSite, row: int) -> Markup:
    row = int(row)
    img = self.images.tag(row, "", "mi", site.class_name(site.labels[row]))
    if row in site.has_page:
      return Markup('<a href="{}">{}</a>').format(
          H.url(site.base + site.image_file(row)), img)
    return img


# ----------------------------------------------------------------------------
# The whole site.
# ----------------------------------------------------------------------------
def prepare_out(out: str) -> pathlib.Path:
  """An empty folder for the site; replaces an earlier site, nothing else."""
  if "://" in out:
    raise ExploreError(f"--out={out}: the site is written to a local folder "
                       "(open its index.html in a browser); copy it to a "
                       "bucket afterwards if you want.")
  path = pathlib.Path(out)
  if path.exists() and not path.is_dir():
    raise ExploreError(f"--out={out} is a file, not a folder.")
  if path.exists() and any(path.iterdir()):
    if not (path / MARKER).exists():
      raise ExploreError(
          f"--out={out} exists and is not an explorer site; refusing to "
          "overwrite it. Pass a new or empty folder.")
    shutil.rmtree(path)
  path.mkdir(parents=True, exist_ok=True)
  return path


def build_site(workdirs: Sequence[str], out: str,
               options: SiteOptions = SiteOptions(), *, mesh=None
               ) -> dict[str, Any]:
  """Writes the site for `workdirs` into `out`; returns what it wrote.

  Raises ExploreError (data.ExploreError) for unusable input: a workdir
  without a checkpoint or an evaluation, runs evaluated on different test
  sets, an `out` folder that holds something else.
  """
  from bayesncl_jax import train  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  if not workdirs:
    raise ExploreError("Pass at least one --workdir.")
  if len({w.rstrip("/") for w in workdirs}) != len(workdirs):
    raise ExploreError(f"A --workdir is given twice: {list(workdirs)}.")
  # Check every input before the (slow) feature loading.
  meta = []
  for workdir in workdirs:
    data.check_workdir(workdir)
    meta.append((workdir, train.load_config(workdir),
                 data.read_report(workdir)))
  check_comparable(meta)
  names = _run_names(meta)
  runs = [data.load_run(w, name, options.batch_size, mesh)
          for w, name in zip(workdirs, names)]
  for run in runs[1:]:
    if not np.array_equal(run.features["labels"], runs[0].features["labels"]):
      raise ExploreError(f"{run.workdir} and {runs[0].workdir} label their "
                         "test images differently: not the same test data.")
  t_load = time.time() - t0
  out_path = prepare_out(out)
  (out_path / MARKER).write_text("Written by python -m bayesncl_jax.explore;"
                                 " replaced by the next build.\n")
  images = ImageStore(runs[0].config, options.thumb_size)
  single = len(runs) == 1
  nav_extra = () if single else (("all runs", "index.html"),
                                 ("compare", "compare.html"))
  sites = [RunSite(run, out_path, "" if single else f"runs/{run.name}/",
                   images, options, nav_extra) for run in runs]
  compare = None if single else Compare(sites, out_path, images, options)
  images.finalize()
  for site in sites:
    site.build()
  pages = sum(s.pages for s in sites)
  if compare is not None:
    compare.build()
    pages += 2
  n_images = images.write(out_path)
  static = out_path / "static"
  static.mkdir(exist_ok=True)
  package = importlib.resources.files("bayesncl_jax.explore") / "static"
  for name in STATIC_FILES:
    (static / name).write_bytes((package / name).read_bytes())
  files = [p for p in out_path.rglob("*") if p.is_file()]
  summary = {"out": str(out_path), "runs": [r.name for r in runs],
             "pages": pages, "images": n_images, "files": len(files),
             "bytes": sum(p.stat().st_size for p in files),
             "seconds_loading": t_load, "seconds": time.time() - t0}
  logging.info("Explorer site: %s", summary)
  return summary
