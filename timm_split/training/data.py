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
import json
import logging
import os
import struct
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate
from timm.data import ImageDataset, create_transform
from timm.data.readers.reader import Reader

from ..checks import atomic_write

__all__ = [
    "MemberViews", "create_member_transform", "collate_member_views", "MemberViewsDataset",
    "FashionMNIST", "read_idx", "write_idx", "create_datasets", "export_fashion_mnist", "create_member_loader",
    "create_eval_loader", "MemberBatchAugment", "is_fashion_mnist", "class_names", "split_folder",
    "check_same_classes", "class_difference", "create_eval_dataset", "EXPORT_MARKER", "create_ood_dataset",
    "image_files", "check_ood_distinct_files", "data_sources", "FASHION_MNIST_CLASSES", "canonical_class_names",
    "set_image_mode",
]

_logger = logging.getLogger(__name__)


def _check_split_factor(split_factor: int) -> int:
    if isinstance(split_factor, bool) or not isinstance(split_factor, (int, np.integer)) or split_factor < 1:
        raise ValueError(f"split_factor must be an integer >= 1 (the split factor S); got {split_factor!r}.")
    return int(split_factor)


_LAYOUTS = {3: "[C, H, W] (one view)", 4: "[S, C, H, W] (one image's views)", 5: "[S, B, C, H, W] (a batch)"}


def check_member_views(views: Any, ndim: int, split_factor: Optional[int] = None, what: str = "views"
                       ) -> torch.Tensor:
    """The member views' contract, checked in one place: a tensor of ``ndim`` dims (3: ``[C, H, W]``, 4:
    ``[S, C, H, W]``, 5: ``[S, B, C, H, W]``), real-valued (uint8 or floating point in practice; not bool or
    complex), not empty, with ``split_factor`` views.

    Args:
        views: a tensor or numpy array (a list/tuple of per-member tensors is stacked).
        ndim: the dims expected.
        split_factor: S, where known (the leading dim for ``ndim`` 4 and 5).
        what: how the message names it (``'sample 3'``, ``"the transform's output"``).

    Returns:
        ``views`` as a tensor.

    Raises:
        ValueError: the message names what was given and the layout expected.
    """
    if isinstance(views, (list, tuple)) and ndim > 3:
        views = [check_member_views(v, ndim - 1, None, f"{what}[{i}]") for i, v in enumerate(views)]
        shapes = {tuple(v.shape) for v in views}
        if len(shapes) > 1 or not views:
            raise ValueError(f"{what}: the per-member views have shapes {sorted(shapes)}; all need one shape")
        views = torch.stack(views)
    elif isinstance(views, np.ndarray):
        views = torch.from_numpy(np.ascontiguousarray(views))
    if not isinstance(views, torch.Tensor):
        raise ValueError(f"{what} must be a tensor {_LAYOUTS[ndim]}, got {type(views).__name__} (a transform must end "
                         "in a tensor: timm's create_transform, or torchvision's ToTensor)")
    if views.ndim != ndim:
        raise ValueError(f"{what} must be {_LAYOUTS[ndim]}; got shape {tuple(views.shape)}")
    if views.dtype == torch.bool or views.dtype.is_complex:
        raise ValueError(f"{what} must be real-valued images (uint8 from timm's prefetcher transforms, else floating "
                         f"point); got {views.dtype}")
    if views.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(views.shape)})")
    if split_factor is not None and ndim >= 4 and views.shape[0] != split_factor:
        raise ValueError(f"{what} has {views.shape[0]} views for {split_factor} members (shape "
                         f"{tuple(views.shape)}, {_LAYOUTS[ndim]})")
    return views


class MemberViews:
    """Apply a (random) transform independently ``split_factor`` times to one sample.

    Args:
        transform: Callable returning a ``[C, H, W]`` tensor (or array) for one sample.
        split_factor: Number of views S (one per member), ``>= 1``.
        same_view: Transform once and repeat that view S times (ablation: no view diversity).

    Calling it returns a ``[S, C, H, W]`` tensor (dtype of the transform's output, uint8 for timm's
    ``use_prefetcher=True`` transforms).
    """

    def __init__(self, transform: Callable[[Any], Any], split_factor: int, same_view: bool = False) -> None:
        if not callable(transform):
            raise ValueError(f"transform must be callable; got {type(transform).__name__} "
                             "(create_transform(separate=True) returns a tuple; use separate=False).")
        self.transform = transform
        self.split_factor = _check_split_factor(split_factor)
        self.same_view = bool(same_view)

    def __call__(self, sample: Any) -> torch.Tensor:
        if self.same_view:
            view = check_member_views(self.transform(sample), 3, what="the transform's output")
            return view.unsqueeze(0).repeat(self.split_factor, *([1] * view.ndim))
        return torch.stack([check_member_views(self.transform(sample), 3, what="the transform's output")
                            for _ in range(self.split_factor)])

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(split_factor={self.split_factor}, same_view={self.same_view}, "
                f"transform={self.transform!r})")


def create_member_transform(split_factor: int, same_view: bool = False, **kwargs: Any) -> MemberViews:
    """Build :class:`MemberViews` on ``timm.data.create_transform(**kwargs)``.

    The kwargs configure the per-view augmentation as in timm: ``input_size``, ``scale``/``ratio``
    (random-resized-crop), ``hflip``, ``color_jitter``, ``auto_augment`` (``'rand-m9-mstd0.5'``,
    ``'original'``, ...), ``re_prob`` (random erasing), ``mean``/``std``, ``use_prefetcher``...
    ``is_training`` defaults to True here (timm's default, False, gives identical eval views).

    Args:
        split_factor: Number of views S, one per member.
        same_view: Repeat one view S times (ablation).
        **kwargs: Passed to ``timm.data.create_transform``.

    Returns:
        The member-views transform.
    """
    split_factor = _check_split_factor(split_factor)
    kwargs.setdefault("is_training", True)
    if kwargs.get("separate", False):
        raise ValueError("separate=True is not supported: MemberViews needs one callable transform.")
    if (not kwargs["is_training"] or kwargs.get("no_aug", False)) and split_factor > 1 and not same_view:
        _logger.info("create_member_transform: deterministic transform (is_training=False or no_aug=True); "
                     "all %d views will be identical.", split_factor)
    return MemberViews(create_transform(**kwargs), split_factor, same_view=same_view)


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
        try:
            v = check_member_views(sample[0], 4, what=f"sample {i}'s views")
        except ValueError as e:
            raise ValueError(f"{e} (use MemberViews as the dataset transform)") from None
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
    with this wrapper that transform runs ``split_factor`` times per sample. Use with
    ``collate_fn=collate_member_views``.

    Args:
        dataset: A map-style dataset with a ``transform`` attribute (timm ``ImageDataset``,
            torchvision datasets, :class:`FashionMNIST`).
        split_factor: Number of views S.
        same_view: Repeat one view S times (ablation).
    """

    def __init__(self, dataset: Dataset, split_factor: int, same_view: bool = False) -> None:
        if not hasattr(dataset, "transform"):
            raise ValueError(f"{type(dataset).__name__} has no 'transform' attribute to wrap.")
        self.dataset = dataset
        self.split_factor = _check_split_factor(split_factor)
        self.same_view = bool(same_view)
        self.transform = dataset.transform

    @property
    def transform(self) -> Optional[Callable[[Any], Any]]:
        """The wrapped dataset's transform (a :class:`MemberViews`, or None)."""
        return self.dataset.transform

    @transform.setter
    def transform(self, transform: Optional[Callable[[Any], Any]]) -> None:
        if transform is not None and not isinstance(transform, MemberViews):
            transform = MemberViews(transform, self.split_factor, same_view=self.same_view)
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


# Fashion-MNIST's ten classes, named once: the IDX reader's ``classes`` and export-fashion-mnist's class folders
# (``<label>_<name>``, so timm's sorted folder reader gives each class its label). A checkpoint records these names,
# and validate compares them, so a model trained on either source validates on the other.
FASHION_MNIST_CLASSES = ("0_t_shirt_top", "1_trouser", "2_pullover", "3_dress", "4_coat", "5_sandal", "6_shirt",
                         "7_sneaker", "8_bag", "9_ankle_boot")
# The names the IDX reader gave before (checkpoints trained on the IDX files then carry them).
_FASHION_MNIST_OLD_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                            "Ankle boot")


def set_image_mode(dataset: Dataset, in_chans: int) -> None:
    """Read ``dataset``'s images with ``in_chans`` channels (1: grayscale ``'L'``, else ``'RGB'``), whichever source
    it is: the IDX reader gives ``'L'`` and timm's folder reader ``'RGB'`` by default, so a model trained on one
    would get the other's channel count. Datasets of another kind are left as they are."""
    mode = "L" if in_chans == 1 else "RGB"
    inner = getattr(dataset, "dataset", dataset)  # a subset wrapper
    if isinstance(inner, FashionMNIST):
        inner.img_mode = mode
    elif isinstance(inner, ImageDataset):
        inner.input_img_mode = mode


def canonical_class_names(names: Optional[Sequence[str]]) -> Optional[List[str]]:
    """``names`` with Fashion-MNIST's earlier class names (``'T-shirt/top'``, ...) as :data:`FASHION_MNIST_CLASSES`
    (for comparing a checkpoint's classes with a dataset's); any other list as it is."""
    if names is None:
        return None
    names = [str(n) for n in names]
    return list(FASHION_MNIST_CLASSES) if tuple(names) == _FASHION_MNIST_OLD_NAMES else names


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

    classes = list(FASHION_MNIST_CLASSES)

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
            "/usr/share/datasets/fashion-mnist), or name a folder that has the IDX files (train and validate: "
            "--data-dir; export-fashion-mnist: --idx-dir).")

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        image = Image.fromarray(self.data[index])
        if getattr(self, "img_mode", "L") != "L":  # a 3-channel model (trained on the exported PNGs as RGB)
            image = image.convert(self.img_mode)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(root={self.root!r}, train={self.train}, n={len(self)})"


# ----------------------------------------------------------------------------------------------------------
# datasets and loaders for `timm-split train` / `validate`

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CFG = {"input_size": (1, 28, 28), "mean": (0.2860,), "std": (0.3530,), "crop_pct": 1.0,
                     "interpolation": "bilinear"}


class _SubsetWithTransform(Dataset):
    """The samples ``indices`` of ``dataset``, forwarding its ``transform`` (timm's loader assigns it)."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    @property
    def transform(self) -> Optional[Callable[[Any], Any]]:
        return self.dataset.transform

    @transform.setter
    def transform(self, transform: Optional[Callable[[Any], Any]]) -> None:
        self.dataset.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[self.indices[index]]


class _ImageFiles(ImageDataset):
    """timm's ``ImageDataset`` whose images over PIL's size limit fail in one line naming the file.

    PIL refuses an image of more than ``2 * Image.MAX_IMAGE_PIXELS`` pixels (``DecompressionBombError``, which
    timm's retry on ``OSError`` does not catch); the error alone does not say which file it was.
    """

    def __getitem__(self, index: int) -> Any:
        try:
            return super().__getitem__(index)
        except Image.DecompressionBombError as e:
            raise ValueError(f"{self.filename(index, absolute=True)}: PIL refused it as a possible decompression "
                             f"bomb ({e}); shrink or remove the image, or raise PIL.Image.MAX_IMAGE_PIXELS (now "
                             f"{Image.MAX_IMAGE_PIXELS}; None: no limit, for trusted files only) in the Python that "
                             "reads the data.") from None


class FolderScan:
    """What :func:`scan_image_folder` found: the samples, the classes and what it left out.

    Attributes:
        samples: ``(path, class index)`` per image, in timm's order (natural sort of the paths).
        class_to_idx: class folder name -> index (natural sort of the names, as timm numbers them).
        skipped: ``{'hidden': n, 'not an image': n}``: entries left out, by reason.
    """

    def __init__(self, samples: List[Tuple[str, int]], class_to_idx: Dict[str, int], skipped: Dict[str, int]) -> None:
        self.samples, self.class_to_idx, self.skipped = samples, class_to_idx, skipped


def scan_image_folder(folder: str, class_to_idx: Optional[Dict[str, int]] = None) -> FolderScan:
    """The one audited scan of an image folder (a split: ``folder/<class>/<image>``), with stated rules.

    * A class is a folder directly in ``folder``; its images are the files with an image extension (timm's
      list, any case: ``.PNG`` counts) anywhere below it, nested folders included (torchvision's rule; timm
      named a nested folder's images after the nested folder, merging ``a/x`` and ``b/x`` into one class ``x``).
    * Hidden files and folders (``.name``: ``.ipynb_checkpoints``, macOS ``._x.png``) are left out, as are files
      that are not images; both are counted in :attr:`FolderScan.skipped` and logged once.
    * Symlinks are followed. A broken link with an image extension, or a folder link that loops back to one of
      its parents (timm's walk repeated the images up to 40 times), is an error naming it.
    * An image directly in ``folder`` (in no class) is an error (timm made a class ``''`` of it); so is a class
      folder without images when other classes have some (timm dropped it, which renumbers the classes after it).

    Args:
        folder: the split folder.
        class_to_idx: a class map (timm's ``--class-map``): only these classes, with these indices; class folders
            not in it are left out.

    Returns:
        The scan.

    Raises:
        ValueError: a rule above is broken (the message names the path and the fix), or ``folder`` holds no image.
    """
    from timm.data.readers.img_extensions import get_img_extensions
    from timm.utils.misc import natural_key

    types = {e.lower() for e in get_img_extensions(as_set=True)}
    skipped = {"hidden": 0, "not an image": 0}
    is_image = lambda name: os.path.splitext(name)[1].lower() in types  # noqa: E731

    def walk(path: str, parents: Tuple[str, ...]) -> List[str]:
        found = []
        for entry in sorted(os.scandir(path), key=lambda e: e.name):
            if entry.name.startswith("."):
                skipped["hidden"] += 1
                continue
            full = os.path.join(path, entry.name)
            if entry.is_dir(follow_symlinks=True):
                real = os.path.realpath(full)
                if real in parents:
                    raise ValueError(f"{full} is a symlink to {real}, a folder above it: the scan would loop; remove "
                                     "the link")
                found += walk(full, parents + (real,))
            elif is_image(entry.name):
                if not os.path.exists(full):
                    raise ValueError(f"{full} is a broken symlink (to {os.readlink(full)}); remove it or restore "
                                     "its target")
                found.append(full)
            else:
                skipped["not an image"] += 1
        return found

    root_real = os.path.realpath(folder)
    per_class: Dict[str, List[str]] = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        full = os.path.join(folder, entry.name)
        if entry.name.startswith("."):
            skipped["hidden"] += 1
        elif entry.is_dir(follow_symlinks=True):
            if class_to_idx is None or entry.name in class_to_idx:
                per_class[entry.name] = walk(full, (root_real, os.path.realpath(full)))
        elif is_image(entry.name):
            raise ValueError(f"{full} is an image directly in {folder}, in no class folder; move it into "
                             f"{folder}/<class>/")
        else:
            skipped["not an image"] += 1
    if not any(per_class.values()):
        raise ValueError(f"Found 0 images in subfolders of {folder} (image extensions: {', '.join(sorted(types))}); "
                         f"put the images in {folder}/<class>/, or pass the --data-dir that holds them")
    empty = sorted(name for name, files in per_class.items() if not files)
    if empty:
        raise ValueError(f"class folder(s) {empty[:5]} of {folder} hold no images (hidden files and other files "
                         "do not count) while other classes have some; add images or remove the folder(s)")
    if class_to_idx is None:
        class_to_idx = {c: i for i, c in enumerate(sorted(per_class, key=natural_key))}
    samples = sorted(((f, class_to_idx[c]) for c, files in per_class.items() for f in files),
                     key=lambda kv: natural_key(kv[0]))
    if any(skipped.values()):
        _logger.info("%s: %d images in %d classes; left out %s", folder, len(samples), len(per_class),
                     ", ".join(f"{n} {why}" for why, n in skipped.items() if n))
    return FolderScan(samples, class_to_idx, skipped)


def _folder_reader(folder: str, class_map: str = ""):
    """timm's ``ReaderImageFolder`` over :func:`scan_image_folder`'s samples (timm's own walk is not run)."""
    from timm.data.readers.class_map import load_class_map
    from timm.data.readers.reader_image_folder import ReaderImageFolder

    try:
        mapping = load_class_map(class_map, folder) if class_map else None
    except AssertionError as e:  # timm asserts: a missing file, an extension other than .txt/.pkl
        raise ValueError(f"--class-map {class_map}: {e} (a .txt file with one class folder name per line)") from None
    scan = scan_image_folder(folder, mapping)
    reader = ReaderImageFolder.__new__(ReaderImageFolder)  # its scan is replaced by ours; its reading is kept
    Reader.__init__(reader)
    reader.root, reader.samples, reader.class_to_idx = folder, scan.samples, scan.class_to_idx
    return reader


def data_sources(ds: Dataset) -> List[str]:
    """The files and folders a dataset reads (the output-path guard keeps every output off them).

    Args:
        ds: a dataset of :func:`create_datasets` / :func:`create_eval_dataset` (or a subset of one).

    Returns:
        Fashion-MNIST: its two IDX files; an image folder: its split folder; anything else: its ``root`` if it
        has one, else nothing.
    """
    ds = ds.dataset if isinstance(ds, _SubsetWithTransform) else ds
    if isinstance(ds, FashionMNIST):
        split = "train" if ds.train else "t10k"
        return [ds._find(f"{split}-{kind}-ubyte") for kind in ("images-idx3", "labels-idx1")]
    reader = getattr(ds, "reader", None)
    root = getattr(reader, "root", None) or getattr(ds, "root", None)
    return [os.fspath(root)] if isinstance(root, (str, os.PathLike)) and os.path.exists(root) else []


def is_fashion_mnist(dataset: str, data_dir: Optional[str]) -> bool:
    """Whether ``--dataset``/``--data-dir`` select the embedded Fashion-MNIST (no args, or ``fashion_mnist``)."""
    return dataset.lower() in ("fashion_mnist", "fashion-mnist") or (not dataset and not data_dir)


def class_names(ds: Dataset) -> Optional[List[str]]:
    """The class names of a timm/torchvision dataset, in index order, or None if it does not say."""
    ds = ds.dataset if isinstance(ds, _SubsetWithTransform) else ds
    reader = getattr(ds, "reader", None)
    for owner in (reader, ds):
        mapping = getattr(owner, "class_to_idx", None)
        if mapping:
            return [str(n) for n, _ in sorted(mapping.items(), key=lambda kv: kv[1])]
        classes = getattr(owner, "classes", None)
        if classes:
            return [str(c) for c in classes]
    return None


_EVAL_SYNONYMS = ("val", "valid", "validation", "eval", "evaluation")
_TRAIN_SYNONYMS = ("train", "training")
EXPORT_MARKER = ".timm_split_export.json"


def split_folder(root: str, split: str) -> str:
    """The folder of ``split`` under an ImageFolder ``root``, found as timm finds it (the name, else a synonym:
    validation/val/eval..., train/training); ``ValueError`` where there is none. timm itself would read the whole
    ``root`` then, scoring the training images as validation."""
    names = [split] + [s for syn in (_TRAIN_SYNONYMS, _EVAL_SYNONYMS) if split in syn for s in syn if s != split]
    for name in names:
        if os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not found:
        raise ValueError(f"no {split!r} folder in {root}: it holds no folders; pass the --data-dir whose {split} "
                         f"folder holds the class folders (DIR/{split}/<class>/*.png).")
    flag = "--train-split" if split in _TRAIN_SYNONYMS else "--val-split"
    raise ValueError(f"no {split!r} folder in {root} (folders there: {', '.join(found) or 'none'}); pass {flag} with "
                     f"the folder that holds this split's class folders, e.g. {root}/{split}/<class>/*.png.")


def _check_export_complete(root: str) -> None:
    """Refuse a folder that ``export_fashion_mnist`` began but did not finish (its marker says so)."""
    path = os.path.join(root, EXPORT_MARKER)
    if os.path.isfile(path):
        with open(path) as f:
            done = json.load(f).get("complete")
        if not done:
            raise ValueError(f"{root} is a partial export-fashion-mnist (it was stopped before it finished); delete "
                             "the folder and run timm-split export-fashion-mnist again.")


def _check_class_map_covers(folder: str, ds: Dataset, class_map: str) -> None:
    """With ``--class-map``, every class folder must be in the map: timm drops the others' images silently."""
    names = set(class_names(ds) or [])
    dropped = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)) and d not in names)
    if dropped:
        raise ValueError(f"--class-map {class_map} leaves out the class folder(s) {dropped[:5]} of {folder}: their "
                         "images would be dropped; add them to the class map or move the folders out.")


def class_difference(a: Sequence[str], b: Sequence[str], name_a: str, name_b: str) -> str:
    """How two class lists differ, for a message: the names only one has, or that the order differs."""
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        return f"only in {name_a}: {only_a[:5]}; only in {name_b}: {only_b[:5]}"
    return "the same names in another order"


def check_same_classes(train: Dataset, val: Dataset, where: str) -> List[str]:
    """The train classes; ``ValueError`` unless the validation split has the same names at the same indices."""
    a, b = class_names(train), class_names(val)
    if a is None:
        raise ValueError(f"cannot tell the classes of {where}; pass --num-classes.")
    if b is not None and a != b:
        what = class_difference(a, b, "train", "validation")
        raise ValueError(f"{where}: the train and validation splits have different classes ({what}); a class is "
                         "scored by its index, so both splits need the same class folders (or one --class-map).")
    return a


def _timm_dataset(name: str, root: Optional[str], split: str, is_training: bool, class_map: str = "") -> Dataset:
    """``timm.data.create_dataset`` (never downloading), its errors turned into ``ValueError``s naming the fix."""
    from timm.data import create_dataset

    if not name and not root:
        raise ValueError("pass --data-dir DIR (an ImageFolder) or no data flags at all (Fashion-MNIST).")
    if root is not None and not os.path.isdir(root):
        layout = "DIR/train/<class>/*.png and DIR/validation/<class>/*.png" if is_training else \
            f"DIR/{split}/<class>/*.png"
        raise ValueError(f"--data-dir {root} does not exist or is not a directory; pass the dataset's root folder "
                         f"(for an ImageFolder: {layout}).")
    folder = None
    if not name or name.lower() in ("folder", "imagefolder"):
        _check_export_complete(root)
        folder = split_folder(root, split)
    try:
        if folder:  # our audited scan (scan_image_folder) instead of timm's walk
            try:
                ds = ImageDataset(folder, reader=_folder_reader(folder, class_map))
            except ValueError as e:
                raise ValueError(f"cannot read the {split!r} split at {root}: {e}") from None
        else:
            ds = create_dataset(name, root=root, split=split, is_training=is_training, download=False,
                                class_map=class_map)
    except (RuntimeError, FileNotFoundError) as e:  # timm: "Found 0 images"; torchvision: "Dataset not found"
        fix = f"put the images in {folder}/<class>/, or pass the --data-dir that holds them" if folder else \
            "nothing is downloaded: put the data on disk and pass --data-dir"
        raise ValueError(f"cannot read the {split!r} split of {name or 'ImageFolder'} at {root}: {e} ({fix}).") from e
    if folder and class_map:
        _check_class_map_covers(folder, ds, class_map)
    if type(ds) is ImageDataset:  # the same reader (its files and classes), with the size error named
        ds = _ImageFiles(root, reader=ds.reader, load_bytes=ds.load_bytes, input_img_mode=ds.input_img_mode,
                         transform=ds.transform, target_transform=ds.target_transform)
    return ds


def create_datasets(dataset: str, data_dir: Optional[str], train_split: str = "train",
                    val_split: str = "validation", class_map: str = "", train_subset: Optional[int] = None,
                    ) -> Tuple[Dataset, Dataset, int, Dict[str, Any]]:
    """The train and validation datasets of ``timm-split train``.

    Args:
        dataset: ``''`` (an ImageFolder/ImageTar at ``data_dir``; Fashion-MNIST if ``data_dir`` is also None),
            ``'fashion_mnist'`` (Debian's IDX files at ``data_dir`` or their default place) or any
            ``timm.data.create_dataset`` name (``torch/cifar10``...) whose data is already on disk.
        data_dir: The dataset root.
        train_split: The train split (folder) name.
        val_split: The validation split name.
        class_map: timm's class-map file, or ``''``.
        train_subset: Train on a fixed random subset of this many images (seed 0, whatever the run's seed).

    Returns:
        ``(train, val, num_classes, data_cfg)``; ``data_cfg`` is Fashion-MNIST's 1-channel input size and
        mean/std, or ``{}`` (the model's defaults).
    """
    if is_fashion_mnist(dataset, data_dir):
        root = data_dir or FASHION_MNIST_DIR
        train, val, cfg = FashionMNIST(root, train=True), FashionMNIST(root, train=False), dict(FASHION_MNIST_CFG)
        num_classes = len(FashionMNIST.classes)
    else:
        train = _timm_dataset(dataset, data_dir, train_split, True, class_map)
        val = _timm_dataset(dataset, data_dir, val_split, False, class_map)
        num_classes, cfg = len(check_same_classes(train, val, data_dir or dataset)), {}
        if len(val) == 0 or len(train) == 0:
            raise ValueError(f"{data_dir}: the train or validation split has no images; check --train-split "
                             f"{train_split!r} and --val-split {val_split!r}.")
    if train_subset is not None and train_subset < len(train):
        keep = np.sort(np.random.RandomState(0).permutation(len(train))[:train_subset])
        train = _SubsetWithTransform(train, keep.tolist())
    return train, val, num_classes, cfg


def create_eval_dataset(dataset: str, data_dir: Optional[str], split: str = "validation"
                        ) -> Tuple[Dataset, List[str], Dict[str, Any]]:
    """One evaluation split (what ``timm-split validate`` reads): ``(dataset, class names, data_cfg)``.

    Args:
        dataset: As in :func:`create_datasets`.
        data_dir: The dataset root.
        split: The split (folder) name; a missing or misspelt one is a ``ValueError``, never the root.
    """
    if is_fashion_mnist(dataset, data_dir):
        return FashionMNIST(data_dir or FASHION_MNIST_DIR, train=False), list(FashionMNIST.classes), dict(
            FASHION_MNIST_CFG)
    ds = _timm_dataset(dataset, data_dir, split, False)
    names = class_names(ds)
    if names is None:
        raise ValueError(f"cannot tell the classes of {data_dir or dataset}; pass --num-classes.")
    if len(ds) == 0:
        raise ValueError(f"{data_dir}: the {split!r} split has no images; check --val-split.")
    return ds, names, {}


def _check_holdout_classes(holdout_classes: Sequence[int]) -> Set[int]:
    """The held-out labels as a set; ``ValueError`` for labels outside 0-9, repeats, or all ten."""
    labels = list(holdout_classes or ())
    n = len(FashionMNIST.classes)
    bad = [k for k in labels if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k < n]
    if bad:
        raise ValueError(f"--holdout-classes takes labels 0-{n - 1}; got {bad}.")
    if len(set(labels)) != len(labels):
        raise ValueError(f"--holdout-classes names a class twice: {labels}.")
    if len(labels) > n - 2:
        raise ValueError(f"--holdout-classes leaves {n - len(labels)} class(es) to train on; hold out at most {n - 2}.")
    return {int(k) for k in labels}


def create_ood_dataset(root: str, in_chans: int = 3) -> Dataset:
    """Out-of-distribution images for ``timm-split validate --ood-data``: an ImageFolder (class folders, their
    names ignored) or a flat folder of images, read by timm's folder reader (labels are unused).

    Args:
        root: The folder.
        in_chans: The model's input channels (1: the images are read as grayscale, else as RGB).

    Returns:
        A dataset of ``(image, label)`` with a ``transform`` for timm's loader; ``ValueError`` where ``root`` is not
        a folder or holds no images.
    """
    from timm.data.readers.img_extensions import get_img_extensions

    if not os.path.isdir(root):
        raise ValueError(f"--ood-data {root} does not exist or is not a directory; pass a folder of images (flat, or "
                         "in class folders).")
    try:
        ds = _ImageFiles(root, input_img_mode="L" if in_chans == 1 else "RGB")
    except RuntimeError as e:  # timm: "Found 0 images in subfolders of ..."
        raise ValueError(f"--ood-data {root} holds no images (timm reads {', '.join(get_img_extensions())}); pass a "
                         "folder of out-of-distribution images.") from e
    if len(ds) == 0:
        raise ValueError(f"--ood-data {root} holds no images; pass a folder of out-of-distribution images.")
    return ds


def image_files(ds: Dataset) -> Optional[List[str]]:
    """The real paths of the image files a folder dataset reads, or None where it reads none (IDX, tar)."""
    ds = ds.dataset if isinstance(ds, _SubsetWithTransform) else ds
    samples = getattr(getattr(ds, "reader", None), "samples", None)
    if not samples or not isinstance(samples[0], (tuple, list)) or not isinstance(samples[0][0], str):
        return None
    return [os.path.realpath(path) for path, _ in samples]


def check_ood_distinct_files(ood: Dataset, val: Dataset, where: str) -> None:
    """``ValueError`` where the OOD dataset reads any image file the validation dataset reads (by real path).

    Args:
        ood: The dataset of :func:`create_ood_dataset`.
        val: The validation dataset.
        where: The OOD folder, for the message.
    """
    a, b = image_files(ood), image_files(val)
    if a is None or b is None:
        return
    shared = set(a) & set(b)
    if shared:
        raise ValueError(f"--ood-data {where} holds {len(shared)} of the {len(b)} validation images (e.g. "
                         f"{sorted(shared)[0]}): it is the validation set itself, and an OOD AUROC of it is 0.5 by "
                         "construction; pass a folder of images of other classes (export-fashion-mnist "
                         "--holdout-classes writes one).")


def export_fashion_mnist(out_dir: str, per_class: Optional[int] = None, val_per_class: Optional[int] = None,
                         idx_dir: str = FASHION_MNIST_DIR, holdout_classes: Sequence[int] = ()) -> Dict[str, int]:
    """Write Fashion-MNIST as an ImageFolder of PNGs: ``out_dir/{train,validation}/<k>_<class>/<i>.png``.

    Class folders are prefixed with their label, so timm's folder reader gives each class its original index
    (with ``holdout_classes``: its rank among the classes kept).

    Args:
        out_dir: The folder to create (must not hold a ``train`` or ``validation`` folder yet).
        per_class: Train images per class (the first ones of each class; None: all 6000).
        val_per_class: Validation images per class from the test split (None: ``per_class``; all 1000 if both None).
        idx_dir: Where the IDX files are.
        holdout_classes: Labels (0-9) left out of train and validation and written instead, from the test split
            (``val_per_class`` of each), to ``out_dir/holdout/<k>_<class>/<i>.png``: out-of-distribution images for
            ``timm-split validate --ood-data out_dir/holdout``. The remaining class folders keep their label
            prefix; timm's folder reader numbers them 0.. in that order.

    Returns:
        Images written per split, e.g. ``{'train': 1000, 'validation': 1000}`` (and ``'holdout'`` with
        ``holdout_classes``).
    """
    for n in (per_class, val_per_class):
        if n is not None and n < 1:
            raise ValueError(f"images per class must be >= 1; got {n}.")
    holdout = _check_holdout_classes(holdout_classes)
    for split in ("train", "validation") + (("holdout",) if holdout else ()):
        if os.path.exists(os.path.join(out_dir, split)):
            raise ValueError(f"{os.path.join(out_dir, split)} already exists; pass a new output folder.")
    sources = {"train": FashionMNIST(idx_dir, train=True), "validation": FashionMNIST(idx_dir, train=False)}
    os.makedirs(out_dir, exist_ok=True)
    _write_marker(out_dir, {"complete": False})  # a stopped export stays marked partial (create_datasets refuses)
    counts = {}
    splits = [("train", per_class), ("validation", val_per_class or per_class)]
    if holdout:
        splits.append(("holdout", val_per_class or per_class))
        sources["holdout"] = sources["validation"]
    for split, n in splits:
        ds, root = sources[split], os.path.join(out_dir, split)
        names = list(FASHION_MNIST_CLASSES)  # the IDX reader's names: a checkpoint of either validates on the other
        keep = [k in holdout if split == "holdout" else k not in holdout for k in range(len(names))]
        for name in (name for name, kept in zip(names, keep) if kept):
            os.makedirs(os.path.join(root, name))
        taken = np.zeros(len(names), dtype=np.int64)
        for i, label in enumerate(ds.targets):
            if keep[label] and (n is None or taken[label] < n):
                Image.fromarray(ds.data[i]).save(os.path.join(root, names[label], f"{i:05d}.png"))
                taken[label] += 1
        counts[split] = int(taken.sum())
    done = {"complete": True, "images": counts}
    if holdout:
        done["holdout_classes"] = sorted(holdout)
    _write_marker(out_dir, done)  # last: the export is whole
    return counts


def _write_marker(out_dir: str, content: Dict[str, Any]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(content, f)
    atomic_write(os.path.join(out_dir, EXPORT_MARKER), write)


def create_member_loader(dataset: Dataset, split_factor: int, data_config: Dict[str, Any], batch_size: int,
                         device: torch.device, same_view: bool = False, distributed: bool = False,
                         **transform_kwargs: Any):
    """timm's ``create_loader`` (prefetcher on) yielding ``(views [S, B, C, H, W], targets [B])``, views normalised.

    Each image gets S independent draws of the whole train transform (``transform_kwargs``: ``scale``, ``ratio``,
    ``hflip``, ``color_jitter``, ``auto_augment``, ``interpolation``, ``num_workers``...), or one draw repeated
    (``same_view``). Random erasing and mixup run on the device after it (:class:`MemberBatchAugment`).
    Workers are not persistent, so every epoch's augmentation depends only on the seed set before it.
    """
    from timm.data import create_loader

    return create_loader(
        MemberViewsDataset(dataset, split_factor, same_view=same_view), input_size=data_config["input_size"],
        batch_size=batch_size, is_training=True, use_prefetcher=True, mean=data_config["mean"],
        std=data_config["std"], device=device, distributed=distributed, collate_fn=collate_member_views,
        persistent_workers=False, re_prob=0.0, **transform_kwargs)


def create_eval_loader(dataset: Dataset, data_config: Dict[str, Any], batch_size: int, device: torch.device,
                       num_workers: int = 0, pin_memory: bool = False):
    """timm's ``create_loader`` for evaluation (resize + centre crop by ``crop_pct``, normalised on ``device``)."""
    from timm.data import create_loader

    return create_loader(dataset, input_size=data_config["input_size"], batch_size=batch_size, is_training=False,
                         use_prefetcher=True, interpolation=data_config["interpolation"], mean=data_config["mean"],
                         std=data_config["std"], crop_pct=data_config["crop_pct"],
                         crop_mode=data_config.get("crop_mode"), num_workers=num_workers, pin_memory=pin_memory,
                         device=device, persistent_workers=False)


class MemberBatchAugment:
    """Random erasing per view, then Mixup/CutMix with one lambda, one pairing and one box for all members.

    Args:
        re_prob: Random erasing probability (timm's ``RandomErasing``, applied to each view of each image
            independently, as the per-view transform would).
        re_mode: Its fill mode (``'pixel'``, ``'rand'``, ``'const'``).
        re_count: Its maximum count of regions.
        mixup: A ``timm.data.Mixup``, or None. It sees the S views of an image as one image with ``S*C``
            channels, so it draws one lambda (and, for CutMix, one box) per batch and pairs image ``i`` with
            ``B-1-i`` in every member; it returns soft targets ``[B, K]``.
        device: Where random erasing draws its noise.

    Calling it on ``(views [S, B, C, H, W], target [B])`` returns ``(views, target)``.
    """

    def __init__(self, re_prob: float = 0.0, re_mode: str = "pixel", re_count: int = 1, mixup: Any = None,
                 device: Union[str, torch.device] = "cpu") -> None:
        from timm.data.random_erasing import RandomErasing

        self.erasing = RandomErasing(re_prob, mode=re_mode, max_count=re_count, device=device) if re_prob else None
        self.mixup = mixup

    def __call__(self, views: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        views = check_member_views(views, 5, what="MemberBatchAugment's views")
        if (self.erasing is not None or self.mixup is not None) and not views.dtype.is_floating_point:
            raise ValueError(f"random erasing and mixup work on normalised float views; got {views.dtype} (timm's "
                             "prefetcher normalises them first)")
        S, B, C, H, W = views.shape
        if self.erasing is not None:
            views = self.erasing(views.reshape(S * B, C, H, W)).reshape(S, B, C, H, W)
        if self.mixup is not None and self.mixup.mixup_enabled:
            folded = views.transpose(0, 1).reshape(B, S * C, H, W)  # a copy: mixup works in place
            folded, target = self.mixup(folded, target)
            views = folded.reshape(B, S, C, H, W).transpose(0, 1)
        return views, target
