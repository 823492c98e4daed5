"""``'loop'``: the members one after another, the reference every strategy is tested against."""
from __future__ import annotations

from typing import List

import torch

from .base import Execution, Members, module_device

__all__ = ["LoopExecution", "run_in_turn"]


class LoopExecution(Execution):
    """Members one after another; each view goes to its member's device, outputs to the first member's."""

    name = "loop"

    def run(self, members: Members, views: List[torch.Tensor]) -> torch.Tensor:
        dev0 = module_device(members[0])
        outs = []
        for m, v in zip(members, views):
            dev = module_device(m)
            outs.append(m(v.to(dev, non_blocking=True)).to(dev0))
        return torch.stack(outs)


def run_in_turn(members: Members, views: List[torch.Tensor]) -> torch.Tensor:
    return torch.stack([m(v) for m, v in zip(members, views)])
