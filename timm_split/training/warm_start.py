"""Trained weights as a run's start: ``--initial-checkpoint`` (timm's flag) and a checkpoint rebuilt as a model.

timm's ``train.py`` loads ``--initial-checkpoint`` into the model it created, preferring the file's EMA weights
(``timm.models.load_checkpoint(..., use_ema=True)``); so do we. Which model depends on what the file holds:

* a ``timm-split train`` checkpoint of one network (S=1), or any timm model's ``.pth``/``.safetensors`` state dict:
  the base model is loaded *before* it is split, so ``--split S --split-init inherit`` gives every member its own
  channel subset of those trained weights (:func:`timm_split.split` ``init='inherit'``);
* a ``timm-split train`` checkpoint of S members: the split itself is loaded (``--split`` must be that S).

:func:`ensemble_from_checkpoint` rebuilds the ensemble a ``timm-split train`` checkpoint holds (its model, S,
classes and input from the metadata), as ``timm-split validate`` does; a distillation teacher is built so.

    S = checkpoint_split_factor(path)         # 0: a plain state dict
    if S <= 1:
        load_into_model(model, path, arch)    # then split(model, S, init='inherit')
    ens, state = ensemble_from_checkpoint(path)
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Tuple

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


def ensemble_from_checkpoint(path: str, flag: str = "--kd-model-checkpoint") -> Tuple[SplitEnsemble, Dict[str, Any]]:
    """The ensemble a ``timm-split train`` checkpoint holds, rebuilt from its metadata and loaded (its EMA
    weights when it has them), in eval mode on the CPU.

    Args:
        path: A checkpoint written by ``timm-split train`` (any S).
        flag: The flag that named it (for error messages).

    Returns:
        ``(ensemble, training state)``; the state holds ``model``, ``num_classes``, ``class_names``,
        ``data_config`` and the rest ``timm-split train`` records.

    Raises:
        ValueError: not such a checkpoint, or one whose model timm does not know.
    """
    import timm

    from ..core import split
    from ..ensemble import single

    S = checkpoint_split_factor(path, flag)
    if S == 0:
        raise ValueError(f"{flag} {path} is not a checkpoint written by timm-split train; pass one, or name the "
                         "model its state dict belongs to with --kd-model-name.")
    state = training_state(read_metadata(path))
    name, data = state.get("model"), state.get("data_config")
    if not name or not data or not state.get("num_classes"):
        raise ValueError(f"{flag} {path} does not record its model, classes and input (not a training "
                         "checkpoint); pass a last/model_best/checkpoint-<epoch>.safetensors of a timm-split run.")
    if not timm.is_model(name):
        raise ValueError(f"{flag} {path} holds a {name!r}, which this timm does not know; upgrade timm.")
    in_chans = data["input_size"][0]
    model = timm.create_model(name, num_classes=state["num_classes"], in_chans=in_chans,
                              **state.get("model_kwargs", {}))
    model.pretrained_cfg = dict(model.pretrained_cfg, **data, num_classes=state["num_classes"])
    ens = single(model, name) if S == 1 else split(model, S, img_size=data["input_size"][-1], in_chans=in_chans,
                                                   plan_at=state.get("plan_at", "model"))
    ema = has_ema(path)
    load_checkpoint(ens, path, use_ema=ema)
    _logger.info("%s %s: %s S=%d (%s)", flag, path, name, S, "EMA weights" if ema else "weights")
    return ens.eval(), state
