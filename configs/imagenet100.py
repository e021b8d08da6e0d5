r"""ImageNet-100 (the 100 classes of bayesncl_jax/imagenet100_classes.txt).

Data, either of:
  * an ImageNet-100 folder (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG),
    converted once:  python -m bayesncl_jax.prepare_imagenet100 \
        --src=/data/imagenet100 --out=/data/imagenet100_ar
  * the TFDS `imagenet2012` build (from the manual download), filtered to
    the 100 classes on the fly.
then --config.dataset.data_dir=that directory.

Host cost: random-resized crops are cut on the accelerator
(`aug.crop_on="device"`: the host decodes, draws the boxes and sends each
image once on a 512x512 canvas). Measured on a shared 2-core CPU
(bench/RESULTS.md §6): ~1.5 CPU-ms per image at full resolution and ~1.1
with records converted with `--resize_shorter=256`, against ~4.3 and ~2.9
with host crops (`--config.aug.crop_on=host`), i.e. ~4.5 (or ~3.4) host
cores per accelerator at 3000 img/s instead of ~13 (or ~9). With
pre-resized records `--config.aug.canvas_size=384` sends 44% fewer bytes.
Set `dataset.num_workers` to what the host has per accelerator.

  python -m bayesncl_jax.main --config=configs/imagenet100.py:method=bayesncl \
      --workdir=gs://BUCKET/in100_bayesncl --config.dataset.data_dir=DIR

ResNet-18 (ImageNet stem), 224 px, projector 16384 -> 2048, relu, batch 128,
LARS base lr 0.3, 100 epochs, blur p=0.5, bfloat16 compute.
Variants: the config argument also takes `method=ncl_topk` (top_k=256 by
default), `gate=ste|gumbel_sigmoid|gumbel_authors` and the ablations
`soft_gate`, `no_isolation`, `gate_depth=N` (configs/fashion_mnist.py).
Expected result: not measured with this code yet (no accelerator was
available while writing it); the BayesNCL paper reports ImageNet-100
linear accuracy and semantic consistency for this recipe.
"""
from bayesncl_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, **config_lib.variant_args(top_k=256),
                             dtype="bfloat16", batch_size=128)
  c = config_lib.base_config()
  config_lib.apply_variant(c, arg)  # method, gate, ablations.
  c.dataset.name = "imagenet100"
  c.dataset.num_classes = 100
  c.dataset.image_size = 224
  c.dataset.eval_split = "validation"
  c.dataset.mean = (0.485, 0.456, 0.406)
  c.dataset.std = (0.229, 0.224, 0.225)
  c.dataset.num_workers = 16
  c.aug.blur_prob = 0.5
  c.aug.crop_on = "device"  # bench/RESULTS.md §6: ~3x less host CPU.
  c.aug.canvas_size = 512  # holds ImageNet's typical 500x375 images.
  c.model.stem = "imagenet"
  c.model.proj_hidden = 16384
  c.model.proj_out = 2048
  c.model.non_neg = "relu"
  c.model.dtype = arg.dtype
  c.optim.batch_size = arg.batch_size  # authors 128 (NCL paper says 256).
  c.optim.base_lr = 0.3
  c.optim.epochs = 100
  c.log_every = 100
  c.ckpt_every = 2000
  config_lib.use_papers_eval_recipe(c, "imagenet100")  # linear probe, fine-tuning
  return c
