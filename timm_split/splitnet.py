"""``splitnet_<arch>`` for every timm architecture, in timm's own registry.

After ``import timm_split``::

    timm.create_model('splitnet_resnet50', split_factor=2, num_classes=100)

builds ``resnet50`` with the timm kwargs (``num_classes``, ``in_chans``, ``drop_rate``, ``drop_path_rate``,
``img_size`` ...) and splits it. Registration follows timm: ``default_cfgs`` from ``generate_default_cfgs``,
``@register_model`` entrypoints and ``build_model_with_cfg``. The headline models have short explicit
entrypoints below; the rest of the zoo is registered by the same function in a loop. No model is built at
import. There are no hub weights: ``pretrained=True`` needs a local file,
``pretrained_cfg_overlay=dict(file='model.safetensors')`` (timm's convention).
"""
from __future__ import annotations

import logging
from typing import Any, Dict

import timm
from timm.models import build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, register_model

from .core import split
from .ensemble import SplitEnsemble

_logger = logging.getLogger(__name__)

__all__ = ["create_splitnet"]

_SPLIT_KWARGS = ("seed", "scale_regularization", "averaging", "init", "params_tol", "macs_tol")
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


def create_splitnet(arch: str, pretrained: bool = False, **kwargs) -> SplitEnsemble:
    """Build ``splitnet_<arch>``: the timm model ``arch`` with ``kwargs``, split into ``split_factor`` members.

    Args:
        arch: the base timm architecture.
        pretrained: load a local checkpoint given as ``pretrained_cfg_overlay=dict(file=...)``.
        **kwargs: ``split_factor`` (default 2), :func:`timm_split.split` options (``seed``,
            ``scale_regularization``, ``averaging``, ``init``) and any timm kwargs of the base model.

    Returns:
        The :class:`SplitEnsemble`, with ``pretrained_cfg['architecture'] == 'splitnet_<arch>'``.
    """
    variant = f"splitnet_{arch}"
    if kwargs.get("features_only"):
        raise ValueError(f"{variant}: features_only is not supported; use ens.forward_features(x)")
    split_factor = kwargs.pop("split_factor", 2)
    split_kwargs = {k: kwargs.pop(k) for k in _SPLIT_KWARGS if k in kwargs}
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    if pretrained and not any(overlay.get(k) for k in ("file", "state_dict", "url", "hf_hub_id")):
        raise ValueError(
            f"{variant} has no hub weights. Pass a local checkpoint: timm.create_model('{variant}', "
            f"pretrained=True, pretrained_cfg_overlay=dict(file='model.safetensors'), split_factor={split_factor}), "
            "saved with timm_split.save_checkpoint(ens, 'model.safetensors').")
    model = build_model_with_cfg(_build_split, variant, pretrained, base_arch=arch, split_factor=split_factor,
                                 split_kwargs=split_kwargs, **kwargs)
    cfg = dict(model.pretrained_cfg)
    member_cls = cfg.get("classifier")
    if isinstance(member_cls, str):
        cfg["classifier"] = tuple(f"members.{i}.{member_cls}" for i in range(split_factor))
    cfg.update(split_factor=split_factor, base_architecture=arch, num_classes=model.num_classes)
    model.pretrained_cfg = cfg
    return model


def _entrypoint(arch: str):
    def fn(pretrained: bool = False, **kwargs) -> SplitEnsemble:
        return create_splitnet(arch, pretrained, **kwargs)
    fn.__name__ = fn.__qualname__ = f"splitnet_{arch}"
    fn.__module__ = __name__
    fn.__doc__ = f"``{arch}`` split into ``split_factor`` (default 2) co-trainable members."
    return fn


@register_model
def splitnet_resnet50(pretrained: bool = False, **kwargs) -> SplitEnsemble:
    """ResNet-50 split into ``split_factor`` (default 2) members."""
    return create_splitnet("resnet50", pretrained, **kwargs)


@register_model
def splitnet_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> SplitEnsemble:
    """ViT-S/16 split into ``split_factor`` (default 2) members (heads kept, head_dim shrinks)."""
    return create_splitnet("vit_small_patch16_224", pretrained, **kwargs)


@register_model
def splitnet_convnext_tiny(pretrained: bool = False, **kwargs) -> SplitEnsemble:
    """ConvNeXt-T split into ``split_factor`` (default 2) members."""
    return create_splitnet("convnext_tiny", pretrained, **kwargs)


@register_model
def splitnet_efficientnet_b0(pretrained: bool = False, **kwargs) -> SplitEnsemble:
    """EfficientNet-B0 split into ``split_factor`` (default 2) members."""
    return create_splitnet("efficientnet_b0", pretrained, **kwargs)


_EXPLICIT = {"resnet50", "vit_small_patch16_224", "convnext_tiny", "efficientnet_b0"}
for _arch in _ARCHS:
    if _arch not in _EXPLICIT:
        register_model(_entrypoint(_arch))
