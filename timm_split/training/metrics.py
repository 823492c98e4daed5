"""Classification metrics of an ensemble and its members: top-1/top-5, NLL and ECE (``evaluate``; the uncertainty
metrics are in :mod:`timm_split.training.uncertainty`); the members' logits on a loader (``collect_member_logits``);
images/s and time left of a long loop, for progress lines in a log (``Throughput``); the trainer's one estimate of a
run's time left (``RunEstimate``)."""
from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import OrderedDict
from datetime import datetime
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

_logger = logging.getLogger(__name__)

__all__ = ["expected_calibration_error", "classification_metrics", "collect_member_logits", "evaluate", "Throughput",
           "format_seconds", "duration_text", "clock_text", "RunEstimate"]


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


def duration_text(seconds: float) -> str:
    """A duration that no one reads as a time of day: ``'4.2s'`` under a minute, else ``'4:40'`` (minutes:seconds)
    or ``'1:02:05'``, with no leading zero (:func:`clock_text` gives times of day, with their zone)."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 59.95:
        return f"{max(seconds, 0.0):.1f}s"
    minutes, sec = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{sec:02d}" if hours else f"{minutes}:{sec:02d}"


def clock_text(timestamp: float, now: Optional[float] = None) -> str:
    """A time of day in the local zone, named: ``'05:05 UTC'``; with the date when it is not ``now``'s day
    (``'2026-12-09 05:05 UTC'``)."""
    when = datetime.fromtimestamp(timestamp).astimezone()
    today = datetime.fromtimestamp(time.time() if now is None else now).astimezone().date()
    text = when.strftime("%H:%M" if when.date() == today else "%Y-%m-%d %H:%M")
    return f"{text} {when.tzname() or when.strftime('UTC%z')}"


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


class RunEstimate:
    """The trainer's one estimate of a run's time left: every line that states it (the progress lines, ``Train: N
    done``, ``epoch N took``) asks :meth:`left`, so they agree, each later one less by the time between them.

    An epoch's expected wall time (training, evaluation, checkpoints) is the mean, over the epochs this process has
    done, of each one's wall time less its one-off costs: the seconds ``'auto'`` spent timing its candidates in it
    (``one_off``: its decisions for training and for evaluation) and, in the first epoch this process trains, its
    first update's time beyond a steady update (the loader's first start, the kernels' warm-up, net of ``'auto'``).
    The epoch under way adds its own rest: its training at its steady pace (:class:`Throughput`; at its first update,
    at the mean of the epochs done), then its evaluation and checkpoints at the mean of the epochs done. Before an
    epoch is done the evaluations are unknown: the estimate counts training only, and says so (``complete`` False).

    Use: ``pace = est.begin(epoch, steps, warmup)``, ``est.update(items)`` after each step, ``est.trained()`` when
    the epoch's training is done, ``est.finish()`` after its evaluation and checkpoints.

    Args:
        epochs: The run's epochs (``--epochs``; epochs are numbered from 0).
        clock: Seconds (default ``time.perf_counter``); the epochs' :class:`Throughput` use it too.
        one_off: The running total of one-off seconds spent so far (the trainer passes
            :func:`timm_split.execution.auto.trial_seconds`); default: none.
        now: The wall clock, for the time of day a run ends (default ``time.time``).
    """

    def __init__(self, epochs: int, clock: Callable[[], float] = time.perf_counter,
                 one_off: Optional[Callable[[], float]] = None, now: Callable[[], float] = time.time) -> None:
        self.epochs = epochs
        self.clock, self.now = clock, now
        self._one_off = one_off or (lambda: 0.0)
        self.done: List[Tuple[float, float]] = []  # per epoch done: (steady wall seconds, steady training seconds)
        self.pace: Optional[Throughput] = None
        self._start = (0.0, 0.0)  # (clock, one-off total) at the epoch's start
        self._first: Optional[Tuple[float, float]] = None  # (seconds, one-off seconds) of its first update
        self._trained: Optional[Tuple[float, float, float]] = None  # (seconds, one-off seconds, steady step seconds)

    def begin(self, epoch: int, steps: int, warmup: int = 0) -> Throughput:
        """Start an epoch of ``steps`` steps whose first ``warmup`` make its first update; its :class:`Throughput`."""
        self._start = (self.clock(), self._one_off())
        self._first = self._trained = None
        self.pace = Throughput(steps, clock=self.clock, warmup=warmup)
        return self.pace

    def _since_start(self) -> Tuple[float, float]:
        return self.clock() - self._start[0], self._one_off() - self._start[1]

    def update(self, items: int = 0, steps: int = 1) -> None:
        """:meth:`Throughput.update` of the epoch's pace; notes when its first update is done."""
        self.pace.update(items, steps)
        if self._first is None and self.pace.steps >= max(self.pace.warmup, 1):
            self._first = self._since_start()

    def trained(self) -> None:
        """The epoch's training is done (its evaluation and checkpoints follow)."""
        self._trained = self._since_start() + (self.pace.step_seconds(),)

    def finish(self) -> Dict[str, float]:
        """The epoch is done: its ``wall`` seconds, of which ``auto`` (one-off) and ``startup`` (the first update's
        start-up, in the first epoch of the process) are left out of the estimate, and ``steady`` (the rest)."""
        wall, auto = self._since_start()
        train, train_auto, step = self._trained or (wall, auto, math.inf)
        startup = 0.0
        if not self.done and self._first is not None and math.isfinite(step):
            first, first_auto = self._first
            startup = max(first - first_auto - self.pace.warmup * step, 0.0)
        steady = max(wall - auto - startup, 0.0)
        self.done.append((steady, max(min(train - train_auto - startup, steady), 0.0)))
        self.pace = None
        return dict(wall=wall, auto=auto, startup=startup, steady=steady)

    def epoch_seconds(self) -> Optional[float]:
        """An epoch's expected wall time (training, evaluation and checkpoints, no one-off cost): the mean of the
        epochs done; None before one is."""
        return sum(s for s, _ in self.done) / len(self.done) if self.done else None

    def left(self, epoch: int) -> Tuple[float, bool]:
        """Seconds left in the run at this point of epoch ``epoch`` (its training under way or done, between
        :meth:`begin` and :meth:`finish`; after :meth:`finish`, the epochs after it only), and whether they include
        the evaluations (False before an epoch is done). ``math.inf`` while no pace is known (the first update)."""
        after = max(self.epochs - epoch - 1, 0)
        pace = self.pace
        if self.done:
            per_epoch = self.epoch_seconds()
            train = sum(t for _, t in self.done) / len(self.done)
            end = per_epoch - train
        else:
            train = per_epoch = (pace.step_seconds() * pace.total) if pace is not None else math.inf
            end = 0.0
        rest = 0.0
        if pace is not None:
            rest = pace.eta()
            if not math.isfinite(rest):  # the epoch's first update: the epochs done's pace
                rest = train * max(pace.total - pace.steps, 0) / max(pace.total, 1) if self.done else math.inf
            rest += end
        return rest + (after * per_epoch if after else 0.0), bool(self.done)

    def text(self, epoch: int, what: str = "") -> str:
        """:meth:`left` in words: ``'about 4:40 left (ending near 05:05 UTC)'``, with ``what`` after ``left``;
        before an epoch is done ``'about 4:10 left + the evaluations, not timed yet (ending after 05:01 UTC)'``;
        ``'measuring'`` while no pace is known."""
        seconds, complete = self.left(epoch)
        if not math.isfinite(seconds):
            return "measuring"
        now = self.now()
        if complete:
            return f"about {duration_text(seconds)} left{what} (ending near {clock_text(now + seconds, now)})"
        return (f"about {duration_text(seconds)} left{what} + the evaluations, not timed yet (ending after "
                f"{clock_text(now + seconds, now)})")


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
