"""Tests for timm_split.loss.CoTrainingLoss."""
import math

import pytest
import torch
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from timm_split.loss import CoTrainingLoss


def naive_js(logits: torch.Tensor) -> torch.Tensor:
    """H(mean_i p_i) - mean_i H(p_i), per sample, averaged over the batch, in float64."""
    p = torch.softmax(logits.double(), dim=-1)  # [S, B, K]
    m = p.mean(0)

    def entropy(q):
        return -(q * torch.log(q)).sum(-1)

    return (entropy(m) - entropy(p).mean(0)).mean()


def naive_kl(logits: torch.Tensor) -> torch.Tensor:
    """1/S sum_i mean_b KL(q_i || p_i), q_i = mean of the other members' probabilities, float64."""
    p = torch.softmax(logits.double(), dim=-1)
    s = p.shape[0]
    total = 0.0
    for i in range(s):
        q = (p.sum(0) - p[i]) / (s - 1)
        total = total + (q * (torch.log(q) - torch.log(p[i]))).sum(-1).mean()
    return total / s


def naive_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.double(), dim=-1)
    if target.ndim == 1:
        target = F.one_hot(target, logits.shape[-1]).double()
    return sum(-(target * logp[i]).sum(-1).mean() for i in range(logits.shape[0]))


@pytest.fixture
def logits():
    torch.manual_seed(0)
    return torch.randn(3, 5, 7) * 3


@pytest.fixture
def target():
    torch.manual_seed(1)
    return torch.randint(0, 7, (5,))


@pytest.mark.parametrize("mode,ref", [("js", naive_js), ("kl", naive_kl)])
def test_matches_float64_reference(logits, target, mode, ref):
    loss_fn = CoTrainingLoss(cot_weight=0.5, warmup_epochs=0, mode=mode)
    out = loss_fn(logits, target, epoch=0)
    assert set(out) == {"loss", "ce", "cot"}
    assert out["loss"].dtype == torch.float32
    torch.testing.assert_close(out["ce"].double(), naive_ce(logits, target), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["cot"].double(), 0.5 * ref(logits), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], out["ce"] + out["cot"])


def test_list_input_equals_tensor(logits, target):
    loss_fn = CoTrainingLoss()
    a = loss_fn(logits, target, epoch=10)
    b = loss_fn(list(logits), target, epoch=10)
    for k in a:
        torch.testing.assert_close(a[k], b[k])


@pytest.mark.parametrize("mode", ["js", "kl"])
def test_zero_for_identical_members_positive_otherwise(logits, target, mode):
    loss_fn = CoTrainingLoss(warmup_epochs=0, mode=mode)
    same = logits[:1].expand(4, -1, -1).contiguous()
    assert abs(loss_fn(same, target, epoch=0)["cot"].item()) < 1e-6
    assert loss_fn(logits, target, epoch=0)["cot"].item() > 1e-3


def test_js_stable_for_extreme_logits(target):
    # near one-hot members with disjoint support: p*log(p) must not produce NaN/inf
    logits = torch.full((2, 5, 7), -1e4)
    logits[0, :, 0] = 1e4
    logits[1, :, 1] = 1e4
    logits.requires_grad_(True)
    out = CoTrainingLoss(warmup_epochs=0)(logits, target, epoch=0)
    assert torch.isfinite(out["loss"])
    torch.testing.assert_close(out["cot"], torch.tensor(0.5 * math.log(2)))  # JS of disjoint one-hots
    out["loss"].backward()
    assert torch.isfinite(logits.grad).all()


def test_gradcheck_every_member_js():
    torch.manual_seed(0)
    z = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, 3])
    loss_fn = CoTrainingLoss(warmup_epochs=0, mode="js")
    assert torch.autograd.gradcheck(lambda x: loss_fn(x, y, epoch=0)["cot"], (z,))
    assert torch.autograd.gradcheck(lambda x: loss_fn(x, y, epoch=0)["loss"], (z,))
    loss_fn(z, y, epoch=0)["cot"].backward()
    assert all(z.grad[i].abs().sum() > 0 for i in range(3))


def test_gradients_every_member_kl():
    # 'kl' detaches its targets, so a finite-difference gradcheck does not apply; compare with autograd
    # through the float64 reference whose targets q_i come from a constant copy of the logits.
    torch.manual_seed(0)
    z = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(CoTrainingLoss(warmup_epochs=0, mode="kl")(z, torch.tensor([1, 3]), epoch=0)["cot"], z)
    const = z.detach()
    p, q_src = torch.softmax(z, -1), torch.softmax(const, -1)
    ref = sum((((q_src.sum(0) - q_src[i]) / 2) * (torch.log((q_src.sum(0) - q_src[i]) / 2) - torch.log(p[i])))
              .sum(-1).mean() for i in range(3)) / 3
    (g_ref,) = torch.autograd.grad(0.5 * ref, z)
    torch.testing.assert_close(g, g_ref)
    assert all(g[i].abs().sum() > 0 for i in range(3))


def test_kl_targets_are_detached():
    z = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    cot = CoTrainingLoss(warmup_epochs=0, mode="kl")(z, torch.zeros(3, dtype=torch.long), epoch=0)["cot"]
    # d/dz_0 of KL(q_0 || p_0) with q_0 = p_1 detached is softmax(z_0) - p_1, scaled by w / (S * B)
    (g,) = torch.autograd.grad(cot, z)
    p = torch.softmax(z.detach(), -1)
    torch.testing.assert_close(g[0], 0.5 / (2 * 3) * (p[0] - p[1]))
    torch.testing.assert_close(g[1], 0.5 / (2 * 3) * (p[1] - p[0]))


def test_weight_schedule():
    loss_fn = CoTrainingLoss(cot_weight=0.5, warmup_epochs=40)
    assert loss_fn.weight(0) == pytest.approx(0.005)
    assert loss_fn.weight(0.1) == pytest.approx(0.005)
    assert loss_fn.weight(20) == pytest.approx(0.25)
    assert loss_fn.weight(10.5) == pytest.approx(0.5 * 10.5 / 40)
    assert loss_fn.weight(40) == pytest.approx(0.5)
    assert loss_fn.weight(100) == pytest.approx(0.5)
    assert CoTrainingLoss(cot_weight=0.0).weight(50) == 0.0  # floor capped by cot_weight
    assert CoTrainingLoss(warmup_epochs=0).weight(0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="epoch"):
        loss_fn.weight(-1)


def test_cot_uses_schedule(logits, target):
    loss_fn = CoTrainingLoss(cot_weight=0.5, warmup_epochs=40)
    full = loss_fn(logits, target, epoch=40)["cot"]
    torch.testing.assert_close(loss_fn(logits, target, epoch=20)["cot"], full / 2)
    torch.testing.assert_close(loss_fn(logits, target, epoch=0)["cot"], full * 0.005 / 0.5)


def test_single_member_has_no_cot(logits, target):
    out = CoTrainingLoss(warmup_epochs=0)(logits[:1], target, epoch=5)
    assert out["cot"].item() == 0.0
    torch.testing.assert_close(out["loss"], F.cross_entropy(logits[0], target))


def test_soft_targets(logits):
    torch.manual_seed(2)
    soft = torch.softmax(torch.randn(5, 7), -1)
    out = CoTrainingLoss()(logits, soft, epoch=0)
    expected = sum(SoftTargetCrossEntropy()(logits[i], soft) for i in range(3))
    torch.testing.assert_close(out["ce"], expected)
    torch.testing.assert_close(out["ce"].double(), naive_ce(logits, soft), rtol=1e-5, atol=1e-5)


def test_label_smoothing(logits, target):
    out = CoTrainingLoss(smoothing=0.1)(logits, target, epoch=0)
    expected = sum(LabelSmoothingCrossEntropy(0.1)(logits[i], target) for i in range(3))
    torch.testing.assert_close(out["ce"], expected)
    assert out["ce"] != CoTrainingLoss()(logits, target, epoch=0)["ce"]


@pytest.mark.parametrize("mode", ["js", "kl"])
def test_autocast_bf16(mode, target):
    torch.manual_seed(3)
    x = torch.randn(5, 16)
    heads = [torch.nn.Linear(16, 7) for _ in range(3)]
    loss_fn = CoTrainingLoss(warmup_epochs=0, mode=mode)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = torch.stack([h(x) for h in heads])
        assert z.dtype == torch.bfloat16
        out = loss_fn(z, target, epoch=0)
    assert all(v.dtype == torch.float32 for v in out.values())
    ref = naive_js(z.float()) if mode == "js" else naive_kl(z.float())  # same bf16 logits, float64 math
    torch.testing.assert_close(out["cot"].double(), 0.5 * ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["ce"].double(), naive_ce(z.float(), target), rtol=1e-4, atol=1e-5)
    out["loss"].backward()
    assert all(h.weight.grad is not None and torch.isfinite(h.weight.grad).all() for h in heads)


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="jsd"), "mode"),
    (dict(cot_weight=-1), "cot_weight"),
    (dict(warmup_epochs=-1), "warmup_epochs"),
    (dict(smoothing=1.0), "smoothing"),
    (dict(floor=-0.1), "floor"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CoTrainingLoss(**kwargs)


def test_bad_shapes(logits, target):
    loss_fn = CoTrainingLoss()
    with pytest.raises(ValueError, match="unsqueeze"):
        loss_fn(logits[0], target, epoch=0)
    with pytest.raises(ValueError, match="batch size"):
        loss_fn(logits, target[:3], epoch=0)
    with pytest.raises(ValueError, match="soft target shape"):
        loss_fn(logits, torch.rand(5, 6), epoch=0)
    with pytest.raises(ValueError, match="integers"):
        loss_fn(logits, target.float(), epoch=0)
    with pytest.raises(ValueError, match="one shape"):
        loss_fn([logits[0], logits[1, :3]], target, epoch=0)
    with pytest.raises(ValueError, match="empty"):
        loss_fn([], target, epoch=0)
