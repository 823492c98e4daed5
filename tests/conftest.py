import logging

import pytest
import torch

logging.getLogger("timm_split").setLevel(logging.ERROR)

# oneDNN builds a kernel per new conv shape on its first call (about 3 s for a resnet50 at 64 px on this
# 2-core machine); the tests run each shape once or twice on tiny inputs, where the native kernels are faster.
torch.backends.mkldnn.enabled = False


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def snapshot(model: torch.nn.Module):
    """Everything split() must not change: tensors (values, devices, requires_grad), flags and hooks."""
    tensors = {k: (v.detach().clone() if not v.is_meta else v.shape, v.requires_grad)
               for k, v in list(model.named_parameters()) + list(model.named_buffers())}
    flags = {n: m.training for n, m in model.named_modules()}
    hooks = {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}
    return tensors, flags, hooks


def assert_unchanged(model: torch.nn.Module, snap) -> None:
    tensors, flags, hooks = snap
    now = snapshot(model)
    assert now[1] == flags and now[2] == hooks
    assert now[0].keys() == tensors.keys()
    for k, (v, rg) in tensors.items():
        w, rg2 = now[0][k]
        assert rg == rg2, k
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, w), k
        else:
            assert v == w, k
