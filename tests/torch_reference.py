"""A PyTorch reference of the method, written for the tests from the spec.

Not an import of the authors' code: a plain-torch transcription of what
their solo-learn-based code computes, with torchvision's module names (the
torchvision wheel does not load against the pinned torch, so the ResNet is
written out here):

  * ResNet: torchvision's layout (conv1, bn1, relu, maxpool, layer1..N,
    avgpool; fc removed) and init (conv kaiming-normal fan_out/relu, BN
    weight 1 bias 0, no zero-init of the last BN in a block); the authors'
    CIFAR changes: conv1 = 3x3 stride 1 with padding 2, max-pool removed.
  * solo-learn's model: backbone, projector Linear -> ReLU -> Linear,
    online classifier on detached features, and (BayesNCL) gating_head of
    the projector's shape on detached features.
  * One step, solo-learn style: each view goes through the model on its own
    (BatchNorm statistics per view), outputs concatenated [view 1; view 2].
  * Loss: NT-Xent over the 2N rows (self excluded, log-sum-exp), online
    cross-entropy, λ·KL(Bernoulli(p) || Bernoulli(π)) with p and π clamped
    to [0.01, 0.99], summed over dims, mean over rows.
  * Gates: STE (hard 1[p > t], gradient of p) or binary Concrete (logistic
    noise l = log u - log(1 - u) from a uniform u supplied by the caller).
  * solo-learn's LARS (eta, clip_lr, no adaptation or decay for 1-d
    parameters) with momentum, its parameter groups, and a per-step linear
    warmup + cosine schedule.
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

KL_CLAMP = 1e-2


# ----------------------------------------------------------------------------
# torchvision-style ResNet.
# ----------------------------------------------------------------------------
class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, cin, planes, stride, downsample):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=False)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, cin, planes, stride, downsample):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU(inplace=False)
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
  """torchvision.models.ResNet without fc (solo-learn sets fc = Identity)."""

  def __init__(self, block="basic", layers=(2, 2, 2, 2), width=64,
               in_channels=3, cifar=True, stem_padding=2):
    super().__init__()
    block = {"basic": BasicBlock, "bottleneck": Bottleneck}[block]
    if cifar:
      self.conv1 = nn.Conv2d(in_channels, width, 3, 1, stem_padding,
                             bias=False)
      self.maxpool = nn.Identity()
    else:
      self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
      self.maxpool = nn.MaxPool2d(3, 2, 1)
    self.bn1 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU(inplace=False)
    cin = width
    for i, n in enumerate(layers):
      planes = width * 2 ** i
      blocks = []
      for j in range(n):
        stride = 2 if i > 0 and j == 0 else 1
        down = None
        if j == 0 and (stride != 1 or cin != planes * block.expansion):
          down = nn.Sequential(
              nn.Conv2d(cin, planes * block.expansion, 1, stride, bias=False),
              nn.BatchNorm2d(planes * block.expansion))
        blocks.append(block(cin, planes, stride, down))
        cin = planes * block.expansion
      setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
    self.num_stages = len(layers)
    self.avgpool = nn.AdaptiveAvgPool2d(1)
    self.feature_dim = cin
    for m in self.modules():  # torchvision's init
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out",
                                nonlinearity="relu")
      elif isinstance(m, nn.BatchNorm2d):
        nn.init.constant_(m.weight, 1)
        nn.init.constant_(m.bias, 0)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    for i in range(self.num_stages):
      x = getattr(self, f"layer{i + 1}")(x)
    return torch.flatten(self.avgpool(x), 1)


def mlp(din, hidden, out):
  return nn.Sequential(nn.Linear(din, hidden), nn.ReLU(),
                       nn.Linear(hidden, out))


class SoloModel(nn.Module):
  """backbone / projector / classifier / gating_head, solo-learn's names."""

  def __init__(self, backbone: ResNet, proj_hidden, proj_out, num_classes,
               gate: bool):
    super().__init__()
    self.backbone = backbone
    d = backbone.feature_dim
    self.projector = mlp(d, proj_hidden, proj_out)
    self.classifier = nn.Linear(d, num_classes)
    if gate:
      self.gating_head = mlp(d, proj_hidden, proj_out)


# ----------------------------------------------------------------------------
# Forward and loss.
# ----------------------------------------------------------------------------
def rep_relu(z):
  """ReLU's value, GELU's (exact erf) gradient."""
  g = F.gelu(z)
  return g - g.detach() + F.relu(z).detach()


def normalize(z, eps=1e-12):
  return z / z.norm(dim=-1, keepdim=True).clamp_min(eps)


def forward_view(model: SoloModel, x, *, method, non_neg, gate_type=None,
                 gate_temperature=1.0, threshold=0.5, noise_u=None):
  """The training forward of one view (docs/method.md §2): a dict of tensors."""
  h = model.backbone(x)
  z = model.projector(h)
  if method != "cl":
    z = {"relu": F.relu, "rep_relu": rep_relu}[non_neg](z)
  z = normalize(z)
  out = {"h": h, "logits": model.classifier(h.detach())}
  if method == "bayesncl":
    a = model.gating_head(h.detach())
    p = torch.sigmoid(a / gate_temperature)
    if gate_type == "ste":
      q = p
    elif gate_type == "gumbel_sigmoid":
      logistic = torch.log(noise_u) - torch.log1p(-noise_u)
      q = torch.sigmoid((a + logistic) / gate_temperature)
    else:
      raise ValueError(gate_type)
    mask = (q > threshold).float() - q.detach() + q
    z = normalize(z * mask)
    out.update(gate_probs=p, gate_mask=mask)
  out["z"] = z
  return out


def nt_xent(z, temperature):
  n2 = z.shape[0]
  sim = z @ z.T / temperature
  idx = torch.arange(n2)
  positive = sim[idx, (idx + n2 // 2) % n2]
  log_den = torch.logsumexp(
      sim.masked_fill(torch.eye(n2, dtype=torch.bool), -math.inf), dim=1)
  return (log_den - positive).mean()


def bernoulli_kl(p, prior):
  p = p.clamp(KL_CLAMP, 1 - KL_CLAMP)
  prior = min(max(prior, KL_CLAMP), 1 - KL_CLAMP)
  kl = p * torch.log(p / prior) + (1 - p) * torch.log((1 - p) / (1 - prior))
  return kl.sum(-1).mean()


def training_loss(model, views, labels, *, method, non_neg, temperature,
                  kl_weight=0.0, prior=0.8, gate_type=None,
                  gate_temperature=1.0, threshold=0.5, noise_u=(None, None),
                  joint=False):
  """solo-learn's step: each view through the model on its own.

  joint=True instead runs both views as one batch (SimCLR's TF code), with
  noise_u a single (2N, D) array or None.
  """
  kw = dict(method=method, non_neg=non_neg, gate_type=gate_type,
            gate_temperature=gate_temperature, threshold=threshold)
  if joint:
    outs = [forward_view(model, torch.cat(list(views)), noise_u=noise_u,
                         **kw)]
  else:
    outs = [forward_view(model, v, noise_u=u, **kw)
            for v, u in zip(views, noise_u)]
  out = {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
  terms = {"nce": nt_xent(out["z"], temperature),
           "online_ce": F.cross_entropy(out["logits"],
                                        torch.cat([labels, labels]))}
  loss = terms["nce"] + terms["online_ce"]
  if method == "bayesncl":
    terms["kl"] = bernoulli_kl(out["gate_probs"], prior)
    loss = loss + kl_weight * terms["kl"]
  terms["loss"] = loss
  return loss, terms, out


# ----------------------------------------------------------------------------
# Optimiser.
# ----------------------------------------------------------------------------
class LARS(torch.optim.Optimizer):
  """solo-learn's LARS: SGD + momentum with a clipped trust ratio.

  For a parameter with ndim > 1 (exclude_bias_n_norm) and ||p||, ||g|| > 0:
    r = eta ||p|| / (||g|| + wd ||p|| + eps);  r = min(r / lr, 1) if clip_lr
    d = (g + wd p) r
  else d = g (no weight decay either). buf = m buf + d (buf = d at the first
  step); p -= lr buf.
  """

  def __init__(self, groups, lr, weight_decay, momentum=0.9, eta=0.02,
               eps=1e-8, clip_lr=True):
    super().__init__(groups, dict(lr=lr, weight_decay=weight_decay,
                                  momentum=momentum, eta=eta, eps=eps,
                                  clip_lr=clip_lr))

  @torch.no_grad()
  def step(self):
    for group in self.param_groups:
      wd, lr = group["weight_decay"], group["lr"]
      for p in group["params"]:
        if p.grad is None:
          continue
        d = p.grad
        if p.ndim != 1:
          p_norm, g_norm = torch.norm(p), torch.norm(p.grad)
          if p_norm != 0 and g_norm != 0:
            r = group["eta"] * p_norm / (g_norm + p_norm * wd + group["eps"])
            if group["clip_lr"]:
              r = torch.clamp(r / lr, max=1.0)
            d = (d + wd * p) * r
        state = self.state[p]
        if "momentum_buffer" not in state:
          buf = state["momentum_buffer"] = d.clone()
        else:
          buf = state["momentum_buffer"]
          buf.mul_(group["momentum"]).add_(d)
        p.add_(buf, alpha=-lr)


def warmup_cosine(step, peak, warmup, total, start):
  """Linear warmup from `start` to `peak` over `warmup` steps, cosine to 0."""
  if step < warmup:
    return start + (peak - start) * step / warmup
  return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) /
                                    (total - warmup)))


def solo_optimizer(model: SoloModel, *, base_lr, batch_size, weight_decay,
                   classifier_lr, gate_lr, momentum=0.9, eta=0.02,
                   clip_lr=True):
  """The authors' parameter groups; returns (optimizer, peak lr per group).

  backbone + projector: base_lr * B / 256, wd; classifier: classifier_lr *
  B / 256, wd 0; gating_head: gate_lr (not scaled), wd.
  """
  scale = batch_size / 256
  groups = [
      {"name": "main", "params": list(model.backbone.parameters()) +
       list(model.projector.parameters()), "lr": base_lr * scale,
       "weight_decay": weight_decay},
      {"name": "classifier", "params": list(model.classifier.parameters()),
       "lr": classifier_lr * scale, "weight_decay": 0.0}]
  if hasattr(model, "gating_head"):
    groups.append({"name": "gate_head",
                   "params": list(model.gating_head.parameters()),
                   "lr": gate_lr, "weight_decay": weight_decay})
  peaks = [g["lr"] for g in groups]
  return LARS(groups, lr=peaks[0], weight_decay=weight_decay,
              momentum=momentum, eta=eta, clip_lr=clip_lr), peaks
