"""Co-training loss for S split members (SplitNet, "Divide and Co-training").

The total loss is the sum of every member's cross-entropy plus a weighted divergence that pulls the
members' predictions together::

    loss = sum_i CE(z_i, y) + w(epoch) * D(p_1, ..., p_S)

where ``p_i = softmax(z_i)`` and ``D`` is the Jensen-Shannon divergence (``mode='js'``) or a mean
KL divergence to the detached mean of the other members (``mode='kl'``).
"""
import logging
import math
from typing import Dict, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CoTrainingLoss"]

_logger = logging.getLogger(__name__)

_MODES = ("js", "kl")


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
    return member_logits


def _check_target(target: torch.Tensor, batch: int, classes: int) -> None:
    """Validate class-index ``[B]`` or soft ``[B, K]`` targets against logits ``[S, B, K]``."""
    if not isinstance(target, torch.Tensor):
        raise ValueError(f"target must be a tensor; got {type(target).__name__}.")
    if target.ndim == 1:
        if target.is_floating_point() or target.is_complex():
            raise ValueError(f"class-index targets [B] must be integers; got {target.dtype} "
                             "(soft targets need shape [B, K]).")
        if target.shape[0] != batch:
            raise ValueError(f"target has {target.shape[0]} entries but the logits have batch size {batch}.")
    elif target.ndim == 2:
        if not target.is_floating_point():
            raise ValueError(f"soft targets [B, K] must be floating point; got {target.dtype}.")
        if tuple(target.shape) != (batch, classes):
            raise ValueError(f"soft target shape {tuple(target.shape)} does not match the logits' [B, K] = "
                             f"[{batch}, {classes}].")
    else:
        raise ValueError(f"target must be class indices [B] or soft targets [B, K]; got shape "
                         f"{tuple(target.shape)}.")


def js_divergence(log_probs: torch.Tensor) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence of S distributions, averaged over the batch.

    ``JS = H(mean_i p_i) - mean_i H(p_i)``, computed in the equivalent form
    ``mean_i KL(p_i || m)`` with ``log m = logsumexp_i(log p_i) - log S``, which never takes ``log(0)``
    and avoids the cancellation of two large entropies.

    Args:
        log_probs: Log-probabilities ``[S, B, K]`` (e.g. ``log_softmax(logits, -1)``).

    Returns:
        Scalar tensor, the per-sample divergence averaged over ``B``.
    """
    num = log_probs.shape[0]
    log_mean = torch.logsumexp(log_probs, dim=0) - math.log(num)  # [B, K]
    kl = (log_probs.exp() * (log_probs - log_mean)).sum(-1)  # [S, B]: KL(p_i || m)
    return kl.mean(0).mean()


def kl_to_others(log_probs: torch.Tensor) -> torch.Tensor:
    """Mean KL from the detached mean of the other members to each member.

    ``D = 1/S * sum_i mean_b KL(q_i || p_i)`` with ``q_i = 1/(S-1) * sum_{j != i} p_j`` detached, so
    each member is pulled towards the others (deep-mutual-learning style) and no gradient flows into
    the targets ``q_i``.

    Args:
        log_probs: Log-probabilities ``[S, B, K]``, ``S >= 2``.

    Returns:
        Scalar tensor.
    """
    num = log_probs.shape[0]
    detached = log_probs.detach()
    terms = []
    for i in range(num):
        others = torch.cat([detached[:i], detached[i + 1:]])
        log_q = torch.logsumexp(others, dim=0) - math.log(num - 1)
        terms.append(F.kl_div(log_probs[i], log_q, reduction="batchmean", log_target=True))
    return torch.stack(terms).mean()


class CoTrainingLoss(nn.Module):
    """Sum of the members' cross-entropies plus a warmed-up co-training divergence.

    Args:
        cot_weight: Weight ``w`` of the co-training term after warm-up.
        warmup_epochs: Epochs over which ``w`` ramps linearly from 0 to ``cot_weight`` (0: no warm-up).
        smoothing: Label smoothing of the cross-entropy (``F.cross_entropy(label_smoothing=...)``,
            the same as timm's ``LabelSmoothingCrossEntropy``). With mixup/cutmix, smooth in timm's
            ``Mixup(label_smoothing=...)`` instead and keep 0 here, or targets are smoothed twice.
        mode: ``'js'``: Jensen-Shannon divergence ``H(mean_i p_i) - mean_i H(p_i)``; ``'kl'``:
            ``1/S sum_i KL(q_i || p_i)`` with ``q_i`` the detached mean of the other members.
        floor: Lower bound of the warmed-up weight (SplitNet uses 0.005 so the term is never off);
            capped at ``cot_weight``, so ``cot_weight=0`` disables the term.

    Call ``loss_fn(member_logits, target, epoch=e)`` with ``member_logits`` ``[S, B, K]`` (or a list of
    S ``[B, K]``) and ``target`` class indices ``[B]`` or soft targets ``[B, K]``. Returns a dict of
    scalar tensors: ``'loss'`` (for backward), ``'ce'`` (sum over members) and ``'cot'`` (the weighted
    co-training term). Everything is computed in float32 (float64 stays float64), autocast disabled.
    """

    def __init__(
            self,
            cot_weight: float = 0.5,
            warmup_epochs: float = 40,
            smoothing: float = 0.0,
            mode: str = "js",
            floor: float = 0.005,
    ) -> None:
        super().__init__()
        if cot_weight < 0:
            raise ValueError(f"cot_weight must be >= 0 (0 disables co-training); got {cot_weight}.")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0 (0: no warm-up); got {warmup_epochs}.")
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), e.g. 0.1; got {smoothing}.")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}; got {mode!r}.")
        if floor < 0:
            raise ValueError(f"floor must be >= 0; got {floor}.")
        self.cot_weight = float(cot_weight)
        self.warmup_epochs = float(warmup_epochs)
        self.smoothing = float(smoothing)
        self.mode = mode
        self.floor = float(floor)

    def extra_repr(self) -> str:
        return (f"cot_weight={self.cot_weight}, warmup_epochs={self.warmup_epochs}, smoothing={self.smoothing}, "
                f"mode={self.mode!r}, floor={self.floor}")

    def weight(self, epoch: float) -> float:
        """Co-training weight at ``epoch`` (may be fractional).

        ``max(min(floor, cot_weight), cot_weight * min(1, epoch / warmup_epochs))``.

        Args:
            epoch: Training progress in epochs, ``>= 0``.

        Returns:
            The weight ``w`` of the co-training term.
        """
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0; got {epoch}.")
        ramp = 1.0 if self.warmup_epochs == 0 else min(1.0, epoch / self.warmup_epochs)
        return max(min(self.floor, self.cot_weight), self.cot_weight * ramp)

    def forward(
            self,
            member_logits: Union[torch.Tensor, Sequence[torch.Tensor]],
            target: torch.Tensor,
            epoch: float,
    ) -> Dict[str, torch.Tensor]:
        """Compute the co-training loss.

        Args:
            member_logits: ``[S, B, K]`` tensor or a list of S ``[B, K]`` tensors.
            target: Class indices ``[B]`` or soft targets ``[B, K]`` (mixup/cutmix).
            epoch: Training progress in epochs (fractional allowed) for the warm-up of the weight.

        Returns:
            Dict with ``'loss'`` (``ce + cot``), ``'ce'`` and ``'cot'``, all scalar tensors.
        """
        logits = _stack_logits(member_logits)
        num, batch, classes = logits.shape
        _check_target(target, batch, classes)
        w = self.weight(epoch)
        dtype = torch.promote_types(logits.dtype, torch.float32)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits = logits.to(dtype)
            if target.is_floating_point():
                target = target.to(dtype)
            flat_target = target.repeat(num) if target.ndim == 1 else target.repeat(num, 1)
            # mean over S*B samples times S == sum over members of each member's batch-mean CE
            ce = F.cross_entropy(logits.reshape(num * batch, classes), flat_target,
                                 label_smoothing=self.smoothing) * num
            if num == 1 or w == 0.0:
                cot = ce.new_zeros(())
            else:
                log_probs = F.log_softmax(logits, dim=-1)
                div = js_divergence(log_probs) if self.mode == "js" else kl_to_others(log_probs)
                cot = w * div
        return {"loss": ce + cot, "ce": ce, "cot": cot}
