"""Data helpers: one independently augmented view per member, and a Fashion-MNIST IDX dataset.

Two ways to feed ``[S, B, C, H, W]`` member views to a model:

* Plain ``torch.utils.data.DataLoader``: set ``dataset.transform = create_member_transform(S, input_size=...,
  is_training=True, ...)`` and pass ``collate_fn=collate_member_views``.
* timm's ``create_loader``: it overwrites ``dataset.transform`` with its own ``create_transform(...)``, so wrap
  the dataset in :class:`MemberViewsDataset` (which applies whatever transform is assigned S times) and pass
  ``collate_fn=collate_member_views``. With ``use_prefetcher=False`` everything (random erasing included) runs
  per view in the transform. With ``use_prefetcher=True`` the views stay uint8 until ``PrefetchLoader``
  normalises the 5-d batch on the device (its ``(1, C, 1, 1)`` mean/std broadcast); keep ``re_prob=0`` there,
  since the prefetcher's random erasing only accepts 4-d batches.
"""
import gzip
import logging
import os
import struct
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate
from timm.data import create_transform

__all__ = [
    "MemberViews", "create_member_transform", "collate_member_views", "MemberViewsDataset",
    "FashionMNIST", "read_idx", "write_idx",
]

_logger = logging.getLogger(__name__)


def _check_num_views(num_views: int) -> int:
    if isinstance(num_views, bool) or not isinstance(num_views, (int, np.integer)) or num_views < 1:
        raise ValueError(f"num_views must be an integer >= 1 (the split factor S); got {num_views!r}.")
    return int(num_views)


class MemberViews:
    """Apply a (random) transform independently ``num_views`` times to one sample.

    Args:
        transform: Callable returning a ``[C, H, W]`` tensor (or array) for one sample.
        num_views: Number of views S (one per member), ``>= 1``.
        same_view: Transform once and repeat that view S times (ablation: no view diversity).

    Calling it returns a ``[S, C, H, W]`` tensor (dtype of the transform's output, uint8 for timm's
    ``use_prefetcher=True`` transforms).
    """

    def __init__(self, transform: Callable[[Any], Any], num_views: int, same_view: bool = False) -> None:
        if not callable(transform):
            raise ValueError(f"transform must be callable; got {type(transform).__name__} "
                             "(create_transform(separate=True) returns a tuple; use separate=False).")
        self.transform = transform
        self.num_views = _check_num_views(num_views)
        self.same_view = bool(same_view)

    def __call__(self, sample: Any) -> torch.Tensor:
        if self.same_view:
            view = torch.as_tensor(self.transform(sample))
            return view.unsqueeze(0).repeat(self.num_views, *([1] * view.ndim))
        return torch.stack([torch.as_tensor(self.transform(sample)) for _ in range(self.num_views)])

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(num_views={self.num_views}, same_view={self.same_view}, "
                f"transform={self.transform!r})")


def create_member_transform(num_views: int, same_view: bool = False, **kwargs: Any) -> MemberViews:
    """Build :class:`MemberViews` on ``timm.data.create_transform(**kwargs)``.

    The kwargs configure the per-view augmentation as in timm: ``input_size``, ``scale``/``ratio``
    (random-resized-crop), ``hflip``, ``color_jitter``, ``auto_augment`` (``'rand-m9-mstd0.5'``,
    ``'original'``, ...), ``re_prob`` (random erasing), ``mean``/``std``, ``use_prefetcher``...
    ``is_training`` defaults to True here (timm's default, False, gives identical eval views).

    Args:
        num_views: Number of views S, one per member.
        same_view: Repeat one view S times (ablation).
        **kwargs: Passed to ``timm.data.create_transform``.

    Returns:
        The member-views transform.
    """
    num_views = _check_num_views(num_views)
    kwargs.setdefault("is_training", True)
    if kwargs.get("separate", False):
        raise ValueError("separate=True is not supported: MemberViews needs one callable transform.")
    if (not kwargs["is_training"] or kwargs.get("no_aug", False)) and num_views > 1 and not same_view:
        _logger.info("create_member_transform: deterministic transform (is_training=False or no_aug=True); "
                     "all %d views will be identical.", num_views)
    return MemberViews(create_transform(**kwargs), num_views, same_view=same_view)


def collate_member_views(batch: Sequence[Tuple[Any, Any]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Collate ``(views, target)`` samples into ``(images [S, B, C, H, W], targets [B])``.

    ``views`` is a ``[S, C, H, W]`` tensor or array (as from :class:`MemberViews`) or a list/tuple of S
    ``[C, H, W]`` views; the image dtype is kept (uint8 stays uint8 for timm's prefetcher). Targets are
    collated with ``default_collate`` (class indices give ``[B]`` int64, soft targets ``[B, K]``).

    Args:
        batch: List of ``(views, target)`` pairs.

    Returns:
        ``(images, targets)``.
    """
    if not batch:
        raise ValueError("collate_member_views got an empty batch.")
    views: List[torch.Tensor] = []
    for i, sample in enumerate(batch):
        if not isinstance(sample, (tuple, list)) or len(sample) != 2:
            raise ValueError(f"sample {i} must be a (views, target) pair; got {type(sample).__name__}.")
        v = sample[0]
        v = torch.stack([torch.as_tensor(x) for x in v]) if isinstance(v, (tuple, list)) else torch.as_tensor(v)
        if v.ndim < 2:
            raise ValueError(f"sample {i}: views must be [S, C, H, W] (use MemberViews as the dataset transform); "
                             f"got shape {tuple(v.shape)}.")
        if views and v.shape != views[0].shape:
            raise ValueError(f"sample {i}: views of shape {tuple(v.shape)} differ from sample 0's "
                             f"{tuple(views[0].shape)}; every sample needs the same S and image size.")
        views.append(v)
    images = torch.stack(views, dim=1)  # [S, B, ...]
    targets = default_collate([sample[1] for sample in batch])
    return images, targets


class MemberViewsDataset(Dataset):
    """Dataset wrapper that turns any transform assigned to ``.transform`` into :class:`MemberViews`.

    Meant for timm's ``create_loader``, which assigns ``dataset.transform = create_transform(...)``:
    with this wrapper that transform runs ``num_views`` times per sample. Use with
    ``collate_fn=collate_member_views``.

    Args:
        dataset: A map-style dataset with a ``transform`` attribute (timm ``ImageDataset``,
            torchvision datasets, :class:`FashionMNIST`).
        num_views: Number of views S.
        same_view: Repeat one view S times (ablation).
    """

    def __init__(self, dataset: Dataset, num_views: int, same_view: bool = False) -> None:
        if not hasattr(dataset, "transform"):
            raise ValueError(f"{type(dataset).__name__} has no 'transform' attribute to wrap.")
        self.dataset = dataset
        self.num_views = _check_num_views(num_views)
        self.same_view = bool(same_view)
        self.transform = dataset.transform

    @property
    def transform(self) -> Optional[Callable[[Any], Any]]:
        """The wrapped dataset's transform (a :class:`MemberViews`, or None)."""
        return self.dataset.transform

    @transform.setter
    def transform(self, transform: Optional[Callable[[Any], Any]]) -> None:
        if transform is not None and not isinstance(transform, MemberViews):
            transform = MemberViews(transform, self.num_views, same_view=self.same_view)
        self.dataset.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]


# ----------------------------------------------------------------------------------------------------------
# IDX files (MNIST / Fashion-MNIST format)

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}
_IDX_CODES = {dt.newbyteorder("="): code for code, dt in _IDX_DTYPES.items()}


def _open(path: str, mode: str):
    return gzip.open(path, mode) if path.endswith(".gz") else open(path, mode)


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (``.gz`` decompressed on the fly) into a native-endian numpy array.

    Args:
        path: File path.

    Returns:
        The array, of the dtype and shape recorded in the header.
    """
    with _open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4]!r}).")
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path}: {len(data)} bytes, but header shape {shape} of {dtype} needs {expected} "
                         "(truncated download?).")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file, gzip-compressed if ``path`` ends with ``.gz``.

    Args:
        path: File path.
        array: uint8, int8, int16, int32, float32 or float64 array with at least one dimension.
    """
    array = np.asarray(array)
    code = _IDX_CODES.get(array.dtype.newbyteorder("="))
    if code is None or array.ndim < 1:
        raise ValueError(f"IDX holds 1+-d uint8/int8/int16/int32/float32/float64 arrays; got "
                         f"{array.dtype} with shape {array.shape}.")
    big = array.astype(_IDX_DTYPES[code], copy=False)
    with _open(path, "wb") as f:
        f.write(bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape))
        f.write(np.ascontiguousarray(big).tobytes())


class FashionMNIST(Dataset):
    """Fashion-MNIST from its IDX files (as installed by the Debian package ``dataset-fashion-mnist``).

    Reads ``{train,t10k}-{images-idx3,labels-idx1}-ubyte`` with or without ``.gz`` from ``root``.
    Samples are ``(image, label)``: a 28x28 PIL image of mode ``'L'`` (or ``transform(image)``) and an int.

    Args:
        root: Directory of the IDX files.
        train: The 60000-image training split (else the 10000-image test split).
        transform: Optional callable applied to the PIL image.

    Attributes:
        data: uint8 array ``[N, 28, 28]``.
        targets: int64 array ``[N]``.
        classes: The ten class names.
    """

    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot"]

    def __init__(self, root: str = "/usr/share/datasets/fashion-mnist", train: bool = True,
                 transform: Optional[Callable[[Image.Image], Any]] = None) -> None:
        self.root = os.fspath(root)
        self.train = train
        self.transform = transform
        split = "train" if train else "t10k"
        self.data = read_idx(self._find(f"{split}-images-idx3-ubyte"))
        self.targets = read_idx(self._find(f"{split}-labels-idx1-ubyte")).astype(np.int64)
        if self.data.ndim != 3 or self.data.dtype != np.uint8 or len(self.data) != len(self.targets):
            raise ValueError(f"{self.root}: expected uint8 images [N, H, W] and N labels; got images "
                             f"{self.data.dtype}{self.data.shape}, {len(self.targets)} labels.")
        _logger.debug("FashionMNIST %s: %d samples from %s", split, len(self.targets), self.root)

    def _find(self, name: str) -> str:
        for candidate in (name + ".gz", name):
            path = os.path.join(self.root, candidate)
            if os.path.isfile(path):
                return path
        raise FileNotFoundError(
            f"Fashion-MNIST file {name}[.gz] not found in {self.root}. Install it with "
            "`apt-get update && apt-get install dataset-fashion-mnist` (files go to "
            "/usr/share/datasets/fashion-mnist) or pass --data-dir pointing to a directory with the IDX files.")

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        image = Image.fromarray(self.data[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(root={self.root!r}, train={self.train}, n={len(self)})"
