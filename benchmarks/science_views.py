"""Fast tensor-side member views for small images, on whole batches (CPU or GPU); benchmarks/science.py's
(it moved here from ``timm_split.training.views``, the name docs/results.md's pre-registration uses, since only the
science benchmark uses it).

Per member: pad-and-crop, horizontal flip, RandAugment (timm's ``rand-m9-mstd0.5``) and timm-style random
erasing; then mixup with one lambda and one permutation shared by all members. This is not the SplitNet seed's
CIFAR recipe, which uses AutoAugment's CIFAR10 policy and a cutout-like erasing (p 0.5, a square of 6.25-10% of
the area, filled with 0); docs/results.md states the deviation. timm's transforms do the same per PIL image in a
loader (``timm_split.training.data``); this module does it on a ``[B, C, H, W]`` batch that already sits on the
device, which is what a 28 px dataset held in memory (Fashion-MNIST) needs to keep a GPU busy::

    views = BatchViews(2, num_classes=10, mean=(0.2860,), std=(0.3530,))
    x, y = views(images_uint8, labels, generator=g)   # x [2, B, 1, 28, 28] normalised, y [B, 10] soft targets
    logits = ens.forward_members(x)

Every random draw takes an optional ``torch.Generator`` (on the images' device), so a seeded generator gives the
same views on every call sequence. Differences from timm's per-image versions, all documented where they occur:
RandAugment is the subset of timm's ``rand`` policy that is defined on tensors for grey or colour images (Color
is left out: it is the identity on grey images); geometric ops turn about the image centre and fill with 0;
random erasing clamps an oversized box to the image instead of retrying; mixup pairs the batch with a random
permutation (as the seed does) instead of timm's reversed batch.
"""
import logging
import math
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["BatchViews", "pad_crop", "hflip", "rand_augment", "random_erase", "mixup", "RAND_AUGMENT_OPS"]

_logger = logging.getLogger(__name__)

Gen = Optional[torch.Generator]


def _rand(n: int, g: Gen, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device)


def _check_batch(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected an image batch [B, C, H, W]; got {shape} (add a batch dim with x[None]).")


def _check_prob(name: str, p: float) -> float:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1]; got {p}.")
    return float(p)


def pad_crop(x: torch.Tensor, pad: int, generator: Gen = None) -> torch.Tensor:
    """Zero-pad every image by ``pad`` px on each side and take a random crop of the original size.

    The offsets are drawn per image, as ``torchvision.transforms.RandomCrop(size, padding=pad)`` does.

    Args:
        x: Images ``[N, C, H, W]``.
        pad: Padding in pixels, ``>= 0`` (the seed uses 4 at 32 px, 3 at 28 px).
        generator: Random generator on ``x``'s device.

    Returns:
        The cropped images, ``[N, C, H, W]``.
    """
    _check_batch(x)
    if pad < 0:
        raise ValueError(f"pad must be >= 0; got {pad}.")
    if pad == 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None].expand(n, c, h, w + 2 * pad)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :].expand(n, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


def hflip(x: torch.Tensor, prob: float = 0.5, generator: Gen = None) -> torch.Tensor:
    """Flip each image left-right with probability ``prob``.

    Args:
        x: Images ``[N, C, H, W]``.
        prob: Flip probability.
        generator: Random generator on ``x``'s device.

    Returns:
        ``[N, C, H, W]``.
    """
    _check_batch(x)
    flip = _rand(x.shape[0], generator, x.device) < _check_prob("prob", prob)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


# ----------------------------------------------------------------------------------------------------------
# RandAugment ops on [n, C, H, W] images in [0, 1]; ``m`` is the per-image magnitude in [0, 10], ``sign`` +-1.
# Magnitude -> argument follows timm.data.auto_augment (``rand`` policy, _LEVEL_DENOM = 10).

def _quantise(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round()


def _auto_contrast(x, m, sign):
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-12), x)


def _equalize(x, m, sign):
    """PIL's ImageOps.equalize per image and channel, on the 256 grey levels."""
    n, c, h, w = x.shape
    q = _quantise(x).long().reshape(n * c, h * w)
    hist = torch.zeros(n * c, 256, device=x.device).scatter_add_(1, q, torch.ones_like(q, dtype=torch.float))
    last = hist.gather(1, q.amax(1, keepdim=True))  # count of the highest level present
    step = torch.div(h * w - last, 255, rounding_mode="floor")
    before = hist.cumsum(1) - hist
    lut = torch.div(before + torch.div(step, 2, rounding_mode="floor"), step.clamp_min(1), rounding_mode="floor")
    out = lut.clamp(0, 255).gather(1, q) / 255
    return torch.where(step > 0, out, q / 255).reshape(n, c, h, w)


def _invert(x, m, sign):
    return 1 - x


def _posterize(x, m, sign):
    shift = (8 - (m / 10 * 4).floor()).clamp(4, 8)[:, None, None, None]  # keep int(m / 10 * 4) bits
    scale = 2 ** shift
    return torch.div(_quantise(x), scale, rounding_mode="floor") * scale / 255


def _solarize(x, m, sign):
    thresh = (m / 10).clamp(0, 1)[:, None, None, None]  # timm: threshold int(m / 10 * 256) of 256
    return torch.where(x >= thresh, 1 - x, x)


def _solarize_add(x, m, sign):
    add = ((m / 10 * 110).floor() / 255)[:, None, None, None]
    return torch.where(x < 128 / 255, (x + add).clamp(max=1), x)


def _enhance_factor(m):
    return (m / 10 * 1.8 + 0.1)[:, None, None, None]  # timm's _enhance_level_to_arg: 0.1 .. 1.9


def _contrast(x, m, sign):
    mean = x.mean((1, 2, 3), keepdim=True)  # PIL blends with the mean grey level
    return (mean + _enhance_factor(m) * (x - mean)).clamp(0, 1)


def _brightness(x, m, sign):
    return (x * _enhance_factor(m)).clamp(0, 1)


def _sharpness(x, m, sign):
    """PIL's ImageEnhance.Sharpness: blend with the SMOOTH-filtered image (border pixels kept)."""
    c = x.shape[1]
    kernel = torch.tensor([[1., 1., 1.], [1., 5., 1.], [1., 1., 1.]], device=x.device, dtype=x.dtype) / 13
    smooth = F.conv2d(x, kernel.expand(c, 1, 3, 3), groups=c)
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth
    return (degenerate + _enhance_factor(m) * (x - degenerate)).clamp(0, 1)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample with output->input matrices ``theta [n, 2, 3]`` (normalised coords), bilinear, zero fill."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class _Geometric:
    """An affine RandAugment op: ``theta(m, sign)`` gives its output->input matrices, so several geometric ops
    drawn in one layer resample the batch once."""

    def __init__(self, theta: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.theta = theta

    def __call__(self, x, m, sign):
        return _affine(x, self.theta(m, sign))


def _eye(m: torch.Tensor) -> torch.Tensor:
    return torch.eye(2, 3, device=m.device).repeat(m.shape[0], 1, 1)


def _rotate(m, sign):
    a = torch.deg2rad(sign * m / 10 * 30)  # timm: up to 30 degrees
    theta = _eye(m)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = a.cos(), -a.sin(), a.sin(), a.cos()
    return theta


def _shear(dim: int) -> _Geometric:
    def theta_fn(m, sign):
        theta = _eye(m)
        theta[:, dim, 1 - dim] = sign * m / 10 * 0.3  # timm: shear factor up to 0.3
        return theta
    return _Geometric(theta_fn)


def _translate(dim: int) -> _Geometric:
    def theta_fn(m, sign):
        theta = _eye(m)
        theta[:, dim, 2] = sign * m / 10 * 0.45 * 2  # timm's TranslateRel: up to 0.45 of the size (2 = full width)
        return theta
    return _Geometric(theta_fn)


RAND_AUGMENT_OPS = {
    "AutoContrast": _auto_contrast, "Equalize": _equalize, "Invert": _invert, "Rotate": _Geometric(_rotate),
    "Posterize": _posterize, "Solarize": _solarize, "SolarizeAdd": _solarize_add, "Contrast": _contrast,
    "Brightness": _brightness, "Sharpness": _sharpness, "ShearX": _shear(0), "ShearY": _shear(1),
    "TranslateXRel": _translate(0), "TranslateYRel": _translate(1),
}
"""The RandAugment ops, named as in timm's ``rand`` policy (``_RAND_TRANSFORMS`` less ``Color``)."""


def rand_augment(x: torch.Tensor, num_ops: int = 2, magnitude: float = 9.0, magnitude_std: float = 0.5,
                 prob: float = 0.5, ops: Sequence[str] = tuple(RAND_AUGMENT_OPS), generator: Gen = None
                 ) -> torch.Tensor:
    """RandAugment on a batch, every image with its own ops and magnitudes (timm's ``rand-m9-mstd0.5`` rules).

    For each of ``num_ops`` layers, every image draws one op uniformly from ``ops`` (with replacement across
    layers), applies it with probability ``prob``, at magnitude ``N(magnitude, magnitude_std)`` clipped to
    [0, 10], with a random sign for the signed ops. The images sharing an op are processed together.

    Args:
        x: Images ``[N, C, H, W]`` with values in [0, 1] (not normalised).
        num_ops: Ops per image (timm's ``n``).
        magnitude: Magnitude in [0, 10] (timm's ``m``).
        magnitude_std: Per-application magnitude noise (timm's ``mstd``).
        prob: Probability that a drawn op is applied.
        ops: Names from :data:`RAND_AUGMENT_OPS`.
        generator: Random generator on ``x``'s device.

    Returns:
        ``[N, C, H, W]`` in [0, 1].
    """
    _check_batch(x)
    _check_prob("prob", prob)
    unknown = [o for o in ops if o not in RAND_AUGMENT_OPS]
    if unknown or not ops:
        raise ValueError(f"unknown RandAugment ops {unknown or ops!r}; choose from {list(RAND_AUGMENT_OPS)}.")
    if not 0 <= magnitude <= 10 or magnitude_std < 0 or num_ops < 0:
        raise ValueError(f"need 0 <= magnitude <= 10, magnitude_std >= 0, num_ops >= 0; got {magnitude}, "
                         f"{magnitude_std}, {num_ops}.")
    fns: List[Callable] = [RAND_AUGMENT_OPS[o] for o in ops]
    n, dev = x.shape[0], x.device
    for _ in range(num_ops):
        choice = torch.randint(len(fns), (n,), generator=generator, device=dev)
        choice = torch.where(_rand(n, generator, dev) < prob, choice, -1)
        m = (magnitude + magnitude_std * torch.randn(n, generator=generator, device=dev)).clamp(0, 10)
        sign = torch.where(_rand(n, generator, dev) < 0.5, -1.0, 1.0)
        out = x.clone()
        theta, geometric = _eye(m), torch.zeros(n, dtype=torch.bool, device=dev)
        for k, fn in enumerate(fns):
            if isinstance(fn, _Geometric):  # collected: one resampling for all geometric ops of this layer
                theta = torch.where((choice == k)[:, None, None], fn.theta(m, sign), theta)
                geometric |= choice == k
                continue
            idx = (choice == k).nonzero().squeeze(1)
            if idx.numel():
                out[idx] = fn(x[idx], m[idx], sign[idx]).to(x.dtype)
        idx = geometric.nonzero().squeeze(1)
        if idx.numel():
            out[idx] = _affine(x[idx], theta[idx]).to(x.dtype)
        x = out
    return x


def random_erase(x: torch.Tensor, prob: float = 0.25, area: Tuple[float, float] = (0.02, 1 / 3),
                 aspect: Tuple[float, float] = (0.3, 3.3), generator: Gen = None) -> torch.Tensor:
    """Random erasing (Zhong et al.; timm's ``mode='pixel'``): one box per image of per-pixel N(0, 1) noise.

    Apply it after normalisation (the noise is in normalised units). Box area uniform in ``area`` (fraction
    of the image), aspect log-uniform in ``aspect``; a box larger than the image is clamped to it (timm
    retries up to 10 times instead).

    Args:
        x: Normalised images ``[N, C, H, W]``.
        prob: Probability that an image gets a box.
        area: (min, max) box area as a fraction of the image.
        aspect: (min, max) box aspect ratio h / w.
        generator: Random generator on ``x``'s device.

    Returns:
        ``[N, C, H, W]``.
    """
    _check_batch(x)
    _check_prob("prob", prob)
    if not 0 < area[0] <= area[1] <= 1 or not 0 < aspect[0] <= aspect[1]:
        raise ValueError(f"need 0 < area[0] <= area[1] <= 1 and 0 < aspect[0] <= aspect[1]; got {area}, {aspect}.")
    n, _, h, w = x.shape
    dev = x.device
    apply = _rand(n, generator, dev) < prob
    size = (area[0] + _rand(n, generator, dev) * (area[1] - area[0])) * h * w
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    ratio = torch.exp(log_lo + _rand(n, generator, dev) * (log_hi - log_lo))
    bh = (size * ratio).sqrt().round().clamp(1, h)
    bw = (size / ratio).sqrt().round().clamp(1, w)
    top = (_rand(n, generator, dev) * (h - bh + 1)).floor()
    left = (_rand(n, generator, dev) * (w - bw + 1)).floor()
    rows, cols = torch.arange(h, device=dev), torch.arange(w, device=dev)
    in_rows = (rows >= top[:, None]) & (rows < (top + bh)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + bw)[:, None])
    box = (in_rows[:, :, None] & in_cols[:, None, :] & apply[:, None, None])[:, None]
    noise = torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype)
    return torch.where(box, noise, x)


def mixup(views: torch.Tensor, target: torch.Tensor, num_classes: int, alpha: float = 0.2,
          generator: Gen = None) -> Tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
    """Mixup with one lambda and one permutation shared by every member's view (the seed's ``mixup_data``).

    ``views[s] <- lam * views[s] + (1 - lam) * views[s][perm]`` for every member ``s``, and one soft target
    ``lam * onehot(y) + (1 - lam) * onehot(y[perm])``.

    Args:
        views: Member views ``[S, B, C, H, W]``.
        target: Class indices ``[B]``.
        num_classes: K.
        alpha: Beta(alpha, alpha) parameter; 0 disables mixing (lam = 1, identity permutation).
        generator: Random generator on the views' device.

    Returns:
        ``(mixed views [S, B, C, H, W], soft targets [B, K], lam, perm [B])``.
    """
    if views.ndim != 5:
        raise ValueError(f"views must be [S, B, C, H, W]; got {tuple(views.shape)} (a single view: x[None]).")
    if target.ndim != 1 or target.shape[0] != views.shape[1] or target.is_floating_point():
        raise ValueError(f"target must be class indices [B] with B = {views.shape[1]}; got "
                         f"{target.dtype}{tuple(target.shape)}.")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0 (0: no mixup; the seed uses 0.2); got {alpha}.")
    b, dev = views.shape[1], views.device
    onehot = F.one_hot(target, num_classes).to(views.dtype)
    if alpha == 0:
        return views, onehot, 1.0, torch.arange(b, device=dev)
    seed = int(torch.randint(2 ** 62, (1,), generator=generator, device=dev))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    perm = torch.randperm(b, generator=generator, device=dev)
    mixed = views * lam + views[:, perm] * (1 - lam)
    return mixed, onehot * lam + onehot[perm] * (1 - lam), lam, perm


class BatchViews:
    """S independently augmented views of a batch, then mixup shared by the members.

    Per member and image: zero-pad ``pad`` px and random-crop, flip with ``hflip``, RandAugment
    (:func:`rand_augment`), normalise with ``mean``/``std``, random erasing (:func:`random_erase`). Then
    :func:`mixup` with one lambda and one permutation for all members. All S views are produced in one pass over
    an ``S * B`` batch.

    Args:
        num_views: S, the number of members.
        num_classes: K, for the soft targets.
        mean: Per-channel mean of the [0, 1] images.
        std: Per-channel std.
        pad: Pad-and-crop padding in px; None: ``H // 8`` at call time (3 at 28 px, 4 at 32 px, as the seed).
        hflip: Flip probability.
        ra_ops: RandAugment ops per image (0 disables RandAugment).
        ra_magnitude: RandAugment magnitude in [0, 10].
        ra_magnitude_std: Per-application magnitude noise.
        ra_prob: Probability that a drawn op is applied.
        re_prob: Random-erasing probability (0 disables it).
        mixup_alpha: Beta(alpha, alpha) of mixup (0 disables it: one-hot targets).
        same_view: Ablation: augment once and give every member that view.

    Call ``views(images, target, generator=None)`` with ``images`` ``[B, C, H, W]`` (uint8 in 0..255 or float in
    [0, 1]) and class indices ``target [B]``; it returns ``(views [S, B, C, H, W] float32, soft targets [B, K])``.
    :meth:`normalise` gives the clean (test-time) batch.
    """

    def __init__(self, num_views: int, *, num_classes: int, mean: Sequence[float], std: Sequence[float],
                 pad: Optional[int] = None, hflip: float = 0.5, ra_ops: int = 2, ra_magnitude: float = 9.0,
                 ra_magnitude_std: float = 0.5, ra_prob: float = 0.5, re_prob: float = 0.25,
                 mixup_alpha: float = 0.2, same_view: bool = False) -> None:
        if isinstance(num_views, bool) or not isinstance(num_views, int) or num_views < 1:
            raise ValueError(f"num_views must be an int >= 1 (the split factor S); got {num_views!r}.")
        if num_classes < 2 or len(mean) != len(std) or min(std) <= 0:
            raise ValueError(f"need num_classes >= 2 and one positive std per mean; got {num_classes}, {mean}, "
                             f"{std}.")
        if pad is not None and pad < 0 or mixup_alpha < 0 or ra_ops < 0:
            raise ValueError(f"pad, ra_ops and mixup_alpha must be >= 0; got {pad}, {ra_ops}, {mixup_alpha}.")
        self.num_views, self.num_classes = num_views, int(num_classes)
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self.pad, self.hflip = pad, _check_prob("hflip", hflip)
        self.ra_ops, self.ra_magnitude, self.ra_magnitude_std = int(ra_ops), float(ra_magnitude), ra_magnitude_std
        self.ra_prob, self.re_prob = _check_prob("ra_prob", ra_prob), _check_prob("re_prob", re_prob)
        self.mixup_alpha, self.same_view = float(mixup_alpha), bool(same_view)
        if self.ra_ops and not 0 <= self.ra_magnitude <= 10:
            raise ValueError(f"ra_magnitude must be in [0, 10] (timm's m, e.g. 9); got {ra_magnitude}.")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_views={self.num_views}, pad={self.pad}, hflip={self.hflip}, "
                f"rand_augment=n{self.ra_ops}-m{self.ra_magnitude:g}-mstd{self.ra_magnitude_std:g}-p{self.ra_prob:g}, "
                f"re_prob={self.re_prob}, mixup_alpha={self.mixup_alpha}, same_view={self.same_view})")

    def _unit(self, images: torch.Tensor) -> torch.Tensor:
        _check_batch(images)
        if images.shape[1] != len(self.mean):
            raise ValueError(f"images have {images.shape[1]} channels but mean/std have {len(self.mean)}.")
        return images.float() / 255 if images.dtype == torch.uint8 else images.float()

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """The clean batch: ``[B, C, H, W]`` (uint8 or [0, 1] float) to normalised float32."""
        x = self._unit(images)
        mean = torch.tensor(self.mean, device=x.device)[:, None, None]
        std = torch.tensor(self.std, device=x.device)[:, None, None]
        return (x - mean) / std

    def __call__(self, images: torch.Tensor, target: torch.Tensor, generator: Gen = None
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Augment ``images [B, C, H, W]`` into S member views and mix them; see the class docstring."""
        x = self._unit(images)
        b = x.shape[0]
        copies = 1 if self.same_view else self.num_views
        x = x.repeat(copies, 1, 1, 1)
        x = pad_crop(x, x.shape[-2] // 8 if self.pad is None else self.pad, generator)
        if self.hflip:
            x = hflip(x, self.hflip, generator)
        if self.ra_ops:
            x = rand_augment(x, self.ra_ops, self.ra_magnitude, self.ra_magnitude_std, self.ra_prob,
                             generator=generator)
        x = self.normalise(x)
        if self.re_prob:
            x = random_erase(x, self.re_prob, generator=generator)
        views = x.reshape(copies, b, *x.shape[1:]).expand(self.num_views, -1, -1, -1, -1)
        views, soft, _, _ = mixup(views, target, self.num_classes, self.mixup_alpha, generator)
        return views.contiguous(), soft
