"""The ensemble's timm feature surface: features, head, intermediates, input size, classifier and widths.

:class:`FeatureSurface` is the part of :class:`~timm_split.ensemble.SplitEnsemble` that presents the S members as
one timm backbone with S times a member's channels; its tensor helpers are torch.fx leaf functions (their checks
read shapes) and TorchScript-compatible.
"""

import logging
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx
from timm.layers import register_notrace_function
from torch import nn

from .checks import timm_num_classes
from .trace import meta_copy

_logger = logging.getLogger(__name__)

__all__ = ["FeatureSurface", "Views", "cat_members"]

Views = Union[torch.Tensor, Sequence[torch.Tensor]]


# ---- tensor helpers: leaf functions for torch.fx (their checks read shapes), and TorchScript-compatible
def _feature_dim(t: torch.Tensor, channels_last: bool) -> int:
    """The channel dim of a member's features: 1 for NCHW, the last for NHWC, tokens ``[B, N, C]`` and pooled."""
    if t.dim() == 4 and not channels_last:
        return 1
    return t.dim() - 1


@torch.fx.wrap
def cat_members(outs: List[torch.Tensor], channels_last: bool) -> torch.Tensor:
    """The members' features side by side on their channel dim: ``S x [B, C, ...] -> [B, S*C, ...]``."""
    return torch.cat(outs, _feature_dim(outs[0], channels_last))


@torch.fx.wrap
def _member_chunk(x: torch.Tensor, i: int, split: int, num_features: int, channels_last: bool,
                  stacked: bool) -> torch.Tensor:
    """Member ``i``'s part of ensemble features: ``x[i]`` of ``[S, B, ...]`` (``stacked``) or its channel chunk
    of ``[B, S*C, ...]``."""
    if stacked:
        if x.dim() < 2 or x.shape[0] != split:
            raise ValueError("stacked features must be [S, B, ...] with S=" + str(split) + " members leading, got "
                             + str(list(x.shape)) + "; pass forward_features(x) (concatenated) with stacked=False")
        return x[i]
    dim = _feature_dim(x, channels_last)
    width = x.shape[dim]
    if width % split != 0 or (num_features > 0 and width != num_features):
        raise ValueError("ensemble features must have num_features=" + str(num_features) + " channels (S="
                         + str(split) + " members' concatenated) on dim " + str(dim) + ", got shape "
                         + str(list(x.shape)) + "; pass forward_features(x), or stacked=True for [S, B, ...]")
    c = width // split
    return x.narrow(dim, i * c, c)


for _fn in (cat_members, _member_chunk):
    register_notrace_function(_fn)  # timm's fx helpers and torchvision's feature extractor keep them as leaves


def _join_levels(per_member: List[List[Any]], channels_last: bool) -> List[Any]:
    """Per level, the members' intermediates concatenated (tuples, e.g. with prefix tokens, element-wise)."""
    out = []
    for level in zip(*per_member):
        if isinstance(level[0], (list, tuple)):
            out.append(tuple(cat_members(list(parts), channels_last) for parts in zip(*level)))
        else:
            out.append(cat_members(list(level), channels_last))
    return out


def _meta_member(member: nn.Module) -> nn.Module:
    """A meta copy of ``member`` in eval mode. Computed caches in plain attributes (LeViT's attention-bias
    cache after a forward with grad) cannot be deep-copied: they are left out of the copy."""
    caches = []
    for mod in member.modules():
        for k, v in list(vars(mod).items()):
            vals = v.values() if isinstance(v, dict) else (v,)
            if any(isinstance(t, torch.Tensor) and not t.is_leaf for t in vals):
                caches.append((mod, k, v))
                mod.__dict__[k] = {} if isinstance(v, dict) else None
    try:
        return meta_copy(member).eval()
    finally:
        for mod, k, v in caches:
            mod.__dict__[k] = v


def _probe_widths(member: nn.Module, input_size: Tuple[int, ...]) -> Dict[str, Any]:
    """The widths a member really has, from a forward on a meta copy: feature channels, pre-logits width and
    each ``feature_info`` level's channels. Empty where the member has no timm surface or does not run."""
    if not hasattr(member, "forward_features") or not hasattr(member, "forward_head"):
        return {}
    meta = _meta_member(member)
    x = torch.empty((2, *input_size), device="meta")
    fmt = getattr(member, "output_fmt", "NCHW")
    fmt = getattr(fmt, "value", fmt)
    out: Dict[str, Any] = {}
    try:
        with torch.no_grad():
            f = meta.forward_features(x)
            nhwc = str(fmt) == "NHWC"
            if isinstance(f, torch.Tensor):  # several outputs (CrossViT, CoaT): num_features is the model's own
                out["num_features"] = f.shape[_feature_dim(f, nhwc)]
            pre = meta.forward_head(f, pre_logits=True)  # unpooled [B, C, H, W] where global_pool is ''
            out["head_hidden_size"] = pre.shape[_feature_dim(pre, nhwc)]
            info = getattr(member, "feature_info", None)
            if isinstance(info, (list, tuple)) and info and hasattr(meta, "forward_intermediates"):
                levels = meta.forward_intermediates(x, intermediates_only=True)
                if len(levels) == len(info) and all(isinstance(t, torch.Tensor) for t in levels):
                    out["feature_chs"] = [t.shape[1] for t in levels]
    except Exception as e:  # a model outside timm's contract: keep its attributes
        _logger.debug("width probe of %s failed: %s", type(member).__name__, e)
    return out


def _fix_member_widths(member: nn.Module, widths: Dict[str, Any]) -> None:
    """Set a member's ``num_features``/``head_hidden_size``/``feature_info`` to its real (thinner) widths: the
    rebuild copies the base model's attributes, which timm's ``reset_classifier`` then sizes heads from."""
    for k in ("num_features", "head_hidden_size"):
        if k in widths and getattr(member, k, None) != widths[k]:
            setattr(member, k, widths[k])
    if "feature_chs" in widths:
        member.feature_info = [dict(d, num_chs=c) for d, c in zip(member.feature_info, widths["feature_chs"])]


def _fit_new_linears(member: nn.Module, before: set, input_size: Tuple[int, ...]) -> None:
    """Resize the linear layers a ``reset_classifier`` just made (not in ``before``) to the width that reaches
    them: a head module can size them from the base model's width, which the member no longer has."""
    for _ in range(4):  # a new layer feeding another new layer is seen one round later
        new = {n: m for n, m in member.named_modules() if isinstance(m, nn.Linear) and id(m) not in before}
        meta, seen = _meta_member(member), {}
        for n in new:
            meta.get_submodule(n).register_forward_pre_hook(
                lambda mod, args, n=n: seen.setdefault(n, args[0].shape[-1]))
        try:
            with torch.no_grad():
                meta(torch.empty((2, *input_size), device="meta"))
        except Exception:  # stops at the first layer of the wrong width; its input width is recorded
            pass
        wrong = {n: m for n, m in new.items() if n in seen and seen[n] != m.in_features}
        if not wrong:
            return
        for n, m in wrong.items():
            parent, _, leaf = n.rpartition(".")
            fixed = nn.Linear(seen[n], m.out_features, bias=m.bias is not None, device=m.weight.device,
                              dtype=m.weight.dtype)
            setattr(member.get_submodule(parent) if parent else member, leaf, fixed.train(m.training))
            before.add(id(fixed))
            _logger.debug("reset_classifier: %s resized to %d inputs (the member's width)", n, seen[n])


class FeatureSurface:
    """timm's feature and head surface of :class:`~timm_split.ensemble.SplitEnsemble` (a mixin): the members
    seen as one backbone with S times a member's channels (see the ensemble's docstring for the contract).

    It reads the ensemble's ``members``, ``split_factor``, ``num_classes``, ``pretrained_cfg``,
    ``_channels_last``, ``_input_size``, ``_member_inputs`` and ``combine``, and keeps ``num_features`` and
    ``head_hidden_size`` in step with the members. It declares no attributes of its own (TorchScript reads the
    ensemble's).
    """

    def _sync_widths(self) -> None:
        """Members' widths from a meta forward (after a head reset too: timm sizes it from stale attributes),
        and the ensemble's, S times a member's."""
        first = self.members[0]
        widths = _probe_widths(first, self._input_size)
        for m in self.members:
            _fix_member_widths(m, widths)
        self.num_features = getattr(first, "num_features", 0) * self.split_factor
        hidden = getattr(first, "head_hidden_size", getattr(first, "num_features", 0))
        self.head_hidden_size = hidden * self.split_factor

    @torch.jit.unused
    def forward_features(self, x: Views, stacked: bool = False) -> Any:
        """The members' unpooled features, concatenated: ``[B, S*C, H, W]`` (or ``[B, N, S*C]``, ``[B, H, W, S*C]``
        for token and NHWC models); ``stacked=True`` gives ``[S, B, ...]``."""
        return self._join([m.forward_features(v) for m, v in zip(self.members, self._member_inputs(x))], stacked)

    def _join(self, feats: List[Any], stacked: bool) -> Any:
        """The members' features as one: stacked or concatenated; where a member gives several outputs (CrossViT's
        branches, HRNet's after pruning), each output joined across the members."""
        if isinstance(feats[0], (list, tuple)):
            return [self._join(list(fs), stacked) for fs in zip(*feats)]
        return torch.stack(feats) if stacked else cat_members(feats, self._channels_last)

    @torch.jit.unused
    def forward_head(self, x: torch.Tensor, pre_logits: bool = False, stacked: bool = False) -> torch.Tensor:
        """The members' heads on ensemble features.

        Args:
            x: ``[B, num_features, ...]`` from :meth:`forward_features` (each member gets its channel chunk), or
                ``[S, B, ...]`` with ``stacked=True``.
            pre_logits: return the members' pre-logits concatenated on their channel dim, ``[B, head_hidden_size]``
                (``[B, head_hidden_size, H, W]`` for a model without pooling).
            stacked: ``x`` is the per-member view ``[S, B, ...]``.

        Raises:
            ValueError: the channel count is not ``num_features`` (or the leading dim is not S when stacked).
        """
        S, last = self.split_factor, self._channels_last
        if isinstance(x, (list, tuple)):  # several feature outputs: each one split (their widths may differ)
            parts = [[_member_chunk(t, i, S, 0, last, stacked) for t in x] for i in range(S)]
        else:
            parts = [_member_chunk(x, i, S, self.num_features, last, stacked) for i in range(S)]
        outs = [m.forward_head(p, pre_logits=pre_logits) for m, p in zip(self.members, parts)]
        if pre_logits:  # side by side on the channel dim (pooled [B, C], or unpooled where global_pool is '')
            return cat_members(outs, last)
        return self.combine(torch.stack(outs))

    # ---- features
    @torch.jit.unused
    def forward_intermediates(self, x: Views, indices: Optional[Union[int, List[int]]] = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
                              **kwargs: Any) -> Any:
        """timm's ``forward_intermediates`` of the members, each level concatenated on its channel dim.

        Args:
            x: one batch, or per-member views.
            indices, norm, stop_early, output_fmt, intermediates_only, **kwargs: passed to every member.

        Returns:
            The intermediates (a list, ``[B, S*C_l, H_l, W_l]`` per level in ``'NCHW'``) or, unless
            ``intermediates_only``, ``(final features, intermediates)``.
        """
        if not hasattr(self.members[0], "forward_intermediates"):
            raise ValueError(f"{type(self.members[0]).__name__} has no forward_intermediates; use "
                             "timm.create_model('splitnet_<arch>', features_only=True) for its feature levels")
        outs = [m.forward_intermediates(v, indices=indices, norm=norm, stop_early=stop_early, output_fmt=output_fmt,
                                        intermediates_only=intermediates_only, **kwargs)
                for m, v in zip(self.members, self._member_inputs(x))]
        last = output_fmt in ("NHWC", "NLC")
        if intermediates_only:
            return _join_levels(outs, last)
        return self._join([o[0] for o in outs], False), _join_levels([o[1] for o in outs], last)

    @property
    def set_input_size(self) -> Callable[..., None]:
        """timm's ``set_input_size`` (ViT, Swin, ...: image, patch and window size) on every member; only where the
        members have it (``hasattr(model, 'set_input_size')`` is how timm's code asks)."""
        if not hasattr(self.members[0], "set_input_size"):
            raise AttributeError("set_input_size")  # nn.Module.__getattr__ then names it as for any missing one
        return self._set_input_size

    @torch.jit.unused
    def _set_input_size(self, img_size: Optional[Union[int, Tuple[int, int]]] = None, **kwargs: Any) -> None:
        for m in self.members:
            m.set_input_size(img_size=img_size, **kwargs)
        if img_size is not None:
            hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
            self._input_size = (self._input_size[0], *hw)

    @torch.jit.unused
    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True, **kwargs: Any) -> List[int]:
        """Prune every member after the last intermediate in ``indices`` (timm's method, with the model's own
        options such as EfficientNet's ``extra_blocks``); returns the kept indices."""
        kept = [m.prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head, **kwargs)
                for m in self.members]
        if prune_head:
            self.num_classes = timm_num_classes(self.members[0]) or 0
            self.pretrained_cfg["num_classes"] = self.num_classes
            self._sync_widths()
        return kept[0]

    # ---- head
    @torch.jit.unused
    def get_classifier(self) -> nn.ModuleList:
        """The members' classifiers (every head of a member with several, e.g. LeViT's distillation head)."""
        heads: List[nn.Module] = []
        for m in self.members:
            head = m.get_classifier()
            heads.extend(head if isinstance(head, (tuple, list)) else [head])
        return nn.ModuleList(heads)

    @torch.jit.unused
    def reset_classifier(self, num_classes: int, *args: Any, **kwargs: Any) -> None:
        """Reset every member's classifier (timm's ``reset_classifier`` signature: ``num_classes``, then the
        model's own options such as ``global_pool``)."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0 (0 removes the classifier), got {num_classes!r}")
        for m in self.members:
            before = {id(mod) for mod in m.modules()}
            m.reset_classifier(num_classes, *args, **kwargs)
            _fit_new_linears(m, before, self._input_size)
        self.num_classes = num_classes
        self.pretrained_cfg["num_classes"] = num_classes
        self._sync_widths()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Gradient checkpointing in every member that supports it."""
        for m in self.members:
            if hasattr(m, "set_grad_checkpointing"):
                m.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Names (with the ``members.i.`` prefix) that take no weight decay, from each member."""
        out = set()
        for i, m in enumerate(self.members):
            if hasattr(m, "no_weight_decay"):
                out |= {f"members.{i}.{n}" for n in m.no_weight_decay()}
        return out
