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
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate
from timm.data import ImageDataset, create_transform

from ..checks import atomic_write

__all__ = [
    "MemberViews", "create_member_transform", "collate_member_views", "MemberViewsDataset",
    "FashionMNIST", "read_idx", "write_idx", "create_datasets", "export_fashion_mnist", "create_member_loader",
    "create_eval_loader", "MemberBatchAugment", "is_fashion_mnist", "class_names", "split_folder",
    "check_same_classes", "class_difference", "create_eval_dataset", "EXPORT_MARKER",
]

_logger = logging.getLogger(__name__)


def _check_split_factor(split_factor: int) -> int:
    if isinstance(split_factor, bool) or not isinstance(split_factor, (int, np.integer)) or split_factor < 1:
        raise ValueError(f"split_factor must be an integer >= 1 (the split factor S); got {split_factor!r}.")
    return int(split_factor)


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
            view = torch.as_tensor(self.transform(sample))
            return view.unsqueeze(0).repeat(self.split_factor, *([1] * view.ndim))
        return torch.stack([torch.as_tensor(self.transform(sample)) for _ in range(self.split_factor)])

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
            "/usr/share/datasets/fashion-mnist), or name a folder that has the IDX files (train and validate: "
            "--data-dir; export-fashion-mnist: --idx-dir).")

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        image = Image.fromarray(self.data[index])
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


def export_fashion_mnist(out_dir: str, per_class: Optional[int] = None, val_per_class: Optional[int] = None,
                         idx_dir: str = FASHION_MNIST_DIR) -> Dict[str, int]:
    """Write Fashion-MNIST as an ImageFolder of PNGs: ``out_dir/{train,validation}/<k>_<class>/<i>.png``.

    Class folders are prefixed with their label, so timm's folder reader gives each class its original index.

    Args:
        out_dir: The folder to create (must not hold a ``train`` or ``validation`` folder yet).
        per_class: Train images per class (the first ones of each class; None: all 6000).
        val_per_class: Validation images per class from the test split (None: ``per_class``; all 1000 if both None).
        idx_dir: Where the IDX files are.

    Returns:
        Images written per split, e.g. ``{'train': 1000, 'validation': 1000}``.
    """
    for n in (per_class, val_per_class):
        if n is not None and n < 1:
            raise ValueError(f"images per class must be >= 1; got {n}.")
    for split in ("train", "validation"):
        if os.path.exists(os.path.join(out_dir, split)):
            raise ValueError(f"{os.path.join(out_dir, split)} already exists; pass a new output folder.")
    sources = {"train": FashionMNIST(idx_dir, train=True), "validation": FashionMNIST(idx_dir, train=False)}
    os.makedirs(out_dir, exist_ok=True)
    _write_marker(out_dir, {"complete": False})  # a stopped export stays marked partial (create_datasets refuses)
    counts = {}
    for split, n in (("train", per_class), ("validation", val_per_class or per_class)):
        ds, root = sources[split], os.path.join(out_dir, split)
        names = [f"{k}_{c.lower().replace('/', '_').replace(' ', '_').replace('-', '_')}"
                 for k, c in enumerate(ds.classes)]
        for name in names:
            os.makedirs(os.path.join(root, name))
        taken = np.zeros(len(names), dtype=np.int64)
        for i, label in enumerate(ds.targets):
            if n is None or taken[label] < n:
                Image.fromarray(ds.data[i]).save(os.path.join(root, names[label], f"{i:05d}.png"))
                taken[label] += 1
        counts[split] = int(taken.sum())
    _write_marker(out_dir, {"complete": True, "images": counts})  # last: the export is whole
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
        S, B, C, H, W = views.shape
        if self.erasing is not None:
            views = self.erasing(views.reshape(S * B, C, H, W)).reshape(S, B, C, H, W)
        if self.mixup is not None and self.mixup.mixup_enabled:
            folded = views.transpose(0, 1).reshape(B, S * C, H, W)  # a copy: mixup works in place
            folded, target = self.mixup(folded, target)
            views = folded.reshape(B, S, C, H, W).transpose(0, 1)
        return views, target
