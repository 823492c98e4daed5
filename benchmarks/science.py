"""Does splitting pay? The pre-registered Fashion-MNIST benchmark of docs/results.md: gate, grid, report.

    python benchmarks/science.py --stage gate --measure --jobs 2   # ms per image pass, the gate's expected wall time
    python benchmarks/science.py --stage gate --jobs 2             # stage 1: the regime gate (resumes)
    python benchmarks/science.py --stage grid --measure --jobs 2   # the grid's expected wall time
    python benchmarks/science.py --stage grid --jobs 2             # stage 2: the grid (resumes)
    python benchmarks/science.py --report                          # docs/results.md tables from docs/science/
    python benchmarks/science.py --dry-run                         # everything at a tiny size, in a temp folder
    bash benchmarks/science_gpu.sh                                 # WRN-16-8, single x5 and S=2 x5 on one GPU

Every run trains on a class-balanced Fashion-MNIST subset held as one uint8 tensor on the device, with the seed's
views made on whole batches (``science_views.BatchViews``: per-member pad-crop, flip, RandAugment, random
erasing, then mixup shared by the members), ``timm_split.split`` / ``CoTrainingLoss`` / ``param_groups`` and timm's
``create_optimizer_v2`` / ``create_scheduler_v2``. Each finished run writes ``<records>/<stage>/<id>.json`` (config,
costs, test and clean-train metrics, last-epoch train loss, wall time) and ``<id>.npz`` (the ensemble's test logits
as float16, the members' test predictions; from amendment 2 on also every member's test logits and the logits on
the declared out-of-distribution set, ``ood_images``), both atomically; records from amendment 2 on carry their
``provenance`` (git revision, dirty flag, a hash of the code that ran); a rerun skips runs whose record
exists with the same config, so a grid may span sessions. Independent runs go to ``--jobs`` single-thread worker processes.
"""
import argparse
import concurrent.futures as cf
import copy
import dataclasses
import json
import math
import multiprocessing
import os
import statistics
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from timm_split import CoTrainingLoss, SplitEnsemble, param_groups, split
from timm_split.training.data import read_idx
from science_views import BatchViews  # benchmarks/: the folder of this script

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

MEAN, STD, NUM_CLASSES = (0.2860,), (0.3530,), 10
DATA_DIR = "/usr/share/datasets/fashion-mnist"
RECORDS = os.path.join(ROOT, "docs", "science")
RESULTS_MD = os.path.join(ROOT, "docs", "results.md")


# ----------------------------------------------------------------------------------------------------------
# networks (1-channel 28 px input, 10 classes); ``k`` scales every channel count: round(c * k)


def _scores(logits: torch.Tensor, target: torch.Tensor) -> Dict[str, float]:
    """timm_split.commands.validate's metrics, with the NLL under the key the records use ('nll', not 'loss')."""
    from timm_split.training.metrics import classification_metrics
    m = dict(classification_metrics(logits, target))
    m["nll"] = m.pop("loss")
    return m


def _cfg(model: nn.Module, name: str) -> nn.Module:
    model.pretrained_cfg = {"architecture": name, "input_size": (1, 28, 28), "num_classes": NUM_CLASSES,
                            "mean": MEAN, "std": STD}
    return model


def resnet10(k: float) -> nn.Module:
    """Wide ResNet-10 from timm's ``ResNet``: BasicBlock x [1, 1, 1, 1], channels (16, 32, 64, 128) * k, a deep
    stem of width 8 * k with stride 2 and no max-pool (stages at 14, 7, 4, 2 px)."""
    from timm.models.resnet import BasicBlock, ResNet

    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=NUM_CLASSES, in_chans=1, stem_type="deep",
                   stem_width=max(1, round(8 * k)), channels=tuple(max(1, round(c * k)) for c in (16, 32, 64, 128)))
    model.maxpool = nn.Identity()
    return _cfg(model, f"resnet10_k{k:g}")


class _PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = torch.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(o)
        return skip + self.conv2(torch.relu(self.bn2(self.conv1(o))))


class WideResNet(nn.Module):
    """Pre-activation WRN-d-k (Zagoruyko and Komodakis), CIFAR layout, no dropout: 3 groups of (d - 4) / 6
    blocks at widths (16, 32, 64) * k, strides 1, 2, 2 (28, 14, 7 px)."""

    def __init__(self, depth: int = 16, k: float = 8, in_chans: int = 1, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4 (10, 16, 22, 28, ...); got {depth}.")
        n, widths = (depth - 4) // 6, [max(1, round(c * k)) for c in (16, 32, 64)]
        self.num_classes, self.num_features = num_classes, widths[-1]
        self.stem = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)  # 16 at every k, as in the WRN paper
        blocks, cin = [], self.stem.out_channels
        for g, w in enumerate(widths):
            for i in range(n):
                blocks.append(_PreActBlock(cin, w, 2 if g and not i else 1))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.bn, self.fc = nn.BatchNorm2d(cin), nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.blocks(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def wrn16(k: float) -> nn.Module:
    """WRN-16-k (WRN-16-8: about 11M params)."""
    return _cfg(WideResNet(16, k), f"wrn16_k{k:g}")


ARCHS = {"resnet10": resnet10, "wrn16": wrn16}

# arm: split factor S and how it differs from the main S=2 arm
ARMS: Dict[str, Dict[str, Any]] = {
    "single": {"S": 1}, "s2": {"S": 2}, "s4": {"S": 4}, "s2_nocot": {"S": 2, "no_cot": True},
    "s2_sameview": {"S": 2, "same_view": True}, "s2_uniform": {"S": 2, "uniform": True},
}
PRIMARY, CONTROLS = ("single", "s2"), ("s2_nocot", "s2_sameview", "s2_uniform")


@dataclasses.dataclass
class Setting:
    """What every run of a stage shares (the pre-registered recipe; docs/results.md)."""

    arch: str = "resnet10"
    width: float = 1.0
    per_class: int = 100
    epochs: int = 150
    batch_size: int = 64
    lr: float = 0.05
    weight_decay: float = 5e-4
    cot_weight: float = 0.5
    pad: Optional[int] = None
    hflip: float = 0.5
    ra_ops: int = 2
    ra_magnitude: float = 9.0
    re_prob: float = 0.25
    mixup_alpha: float = 0.2
    split_kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)
    device: str = "cpu"
    amp: bool = False
    channels_last: bool = False
    data_dir: str = DATA_DIR


@dataclasses.dataclass(frozen=True)
class Spec:
    """One run: a stage, an arm, the width of the network it starts from, a seed."""

    stage: str
    arm: str
    width: float
    seed: int
    kind: str = "grid"

    def run_id(self, st: Setting) -> str:
        extra = "".join(f"+{k}={v}" for k, v in sorted(st.split_kwargs.items())) if ARMS[self.arm]["S"] > 1 else ""
        return f"{self.arm}{extra}-{st.arch}-k{self.width:g}-n{st.per_class}-e{st.epochs}-seed{self.seed}"


def _record_config(spec: Spec, st: Setting) -> Dict[str, Any]:
    """What must match for a stored record to count as this run (device and speed knobs excluded)."""
    cfg = dataclasses.asdict(st)
    for k in ("device", "amp", "channels_last", "data_dir"):
        cfg.pop(k)
    if ARMS[spec.arm]["S"] == 1:
        cfg["split_kwargs"] = {}  # nothing to split: the single network is the same run whatever they say
    return dict(cfg, arm=spec.arm, run_width=spec.width, seed=spec.seed, kind=spec.kind)


# ----------------------------------------------------------------------------------------------------------
# data

_DATA: Dict[Tuple[str, int, str], Tuple[torch.Tensor, ...]] = {}


def balanced_subset(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first ``per_class`` images of every class in a fixed permutation (``RandomState(0)``)."""
    perm = np.random.RandomState(0).permutation(len(labels))
    keep = [perm[labels[perm] == c][:per_class] for c in range(NUM_CLASSES)]
    if min(len(k) for k in keep) < per_class:
        raise ValueError(f"per_class={per_class} is more than a class has ({min(len(k) for k in keep)}).")
    return np.sort(np.concatenate(keep))


def _idx(data_dir: str, name: str) -> np.ndarray:
    for cand in (name + ".gz", name):
        if os.path.isfile(os.path.join(data_dir, cand)):
            return read_idx(os.path.join(data_dir, cand))
    raise FileNotFoundError(f"{name}[.gz] not in {data_dir}: pass --data-dir with the four Fashion-MNIST IDX files "
                            "(Debian: apt-get install dataset-fashion-mnist).")


def ood_images() -> torch.Tensor:
    """The declared out-of-distribution set of amendment 2: scikit-learn's bundled 8x8 handwritten digits (all
    1,797), grey levels 0-16 scaled to 0-255, resized to 20 x 20 (bilinear, antialiased) and centred on a 28 x 28
    black canvas as MNIST centres its digits: ``uint8 [1797, 1, 28, 28]``. No class of Fashion-MNIST holds a digit."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: nothing downloads

    d = torch.from_numpy(load_digits().images.astype(np.float32) * (255.0 / 16.0))[:, None]
    small = torch.nn.functional.interpolate(d, size=(20, 20), mode="bilinear", antialias=True, align_corners=False)
    out = torch.zeros(len(d), 1, 28, 28)
    out[:, :, 4:24, 4:24] = small
    return out.round().clamp(0, 255).to(torch.uint8)


SCIENCE_CODE = ("benchmarks/science.py", "benchmarks/science_views.py")


def provenance() -> Dict[str, Any]:
    """What code made a record (amendment 2): the git revision of the tree this script runs from, whether its
    tracked files differ from that revision, and a SHA-256 over the science scripts and every ``timm_split/*.py``
    file the run imports (sorted paths and contents), so the report can refuse to pool runs of different code."""
    import hashlib
    import subprocess
    import timm_split

    def git(*argv: str) -> str:
        try:
            return subprocess.run(["git", "-C", ROOT, *argv], capture_output=True, text=True, timeout=30,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    pkg = os.path.dirname(os.path.abspath(timm_split.__file__))
    files = [os.path.join(ROOT, f) for f in SCIENCE_CODE]
    files += sorted(os.path.join(d, f) for d, _, fs in os.walk(pkg) for f in fs if f.endswith(".py"))
    h = hashlib.sha256()
    for f in files:
        rel = os.path.relpath(f, os.path.dirname(pkg)) if f.startswith(pkg) else os.path.relpath(f, ROOT)
        with open(f, "rb") as fh:
            h.update(rel.encode() + b"\0" + fh.read() + b"\0")
    return {"git_rev": git("rev-parse", "HEAD") or None, "git_dirty": bool(git("status", "--porcelain",
            "--untracked-files=no")), "code_sha256": h.hexdigest(), "timm_split_dir": pkg}


def load_data(st: Setting) -> Tuple[torch.Tensor, ...]:
    """``(train_x uint8 [N, 1, 28, 28], train_y, test_x, test_y)`` on ``st.device`` (cached per process)."""
    key = (st.data_dir, st.per_class, st.device)
    if key not in _DATA:
        tx, ty = _idx(st.data_dir, "train-images-idx3-ubyte"), _idx(st.data_dir, "train-labels-idx1-ubyte")
        keep = balanced_subset(ty, st.per_class)
        ex, ey = _idx(st.data_dir, "t10k-images-idx3-ubyte"), _idx(st.data_dir, "t10k-labels-idx1-ubyte")
        dev = torch.device(st.device)
        _DATA[key] = tuple(torch.from_numpy(a).to(dev) for a in (
            tx[keep][:, None], ty[keep].astype(np.int64), ex[:, None], ey.astype(np.int64)))
    return _DATA[key]


# ----------------------------------------------------------------------------------------------------------
# one run

def build(spec: Spec, st: Setting) -> SplitEnsemble:
    """The arm's ensemble: S=1 wraps the width-k net; ``uniform`` builds S nets at k / sqrt(S); else ``split``."""
    arm, make = ARMS[spec.arm], ARCHS[st.arch]
    S = arm["S"]
    torch.manual_seed(spec.seed)
    if S == 1:
        net = make(spec.width)
        return SplitEnsemble([net], pretrained_cfg=net.pretrained_cfg)
    if arm.get("uniform"):
        members = []
        for i in range(S):
            torch.manual_seed(spec.seed * S + i)
            members.append(make(spec.width / math.sqrt(S)))
        return SplitEnsemble(members, pretrained_cfg=members[0].pretrained_cfg)
    return split(make(spec.width), S, seed=spec.seed * S, img_size=28, **st.split_kwargs)


def _costs(ens: SplitEnsemble, spec: Spec, st: Setting) -> Dict[str, Any]:
    from timm_split.count import count

    base = count(ARCHS[st.arch](spec.width), 28, in_chans=1)
    members = [count(copy.deepcopy(m).float().cpu(), 28, in_chans=1) for m in ens.members]  # fvcore, on the CPU
    params, gmacs = sum(c.params for c in members), sum(c.gmacs for c in members)
    return {"params": params, "gmacs": gmacs, "member_params": [c.params for c in members],
            "member_gmacs": [c.gmacs for c in members],
            "base_params": base.params, "base_gmacs": base.gmacs, "params_ratio": params / base.params,
            "gmacs_ratio": gmacs / base.gmacs}


def _autocast(st: Setting):
    import contextlib

    if not st.amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(st.device).type, dtype=torch.bfloat16)


@torch.no_grad()
def member_logits(ens: SplitEnsemble, x: torch.Tensor, views: BatchViews, st: Setting, batch: int = 1000
                  ) -> torch.Tensor:
    """Every member's logits ``[S, N, K]`` (float32, CPU) on the clean images ``x``, in eval mode."""
    ens.eval()
    out = []
    for i in range(0, len(x), batch):
        xb = views.normalise(x[i:i + batch])
        if st.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with _autocast(st):
            out.append(ens.forward_members(xb).float().cpu())
    ens.train()
    return torch.cat(out, 1)


def _metrics(logits: torch.Tensor, target: torch.Tensor, ens: SplitEnsemble) -> Dict[str, Any]:

    target = target.cpu()
    return {"ensemble": _scores(ens.combine(logits), target),
            "members": [_scores(m, target) for m in logits]}


def _setup(spec: Spec, st: Setting, steps_per_epoch: int):
    """Ensemble, views, optimizer, scheduler and loss of a run (timm's optimizer and cosine schedule)."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    arm = ARMS[spec.arm]
    ens = build(spec, st).to(st.device)
    if st.channels_last:
        ens = ens.to(memory_format=torch.channels_last)
    S = ens.split_factor
    views = BatchViews(S, num_classes=NUM_CLASSES, mean=MEAN, std=STD, pad=st.pad, hflip=st.hflip,
                       ra_ops=st.ra_ops, ra_magnitude=st.ra_magnitude, re_prob=st.re_prob,
                       mixup_alpha=st.mixup_alpha, same_view=bool(arm.get("same_view")))
    opt = create_optimizer_v2(param_groups(ens, st.weight_decay, S), opt="sgd", lr=st.lr, momentum=0.9)
    sched, _ = create_scheduler_v2(opt, sched="cosine", num_epochs=st.epochs, step_on_epochs=False,
                                   updates_per_epoch=steps_per_epoch)
    loss_fn = CoTrainingLoss(cot_weight=0.0 if arm.get("no_cot") else st.cot_weight,
                             warmup_epochs=st.epochs * 40 / 300, mode="js")
    return ens, views, opt, sched, loss_fn


def train_steps(spec: Spec, st: Setting, max_steps: Optional[int] = None, clock: Optional[List[float]] = None):
    """Train a run; return ``(ens, views, the last epoch's mean losses)``.

    ``max_steps`` stops early and ``clock`` collects the time after every step (--measure).
    """
    train_x, train_y = load_data(st)[:2]
    n, bs = len(train_x), st.batch_size
    steps_per_epoch = math.ceil(n / bs)
    ens, views, opt, sched, loss_fn = _setup(spec, st, steps_per_epoch)
    order_gen = torch.Generator().manual_seed(spec.seed)  # data order: shared by the arms of one seed
    aug_gen = torch.Generator(device=st.device).manual_seed(spec.seed + 7919)
    step, sums = 0, {}
    epochs = st.epochs if max_steps is None else max(st.epochs, math.ceil(max_steps / steps_per_epoch))
    for epoch in range(epochs):
        order = torch.randperm(n, generator=order_gen).to(st.device)
        sums = {k: torch.zeros((), device=st.device) for k in ("loss", "ce", "cot")}  # no host sync per step
        for i in range(steps_per_epoch):
            idx = order[i * bs:(i + 1) * bs]
            x, soft = views(train_x[idx], train_y[idx], aug_gen)
            if st.channels_last:
                x = x.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, x.shape[:2])
            with _autocast(st):
                logits = ens.forward_members(x)
            losses = loss_fn(logits, soft, epoch=epoch + i / steps_per_epoch)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            opt.step()
            step += 1
            sched.step_update(step)
            if clock is not None:
                _sync(st)
                clock.append(time.perf_counter())
            for k in sums:
                sums[k] += losses[k].detach()
            if max_steps is not None and step >= max_steps:
                return ens, views, _mean_losses(sums, i + 1, ens.split_factor)
        if not math.isfinite(float(sums["loss"])):
            raise FloatingPointError(f"{spec}: loss {float(sums['loss'])} in epoch {epoch + 1}; lower --lr.")
    return ens, views, _mean_losses(sums, steps_per_epoch, ens.split_factor)


def _mean_losses(sums: Dict[str, torch.Tensor], steps: int, S: int) -> Dict[str, float]:
    """Mean losses over ``steps``; ``ce_per_member`` is the members' mean cross-entropy (``ce`` sums them)."""
    out = {k: float(v) / steps for k, v in sums.items()}
    out["ce_per_member"] = out["ce"] / S
    return out


def _atomic_write(path: str, write) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def run_one(spec: Spec, st: Setting, records: str) -> Dict[str, Any]:
    """Train one run, evaluate it, write its ``.npz`` then its ``.json`` record (atomically); return the record."""
    t0 = time.perf_counter()
    ens, views, last = train_steps(spec, st)
    train_seconds = time.perf_counter() - t0
    train_x, train_y, test_x, test_y = load_data(st)
    test_logits = member_logits(ens, test_x, views, st)
    train_logits = member_logits(ens, train_x, views, st)
    ood_logits = member_logits(ens, ood_images().to(test_x.device), views, st)
    ens_test = ens.combine(test_logits)
    rid = spec.run_id(st)
    folder = os.path.join(records, spec.stage)
    os.makedirs(folder, exist_ok=True)
    f16 = lambda t: t.numpy().astype(np.float16)  # noqa: E731
    _atomic_write(os.path.join(folder, rid + ".npz"), lambda f: np.savez_compressed(
        f, ensemble_logits=f16(ens_test), member_pred=test_logits.argmax(-1).numpy().astype(np.uint8),
        member_logits=f16(test_logits), ood_member_logits=f16(ood_logits),
        ood_ensemble_logits=f16(ens.combine(ood_logits))))
    plan = ens.split_plan
    rec = {
        "id": rid, "stage": spec.stage, "kind": spec.kind, "arm": spec.arm, "arch": st.arch, "width": spec.width,
        "seed": spec.seed, "split": ens.split_factor, "config": _record_config(spec, st), **_costs(ens, spec, st),
        "plan_ratios": None if plan is None else [plan.params_ratio, plan.macs_ratio],
        "test": _metrics(test_logits, test_y, ens), "train_clean": _metrics(train_logits, train_y, ens),
        "train_last_epoch": last, "train_images": len(train_x), "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - t0, "device": st.device, "amp": st.amp,
        "channels_last": st.channels_last, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "provenance": provenance(),
        "ood": {"set": "sklearn digits 8x8 -> 20 px in 28 px", "images": int(ood_logits.shape[1])},
    }
    _atomic_write(os.path.join(folder, rid + ".json"), lambda f: f.write(json.dumps(rec, indent=1).encode()))
    return rec


# ----------------------------------------------------------------------------------------------------------
# the grid: specs, resume, parallel workers, progress, --measure

def stage_specs(stage: str, folder: str, st: Setting, arms: Sequence[str], seeds: Sequence[int],
                control_seeds: Sequence[int], gate_seeds: Sequence[int]) -> List[Spec]:
    """The runs of a stage (records in ``<records>/<folder>``): the gate's singles at k/2, k, 2k, or the grid's
    arms (the controls on ``control_seeds``)."""
    k = st.width
    if stage == "gate":
        return [Spec(folder, "single", w, s, "gate") for w in (k / 2, k, 2 * k) for s in gate_seeds]
    return [Spec(folder, a, k, s) for a in arms for s in (control_seeds if a in CONTROLS else seeds)]


def _done(spec: Spec, st: Setting, records: str) -> Optional[Dict[str, Any]]:
    """The stored record of ``spec``, or None. A record with another config under the same id is an error."""
    path = os.path.join(records, spec.stage, spec.run_id(st) + ".json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        rec = json.load(f)
    want = json.loads(json.dumps(_record_config(spec, st)))
    if rec.get("config") != want:
        diff = sorted(k for k in set(want) | set(rec.get("config", {})) if rec["config"].get(k) != want.get(k))
        raise SystemExit(f"{path} was run with another config (differs in {diff}): a setting outside the run id "
                         "(arm, arch, k, per-class, epochs, seed) changed. Give the new setting its own --tag (or "
                         "--records folder), or move the old record away.")
    return rec


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels (no effect on CPU)


def _work(spec: Spec, st: Setting, records: str) -> Dict[str, Any]:
    return run_one(spec, st, records)


def _line(rec: Dict[str, Any]) -> str:
    t, c = rec["test"], rec["train_clean"]["ensemble"]
    members = ", ".join(f"{m['top1']:.2f}" for m in t["members"])
    return (f"{rec['id']}: test top-1 {t['ensemble']['top1']:.2f}% (members {members}), NLL "
            f"{t['ensemble']['nll']:.3f}, ECE {100 * t['ensemble']['ece']:.2f}%; clean train {c['top1']:.2f}% "
            f"loss {c['nll']:.3f}; params x{rec['params_ratio']:.3f}; {rec['wall_seconds']:.0f}s")


def run_specs(specs: Sequence[Spec], st: Setting, records: str, jobs: int, threads: int = 1) -> None:
    """Run every spec without a record, ``jobs`` at a time in worker processes; print progress as runs finish."""
    todo = [s for s in specs if _done(s, st, records) is None]
    todo.sort(key=lambda s: (s.seed, specs.index(s)))  # seed-major: a stopped grid leaves every arm equally far
    print(f"{len(specs)} runs: {len(specs) - len(todo)} already recorded in {records}, {len(todo)} to run on "
          f"{jobs} process(es) x {threads} thread(s), device {st.device}", flush=True)
    if not todo:
        return
    t0, finished, failed = time.perf_counter(), 0, []
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker, initargs=(threads,)) as ex:
        futures = {ex.submit(_work, s, st, records): s for s in todo}
        for fut in cf.as_completed(futures):
            finished += 1
            elapsed = time.perf_counter() - t0
            left = elapsed / finished * (len(todo) - finished) / 60
            head = f"[{finished}/{len(todo)} {elapsed / 60:.1f} min, ~{left:.0f} min left]"
            try:
                print(f"{head} {_line(fut.result())}", flush=True)
            except Exception as e:  # keep the other runs going; report at the end
                failed.append(futures[fut].run_id(st))
                print(f"{head} {failed[-1]} FAILED: {type(e).__name__}: {e}", flush=True)
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed (no record written, a rerun retries them): {failed}")


def measure(specs: Sequence[Spec], st: Setting, jobs: int, steps: int = 10, warmup: int = 3) -> float:
    """Time ``steps`` training steps (after ``warmup``) and one test pass of each distinct arm/width in ``specs``
    in this process; print ms per image pass and the expected wall time of the runs not yet done. Returns seconds.
    """
    train_x = load_data(st)[0]
    steps_per_epoch = math.ceil(len(train_x) / st.batch_size)
    per_run: Dict[Tuple[str, float], float] = {}
    print(f"measuring on {st.device}, {torch.get_num_threads()} thread(s), batch {st.batch_size} "
          f"(machine load now: {os.getloadavg()[0]:.2f})", flush=True)
    for arm, width in sorted({(s.arm, s.width) for s in specs}):
        clock: List[float] = []
        ens, views, _ = train_steps(Spec("measure", arm, width, 0), st, max_steps=warmup + steps, clock=clock)
        if len(clock) < 2:
            raise ValueError("too few training steps to time: raise --epochs or --per-class.")
        w = max(1, min(warmup, len(clock) - 1))
        step_s = (clock[-1] - clock[w - 1]) / (len(clock) - w)
        test_x = load_data(st)[2][:1000]
        t = time.perf_counter()
        member_logits(ens, test_x, views, st)
        _sync(st)
        eval_s = (time.perf_counter() - t) * (10000 + len(train_x)) / len(test_x)
        per_run[(arm, width)] = step_s * steps_per_epoch * st.epochs + eval_s
        print(f"  {arm:12s} k={width:g}: {1000 * step_s / st.batch_size:.2f} ms per training image pass "
              f"(all members, views included), eval {1000 * eval_s / (10000 + len(train_x)):.3f} ms/image; "
              f"one run ~{per_run[(arm, width)] / 60:.1f} min", flush=True)
    total = sum(per_run[(s.arm, s.width)] for s in specs)
    print(f"{len(specs)} runs: ~{total / 3600:.2f} h of one process; ~{total / jobs / 3600:.2f} h on {jobs} "
          f"parallel processes if each gets its own core", flush=True)
    return total


def _sync(st: Setting) -> None:
    if torch.device(st.device).type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------------------
# analysis and report (docs/results.md tables from the records)

def load_records(records: str) -> List[Dict[str, Any]]:
    """Every ``<records>/<stage>/*.json`` record, with its ``.npz`` path; files of other benchmarks that keep
    their records beside these (``benchmarks/distill.py``'s ``distill/``: no ``stage`` key) are left out."""
    out = []
    for stage in sorted(os.listdir(records)) if os.path.isdir(records) else []:
        folder = os.path.join(records, stage)
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            if name.endswith(".json"):
                with open(os.path.join(folder, name)) as f:
                    rec = json.load(f)
                if "stage" not in rec:
                    continue
                rec["npz"] = os.path.join(folder, name[:-5] + ".npz")
                out.append(_nll_named(rec))
    return out


def _nll_named(rec: Dict[str, Any]) -> Dict[str, Any]:
    """Three gate-2 records were scored between the merge that renamed validate's NLL to 'loss' and the fix
    (2e502f1): the same number under the other key. The report reads it as 'nll'; the raw file is kept."""
    for part in ("test", "train_clean"):
        for m in [rec.get(part, {}).get("ensemble", {})] + list(rec.get(part, {}).get("members", [])):
            if "loss" in m and "nll" not in m:
                m["nll"] = m.pop("loss")
    return rec


def _logits(rec: Dict[str, Any]) -> np.ndarray:
    with np.load(rec["npz"]) as z:
        return z["ensemble_logits"].astype(np.float32)


def _correct(rec: Dict[str, Any], labels: np.ndarray) -> np.ndarray:
    return _logits(rec).argmax(-1) == labels


def _ms(values: Sequence[float], digits: int = 2) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified Lentz)."""
    if x <= 0.0 or x >= 1.0:
        return min(1.0, max(0.0, x))
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below this point
        return 1.0 - _betainc(b, a, 1.0 - x)
    log_front = a * math.log(x) + b * math.log1p(-x) + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    f, c, d = 1.0, 1.0, 0.0
    for i in range(1000):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
        c = 1.0 + num / c
        c = c if abs(c) > 1e-300 else 1e-300
        f *= c * d
        if abs(1.0 - c * d) < 1e-15:
            break
    return math.exp(log_front) / a * (f - 1.0)


def _t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` (any real > 0) degrees of freedom."""
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` (any real > 0) degrees of freedom, by bisection on the CDF."""
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        lo, hi = hi, 2 * hi
    for _ in range(100):  # halves [lo, hi] down to float precision
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def welch_ci(b: Sequence[float], a: Sequence[float]) -> Tuple[float, float, float]:
    """``mean(b) - mean(a)`` and its 95% Welch interval: Welch-Satterthwaite degrees of freedom and the Student t
    quantile at them (nan without 2 values per arm; the point itself when both arms have no spread)."""
    d = statistics.mean(b) - statistics.mean(a)
    if len(a) < 2 or len(b) < 2:
        return d, float("nan"), float("nan")
    vb, va = statistics.variance(b) / len(b), statistics.variance(a) / len(a)
    if vb + va == 0:
        return d, d, d
    df = (vb + va) ** 2 / (vb ** 2 / (len(b) - 1) + va ** 2 / (len(a) - 1))
    half = t_quantile(0.975, df) * math.sqrt(vb + va)
    return d, d - half, d + half


def paired_bootstrap_ci(correct_b: np.ndarray, correct_a: np.ndarray, reps: int = 10000, seed: int = 0,
                        chunk: int = 500) -> Tuple[float, float]:
    """95% percentile interval of mean top-1(b) - mean top-1(a), in points, resampling seeds (paired: row i of
    both) and test images (the same images for both arms) with replacement. Inputs: ``[seeds, images]`` bools."""
    if correct_a.shape != correct_b.shape or correct_a.shape[0] < 2:
        return float("nan"), float("nan")
    n, m = correct_a.shape
    diff = (correct_b.astype(np.float32) - correct_a.astype(np.float32))  # [n, m]
    rng, deltas = np.random.default_rng(seed), []
    for start in range(0, reps, chunk):
        c = min(chunk, reps - start)
        draws = rng.integers(0, m, (c, m)) + (np.arange(c) * m)[:, None]
        counts = np.bincount(draws.ravel(), minlength=c * m).reshape(c, m).astype(np.float32)
        per_seed = diff @ counts.T / m  # [n, c]: each seed's accuracy difference on each image draw
        pick = rng.integers(0, n, (c, n))
        deltas.append(np.take_along_axis(per_seed.T, pick, axis=1).mean(1))
    lo, hi = np.percentile(np.concatenate(deltas) * 100, [2.5, 97.5])
    return float(lo), float(hi)


def verdict(welch: Tuple[float, float, float], boot: Tuple[float, float]) -> str:
    """The pre-registered rule: yes if both lower bounds > 0, no if both upper bounds < +0.3, else inconclusive."""
    lows, highs = (welch[1], boot[0]), (welch[2], boot[1])
    if any(math.isnan(v) for v in lows + highs):
        return "inconclusive (too few seeds for an interval)"
    if min(lows) > 0:
        return "yes"
    if max(highs) < 0.3:
        return "no"
    return "inconclusive"


def _group_key(rec: Dict[str, Any]) -> str:
    cfg = {k: v for k, v in rec["config"].items() if k not in ("arm", "seed", "run_width", "split_kwargs")}
    return json.dumps(dict(cfg, folder=rec["stage"]), sort_keys=True)


def _label(rec: Dict[str, Any]) -> str:
    kw = rec["config"].get("split_kwargs") or {}
    return rec["arm"] + "".join(f"+{k}={v}" for k, v in sorted(kw.items()))


def _setting_line(rec: Dict[str, Any]) -> str:
    c = rec["config"]
    return (f"{c['arch']} k={c['width']:g}, {c['per_class']}/class ({rec['train_images']} train images), "
            f"{c['epochs']} epochs, batch {c['batch_size']}, lr {c['lr']}, wd {c['weight_decay']}, views: pad "
            f"{c['pad'] if c['pad'] is not None else 'H//8'}, flip {c['hflip']}, RandAugment n{c['ra_ops']} "
            f"m{c['ra_magnitude']:g}, erasing {c['re_prob']}, mixup {c['mixup_alpha']}; device {rec['device']}"
            f"{', bf16' if rec['amp'] else ''}{', channels-last' if rec['channels_last'] else ''}")


def _pairs(recs: Sequence[Dict[str, Any]]) -> List[Tuple[Dict[str, Any], Dict[str, Any]]]:
    """Disjoint pairs of consecutive seeds: (0, 1), (2, 3), ..."""
    rs = sorted(recs, key=lambda r: r["seed"])
    return [(rs[i], rs[i + 1]) for i in range(0, len(rs) - 1, 2)]


def _pair_gain(pairs, labels: np.ndarray) -> Tuple[List[Dict[str, float]], List[float]]:
    """Metrics of each pair's averaged logits (top-1 %, NLL, ECE), and its top-1 gain over the pair's mean."""

    out, gains = [], []
    for a, b in pairs:
        la, lb = _logits(a), _logits(b)
        out.append(_scores(torch.from_numpy((la + lb) / 2), torch.from_numpy(labels)))
        mean = float(((la.argmax(-1) == labels).mean() + (lb.argmax(-1) == labels).mean()) * 50)
        gains.append(out[-1]["top1"] - mean)
    return out, gains


def _top1(recs):
    return [r["test"]["ensemble"]["top1"] for r in recs]


def gate_report(recs: List[Dict[str, Any]], labels: np.ndarray) -> List[str]:
    """Stage 1 tables and the go/no-go of the pre-registered gate, one block per gate setting."""
    lines = []
    for key in sorted({_group_key(r) for r in recs}):
        group = [r for r in recs if _group_key(r) == key]
        k = group[0]["config"]["width"]
        by_w = {w: [r for r in group if r["width"] == w] for w in sorted({r["width"] for r in group})}
        lines += [f"### Gate: {_setting_line(group[0])}", "",
                  "| width | params | MMACs | seeds | test top-1 (%) per seed | test top-1 (%) | clean train top-1 (%) "
                  "| clean train loss | last-epoch train CE per member | NLL | ECE (%) | min/run |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for w, rs in by_w.items():
            rs = sorted(rs, key=lambda r: r["seed"])
            lines.append(
                f"| {w:g}{' (k)' if w == k else ''} | {rs[0]['params']:,} | {rs[0]['gmacs'] * 1e3:.2f} | {len(rs)} | "
                f"{', '.join(f'{t:.2f}' for t in _top1(rs))} | {_ms(_top1(rs))} | "
                f"{_ms([r['train_clean']['ensemble']['top1'] for r in rs])} | "
                f"{_ms([r['train_clean']['ensemble']['nll'] for r in rs], 3)} | "
                f"{_ms([r['train_last_epoch']['ce_per_member'] for r in rs], 3)} | "
                f"{_ms([r['test']['ensemble']['nll'] for r in rs], 3)} | "
                f"{_ms([100 * r['test']['ensemble']['ece'] for r in rs])} | "
                f"{statistics.mean(r['wall_seconds'] for r in rs) / 60:.1f} |")
        big, wide = by_w.get(k, []), by_w.get(2 * k, [])
        fit = statistics.mean(r["train_clean"]["ensemble"]["top1"] for r in big) if big else float("nan")
        gain = statistics.mean(_top1(wide)) - statistics.mean(_top1(big)) if big and wide else float("nan")
        pair_gains = _pair_gain(_pairs(big), labels)[1]
        ens = statistics.mean(pair_gains) if pair_gains else float("nan")
        go = fit >= 98 and gain <= 0.2 and ens >= 1
        lines += ["", f"Gate numbers (rule: train fit ≥ 98%, width gain ≤ 0.2 points, ensemble gain ≥ 1 point): "
                  f"**train fit {fit:.2f}%**, **width gain k → 2k {gain:+.2f} points**, **ensemble gain of two "
                  f"independent width-k networks {ens:+.2f} points** ({len(pair_gains)} disjoint seed pairs). "
                  f"Gate: **{'GO' if go else 'NO GO'}**.", ""]
    return lines


def _arm_row(label: str, rs: List[Dict[str, Any]], single_params: Optional[int]) -> str:
    members = [statistics.mean(m["top1"] for m in r["test"]["members"]) for r in rs]
    ratio = f" (x{rs[0]['params'] / single_params:.3f})" if single_params else ""
    return (f"| {label} | {rs[0]['split']} | {len(rs)} | {rs[0]['params']:,}{ratio} | {rs[0]['gmacs'] * 1e3:.2f} "
            f"(x{rs[0]['gmacs_ratio']:.3f}) | {_ms(_top1(rs))} | {_ms(members)} | "
            f"{_ms([r['test']['ensemble']['nll'] for r in rs], 3)} | "
            f"{_ms([100 * r['test']['ensemble']['ece'] for r in rs])} | "
            f"{_ms([r['train_clean']['ensemble']['top1'] for r in rs])} | "
            f"{_ms([r['train_clean']['ensemble']['nll'] for r in rs], 3)} | "
            f"{_ms([r['train_last_epoch']['ce_per_member'] for r in rs], 3)} | "
            f"{statistics.mean(r['wall_seconds'] for r in rs) / 60:.1f} |")


def _ci(t: Tuple[float, ...]) -> str:
    return "-" if math.isnan(t[-1]) else f"[{t[-2]:+.2f}, {t[-1]:+.2f}]"


Records = List[Dict[str, Any]]


def _groups(recs: Records) -> List[Records]:
    """The records of each setting (``_group_key``: config and folder), in key order."""
    return [[r for r in recs if _group_key(r) == key] for key in sorted({_group_key(r) for r in recs})]


def _arms(group: Records) -> Dict[str, Records]:
    """A setting's records by arm label (``ARMS`` order, then label), each by seed."""
    arms: Dict[str, Records] = {}
    order = list(ARMS)
    for r in sorted(group, key=lambda r: (order.index(r["arm"]), _label(r), r["seed"])):
        arms.setdefault(_label(r), []).append(r)
    return arms


def code_line(group: Records) -> str:
    """The code a setting's records ran (amendment 2): one line naming the revisions and the code hash. Records
    of different code (hash), or records with and without provenance, in one setting are never pooled: a
    ``SystemExit`` names them."""
    shas = {(r.get("provenance") or {}).get("code_sha256") for r in group}
    if len(shas) > 1:
        by = {}
        for r in group:
            by.setdefault((r.get("provenance") or {}).get("code_sha256"), []).append(r["id"])
        raise SystemExit(f"{group[0]['stage']} k={group[0]['config']['width']:g}: records of different code in one "
                         "setting (" + "; ".join(f"{k[:12] if k else 'no provenance'}: {len(v)} e.g. {v[0]}"
                                                  for k, v in by.items()) + "). The report does not pool them: "
                         "rerun the odd ones from one revision (amendment 2), or move them to their own --tag.")
    if shas == {None}:
        return "Code: recorded before amendment 2, without a revision or code hash."
    revs = sorted({(r["provenance"]["git_rev"] or "?")[:10]
                   + (" (dirty)" if r["provenance"]["git_dirty"] else " (clean)") for r in group})
    return f"Code: revision {', '.join(revs)}; code hash {shas.pop()[:16]} (all {len(group)} records)."


def _block(group: Records, labels: np.ndarray, what: str, rule_arm: str = "s2", need: int = 0,
           single: Optional[Records] = None) -> Tuple[List[str], Dict[str, str]]:
    """One setting's table (every arm, the two-singles ceiling) and tests (``_tests``). ``single``: another
    setting's single networks, compared with when ``group`` has none (named by their folder in the table).
    Returns the lines and ``{rule_arm: outcome}`` (empty without both arms)."""
    arms = _arms(group)
    borrowed = bool(single) and "single" not in arms
    if borrowed:
        arms = {"single": sorted(single, key=lambda r: r["seed"]), **arms}
    sp = arms["single"][0]["params"] if "single" in arms else None
    lines = [f"### {group[0]['stage']}: {_setting_line(group[0])}", "", code_line(group), "",
             "| arm | S | seeds | params (vs single) | MMACs (vs unsplit) | test top-1 (%) | member top-1 (%) "
             "| NLL | ECE (%) | clean train top-1 (%) | clean train loss | last-epoch train CE per member "
             "| min/run |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, rs in arms.items():
        lines.append(_arm_row(f"single ({rs[0]['stage']})" if borrowed and label == "single" else label, rs, sp))
    pairs = [] if borrowed else _pairs(arms.get("single", []))
    if pairs:
        ens2 = _pair_gain(pairs, labels)[0]
        lines.append(f"| ens2_single (2x cost) | 1+1 | {len(pairs)} pairs | {2 * sp:,} | - | "
                     f"{_ms([m['top1'] for m in ens2])} | - | {_ms([m['nll'] for m in ens2], 3)} | "
                     f"{_ms([100 * m['ece'] for m in ens2])} | - | - | - | - |")
    lines.append("")
    tests, outcome = _tests(arms, labels, what, rule_arm, need)
    return lines + tests, outcome


def grid_report(recs: Records, labels: np.ndarray) -> List[str]:
    """Stage 2 tables: every arm, the two-singles ceiling, the primary test with its verdict, the controls."""
    lines = []
    for group in _groups(recs):
        what = "Verdict (pre-registered rule)" if group[0]["stage"] == "grid" else "Decision rule applied to this block"
        lines += _block(group, labels, what)[0]
    return lines


def _tests(arms: Dict[str, Records], labels: np.ndarray, what: str, rule_arm: str = "s2", need: int = 0
           ) -> Tuple[List[str], Dict[str, str]]:
    """Each arm against the single network (Welch; S=2/S=4 also by the paired bootstrap), controls also against
    s2. The ``rule_arm`` line states the decision rule's outcome, headed ``what``; with fewer than ``need`` seeds in
    it or in single, "incomplete: n of need seeds" instead. Returns the lines and ``{rule_arm: outcome}``."""
    single, outcome = arms.get("single", []), {}
    lines = ["* per seed, test top-1 (%): " + "; ".join(
        f"{name} " + ", ".join(f"{r['seed']}: {r['test']['ensemble']['top1']:.2f}" for r in rs)
        for name, rs in arms.items())]
    for name in [a for a in arms if a != "single"]:
        rs = arms[name]
        w = welch_ci(_top1(rs), _top1(single)) if single else (float("nan"),) * 3
        line = f"* **{name} − single:** {w[0]:+.2f} points, Welch 95% CI {_ci(w)}"
        if name.split("+")[0] in ("s2", "s4") and single:
            seeds = sorted({r["seed"] for r in rs} & {r["seed"] for r in single})
            pick = {r["seed"]: r for r in rs}, {r["seed"]: r for r in single}
            boot = paired_bootstrap_ci(np.stack([_correct(pick[0][s], labels) for s in seeds]),
                                       np.stack([_correct(pick[1][s], labels) for s in seeds]))
            line += f", paired bootstrap 95% CI {_ci(boot)} ({len(seeds)} paired seeds)"
            if name == rule_arm:
                n = min(len(rs), len(single))
                outcome[name] = verdict(w, boot) if n >= need else f"incomplete: {n} of {need} seeds"
                line += f". **{what}: {outcome[name]}.**"
        elif "s2" in arms and name != "s2":
            v = welch_ci(_top1(rs), _top1(arms["s2"]))
            line += f"; − s2: {v[0]:+.2f}, Welch 95% CI {_ci(v)}"
        lines.append(line)
    return lines + [""], outcome


# amendment 1 of docs/results.md: a verdict per budget
AMENDMENT = {"t1": "Verdict (amendment 1 rule)", "t2": "Decision rule applied (secondary)",
             "t3": "Decision rule applied (secondary)"}
T1_WIDTHS, SEEDS_PER_ARM = (1.0, 2.0), 20
BUDGET_PLOT = os.path.join(ROOT, "docs", "science_budget.png")
Budget = Tuple[float, Optional[int], str]  # width k, params of the unsplit width-k network, outcome


def amendment_report(recs: Records, labels: np.ndarray) -> List[str]:
    """Amendment 1's section: a block per (stage, k), T1's s2 line with the verdict, T2's and T3's with the rule
    applied as secondary (T3's s4 against T1's single at the same k), then the statement over budgets."""
    lines, t1, t2 = ["## Amendment 1: a verdict per budget", ""], [], []
    for group in sorted(_groups(recs), key=lambda g: (g[0]["stage"], g[0]["config"]["width"])):
        stage, k = group[0]["stage"], group[0]["config"]["width"]
        ref = [r for r in recs if r["stage"] == "t1" and r["arm"] == "single" and r["config"]["width"] == k]
        rule = "s2" if any(r["arm"] == "s2" for r in group) else "s4"
        block, outcome = _block(group, labels, AMENDMENT[stage], rule, SEEDS_PER_ARM, ref if stage == "t3" else None)
        lines += block
        if stage in ("t1", "t2"):
            n = min(sum(r["arm"] == a for r in group) for a in PRIMARY)
            budget = (k, group[0]["base_params"], outcome.get("s2", f"incomplete: {n} of {SEEDS_PER_ARM} seeds"))
            (t1 if stage == "t1" else t2).append(budget)
    t1 += [(k, None, f"incomplete: 0 of {SEEDS_PER_ARM} seeds") for k in T1_WIDTHS if k not in {b[0] for b in t1}]
    t2 = [b for b in t2 if not b[2].startswith("incomplete")]
    return (lines + [budget_statement(sorted(t1) + sorted(t2)), ""] + power_law_lines(_budget_points(recs))
            + crossover_lines(recs))


def power_law_lines(points: Dict[str, List[Tuple[int, float, float, int]]]) -> List[str]:
    """Amendment 1's descriptive power-law fits (after Lobacheva et al. 2020): per arm with two or more budgets of
    ``SEEDS_PER_ARM`` seeds, the least-squares line of log10(mean test error) on log10(params), i.e.
    ``error = a * params**b``. They decide nothing; with two budgets the line passes through both."""
    out = []
    for arm, pts in points.items():
        full = [(p, e) for p, e, _, n in pts if n >= SEEDS_PER_ARM]
        if len(full) < 2:
            continue
        x, y = np.log10([p for p, _ in full]), np.log10([e for _, e in full])
        log_a, b = power_fit([p for p, _ in full], [e for _, e in full])
        worst = float(np.max(np.abs(10 ** (log_a + b * x) / 10 ** y - 1)) * 100)
        fit = "the line passes through both" if len(full) == 2 else f"largest residual {worst:.1f}% of the error"
        out.append(f"* {arm}: error = {10 ** log_a:.3g} x params^{b:.3f} ({len(full)} budgets, "
                   f"{full[0][0]:,}-{full[-1][0]:,} params; {fit})")
    if not out:
        return []
    return ["**Power-law fits** of mean test error (%) against params (descriptive only; they decide nothing):",
            ""] + out + [""]


# amendment 2's secondary endpoints: (key, name, better) in the table's order; better +1 higher, -1 lower, 0 untested
SECONDARY = (("nll", "NLL", -1), ("brier", "Brier", -1), ("ece", "ECE (%)", -1), ("nll_ts", "NLL-TS", -1),
             ("ece_ts", "ECE-TS (%)", -1), ("temperature", "temperature (mean of the two halves)", 0),
             ("aurc", "AURC (%)", -1), ("disagreement", "disagreement (%)", 0), ("mutual_info", "mutual info (nats)", 0),
             ("ood_auroc_msp", "OOD AUROC, max-softmax (%)", 1), ("ood_fpr95_msp", "OOD FPR95, max-softmax (%)", -1),
             ("ood_auroc_entropy", "OOD AUROC, entropy (%)", 1), ("ood_fpr95_entropy", "OOD FPR95, entropy (%)", -1),
             ("ood_auroc_mi", "OOD AUROC, mutual info (%)", 1), ("ood_fpr95_mi", "OOD FPR95, mutual info (%)", -1))
_SECONDARY_CACHE: Dict[str, Dict[str, float]] = {}


def secondary_metrics(rec: Dict[str, Any], labels: np.ndarray) -> Dict[str, float]:
    """Amendment 2's secondary endpoints of one run, from its stored logits, with ``timm_split.training.uncertainty``
    (the code ``timm-split validate`` reports with). Fractions are given in % where the table says so. The
    temperature is 2-fold cross-fitted on the halves the amendment declares (``RandomState(0).permutation``, first
    and last half); disagreement is the members' pairwise disagreement (for S = 2: the share of images where the
    two disagree); mutual information and OOD need the members' logits (amendment 2's records only)."""
    from timm_split.training import uncertainty as U

    if rec["npz"] in _SECONDARY_CACHE:
        return _SECONDARY_CACHE[rec["npz"]]
    y = torch.from_numpy(labels)
    with np.load(rec["npz"]) as z:
        arrays = {k: torch.from_numpy(z[k].astype(np.float32)) for k in z.files}
    logits = arrays["ensemble_logits"]
    perm = torch.from_numpy(np.random.RandomState(0).permutation(len(y)))
    a, b = perm[: len(y) // 2], perm[len(y) // 2:]
    t_a, t_b = U.fit_temperature(logits[a], y[a]), U.fit_temperature(logits[b], y[b])
    scaled = logits.clone()
    scaled[b], scaled[a] = logits[b] / t_a, logits[a] / t_b
    out = {"nll": U.nll(logits, y), "brier": U.brier_score(logits, y), "ece": 100 * U.ece(logits, y),
           "nll_ts": U.nll(scaled, y), "ece_ts": 100 * U.ece(scaled, y), "temperature": (t_a + t_b) / 2,
           "aurc": 100 * U.aurc(logits, y)}
    if rec["split"] > 1:
        pred = arrays["member_pred"].long()  # one-hot logits: the members' argmaxes, all pairwise_disagreement reads
        out["disagreement"] = 100 * U.pairwise_disagreement(one_hot_logits(pred, logits.shape[-1]))
    if "ood_member_logits" in arrays:
        members, ood_members = arrays["member_logits"], arrays["ood_member_logits"]
        if rec["split"] > 1:
            out["mutual_info"] = float(U.mutual_information(members).mean())
        ind, ood = U.ood_scores(logits, members), U.ood_scores(arrays["ood_ensemble_logits"], ood_members)
        for score in ind:
            auroc, fpr = U.ood_detection(ind[score], ood[score])
            out[f"ood_auroc_{score}"], out[f"ood_fpr95_{score}"] = 100 * auroc, 100 * fpr
    _SECONDARY_CACHE[rec["npz"]] = out
    return out


def one_hot_logits(pred: torch.Tensor, k: int) -> torch.Tensor:
    """``[S, N]`` class indices as ``[S, N, K]`` one-hot float logits (their argmax is the index)."""
    return torch.nn.functional.one_hot(pred, k).float()


def secondary_lines(recs: Records, labels: np.ndarray) -> List[str]:
    """Amendment 2's secondary endpoints: one table per budget (T1 and T2 at each k: s2 against single; T3: s4
    against T1's single at k = 2), each endpoint with the arms' means ± std, Δ, its Welch 95% interval and the
    rule's outcome (s2 better / s2 worse / no difference shown; untested rows say "descriptive"; before
    ``SEEDS_PER_ARM`` seeds per arm, "interim: n of 20 seeds")."""
    out = ["## Amendment 2: secondary endpoints", "",
           "From the stored test logits with `timm_split.training.uncertainty`; Δ = mean(split) - mean(single) over "
           "seeds, Welch 95% interval; rule: better / worse where the interval excludes 0, else no difference shown "
           "(no margin, no multiplicity correction; secondary: they change no verdict). OOD (T2 only): the 10,000 "
           "test images against the 1,797 declared digits.", ""]
    for stage, k, arm in sorted({(r["stage"], r["config"]["width"], r["arm"]) for r in recs
                                 if r["arm"] != "single" and r["stage"] in AMENDMENT}):
        ref_stage = "t1" if stage == "t3" else stage
        split_rs = sorted((r for r in recs if (r["stage"], r["config"]["width"], r["arm"]) == (stage, k, arm)),
                          key=lambda r: r["seed"])
        single_rs = sorted((r for r in recs if (r["stage"], r["config"]["width"], r["arm"])
                            == (ref_stage, k, "single")), key=lambda r: r["seed"])
        if len(split_rs) < 2 or len(single_rs) < 2:
            continue
        ms, mx = [secondary_metrics(r, labels) for r in single_rs], [secondary_metrics(r, labels) for r in split_rs]
        out += [f"### {stage}: {arm} vs single ({ref_stage}), k={k:g} ({len(split_rs)} and {len(single_rs)} seeds)",
                "",
                "| endpoint | single | " + arm + " | Δ | Welch 95% CI | rule |", "|---|---|---|---|---|---|"]
        for key, name, better in SECONDARY:
            a, b = [m[key] for m in ms if key in m], [m[key] for m in mx if key in m]
            if not b:
                continue
            if not a:
                out.append(f"| {name} | - | {_ms(b, 3)} | - | - | descriptive |")
                continue
            d, lo, hi = welch_ci(b, a)
            n = min(len(a), len(b))
            if better == 0 or math.isnan(lo):
                rule = "descriptive"
            elif n < SEEDS_PER_ARM:  # the rule is applied at 20 seeds per arm, as the primary one
                rule = f"interim: {n} of {SEEDS_PER_ARM} seeds"
            elif (lo > 0) == (better > 0) and (lo > 0 or hi < 0):
                rule = f"**{arm} better**"
            elif lo > 0 or hi < 0:
                rule = f"**{arm} worse**"
            else:
                rule = "no difference shown"
            out.append(f"| {name} | {_ms(a, 3)} | {_ms(b, 3)} | {d:+.3f} | [{lo:+.3f}, {hi:+.3f}] | {rule} |")
        out.append("")
    return out


def power_fit(params: Sequence[float], errors: Sequence[float]) -> Tuple[float, float]:
    """``(log10 a, b)`` of the least-squares line log10(error) = log10(a) + b log10(params)."""
    b, log_a = np.polyfit(np.log10(params), np.log10(errors), 1)
    return float(log_a), float(b)


def crossover(fits: Dict[str, Tuple[float, float]], arm: str = "s2", ref: str = "single") -> float:
    """The params where the power laws of ``arm`` and ``ref`` meet, ``10 ** ((la_ref - la_arm) / (b_arm - b_ref))``;
    NaN for parallel lines or a crossing that does not exist (both lines identical)."""
    (la, ba), (lr, br) = fits[arm], fits[ref]
    return float(10 ** ((lr - la) / (ba - br))) if ba != br else float("nan")


def crossover_lines(recs: Records, arm: str = "s2", reps: int = 2000, seed: int = 0) -> List[str]:
    """Amendment 2's descriptive extrapolation: where the power laws of ``arm`` and single (fitted over the
    budgets where both have ``SEEDS_PER_ARM`` seeds, stage t1/t2 only) cross, with a percentile 95% interval from
    ``reps`` bootstrap resamples of seeds within each (arm, budget). Decides nothing."""
    cells: Dict[Tuple[str, float], List[float]] = {}
    for r in recs:
        if r["stage"] in ("t1", "t2") and r["arm"] in (arm, "single"):
            cells.setdefault((r["arm"], r["config"]["width"]), []).append(100 - r["test"]["ensemble"]["top1"])
    ks = sorted(k for k in {k for _, k in cells} if all(len(cells.get((a, k), [])) >= SEEDS_PER_ARM
                                                          for a in (arm, "single")))
    if len(ks) < 2:
        return []
    params = {a: [next(r["params"] for r in recs if r["arm"] == a and r["config"]["width"] == k and
                       r["stage"] in ("t1", "t2")) for k in ks] for a in (arm, "single")}

    def est(sample) -> float:
        return crossover({a: power_fit(params[a], [float(np.mean(sample(cells[(a, k)]))) for k in ks])
                          for a in (arm, "single")}, arm)

    rng = np.random.default_rng(seed)
    point = est(lambda v: v)
    boot = np.array([est(lambda v: rng.choice(v, len(v))) for _ in range(reps)])
    ok = boot[np.isfinite(boot) & (boot > 0)]
    lo, hi = (np.percentile(ok, [2.5, 97.5]) if len(ok) else (float("nan"),) * 2)
    span = f"{params['single'][0]:,}-{params['single'][-1]:,}"
    return [f"**Crossover (extrapolation, decides nothing):** the power laws of {arm} and single (fitted over "
            f"{len(ks)} budgets, {span} params) meet at {point:,.3g} params; bootstrap 95% interval "
            f"[{lo:,.3g}, {hi:,.3g}] ({reps} resamples of seeds within each arm and budget; {len(ok)} crossed). "
            f"A line through {len(ks)} budgets says nothing about curvature beyond them.", ""]


def budget_statement(budgets: Sequence[Budget]) -> str:
    """Amendment 1's statement over budgets (ordered by params): every budget "no": splitting does not pay up to
    the largest; "no" then "yes": the crossover lies between them; anything else: unresolved. Pending while a
    budget is incomplete (the rule is applied at ``SEEDS_PER_ARM`` seeds per arm)."""
    parts = "; ".join(f"k={k:g}" + (f" ({p:,} params)" if p else "") + f": {v}" for k, p, v in budgets)
    vs = [v for _, _, v in budgets]
    first_yes = vs.index("yes") if "yes" in vs else 0
    if not vs or any(v.startswith("incomplete") for v in vs):
        end = f"pending: the rule is applied once every budget has {SEEDS_PER_ARM} seeds per arm"
    elif set(vs) == {"no"}:
        end = f"splitting does not pay up to {budgets[-1][1]:,} params"
    elif first_yes and set(vs[:first_yes]) == {"no"} and set(vs[first_yes:]) == {"yes"}:
        end = f"the crossover lies between {budgets[first_yes - 1][1]:,} and {budgets[first_yes][1]:,} params"
    else:
        end = "unresolved"
    return f"**Statement over budgets** (T1 by params, then T2 when complete): {parts}. **Statement: {end}.**"


def _budget_points(recs: Records) -> Dict[str, List[Tuple[int, float, float, int]]]:
    """Per arm, one point per (arm, k, folder), by params: (params, mean test error (%), half-width of the 95% t
    interval of the mean (0 with one seed), seeds)."""
    cells: Dict[Tuple[str, float, str], Records] = {}
    for r in recs:
        cells.setdefault((r["arm"], r["config"]["width"], r["stage"]), []).append(r)
    points: Dict[str, List[Tuple[int, float, float, int]]] = {}
    for (arm, _, _), rs in sorted(cells.items(), key=lambda kv: (kv[1][0]["params"], kv[0])):
        err, n = [100 - t for t in _top1(rs)], len(rs)
        half = t_quantile(0.975, n - 1) * statistics.stdev(err) / math.sqrt(n) if n > 1 else 0.0
        points.setdefault(arm, []).append((rs[0]["params"], statistics.mean(err), half, n))
    return points


def gap_panel(ax, recs: Records) -> None:
    """Amendment 2's panel: per budget of T1/T2, the difference s2 - single of mean test top-1 with its Welch 95%
    interval, the margin +0.3 of the decision rule and 0 drawn; n per arm annotated."""
    gaps = []
    for k in sorted({r["config"]["width"] for r in recs if r["stage"] in ("t1", "t2")}):
        arms = {a: [r for r in recs if r["stage"] in ("t1", "t2") and r["config"]["width"] == k and r["arm"] == a]
                for a in PRIMARY}
        if all(len(v) >= 2 for v in arms.values()):
            d, lo, hi = welch_ci(_top1(arms["s2"]), _top1(arms["single"]))
            gaps.append((arms["single"][0]["base_params"], d, lo, hi, min(len(v) for v in arms.values())))
    from matplotlib.ticker import NullFormatter

    ax.axhline(0, color="black", lw=1)
    ax.axhline(0.3, color="tab:red", ls="--", lw=1, label="+0.3: the rule's margin (no needs upper bound < +0.3)")
    if gaps:
        x, d, lo, hi, n = zip(*gaps)
        ax.errorbar(x, d, yerr=[np.subtract(d, lo), np.subtract(hi, d)], marker="o", capsize=3, color="tab:orange",
                    label="s2 - single, Welch 95% interval")
        for xi, di, ni in zip(x, d, n):
            ax.annotate(f"n={ni}/arm", (xi, di), textcoords="offset points", xytext=(5, 4), fontsize=7)
        ax.set_xscale("log")
        ax.set_xticks(x, [f"{p / 1e6:.2g}M" for p in x])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlim(min(x) / 1.5, max(x) * 1.5)
    ax.set_title("paired difference in test top-1 (points), split S=2 minus single, per budget", fontsize=9)
    ax.set_xlabel("parameters of the single network (log scale)")
    ax.set_ylabel("s2 - single, test top-1 (points)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def budget_plot(recs: Records, path: str) -> Optional[str]:
    """Test error against params (log x) per arm, mean over seeds with 95% t intervals, from amendment 1's
    records; written atomically to ``path`` (Agg backend). Returns the path, or None when skipped."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import NullFormatter
    except ImportError:
        print(f"matplotlib is not installed: skipped the plot {path}", flush=True)
        return None
    points = _budget_points(recs)
    if not points:
        print(f"no t1/t2/t3 records: skipped the plot {path}", flush=True)
        return None
    fig = Figure(figsize=(12, 4.8))
    FigureCanvasAgg(fig)
    ax, gap_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    names = {"single": "single network (S=1)", "s2": "split, S=2, co-trained", "s4": "split, S=4, co-trained"}
    for arm, pts in points.items():
        x, y, half, n = zip(*pts)
        ax.errorbar(x, y, yerr=half, marker="o", capsize=3, label=names.get(arm, arm))
        for xi, yi, ni in zip(x, y, n):
            ax.annotate(f"n={ni}", (xi, yi), textcoords="offset points", xytext=(5, 4), fontsize=7)
    c, ns = recs[0]["config"], sorted({p[3] for pts in points.values() for p in pts})
    arch = {"resnet10": "wide ResNet-10", "wrn16": "WRN-16"}.get(c["arch"], c["arch"])
    seeds = f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
    ax.set_title(f"Fashion-MNIST {c['per_class']}/class, {c['epochs']} epochs, {arch}: test error vs params\n"
                 f"mean over n = {seeds} seeds per point, error bars: 95% t interval of the mean", fontsize=9)
    ax.set_xscale("log")
    budgets = sorted({r["base_params"] for r in recs})  # ticks at the unsplit networks' params
    ax.set_xticks(budgets, [f"{p / 1e6:.2g}M" for p in budgets])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(budgets[0] / 1.5, budgets[-1] * 1.5)
    ax.set_xlabel("parameters (all members; log scale; ticks at the budgets' single networks)")
    ax.set_ylabel("test error (100 - top-1), % (10,000 test images)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    gap_panel(gap_ax, recs)
    fig.tight_layout()
    _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    print(f"wrote the budget plot {path}", flush=True)
    return path


def write_report(records: str, results_md: str, data_dir: str, plot: Optional[str] = None) -> None:
    """Regenerate the tables between the markers of ``results_md`` from ``records`` (atomic write); with ``plot``,
    also amendment 1's test error vs params plot there."""
    recs = load_records(records)
    labels = _idx(data_dir, "t10k-labels-idx1-ubyte").astype(np.int64)
    amended = [r for r in recs if r["stage"] in AMENDMENT]
    gate = [r for r in recs if r["kind"] == "gate" and r["stage"] not in AMENDMENT]
    grid = [r for r in recs if r["kind"] != "gate" and r["stage"] not in AMENDMENT]
    where = os.path.relpath(records, ROOT)
    where = records if where.startswith("..") else where
    lines = [f"Generated by `python benchmarks/science.py --report` from {len(recs)} records in `{where}`. "
             "Mean ± std over seeds; test = the 10,000 test images; the last-epoch train CE is on the augmented, "
             "mixed batches.", ""]
    if amended:
        lines += amendment_report(amended, labels) + secondary_lines(amended, labels)
    if gate:
        lines += ["## Stage 1: the regime gate", ""] + gate_report(gate, labels)
    if grid:
        lines += ["## Stage 2: the grid", ""] + grid_report(grid, labels)
    if not recs:
        lines = ["No records yet."]
    begin, end = "<!-- tables:begin (generated by benchmarks/science.py --report) -->", "<!-- tables:end -->"
    text = open(results_md).read() if os.path.isfile(results_md) else f"# Science results\n\n{begin}\n{end}\n"
    if begin not in text or end not in text:
        raise ValueError(f"{results_md} has no '{begin}' ... '{end}' markers to put the tables between.")
    text = text[:text.index(begin) + len(begin)] + "\n" + "\n".join(lines).rstrip() + "\n" + text[text.index(end):]
    _atomic_write(results_md, lambda f: f.write(text.encode()))
    print(f"wrote the tables of {results_md} from {len(recs)} records", flush=True)
    if plot:
        budget_plot(amended, plot)


# ----------------------------------------------------------------------------------------------------------
# command line

def _parser() -> argparse.ArgumentParser:
    from timm.utils import ParseKwargs

    d = Setting()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = ap.add_argument
    a("--stage", choices=("gate", "grid"), default="grid", help="stage 1 (the regime gate) or stage 2 (the grid)")
    a("--tag", default=None, help="records sub-folder (default: the stage name)")
    a("--arch", choices=sorted(ARCHS), default=d.arch)
    a("--width", type=float, default=d.width, help="k: the width of the network that is split")
    a("--per-class", type=int, default=d.per_class, help="class-balanced training subset: images per class")
    a("--epochs", type=int, default=d.epochs)
    a("--batch-size", type=int, default=d.batch_size)
    a("--lr", type=float, default=None, help="peak LR (default 0.1 * batch / 128)")
    a("--weight-decay", type=float, default=d.weight_decay, help="for S=1; scaled by exp(1/S - 1)")
    a("--cot-weight", type=float, default=d.cot_weight, help="JS weight (the no-cot arm uses 0)")
    a("--pad", type=int, default=None, help="pad-and-crop padding (default H // 8: 3 at 28 px)")
    a("--hflip", type=float, default=d.hflip)
    a("--ra-ops", type=int, default=d.ra_ops, help="RandAugment ops per image (0: off)")
    a("--ra-magnitude", type=float, default=d.ra_magnitude)
    a("--re-prob", type=float, default=d.re_prob, help="random-erasing probability")
    a("--mixup-alpha", type=float, default=d.mixup_alpha)
    a("--split-kwargs", nargs="*", default={}, action=ParseKwargs, metavar="K=V",
      help="extra timm_split.split() options for the split arms (e.g. planner options); the arm is named with them")
    a("--arms", nargs="+", choices=list(ARMS), default=list(PRIMARY + CONTROLS), help="grid arms (add s4 if time)")
    a("--seeds", type=int, nargs="+", default=list(range(10)), help="seeds of single, s2 and s4")
    a("--control-seeds", type=int, nargs="+", default=list(range(5)), help="seeds of the controls")
    a("--gate-seeds", type=int, nargs="+", default=list(range(4)), help="seeds of each gate width")
    a("--device", default=d.device)
    a("--amp", action="store_true", help="bf16 autocast")
    a("--channels-last", action="store_true")
    a("--data-dir", default=d.data_dir, help="folder with the four Fashion-MNIST IDX files (.gz or not)")
    a("--jobs", type=int, default=1, help="runs in parallel (worker processes)")
    a("--threads", type=int, default=1, help="torch threads per worker")
    a("--records", default=RECORDS, help="where the run records go")
    a("--results-md", default=RESULTS_MD, help="the file whose generated tables --report rewrites")
    a("--plot", default=BUDGET_PLOT, help="the test error vs params plot of amendment 1 that --report writes")
    a("--measure", action="store_true", help="time each arm and print the stage's expected wall time; train nothing")
    a("--report", action="store_true", help="rewrite the tables of --results-md from --records; train nothing")
    a("--dry-run", action="store_true", help="gate + grid + measure + report at a tiny size in a temp folder")
    return ap


def _setting(args: argparse.Namespace) -> Setting:
    lr = args.lr if args.lr is not None else 0.1 * args.batch_size / 128
    return Setting(arch=args.arch, width=args.width, per_class=args.per_class, epochs=args.epochs,
                   batch_size=args.batch_size, lr=lr, weight_decay=args.weight_decay, cot_weight=args.cot_weight,
                   pad=args.pad, hflip=args.hflip, ra_ops=args.ra_ops, ra_magnitude=args.ra_magnitude,
                   re_prob=args.re_prob, mixup_alpha=args.mixup_alpha, split_kwargs=dict(args.split_kwargs),
                   device=args.device, amp=args.amp, channels_last=args.channels_last, data_dir=args.data_dir)


def dry_run(args: argparse.Namespace) -> None:
    """The whole pipeline at a tiny size (2 epochs, 10 images per class, 2 seeds) in a temp folder."""
    out = tempfile.mkdtemp(prefix="science_dry_")
    args.records, args.results_md = os.path.join(out, "records"), os.path.join(out, "results.md")
    args.plot = os.path.join(out, "science_budget.png")
    if os.path.isfile(RESULTS_MD):
        with open(RESULTS_MD) as src, open(args.results_md, "w") as dst:
            dst.write(src.read())
    args.epochs, args.per_class, args.batch_size = 2, 10, 32
    args.seeds = args.control_seeds = args.gate_seeds = [0, 1]
    args.arms = list(PRIMARY + CONTROLS) + ["s4"]
    st = _setting(args)
    print(f"dry run in {out}", flush=True)
    for stage in ("gate", "grid"):
        specs = stage_specs(stage, stage, st, args.arms, args.seeds, args.control_seeds, args.gate_seeds)
        measure(specs, st, args.jobs, steps=2, warmup=1)
        run_specs(specs, st, args.records, args.jobs, args.threads)
        run_specs(specs, st, args.records, args.jobs, args.threads)  # resumes: nothing left to run
    write_report(args.records, args.results_md, args.data_dir, args.plot)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.dry_run:
        return dry_run(args)
    if args.report:
        return write_report(args.records, args.results_md, args.data_dir, args.plot)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU; use --device cpu.")
    st = _setting(args)
    specs = stage_specs(args.stage, args.tag or args.stage, st, args.arms, args.seeds, args.control_seeds,
                        args.gate_seeds)
    if args.measure:
        todo = [s for s in specs if _done(s, st, args.records) is None]
        measure(todo or specs, st, args.jobs)
        return
    t0 = time.perf_counter()
    run_specs(specs, st, args.records, args.jobs, args.threads)
    print(f"{args.stage} done in {(time.perf_counter() - t0) / 60:.1f} min; records in {args.records}. Next: "
          f"python benchmarks/science.py --report", flush=True)


if __name__ == "__main__":
    main()
