"""Feature explorer: the page data, the site in a real headless browser, errors.

The browser tests drive Debian's chromium through chromedriver (selenium);
they are skipped where either is missing (CI installs both, see .ci/run).
"""
import contextlib
import dataclasses
import fcntl
from html import parser as html_parser
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image
import pytest

from bayesncl_jax import config_lib
from bayesncl_jax import datasets
from bayesncl_jax import evaluate
from bayesncl_jax.evaluators import linear_probe
from bayesncl_jax import metrics
from bayesncl_jax import train
from bayesncl_jax.explore import data
from bayesncl_jax.explore import html as H
from bayesncl_jax.explore import site

ROOT = pathlib.Path(__file__).resolve().parent.parent
FMNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not FMNIST.exists(), reason="apt-get install -y dataset-fashion-mnist")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

TINY = {"optim.total_steps": 2, "optim.batch_size": 32,
        "dataset.max_train_examples": 256, "model.width": 4,
        "model.stage_sizes": (1,), "model.proj_hidden": 32,
        "model.proj_out": 16, "progress_bar": False, "log_every": 1,
        "ckpt_every": 2}
N_TEST = 200
EVAL = evaluate.EvalOptions(
    max_examples=N_TEST, batch_size=64,
    protocols=("linear", "interp", "selection", "retrieval"),
    probe=linear_probe.ProbeConfig(epochs=2, batch_size=64),
    selection_ks=(1, 4, 16))
SMALL = site.SiteOptions(top_images=25, weak_images=5, sample_per_class=2,
                         neighbours=4, batch_size=64)


# ----------------------------------------------------------------------------
# Page data on hand-made features.
# ----------------------------------------------------------------------------
def _sparse_features(seed=0, n=60, d=7, c=3):
  rng = np.random.default_rng(seed)
  z = rng.uniform(0.0, 1.0, (n, d)) * (rng.uniform(size=(n, d)) < 0.4)
  z[:, 5] = 0.0                                   # a dead dim.
  z[:, 6] = 0.0
  z[3, 6] = 1e-6                                  # below ZERO_TOL: dead too.
  labels = rng.integers(0, c, n)
  return z.astype(np.float32), labels


def test_dim_stats_hand_values():
  # 4 samples, 3 dims, classes (0, 0, 1, 1).
  z = np.array([[0.5, 0.0, 0.0],
                [0.2, 0.3, 0.0],
                [0.0, 0.6, 0.0],
                [0.1, 0.9, 1e-6]], np.float32)
  labels = np.array([0, 0, 1, 1])
  mask = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [1, 1, 0]], np.float32)
  st = data.dim_stats(z, labels, 2, mask)
  np.testing.assert_array_equal(st["active"], [True, True, False])
  np.testing.assert_array_equal(st["class_counts"], [[2, 1], [1, 2], [0, 0]])
  np.testing.assert_array_equal(st["top_class"], [0, 1, -1])
  np.testing.assert_allclose(st["consistency"][:2], [2 / 3, 2 / 3])
  assert np.isnan(st["consistency"][2])
  np.testing.assert_allclose(st["activation_rate"], [0.75, 0.75, 0.0])
  np.testing.assert_allclose(st["mean_activation"],
                             [0.8 / 3, 1.8 / 3, 0.0], rtol=1e-6)
  np.testing.assert_allclose(st["gate_open_rate"], [0.75, 0.75, 0.0])


def test_dim_stats_agree_with_the_report_metrics():
  z, labels = _sparse_features()
  st = data.dim_stats(z, labels, 3, value_top_k=5)
  active = st["active"]
  assert active.sum() == metrics.active_dims(z) == 5
  np.testing.assert_array_equal(np.isnan(st["consistency"]), ~active)
  # The report's consistencies are the means of the per-dim values.
  assert np.mean(st["consistency"][active]) == pytest.approx(
      metrics.semantic_consistency(z, labels, 3), rel=1e-6)
  assert np.nanmean(st["top_k_consistency"]) == pytest.approx(
      metrics.semantic_consistency(z, labels, 3, top_k=5, rank_by="value"),
      rel=1e-6)
  # The counts behind them, independently.
  for d in np.flatnonzero(active):
    on = np.abs(z[:, d]) > 1e-5
    np.testing.assert_array_equal(st["class_counts"][d],
                                  np.bincount(labels[on], minlength=3))
  # Activation rate, independently: entries above the threshold.
  np.testing.assert_allclose(st["activation_rate"],
                             (np.abs(z) > 1e-5).mean(0))
  ranking = metrics.most_active_dims(z, 5)
  np.testing.assert_array_equal(data.most_active_dims(z), ranking)
  # A dim whose entries are all below the threshold is never ranked, even
  # when their sum beats an active dim's.
  z2 = np.zeros((100, 3), np.float32)
  z2[:, 0] = 1e-6
  z2[0, 1] = 2e-5
  z2[:, 2] = 0.5
  np.testing.assert_array_equal(data.most_active_dims(z2), [2, 1])


def test_top_images_are_the_highest_activations():
  z, _ = _sparse_features(1)
  dims = [0, 1, 2, 3, 4, 5]
  tops = data.top_images(z, dims, 10)
  for dim, rows in zip(dims, tops):
    a = np.abs(z[:, dim])
    on = np.flatnonzero(a > metrics.ZERO_TOL)
    assert len(rows) == min(10, on.size)
    # Descending, and none left out is larger than the smallest shown.
    assert np.all(np.diff(a[rows]) <= 0)
    rest = np.setdiff1d(np.arange(len(a)), rows)
    if rows.size:
      assert a[rest].max() <= a[rows].min()
    np.testing.assert_array_equal(np.sort(a[rows]), np.sort(a)[::-1][
        :rows.size][::-1])
  assert tops[5].size == 0                        # the dead dim: nothing.


def test_weak_images_lie_in_the_faint_end():
  z, _ = _sparse_features(2)
  rows = data.weak_images(z, 0, 4, seed=3)
  a = np.abs(z[:, 0])
  on = a[a > metrics.ZERO_TOL]
  assert rows.size == 4 and len(set(rows.tolist())) == 4
  assert np.all(a[rows] > metrics.ZERO_TOL)
  assert np.all(a[rows] <= np.quantile(on, 0.25))
  assert np.all(np.diff(a[rows]) >= 0)
  assert data.weak_images(z, 5, 4).size == 0


def test_nearest_neighbours_are_the_cosine_nearest():
  rng = np.random.default_rng(4)
  z = rng.normal(size=(50, 6)).astype(np.float32)
  z[7] = 0.0                                      # an all-zero row.
  z[9] = 3.0 * z[2]                               # same direction as row 2.
  rows = np.array([2, 7, 11, 12])
  z[12] = -z[11]                                  # row 11's antipode.
  found = data.nearest_neighbours(z, rows, 49)
  unit = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-30)
  for q, (nb, s) in zip(rows, found):
    if q == 7:
      continue
    assert q not in nb and 7 not in nb          # self and all-zero excluded
    assert len(nb) == 48
    brute = unit @ unit[q]
    brute[[q, 7]] = -np.inf
    np.testing.assert_allclose(s, np.sort(brute)[::-1][:48], atol=1e-6)
    np.testing.assert_allclose(s, brute[nb], atol=1e-6)
  assert found[0][0][0] == 9 and found[0][1][0] == pytest.approx(1.0)
  assert found[2][0][-1] == 12 and found[2][1][-1] == pytest.approx(-1.0)
  # The all-zero row has no direction: no neighbours.
  assert found[1][0].size == 0
  np.testing.assert_array_equal(data.nearest_neighbours(z, [2], 3)[0][0],
                                found[0][0][:3])


def test_closed_gates_follow_the_eval_mode():
  mask = np.array([[1.0, 0.0], [0.0, 1.0]])
  np.testing.assert_array_equal(data.closed_gates(mask, "hard"),
                                [[False, True], [True, False]])
  probs = np.array([[0.7, 0.2], [0.5, 0.51]])
  np.testing.assert_array_equal(data.closed_gates(probs, "soft", 0.5),
                                [[False, True], [True, False]])


def test_sample_images_draws_per_class():
  labels = np.repeat(np.arange(4), [5, 1, 0, 7])
  rows = data.sample_images(labels, 3, 4, seed=1)
  np.testing.assert_array_equal(np.bincount(labels[rows], minlength=4),
                                [3, 1, 0, 3])
  assert np.all(np.diff(rows) > 0)


def test_run_names_are_unique():
  def meta(workdir, method):
    return (workdir, config_lib.from_dict({"method": method}), {})
  names = site._run_names([meta("/r/a", "ncl"), meta("/r/b x/", "ncl"),
                           meta("/s/a", "ncl"), meta("/r/c", "cl")])
  assert names == ["ncl_a", "ncl_b_x", "ncl_a_", "cl"]
  # Names from someone else's config.json become file names of the site.
  names = site._run_names([meta("/r/a", "../../x"), meta("/r/b", "<i>"),
                           meta("/r/c", "")])
  assert names == ["______x", "_i_", "run"]


@pytest.mark.slow
def test_screenshot_of_a_page(tmp_path):
  if not os.path.exists(CHROMIUM):
    pytest.skip("apt-get install -y chromium")
  # pylint: disable-next=g-import-not-at-top
  from bayesncl_jax.explore import screenshot
  page = tmp_path / "p.html"
  page.write_text("<html><body style='background:#ff0000'></body></html>")
  screenshot.screenshot(str(page), str(tmp_path / "shot.png"), 320, 200)
  pixels = np.asarray(Image.open(tmp_path / "shot.png").convert("RGB"))
  assert pixels.shape == (200, 320, 3)
  np.testing.assert_array_equal(pixels[100, 160], [255, 0, 0])
  with pytest.raises(FileNotFoundError, match="build the site first"):
    screenshot.screenshot(str(tmp_path / "none.html"), str(tmp_path / "x.png"))


def test_html_charts_escape_and_format():
  svg = H.bar_chart([1, 2], ["<a>", "b"], title="x & y")
  assert "&lt;a&gt;" in svg and "x &amp; y" in svg and "<a>" not in svg
  assert H.fmt(None) == "–" and H.fmt(float("nan")) == "–"
  assert H.fmt(0.5, 3) == "0.500" and H.fmt(3) == "3" and H.fmt(1.0) == "1.0000"
  assert H.fmt_metric(48.0) == "48" and H.fmt_metric(1.0) == "1.0000"
  assert H.fmt(0.000123) == "0.000123" and H.fmt(0.00123) == "0.0012"
  assert H.sort_value(float("nan")) == "" and H.sort_value(2.0) == "2.0"
  assert len(set(H.class_colors(100))) == 100


def test_templates_escape_by_default():
  script = "<script>alert(1)</script>"
  page = H.render("page.html", title=script, root="../",
                  nav=[(script, 'runs/a b"<x>/index.html')])
  assert script not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
  # A link is percent-encoded: no quote ends the attribute.
  assert '<a href="runs/a%20b%22%3Cx%3E/index.html">' in page
  table = H.table([script], [[script, H.Markup("<b>kept</b>")]])
  assert script not in table and "<b>kept</b>" in table
  svg = H.line_chart({script: ([1, 2], [0.5, 0.7])}, title=script)
  assert script not in svg and "&lt;script&gt;" in svg
  assert script not in H.class_bar([1, 2], [script, "b"], ["#000", "#fff"])


# ----------------------------------------------------------------------------
# Tiny real runs (trained and evaluated once per module).
# ----------------------------------------------------------------------------
def _tiny_config(method, **overrides):
  return config_lib.load_file(ROOT / "configs" / "fashion_mnist.py",
                              f"method={method}", {**TINY, **overrides})


@contextlib.contextmanager
def _locked(path):
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
  """method -> workdir of a tiny run, trained and evaluated on first use.

  Under pytest-xdist the runs live in the session's shared temp folder and
  are made once, by whichever worker needs them first (a file lock); the
  tests only read them.
  """
  shared = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    shared = shared.parent          # the session's folder, above gw0, gw1.

  def get(method):
    workdir = shared / f"explore_tiny_{method}"
    with _locked(shared / f"explore_tiny_{method}.lock"):
      if not (workdir / "DONE").exists():
        shutil.rmtree(workdir, ignore_errors=True)
        train.train_and_evaluate(_tiny_config(method), str(workdir))
        evaluate.evaluate(str(workdir), EVAL)
        (workdir / "DONE").write_text("")
    return workdir
  return get


@pytest.fixture(scope="session")
def bayes_site(tiny_runs, tmp_path_factory):
  out = tmp_path_factory.mktemp("site_bayes") / "site"
  summary = site.build_site([str(tiny_runs("bayesncl"))], str(out), SMALL)
  return out, summary


def _features(workdir):
  setup, state = evaluate.load_state(str(workdir))
  f = evaluate.extract_features(setup, state, "test", 64, N_TEST)
  assert np.array_equal(f["index"], np.arange(N_TEST))
  return f


def _alts(html_text):
  """Test-image rows of the thumbnails of an HTML fragment, in order."""
  return [int(m) for m in re.findall(r'alt="test image (\d+)"', html_text)]


def _assert_links_resolve(out):
  """Every href/src of every page is a file of the site (or data:)."""
  checked = 0
  for page in out.rglob("*.html"):
    for ref in set(re.findall(r'(?:href|src)="([^"#?]*)', page.read_text())):
      if ref == "data:,":
        continue
      # No network: nothing is fetched from outside the folder.
      assert "://" not in ref and not ref.startswith("/"), (page, ref)
      assert (page.parent / ref).is_file(), (page, ref)
      checked += 1
  assert checked > 0


def _section(html_text, heading_start):
  start = html_text.index(f"<h2>{heading_start}")
  end = html_text.find("<h2>", start + 4)
  return html_text[start:end if end > 0 else None]


@pytest.mark.slow
@needs_fmnist
def test_site_pages_show_the_evaluated_features(tiny_runs, bayes_site):
  out, summary = bayes_site
  workdir = tiny_runs("bayesncl")
  f = _features(workdir)
  z, mask = f["z"], f["gate_mask"]
  report = json.loads((workdir / "eval" / "report.json").read_text())
  assert summary["runs"] == ["bayesncl"] and summary["pages"] > 3
  assert (out / site.MARKER).exists()
  for name in ("index.html", "dims.html", "static/explorer.css",
               "static/explorer.js", "img/000.png"):
    assert (out / name).stat().st_size > 0, name
  _assert_links_resolve(out)
  index = (out / "index.html").read_text()
  assert f"{report['semantic_consistency']:.4f}" in index
  assert "training curves" in index.lower() and "<svg" in index

  active = np.flatnonzero(np.abs(z).max(0) > metrics.ZERO_TOL)
  assert len(list((out / "dims").glob("*.html"))) == active.size
  dims_html = (out / "dims.html").read_text()
  assert dims_html.count("<tr data-cls=") == active.size
  for dim in active[:4]:
    page = (out / "dims" / f"{dim:03d}.html").read_text()
    # The top grid holds exactly the largest |z| of this dim, in order.
    shown = _alts(_section(page, "Top"))
    a = np.abs(z[:, dim])
    expect = np.argsort(-a, kind="stable")[:25]
    expect = expect[a[expect] > metrics.ZERO_TOL]
    assert len(shown) == len(expect)
    np.testing.assert_allclose(a[shown], a[expect], rtol=1e-6)
    open_rate = f"{mask[:, dim].mean():.3f}"
    assert f"<dt>gate open rate</dt><dd>{open_rate}</dd>" in page

  # An image page: its closed dims are the mask's zeros, its neighbours the
  # cosine-nearest test images, its active dims those with |z| > eps.
  rows = sorted(int(p.stem) for p in (out / "images").glob("*.html"))
  row = rows[len(rows) // 2]
  page = (out / "images" / f"{row:05d}.html").read_text()
  closed = re.search(r'id="closed-dims">(.*?)</p>', page).group(1)
  closed_dims = [int(m) for m in re.findall(r">(\d+)<", closed)]
  np.testing.assert_array_equal(closed_dims, np.flatnonzero(mask[row] == 0))
  unit = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-30)
  sim = unit @ unit[row]
  sim[row] = -np.inf
  nbrs = _alts(_section(page, "Nearest"))
  assert len(nbrs) == SMALL.neighbours
  sim[~(np.abs(z) > metrics.ZERO_TOL).any(1)] = -np.inf   # all-zero rows
  np.testing.assert_allclose(sim[nbrs], np.sort(sim)[::-1][:len(nbrs)],
                             atol=1e-5)
  n_active = int(np.sum(np.abs(z[row]) > metrics.ZERO_TOL))
  assert f"<dt>active dims</dt><dd>{n_active} of 16</dd>" in page

  # Each thumbnail's sprite cell holds the test image it names, as the
  # dataset source gives it.
  source = datasets.get_source(_tiny_config("bayesncl").dataset, "test")
  thumbs = re.findall(r'<span class="(th|lg) px"><img src="[./]*img/(\d+)'
                      r'\.png" alt="test image (\d+)" style="left:(-?\d+)px;'
                      r'top:(-?\d+)px"></span>', page)
  assert len(thumbs) == 1 + SMALL.neighbours
  assert thumbs[0][0] == "lg" and int(thumbs[0][2]) == row
  for kind, sheet, shown_row, left, top in thumbs:
    size = site.ImageStore.SIZES[kind]
    c, r = -int(left) // size, -int(top) // size
    pixels = np.asarray(Image.open(out / "img" / f"{int(sheet):03d}.png"))
    assert pixels.shape[1] == site.ImageStore.COLS * 28
    np.testing.assert_array_equal(pixels[r * 28:(r + 1) * 28,
                                         c * 28:(c + 1) * 28],
                                  source[int(shown_row)]["image"][..., 0])


@pytest.mark.slow
@needs_fmnist
def test_saved_features_are_used_instead_of_a_forward(tiny_runs, tmp_path,
                                                      monkeypatch):
  workdir = tmp_path / "run"
  shutil.copytree(tiny_runs("bayesncl"), workdir)
  # What the explorer computes without features.npz is what evaluate
  # --save_features writes.
  computed = data.compute_features(str(workdir), 2, N_TEST, 64)
  evaluate.evaluate(str(workdir), dataclasses.replace(
      EVAL, protocols=("interp",), save_features=True))
  with np.load(workdir / "eval" / "features.npz") as f:
    saved = dict(f)
  assert "train_z" in saved
  assert sorted(computed) == sorted(k for k in saved if k.startswith("test_"))
  for key, value in computed.items():
    np.testing.assert_allclose(value, saved[key], rtol=1e-5, atol=1e-6)

  def no_forward(*args, **kwargs):
    raise AssertionError("features.npz exists: nothing to extract")
  monkeypatch.setattr(data, "compute_features", no_forward)
  run = data.load_run(str(workdir))
  np.testing.assert_array_equal(run.features["z"], saved["test_z"])
  np.testing.assert_array_equal(run.features["gate_mask"],
                                saved["test_gate_mask"])
  np.testing.assert_array_equal(run.features["gate_probs"],
                                saved["test_gate_probs"])
  assert "train_z" not in run.features and not run.nuisances
  # The per-dim numbers the pages show are dims.npz's.
  st = data.dim_stats(run.features["z"], run.features["labels"], 10,
                      run.features["gate_mask"],
                      run.report["top_k_consistency_k"])
  np.testing.assert_allclose(st["consistency"], run.dims["class_purity"])
  np.testing.assert_allclose(st["top_k_consistency"],
                             run.dims["top_k_class_purity"])
  np.testing.assert_allclose(st["gate_open_rate"],
                             run.dims["gate_open_rate"], rtol=1e-6)

  # A dataset with a nuisance label (as fashion_mnist_backgrounds): its
  # value per image and the mechanism protocol's dims.
  names = ("plain", "stripes", "checks")
  monkeypatch.setattr(datasets, "nuisance_labels",
                      lambda dataset_config: {"background": names})
  rng = np.random.default_rng(0)
  background = rng.integers(0, 3, N_TEST)
  np.savez(workdir / "eval" / "features.npz", test_background=background,
           **saved)
  dims = dict(np.load(workdir / "eval" / "dims.npz"))
  is_bg = rng.uniform(size=16) < 0.5
  dims.update(class_purity_pregate=rng.uniform(size=16),
              background_purity=rng.uniform(size=16),
              is_background_dim=is_bg)
  np.savez(workdir / "eval" / "dims.npz", **dims)
  out = tmp_path / "site"
  site.build_site([str(workdir)], str(out), SMALL)
  table = (out / "dims.html").read_text()
  assert "background purity" in table and "top-k consistency" in table
  marked = [int(d) for d in re.findall(
      r'<tr data-cls="\d+" class="bg"><td class="num" data-v="(\d+)"', table)]
  active = np.flatnonzero(np.abs(saved["test_z"]).max(0) > metrics.ZERO_TOL)
  expect = [d for d in active if is_bg[d]]
  assert marked == expect and expect
  row = sorted(int(p.stem) for p in (out / "images").glob("*.html"))[0]
  page = (out / "images" / f"{row:05d}.html").read_text()
  assert (f"<dt>background</dt><dd>{names[background[row]]}</dd>" in page)
  dim_page = (out / "dims" / f"{expect[0]:03d}.html").read_text()
  assert "<dt>background dim</dt><dd>yes</dd>" in dim_page
  dims["background_purity"] = np.ones(3)
  np.savez(workdir / "eval" / "dims.npz", **dims)
  with pytest.raises(data.ExploreError, match="one value per feature dim"):
    data.load_run(str(workdir))


# ----------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------
@pytest.mark.slow
@needs_fmnist
def test_bad_input_gives_clear_errors(tiny_runs, tmp_path):
  good = tiny_runs("bayesncl")
  out = str(tmp_path / "site")
  with pytest.raises(data.ExploreError, match="does not exist"):
    site.build_site([str(tmp_path / "nope")], out)
  with pytest.raises(data.ExploreError, match="No config.json"):
    site.build_site([str(tmp_path)], out)
  bare = tmp_path / "bare"
  bare.mkdir()
  shutil.copy(good / "config.json", bare / "config.json")
  with pytest.raises(data.ExploreError, match="No checkpoint.*Pre-train"):
    site.build_site([str(bare)], out)
  unevaluated = tmp_path / "unevaluated"
  shutil.copytree(good, unevaluated, ignore=shutil.ignore_patterns("eval"))
  with pytest.raises(data.ExploreError,
                     match="No evaluation.*bayesncl_jax.evaluate"):
    site.build_site([str(unevaluated)], out)
  # A run on another dataset cannot be compared.
  other = tmp_path / "other"
  shutil.copytree(good, other)
  config = json.loads((other / "config.json").read_text())
  config["dataset"]["name"] = "cifar10"
  (other / "config.json").write_text(json.dumps(config))
  with pytest.raises(data.ExploreError, match="same test images.*cifar10"):
    site.build_site([str(good), str(other)], out)
  with pytest.raises(data.ExploreError, match="twice"):
    site.build_site([str(good), str(good) + "/"], out)
  # --out holding something else is not overwritten.
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "notes.txt").write_text("mine")
  with pytest.raises(data.ExploreError, match="refusing to overwrite"):
    site.build_site([str(good)], str(tmp_path / "busy"))
  assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
  assert not os.path.exists(out)


@pytest.mark.slow
@needs_fmnist
def test_command_line_exit_codes(tiny_runs, tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  unevaluated = tmp_path / "unevaluated"
  shutil.copytree(tiny_runs("bayesncl"), unevaluated,
                  ignore=shutil.ignore_patterns("eval"))
  proc = subprocess.run(
      [sys.executable, "-m", "bayesncl_jax.explore",
       f"--workdir={unevaluated}", f"--out={tmp_path / 'site'}"], cwd=ROOT,
      env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert "error: No evaluation in" in proc.stderr
  assert "Traceback" not in proc.stderr


@needs_fmnist
def test_second_explorer_on_one_site_is_refused(tiny_runs, tmp_path):
  """explore --out holds the lock beside the site; a second one exits 4."""
  from bayesncl_jax import cli  # pylint: disable=g-import-not-at-top
  site_dir = tmp_path / "site"
  script = ("import sys, time\n"
            "from bayesncl_jax import workdir_lock\n"
            "with workdir_lock.hold_output(sys.argv[1], 'holding for a test'):\n"
            "  print('held', flush=True)\n"
            "  time.sleep(600)\n")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  holder = subprocess.Popen([sys.executable, "-c", script, str(site_dir)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    proc = subprocess.run(
        [sys.executable, "-m", "bayesncl_jax.explore",
         f"--workdir={tiny_runs('bayesncl')}", f"--out={site_dir}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  finally:
    holder.kill()
    holder.wait()
  assert proc.returncode == cli.EXIT_LOCKED, proc.stderr
  assert proc.stderr.count("error: ") == 1, proc.stderr
  assert "holding for a test" in " ".join(proc.stderr.split())
  assert not site_dir.exists()


# ----------------------------------------------------------------------------
# The site in a real browser.
# ----------------------------------------------------------------------------
def _browser():
  webdriver = pytest.importorskip("selenium.webdriver")
  # pylint: disable-next=g-import-not-at-top
  from selenium.webdriver.chrome.service import Service
  if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip("apt-get install -y chromium chromium-driver")
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for flag in ("--headless", "--no-sandbox", "--disable-gpu",
               "--disable-quic", "--no-first-run",
               "--disable-background-networking",
               "--disable-component-update", "--disable-sync",
               "--window-size=1280,1000"):
    options.add_argument(flag)
  profile = tempfile.mkdtemp(prefix="chromium_profile_")
  options.add_argument(f"--user-data-dir={profile}")
  options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
  # An explicit chromedriver: selenium does not try to download one.
  driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
  driver.set_page_load_timeout(60)
  return driver, profile


@pytest.fixture
def browser():
  driver, profile = _browser()
  yield driver
  driver.quit()
  shutil.rmtree(profile, ignore_errors=True)


def _assert_page_ok(driver):
  """Every <img> decoded, and nothing went wrong in the console."""
  broken = driver.execute_script(
      "return Array.from(document.images).filter("
      "i => !i.complete || i.naturalWidth === 0).map(i => i.src);")
  n_images = driver.execute_script("return document.images.length;")
  assert not broken, broken
  errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
  assert not errors, errors
  return n_images


def _column(driver, table_id, col):
  return driver.execute_script(
      f"return Array.from(document.querySelectorAll('#{table_id} tbody tr'))"
      f".filter(r => !r.hidden).map(r => r.cells[{col}].textContent.trim());")


@pytest.mark.slow
@needs_fmnist
def test_site_in_a_real_browser(bayes_site, browser):
  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import Select
  out, _ = bayes_site
  browser.get((out / "index.html").as_uri())
  assert "overview" in browser.title
  assert _assert_page_ok(browser) > 0
  # Overview -> dimensions table.
  browser.find_element(By.LINK_TEXT, "The dimensions table").click()
  assert "dimensions" in browser.title
  _assert_page_ok(browser)
  before = _column(browser, "dims", 0)
  header = browser.find_element(By.XPATH,
                                "//table[@id='dims']//th[.='consistency']")
  header.click()
  ascending = [float(v) for v in _column(browser, "dims", 2)]
  assert ascending == sorted(ascending)
  header.click()
  descending = [float(v) for v in _column(browser, "dims", 2)]
  assert descending == sorted(ascending, reverse=True)
  assert _column(browser, "dims", 0) != before
  assert header.get_attribute("aria-sort") == "descending"
  # Numbers sort as numbers (dim 10 after dim 9), not as text.
  browser.find_element(By.XPATH, "//table[@id='dims']//th[.='dim']").click()
  dims = [int(v) for v in _column(browser, "dims", 0)]
  assert dims == sorted(dims)
  if min(dims) < 10 <= max(dims):
    assert dims != sorted(dims, key=str)
  # Filter by the top class of the first row.
  first_class = _column(browser, "dims", 1)[0]
  Select(browser.find_element(By.ID, "class-filter")).select_by_visible_text(
      first_class)
  kept = _column(browser, "dims", 1)
  assert kept and set(kept) == {first_class}
  assert browser.find_element(By.ID, "dims-count").text.startswith(
      f"{len(kept)} of ")
  # Table -> a dimension page -> an image page.
  link = browser.find_element(By.CSS_SELECTOR, "#dims tbody tr a")
  dim = link.text
  link.click()
  assert browser.title.endswith(f"dimension {dim}")
  assert _assert_page_ok(browser) >= 1
  browser.find_element(By.CSS_SELECTOR, "figure a").click()
  assert "test image" in browser.title
  _assert_page_ok(browser)
  # The big image really shows pixels of its sprite sheet.
  size = browser.execute_script(
      "const i = document.querySelector('span.lg img');"
      "return [i.naturalWidth, i.naturalHeight];")
  assert size[0] > 0 and size[1] > 0


@pytest.mark.slow
@needs_fmnist
def test_compare_three_methods(tiny_runs, tmp_path, browser):
  # pylint: disable-next=g-import-not-at-top
  from selenium.webdriver.common.by import By
  workdirs = [str(tiny_runs(m)) for m in ("cl", "ncl", "bayesncl")]
  out = tmp_path / "site"
  summary = site.build_site(workdirs, str(out), SMALL)
  assert summary["runs"] == ["cl", "ncl", "bayesncl"]
  for name in ("cl", "ncl", "bayesncl"):
    assert (out / "runs" / name / "index.html").exists()
  _assert_links_resolve(out)
  compare = (out / "compare.html").read_text()
  reports = [json.loads((pathlib.Path(w) / "eval" / "report.json")
                        .read_text()) for w in workdirs]
  row = re.search(r"<td>semantic consistency[^<]*</td>(.*?)</tr>", compare)
  assert row, "no consistency row"
  for r in reports:
    assert f"{r['semantic_consistency']:.4f}" in row.group(1)
  browser.get((out / "index.html").as_uri())
  _assert_page_ok(browser)
  browser.find_element(By.LINK_TEXT, "Compare them side by side").click()
  assert browser.title == "Compare runs"
  assert _assert_page_ok(browser) > 10
  headers = browser.execute_script(
      "return Array.from(document.querySelectorAll('table')).pop()"
      ".tHead.rows[0].cells.length;")
  assert headers == 4                         # image + one column per run.
  # A run's dim page from the compare page, then back to the runs.
  browser.find_element(By.PARTIAL_LINK_TEXT, "dim ").click()
  assert "dimension" in browser.title
  _assert_page_ok(browser)
  browser.find_element(By.LINK_TEXT, "all runs").click()
  assert browser.title == "Feature explorer: runs"


def test_run_summary_names_the_next_commands():
  text = train.format_summary({"method": "ncl", "step": 3}, "/tmp/run_x")
  assert "python -m bayesncl_jax.evaluate --workdir=/tmp/run_x" in text
  assert ("python -m bayesncl_jax.explore --workdir=/tmp/run_x "
          "--out=/tmp/run_x/explorer") in text
  assert "--out=explorer" in train.format_summary({}, "gs://bucket/run")
  assert "explore" not in train.format_summary({"preempted": True}, "/x")
  assert "explore" not in train.format_summary({"method": "cl"})


# ----------------------------------------------------------------------------
# Crafted workdirs: nothing outside --out, no injected markup.
# ----------------------------------------------------------------------------
class _Elements(html_parser.HTMLParser):
  """Every start tag of a page with its attributes (the browser's view)."""

  def __init__(self):
    super().__init__()
    self.tags = []

  def handle_starttag(self, tag, attrs):
    self.tags.append((tag, dict(attrs)))


def _crafted(src, dst, method, step):
  """A copy of an evaluated run whose config and report carry `method`/`step`.

  features.npz is written so that the explorer needs no forward pass (the
  crafted method would not build a model).
  """
  shutil.copytree(src, dst)
  feats = data.compute_features(str(dst), 2, N_TEST, 64)
  np.savez(dst / "eval" / "features.npz", **feats)
  config = json.loads((dst / "config.json").read_text())
  config["method"] = method
  (dst / "config.json").write_text(json.dumps(config))
  report = json.loads((dst / "eval" / "report.json").read_text())
  report["step"] = step
  (dst / "eval" / "report.json").write_text(json.dumps(report))


@needs_fmnist
def test_crafted_workdirs_write_nothing_outside_out(tiny_runs, tmp_path):
  script = "<script>alert(1)</script>"
  crafted = tmp_path / "in"
  crafted.mkdir()
  _crafted(tiny_runs("bayesncl"), crafted / "a", "../../escaped",
           f'2{script}')
  _crafted(tiny_runs("ncl"), crafted / 'b"<b onmouseover=alert(3)>',
           f'x"><img src=x onerror=alert(2)>{script}', f"2{script}")
  _crafted(tiny_runs("cl"), crafted / "c", "../../escaped", 2)
  # The site sits two levels down: "../../escaped" from runs/ lands in
  # tmp_path/deep/escaped on the old code.
  out = tmp_path / "deep" / "er" / "site"
  before = {p for p in tmp_path.rglob("*")}
  summary = site.build_site(sorted(str(p) for p in crafted.iterdir()),
                            str(out), SMALL)
  written = {p for p in tmp_path.rglob("*")} - before
  outside = [p for p in written
             if not p.resolve().is_relative_to(out.resolve())
             and p.resolve() not in out.resolve().parents]
  assert not outside, outside
  for name in summary["runs"]:
    assert re.fullmatch(r"[A-Za-z0-9_-]+", name), name
  _assert_links_resolve(out)
  pages = list(out.rglob("*.html"))
  assert len(pages) > 10
  for page in pages:
    text = page.read_text()
    parser = _Elements()
    parser.feed(text)
    scripts = [a for t, a in parser.tags if t == "script"]
    # The one script of every page is the site's own explorer.js.
    assert len(scripts) == 1 and scripts[0]["src"].endswith(
        "static/explorer.js"), (page, scripts)
    for tag, attrs in parser.tags:
      assert not any(k.startswith("on") for k in attrs), (page, tag, attrs)
      assert tag != "img" or attrs.get("src", "").endswith(".png"), (
          page, attrs)
  # The crafted values are shown, as text.
  index = (out / "index.html").read_text()
  assert "2&lt;script&gt;alert(1)&lt;/script&gt;" in index
  assert script not in index
