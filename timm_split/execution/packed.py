"""``'packed'``: the S members rewritten as one network of S-times wider grouped layers (conv ``groups*S``,
BatchNorm/GroupNorm over ``S*C`` channels, linear and LayerNorm per member through batched matmuls), run with
``functional_call`` on tensors packed from the members' own (so gradients reach them). Only nets made of known
per-channel modules (ResNet, EfficientNet/MobileNet, RegNet...) are accepted; anything else raises a
``ValueError`` naming the module.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .base import (Cache, Execution, Members, check_same_device, check_same_structure, device_of, is_training,
                   tensors_of, write_back)

__all__ = ["PackedExecution"]


class _PackedLinear(nn.Module):
    """S linears side by side on the last dim: ``[..., S*F] -> [..., S*K]`` (weight ``[S, K, F]``)."""

    def __init__(self, split: int, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.split, self.in_features, self.out_features = split, in_features, out_features
        self.weight = nn.Parameter(torch.empty(split, out_features, in_features, device="meta"))
        self.bias = nn.Parameter(torch.empty(split, out_features, device="meta")) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xs = x.reshape(-1, self.split, self.in_features).transpose(0, 1)  # [S, N, F]
        if self.bias is None:
            y = torch.bmm(xs, self.weight.transpose(1, 2))
        else:
            y = torch.baddbmm(self.bias.unsqueeze(1), xs, self.weight.transpose(1, 2))
        return y.transpose(0, 1).reshape(*lead, self.split * self.out_features)


class _PackedLayerNorm(nn.Module):
    """S LayerNorms over the last dim of ``[..., S*C]``, each over its own C (weight ``[S, C]``)."""

    def __init__(self, split: int, ln: nn.LayerNorm):
        super().__init__()
        self.split, self.dim, self.eps = split, ln.normalized_shape[0], ln.eps
        self.weight = nn.Parameter(torch.empty(split, self.dim, device="meta")) if ln.weight is not None else None
        self.bias = nn.Parameter(torch.empty(split, self.dim, device="meta")) if ln.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.unflatten(-1, (self.split, self.dim)), (self.dim,), eps=self.eps)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y.flatten(-2)


# modules whose forward acts per channel (or per element), so they run unchanged on packed channels
_PER_CHANNEL = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d,
    nn.ReplicationPad2d, nn.Upsample,
)
# timm modules known to act per channel/element (by qualified name, so no private import is needed), and
# containers whose own forward only chains children with per-channel ops (add, mul, mean over H, W)
_PER_CHANNEL_TIMM = {
    "timm.layers.activations." + n for n in
    ("GELU", "GELUTanh", "HardMish", "HardSigmoid", "HardSwish", "Mish", "QuickGELU", "Sigmoid", "Swish", "Tanh")
} | {"timm.layers.activations_me." + n for n in ("SwishMe", "MishMe", "HardSigmoidMe", "HardSwishMe", "HardMishMe")
     } | {
    "timm.layers.drop.DropPath", "timm.layers.drop.DropBlock2d",
    "timm.layers.adaptive_avgmax_pool.FastAdaptiveAvgPool", "timm.layers.adaptive_avgmax_pool.FastAdaptiveMaxPool",
    "timm.layers.adaptive_avgmax_pool.FastAdaptiveAvgMaxPool", "timm.layers.adaptive_avgmax_pool.AdaptiveAvgMaxPool2d",
    "timm.layers.blur_pool.BlurPool2d",
}
_CONTAINERS = {
    "torch.nn.modules.container.Sequential",
    "timm.models.resnet.ResNet", "timm.models.resnet.BasicBlock", "timm.models.resnet.Bottleneck",
    "timm.models.efficientnet.EfficientNet", "timm.models.mobilenetv3.MobileNetV3",
    "timm.models._efficientnet_blocks.DepthwiseSeparableConv", "timm.models._efficientnet_blocks.InvertedResidual",
    "timm.models._efficientnet_blocks.SqueezeExcite", "timm.models._efficientnet_blocks.ConvBnAct",
    "timm.models._efficientnet_blocks.EdgeResidual",
    "timm.models.regnet.RegNet", "timm.models.regnet.RegStage", "timm.models.regnet.Bottleneck",
    "timm.layers.squeeze_excite.SEModule", "timm.layers.squeeze_excite.EffectiveSEModule",
    "timm.layers.conv_bn_act.ConvNormAct", "timm.layers.classifier.ClassifierHead",
    "timm.layers.adaptive_avgmax_pool.SelectAdaptivePool2d",
}


def _qualname(m: nn.Module) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def _set_child(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _pack_plan(member: nn.Module, split: int) -> Tuple[nn.Module, Dict[str, str]]:
    """A meta template of the packed network and, per tensor name, how to pack the members' tensors.

    Rules: ``'cat'`` concatenate on dim 0 (channels), ``'stack'`` a new leading member dim, ``'first'``
    member 0's value (a counter every member shares, e.g. ``num_batches_tracked``).

    Raises:
        ValueError: a module the packing does not know, named with its path and type.
    """
    template = copy.deepcopy(member).to("meta")
    rules: Dict[str, str] = {}
    supported = ("Conv1d/2d/3d, BatchNorm, GroupNorm, Linear, LayerNorm (last dim), per-channel activations, "
                 "pooling and dropout, in ResNet/EfficientNet/MobileNetV3/RegNet blocks or nn.Sequential")
    for path, mod in list(template.named_modules()):
        qual = _qualname(mod)
        own = [n for n, _ in mod.named_parameters(recurse=False)] + [n for n, _ in mod.named_buffers(recurse=False)]
        prefix = f"{path}." if path else ""
        if isinstance(mod, nn.modules.conv._ConvNd) and not mod.transposed:
            mod.in_channels, mod.out_channels, mod.groups = (mod.in_channels * split, mod.out_channels * split,
                                                             mod.groups * split)
            rules.update({prefix + n: "cat" for n in own})
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.num_features *= split
            rules.update({prefix + n: "first" if n == "num_batches_tracked" else "cat" for n in own})
        elif isinstance(mod, nn.GroupNorm):
            mod.num_groups, mod.num_channels = mod.num_groups * split, mod.num_channels * split
            rules.update({prefix + n: "cat" for n in own})
        elif isinstance(mod, nn.Linear):
            _set_child(template, path, _PackedLinear(split, mod.in_features, mod.out_features, mod.bias is not None))
            rules.update({prefix + n: "stack" for n in own})
        elif qual in ("torch.nn.modules.normalization.LayerNorm", "timm.layers.norm.LayerNorm") \
                and len(mod.normalized_shape) == 1:
            _set_child(template, path, _PackedLayerNorm(split, mod))
            rules.update({prefix + n: "stack" for n in own})
        elif isinstance(mod, nn.Flatten) and mod.start_dim == 1 or isinstance(mod, _PER_CHANNEL) \
                or qual in _PER_CHANNEL_TIMM or qual in _CONTAINERS:
            if getattr(mod, "pool_type", "avg") not in ("", "avg", "max", "fast", "avgmax", "fastavg", "fastmax"):
                raise ValueError(f"execution 'packed' does not support module '{path}' ({qual}) with pool_type="
                                 f"{mod.pool_type!r}: it concatenates channels; use 'loop' or 'threads'")
            if own:
                raise ValueError(f"execution 'packed' does not support module '{path}' ({qual}): it holds tensors "
                                 f"{own} the packing has no rule for; use 'loop' or 'threads'")
        else:
            raise ValueError(f"execution 'packed' does not support module '{path or '<root>'}' ({qual}); it packs "
                             f"{supported}. Use 'loop' or 'threads' for this model")
    return template, rules


class PackedExecution(Execution):
    """The members as one network of S-times wider grouped layers (see the module docstring).

    Member ``i`` owns channel block ``i`` of every activation; views are packed ``[S, B, C, ...] -> [B, S*C,
    ...]`` and the output unpacked back to ``[S, B, ...]``. Packed tensors are rebuilt by ``torch.cat``/
    ``torch.stack`` of the members' tensors when a graph is needed (so gradients reach the members) and cached
    otherwise; BatchNorm running stats are written back to the members after a training call.

    Args:
        channels_last: run 4-d activations and conv weights channels-last (default: on CPU, where oneDNN's
            grouped convolutions are much faster in that layout).
    """

    name = "packed"
    _transient = ("_plan", "_cache")

    def __init__(self, channels_last: Optional[bool] = None) -> None:
        self.channels_last = channels_last
        self._plan: Optional[Tuple[nn.Module, Dict[str, str]]] = None
        self._cache: Optional[Cache] = None

    def check(self, members: Members) -> None:
        check_same_device(members, self.name)
        check_same_structure(members, self.name)
        self._plan = _pack_plan(members[0], len(members))

    def _pack(self, members: Members, channels_last: bool) -> Dict[str, torch.Tensor]:
        rules = self._plan[1]
        per = [tensors_of(m) for m in members]
        out = {}
        for name, rule in rules.items():
            ts = [d[name] for d in per]
            if rule == "cat":
                t = torch.cat(ts)
                if channels_last and t.dim() == 4:
                    t = t.contiguous(memory_format=torch.channels_last)
            elif rule == "stack":
                t = torch.stack(ts)
            else:
                t = ts[0].clone()
            out[name] = t
        return out

    def run(self, members: Members, views: List[torch.Tensor]) -> torch.Tensor:
        if self._plan is None:  # after reset(): the members may have moved
            self.check(members)
        if self._cache is None:
            self._cache = Cache()
        template, rules = self._plan
        dev = device_of(members[0])
        cl = self.channels_last if self.channels_last is not None else dev.type == "cpu"
        training = is_training(members[0])
        for a, b in zip(template.modules(), members[0].modules()):  # same order: children replaced in place
            a.training = b.training
        tensors = self._pack(members, cl) if training else self._cache.get(members, lambda: self._pack(members, cl))
        S = len(members)
        if all(v is views[0] for v in views):
            x = views[0].repeat(1, S, *([1] * (views[0].dim() - 2)))
        else:
            x = torch.stack(views, 1).flatten(1, 2)
        if cl and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        y = functional_call(template, tensors, (x,))
        if training:
            own = dict(members[0].named_buffers())
            buffers = {n: t for n, t in tensors.items() if n in own}
            write_back(members, buffers, lambda name, t, i: t if rules[name] == "first" else t.chunk(S)[i])
        return y.unflatten(1, (S, -1)).movedim(1, 0)
