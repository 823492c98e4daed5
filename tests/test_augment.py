"""benchmarks/science_views.py (the science benchmark's views): batched member views (pad-crop, flip,
RandAugment, erasing) and shared mixup."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from conftest import load_benchmark

_views = load_benchmark("science_views")
RAND_AUGMENT_OPS, BatchViews, hflip, mixup = _views.RAND_AUGMENT_OPS, _views.BatchViews, _views.hflip, _views.mixup
pad_crop, rand_augment, random_erase = _views.pad_crop, _views.rand_augment, _views.random_erase

MEAN, STD = (0.2860,), (0.3530,)


def _images(n=8, size=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_batch_views_shapes_and_soft_targets():
    images, target = _images(8), torch.arange(8) % 10
    views, soft = BatchViews(3, num_classes=10, mean=MEAN, std=STD)(images, target, _gen(0))
    assert views.shape == (3, 8, 1, 28, 28) and views.dtype == torch.float32
    assert soft.shape == (8, 10)
    torch.testing.assert_close(soft.sum(1), torch.ones(8))
    # each row mixes at most two classes: its own and its partner's
    assert ((soft > 0).sum(1) <= 2).all()
    assert (soft.gather(1, target[:, None]) > 0).all()


def test_members_views_differ_and_same_view_shares_everything():
    images, target = _images(16), torch.arange(16) % 10
    views, _ = BatchViews(2, num_classes=10, mean=MEAN, std=STD)(images, target, _gen(1))
    assert not torch.equal(views[0], views[1])
    # every image differs between the two members (independent crops/flips/ops), not just a few
    differs = (views[0] - views[1]).flatten(1).abs().amax(1) > 0
    assert differs.float().mean() > 0.9
    # one view for all members: identical after mixup too, so lambda and permutation are shared
    same, _ = BatchViews(3, num_classes=10, mean=MEAN, std=STD, same_view=True)(images, target, _gen(1))
    assert torch.equal(same[0], same[1]) and torch.equal(same[0], same[2])


def test_mixup_shares_lambda_and_permutation_across_members():
    views = torch.randn(3, 6, 1, 4, 4, generator=_gen(2))
    target = torch.tensor([0, 1, 2, 3, 4, 5])
    mixed, soft, lam, perm = mixup(views, target, 10, alpha=0.2, generator=_gen(3))
    assert 0.0 <= lam <= 1.0 and lam != 1.0
    assert sorted(perm.tolist()) == list(range(6))
    for s in range(3):
        torch.testing.assert_close(mixed[s], lam * views[s] + (1 - lam) * views[s][perm])
    onehot = torch.nn.functional.one_hot(target, 10).float()
    torch.testing.assert_close(soft, lam * onehot + (1 - lam) * onehot[perm])


def test_mixup_alpha_zero_is_identity():
    views, target = torch.randn(2, 4, 1, 3, 3), torch.tensor([1, 2, 3, 4])
    mixed, soft, lam, _ = mixup(views, target, 5, alpha=0.0)
    assert lam == 1.0 and torch.equal(mixed, views)
    torch.testing.assert_close(soft, torch.nn.functional.one_hot(target, 5).float())


def test_deterministic_under_a_seed():
    images, target = _images(8), torch.arange(8) % 10
    bv = BatchViews(2, num_classes=10, mean=MEAN, std=STD)
    a, sa = bv(images, target, _gen(7))
    b, sb = bv(images, target, _gen(7))
    c, _ = bv(images, target, _gen(8))
    assert torch.equal(a, b) and torch.equal(sa, sb)
    assert not torch.equal(a, c)


def test_pad_crop_is_a_shifted_window_of_the_zero_padded_image():
    x = torch.arange(1, 1 + 6 * 28 * 28, dtype=torch.float).reshape(6, 1, 28, 28)  # every pixel unique and > 0
    out = pad_crop(x, 3, _gen(0))
    padded = torch.nn.functional.pad(x, (3, 3, 3, 3))
    for i in range(6):
        matches = [(dy, dx) for dy in range(7) for dx in range(7)
                   if torch.equal(out[i], padded[i, :, dy:dy + 28, dx:dx + 28])]
        assert len(matches) == 1
    offsets = set()
    for seed in range(20):
        o = pad_crop(x[:1], 3, _gen(seed))
        offsets.add(next((dy, dx) for dy in range(7) for dx in range(7)
                         if torch.equal(o[0], padded[0, :, dy:dy + 28, dx:dx + 28])))
    assert len(offsets) > 5  # offsets vary with the stream


def test_default_pad_follows_the_image_size():
    # pad H // 8: 3 at 28 px, 4 at 32 px; a pad-4 window shows up as up to 4 zero rows/cols at 32 px
    bv = BatchViews(1, num_classes=10, mean=(0.0,), std=(1.0,), hflip=0, ra_ops=0, re_prob=0, mixup_alpha=0)
    for size, pad in ((28, 3), (32, 4)):
        x = torch.ones(64, 1, size, size)
        views, _ = bv(x, torch.zeros(64, dtype=torch.long), _gen(0))
        zero_rows = (views[0].sum(-1) == 0).sum(-1).flatten()
        assert zero_rows.max() == pad


def test_hflip_probability_one_and_zero():
    x = torch.randn(4, 1, 5, 5)
    assert torch.equal(hflip(x, 1.0), x.flip(-1))
    assert torch.equal(hflip(x, 0.0), x)


def test_random_erase_boxes():
    x = torch.full((32, 1, 28, 28), 7.0)
    out = random_erase(x, prob=1.0, generator=_gen(4))
    changed = out != 7.0
    for i in range(32):
        rows, cols = changed[i, 0].any(1).nonzero(), changed[i, 0].any(0).nonzero()
        h, w = len(rows), len(cols)
        assert h >= 1 and w >= 1
        assert rows.max() - rows.min() + 1 == h and cols.max() - cols.min() + 1 == w  # contiguous box
        assert changed[i, 0].sum() == h * w  # filled completely
        assert h * w <= 28 * 28 / 3 + 28 + 28  # area <= 1/3 (plus rounding of both sides)
    assert torch.equal(random_erase(x, prob=0.0, generator=_gen(4)), x)


@pytest.mark.parametrize("name,pil", [
    ("Equalize", ImageOps.equalize),
    ("Posterize", lambda im: ImageOps.posterize(im, 3)),          # m = 9: int(9 / 10 * 4) = 3 bits
    ("Invert", ImageOps.invert),
    ("Solarize", lambda im: ImageOps.solarize(im, int(0.9 * 256))),  # timm: threshold int(m / 10 * 256)
])
def test_rand_augment_ops_match_pil(name, pil):
    images = _images(6, seed=5)
    ref = np.stack([np.asarray(pil(Image.fromarray(a[0].numpy()))) for a in images]).astype(np.float64)
    ours = RAND_AUGMENT_OPS[name](images.float() / 255, torch.full((6,), 9.0), torch.ones(6))
    np.testing.assert_allclose(ours[:, 0].double().numpy() * 255, ref, atol=1e-3)


def test_rand_augment_applies_per_image_ops_and_prob_zero_is_identity():
    x = _images(64).float() / 255
    assert torch.equal(rand_augment(x, prob=0.0, generator=_gen(0)), x)
    out = rand_augment(x, num_ops=2, prob=1.0, generator=_gen(0))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    changed = (out - x).flatten(1).abs().amax(1) > 1e-6
    assert changed.float().mean() > 0.7  # nearly every image got at least one op that changes it
    only_invert = rand_augment(x, num_ops=1, prob=1.0, ops=("Invert",), generator=_gen(0))
    torch.testing.assert_close(only_invert, 1 - x)


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="num_views"):
        BatchViews(0, num_classes=10, mean=MEAN, std=STD)
    bv = BatchViews(2, num_classes=10, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        bv(torch.zeros(1, 28, 28), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="channels"):
        bv(torch.zeros(2, 3, 28, 28), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="class indices"):
        bv(torch.zeros(2, 1, 28, 28), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown RandAugment"):
        rand_augment(torch.zeros(2, 1, 8, 8), ops=("Color",))
    with pytest.raises(ValueError, match="probability"):
        hflip(torch.zeros(2, 1, 8, 8), 1.5)


def test_rand_augment_geometric_ops_match_the_single_op_per_image():
    # geometric ops drawn in one layer are resampled together; each image must still get exactly one of them
    x = _images(24, seed=6).float() / 255
    ops = ("Rotate", "ShearX", "TranslateYRel")
    out = rand_augment(x, num_ops=1, magnitude=9.0, magnitude_std=0.0, prob=1.0, ops=ops, generator=_gen(9))
    m = torch.full((1,), 9.0)
    used = set()
    for i in range(24):
        candidates = {(name, s): RAND_AUGMENT_OPS[name](x[i:i + 1], m, torch.full((1,), s))[0]
                      for name in ops for s in (-1.0, 1.0)}
        hits = [key for key, c in candidates.items() if torch.allclose(out[i], c, atol=1e-6)]
        assert hits, f"image {i} matches no single geometric op"
        used.add(hits[0][0])
    assert used == set(ops)
