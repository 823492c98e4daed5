"""Optimizer helpers: weight decay scaled for S thinner members (SplitNet)."""
import logging
import math
import numbers
from typing import Any, Collection, Dict, List, Optional, Set

from torch import nn
from timm.optim import param_groups_weight_decay

__all__ = ["scaled_weight_decay", "param_groups", "model_split_factor"]

_logger = logging.getLogger(__name__)


def scaled_weight_decay(weight_decay: float, split_factor: int) -> float:
    """Weight decay for members that are 1/S as wide: ``wd * exp(1/S - 1)``.

    Thinner networks have fewer parameters to regularise, so SplitNet lowers the decay; ``S=1``
    returns ``weight_decay`` unchanged, ``S=2`` gives ``wd * 0.607``, ``S=4`` gives ``wd * 0.472``.

    Args:
        weight_decay: Weight decay of the unsplit model, ``>= 0``.
        split_factor: Number of members S, ``>= 1``.

    Returns:
        The scaled weight decay.
    """
    if isinstance(split_factor, bool) or int(split_factor) != split_factor or split_factor < 1:
        raise ValueError(f"split_factor must be an integer >= 1 (1: no split); got {split_factor!r}.")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, numbers.Real) \
            or not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a finite number >= 0 (e.g. 5e-4), got {weight_decay!r}.")
    return float(weight_decay) * math.exp(1.0 / int(split_factor) - 1.0)


def _model_no_weight_decay(model: nn.Module) -> Set[str]:
    """Names from every (sub)module's timm-style ``no_weight_decay()``, prefixed to full parameter names.

    timm models return names relative to themselves; walking the submodules makes the convention hold
    for a wrapper whose members are timm models as well as for the model itself.
    """
    names: Set[str] = set()
    for prefix, module in model.named_modules():
        fn = getattr(module, "no_weight_decay", None)
        if not callable(fn):
            continue
        for name in fn():
            names.add(f"{prefix}.{name}" if prefix else name)
    return names


def model_split_factor(model: nn.Module) -> Optional[int]:
    """S of a split model: the ``split_factor`` of ``model`` or of the first submodule that has one.

    Looking through the submodules finds S behind wrappers (``DistributedDataParallel``, ``torch.compile``).

    Args:
        model: a :class:`~timm_split.ensemble.SplitEnsemble`, a wrapper of one, or any module.

    Returns:
        S, or ``None`` for a model with no ``split_factor`` (an unsplit model).
    """
    for module in model.modules():
        value = getattr(module, "split_factor", None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def param_groups(
        model: nn.Module,
        weight_decay: float,
        split_factor: Optional[int] = None,
        no_weight_decay_list: Collection[str] = (),
) -> List[Dict[str, Any]]:
    """Parameter groups with SplitNet's scaled weight decay, for any ``torch.optim`` optimizer.

    Wraps ``timm.optim.param_groups_weight_decay``: biases, 1-d parameters (norms) and the names in
    ``no_weight_decay_list`` or in any (sub)module's ``no_weight_decay()`` get no decay; the rest get
    ``scaled_weight_decay(weight_decay, S)``. Example::

        torch.optim.SGD(param_groups(ens, 5e-4), lr=0.1, momentum=0.9)

    Args:
        model: The (split) model; S is read from its ``split_factor`` (see :func:`model_split_factor`).
        weight_decay: Weight decay of the unsplit model, ``>= 0``.
        split_factor: S, only for a model that does not say (a plain module of members); a value that
            disagrees with the model's ``split_factor`` raises. A model with neither is unsplit: S=1.
        no_weight_decay_list: Extra full parameter names (timm also accepts fnmatch patterns) to exclude.

    Returns:
        A list of ``{'params': [...], 'weight_decay': float}`` dicts.

    Raises:
        ValueError: ``model`` not a module, ``weight_decay`` not a finite number >= 0 (NaN, a bool or a string
            included), ``split_factor`` not None or an int >= 1 or disagreeing with the model's, or
            ``no_weight_decay_list`` not a collection of names.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module (the split model), got {type(model).__name__}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, numbers.Real) \
            or not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a finite number >= 0 (e.g. 5e-4), got {weight_decay!r}")
    if split_factor is not None and (isinstance(split_factor, bool) or not isinstance(split_factor, int)
                                     or split_factor < 1):
        raise ValueError(f"split_factor must be None (read from the model) or an int >= 1, got {split_factor!r}")
    if isinstance(no_weight_decay_list, str):
        raise ValueError("no_weight_decay_list must be a collection of names, not a string; "
                         f"use ({no_weight_decay_list!r},).")
    if not isinstance(no_weight_decay_list, Collection) or \
            not all(isinstance(n, str) for n in no_weight_decay_list):
        raise ValueError(f"no_weight_decay_list must be a collection of parameter names (str), got "
                         f"{no_weight_decay_list!r}")
    own = model_split_factor(model)
    if own is not None and split_factor is not None and split_factor != own:
        raise ValueError(f"split_factor={split_factor!r} disagrees with the model's split_factor={own}; "
                         "drop the argument: param_groups(model, weight_decay) reads S from the model.")
    S = own if own is not None else (1 if split_factor is None else split_factor)
    wd = scaled_weight_decay(weight_decay, S)
    skip = set(no_weight_decay_list) | _model_no_weight_decay(model)
    _logger.debug("weight decay %g scaled to %g for S=%s; %d names without decay", weight_decay, wd, S, len(skip))
    return param_groups_weight_decay(model, weight_decay=wd, no_weight_decay_list=skip)
