r"""Feature explorer: a static site to browse what every learned dim means.

  python -m bayesncl_jax.explore --workdir=DIR [--workdir=DIR2 ...] --out=SITE

Reads what `bayesncl_jax.evaluate` wrote (eval/report.json, and
eval/features.npz when the evaluation saved its features; otherwise the same
test-split features are extracted from the checkpoint) and writes plain
HTML/CSS/JS and PNG thumbnails that open from file:// with no server and no
network: an overview, a sortable dimensions table, one page per active
dimension and per shown test image, and with several runs a comparison on
the same test images. See `site.py` for the layout.
"""
