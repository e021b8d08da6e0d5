r"""A PNG screenshot of an explorer page, taken with headless chromium.

  python -m bayesncl_jax.explore.screenshot --page=SITE/dims/012.html \
      --out=docs/explorer_dim.png [--width=1280 --height=1100]

Needs the system chromium (Debian: apt-get install -y chromium); nothing is
downloaded and no network is used. A fresh, temporary browser profile.
"""
import os
import shutil
import subprocess
import sys
import tempfile

from absl import app
from absl import flags

FLAGS = flags.FLAGS
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu",
                  "--disable-quic", "--no-first-run",
                  "--disable-background-networking",
                  "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--force-device-scale-factor=1")


def screenshot(page: str, out: str, width: int = 1280, height: int = 1100,
               chromium: str | None = None) -> None:
  """Renders the local HTML file `page` into the PNG `out`."""
  chromium = chromium or shutil.which("chromium") or shutil.which(
      "chromium-browser")
  if not chromium:
    raise FileNotFoundError("No chromium found: apt-get install -y chromium")
  if not os.path.isfile(page):
    raise FileNotFoundError(f"No page {page}: build the site first with "
                            "python -m bayesncl_jax.explore")
  out = os.path.abspath(out)
  os.makedirs(os.path.dirname(out), exist_ok=True)
  profile = tempfile.mkdtemp(prefix="chromium_profile_")
  try:
    subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
         f"--window-size={width},{height}", "--virtual-time-budget=3000",
         f"--screenshot={out}", "file://" + os.path.abspath(page)],
        check=True, capture_output=True, timeout=120)
  finally:
    shutil.rmtree(profile, ignore_errors=True)
  if not os.path.isfile(out):
    raise RuntimeError(f"chromium wrote no screenshot to {out}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    screenshot(FLAGS.page, FLAGS.out, FLAGS.width, FLAGS.height)
  except (FileNotFoundError, RuntimeError,
          subprocess.CalledProcessError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"Wrote {FLAGS.out}.")


if __name__ == "__main__":
  flags.DEFINE_string("page", None, "The HTML file of a built site.")
  flags.DEFINE_string("out", None, "PNG to write.")
  flags.DEFINE_integer("width", 1280, "Window width in pixels.")
  flags.DEFINE_integer("height", 1100, "Window height in pixels.")
  flags.mark_flags_as_required(["page", "out"])
  app.run(main)
