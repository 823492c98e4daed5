"""Member-parallel co-training with ``torch.distributed``: one member per rank, logits all-gathered with autograd.

With world size ``k*S``, rank ``r`` holds member ``r % S`` of replica ``r // S``. The S ranks of a replica see
the same samples (each draws its own augmented view) and all-gather their logits with autograd, so every rank
computes the full co-training loss and the Jensen-Shannon term trains every member. With ``k > 1`` each member is
wrapped in ``DistributedDataParallel`` over its k replicas (data parallelism within each member's group)::

    dist.init_process_group("gloo" or "nccl")
    ens = timm_split.split(model, S, seed=0)                  # the same on every rank
    mp = MemberParallel(ens, device=device)
    del ens                                                   # this rank only needs its member
    sampler = DistributedSampler(dataset, **mp.sampler_kwargs)  # one data shard per replica
    opt = torch.optim.SGD(mp.parameters(), lr=0.1)
    for x, y in loader:                                       # x: this rank's view [B, C, H, W] (or all S)
        loss = loss_fn(mp(x), y, epoch=epoch)["loss"]         # mp(x): [S, B, K], like ens.forward_members
        opt.zero_grad(); loss.backward(); opt.step()

Every rank of a replica computes the same loss; the all-gather's backward gives each member the mean over the
replica's ranks of its logit gradient (one copy of it), so gradients equal single-process co-training's (on the
same data, up to float tolerance). Targets must be the same on the S ranks of a replica.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Any, Dict, List, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from ..ensemble import SplitEnsemble, Views

_logger = logging.getLogger(__name__)

__all__ = ["MemberParallel", "ensemble_signature"]


class _AllGather(torch.autograd.Function):
    """``[B, ...] -> [n, B, ...]`` across ``group``; backward: the mean over ranks of their gradients (own slice).

    The mean makes every rank that computes the same loss contribute once. (``torch.distributed.nn.functional.
    all_gather`` would sum instead; it is also deprecated, and its gloo backward fails in sub-groups.)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, x, group=group)
        return torch.stack(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)  # [n, B, ...]: tiny (logits), so no reduce-scatter needed
        n = dist.get_world_size(ctx.group)
        return grad[dist.get_rank(ctx.group)] / n, None


def ensemble_signature(ensemble: SplitEnsemble) -> str:
    """A digest of what every rank must agree on: S, the averaging and every tensor's name, shape and dtype.

    Args:
        ensemble: the ensemble a rank was given.

    Returns:
        A hex sha256 digest (the same on every process for the same plan, unlike Python's ``hash``).
    """
    spec = [ensemble.split_factor, ensemble.averaging]
    spec += [(k, tuple(v.shape), str(v.dtype)) for k, v in ensemble.state_dict().items()]
    return hashlib.sha256(repr(spec).encode()).hexdigest()


def _check_same_ensemble(ensemble: Any, group: Optional[dist.ProcessGroup]) -> None:
    """Raise on every rank, not hang on some, when the ranks were given different splits (S or plan) or one
    rank was given no ensemble: each rank takes part in one all-gather before it checks anything itself."""
    if isinstance(ensemble, SplitEnsemble):
        own = (ensemble.split_factor, ensemble_signature(ensemble)[:12])
    else:
        own = (None, f"a {type(ensemble).__name__}")
    every: List[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, own, group=group)
    if own[0] is None:
        raise ValueError(f"ensemble must be a SplitEnsemble (from timm_split.split), got {own[1]}")
    if any(s != own for s in every):
        ranks = ", ".join(f"rank {r}: " + (f"S={s[0]} plan {s[1]}" if s[0] else s[1]) for r, s in enumerate(every))
        raise ValueError(f"the ranks were given different ensembles ({ranks}); build the same split on every rank: "
                         "the same model, split_factor, img_size and timm_split version")


class MemberParallel(nn.Module):
    """This rank's member of a :class:`~timm_split.ensemble.SplitEnsemble`, co-trained across ranks.

    Must be built on every rank of ``group`` in the same order (it creates sub-groups when ``k > 1``). The ranks
    first all-gather their S and a digest of their ensemble (:func:`ensemble_signature`), so ranks given
    different splits all raise a ValueError instead of hanging in the first collective.

    Args:
        ensemble: the full ensemble, built identically on every rank (``split(model, S, seed=...)``).
        device: where this rank's member goes; default: where it is.
        group: the process group of the ``k*S`` ranks; default the world.
        **ddp_kwargs: passed to ``DistributedDataParallel`` when ``k > 1`` (e.g. ``broadcast_buffers``).

    Attributes:
        member: this rank's member (DDP-wrapped when ``k > 1``).
        member_index: which member this rank trains, ``rank % S``.
        replica_index: which data shard this rank's replica reads, ``rank // S``.
        num_replicas: k.
    """

    def __init__(self, ensemble: SplitEnsemble, device: Optional[Union[str, torch.device]] = None,
                 group: Optional[dist.ProcessGroup] = None, **ddp_kwargs: Any):
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("MemberParallel needs torch.distributed initialised: call "
                             "dist.init_process_group('gloo' or 'nccl') first")
        _check_same_ensemble(ensemble, group)
        S = ensemble.split_factor
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if world % S:
            raise ValueError(f"world size {world} is not a multiple of the split factor {S}; launch k*{S} processes "
                             f"(one per member, times k data-parallel replicas)")
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(world))
        # what SplitEnsemble.combine reads, so combine() gives the ensemble's prediction
        self.split_factor, self.averaging, self.num_classes = S, ensemble.averaging, ensemble.num_classes
        self.member_index, self.replica_index, self.num_replicas = rank % S, rank // S, world // S
        self.gather_group, member_group = group, None
        if self.num_replicas > 1:
            for d in range(self.num_replicas):  # every rank creates every group, in the same order
                g = dist.new_group([ranks[d * S + m] for m in range(S)])
                if d == self.replica_index:
                    self.gather_group = g
            for m in range(S):
                g = dist.new_group([ranks[d * S + m] for d in range(self.num_replicas)])
                if m == self.member_index:
                    member_group = g
        member = ensemble.members[self.member_index]
        if device is not None:
            member.to(device)
        self.device = next(member.parameters()).device
        if member_group is not None:
            from torch.nn.parallel import DistributedDataParallel
            ids = [self.device] if self.device.type == "cuda" else None
            member = DistributedDataParallel(member, device_ids=ids, process_group=member_group, **ddp_kwargs)
        self.member = member
        _logger.info("rank %d: member %d of %d, replica %d of %d", rank, self.member_index, S, self.replica_index,
                     self.num_replicas)

    @property
    def sampler_kwargs(self) -> Dict[str, int]:
        """``num_replicas`` and ``rank`` for a ``DistributedSampler``: the S ranks of a replica share a shard."""
        return {"num_replicas": self.num_replicas, "rank": self.replica_index}

    def own_view(self, x: Views) -> torch.Tensor:
        """This rank's input: ``x`` itself if it is one batch, else view ``member_index`` of S."""
        S = self.split_factor
        if isinstance(x, (list, tuple)):
            if len(x) != S:
                raise ValueError(f"got {len(x)} views for {S} members; pass this rank's view or exactly {S}")
            return x[self.member_index]
        if x.dim() >= 5 and x.shape[0] == S:
            return x[self.member_index]
        return x

    def gather(self, logits: torch.Tensor) -> torch.Tensor:
        """All-gather this rank's ``[B, ...]`` output into ``[S, B, ...]`` with autograd (see the module doc)."""
        if self.split_factor == 1:
            return logits.unsqueeze(0)
        group = self.gather_group if self.gather_group is not None else dist.group.WORLD
        return _AllGather.apply(logits, group)

    def forward(self, x: Views) -> torch.Tensor:
        """Every member's output ``[S, B, ...]`` (like ``SplitEnsemble.forward_members``), this rank's with grad.

        Args:
            x: this rank's view ``[B, C, H, W]``, or all views ``[S, B, C, H, W]`` / a list of S.
        """
        return self.gather(self.member(self.own_view(x).to(self.device, non_blocking=True)))

    def combine(self, member_outputs: torch.Tensor) -> torch.Tensor:
        """The ensemble prediction from gathered ``[S, B, K]`` outputs (``SplitEnsemble.combine``)."""
        return SplitEnsemble.combine(self, member_outputs)  # reads split_factor, averaging and num_classes

    def ensemble_state_dict(self) -> Dict[str, torch.Tensor]:
        """The whole ensemble's state dict (``members.i.`` keys, on CPU), gathered from this replica's ranks.

        A collective: every rank of the replica must call it. Load it into ``split(model, S)`` with
        ``load_state_dict``.
        """
        own = getattr(self.member, "module", self.member).state_dict()
        own = {k: v.detach().cpu() for k, v in own.items()}
        parts: List[Optional[Dict[str, torch.Tensor]]] = [None] * self.split_factor
        group = self.gather_group if self.gather_group is not None else dist.group.WORLD
        dist.all_gather_object(parts, own, group=group)
        return {f"members.{i}.{k}": v for i, part in enumerate(parts) for k, v in part.items()}

    def extra_repr(self) -> str:
        return (f"member_index={self.member_index}, split_factor={self.split_factor}, "
                f"replica_index={self.replica_index}, num_replicas={self.num_replicas}")
