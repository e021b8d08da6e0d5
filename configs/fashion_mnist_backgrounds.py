r"""Fashion-MNIST objects on shared backgrounds: the mechanism testbed, on a CPU.

Each garment is composited (its grey level as alpha, in white) onto one of
B procedural colour backgrounds (gradients, stripes, checks, noise, ...;
`bayesncl_jax/backgrounds.py`), RGB 32x32. Background is drawn independently
of the class (balanced within each class), so it carries no class
information, yet it is the most salient feature two views of an image share:
the "shared background" that BayesNCL's gate is meant to switch off. Examples
carry a `background` label (`datasets.nuisance_names` names them).

Since issue 23 the defaults are shared backgrounds and colour jitter of
strength 0.5; `--config.dataset.background_mode=per_example
--config.aug.brightness=0.8 --config.aug.contrast=0.8
--config.aug.saturation=0.8 --config.aug.hue=0.2` is the testbed before.

--config.dataset.background_mode: `shared` (default) gives every example of
a kind the very same background pixels; `per_example` is the testbed before
issue 23 (fresh colour noise and phases per example, whose noise background
alone identifies the instance under crops: docs/testbed.md).

Data: generated from the Debian `dataset-fashion-mnist` files (or the folder
in --config.dataset.data_dir) on first use, cached in
--config.dataset.cache_dir (default $BAYESNCL_CACHE_DIR or
~/.cache/bayesncl_jax), ~215 MB for B = 6.

  python -m bayesncl_jax.main --config=configs/fashion_mnist_backgrounds.py \
      --workdir=/tmp/fmnist_bg_bayesncl

The config argument is that of configs/fashion_mnist.py (this file starts
from it), e.g. `:method=ncl`; --config.dataset.num_backgrounds=1..8 picks B
(mean/std below were measured for B = 6).

Expected result (docs/testbed.md), measured on the shared 2-core
development CPU under load average 7-26 (wall times are upper bounds):
  building the cache (train + test, first run only): 8 s;
  NCL, 200 steps of 256 (the defaults: shared backgrounds, jitter s = 0.5;
  seed 0):
    python -m bayesncl_jax.main --config=configs/fashion_mnist_backgrounds.py:method=ncl \
        --workdir=/tmp/fmbg_ncl --config.optim.total_steps=200
    python -m bayesncl_jax.evaluate --workdir=/tmp/fmbg_ncl \
        --protocols=linear,mechanism --max_examples=10000
  8 min wall (149 CPU-seconds); online linear acc (test) 0.2368; linear
  probe top-1 on h (10k train images) 0.604 (the testbed before issue 23:
  0.316); all 49 active dims are background dims; background probe from z
  1.000.
The class probe is still short of the 0.75 target at this budget (0.85
epoch); the learning curve (issue 23 item 4) decides the budget. The earlier
BayesNCL number (300 steps, online 0.1215) was the testbed before issue 23.
"""
import os

from bayesncl_jax import config_lib


def get_config(arg=None):
  c = config_lib.load_file(
      os.path.join(os.path.dirname(os.path.abspath(__file__)),
                   "fashion_mnist.py"), arg)

  c.dataset.name = "fashion_mnist_backgrounds"
  c.dataset.image_size = 32
  c.dataset.num_classes = 10
  c.dataset.num_backgrounds = 6  # B: backgrounds 0..B-1, 1 <= B <= 8.
  # shared: one background image per kind, the same for every example (the
  # paper's shared "blue sky"); per_example: the version-1 testbed (fresh
  # noise and phases per example, an instance shortcut: docs/testbed.md).
  c.dataset.background_mode = "shared"
  # "" = $BAYESNCL_CACHE_DIR or ~/.cache/bayesncl_jax. dataset.data_dir, as
  # for fashion_mnist, is the folder of the IDX files ("" = Debian's).
  c.dataset.cache_dir = ""
  # Per-channel statistics of the generated train split (B = 6, shared),
  # computed by tests/test_backgrounds.py::test_config_mean_std_match_the_data.
  # (per_example: mean (0.4910, 0.4676, 0.4665), std (0.3470, 0.2815,
  # 0.3176); within 0.003 of these, so one pair serves both modes.)
  c.dataset.mean = (0.4881, 0.4639, 0.4712)
  c.dataset.std = (0.3474, 0.2816, 0.3173)

  # RGB now: SimCLR's colour augmentations apply (jitter with hue,
  # grayscale p = 0.2) at SimCLR's CIFAR-10 strength s = 0.5 (0.4, 0.4, 0.4,
  # 0.1), not the base config's ImageNet strength s = 1 (0.8, 0.8, 0.8, 0.2):
  # in 200-step NCL runs the class probe on h read 0.604 with s = 0.5 vs
  # 0.390 with s = 1, background dims forming in both (docs/testbed.md).
  # --config.aug.brightness=0.8 ... restores the testbed before issue 23.
  c.aug.brightness = 0.4
  c.aug.contrast = 0.4
  c.aug.saturation = 0.4
  c.aug.hue = 0.1
  # Crop scale and the small model as in configs/fashion_mnist.py.
  return c
