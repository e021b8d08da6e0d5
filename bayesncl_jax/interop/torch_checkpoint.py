"""PyTorch checkpoints of the authors' code <-> this project's Flax trees.

Formats read and written:
  * solo-learn / PyTorch Lightning `.ckpt`: a torch pickle whose
    `["state_dict"]` holds `backbone.*` (torchvision ResNet names),
    `projector.{0,2}.*`, `classifier.*` (the online linear classifier) and,
    for BayesNCL, `gating_head.{0,2}.*`;
  * a torchvision ResNet `state_dict` (`.pth`, backbone only; its `fc.*`
    ImageNet head is dropped).

Name mapping (torchvision -> Flax, under `params` / `batch_stats`):
    conv1, bn1                        backbone/stem_conv, backbone/stem_bn
    layer{s}.{b}.conv{c}, .bn{c}      backbone/{Block}_{k}/Conv_{c-1},
                                      backbone/{Block}_{k}/BatchNorm_{c-1}
    layer{s}.{b}.downsample.{0,1}     backbone/{Block}_{k}/proj_conv, proj_bn
    projector.{2l}, gating_head.{2l}  projector/Dense_{l}, gate_head/Dense_{l}
    classifier                        classifier
where Block is BasicBlock (ResNet-18/34) or BottleneckBlock (ResNet-50/101)
and k counts blocks over all stages. Leaves: conv `weight` (O, I, H, W) ->
`kernel` (H, W, I, O); Linear `weight` (out, in) -> `kernel` (in, out);
`bias` -> `bias`; BN `weight` -> `scale`, `bias` -> `bias`,
`running_mean` -> `mean`, `running_var` -> `var`. BN `num_batches_tracked`
has no Flax counterpart: it is kept aside on import and written on export.
Every conversion is a transpose or a copy, so export then import is the
identity bit for bit.

The architecture (depth, width, stem, input channels, projector and gate
sizes, classes) is read from the tensor shapes; what shapes cannot tell —
the CIFAR stem's padding, CL vs NCL, non-negativity, gate type — comes from
the config.

torch is imported lazily (`import_torch`) so the rest of the project never
needs it.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import re
import zipfile
from typing import Any, Mapping

from flax import traverse_util
import numpy as np

# Prefixes of a solo-learn state_dict and our top-level param collections.
SOLO_PREFIXES = {"backbone": "backbone", "projector": "projector",
                 "classifier": "classifier", "gating_head": "gate_head"}
# torchvision's ImageNet classifier: not part of the encoder, dropped.
TORCHVISION_HEAD = ("fc.weight", "fc.bias")
STANDARD_STAGES = {"resnet18": (2, 2, 2, 2), "resnet50": (3, 4, 6, 3)}
_BLOCK = {"resnet18": ("BasicBlock", 2, 1), "resnet50": ("BottleneckBlock", 3,
                                                          4)}
_MAX_LISTED = 25


class InteropError(ValueError):
  """A checkpoint cannot be converted; the message says why and what to do."""


class NotATorchFileError(InteropError):
  """The file is not a PyTorch checkpoint."""


class TensorMismatchError(InteropError):
  """Missing, unexpected or mis-shaped tensors (all listed in the message)."""


def import_torch():
  """Returns the torch module, or raises InteropError saying how to get it."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise InteropError(
        "Reading or writing PyTorch checkpoints needs PyTorch, an optional "
        "dependency: pip install '.[torch]' (or pip install torch; the CPU "
        "wheel is enough).") from e
  return torch


# ----------------------------------------------------------------------------
# Reading.
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class TorchCheckpoint:
  """The tensors of a checkpoint, as numpy arrays, by module.

  groups: {"backbone" | "projector" | "classifier" | "gate_head":
  {torch name without the module prefix: array}}. kind: "solo-learn" or
  "torchvision". extra: the checkpoint's other top-level entries
  (global_step, epoch, our export metadata ...). dropped: names read but
  deliberately not converted.
  """
  path: str
  kind: str
  groups: dict[str, dict[str, np.ndarray]]
  extra: dict[str, Any]
  dropped: list[str]
  unexpected: list[str]

  @property
  def num_tensors(self) -> int:
    return sum(len(g) for g in self.groups.values())


def _torch_format(path: str) -> bool:
  """True when the file looks like torch.save output (zip or legacy pickle)."""
  try:
    if zipfile.is_zipfile(path):
      with zipfile.ZipFile(path) as z:
        return any(n.endswith("data.pkl") for n in z.namelist())
    with open(path, "rb") as f:
      head = f.read(2)
  except OSError:
    return False
  # The legacy format starts with a pickled magic number (protocol 2+).
  return len(head) == 2 and head[0] == 0x80 and head[1] >= 2


def _to_numpy(value) -> np.ndarray:
  torch = import_torch()
  t = value.detach().cpu()
  if t.is_floating_point():
    t = t.to(torch.float32)
  # A copy: t.numpy() shares memory with a live model's tensors, which
  # torch updates in place (optimiser steps, BN running statistics).
  return np.array(t.numpy(), copy=True)


def load(path: str, *, allow_pickle: bool = False):
  """torch.load on CPU; safe (weights only) unless allow_pickle."""
  torch = import_torch()
  if not os.path.isfile(path):
    raise InteropError(f"No such checkpoint file: {path}")
  if not _torch_format(path):
    raise NotATorchFileError(
        f"{path} is not a PyTorch checkpoint (neither the zip format of "
        "torch.save nor its legacy pickle format). Pass a solo-learn/"
        "Lightning .ckpt or a torchvision ResNet state_dict .pth.")
  try:
    return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
  except Exception as e:  # torch raises many types for the same thing.
    msg = str(e)
    if not allow_pickle and "Weights only load failed" in msg:
      found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", msg)
      what = f" ({found.group(1)})" if found else ""
      raise InteropError(
          f"{path} holds Python objects besides tensors{what}, e.g. the "
          "hyper_parameters Lightning stores; torch.load refuses them in its "
          "safe mode because unpickling can run arbitrary code. If you trust "
          "the file, rerun with --allow_pickle.") from e
    raise NotATorchFileError(
        f"{path} could not be read as a PyTorch checkpoint: "
        f"{type(e).__name__}: {msg.splitlines()[0] if msg else ''}") from e


def read_checkpoint(path: str, *, allow_pickle: bool = False
                    ) -> TorchCheckpoint:
  """Reads a solo-learn .ckpt or a torchvision state_dict into numpy."""
  return from_object(load(path, allow_pickle=allow_pickle), path)


def from_object(obj, path: str = "<in memory>") -> TorchCheckpoint:
  """A loaded checkpoint (a .ckpt dict or a state_dict) into numpy groups."""
  torch = import_torch()
  extra = {}
  if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
    state_dict = obj["state_dict"]
    extra = {k: v for k, v in obj.items() if k != "state_dict"}
  elif isinstance(obj, Mapping) and obj and all(
      isinstance(v, torch.Tensor) for v in obj.values()):
    state_dict = obj
  else:
    keys = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
    raise InteropError(
        f"{path} holds no state_dict: expected a solo-learn/Lightning "
        "checkpoint (a dict with 'state_dict') or a torchvision state_dict "
        f"(a dict of tensors); found {keys}.")
  names = [str(k) for k in state_dict]
  if names and all(n.startswith("module.") for n in names):  # DDP wrapper.
    state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
  groups: dict[str, dict[str, np.ndarray]] = {}
  dropped, unexpected = [], []
  solo = any(str(k).startswith(p + ".") for k in state_dict
             for p in SOLO_PREFIXES)
  for key, value in state_dict.items():
    key = str(key)
    if not isinstance(value, torch.Tensor):
      unexpected.append(f"{key} (a {type(value).__name__}, not a tensor)")
      continue
    if solo:
      prefix, _, rest = key.partition(".")
      if prefix in SOLO_PREFIXES and rest:
        groups.setdefault(SOLO_PREFIXES[prefix], {})[rest] = _to_numpy(value)
      else:
        unexpected.append(key)
    elif key in TORCHVISION_HEAD:
      dropped.append(key)
    else:
      groups.setdefault("backbone", {})[key] = _to_numpy(value)
  return TorchCheckpoint(path=path, kind="solo-learn" if solo else
                         "torchvision", groups=groups, extra=extra,
                         dropped=dropped, unexpected=unexpected)


# ----------------------------------------------------------------------------
# Architecture.
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Architecture:
  """What the tensor shapes say about the model."""
  backbone: str  # resnet18 (basic blocks) | resnet50 (bottleneck blocks)
  stage_sizes: tuple[int, ...]
  width: int
  stem: str  # cifar (3x3 conv) | imagenet (7x7 conv + max-pool)
  in_channels: int
  proj_hidden: int | None = None  # None: no projector in the checkpoint.
  proj_out: int | None = None
  gate_layers: int = 0  # linear layers of the gate head; 0: no gate.
  gate_hidden: int | None = None
  gate_out: int | None = None
  num_classes: int | None = None  # None: no online classifier.

  @property
  def expansion(self) -> int:
    return _BLOCK[self.backbone][2]

  @property
  def feature_dim(self) -> int:
    return self.width * 2 ** (len(self.stage_sizes) - 1) * self.expansion

  @property
  def standard_depth(self) -> bool:
    return self.stage_sizes == STANDARD_STAGES[self.backbone]

  @property
  def depth_name(self) -> str:
    known = {("resnet18", (2, 2, 2, 2)): "ResNet-18",
             ("resnet18", (3, 4, 6, 3)): "ResNet-34",
             ("resnet50", (3, 4, 6, 3)): "ResNet-50",
             ("resnet50", (3, 4, 23, 3)): "ResNet-101"}
    block = "BasicBlock" if self.backbone == "resnet18" else "Bottleneck"
    return known.get((self.backbone, self.stage_sizes),
                     f"ResNet with {block}s")

  @classmethod
  def from_config(cls, config) -> "Architecture":
    m = config.model
    gate = config.method == "bayesncl"
    return cls(
        backbone=m.backbone,
        stage_sizes=tuple(m.stage_sizes) or STANDARD_STAGES[m.backbone],
        width=int(m.width), stem=m.stem,
        in_channels=len(config.dataset.mean), proj_hidden=int(m.proj_hidden),
        proj_out=int(m.proj_out), gate_layers=2 if gate else 0,
        gate_hidden=int(m.proj_hidden) if gate else None,
        gate_out=int(m.proj_out) if gate else None,
        num_classes=int(config.dataset.num_classes))

  def describe(self) -> list[str]:
    lines = [
        f"backbone     {self.depth_name}: stages {self.stage_sizes}, width "
        f"{self.width}, {self.in_channels} input channel(s), features "
        f"{self.feature_dim}",
        "stem         " + ("cifar (3x3 conv, stride 1, no max-pool)"
                           if self.stem == "cifar" else
                           "imagenet (7x7 conv, stride 2, pad 3 + max-pool)")]
    lines.append("projector    " + (
        f"{self.feature_dim} -> {self.proj_hidden} -> {self.proj_out}"
        if self.proj_hidden else "not in the checkpoint"))
    middle = " -> ..." if self.gate_layers > 2 else ""
    lines.append("gate head    " + (
        f"{self.gate_layers} linear layers ({self.feature_dim} -> "
        f"{self.gate_hidden}{middle} -> {self.gate_out})"
        if self.gate_layers else "none"))
    lines.append("classifier   " + (
        f"{self.feature_dim} -> {self.num_classes} classes"
        if self.num_classes else "not in the checkpoint"))
    return lines


def _shape(group: Mapping[str, np.ndarray], key: str) -> tuple[int, ...]:
  if key not in group:
    raise TensorMismatchError(f"Cannot infer the architecture: {key} is "
                              "missing.")
  return tuple(group[key].shape)


def _linear_layers(group: Mapping[str, np.ndarray]) -> list[int]:
  """Indices i of `{i}.weight` entries of an nn.Sequential MLP, sorted."""
  return sorted(int(k.split(".")[0]) for k in group
                if re.fullmatch(r"\d+\.weight", k))


def infer_architecture(ckpt: TorchCheckpoint) -> Architecture:
  """Reads depth, width, stem, channels, head sizes from tensor shapes."""
  bb = ckpt.groups.get("backbone", {})
  if "conv1.weight" not in bb:
    found = sorted(bb)[:8] or sorted(k for g in ckpt.groups.values()
                                     for k in g)[:8]
    raise TensorMismatchError(
        f"{ckpt.path}: no {'backbone.' if ckpt.kind == 'solo-learn' else ''}"
        "conv1.weight, so this is not a torchvision-style ResNet checkpoint. "
        f"First tensor names found: {found}.")
  conv1 = bb["conv1.weight"]
  if conv1.ndim != 4 or conv1.shape[2] != conv1.shape[3] or (
      conv1.shape[2] not in (3, 7)):
    raise TensorMismatchError(
        f"conv1.weight has shape {conv1.shape}; expected (width, channels, "
        "3, 3) (CIFAR stem) or (width, channels, 7, 7) (ImageNet stem).")
  width, in_channels, k = conv1.shape[0], conv1.shape[1], conv1.shape[2]
  blocks: dict[int, set[int]] = collections.defaultdict(set)
  for key in bb:
    m = re.match(r"layer(\d+)\.(\d+)\.", key)
    if m:
      blocks[int(m.group(1))].add(int(m.group(2)))
  if not blocks:
    raise TensorMismatchError("No layer1.* tensors: the checkpoint has a stem"
                              " but no residual stages.")
  stages = sorted(blocks)
  if stages != list(range(1, len(stages) + 1)) or any(
      sorted(blocks[s]) != list(range(len(blocks[s]))) for s in stages):
    raise TensorMismatchError(
        "The residual stages are not numbered layer1.0 ... consecutively: "
        f"{ {s: sorted(b) for s, b in blocks.items()} }.")
  backbone = "resnet50" if "layer1.0.conv3.weight" in bb else "resnet18"
  kw: dict[str, Any] = {}
  proj = ckpt.groups.get("projector")
  if proj:
    layers = _linear_layers(proj)
    if layers != [0, 2]:
      raise TensorMismatchError(
          f"The projector has linear layers at {layers}; this project's "
          "projector is Linear -> ReLU -> Linear (projector.0, projector.2).")
    kw.update(proj_hidden=_shape(proj, "0.weight")[0],
              proj_out=_shape(proj, "2.weight")[0])
  gate = ckpt.groups.get("gate_head")
  if gate:
    layers = _linear_layers(gate)
    if layers != list(range(0, 2 * len(layers), 2)):
      raise TensorMismatchError(
          f"The gating_head has linear layers at {layers}; expected "
          "Linear/ReLU alternating (gating_head.0, .2, ...).")
    kw.update(gate_layers=len(layers),
              gate_hidden=_shape(gate, "0.weight")[0],
              gate_out=_shape(gate, f"{layers[-1]}.weight")[0])
  cls = ckpt.groups.get("classifier")
  if cls:
    kw["num_classes"] = _shape(cls, "weight")[0]
  return Architecture(backbone=backbone,
                      stage_sizes=tuple(len(blocks[s]) for s in stages),
                      width=int(width), stem="cifar" if k == 3 else
                      "imagenet", in_channels=int(in_channels), **kw)


# ----------------------------------------------------------------------------
# The name table: one list drives both directions.
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Entry:
  """One tensor: its torch name (within its module group) and Flax path."""
  group: str  # backbone | projector | classifier | gate_head
  torch_name: str
  collection: str  # params | batch_stats
  path: tuple[str, ...]  # below the group in that collection
  layout: str  # conv | dense | vector


def _conv(group, tname, fpath):
  yield Entry(group, f"{tname}.weight", "params", (*fpath, "kernel"), "conv")


def _bn(group, tname, fpath):
  for t, coll, f in (("weight", "params", "scale"), ("bias", "params", "bias"),
                     ("running_mean", "batch_stats", "mean"),
                     ("running_var", "batch_stats", "var")):
    yield Entry(group, f"{tname}.{t}", coll, (*fpath, f), "vector")


def _linear(group, tname, fpath):
  prefix = f"{tname}." if tname else ""
  yield Entry(group, f"{prefix}weight", "params", (*fpath, "kernel"), "dense")
  yield Entry(group, f"{prefix}bias", "params", (*fpath, "bias"), "vector")


def bn_names(arch: Architecture) -> list[str]:
  """torch names of the backbone's BatchNorm modules (num_batches_tracked)."""
  return sorted({e.torch_name.rsplit(".", 1)[0] for e in entries(arch)
                 if e.group == "backbone" and e.layout == "vector"
                 and e.collection == "batch_stats"})


def entries(arch: Architecture, groups=("backbone", "projector", "classifier",
                                        "gate_head")) -> list[Entry]:
  """Every tensor of `arch`, torch name <-> Flax path."""
  out: list[Entry] = []
  if "backbone" in groups:
    out += _conv("backbone", "conv1", ("stem_conv",))
    out += _bn("backbone", "bn1", ("stem_bn",))
    block_name, n_convs, expansion = _BLOCK[arch.backbone]
    k = 0
    for s, n_blocks in enumerate(arch.stage_sizes):
      for b in range(n_blocks):
        tname, fname = f"layer{s + 1}.{b}", f"{block_name}_{k}"
        for c in range(n_convs):
          out += _conv("backbone", f"{tname}.conv{c + 1}", (fname, f"Conv_{c}"))
          out += _bn("backbone", f"{tname}.bn{c + 1}",
                     (fname, f"BatchNorm_{c}"))
        if b == 0 and (s > 0 or expansion != 1):
          out += _conv("backbone", f"{tname}.downsample.0", (fname,
                                                              "proj_conv"))
          out += _bn("backbone", f"{tname}.downsample.1", (fname, "proj_bn"))
        k += 1
  if "projector" in groups and arch.proj_hidden:
    for l in range(2):
      out += _linear("projector", str(2 * l), (f"Dense_{l}",))
  if "classifier" in groups and arch.num_classes:
    out += _linear("classifier", "", ())
  if "gate_head" in groups and arch.gate_layers:
    for l in range(arch.gate_layers):
      out += _linear("gate_head", str(2 * l), (f"Dense_{l}",))
  return out


def _to_flax_layout(x: np.ndarray, layout: str) -> np.ndarray:
  if layout == "conv":
    return np.ascontiguousarray(x.transpose(2, 3, 1, 0))  # OIHW -> HWIO
  if layout == "dense":
    return np.ascontiguousarray(x.T)  # (out, in) -> (in, out)
  return x


def _to_torch_layout(x: np.ndarray, layout: str) -> np.ndarray:
  if layout == "conv":
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1))  # HWIO -> OIHW
  if layout == "dense":
    return np.ascontiguousarray(x.T)
  return x


def torch_shape(flax_shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
  if layout == "conv":
    h, w, i, o = flax_shape
    return (o, i, h, w)
  if layout == "dense":
    return tuple(reversed(flax_shape))
  return tuple(flax_shape)


def _flat(tree: Mapping | None) -> dict[tuple[str, ...], Any]:
  """{path tuple: leaf} of a nested dict (flax.traverse_util)."""
  return {} if tree is None else traverse_util.flatten_dict(dict(tree))


def _listing(title: str, items: list[str]) -> str:
  shown = "\n".join(f"    {x}" for x in items[:_MAX_LISTED])
  more = (f"\n    ... and {len(items) - _MAX_LISTED} more"
          if len(items) > _MAX_LISTED else "")
  return f"  {title} ({len(items)}):\n{shown}{more}"


def _torch_key(ckpt_kind: str, entry: Entry) -> str:
  if ckpt_kind == "torchvision":
    return entry.torch_name
  solo = {v: k for k, v in SOLO_PREFIXES.items()}[entry.group]
  return f"{solo}.{entry.torch_name}" if entry.torch_name else solo


def to_flax(ckpt: TorchCheckpoint, arch: Architecture, target: Mapping
            ) -> tuple[dict, dict, list[str]]:
  """Converts `ckpt` into the Flax tree `target` describes.

  target: {"params": ..., "batch_stats": ...} of the model built for `arch`
  (arrays or ShapeDtypeStructs; only shapes are read). Groups wholly absent
  from a torchvision (backbone-only) checkpoint are left out of the result;
  the caller fills them from a fresh initialisation.

  Returns (params, batch_stats, notes). Raises TensorMismatchError listing
  every missing, unexpected and mis-shaped tensor.
  """
  out = {"params": {}, "batch_stats": {}}        # flat: {path: array}
  flat_target = {coll: _flat(target[coll]) for coll in out}
  missing, misshaped = [], []
  used = {g: set() for g in ckpt.groups}
  wanted = [g for g in ("backbone", "projector", "classifier", "gate_head")
            if g in ckpt.groups]
  table = entries(arch, wanted)
  for e in table:
    key = _torch_key(ckpt.kind, e)
    value = ckpt.groups[e.group].get(e.torch_name)
    ref = flat_target[e.collection].get((e.group, *e.path))
    if value is None:
      missing.append(key)
      continue
    used[e.group].add(e.torch_name)
    if ref is None:
      continue  # the model has no such leaf: reported as unexpected below.
    want = torch_shape(tuple(ref.shape), e.layout)
    if tuple(value.shape) != want:
      misshaped.append(f"{key}: {tuple(value.shape)} in the checkpoint, "
                       f"{want} expected")
      continue
    out[e.collection][(e.group, *e.path)] = _to_flax_layout(
        value, e.layout).astype(np.float32, copy=False)
  covered = {(e.collection, e.group, *e.path) for e in table}
  unexpected = list(ckpt.unexpected)
  for e in table:
    if (e.torch_name in used[e.group]
        and (e.group, *e.path) not in flat_target[e.collection]):
      used[e.group].discard(e.torch_name)
  for g, tensors in ckpt.groups.items():
    for name in tensors:
      if name in used[g]:
        continue
      if name.endswith(".num_batches_tracked") and g == "backbone" and (
          f"{name.rsplit('.', 1)[0]}.running_mean" in used[g]):
        continue
      unexpected.append(_torch_key(ckpt.kind, Entry(g, name, "", (), "")))
  for coll in ("params", "batch_stats"):
    for path in flat_target[coll]:
      if path[0] in wanted and (coll, *path) not in covered:
        missing.append(f"(the model's {coll}/{'/'.join(path)} has no "
                       "counterpart in the checkpoint)")
  if missing or unexpected or misshaped:
    parts = [f"{ckpt.path} does not match the model inferred from it "
             f"({arch.depth_name}, width {arch.width}):"]
    if missing:
      parts.append(_listing("missing", missing))
    if unexpected:
      parts.append(_listing("unexpected", sorted(unexpected)))
    if misshaped:
      parts.append(_listing("wrong shape", misshaped))
    parts.append("Nothing was written. The checkpoint must be a torchvision"
                 "-style ResNet (solo-learn names for a .ckpt); a truncated or"
                 " edited file, or a model with extra modules, cannot be "
                 "imported.")
    raise TensorMismatchError("\n".join(parts))
  notes = []
  if ckpt.dropped:
    notes.append(f"dropped {', '.join(ckpt.dropped)} (torchvision's ImageNet"
                 " classifier, not part of the encoder)")
  return (traverse_util.unflatten_dict(out["params"]),
          traverse_util.unflatten_dict(out["batch_stats"]), notes)


def num_batches_tracked(ckpt: TorchCheckpoint, arch: Architecture
                        ) -> dict[str, int]:
  """{BN torch name: num_batches_tracked} of the backbone, where stored."""
  bb = ckpt.groups.get("backbone", {})
  return {name: int(bb[f"{name}.num_batches_tracked"].reshape(()))
          for name in bn_names(arch) if f"{name}.num_batches_tracked" in bb}


# ----------------------------------------------------------------------------
# Writing.
# ----------------------------------------------------------------------------
def to_torch(arch: Architecture, params: Mapping, batch_stats: Mapping | None,
             num_batches: Mapping[str, int] | int = 0,
             groups=("backbone", "projector", "classifier", "gate_head"),
             solo_names: bool = True) -> "collections.OrderedDict[str, Any]":
  """Flax params (+ batch_stats) -> an ordered {torch name: numpy array}.

  `solo_names` prefixes `backbone.` etc. (a solo-learn state_dict); without
  it only the backbone is written, with torchvision's bare names. With
  batch_stats=None (e.g. a gradient tree) only `params` leaves are written
  and no num_batches_tracked. Raises InteropError if the trees do not hold
  exactly the tensors `arch` has.
  """
  kind = "solo-learn" if solo_names else "torchvision"
  if not solo_names:
    groups = ("backbone",)
  trees = {"params": _flat(params),
           "batch_stats": None if batch_stats is None else _flat(batch_stats)}
  out: "collections.OrderedDict[str, Any]" = collections.OrderedDict()
  consumed = set()
  missing = []
  for e in entries(arch, groups):
    if trees[e.collection] is None:
      continue
    value = trees[e.collection].get((e.group, *e.path))
    if value is None:
      missing.append(f"{e.collection}/{'/'.join((e.group, *e.path))}")
      continue
    consumed.add((e.collection, e.group, *e.path))
    out[_torch_key(kind, e)] = _to_torch_layout(np.asarray(value), e.layout)
    if (e.group == "backbone" and e.collection == "batch_stats"
        and e.path[-1] == "var"):
      bn = e.torch_name.rsplit(".", 1)[0]
      count = (num_batches.get(bn, 0) if isinstance(num_batches, Mapping)
               else int(num_batches))
      out[_torch_key(kind, Entry("backbone", f"{bn}.num_batches_tracked", "",
                                 (), ""))] = np.asarray(count, np.int64)
  extra = []
  for coll, tree in trees.items():
    if tree is None:
      continue
    for path in tree:
      if path[0] in groups and (coll, *path) not in consumed:
        extra.append(f"{coll}/{'/'.join(path)}")
  if missing or extra:
    raise InteropError(
        "The Flax state does not match the architecture of its config "
        f"({arch.depth_name}):\n" + (_listing("missing", missing) + "\n"
                                     if missing else "") +
        (_listing("not exportable", extra) if extra else ""))
  return out


def save(tensors: Mapping[str, np.ndarray], path: str,
         extra: Mapping[str, Any] | None = None, state_dict_key: bool = True
         ) -> None:
  """torch.save of {"state_dict": tensors, **extra} (or the bare dict)."""
  torch = import_torch()
  sd = collections.OrderedDict(
      (k, torch.from_numpy(np.array(v, copy=True))) for k, v in
      tensors.items())
  torch.save({"state_dict": sd, **(extra or {})} if state_dict_key else sd,
             path)
