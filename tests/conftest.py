import contextlib
import fnmatch
import logging
import os

import pytest
import torch

logging.getLogger("timm_split").setLevel(logging.ERROR)

# model -> (creation kwargs, CPU test input size). Models with a fixed token grid are built at the test size.
ACCEPTANCE = {
    "resnet50": ({}, 64),
    "wide_resnet50_2": ({}, 64),
    "resnext50_32x4d": ({}, 64),
    "seresnet50": ({}, 64),
    "efficientnet_b0": ({}, 64),
    "mobilenetv3_large_100": ({}, 64),
    "regnety_016": ({}, 64),
    "densenet121": ({}, 64),
    "dla34": ({}, 64),
    "cspdarknet53": ({}, 64),
    "convnext_tiny": ({}, 64),
    "vit_small_patch16_224": ({"img_size": 64}, 64),
    "deit_tiny_patch16_224": ({"img_size": 64}, 64),
    "swin_tiny_patch4_window7_224": ({}, 224),
    "maxvit_tiny_tf_224": ({"img_size": 64}, 64),
    "eva02_tiny_patch14_224": ({"img_size": 70}, 70),
    "mixer_b16_224": ({"img_size": 64}, 64),
    "levit_128": ({"img_size": 64}, 64),
    "ghostnet_100": ({}, 64),
    "inception_v3": ({}, 96),
    "hrnet_w18_small": ({}, 64),
    "fastvit_t8": ({}, 64),
}

# The default tier (one small architecture per timm module): FAST runs by default, TIER (two real models whose
# fx/TorchScript/fine-tune tests cost ~50 s) under the `tier` marker, which CI runs; the rest is marked slow.
# TIMM_SPLIT_FILTER narrows it (an fnmatch pattern), as timm's tests take a filter.
FAST = ["test_resnet", "test_convnext", "test_efficientnet", "test_byobnet", "test_vit", "mobilenetv3_small_050"]
TIER = ["edgenext_xx_small", "levit_128s"]
FILTER = os.environ.get("TIMM_SPLIT_FILTER", "*")


def matches(arch: str, patterns) -> bool:
    return any(fnmatch.fnmatch(arch, p) for p in patterns)


def tier_params(patterns=("*",), exclude=()):
    """pytest params of the default tier matching ``patterns`` and not ``exclude``: FAST first, then TIER (marked
    tier), the rest slow."""
    from timm_split.commands.sweep import default_tier

    archs = [a for a in default_tier() if fnmatch.fnmatch(a, FILTER) and matches(a, patterns)
             and not matches(a, exclude)]
    first = [a for a in FAST + TIER if a in archs]
    return [pytest.param(a, marks=[] if a in FAST else [pytest.mark.tier] if a in TIER else [pytest.mark.slow])
            for a in first + [a for a in archs if a not in first]]


# oneDNN builds a kernel per new conv shape on its first call (about 3 s for a resnet50 at 64 px on this
# 2-core machine); the tests run each shape once or twice on tiny inputs, where the native kernels are faster.
torch.backends.mkldnn.enabled = False


@pytest.fixture(autouse=True, scope="session")
def _auto_cache_in_a_temporary_folder(tmp_path_factory):
    """``set_execution('auto')`` caches its decisions on disk (``TIMM_SPLIT_CACHE_DIR``): the tests (and the
    processes they start) use a folder of their own, so they neither read the user's decisions nor leave any."""
    before = os.environ.get("TIMM_SPLIT_CACHE_DIR")
    os.environ["TIMM_SPLIT_CACHE_DIR"] = str(tmp_path_factory.mktemp("timm_split_cache"))
    yield
    if before is None:
        os.environ.pop("TIMM_SPLIT_CACHE_DIR", None)
    else:
        os.environ["TIMM_SPLIT_CACHE_DIR"] = before


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


def fake_fashion_idx(root, per_class: int, val_per_class: int) -> str:
    """Fashion-MNIST-shaped IDX files in ``root``: class c is a bright bar at a class-dependent place on noise."""
    import numpy as np

    from timm_split.training.data import write_idx
    rng = np.random.RandomState(0)
    for split, n in (("train", per_class * 10), ("t10k", val_per_class * 10)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.randint(0, 60, size=(n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            images[i, 2 * c:2 * c + 8, 4:20] = 255
        write_idx(str(root / f"{split}-images-idx3-ubyte.gz"), images)
        write_idx(str(root / f"{split}-labels-idx1-ubyte.gz"), labels)
    return str(root)


def tiny_png_folder(tmp_path_factory, per_class: int = 4, val_per_class: int = 2) -> str:
    """An ImageFolder (train/validation) of fake Fashion-MNIST PNGs, written by the export helper."""
    from timm_split.training.data import export_fashion_mnist
    idx = fake_fashion_idx(tmp_path_factory.mktemp("idx"), per_class, val_per_class)
    out = tmp_path_factory.mktemp("png") / "f"
    export_fashion_mnist(str(out), idx_dir=idx)
    return str(out)


def load_benchmark(name: str):
    """The script ``benchmarks/<name>.py`` loaded as a module, registered in ``sys.modules`` under ``name`` (so a
    script that imports a sibling, as science.py imports science_views, finds it loaded first)."""
    import importlib.util
    import sys

    if name in sys.modules:
        return sys.modules[name]
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", name + ".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def log_records(name: str = "timm_split", level: int = logging.INFO):
    """The log records of logger ``name`` at ``level`` and above while the block runs (a list filled as they come;
    works where pytest's caplog misses them: a logger whose propagation the code under test turns off)."""
    records = []
    handler = logging.Handler(level)
    handler.emit = records.append
    logger = logging.getLogger(name)
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
