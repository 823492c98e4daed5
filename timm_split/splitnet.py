"""``splitnet_<arch>`` for every timm architecture, in timm's own registry.

After ``import timm_split``::

    timm.create_model('splitnet_resnet50', split_factor=2, num_classes=100)

builds ``resnet50`` with the timm kwargs (``num_classes``, ``in_chans``, ``drop_rate``, ``drop_path_rate``,
``img_size`` ...) and splits it. Registration follows timm: ``default_cfgs`` from ``generate_default_cfgs``,
``@register_model`` entrypoints and ``build_model_with_cfg``. Every architecture is registered by one short
entrypoint factory in a loop (``splitnet_<arch>``, one per timm architecture that splits). No model is built at
import. There are no hub weights: ``pretrained=True`` needs a local file,
``pretrained_cfg_overlay=dict(file='model.safetensors')`` (timm's convention).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

import timm
import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, register_model
from timm.models._features import FeatureDictNet, FeatureGetterNet, FeatureInfo, FeatureListNet
from timm.models._features_fx import FeatureGraphNet
from torch import nn

from .checks import check_split_factor
from .core import split
from .ensemble import SplitEnsemble, checkpoint_filter_fn, prefixed
from .trace import meta_copy

_logger = logging.getLogger(__name__)

__all__ = ["create_splitnet", "SplitFeatures"]

_SPLIT_KWARGS = ("seed", "scale_regularization", "drop_scale", "plan_at", "averaging", "init", "params_tol", "macs_tol")
_CFG_KEYS = ("input_size", "min_input_size", "fixed_input_size", "interpolation", "crop_pct", "crop_mode", "mean",
             "std", "num_classes", "first_conv", "classifier", "pool_size", "test_input_size", "license")


def _cfg(arch: str) -> Dict[str, Any]:
    base = get_pretrained_cfg(arch)
    base = base.to_dict() if base is not None else {}
    cfg = {k: base[k] for k in _CFG_KEYS if k in base}
    cfg.setdefault("input_size", (3, 224, 224))
    return cfg


_ARCHS = [a for a in timm.list_models() if not a.startswith("splitnet_")]
default_cfgs = generate_default_cfgs({f"splitnet_{a}": _cfg(a) for a in _ARCHS})


def _build_split(base_arch: str, split_factor: int = 2, split_kwargs: Dict[str, Any] = None, **kwargs) -> SplitEnsemble:
    base = timm.create_model(base_arch, pretrained=False, **kwargs)
    return split(base, split_factor, img_size=kwargs.get("img_size"), in_chans=kwargs.get("in_chans"),
                 **(split_kwargs or {}))


_FEATURE_KWARGS = ("out_indices", "feature_cls", "output_fmt", "norm", "flatten_sequential", "out_map",
                   "feature_concat", "return_dict")


def create_splitnet(arch: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """Build ``splitnet_<arch>``: the timm model ``arch`` with ``kwargs``, split into ``split_factor`` members.

    Args:
        arch: the base timm architecture.
        pretrained: load a local checkpoint given as ``pretrained_cfg_overlay=dict(file=...)``; with another
            ``num_classes`` (or 0) the classifier is left out, with another ``in_chans`` the first convs are
            adapted, as timm does.
        **kwargs: ``split_factor`` (default 2), :func:`timm_split.split` options (``seed``,
            ``scale_regularization``, ``drop_scale``, ``averaging``, ``init``), any timm kwargs of the base model, and
            ``features_only=True`` with timm's feature options (``out_indices``, ``feature_cls``, ``norm`` ...).

    Returns:
        The :class:`SplitEnsemble`, with ``pretrained_cfg['architecture'] == 'splitnet_<arch>'``; with
        ``features_only=True`` a features model (timm's ``FeatureGetterNet`` over the ensemble, or
        :class:`SplitFeatures`) whose levels are the members' concatenated.
    """
    variant = f"splitnet_{arch}"
    features_only = kwargs.pop("features_only", False)
    feature_cfg = dict(kwargs.pop("feature_cfg", None) or {})
    feature_cfg.update({k: kwargs.pop(k) for k in _FEATURE_KWARGS if k in kwargs})
    split_factor = check_split_factor(kwargs.pop("split_factor", 2))  # the ValueError split() gives
    split_kwargs = {k: kwargs.pop(k) for k in _SPLIT_KWARGS if k in kwargs}
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    if pretrained and not any(overlay.get(k) for k in ("file", "state_dict", "url", "hf_hub_id")):
        raise ValueError(
            f"{variant} has no hub weights. Pass a local checkpoint: timm.create_model('{variant}', "
            f"pretrained=True, pretrained_cfg_overlay=dict(file='model.safetensors'), split_factor={split_factor}), "
            "saved with timm_split.save_checkpoint(ens, 'model.safetensors').")
    cfg = get_pretrained_cfg(variant)
    cfg = cfg.to_dict() if cfg is not None else {}
    for k in ("first_conv", "classifier"):  # timm's loader adapts and drops these by name: the members' names
        if cfg.get(k) and k not in overlay:
            overlay[k] = prefixed(cfg[k], split_factor)
    model = build_model_with_cfg(_build_split, variant, pretrained, base_arch=arch, split_factor=split_factor,
                                 split_kwargs=split_kwargs, pretrained_cfg_overlay=overlay,
                                 pretrained_filter_fn=checkpoint_filter_fn, **kwargs)
    cfg = dict(model.pretrained_cfg)
    cfg.update(split_factor=split_factor, base_architecture=arch, num_classes=model.num_classes)
    model.pretrained_cfg = cfg
    if features_only:
        return _features_model(model, arch, feature_cfg, kwargs)
    return model


def _fmt(model: nn.Module) -> str:
    """A model's ``output_fmt`` as a plain string (timm stores a str or its ``Format`` enum)."""
    fmt = getattr(model, "output_fmt", "NCHW")
    return str(getattr(fmt, "value", fmt))


class SplitFeatures(nn.Module):
    """A features model over the members of a split: each member wrapped as timm wraps the base model
    (``FeatureListNet``/``FeatureDictNet``, or ``FeatureGraphNet`` for ``feature_cls='fx'``), and each level's
    features concatenated on the channel dim (``feature_info`` channels summed).

    Attributes:
        members: the S per-member features models.
        feature_info: timm's ``FeatureInfo``, channels of the concatenated levels.
    """

    __constants__ = ["return_dict", "dim"]  # TorchScript compiles only the branch they select

    def __init__(self, members: List[nn.Module], input_size) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        first = members[0]
        self.output_fmt = _fmt(first)
        dict_out = isinstance(first, FeatureDictNet) and not isinstance(first, FeatureListNet)
        self.return_dict = bool(getattr(first, "return_dict", dict_out))
        self.dim = 1 if self.output_fmt == "NCHW" else -1
        with torch.no_grad():
            outs = meta_copy(first).eval()(torch.empty((2, *input_size), device="meta"))
        outs = list(outs.values()) if isinstance(outs, dict) else list(outs)
        info = FeatureInfo([dict(d) for d in first.feature_info.info], first.feature_info.out_indices)
        for i, o in zip(info.out_indices, outs):
            info.info[i]["num_chs"] = o.shape[self.dim] * len(members)
        self.feature_info = info

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Gradient checkpointing in every member's features model (timm's ``FeatureListNet`` has it)."""
        for m in self.members:
            m.set_grad_checkpointing(enable)

    def forward(self, x: torch.Tensor):
        """The concatenated feature levels: a list (or a dict, as the base's ``FeatureDictNet``)."""
        if self.return_dict:
            return self._forward_dict(x)
        per: List[List[torch.Tensor]] = []
        for m in self.members:  # a loop TorchScript compiles (the members may be timm's FeatureGraphNet)
            per.append(m(x))
        return [torch.cat([p[i] for p in per], self.dim) for i in range(len(per[0]))]

    @torch.jit.unused
    def _forward_dict(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        per = [m(x) for m in self.members]
        return {k: torch.cat([p[k] for p in per], self.dim) for k in per[0]}


class SplitFeatureGetter(FeatureGetterNet):
    """timm's ``FeatureGetterNet`` over the ensemble's ``forward_intermediates``, with the
    ``set_grad_checkpointing`` that timm's features classes have (its getter lacks it)."""

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Gradient checkpointing in every member that supports it."""
        self.model.set_grad_checkpointing(enable)


def _features_model(ens: SplitEnsemble, arch: str, feature_cfg: Dict[str, Any], kwargs: Dict[str, Any]) -> nn.Module:
    """The features model of ``ens`` as timm builds the base's: the base's wrapper and default levels are read
    from a features model of ``arch`` on meta."""
    with torch.device("meta"):
        try:
            base = timm.create_model(arch, features_only=True, **feature_cfg, **kwargs)
        except Exception as e:
            raise ValueError(f"splitnet_{arch} with features_only: the base model {arch} does not build with "
                             f"features_only ({type(e).__name__}: {e}); use ens.forward_features(x)") from e
    if isinstance(base, FeatureGraphNet):  # feature_cls='fx': each member traced as timm traces the base
        wrapped = [FeatureGraphNet(m, out_indices=tuple(base.feature_info.out_indices), output_fmt=_fmt(base),
                                   return_dict=base.return_dict) for m in ens.members]
    else:
        wrapped = [_rewrap(m, base) for m in ens.members] if isinstance(base, FeatureDictNet) else None
    if wrapped and all(wrapped):  # the base's own List/Dict wrapper around each member
        size = ens.split_plan.input_size if ens.split_plan is not None else ens.pretrained_cfg["input_size"]
        fm = SplitFeatures(wrapped, size)
    elif isinstance(base, FeatureGetterNet) or hasattr(ens.members[0], "forward_intermediates"):
        # timm's getter over the ensemble's forward_intermediates (the base's levels and format)
        indices = base.out_indices if isinstance(base, FeatureGetterNet) else base.feature_info.out_indices
        fm = SplitFeatureGetter(ens, out_indices=list(indices), norm=getattr(base, "norm", False),
                                output_fmt=_fmt(base))
    else:
        raise ValueError(f"splitnet_{arch} with features_only: {type(base).__name__} features of {arch} are not "
                         "supported for a split (no forward_intermediates); use ens.forward_features(x)")
    fm.pretrained_cfg = fm.default_cfg = dict(ens.pretrained_cfg)
    return fm


def _rewrap(member: nn.Module, base: nn.Module) -> Optional[nn.Module]:
    """``member`` wrapped in ``base``'s features class with the same options (checked by its tensor names), or
    None where no options give the base's names."""
    want = set(base.state_dict())
    for flatten in (False, True):
        try:
            fm = type(base)(member, out_indices=base.feature_info.out_indices, output_fmt=_fmt(base),
                            feature_concat=base.concat, flatten_sequential=flatten)
        except (AssertionError, TypeError, ValueError, KeyError):  # timm asserts on layers it cannot find
            continue
        if set(fm.state_dict()) == want:
            return fm
    return None


def _entrypoint(arch: str):
    def fn(pretrained: bool = False, **kwargs) -> SplitEnsemble:
        return create_splitnet(arch, pretrained, **kwargs)
    fn.__name__ = fn.__qualname__ = f"splitnet_{arch}"
    fn.__module__ = __name__
    fn.__doc__ = f"``{arch}`` split into ``split_factor`` (default 2) co-trainable members."
    return fn


for _arch in _ARCHS:
    register_model(_entrypoint(_arch))
