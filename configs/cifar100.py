r"""CIFAR-100 with the authors' settings (docs/method.md §2-4).

Data: TFDS `cifar100` prepared once (`tfds build cifar100 --data_dir=DIR`),
then --config.dataset.data_dir=DIR.

  python -m bayesncl_jax.main --config=configs/cifar100.py:method=bayesncl \
      --workdir=gs://BUCKET/cifar100_bayesncl

Same recipe as configs/cifar10.py with 100 classes and CIFAR-100 statistics.
Variants: the config argument also takes `method=ncl_topk` (top_k=32 by
default), `gate=ste|gumbel_sigmoid|gumbel_authors` and the ablations
`soft_gate`, `no_isolation`, `gate_depth=N` (configs/fashion_mnist.py).
Expected result: not measured with this code yet (no accelerator was
available while writing it); the papers report their CIFAR-100 numbers.
"""
from bayesncl_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, **config_lib.variant_args(top_k=32),
                             dtype="bfloat16")
  c = config_lib.base_config()
  config_lib.apply_variant(c, arg)  # method, gate, ablations.
  c.dataset.name = "cifar100"
  c.dataset.num_classes = 100
  c.dataset.image_size = 32
  c.dataset.mean = (0.5071, 0.4865, 0.4409)
  c.dataset.std = (0.2673, 0.2564, 0.2762)
  c.dataset.num_workers = 4
  c.aug.blur_prob = 0.0
  c.model.dtype = arg.dtype
  config_lib.use_papers_eval_recipe(c, "cifar")  # linear probe, fine-tuning
  return c
