"""Checkpoints: safetensors only (nothing is ever unpickled)."""
from __future__ import annotations

import os
from typing import Union

import torch
from safetensors.torch import save_file
from timm.models import load_checkpoint as _timm_load_checkpoint
from torch import nn

__all__ = ["save_checkpoint", "load_checkpoint"]


def save_checkpoint(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Save ``model.state_dict()`` as safetensors, with the architecture and split factor as metadata.

    Args:
        model: a :class:`~timm_split.ensemble.SplitEnsemble` (or any module).
        path: the file to write (``.safetensors``).
    """
    if not str(path).endswith(".safetensors"):
        raise ValueError(f"save to a .safetensors file, got {str(path)!r}")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    meta = {"architecture": str(cfg.get("architecture", type(model).__name__)),
            "split_factor": str(getattr(model, "split_factor", 1))}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=meta)


def load_checkpoint(model: nn.Module, path: Union[str, os.PathLike], strict: bool = True) -> None:
    """Load a checkpoint with timm's loader: safetensors, or ``torch.load(weights_only=True)`` for other files.

    A checkpoint of another architecture or split factor raises ``ValueError`` naming the mismatch.
    """
    with torch.no_grad():
        _timm_load_checkpoint(model, str(path), use_ema=False, strict=strict, weights_only=True)
