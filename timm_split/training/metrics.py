"""Classification metrics of an ensemble and its members: top-1/top-5, NLL and ECE (``evaluate``); images/s and
time left of a long loop, for progress lines in a log (``Throughput``)."""
from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import OrderedDict
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

_logger = logging.getLogger(__name__)

__all__ = ["expected_calibration_error", "classification_metrics", "evaluate", "Throughput", "format_seconds"]


def format_seconds(seconds: float) -> str:
    """``'4.2s'`` under a minute, else tqdm's ``'12:05'`` / ``'1:02:05'``."""
    from tqdm import tqdm

    if not math.isfinite(seconds):
        return "?"
    return f"{seconds:.1f}s" if seconds < 59.95 else tqdm.format_interval(round(seconds))


class Throughput:
    """Items per second and the time left of a loop of ``total`` steps, at the mean pace so far: progress lines
    for a log (a file has no progress bar).

    Args:
        total: The steps the loop takes.
        clock: Seconds (default ``time.perf_counter``); the loop starts when this object is made.
    """

    def __init__(self, total: int, clock: Callable[[], float] = time.perf_counter) -> None:
        self.total, self.steps, self.items = total, 0, 0
        self._clock = clock
        self.start = clock()

    def update(self, items: int = 0, steps: int = 1) -> None:
        """Count ``steps`` more steps done, of ``items`` items (images, models) in all."""
        self.steps += steps
        self.items += items

    def elapsed(self) -> float:
        """Seconds since the start."""
        return self._clock() - self.start

    def rate(self) -> float:
        """Items per second so far."""
        return self.items / max(self.elapsed(), 1e-9)

    def eta(self) -> float:
        """Seconds left at the mean pace so far; 0 once ``total`` steps are done."""
        left = max(self.total - self.steps, 0)
        if not left:
            return 0.0
        return self.elapsed() / self.steps * left if self.steps else math.inf


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
             log_interval: int = 0) -> Dict[str, Any]:
    """Metrics of a :class:`~timm_split.ensemble.SplitEnsemble` and of each member on ``loader``.

    Args:
        model: The ensemble; evaluated in eval mode, its mode restored after.
        loader: Batches ``(images [B, C, H, W], targets [B])`` already on the model's device.
        autocast: A context factory (e.g. bf16 autocast).
        channels_last: Feed channels-last images.
        members_fn: Computes ``[S, B, K]`` instead of ``model.forward_members`` (member-parallel ranks).
        log_interval: Log ``Eval: [i/N] <images/s>, ETA <time left>`` (INFO) every this many batches and at the
            last; 0: never.

    Returns:
        ``{'loss', 'top1', 'top5', 'ece'}`` of the ensemble plus ``'members'``: the same per member.
    """
    was_training = model.training
    model.eval()
    outs, targets = [], []
    n = len(loader) if log_interval else 0
    pace = Throughput(n)
    try:
        for i, (images, target) in enumerate(loader):
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast():
                outs.append((members_fn or model.forward_members)(images).float().cpu())
            targets.append(target.cpu())
            pace.update(len(target))
            if log_interval and (i % log_interval == 0 or i == n - 1):
                _logger.info("Eval: [%d/%d] %.1f img/s, ETA %s", i + 1, n, pace.rate(), format_seconds(pace.eta()))
    finally:
        model.train(was_training)
    members, target = torch.cat(outs, 1), torch.cat(targets)
    result = classification_metrics(model.combine(members), target)
    result["members"] = [classification_metrics(m, target) for m in members]
    return result
