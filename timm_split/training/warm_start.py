"""Trained weights as a run's start: ``--initial-checkpoint`` (timm's flag) and a checkpoint rebuilt as a model.

timm's ``train.py`` loads ``--initial-checkpoint`` into the model it created, preferring the file's EMA weights
(``timm.models.load_checkpoint(..., use_ema=True)``); so do we. Which model depends on what the file holds:

* a ``timm-split train`` checkpoint of one network (S=1), or any timm model's ``.pth``/``.safetensors`` state dict:
  the base model is loaded *before* it is split, so ``--split S --split-init inherit`` gives every member its own
  channel subset of those trained weights (:func:`timm_split.split` ``init='inherit'``);
* a ``timm-split train`` checkpoint of S members: the split itself is loaded (``--split`` must be that S).

:func:`ensemble_from_checkpoint` is where any weights file becomes an ensemble: a ``timm-split train`` checkpoint
rebuilt from its metadata (model, S, classes and input), another state dict of a ``splitnet_<arch>`` by timm's
registry; ``timm-split validate``, ``timm-split export`` and a distillation teacher all build theirs so.

    S = checkpoint_split_factor(path)         # 0: a plain state dict
    if S <= 1:
        load_into_model(model, path, arch)    # then split(model, S, init='inherit')
    ens, state = ensemble_from_checkpoint(path)
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Tuple

from torch import nn

from ..checkpoint import load_checkpoint, read_metadata, training_state
from ..ensemble import SplitEnsemble

_logger = logging.getLogger(__name__)

__all__ = ["EMA_PREFIX", "checkpoint_split_factor", "has_ema", "load_into_model", "ensemble_from_checkpoint"]

# where save_checkpoint stores the EMA weights (timm_split.checkpoint's documented file layout)
EMA_PREFIX = "_train.ema."


def _check_file(path: str, flag: str) -> None:
    if not os.path.isfile(path):
        raise ValueError(f"{flag} {path}: no such file; pass a checkpoint written by timm-split train or a timm "
                         "model's .pth/.safetensors state dict.")


def checkpoint_split_factor(path: str, flag: str = "--initial-checkpoint") -> int:
    """The number of members a ``timm-split train`` checkpoint holds; 0 for any other weights file.

    Args:
        path: The file.
        flag: The flag that named it (for the error message).

    Returns:
        S >= 1 for our checkpoints, 0 for a plain state dict (``.pth``, or a safetensors file not written by us).

    Raises:
        ValueError: a missing file or an unreadable safetensors file, naming ``flag``.
    """
    _check_file(path, flag)
    if not path.endswith(".safetensors"):
        return 0
    meta = read_metadata(path)
    if not str(meta.get("format", "")).startswith("timm_split/"):
        return 0
    return int(meta.get("split_factor") or 1)


def has_ema(path: str) -> bool:
    """Whether a safetensors checkpoint holds EMA weights (``--model-ema`` runs)."""
    if not path.endswith(".safetensors"):
        return False
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return any(k.startswith(EMA_PREFIX) for k in f.keys())


def load_into_model(model: nn.Module, path: str, arch: str) -> str:
    """Load one network's trained weights into ``model`` (a timm model, before it is split).

    Args:
        model: The base model, built with the run's classes and channels.
        path: A ``timm-split train`` checkpoint of one network (S=1; its EMA weights when it has them, timm's
            ``--initial-checkpoint`` rule), or a plain state dict of this architecture.
        arch: ``model``'s timm name (a checkpoint of another architecture is refused, naming both).

    Returns:
        What was loaded: ``'ema'``, ``'weights'`` or ``'state dict'``.

    Raises:
        ValueError: a file of another architecture, class count or split factor (the message names the cause).
    """
    from ..ensemble import single

    S = checkpoint_split_factor(path)
    if S > 1:
        raise ValueError(f"--initial-checkpoint {path} holds {S} members, not one network; pass --split {S} to "
                         "start from that split, or the checkpoint of a single network to split it.")
    if S == 0:
        load_checkpoint(model, path)
        _logger.info("--initial-checkpoint %s: state dict loaded into %s", path, arch)
        return "state dict"
    ema = has_ema(path)
    load_checkpoint(single(model, arch), path, use_ema=ema)  # single() wraps model itself: its weights change
    _logger.info("--initial-checkpoint %s: %s loaded into %s", path, "EMA weights" if ema else "weights", arch)
    return "ema" if ema else "weights"


def ensemble_from_checkpoint(path: str, flag: str = "--kd-model-checkpoint", *, model: Optional[str] = None,
                             split_factor: Optional[int] = None, num_classes: Optional[int] = None,
                             use_ema: Optional[bool] = None,
                             model_flag: Optional[str] = None) -> Tuple[SplitEnsemble, Dict[str, Any]]:
    """The ensemble a checkpoint file holds, built and loaded, in eval mode on the CPU: the one place a weights file
    becomes a :class:`~timm_split.SplitEnsemble` (``timm-split validate`` and ``export``, a distillation teacher).

    A ``timm-split train`` checkpoint is rebuilt from its metadata (model, S, classes, input channels, model
    kwargs, data config, split plan), as it was trained. Any other weights file (a ``.pth``, a safetensors state
    dict, or a checkpoint of :func:`~timm_split.save_checkpoint` without a training state) is built by timm's
    registry as ``splitnet_<arch>``, which needs ``model``. The arguments override the file's record.

    Args:
        path: The weights file.
        flag: The flag that named it (for error messages).
        model: ``<arch>`` or ``splitnet_<arch>`` (default: the checkpoint's).
        split_factor: S (default: the checkpoint's; 2 for a file that does not record it).
        num_classes: Classes (default: the checkpoint's; the model's for a file that does not record them).
        use_ema: Load the file's EMA weights (``None``: when it has them, timm's ``--initial-checkpoint`` rule;
            ``True`` for a file without them is an error naming it).
        model_flag: The flag that passes ``model`` (named in the error for a file that does not record its model);
            ``None``: the caller takes no model, so such a file is refused as not a training checkpoint.

    Returns:
        ``(ensemble, training state)``; the state (``{}`` for a file not written by ``timm-split train``) holds
        ``model``, ``num_classes``, ``class_names``, ``data_config`` and the rest ``timm-split train`` records.

    Raises:
        ValueError: a missing, unreadable or mismatched file (another S, classes or architecture), a model timm
            does not know, or a file that does not name its model when no ``model`` is given; one line naming
            ``flag`` and the fix.
    """
    import timm

    from ..core import split
    from ..ensemble import single

    _check_file(path, flag)
    meta = read_metadata(path) if path.endswith(".safetensors") else {}
    state = training_state(meta)
    data = state.get("data_config") if state.get("num_classes") else None  # a training checkpoint records both
    name = model or state.get("model")
    if not name or not (data or model):
        if model_flag is None:
            raise ValueError(f"{flag} {path} does not record its model, classes and input (not a checkpoint written "
                             "by timm-split train); pass a last/model_best/checkpoint-<epoch>.safetensors of a "
                             "timm-split run.")
        raise ValueError(f"{flag} {path} does not name its model (not written by timm-split train); pass "
                         f"{model_flag} (e.g. splitnet_resnet18) and --split.")
    base = name[len("splitnet_"):] if name.startswith("splitnet_") else name
    if not timm.is_model(base):
        if model:
            raise ValueError(f"unknown model {name!r}; see timm.list_models() (e.g. resnet18).")
        raise ValueError(f"{flag} {path} holds a {name!r}, which this timm does not know; upgrade timm.")
    S = split_factor or int(meta.get("split_factor") or state.get("split_factor") or 2)
    classes = num_classes if num_classes is not None else state.get("num_classes")
    kwargs = {} if classes is None else {"num_classes": classes}
    if data:  # written by timm-split train: rebuilt as it was trained
        in_chans = data["input_size"][0]
        net = timm.create_model(base, in_chans=in_chans, **kwargs, **state.get("model_kwargs", {}))
        net.pretrained_cfg = dict(net.pretrained_cfg, **data, **kwargs)
        ens = single(net, base) if S == 1 else split(net, S, img_size=data["input_size"][-1], in_chans=in_chans,
                                                     plan_at=state.get("plan_at", "model"))
    else:  # any state dict of a splitnet_* model: the registry builds it as it was built
        ens = timm.create_model(f"splitnet_{base}", split_factor=S, **kwargs)
    ema = has_ema(path) if use_ema is None else use_ema
    load_checkpoint(ens, path, use_ema=ema)
    _logger.info("%s %s: %s S=%d (%s)", flag, path, name, S, "EMA weights" if ema else "weights")
    return ens.eval(), state
