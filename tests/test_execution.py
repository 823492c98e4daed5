"""Execution strategies and multi-device placement (issue 7): every strategy gives the loop's results."""
import copy
import os
import pickle
import threading

import pytest
import timm
import torch
from torch import nn

import timm_split
from timm_split import CoTrainingLoss

CLASSES = 5
STRATEGIES = ["threads", "packed", "auto", "threads+packed"]  # each against the loop
# two workers even with one intra-op thread
OPTIONS = {"threads": {"workers": 2}, "threads+packed": {"workers": 2}}


def _set(ens, strategy):
    return ens.set_execution(strategy, **OPTIONS.get(strategy, {}))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on this shared 2-core machine OpenMP barriers under load make tiny ops take
    100x longer with two. The strategies' own thread handling is tested with explicit options."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def resnet():
    """A small timm ResNet (bottlenecks, downsample shortcuts), split in two: fast on 2 cores."""
    from timm.models.resnet import Bottleneck, ResNet
    torch.manual_seed(0)
    model = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=CLASSES, stem_width=16, channels=(8, 16, 32, 64))
    return timm_split.split(model, 2, img_size=32)


def _data(S=2, B=4, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(S, B, 3, size, size, generator=g), torch.randint(0, CLASSES, (B,), generator=g)


def _close(a, b, what, rtol=1e-4, atol=1e-6):
    """Equal up to float noise, relative to the largest magnitude (BN-fed tensors have near-zero entries)."""
    err, scale = (a.float() - b.float()).abs().max().item(), b.abs().max().item()
    assert err <= rtol * scale + atol, f"{what}: max error {err:.3g}, max magnitude {scale:.3g}"


def _train_steps(ens, views, target, steps=2):
    opt = torch.optim.SGD(ens.parameters(), lr=0.05, momentum=0.9)
    loss_fn = CoTrainingLoss(cot_weight=1.0, warmup_epochs=0)
    outs = []
    for _ in range(steps):
        out = ens.forward_members(views)
        loss = loss_fn(out, target, epoch=1)["loss"]
        opt.zero_grad()
        loss.backward()
        outs.append(out.detach())
        opt.step()
    return outs


def _rtol(strategy):
    # grouped convolutions sum in another order: after two SGD steps the relative drift is ~2e-4
    return 1e-3 if "packed" in strategy or strategy == "auto" else 1e-4


def _assert_same_state(a, b, rtol=1e-4, atol=1e-6):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        _close(x, y, name, rtol, atol)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_training_matches_loop(resnet, strategy):
    """Train mode, per-member views: outputs, gradients, params after SGD steps and BN running stats."""
    views, target = _data()
    ref = copy.deepcopy(resnet).train()
    ens = _set(copy.deepcopy(resnet).train(), strategy)
    assert ens.execution == strategy
    for o, r in zip(_train_steps(ens, views, target), _train_steps(ref, views, target)):
        _close(o, r, "outputs", _rtol(strategy))
    for (name, p), q in zip(ens.named_parameters(), ref.parameters()):
        assert p.grad is not None, f"{strategy}: no gradient reached {name}"
    _assert_same_state(ens, ref, _rtol(strategy))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_eval_matches_loop(resnet, strategy):
    """Eval mode, one shared batch, with and without grad; cached stacked/packed tensors follow param updates."""
    x = _data()[0][0]
    ref = copy.deepcopy(resnet).eval()
    ens = _set(copy.deepcopy(resnet).eval(), strategy)
    with torch.no_grad():
        _close(ens(x), ref(x), "no_grad", _rtol(strategy))
        for a, b in zip(ens.parameters(), ref.parameters()):  # an optimizer step, in place
            a.mul_(0.9)
            b.mul_(0.9)
        _close(ens.forward_members(x), ref.forward_members(x), "after in-place update", _rtol(strategy))
    out = ens(x)
    out.square().sum().backward()
    ref(x).square().sum().backward()
    for (name, p), q in zip(ens.named_parameters(), ref.parameters()):
        _close(p.grad, q.grad, name, _rtol(strategy))


def test_packed_efficientnet_blocks():
    """Depthwise convs, squeeze-excite, BatchNormAct2d and SiLU pack too (train mode, running stats)."""
    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b0", num_classes=CLASSES)
    ens = timm_split.split(model, 2, img_size=32).train()
    ref, packed = copy.deepcopy(ens), copy.deepcopy(ens).set_execution("packed")
    views, target = _data(B=8)
    for o, r in zip(_train_steps(packed, views, target, 1), _train_steps(ref, views, target, 1)):
        _close(o, r, "outputs", 1e-3)
    # atol: a BatchNorm bias feeding the next BatchNorm has a zero gradient up to float noise (~1e-6 here)
    _assert_same_state(packed, ref, 1e-3, 1e-5)


@pytest.mark.parametrize("training", [True, False])
def test_threads_packed_two_members_per_worker(training):
    """S=4 on two workers with pack=True: each worker runs a packed pair, forward and backward."""
    from timm.models.resnet import Bottleneck, ResNet
    torch.manual_seed(0)
    model = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=CLASSES, stem_width=16, channels=(8, 16, 32, 64))
    ref = timm_split.split(model, 4, img_size=32).train(training)
    ens = copy.deepcopy(ref).set_execution("threads", workers=2, pack=True)
    assert ens.execution == "threads+packed", "the name auto and set_execution know it by"
    views, target = _data(S=4)
    for o, r in zip(_train_steps(ens, views, target), _train_steps(ref, views, target)):
        _close(o, r, "outputs", 1e-3)
    _assert_same_state(ens, ref, 1e-3, 1e-5)


def test_packed_groupnorm_linear_layernorm():
    """GroupNorm, hidden linears and LayerNorm pack too (per-member groups, baddbmm, per-member normalisation)."""
    def net():
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.GELU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, CLASSES))
    torch.manual_seed(0)
    ens = timm_split.SplitEnsemble([net() for _ in range(3)]).train()
    ref, packed = copy.deepcopy(ens), copy.deepcopy(ens).set_execution("packed")
    views, target = _data(S=3, size=8)
    for o, r in zip(_train_steps(packed, views, target), _train_steps(ref, views, target)):
        _close(o, r, "outputs", 1e-3)
    _assert_same_state(packed, ref, 1e-3)


class _Gate(nn.Module):
    """A channel-mixing forward no module list knows: the packing pass packs it from its recorded ops."""

    def forward(self, x):
        return x * x.mean(1, keepdim=True)


@pytest.mark.parametrize("strategy", ["packed", "threads+packed"])
def test_packed_runs_a_custom_module_as_the_loop(strategy):
    net = nn.Sequential(nn.Conv2d(3, 8, 3), _Gate(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, CLASSES))
    torch.manual_seed(0)
    ens = timm_split.SplitEnsemble([copy.deepcopy(net).apply(_reset) for _ in range(2)]).train()
    ref, packed = copy.deepcopy(ens), copy.deepcopy(ens).set_execution(strategy)
    assert packed.execution == strategy
    views, target = _data(S=2, size=8)
    for o, r in zip(_train_steps(packed, views, target), _train_steps(ref, views, target)):
        _close(o, r, "outputs", 1e-3)
    _assert_same_state(packed, ref, 1e-3)


def _reset(m: nn.Module) -> None:
    if hasattr(m, "reset_parameters"):
        m.reset_parameters()


# auto's decision rule, its caches and its cost: tests/test_auto.py


def test_to_devices_cpu_cpu(resnet):
    views, target = _data()
    ref = copy.deepcopy(resnet).train()
    ens = copy.deepcopy(resnet).train().to_devices(["cpu", "cpu"], workers=2)
    assert ens.execution == "threads"
    assert [str(next(m.parameters()).device) for m in ens.members] == ["cpu", "cpu"]
    for o, r in zip(_train_steps(ens, views, target), _train_steps(ref, views, target)):
        _close(o, r, "outputs")
    _assert_same_state(ens, ref)
    with pytest.raises(ValueError, match="non-empty list"):
        ens.to_devices("cpu")


def test_members_on_different_devices_need_loop_or_threads():
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, CLASSES))
    ens = timm_split.SplitEnsemble([copy.deepcopy(net), copy.deepcopy(net)])
    ens.members[1].to("meta")
    for strategy in ("compile", "packed"):
        with pytest.raises(ValueError, match="one device"):
            ens.set_execution(strategy)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_threads_pinned_one_core_each(resnet):
    ens = copy.deepcopy(resnet).eval()
    x = _data()[0]
    mask, threads = os.sched_getaffinity(0), torch.get_num_threads()
    cores = sorted(mask)[:2]
    with torch.no_grad():
        want = ens.forward_members(x)
        ens.set_execution("threads", cores=[[cores[0]], [cores[1]]])
        _close(ens.forward_members(x), want, "pinned")
    assert os.sched_getaffinity(0) == mask and torch.get_num_threads() == threads, "the caller was changed"


def test_threads_propagate_grad_mode(resnet):
    ens = copy.deepcopy(resnet).eval().set_execution("threads", workers=2)
    x = _data()[0][0]
    with torch.no_grad():
        assert not ens(x).requires_grad
    with torch.inference_mode():
        assert ens(x).is_inference()
    assert ens(x).requires_grad


def _backward_threads(ens, views, **kwargs):
    """The names of the threads that ran each member's first conv backward, and the params' grads."""
    names = set()
    hooks = [m.conv1.register_full_backward_hook(lambda *a: names.add(threading.current_thread().name))
             for m in ens.members]
    try:
        ens.zero_grad(set_to_none=True)
        ens.forward_members(views).square().sum().backward(**kwargs)
    finally:
        for h in hooks:
            h.remove()
    return names, [p.grad.clone() for p in ens.parameters()]


@pytest.mark.parametrize("parallel", [True, False])
def test_threads_backward_on_the_workers(resnet, parallel):
    """CPU backward runs on the worker threads (parallel_backward) and gives the loop's gradients, also to
    torch.autograd.grad and to the views."""
    views = _data()[0].requires_grad_()
    ref = copy.deepcopy(resnet).train()
    ens = copy.deepcopy(resnet).train().set_execution("threads", workers=2, parallel_backward=parallel)
    names, grads = _backward_threads(ens, views)
    _, want = _backward_threads(ref, views)
    assert names and all(n.startswith("timm_split") == parallel for n in names), names
    for g, w in zip(grads, want):
        _close(g, w, "grad")
    out = ens.forward_members(views)
    g_view, g_param = torch.autograd.grad(out[1].sum(), [views, next(ens.members[1].parameters())])
    r_view, r_param = torch.autograd.grad(ref.forward_members(views)[1].sum(),
                                          [views, next(ref.members[1].parameters())])
    _close(g_view, r_view, "view grad")
    _close(g_param, r_param, "param grad")


def test_threads_backward_twice_names_the_fix(resnet):
    ens = copy.deepcopy(resnet).train().set_execution("threads", workers=2)
    loss = ens.forward_members(_data()[0]).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward twice.*set_execution\\('loop'\\)"):
        loss.backward()


@pytest.mark.parametrize("strategy,options,match", [
    ("fast", {}, "execution must be one of"),
    ("threads", {"parallel_backward": 1}, "parallel_backward must be"),
    ("threads", {"workers": 0}, "workers must be an int"),
    ("threads", {"cores": [[]]}, "cores must be"),
    ("threads", {"speed": 1}, "execution 'threads' has no option 'speed'; its options: cores"),
    ("auto", {"candidates": ["loop", "auto"]}, "auto candidates"),
    ("auto", {"candidates": ["loop", "vmap"]}, "auto candidates"),
    ("threads+packed", {"pack": False}, "implies"),
])
def test_bad_arguments(resnet, strategy, options, match):
    with pytest.raises(ValueError, match=match):
        copy.deepcopy(resnet).set_execution(strategy, **options)


def test_copy_and_pickle_after_running(resnet):
    ens = copy.deepcopy(resnet).eval().set_execution("threads", workers=2)
    x = _data()[0][0]
    with torch.no_grad():
        want = ens(x)
        for clone in (copy.deepcopy(ens), pickle.loads(pickle.dumps(ens))):
            assert clone.execution == "threads"
            _close(clone(x), want, "clone")


def test_compile_matches_loop():
    """torch.compile through dynamo and AOT autograd; the 'eager' backends skip inductor's C++ build
    (about a minute here; see test_compile_inductor, marked slow)."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, CLASSES))
    torch.manual_seed(0)
    ens = timm_split.split(net, 2, img_size=8).train()
    ref, comp = copy.deepcopy(ens), copy.deepcopy(ens).set_execution("compile", backend="aot_eager")
    views, target = _data(size=8)
    for o, r in zip(_train_steps(comp, views, target), _train_steps(ref, views, target)):
        _close(o, r, "outputs")
    _assert_same_state(comp, ref)


@pytest.mark.slow
def test_compile_inductor(resnet):
    ref, comp = copy.deepcopy(resnet).train(), copy.deepcopy(resnet).train().set_execution("compile")
    views, target = _data()
    for o, r in zip(_train_steps(comp, views, target), _train_steps(ref, views, target)):
        _close(o, r, "outputs", 1e-3)
    _assert_same_state(comp, ref, 1e-3)
