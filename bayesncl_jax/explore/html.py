"""HTML and inline-SVG pieces of the explorer's pages (no CDN).

Every page is a jinja2 template (`templates/`, autoescape on) that extends
`page.html`, a complete HTML document linking the two static files
(`static/explorer.css`, `static/explorer.js`) by a relative path, so the
site opens from file:// with no server and no network.

Escaping holds by construction: templates escape every value they are
given, and the fragments built here in Python (the inline SVG charts,
thumbnails, links) are `markupsafe.Markup` built with `Markup.format` /
`Markup.join`, which escape every argument that is not itself Markup. A
plain string (a run name, a class name, a report value) can reach a page
only as text. URLs go through `url()` (urllib.parse.quote).
"""
from __future__ import annotations

import colorsys
import functools
import math
from typing import Iterable, Mapping, Sequence
import urllib.parse

import jinja2
from markupsafe import Markup

# Ten distinguishable colours (the Tableau 10); more classes cycle hues.
_TABLEAU = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948",
            "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac")


def class_colors(num_classes: int) -> list[str]:
  """One colour per class: Tableau 10, or evenly spaced hues beyond 10."""
  if num_classes <= len(_TABLEAU):
    return list(_TABLEAU[:num_classes])
  out = []
  for i in range(num_classes):
    r, g, b = colorsys.hls_to_rgb(i / num_classes, 0.5, 0.55)
    out.append(f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}")
  return out


def url(path: str) -> str:
  """A relative link of the site, percent-encoded (the '/' kept)."""
  return urllib.parse.quote(path, safe="/")


@functools.cache
def environment() -> jinja2.Environment:
  """The templates of templates/, escaping every value by default."""
  env = jinja2.Environment(
      loader=jinja2.PackageLoader("bayesncl_jax.explore", "templates"),
      autoescape=True, undefined=jinja2.StrictUndefined,
      trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
  env.filters["url"] = url
  env.globals.update(table=table)
  return env


def render(template: str, **context) -> str:
  """The text of templates/`template` with `context` (autoescaped)."""
  return environment().get_template(template).render(**context)


def fmt(value, digits: int = 4) -> str:
  """A number for a table cell; '–' for a missing or non-finite value."""
  if value is None:
    return "–"
  if isinstance(value, bool):
    return str(value)
  if isinstance(value, int):
    return str(value)
  try:
    value = float(value)
  except (TypeError, ValueError):
    return str(value)
  if not math.isfinite(value):
    return "–"
  if value != 0 and abs(value) < 10 ** -(digits - 1):
    return f"{value:.3g}"
  return f"{value:.{digits}f}"


def fmt_metric(value) -> str:
  """A report value: counts stored as floats (e.g. active_dims) as integers."""
  if isinstance(value, float) and value.is_integer() and abs(value) > 1:
    return str(int(value))
  return fmt(value)


def sort_value(value) -> str:
  """The data-v attribute of a sortable cell ('' sorts last)."""
  if value is None:
    return ""
  try:
    value = float(value)
  except (TypeError, ValueError):
    return str(value)
  return repr(value) if math.isfinite(value) else ""


def table(header: Sequence[str] | None, rows: Iterable[Sequence[str]],
          cls: str = "") -> Markup:
  """A plain table; plain-string cells are escaped, Markup cells kept."""
  return Markup(render("table.html", header=list(header or ()),
                       rows=[list(r) for r in rows], cls=cls))


# ----------------------------------------------------------------------------
# Inline SVG charts.
# ----------------------------------------------------------------------------
def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
  if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
    return [lo]
  step = 10 ** math.floor(math.log10((hi - lo) / n))
  for mult in (1, 2, 5, 10):
    if (hi - lo) / (step * mult) <= n:
      step *= mult
      break
  start = math.ceil(lo / step) * step
  return [start + i * step for i in range(int((hi - start) / step) + 1)]


def _tick_label(v: float) -> str:
  if v == 0:
    return "0"
  if abs(v) >= 1e4 or abs(v) < 1e-2:
    return f"{v:.0e}"
  return f"{v:g}" if abs(v) >= 1 else f"{v:.2g}"


def _svg(cls: str, width: int, height: int, title: str) -> list[Markup]:
  parts = [Markup('<svg class="{}" viewBox="0 0 {} {}" width="{}" height="{}"'
                  ' role="img">').format(cls, width, height, width, height)]
  if title:
    parts.append(Markup('<text x="{}" y="12" class="t">{}</text>').format(
        width / 2, title))
  return parts


def bar_chart(values: Sequence[float], labels: Sequence[str] | None = None,
              colors: Sequence[str] | str = "#4e79a7", *, width: int = 420,
              height: int = 180, title: str = "", xlabel: str = "",
              ylabel: str = "", tooltips: Sequence[str] | None = None,
              label_every: int = 1) -> Markup:
  """Vertical bars from 0; labels under the bars (every label_every-th)."""
  n = len(values)
  ml, mr, mt, mb = 42, 8, 18 if title else 6, 34 if xlabel else 22
  if labels is not None:
    # Long labels are cut (the bar's tooltip keeps the whole) and drawn
    # at -35°: room below and to the left for them.
    full = list(labels)
    labels = [s if len(s) <= 16 else s[:15] + "…" for s in full]
    longest = max((len(s) for s in labels), default=0)
    if longest > 4:
      mb += int(3.6 * longest) + 4
      ml = max(ml, int(5.0 * longest) - 10)
    tooltips = tooltips or [f"{t}: {fmt(float(v))}"
                            for t, v in zip(full, values)]
  w, h = width - ml - mr, height - mt - mb
  top = max([float(v) for v in values if math.isfinite(float(v))] + [0.0])
  top = top if top > 0 else 1.0
  bw = w / max(n, 1)
  parts = _svg("chart", width, height, title)
  for t in _ticks(0.0, top):
    y = mt + h - h * t / top
    parts.append(Markup(
        '<line x1="{}" x2="{}" y1="{:.1f}" y2="{:.1f}" class="grid"/>'
        '<text x="{}" y="{:.1f}" class="yl">{}</text>').format(
            ml, ml + w, y, y, ml - 4, y + 3, _tick_label(t)))
  for i, v in enumerate(values):
    v = float(v)
    if not math.isfinite(v):
      continue
    bh = h * v / top
    color = colors if isinstance(colors, str) else colors[i]
    tip = tooltips[i] if tooltips else (
        f"{labels[i]}: {fmt(v)}" if labels else fmt(v))
    parts.append(Markup(
        '<rect x="{:.1f}" y="{:.1f}" width="{:.1f}" height="{:.1f}" '
        'fill="{}"><title>{}</title></rect>').format(
            ml + i * bw + bw * 0.1, mt + h - bh, max(bw * 0.8, 0.5), bh,
            color, tip))
    if labels is not None and i % label_every == 0:
      x = ml + (i + 0.5) * bw
      if len(labels[i]) > 4:
        parts.append(Markup(
            '<text transform="translate({:.1f},{}) rotate(-35)" '
            'class="xl r">{}</text>').format(x, mt + h + 8, labels[i]))
      else:
        parts.append(Markup('<text x="{:.1f}" y="{}" class="xl">{}</text>'
                            ).format(x, mt + h + 12, labels[i]))
  parts.append(Markup('<line x1="{}" x2="{}" y1="{}" y2="{}" class="axis"/>'
                      ).format(ml, ml + w, mt + h, mt + h))
  if xlabel:
    parts.append(Markup('<text x="{}" y="{}" class="al">{}</text>').format(
        ml + w / 2, height - 4, xlabel))
  if ylabel:
    parts.append(Markup('<text transform="translate(10,{}) rotate(-90)" '
                        'class="al">{}</text>').format(mt + h / 2, ylabel))
  parts.append(Markup("</svg>"))
  return Markup("").join(parts)


def line_chart(series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
               colors: Mapping[str, str] | None = None, *, width: int = 300,
               height: int = 170, title: str = "", xlabel: str = "",
               log2_x: bool = False, markers: bool = False) -> Markup:
  """Lines (name -> (xs, ys)); a legend when there are several series."""
  pts = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys)
         if y is not None and math.isfinite(float(y))]
  ml, mr, mt, mb = 46, 8, 18 if title else 6, 30 if xlabel else 18
  w, h = width - ml - mr, height - mt - mb
  parts = _svg("chart", width, height, title)
  if not pts:
    parts.append(Markup('<text x="{}" y="{}" class="t">no data</text></svg>'
                        ).format(width / 2, height / 2))
    return Markup("").join(parts)
  tx = (lambda x: math.log2(x)) if log2_x else float
  x0, x1 = min(tx(p[0]) for p in pts), max(tx(p[0]) for p in pts)
  y0, y1 = min(float(p[1]) for p in pts), max(float(p[1]) for p in pts)
  if x1 == x0:
    x0, x1 = x0 - 1, x1 + 1
  if y1 == y0:
    y0, y1 = y0 - (abs(y0) or 1) * 0.1, y1 + (abs(y1) or 1) * 0.1
  pad = (y1 - y0) * 0.05
  y0, y1 = y0 - pad, y1 + pad

  def sx(x):
    return ml + w * (tx(x) - x0) / (x1 - x0)

  def sy(y):
    return mt + h - h * (float(y) - y0) / (y1 - y0)

  for t in _ticks(y0, y1):
    parts.append(Markup(
        '<line x1="{}" x2="{}" y1="{:.1f}" y2="{:.1f}" class="grid"/>'
        '<text x="{}" y="{:.1f}" class="yl">{}</text>').format(
            ml, ml + w, sy(t), sy(t), ml - 4, sy(t) + 3, _tick_label(t)))
  xticks = ([2 ** e for e in range(math.ceil(x0), math.floor(x1) + 1)]
            if log2_x else _ticks(x0, x1))
  for t in xticks:
    parts.append(Markup('<text x="{:.1f}" y="{}" class="xl">{}</text>'
                        ).format(sx(t), mt + h + 12, _tick_label(t)))
  colors = colors or {}
  for i, (name, (xs, ys)) in enumerate(series.items()):
    color = colors.get(name, _TABLEAU[i % len(_TABLEAU)])
    xy = [(sx(x), sy(y)) for x, y in zip(xs, ys)
          if y is not None and math.isfinite(float(y))]
    if not xy:
      continue
    d = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
    parts.append(Markup(
        '<polyline points="{}" fill="none" stroke="{}" stroke-width="1.5">'
        "<title>{}</title></polyline>").format(d, color, name))
    if markers:
      parts.extend(Markup('<circle cx="{:.1f}" cy="{:.1f}" r="2.5" '
                          'fill="{}"/>').format(x, y, color) for x, y in xy)
    if len(series) > 1:
      # style, not the fill attribute: the stylesheet's text fill wins
      # over presentation attributes.
      parts.append(Markup('<text x="{}" y="{}" class="lg" style="fill:{}">'
                          "{}</text>").format(ml + 6, mt + 12 + 12 * i,
                                              color, name))
  parts.append(Markup('<line x1="{}" x2="{}" y1="{}" y2="{}" class="axis"/>'
                      ).format(ml, ml + w, mt + h, mt + h))
  if xlabel:
    parts.append(Markup('<text x="{}" y="{}" class="al">{}</text>').format(
        ml + w / 2, height - 3, xlabel))
  parts.append(Markup("</svg>"))
  return Markup("").join(parts)


def class_bar(counts: Sequence[float], names: Sequence[str],
              colors: Sequence[str], width: int = 120, height: int = 12
              ) -> Markup:
  """A tiny stacked bar of class shares (tooltips name class and share)."""
  total = float(sum(counts))
  parts = [Markup('<svg class="cbar" viewBox="0 0 {} {}" width="{}" '
                  'height="{}">').format(width, height, width, height)]
  x = 0.0
  if total > 0:
    for c, n in enumerate(counts):
      if n <= 0:
        continue
      w = width * n / total
      parts.append(Markup(
          '<rect x="{:.2f}" width="{:.2f}" height="{}" fill="{}"><title>'
          "{}: {:.0%}</title></rect>").format(x, w, height, colors[c],
                                              names[c], n / total))
      x += w
  parts.append(Markup("</svg>"))
  return Markup("").join(parts)
