"""Checkpoints: one safetensors file holds the weights and, optionally, the training state.

Nothing is ever unpickled. A checkpoint written by :func:`save_checkpoint` is one ``.safetensors`` file:

* the model's ``state_dict`` under its own keys (``members.<i>.<name>``), so the file is also a plain weights file;
  tensors that share memory (tied weights) are stored once, the other names listed in the metadata (``tied``);
* with ``optimizer``: its tensors under ``_train.optim.<param id>.<name>``, the rest (its type, param groups,
  numbers) as JSON in the metadata; with ``model_ema``: the EMA weights under ``_train.ema.<name>``;
* metadata: ``format``, ``architecture``, ``split_factor``, ``state`` (JSON: epoch, step, anything the trainer
  passes, within :func:`check_training_state`'s domain) and ``sha256``, a checksum of every tensor (name, dtype,
  shape, bytes) and of every other metadata
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
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .checks import atomic_write, check_bool, unwrap_model

_logger = logging.getLogger(__name__)

__all__ = ["save_checkpoint", "load_checkpoint", "LoadedCheckpoint", "read_metadata", "training_state", "as_state_dict",
           "check_state_dict", "check_training_state"]

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


def as_state_dict(given: Any, where: str = "the state dict") -> Dict[str, Any]:
    """``given`` as a ``dict`` of string keys, or a ``ValueError``: the container check every load starts with.

    Args:
        given: what was passed as a state dict.
        where: how the message names it (e.g. a file's path).

    Returns:
        ``given`` itself when it is a ``dict``, else a ``dict`` of its items.

    Raises:
        ValueError: not a mapping, or a key that is not a string.
    """
    if not isinstance(given, Mapping):
        raise ValueError(f"{where} must be a mapping of names to tensors (model.state_dict()), got "
                         f"{type(given).__name__}; nothing was loaded.")
    bad = [k for k in given if not isinstance(k, str)]
    if bad:
        raise ValueError(f"{where} has {len(bad)} key(s) that are not strings ({bad[:3]!r}); keys are parameter "
                         "names such as 'members.0.conv1.weight'; nothing was loaded.")
    return given if isinstance(given, dict) else dict(given.items())


def _kind(t: torch.Tensor) -> str:
    """A dtype's kind: a value of another kind is refused (copy_ would convert it silently)."""
    return "complex" if t.is_complex() else "floating" if t.is_floating_point() else "integer or bool"


def check_state_dict(own: Mapping[str, torch.Tensor], given: Any, *, strict: bool = True,
                     optional: Callable[[str], bool] = lambda key: False, unexpected_ok: bool = False,
                     assign: bool = False, where: str = "the state dict", target: str = "the model",
                     hint: str = "") -> Tuple[List[str], List[str]]:
    """The one validation of a state dict, run before anything is loaded (model, EMA, ``load_state_dict``).

    Every value the load would copy is checked: its key (missing, unexpected), its type (a ``torch.Tensor``, not a
    numpy array, list or number), its shape (exactly the model's), its dtype's kind (floating, complex, integer or
    bool: ``copy_`` would convert another kind silently; with ``assign`` the dtype itself) and its device (a
    ``meta`` tensor has no values to copy). All problems are named in one ``ValueError``, so a failed load has
    changed nothing.

    Args:
        own: the target's state dict (``model.state_dict()``).
        given: the state dict to load.
        strict: missing and unexpected keys are errors (else they are returned).
        optional: keys that may be missing even when ``strict`` (timm's loader drops a classifier).
        unexpected_ok: keys the target lacks are ignored even when ``strict`` (``load_state_dict(strict=False)``).
        assign: the load assigns the tensors (``load_state_dict(assign=True)``): the dtype must match exactly.
        where: how the message names ``given`` (a file's path, "checkpoint").
        target: how the message names the target.
        hint: the end of the message (what to do).

    Returns:
        ``(missing, unexpected)``: the key mismatches ``strict=False`` allows.

    Raises:
        ValueError: naming every problem by kind, with up to three examples each.
    """
    given = as_state_dict(given, where)
    missing = [k for k in own if k not in given and not optional(k)]
    unexpected = [k for k in given if k not in own] if not unexpected_ok else []
    shapes, types = [], []
    for k, mine in own.items():
        if k not in given:
            continue
        v = given[k]
        if not isinstance(v, torch.Tensor):
            types.append(f"{k}: a {type(v).__module__}.{type(v).__name__}, not a torch.Tensor (torch.as_tensor it)")
        elif tuple(v.shape) != tuple(mine.shape):
            shapes.append(f"{k}: given {tuple(v.shape)} vs model {tuple(mine.shape)}")
        elif _kind(v) != _kind(mine) or (assign and v.dtype != mine.dtype):
            types.append(f"{k}: dtype {v.dtype} where the model has {mine.dtype}")
        elif v.is_meta and not mine.is_meta:
            types.append(f"{k}: a meta tensor (no values)")
    if shapes or types or (strict and (missing or unexpected)):
        wrong = f", {len(types)} values of a wrong type or dtype {types[:3]}" if types else ""
        raise ValueError(f"{where} does not match {target}: {len(missing)} missing keys {missing[:3]}, "
                         f"{len(unexpected)} unexpected keys {unexpected[:3]}, {len(shapes)} shape mismatches "
                         f"{shapes[:3]}{wrong}; nothing was loaded. {hint}".rstrip())
    return missing, unexpected


# the training state's entries that save_checkpoint, load_checkpoint and the trainer read: name -> (types, what)
_STATE_TYPES = {"epoch": ((int,), "an int >= 0"), "step": ((int,), "an int >= 0"),
                "train_seconds": ((int, float), "a number >= 0"),
                "scaler": ((dict,), "a dict (GradScaler.state_dict())"),
                "saver": ((dict,), "a dict (KillSafeSaver.state_dict())")}


def check_training_state(state: Any, where: str = "state") -> Dict[str, Any]:
    """The training state's domain, checked where it enters (``save_checkpoint(state=)``) and before a load
    changes anything (``load_checkpoint``): a dict of string keys, JSON-able (no numpy or tensor values, no
    non-string keys that JSON would turn into strings; tuples come back as lists), ``epoch``/``step`` ints >= 0,
    ``train_seconds`` a number >= 0, ``scaler``/``saver`` dicts.

    Args:
        state: the training state (None: empty).
        where: how the message names it.

    Returns:
        The state as a dict (``{}`` for None).

    Raises:
        ValueError: naming the entry and its allowed values.
    """
    if state is None:
        return {}
    if not isinstance(state, dict):
        raise ValueError(f"{where} must be a dict of JSON values (e.g. {{'epoch': 3, 'step': 700}}), got "
                         f"{type(state).__name__}")
    try:
        json.dumps(state)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where} must hold JSON values only (str, int, float, bool, None, lists or tuples, dicts "
                         f"of str keys): {e}; convert numpy/tensor values with .item() or .tolist()") from None
    key = _non_str_key(state)
    if key is not None:
        raise ValueError(f"{where} has the key {key!r} ({type(key).__name__}), which JSON would turn into "
                         f"{str(key)!r}; use string keys")
    for key, (types, what) in _STATE_TYPES.items():
        if key in state:
            v = state[key]
            if isinstance(v, bool) or not isinstance(v, types) or (isinstance(v, (int, float)) and not v >= 0):
                raise ValueError(f"{where}[{key!r}] must be {what}, got {v!r} ({type(v).__name__})")
    scaler = state.get("scaler") or {}
    bad = [k for k, v in scaler.items() if isinstance(v, bool) or not isinstance(v, (int, float))]
    if bad or (scaler and not (isinstance(scaler.get("scale"), (int, float)) and scaler["scale"] > 0)):
        raise ValueError(f"{where}['scaler'] must be a GradScaler.state_dict() (numbers, 'scale' > 0), got {scaler!r}")
    return state


def _non_str_key(value: Any) -> Any:
    """The first dict key anywhere in ``value`` that is not a string (JSON would write it as one), else None."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                return k
            found = _non_str_key(v)
            if found is not None:
                return found
    elif isinstance(value, (list, tuple)):
        for v in value:
            found = _non_str_key(v)
            if found is not None:
                return found
    return None


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

    ``model`` (and ``model_ema``) wrapped in ``DataParallel``, ``DistributedDataParallel`` or ``torch.compile`` is
    saved as the module inside (its keys and architecture, not the wrapper's); a model with
    ``torch.nn.utils.prune`` reparametrisations is refused (``prune.remove`` first).

    Raises:
        ValueError: not a ``.safetensors`` path, or its folder does not exist; a ``state`` outside its domain
            (:func:`check_training_state`); a pruned model.
        OSError: the write failed (disk full, read-only folder), naming ``path``; a file already at ``path`` is
            left as it was and no temporary file stays behind.
    """
    model = unwrap_model(model, "save_checkpoint")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    if model_ema is not None:
        model_ema = unwrap_model(model_ema, "save_checkpoint(model_ema=)")
    state = check_training_state(state, "save_checkpoint(state=)")
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path must be a str or os.PathLike ending in .safetensors, got {type(path).__name__}")
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
        shared = {v.untyped_storage().data_ptr() for v in tensors.values() if v.device.type != "meta"}
        # the EMA may be the model itself (or share its tensors): safetensors stores no shared memory, so copy
        ema = {k: v.clone() if v.device.type != "meta" and v.untyped_storage().data_ptr() in shared else v
               for k, v in ema.items()}
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
    All or nothing: the file, the model's and the EMA's keys, value types, shapes and dtype kinds
    (:func:`check_state_dict`), the optimizer's type, groups, options and state, and the training state the
    scheduler and scaler resume from (:func:`check_training_state`) are checked before anything is changed; on an
    error ``model``, ``optimizer`` and ``model_ema`` are as they were. A model (or EMA) inside ``DataParallel``,
    ``DistributedDataParallel`` or ``torch.compile`` is loaded as the module inside.

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
    model = unwrap_model(model, "load_checkpoint", refuse_pruned=False)
    if model_ema is not None:
        model_ema = unwrap_model(model_ema, "load_checkpoint(model_ema=)", refuse_pruned=False)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    for name, flag in (("strict", strict), ("use_ema", use_ema), ("verify", verify)):
        check_bool(name, flag)
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not verify and (optimizer is not None or model_ema is not None or use_ema):
        raise ValueError("verify=False reads the weights alone: drop optimizer, model_ema and use_ema.")
    tensors, meta = _read(path, verify)
    _check_identity(model, meta, path)
    state = check_training_state(training_state(meta) if verify else {}, f"{path}: its training state")
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
    opt_state = _checked_optimizer_state(optimizer, tensors, meta, path) if optimizer is not None else None
    # everything is checked: from here on the loads cannot fail on the file's content
    if opt_state is not None:
        _load_optimizer(optimizer, opt_state, path)  # on an error in torch's own checks it is restored
    if model_ema is not None:
        _copy_weights(model_ema, own_ema, ema)
    _copy_weights(model, own, weights)
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
    """The missing and unexpected keys of ``weights`` against ``own`` (``model``'s state dict), through
    :func:`check_state_dict`; where only the classifier's shapes differ, the message names the class counts."""
    if own.keys() == weights.keys() and all(isinstance(v, torch.Tensor) for v in weights.values()):
        if any(tuple(weights[k].shape) != tuple(v.shape) for k, v in own.items()):
            _check_classes(model, own, weights, path)
    return check_state_dict(own, weights, strict=strict, where=path,
                            hint="Was it saved from another architecture, split factor or num_classes?")


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


def _checked_optimizer_state(optimizer: torch.optim.Optimizer, tensors: Dict[str, torch.Tensor],
                             meta: Dict[str, str], path: str) -> Dict[str, Any]:
    """The optimizer's state dict from the file, checked against ``optimizer`` (type, groups, options, per-param
    state); nothing is changed."""
    if "optimizer" not in meta:
        raise ValueError(f"{path} holds no optimizer state; pass a checkpoint written during training.")
    rest = json.loads(meta["optimizer"])
    saved, own = rest.get("type"), type(optimizer).__name__
    if saved and saved != own:
        raise ValueError(f"{path} holds the state of a {saved} optimizer but the optimizer is {own}; {_OPT_FIX}.")
    try:
        sd = _optimizer_state(tensors, rest)
        problem = _optimizer_mismatch(optimizer, sd)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: its optimizer state is damaged ({type(e).__name__}: {e}); pass another "
                         "checkpoint.") from None
    if problem:
        raise ValueError(f"{path}: its optimizer state does not fit this optimizer ({problem}); {_OPT_FIX}.")
    return dict(sd, type=saved)


_OPT_FIX = ("resume with the optimizer of the run that wrote it (the same --opt, model and param groups), or without "
            "its state (--no-resume-opt)")


def _load_optimizer(optimizer: torch.optim.Optimizer, sd: Dict[str, Any], path: str) -> None:
    """Load a state checked by :func:`_checked_optimizer_state`; on an error (torch's own checks) the optimizer is
    restored and a ``ValueError`` raised."""
    saved, own = sd.pop("type", None), type(optimizer).__name__
    before = optimizer.state_dict()
    try:
        optimizer.load_state_dict(sd)
        lacking = sorted({k for g in optimizer.param_groups for k in optimizer.defaults if k not in g})
        if lacking and not saved:  # a timm_split/2 file (no "type") of another optimizer: its options are missing
            raise ValueError(f"its param groups lack {own}'s options {lacking}")
    except Exception as e:
        optimizer.load_state_dict(before)
        raise ValueError(f"{path}: its optimizer state does not fit this {own} ({type(e).__name__}: {e}; another "
                         f"optimizer type's state?); {_OPT_FIX}.") from None


def _optimizer_mismatch(optimizer: torch.optim.Optimizer, sd: Dict[str, Any]) -> Optional[str]:
    """What makes ``sd`` another optimizer's state: group count, params per group, per-param tensor shapes."""
    groups, saved = optimizer.param_groups, sd["param_groups"]
    if not isinstance(saved, list) or len(saved) != len(groups):
        return f"{len(saved) if isinstance(saved, list) else 0} param groups in the file, {len(groups)} here"
    for i, (g, s) in enumerate(zip(groups, saved)):
        if len(s.get("params", [])) != len(g["params"]):
            return f"param group {i} has {len(s.get('params', []))} params in the file, {len(g['params'])} here"
    for i, (g, s) in enumerate(zip(groups, saved)):
        for key in optimizer.defaults:
            if key in s and key in g and not _same_kind(s[key], g[key]):
                return f"param group {i}'s {key!r} is {s[key]!r} in the file, {g[key]!r} here"
    params = {pid: p for s, g in zip(saved, groups) for pid, p in zip(s["params"], g["params"])}
    for pid, entry in sd["state"].items():
        p = params.get(pid)
        if p is None:
            return f"state for param {pid}, which no group has"
        for name, t in entry.items():
            if not isinstance(t, torch.Tensor):
                continue
            if t.dim() > p.dim() or (t.dim() == p.dim() and t.dim() and tuple(t.shape) != tuple(p.shape)):
                return f"{name} of param {pid} is {tuple(t.shape)} in the file, the param is {tuple(p.shape)}"
            if t.dim() and p.is_floating_point() and not t.is_floating_point():
                return f"{name} of param {pid} is {t.dtype} in the file, the param is {p.dtype}"
    return None


def _same_kind(saved: Any, own: Any) -> bool:
    """Whether a param group's option in the file can stand for this optimizer's: numbers for numbers, bools for
    bools, sequences of the same length and kinds (JSON keeps tuples as lists), None for anything and the other
    way round (``foreach``, ``fused``)."""
    if saved is None or own is None:
        return True
    if isinstance(own, bool) or isinstance(saved, bool):
        return isinstance(own, bool) and isinstance(saved, bool)
    if isinstance(own, (int, float)):
        return isinstance(saved, (int, float))
    if isinstance(own, (tuple, list)):
        return isinstance(saved, (tuple, list)) and len(saved) == len(own) and all(map(_same_kind, saved, own))
    return isinstance(saved, type(own)) or isinstance(own, type(saved))
