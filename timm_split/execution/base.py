"""The execution ABC and the helpers the strategies share."""
from __future__ import annotations

import abc
import threading
from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import nn

from ..trace import module_device

__all__ = ["Execution", "Members", "module_device", "sync", "tensors_of", "is_training", "needs_graph",
           "check_same_device", "check_same_structure"]

Members = Sequence[nn.Module]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tensors_of(module: nn.Module) -> Dict[str, torch.Tensor]:
    out = dict(module.named_parameters())
    out.update(module.named_buffers())
    return out


def is_training(module: nn.Module) -> bool:
    return any(m.training for m in module.modules())


def needs_graph(members: Members) -> bool:
    return torch.is_grad_enabled() and any(p.requires_grad for m in members for p in m.parameters())


def check_same_device(members: Members, name: str) -> torch.device:
    devices = {module_device(m) for m in members}
    if len(devices) > 1:
        raise ValueError(f"execution '{name}' needs every member on one device, got {sorted(map(str, devices))}; "
                         "use 'threads' or 'loop' after to_devices()")
    return devices.pop()


def check_same_structure(members: Members, name: str) -> None:
    ref = {k: (tuple(v.shape), v.dtype) for k, v in tensors_of(members[0]).items()}
    for i, m in enumerate(members[1:], 1):
        if {k: (tuple(v.shape), v.dtype) for k, v in tensors_of(m).items()} != ref:
            raise ValueError(f"execution '{name}' needs members of one architecture; member {i} differs from "
                             "member 0 in its parameter names, shapes or dtypes")


_LOCKS = threading.Lock()  # guards the creation of each execution's own lock


class Execution(abc.ABC):
    """A way to run the members: ``run(members, views) -> [S, B, ...]`` on the first member's device.

    Subclasses hold only caches besides their options; ``reset()`` drops the caches (called when the ensemble
    moves or changes device), and pickling/deep-copying drops them too. Several Python threads may call ``run``
    on one execution at once: whatever a call keeps across calls (programs, packed weights, pools, decisions) is
    created and used under :attr:`lock`, the rest is the call's own.
    """

    name = "base"
    _transient: Tuple[str, ...] = ()

    @property
    def lock(self) -> threading.RLock:
        """This execution's lock (re-entrant), for the state its calls share."""
        lock = self.__dict__.get("_lock")
        if lock is None:
            with _LOCKS:
                lock = self.__dict__.setdefault("_lock", threading.RLock())
        return lock

    def check(self, members: Members) -> None:
        """Raise ``ValueError`` (with a hint) if this strategy cannot run ``members``."""

    @abc.abstractmethod
    def run(self, members: Members, views: List[torch.Tensor]) -> torch.Tensor:
        """Run every member on its view; returns their outputs stacked ``[S, B, ...]``."""

    def reset(self) -> None:
        """Drop caches (stacked/packed tensors, thread pools, compiled code)."""
        for k in self._transient:
            setattr(self, k, None)

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state.update({k: None for k in self._transient})
        state.pop("_lock", None)  # a copy gets its own
        return state

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items() if not k.startswith("_"))
        return f"{type(self).__name__}({opts})"
