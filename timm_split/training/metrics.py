"""Classification metrics of an ensemble and its members: top-1/top-5, NLL and ECE (``evaluate``; the uncertainty
metrics are in :mod:`timm_split.training.uncertainty`); the members' logits on a loader (``collect_member_logits``);
images/s and time left of a long loop, for progress lines in a log (``Throughput``)."""
from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import OrderedDict
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

_logger = logging.getLogger(__name__)

__all__ = ["expected_calibration_error", "classification_metrics", "collect_member_logits", "evaluate", "Throughput",
           "format_seconds"]


def format_seconds(seconds: float) -> str:
    """``'4.2s'`` under a minute, else tqdm's ``'12:05'`` / ``'1:02:05'``."""
    from tqdm import tqdm

    if not math.isfinite(seconds):
        return "?"
    return f"{seconds:.1f}s" if seconds < 59.95 else tqdm.format_interval(round(seconds))


def eta_text(seconds: float) -> str:
    """An ETA as the progress lines show it: ``'4.2s'``, ``'12:05'``; ``'measuring'`` while no steady pace exists
    (the first step of a loop, which starts the loader's workers: :class:`Throughput`'s ``warmup``)."""
    return format_seconds(seconds) if math.isfinite(seconds) else "measuring"


class Throughput:
    """Items per second and the time left of a loop of ``total`` steps, at the mean pace so far: progress lines
    for a log (a file has no progress bar).

    With ``warmup`` steps, the time left is paced by the steps after them only: a training epoch's first step
    also starts the data loader's workers and warms up the kernels (and ``--execution auto`` times its
    candidates there), so a pace that counts it overstates the time left many times over. Until a step after the
    warm-up is done, the time left is unknown (``math.inf``, which :func:`format_seconds` shows as ``?``).

    Args:
        total: The steps the loop takes.
        clock: Seconds (default ``time.perf_counter``); the loop starts when this object is made.
        warmup: The first steps left out of the pace of :meth:`eta` and :meth:`step_seconds` (0: none).
    """

    def __init__(self, total: int, clock: Callable[[], float] = time.perf_counter, warmup: int = 0) -> None:
        self.total, self.steps, self.items = total, 0, 0
        self.warmup = max(int(warmup), 0)
        self._clock = clock
        self.start = clock()
        # (clock, steps) when the warm-up steps were done: where the steady pace is measured from
        self._steady: Optional[Tuple[float, int]] = (self.start, 0) if not self.warmup else None

    def update(self, items: int = 0, steps: int = 1) -> None:
        """Count ``steps`` more steps done, of ``items`` items (images, models) in all."""
        self.steps += steps
        self.items += items
        if self._steady is None and self.steps >= self.warmup:
            self._steady = (self._clock(), self.steps)

    def elapsed(self) -> float:
        """Seconds since the start."""
        return self._clock() - self.start

    def rate(self) -> float:
        """Items per second so far."""
        return self.items / max(self.elapsed(), 1e-9)

    def step_seconds(self) -> float:
        """Seconds a step at the pace after the warm-up steps; ``math.inf`` until a step after them is done."""
        if self._steady is None or self.steps <= self._steady[1]:
            return math.inf
        since, steps = self._steady
        return (self._clock() - since) / (self.steps - steps)

    def eta(self) -> float:
        """Seconds left at the pace so far (after the warm-up steps); 0 once ``total`` steps are done, ``math.inf``
        while the pace is unknown."""
        left = max(self.total - self.steps, 0)
        if not left:
            return 0.0
        return self.step_seconds() * left


def expected_calibration_error(probs: torch.Tensor, target: torch.Tensor, n_bins: int = 15) -> float:
    """Expected calibration error of the top-1 prediction, with ``n_bins`` equal-width confidence bins.

    ``ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)|``, computed by torchmetrics' L1
    ``multiclass_calibration_error``: bin ``b`` holds confidences in ``[b/n, (b+1)/n)`` and a confidence of
    exactly 1 has a bin of its own (:data:`~timm_split.training.uncertainty.ECE_BINNING`).

    Args:
        probs: Probabilities ``[N, K]``.
        target: Class indices ``[N]``.
        n_bins: Number of bins (15 as in Guo et al., 2017).

    Returns:
        The ECE as a fraction in ``[0, 1]``.
    """
    from torchmetrics.functional.classification import multiclass_calibration_error

    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1; got {n_bins}.")
    probs = probs.detach().float().cpu()
    return float(multiclass_calibration_error(probs, target.cpu(), num_classes=probs.shape[-1], n_bins=n_bins,
                                              norm="l1"))


def classification_metrics(logits: torch.Tensor, target: torch.Tensor, n_bins: int = 15) -> Dict[str, float]:
    """Top-1 and top-5 accuracy (%), NLL (``loss``, nats, mean) and ECE (fraction) of ``logits [N, K]``.

    ``logits`` may also be log-probabilities (an ``averaging='probs'`` ensemble): softmax leaves them unchanged.
    """
    from timm.utils import accuracy

    logits = logits.float()
    top1, top5 = accuracy(logits, target, topk=(1, min(5, logits.shape[-1])))
    finite = bool(torch.isfinite(logits).all())  # a diverged model: NaN, not a number binned from NaN
    return OrderedDict(loss=float(F.cross_entropy(logits, target)), top1=float(top1), top5=float(top5),
                       ece=expected_calibration_error(logits.softmax(-1), target, n_bins) if finite else math.nan)


@torch.no_grad()
def collect_member_logits(model: nn.Module, loader, autocast: Callable[[], Any] = contextlib.nullcontext,
                          channels_last: bool = False,
                          members_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                          log_interval: int = 0, what: str = "Eval") -> Tuple[torch.Tensor, torch.Tensor]:
    """Every member's logits on ``loader``: ``(members [S, N, K] float32 on the CPU, targets [N])``.

    Args:
        model: The ensemble; run in eval mode, its mode restored after.
        loader: Batches ``(images [B, C, H, W], targets [B])`` already on the model's device.
        autocast: A context factory (e.g. bf16 autocast).
        channels_last: Feed channels-last images.
        members_fn: Computes ``[S, B, K]`` instead of ``model.forward_members`` (member-parallel ranks).
        log_interval: Log ``<what>: [i/N] <images/s>, ETA <time left>`` (INFO) every this many batches and at the
            last; 0: never.
        what: The progress lines' prefix.
    """
    was_training = model.training
    model.eval()
    outs, targets = [], []
    n = len(loader) if log_interval else 0
    pace = Throughput(n, warmup=min(1, n))
    try:
        for i, (images, target) in enumerate(loader):
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast():
                outs.append((members_fn or model.forward_members)(images).float().cpu())
            targets.append(target.cpu())
            pace.update(len(target))
            if log_interval and (i % log_interval == 0 or i == n - 1):
                _logger.info("%s: [%d/%d] %.1f img/s, ETA %s", what, i + 1, n, pace.rate(), eta_text(pace.eta()))
    finally:
        model.train(was_training)
    if not outs:
        raise ValueError("the loader gave no batches; there is nothing to evaluate.")
    return torch.cat(outs, 1), torch.cat(targets)


def evaluate(model: nn.Module, loader, autocast: Callable[[], Any] = contextlib.nullcontext,
             channels_last: bool = False, members_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
             log_interval: int = 0, uncertainty: bool = False) -> Dict[str, Any]:
    """Metrics of a :class:`~timm_split.ensemble.SplitEnsemble` and of each member on ``loader``.

    Args:
        model: The ensemble; evaluated in eval mode, its mode restored after.
        loader: Batches ``(images [B, C, H, W], targets [B])`` already on the model's device.
        autocast: A context factory (e.g. bf16 autocast).
        channels_last: Feed channels-last images.
        members_fn: Computes ``[S, B, K]`` instead of ``model.forward_members`` (member-parallel ranks).
        log_interval: Log ``Eval: [i/N] <images/s>, ETA <time left>`` (INFO) every this many batches and at the
            last; 0: never.
        uncertainty: Add the Brier score, AURC, accuracy at 90%/95% coverage and (ensemble) member disagreement
            and mutual information of :func:`~timm_split.training.uncertainty.uncertainty_report`.

    Returns:
        ``{'loss', 'top1', 'top5', 'ece'}`` (and with ``uncertainty`` the keys above) of the ensemble plus
        ``'members'``: the same per member.
    """
    members, target = collect_member_logits(model, loader, autocast, channels_last, members_fn, log_interval)
    result = classification_metrics(model.combine(members), target)
    result["members"] = [classification_metrics(m, target) for m in members]
    if uncertainty:
        from .uncertainty import uncertainty_report

        keep = ("brier", "aurc", "acc_cov90", "acc_cov95", "disagreement", "pairwise_disagreement", "mutual_info")
        if torch.isfinite(members).all():
            report = uncertainty_report(members, target, averaging=getattr(model, "averaging", "logits"))
            rows = [report["ensemble"]] + report["members"]
        else:  # a diverged model: its metrics say NaN (the trainer decides what to do), never a made-up number
            _logger.warning("evaluate: the logits hold NaN or inf; the uncertainty metrics are NaN")
            rows = [dict.fromkeys(keep, math.nan)] + [dict.fromkeys(keep[:-2], math.nan)] * members.shape[0]
        for out, row in zip([result] + result["members"], rows):
            out.update((k, row[k]) for k in keep if k in row)
    return result
