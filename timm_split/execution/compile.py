"""``'compile'``: ``torch.compile`` of the loop."""
from __future__ import annotations

import inspect
import logging
from typing import Any, Callable, Dict, List, Optional

import torch

from .base import Execution, Members, check_same_device
from .loop import run_in_turn

_logger = logging.getLogger(__name__)

__all__ = ["CompileExecution"]


class CompileExecution(Execution):
    """``torch.compile`` of the loop, compiled on the first call (about a minute for a resnet50 on 2 cores).

    Args:
        **compile_kwargs: passed to ``torch.compile`` (``mode``, ``backend``, ``dynamic``, ``fullgraph``...).
    """

    name = "compile"
    _transient = ("_fn",)

    MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

    def __init__(self, **compile_kwargs: Any) -> None:
        _check_compile_kwargs(compile_kwargs)
        self.compile_kwargs = compile_kwargs
        self._fn: Optional[Callable] = None

    def check(self, members: Members) -> None:
        check_same_device(members, self.name)

    def run(self, members: Members, views: List[torch.Tensor]) -> torch.Tensor:
        with self.lock:
            if self._fn is None:
                _logger.info("compiling the members' loop with torch.compile(%s)", self.compile_kwargs or "")
                self._fn = torch.compile(run_in_turn, **self.compile_kwargs)
            fn = self._fn
        return fn(members, views)


def _check_compile_kwargs(kw: Dict[str, Any]) -> None:
    """``torch.compile``'s options, checked when the strategy is set rather than at the first call."""
    known = set(inspect.signature(torch.compile).parameters) - {"model"}
    unknown = sorted(set(kw) - known)
    if unknown:
        raise ValueError(f"unknown torch.compile option(s) {unknown}; known: {sorted(known)}")
    for name in ("fullgraph", "disable"):
        if name in kw and not isinstance(kw[name], bool):
            raise ValueError(f"compile option {name} must be True or False, got {kw[name]!r}")
    if "dynamic" in kw and kw["dynamic"] is not None and not isinstance(kw["dynamic"], bool):
        raise ValueError(f"compile option dynamic must be True, False or None, got {kw['dynamic']!r}")
    if kw.get("mode") not in CompileExecution.MODES:
        raise ValueError(f"compile option mode must be one of {CompileExecution.MODES}, got {kw['mode']!r}")
    if "options" in kw and kw["options"] is not None and not isinstance(kw["options"], dict):
        raise ValueError(f"compile option options must be a dict of inductor settings, got {kw['options']!r}")
    if kw.get("mode") is not None and kw.get("options") is not None:
        raise ValueError("give torch.compile either mode or options, not both")
    backend = kw.get("backend", "inductor")
    if isinstance(backend, str):
        from torch._dynamo import list_backends

        names = list_backends(exclude_tags=())
        if backend not in names:
            raise ValueError(f"compile option backend {backend!r} is not a torch.compile backend; one of {names}")
    elif not callable(backend):
        raise ValueError(f"compile option backend must be a backend name or a callable, got {backend!r}")
