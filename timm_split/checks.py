"""Argument checks for :func:`timm_split.split` and :func:`timm_split.plan_split`, run before any tracing.

Every check is cheap (no forward pass): a bad argument fails at once with a ``ValueError`` that names the fix,
and a model the engine cannot split for a known reason (scripted, nothing to resize, parametrized weights,
quantization-aware training modules) fails with a :class:`~timm_split.errors.SplitError` that names the modules.
"""
from __future__ import annotations

import logging
import math
import numbers
import os
import tempfile
from typing import Any, Callable, Iterator, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import SplitError

_logger = logging.getLogger(__name__)

__all__ = ["check_split_args", "check_split_factor", "check_writable", "atomic_write", "MAX_SPLIT_FACTOR",
           "unwrap_model", "pruned_modules", "timm_num_classes", "check_choice", "check_bool"]

# Each member is 1/sqrt(S) as wide: at S=256 a 64-channel stage keeps 4 channels. SplitNet uses S of 2 to 16;
# the work of a split grows faster than linearly in S (resnet18 at S=256: about 25 s), so a larger S is an error
# rather than minutes of work. The plan still checks every channel group against S after tracing.
MAX_SPLIT_FACTOR = 256


def _is_int(value: Any) -> bool:
    """A Python int (not a bool; numpy ints are refused, as ``split_factor`` always refused them)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_split_factor(split_factor: Any) -> int:
    """``split_factor`` as an int in ``[1, MAX_SPLIT_FACTOR]``.

    Args:
        split_factor: S, the number of members.

    Returns:
        S as an ``int``.

    Raises:
        ValueError: not an int, below 1 or above :data:`MAX_SPLIT_FACTOR`.
    """
    if not _is_int(split_factor) or split_factor < 1:
        raise ValueError(f"split_factor must be an int >= 1, got {_shown(split_factor)} (e.g. split(model, 2))")
    if split_factor > MAX_SPLIT_FACTOR:
        raise ValueError(f"split_factor must be <= {MAX_SPLIT_FACTOR}, got {split_factor}: each member is "
                         f"1/sqrt(S) as wide, so a 64-channel layer keeps 4 channels at S={MAX_SPLIT_FACTOR}; "
                         "SplitNet uses S of 2 to 16")
    return int(split_factor)


def check_choice(name: str, value: Any, choices: Tuple[str, ...], hint: str = "") -> str:
    """``value`` if it is one of ``choices`` (strings), else a ``ValueError`` naming them.

    Args:
        name: the argument's name.
        value: what was passed.
        choices: the allowed strings.
        hint: appended to the message.

    Returns:
        ``value``.

    Raises:
        ValueError: ``value`` is not one of ``choices``.
    """
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {_shown(value)}{hint}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool (``True``/``False``; ``0``/``1``, strings and numpy bools are refused).

    Raises:
        ValueError: not a bool.
    """
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {_shown(value)}")
    return value


# wrappers whose forward is the wrapped module's: split, save and param_groups see through them
def _wrapped(model: nn.Module) -> Optional[nn.Module]:
    """The module inside a ``DataParallel``/``DistributedDataParallel``/``torch.compile`` wrapper, else None."""
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return model.module
    inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
    if isinstance(inner, nn.Module) and type(model).__name__ == "OptimizedModule":
        return inner
    return None


def pruned_modules(model: nn.Module) -> List[str]:
    """``torch.nn.utils.prune`` reparametrisations in ``model``: ``'<module path>.<tensor>'`` for each (the
    module holds ``<tensor>_orig`` and ``<tensor>_mask`` and recomputes ``<tensor>`` in a pre-hook)."""
    from torch.nn.utils.prune import BasePruningMethod

    found = []
    for name, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, BasePruningMethod):
                found.append(f"{name or '(the model)'}.{hook._tensor_name}")
    return found


def unwrap_model(model: Any, where: str, refuse_pruned: bool = True) -> nn.Module:
    """The one normalisation of a model at the door (``split``, ``save_checkpoint``): the module inside
    ``nn.DataParallel``, ``DistributedDataParallel`` and ``torch.compile`` wrappers (nested ones too), whose
    state dict and architecture are the model's; pruning reparametrisations refused.

    Args:
        model: what was passed as the model.
        where: the entry point, for the message.
        refuse_pruned: refuse pruning reparametrisations here (``split`` refuses them with its other
            reparametrisations, as a ``SplitError``).

    Returns:
        The unwrapped module (``model`` itself when it is not wrapped).

    Raises:
        ValueError: not an ``nn.Module``, or ``torch.nn.utils.prune`` reparametrisations (naming them and the fix).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"{where}: the model must be an nn.Module, got {_shown(model)}")
    inner = _wrapped(model)
    while inner is not None:
        _logger.info("%s: using the module inside %s", where, type(model).__name__)
        model, inner = inner, _wrapped(inner)
    pruned = pruned_modules(model) if refuse_pruned else []
    if pruned:
        raise ValueError(f"{where}: {len(pruned)} tensor(s) are torch.nn.utils.prune reparametrisations "
                         f"({', '.join(pruned[:4])}{', ...' if len(pruned) > 4 else ''}): make the pruning permanent "
                         "first, torch.nn.utils.prune.remove(module, name) for each (on a copy to keep the original)")
    return model


def timm_num_classes(model: nn.Module) -> Optional[int]:
    """A model's ``num_classes`` as timm reads it: any int <= 0 (``-1`` included) means no classifier, returned
    as 0; None where the model has no int ``num_classes`` (a model outside timm's surface)."""
    n = getattr(model, "num_classes", None)
    if isinstance(n, bool) or not isinstance(n, int):
        return None
    return max(n, 0)


def _check_model(model: Any) -> None:
    if isinstance(model, nn.Module):
        return
    if isinstance(model, str):
        hint = f"split(timm.create_model({model!r}), S), or timm.create_model('splitnet_{model}', split_factor=S)"
    elif callable(model):
        hint = f"call it first: split({getattr(model, '__name__', 'fn')}(), S)"
    else:
        hint = "split(timm.create_model('resnet18'), 2)"
    raise ValueError(f"model must be an nn.Module (a model instance), got {_shown(model)}; {hint}")


def _check_img_size(img_size: Any) -> None:
    if img_size is None or (_is_int(img_size) and img_size >= 1):
        return
    if isinstance(img_size, (tuple, list)) and len(img_size) == 2 and all(_is_int(v) and v >= 1 for v in img_size):
        return
    hint = f"; pass {int(img_size)}" if isinstance(img_size, str) and img_size.strip().isdigit() else ""
    raise ValueError(f"img_size must be a positive int or (height, width) of positive ints, e.g. img_size=224 or "
                     f"(224, 224); got {_shown(img_size)}{hint}")


def _check_scalars(seed: Any, in_chans: Any, params_tol: Any, macs_tol: Any) -> None:
    if not _is_int(seed) or not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {_shown(seed)} (e.g. seed=0)")
    if in_chans is not None and (not _is_int(in_chans) or in_chans < 1):
        raise ValueError(f"in_chans must be None or an int >= 1 (e.g. 3 for RGB), got {_shown(in_chans)}")
    for name, tol in (("params_tol", params_tol), ("macs_tol", macs_tol)):
        if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not math.isfinite(tol) or tol <= 0:
            raise ValueError(f"{name} must be a finite number > 0 (a relative deviation: 0.02 is 2%), got "
                             f"{_shown(tol)}")


def _named_modules(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        yield name or "(the model)", module


def _unsupported(model: nn.Module) -> List[Tuple[str, str, str]]:
    """(kind, module path, what) for each module whose weights the engine cannot resize; kind keys _REMEDIES."""
    from torch.ao.quantization import FakeQuantizeBase, ObserverBase
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    found = []
    for name, module in _named_modules(model):
        if parametrize.is_parametrized(module):
            for tensor, plist in module.parametrizations.items():
                found.append(("parametrization", name, f"{'+'.join(type(p).__name__ for p in plist)} on {tensor}"))
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, (WeightNorm, SpectralNorm)):
                found.append(("hook", name, f"{type(hook).__name__} on {hook.name}"))
            elif isinstance(hook, BasePruningMethod):
                found.append(("prune", name, f"{type(hook).__name__} on {hook._tensor_name}"))
        inside = any(name.startswith(f"{outer}.") for kind, outer, _ in found if kind == "quant")
        if isinstance(module, (FakeQuantizeBase, ObserverBase)) and not inside:
            found.append(("quant", name, type(module).__name__))
    return found


_REMEDIES = {
    "parametrization": "split the model without them (torch.nn.utils.parametrize.remove_parametrizations on a "
                       "copy, or before applying weight_norm/spectral_norm) and apply them to each member after",
    "hook": "split the model before torch.nn.utils.weight_norm/spectral_norm (or remove_weight_norm/"
            "remove_spectral_norm on a copy) and apply them to each member after",
    "prune": "make the pruning permanent first (torch.nn.utils.prune.remove(module, name) on a copy), split, and "
             "prune each member after",
    "quant": "split the float model, then prepare each member for quantization-aware training",
}


def _check_splittable(model: nn.Module) -> None:
    scripted = next((n for n, m in _named_modules(model) if isinstance(m, torch.jit.ScriptModule)), None)
    if scripted is not None:
        raise SplitError(f"TorchScript (torch.jit.script/trace) is not supported, and {scripted} is scripted: split "
                         "the eager model, then script the members or the ensemble")
    if next(model.parameters(), None) is None:
        raise SplitError(f"{type(model).__name__} has no parameters: there is nothing to split")
    found = _unsupported(model)
    if found:
        kinds = sorted({k for k, _, _ in found})
        listed = "; ".join(f"{name}: {what}" for _, name, what in found[:4]) + ("; ..." if len(found) > 4 else "")
        raise SplitError(f"split cannot resize {len(found)} module(s) with weight reparametrizations or "
                         f"quantization observers ({listed}): " + "; ".join(_REMEDIES[k] for k in kinds))


def check_split_args(model: Any, split_factor: Any, *, img_size: Any = None, in_chans: Any = None, seed: Any = 0,
                     params_tol: Any = 0.02, macs_tol: Any = 0.04, scale_regularization: Any = True,
                     drop_scale: Any = "S", plan_at: Any = "cfg", averaging: Any = "logits", init: Any = "random",
                     refine: Any = True) -> int:
    """Check the arguments of ``split``/``plan_split`` before any tracing.

    Args:
        model: the model to split: an ``nn.Module`` instance.
        split_factor: S, an int in ``[1, MAX_SPLIT_FACTOR]``.
        img_size: None, a positive int or ``(height, width)``.
        in_chans: None or an int >= 1.
        seed: an int in ``[0, 2**63)``.
        params_tol: a finite relative tolerance > 0.
        macs_tol: a finite relative tolerance > 0.
        scale_regularization: a bool.
        drop_scale: ``'S'`` or ``'sqrt'``.
        plan_at: ``'cfg'`` or ``'model'``.
        averaging: ``'logits'`` or ``'probs'``.
        init: ``'random'`` or ``'inherit'``.
        refine: a bool.

    Returns:
        S as an ``int``.

    Raises:
        ValueError: a bad argument (the message names the fix).
        SplitError: a model the engine cannot split: scripted, without parameters, with parametrized weights
            (weight_norm, spectral_norm), or with quantization-aware training modules.
    """
    _check_model(model)
    S = check_split_factor(split_factor)
    _check_img_size(img_size)
    _check_scalars(seed, in_chans, params_tol, macs_tol)
    check_bool("scale_regularization", scale_regularization)
    check_bool("refine", refine)
    check_choice("drop_scale", drop_scale, ("S", "sqrt"), " (p/S, SplitNet's rule, or p/sqrt(S))")
    check_choice("plan_at", plan_at, ("cfg", "model"), " ('cfg': the backbone planned at the architecture's "
                 "head and input, as timm checkpoints expect; 'model': parity at this model's own head)")
    check_choice("averaging", averaging, ("logits", "probs"))
    check_choice("init", init, ("random", "inherit"), " ('inherit': members start from the model's weights)")
    _check_splittable(model)
    return S


def check_writable(path: str, what: str = "output") -> None:
    """Fail now, not after the work, when ``path`` cannot be written: its folder is missing, read-only or a
    file, or ``path`` is a folder. Tries a temporary file next to it (removed again); ``path`` is not touched.

    Args:
        path: the file to be written.
        what: how the message names it, e.g. ``'--plot'``.

    Raises:
        ValueError: ``path`` cannot be written (the message says why and what to pass instead).
    """
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is a folder; pass a file name in it, e.g. {os.path.join(path, 'out')!r}")
    if not os.path.isdir(folder):
        raise ValueError(f"{what} {path!r}: the folder {folder!r} does not exist (or is a file); create it first "
                         "or pass another path")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as e:
        raise ValueError(f"{what} {path!r} cannot be written ({e.strerror or e}); pass a path in a writable "
                         "folder") from None


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Write ``path`` whole or not at all: ``write(tmp)`` fills a temporary file next to it, then
    ``os.replace`` puts it in place. The file gets the usual mode (umask), and the temporary file is removed
    if ``write`` raises.

    Args:
        path: the file to write.
        write: writes the content to the path it is given.

    Raises:
        OSError: a full disk, a read-only filesystem...: with ``path`` as its file name, not the temporary file's.
    """
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), path) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
