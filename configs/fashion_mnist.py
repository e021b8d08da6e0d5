r"""The embedded default: real Fashion-MNIST, a small ResNet, CPU-friendly.

Data: the Debian package `dataset-fashion-mnist` (apt-get install -y
dataset-fashion-mnist), read from /usr/share/datasets/fashion-mnist (override
with --config.dataset.data_dir); TFDS `fashion_mnist` is the fall-back.

  python -m bayesncl_jax.main --config=configs/fashion_mnist.py \
      --workdir=/tmp/fmnist_bayesncl

Variants (config argument after the path, comma-separated; docs/method.md
§2, §7): `method=cl|ncl|ncl_topk|bayesncl` (default bayesncl),
`gate=ste|gumbel_sigmoid|gumbel_authors` (default gumbel_sigmoid; `ste` is
the gate of the paper's headline numbers), `top_k=8` (ncl_topk), and the
ablations `soft_gate`, `no_isolation`, `gate_depth=1|2|3`, e.g.
`--config=configs/fashion_mnist.py:method=bayesncl,gate=ste,gate_depth=1`.
Expected result (measured on a 2-core CPU, see README "Embedded default"): a
few minutes of wall time, ending with the summary table of online linear
accuracy on the test split and feature sparsity.
"""
from bayesncl_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, **config_lib.variant_args(top_k=8))
  c = config_lib.base_config()
  config_lib.apply_variant(c, arg)  # method, gate, ablations.

  c.dataset.name = "fashion_mnist"
  c.dataset.image_size = 28
  c.dataset.num_classes = 10
  c.dataset.mean = (0.2860,)
  c.dataset.std = (0.3530,)
  c.dataset.num_workers = 0  # 28x28 crops are cheap; no worker processes.

  # Grayscale images: saturation/hue/grayscale are identities on 1 channel.
  c.aug.crop_scale = (0.2, 1.0)
  c.aug.blur_prob = 0.0

  # A small variant of ResNet-18: same code, 3 stages of 1 block, width 8.
  c.model.backbone = "resnet18"
  c.model.width = 8
  c.model.stage_sizes = (1, 1, 1)
  c.model.stem = "cifar"
  c.model.proj_hidden = 256
  c.model.proj_out = 64
  c.model.non_neg = "rep_relu"

  c.optim.batch_size = 256
  c.optim.base_lr = 0.4
  c.optim.epochs = 200
  c.optim.total_steps = 300  # 1.3 epochs: the few-minutes CPU budget.
  c.optim.warmup_epochs = 10

  c.log_every = 25
  c.ckpt_every = 100
  return c
