r"""CIFAR-10 with the authors' settings (docs/method.md §2-4).

Data: TFDS `cifar10` prepared once where there is internet
(`tfds build cifar10 --data_dir=DIR`, or `python -c "import
tensorflow_datasets as tfds; tfds.data_source('cifar10', data_dir='DIR',
download=True)"`), then --config.dataset.data_dir=DIR.

  python -m bayesncl_jax.main --config=configs/cifar10.py:method=bayesncl \
      --workdir=gs://BUCKET/cifar10_bayesncl

ResNet-18 (CIFAR stem), projector 2048 -> 256, rep_relu, batch 256, LARS
base lr 0.4, 200 epochs, T = 0.2, bfloat16 compute on accelerators.
Variants: the config argument also takes `method=ncl_topk` (top_k=32 by
default), `gate=ste|gumbel_sigmoid|gumbel_authors` and the ablations
`soft_gate`, `no_isolation`, `gate_depth=N` (configs/fashion_mnist.py).
Expected result: not measured with this code yet (no accelerator was
available while writing it); the papers report their CIFAR-10 numbers.
"""
from bayesncl_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, **config_lib.variant_args(top_k=32),
                             dtype="bfloat16")
  c = config_lib.base_config()
  config_lib.apply_variant(c, arg)  # method, gate, ablations.
  c.dataset.name = "cifar10"
  c.dataset.num_classes = 10
  c.dataset.image_size = 32
  c.dataset.num_workers = 4
  c.aug.blur_prob = 0.0  # the authors disable blur on CIFAR.
  c.model.dtype = arg.dtype
  config_lib.use_papers_eval_recipe(c, "cifar")  # linear probe, fine-tuning
  return c
