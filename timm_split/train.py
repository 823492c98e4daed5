"""Train a timm model (``split=1``) or its SplitNet ensemble (``split=S``) on Fashion-MNIST, co-training the members.

Used by ``timm-split train`` and ``benchmarks/science.py``::

    timm-split train --model resnet18 --split 2 --epochs 10 --out runs/r18-s2
    timm-split train --model resnet18 --split 2 --epochs 20 --resume runs/r18-s2   # continue to epoch 20

Choices, so every S runs the same code:

* Every model is a :class:`~timm_split.ensemble.SplitEnsemble` (S=1 wraps the plain model, no tracing), fed
  ``[S, B, 1, H, W]`` views (:class:`~timm_split.data.MemberViewsDataset` on timm's ``create_loader``) and trained
  with :class:`~timm_split.loss.CoTrainingLoss` (S=1: plain cross-entropy).
* Input: Fashion-MNIST stays 1-channel (``in_chans=1``, mean 0.2860, std 0.3530); no replication to RGB.
  ``pretrained_cfg['input_size']`` is set to ``(1, img_size, img_size)`` so splitting and counting see 1 channel.
  Train augmentation: timm's random-resized-crop (``scale``, default area 0.75-1, about CIFAR's pad-4 crop) and
  horizontal flip, no colour jitter; test: the image resized to ``img_size`` (``crop_pct=1``).
* Optimiser: timm's ``create_optimizer_v2`` (SGD, Nesterov) on :func:`~timm_split.optim.param_groups` (weight
  decay scaled by ``exp(1/S - 1)``); LR: timm's cosine scheduler stepped every update.
* Seeds: members of run ``seed`` get init seeds ``seed*S .. seed*S+S-1``; data order and augmentation are
  re-seeded at every epoch from ``(seed, epoch)``, so a resumed run replays the epochs it would have run.
* Checkpoints (``<out>/last.safetensors`` + ``<out>/last_state.pth``): the ensemble's ``state_dict`` (keys
  ``members.<i>.<name>``) as safetensors with ``epoch``/``step``/``model``/``split`` in its metadata, and the
  optimizer state, epoch and step in a small ``torch.save`` side file (nested optimizer state does not fit
  safetensors' flat tensor map).
* Log: ``<out>/log.json``, rewritten after every epoch: the config, params/GMACs (:func:`~timm_split.count.count`),
  and per epoch the LR, the train losses and the test metrics (top-1 %, NLL in nats, 15-bin ECE as a fraction)
  of the ensemble and of every member.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .execution import STRATEGIES, make_execution

_logger = logging.getLogger(__name__)

__all__ = [
    "TrainConfig", "train", "evaluate", "classification_metrics", "expected_calibration_error", "build_model",
    "create_loaders", "save_checkpoint", "load_checkpoint", "add_train_args", "run_train",
]

DATASETS = ("fashion_mnist",)
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
NUM_CLASSES = 10
CHECKPOINT = "last.safetensors"
STATE = "last_state.pth"
LOG = "log.json"


@dataclasses.dataclass
class TrainConfig:
    """Everything a run depends on (the CLI flags, one field each; see ``timm-split train --help``)."""

    model: str = "resnet18"
    split: int = 1
    dataset: str = "fashion_mnist"
    data_dir: str = FASHION_MNIST_DIR
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    weight_decay: float = 5e-4
    momentum: float = 0.9
    warmup_epochs: int = 0
    amp: bool = False
    cot_weight: float = 0.5
    cot_warmup: Optional[float] = None
    cot_mode: str = "js"
    smoothing: float = 0.0
    same_view: bool = False
    no_cot: bool = False
    train_subset: Optional[int] = None
    img_size: int = 28
    scale: Tuple[float, float] = (0.75, 1.0)
    hflip: float = 0.5
    seed: int = 0
    out: Optional[str] = None
    resume: Optional[str] = None
    device: Optional[str] = None
    workers: int = 0
    eval_every: int = 1
    execution: str = "loop"
    model_kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def check(self) -> "TrainConfig":
        """Validate the fields; raise ``ValueError`` with a hint for a bad one. Returns ``self``."""
        positive = dict(split=self.split, epochs=self.epochs, batch_size=self.batch_size, img_size=self.img_size)
        for name, v in positive.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1; got {v!r}.")
        make_execution(self.execution)  # raises the ValueError that names the strategies
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}; got {self.dataset!r}.")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0 (e.g. 0.1 for SGD at batch 128); got {self.lr}.")
        if self.train_subset is not None and self.train_subset < self.batch_size:
            raise ValueError(f"train_subset ({self.train_subset}) must be at least the batch size "
                             f"({self.batch_size}): the train loader drops the last partial batch.")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must be (lo, hi) with 0 < lo <= hi <= 1 (crop area fraction); got {self.scale}.")
        if self.eval_every < 0 or self.workers < 0 or self.warmup_epochs < 0:
            raise ValueError("eval_every, workers and warmup_epochs must be >= 0.")
        return self

    @property
    def cot_warmup_epochs(self) -> float:
        """The co-training warm-up: ``cot_warmup``, or the paper's 40 of 300 epochs scaled to ``epochs``."""
        return self.cot_warmup if self.cot_warmup is not None else self.epochs * 40 / 300


# ----------------------------------------------------------------------------------------------------------
# metrics

def expected_calibration_error(probs: torch.Tensor, target: torch.Tensor, n_bins: int = 15) -> float:
    """Expected calibration error of the top-1 prediction, with ``n_bins`` equal-width confidence bins.

    ``ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)|``; bin ``b`` holds confidences in ``(b/n, (b+1)/n]``
    (a confidence of exactly 0 goes to the first bin).

    Args:
        probs: Probabilities ``[N, K]``.
        target: Class indices ``[N]``.
        n_bins: Number of bins (15 as in Guo et al., 2017).

    Returns:
        The ECE as a fraction in ``[0, 1]``.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1; got {n_bins}.")
    conf, pred = probs.float().max(-1)
    correct = (pred == target).float()
    bins = (torch.ceil(conf * n_bins).long() - 1).clamp(0, n_bins - 1)
    gap = torch.zeros(n_bins, device=conf.device).index_add_(0, bins, conf - correct)
    return float(gap.abs().sum() / max(len(target), 1))


def classification_metrics(logits: torch.Tensor, target: torch.Tensor, n_bins: int = 15) -> Dict[str, float]:
    """Top-1 accuracy (%), NLL (nats, mean) and ECE (fraction, ``n_bins`` bins) of ``logits [N, K]``.

    ``logits`` may also be log-probabilities (a ``averaging='probs'`` ensemble): softmax leaves them unchanged.
    """
    logits = logits.float()
    return {
        "top1": float((logits.argmax(-1) == target).float().mean() * 100),
        "nll": float(F.cross_entropy(logits, target)),
        "ece": expected_calibration_error(logits.softmax(-1), target, n_bins),
    }


def _autocast(device: torch.device, enabled: bool):
    """bf16 autocast on ``device`` (no grad scaler needed), or a no-op."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: bool = False) -> Dict[str, Any]:
    """Test metrics of a :class:`~timm_split.ensemble.SplitEnsemble` and of each of its members.

    Args:
        model: The ensemble (evaluated in eval mode; its mode is restored).
        loader: Batches ``(images [B, C, H, W], targets [B])``.
        device: Where to run.
        amp: bf16 autocast.

    Returns:
        ``{'ensemble': {'top1', 'nll', 'ece'}, 'members': [{...} per member]}``.
    """
    was_training = model.training
    model.eval()
    outs, targets = [], []
    for images, target in loader:
        with _autocast(device, amp):
            outs.append(model.forward_members(images.to(device)).float().cpu())
        targets.append(target.cpu())
    model.train(was_training)
    members, target = torch.cat(outs, 1), torch.cat(targets)
    return {"ensemble": classification_metrics(model.combine(members), target),
            "members": [classification_metrics(m, target) for m in members]}


# ----------------------------------------------------------------------------------------------------------
# data and model

def _datasets(cfg: TrainConfig):
    from .data import FashionMNIST

    train_ds, test_ds = FashionMNIST(cfg.data_dir, train=True), FashionMNIST(cfg.data_dir, train=False)
    if cfg.train_subset is not None and cfg.train_subset < len(train_ds):
        # a fixed subset (permutation seed 0, whatever --seed), so seeds differ in init and order only
        keep = np.sort(np.random.RandomState(0).permutation(len(train_ds))[:cfg.train_subset])
        train_ds.data, train_ds.targets = train_ds.data[keep], train_ds.targets[keep]
    return train_ds, test_ds


def create_loaders(cfg: TrainConfig, device: torch.device):
    """Train and test loaders (timm's ``create_loader`` with its prefetcher, ``num_workers=cfg.workers``).

    The train loader yields ``(views [S, B, 1, H, W], targets [B])``: S independently augmented views, or one
    view repeated S times with ``same_view``. The test loader yields ``(images [B, 1, H, W], targets [B])``.

    Raises:
        FileNotFoundError: the IDX files are missing (the message names ``apt-get install dataset-fashion-mnist``).
    """
    from timm.data import create_loader

    from .data import MemberViewsDataset, collate_member_views

    train_ds, test_ds = _datasets(cfg)
    size = (1, cfg.img_size, cfg.img_size)
    # the prefetcher normalises whole uint8 batches (5-d views too): ~40% less per-view work than ToTensor+Normalize
    common = dict(input_size=size, use_prefetcher=True, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD,
                  interpolation="bilinear", num_workers=cfg.workers, device=device)
    train_loader = create_loader(
        MemberViewsDataset(train_ds, cfg.split, same_view=cfg.same_view), batch_size=cfg.batch_size,
        is_training=True, scale=tuple(cfg.scale), ratio=(3 / 4, 4 / 3), hflip=cfg.hflip, color_jitter=None,
        collate_fn=collate_member_views, **common)
    test_loader = create_loader(test_ds, batch_size=max(cfg.batch_size, 256), is_training=False, crop_pct=1.0,
                                **common)
    return train_loader, test_loader


def build_model(cfg: TrainConfig, model_fn: Optional[Callable[[], nn.Module]] = None) -> nn.Module:
    """The :class:`~timm_split.ensemble.SplitEnsemble` to train.

    Args:
        cfg: The run's config (``model``, ``model_kwargs``, ``split``, ``img_size``, ``seed``).
        model_fn: Builds the model instead of ``timm.create_model(cfg.model, num_classes=10, in_chans=1,
            **cfg.model_kwargs)``; the model must take 1-channel input and give 10 classes.

    Returns:
        The model is built after ``torch.manual_seed(seed)``. S=1: a one-member ensemble around it;
        S>1: ``split(model, S, seed=seed*S)`` (member ``i`` initialised with seed ``seed*S + i``).
    """
    import timm

    from .core import split
    from .ensemble import SplitEnsemble

    torch.manual_seed(cfg.seed)
    if model_fn is None:
        model = timm.create_model(cfg.model, num_classes=NUM_CLASSES, in_chans=1, **cfg.model_kwargs)
    else:
        model = model_fn()
    model.pretrained_cfg = dict(getattr(model, "pretrained_cfg", None) or {}, num_classes=NUM_CLASSES,
                                input_size=(1, cfg.img_size, cfg.img_size), mean=FASHION_MNIST_MEAN,
                                std=FASHION_MNIST_STD, crop_pct=1.0)
    if cfg.split == 1:
        return SplitEnsemble([model], pretrained_cfg=model.pretrained_cfg)
    return split(model, cfg.split, seed=cfg.seed * cfg.split, img_size=cfg.img_size)


# ----------------------------------------------------------------------------------------------------------
# checkpoints

def _atomic(path: str, write) -> None:
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(out: str, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, step: int,
                    cfg: TrainConfig) -> str:
    """Write ``<out>/last.safetensors`` (weights) and ``<out>/last_state.pth`` (optimizer, epoch, step).

    Returns:
        The safetensors path.
    """
    from safetensors.torch import save_model

    meta = {"epoch": str(epoch), "step": str(step), "model": cfg.model, "split": str(cfg.split),
            "format": "timm_split.train/1"}
    path = os.path.join(out, CHECKPOINT)
    _atomic(path, lambda p: save_model(model, p, metadata=meta))
    state = {"optimizer": optimizer.state_dict(), "epoch": epoch, "step": step, "config": dataclasses.asdict(cfg)}
    _atomic(os.path.join(out, STATE), lambda p: torch.save(state, p))
    return path


def load_checkpoint(path: str, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> Dict[str, Any]:
    """Load weights (strictly) and, if given, the optimizer state saved by :func:`save_checkpoint`.

    Args:
        path: The ``.safetensors`` file or the run directory holding ``last.safetensors``.
        model: The ensemble to load into (built with the same model and split).
        optimizer: Optional optimizer to restore (needs ``last_state.pth`` next to the weights).

    Returns:
        The safetensors metadata with ``epoch`` and ``step`` as ints.
    """
    from safetensors import safe_open
    from safetensors.torch import load_model

    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT)
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint at {path}; pass the run directory or its {CHECKPOINT}.")
    with safe_open(path, "pt") as f:
        meta = dict(f.metadata() or {})
    split_factor = getattr(model, "split_factor", 1)
    if meta.get("split") and int(meta["split"]) != split_factor:
        raise ValueError(f"{path} holds a split-{meta['split']} ensemble but the model has S={split_factor}; "
                         f"resume with --split {meta['split']}.")
    load_model(model, path, strict=True)
    meta["epoch"], meta["step"] = int(meta.get("epoch", 0)), int(meta.get("step", 0))
    if optimizer is not None:
        state = torch.load(os.path.join(os.path.dirname(path), STATE), map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        meta["epoch"], meta["step"] = state["epoch"], state["step"]
    return meta


# ----------------------------------------------------------------------------------------------------------
# training

def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


def train(cfg: TrainConfig, model_fn: Optional[Callable[[], nn.Module]] = None, progress: bool = True
          ) -> Dict[str, Any]:
    """Train (or resume) a run and write its checkpoint and JSON log.

    Args:
        cfg: The run's config; ``cfg.resume`` (a run directory or its ``last.safetensors``) continues a run up
            to ``cfg.epochs``.
        model_fn: Optional model builder instead of ``timm.create_model(cfg.model, ...)`` (see :func:`build_model`).
        progress: Show a tqdm bar per epoch.

    Returns:
        The log dict (also in ``<out>/log.json``): ``config``, ``params``, ``gmacs``, ``member_params``,
        ``member_gmacs``, ``epochs`` (one entry per epoch), ``train_seconds`` and ``final`` (the last test metrics).

    Raises:
        ValueError: a bad config value.
        FileNotFoundError: the dataset files are missing.
    """
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import random_seed
    from tqdm import tqdm

    from .count import count
    from .loss import CoTrainingLoss
    from .optim import param_groups

    cfg.check()
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = cfg.out or (os.path.dirname(os.path.abspath(cfg.resume)) if cfg.resume and os.path.isfile(cfg.resume)
                      else cfg.resume) or os.path.join("runs", f"{cfg.model}-s{cfg.split}-seed{cfg.seed}")
    if cfg.amp and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("--amp uses bfloat16 autocast, which this GPU does not support; drop --amp.")
    os.makedirs(out, exist_ok=True)

    train_loader, test_loader = create_loaders(cfg, device)
    ens = build_model(cfg, model_fn).to(device).set_execution(cfg.execution)
    S = ens.split_factor
    steps_per_epoch = len(train_loader)
    cost = [count(ens.members[0], cfg.img_size, in_chans=1)] * S  # the members share one architecture
    optimizer = create_optimizer_v2(param_groups(ens, cfg.weight_decay, S), opt="sgd", lr=cfg.lr,
                                    momentum=cfg.momentum)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=cfg.epochs,
                                       warmup_epochs=cfg.warmup_epochs, step_on_epochs=False,
                                       updates_per_epoch=steps_per_epoch)
    loss_fn = CoTrainingLoss(cot_weight=0.0 if cfg.no_cot else cfg.cot_weight, warmup_epochs=cfg.cot_warmup_epochs,
                             smoothing=cfg.smoothing, mode=cfg.cot_mode)

    log: Dict[str, Any] = {
        "config": dataclasses.asdict(cfg), "params": sum(c.params for c in cost),
        "gmacs": sum(c.gmacs for c in cost), "member_params": [c.params for c in cost],
        "member_gmacs": [c.gmacs for c in cost], "steps_per_epoch": steps_per_epoch, "epochs": [],
        "train_seconds": 0.0, "final": None,
    }
    start, step = 0, 0
    if cfg.resume:
        meta = load_checkpoint(cfg.resume, ens, optimizer)
        start, step = meta["epoch"], meta["step"]
        old_log = os.path.join(cfg.resume if os.path.isdir(cfg.resume) else os.path.dirname(cfg.resume), LOG)
        if os.path.isfile(old_log):
            with open(old_log) as f:
                old = json.load(f)
            log["epochs"] = [e for e in old.get("epochs", []) if e["epoch"] <= start]
            log["train_seconds"] = sum(e["train_seconds"] for e in log["epochs"])
        _logger.info("resumed %s at epoch %d, step %d", cfg.resume, start, step)
        if start >= cfg.epochs:
            _logger.warning("the checkpoint is at epoch %d >= --epochs %d: nothing to train", start, cfg.epochs)
    scheduler.step_update(step)
    _logger.info("%s S=%d: %.3fM params, %.4f GMACs (members %s), %d steps/epoch, weight decay %s", cfg.model, S,
                 log["params"] / 1e6, log["gmacs"], [c.params for c in cost], steps_per_epoch,
                 sorted({g["weight_decay"] for g in optimizer.param_groups}))

    for epoch in range(start, cfg.epochs):
        random_seed(_epoch_seed(cfg.seed, epoch))
        ens.train()
        sums = {"loss": 0.0, "ce": 0.0, "cot": 0.0}
        t0 = time.perf_counter()
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False,
                   file=sys.stderr, dynamic_ncols=True)
        for i, (views, target) in enumerate(bar):
            views, target = views.to(device, non_blocking=True), target.to(device, non_blocking=True)
            with _autocast(device, cfg.amp):
                logits = ens.forward_members(views)
            losses = loss_fn(logits, target, epoch=epoch + i / steps_per_epoch)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()
            step += 1
            scheduler.step_update(step)
            for k in sums:
                sums[k] += losses[k].item()
            if not math.isfinite(sums["loss"]):
                raise FloatingPointError(f"loss is {sums['loss']} at epoch {epoch + 1}, step {step}: lower --lr.")
            if progress:
                bar.set_postfix(loss=f"{sums['loss'] / (i + 1):.3f}", lr=f"{optimizer.param_groups[0]['lr']:.4f}")
        seconds = time.perf_counter() - t0
        entry = {"epoch": epoch + 1, "step": step, "lr": optimizer.param_groups[0]["lr"],
                 "cot_weight": loss_fn.weight(epoch + 1), "train_seconds": seconds,
                 **{k: v / steps_per_epoch for k, v in sums.items()}}
        if epoch + 1 == cfg.epochs or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
            entry["test"] = evaluate(ens, test_loader, device, cfg.amp)
            log["final"] = entry["test"]
        log["epochs"].append(entry)
        log["train_seconds"] += seconds
        _atomic(os.path.join(out, LOG), lambda p: _write_json(p, log))  # first: resume drops epochs it lacks
        save_checkpoint(out, ens, optimizer, epoch + 1, step, cfg)
        test = entry.get("test")
        _logger.info("epoch %d/%d: loss %.4f (ce %.4f, cot %.4f), %.1fs%s", epoch + 1, cfg.epochs, entry["loss"],
                     entry["ce"], entry["cot"], seconds, "" if test is None else
                     " | test top-1 %.2f%% nll %.4f ece %.4f | members %s" % (
                         test["ensemble"]["top1"], test["ensemble"]["nll"], test["ensemble"]["ece"],
                         " ".join(f"{m['top1']:.2f}" for m in test["members"])))
    if log["final"] is None and log["epochs"]:
        log["final"] = next((e["test"] for e in reversed(log["epochs"]) if "test" in e), None)
    log["out"] = out
    return log


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


# ----------------------------------------------------------------------------------------------------------
# CLI

def add_train_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``timm-split train`` flags (one per :class:`TrainConfig` field, plus ``--threads``)."""
    from timm.utils import ParseKwargs

    d = TrainConfig()
    a = parser.add_argument
    a("--model", default=d.model, help="timm model name (created with num_classes=10, in_chans=1)")
    a("--model-kwargs", nargs="*", default={}, action=ParseKwargs, metavar="K=V",
      help="extra timm.create_model kwargs, e.g. drop_rate=0.1")
    a("--split", type=int, default=d.split, help="S members (1 = the plain model)")
    a("--dataset", default=d.dataset, choices=DATASETS)
    a("--data-dir", default=d.data_dir, help="directory of the IDX files")
    a("--epochs", type=int, default=d.epochs)
    a("--batch-size", type=int, default=d.batch_size)
    a("--lr", type=float, default=d.lr, help="peak LR of the cosine schedule (SGD, Nesterov)")
    a("--warmup-epochs", type=int, default=d.warmup_epochs, help="linear LR warm-up epochs")
    a("--weight-decay", type=float, default=d.weight_decay, help="for S=1; scaled by exp(1/S - 1)")
    a("--momentum", type=float, default=d.momentum)
    a("--amp", action="store_true", help="bfloat16 autocast (CPU or GPU)")
    a("--cot-weight", type=float, default=d.cot_weight, help="weight of the co-training term")
    a("--cot-warmup", type=float, default=None,
      help="epochs to ramp the co-training weight up (default: 40/300 of --epochs, the paper's ratio)")
    a("--cot-mode", choices=("js", "kl"), default=d.cot_mode)
    a("--smoothing", type=float, default=d.smoothing, help="label smoothing")
    a("--same-view", action="store_true", help="ablation: every member sees the same augmented view")
    a("--no-cot", action="store_true", help="ablation: no co-training term (cot weight 0)")
    a("--train-subset", type=int, default=None, metavar="N", help="train on a fixed random N images")
    a("--img-size", type=int, default=d.img_size)
    a("--scale", type=float, nargs=2, default=d.scale, metavar=("LO", "HI"), help="random-resized-crop area range")
    a("--hflip", type=float, default=d.hflip, help="horizontal flip probability")
    a("--seed", type=int, default=d.seed)
    a("--out", default=None, help="run directory (default runs/<model>-s<S>-seed<seed>)")
    a("--resume", default=None, metavar="PATH", help="continue from a run directory or its last.safetensors")
    a("--device", default=None, help="default: cuda if available, else cpu")
    a("--workers", type=int, default=d.workers, help="data loader worker processes")
    a("--eval-every", type=int, default=d.eval_every, help="test every N epochs (0: only after the last)")
    a("--execution", default=d.execution, choices=STRATEGIES,
      help="how the members run (same results; speed differs, see docs/speed.md): 'threads' runs each member's "
           "forward and backward on its own worker thread")
    a("--threads", type=int, default=None, help="torch.set_num_threads")
    a("--no-progress", action="store_true", help="no tqdm bar")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of parsed ``timm-split train`` arguments."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def run_train(args: argparse.Namespace) -> int:
    """``timm-split train``: train, print the final test metrics, return the exit status."""
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("timm_split").setLevel(logging.INFO)
    try:
        log = train(config_from_args(args), progress=not args.no_progress)
    except FileNotFoundError as e:
        print(f"timm-split train: error: {e}", file=sys.stderr)
        return 2
    final = log["final"]
    if final is not None:
        e = final["ensemble"]
        members = ", ".join(f"{m['top1']:.2f}" for m in final["members"])
        print(f"{args.model} S={args.split}: top-1 {e['top1']:.2f}%  NLL {e['nll']:.4f}  ECE {e['ece']:.4f}  "
              f"(members {members}); "
              f"{log['params'] / 1e6:.3f}M params, {log['gmacs']:.4f} GMACs; {log['train_seconds']:.0f}s; "
              f"log {os.path.join(log['out'], LOG)}")
    return 0
