"""``'compile'``: ``torch.compile`` of the loop."""
from __future__ import annotations

import logging
from typing import Any, Callable, List, Optional

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

    def __init__(self, **compile_kwargs: Any) -> None:
        self.compile_kwargs = compile_kwargs
        self._fn: Optional[Callable] = None

    def check(self, members: Members) -> None:
        check_same_device(members, self.name)

    def run(self, members: Members, views: List[torch.Tensor]) -> torch.Tensor:
        if self._fn is None:
            _logger.info("compiling the members' loop with torch.compile(%s)", self.compile_kwargs or "")
            self._fn = torch.compile(run_in_turn, **self.compile_kwargs)
        return self._fn(members, views)
