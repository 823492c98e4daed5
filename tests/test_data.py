"""Tests for timm_split.training.data."""
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from timm.data import create_loader

from timm_split.training.data import (
    FashionMNIST, MemberViews, MemberViewsDataset, collate_member_views, create_member_transform, read_idx,
    write_idx,
)

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


class RandomImages(Dataset):
    """Small RGB PIL dataset with a settable transform, like timm's ImageDataset."""

    def __init__(self, n=8, size=32, transform=None):
        rng = np.random.default_rng(0)
        self.images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = self.images[i]
        return (self.transform(img) if self.transform is not None else img), i % 3


# ------------------------------------------------------------------------------------------------ views

def test_member_views_independent():
    torch.manual_seed(0)
    tf = create_member_transform(3, input_size=32, scale=(0.2, 1.0), auto_augment="rand-m9-mstd0.5", re_prob=0.5)
    views = tf(RandomImages(1)[0][0])
    assert views.shape == (3, 3, 32, 32) and views.dtype == torch.float32
    assert not torch.equal(views[0], views[1]) and not torch.equal(views[1], views[2])


def test_member_views_same_view_and_eval():
    img = RandomImages(1)[0][0]
    same = create_member_transform(4, same_view=True, input_size=32)(img)
    assert same.shape == (4, 3, 32, 32)
    assert all(torch.equal(same[0], same[i]) for i in range(4))
    evaluated = create_member_transform(2, input_size=32, is_training=False)(img)
    assert torch.equal(evaluated[0], evaluated[1])


def test_member_views_prefetcher_uint8():
    views = create_member_transform(2, input_size=32, use_prefetcher=True)(RandomImages(1)[0][0])
    assert views.shape == (2, 3, 32, 32) and views.dtype == torch.uint8


def test_member_views_bad_args():
    with pytest.raises(ValueError, match="split_factor"):
        MemberViews(lambda x: x, 0)
    with pytest.raises(ValueError, match="split_factor"):
        MemberViews(lambda x: x, 2.5)
    with pytest.raises(ValueError, match="callable"):
        MemberViews((lambda x: x, lambda x: x), 2)
    with pytest.raises(ValueError, match="separate"):
        create_member_transform(2, input_size=32, separate=True)


# ------------------------------------------------------------------------------------------------ collate

def test_collate_plain_dataloader():
    ds = RandomImages(6, transform=create_member_transform(2, input_size=32))
    images, targets = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate_member_views)))
    assert images.shape == (2, 4, 3, 32, 32) and images.dtype == torch.float32
    assert targets.tolist() == [0, 1, 2, 0] and targets.dtype == torch.int64


def test_collate_layout_and_inputs():
    a = torch.arange(2 * 1 * 2 * 2).view(2, 1, 2, 2)
    b = a + 100
    images, targets = collate_member_views([(a, 0), (list(b), 1), (b.numpy(), 2)])
    assert images.shape == (2, 3, 1, 2, 2)
    assert torch.equal(images[1, 0], a[1]) and torch.equal(images[0, 1], b[0]) and torch.equal(images[1, 2], b[1])
    assert targets.tolist() == [0, 1, 2]
    _, soft = collate_member_views([(a, torch.tensor([0.3, 0.7])), (a, torch.tensor([1.0, 0.0]))])
    assert soft.shape == (2, 2)


def test_collate_errors():
    a = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match="same S"):
        collate_member_views([(a, 0), (torch.zeros(3, 1, 4, 4), 1)])
    with pytest.raises(ValueError, match="MemberViews"):
        collate_member_views([(torch.zeros(4), 0)])
    with pytest.raises(ValueError, match="empty"):
        collate_member_views([])


# ------------------------------------------------------------------------------------------------ timm loader

def test_create_loader_without_prefetcher():
    ds = MemberViewsDataset(RandomImages(8), 2)
    loader = create_loader(ds, input_size=(3, 32, 32), batch_size=4, is_training=True, use_prefetcher=False,
                           re_prob=0.25, num_workers=0, collate_fn=collate_member_views)
    assert isinstance(ds.transform, MemberViews) and ds.transform.split_factor == 2
    batches = list(loader)
    assert len(batches) == 2
    images, targets = batches[0]
    assert images.shape == (2, 4, 3, 32, 32) and images.dtype == torch.float32 and targets.shape == (4,)
    assert not torch.equal(images[0], images[1])  # independent augmentation per member


def test_create_loader_no_aug_identical_views():
    ds = MemberViewsDataset(RandomImages(4), 3)
    loader = create_loader(ds, input_size=(3, 32, 32), batch_size=4, is_training=True, no_aug=True,
                           use_prefetcher=False, num_workers=0, collate_fn=collate_member_views)
    images, _ = next(iter(loader))
    assert images.shape == (3, 4, 3, 32, 32)
    assert torch.equal(images[0], images[1]) and torch.equal(images[0], images[2])


def test_create_loader_with_prefetcher_cpu():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    ds = MemberViewsDataset(RandomImages(4), 2)
    loader = create_loader(ds, input_size=(3, 32, 32), batch_size=4, is_training=False, use_prefetcher=True,
                           mean=mean, std=std, device=torch.device("cpu"), num_workers=0,
                           collate_fn=collate_member_views)
    images, targets = next(iter(loader))
    assert images.shape == (2, 4, 3, 32, 32) and images.dtype == torch.float32
    # the prefetcher normalised the 5-d uint8 batch per channel
    raw, _ = collate_member_views([ds[i] for i in range(4)])
    m = torch.tensor(mean).view(3, 1, 1) * 255
    s = torch.tensor(std).view(3, 1, 1) * 255
    torch.testing.assert_close(images, (raw.float() - m) / s)


def test_create_loader_prefetcher_random_erasing_limitation():
    # documented limitation: timm's PrefetchLoader random erasing unpacks 4-d batches only; with member views
    # keep re_prob=0 under the prefetcher or use use_prefetcher=False (erasing then runs per view).
    ds = MemberViewsDataset(RandomImages(4), 2)
    loader = create_loader(ds, input_size=(3, 32, 32), batch_size=4, is_training=True, use_prefetcher=True,
                           re_prob=0.5, device=torch.device("cpu"), num_workers=0, collate_fn=collate_member_views)
    with pytest.raises(ValueError):
        next(iter(loader))


def test_member_views_dataset_errors():
    with pytest.raises(ValueError, match="transform"):
        MemberViewsDataset([1, 2, 3], 2)
    with pytest.raises(ValueError, match="split_factor"):
        MemberViewsDataset(RandomImages(1), 0)


# ------------------------------------------------------------------------------------------------ IDX / FashionMNIST

@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_roundtrip(tmp_path, dtype, suffix):
    a = (np.random.default_rng(0).standard_normal((3, 4, 5)) * 50).astype(dtype)
    path = str(tmp_path / f"x.idx{suffix}")
    write_idx(path, a)
    b = read_idx(path)
    assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(a, b)


def test_idx_header_layout(tmp_path):
    path = str(tmp_path / "labels-idx1-ubyte")
    write_idx(path, np.array([1, 2, 3], dtype=np.uint8))
    assert open(path, "rb").read() == bytes([0, 0, 8, 1, 0, 0, 0, 3, 1, 2, 3])


def test_idx_bad_files(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="magic"):
        read_idx(str(bad))
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 9, 1, 2]))
    with pytest.raises(ValueError, match="truncated"):
        read_idx(str(short))
    with pytest.raises(ValueError, match="IDX"):
        write_idx(str(tmp_path / "c"), np.zeros(3, dtype=np.complex64))


def _fake_fashion(root, n_train=5, n_test=3, gz=True):
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(os.path.join(root, f"{split}-images-idx3-ubyte{suffix}"),
                  rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(os.path.join(root, f"{split}-labels-idx1-ubyte{suffix}"), np.arange(n, dtype=np.uint8) % 10)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_fake_files(tmp_path, gz):
    _fake_fashion(str(tmp_path), gz=gz)
    train = FashionMNIST(str(tmp_path), train=True)
    test = FashionMNIST(str(tmp_path), train=False)
    assert len(train) == 5 and len(test) == 3
    img, label = train[3]
    assert isinstance(img, Image.Image) and img.mode == "L" and img.size == (28, 28)
    assert label == 3 and isinstance(label, int)
    assert np.array_equal(np.asarray(img), train.data[3])


def test_fashion_mnist_member_views(tmp_path):
    _fake_fashion(str(tmp_path))
    tf = create_member_transform(2, input_size=(1, 28, 28), mean=(0.286,), std=(0.353,),
                                 auto_augment="rand-m9-mstd0.5")
    ds = FashionMNIST(str(tmp_path), transform=tf)
    images, targets = next(iter(DataLoader(ds, batch_size=5, collate_fn=collate_member_views)))
    assert images.shape == (2, 5, 1, 28, 28) and targets.tolist() == [0, 1, 2, 3, 4]


def test_fashion_mnist_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist.*--data-dir"):
        FashionMNIST(str(tmp_path))


@pytest.mark.skipif(not os.path.isdir(FASHION_DIR), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_real_files():
    train = FashionMNIST(FASHION_DIR, train=True)
    test = FashionMNIST(FASHION_DIR, train=False)
    assert len(train) == 60000 and len(test) == 10000
    for ds in (train, test):
        assert ds.targets.min() == 0 and ds.targets.max() == 9
        assert np.bincount(ds.targets).tolist() == [len(ds) // 10] * 10
    img, label = train[0]
    assert img.mode == "L" and img.size == (28, 28) and 0 <= label <= 9
