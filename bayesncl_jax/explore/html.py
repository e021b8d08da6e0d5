"""HTML and inline-SVG pieces of the explorer's pages (no templates, no CDN).

Every page is a complete HTML document that links the two static files
(`static/explorer.css`, `static/explorer.js`) by a relative path, so the
site opens from file:// with no server and no network. Charts are inline
SVG drawn here from numbers; values are escaped with `html.escape`.
"""
from __future__ import annotations

import colorsys
import html
import math
from typing import Iterable, Mapping, Sequence

esc = html.escape

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
    return esc(str(value))
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
    return esc(str(value))
  return repr(value) if math.isfinite(value) else ""


def page(title: str, body: str, root: str, nav: Sequence[tuple[str, str]] = ()
         ) -> str:
  """A whole HTML document; root = relative path from the page to the site."""
  links = " ".join(f'<a href="{esc(href)}">{esc(text)}</a>'
                   for text, href in nav)
  return (
      "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
      "<meta name=\"viewport\" content=\"width=device-width, "
      "initial-scale=1\">"
      # An empty icon: no favicon request, no console error from file://.
      "<link rel=\"icon\" href=\"data:,\">"
      f"<title>{esc(title)}</title>"
      f"<link rel=\"stylesheet\" href=\"{root}static/explorer.css\">"
      "</head><body>"
      f"<nav>{links}</nav><main><h1>{esc(title)}</h1>\n{body}\n</main>"
      f"<script src=\"{root}static/explorer.js\"></script>"
      "</body></html>\n")


def table(header: Sequence[str] | None, rows: Iterable[Sequence[str]],
          cls: str = "") -> str:
  """A plain table; cells are trusted HTML (escape values before)."""
  head = "".join(f"<th>{h}</th>" for h in header or ())
  body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>"
                 for row in rows)
  head = f"<thead><tr>{head}</tr></thead>" if head else ""
  cls = f' class="{cls}"' if cls else ""
  return f"<table{cls}>{head}<tbody>{body}</tbody></table>"


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


def bar_chart(values: Sequence[float], labels: Sequence[str] | None = None,
              colors: Sequence[str] | str = "#4e79a7", *, width: int = 420,
              height: int = 180, title: str = "", xlabel: str = "",
              ylabel: str = "", tooltips: Sequence[str] | None = None,
              label_every: int = 1) -> str:
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
  parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" '
           f'width="{width}" height="{height}" role="img">']
  if title:
    parts.append(f'<text x="{width / 2}" y="12" class="t">{esc(title)}'
                 "</text>")
  for t in _ticks(0.0, top):
    y = mt + h - h * t / top
    parts.append(f'<line x1="{ml}" x2="{ml + w}" y1="{y:.1f}" y2="{y:.1f}" '
                 'class="grid"/>'
                 f'<text x="{ml - 4}" y="{y + 3:.1f}" class="yl">'
                 f"{_tick_label(t)}</text>")
  for i, v in enumerate(values):
    v = float(v)
    if not math.isfinite(v):
      continue
    bh = h * v / top
    color = colors if isinstance(colors, str) else colors[i]
    tip = tooltips[i] if tooltips else (
        f"{labels[i]}: {fmt(v)}" if labels else fmt(v))
    parts.append(
        f'<rect x="{ml + i * bw + bw * 0.1:.1f}" y="{mt + h - bh:.1f}" '
        f'width="{max(bw * 0.8, 0.5):.1f}" height="{bh:.1f}" '
        f'fill="{color}"><title>{esc(tip)}</title></rect>')
    if labels is not None and i % label_every == 0:
      x = ml + (i + 0.5) * bw
      if len(labels[i]) > 4:
        parts.append(f'<text transform="translate({x:.1f},{mt + h + 8}) '
                     f'rotate(-35)" class="xl r">{esc(labels[i])}</text>')
      else:
        parts.append(f'<text x="{x:.1f}" y="{mt + h + 12}" class="xl">'
                     f"{esc(labels[i])}</text>")
  parts.append(f'<line x1="{ml}" x2="{ml + w}" y1="{mt + h}" y2="{mt + h}" '
               'class="axis"/>')
  if xlabel:
    parts.append(f'<text x="{ml + w / 2}" y="{height - 4}" class="al">'
                 f"{esc(xlabel)}</text>")
  if ylabel:
    parts.append(f'<text transform="translate(10,{mt + h / 2}) rotate(-90)" '
                 f'class="al">{esc(ylabel)}</text>')
  parts.append("</svg>")
  return "".join(parts)


def line_chart(series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
               colors: Mapping[str, str] | None = None, *, width: int = 300,
               height: int = 170, title: str = "", xlabel: str = "",
               log2_x: bool = False, markers: bool = False) -> str:
  """Lines (name -> (xs, ys)); a legend when there are several series."""
  pts = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys)
         if y is not None and math.isfinite(float(y))]
  ml, mr, mt, mb = 46, 8, 18 if title else 6, 30 if xlabel else 18
  w, h = width - ml - mr, height - mt - mb
  parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" '
           f'width="{width}" height="{height}" role="img">']
  if title:
    parts.append(f'<text x="{width / 2}" y="12" class="t">{esc(title)}'
                 "</text>")
  if not pts:
    parts.append(f'<text x="{width / 2}" y="{height / 2}" class="t">no data'
                 "</text></svg>")
    return "".join(parts)
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
    parts.append(f'<line x1="{ml}" x2="{ml + w}" y1="{sy(t):.1f}" '
                 f'y2="{sy(t):.1f}" class="grid"/><text x="{ml - 4}" '
                 f'y="{sy(t) + 3:.1f}" class="yl">{_tick_label(t)}</text>')
  xticks = ([2 ** e for e in range(math.ceil(x0), math.floor(x1) + 1)]
            if log2_x else _ticks(x0, x1))
  for t in xticks:
    parts.append(f'<text x="{sx(t):.1f}" y="{mt + h + 12}" class="xl">'
                 f"{_tick_label(t)}</text>")
  colors = colors or {}
  for i, (name, (xs, ys)) in enumerate(series.items()):
    color = colors.get(name, _TABLEAU[i % len(_TABLEAU)])
    xy = [(sx(x), sy(y)) for x, y in zip(xs, ys)
          if y is not None and math.isfinite(float(y))]
    if not xy:
      continue
    d = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
    parts.append(f'<polyline points="{d}" fill="none" stroke="{color}" '
                 f'stroke-width="1.5"><title>{esc(name)}</title></polyline>')
    if markers:
      parts.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" '
                   f'fill="{color}"/>' for x, y in xy)
    if len(series) > 1:
      # style, not the fill attribute: the stylesheet's text fill wins
      # over presentation attributes.
      parts.append(f'<text x="{ml + 6}" y="{mt + 12 + 12 * i}" class="lg" '
                   f'style="fill:{color}">{esc(name)}</text>')
  parts.append(f'<line x1="{ml}" x2="{ml + w}" y1="{mt + h}" y2="{mt + h}" '
               'class="axis"/>')
  if xlabel:
    parts.append(f'<text x="{ml + w / 2}" y="{height - 3}" class="al">'
                 f"{esc(xlabel)}</text>")
  parts.append("</svg>")
  return "".join(parts)


def class_bar(counts: Sequence[float], names: Sequence[str],
              colors: Sequence[str], width: int = 120, height: int = 12
              ) -> str:
  """A tiny stacked bar of class shares (tooltips name class and share)."""
  total = float(sum(counts))
  parts = [f'<svg class="cbar" viewBox="0 0 {width} {height}" '
           f'width="{width}" height="{height}">']
  x = 0.0
  if total > 0:
    for c, n in enumerate(counts):
      if n <= 0:
        continue
      w = width * n / total
      parts.append(f'<rect x="{x:.2f}" width="{w:.2f}" height="{height}" '
                   f'fill="{colors[c]}"><title>{esc(names[c])}: '
                   f"{n / total:.0%}</title></rect>")
      x += w
  parts.append("</svg>")
  return "".join(parts)
