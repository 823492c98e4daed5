"""Checkpoints: one safetensors file holds the weights and, optionally, the training state.

Nothing is ever unpickled. A checkpoint written by :func:`save_checkpoint` is one ``.safetensors`` file:

* the model's ``state_dict`` under its own keys (``members.<i>.<name>``), so the file is also a plain weights file;
  tensors that share memory (tied weights) are stored once, the other names listed in the metadata (``tied``);
* with ``optimizer``: its tensors under ``_train.optim.<param id>.<name>``, the rest (its type, param groups,
  numbers) as JSON in the metadata; with ``model_ema``: the EMA weights under ``_train.ema.<name>``;
* metadata: ``format``, ``architecture``, ``split_factor``, ``state`` (JSON: epoch, step, anything the trainer
  passes) and ``sha256``, a checksum of every tensor (name, dtype, shape, bytes) and of every other metadata
  entry, verified on load. A file with our ``format`` but no ``sha256`` is refused (``verify=False`` reads its
  weights alone, on purpose). Files of the previous format (``timm_split/2``, whose checksum covers the tensors
  only) are still read and verified by that rule.

The file is written to ``<path>.<pid>.tmp`` and renamed, so a kill never leaves a half-written checkpoint, and the
weights and the training state of one step are always read together. :func:`load_checkpoint` checks everything
(keys, shapes, the optimizer's type, groups and state, the EMA) before it changes anything: on an error the model,
optimizer and EMA are as they were. It also reads any safetensors or ``.pth`` state dict
(``torch.load(weights_only=True)`` through timm's loader).
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .checks import atomic_write

_logger = logging.getLogger(__name__)

__all__ = ["save_checkpoint", "load_checkpoint", "LoadedCheckpoint", "read_metadata", "training_state"]

FORMAT = "timm_split/3"
_FORMATS = (FORMAT, "timm_split/2")  # timm_split/2: the checksum covers the tensors only (still read)
_JSON = ("state", "optimizer", "tied")  # metadata entries holding a JSON object
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


def _checksum(tensors: Dict[str, torch.Tensor], meta: Optional[Dict[str, str]] = None) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in sorted name order, then (``meta``) over every
    metadata entry but ``sha256``, length-prefixed, in sorted key order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    for key in sorted(meta or {}):
        if key != "sha256":
            k, v = key.encode(), meta[key].encode()
            h.update(b"meta|%d|%s|%d|%s" % (len(k), k, len(v), v))
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
    return tensors, {"type": type(optimizer).__name__, "param_groups": sd["param_groups"], "values": values}


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

    Raises:
        ValueError: not a ``.safetensors`` path, or its folder does not exist.
        OSError: the write failed (disk full, read-only folder), naming ``path``; a file already at ``path`` is
            left as it was and no temporary file stays behind.
    """
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"save to a .safetensors file, got {path!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"cannot save {path}: the folder {folder} does not exist; create it first "
                         "(os.makedirs) or save into an existing folder.")
    tensors, tied = _untie(model.state_dict())
    cfg = getattr(model, "pretrained_cfg", None) or {}
    meta = {"format": FORMAT, "architecture": str(cfg.get("architecture", type(model).__name__)),
            "split_factor": str(getattr(model, "split_factor", 1)), "state": json.dumps(state or {})}
    if model_ema is not None:
        ema, ema_tied = _untie(model_ema.state_dict())
        tensors.update({_EMA + k: v for k, v in ema.items()})
        tied.update({_EMA + k: _EMA + v for k, v in ema_tied.items()})  # the EMA's ties too
    meta["tied"] = json.dumps(tied)
    if optimizer is not None:
        opt_tensors, rest = _optimizer_tensors(optimizer)
        tensors.update(opt_tensors)
        meta["optimizer"] = json.dumps(rest)
    meta["sha256"] = _checksum(tensors, meta)
    _write_atomic(tensors, meta, path)
    return path


def _write_atomic(tensors: Dict[str, torch.Tensor], meta: Dict[str, str], path: str) -> None:
    """``save_file`` through :func:`~timm_split.checks.atomic_write`; safetensors' own I/O error type is raised as
    an ``OSError`` naming ``path``."""
    from safetensors.torch import save_file

    def write(tmp: str) -> None:
        try:
            save_file(tensors, tmp, metadata=meta)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own type for an I/O error
            if not isinstance(e, OSError) and "os error" not in str(e):
                raise
            code = getattr(e, "errno", None) or int((re.findall(r"os error (\d+)", str(e)) or [errno.EIO])[0])
            raise OSError(code, f"{os.strerror(code)} (writing a checkpoint)", tmp) from e
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors creates 0600; match the run's other files

    atomic_write(path, write)


def read_metadata(path: PathLike) -> Dict[str, str]:
    """The safetensors metadata of ``path``.

    For a timm_split checkpoint (``format`` is ours) the JSON entries (``state``, ``optimizer``, ``tied``) are
    checked to parse as JSON objects and ``split_factor`` to be a number, so ``json.loads`` of them is safe.

    Raises:
        ValueError: naming the file, if it is missing, not a readable safetensors file, or its metadata is damaged.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint at {path}; pass a .safetensors file written by timm-split train "
                         "(e.g. <output>/last.safetensors).")
    try:
        with safe_open(path, "pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for a truncated/empty/foreign file
        raise ValueError(f"{path} is not a readable safetensors checkpoint ({type(e).__name__}: {e}); it may be "
                         "truncated or empty: pass another checkpoint (e.g. a checkpoint-<epoch>.safetensors).") from e
    if _ours(meta):
        _check_metadata(meta, path)
    return meta


def training_state(meta: Dict[str, str]) -> Dict[str, Any]:
    """The training state (epoch, model, data config, ...) stored in the metadata of a timm_split checkpoint, as
    :func:`read_metadata` returns it (checked there to be a JSON object); ``{}`` for any other file."""
    return json.loads(meta.get("state", "{}")) if _ours(meta) else {}


def _ours(meta: Dict[str, str]) -> bool:
    """A file written by :func:`save_checkpoint` (any version): its ``format`` is ``timm_split/<n>``."""
    return str(meta.get("format", "")).startswith("timm_split/")


def _check_metadata(meta: Dict[str, str], path: str) -> None:
    """Our metadata must be what we write: a known format, JSON objects, a numeric split factor."""
    damaged = ("the file was edited or damaged after it was written: pass another checkpoint (e.g. a "
               "checkpoint-<epoch>.safetensors of the same run)")
    if meta["format"] not in _FORMATS:
        raise ValueError(f"{path} has format {meta['format']!r}, which this timm_split does not read (it reads "
                         f"{', '.join(_FORMATS)}); upgrade timm_split, or pass a checkpoint written by this version.")
    for key in _JSON:
        if key in meta:
            try:
                value = json.loads(meta[key])
            except ValueError as e:
                raise ValueError(f"{path}: its {key!r} metadata is not JSON ({e}); {damaged}.") from None
            if not isinstance(value, dict):
                raise ValueError(f"{path}: its {key!r} metadata is {type(value).__name__}, not a JSON object; "
                                 f"{damaged}.")
    if not str(meta.get("split_factor", "1")).isdigit():
        raise ValueError(f"{path}: its 'split_factor' metadata is {meta['split_factor']!r}, not a number; {damaged}.")


def _read(path: str, verify: bool = True) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """All tensors and the metadata of a checkpoint; our checksum is required and verified (unless not ``verify``)."""
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
    if verify and _ours(meta):
        _verify(tensors, meta, path)
    tied = json.loads(meta.get("tied", "{}")) if _ours(meta) else {}
    for alias, name in tied.items():
        if name not in tensors:
            raise ValueError(f"{path}: its 'tied' metadata names {name!r}, which the file lacks; pass another "
                             "checkpoint.")
        tensors[alias] = tensors[name]
    return tensors, meta


def _verify(tensors: Dict[str, torch.Tensor], meta: Dict[str, str], path: str) -> None:
    """Our checksum: required; over tensors and metadata (``timm_split/3``) or the tensors only (``timm_split/2``)."""
    if "sha256" not in meta:
        raise ValueError(f"{path} is a timm_split checkpoint without its sha256 checksum (removed after it was "
                         "written), so neither its weights nor its training state can be trusted; pass another "
                         "checkpoint, or read its weights alone on purpose with load_checkpoint(..., verify=False).")
    expected = _checksum(tensors, meta) if meta["format"] == FORMAT else _checksum(tensors)
    if expected != meta["sha256"]:
        raise ValueError(f"{path}: checksum mismatch (the file was changed or damaged after it was written); "
                         "pass another checkpoint.")


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
                    model_ema: Optional[nn.Module] = None, strict: bool = True, use_ema: bool = False,
                    verify: bool = True) -> LoadedCheckpoint:
    """Load weights (and optionally the optimizer and EMA state) written by :func:`save_checkpoint`.

    Also reads any safetensors or ``.pth`` state dict (timm's ``load_state_dict`` with ``weights_only=True``).
    All or nothing: the file, the model's keys and shapes, the EMA's and the optimizer's type, groups and state are
    checked before anything is changed; on an error ``model``, ``optimizer`` and ``model_ema`` are as they were.

    Args:
        model: the model to load into (same architecture and split factor).
        path: the checkpoint file.
        optimizer: restore its state too (the checkpoint must hold the state of an optimizer of the same type over
            the same parameters).
        model_ema: restore the EMA weights into this module (the checkpoint must hold them).
        strict: every key must match; with False, the mismatches are returned.
        use_ema: load the checkpoint's EMA weights into ``model`` instead of its weights.
        verify: False reads a timm_split checkpoint as a plain weights file on purpose: its checksum is neither
            required nor checked, and no training state is read (no ``optimizer``, ``model_ema`` or ``use_ema``).

    Returns:
        A :class:`LoadedCheckpoint` (metadata, training state, missing and unexpected keys).

    Raises:
        ValueError: a missing, truncated, damaged or foreign file, one of another architecture or split factor, or
            an optimizer or EMA the file's state does not fit.
    """
    path = os.fspath(path)
    if not verify and (optimizer is not None or model_ema is not None or use_ema):
        raise ValueError("verify=False reads the weights alone: drop optimizer, model_ema and use_ema.")
    tensors, meta = _read(path, verify)
    _check_identity(model, meta, path)
    weights = {k: v for k, v in tensors.items() if not k.startswith(_STATE)}
    ema: Dict[str, torch.Tensor] = {}
    if use_ema or model_ema is not None:
        ema = {k[len(_EMA):]: v for k, v in tensors.items() if k.startswith(_EMA)}
        if not ema:
            fix = ("drop use_ema (timm-split validate: drop --use-ema)" if use_ema else
                   "pass model_ema=None (timm-split train: drop --model-ema to resume this run)")
            raise ValueError(f"{path} holds no EMA weights (it was saved without an EMA); {fix}.")
        if use_ema:
            weights = ema
    own = model.state_dict()  # walked once: checked, then loaded
    weights = _plain_into_member(model, own, weights, path)
    missing, unexpected = _check_weights(model, own, weights, strict, path)
    own_ema = model_ema.state_dict() if model_ema is not None else {}
    if model_ema is not None:
        _check_weights(model_ema, own_ema, ema, True, path)
    if optimizer is not None:
        _load_optimizer(optimizer, tensors, meta, path)  # checked; on an error the optimizer is restored
    if model_ema is not None:
        _copy_weights(model_ema, own_ema, ema)
    _copy_weights(model, own, weights)
    state = training_state(meta) if verify else {}
    return LoadedCheckpoint(path, meta, state, missing, unexpected)


def _plain_into_member(model: nn.Module, own: Dict[str, torch.Tensor], weights: Dict[str, torch.Tensor],
                       path: str) -> Dict[str, torch.Tensor]:
    """One model's own state dict (a timm model's ``.pth``: keys without ``members.<i>.``) given to a split: member
    0's keys at S=1; at S>1 a ``ValueError`` naming the missing prefix. Any other file is returned as it is.
    ``own`` is the model's state dict."""
    if not own or not all(k.startswith("members.") for k in own) or any(k.startswith("members.") for k in weights):
        return weights
    prefixed = {f"members.0.{k}": v for k, v in weights.items()}
    if 2 * len(own.keys() & prefixed.keys()) < len(prefixed):
        return weights  # not this architecture's model either: _check_weights names the keys
    S = getattr(model, "split_factor", 1)
    if S == 1:
        return prefixed
    raise ValueError(f"{path} is one model's own state dict (its keys lack the 'members.<i>.' prefix of a split's), "
                     f"not a checkpoint of {S} members; load it with --split 1 (split_factor=1), or split the model "
                     "and train the members.")


def _check_weights(model: nn.Module, own: Dict[str, torch.Tensor], weights: Dict[str, torch.Tensor], strict: bool,
                   path: str) -> Tuple[List[str], List[str]]:
    """The missing and unexpected keys of ``weights`` against ``own`` (``model``'s state dict); ``ValueError``
    for a shape mismatch or (``strict``) any key mismatch."""
    shapes = [f"{k}: file {tuple(weights[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
              if k in weights and tuple(weights[k].shape) != tuple(v.shape)]
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    if shapes and not missing and not unexpected:
        _check_classes(model, own, weights, path)
    if shapes or (strict and (missing or unexpected)):
        raise ValueError(f"{path} does not match the model: {len(missing)} missing keys {missing[:3]}, "
                         f"{len(unexpected)} unexpected keys {unexpected[:3]}, {len(shapes)} shape mismatches "
                         f"{shapes[:3]}; was it saved from another architecture, split factor or num_classes?")
    return missing, unexpected


def _check_classes(model: nn.Module, own: Dict[str, torch.Tensor], weights: Dict[str, torch.Tensor],
                   path: str) -> None:
    """Where only the classifier's shapes differ, a ``ValueError`` naming the file's class count."""
    heads = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    bad = [k for k, v in own.items() if tuple(weights[k].shape) != tuple(v.shape)]
    if not heads or not all(any(k.startswith(h + ".") for h in heads) for k in bad):
        return
    k = next((k for k in bad if k.endswith(".weight")), bad[0])
    have, want = weights[k].shape[0], own[k].shape[0]
    raise ValueError(f"{path} has {have} classes but the model was built with {want} ({k}: file "
                     f"{tuple(weights[k].shape)}); build it with num_classes={have} (timm-split validate: evaluate "
                     f"it on data with its {have} class folders).")


def _copy_weights(model: nn.Module, own: Dict[str, torch.Tensor], weights: Dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        model.load_state_dict({k: v for k, v in weights.items() if k in own}, strict=False)


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: Dict[str, torch.Tensor], meta: Dict[str, str],
                    path: str) -> None:
    """Restore the optimizer's state from the file, or raise with the optimizer as it was."""
    if "optimizer" not in meta:
        raise ValueError(f"{path} holds no optimizer state; pass a checkpoint written during training.")
    rest = json.loads(meta["optimizer"])
    fix = ("resume with the optimizer of the run that wrote it (the same --opt, model and param groups), or "
           "without its state (--no-resume-opt)")
    saved, own = rest.get("type"), type(optimizer).__name__
    if saved and saved != own:
        raise ValueError(f"{path} holds the state of a {saved} optimizer but the optimizer is {own}; {fix}.")
    try:
        sd = _optimizer_state(tensors, rest)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: its optimizer state is damaged ({type(e).__name__}: {e}); pass another "
                         "checkpoint.") from None
    problem = _optimizer_mismatch(optimizer, sd)
    if problem:
        raise ValueError(f"{path}: its optimizer state does not fit this optimizer ({problem}); {fix}.")
    before = optimizer.state_dict()
    try:
        optimizer.load_state_dict(sd)
        lacking = sorted({k for g in optimizer.param_groups for k in optimizer.defaults if k not in g})
        if lacking and not saved:  # a timm_split/2 file (no "type") of another optimizer: its options are missing
            raise ValueError(f"its param groups lack {own}'s options {lacking}")
    except Exception as e:
        optimizer.load_state_dict(before)
        raise ValueError(f"{path}: its optimizer state does not fit this {own} ({type(e).__name__}: {e}; another "
                         f"optimizer type's state?); {fix}.") from None


def _optimizer_mismatch(optimizer: torch.optim.Optimizer, sd: Dict[str, Any]) -> Optional[str]:
    """What makes ``sd`` another optimizer's state: group count, params per group, per-param tensor shapes."""
    groups, saved = optimizer.param_groups, sd["param_groups"]
    if not isinstance(saved, list) or len(saved) != len(groups):
        return f"{len(saved) if isinstance(saved, list) else 0} param groups in the file, {len(groups)} here"
    for i, (g, s) in enumerate(zip(groups, saved)):
        if len(s.get("params", [])) != len(g["params"]):
            return f"param group {i} has {len(s.get('params', []))} params in the file, {len(g['params'])} here"
    params = {pid: p for s, g in zip(saved, groups) for pid, p in zip(s["params"], g["params"])}
    for pid, entry in sd["state"].items():
        p = params.get(pid)
        if p is None:
            return f"state for param {pid}, which no group has"
        for name, t in entry.items():
            if isinstance(t, torch.Tensor) and t.dim() == p.dim() and t.dim() and tuple(t.shape) != tuple(p.shape):
                return f"{name} of param {pid} is {tuple(t.shape)} in the file, the param is {tuple(p.shape)}"
    return None
