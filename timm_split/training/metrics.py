"""Classification metrics of an ensemble and its members: top-1/top-5, NLL and ECE (``evaluate``)."""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["expected_calibration_error", "classification_metrics", "evaluate"]


def expected_calibration_error(probs: torch.Tensor, target: torch.Tensor, n_bins: int = 15) -> float:
    """Expected calibration error of the top-1 prediction, with ``n_bins`` equal-width confidence bins.

    ``ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)|``; bin ``b`` holds confidences in ``(b/n, (b+1)/n]``
    (a confidence of exactly 0 goes to the first bin).

    Args:
        probs: Probabilities ``[N, K]``.
        target: Class indices ``[N]``.
        n_bins: Number of bins (15 as in Guo et al., 2017).

    Returns:
        The ECE as a fraction in ``[0, 1]``.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1; got {n_bins}.")
    conf, pred = probs.float().max(-1)
    correct = (pred == target).float()
    bins = (torch.ceil(conf * n_bins).long() - 1).clamp(0, n_bins - 1)
    gap = torch.zeros(n_bins, device=conf.device).index_add_(0, bins, conf - correct)
    return float(gap.abs().sum() / max(len(target), 1))


def classification_metrics(logits: torch.Tensor, target: torch.Tensor, n_bins: int = 15) -> Dict[str, float]:
    """Top-1 and top-5 accuracy (%), NLL (``loss``, nats, mean) and ECE (fraction) of ``logits [N, K]``.

    ``logits`` may also be log-probabilities (an ``averaging='probs'`` ensemble): softmax leaves them unchanged.
    """
    from timm.utils import accuracy

    logits = logits.float()
    top1, top5 = accuracy(logits, target, topk=(1, min(5, logits.shape[-1])))
    return OrderedDict(loss=float(F.cross_entropy(logits, target)), top1=float(top1), top5=float(top5),
                       ece=expected_calibration_error(logits.softmax(-1), target, n_bins))


@torch.no_grad()
def evaluate(model: nn.Module, loader, autocast: Callable[[], Any] = contextlib.nullcontext,
             channels_last: bool = False, members_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
             ) -> Dict[str, Any]:
    """Metrics of a :class:`~timm_split.ensemble.SplitEnsemble` and of each member on ``loader``.

    Args:
        model: The ensemble; evaluated in eval mode, its mode restored after.
        loader: Batches ``(images [B, C, H, W], targets [B])`` already on the model's device.
        autocast: A context factory (e.g. bf16 autocast).
        channels_last: Feed channels-last images.
        members_fn: Computes ``[S, B, K]`` instead of ``model.forward_members`` (member-parallel ranks).

    Returns:
        ``{'loss', 'top1', 'top5', 'ece'}`` of the ensemble plus ``'members'``: the same per member.
    """
    was_training = model.training
    model.eval()
    outs, targets = [], []
    try:
        for images, target in loader:
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast():
                outs.append((members_fn or model.forward_members)(images).float().cpu())
            targets.append(target.cpu())
    finally:
        model.train(was_training)
    members, target = torch.cat(outs, 1), torch.cat(targets)
    result = classification_metrics(model.combine(members), target)
    result["members"] = [classification_metrics(m, target) for m in members]
    return result
