"""Flax modules: ResNet encoder, non-negative projector, Bayesian gate, probe.

One module, `ContrastiveModel`, covers the methods of docs/method.md §1:
  CL       z = normalize(g(h))
  NCL      z = normalize(σ+(g(h)))
  NCL+TopK z = normalize(σ+(g(h)) ⊙ topk_mask)
  BayesNCL z = normalize(normalize(σ+(g(h))) ⊙ m),  m ~ gate(stop_grad(h))

BatchNorm needs no `axis_name`: the model runs inside `jax.jit` on a batch
that is `NamedSharding`-ed over the mesh, so a mean over the batch axis *is*
the global-batch mean (SimCLR's synchronised BN) and XLA inserts the
all-reduce itself.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bayesncl_jax import conv as conv_lib

# The same eps guards the L2 normalisation everywhere (docs/method.md §2.3).
NORM_EPS = 1e-12
# The noise constant of the authors' Gumbel-sigmoid (docs/method.md §2).
GUMBEL_EPS = 1e-4
# u ~ U(eps, 1 - eps) for the logistic noise of the binary Concrete gate.
LOGISTIC_EPS = 1e-6

ModuleDef = Any


# ----------------------------------------------------------------------------
# Pure functions: non-negativity, normalisation, gates.
# ----------------------------------------------------------------------------
def rep_relu(z: jax.Array) -> jax.Array:
  """ReLU's value with GELU's gradient (reparameterised ReLU, NCL paper)."""
  g = nn.gelu(z, approximate=False)
  return g - jax.lax.stop_gradient(g) + jax.lax.stop_gradient(nn.relu(z))


_NON_NEG: dict[str, Callable[[jax.Array], jax.Array]] = {
    "none": lambda z: z,
    "relu": nn.relu,
    "rep_relu": rep_relu,
    "gelu": functools.partial(nn.gelu, approximate=False),
    "sigmoid": nn.sigmoid,
    "softplus": nn.softplus,
    "exp": jnp.exp,
    "leaky_relu": nn.leaky_relu,  # slope 0.01, as torch's default.
}


def non_negative(z: jax.Array, kind: str) -> jax.Array:
  """Applies the non-negativity map σ+ named `kind` (docs/method.md §1)."""
  try:
    return _NON_NEG[kind](z)
  except KeyError:
    raise ValueError(f"Unknown non_neg={kind!r}; allowed: "
                     f"{', '.join(_NON_NEG)}") from None


def l2_normalize(z: jax.Array, eps: float = NORM_EPS) -> jax.Array:
  """z / max(||z||, eps) over the last axis; no gradient where ||z|| < eps.

  The value is docs/method.md's. Its derivative inside the eps-ball is 1/eps
  (1e12): an all-zero row — every gate closed, or every ReLU output zero,
  which small gated models produce now and then — would send a 1e12-scaled
  gradient into the projector and backbone, and the BatchNorm and bias
  parameters (not rescaled by LARS) blow up. That slope is an artefact of
  eps, so such rows get a zero gradient instead. (The authors' fp16 grad
  scaler hides the same spike by skipping the overflowing step.)
  """
  sq = jnp.sum(jnp.square(z), axis=-1, keepdims=True)
  inside = sq < eps * eps
  z = jnp.where(inside, jax.lax.stop_gradient(z), z)
  # max(): the norm's own gradient goes to the constant inside the ball.
  return z * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def gate_probs(logits: jax.Array, temperature: float) -> jax.Array:
  """Deterministic gate probability p = sigmoid(a / τ_gate)."""
  return nn.sigmoid(logits / temperature)


def logistic_noise(rng: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  """l = log u − log(1 − u), u ~ U(ε, 1 − ε): the difference of two Gumbels.

  P(a + l > 0) = sigmoid(a), which makes the binary Concrete sample below
  open with the probability its logit says.
  """
  u = jax.random.uniform(rng, shape, dtype, minval=LOGISTIC_EPS,
                         maxval=1.0 - LOGISTIC_EPS)
  return jnp.log(u) - jnp.log1p(-u)


def authors_gumbel_noise(rng: jax.Array, shape, dtype=jnp.float32
                         ) -> jax.Array:
  """The authors' single Gumbel sample g = −log(−log(u + ε) + ε), ε = 1e-4.

  P(a + g > 0) = 1 − exp(−e^a), not sigmoid(a) (docs/method.md §2).
  """
  u = jax.random.uniform(rng, shape, dtype)
  return -jnp.log(-jnp.log(u + GUMBEL_EPS) + GUMBEL_EPS)


def gumbel_sigmoid_probs(rng: jax.Array, logits: jax.Array,
                         temperature: float) -> jax.Array:
  """Binary Concrete sample p~ = sigmoid((a + l) / τ), l logistic noise.

  With the threshold 0.5, 1[p~ > 0.5] is open with probability sigmoid(a)
  at any τ; that is the deterministic p = sigmoid(a / τ) of the KL and of
  evaluation when τ = 1 (the default).
  """
  return nn.sigmoid(
      (logits + logistic_noise(rng, logits.shape, logits.dtype)) / temperature)


def gumbel_authors_probs(rng: jax.Array, logits: jax.Array,
                         temperature: float) -> jax.Array:
  """The authors' relaxation p~ = sigmoid((a + g) / τ), g one Gumbel sample.

  Kept to reproduce their runs only: the hard gate opens with probability
  1 − exp(−e^a) in training (0.63 at a = 0, where evaluation closes it).
  """
  return nn.sigmoid(
      (logits + authors_gumbel_noise(rng, logits.shape, logits.dtype))
      / temperature)


_NOISY_GATES = {"gumbel_sigmoid": gumbel_sigmoid_probs,
                "gumbel_authors": gumbel_authors_probs}
GATE_TYPES = ("ste", *_NOISY_GATES)
GATE_MODES = ("hard", "soft")


def straight_through_hard(p: jax.Array, threshold: float) -> jax.Array:
  """Value 1[p > threshold], gradient of p (straight-through estimator)."""
  hard = (p > threshold).astype(p.dtype)
  return jax.lax.stop_gradient(hard - p) + p


def gate_mask(logits: jax.Array, *, gate_type: str, temperature: float,
              threshold: float, train: bool, eval_mode: str = "hard",
              train_mode: str = "hard", rng: jax.Array | None = None
              ) -> tuple[jax.Array, jax.Array]:
  """Returns (mask m applied to z, deterministic probabilities p for the KL).

  Training, `train_mode="hard"`: `ste` thresholds p with a straight-through
  gradient; `gumbel_sigmoid` (logistic noise) and `gumbel_authors` (one
  Gumbel sample) threshold the noisy p~ the same way (they need `rng`).
  Training, `train_mode="soft"` (the soft-gating ablation): m = p, no noise,
  no threshold, whatever `gate_type` says.
  Evaluation: no noise; `hard` gives 1[p > threshold], `soft` gives p.
  """
  if temperature <= 0:
    raise ValueError(f"gate temperature must be > 0, got {temperature}; the "
                     "authors' YAML default 0.0 divides by zero.")
  p = gate_probs(logits, temperature)
  mode = train_mode if train else eval_mode
  if mode not in GATE_MODES:
    raise ValueError(f"Unknown gate {'train' if train else 'eval'}_mode="
                     f"{mode!r}: {' | '.join(GATE_MODES)}")
  if mode == "soft":
    return p, p
  if not train:
    return (p > threshold).astype(p.dtype), p
  if gate_type == "ste":
    return straight_through_hard(p, threshold), p
  if gate_type in _NOISY_GATES:
    if rng is None:
      raise ValueError(f"gate_type={gate_type!r} needs an rng in training")
    return straight_through_hard(
        _NOISY_GATES[gate_type](rng, logits, temperature), threshold), p
  raise ValueError(f"Unknown gate_type={gate_type!r}: "
                   f"{' | '.join(GATE_TYPES)}")


def top_k_mask(z: jax.Array, k: int) -> jax.Array:
  """1 on the k largest *positive* entries of each row of z (last axis).

  A row with at least k positive entries gets exactly k ones. A row with
  fewer keeps only its positive entries (fewer than k ones; none for an
  all-zero row): a zero or negative entry is never kept, because
  `lax.top_k` would pick such entries by index (the lowest first), and with
  `non_neg=rep_relu` a kept zero still passes GELU's gradient, so dims
  0..k-1 would get a gradient path the other dims lack.

  Ties among positive entries go to the lower index (`lax.top_k`'s order):
  of equal values straddling the k-th place, the earlier dims are kept.
  The mask is a constant: z * top_k_mask(z, k) passes gradient to the kept
  entries only (NCL+TopK, docs/method.md §7).
  """
  if not 1 <= k <= z.shape[-1]:
    raise ValueError(f"top_k={k} must be in 1..{z.shape[-1]} (the feature "
                     "dimension)")
  z = jax.lax.stop_gradient(z)
  _, idx = jax.lax.top_k(z, k)
  top = jnp.put_along_axis(jnp.zeros(z.shape, z.dtype), idx,
                           jnp.ones(idx.shape, z.dtype), axis=-1,
                           inplace=False)
  return top * (z > 0).astype(z.dtype)


def top_k_short_rows(z: jax.Array, k: int) -> jax.Array:
  """(B,) float 0/1: 1 where a row of z has fewer than k positive entries.

  Those are the rows `top_k_mask` keeps fewer than k entries of; training
  logs their share as `topk_short_row_frac`.
  """
  positives = jnp.sum(jax.lax.stop_gradient(z) > 0, axis=-1)
  return (positives < k).astype(jnp.float32)


# ----------------------------------------------------------------------------
# ResNet encoder.
# ----------------------------------------------------------------------------
def _add_shortcut(block: nn.Module, residual, y):
  """relu(shortcut(x) + BN(y)) for a block's last conv output y.

  Called inside the block's compact __call__, so the modules it creates
  belong to the block. With `init_scheme="flax"` the last BN scale starts at
  zero, so each block starts as the identity (torchvision and the authors do
  not do this); the shortcut is a strided 1x1 conv + BN where the shape
  changes.
  """
  y = block.norm(scale_init=block.last_bn_scale_init)(y)
  if residual.shape != y.shape:
    residual = block.conv(y.shape[-1], (1, 1), (block.strides, block.strides),
                          name="proj_conv")(residual)
    residual = block.norm(name="proj_bn")(residual)
  return nn.relu(residual + y)


class BasicBlock(nn.Module):
  """ResNet-18/34 block: two 3x3 convs."""
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  last_bn_scale_init: Callable = nn.initializers.ones
  expansion = 1

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), (self.strides, self.strides))(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters, (3, 3))(y)
    return _add_shortcut(self, residual, y)


class BottleneckBlock(nn.Module):
  """ResNet-50 block: 1x1 → 3x3 (strided) → 1x1 with 4x expansion."""
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  last_bn_scale_init: Callable = nn.initializers.ones
  expansion = 4

  @nn.compact
  def __call__(self, x):
    residual = x
    y = nn.relu(self.norm()(self.conv(self.filters, (1, 1))(x)))
    y = self.conv(self.filters, (3, 3), (self.strides, self.strides))(y)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters * 4, (1, 1))(y)
    return _add_shortcut(self, residual, y)


_RESNETS = {
    "resnet18": ((2, 2, 2, 2), BasicBlock),
    "resnet50": ((3, 4, 6, 3), BottleneckBlock),
}


INITS = ("torch", "flax")


def _conv_init():
  # Kaiming-normal with fan_out (relu gain): torchvision's conv init, used by
  # both init schemes (HWIO kernels: fan_out = out_channels * kh * kw).
  return nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _uniform(bound: float) -> Callable:
  """Initialiser drawing from U(-bound, bound)."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def dense(features: int, fan_in: int, init: str, dtype: Any = jnp.float32,
          name: str | None = None) -> nn.Dense:
  """nn.Dense initialised as PyTorch's Linear or with Flax's defaults.

  `torch`: weight and bias ~ U(±1/sqrt(fan_in)) (nn.Linear's
  kaiming_uniform(a=sqrt(5)) is exactly this bound). `flax`: LeCun-normal
  weight, zero bias.
  """
  if init == "torch":
    bound = 1.0 / fan_in ** 0.5
    return nn.Dense(features, dtype=dtype, kernel_init=_uniform(bound),
                    bias_init=_uniform(bound), name=name)
  if init == "flax":
    return nn.Dense(features, dtype=dtype, name=name)
  raise ValueError(f"Unknown init={init!r}: {' | '.join(INITS)}")


class ResNet(nn.Module):
  """ResNet backbone returning globally pooled features h: (B, d_h).

  d_h = 8·width (ResNet-18) or 32·width (ResNet-50); width 64 is standard.
  `stage_sizes` overrides the depth (e.g. (1, 1) for a tiny test model).
  Stem `cifar`: 3x3 conv stride 1, `stem_padding` pixels of zero padding
  (the authors pad 2: 34x34 maps for 32x32 images; 1 keeps the size), no
  max-pool. Stem `imagenet`: 7x7/2 conv (padding 3) + 3x3/2 max-pool
  (padding 1), as torchvision. Every conv pads (k-1)/2 on *both* sides, as
  torch does (Flax's "SAME" pads a stride-2 3x3 conv on an even-sized map
  only at the bottom/right, which shifts every strided window by a pixel
  compared with torchvision), so a torchvision checkpoint computes the same
  function here.

  `init_scheme`: `torch` = torchvision's ResNet init (conv kaiming-normal,
  fan_out, BN scale 1 and bias 0 everywhere); `flax` = the same, but the
  last BN scale of every block starts at 0 (each block starts as the
  identity).
  """
  name_or_blocks: str = "resnet18"
  width: int = 64
  stem: str = "cifar"
  stage_sizes: Sequence[int] | None = None
  dtype: Any = jnp.float32
  stem_padding: int = 2
  init_scheme: str = "torch"
  conv_impl: str = "auto"

  @property
  def feature_dim(self) -> int:
    sizes, block = _RESNETS[self.name_or_blocks]
    n_stages = len(self.stage_sizes or sizes)
    return self.width * 2 ** (n_stages - 1) * block.expansion

  @nn.compact
  def __call__(self, x, train: bool):
    sizes, block = _RESNETS[self.name_or_blocks]
    sizes = self.stage_sizes or sizes
    if self.init_scheme not in INITS:
      raise ValueError(f"Unknown init_scheme={self.init_scheme!r}: "
                       f"{' | '.join(INITS)}")
    last_bn_scale_init = (nn.initializers.zeros if self.init_scheme == "flax"
                          else nn.initializers.ones)

    def conv(features, kernel_size, strides=(1, 1), **kw):
      kw.setdefault("padding", [((k - 1) // 2, (k - 1) // 2)
                                for k in kernel_size])
      return nn.Conv(features, kernel_size, strides, use_bias=False,
                     dtype=self.dtype, kernel_init=_conv_init(),
                     conv_general_dilated=conv_lib.conv_fn(self.conv_impl),
                     **kw)

    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=0.9, epsilon=1e-5, dtype=self.dtype)
    x = x.astype(self.dtype)
    if self.stem == "cifar":
      pad = self.stem_padding
      x = conv(self.width, (3, 3), padding=[(pad, pad), (pad, pad)],
               name="stem_conv")(x)
      x = nn.relu(norm(name="stem_bn")(x))
    elif self.stem == "imagenet":
      x = conv(self.width, (7, 7), (2, 2), padding=[(3, 3), (3, 3)],
               name="stem_conv")(x)
      x = nn.relu(norm(name="stem_bn")(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    else:
      raise ValueError(f"Unknown stem {self.stem!r}: cifar | imagenet")
    for i, n_blocks in enumerate(sizes):
      for j in range(n_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = block(self.width * 2 ** i, conv=conv, norm=norm,
                  strides=strides, last_bn_scale_init=last_bn_scale_init)(x)
    return jnp.mean(x, axis=(1, 2))


class MLP(nn.Module):
  """`depth` Dense layers, ReLU between, no BN (the authors' projector).

  depth 2 (default): Linear(hidden) → ReLU → Linear(out); depth 1:
  Linear(out); depth 3: two Linear(hidden) + ReLU, then Linear(out). The
  layers are Dense_0 … Dense_{depth-1}.
  """
  hidden: int
  out: int
  dtype: Any = jnp.float32
  init_scheme: str = "torch"
  depth: int = 2

  @nn.compact
  def __call__(self, x):
    if self.depth < 1:
      raise ValueError(f"MLP depth must be >= 1, got {self.depth}")
    for i in range(self.depth - 1):
      x = nn.relu(dense(self.hidden, x.shape[-1], self.init_scheme,
                        self.dtype, name=f"Dense_{i}")(x))
    return dense(self.out, x.shape[-1], self.init_scheme, self.dtype,
                 name=f"Dense_{self.depth - 1}")(x)


# ----------------------------------------------------------------------------
# The whole model.
# ----------------------------------------------------------------------------
class ContrastiveModel(nn.Module):
  """Backbone + projector (+ gate head) + online linear classifier.

  Outputs (all float32):
    h:          (B, d_h) backbone features.
    z:          (B, proj_out) L2-normalised (gated) projector features — the
                contrastive features and the ones the interpretability
                metrics read.
    logits:     (B, num_classes) online classifier on stop_gradient(h).
    gate_probs: (B, proj_out) p = sigmoid(a/τ) (BayesNCL; else absent).
    gate_mask:  (B, proj_out) the mask m applied (BayesNCL; else absent).
    topk_short: (B,) 1 where σ+(z) has fewer than top_k positive entries,
                so fewer than top_k are kept (NCL+TopK; else absent).

  Variants (docs/method.md §7): method `ncl_topk` keeps each row's `top_k`
  largest positive entries of σ+(z) (all its positive ones if fewer); `gate_train_mode="soft"` trains with z ⊙ p;
  `gate_isolate=False` feeds the gate head h itself (the backbone then gets
  gradient through the gate); `gate_depth` is the gate head's Dense count.
  """
  method: str = "bayesncl"
  num_classes: int = 10
  backbone: str = "resnet18"
  width: int = 64
  stem: str = "cifar"
  stage_sizes: Sequence[int] | None = None
  proj_hidden: int = 2048
  proj_out: int = 256
  non_neg: str = "rep_relu"
  gate_type: str = "gumbel_sigmoid"
  gate_temperature: float = 1.0
  gate_threshold: float = 0.5
  gate_eval_mode: str = "hard"
  gate_train_mode: str = "hard"
  gate_isolate: bool = True
  gate_depth: int = 2
  top_k: int = 0
  dtype: Any = jnp.float32
  stem_padding: int = 2
  init_scheme: str = "torch"
  conv_impl: str = "auto"

  def setup(self):
    self.encoder = ResNet(self.backbone, self.width, self.stem,
                          self.stage_sizes, self.dtype,
                          stem_padding=self.stem_padding,
                          init_scheme=self.init_scheme,
                          conv_impl=self.conv_impl, name="backbone")
    self.projector = MLP(self.proj_hidden, self.proj_out, self.dtype,
                         self.init_scheme, name="projector")
    if self.method == "bayesncl":
      self.gate_head = MLP(self.proj_hidden, self.proj_out, self.dtype,
                           self.init_scheme, depth=self.gate_depth,
                           name="gate_head")
    # float32 compute, as before (no dtype): the online probe is tiny.
    self.classifier = dense(self.num_classes, self.encoder.feature_dim,
                            self.init_scheme, name="classifier")

  def project(self, h: jax.Array, *, train: bool,
              gate_rng: jax.Array | None = None) -> dict[str, jax.Array]:
    """The head part of the forward pass (docs/method.md §2.2-2.4) from h."""
    z = self.projector(h).astype(jnp.float32)
    # CL is SimCLR: signed features, whatever non_neg says.
    z = non_negative(z, "none" if self.method == "cl" else self.non_neg)
    out = {}
    if self.method == "ncl_topk":
      out["topk_short"] = top_k_short_rows(z, self.top_k)
      z = z * top_k_mask(z, self.top_k)
    z = l2_normalize(z)
    if self.method == "bayesncl":
      gate_in = jax.lax.stop_gradient(h) if self.gate_isolate else h
      logits = self.gate_head(gate_in).astype(jnp.float32)
      mask, probs = gate_mask(
          logits, gate_type=self.gate_type, temperature=self.gate_temperature,
          threshold=self.gate_threshold, train=train,
          eval_mode=self.gate_eval_mode, train_mode=self.gate_train_mode,
          rng=gate_rng)
      z = l2_normalize(z * mask)
      out.update(gate_probs=probs, gate_mask=mask)
    out["z"] = z
    return out

  def __call__(self, x, *, train: bool, gate_rng: jax.Array | None = None):
    h = self.encoder(x, train=train).astype(jnp.float32)
    out = self.project(h, train=train, gate_rng=gate_rng)
    out["h"] = h
    out["logits"] = self.classifier(jax.lax.stop_gradient(h))
    return out


def model_from_config(config, stage_sizes: Sequence[int] | None = None):
  """Builds the `ContrastiveModel` a config describes."""
  m, g = config.model, config.gate
  stages = stage_sizes or tuple(m.stage_sizes) or None
  return ContrastiveModel(
      method=config.method, num_classes=config.dataset.num_classes,
      backbone=m.backbone, width=m.width, stem=m.stem,
      stage_sizes=tuple(stages) if stages else None,
      proj_hidden=m.proj_hidden, proj_out=m.proj_out, non_neg=m.non_neg,
      gate_type=g.type, gate_temperature=g.temperature,
      gate_threshold=g.threshold, gate_eval_mode=g.eval_mode,
      gate_train_mode=g.train_mode, gate_isolate=bool(g.isolate),
      gate_depth=g.depth, top_k=m.top_k,
      dtype=jnp.dtype(m.dtype), stem_padding=m.stem_padding,
      init_scheme=m.init, conv_impl=m.conv_impl)
