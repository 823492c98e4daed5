"""Stage 5, ensemble: the S members behind timm's model surface."""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from .execution import Execution, LoopExecution, make_execution
from .engine.plan import SplitPlan

_logger = logging.getLogger(__name__)

__all__ = ["SplitEnsemble"]

Views = Union[torch.Tensor, Sequence[torch.Tensor]]
Device = Union[str, int, torch.device]


class SplitEnsemble(nn.Module):
    """S thinner members of one architecture that together cost what the original did.

    ``forward`` averages the members' logits (``averaging='logits'``), or returns the log of their averaged
    probabilities (``averaging='probs'``, so argmax and NLL still work). A headless model (``num_classes=0``)
    returns features, so its ensemble returns the members' features side by side, as ``forward_head(x,
    pre_logits=True)`` does. ``forward_members`` returns every
    member's output, ``[S, B, num_classes]``, for co-training. How the members run (one after another,
    concurrently, vmapped, compiled or packed into one grouped network) is chosen with :meth:`set_execution`;
    :meth:`to_devices` spreads them over several devices.

    Attributes:
        members: the S models (``nn.ModuleList``).
        split_factor: S.
        split_plan: the :class:`~timm_split.plan.SplitPlan` the members were built from.
        pretrained_cfg: the base model's cfg with ``architecture='splitnet_<arch>'`` and ``split_factor``.
    """

    _execution: Execution = LoopExecution()  # stateless default, also for ensembles pickled before executions

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
        hidden = getattr(first, "head_hidden_size", getattr(first, "num_features", 0))
        self.head_hidden_size = hidden * self.split_factor
        self._execution: Execution = LoopExecution()

    # ---- timm surface
    @property
    def default_cfg(self) -> Dict[str, Any]:
        """Alias of ``pretrained_cfg`` (older timm name)."""
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, cfg: Dict[str, Any]) -> None:
        self.pretrained_cfg = cfg

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` that names a split-factor or architecture mismatch plainly."""
        ids = {int(k.split(".")[1]) for k in state_dict if k.startswith("members.") and k.split(".")[1].isdigit()}
        arch = self.pretrained_cfg.get("architecture", type(self.members[0]).__name__)
        if ids and len(ids) != self.split_factor:
            raise ValueError(f"checkpoint has {len(ids)} members but this {arch} has split_factor="
                             f"{self.split_factor}; create the model with split_factor={len(ids)}")
        if strict:
            own = self.state_dict()
            missing = [k for k in own if k not in state_dict]
            unexpected = [k for k in state_dict if k not in own]
            shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
                      for k, v in own.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
            if missing or unexpected or shapes:
                raise ValueError(
                    f"checkpoint does not match {arch} (split_factor={self.split_factor}): "
                    f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}, "
                    f"{len(shapes)} shape mismatches {shapes[:3]}. Was it saved from another architecture, "
                    "split factor or num_classes?")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

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
        return self._execution.run(self.members, self._views(x))

    # ---- execution
    @property
    def execution(self) -> str:
        """The name of the execution strategy (see :meth:`set_execution`)."""
        return self._execution.name

    def set_execution(self, strategy: str = "auto", **options: Any) -> "SplitEnsemble":
        """Choose how ``forward_members`` (and so ``forward``) runs the members.

        Args:
            strategy: one of ``'auto'``, ``'loop'``, ``'threads'``, ``'vmap'``, ``'compile'``, ``'packed'``
                (see :mod:`timm_split.execution`). All give the loop's outputs and gradients.
            **options: the strategy's options, e.g. ``set_execution('threads', cores=[[0], [1]])``,
                ``set_execution('compile', mode='max-autotune')``, ``set_execution('auto', repeats=5)``.

        Returns:
            ``self``.

        Raises:
            ValueError: unknown strategy or option, or a strategy that cannot run these members (``'packed'``
                names the first module it cannot pack; ``'vmap'``/``'packed'`` need every member on one device).
        """
        ex = make_execution(strategy, **options)
        ex.check(self.members)
        self._execution.reset()
        self._execution = ex
        _logger.debug("execution: %r", ex)
        return self

    def to_devices(self, devices: Sequence[Device], execution: str = "threads", **options: Any) -> "SplitEnsemble":
        """Place member ``i`` on ``devices[i % len(devices)]`` and run them concurrently.

        Views go to each member's device and outputs are gathered on ``devices[0]`` (autograd follows the
        copies). With the default ``'threads'`` execution each member runs on its own thread (and CUDA stream).

        Args:
            devices: e.g. ``['cuda:0', 'cuda:1']``; ``['cpu', 'cpu']`` works (concurrent threads on one CPU).
            execution: the strategy to run with afterwards (``'threads'`` or ``'loop'`` when devices differ).
            **options: options of that strategy.

        Returns:
            ``self``.
        """
        if isinstance(devices, (str, int, torch.device)) or not devices:
            raise ValueError(f"devices must be a non-empty list, e.g. ['cuda:0', 'cuda:1'], got {devices!r}")
        devs = [torch.device(d) for d in devices]
        for i, m in enumerate(self.members):
            m.to(devs[i % len(devs)])
        return self.set_execution(execution, **options)

    def _apply(self, fn, recurse: bool = True):
        # tensors move or change dtype: cached stacked/packed tensors and compiled code are stale
        self._execution.reset()
        return super()._apply(fn, recurse)

    def combine(self, member_outputs: torch.Tensor) -> torch.Tensor:
        """Average ``[S, B, K]`` member logits the way ``averaging`` says; a headless ensemble
        (``num_classes == 0``) concatenates its members' pooled features instead, ``[B, num_features]``."""
        if self.num_classes == 0 and member_outputs.dim() == 3:
            return torch.cat(list(member_outputs.unbind(0)), dim=-1)
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
        return f"split_factor={self.split_factor}, averaging={self.averaging!r}, execution={self.execution!r}"
