"""``timm-split train``: timm's ``train.py`` recipe for a model (``--split 1``) or its co-trained SplitNet ensemble.

    timm-split train --data-dir fmnist_png --model resnet18 --split 2 --img-size 32 --epochs 10 \\
        --aa rand-m9-mstd0.5 --reprob 0.25 --mixup 0.2 --model-ema --amp
    torchrun --nproc_per_node 2 -m timm_split.commands.train --data-dir DIR --model resnet18 --split 2   # DDP
    torchrun --nproc_per_node 2 -m timm_split.commands.train --member-parallel --split 2 ...   # a member per rank

Built from timm's parts: ``create_dataset``, ``create_loader``/``create_transform``, ``resolve_data_config``,
``Mixup``, ``RandomErasing``, ``create_optimizer_v2``, ``create_scheduler_v2``, ``ModelEmaV3``, ``NativeScaler``
and autocast, ``CheckpointSaver``'s bookkeeping (``last``, ``model_best``, the best ``--checkpoint-hist``
``checkpoint-<epoch>``), ``update_summary``/``trim_summary`` (``summary.csv``) and ``distribute_bn``. Flags share
timm's names and defaults. What differs:

* Every model is a :class:`~timm_split.ensemble.SplitEnsemble` (S=1 wraps the plain model), fed S views: each
  image gets S independent draws of the whole train transform (crop, flip, colour jitter, AutoAugment/RandAugment)
  and of random erasing, then Mixup/CutMix with one lambda, one pairing and one box shared by the members
  (:class:`~timm_split.training.data.MemberBatchAugment`); ``--same-view`` repeats one draw. The loss is
  :class:`~timm_split.training.loss.CoTrainingLoss` (the members' CE on the soft targets + a warmed-up JS term).
* Weight decay is scaled by ``exp(1/S - 1)`` (:func:`~timm_split.training.optim.param_groups`).
* ``--amp`` autocasts to float16 on CUDA (timm's default, with a grad scaler) and bfloat16 on the CPU.
* Checkpoints are single safetensors files (weights + optimizer/EMA/scaler state, checksummed, written atomically;
  :mod:`timm_split.checkpoint`), not pickles. ``--resume`` replays the run bit for bit: data order and augmentation
  are re-seeded every epoch from ``(--seed, epoch, rank)``.
* No ``--data-dir`` and no ``--dataset``: Fashion-MNIST from Debian's IDX files, 1 channel at 28 px.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import math
import os
import sys
import time
from collections import OrderedDict
from datetime import datetime
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from ..checks import atomic_write
from .common import autocast_factory, cli_logging, resolve_device, user_error
from .train_checks import SEED_SPACE, check_channels, check_train_args, ema_warning
from .train_flags import add_train_args

# under the package's name also as ``python -m``/``torchrun -m timm_split.commands.train`` (where __name__ is
# '__main__', whose INFO lines no 'timm_split' logging setting shows)
_logger = logging.getLogger("timm_split.commands.train")

__all__ = ["add_train_args", "train_args", "train", "build_model", "setup_run", "train_one_epoch", "run_train", "main",
           "epoch_text", "summary_lines", "sigterm_unwinds", "Terminated"]

SUMMARY = "summary.csv"
RESULTS = "results.json"
TERMINATED_EXIT = 128 + 15  # a shell's status for a process that SIGTERM ended


def train_args(**overrides: Any) -> argparse.Namespace:
    """The flags' defaults with ``overrides`` (keyword names as the flags' dest, e.g. ``batch_size=32``); a
    ``config=`` YAML (``-c``) sets defaults that the other overrides win over."""
    config = overrides.pop("config", "")
    args = add_train_args(argparse.ArgumentParser()).parse_args(["-c", config] if config else [])
    unknown = set(overrides) - set(vars(args))
    if unknown:
        raise ValueError(f"unknown training options {sorted(unknown)}; see timm-split train --help.")
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


# ----------------------------------------------------------------------------------------------------------
# device, model, precision

# A model trained from scratch is split at parity with its own head (the dataset's classes); the checkpoint
# records this so that ``timm-split validate`` rebuilds the same widths.
PLAN_AT = "model"


def build_model(args: argparse.Namespace, num_classes: int, data_cfg: Dict[str, Any],
                model_fn: Optional[Callable[[], nn.Module]] = None) -> nn.Module:
    """The :class:`~timm_split.ensemble.SplitEnsemble` to train, built after ``torch.manual_seed(args.seed)``.

    Args:
        args: The run's flags (``model``, ``model_kwargs``, ``drop``, ``drop_path``, ``split``, ``seed``, ...).
        num_classes: Classes of the dataset.
        data_cfg: Dataset defaults for the model's ``pretrained_cfg`` (Fashion-MNIST: 1 channel, 28 px).
        model_fn: Builds the base model instead of ``timm.create_model``.

    Returns:
        S=1: a one-member ensemble around the model; S>1: ``split(model, S, seed=seed*S)`` at the input size.
    """
    import timm
    from timm.data import resolve_data_config

    from ..checkpoint import load_checkpoint
    from ..core import split
    from ..ensemble import single
    from ..training.warm_start import has_ema, load_into_model

    in_chans = args.in_chans or (args.input_size[0] if args.input_size else data_cfg.get("input_size", (3,))[0])
    kwargs = dict(num_classes=num_classes, in_chans=in_chans, drop_rate=args.drop, **args.model_kwargs)
    kwargs.update({k: v for k, v in (("drop_path_rate", args.drop_path), ("drop_block_rate", args.drop_block))
                   if v is not None})
    torch.manual_seed(args.seed)
    try:
        model = model_fn() if model_fn is not None else timm.create_model(args.model, **kwargs)
    except TypeError as e:
        raise ValueError(f"{args.model} does not take these arguments ({e}); check --model-kwargs, --drop-path "
                         "and --drop-block.") from e
    model.pretrained_cfg = dict(getattr(model, "pretrained_cfg", None) or {}, **data_cfg, num_classes=num_classes)
    cfg = resolve_data_config(dict(vars(args), in_chans=in_chans), model=model)
    model.pretrained_cfg.update(input_size=cfg["input_size"], mean=cfg["mean"], std=cfg["std"],
                                crop_pct=cfg["crop_pct"], interpolation=cfg["interpolation"])
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    initial, init = _initial_checkpoint(args)
    if initial == 1:
        load_into_model(model, args.initial_checkpoint, args.model)
    if args.split == 1:
        ens = single(model, args.model)
    else:
        ens = split(model, args.split, seed=args.seed * args.split, img_size=cfg["input_size"][-1], in_chans=in_chans,
                    drop_scale=getattr(args, "drop_scale", "S"), plan_at=PLAN_AT, init=init)
    if initial > 1:
        load_checkpoint(ens, args.initial_checkpoint, use_ema=has_ema(args.initial_checkpoint))
    return ens


def _initial_checkpoint(args: argparse.Namespace):
    """``(what --initial-checkpoint holds, the members' init)``: 0 none (or a resume, whose weights win), 1 one
    network (loaded before the split; ``--split-init inherit`` then cuts the members from it), S a split of S."""
    from ..training.warm_start import checkpoint_split_factor

    init = getattr(args, "split_init", "random")
    path = getattr(args, "initial_checkpoint", "")
    if not path or args.resume:
        if init == "inherit" and not args.resume:
            raise ValueError("--split-init inherit cuts the members from a trained model: pass it with "
                             "--initial-checkpoint PARENT (a checkpoint of the model to split).")
        return 0, "random"
    held = max(checkpoint_split_factor(path), 1)
    if held > 1 and held != args.split:
        raise ValueError(f"--initial-checkpoint {path} holds {held} members but --split is {args.split}; pass "
                         f"--split {held} to continue that split, or the checkpoint of one network to split it.")
    if held > 1 and init == "inherit":
        raise ValueError(f"--initial-checkpoint {path} already holds the {held} members; drop --split-init inherit "
                         "(it cuts members from one network).")
    return held, init


class _Members(nn.Module):
    """``forward`` = the ensemble's ``forward_members``, so DDP and ``torch.compile`` wrap the co-training call."""

    def __init__(self, ensemble: nn.Module) -> None:
        super().__init__()
        self.ensemble = ensemble

    def forward(self, views: Any) -> torch.Tensor:
        return self.ensemble.forward_members(views)


# ----------------------------------------------------------------------------------------------------------
# one epoch

class _Run:
    """What one training run holds: model, data, optimisation and bookkeeping (built by :func:`setup_run`)."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


def _views_for_model(views: torch.Tensor, channels_last: bool) -> Any:
    """``[S, B, C, H, W]`` views as the members take them (a list of channels-last views with ``channels_last``)."""
    if not channels_last:
        return views
    return [v.contiguous(memory_format=torch.channels_last) for v in views.unbind(0)]


def epoch_text(epoch: int, epochs: int) -> str:
    """How every line of the trainer names an epoch: ``'epoch 8 (9 of 10)'``.

    The number is timm's: counted from 0, as in ``checkpoint-8.safetensors``, ``summary.csv``'s ``epoch`` column
    and the ``Train: 8 [...]`` progress lines; the count in brackets is for a human.

    Args:
        epoch: The epoch, from 0.
        epochs: The run's ``--epochs``.

    Returns:
        The text.
    """
    return f"epoch {epoch} ({epoch + 1} of {epochs})"


def _check_finite(run: _Run, value: float) -> None:
    """A NaN or infinite loss is a ``ValueError`` before its backward (the checkpoints already written are kept)."""
    if not math.isfinite(value):
        epoch, update = divmod(run.num_updates, run.updates_per_epoch)
        lr = run.optimizer.param_groups[0]["lr"]
        raise ValueError(f"loss is {value} at {epoch_text(epoch, run.args.epochs)}, update {update} ({update + 1} of "
                         f"{run.updates_per_epoch}): training diverged; lower --lr (now {lr:.3g}), or add --clip-grad "
                         "1 or more --warmup-epochs. The checkpoints already written are kept.")


def _replicas(args: argparse.Namespace) -> int:
    """Data-parallel replicas (``--member-parallel`` ranks of one replica share its batch)."""
    return args.world_size // args.split if args.member_parallel else args.world_size


def _backward_step(run: _Run, loss: torch.Tensor, need_update: bool) -> None:
    """timm's backward: the grad scaler (float16) or ``backward`` + clipping + ``step`` on an update."""
    from timm.utils import dispatch_clip_grad

    args = run.args
    if run.scaler is not None:
        run.scaler(loss, run.optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                   parameters=run.model.parameters(), need_update=need_update)
        return
    loss.backward()
    if need_update:
        if args.clip_grad is not None:
            dispatch_clip_grad(run.model.parameters(), value=args.clip_grad, mode=args.clip_mode)
        run.optimizer.step()


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity where the OS says, else ``os.cpu_count()``)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not on Linux
        return max(os.cpu_count() or 1, 1)


def cap_workers(workers: int) -> int:
    """``-j`` capped at the CPU count (timm's default 4 on a 2-core machine only adds processes that wait; torch
    warns about it), with an INFO line where it lowers it."""
    cpus = cpu_count()
    if workers > cpus:
        _logger.info("-j %d loader workers on %d CPU(s): using %d", workers, cpus, cpus)
        return cpus
    return workers


def _log_plan(run: _Run, start: int) -> None:
    """The run's first line: how much it will train, and where its expected duration appears."""
    args = run.args
    left = max(args.epochs - start, 0)
    images = len(run.train_loader.dataset) if hasattr(run.train_loader, "dataset") else 0
    default = " (timm's default --epochs 300: a full recipe; pass --epochs N for a short run)" \
        if args.epochs == 300 and not args.resume else ""
    which = "" if not left else f" (epoch {start})" if left == 1 else f" (epochs {start} to {args.epochs - 1})"
    _logger.info("training %d epoch(s)%s%s of %d images, %d updates each, S=%d, %d loader worker(s) on %d CPU(s); the "
                 "run's expected time left is in every progress line from the second update (the first one also "
                 "starts the loader and warms up: 'measuring'), training only until epoch %d's evaluation is timed; "
                 "one-off costs ('auto' timing its candidates, the first update's start-up) are left out of it",
                 left, which, default, images, run.updates_per_epoch, args.split, args.workers, cpu_count(), start)


def member_ce_text(ce_sum: float, split: int) -> str:
    """The training CE as a log shows it beside the loss: the loss sums the S members' CEs (9.6 at S=4 is 2.4 a
    member), so the per-member mean is what compares across S."""
    if split <= 1:
        return f"ce {ce_sum:.4f}"
    return f"ce per member {ce_sum / split:.4f}, summed over the {split} members"


# the trainer's clock and its one-off costs (a test replaces them with fakes)
_clock = time.perf_counter


def _one_off_seconds() -> float:
    """The seconds this process has spent on one-off costs that an ETA leaves out: ``'auto'`` timing its
    candidates (:func:`timm_split.execution.auto.trial_seconds`)."""
    from ..execution.auto import trial_seconds

    return trial_seconds()


def run_estimate(run: _Run):
    """The run's one estimate of its time left (:class:`~timm_split.training.metrics.RunEstimate`), made on first
    use (``train_one_epoch`` may be called without :func:`train`, as ``benchmarks/train_speed.py`` does)."""
    from ..training.metrics import RunEstimate

    if getattr(run, "eta", None) is None:
        run.eta = RunEstimate(run.args.epochs, clock=_clock, one_off=_one_off_seconds)
    return run.eta


def _eta_text(seconds: float) -> str:
    """An epoch's time left in a progress line: a duration (``'4:40'``), ``'measuring'`` while unknown."""
    from ..training.metrics import duration_text

    return duration_text(seconds) if math.isfinite(seconds) else "measuring"


def train_one_epoch(run: _Run, epoch: int, progress: bool) -> Dict[str, float]:
    """One epoch of co-training with gradient accumulation; returns the mean ``loss``, ``ce`` and ``cot``.

    Without a progress bar, every ``--log-interval`` updates (and at the last batch) it logs the loss, lr, images/s
    and the epoch's time left; with or without, one line at the end: the epoch's images/s and the run's time left.
    """
    from tqdm import tqdm

    from ..training.metrics import duration_text

    args, loader = run.args, run.train_loader
    if args.mixup_off_epoch and epoch >= args.mixup_off_epoch and run.augment.mixup is not None:
        run.augment.mixup.mixup_enabled = False
    accum, n = args.grad_accum_steps, len(loader)
    last_accum = n % accum or accum
    teacher = getattr(run, "teacher", None)
    sums = dict.fromkeys(("loss", "ce", "cot") + (("kd",) if teacher is not None else ()), 0.0)
    run.model.train()
    run.optimizer.zero_grad()
    bar = tqdm(loader, desc=epoch_text(epoch, args.epochs), disable=not progress, leave=False,
               file=sys.stderr, dynamic_ncols=True)
    # images of every data-parallel replica, as timm counts them; the time left is paced after the first update
    eta = run_estimate(run)
    pace = eta.begin(epoch, n, warmup=min(accum, n))
    replicas = _replicas(args)
    for i, (views, target) in enumerate(bar):
        need_update = i == n - 1 or (i + 1) % accum == 0
        divisor = last_accum if i >= n - last_accum else accum
        views, target = run.augment(views, target)
        sync = run.model.no_sync if (hasattr(run.model, "no_sync") and not need_update) else contextlib.nullcontext
        with sync():
            with run.autocast():
                member_views = _views_for_model(views, args.channels_last)
                logits = run.model(member_views)
                teacher_logits = None if teacher is None else teacher(member_views)
            if teacher_logits is None:
                losses = run.loss_fn(logits, target, epoch=epoch + i / n)
            else:  # each member distils from the teacher's output on its own view
                losses = run.loss_fn(logits, target, teacher_logits, epoch=epoch + i / n)
            values = torch.stack([losses[k].detach().float() for k in sums]).tolist()  # one host sync a step
            _check_finite(run, values[0])
            _backward_step(run, losses["loss"] / divisor, need_update)
        for k, v in zip(sums, values):
            sums[k] += v
        eta.update(target.shape[0] * replicas)
        if not need_update:
            continue
        run.num_updates += 1
        run.optimizer.zero_grad()
        if run.ema is not None:
            run.ema.update(run.ensemble, step=run.num_updates)
        run.scheduler.step_update(num_updates=run.num_updates, metric=sums["loss"] / (i + 1))
        if (i // accum) % args.log_interval == 0 or i == n - 1:
            lr = run.optimizer.param_groups[0]["lr"]
            if progress:
                seconds, complete = eta.left(epoch)
                bar.set_postfix(loss=f"{sums['loss'] / (i + 1):.3f}",
                                ce_member=f"{sums['ce'] / (i + 1) / args.split:.3f}",
                                lr=f"{lr:.3g}", img_s=f"{pace.rate():.0f}",
                                run_left=_eta_text(seconds) + ("" if complete else " + eval"))
            elif run.rank == 0:
                _logger.info("Train: %d [%d/%d] loss %.4f (%s) lr %.3e, %.1f img/s, epoch ETA %s; run: %s",
                             epoch, i // accum, math.ceil(n / accum), sums["loss"] / (i + 1),
                             member_ce_text(sums["ce"] / (i + 1), args.split), lr, pace.rate(),
                             _eta_text(pace.eta()), eta.text(epoch))
    eta.trained()
    if run.rank == 0:  # the run's time left: this epoch's evaluation and checkpoints, then the epochs after it
        left = max(args.epochs - epoch - 1, 0)
        _logger.info("Train: %d done (%d of %d), %d images in %s, %.1f img/s; run: %s", epoch, epoch + 1, args.epochs,
                     pace.items, duration_text(pace.elapsed()), pace.rate(),
                     eta.text(epoch, f", {left} epoch{'' if left == 1 else 's'} after this one" if left else
                              ", the last epoch's evaluation and checkpoints"))
    return OrderedDict((k, v / n) for k, v in sums.items())


# ----------------------------------------------------------------------------------------------------------
# setup

def _init_distributed(args: argparse.Namespace) -> torch.device:
    """Device and torchrun process group (timm's ``init_distributed_device``); sets ``args.rank`` etc."""
    from timm.utils import init_distributed_device

    device = resolve_device(args.device)
    args.device = str(device)
    device = init_distributed_device(args)
    if args.member_parallel and args.world_size != args.split:
        raise ValueError(f"--member-parallel runs one member per rank: launch --nproc_per_node {args.split} "
                         f"(got world size {args.world_size}).")
    return device


def _output_dir(args: argparse.Namespace) -> str:
    """The run folder (``--output``/``--experiment``, or the folder of the ``--resume`` checkpoint); not created."""
    if args.resume and not args.output and not args.experiment:
        return os.path.dirname(os.path.abspath(args.resume))
    name = args.experiment or f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{args.model}-s{args.split}"
    out = os.path.join(args.output or os.path.join(".", "output", "train"), name)
    parent = out
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise ValueError(f"--output {args.output}: {parent} is a file, not a folder; pass a folder path.")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"{out} is a file; pass another --output or --experiment.")
    return out


def _data(args: argparse.Namespace):
    from ..training.data import create_datasets

    train_ds, val_ds, classes, data_cfg = create_datasets(args.dataset, args.data_dir, args.train_split,
                                                          args.val_split, args.class_map, args.train_subset)
    if args.num_classes is not None and args.num_classes != classes:
        raise ValueError(f"--num-classes {args.num_classes} but the dataset has {classes} classes; drop "
                         f"--num-classes or pass {classes}.")
    check_channels(args, data_cfg.get("input_size", (3,))[0])
    if len(train_ds) < args.batch_size:
        raise ValueError(f"the train split has {len(train_ds)} images, fewer than --batch-size {args.batch_size} "
                         "(the last partial batch is dropped); lower --batch-size.")
    return train_ds, val_ds, classes, data_cfg


def _check_run_outputs(args: argparse.Namespace, out: str, train_ds, val_ds) -> None:
    """The output-path guard: the run folder's files are none of the run's inputs (``check_run_outputs``)."""
    from ..training.data import data_sources
    from .run_folder import check_run_outputs

    files = {flag: getattr(args, dest, None) for flag, dest in (
        ("--class-map", "class_map"), ("--config", "config"), ("--initial-checkpoint", "initial_checkpoint"),
        ("--kd-model-checkpoint", "kd_model_checkpoint"))}
    check_run_outputs(out, dict(files, **{"--data-dir": data_sources(train_ds) + data_sources(val_ds)}),
                      resume=args.resume)


def _loaders(args: argparse.Namespace, train_ds, val_ds, ens: nn.Module, device: torch.device):
    from ..training.data import create_eval_loader, create_member_loader

    cfg = {k: ens.pretrained_cfg[k] for k in ("input_size", "mean", "std", "crop_pct", "interpolation")}
    train_interp = cfg["interpolation"] if args.no_aug or not args.train_interpolation else args.train_interpolation
    train_loader = create_member_loader(
        train_ds, args.split, cfg, args.batch_size, device, same_view=args.same_view,
        distributed=args.distributed and not args.member_parallel, no_aug=args.no_aug, scale=tuple(args.scale),
        ratio=tuple(args.ratio), hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter,
        auto_augment=args.aa, interpolation=train_interp, num_workers=args.workers, pin_memory=args.pin_mem)
    eval_loader = create_eval_loader(val_ds, cfg, args.validation_batch_size or args.batch_size, device,
                                     args.workers, args.pin_mem)
    return train_loader, eval_loader, cfg


def _resolve_lr(args: argparse.Namespace) -> None:
    """timm's rule: ``lr = lr_base * global_batch / lr_base_size`` (sqrt for adaptive optimizers) if not given."""
    if args.lr:
        return
    replicas = _replicas(args)
    batch_ratio = args.batch_size * replicas * args.grad_accum_steps / args.lr_base_size
    if not args.lr_base_scale:
        args.lr_base_scale = "sqrt" if any(o in args.opt.lower() for o in ("ada", "lamb")) else "linear"
    args.lr = args.lr_base * (batch_ratio ** 0.5 if args.lr_base_scale == "sqrt" else batch_ratio)
    _logger.info("lr %.4g from --lr-base %g at global batch %d (%s)", args.lr, args.lr_base,
                 args.batch_size * replicas * args.grad_accum_steps, args.lr_base_scale)


def _optimisation(args: argparse.Namespace, ens: nn.Module, train_model: nn.Module, n_batches: int):
    """Optimizer (timm's ``create_optimizer_v2`` on the scaled-decay groups), scheduler, loss, mixup."""
    from timm.data import Mixup
    from timm.optim import create_optimizer_v2, optimizer_kwargs
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs

    from ..training.loss import CoTrainingLoss
    from ..training.optim import param_groups

    _resolve_lr(args)
    owned = getattr(train_model, "member", ens)  # --member-parallel: this rank's member only
    optimizer = create_optimizer_v2(param_groups(owned, args.weight_decay, args.split),
                                    **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    updates_per_epoch = (n_batches + args.grad_accum_steps - 1) // args.grad_accum_steps
    scheduler, _ = create_scheduler_v2(optimizer, **scheduler_kwargs(args), updates_per_epoch=updates_per_epoch)
    mixup = None
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                      prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                      label_smoothing=args.smoothing, num_classes=args.num_classes)
    warmup = args.cot_warmup_epochs if args.cot_warmup_epochs is not None else args.epochs * 40 / 300
    loss_fn = CoTrainingLoss(cot_weight=args.cot_weight, warmup_epochs=warmup, mode=args.cot_mode,
                             smoothing=0.0 if mixup is not None else args.smoothing)  # mixup smooths the targets
    return optimizer, scheduler, updates_per_epoch, mixup, loss_fn


def _train_model(args: argparse.Namespace, ens: nn.Module, device: torch.device) -> nn.Module:
    """What the loop calls: the members' forward, DDP-wrapped, member-parallel or compiled as the flags say."""
    if args.member_parallel:
        from ..training.distributed import MemberParallel
        return MemberParallel(ens, device=device)
    model: nn.Module = _Members(ens)
    if args.distributed:
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if args.torchcompile:
        model = torch.compile(model, backend=args.torchcompile)
    return model


def setup_run(args: argparse.Namespace, model_fn: Optional[Callable[[], nn.Module]] = None) -> _Run:
    """Everything a run needs before its first epoch (checked flags, data, model, loaders, optimisation).

    Args:
        args: The flags (:func:`train_args`).
        model_fn: Builds the base model instead of ``timm.create_model``.

    Returns:
        The run that :func:`train_one_epoch` steps (``benchmarks/train_speed.py`` times it).
    """
    from timm.data.random_erasing import RandomErasing  # noqa: F401 - fail early if timm lacks it
    from timm.utils import ModelEmaV3, NativeScaler, random_seed

    from ..training.data import MemberBatchAugment, class_names

    check_train_args(args, custom_model=model_fn is not None)
    args.workers = cap_workers(args.workers)
    distill = _distill_options(args)
    device = _init_distributed(args)
    out = _output_dir(args) if args.rank == 0 else None
    if args.threads:
        torch.set_num_threads(args.threads)
    train_ds, val_ds, args.num_classes, data_cfg = _data(args)
    if out is not None:
        _check_run_outputs(args, out, train_ds, val_ds)
    ens = build_model(args, args.num_classes, data_cfg, model_fn)
    random_seed(args.seed, args.rank)
    ens.to(device)
    if args.channels_last:
        ens.to(memory_format=torch.channels_last)
    ema = ModelEmaV3(ens, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup) if args.model_ema else None
    ens.set_execution(args.execution)  # after the EMA's deepcopy, which runs the members in a loop
    train_loader, eval_loader, data_config = _loaders(args, train_ds, val_ds, ens, device)
    model = _train_model(args, ens, device)
    optimizer, scheduler, updates_per_epoch, mixup, loss_fn = _optimisation(args, ens, model, len(train_loader))
    ema_warning(args, updates_per_epoch * args.epochs)
    teacher, teacher_record = None, None
    if distill.enabled:
        from ..training.distill import DistillationLoss, load_teacher

        teacher, teacher_record = load_teacher(distill, args.num_classes, data_config, class_names(train_ds),
                                               same_view=args.same_view, device=device)
        loss_fn = DistillationLoss(loss_fn, distill)
    autocast = autocast_factory(device, args.amp, args.amp_dtype)
    float16 = args.amp and device.type == "cuda" and (args.amp_dtype or "float16") == "float16"
    return _Run(args=args, device=device, out=out, ensemble=ens, class_names=class_names(train_ds), model=model,
                ema=ema, optimizer=optimizer, teacher=teacher, distill=distill, teacher_record=teacher_record,
                scheduler=scheduler, updates_per_epoch=updates_per_epoch, loss_fn=loss_fn, autocast=autocast,
                scaler=NativeScaler(device="cuda") if float16 else None, train_loader=train_loader,
                eval_loader=eval_loader, data_config=data_config, rank=args.rank, num_updates=0, train_seconds=0.0,
                augment=MemberBatchAugment(args.reprob, args.remode, args.recount, mixup, device))


def _distill_options(args: argparse.Namespace):
    """The ``--kd-*`` flags as :class:`~timm_split.training.distill.DistillOptions`, checked before any work; with
    ``--resume``, the run's recorded teacher (reused without ``--kd-*`` flags, another one refused)."""
    from ..checkpoint import read_metadata, training_state
    from ..training.distill import DistillOptions, resume_options

    distill = DistillOptions.from_args(args)
    if args.resume:
        distill = resume_options(distill, training_state(read_metadata(args.resume)).get("distill"), args.resume)
        args.kd_model_name, args.kd_model_checkpoint = distill.model_name, distill.checkpoint  # args.json says so
        args.kd_temperature = distill.temperature
        args.distill_loss_weight, args.task_loss_weight = distill.distill_loss_weight, distill.task_loss_weight
    if distill.enabled and args.member_parallel:
        raise ValueError("--member-parallel does not support distillation (--kd-*) yet; drop one, or use DDP.")
    if distill.checkpoint and not os.path.isfile(distill.checkpoint):
        raise ValueError(f"--kd-model-checkpoint {distill.checkpoint}: no such file; pass the teacher's weights "
                         "(a timm-split checkpoint or a timm model's state dict).")
    if getattr(args, "initial_checkpoint", "") and not os.path.isfile(args.initial_checkpoint):
        raise ValueError(f"--initial-checkpoint {args.initial_checkpoint}: no such file; pass a timm-split checkpoint "
                         "or a timm model's .pth/.safetensors state dict.")
    return distill


def _kd_text(train_metrics: Dict[str, float]) -> str:
    """The epoch line's distillation part (``, kd <mean>``; nothing without a teacher)."""
    return f", kd {train_metrics['kd']:.4f}" if "kd" in train_metrics else ""


# ----------------------------------------------------------------------------------------------------------
# checkpoints and resume

def _checkpoint_state(run: _Run) -> Dict[str, Any]:
    """The JSON training state saved with the weights (and what ``timm-split validate`` needs to rebuild)."""
    a = run.args
    state = {"step": run.num_updates, "model": a.model, "split_factor": a.split, "num_classes": a.num_classes,
             "model_kwargs": a.model_kwargs, "data_config": run.data_config, "seed": a.seed, "plan_at": PLAN_AT,
             "class_names": run.class_names, "train_seconds": run.train_seconds,
             "execution": run.ensemble.chosen_execution(training=True)}
    if getattr(run, "teacher_record", None) is not None:  # --resume reuses this teacher and refuses another
        state["distill"] = {"teacher": run.teacher_record.as_dict(), "options": run.distill.as_dict()}
    if run.scaler is not None:
        state["scaler"] = run.scaler.state_dict()
    return state


def _saver(run: _Run):
    """timm's ``CheckpointSaver`` bookkeeping (last, model_best, the best ``--checkpoint-hist``), kill-safe, writing
    our safetensors (:class:`~timm_split.training.saver.KillSafeSaver`)."""
    from ..checkpoint import save_checkpoint
    from ..training.saver import KillSafeSaver

    def save(path: str, epoch: int, metric: Optional[float], saver_state: Dict[str, Any]) -> None:
        state = dict(_checkpoint_state(run), epoch=epoch + 1, metric=metric, saver=saver_state)
        save_checkpoint(run.ensemble, path, None if run.args.member_parallel else run.optimizer,
                        model_ema=None if run.ema is None else run.ema.module, state=state)

    return KillSafeSaver(save, model=run.ensemble, optimizer=run.optimizer, checkpoint_dir=run.out,
                         recovery_dir=run.out, decreasing=run.args.eval_metric == "loss",
                         max_history=run.args.checkpoint_hist)


def _resume(run: _Run, saver) -> int:
    """Load ``--resume`` (weights, optimizer, EMA, scaler, step, saver history); return the start epoch."""
    from ..checkpoint import load_checkpoint

    a = run.args
    ckpt = load_checkpoint(run.ensemble, a.resume, None if a.no_resume_opt else run.optimizer,
                           model_ema=None if run.ema is None else run.ema.module)
    start, run.num_updates = ckpt.epoch, ckpt.step
    run.train_seconds = float(ckpt.state.get("train_seconds", 0.0))  # the run's total survives a resume
    chosen = ckpt.state.get("execution")
    if a.execution == "auto" and chosen not in (None, "auto") and not a.member_parallel:
        run.ensemble.set_execution(chosen)  # what 'auto' chose for this run: the resumed steps compute as before
        _logger.info("--execution auto: %s, as chosen when this run started", chosen)
    if "scaler" in ckpt.state and run.scaler is not None and not a.no_resume_opt:
        run.scaler.load_state_dict(ckpt.state["scaler"])
    if saver is not None:
        if "saver" in ckpt.state:
            saver.load_state_dict(ckpt.state["saver"])
        saver.repair(ckpt.state, a.resume)
    if a.sched_on_updates:
        run.scheduler.step_update(start * run.updates_per_epoch)
    elif start > 0:
        run.scheduler.step(start)
    if start > 0:
        _logger.info("resumed %s, saved after epoch %d: training from epoch %d, update %d", a.resume, start - 1,
                     start, run.num_updates)
    else:
        _logger.info("resumed %s: training from epoch 0, update %d", a.resume, run.num_updates)
    return start


# ----------------------------------------------------------------------------------------------------------
# the run

def _evaluate(run: _Run) -> Dict[str, Any]:
    """timm's rule: the EMA's metrics when there is an EMA, else the model's (ensemble and members)."""
    from ..training.metrics import evaluate

    members_fn = None
    if run.args.member_parallel:
        mp = run.model
        members_fn = lambda x: mp.gather(mp.member(x))  # noqa: E731 - every rank runs its own member
    model = run.ensemble if run.ema is None else run.ema.module
    return evaluate(model, run.eval_loader, run.autocast, run.args.channels_last, members_fn, uncertainty=True)


def _flat(metrics: Dict[str, Any]) -> Dict[str, float]:
    """Ensemble metrics plus ``m<i>_top1`` per member, as one summary.csv row."""
    row = OrderedDict((k, v) for k, v in metrics.items() if k != "members")
    row.update((f"m{i}_top1", m["top1"]) for i, m in enumerate(metrics.get("members", [])))
    return row


def _epoch_end(run: _Run, saver, epoch: int, train_metrics: Dict[str, float]) -> Optional[Dict[str, Any]]:
    """Distribute BN, evaluate, append to summary.csv, save the checkpoints, step the scheduler."""
    from timm.utils import distribute_bn, update_summary

    a = run.args
    if a.distributed and not a.member_parallel and a.dist_bn in ("broadcast", "reduce"):
        distribute_bn(run.ensemble, a.world_size, a.dist_bn == "reduce")
        if run.ema is not None:
            distribute_bn(run.ema.module, a.world_size, a.dist_bn == "reduce")
    evaluated = epoch + 1 == a.epochs or (a.eval_every and (epoch + 1) % a.eval_every == 0)
    metrics = _evaluate(run) if evaluated else None
    metric = None if metrics is None else metrics[a.eval_metric]
    if a.member_parallel:
        run.ensemble.load_state_dict(run.model.ensemble_state_dict())  # a collective: every rank calls it
    if saver is not None:
        lrs = [g["lr"] for g in run.optimizer.param_groups]
        update_summary(epoch, train_metrics, _flat(metrics) if metrics else {}, os.path.join(run.out, SUMMARY),
                       lr=sum(lrs) / len(lrs))  # before the checkpoint: a resume trims rows it lacks
        saver.save_checkpoint(epoch, metric=metric)
    run.scheduler.step(epoch + 1, metric)
    return metrics


def _uncertainty_text(metrics: Dict[str, Any]) -> str:
    """`` brier .. aurc .. disagree .. mi ..`` of an evaluation (the keys ``evaluate(uncertainty=True)`` adds)."""
    if "brier" not in metrics:
        return ""
    text = f" brier {metrics['brier']:.4f} aurc {metrics['aurc']:.4f}"
    if len(metrics.get("members", [])) > 1:
        text += f" disagree {metrics['pairwise_disagreement']:.4f} mi {metrics['mutual_info']:.4f}"
    return text


def _log_epoch(run: _Run, epoch: int, train_metrics: Dict[str, float], metrics: Optional[Dict[str, Any]],
               seconds: float) -> None:
    if run.rank != 0:
        return
    line = (f"{epoch_text(epoch, run.args.epochs)}: loss {train_metrics['loss']:.4f} (ce {train_metrics['ce']:.4f}, "
            f"cot {train_metrics['cot']:.4f}{_kd_text(train_metrics)}; "
            f"{member_ce_text(train_metrics['ce'], run.args.split)}), {seconds:.1f}s")
    if metrics is not None:
        line += (f" | {'EMA ' if run.ema is not None else ''}top-1 {metrics['top1']:.2f}% top-5 {metrics['top5']:.2f}% "
                 f"nll {metrics['loss']:.4f} ece {metrics['ece']:.4f}{_uncertainty_text(metrics)} | members "
                 + " ".join(f"{m['top1']:.2f}" for m in metrics["members"]))
    _logger.info(line)


def train(args: argparse.Namespace, model_fn: Optional[Callable[[], nn.Module]] = None, progress: bool = True
          ) -> Dict[str, Any]:
    """Train (or ``--resume``) a run; write its checkpoints, ``summary.csv``, ``args.json`` and ``results.json``.

    Args:
        args: The flags (``add_train_args``'s parser, or :func:`train_args` with overrides).
        model_fn: Builds the base model instead of ``timm.create_model(args.model, ...)``.
        progress: Show a tqdm bar.

    Returns:
        ``results.json``'s content: ``final`` (ensemble and member metrics of the last evaluation), ``best_metric``,
        ``best_epoch``, ``params``/``gmacs`` (all members), ``train_seconds`` (the training loops' time, of every
        process of the run when resumed), ``wall_seconds`` (this call's wall time: setup, training, evaluation and
        checkpoints), ``output`` and ``args``.

    Raises:
        ValueError: a bad flag, dataset or checkpoint, with the fix in the message.
    """
    started = time.perf_counter()
    run = setup_run(args, model_fn)
    run.started = started  # the wall time in results.json counts the setup too
    lock = _claim_output(run) if run.rank == 0 else None
    try:
        return _train_epochs(run, progress)
    except Terminated as e:
        if lock is not None:  # what the CLI's last line says
            last = os.path.join(run.out, "last.safetensors")
            then = f"--resume {last} continues the run" if os.path.exists(last) else \
                "no checkpoint yet: the same command starts it again"
            e.args = (f"{lock.path} released; {then}",)
        raise
    finally:
        if lock is not None:
            lock.release()


class Terminated(BaseException):
    """SIGTERM, raised in the main thread by :func:`sigterm_unwinds` so that a run's ``finally`` blocks run (the
    run folder's lock is released); a ``BaseException``, like ``KeyboardInterrupt``, that no ``except Exception``
    swallows."""


@contextlib.contextmanager
def sigterm_unwinds():
    """While inside: SIGTERM raises :class:`Terminated` in this process's main thread instead of killing it at once,
    so the run ends as after Ctrl-C (the lock file removed, the loader's workers shut down).

    Nothing changes where SIGTERM already has a handler, off the main thread, or in a process forked inside (a
    loader worker ends at once, as before); a second SIGTERM kills at once.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    pid = os.getpid()

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM (or a forked child's) ends at once
        if os.getpid() != pid:
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _claim_output(run: _Run):
    """Create and lock the run folder (sets ``run.out``; returns the held :class:`~.run_folder.RunLock`).

    A fresh run into a folder that holds a run goes to ``<folder>-<n>`` (timm's ``get_outdir(..., inc=True)``);
    the temp files a killed run left there are removed.
    """
    from timm.utils import get_outdir

    from .run_folder import RunLock, holds_run, remove_stale_temp_files

    os.makedirs(run.out, exist_ok=True)
    lock = RunLock(run.out).acquire()
    if not run.args.resume and holds_run(run.out):
        lock.release()
        taken = os.path.normpath(run.out)
        try:
            run.out = get_outdir(os.path.dirname(taken), os.path.basename(taken), inc=True)
        except AssertionError:
            raise ValueError(f"{taken} and {taken}-1 to -99 exist; pass another --experiment or --output.") from None
        _logger.warning("%s holds a run; this fresh run writes to %s (--resume %s continues that run)", taken,
                        run.out, os.path.join(taken, "last.safetensors"))
        lock = RunLock(run.out).acquire()
    try:
        remove_stale_temp_files(run.out)
    except BaseException:
        lock.release()
        raise
    return lock


def _train_epochs(run: _Run, progress: bool) -> Dict[str, Any]:
    """:func:`train` in its claimed run folder: ``args.json``, the resume, the epochs, ``results.json``."""
    from timm.utils import random_seed

    args = run.args
    saver = None
    if run.rank == 0:
        saver = _saver(run)
        _write_json(os.path.join(run.out, "args.json"), _jsonable(vars(args)))
    start = _resume(run, saver) if args.resume else 0
    if run.rank == 0:
        _log_plan(run, start)
    if start >= args.epochs:
        _logger.warning("the checkpoint was saved after epoch %d (%d epoch(s) done) and --epochs is %d: nothing to "
                        "train; pass a larger --epochs to train on", start - 1, start, args.epochs)
    if saver is not None:
        _trim_summary(os.path.join(run.out, SUMMARY), start)
    seed_rank = 0 if args.member_parallel else args.rank  # member ranks must draw the same batches
    results: Dict[str, Any] = {"final": None, "final_epoch": None, "train_seconds": run.train_seconds,
                               "output": run.out}
    run.eta = None
    eta = run_estimate(run)  # the one estimate of the time left, for every line that states it
    for epoch in range(start, args.epochs):
        random_seed((args.seed * 100_003 + epoch) % SEED_SPACE, seed_rank)  # the same for seeds < 42947 as before
        sampler = getattr(run.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        train_metrics = train_one_epoch(run, epoch, progress and run.rank == 0)
        seconds = time.perf_counter() - t0
        run.train_seconds += seconds  # before _epoch_end, whose checkpoint records it
        results["train_seconds"] = run.train_seconds
        metrics = _epoch_end(run, saver, epoch, train_metrics)
        if metrics is not None:
            results["final"], results["final_epoch"] = metrics, epoch
        _log_epoch(run, epoch, train_metrics, metrics, seconds)
        took = eta.finish()
        if epoch == start and run.rank == 0:
            _log_expected_duration(run, epoch, took)
    if run.rank == 0:
        best = os.path.join(run.out, "model_best" + saver.extension) if saver.best_epoch is not None else None
        results.update(_cost(run), best_metric=saver.best_metric, best_epoch=saver.best_epoch, best_checkpoint=best,
                       args=_jsonable(vars(args)))
        results["wall_seconds"] = time.perf_counter() - getattr(run, "started", time.perf_counter())
        _write_json(os.path.join(run.out, RESULTS), results)
        if best is not None:  # timm's last line
            _logger.info("*** Best metric: %s %.4f at %s, in %s", args.eval_metric, saver.best_metric,
                         epoch_text(saver.best_epoch, args.epochs), best)
    return results


def _log_expected_duration(run: _Run, epoch: int, took: Dict[str, float]) -> None:
    """Once the first epoch this process trains is done: its wall time, its one-off part, and the run's time left
    (:meth:`~timm_split.training.metrics.RunEstimate.text`, as every progress line states it)."""
    from ..training.metrics import duration_text

    left = max(run.args.epochs - epoch - 1, 0)
    if not left:
        return
    one_off = [f"{duration_text(took[k])} {what}" for k, what in (
        ("auto", "of 'auto' timing its candidates"), ("startup", "of the first update's start-up (loader, warm-up)"))
        if took[k] >= 0.05]
    _logger.info("%s took %s with its evaluation and checkpoints%s; run: %s", epoch_text(epoch, run.args.epochs),
                 duration_text(took["wall"]),
                 f" ({', '.join(one_off)}: one-off, left out of the estimate)" if one_off else "",
                 run_estimate(run).text(epoch, f" for the {left} epoch{'' if left == 1 else 's'} after it"))


def _trim_summary(path: str, start: int) -> None:
    """timm's ``trim_summary``: drop rows of epochs >= ``start`` (a fresh run into an old folder starts anew)."""
    from timm.utils.summary import trim_summary

    try:
        trim_summary(path, start)
    except (ValueError, IndexError, OSError) as e:
        raise ValueError(f"{path} is corrupt ({e}); repair or delete it, then run again.") from e


def _cost(run: _Run) -> Dict[str, Any]:
    """Params and GMACs of the ensemble (fvcore: one member counted, :func:`timm_split.count.ensemble_cost`)."""
    from ..count import count, ensemble_cost

    size = run.data_config["input_size"]
    members = run.ensemble.members
    c = count(members[0], size[-1], in_chans=size[0])
    total = ensemble_cost(c, members)
    return {"params": total.params, "gmacs": total.gmacs, "member_params": [c.params] * len(members)}


def _jsonable(d: Dict[str, Any]) -> Dict[str, Any]:
    return json.loads(json.dumps(d, default=str))


def _write_json(path: str, obj: Any) -> None:
    """``atomic_write`` of ``obj`` as JSON (an I/O error names ``path``)."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    atomic_write(path, write)


# ----------------------------------------------------------------------------------------------------------
# CLI

def run_train(args: argparse.Namespace) -> int:
    """``timm-split train``: train, print the final metrics; user errors exit 2 with one line naming the fix."""
    cli_logging("timm_split")
    from ..errors import SplitError

    try:
        with sigterm_unwinds():
            results = train(args, progress=not args.no_progress and sys.stderr.isatty())
    except Terminated as e:
        print(f"timm-split train: stopped by SIGTERM{'; ' + str(e) if e.args else ''}", file=sys.stderr)
        return TERMINATED_EXIT
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, SplitError) as e:
        return user_error("train", e)
    except OSError as e:  # a full disk or a read-only filesystem: one line naming the file
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        return user_error("train", ValueError(f"cannot write {e.filename or 'the run folder'}: {e.strerror}; free "
                                              "disk space or pass another --output (files written before are intact)"))
    if getattr(args, "rank", 0) == 0:
        for line in summary_lines(args, results):
            print(line)
    return 0


def time_text(results: Dict[str, Any], resumed: bool = False) -> str:
    """The run's times as its last line gives them: ``'trained in 6:04 (wall 7:08 with setup, evaluation and
    checkpoints)'``; the training loops' time (``train_seconds``) counts every process of a resumed run, the wall
    time (``wall_seconds``) this command's."""
    from ..training.metrics import duration_text

    text = f"trained in {duration_text(results['train_seconds'])}"
    wall = results.get("wall_seconds")
    if wall is None:
        return text
    if resumed:
        return (f"{text} over the run's processes (this one: wall {duration_text(wall)} with setup, evaluation and "
                "checkpoints)")
    return f"{text} (wall {duration_text(wall)} with setup, evaluation and checkpoints)"


def summary_lines(args: argparse.Namespace, results: Dict[str, Any]) -> List[str]:
    """The lines ``timm-split train`` ends with: the last evaluated epoch's metrics, then the best epoch's (timm's
    ``*** Best metric``), which ``model_best`` holds and which can be an earlier epoch than the last.

    Args:
        args: The run's flags (``model``, ``split``, ``epochs``, ``eval_metric``).
        results: What :func:`train` returned.

    Returns:
        No line when nothing was evaluated, else one or two.
    """
    lines = []
    final, epochs = results.get("final"), args.epochs
    if final is not None:
        members = ", ".join(f"{m['top1']:.2f}" for m in final["members"])
        when = ""
        if results.get("final_epoch") is not None:
            last = results["final_epoch"] == epochs - 1
            when = f" at {epoch_text(results['final_epoch'], epochs)}{', the last' if last else ''}"
        lines.append(f"{args.model} S={args.split}: top-1 {final['top1']:.2f}%  top-5 {final['top5']:.2f}%  "
                     f"NLL {final['loss']:.4f}  ECE {final['ece']:.4f} (members {members}){when}; "
                     f"{results['params'] / 1e6:.3f}M params, {results['gmacs']:.4f} GMACs; "
                     f"{time_text(results, bool(getattr(args, 'resume', '')))}; {results['output']}")
    best, best_epoch = results.get("best_metric"), results.get("best_epoch")
    if best is not None and best_epoch is not None:
        metric = {"top1": "top-1", "top5": "top-5", "loss": "NLL"}.get(args.eval_metric, args.eval_metric)
        value = f"{best:.4f}" if args.eval_metric == "loss" else f"{best:.2f}%"
        final_epoch = results.get("final_epoch")
        same = "" if final_epoch is None else ", the epoch above" if best_epoch == final_epoch else \
            ", an earlier epoch than the one above"
        lines.append(f"*** Best metric: {metric} {value} at {epoch_text(best_epoch, epochs)}{same}, in "
                     f"{results.get('best_checkpoint') or os.path.join(results['output'], 'model_best.safetensors')}")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m timm_split.commands.train`` (and ``torchrun ... -m timm_split.commands.train``)."""
    from .common import OneLineParser, run_command

    parser = add_train_args(OneLineParser(prog="timm-split train"))
    return run_command("train", run_train, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
