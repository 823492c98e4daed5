"""Tests for timm_split.training.loss.CoTrainingLoss."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
import torch
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from timm_split.training.loss import CoTrainingLoss


def naive_js(logits: torch.Tensor) -> torch.Tensor:
    """H(mean_i p_i) - mean_i H(p_i), per sample, averaged over the batch, in float64."""
    p = torch.softmax(logits.double(), dim=-1)  # [S, B, K]
    m = p.mean(0)

    def entropy(q):
        return -(q * torch.log(q)).sum(-1)

    return (entropy(m) - entropy(p).mean(0)).mean()


def naive_kl_seed(logits: torch.Tensor) -> torch.Tensor:
    """The seed's kl_seperate, float64: sum over ordered pairs i != j of mean_b KL(p_j || p_i), over S-1."""
    p = torch.softmax(logits.double(), dim=-1)
    s = p.shape[0]
    pairs = [(i, j) for i in range(s) for j in range(s) if j != i]
    return sum((p[j] * (torch.log(p[j]) - torch.log(p[i]))).sum(-1).mean() for i, j in pairs) / (s - 1)


def naive_kl_mixture(logits: torch.Tensor) -> torch.Tensor:
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


@pytest.mark.parametrize("mode,ref", [("js", naive_js), ("kl", naive_kl_seed), ("kl_mixture", naive_kl_mixture)])
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


@pytest.mark.parametrize("mode", ["js", "kl", "kl_mixture"])
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


def test_gradients_every_member_kl_mixture():
    # 'kl_mixture' detaches its targets, so a finite-difference gradcheck does not apply; compare with autograd
    # through the float64 reference whose targets q_i come from a constant copy of the logits.
    torch.manual_seed(0)
    z = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    loss_fn = CoTrainingLoss(warmup_epochs=0, mode="kl_mixture")
    (g,) = torch.autograd.grad(loss_fn(z, torch.tensor([1, 3]), epoch=0)["cot"], z)
    const = z.detach()
    p, q_src = torch.softmax(z, -1), torch.softmax(const, -1)
    ref = sum((((q_src.sum(0) - q_src[i]) / 2) * (torch.log((q_src.sum(0) - q_src[i]) / 2) - torch.log(p[i])))
              .sum(-1).mean() for i in range(3)) / 3
    (g_ref,) = torch.autograd.grad(0.5 * ref, z)
    torch.testing.assert_close(g, g_ref)
    assert all(g[i].abs().sum() > 0 for i in range(3))


@pytest.mark.parametrize("mode,scale", [("kl", 1), ("kl_mixture", 2)])
def test_kl_targets_are_detached(mode, scale):
    z = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    cot = CoTrainingLoss(warmup_epochs=0, mode=mode)(z, torch.zeros(3, dtype=torch.long), epoch=0)["cot"]
    # d/dz_0 of KL(p_1 || p_0) with p_1 detached is softmax(z_0) - p_1, scaled by w / B (seed: sum over pairs
    # / (S-1)) or w / (S * B) (mixture: mean over members)
    (g,) = torch.autograd.grad(cot, z)
    p = torch.softmax(z.detach(), -1)
    torch.testing.assert_close(g[0], 0.5 / (scale * 3) * (p[0] - p[1]))
    torch.testing.assert_close(g[1], 0.5 / (scale * 3) * (p[1] - p[0]))


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


@pytest.mark.parametrize("mode", ["js", "kl", "kl_mixture"])
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
    ref = {"js": naive_js, "kl": naive_kl_seed, "kl_mixture": naive_kl_mixture}[mode](z.float())  # float64 math
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


# ---- issue 15: 'kl' is the seed's kl_seperate
def test_kl_is_the_seed_pairwise_form():
    torch.manual_seed(4)
    z = torch.randn(2, 6, 5, dtype=torch.float64)
    p = torch.softmax(z, -1)
    out = CoTrainingLoss(cot_weight=1.0, warmup_epochs=0, mode="kl")(z, torch.zeros(6, dtype=torch.long), epoch=0)
    both = (F.kl_div(p[1].log(), p[0], reduction="batchmean") + F.kl_div(p[0].log(), p[1], reduction="batchmean"))
    torch.testing.assert_close(out["cot"], both)  # S=2: KL(p_0 || p_1) + KL(p_1 || p_0)
    mixture = CoTrainingLoss(cot_weight=1.0, warmup_epochs=0, mode="kl_mixture")(z, torch.zeros(6, dtype=torch.long),
                                                                                 epoch=0)["cot"]
    torch.testing.assert_close(out["cot"] / mixture, torch.tensor(2.0, dtype=torch.float64))


def test_gradients_every_member_kl_seed():
    # gradients of the seed's form: autograd through the float64 reference with every target p_j constant
    torch.manual_seed(0)
    z = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(CoTrainingLoss(warmup_epochs=0, mode="kl")(z, torch.tensor([1, 3, 0]), epoch=0)["cot"],
                               z)
    logp, q = torch.log_softmax(z, -1), torch.softmax(z.detach(), -1)
    ref = sum((q[j] * (q[j].log() - logp[i])).sum(-1).mean() for i in range(4) for j in range(4) if j != i) / 3
    (g_ref,) = torch.autograd.grad(0.5 * ref, z)
    torch.testing.assert_close(g, g_ref)


# ---- issue 17: hostile inputs
MODES = ["js", "kl", "kl_mixture"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("soft", [False, True])
def test_minus_inf_logit_is_a_masked_class(mode, soft):
    """A -inf logit on no target mass (class masking) gives the loss of the other classes, finite gradients."""
    torch.manual_seed(5)
    z = torch.randn(2, 4, 5)
    target = torch.randint(0, 4, (4,))
    if soft:
        target = torch.softmax(torch.randn(4, 5), -1)
    masked = torch.cat([z, torch.full((2, 4, 1), -math.inf)], -1).requires_grad_(True)
    padded = F.pad(target, (0, 1)) if soft else target
    loss_fn = CoTrainingLoss(warmup_epochs=0, mode=mode)
    out = loss_fn(masked, padded, epoch=0)
    ref = loss_fn(z, target, epoch=0)
    for k in ("loss", "ce", "cot"):
        torch.testing.assert_close(out[k], ref[k])
    out["loss"].backward()
    assert torch.isfinite(masked.grad).all() and (masked.grad[..., -1] == 0).all()


@pytest.mark.parametrize("mode", MODES)
def test_target_or_smoothing_mass_on_a_minus_inf_class_is_inf_as_in_torch(mode):
    """torch's cross_entropy is inf when the target, soft mass or smoothing meets a -inf logit; so is the loss."""
    torch.manual_seed(7)
    z = torch.randn(1, 4, 5)
    z[..., 4] = -math.inf
    index, on_masked = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 1, 2, 3])
    soft = torch.softmax(torch.randn(4, 5), -1)
    cases = [(index, 0.0), (index, 0.1), (on_masked, 0.0), (soft, 0.0)]
    for target, smoothing in cases:
        zz = z.clone().requires_grad_(True)
        out = CoTrainingLoss(warmup_epochs=0, mode=mode, smoothing=smoothing)(zz, target, epoch=0)
        expected = F.cross_entropy(z[0], target, label_smoothing=smoothing)
        torch.testing.assert_close(out["ce"], expected)  # inf == inf; the finite case to the digit
        out["loss"].backward()
        assert torch.isfinite(zz.grad).all()


@pytest.mark.parametrize("mode", MODES)
def test_ignore_index_leaves_samples_out_of_ce_and_divergence(mode):
    torch.manual_seed(6)
    z = torch.randn(3, 5, 7)
    target = torch.tensor([-100, 2, 6, -100, 0])
    keep = target != -100
    loss_fn = CoTrainingLoss(warmup_epochs=0, mode=mode, smoothing=0.1)
    out = loss_fn(z, target, epoch=0)
    ref = loss_fn(z[:, keep], target[keep], epoch=0)
    for k in ("loss", "ce", "cot"):
        torch.testing.assert_close(out[k], ref[k])
    torch.testing.assert_close(out["ce"], sum(F.cross_entropy(z[i], target, label_smoothing=0.1) for i in range(3)))


def test_all_ignored_batch_gives_zero_and_zero_gradients():
    z = torch.randn(2, 3, 4, requires_grad=True)
    out = CoTrainingLoss(warmup_epochs=0)(z, torch.full((3,), -100), epoch=0)
    assert out["loss"].item() == 0.0
    out["loss"].backward()
    assert (z.grad == 0).all()


def test_ignore_index_none_and_out_of_range_indices():
    z = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"in \[0, 4\) or ignore_index=None; got \[-100\]"):
        CoTrainingLoss(ignore_index=None)(z, torch.tensor([-100, 1, 2]), epoch=0)
    with pytest.raises(ValueError, match=r"got \[4\]"):
        CoTrainingLoss()(z, torch.tensor([0, 4, 1]), epoch=0)
    with pytest.raises(ValueError, match="ignore_index"):
        CoTrainingLoss(ignore_index=1.5)


@pytest.mark.parametrize("soft,match", [
    (torch.tensor([[1.2, -0.2, 0.0, 0.0]] * 3), ">= 0"),
    (torch.tensor([[0.5, 0.2, 0.0, 0.0]] * 3), "sum to 1"),
    (torch.tensor([[1.0, 1.0, 0.0, 0.0]] * 3), "sum to 1"),
    (torch.tensor([[math.nan, 1.0, 0.0, 0.0]] * 3), "NaN"),
])
def test_bad_soft_targets(soft, match):
    with pytest.raises(ValueError, match=match):
        CoTrainingLoss()(torch.randn(2, 3, 4), soft, epoch=0)


def test_validate_off_skips_value_checks():
    soft = torch.tensor([[0.5, 0.2, 0.0, 0.0]] * 3)
    assert torch.isfinite(CoTrainingLoss(validate=False)(torch.randn(2, 3, 4), soft, epoch=0)["loss"])


def test_bf16_soft_targets_from_mixup_pass():
    """Mixup + smoothing targets rounded to bf16 sum to 1 only within bf16's eps: the row-sum check accepts them,
    and the loss equals the float32 loss on the same (rounded) targets."""
    from timm.data import Mixup
    torch.manual_seed(7)
    np.random.seed(7)  # Mixup draws its lambda with numpy
    mix = Mixup(mixup_alpha=0.2, label_smoothing=0.1, num_classes=10)
    _, soft = mix(torch.randn(8, 3, 4, 4), torch.randint(0, 10, (8,)))
    soft16 = soft.bfloat16()
    assert (soft16.float().sum(-1) - 1).abs().max() > 0  # rows off 1 by bf16 rounding, which the check tolerates
    logits = torch.randn(2, 8, 10)
    out = CoTrainingLoss()(logits, soft16, epoch=0)
    ref = CoTrainingLoss(validate=False)(logits, soft16.float(), epoch=0)  # fp32 has the tighter tolerance
    assert torch.isfinite(out["loss"]) and out["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-2)


@pytest.mark.parametrize("epoch", ["3", math.nan, math.inf, -1, None, True])
def test_bad_epoch(logits, target, epoch):
    loss_fn = CoTrainingLoss()
    with pytest.raises(ValueError, match="epoch must be a finite number >= 0"):
        loss_fn.set_epoch(epoch)
    if epoch is not None:
        with pytest.raises(ValueError, match="epoch must be a finite number"):
            loss_fn(logits, target, epoch=epoch)


@pytest.mark.parametrize("kwargs,match", [
    (dict(cot_weight=math.nan), "cot_weight"), (dict(cot_weight=math.inf), "cot_weight"),
    (dict(cot_weight="0.5"), "cot_weight"), (dict(warmup_epochs=math.nan), "warmup_epochs"),
    (dict(smoothing=math.nan), "smoothing"), (dict(floor=math.inf), "floor"),
])
def test_non_finite_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CoTrainingLoss(**kwargs)


def test_empty_batch_and_column_targets():
    loss_fn = CoTrainingLoss()
    with pytest.raises(ValueError, match="B=0"):
        loss_fn(torch.randn(2, 0, 5), torch.zeros(0, dtype=torch.long), epoch=0)
    with pytest.raises(ValueError, match=r"indices must be \[B\].*squeeze\(1\)"):
        loss_fn(torch.randn(2, 3, 5), torch.zeros(3, 1, dtype=torch.long), epoch=0)


# ---- issue 18: timm-style loss_fn(output, target) with set_epoch
def test_timm_style_call(logits, target):
    loss_fn = CoTrainingLoss(cot_weight=0.5, warmup_epochs=40)
    with pytest.raises(RuntimeError, match="set_epoch"):
        loss_fn(logits, target)
    loss_fn.set_epoch(20.5)
    loss = loss_fn(logits, target)
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0
    torch.testing.assert_close(loss, loss_fn(logits, target, epoch=20.5)["loss"])
    assert loss != loss_fn(logits, target, epoch=40)["loss"]
    no_warmup = CoTrainingLoss(warmup_epochs=0)  # the epoch does not matter: no set_epoch needed
    torch.testing.assert_close(no_warmup(logits, target), no_warmup(logits, target, epoch=7)["loss"])


def test_timm_style_in_a_training_step():
    """The loss goes where a timm loss goes: ``loss_fn(model(x), y).backward()``."""
    ens = torch.nn.ModuleList([torch.nn.Linear(6, 4) for _ in range(3)])
    loss_fn = CoTrainingLoss()
    loss_fn.set_epoch(1)
    x, y = torch.randn(5, 6), torch.randint(0, 4, (5,))
    loss_fn(torch.stack([m(x) for m in ens]), y).backward()
    assert all(m.weight.grad.abs().sum() > 0 for m in ens)


# ---- property test against a float64 reference (issue 17)
def reference_loss(z: torch.Tensor, target: torch.Tensor, mode: str, w: float, smoothing: float) -> torch.Tensor:
    """The loss from the definitions, in float64, with xlogy's 0 log 0 = 0; ignored samples (-100) left out."""
    z = z.double()
    p, logp = torch.softmax(z, -1), torch.log_softmax(z, -1)
    num, _, classes = z.shape
    if target.ndim == 1:
        keep = target != -100
        t = F.one_hot(torch.where(keep, target, 0), classes).double()
    else:
        keep, t = torch.ones(len(target), dtype=torch.bool), target.double()
    t = t * (1 - smoothing) + smoothing / classes
    ce_rows = -torch.where(t > 0, t * logp, torch.zeros_like(logp)).sum(-1)  # [S, B]

    def kl(a, b):  # KL(a || b) per sample, a and b probabilities
        return (torch.xlogy(a, a) - torch.xlogy(a, b)).sum(-1)

    def entropy(q):
        return -torch.xlogy(q, q).sum(-1)

    if num == 1:
        div = torch.zeros(len(keep), dtype=torch.float64)
    elif mode == "js":
        div = entropy(p.mean(0)) - entropy(p).mean(0)
    elif mode == "kl":
        div = sum(kl(p[j], p[i]) for i in range(num) for j in range(num) if j != i) / (num - 1)
    else:
        div = sum(kl((p.sum(0) - p[i]) / (num - 1), p[i]) for i in range(num)) / num
    if not keep.any():
        return torch.zeros((), dtype=torch.float64)
    return ce_rows[:, keep].mean(1).sum() + w * div[keep].mean()


@st.composite
def loss_cases(draw):
    num, batch, classes = draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(2, 6))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.1, 1.0, 8.0]))
    z = (torch.randn(num, batch, classes, generator=g) * scale).to(dtype)
    masked = draw(st.lists(st.booleans(), min_size=classes, max_size=classes).filter(lambda m: not all(m)))
    allowed = torch.tensor([not m for m in masked])
    z[..., ~allowed] = -math.inf  # class masking: the same classes for every member
    smoothing = draw(st.sampled_from([0.0, 0.1]))  # with a masked class: inf, as F.cross_entropy
    if draw(st.booleans()):  # soft targets on the allowed classes
        raw = torch.rand(batch, classes, generator=g) * allowed
        target = raw / raw.sum(-1, keepdim=True).clamp(min=1e-12)
        target[raw.sum(-1) == 0] = allowed.double().div(allowed.sum()).to(target.dtype)
    else:
        choices = allowed.nonzero().squeeze(1)
        target = choices[torch.randint(0, len(choices), (batch,), generator=g)]
        target[torch.rand(batch, generator=g) < draw(st.sampled_from([0.0, 0.3, 1.0]))] = -100
    return z, target, draw(st.sampled_from(MODES)), draw(st.sampled_from([0.0, 0.5, 2.0])), smoothing


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(loss_cases())
def test_property_matches_float64_reference(case):
    z, target, mode, w, smoothing = case
    loss_fn = CoTrainingLoss(cot_weight=w, warmup_epochs=0, smoothing=smoothing, mode=mode, floor=0.0)
    zz = z.clone().requires_grad_(True)
    out = loss_fn(zz, target, epoch=0)
    ref = reference_loss(z, target, mode, w, smoothing)
    assert out["loss"].dtype == (torch.float64 if z.dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(out["loss"].double(), ref, rtol=2e-5, atol=2e-5)
    out["loss"].backward()
    assert torch.isfinite(zz.grad).all()
