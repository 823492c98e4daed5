"""Co-training loss for S split members (SplitNet, "Divide and Co-training").

The total loss is the sum of every member's cross-entropy plus a weighted divergence that pulls the
members' predictions together::

    loss = sum_i CE(z_i, y) + w(epoch) * D(p_1, ..., p_S)

where ``p_i = softmax(z_i)`` and ``D`` is one of (per sample, then averaged over the batch):

- ``'js'``: the Jensen-Shannon divergence ``H(mean_i p_i) - mean_i H(p_i)`` (SplitNet's default);
- ``'kl'``: the seed's ``kl_seperate``: ``1/(S-1) * sum_i sum_{j != i} KL(p_j || p_i)`` with every target
  ``p_j`` detached, so member ``i`` is pulled towards each other member and no gradient flows into targets;
- ``'kl_mixture'``: ``1/S * sum_i KL(q_i || p_i)`` with ``q_i`` the detached mean of the other members.

A class whose probability is 0 (a ``-inf`` logit, e.g. class masking) contributes 0 to every divergence,
as ``xlogy`` does: log-probabilities are clamped to the dtype's lowest finite value before they meet another
distribution, so no ``0 * inf`` arises in the forward or the backward pass. The cross-entropy follows
``F.cross_entropy``: it is the loss over the other classes while no target mass falls on such a class, and
``inf`` when the target, a soft target's positive mass or label smoothing's mass does (a soft target's 0 on
a ``-inf`` class adds 0, where ``F.cross_entropy`` gives NaN). The gradients stay finite either way.
"""
import logging
import math
import numbers
from typing import Dict, Optional, Sequence, Union

import torch
from torch import nn

__all__ = ["CoTrainingLoss"]

_logger = logging.getLogger(__name__)

_MODES = ("js", "kl", "kl_mixture")


def _number(name: str, value, minimum: float = 0.0, hint: str = "") -> float:
    """``value`` as a finite float ``>= minimum``, else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value < minimum:
        shown = f"{value!r} (a {type(value).__name__})" if not isinstance(value, numbers.Real) else repr(value)
        raise ValueError(f"{name} must be a finite number >= {minimum:g}{hint}; got {shown}.")
    return float(value)


def _stack_logits(member_logits: Union[torch.Tensor, Sequence[torch.Tensor]]) -> torch.Tensor:
    """Return the member logits as one ``[S, B, K]`` tensor, validating the shape."""
    if isinstance(member_logits, (list, tuple)):
        if not member_logits:
            raise ValueError("member_logits is an empty list; pass S >= 1 tensors of shape [B, K].")
        shapes = {tuple(z.shape) for z in member_logits}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(
                f"member_logits must be S tensors of one shape [B, K]; got shapes "
                f"{[tuple(z.shape) for z in member_logits]}.")
        member_logits = torch.stack(list(member_logits))
    if not isinstance(member_logits, torch.Tensor):
        raise ValueError(f"member_logits must be a tensor [S, B, K] or a list of S [B, K]; got "
                         f"{type(member_logits).__name__}.")
    if member_logits.ndim != 3:
        hint = " (a single model's [B, K] logits: use logits.unsqueeze(0))" if member_logits.ndim == 2 else ""
        raise ValueError(f"member_logits must have shape [S, B, K]; got {tuple(member_logits.shape)}{hint}.")
    if not member_logits.is_floating_point():
        raise ValueError(f"member_logits must be floating point; got {member_logits.dtype}.")
    if member_logits.shape[1] == 0 or member_logits.shape[2] == 0:
        raise ValueError(f"member_logits {tuple(member_logits.shape)} is empty (B=0 or K=0): skip empty batches "
                         "before the loss.")
    return member_logits


def _check_target_shape(target: torch.Tensor, batch: int, classes: int) -> None:
    """Validate class-index ``[B]`` or soft ``[B, K]`` targets against logits ``[S, B, K]`` (shapes only)."""
    if not isinstance(target, torch.Tensor):
        raise ValueError(f"target must be a tensor; got {type(target).__name__}.")
    if target.ndim == 1:
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise ValueError(f"class-index targets [B] must be integers; got {target.dtype} "
                             "(soft targets need shape [B, K]).")
        if target.shape[0] != batch:
            raise ValueError(f"target has {target.shape[0]} entries but the logits have batch size {batch}.")
    elif target.ndim == 2 and not target.is_floating_point():
        if target.shape[1] == 1:
            raise ValueError(f"class indices must be [B]; got {tuple(target.shape)}: use target.squeeze(1).")
        raise ValueError(f"soft targets [B, K] must be floating point; got {target.dtype} "
                         "(class indices must be [B]).")
    elif target.ndim == 2:
        if tuple(target.shape) != (batch, classes):
            raise ValueError(f"soft target shape {tuple(target.shape)} does not match the logits' [B, K] = "
                             f"[{batch}, {classes}].")
    else:
        raise ValueError(f"target must be class indices [B] or soft targets [B, K]; got shape "
                         f"{tuple(target.shape)}.")


def _check_target_values(target: torch.Tensor, classes: int, ignore_index: Optional[int]) -> None:
    """Index targets in ``[0, K)`` (or ``ignore_index``); soft targets finite, >= 0, rows summing to 1.

    One host synchronisation for all checks.
    """
    if target.ndim == 1:
        bad = (target < 0) | (target >= classes)
        if ignore_index is not None:
            bad &= target != ignore_index
        if bool(bad.any()):
            raise ValueError(f"class indices must be in [0, {classes}) or ignore_index={ignore_index}; got "
                             f"{target[bad][:5].tolist()}.")
        return
    t = target.float()
    tol = max(1e-3, 2 * torch.finfo(target.dtype).eps)  # mixup + smoothing rows sum to 1 up to rounding
    flags = torch.stack([~torch.isfinite(t).all(), (t < 0).any(), ((t.sum(-1) - 1).abs() > tol).any()]).tolist()
    if flags[0]:
        raise ValueError("soft targets contain NaN or inf.")
    if flags[1]:
        raise ValueError(f"soft targets must be >= 0; got a minimum of {t.min().item():g}.")
    if flags[2]:
        sums = t.sum(-1)
        worst = sums[(sums - 1).abs().argmax()].item()
        raise ValueError(f"soft target rows must sum to 1 (probabilities); a row sums to {worst:g}. "
                         "For multi-label targets use a BCE loss instead.")


def _kl_terms(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``sum_k p * (log p - log q)`` over the last dim; the inputs' log-probabilities are finite (clamped)."""
    return (p * (log_p - log_q)).sum(-1)


def js_divergence(log_probs: torch.Tensor) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence of S distributions, per sample.

    ``JS = H(mean_i p_i) - mean_i H(p_i)``, computed in the equivalent form
    ``mean_i KL(p_i || m)`` with ``log m = logsumexp_i(log p_i) - log S``, which avoids the cancellation of
    two large entropies.

    Args:
        log_probs: Finite log-probabilities ``[S, B, K]`` (``-inf`` clamped to the dtype's lowest value).

    Returns:
        ``[B]``, the divergence of each sample.
    """
    log_mean = torch.logsumexp(log_probs, dim=0) - math.log(log_probs.shape[0])  # [B, K]
    return _kl_terms(log_probs.exp(), log_probs, log_mean).mean(0)


def kl_pairwise(log_probs: torch.Tensor) -> torch.Tensor:
    """The seed's ``kl_seperate``: ``1/(S-1) * sum_i sum_{j != i} KL(p_j || p_i)``, targets ``p_j`` detached.

    In the seed (``model/splitnet.py`` of FreeformRobotics/Divide-and-Co-training) every member ``i`` is
    compared with every other member ``j`` by ``F.kl_div(log_softmax(z_i), softmax(z_j).detach())``, summed
    over classes, averaged over the batch, summed over the ``S * (S - 1)`` ordered pairs and divided by
    ``S - 1``. At S=2 that is ``KL(p_2 || p_1) + KL(p_1 || p_2)``.

    Args:
        log_probs: Finite log-probabilities ``[S, B, K]``, ``S >= 2``.

    Returns:
        ``[B]``, the divergence of each sample (average it over the batch).
    """
    num = log_probs.shape[0]
    target = log_probs.detach()
    p = target.exp()
    total = log_probs.new_zeros(log_probs.shape[1])
    for i in range(num):
        others = [j for j in range(num) if j != i]
        total = total + _kl_terms(p[others], target[others], log_probs[i]).sum(0)
    return total / (num - 1)


def kl_to_mixture(log_probs: torch.Tensor) -> torch.Tensor:
    """``1/S * sum_i KL(q_i || p_i)`` with ``q_i = 1/(S-1) * sum_{j != i} p_j`` detached, per sample.

    Each member is pulled towards the mixture of the others (deep-mutual-learning style); no gradient flows
    into the targets ``q_i``. (This was ``mode='kl'`` before the seed's pairwise form took that name.)

    Args:
        log_probs: Finite log-probabilities ``[S, B, K]``, ``S >= 2``.

    Returns:
        ``[B]``.
    """
    num = log_probs.shape[0]
    detached = log_probs.detach()
    terms = []
    for i in range(num):
        others = torch.cat([detached[:i], detached[i + 1:]])
        log_q = torch.logsumexp(others, dim=0) - math.log(num - 1)
        terms.append(_kl_terms(log_q.exp(), log_q, log_probs[i]))
    return torch.stack(terms).mean(0)


_DIVERGENCES = {"js": js_divergence, "kl": kl_pairwise, "kl_mixture": kl_to_mixture}


class CoTrainingLoss(nn.Module):
    """Sum of the members' cross-entropies plus a warmed-up co-training divergence.

    Args:
        cot_weight: Weight ``w`` of the co-training term after warm-up.
        warmup_epochs: Epochs over which ``w`` ramps linearly from 0 to ``cot_weight`` (0: no warm-up).
        smoothing: Label smoothing of the cross-entropy (as ``F.cross_entropy(label_smoothing=...)`` and
            timm's ``LabelSmoothingCrossEntropy``). With mixup/cutmix, smooth in timm's
            ``Mixup(label_smoothing=...)`` instead and keep 0 here, or targets are smoothed twice.
        mode: ``'js'`` (Jensen-Shannon), ``'kl'`` (the seed's pairwise ``kl_seperate``) or ``'kl_mixture'``
            (KL to the mixture of the others); see the module docstring.
        floor: Lower bound of the warmed-up weight (SplitNet uses 0.005 so the term is never off);
            capped at ``cot_weight``, so ``cot_weight=0`` disables the term.
        ignore_index: Class-index target that marks a sample to leave out of both the cross-entropy and the
            divergence (torch's default -100); ``None``: every index must be a class.
        validate: Check target values (indices in range; soft targets finite, >= 0, rows summing to 1). One
            host synchronisation per call; turn off in a tuned GPU loop once the data pipeline is trusted.

    Two call styles, with ``output`` the member logits ``[S, B, K]`` (or a list of S ``[B, K]``) and
    ``target`` class indices ``[B]`` or soft targets ``[B, K]`` (mixup/cutmix):

    - timm style: ``loss_fn.set_epoch(e)`` (fractional epochs give a smooth warm-up), then
      ``loss = loss_fn(output, target)``, a scalar tensor, like any timm ``loss_fn``;
    - detailed: ``loss_fn(output, target, epoch=e)`` returns a dict of scalar tensors: ``'loss'`` (for
      backward), ``'ce'`` (sum over members) and ``'cot'`` (the weighted co-training term).

    Each member's cross-entropy and the divergence are averaged over the samples that are not ignored (a batch
    with every sample ignored gives 0). Everything is computed in float32 (float64 stays float64), autocast
    disabled. A B=0 batch raises ValueError.
    """

    def __init__(
            self,
            cot_weight: float = 0.5,
            warmup_epochs: float = 40,
            smoothing: float = 0.0,
            mode: str = "js",
            floor: float = 0.005,
            ignore_index: Optional[int] = -100,
            validate: bool = True,
    ) -> None:
        super().__init__()
        self.cot_weight = _number("cot_weight", cot_weight, hint=" (0 disables co-training)")
        self.warmup_epochs = _number("warmup_epochs", warmup_epochs, hint=" (0: no warm-up)")
        self.smoothing = _number("smoothing", smoothing, hint=", below 1, e.g. 0.1")
        if self.smoothing >= 1:
            raise ValueError(f"smoothing must be in [0, 1), e.g. 0.1; got {smoothing}.")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}; got {mode!r}.")
        self.floor = _number("floor", floor)
        if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
            raise ValueError(f"ignore_index must be an int (e.g. -100) or None; got {ignore_index!r}.")
        self.mode = mode
        self.ignore_index = ignore_index
        self.validate = bool(validate)
        self.epoch: Optional[float] = None

    def extra_repr(self) -> str:
        return (f"cot_weight={self.cot_weight}, warmup_epochs={self.warmup_epochs}, smoothing={self.smoothing}, "
                f"mode={self.mode!r}, floor={self.floor}, ignore_index={self.ignore_index}")

    def set_epoch(self, epoch: float) -> None:
        """Set the training progress that the timm-style call ``loss_fn(output, target)`` warms up with.

        Args:
            epoch: Epochs done, ``>= 0``; fractional (``epoch + step / steps_per_epoch``) for a smooth ramp.
        """
        self.epoch = _number("epoch", epoch, hint=" (e.g. loss_fn.set_epoch(epoch))")

    def weight(self, epoch: float) -> float:
        """Co-training weight at ``epoch`` (may be fractional).

        ``max(min(floor, cot_weight), cot_weight * min(1, epoch / warmup_epochs))``.

        Args:
            epoch: Training progress in epochs, ``>= 0``.

        Returns:
            The weight ``w`` of the co-training term.
        """
        epoch = _number("epoch", epoch)
        ramp = 1.0 if self.warmup_epochs == 0 else min(1.0, epoch / self.warmup_epochs)
        return max(min(self.floor, self.cot_weight), self.cot_weight * ramp)

    def _current_weight(self, epoch: Optional[float]) -> float:
        if epoch is not None:
            return self.weight(epoch)
        if self.epoch is None:
            if self.warmup_epochs > 0 and self.cot_weight > 0:
                raise RuntimeError("CoTrainingLoss does not know the epoch: call loss_fn.set_epoch(epoch) before "
                                   "loss_fn(output, target) (the co-training weight warms up over "
                                   f"warmup_epochs={self.warmup_epochs:g}), or pass epoch=.")
            return self.weight(0.0)
        return self.weight(self.epoch)

    def forward(
            self,
            output: Union[torch.Tensor, Sequence[torch.Tensor]],
            target: torch.Tensor,
            epoch: Optional[float] = None,
    ) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
        """Compute the co-training loss.

        Args:
            output: Member logits ``[S, B, K]`` or a list of S ``[B, K]`` tensors.
            target: Class indices ``[B]`` or soft targets ``[B, K]`` (mixup/cutmix).
            epoch: Training progress in epochs for the warm-up; ``None``: the one given to :meth:`set_epoch`.

        Returns:
            Without ``epoch``: the scalar loss tensor (``ce + cot``). With ``epoch``: a dict with ``'loss'``,
            ``'ce'`` and ``'cot'``, all scalar tensors.
        """
        terms = self._terms(output, target, self._current_weight(epoch))
        return terms if epoch is not None else terms["loss"]

    def _terms(self, output, target: torch.Tensor, w: float) -> Dict[str, torch.Tensor]:
        logits = _stack_logits(output)
        num, batch, classes = logits.shape
        _check_target_shape(target, batch, classes)
        if self.validate:
            _check_target_values(target, classes, self.ignore_index)
        dtype = torch.promote_types(logits.dtype, torch.float32)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            # the CE reads the exact log-probabilities (inf where target mass meets a -inf logit, as torch's);
            # the divergences read finite ones: a p=0 class adds 0 (xlogy's convention), no 0 * inf in autograd
            exact = torch.log_softmax(logits.to(dtype), dim=-1)
            log_probs = exact.clamp(min=torch.finfo(dtype).min)
            if target.ndim == 1:
                keep = torch.ones_like(target, dtype=torch.bool)
                if self.ignore_index is not None:
                    keep = target != self.ignore_index
                index = torch.where(keep, target, 0).long()
                nll = -exact.gather(-1, index.view(1, batch, 1).expand(num, batch, 1)).squeeze(-1)  # [S, B]
            else:
                keep = torch.ones(batch, dtype=torch.bool, device=logits.device)
                soft = target.to(dtype)
                nll = -torch.where(soft > 0, soft * exact, 0).sum(-1)
            if self.smoothing:
                nll = (1 - self.smoothing) * nll - self.smoothing * exact.mean(-1)
            weights = keep.to(dtype) / keep.sum().clamp(min=1)  # mean over the kept samples
            ce = (torch.where(keep, nll, 0) * weights).sum()  # sum over members of each one's mean
            if num == 1 or w == 0.0:
                cot = ce.new_zeros(())
            else:
                cot = w * (torch.where(keep, _DIVERGENCES[self.mode](log_probs), 0) * weights).sum()
        return {"loss": ce + cot, "ce": ce, "cot": cot}
