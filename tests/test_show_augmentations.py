"""The augmentation grid tool draws the views the train step makes."""
import pathlib

import numpy as np
import pytest

from bayesncl_jax import config_lib
from bayesncl_jax import show_augmentations

FMNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not FMNIST.exists(),
                    reason="apt-get install -y dataset-fashion-mnist")
def test_grid_of_two_views(tmp_path):
  config = config_lib.base_config()
  config.dataset.name = "fashion_mnist"
  config.dataset.image_size = 28
  config.dataset.mean, config.dataset.std = (0.286,), (0.353,)
  config.dataset.max_train_examples = 64
  v1, v2 = show_augmentations.augmented_views(config, num_images=4)
  assert v1.shape == v2.shape == (4, 28, 28, 1)
  assert v1.min() >= 0 and v1.max() <= 1
  assert not np.allclose(v1, v2)  # two independent views
  out = tmp_path / "grid.png"
  show_augmentations.draw(v1, v2, str(out))
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
