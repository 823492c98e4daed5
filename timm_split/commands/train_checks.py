"""Every ``timm-split train`` flag checked before any work: one ``ValueError`` naming the flag and the fix.

The checks run before a dataset is read, a model is built or a file is written. timm's own parsers (optimizer,
scheduler, AutoAugment policy, model kwargs) are asked up front on tiny stand-ins instead of being discovered
mid-run.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
from typing import Any, Optional

import torch
from torch import nn

_logger = logging.getLogger(__name__)

__all__ = ["check_train_args", "EVAL_METRICS", "MIN_IMG_SIZE", "MIN_CROP_PCT", "INERT"]

EVAL_METRICS = ("top1", "top5", "loss")  # what evaluate() returns that a best checkpoint can be chosen by
MIN_IMG_SIZE = 8
MIN_CROP_PCT = 0.01  # validation resizes to img_size / crop_pct: 1e-9 overflowed PIL's resize
# numpy takes seeds below 2**32, and timm's random_seed adds the rank: seeds stay below 2**32 - 2**16, the epochs'
# reseeding (commands/train.py) wraps around in that range
SEED_SPACE = 2 ** 32 - 2 ** 16
MAX_SEED = SEED_SPACE - 1

# flag -> (low, high, low inclusive, high inclusive); None: unbounded
_RANGES = {
    "split": (1, None, True, True), "epochs": (1, None, True, True), "batch_size": (1, None, True, True),
    "grad_accum_steps": (1, None, True, True), "checkpoint_hist": (1, None, True, True),
    "log_interval": (1, None, True, True), "workers": (0, None, True, True), "eval_every": (0, None, True, True),
    "warmup_epochs": (0, None, True, True), "cooldown_epochs": (0, None, True, True),
    "validation_batch_size": (1, None, True, True), "in_chans": (1, None, True, True),
    "img_size": (MIN_IMG_SIZE, None, True, True), "train_subset": (1, None, True, True),
    "threads": (1, None, True, True), "seed": (0, MAX_SEED, True, True), "recount": (1, None, True, True),
    "lr": (0, None, False, True), "lr_base": (0, None, False, True), "warmup_lr": (0, None, True, True),
    "min_lr": (0, None, True, True), "weight_decay": (0, None, True, True), "momentum": (0, 1, True, False),
    "cot_weight": (0, None, True, True), "cot_warmup_epochs": (0, None, True, True),
    "clip_grad": (0, None, False, True), "crop_pct": (MIN_CROP_PCT, None, True, True), "color_jitter": (0, None, True, True),
    "mixup": (0, None, True, True), "cutmix": (0, None, True, True),
    "reprob": (0, 1, True, True), "hflip": (0, 1, True, True), "vflip": (0, 1, True, True),
    "mixup_prob": (0, 1, True, True), "mixup_switch_prob": (0, 1, True, True), "smoothing": (0, 1, True, False),
    "drop": (0, 1, True, False), "drop_path": (0, 1, True, False), "drop_block": (0, 1, True, False),
    "model_ema_decay": (0, 1, True, True),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _num(x: float) -> str:
    """A bound as the flag takes it: ints whole, floats short (``%g``)."""
    return str(x) if isinstance(x, int) else f"{x:g}"


def _in_range(name: str, v: Any, rng: tuple) -> None:
    lo, hi, lo_in, hi_in = rng
    ok = math.isfinite(v) and (lo is None or (v >= lo if lo_in else v > lo)) and (
        hi is None or (v <= hi if hi_in else v < hi))
    if not ok:
        want = " and ".join(w for w in (
            None if lo is None else f"{'>=' if lo_in else '>'} {_num(lo)}",
            None if hi is None else f"{'<=' if hi_in else '<'} {_num(hi)}") if w)
        kind = "" if isinstance(v, int) else "a finite number "
        raise ValueError(f"{_flag(name)} must be {kind}{want}; got {v}.")


def _check_ranges(args: argparse.Namespace) -> None:
    """Every number flag in its range (0 is a value, not 'unset': ``-vb 0`` is an error, not the default)."""
    for name, rng in _RANGES.items():
        v = getattr(args, name, None)
        if v is not None:
            _in_range(name, v, rng)
    if args.input_size is not None and (min(args.input_size) < 1 or min(args.input_size[1:]) < MIN_IMG_SIZE):
        raise ValueError(f"--input-size C H W needs C >= 1 and H, W >= {MIN_IMG_SIZE}; got {args.input_size}.")
    if args.eval_metric not in EVAL_METRICS:
        raise ValueError(f"--eval-metric must be one of {', '.join(EVAL_METRICS)}; got {args.eval_metric!r}.")
    for name in ("mean", "std"):
        v = getattr(args, name)
        if v is not None and any(not math.isfinite(x) for x in v):
            raise ValueError(f"{_flag(name)} must be finite numbers; got {v}.")
    if args.std is not None and min(args.std) <= 0:
        raise ValueError(f"--std must be > 0 for every channel; got {args.std}.")


def check_channels(args: argparse.Namespace, channels: int) -> None:
    """``--in-chans``, ``--mean`` and ``--std`` agree with the data's ``channels`` (after the dataset is known)."""
    if args.in_chans is not None and args.in_chans != channels:
        raise ValueError(f"--in-chans {args.in_chans} but the data has {channels}-channel images (timm reads "
                         "image folders as RGB; Fashion-MNIST's IDX files are 1 channel); drop --in-chans.")
    for name in ("mean", "std"):
        v = getattr(args, name)
        if v is not None and len(v) not in (1, channels):
            raise ValueError(f"{_flag(name)} has {len(v)} values for {channels}-channel images; pass 1 or "
                             f"{channels}.")


def _check_timm_parsers(args: argparse.Namespace) -> None:
    """Ask timm's optimizer, scheduler and AutoAugment factories about the flags, on tiny stand-ins."""
    from timm.data import create_transform
    from timm.optim import create_optimizer_v2, optimizer_kwargs
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs

    try:
        opt = create_optimizer_v2(nn.Linear(1, 1), **optimizer_kwargs(args))
    except Exception as e:  # noqa: BLE001 - any refusal of timm's optimizer factory is a flag error
        raise ValueError(f"--opt {args.opt} with these optimizer flags (--opt-betas {args.opt_betas}, --opt-eps, "
                         f"--opt-kwargs, --momentum) is refused by timm: {type(e).__name__}: {e}") from None
    try:
        sched, _ = create_scheduler_v2(opt, **scheduler_kwargs(args), updates_per_epoch=1)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"--sched {args.sched} is refused by timm: {type(e).__name__}: {e}") from None
    if sched is None:
        raise ValueError(f"--sched {args.sched!r} is not a timm scheduler (e.g. cosine, step, multistep, plateau).")
    if args.aa:
        try:
            create_transform(32, is_training=True, auto_augment=args.aa)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"--aa {args.aa!r} is not a timm AutoAugment/RandAugment policy (e.g. "
                             f"rand-m9-mstd0.5, original, v0): {type(e).__name__}: {e}") from None


def _check_model(args: argparse.Namespace, custom_model: bool) -> None:
    """The model name and ``--model-kwargs``: the model is created on the meta device (no memory, no weights)."""
    import timm

    from ..trace import input_shape_for

    name = args.model
    if name.startswith("splitnet_"):
        raise ValueError(f"--model {name}: pass the base model ({name[len('splitnet_'):]}) and --split S.")
    if custom_model:
        return
    if not timm.is_model(name):
        raise ValueError(f"unknown --model {name!r}; list the choices with python -c \"import timm; "
                         f"print(timm.list_models('{name[:4]}*'))\".")
    try:
        with torch.device("meta"):
            model = timm.create_model(name, **args.model_kwargs)
            if args.model_kwargs:  # a value the constructor keeps unchecked (drop_rate='abc') fails in forward
                model.train()(torch.empty(input_shape_for(model)))  # the size it was built at (img_size=64)
    except Exception as e:  # noqa: BLE001 - a kwarg the model does not take, or a value it refuses
        raise ValueError(f"--model {name} refuses --model-kwargs {args.model_kwargs}: {type(e).__name__}: {e}"
                         ) from None


def _check_files(args: argparse.Namespace) -> None:
    if args.class_map and not os.path.isfile(args.class_map):
        raise ValueError(f"--class-map {args.class_map}: no such file; pass a text file with one class folder name "
                         "per line.")
    if args.resume and os.path.isdir(args.resume):
        args.resume = os.path.join(args.resume, "last.safetensors")
    if args.resume and not os.path.isfile(args.resume):
        raise ValueError(f"--resume {args.resume}: no such file; pass <output>/last.safetensors of the run.")
    if args.torchcompile and args.torchcompile not in torch.compiler.list_backends():
        raise ValueError(f"--torchcompile {args.torchcompile}: not a torch.compile backend here (available: "
                         f"{', '.join(torch.compiler.list_backends())}).")


def _mixing(a: argparse.Namespace) -> bool:
    return a.mixup > 0 or a.cutmix > 0 or a.cutmix_minmax is not None


# (flags, when they do nothing, why): each given flag (not at its default) that does nothing is a warning
INERT = (
    (("amp_dtype",), lambda a: not a.amp, "it is the dtype of --amp, which is off; add --amp"),
    (("no_resume_opt",), lambda a: not a.resume, "there is no --resume"),
    (("model_ema_decay", "model_ema_warmup"), lambda a: not a.model_ema, "there is no --model-ema"),
    (("mixup_prob", "mixup_switch_prob", "mixup_mode", "mixup_off_epoch"), lambda a: not _mixing(a),
     "mixup and cutmix are off; add --mixup or --cutmix"),
    (("remode", "recount"), lambda a: not a.reprob, "random erasing is off; add --reprob"),
    (("clip_mode",), lambda a: a.clip_grad is None, "gradients are not clipped; add --clip-grad"),
    (("cot_mode", "cot_warmup_epochs"), lambda a: a.cot_weight == 0 or a.split == 1,
     "there is no co-training term (--cot-weight 0 or --split 1)"),
    (("drop_scale", "same_view"), lambda a: a.split == 1, "--split 1 trains one network"),
    (("decay_milestones",), lambda a: a.sched != "multistep", "only --sched multistep reads it"),
    (("decay_epochs",), lambda a: a.sched in ("cosine", "tanh", "multistep", "plateau", "constant"),
     "--sched step (and the stable-decay schedules) read it, not this --sched"),
    (("patience_epochs",), lambda a: a.sched != "plateau", "only --sched plateau reads it"),
    (("scale", "ratio", "hflip", "vflip", "color_jitter", "aa", "train_interpolation"), lambda a: a.no_aug,
     "--no-aug turns the training augmentation off"),
    (("lr_base", "lr_base_size", "lr_base_scale"), lambda a: bool(a.lr), "--lr is given, which overrides them"),
)


def check_train_args(args: argparse.Namespace, custom_model: bool = False) -> None:
    """Reject bad values before any data or model is loaded (``custom_model``: the name is only a label).

    Raises:
        ValueError: one line naming the flag and the fix.
    """
    _check_ranges(args)
    _inert_flags(args)
    _check_files(args)
    _check_model(args, custom_model)
    _check_timm_parsers(args)
    if args.member_parallel and (args.model_ema or args.resume):
        raise ValueError("--member-parallel does not support --model-ema or --resume yet; drop them or use DDP.")
    warmup_warning(args)


def _inert_flags(args: argparse.Namespace) -> None:
    """Warn about each flag given that does nothing with the others (:data:`INERT`)."""
    from .common import flag_defaults, inert_flags
    from .train_flags import add_train_args

    inert_flags(args, INERT, flag_defaults(add_train_args(argparse.ArgumentParser())))


def ema_warning(args: argparse.Namespace, updates: int) -> Optional[str]:
    """Warn (and return the message) when ``--model-ema`` without warm-up would still be mostly its initial
    weights after the run's ``updates`` (decay**updates > 0.5): it is what timm evaluates, so a short run would
    score near chance whatever the model learnt."""
    if args.model_ema and not args.model_ema_warmup and args.model_ema_decay ** updates > 0.5:
        msg = (f"--model-ema-decay {args.model_ema_decay:g} over this run's {updates} updates keeps "
               f"{args.model_ema_decay ** updates:.0%} of the EMA's initial weights, and the EMA is what is "
               "evaluated: add --model-ema-warmup (its decay ramps up from 0), or lower --model-ema-decay.")
        _logger.warning(msg)
        return msg
    return None


def warmup_warning(args: argparse.Namespace) -> Optional[str]:
    """Warn (and return the message) when the LR warm-up covers the whole run: it then never leaves --warmup-lr."""
    if args.sched and args.warmup_epochs >= args.epochs and args.warmup_lr < (args.lr or args.lr_base):
        msg = (f"--warmup-epochs {args.warmup_epochs} covers all --epochs {args.epochs}: the learning rate stays "
               f"near --warmup-lr {args.warmup_lr:g} and the model will learn little; pass --warmup-epochs "
               f"{max(0, args.epochs // 5)} or more --epochs.")
        _logger.warning(msg)
        return msg
    return None
