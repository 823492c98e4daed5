"""Checkpoints: one safetensors file holds the weights and, optionally, the training state.

Nothing is ever unpickled. A checkpoint written by :func:`save_checkpoint` is one ``.safetensors`` file:

* the model's ``state_dict`` under its own keys (``members.<i>.<name>``), so the file is also a plain weights file;
  tensors that share memory (tied weights) are stored once, the other names listed in the metadata (``tied``);
* with ``optimizer``: its tensors under ``_train.optim.<param id>.<name>``, the rest (param groups, numbers) as JSON
  in the metadata; with ``model_ema``: the EMA weights under ``_train.ema.<name>``;
* metadata: ``format``, ``architecture``, ``split_factor``, ``state`` (JSON: epoch, step, anything the trainer
  passes) and ``sha256``, a checksum of every tensor (name, dtype, shape, bytes) verified on load.

The file is written to ``<path>.tmp`` and renamed, so a kill never leaves a half-written checkpoint, and the
weights and the training state of one step are always read together. :func:`load_checkpoint` also reads any
safetensors or ``.pth`` state dict (``torch.load(weights_only=True)`` through timm's loader).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

_logger = logging.getLogger(__name__)

__all__ = ["save_checkpoint", "load_checkpoint", "LoadedCheckpoint", "read_metadata"]

FORMAT = "timm_split/2"
_STATE = "_train."
_OPTIM = _STATE + "optim."
_EMA = _STATE + "ema."
PathLike = Union[str, os.PathLike]


@dataclasses.dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` read.

    Attributes:
        path: the file read.
        metadata: the safetensors metadata (empty for a ``.pth`` state dict).
        state: the training state saved with the weights (``epoch``, ``step``, ...; empty for a plain state dict).
        missing_keys: model keys the file lacks (only non-empty with ``strict=False``).
        unexpected_keys: file keys the model lacks (only non-empty with ``strict=False``).
    """

    path: str
    metadata: Dict[str, str]
    state: Dict[str, Any]
    missing_keys: List[str]
    unexpected_keys: List[str]

    @property
    def epoch(self) -> int:
        """Epochs completed when the checkpoint was written (0 if unknown)."""
        return int(self.state.get("epoch", 0))

    @property
    def step(self) -> int:
        """Optimizer updates done when the checkpoint was written (0 if unknown)."""
        return int(self.state.get("step", 0))


def _checksum(tensors: Dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tied_names(state: Dict[str, torch.Tensor]) -> Dict[str, str]:
    """Names whose tensor is the same memory as an earlier name's (tied weights, a module registered twice), each
    mapped to that earlier name."""
    seen: Dict[Tuple, str] = {}
    tied: Dict[str, str] = {}
    for name, t in state.items():
        if t.device.type != "meta" and t.numel():
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if key in seen:
                tied[name] = seen[key]
            else:
                seen[key] = name
    return tied


def _untie(state: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Drop names whose tensor is the same memory as an earlier name's; return the kept tensors and alias map."""
    tied = tied_names(state)
    return {n: t.detach().contiguous().cpu() for n, t in state.items() if n not in tied}, tied


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """An optimizer state dict split into flat tensors and a JSON-able rest."""
    sd = optimizer.state_dict()
    tensors, values = {}, {}
    for pid, entry in sd["state"].items():
        for name, v in entry.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{_OPTIM}{pid}.{name}"] = v.detach().contiguous().cpu()
            else:
                values.setdefault(str(pid), {})[name] = v
    return tensors, {"param_groups": sd["param_groups"], "values": values}


def _optimizer_state(tensors: Dict[str, torch.Tensor], rest: Dict[str, Any]) -> Dict[str, Any]:
    """The inverse of :func:`_optimizer_tensors`."""
    state: Dict[int, Dict[str, Any]] = {}
    for pid, entry in rest.get("values", {}).items():
        state.setdefault(int(pid), {}).update(entry)
    for key, t in tensors.items():
        if key.startswith(_OPTIM):
            pid, name = key[len(_OPTIM):].split(".", 1)
            state.setdefault(int(pid), {})[name] = t
    return {"state": state, "param_groups": rest["param_groups"]}


def save_checkpoint(model: nn.Module, path: PathLike, optimizer: Optional[torch.optim.Optimizer] = None, *,
                    model_ema: Optional[nn.Module] = None, state: Optional[Dict[str, Any]] = None) -> str:
    """Write ``model``'s weights, and optionally the training state, to one safetensors file, atomically.

    Args:
        model: a :class:`~timm_split.ensemble.SplitEnsemble` (or any module). Tied weights are stored once.
        path: the file to write (``.safetensors``); written as ``<path>.tmp`` and renamed.
        optimizer: also save its state (resume with :func:`load_checkpoint` ``(model, path, optimizer)``).
        model_ema: also save these EMA weights (e.g. ``ModelEmaV3.module``), under ``_train.ema.``.
        state: JSON-able training state (epoch, step, scheduler/saver bookkeeping), stored in the metadata.

    Returns:
        The path written.
    """
    from safetensors.torch import save_file

    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"save to a .safetensors file, got {path!r}")
    tensors, tied = _untie(model.state_dict())
    cfg = getattr(model, "pretrained_cfg", None) or {}
    meta = {"format": FORMAT, "architecture": str(cfg.get("architecture", type(model).__name__)),
            "split_factor": str(getattr(model, "split_factor", 1)), "tied": json.dumps(tied),
            "state": json.dumps(state or {})}
    if model_ema is not None:
        ema, _ = _untie(model_ema.state_dict())
        tensors.update({_EMA + k: v for k, v in ema.items()})
    if optimizer is not None:
        opt_tensors, rest = _optimizer_tensors(optimizer)
        tensors.update(opt_tensors)
        meta["optimizer"] = json.dumps(rest)
    meta["sha256"] = _checksum(tensors)
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=meta)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates 0600; match the run's other files
    os.replace(tmp, path)
    return path


def read_metadata(path: PathLike) -> Dict[str, str]:
    """The safetensors metadata of ``path``; ``ValueError`` naming the file if it is not a readable safetensors."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint at {path}; pass a .safetensors file written by timm-split train "
                         "(e.g. <output>/last.safetensors).")
    try:
        with safe_open(path, "pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for a truncated/empty/foreign file
        raise ValueError(f"{path} is not a readable safetensors checkpoint ({type(e).__name__}: {e}); it may be "
                         "truncated or empty: pass another checkpoint (e.g. a checkpoint-<epoch>.safetensors).") from e


def _read(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """All tensors and the metadata of a checkpoint; the checksum is verified when present."""
    if not path.endswith(".safetensors"):
        from timm.models import load_state_dict
        try:
            return load_state_dict(path, use_ema=False, weights_only=True), {}
        except Exception as e:
            raise ValueError(f"cannot read {path} as a state dict ({type(e).__name__}: {e}); pass a .safetensors "
                             "or .pth state dict saved with torch.save(model.state_dict()).") from e
    from safetensors.torch import load_file

    meta = read_metadata(path)
    try:
        tensors = load_file(path)
    except Exception as e:
        raise ValueError(f"{path} is truncated or corrupt ({type(e).__name__}: {e}); pass another checkpoint.") from e
    if "sha256" in meta and _checksum(tensors) != meta["sha256"]:
        raise ValueError(f"{path}: checksum mismatch (the file was changed or damaged after it was written); "
                         "pass another checkpoint.")
    for alias, name in json.loads(meta.get("tied", "{}")).items():
        tensors[alias] = tensors[name]
    return tensors, meta


def _check_identity(model: nn.Module, meta: Dict[str, str], path: str) -> None:
    """Refuse a checkpoint of another split factor or architecture, naming both."""
    S = getattr(model, "split_factor", 1)
    if meta.get("split_factor") and int(meta["split_factor"]) != S:
        n = meta["split_factor"]
        raise ValueError(f"{path}: checkpoint has {n} members but the model has split_factor={S}; use --split {n} "
                         f"(split_factor={n}).")
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if arch and meta.get("architecture") and meta["architecture"] != arch:
        raise ValueError(f"{path} does not match {arch} (the file holds {meta['architecture']} weights: other keys "
                         "and shape mismatches); pass the matching --model or another checkpoint.")


def load_checkpoint(model: nn.Module, path: PathLike, optimizer: Optional[torch.optim.Optimizer] = None, *,
                    model_ema: Optional[nn.Module] = None, strict: bool = True, use_ema: bool = False
                    ) -> LoadedCheckpoint:
    """Load weights (and optionally the optimizer and EMA state) written by :func:`save_checkpoint`.

    Also reads any safetensors or ``.pth`` state dict (timm's ``load_state_dict`` with ``weights_only=True``).

    Args:
        model: the model to load into (same architecture and split factor).
        path: the checkpoint file.
        optimizer: restore its state too (the checkpoint must hold one).
        model_ema: restore the EMA weights into this module (the checkpoint must hold them).
        strict: every key must match; with False, the mismatches are returned.
        use_ema: load the checkpoint's EMA weights into ``model`` instead of its weights.

    Returns:
        A :class:`LoadedCheckpoint` (metadata, training state, missing and unexpected keys).

    Raises:
        ValueError: a missing, truncated, damaged or foreign file, or one of another architecture or split factor.
    """
    path = os.fspath(path)
    tensors, meta = _read(path)
    _check_identity(model, meta, path)
    weights = {k: v for k, v in tensors.items() if not k.startswith(_STATE)}
    if use_ema or model_ema is not None:
        ema = {k[len(_EMA):]: v for k, v in tensors.items() if k.startswith(_EMA)}
        if not ema:
            raise ValueError(f"{path} holds no EMA weights; train with --model-ema or drop --use-ema.")
        if use_ema:
            weights = ema
        if model_ema is not None:
            _load_weights(model_ema, ema, True, path)
    missing, unexpected = _load_weights(model, weights, strict, path)
    if optimizer is not None:
        if "optimizer" not in meta:
            raise ValueError(f"{path} holds no optimizer state; pass a checkpoint written during training.")
        optimizer.load_state_dict(_optimizer_state(tensors, json.loads(meta["optimizer"])))
    return LoadedCheckpoint(path, meta, json.loads(meta.get("state", "{}")), missing, unexpected)


def _load_weights(model: nn.Module, weights: Dict[str, torch.Tensor], strict: bool, path: str
                  ) -> Tuple[List[str], List[str]]:
    own = model.state_dict()
    shapes = [f"{k}: file {tuple(weights[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
              if k in weights and tuple(weights[k].shape) != tuple(v.shape)]
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    if shapes or (strict and (missing or unexpected)):
        raise ValueError(f"{path} does not match the model: {len(missing)} missing keys {missing[:3]}, "
                         f"{len(unexpected)} unexpected keys {unexpected[:3]}, {len(shapes)} shape mismatches "
                         f"{shapes[:3]}; was it saved from another architecture, split factor or num_classes?")
    with torch.no_grad():
        model.load_state_dict({k: v for k, v in weights.items() if k in own}, strict=False)
    return missing, unexpected
