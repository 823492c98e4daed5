"""Stage 5, ensemble: the S members behind timm's model surface."""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from .plan import SplitPlan

_logger = logging.getLogger(__name__)

__all__ = ["SplitEnsemble"]

Views = Union[torch.Tensor, Sequence[torch.Tensor]]


class SplitEnsemble(nn.Module):
    """S thinner members of one architecture that together cost what the original did.

    ``forward`` averages the members' logits (``averaging='logits'``), or returns the log of their averaged
    probabilities (``averaging='probs'``, so argmax and NLL still work). ``forward_members`` returns every
    member's output, ``[S, B, num_classes]``, for co-training.

    Attributes:
        members: the S models (``nn.ModuleList``).
        split_factor: S.
        split_plan: the :class:`~timm_split.plan.SplitPlan` the members were built from.
        pretrained_cfg: the base model's cfg with ``architecture='splitnet_<arch>'`` and ``split_factor``.
    """

    def __init__(self, members: Sequence[nn.Module], split_plan: Optional[SplitPlan] = None,
                 pretrained_cfg: Optional[Dict[str, Any]] = None, averaging: str = "logits"):
        super().__init__()
        if averaging not in ("logits", "probs"):
            raise ValueError(f"averaging must be 'logits' or 'probs', got {averaging!r}")
        self.members = nn.ModuleList(members)
        self.split_factor = len(self.members)
        self.split_plan = split_plan
        self.averaging = averaging
        self.pretrained_cfg = dict(pretrained_cfg or {})
        first = self.members[0]
        self.num_classes = getattr(first, "num_classes", None)
        # pre-logits of the ensemble are the members' pre-logits side by side
        self.num_features = getattr(first, "num_features", 0) * self.split_factor
        self.head_hidden_size = getattr(first, "head_hidden_size", getattr(first, "num_features", 0)) * self.split_factor

    # ---- timm surface
    @property
    def default_cfg(self) -> Dict[str, Any]:
        """Alias of ``pretrained_cfg`` (older timm name)."""
        return self.pretrained_cfg

    def _views(self, x: Views) -> List[torch.Tensor]:
        S = self.split_factor
        if isinstance(x, (list, tuple)):
            if len(x) != S:
                raise ValueError(f"got {len(x)} views for {S} members; pass one tensor or exactly {S} views")
            return list(x)
        if x.dim() >= 5 and x.shape[0] == S:
            return list(x.unbind(0))
        return [x] * S

    def forward_members(self, x: Views) -> torch.Tensor:
        """Every member's output, stacked: ``[S, B, ...]``.

        Args:
            x: one batch ``[B, C, H, W]`` for all members, or per-member views: ``[S, B, C, H, W]`` or a list of S.
        """
        return torch.stack([m(v) for m, v in zip(self.members, self._views(x))])

    def combine(self, member_outputs: torch.Tensor) -> torch.Tensor:
        """Average ``[S, B, K]`` member logits the way ``averaging`` says."""
        if self.averaging == "probs":
            return torch.logsumexp(member_outputs.float().log_softmax(-1), 0) - torch.log(
                torch.tensor(float(member_outputs.shape[0]), device=member_outputs.device))
        return member_outputs.mean(0)

    def forward(self, x: Views) -> torch.Tensor:
        """The ensemble's prediction ``[B, num_classes]``."""
        return self.combine(self.forward_members(x))

    def forward_features(self, x: Views) -> torch.Tensor:
        """Every member's unpooled features, stacked: ``[S, B, ...]``."""
        return torch.stack([m.forward_features(v) for m, v in zip(self.members, self._views(x))])

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Heads of all members on stacked features.

        Args:
            x: ``[S, B, ...]`` from :meth:`forward_features`.
            pre_logits: return the members' pooled features concatenated, ``[B, num_features]``.
        """
        outs = [m.forward_head(f, pre_logits=pre_logits) for m, f in zip(self.members, x.unbind(0))]
        if pre_logits:
            return torch.cat(outs, dim=-1)
        return self.combine(torch.stack(outs))

    def get_classifier(self) -> nn.ModuleList:
        """The members' classifiers."""
        return nn.ModuleList([m.get_classifier() for m in self.members])

    def reset_classifier(self, num_classes: int, *args, **kwargs) -> None:
        """Reset every member's classifier (timm's ``reset_classifier`` signature)."""
        for m in self.members:
            m.reset_classifier(num_classes, *args, **kwargs)
        self.num_classes = num_classes
        self.pretrained_cfg["num_classes"] = num_classes

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Gradient checkpointing in every member that supports it."""
        for m in self.members:
            if hasattr(m, "set_grad_checkpointing"):
                m.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Names (with the ``members.i.`` prefix) that take no weight decay, from each member."""
        out = set()
        for i, m in enumerate(self.members):
            if hasattr(m, "no_weight_decay"):
                out |= {f"members.{i}.{n}" for n in m.no_weight_decay()}
        return out

    def extra_repr(self) -> str:
        return f"split_factor={self.split_factor}, averaging={self.averaging!r}"
