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
import shutil
import time
from typing import Any, Sequence

from absl import logging
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

  def tag(self, row: int, root: str, kind: str = "th", title: str = "") -> str:
    """The HTML of test image `row` at display size SIZES[kind]."""
    row = int(row)
    sheet, slot = divmod(self.slot[row], self.COLS * self.COLS)
    r, c = divmod(slot, self.COLS)
    size = self.SIZES[kind]
    scale = size / self.thumb
    pixelated = " px" if scale >= 1 else ""
    title = f' title="{H.esc(title)}"' if title else ""
    # The sheet is COLS * size CSS pixels wide (explorer.css sets it).
    return (f'<span class="{kind}{pixelated}"{title}><img '
            f'src="{root}img/{sheet:03d}.png" alt="test image {row}" '
            f'style="left:{-c * size:g}px;top:{-r * size:g}px"></span>')

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

  def dim_link(self, dim: int, sub: bool, text: str | None = None) -> str:
    text = H.esc(text if text is not None else str(int(dim)))
    if not self.stats["active"][dim]:
      return f'<span class="note">{text}</span>'
    return f'<a href="{"../" if sub else ""}{self.dim_file(dim)}">{text}</a>'

  def class_name(self, c: int) -> str:
    return self.run.class_names[int(c)] if c >= 0 else "–"

  def figure(self, row: int, sub: bool, caption: str) -> str:
    """A thumbnail (linking to the image's page if it has one)."""
    row = int(row)
    img = self.images.tag(row, self._root(sub))
    if row in self.has_page:
      page = ("../" if sub else "") + self.image_file(row)
      img = f'<a href="{page}">{img}</a>'
    return f"<figure>{img}<figcaption>{caption}</figcaption></figure>"

  def nav(self, sub: bool) -> list[tuple[str, str]]:
    up = "../" if sub else ""
    root = self._root(sub)
    extra = [(t, root + h) for t, h in self.nav_extra]
    label = f"{self.run.name}: " if self.nav_extra else ""
    return extra + [(f"{label}overview", up + "index.html"),
                    (f"{label}dimensions", up + "dims.html")]

  def write(self, rel: str, title: str, body: str) -> None:
    sub = "/" in rel
    path = self.out / self.base / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(H.page(title, body, self._root(sub), self.nav(sub)),
                    encoding="utf-8")
    self.pages += 1

  # --- pages ----------------------------------------------------------------
  def build(self) -> None:
    self.write("index.html", f"{self.run.name}: overview", self.overview())
    self.write("dims.html", f"{self.run.name}: dimensions", self.dims_table())
    for i, dim in enumerate(self.active):
      prev_dim = self.active[i - 1] if i > 0 else None
      next_dim = self.active[i + 1] if i + 1 < len(self.active) else None
      self.write(self.dim_file(dim), f"{self.run.name}: dimension {dim}",
                 self.dim_page(int(dim), prev_dim, next_dim))
    for i, row in enumerate(self.image_rows):
      self.write(self.image_file(row),
                 f"{self.run.name}: test image {row}",
                 self.image_page(int(row), *self.neighbours[i]))

  def overview(self) -> str:
    run, report = self.run, self.run.report
    parts = [f'<p class="note">workdir <code>{H.esc(run.workdir)}</code>, '
             f"checkpoint step {report['step']}.</p>"]
    parts.append("<h2>Run</h2>" + H.table(
        None, [(H.esc(k), H.esc(v))
                   for k, v in _config_summary(run.config, report)]))
    rows = [(H.esc(label), H.fmt_metric(v), H.esc(note))
            for _, label, v, note in report_rows(report)]
    parts.append("<h2>Evaluation (eval/report.json)</h2>"
                 + H.table(["metric", "value", "note"], rows))
    # Pages.
    st = self.stats
    inactive = np.flatnonzero(~st["active"])
    chips = []
    for dim in self.ranking:
      c = int(st["top_class"][dim])
      chips.append(f'<a href="{self.dim_file(dim)}" title="top class '
                   f'{H.esc(self.class_name(c))}, consistency '
                   f'{H.fmt(st["consistency"][dim], 2)}"><span class="sw" '
                   f'style="background:{self.colors[c]}"></span>{dim}</a>')
    parts.append(
        f"<h2>Dimensions</h2><p>{len(self.active)} of {self.d} projector "
        f'dims are active on the test split. <a href="dims.html">The '
        "dimensions table</a> (sortable, filterable by class); one page per "
        "active dim, here in descending Σ|z| (colour: its top class):</p>"
        f'<div class="chips">{"".join(chips)}</div>')
    if inactive.size:
      note = ""
      if run.gated:
        shut = int(np.sum(st["gate_open_rate"][inactive] == 0))
        note = f" ({shut} of them with the gate closed on every image)"
      parts.append(f'<p class="note">Inactive (no test image activates '
                   f"them): {', '.join(map(str, inactive))}{note}.</p>")
    for nu in run.nuisances:
      if nu.is_dim is not None:
        n_nu = int(np.sum(nu.is_dim & st["active"]))
        parts.append(
            f"<p>{n_nu} active dims are {H.esc(nu.name)} dims: more "
            f"{H.esc(nu.name)}-pure than class-pure on z before the gate "
            "(the evaluation's mechanism protocol); marked in the table.</p>")
    sample = "".join(self.figure(r, False, H.esc(self.class_name(
        self.labels[r]))) for r in self.sample)
    parts.append(f"<h2>Test images</h2><p>A sample of "
                 f"{self.options.sample_per_class} per class; every image "
                 "on a dimension page also has its own page.</p>"
                 f'<div class="grid-imgs">{sample}</div>')
    # Figures.
    parts.append("<h2>Training curves (metrics.jsonl)</h2>"
                 + self.training_curves())
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
    parts.append('<h2>Sparsity and feature selection</h2><div class="charts">'
                 + "".join(charts) + "</div>")
    return "\n".join(parts)

  def training_curves(self) -> str:
    history = self.run.history
    if not history:
      return '<p class="note">No metrics.jsonl in the workdir.</p>'
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
    return f'<div class="charts">{"".join(charts)}</div>'

  def nuisance_dims(self) -> set[int]:
    """Active dims that the mechanism protocol found nuisance-pure."""
    out = set()
    for nu in self.run.nuisances:
      if nu.is_dim is not None:
        out |= {int(d) for d in self.active if nu.is_dim[d]}
    return out

  def dims_table(self) -> str:
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
      cells = [(dim, self.dim_link(dim, False)),
               (self.class_name(c), H.esc(self.class_name(c))),
               (st["consistency"][dim], H.fmt(st["consistency"][dim], 3))]
      if with_top_k:
        cells.append((st["top_k_consistency"][dim],
                      H.fmt(st["top_k_consistency"][dim], 3)))
      cells += [(st["activation_rate"][dim],
                H.fmt(st["activation_rate"][dim], 3)),
               (st["mean_activation"][dim],
                H.fmt(st["mean_activation"][dim], 3)),
               (self.rank_of[int(dim)], str(self.rank_of[int(dim)]))]
      if run.gated:
        cells.append((st["gate_open_rate"][dim],
                      H.fmt(st["gate_open_rate"][dim], 3)))
      if mech:
        v = mech[0].class_purity[dim]
        cells.append((v, H.fmt(v, 3)))
        for nu in mech:
          cells.append((nu.purity[dim], H.fmt(nu.purity[dim], 3)))
      numeric = [f'<td class="num" data-v="{H.sort_value(v)}">{t}</td>'
                 if not isinstance(v, str) else
                 f'<td data-v="{H.esc(v.lower())}">{t}</td>'
                 for v, t in cells]
      numeric[0] = f'<td class="num" data-v="{int(dim)}">{cells[0][1]}</td>'
      bar = H.class_bar(st["class_counts"][dim], run.class_names,
                        self.colors)
      rows.append(f'<tr data-cls="{c}"'
                  + (' class="bg"' if int(dim) in marked else "") + ">"
                  + "".join(numeric) + f"<td>{bar}</td></tr>")
    head = "".join(
        f'<th class="{"nosort" if h == "class distribution" else ""}">'
        f"{H.esc(h)}</th>" for h in header)
    options = "".join(f'<option value="{c}">{H.esc(name)}</option>'
                      for c, name in enumerate(run.class_names))
    gate_note = (" Gate open rate: the share of test images whose eval-mode "
                 "gate keeps the dim." if run.gated else "")
    mech_note = "".join(
        f" Rows in orange: {H.esc(nu.name)} dims (more {H.esc(nu.name)}-pure"
        " than class-pure on z before the gate, by the mechanism protocol)."
        for nu in mech)
    if with_top_k:
      mech_note += (f" Top-k consistency: the same share among the dim's "
                    f"{int(run.report['top_k_consistency_k'])} largest "
                    "values (comparable across methods).")
    if run.config.method == "cl":
      mech_note += (" CL features are dense and signed: nearly every image "
                    "activates every dim, so consistency is close to the "
                    "largest class share and the top images rank |z| (both "
                    "ends of a dim).")
    return (
        f"<p>{len(self.active)} active dims of {self.d} (a dim is active "
        f"when some test image has |z| > {metrics.ZERO_TOL:g}). Top class and"
        " consistency (the share of the top class) are counted over the "
        "images that activate the dim, as the report's semantic consistency"
        " (papers' definition), which is their mean; activation rate: the "
        "share of test images "
        f"that activate the dim.{gate_note}{mech_note} Click a header to "
        "sort.</p>"
        '<p><label>top class <select id="class-filter" data-filter="dims" '
        f'data-count="dims-count"><option value="">all</option>{options}'
        '</select></label> showing <span id="dims-count"></span></p>'
        f'<table id="dims" class="sortable"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>")

  def dim_page(self, dim: int, prev_dim, next_dim) -> str:
    st, run = self.stats, self.run
    z = self.z[:, dim]
    c = int(st["top_class"][dim])
    n_on = int(np.sum(np.abs(z) > metrics.ZERO_TOL))
    nav = ['<div class="prevnext">']
    if prev_dim is not None:
      nav.append(self.dim_link(int(prev_dim), True, f"← dim {prev_dim}"))
    nav.append('<a href="../dims.html">all dims</a>')
    if next_dim is not None:
      nav.append(self.dim_link(int(next_dim), True, f"dim {next_dim} →"))
    nav.append("</div>")
    stats = [("top class", H.esc(self.class_name(c))),
             ("class consistency", f"{H.fmt(st['consistency'][dim], 3)} "
              '<span class="note">(share of the top class among the '
              "images that activate it)</span>")]
    if "top_k_consistency" in st:
      stats.append(("top-k consistency",
                    f"{H.fmt(st['top_k_consistency'][dim], 3)} "
                    '<span class="note">(among its '
                    f"{int(run.report['top_k_consistency_k'])} largest "
                    "values)</span>"))
    stats += [
             ("activation rate", f"{H.fmt(st['activation_rate'][dim], 3)} "
              f"({n_on} of {self.n} test images)"),
             ("mean |z| when active", H.fmt(st["mean_activation"][dim], 4)),
             ("max |z|", H.fmt(float(np.abs(z).max()), 4)),
             ("rank by Σ|z|", f"{self.rank_of[dim]} of {len(self.ranking)}")]
    if run.gated:
      stats.append(("gate open rate",
                    H.fmt(st["gate_open_rate"][dim], 3)))
    for nu in run.nuisances:
      if nu.purity is not None:
        stats += [("class purity (pre-gate)", H.fmt(nu.class_purity[dim], 3)),
                  (f"{H.esc(nu.name)} purity (pre-gate)",
                   H.fmt(nu.purity[dim], 3)),
                  (f"{H.esc(nu.name)} dim",
                   "yes" if nu.is_dim[dim] else "no")]
    parts = nav + ['<dl class="stats">' + "".join(
        f"<dt>{k}</dt><dd>{v}</dd>" for k, v in stats) + "</dl>"]

    def grid(rows):
      return ('<div class="grid-imgs">' + "".join(
          self.figure(r, True, f"{H.esc(self.class_name(self.labels[r]))}"
                      f"<br>{H.fmt(float(z[r]), 3)}") for r in rows)
              + "</div>")

    top = self.top[dim]
    parts.append(f"<h2>Top {len(top)} test images (largest |z|)</h2>"
                 + grid(top))
    weak = self.weak[dim]
    parts.append(f"<h2>Weakly activating ({len(weak)} drawn among the "
                 "activating images in the bottom quarter of |z|)</h2>"
                 + grid(weak))
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
    parts.append('<h2>Distributions</h2><div class="charts">'
                 + "".join(charts) + "</div>")
    return "\n".join(parts)

  def image_page(self, row: int, nbrs, sims) -> str:
    st, run = self.stats, self.run
    zr = self.z[row]
    dims = data.active_dims_of(zr)
    total = float(np.abs(zr).sum())
    big = self.images.tag(row, self._root(True), "lg")
    parts = [f'<div class="cols"><div>{big}</div><div><dl class="stats">'
             f"<dt>class</dt><dd>{H.esc(self.class_name(self.labels[row]))}"
             f"</dd>" + "".join(
                 f"<dt>{H.esc(nu.name)}</dt><dd>"
                 f"{H.esc(nu.value_names[int(nu.values[row])])}</dd>"
                 for nu in run.nuisances) +
             f"<dt>test index</dt><dd>{row}</dd><dt>active dims</dt>"
             f"<dd>{dims.size} of {self.d}</dd></dl></div></div>"]
    shown = dims[:self.options.dims_in_table]
    rows = []
    for dim in shown:
      c = int(st["top_class"][dim])
      rows.append((self.dim_link(dim, True), f"{H.fmt(float(zr[dim]), 4)}",
                   H.fmt(abs(float(zr[dim])) / total if total else 0.0, 3),
                   f'<span class="sw" style="background:{self.colors[c]}">'
                   f"</span> {H.esc(self.class_name(c))}",
                   H.fmt(st["consistency"][dim], 3)))
    parts.append(f"<h2>Active dims ({dims.size}), largest |z| first</h2>"
                 + (H.table(["dim", "z", "share of Σ|z|", "dim's top class",
                             "dim's consistency"], rows)
                    if rows else "<p>None: every entry of z is zero.</p>"))
    if dims.size > shown.size:
      rest = " ".join(f"{self.dim_link(d, True)}&nbsp;{H.fmt(float(zr[d]), 3)}"
                      for d in dims[shown.size:])
      parts.append(f'<p class="chips">and: {rest}</p>')
    if self.closed is not None:
      closed = np.flatnonzero(self.closed[row])
      probs = run.features.get("gate_probs")
      items = [self.dim_link(d, True) + (
          f"&nbsp;p={H.fmt(float(probs[row, d]), 2)}" if probs is not None
          else "") for d in closed]
      parts.append(
          f'<h2>Dims the gate closed ({closed.size} of {self.d})</h2>'
          f'<p class="chips" id="closed-dims">{" ".join(items) or "none"}'
          "</p>")
    figs = "".join(
        self.figure(r, True, H.esc(self.class_name(self.labels[r]))
                    + f"<br>cos {H.fmt(float(s), 3)}")
        for r, s in zip(nbrs, sims))
    zero = (" This image's z is all zero: it has no direction, hence no "
            "neighbours (the report's retrieval leaves such images out too)."
            if not len(nbrs) and total == 0 else "")
    parts.append(f"<h2>Nearest neighbours</h2><p class=\"note\">The "
                 f"{len(nbrs)} test images with the highest cosine similarity"
                 " of z (the retrieval metric of the report: all-zero rows "
                 "excluded), the image "
                 f"itself excluded.{zero}</p>"
                 f'<div class="grid-imgs" id="neighbours">{figs}</div>')
    return "\n".join(parts)


# ----------------------------------------------------------------------------
# Several runs.
# ----------------------------------------------------------------------------
def _run_names(runs_meta) -> list[str]:
  """Method names, made unique with the workdir's name where they repeat."""
  methods = [config.method for _, config, _ in runs_meta]
  names = []
  for (workdir, _, _), method in zip(runs_meta, methods):
    name = method
    if methods.count(method) > 1:
      base = workdir.rstrip("/").rsplit("/", 1)[-1]
      safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in base)
      name = f"{method}_{safe}"
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

  def write(self, rel, title, body):
    (self.out / rel).write_text(H.page(title, body, "", self.nav),
                                encoding="utf-8")

  def build(self) -> None:
    first = self.sites[0].run
    rows = []
    for s in self.sites:
      r = s.run.report
      rows.append((f'<a href="{s.base}index.html">{H.esc(s.run.name)}</a>',
                   H.esc(s.run.config.method), f"<code>{H.esc(s.run.workdir)}"
                   "</code>", str(r["step"]),
                   H.fmt(r.get("linear_top1")),
                   H.fmt(r.get("semantic_consistency")),
                   H.fmt(r.get("top_k_consistency")),
                   f"{len(s.active)} / {s.d}"))
    self.write("index.html", "Feature explorer: runs", (
        f"<p>{len(self.sites)} runs on {H.esc(first.config.dataset.name)} "
        f"({first.report['num_test_examples']} test images). "
        '<a href="compare.html">Compare them side by side</a>.</p>'
        + H.table(["run", "method", "workdir", "step", "linear top-1",
                   "semantic consistency", "top-k consistency",
                   "active dims"], rows)))
    self.write("compare.html", "Compare runs", self.compare_body())

  def compare_body(self) -> str:
    sites, opts = self.sites, self.options
    parts = []
    # Metrics side by side.
    labels = {}
    for s in sites:
      for key, label, _, note in report_rows(s.run.report):
        labels.setdefault(key, (label, note))
    rows = []
    for key, (label, note) in labels.items():
      rows.append([H.esc(label)] + [
          H.fmt_metric(s.run.report.get(key)) for s in sites] + [H.esc(note)])
    parts.append("<h2>Metrics (each run's eval/report.json)</h2>" + H.table(
        ["metric"] + [H.esc(s.run.name) for s in sites] + ["note"], rows))
    curves = {s.run.name: s.run.report["feature_selection"] for s in sites
              if s.run.report.get("feature_selection")}
    colors = {s.run.name: METHOD_COLORS.get(s.run.config.method, "#333")
              for s in sites}
    if curves:
      charts = [H.line_chart(
          {n: ([p["k"] for p in c], [p["linear_top1"] for p in c])
           for n, c in curves.items()}, colors, width=380,
          title="feature selection: linear top-1 on top-k dims",
          xlabel="k", log2_x=True, markers=True)]
      if all("retrieval_precision_at_10" in c[0] for c in curves.values()):
        charts.append(H.line_chart(
            {n: ([p["k"] for p in c],
                 [p["retrieval_precision_at_10"] for p in c])
             for n, c in curves.items()}, colors, width=380,
            title="feature selection: retrieval P@10", xlabel="k",
            log2_x=True, markers=True))
      parts.append('<div class="charts">' + "".join(charts) + "</div>")
    # Most active dims of each run.
    parts.append(f"<h2>Each run's {opts.compare_dims} most active dims "
                 f"(Σ|z|) and their top {opts.compare_top} images</h2>")
    cols = []
    for s in sites:
      body = []
      for dim in s.ranking[:opts.compare_dims]:
        st = s.stats
        c = int(st["top_class"][dim])
        imgs = "".join(self.mini(s, r) for r in s.top[int(dim)]
                       [:opts.compare_top])
        body.append(f'<p><a href="{s.base}{s.dim_file(dim)}">dim {dim}</a> '
                    f"top class {H.esc(s.class_name(c))}, consistency "
                    f"{H.fmt(st['consistency'][dim], 2)}<br>{imgs}</p>")
      cols.append(f'<div class="runcol"><h3>{H.esc(s.run.name)}</h3>'
                  + "".join(body) + "</div>")
    parts.append('<div class="cols">' + "".join(cols) + "</div>")
    # The same test images through each run.
    labels0, rows_ = sites[0].labels, self.rows
    parts.append(f"<h2>The same {len(rows_)} test images in each run</h2>"
                 "<p class=\"note\">For each image, each run's 3 largest "
                 "dims on it (z), and those dims' top 5 test images.</p>")
    table_rows = []
    for r in rows_:
      cells = [self.images.tag(r, "") + "<br>"
               + H.esc(sites[0].class_name(labels0[r]))]
      for s in sites:
        lines = []
        for dim in data.active_dims_of(s.z[r])[:3]:
          imgs = "".join(self.mini(s, q) for q in s.top[int(dim)][:5])
          lines.append(f'<a href="{s.base}{s.dim_file(dim)}">dim {dim}</a> '
                       f"{H.fmt(float(s.z[r, dim]), 3)} {imgs}")
        cells.append("<br>".join(lines) or "no active dim")
      table_rows.append(cells)
    parts.append(H.table(["image"] + [H.esc(s.run.name) for s in sites],
                         table_rows))
    return "\n".join(parts)

  def mini(self, site: RunSite, row: int) -> str:
    row = int(row)
    img = self.images.tag(row, "", "mi", site.class_name(site.labels[row]))
    if row in site.has_page:
      return f'<a href="{site.base}{site.image_file(row)}">{img}</a>'
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
