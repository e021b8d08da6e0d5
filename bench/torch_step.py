r"""The pre-training step of bayesncl_jax written in PyTorch, for comparison.

Same shapes as the JAX step: ResNet-18/50 (CIFAR or ImageNet stem, zero-init
last BN of each block), projector Linear→ReLU→Linear, for bayesncl a gate
head on stop_gradient(h) with a straight-through hard gate and the Bernoulli
KL, rep_relu / L2 normalisation, NT-Xent over 2N rows, an online linear
classifier on detached h, and a LARS-like SGD update (solo-learn's trust
ratio, clipped at the lr, momentum 0.9, no wd/LARS on BN and biases).

Augmentation: the JAX step runs colour jitter (brightness, contrast,
saturation, hue), grayscale and blur on the device. Here the batched
brightness/contrast/saturation jitter, grayscale and normalisation run inside
the step; hue and blur are left out (no batched torch op), so this step does
slightly LESS work than the JAX one — the ratio favours PyTorch a little.

Variants: `eager` and `compile` (torch.compile, default inductor backend).
channels_last and bfloat16 autocast are used only on CUDA.

  python bench/torch_step.py --method=bayesncl --batch_size=64 --variant=eager
PyTorch is a benchmark-only dependency: pip install -r requirements-bench.txt
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
from torch import nn
import torch.nn.functional as F

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)

import common  # noqa: E402  pylint: disable=g-import-not-at-top

LUMA = (0.299, 0.587, 0.114)
KL_CLAMP = 1e-2


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, cin, filters, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, filters, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(filters, momentum=0.1, eps=1e-5)
    self.conv2 = nn.Conv2d(filters, filters, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(filters)
    nn.init.zeros_(self.bn2.weight)  # as the JAX model: block starts as id.
    self.shortcut = _shortcut(cin, filters, stride)

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    return F.relu(self.shortcut(x) + self.bn2(self.conv2(y)))


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, cin, filters, stride):
    super().__init__()
    out = filters * 4
    self.conv1 = nn.Conv2d(cin, filters, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(filters)
    self.conv2 = nn.Conv2d(filters, filters, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(filters)
    self.conv3 = nn.Conv2d(filters, out, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(out)
    nn.init.zeros_(self.bn3.weight)
    self.shortcut = _shortcut(cin, out, stride)

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    return F.relu(self.shortcut(x) + self.bn3(self.conv3(y)))


def _shortcut(cin, cout, stride):
  if cin == cout and stride == 1:
    return nn.Identity()
  return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                       nn.BatchNorm2d(cout))


_RESNETS = {"resnet18": ((2, 2, 2, 2), BasicBlock),
            "resnet50": ((3, 4, 6, 3), Bottleneck)}


class ResNet(nn.Module):
  """The JAX `models.ResNet` in torch (NCHW), returning pooled features."""

  def __init__(self, backbone, width=64, stem="cifar", stage_sizes=None):
    super().__init__()
    sizes, block = _RESNETS[backbone]
    sizes = stage_sizes or sizes
    if stem == "cifar":
      self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False),
                                nn.BatchNorm2d(width), nn.ReLU())
    else:
      self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False),
                                nn.BatchNorm2d(width), nn.ReLU(),
                                nn.MaxPool2d(3, 2, 1))
    layers, cin = [], width
    for i, n in enumerate(sizes):
      for j in range(n):
        stride = 2 if i > 0 and j == 0 else 1
        layers.append(block(cin, width * 2 ** i, stride))
        cin = width * 2 ** i * block.expansion
    self.blocks = nn.Sequential(*layers)
    self.feature_dim = cin

  def forward(self, x):
    return self.blocks(self.stem(x)).mean(dim=(2, 3))


def mlp(din, hidden, out):
  return nn.Sequential(nn.Linear(din, hidden), nn.ReLU(),
                       nn.Linear(hidden, out))


def rep_relu(z):
  """Value relu(z), gradient of z where z < 0 too (the JAX rep_relu)."""
  return z + (F.relu(z) - z).detach()


class ContrastiveModel(nn.Module):
  def __init__(self, method, backbone, width, stem, stage_sizes, proj_hidden,
               proj_out, num_classes):
    super().__init__()
    self.method = method
    self.encoder = ResNet(backbone, width, stem, stage_sizes)
    d = self.encoder.feature_dim
    self.projector = mlp(d, proj_hidden, proj_out)
    self.gate_head = (mlp(d, proj_hidden, proj_out) if method == "bayesncl"
                      else None)
    self.classifier = nn.Linear(d, num_classes)

  def forward(self, x):
    h = self.encoder(x).float()
    z = self.projector(h).float()
    if self.method != "cl":
      z = rep_relu(z)
    z = F.normalize(z, dim=-1, eps=1e-12)
    out = {"h": h}
    if self.gate_head is not None:
      p = torch.sigmoid(self.gate_head(h.detach()).float())
      mask = (p > 0.5).float() - p.detach() + p  # straight-through.
      z = F.normalize(z * mask, dim=-1, eps=1e-12)
      out["gate_probs"] = p
    out["z"] = z
    out["logits"] = self.classifier(h.detach())
    return out


def nt_xent(z, temperature):
  n2 = z.shape[0]
  sim = z @ z.T / temperature
  eye = torch.eye(n2, dtype=torch.bool, device=z.device)
  pos = torch.arange(n2, device=z.device).add(n2 // 2).remainder(n2)
  positive = sim[torch.arange(n2, device=z.device), pos]
  log_den = torch.logsumexp(sim.masked_fill(eye, -math.inf), dim=1)
  return (log_den - positive).mean()


def bernoulli_kl(p, prior):
  p = p.clamp(KL_CLAMP, 1 - KL_CLAMP)
  return (p * torch.log(p / prior) + (1 - p) * torch.log(
      (1 - p) / (1 - prior))).sum(-1).mean()


def augment(x_uint8, mean, std):
  """Batched brightness/contrast/saturation jitter (p=0.8), grayscale (0.2).

  x_uint8: (B, H, W, C) uint8; returns normalised (B, C, H, W) float32.
  Per-example factors, fixed order (the JAX step permutes the order and adds
  hue, and blur at 224 px: see the module docstring).
  """
  x = x_uint8.permute(0, 3, 1, 2).float() / 255.0
  b = x.shape[0]
  dev = x.device

  def factor(strength):
    return torch.empty(b, 1, 1, 1, device=dev).uniform_(1 - strength,
                                                        1 + strength)
  luma = torch.tensor(LUMA, device=dev).view(1, 3, 1, 1)
  jit = (torch.rand(b, 1, 1, 1, device=dev) < 0.8).float()
  y = (x * factor(0.8)).clamp(0, 1)
  gray = (y * luma).sum(1, keepdim=True)
  c = factor(0.8)
  y = (c * y + (1 - c) * gray.mean(dim=(2, 3), keepdim=True)).clamp(0, 1)
  gray = (y * luma).sum(1, keepdim=True)
  s = factor(0.8)
  y = (s * y + (1 - s) * gray).clamp(0, 1)
  x = jit * y + (1 - jit) * x
  g = (torch.rand(b, 1, 1, 1, device=dev) < 0.2).float()
  x = g * (x * luma).sum(1, keepdim=True).expand_as(x) + (1 - g) * x
  mean = torch.tensor(mean, device=dev).view(1, 3, 1, 1)
  std = torch.tensor(std, device=dev).view(1, 3, 1, 1)
  return (x - mean) / std


class LarsSGD:
  """solo-learn LARS: trust ratio clipped at lr, on weights of conv/linear.

  d = (g + wd p) * min(eta ||p|| / (||g|| + wd ||p|| + eps) / lr, 1);
  BN parameters and biases get plain SGD with momentum and no weight decay
  (as `optim.lars_mask` excludes them).
  """

  def __init__(self, model, lr, wd=1e-4, momentum=0.9, eta=0.02, eps=1e-8):
    self.params = [p for p in model.parameters() if p.requires_grad]
    self.lars = [p.ndim > 1 for p in self.params]
    self.bufs = [torch.zeros_like(p) for p in self.params]
    self.lr, self.wd, self.momentum, self.eta, self.eps = (lr, wd, momentum,
                                                           eta, eps)

  @torch.no_grad()
  def step(self):
    for p, use_lars, buf in zip(self.params, self.lars, self.bufs):
      g = p.grad
      if use_lars:
        pn, gn = p.norm(), g.norm()
        ratio = self.eta * pn / (gn + self.wd * pn + self.eps)
        ratio = torch.clamp(ratio / self.lr, max=1.0)
        ok = (pn > 0) & (gn > 0)
        g = torch.where(ok, (g + self.wd * p) * ratio, g)
      buf.mul_(self.momentum).add_(g)
      p.add_(buf, alpha=-self.lr)


def bench(*, method="bayesncl", backbone="resnet18", image_size=32,
          dtype="float32", stem="cifar", batch_size=32, width=64,
          stage_sizes=(), proj_hidden=2048, proj_out=256, variant="eager",
          steps=20, warmup=2, peak_flops=None, flops_per_step=None,
          num_classes=10, temperature=0.2, kl_weight=3e-5, prior=0.8):
  """Times one step configuration; returns a record like the JAX one.

  flops_per_step: XLA's count for the same JAX step, reused for MFU (torch
  has no equivalent compiled cost analysis on CPU).
  """
  cuda = torch.cuda.is_available()
  dev = torch.device("cuda" if cuda else "cpu")
  torch.manual_seed(0)
  model = ContrastiveModel(method, backbone, width, stem, list(stage_sizes),
                           proj_hidden, proj_out, num_classes).to(dev)
  # channels_last and AMP help on GPUs (tensor cores); on CPU they are left
  # out: oneDNN picks its own blocked layout and bf16 CPU autocast is slow
  # without AMX.
  if cuda:
    model = model.to(memory_format=torch.channels_last)
  opt = LarsSGD(model, lr=0.4 * batch_size / 256)
  mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
  gen = torch.Generator().manual_seed(0)
  v1 = torch.randint(0, 256, (batch_size, image_size, image_size, 3),
                     dtype=torch.uint8, generator=gen).to(dev)
  v2 = torch.randint(0, 256, v1.shape, dtype=torch.uint8,
                     generator=gen).to(dev)
  labels = torch.randint(0, num_classes, (batch_size,), generator=gen).to(dev)
  amp = cuda and dtype == "bfloat16"

  def step_fn(v1, v2, labels):
    x = torch.cat([augment(v1, mean, std), augment(v2, mean, std)])
    if cuda:
      x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
      out = model(x)
    loss = nt_xent(out["z"], temperature)
    loss = loss + F.cross_entropy(out["logits"].float(),
                                  torch.cat([labels, labels]))
    if "gate_probs" in out:
      loss = loss + kl_weight * bernoulli_kl(out["gate_probs"], prior)
    return loss

  fwd = torch.compile(step_fn) if variant == "compile" else step_fn

  def run():
    for p in opt.params:
      p.grad = None
    loss = fwd(v1, v2, labels)
    loss.backward()
    opt.step()
    return loss

  def sync(x):
    if cuda:
      torch.cuda.synchronize()
    return x

  # The first call compiles (torch.compile) or warms oneDNN's caches.
  t0 = time.perf_counter()
  sync(run())
  compile_s = time.perf_counter() - t0
  timing = common.time_calls(run, warmup=warmup, steps=steps, sync=sync)
  sec = timing["median_ms"] / 1e3
  peak = torch.cuda.max_memory_allocated() if cuda else None
  return {
      "framework": "torch", "variant": variant, "method": method,
      "backbone": backbone, "image_size": image_size, "dtype": dtype,
      "stem": stem, "global_batch": batch_size, "num_devices": 1,
      "images_per_sec_per_device": batch_size / sec,
      "compile_s": compile_s, **timing,
      "flops_per_step_per_device": flops_per_step,
      "peak_bytes": peak, "peak_flops": peak_flops,
      "mfu": (flops_per_step / sec / peak_flops
              if flops_per_step and peak_flops else None),
      "torch_threads": torch.get_num_threads(),
      "note": "hue and blur omitted; autocast/channels_last only on CUDA"}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--method", default="bayesncl")
  p.add_argument("--backbone", default="resnet18")
  p.add_argument("--image_size", type=int, default=32)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--variant", default="eager")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--width", type=int, default=64)
  p.add_argument("--stage_sizes", default="",
                 help="e.g. 1,1,1,1 for a tiny model; '' = standard depth.")
  p.add_argument("--proj_hidden", type=int, default=2048)
  p.add_argument("--proj_out", type=int, default=256)
  p.add_argument("--num_classes", type=int, default=10)
  p.add_argument("--peak_flops", type=float, default=None,
                 help="Peak FLOP/s of the device, for MFU.")
  p.add_argument("--flops_per_step", type=float, default=None,
                 help="Model FLOPs of one step (XLA's count of the same JAX "
                 "step), for MFU.")
  a = p.parse_args()
  r = bench(method=a.method, backbone=a.backbone, image_size=a.image_size,
            dtype=a.dtype, stem="cifar" if a.image_size < 64 else "imagenet",
            batch_size=a.batch_size, width=a.width,
            stage_sizes=[int(x) for x in a.stage_sizes.split(",") if x],
            proj_hidden=a.proj_hidden, proj_out=a.proj_out,
            num_classes=a.num_classes, variant=a.variant, steps=a.steps,
            warmup=a.warmup, peak_flops=a.peak_flops,
            flops_per_step=a.flops_per_step)
  common.emit(r, f"torch/{r['variant']} {r['method']}: {r['median_ms']:.1f} "
              f"ms/step, {r['images_per_sec_per_device']:.1f} img/s")


if __name__ == "__main__":
  main()
