"""What an ensemble is for besides top-1: calibration, selective prediction, diversity and out-of-distribution
detection, as pure functions of stored logits.

Every function takes logits (``[N, K]`` for one model, ``[S, N, K]`` for the S members) and class indices
``[N]`` as torch tensors (``torch.from_numpy`` for stored numpy arrays) and computes in float64 on the CPU.
:func:`uncertainty_report` is the entry point: one plain dict with a row of metrics for the ensemble and one per
member, which ``timm-split validate`` prints and ``benchmarks/science.py`` can compute from its records.

Definitions (the units are those of the keys of :func:`uncertainty_report`):

* ``top1``, ``top5``: accuracy in %; ``nll``: mean negative log-likelihood in nats; ``brier``: the multiclass
  Brier score ``mean_n sum_k (p_nk - y_nk)^2`` (in ``[0, 2]``).
* ``ece``: expected calibration error of the top-1 confidence, a fraction, with :data:`ECE_BINS` equal-width bins
  (torchmetrics' ``multiclass_calibration_error``, L1: bin ``b`` holds confidences in ``[b/15, (b+1)/15)``, a
  confidence of exactly 1 a bin of its own).
* Temperature scaling (Guo et al., 2017): ``T`` minimises the NLL of ``logits / T`` (LBFGS on ``log T``) on a
  calibration split that is not scored, or is fitted by 2-fold cross-fitting (fit on half A, score half B and
  the other way round; every sample is scored by a temperature fitted without it). ``nll_ts``, ``ece_ts``,
  ``temperature``.
* Selective prediction by the max-softmax confidence: ``aurc`` (the area under the risk-coverage curve,
  ``mean_k risk(k / N)``, Geifman and El-Yaniv 2017; the risk at coverage ``k / N`` is the error rate of the ``k``
  most confident samples, samples of equal confidence entering together, their errors spread evenly, which is
  the mean over the orders of a tie), ``acc_cov90`` / ``acc_cov95``: accuracy (%) of the ``ceil(c * N)`` most
  confident samples (ties likewise).
* Diversity: ``disagreement`` (ensemble row: the mean over members of the fraction of samples whose member argmax
  differs from the ensemble's; member row: that member's own fraction), ``pairwise_disagreement`` (the mean over
  member pairs of the fraction of samples where their argmaxes differ), ``mutual_info`` (the mean over samples of
  ``H(mean_s p_s) - mean_s H(p_s)``, nats; exactly 0 for S=1).
* OOD detection (in-distribution is the positive class; a higher score says "in-distribution"): by max-softmax
  (``msp``), by negative predictive entropy (``entropy``) and, for an ensemble of S > 1, by negative mutual
  information (``mi``): ``ood_auroc_<score>`` (torchmetrics' ``binary_auroc``) and ``ood_fpr95_<score>``, the
  fraction of OOD samples taken as in-distribution at the first ROC point whose TPR reaches 95% (torchmetrics'
  ``binary_roc``).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

_logger = logging.getLogger(__name__)

__all__ = [
    "ECE_BINS", "ECE_BINNING", "MIN_CALIBRATION_SAMPLES", "COVERAGES", "check_logits", "check_target",
    "combine_logits", "nll", "brier_score", "ece", "topk_accuracy", "fit_temperature", "crossfit_temperature",
    "selective_risks", "aurc", "accuracy_at_coverage", "predictive_entropy", "mutual_information",
    "disagreement", "pairwise_disagreement", "ood_scores", "ood_detection", "check_ood_distinct", "Calibration",
    "classification_report", "uncertainty_report",
]

ECE_BINS = 15
ECE_BINNING = ("15 equal-width bins of the top-1 confidence, [b/15, (b+1)/15) (torchmetrics' "
               "multiclass_calibration_error, L1)")
MIN_CALIBRATION_SAMPLES = 50
COVERAGES = (0.90, 0.95)
TPR_LEVEL = 0.95


# ----------------------------------------------------------------------------------------------------------
# input checks


def check_logits(logits: torch.Tensor, ndim: int = 2, what: str = "logits") -> torch.Tensor:
    """``logits`` as a float64 CPU tensor; ``ValueError`` (one line) for a wrong shape, no samples or a NaN/inf.

    Args:
        logits: ``[N, K]`` (``ndim=2``) or ``[S, N, K]`` (``ndim=3``) logits or log-probabilities.
        ndim: The number of dims expected.
        what: How the message names the tensor.

    Returns:
        The logits in float64 on the CPU.
    """
    logits = torch.as_tensor(logits)
    if logits.ndim != ndim:
        shape = "[N, K]" if ndim == 2 else "[S, N, K]"
        raise ValueError(f"{what} must be {shape}; got shape {tuple(logits.shape)}.")
    if logits.shape[-2] == 0:
        raise ValueError(f"{what} hold no samples (shape {tuple(logits.shape)}); there is nothing to score.")
    if logits.shape[-1] < 2:
        raise ValueError(f"{what} need at least 2 classes; got shape {tuple(logits.shape)}.")
    if not logits.is_floating_point():
        raise ValueError(f"{what} must be floating point; got {logits.dtype}.")
    logits = logits.detach().to("cpu", torch.float64)
    bad = ~torch.isfinite(logits)
    if bad.any():
        rows = bad.reshape(-1, logits.shape[-2], logits.shape[-1]).any(-1).any(0).nonzero().flatten()
        raise ValueError(f"{what} hold NaN or inf values in {len(rows)} of {logits.shape[-2]} samples (first: sample "
                         f"{int(rows[0])}); a metric of them would be meaningless: find where the model diverged "
                         "(a checkpoint of a diverged run, fp16 overflow) before scoring it.")
    return logits


def check_target(target: torch.Tensor, n: int, num_classes: int, what: str = "target") -> torch.Tensor:
    """``target`` as int64 CPU class indices ``[n]`` in ``[0, num_classes)``; ``ValueError`` otherwise."""
    target = torch.as_tensor(target).detach().cpu()
    if target.ndim != 1 or len(target) != n:
        raise ValueError(f"{what} must be [N] class indices with N = {n}; got shape {tuple(target.shape)}.")
    if target.is_floating_point() or target.dtype == torch.bool:
        raise ValueError(f"{what} must be integer class indices; got {target.dtype}.")
    target = target.long()
    if n and (target.min() < 0 or target.max() >= num_classes):
        raise ValueError(f"{what} has class indices outside [0, {num_classes}) (min {int(target.min())}, max "
                         f"{int(target.max())}).")
    return target


def _pair(logits: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    logits = check_logits(logits)
    return logits, check_target(target, logits.shape[0], logits.shape[1])


# ----------------------------------------------------------------------------------------------------------
# one model's predictions


def combine_logits(member_logits: torch.Tensor, averaging: str = "logits") -> torch.Tensor:
    """The ensemble's logits ``[N, K]`` as :meth:`SplitEnsemble.combine` makes them.

    Args:
        member_logits: ``[S, N, K]``.
        averaging: ``'logits'`` (the mean of the members' logits) or ``'probs'`` (the log of the mean of their
            softmax probabilities).

    Returns:
        float64 ``[N, K]``.
    """
    member_logits = check_logits(member_logits, 3, "member logits")
    if averaging == "logits":
        return member_logits.mean(0)
    if averaging == "probs":
        return torch.logsumexp(member_logits.log_softmax(-1), 0) - math.log(member_logits.shape[0])
    raise ValueError(f"averaging must be 'logits' or 'probs'; got {averaging!r}.")


def nll(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Mean negative log-likelihood (nats) of ``logits [N, K]`` (or log-probabilities) at ``target [N]``."""
    logits, target = _pair(logits, target)
    return float(F.cross_entropy(logits, target))


def brier_score(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Multiclass Brier score ``mean_n sum_k (softmax(logits)_nk - onehot(target)_nk)^2``, in ``[0, 2]``.

    (torchmetrics has no multiclass Brier score; this is the one-line definition.)
    """
    logits, target = _pair(logits, target)
    probs = logits.softmax(-1)
    return float(((probs - F.one_hot(target, probs.shape[-1]).to(probs.dtype)) ** 2).sum(-1).mean())


def ece(logits: torch.Tensor, target: torch.Tensor, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error (a fraction) of the top-1 confidence: torchmetrics' L1
    ``multiclass_calibration_error`` with ``n_bins`` equal-width bins (see :data:`ECE_BINNING`)."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1; got {n_bins}.")
    logits, target = _pair(logits, target)
    return float(multiclass_calibration_error(logits.softmax(-1), target, num_classes=logits.shape[-1],
                                              n_bins=n_bins, norm="l1"))


def topk_accuracy(logits: torch.Tensor, target: torch.Tensor, k: int = 1) -> float:
    """Top-``k`` accuracy in % (torchmetrics' micro ``multiclass_accuracy``; ``k`` capped at the class count)."""
    from torchmetrics.functional.classification import multiclass_accuracy

    logits, target = _pair(logits, target)
    k = min(k, logits.shape[-1])
    return 100 * float(multiclass_accuracy(logits, target, num_classes=logits.shape[-1], top_k=k, average="micro"))


def classification_report(logits: torch.Tensor, target: torch.Tensor, n_bins: int = ECE_BINS) -> Dict[str, float]:
    """``{'top1', 'top5', 'nll', 'brier', 'ece'}`` of ``logits [N, K]`` (see the module docstring for units)."""
    return {"top1": topk_accuracy(logits, target, 1), "top5": topk_accuracy(logits, target, 5),
            "nll": nll(logits, target), "brier": brier_score(logits, target), "ece": ece(logits, target, n_bins)}


# ----------------------------------------------------------------------------------------------------------
# temperature scaling


def _check_calibration_split(target: torch.Tensor, min_samples: int, what: str) -> None:
    if len(target) < min_samples:
        raise ValueError(f"{what} has {len(target)} samples; fitting a temperature needs at least {min_samples} "
                         "(a temperature fitted on fewer is noise): use a larger calibration split.")
    if len(torch.unique(target)) < 2:
        raise ValueError(f"{what} holds a single class ({int(target[0])}); a temperature fitted on it would only "
                         "learn that class's frequency: use a calibration split with several classes.")


def fit_temperature(logits: torch.Tensor, target: torch.Tensor,
                    min_samples: int = MIN_CALIBRATION_SAMPLES) -> float:
    """The temperature ``T > 0`` that minimises the NLL of ``logits / T`` (LBFGS with a strong-Wolfe line search
    on ``log T``, from ``T = 1``).

    Args:
        logits: ``[N, K]`` logits of the calibration split (never the scored samples).
        target: ``[N]`` class indices.
        min_samples: ``ValueError`` below this many samples, or for a split of a single class.

    Returns:
        The temperature.
    """
    logits, target = _pair(logits, target)
    _check_calibration_split(target, min_samples, "the calibration split")
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits * torch.exp(-log_t), target)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    t = float(torch.exp(log_t.detach()))
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"the temperature fit did not converge (T = {t}); the calibration split's logits carry no "
                         "usable confidence (e.g. every prediction wrong).")
    _logger.debug("fit_temperature: T = %.4f on %d samples", t, len(target))
    return t


def crossfit_temperature(logits: torch.Tensor, target: torch.Tensor, seed: int = 0,
                         min_samples: int = MIN_CALIBRATION_SAMPLES) -> Tuple[torch.Tensor, Tuple[float, float]]:
    """2-fold cross-fitted temperature scaling: a seeded random half A and the other half B; ``T_A`` fitted on A
    scales B and ``T_B`` fitted on B scales A, so no sample is scored by a temperature fitted on itself.

    Args:
        logits: ``[N, K]``.
        target: ``[N]``.
        seed: Seeds the halves (``torch.Generator``).
        min_samples: Each half needs this many samples (and two classes).

    Returns:
        ``(scaled logits [N, K] in the original order, (T_A, T_B))``.
    """
    logits, target = _pair(logits, target)
    order = torch.randperm(len(target), generator=torch.Generator().manual_seed(seed))
    a, b = order[: len(order) // 2], order[len(order) // 2:]
    for half, name in ((a, "half A"), (b, "half B")):
        _check_calibration_split(target[half], min_samples, f"cross-fitting's {name} (of {len(target)} samples)")
    t_a, t_b = fit_temperature(logits[a], target[a], min_samples), fit_temperature(logits[b], target[b], min_samples)
    scaled = logits.clone()
    scaled[b], scaled[a] = logits[b] / t_a, logits[a] / t_b
    return scaled, (t_a, t_b)


# ----------------------------------------------------------------------------------------------------------
# selective prediction


def _confidence_order(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The errors (0/1) in descending max-softmax order, each tie group's errors spread evenly over it."""
    conf, pred = logits.softmax(-1).max(-1)
    order = torch.argsort(conf, descending=True, stable=True)
    errors = (pred != target).to(torch.float64)[order]
    _, inverse, counts = torch.unique_consecutive(conf[order], return_inverse=True, return_counts=True)
    group_errors = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, inverse, errors)
    return (group_errors / counts)[inverse]


def selective_risks(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The risk-coverage curve by max-softmax confidence: ``[N]``, entry ``k-1`` the error rate of the ``k`` most
    confident samples (coverage ``k / N``; ties spread, see the module docstring)."""
    logits, target = _pair(logits, target)
    errors = _confidence_order(logits, target)
    return errors.cumsum(0) / torch.arange(1, len(errors) + 1, dtype=torch.float64)


def aurc(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Area under the risk-coverage curve, ``mean_k risk(k / N)`` (a fraction; lower is better)."""
    return float(selective_risks(logits, target).mean())


def accuracy_at_coverage(logits: torch.Tensor, target: torch.Tensor, coverage: float) -> float:
    """Accuracy (%) of the ``ceil(coverage * N)`` most confident samples (at least one)."""
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must be in (0, 1]; got {coverage}.")
    risks = selective_risks(logits, target)
    k = min(max(math.ceil(coverage * len(risks) - 1e-9), 1), len(risks))
    return 100 * (1 - float(risks[k - 1]))


# ----------------------------------------------------------------------------------------------------------
# ensemble diversity


def predictive_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of ``softmax(logits)`` per sample, ``[N]``."""
    logp = check_logits(logits).log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def mutual_information(member_logits: torch.Tensor) -> torch.Tensor:
    """Mutual information between the prediction and the member per sample, ``[N]`` (nats):
    ``H(mean_s p_s) - mean_s H(p_s)`` with ``p_s = softmax(member_logits[s])``; exactly 0 for S=1."""
    member_logits = check_logits(member_logits, 3, "member logits")
    if member_logits.shape[0] == 1:
        return torch.zeros(member_logits.shape[1], dtype=torch.float64)
    logp = member_logits.log_softmax(-1)
    mean_logp = torch.logsumexp(logp, 0) - math.log(logp.shape[0])
    total = -(mean_logp.exp() * mean_logp).sum(-1)
    member = -(logp.exp() * logp).sum(-1).mean(0)
    return (total - member).clamp_min(0)


def disagreement(member_logits: torch.Tensor, averaging: str = "logits") -> torch.Tensor:
    """Per member, the fraction of samples whose argmax differs from the ensemble's (``[S]``; 0 for S=1)."""
    member_logits = check_logits(member_logits, 3, "member logits")
    ens = combine_logits(member_logits, averaging).argmax(-1)
    return (member_logits.argmax(-1) != ens).to(torch.float64).mean(1)


def pairwise_disagreement(member_logits: torch.Tensor) -> float:
    """The mean over member pairs ``i < j`` of the fraction of samples where their argmaxes differ (0 for S=1)."""
    member_logits = check_logits(member_logits, 3, "member logits")
    S = member_logits.shape[0]
    if S == 1:
        return 0.0
    pred = member_logits.argmax(-1)
    pairs = [(pred[i] != pred[j]).to(torch.float64).mean() for i in range(S) for j in range(i + 1, S)]
    return float(torch.stack(pairs).mean())


# ----------------------------------------------------------------------------------------------------------
# out-of-distribution detection


def ood_scores(logits: torch.Tensor, member_logits: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """In-distribution scores per sample (higher: more in-distribution): ``'msp'`` (max softmax), ``'entropy'``
    (negative predictive entropy) and, with ``member_logits`` of S > 1 members, ``'mi'`` (negative mutual
    information).

    Args:
        logits: The model's ``[N, K]`` logits (the ensemble's combined ones for an ensemble).
        member_logits: The members' ``[S, N, K]``, for ``'mi'``.
    """
    logits = check_logits(logits)
    out = {"msp": logits.softmax(-1).max(-1).values, "entropy": -predictive_entropy(logits)}
    if member_logits is not None and torch.as_tensor(member_logits).shape[0] > 1:
        out["mi"] = -mutual_information(member_logits)
    return out


def ood_detection(id_scores: torch.Tensor, ood_scores: torch.Tensor, tpr: float = TPR_LEVEL) -> Tuple[float, float]:
    """AUROC and FPR at ``tpr`` TPR of telling in-distribution samples (positives) from OOD ones by a score.

    torchmetrics' ``binary_auroc`` and ``binary_roc`` (exact thresholds); the scores are min-max rescaled to
    ``[0, 1]`` in float64 first (an order-preserving map: torchmetrics would take values outside ``[0, 1]`` for
    logits and apply a sigmoid, which merges close float32 values).

    Args:
        id_scores: ``[N]`` scores of the in-distribution samples (higher: more in-distribution).
        ood_scores: ``[M]`` scores of the OOD samples.
        tpr: The true-positive rate at which the false-positive rate is read (0.95).

    Returns:
        ``(auroc, fpr)``: both fractions; ``fpr`` is the share of OOD samples scored at or above the highest
        threshold that keeps at least ``tpr`` of the in-distribution samples.
    """
    from torchmetrics.functional.classification import binary_auroc, binary_roc

    id_scores = torch.as_tensor(id_scores).detach().cpu().to(torch.float64).flatten()
    ood_scores = torch.as_tensor(ood_scores).detach().cpu().to(torch.float64).flatten()
    if len(ood_scores) == 0:
        raise ValueError("the OOD set is empty: OOD detection needs at least one out-of-distribution sample.")
    if len(id_scores) == 0:
        raise ValueError("the in-distribution set is empty: OOD detection needs in-distribution samples.")
    scores = torch.cat([id_scores, ood_scores])
    if not torch.isfinite(scores).all():
        raise ValueError("OOD scores hold NaN or inf values; check the logits.")
    labels = torch.cat([torch.ones(len(id_scores)), torch.zeros(len(ood_scores))]).long()
    lo, hi = scores.min(), scores.max()
    scores = (scores - lo) / (hi - lo) if hi > lo else torch.full_like(scores, 0.5)
    auroc = float(binary_auroc(scores, labels))
    fpr, tpr_curve, _ = binary_roc(scores, labels)
    at = int(torch.nonzero(tpr_curve.double() >= tpr - 1e-6)[0])  # torchmetrics' curve is float32
    return auroc, float(fpr[at])


def check_ood_distinct(member_logits: torch.Tensor, ood_member_logits: torch.Tensor) -> None:
    """``ValueError`` where the OOD logits are the in-distribution ones (the OOD set is the evaluation set)."""
    a, b = torch.as_tensor(member_logits), torch.as_tensor(ood_member_logits)
    if a.shape == b.shape and torch.equal(a, b):
        raise ValueError("the OOD logits are identical to the evaluation set's: the OOD data is the evaluation data "
                         "itself, so an AUROC of it would be 0.5 by construction; pass images of other classes.")


# ----------------------------------------------------------------------------------------------------------
# the report


@dataclass(frozen=True, eq=False)
class Calibration:
    """Where the temperature of :func:`uncertainty_report` comes from (build it with a classmethod).

    Attributes:
        method: ``'heldout'`` (fitted on a calibration split that is not scored), ``'crossfit'`` (2-fold
            cross-fitting on the scored samples) or ``'fixed'`` (given temperatures, e.g. from a checkpoint).
        member_logits: ``heldout``: the calibration split's ``[S, M, K]`` member logits.
        target: ``heldout``: its ``[M]`` class indices.
        seed: ``crossfit``: seeds the halves.
        temperatures: ``fixed``: the ensemble's temperature, then each member's (or only the ensemble's).
        min_samples: The smallest calibration split (each half, for ``crossfit``).
    """

    method: str
    member_logits: Optional[torch.Tensor] = None
    target: Optional[torch.Tensor] = None
    seed: int = 0
    temperatures: Tuple[float, ...] = ()
    min_samples: int = MIN_CALIBRATION_SAMPLES

    @classmethod
    def heldout(cls, member_logits: torch.Tensor, target: torch.Tensor,
                min_samples: int = MIN_CALIBRATION_SAMPLES) -> "Calibration":
        """Fit on a declared calibration split (``[S, M, K]`` member logits, ``[M]`` targets), never scored."""
        return cls("heldout", member_logits=member_logits, target=target, min_samples=min_samples)

    @classmethod
    def crossfit(cls, seed: int = 0, min_samples: int = MIN_CALIBRATION_SAMPLES) -> "Calibration":
        """2-fold cross-fitting on the scored samples (halves drawn with ``seed``)."""
        return cls("crossfit", seed=seed, min_samples=min_samples)

    @classmethod
    def fixed(cls, ensemble: float, members: Sequence[float] = ()) -> "Calibration":
        """Given temperatures: the ensemble's, and optionally one per member."""
        temps = (float(ensemble),) + tuple(float(t) for t in members)
        if not all(math.isfinite(t) and t > 0 for t in temps):
            raise ValueError(f"temperatures must be finite and > 0; got {temps}.")
        return cls("fixed", temperatures=temps)


def _scaled_metrics(logits: torch.Tensor, target: torch.Tensor, calib: Calibration, index: int,
                    calib_logits: Optional[torch.Tensor], n_bins: int) -> Dict[str, Any]:
    """``temperature``, ``nll_ts``, ``ece_ts`` of one model (``index`` 0: the ensemble, ``i + 1``: member i)."""
    if calib.method == "crossfit":
        scaled, (t_a, t_b) = crossfit_temperature(logits, target, calib.seed, calib.min_samples)
        out: Dict[str, Any] = {"temperature": (t_a + t_b) / 2, "temperature_fold_a": t_a, "temperature_fold_b": t_b}
    else:
        if calib.method == "heldout":
            t = fit_temperature(calib_logits, calib.target, calib.min_samples)
        elif index < len(calib.temperatures):
            t = calib.temperatures[index]
        else:
            return {}
        scaled, out = logits / t, {"temperature": t}
    out.update(nll_ts=nll(scaled, target), ece_ts=ece(scaled, target, n_bins))
    return out


def _model_row(logits: torch.Tensor, target: torch.Tensor, n_bins: int, coverages: Sequence[float]
               ) -> Dict[str, Any]:
    row: Dict[str, Any] = classification_report(logits, target, n_bins)
    row["aurc"] = aurc(logits, target)
    for c in coverages:
        row[f"acc_cov{round(100 * c)}"] = accuracy_at_coverage(logits, target, c)
    return row


def uncertainty_report(member_logits: torch.Tensor, target: torch.Tensor,
                       ood_member_logits: Optional[torch.Tensor] = None, calib: Optional[Calibration] = None,
                       averaging: str = "logits", n_bins: int = ECE_BINS,
                       coverages: Sequence[float] = COVERAGES) -> Dict[str, Any]:
    """Every metric of the module for an ensemble and each of its members (S=1 alike).

    Args:
        member_logits: ``[S, N, K]`` member logits of the scored samples (a ``[N, K]`` tensor is taken as S=1).
        target: ``[N]`` class indices.
        ood_member_logits: ``[S, M, K]`` member logits of out-of-distribution samples, or None.
        calib: Temperature scaling (:class:`Calibration`), or None for none.
        averaging: How the members combine (``'logits'`` or ``'probs'``, as ``SplitEnsemble.averaging``).
        n_bins: ECE bins.
        coverages: Coverages for ``acc_cov<100 c>``.

    Returns:
        A plain dict: ``'ensemble'`` (a row: ``top1, top5, nll, brier, ece, aurc, acc_cov90, acc_cov95,
        disagreement, pairwise_disagreement, mutual_info``, with ``calib`` also ``temperature, nll_ts, ece_ts``
        (crossfit: ``temperature`` is the mean of ``temperature_fold_a``/``_b``), with OOD logits also
        ``ood_auroc_<s>, ood_fpr95_<s>`` for ``s`` in ``msp, entropy`` and, for S > 1, ``mi``), ``'members'``
        (a row per member: the same less ``pairwise_disagreement``, ``mutual_info`` and the ``mi`` scores),
        ``'split'`` (S), ``'n'``, ``'n_ood'``, ``'n_calib'``, ``'calibration'`` (the method or None),
        ``'averaging'``, ``'ece_binning'`` and ``'notes'`` (what a reader of the numbers must know).
    """
    member_logits = torch.as_tensor(member_logits)
    if member_logits.ndim == 2:
        member_logits = member_logits.unsqueeze(0)
    member_logits = check_logits(member_logits, 3, "member logits")
    S, N, K = member_logits.shape
    target = check_target(target, N, K)
    ens_logits = combine_logits(member_logits, averaging)
    notes: List[str] = [f"ECE: {ECE_BINNING}."]
    if S == 1:
        notes.append("S=1: mutual information and disagreement are 0 by definition (one member).")

    calib_members: List[Optional[torch.Tensor]] = [None] * (S + 1)
    n_calib = 0
    if calib is not None:
        if calib.method == "heldout":
            if calib.member_logits is None or calib.target is None:
                raise ValueError("Calibration.heldout needs the calibration split's member logits and targets.")
            cm = torch.as_tensor(calib.member_logits)
            cm = check_logits(cm.unsqueeze(0) if cm.ndim == 2 else cm, 3, "calibration member logits")
            if cm.shape[0] != S or cm.shape[2] != K:
                raise ValueError(f"calibration logits {tuple(cm.shape)} do not match the scored ones "
                                 f"{tuple(member_logits.shape)} in S or K.")
            check_target(calib.target, cm.shape[1], K, "calibration target")
            calib_members = [combine_logits(cm, averaging)] + list(cm)
            n_calib = cm.shape[1]
            notes.append(f"temperature fitted on a held-out calibration split of {n_calib} samples, not scored.")
        elif calib.method == "crossfit":
            n_calib = N
            notes.append(f"temperature by 2-fold cross-fitting (seed {calib.seed}): each half scored with the "
                         "temperature fitted on the other.")
        elif calib.method == "fixed":
            notes.append("temperature given (not fitted here).")
        else:
            raise ValueError(f"unknown calibration method {calib.method!r}; build it with Calibration.heldout, "
                             ".crossfit or .fixed.")

    ood_ens = ood_members = None
    if ood_member_logits is not None:
        ood = torch.as_tensor(ood_member_logits)
        ood = ood.unsqueeze(0) if ood.ndim == 2 else ood
        if ood.ndim == 3 and ood.shape[1] == 0:
            raise ValueError("the OOD set is empty: OOD detection needs at least one out-of-distribution sample.")
        ood_members = check_logits(ood, 3, "OOD member logits")
        if ood_members.shape[0] != S or ood_members.shape[2] != K:
            raise ValueError(f"OOD logits {tuple(ood_members.shape)} do not match the in-distribution ones "
                             f"{tuple(member_logits.shape)} in S or K.")
        check_ood_distinct(member_logits, ood_members)
        ood_ens = combine_logits(ood_members, averaging)
        notes.append("OOD: in-distribution is the positive class; FPR95 is the share of OOD samples accepted when "
                     "95% of the in-distribution ones are.")

    def row(index: int, logits: torch.Tensor, members: Optional[torch.Tensor], ood_logits: Optional[torch.Tensor],
            ood_m: Optional[torch.Tensor]) -> Dict[str, Any]:
        r = _model_row(logits, target, n_bins, coverages)
        if calib is not None:
            r.update(_scaled_metrics(logits, target, calib, index, calib_members[index], n_bins))
        if ood_logits is not None:
            ids, oods = ood_scores(logits, members), ood_scores(ood_logits, ood_m)
            for name in ids:
                r[f"ood_auroc_{name}"], r[f"ood_fpr95_{name}"] = ood_detection(ids[name], oods[name])
        return r

    dis = disagreement(member_logits, averaging)
    ens = row(0, ens_logits, member_logits, ood_ens, ood_members)
    ens.update(disagreement=float(dis.mean()), pairwise_disagreement=pairwise_disagreement(member_logits),
               mutual_info=float(mutual_information(member_logits).mean()))
    members = []
    for i in range(S):
        r = row(i + 1, member_logits[i], None, None if ood_members is None else ood_members[i], None)
        r["disagreement"] = float(dis[i])
        members.append(r)
    return {"ensemble": ens, "members": members, "split": S, "n": N,
            "n_ood": 0 if ood_members is None else ood_members.shape[1], "n_calib": n_calib,
            "calibration": None if calib is None else calib.method, "averaging": averaging,
            "ece_binning": ECE_BINNING, "notes": notes}
